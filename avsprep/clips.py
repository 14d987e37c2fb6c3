"""Find the inputs of each clip: frames, annotations, masks and audio, grouped by file name, with a split.

A clip is T frames named `<clip>_<k>` (k = 1..T, the pattern is configurable), the clip's `<clip>.wav`, and per-frame
masks with the frame's stem. Everything is found by name under the roots the user gives, recursively; nothing
outside them is read unless `trust_xml_paths` lets labelImg's `<path>` point elsewhere.

Problems that belong to one clip (a missing frame, a malformed annotation) are collected per clip, so the caller can
either stop at the first one or skip those clips and count them.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avsprep.annotations import (
    IMAGE_SUFFIXES,
    FrameAnnotation,
    find_annotation_files,
    parse_voc,
    read_classes_file,
)
from avsprep.errors import InputError
from avsprep.formats import DEFAULT_MAX_JSON_MB, AnnotationSet, match_image_names, read_coco, read_createml

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


@dataclass
class SourceOptions:
    """Where the inputs are and how to group them (the input half of `avsprep crops`)."""

    voc: Path | None = None
    yolo: Path | None = None
    createml: Path | None = None  # labelImg CreateML JSON: a file, or a folder of them (one per image)
    coco: Path | None = None  # COCO JSON (Label Studio, CVAT exports)
    max_json_mb: float = DEFAULT_MAX_JSON_MB
    images: Path | None = None
    masks: Path | None = None
    other_masks: Path | None = None
    audio: Path | None = None
    meta: Path | None = None
    classes: Path | None = None
    trust_xml_paths: bool = False
    clip_pattern: str = "<clip>_<k>"
    frames_per_clip: int = 5
    pad_short_clips: bool = False
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0


@dataclass
class FrameSource:
    """One frame of a clip: the image and whatever belongs to it."""

    index: int  # k, 1-based
    image: Path
    annotation: FrameAnnotation | None = None  # VOC, parsed
    yolo_file: Path | None = None  # YOLO, parsed once the image size is known
    mask: Path | None = None
    other_mask: Path | None = None


@dataclass
class ClipSource:
    """Everything needed to build one clip record."""

    name: str
    frames: list[FrameSource]
    split: str
    audio: Path | None = None
    category: str | None = None  # metadata CSV's category, if any
    other_category: str | None = None
    sounding_categories: list[str] = field(default_factory=list)
    padded_frames: int = 0
    report: dict[str, int] = field(default_factory=dict)  # counts found while looking, summed into the manifest
    subset: str = ""  # AVSS: the version folder (v1s, v1m, v2) the clip was read from; "" elsewhere


@dataclass
class Discovery:
    """What a reader found (`discover`, `avsprep.avsbench.discover_avsbench`), all `run_crops` needs besides the
    shard settings: the clips sorted by name, the class map, the per-clip problems, and which inputs exist."""

    clips: list[ClipSource]
    classes: list[str]
    problems: dict[str, InputError]  # clip name -> first problem; such clips are not in `clips`
    frames_per_clip: int
    has_audio: bool
    has_other_masks: bool
    source: Path | None = None  # what was read, named when no clip is usable
    # 1: masks are 0/1 (any non-zero pixel); K > 1: colour masks of the AVSS palette, read as class indices, and
    # clips may have fewer frames than frames_per_clip (the rest are zero frames with zero audio, frame_valid false).
    mask_classes: int = 1


def clip_pattern_regex(pattern: str) -> re.Pattern:
    """`<clip>_<k>` -> a regex with groups `clip` and `k`."""
    if "<clip>" not in pattern or "<k>" not in pattern:
        raise InputError(None, f"--clip-pattern {pattern!r} must contain <clip> and <k>")
    parts = re.split(r"(<clip>|<k>)", pattern)
    regex = "".join({"<clip>": "(?P<clip>.+)", "<k>": r"(?P<k>\d+)"}.get(part, re.escape(part)) for part in parts)
    return re.compile(f"^{regex}$")


def index_files(root: Path, suffixes: tuple[str, ...], key: str) -> dict[str, Path]:
    """Map file name (key='name') or stem (key='stem') to path, recursively; two files under one key is bad input."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "directory does not exist")
    found: dict[str, Path] = {}
    # os.walk over strings: a dataset has tens of thousands of files, and Path.rglob + sort cost seconds there.
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories.sort()
        for filename in sorted(filenames):
            stem, suffix = os.path.splitext(filename)
            if suffix.lower() not in suffixes:
                continue
            name = filename if key == "name" else stem
            path = Path(directory, filename)
            if name in found:
                raise InputError(path, f"duplicate {key} {name!r}, also at {found[name]}")
            found[name] = path
    return found


