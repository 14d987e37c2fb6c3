"""Read the AVSBench folder layout (S4 and MS3, docs/design.md §3; AVSS, docs/design.md §14, in `avsprep.avss`) into the clip
records that `avsprep crops` shards.

Both subsets as downloaded (`Single-source/`, `Multi-sources/`):

    S4   s4_meta_data.csv                 columns name, ..., category, split
         s4_data/visual_frames/<split>/<category>/<clip>/<clip>_<k>.png
         s4_data/gt_masks/<split>/<category>/<clip>/<clip>_<k>.png        train: k = 1 only; val/test: 1..5
         s4_data/audio_wav/<split>/<category>/<clip>.wav
    MS3  ms3_meta_data.csv                columns name (first column), split
         ms3_data/visual_frames/<clip>/<clip>.mp4_<k>.png                 no split, no category
         ms3_data/gt_masks/<split>/<clip>/<clip>_<k>.png                  palette PNGs, all five
         ms3_data/audio_wav/<split>/<clip>.wav

`--root` may be the subset's folder (holding the CSV and `<subset>_data/`), the `<subset>_data/` folder (with the CSV
beside it or inside), or the folder above `Single-source/` and `Multi-sources/`. Paths are built from the CSV rows,
as the reference's data loaders build them; nothing else is searched, so a frame or WAV in the wrong place is reported by
name. Frames without a mask file get `mask_valid = False`; a missing mask where the convention has one (S4 train
frame 1, every other frame of MS3 and S4 val/test) is counted as `masks_missing` in the report, not an error.

Boxes: labelImg VOC XML matched to frames by `<filename>`, labelImg YOLO txt matched by the frame's stem, or
(`boxes_from_masks`) the bounding box of each frame's mask, one box per frame (MS3 frames with several sounding
objects get one box around all of them: the crop, the union of a frame's boxes, is the same either way). Frames
without a box keep `crop_valid = False`.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from avsprep.annotations import find_annotation_files
from avsprep.clips import (
    SPLITS,
    ClipSource,
    Discovery,
    FrameSource,
    check_known_classes,
    given_classes,
    read_voc_folder,
)
from avsprep.crops import CropsConfig, CropsResult, run_crops
from avsprep.avss import AVSS_FRAMES_PER_CLIP, VERSIONS, avss_clip, locate_avss, read_avss_classes, read_avss_rows
from avsprep.errors import InputError

log = logging.getLogger(__name__)

SUBSETS = ("s4", "ms3", "avss")
SUBSET_FOLDERS = {"s4": "Single-source", "ms3": "Multi-sources"}


@dataclass
class AvsbenchOptions:
    """Where the AVSBench download is and where boxes come from (the input half of `avsprep avsbench`)."""

    root: Path
    subset: str  # "s4" or "ms3"
    voc: Path | None = None
    yolo: Path | None = None
    boxes_from_masks: bool = False
    classes: Path | None = None  # class list file; default: CSV categories (+ VOC names), YOLO: its classes.txt
    frames_per_clip: int = 5
    versions: str = "v1s,v1m,v2"  # AVSS only: the metadata `label`s to read


@dataclass
class AvsbenchLayout:
    """The files of one subset: the metadata CSV and the three data folders."""

    subset: str
    meta: Path
    frames: Path  # visual_frames
    masks: Path  # gt_masks
    audio: Path  # audio_wav


@dataclass
class MetaRow:
    name: str
    split: str
    category: str | None


@dataclass
class AvsbenchDiscovery(Discovery):
    """Discovery plus what only this reader knows."""

    layout: AvsbenchLayout | None = None
    unmatched_annotations: list[Path] = field(default_factory=list)  # label files that name no frame of the CSV


def locate(root: Path, subset: str) -> AvsbenchLayout:
    """Find the subset's CSV and data folders under `root` (see the module docstring). InputError if absent."""
    root = Path(root)
    if subset not in SUBSETS:
        raise InputError(None, f"--subset must be one of {', '.join(SUBSETS)}, not {subset!r}")
    if subset == "avss":
        home = locate_avss(root)
        return AvsbenchLayout(subset, home / "metadata.csv", home, home, home)
    if not root.is_dir():
        raise InputError(root, "directory does not exist")
    csv_name, data_name = f"{subset}_meta_data.csv", f"{subset}_data"
    # The download keeps the CSV beside `<subset>_data/`; some copies move it inside.
    homes = [root, root / SUBSET_FOLDERS[subset], root.parent, root / data_name,
             root / SUBSET_FOLDERS[subset] / data_name]
    meta = next((home / csv_name for home in homes if (home / csv_name).is_file()), None)
    if meta is None:
        raise InputError(root / csv_name, f"no AVSBench {subset.upper()} metadata CSV here (nor in "
                                          f"{SUBSET_FOLDERS[subset]}/, {data_name}/ or the parent folder)")
    candidates = [meta.parent / data_name, meta.parent, root / data_name, root]
    data = next((c for c in candidates if (c / "visual_frames").is_dir()), None)
    if data is None:
        raise InputError(meta.parent / data_name / "visual_frames", "directory does not exist")
    for folder in ("gt_masks", "audio_wav"):
        if not (data / folder).is_dir():
            raise InputError(data / folder, "directory does not exist")
    return AvsbenchLayout(subset, meta, data / "visual_frames", data / "gt_masks", data / "audio_wav")


