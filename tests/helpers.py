"""Small real datasets written to disk for tests: PNG frames and masks (OpenCV), labelImg VOC XML, WAV (soundfile)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import soundfile

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"

VOC = """<annotation>
\t<folder>frames</folder>
\t<filename>{filename}</filename>
\t<path>/home/annotator/frames/{filename}</path>
\t<source>
\t\t<database>Unknown</database>
\t</source>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
{objects}</annotation>
"""
OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>0</difficult>
\t\t<bndbox>
\t\t\t<xmin>{xmin}</xmin>
\t\t\t<ymin>{ymin}</ymin>
\t\t\t<xmax>{xmax}</xmax>
\t\t\t<ymax>{ymax}</ymax>
\t\t</bndbox>
\t</object>
"""


def write_voc(path: Path, filename: str, width: int, height: int, boxes: list[tuple]) -> None:
    """boxes: (name, xmin, ymin, xmax, ymax)."""
    objects = "".join(OBJECT.format(name=n, xmin=a, ymin=b, xmax=c, ymax=d) for n, a, b, c, d in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(VOC.format(filename=filename, width=width, height=height, objects=objects), encoding="utf-8")


def tone(frequency: float, seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def make_dataset(root: Path, clips: int = 6, frames_per_clip: int = 3, width: int = 80, height: int = 60,
                 classes: tuple[str, ...] = ("cat", "dog"), seed: int = 0) -> dict[str, Path]:
    """A tiny labelImg-style dataset: frames/, labels/, masks/, audio/ and meta.csv. Returns the folders."""
    rng = np.random.default_rng(seed)
    dirs = {key: root / key for key in ("frames", "labels", "masks", "audio")}
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(clips):
        name = f"clip{i:03d}"
        category = classes[i % len(classes)]
        for k in range(1, frames_per_clip + 1):
            stem = f"{name}_{k}"
            frame = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
            mask = np.zeros((height, width), np.uint8)
            mask[y0:y1, x0:x1] = 255
            cv2.imwrite(str(dirs["frames"] / f"{stem}.png"), frame)
            cv2.imwrite(str(dirs["masks"] / f"{stem}.png"), mask)
            write_voc(dirs["labels"] / f"{stem}.xml", f"{stem}.png", width, height, [(category, x0, y0, x1, y1)])
        soundfile.write(dirs["audio"] / f"{name}.wav", tone(300 + 200 * (i % len(classes)), frames_per_clip + 0.1), 16000)
        rows.append({"name": name, "category": category, "split": ("train", "val", "test")[i % 3]})
    with (root / "meta.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "category", "split"])
        writer.writeheader()
        writer.writerows(rows)
    dirs["meta"] = root / "meta.csv"
    return dirs


def crops_args(dirs: dict[str, Path], out: Path, frames_per_clip: int = 3, size: int = 32) -> list[str]:
    return ["crops", "--voc", str(dirs["labels"]), "--images", str(dirs["frames"]), "--masks", str(dirs["masks"]),
            "--audio", str(dirs["audio"]), "--meta", str(dirs["meta"]), "--out", str(out),
            "--frames-per-clip", str(frames_per_clip), "--size", str(size), "--crop-size", "24", "--clips-per-shard", "2"]


def read_all(shards_dir):
    """Every dataset of every shard, concatenated in manifest order."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    arrays = {}
    for entry in manifest["shards"]:
        with h5py.File(shards_dir / entry["file"]) as handle:
            for key in handle:
                values = handle[key].asstr()[()] if key in ("name", "split", "subset") else handle[key][()]
                arrays.setdefault(key, []).append(values)
    return manifest, {key: np.concatenate(parts) for key, parts in arrays.items()}


def synth_shards(root: Path, frames_per_clip: int, clips: int, size: int = 64, num_classes: int = 3,
                 clips_per_shard: int = 4, other_masks: bool = True) -> Path:
    """`avsprep synth` into `root/raw` + `avsprep crops` into `root/shards` (returned): crops of 32 px, and with
    other-object masks (what the swap tests need) unless `other_masks=False`. The one synthetic-shards fixture."""
    from click.testing import CliRunner

    from avsprep.cli import main as avsprep_main

    raw, out = root / "raw", root / "shards"
    runner = CliRunner()
    result = runner.invoke(avsprep_main, ["synth", "--out", str(raw), "--clips", str(clips), "--num-classes",
                                          str(num_classes), "--size", str(size), "--frames-per-clip",
                                          str(frames_per_clip)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(avsprep_main, [
        "crops", "--voc", str(raw / "labels"), "--images", str(raw / "visual_frames"), "--masks", str(raw / "gt_masks"),
        *(["--other-masks", str(raw / "other_masks")] if other_masks else []), "--audio", str(raw / "audio_wav"),
        "--meta", str(raw / "meta.csv"), "--out", str(out), "--size", str(size), "--crop-size", "32",
        "--frames-per-clip", str(frames_per_clip), "--clips-per-shard", str(clips_per_shard)])
    assert result.exit_code == 0, result.output
    return out