def read_meta(path: Path) -> dict[str, dict[str, str]]:
    """AVSBench-style metadata CSV: one row per clip with at least `name`; `split`, `category`, `other_category` optional."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "name" not in reader.fieldnames:
                raise InputError(path, "metadata CSV has no 'name' column")
            rows = {}
            for row in reader:
                name = (row.get("name") or "").strip()
                if not name:
                    continue
                split = (row.get("split") or "").strip()
                if split and split not in SPLITS:
                    raise InputError(path, f"clip {name!r} has split {split!r}, expected one of {', '.join(SPLITS)}")
                rows[name] = {k: (v or "").strip() for k, v in row.items() if k}
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"cannot read metadata CSV ({error})") from None


def assign_splits(names: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded split of sorted clip names: the same names and seed give the same split on every machine."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise InputError(None, "--val-fraction and --test-fraction must be >= 0 and sum to less than 1")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val, n_test = round(val_fraction * len(names)), round(test_fraction * len(names))
    splits = {}
    for rank, position in enumerate(order):
        splits[names[position]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return splits


class ClipNaming:
    """How frame stems name their clip and frame number: `--clip-pattern` and `--frames-per-clip`."""

    def __init__(self, pattern: str, frames_per_clip: int):
        self.pattern = pattern
        self.frames_per_clip = frames_per_clip
        self.regex = clip_pattern_regex(pattern)

    def key(self, stem: str) -> tuple[str, int] | None:
        """(clip, k) of a frame stem; None when the stem does not match the pattern."""
        match = self.regex.match(stem)
        if self.frames_per_clip == 1:
            # Every image is a clip of its own: `<clip>_1` is clip <clip> (so its <clip>.wav and metadata row are
            # found), any other name is a clip named by its stem (a plain image set).
            return (match["clip"], 1) if match and int(match["k"]) == 1 else (stem, 1)
        return (match["clip"], int(match["k"])) if match else None

    def clip(self, stem: str) -> str:
        """The clip a frame stem belongs to; the stem itself when it names none (a problem still needs a name)."""
        key = self.key(stem)
        return key[0] if key else stem


def given_classes(classes_file: Path | None, yolo: Path | None) -> list[str] | None:
    """The class list the user fixed: `--classes FILE`, else a YOLO folder's classes.txt; None when neither."""
    if classes_file is not None:
        return read_classes_file(classes_file)
    if yolo is not None:
        yolo_classes = Path(yolo) / "classes.txt"
        if not yolo_classes.is_file():
            raise InputError(yolo_classes, "YOLO mode needs classes.txt (or --classes FILE)")
        return read_classes_file(yolo_classes)
    return None


def check_known_classes(clips: Iterable[ClipSource], classes: list[str], problems: dict[str, InputError]) -> None:
    """Record, per clip, the first annotated box whose class is not in `classes` (every reader's last check)."""
    known = set(classes)
    for clip in clips:
        for frame in clip.frames:
            boxes = frame.annotation.boxes if frame.annotation else []
            unknown = [box.name for box in boxes if box.name not in known]
            if unknown:
                problems.setdefault(clip.name, InputError(frame.annotation.source,
                                                          f"class {unknown[0]!r} is not in the class list"))
                break


def _parse_voc_or_error(path: Path) -> FrameAnnotation | InputError:
    try:
        return parse_voc(path)
    except InputError as error:
        return error


def read_voc_folder(root: Path) -> list[tuple[Path, FrameAnnotation | InputError]]:
    """Every VOC XML under `root` (sorted), parsed, or the InputError that parsing it raised."""
    # One thread: parsing a small XML file holds the GIL for most of its 0.1 ms, so threads only contend for it
    # (8 threads took 1.1 s for 5000 files, one 0.5 s; with the page cache dropped 1.4 s against 1.1 s on a local
    # disk). On a network file system, where each open waits a round trip, threads reading ahead may pay off again:
    # not measured.
    return [(path, _parse_voc_or_error(path)) for path in find_annotation_files(root, ".xml")]


# ----------------------------------------------------------------------------------------------------------------
# The phases of `discover`: index the roots, frames from VOC / YOLO, group into clips, build each clip, classes.


