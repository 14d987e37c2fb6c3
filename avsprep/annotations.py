"""labelImg annotations: Pascal VOC XML and YOLO txt, parsed into boxes in pixel-edge coordinates.

Box convention (docs/design.md §3): coordinates are pixel edges, 0..W and 0..H. labelImg writes integers; other tools
write floats, which are rounded to the nearest integer. A box crops `image[ymin:ymax, xmin:xmax]`, so a box
touching the right border has xmax = W.

XML comes from many hands, so it is parsed with entity resolution, DTD loading and network access off: an
external entity or an entity bomb can neither read a file nor blow up memory.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from avsprep.errors import InputError

log = logging.getLogger(__name__)

MAX_ANNOTATION_BYTES = 10 * 1024 * 1024  # labelImg files are a few kB; anything this big is not an annotation
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Box:
    """One object box in pixel-edge coordinates (xmin < xmax, ymin < ymax)."""

    name: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    difficult: bool = False


@dataclass
class FrameAnnotation:
    """The boxes of one annotated frame."""

    source: Path  # the annotation file
    filename: str  # the frame's file name (VOC <filename>, or the YOLO txt's image)
    width: int | None = None  # from VOC <size>; YOLO has none
    height: int | None = None
    boxes: list[Box] = field(default_factory=list)
    xml_path: str | None = None  # labelImg's <path>: used only with --trust-xml-paths

    @property
    def stem(self) -> str:
        return Path(self.filename).stem


def _check_size(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_ANNOTATION_BYTES:
            raise InputError(path, f"annotation file is {size} bytes, above the {MAX_ANNOTATION_BYTES} byte cap")
        return path.read_bytes()
    except OSError as error:
        raise InputError(path, f"cannot read annotation file ({error.strerror or error})") from None


def _xml_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False, huge_tree=False
    )


def round_edge(value: float) -> int:
    """A float pixel-edge coordinate rounded to the nearest integer (halves up), as every reader rounds them."""
    return math.floor(value + 0.5)


def _round_coordinate(path: Path, tag: str, text: str | None) -> int:
    try:
        value = float((text or "").strip())
    except ValueError:
        raise InputError(path, f"<{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise InputError(path, f"<{tag}> is not finite: {text!r}")
    return round_edge(value)


def _child_text(path: Path, element: etree._Element, tag: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise InputError(path, f"missing <{tag}> in <{element.tag}>")
    return child.text.strip()


def checked_box(path: Path, name: str, xmin: int, ymin: int, xmax: int, ymax: int, difficult: bool) -> Box:
    if xmin > xmax or ymin > ymax:
        raise InputError(path, f"inverted box for {name!r}: ({xmin}, {ymin}, {xmax}, {ymax})")
    if xmin == xmax or ymin == ymax:
        raise InputError(path, f"zero-area box for {name!r}: ({xmin}, {ymin}, {xmax}, {ymax})")
    return Box(name, xmin, ymin, xmax, ymax, difficult)


def parse_voc(path: Path) -> FrameAnnotation:
    """Parse one labelImg Pascal VOC XML file. Raises InputError naming the file on anything malformed."""
    path = Path(path)
    data = _check_size(path)
    try:
        root = etree.fromstring(data, _xml_parser())
    except etree.XMLSyntaxError as error:
        raise InputError(path, f"malformed XML ({' '.join(str(error).split())})") from None  # libxml2's run over lines
    if root.tag != "annotation":
        raise InputError(path, f"root element is <{root.tag}>, expected <annotation>")
    filename = _child_text(path, root, "filename")
    size = root.find("size")
    if size is None:
        raise InputError(path, "missing <size>")
    width = _round_coordinate(path, "width", _child_text(path, size, "width"))
    height = _round_coordinate(path, "height", _child_text(path, size, "height"))
    if width <= 0 or height <= 0:
        raise InputError(path, f"image size {width}x{height} is not positive")
    boxes = []
    for obj in root.iter("object"):
        name = _child_text(path, obj, "name")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise InputError(path, f"missing <bndbox> for object {name!r}")
        xmin, ymin, xmax, ymax = (
            _round_coordinate(path, tag, _child_text(path, bndbox, tag)) for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
        boxes.append(checked_box(path, name, xmin, ymin, xmax, ymax, difficult))
    xml_path = root.findtext("path")
    return FrameAnnotation(path, filename, width, height, boxes, xml_path.strip() if xml_path else None)


def parse_yolo(path: Path, class_names: list[str], image_filename: str, width: int, height: int) -> FrameAnnotation:
    """Parse one labelImg YOLO txt file (`class cx cy w h` lines, normalised) for an image of width x height."""
    path = Path(path)
    text = _check_size(path).decode("utf-8", errors="replace")
    boxes = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {line_number}"
        if len(fields) != 5:
            raise InputError(path, f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}")
        try:
            class_index = int(fields[0])
            cx, cy, w, h = (float(value) for value in fields[1:])
        except ValueError:
            raise InputError(path, f"{where}: not numbers: {line.strip()!r}") from None
        if not 0 <= class_index < len(class_names):
            raise InputError(path, f"{where}: class index {class_index} outside classes.txt (0..{len(class_names) - 1})")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            raise InputError(path, f"{where}: values must lie in [0, 1]: {line.strip()!r}")
        xmin = math.floor((cx - w / 2) * width + 0.5)
        xmax = math.floor((cx + w / 2) * width + 0.5)
        ymin = math.floor((cy - h / 2) * height + 0.5)
        ymax = math.floor((cy + h / 2) * height + 0.5)
        boxes.append(checked_box(path, class_names[class_index], xmin, ymin, xmax, ymax, False))
    return FrameAnnotation(path, image_filename, None, None, boxes, None)


def read_classes_file(path: Path) -> list[str]:
    """Class names, one per line (labelImg's classes.txt); the line order is the label order."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read classes file ({error})") from None
    names = [name for name in names if name]
    if not names:
        raise InputError(path, "classes file is empty")
    if len(set(names)) != len(names):
        raise InputError(path, "classes file lists a class twice")
    return names


def clip_box(box: Box, width: int, height: int, source: Path) -> tuple[Box, bool]:
    """Clip a box to a width x height image. Returns the box and whether it was clipped; empty after clipping is bad input."""
    clipped = Box(box.name, max(box.xmin, 0), max(box.ymin, 0), min(box.xmax, width), min(box.ymax, height), box.difficult)
    if clipped.xmin >= clipped.xmax or clipped.ymin >= clipped.ymax:
        raise InputError(source, f"box for {box.name!r} ({box.xmin}, {box.ymin}, {box.xmax}, {box.ymax}) "
                                 f"lies outside the {width}x{height} image")
    return clipped, clipped != box


def find_annotation_files(root: Path, suffix: str) -> list[Path]:
    """All annotation files under root, recursively, sorted (so runs on different machines agree)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "annotation directory does not exist")
    found = []
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories.sort()
        found.extend(Path(directory, name) for name in sorted(filenames)
                     if name.endswith(suffix) and name != "classes.txt")
    return found
