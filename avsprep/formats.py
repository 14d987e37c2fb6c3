"""Box annotations in JSON: labelImg's CreateML and COCO (as Label Studio and CVAT export it), as VOC-style records.

Both give the same `FrameAnnotation`/`Box` records as `avsprep.annotations.parse_voc`, under the one box
convention (pixel edges, floats rounded to the nearest integer by `round_edge`):

- CreateML (labelImg's third save format): a list of `{"image": file, "annotations": [{"label": name,
  "coordinates": {"x": cx, "y": cy, "width": w, "height": h}}]}`, centre-based, in pixels. labelImg writes one such
  file per image (`<image stem>.json`); CreateML itself takes one file for a whole set. Either is read.
  Edges: `x - width / 2` .. `x + width / 2`, as labelImg's own reader computes them.
- COCO: `images` (`id`, `file_name`, `width`, `height`), `annotations` (`image_id`, `category_id`, `bbox` =
  [x, y, w, h] in pixels from the top-left), `categories` (`id`, `name`). Edges: x .. x + w.

Frames are keyed by the image's file name without folders (as VOC's `<filename>`). Label Studio renames uploads
with a short hex prefix (`1a2b3c4d-frame_1.jpg`); `match_image_names` matches a name as given, else with such a
prefix stripped, and counts which.

Problems that belong to one image (a bad box, an image listed twice) are returned per image, so that `crops
--on-error skip` can skip that image's clip; problems of the whole file (malformed JSON, an unknown image or
category id, a file above the size cap) raise InputError naming the file and the entry.

Memory: a COCO export is one file, up to the size cap (200 MB by default). `json.load` holds the file's text once
while parsing; its object hook turns each annotation into a small tuple as soon as it is parsed, so the full list of
annotation dicts (and their segmentation polygons) never exists at once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from avsprep.annotations import Box, FrameAnnotation, checked_box, round_edge
from avsprep.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_JSON_MB = 200
LABEL_STUDIO_PREFIX = re.compile(r"^[0-9a-f]{8}-(?=.)")


@dataclass
class AnnotationSet:
    """The frames annotated in one or more JSON files, by image file name, and the per-image problems."""

    frames: dict[str, FrameAnnotation] = field(default_factory=dict)
    problems: dict[str, InputError] = field(default_factory=dict)  # image file name -> first problem
    report: Counter = field(default_factory=Counter)
    without_prefix: set[str] = field(default_factory=set)  # `match_image_names`: names matched only without prefix

    def add(self, annotation: FrameAnnotation) -> None:
        if annotation.filename in self.problems:
            return
        if annotation.filename in self.frames:
            other = self.frames.pop(annotation.filename).source
            self.problems[annotation.filename] = InputError(
                annotation.source, f"image {annotation.filename!r} is annotated twice (also in {other})")
            return
        self.frames[annotation.filename] = annotation

    def merge(self, other: AnnotationSet) -> None:
        for annotation in other.frames.values():
            self.add(annotation)
        for name, error in other.problems.items():
            self.frames.pop(name, None)
            self.problems.setdefault(name, error)
        self.report.update(other.report)


def base_name(file_name: str) -> str:
    """A file name without folders, whichever separator the exporting tool used."""
    return re.split(r"[\\/]", file_name)[-1]


def load_json(path: Path, max_mb: float = DEFAULT_MAX_JSON_MB, object_hook=None):
    """Parse a JSON file of at most `max_mb` MB (2^20 bytes) straight from the file: one copy of the text."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_mb * 2**20:
            raise InputError(path, f"JSON file is {size / 2**20:.1f} MB, above the {max_mb:g} MB cap (--max-json-mb)")
        # Text mode: the file's bytes are decoded as they are read and freed, so only the text is alive while it is
        # parsed (a binary handle keeps the bytes alive beside the decoded text: one copy more).
        with path.open(encoding="utf-8") as handle:
            return json.load(handle, object_hook=object_hook)
    except OSError as error:
        raise InputError(path, f"cannot read JSON file ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise InputError(path, f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise InputError(path, f"JSON file is not UTF-8 text ({error.reason})") from None


def _number(path: Path, where: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(path, f"{where}: {key} is not a finite number: {value!r}")
    return float(value)


def _box(path: Path, where: str, name: str, xmin: float, ymin: float, xmax: float, ymax: float) -> Box:
    try:
        return checked_box(path, name, *(round_edge(v) for v in (xmin, ymin, xmax, ymax)), False)
    except InputError as error:
        raise InputError(path, f"{where}: {error.problem}") from None


# ----------------------------------------------------------------------------------------------------------------
# CreateML


def _createml_entry(path: Path, index: int, entry) -> FrameAnnotation:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
        raise InputError(path, f"entry {index}: expected {{\"image\": file name, \"annotations\": [...]}}")
    image = base_name(entry["image"])
    objects = entry.get("annotations", [])
    if not isinstance(objects, list):
        raise InputError(path, f"entry {index} ({image!r}): 'annotations' is not a list")
    boxes = []
    for number, obj in enumerate(objects):
        where = f"entry {index} ({image!r}), annotation {number}"
        coordinates = obj.get("coordinates") if isinstance(obj, dict) else None
        if not isinstance(coordinates, dict) or not isinstance(obj.get("label"), str) or not obj["label"].strip():
            raise InputError(path, f"{where}: expected {{\"label\": name, \"coordinates\": {{x, y, width, height}}}}")
        x, y, w, h = (_number(path, where, key, coordinates.get(key)) for key in ("x", "y", "width", "height"))
        boxes.append(_box(path, where, obj["label"].strip(), x - w / 2, y - h / 2, x + w / 2, y + h / 2))
    return FrameAnnotation(path, image, None, None, boxes)


def parse_createml_file(path: Path, max_mb: float = DEFAULT_MAX_JSON_MB) -> AnnotationSet:
    """One CreateML JSON file (a list of image entries). Raises InputError if it is not one."""
    path = Path(path)
    data = load_json(path, max_mb)
    if not isinstance(data, list):
        raise InputError(path, f"CreateML JSON must be a list of image entries, not a {type(data).__name__}")
    found = AnnotationSet()
    for index, entry in enumerate(data):
        try:
            found.add(_createml_entry(path, index, entry))
        except InputError as error:
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise  # no image to blame: the file is malformed
            found.frames.pop(base_name(entry["image"]), None)
            found.problems.setdefault(base_name(entry["image"]), error)
    found.report["createml_frames"] += len(found.frames)
    return found


def read_createml(root: Path, max_mb: float = DEFAULT_MAX_JSON_MB) -> AnnotationSet:
    """A CreateML file, or every `*.json` under a folder (labelImg's one file per image), recursively."""
    root = Path(root)
    if root.is_file():
        return parse_createml_file(root, max_mb)
    if not root.is_dir():
        raise InputError(root, "CreateML file or directory does not exist")
    found = AnnotationSet()
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories.sort()
        for filename in sorted(filenames):
            if filename.lower().endswith(".json"):
                found.merge(parse_createml_file(Path(directory, filename), max_mb))
    if not found.frames and not found.problems:
        raise InputError(root, "no CreateML .json files found")
    return found


# ----------------------------------------------------------------------------------------------------------------
# COCO


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _compact_annotation(item: dict):
    """json object hook: an annotation (it has a bbox) becomes (id, image_id, category_id, bbox) at once."""
    if "bbox" in item and "image_id" in item:
        return item.get("id"), item["image_id"], item.get("category_id"), item["bbox"]
    return item


def _coco_tables(path: Path, data) -> tuple[dict, dict, list]:
    """Validated `images` (id -> (file name, width, height)), `categories` (id -> name) and the annotations."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise InputError(path, "COCO JSON must be an object with 'images', 'annotations' and 'categories' lists")
    categories = {}
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_id(category.get("id")) or not isinstance(category.get("name"), str):
            raise InputError(path, f"categories[{index}]: expected {{\"id\", \"name\"}}")
        if category["id"] in categories:
            raise InputError(path, f"categories[{index}]: category id {category['id']!r} listed twice")
        categories[category["id"]] = category["name"].strip()
    images = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_id(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise InputError(path, f"images[{index}]: expected {{\"id\", \"file_name\", \"width\", \"height\"}}")
        width, height = image.get("width"), image.get("height")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v) > 0 for v in (width, height)):
            raise InputError(path, f"images[{index}] ({image['file_name']!r}): width and height must be positive "
                                   f"integers, not {width!r} x {height!r}")
        if image["id"] in images:
            raise InputError(path, f"images[{index}]: image id {image['id']!r} listed twice")
        images[image["id"]] = (base_name(image["file_name"]), int(width), int(height))
    annotations = data["annotations"]
    for index, item in enumerate(annotations):
        if not isinstance(item, tuple):
            raise InputError(path, f"annotations[{index}]: expected {{\"image_id\", \"category_id\", \"bbox\"}}")
        if not _is_id(item[1]) or item[1] not in images:
            raise InputError(path, f"annotations[{index}] (id {item[0]!r}): unknown image id {item[1]!r}")
        if not _is_id(item[2]) or item[2] not in categories:
            raise InputError(path, f"annotations[{index}] (id {item[0]!r}): unknown category id {item[2]!r}")
    return images, categories, annotations


def _coco_box(path: Path, index: int, item: tuple, name: str, image: tuple[str, int, int]) -> Box:
    file_name, width, height = image
    where = f"annotations[{index}] (id {item[0]!r}, image {file_name!r})"
    bbox = item[3]
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise InputError(path, f"{where}: bbox must be [x, y, width, height], not {bbox!r}")
    x, y, w, h = (_number(path, where, "bbox", value) for value in bbox)
    box = _box(path, where, name, x, y, x + w, y + h)
    if box.xmax <= 0 or box.ymax <= 0 or box.xmin >= width or box.ymin >= height:
        raise InputError(path, f"{where}: box ({box.xmin}, {box.ymin}, {box.xmax}, {box.ymax}) lies outside the "
                               f"{width}x{height} image")
    return box  # partly outside: clipped and counted by crops, as for VOC


def read_coco(path: Path, max_mb: float = DEFAULT_MAX_JSON_MB) -> AnnotationSet:
    """A COCO JSON file: one FrameAnnotation per listed image (images without annotations have no boxes)."""
    path = Path(path)
    images, categories, annotations = _coco_tables(path, load_json(path, max_mb, _compact_annotation))
    boxes: dict[object, list[Box]] = {image_id: [] for image_id in images}
    failed: dict[object, InputError] = {}
    for index, item in enumerate(annotations):
        annotations[index] = None  # each parsed annotation is freed as its Box is made: one copy at a time
        image_id = item[1]
        if image_id in failed:
            continue
        try:
            boxes[image_id].append(_coco_box(path, index, item, categories[item[2]], images[image_id]))
        except InputError as error:
            failed[image_id] = error
    found = AnnotationSet()
    for image_id, (file_name, width, height) in images.items():
        if image_id in failed:
            found.problems.setdefault(file_name, failed[image_id])
        else:
            found.add(FrameAnnotation(path, file_name, width, height, boxes[image_id]))
    found.report["coco_frames"] += len(found.frames)
    return found


# ----------------------------------------------------------------------------------------------------------------


def _image_key(name: str, available: Collection[str]) -> tuple[str, str | None]:
    """The available image an annotated name means, and how it matched (None: it matched nothing)."""
    if name in available:
        return name, "images_matched_as_given"
    stripped = LABEL_STUDIO_PREFIX.sub("", name, count=1)
    if stripped != name and stripped in available:
        return stripped, "images_matched_without_prefix"
    return name, None


def match_image_names(found: AnnotationSet, available: Collection[str]) -> AnnotationSet:
    """Key each annotation by the image it belongs to among `available` file names: its name as given, else with
    Label Studio's upload prefix (`1a2b3c4d-`) stripped. Counted in the report as `images_matched_as_given` and
    `images_matched_without_prefix`; a name that matches neither is kept as given (a missing image)."""
    matched = AnnotationSet(report=Counter(found.report))
    for name, annotation in found.frames.items():
        key, how = _image_key(name, available)
        if how:
            matched.report[how] += 1
        if how == "images_matched_without_prefix":
            matched.without_prefix.add(key)
        matched.add(replace(annotation, filename=key))
    for name, error in found.problems.items():
        key = _image_key(name, available)[0]
        matched.frames.pop(key, None)
        matched.problems.setdefault(key, error)
    return matched