@dataclass
class Annotated:
    """What one annotation reader found: the "frames from X" phase of `discover`."""

    annotations: dict[str, FrameAnnotation] = field(default_factory=dict)  # frame file name -> its boxes
    yolo_files: dict[str, Path] = field(default_factory=dict)  # frame stem -> label file parsed with the image size
    beside: dict[str, Path] = field(default_factory=dict)  # frame file name -> image found next to its annotation
    problems: list[tuple[str, InputError]] = field(default_factory=list)  # (frame stem, problem), as found
    # JSON formats name images as the annotation tool saw them: `_frames` has them matched to the images found.
    match_names: Callable[[Collection[str]], None] | None = None
    without_prefix: set[str] | None = None  # then: the frames matched only with Label Studio's prefix stripped

    @property
    def class_names(self) -> set[str]:
        return {box.name for annotation in self.annotations.values() for box in annotation.boxes}


def frames_from_voc(options: SourceOptions) -> Annotated:
    """labelImg Pascal VOC XML under `options.voc`, keyed by the frame's `<filename>`."""
    found = Annotated()
    for xml_file, annotation in read_voc_folder(options.voc):
        if isinstance(annotation, InputError):
            found.problems.append((xml_file.stem, annotation))
        elif annotation.filename in found.annotations:
            other = found.annotations[annotation.filename].source
            found.problems.append((annotation.stem, InputError(
                xml_file, f"frame {annotation.filename!r} is also annotated by {other}")))
        else:
            found.annotations[annotation.filename] = annotation
            if options.images is None:
                image = xml_file.parent / annotation.filename
                if options.trust_xml_paths and annotation.xml_path and not image.is_file():
                    image = Path(annotation.xml_path)
                found.beside[annotation.filename] = image
    return found


def frames_from_yolo(options: SourceOptions) -> Annotated:
    """labelImg YOLO txt under `options.yolo`, keyed by the frame's stem (parsed later: boxes need the image size)."""
    found = Annotated()
    for txt in find_annotation_files(options.yolo, ".txt"):
        found.yolo_files[txt.stem] = txt
        if options.images is None:  # looking for the image costs a stat per suffix: only when it is needed
            image = next((txt.with_suffix(s) for s in IMAGE_SUFFIXES if txt.with_suffix(s).is_file()), None)
            if image is None:
                found.problems.append((txt.stem, InputError(txt, "no image with this stem beside it")))
            else:
                found.beside[image.name] = image
    return found


def _json_frames(read: AnnotationSet, options: SourceOptions, beside_root: Path) -> Annotated:
    """Annotated from a JSON reader: names matched to the `--images` index in `_frames`, or here to the images under
    the JSON's folder (where the tools export them) when there is no `--images`."""
    found = Annotated(without_prefix=set())

    def match(images: Collection[str]) -> None:
        matched = match_image_names(read, images)
        found.annotations = matched.frames
        found.without_prefix = matched.without_prefix
        found.problems += [(Path(name).stem, error) for name, error in matched.problems.items()]

    found.match_names = match
    if options.images is None:
        images = index_files(beside_root, IMAGE_SUFFIXES, "name")
        match(images)
        for filename, annotation in found.annotations.items():
            if filename in images:
                found.beside[filename] = images[filename]
            else:
                found.problems.append((annotation.stem, InputError(
                    annotation.source, f"frame {filename!r} not found under {beside_root}")))
    return found


def frames_from_createml(options: SourceOptions) -> Annotated:
    """labelImg CreateML JSON (`--createml`: a file, or every .json under a folder), keyed by image file name."""
    root = Path(options.createml)
    return _json_frames(read_createml(root, options.max_json_mb), options, root if root.is_dir() else root.parent)


def frames_from_coco(options: SourceOptions) -> Annotated:
    """A COCO JSON file (`--coco`), keyed by image file name; every listed image is a frame, boxes or none."""
    return _json_frames(read_coco(options.coco, options.max_json_mb), options, Path(options.coco).parent)


def frames_without_boxes(options: SourceOptions) -> Annotated:
    """No annotation option, only `--images` (e.g. what `avsprep frames` wrote): no frame has a box."""
    return Annotated()


# One reader per annotation format, under the name of its SourceOptions field (`--<name>` on the command line).
# A new format is one more function returning `Annotated` and one more SourceOptions field.
ANNOTATION_READERS: dict[str, Callable[[SourceOptions], Annotated]] = {
    "voc": frames_from_voc,
    "yolo": frames_from_yolo,
    "createml": frames_from_createml,
    "coco": frames_from_coco,
}