def read_meta_rows(path: Path, subset: str) -> list[MetaRow]:
    """The CSV's clips. Columns by header name (`name`, `category`, `split`); where the header lacks them, the
    positions the reference's loaders read: the name is column 0, the S4 category column 2."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            table = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"cannot read metadata CSV ({error})") from None
    if not table:
        raise InputError(path, "metadata CSV is empty")
    header = [cell.strip().lower() for cell in table[0]]
    if "split" not in header:
        raise InputError(path, "metadata CSV has no 'split' column (expected the AVSBench metadata file)")
    split_column = header.index("split")
    name_column = header.index("name") if "name" in header else 0
    category_column = header.index("category") if "category" in header else None
    if category_column is None and subset == "s4":
        if len(header) < 3 or split_column == 2:
            raise InputError(path, "S4 metadata CSV has no 'category' column")
        category_column = 2
    rows, seen = [], set()
    for line, row in enumerate(table[1:], start=2):
        cells = [cell.strip() for cell in row]
        if len(cells) <= max(split_column, name_column, category_column or 0):
            raise InputError(path, f"line {line}: expected {len(header)} columns, got {len(cells)}")
        name, split = cells[name_column], cells[split_column]
        if not name:
            raise InputError(path, f"line {line}: empty clip name")
        if split not in SPLITS:
            raise InputError(path, f"line {line}: clip {name!r} has split {split!r}, "
                                   f"expected one of {', '.join(SPLITS)}")
        if name in seen:
            raise InputError(path, f"line {line}: clip {name!r} is listed twice")
        seen.add(name)
        category = cells[category_column] if category_column is not None else None
        if subset == "s4" and not category:
            raise InputError(path, f"line {line}: clip {name!r} has no category")
        rows.append(MetaRow(name, split, category or None))
    return rows


def _clip_paths(layout: AvsbenchLayout, row: MetaRow, k: int) -> tuple[Path, Path]:
    """(frame, mask) of frame k of a clip, as the reference's loaders name them."""
    if layout.subset == "s4":
        relative = Path(row.split, row.category, row.name)
        return layout.frames / relative / f"{row.name}_{k}.png", layout.masks / relative / f"{row.name}_{k}.png"
    return (layout.frames / row.name / f"{row.name}.mp4_{k}.png",
            layout.masks / row.split / row.name / f"{row.name}_{k}.png")


def _audio_path(layout: AvsbenchLayout, row: MetaRow) -> Path:
    if layout.subset == "s4":
        return layout.audio / row.split / row.category / f"{row.name}.wav"
    return layout.audio / row.split / f"{row.name}.wav"


def _mask_expected(layout: AvsbenchLayout, split: str, k: int) -> bool:
    return not (layout.subset == "s4" and split == "train" and k > 1)


def _clip_from_row(layout: AvsbenchLayout, row: MetaRow, frames_per_clip: int) -> ClipSource:
    """One CSV row's clip: frames 1..T, their masks where the download has them, the WAV. InputError for a
    missing frame or WAV."""
    frames, missing_masks = [], 0
    for k in range(1, frames_per_clip + 1):
        image, mask = _clip_paths(layout, row, k)
        if not image.is_file():
            raise InputError(image, f"frame {k} of clip {row.name!r} not found")
        has_mask = mask.is_file()
        missing_masks += not has_mask and _mask_expected(layout, row.split, k)
        frames.append(FrameSource(index=k, image=image, mask=mask if has_mask else None))
    audio = _audio_path(layout, row)
    if not audio.is_file():
        raise InputError(audio, f"audio of clip {row.name!r} not found")
    return ClipSource(name=row.name, frames=frames, split=row.split, audio=audio, category=row.category,
                      report={"masks_missing": missing_masks})


def _attach_voc(root: Path, frames: dict[str, tuple[str, FrameSource]],
                problems: dict[str, InputError]) -> list[Path]:
    """Give each frame its VOC annotation, matched by `<filename>`; returns the files that name no frame."""
    clip_of_stem = {Path(name).stem: clip for name, (clip, _) in frames.items()}
    unmatched = []
    for xml_file, annotation in read_voc_folder(root):
        if isinstance(annotation, InputError):
            problems.setdefault(clip_of_stem.get(xml_file.stem, xml_file.stem), annotation)
        elif annotation.filename not in frames:
            unmatched.append(xml_file)
        else:
            clip, frame = frames[annotation.filename]
            if frame.annotation is not None:
                problems.setdefault(clip, InputError(
                    xml_file, f"frame {annotation.filename!r} is also annotated by {frame.annotation.source}"))
            else:
                frame.annotation = annotation
    return unmatched


def _attach_yolo(root: Path, frames: dict[str, tuple[str, FrameSource]]) -> list[Path]:
    """Give each frame its YOLO label file, matched by stem; returns the files that name no frame."""
    by_stem = {Path(name).stem: frame for name, (_, frame) in frames.items()}
    unmatched = []
    for txt in find_annotation_files(root, ".txt"):
        if txt.stem in by_stem:
            by_stem[txt.stem].yolo_file = txt
        else:
            unmatched.append(txt)
    return unmatched


