"""Read the AVSBench-semantic (AVSS) layout (docs/design.md §14) into clip records for the shard writer.

    AVSBench-semantic/
        metadata.csv                       columns used: uid, label (v1s | v1m | v2: subset and folder), split
        label2idx.json                     71 entries, background first; the key order names the classes
        <label>/<uid>/frames/<i>.jpg       i from 0; v1s and v1m clips have 5 frames, v2 clips 10
        <label>/<uid>/labels_rgb/<i>.png   colour masks in the PASCAL-VOC palette (`avsprep.palette`)
        <label>/<uid>/audio.wav

Every clip is padded to T = 10 with zero frames and zero audio (`frame_valid` false), as the reference pads. Masks
that train (`mask_valid`): v1s train frame 0 only, v1m frames 0-4, v2 all; val/test every real frame. A mask the
rule expects but the download lacks is counted (`masks_missing`), not an error. Class names come from
`label2idx.json` without background: mask index c is class c - 1 of the manifest.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from avsprep.clips import SPLITS, ClipSource, FrameSource
from avsprep.errors import InputError
from avsprep.palette import AVSS_CLASSES

log = logging.getLogger(__name__)

VERSIONS = ("v1s", "v1m", "v2")
FRAMES = {"v1s": 5, "v1m": 5, "v2": 10}
AVSS_FRAMES_PER_CLIP = 10


@dataclass
class AvssRow:
    uid: str
    version: str  # the metadata's `label`: v1s, v1m or v2
    split: str
    other: str | None = None  # `other_obj` (written by `avsprep synth --semantic`): the visible silent class


def locate_avss(root: Path) -> Path:
    """The folder holding `metadata.csv` and `label2idx.json`: `root` or `root/AVSBench-semantic`."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "directory does not exist")
    for home in (root, root / "AVSBench-semantic"):
        if (home / "metadata.csv").is_file():
            if not (home / "label2idx.json").is_file():
                raise InputError(home / "label2idx.json", "AVSS class map not found beside metadata.csv")
            return home
    raise InputError(root / "metadata.csv", "no AVSBench-semantic metadata.csv here (nor in AVSBench-semantic/)")


def read_avss_classes(path: Path) -> list[str]:
    """The 70 class names of `label2idx.json` in its key order, background (index 0) left out."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"cannot read the class map ({error})") from None
    if not isinstance(table, dict) or len(table) < 2:
        raise InputError(path, "expected a JSON object of class name -> index, background first")
    names = list(table)
    if list(table.values()) != list(range(len(names))):
        raise InputError(path, "class indices must run 0, 1, 2, ... in key order")
    if len(names) != AVSS_CLASSES:
        log.warning("%s has %d entries, not the %d of AVSS", path, len(names), AVSS_CLASSES)
    return names[1:]


def read_avss_rows(path: Path, versions: tuple[str, ...]) -> list[AvssRow]:
    """The metadata rows of the chosen versions, by header name (uid, label, split)."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"cannot read metadata CSV ({error})") from None
    if not rows or not {"uid", "label", "split"} <= set(rows[0]):
        raise InputError(path, "metadata CSV needs the columns uid, label and split")
    out, seen = [], set()
    for line, row in enumerate(rows, start=2):
        uid, version, split = (row[k].strip() for k in ("uid", "label", "split"))
        if version not in VERSIONS:
            raise InputError(path, f"line {line}: label {version!r}, expected one of {', '.join(VERSIONS)}")
        if split not in SPLITS:
            raise InputError(path, f"line {line}: split {split!r}, expected one of {', '.join(SPLITS)}")
        if uid in seen:
            raise InputError(path, f"line {line}: clip {uid!r} is listed twice")
        seen.add(uid)
        if version in versions:
            out.append(AvssRow(uid, version, split, (row.get("other_obj") or "").strip() or None))
    return out


def mask_trains(version: str, split: str, i: int) -> bool:
    """Whether frame i's mask is supervised (docs/design.md §14): v1s train frame 0 only; every real frame otherwise."""
    return not (split == "train" and version == "v1s" and i > 0)


def avss_clip(home: Path, row: AvssRow) -> ClipSource:
    """One metadata row's clip: its real frames (0..n-1), the masks that train, the WAV. InputError for a missing
    folder, frame or WAV, or more frames than the version has."""
    folder = home / row.version / row.uid
    if not (folder / "frames").is_dir():
        raise InputError(folder / "frames", f"folder of clip {row.uid!r} not found")
    count = len(list((folder / "frames").glob("*.jpg")))
    if count > FRAMES[row.version]:
        raise InputError(folder / "frames", f"clip {row.uid!r} has {count} frames, a {row.version} clip at most "
                                            f"{FRAMES[row.version]}")
    frames, missing = [], 0
    for i in range(count):
        image, mask = folder / "frames" / f"{i}.jpg", folder / "labels_rgb" / f"{i}.png"
        if not image.is_file():
            raise InputError(image, f"frame {i} of clip {row.uid!r} not found (frames are numbered from 0)")
        trains = mask_trains(row.version, row.split, i)
        missing += trains and not mask.is_file()
        other = folder / "other_labels_rgb" / f"{i}.png"  # written by `avsprep synth --semantic` (swap test)
        frames.append(FrameSource(index=i, image=image, mask=mask if trains and mask.is_file() else None,
                                  other_mask=other if other.is_file() else None))
    audio = folder / "audio.wav"
    if not audio.is_file():
        raise InputError(audio, f"audio of clip {row.uid!r} not found")
    return ClipSource(name=row.uid, frames=frames, split=row.split, audio=audio, category=None,
                      other_category=row.other,
                      report={"masks_missing": missing, f"clips_{row.version}": 1}, subset=row.version)