def _annotation_reader(options: SourceOptions) -> Callable[[SourceOptions], Annotated]:
    chosen = [name for name in ANNOTATION_READERS if getattr(options, name) is not None]
    if not chosen and options.images is not None:
        return frames_without_boxes
    if len(chosen) != 1:
        flags = [f"--{name.replace('_', '-')}" for name in ANNOTATION_READERS]
        raise InputError(None, f"give one of {', '.join(flags[:-1])} and {flags[-1]}, or only --images DIR "
                               "(frames without boxes)")
    return ANNOTATION_READERS[chosen[0]]


def _index_roots(options: SourceOptions) -> dict[str, dict[str, Path]]:
    """The frame, mask and audio roots the user named, listed: name -> {file name or stem: path}."""
    roots = (("images", options.images, IMAGE_SUFFIXES, "name"),
             ("masks", options.masks, IMAGE_SUFFIXES, "stem"),
             ("other_masks", options.other_masks, IMAGE_SUFFIXES, "stem"),
             ("audio", options.audio, AUDIO_SUFFIXES, "stem"))
    return {name: index_files(root, suffixes, key) for name, root, suffixes, key in roots if root}


def _frames(annotated: Annotated, images: dict[str, Path] | None, options: SourceOptions) -> dict[str, Path]:
    """Every frame by file name: the `--images` index, else the images found beside the annotations. Annotations
    that name no frame of `--images` become problems."""
    if images is None:
        return annotated.beside
    if annotated.match_names is not None:
        annotated.match_names(images)
    for filename, annotation in annotated.annotations.items():
        if filename not in images:
            annotated.problems.append((annotation.stem, InputError(
                annotation.source, f"frame {filename!r} not found under {options.images}")))
    stems = {Path(name).stem for name in images}
    for stem, label_file in annotated.yolo_files.items():
        if stem not in stems:
            annotated.problems.append((stem, InputError(label_file, f"no image named {stem}.* under {options.images}")))
    return dict(images)


def _group_frames(frames: dict[str, Path], naming: ClipNaming,
                  problems: dict[str, InputError]) -> dict[str, dict[int, Path]]:
    """clip -> {k: image}, by frame file name order."""
    grouped: dict[str, dict[int, Path]] = defaultdict(dict)
    for filename, image in sorted(frames.items()):
        stem = Path(filename).stem
        key = naming.key(stem)
        if key is None:
            problems.setdefault(stem, InputError(image, f"frame name does not match --clip-pattern {naming.pattern!r}"))
            continue
        clip, k = key
        if k in grouped[clip]:
            problems.setdefault(clip, InputError(image, f"clip {clip!r} has two frames number {k}: also {grouped[clip][k]}"))
        grouped[clip][k] = image
    return grouped


def _complete_frames(name: str, by_index: dict[int, Path], frames_per_clip: int, pad: bool) -> int:
    """Check that a clip has frames 1..T, padding a short clip with its last frame if `pad`; returns the frames
    padded. InputError for a frame number beyond T or a gap."""
    T = frames_per_clip
    beyond = sorted(k for k in by_index if not 1 <= k <= T)
    if beyond:
        raise InputError(by_index[beyond[0]], f"frame number {beyond[0]} outside 1..{T} (--frames-per-clip)")
    missing = [k for k in range(1, T + 1) if k not in by_index]
    if not missing:
        return 0
    present = sorted(by_index)
    if not pad or not present or missing[0] <= present[-1]:
        raise InputError(by_index[present[0]] if present else None,
                         f"clip {name!r} lacks frame(s) {missing} of 1..{T}"
                         + ("" if pad else " (--pad-short-clips repeats the last frame)"))
    for k in missing:
        by_index[k] = by_index[present[-1]]
    return len(missing)


@dataclass
class _Found:
    """What the phases before building clips found: annotations, the roots' indexes and the metadata rows."""

    annotated: Annotated
    indexes: dict[str, dict[str, Path]]
    meta: dict[str, dict[str, str]]