def discover_avss(options: AvsbenchOptions) -> AvsbenchDiscovery:
    """The AVSS clips of the chosen versions (`avsprep.avss`), T = 10, colour masks of 71 classes; boxes from the
    masks, one per class present. Per-clip problems are collected; a missing root, CSV or class map raises."""
    versions = tuple(v.strip() for v in options.versions.split(",") if v.strip())
    if not versions or set(versions) - set(VERSIONS):
        raise InputError(None, f"--versions takes a comma-separated subset of {','.join(VERSIONS)}, "
                               f"not {options.versions!r}")
    layout = locate(options.root, "avss")
    classes = read_avss_classes(layout.frames / "label2idx.json")
    rows = read_avss_rows(layout.meta, versions)
    problems: dict[str, InputError] = {}
    clips = []
    for row in rows:
        try:
            clips.append(avss_clip(layout.frames, row))
        except InputError as error:
            problems[row.uid] = error
    clips.sort(key=lambda clip: clip.name)
    log.info("AVSS %s: %d clips in %s, %d usable, %d classes", ",".join(versions), len(rows), layout.meta,
             len(clips), len(classes))
    has_other = any(frame.other_mask for clip in clips for frame in clip.frames)
    return AvsbenchDiscovery(clips=clips, classes=classes, problems=dict(sorted(problems.items())),
                             frames_per_clip=AVSS_FRAMES_PER_CLIP, has_audio=True, has_other_masks=has_other,
                             source=layout.meta, layout=layout, mask_classes=len(classes) + 1)


def discover_avsbench(options: AvsbenchOptions) -> AvsbenchDiscovery:
    """Every clip of the subset's CSV with its frames, masks, audio and boxes. Problems that belong to one clip (a
    missing frame or WAV, a malformed label file) are collected per clip; a missing root, CSV or folder raises."""
    if options.subset == "avss":
        return discover_avss(options)
    if sum((options.voc is not None, options.yolo is not None, options.boxes_from_masks)) > 1:
        raise InputError(None, "give at most one of --voc DIR, --yolo DIR and --boxes-from-masks")
    if options.frames_per_clip < 1:
        raise InputError(None, "--frames-per-clip must be at least 1")
    layout = locate(options.root, options.subset)
    rows = read_meta_rows(layout.meta, options.subset)
    problems: dict[str, InputError] = {}
    clips: dict[str, ClipSource] = {}
    for row in rows:
        try:
            clips[row.name] = _clip_from_row(layout, row, options.frames_per_clip)
        except InputError as error:
            problems[row.name] = error
    frames = {frame.image.name: (clip.name, frame) for clip in clips.values() for frame in clip.frames}
    unmatched = []
    if options.voc is not None:
        unmatched = _attach_voc(options.voc, frames, problems)
    elif options.yolo is not None:
        unmatched = _attach_yolo(options.yolo, frames)
    if unmatched:
        log.warning("%d label files name no frame of %s (first: %s)", len(unmatched), layout.meta, unmatched[0])

    classes = given_classes(options.classes, options.yolo)
    if classes is None:
        # Every category of the CSV, not only of the usable clips: the class map must not depend on which clips
        # had problems, so that runs over parts of the data agree on label numbers.
        annotated = {box.name for _, frame in frames.values() if frame.annotation for box in frame.annotation.boxes}
        classes = sorted({row.category for row in rows if row.category} | annotated)
    check_known_classes(clips.values(), classes, problems)
    usable = [clips[name] for name in sorted(clips) if name not in problems]
    log.info("AVSBench %s: %d clips in %s, %d usable, %d classes", options.subset, len(rows), layout.meta,
             len(usable), len(classes))
    return AvsbenchDiscovery(clips=usable, classes=classes, problems=dict(sorted(problems.items())),
                             frames_per_clip=options.frames_per_clip, has_audio=True, has_other_masks=False,
                             source=layout.meta, layout=layout, unmatched_annotations=unmatched)


@dataclass
class AvsbenchResult:
    crops: CropsResult
    unmatched_annotations: list[Path]
    layout: AvsbenchLayout


def run_avsbench(options: AvsbenchOptions, config: CropsConfig,
                 progress: Callable[[int, int], None] | None = None) -> AvsbenchResult:
    """Shard an AVSBench subset with the `avsprep crops` writer (same schema, resumption, parts and report).

    `config.boxes_from_masks` is taken from `options`. The manifest's report counts
    `masks_missing` (frames whose mask the convention has but the download lacks), `mask_boxes`, and
    `audio_padded_clips` / `audio_padded_seconds` (WAVs shorter than T seconds, padded by repeating their last
    0.96 s example as the reference does).
    """
    found = discover_avsbench(options)
    result = run_crops(found, dataclasses.replace(config, boxes_from_masks=options.boxes_from_masks), progress)
    return AvsbenchResult(crops=result, unmatched_annotations=found.unmatched_annotations, layout=found.layout)
