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
from concurrent.futures import ThreadPoolExecutor
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

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class SourceOptions:
    """Where the inputs are and how to group them (the input half of `avsprep crops`)."""

    voc: Path | None = None
    yolo: Path | None = None
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


@dataclass
class Discovery:
    """All clips, sorted by name, the class map, and the per-clip problems found while looking."""

    clips: list[ClipSource]
    classes: list[str]
    problems: dict[str, InputError]  # clip name -> first problem; such clips are not in `clips`


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


def _frame_key(stem: str, regex: re.Pattern, frames_per_clip: int) -> tuple[str, int] | None:
    match = regex.match(stem)
    if frames_per_clip == 1:
        # Every image is a clip of its own: `<clip>_1` is clip <clip> (so its <clip>.wav and metadata row are
        # found), any other name is a clip named by its stem (a plain image set).
        return (match["clip"], 1) if match and int(match["k"]) == 1 else (stem, 1)
    return (match["clip"], int(match["k"])) if match else None


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


def _parse_voc_or_error(path: Path) -> FrameAnnotation | InputError:
    try:
        return parse_voc(path)
    except InputError as error:
        return error


def discover(options: SourceOptions) -> Discovery:
    """Find and group every clip's inputs. Raises InputError for problems that are not one clip's (a missing root)."""
    if (options.voc is None) == (options.yolo is None):
        raise InputError(None, "give exactly one of --voc DIR and --yolo DIR")
    if options.frames_per_clip < 1:
        raise InputError(None, "--frames-per-clip must be at least 1")
    regex = clip_pattern_regex(options.clip_pattern)
    problems: dict[str, InputError] = {}

    def problem(clip: str, error: InputError) -> None:
        problems.setdefault(clip, error)

    def clip_of(stem: str) -> tuple[str, int] | None:
        return _frame_key(stem, regex, options.frames_per_clip)

    # Listing folders and reading many small annotation files waits on the file system far more than it computes
    # (both release the GIL): threads overlap that waiting. Results are used in a fixed order below, so the
    # outcome, including which error is reported first, does not depend on timing.
    with ThreadPoolExecutor(max_workers=8) as readers:
        pending_index = {
            name: readers.submit(index_files, root, suffixes, key)
            for name, root, suffixes, key in (
                ("images", options.images, IMAGE_SUFFIXES, "name"),
                ("masks", options.masks, IMAGE_SUFFIXES, "stem"),
                ("other_masks", options.other_masks, IMAGE_SUFFIXES, "stem"),
                ("audio", options.audio, (".wav", ".flac", ".ogg"), "stem"),
            ) if root
        }
        images = pending_index["images"].result() if options.images else None
        xml_files = find_annotation_files(options.voc, ".xml") if options.voc is not None else []
        parsed_voc = list(readers.map(_parse_voc_or_error, xml_files))
        masks = pending_index["masks"].result() if options.masks else {}
        other_masks = pending_index["other_masks"].result() if options.other_masks else {}
        audio = pending_index["audio"].result() if options.audio else {}

    # Annotations, keyed by the frame's file name.
    annotations: dict[str, FrameAnnotation] = {}
    yolo_files: dict[str, Path] = {}
    frames: dict[str, Path] = {}  # frame file name -> image path
    annotation_names: set[str] = set()
    if options.voc is not None:
        for xml_file, annotation in zip(xml_files, parsed_voc):
            if isinstance(annotation, InputError):
                key = clip_of(xml_file.stem)
                problem(key[0] if key else xml_file.stem, annotation)
                continue
            if annotation.filename in annotations:
                other = annotations[annotation.filename].source
                problem((clip_of(annotation.stem) or (annotation.stem,))[0],
                        InputError(xml_file, f"frame {annotation.filename!r} is also annotated by {other}"))
                continue
            annotations[annotation.filename] = annotation
            annotation_names.update(box.name for box in annotation.boxes)
            if images is None:
                image = xml_file.parent / annotation.filename
                if options.trust_xml_paths and annotation.xml_path and not image.is_file():
                    image = Path(annotation.xml_path)
                frames[annotation.filename] = image
    else:
        txt_files = find_annotation_files(options.yolo, ".txt")
        by_stem = {path.stem: path for path in txt_files}
        if images is None:
            for txt in txt_files:
                candidates = [txt.with_suffix(s) for s in IMAGE_SUFFIXES if txt.with_suffix(s).is_file()]
                if candidates:
                    frames[candidates[0].name] = candidates[0]
                else:
                    problem((clip_of(txt.stem) or (txt.stem,))[0], InputError(txt, "no image with this stem beside it"))
        else:
            frames_by_stem = {Path(name).stem: name for name in images}
            for stem, txt in by_stem.items():
                if stem not in frames_by_stem:
                    problem((clip_of(stem) or (stem,))[0], InputError(txt, f"no image named {stem}.* under {options.images}"))
        yolo_files = by_stem

    if images is not None:
        frames = dict(images)
        for filename, annotation in annotations.items():
            if filename not in images:
                problem((clip_of(annotation.stem) or (annotation.stem,))[0],
                        InputError(annotation.source, f"frame {filename!r} not found under {options.images}"))

    classes = given_classes(options.classes, options.yolo)  # None: sorted over annotations and metadata below

    meta = read_meta(options.meta) if options.meta else {}

    # Group frames into clips.
    grouped: dict[str, dict[int, Path]] = defaultdict(dict)
    for filename, image in sorted(frames.items()):
        stem = Path(filename).stem
        key = clip_of(stem)
        if key is None:
            problem(stem, InputError(image, f"frame name does not match --clip-pattern {options.clip_pattern!r}"))
            continue
        clip, k = key
        if k in grouped[clip]:
            problem(clip, InputError(image, f"clip {clip!r} has two frames number {k}: also {grouped[clip][k]}"))
        grouped[clip][k] = image

    T = options.frames_per_clip
    clips: list[ClipSource] = []
    for name in sorted(grouped):
        by_index = grouped[name]
        try:
            beyond = sorted(k for k in by_index if not 1 <= k <= T)
            if beyond:
                raise InputError(by_index[beyond[0]], f"frame number {beyond[0]} outside 1..{T} (--frames-per-clip)")
            missing = [k for k in range(1, T + 1) if k not in by_index]
            padded = 0
            if missing:
                present = sorted(by_index)
                if not options.pad_short_clips or not present or missing[0] <= present[-1]:
                    raise InputError(by_index[present[0]] if present else None,
                                     f"clip {name!r} lacks frame(s) {missing} of 1..{T}"
                                     + ("" if options.pad_short_clips else " (--pad-short-clips repeats the last frame)"))
                padded = len(missing)
                for k in missing:
                    by_index[k] = by_index[present[-1]]
            frame_sources = []
            for k in range(1, T + 1):
                image = by_index[k]
                stem = image.stem
                frame_sources.append(FrameSource(
                    index=k,
                    image=image,
                    annotation=annotations.get(image.name),
                    yolo_file=yolo_files.get(stem),
                    mask=masks.get(stem),
                    other_mask=other_masks.get(stem),
                ))
            audio_file = None
            if options.audio is not None:
                audio_file = audio.get(name)
                if audio_file is None:
                    raise InputError(options.audio, f"no audio file {name}.wav for clip {name!r}")
            row = meta.get(name, {})
            if options.meta is not None and not row:
                raise InputError(options.meta, f"clip {name!r} is not listed")
            sounding = [c for c in (row.get("sounding_categories") or "").split(";") if c]
            clips.append(ClipSource(
                name=name,
                frames=frame_sources,
                split=row.get("split") or "",
                audio=audio_file,
                category=row.get("category") or None,
                other_category=row.get("other_category") or None,
                sounding_categories=sounding,
                padded_frames=padded,
            ))
        except InputError as error:
            problem(name, error)

    clips = [clip for clip in clips if clip.name not in problems]
    if any(not clip.split for clip in clips):
        splits = assign_splits(sorted(c.name for c in clips if not c.split),
                               options.val_fraction, options.test_fraction, options.seed)
        for clip in clips:
            clip.split = clip.split or splits[clip.name]

    if classes is None:
        names = set(annotation_names)
        for clip in clips:
            names.update(c for c in (clip.category, clip.other_category, *clip.sounding_categories) if c)
        classes = sorted(names)
    known = set(classes)
    for clip in clips:
        for frame in clip.frames:
            if frame.annotation is None:
                continue
            unknown = [box.name for box in frame.annotation.boxes if box.name not in known]
            if unknown:
                problem(clip.name, InputError(frame.annotation.source, f"class {unknown[0]!r} is not in the class list"))
                break
    clips = [clip for clip in clips if clip.name not in problems]
    log.info("found %d clips (%d with problems), %d classes", len(clips), len(problems), len(classes))
    return Discovery(clips=clips, classes=classes, problems=dict(sorted(problems.items())))