def _build_clip(name: str, by_index: dict[int, Path], found: _Found, options: SourceOptions) -> ClipSource:
    """One clip's sources: its T frames with their annotation and masks, its audio and metadata row."""
    padded = _complete_frames(name, by_index, options.frames_per_clip, options.pad_short_clips)
    masks, other_masks = found.indexes.get("masks", {}), found.indexes.get("other_masks", {})
    frames = []
    for k in range(1, options.frames_per_clip + 1):
        image = by_index[k]
        stem = image.stem  # a Path computes it anew each time it is asked
        frames.append(FrameSource(index=k, image=image, annotation=found.annotated.annotations.get(image.name),
                                  yolo_file=found.annotated.yolo_files.get(stem), mask=masks.get(stem),
                                  other_mask=other_masks.get(stem)))
    audio = None
    if options.audio is not None:
        audio = found.indexes["audio"].get(name)
        if audio is None:
            raise InputError(options.audio, f"no audio file {name}.wav for clip {name!r}")
    row = found.meta.get(name, {})
    if options.meta is not None and not row:
        raise InputError(options.meta, f"clip {name!r} is not listed")
    return ClipSource(name=name, frames=frames, split=row.get("split") or "", audio=audio,
                      category=row.get("category") or None, other_category=row.get("other_category") or None,
                      sounding_categories=[c for c in (row.get("sounding_categories") or "").split(";") if c],
                      padded_frames=padded)


def _count_name_matches(clips: list[ClipSource], annotated: Annotated) -> None:
    """Per clip (the manifest's report sums them): how the JSON formats' image names matched its frames."""
    if annotated.without_prefix is None:
        return
    for clip in clips:
        for image in {frame.image.name for frame in clip.frames if frame.annotation is not None}:
            key = "images_matched_without_prefix" if image in annotated.without_prefix else "images_matched_as_given"
            clip.report[key] = clip.report.get(key, 0) + 1


def _split_unsplit(clips: list[ClipSource], options: SourceOptions) -> None:
    """Give the clips the metadata did not split a seeded split by `--val-fraction`/`--test-fraction`."""
    unsplit = sorted(clip.name for clip in clips if not clip.split)
    if unsplit:
        splits = assign_splits(unsplit, options.val_fraction, options.test_fraction, options.seed)
        for clip in clips:
            clip.split = clip.split or splits[clip.name]


def _classes(given: list[str] | None, annotated: Annotated, clips: list[ClipSource]) -> list[str]:
    """The class list: as given, else the sorted names of the annotations and the clips' metadata categories."""
    if given is not None:
        return given
    names = annotated.class_names
    for clip in clips:
        names.update(c for c in (clip.category, clip.other_category, *clip.sounding_categories) if c)
    return sorted(names)


def discover(options: SourceOptions) -> Discovery:
    """Find and group every clip's inputs. Raises InputError for problems that are not one clip's (a missing root)."""
    read_annotations = _annotation_reader(options)
    if options.frames_per_clip < 1:
        raise InputError(None, "--frames-per-clip must be at least 1")
    naming = ClipNaming(options.clip_pattern, options.frames_per_clip)
    # In one thread: listing and parsing hold the GIL for most of their time. For 1000 clips, threads took 1.0-1.8 s
    # where one takes 0.77 s with the page cache warm; 2.2 s either way with it dropped.
    indexes = _index_roots(options)
    annotated = read_annotations(options)
    frames = _frames(annotated, indexes.get("images"), options)
    problems: dict[str, InputError] = {}
    for stem, error in annotated.problems:
        problems.setdefault(naming.clip(stem), error)
    given = given_classes(options.classes, options.yolo)
    found = _Found(annotated, indexes, read_meta(options.meta) if options.meta else {})

    clips = []
    for name, by_index in sorted(_group_frames(frames, naming, problems).items()):
        try:
            clips.append(_build_clip(name, by_index, found, options))
        except InputError as error:
            problems.setdefault(name, error)
    clips = [clip for clip in clips if clip.name not in problems]
    _count_name_matches(clips, annotated)
    _split_unsplit(clips, options)
    classes = _classes(given, annotated, clips)
    check_known_classes(clips, classes, problems)
    clips = [clip for clip in clips if clip.name not in problems]
    log.info("found %d clips (%d with problems), %d classes", len(clips), len(problems), len(classes))
    return Discovery(clips=clips, classes=classes, problems=dict(sorted(problems.items())),
                     frames_per_clip=options.frames_per_clip, has_audio=options.audio is not None,
                     has_other_masks=options.other_masks is not None,
                     source=options.voc or options.yolo or options.createml or options.coco or options.meta
                     or options.images)
