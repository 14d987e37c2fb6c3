"""HDF5 shards and their manifest: planning, writing, resuming, reading back and verifying.

One HDF5 file per `clips_per_shard` clips, chunked per clip so that one read returns one clip. Clips are sorted by
name and shard j holds clips [j*N, (j+1)*N) of that order (DESIGN §10), which makes the split of the work across
processes or machines deterministic. Each shard is written under a temporary name and renamed when complete;
`manifest.json` is written last and lists only complete shards, with a sha256 per dataset over its raw bytes
(the HDF5 file's own metadata may differ between library versions; the arrays may not).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from avsprep.errors import InputError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TEMPORARY_SUFFIX = ".partial"
STRING_DATASETS = ("name", "split")


@dataclass(frozen=True)
class ShardSettings:
    """What every shard of a dataset shares; part of each shard's identity, so a changed setting rewrites shards."""

    frames_per_clip: int
    size: int
    crop_size: int
    max_boxes: int
    classes: list[str]
    embedder: str
    has_other_masks: bool
    has_audio: bool


@dataclass
class ShardPlan:
    """The clips that shard `index` is to hold."""

    index: int
    path: Path
    clips: list  # ClipSource, sorted by name
    settings: ShardSettings

    @property
    def clips_planned(self) -> int:
        return len(self.clips)

    @property
    def fingerprint(self) -> str:
        """Identifies the planned content: settings and clip names."""
        payload = json.dumps([asdict(self.settings), [clip.name for clip in self.clips]], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ShardInfo:
    """A complete shard, as the manifest lists it."""

    index: int
    file: str
    clips: int
    splits: dict[str, int]
    classes: dict[str, int]  # clips per primary class name ("none" for -1)
    checksums: dict[str, str]
    bytes: int
    skipped: list[dict] = field(default_factory=list)  # clips of this shard left out for bad input
    report: dict[str, int] = field(default_factory=dict)  # summed per-clip counts (boxes clipped, audio padded, ...)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def plan_shards(clips: list, out: Path, settings: ShardSettings, clips_per_shard: int,
                num_parts: int = 1, part_index: int = 0) -> list[ShardPlan]:
    """Shard j gets sorted clips [j*N, (j+1)*N); this part writes the shards with j % num_parts == part_index."""
    if clips_per_shard < 1:
        raise InputError(None, "--clips-per-shard must be at least 1")
    ordered = sorted(clips, key=lambda clip: clip.name)
    plans = []
    for index, start in enumerate(range(0, len(ordered), clips_per_shard)):
        if index % num_parts == part_index:
            plans.append(ShardPlan(index, Path(out) / shard_name(index), ordered[start:start + clips_per_shard], settings))
    return plans


def remove_stale_temporaries(out: Path) -> None:
    for stale in Path(out).glob(f"shard-*.h5{TEMPORARY_SUFFIX}*"):
        log.info("removing unfinished shard %s from an interrupted run", stale.name)
        stale.unlink()


def dataset_checksum(values: np.ndarray) -> str:
    """sha256 over a dataset's raw bytes; string datasets hash their UTF-8 values joined by NUL."""
    if values.dtype.kind in "OSU":
        data = "\0".join(v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()).encode()
    else:
        data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)  # the raw bytes, without a copy
    return hashlib.sha256(data).hexdigest()


def _info_from_file(path: Path, handle: h5py.File) -> ShardInfo:
    return ShardInfo(
        index=int(handle.attrs["index"]),
        file=path.name,
        clips=int(handle["name"].shape[0]),
        splits=json.loads(handle.attrs["splits"]),
        classes=json.loads(handle.attrs["classes"]),
        checksums=json.loads(handle.attrs["checksums"]),
        bytes=path.stat().st_size,
        skipped=json.loads(handle.attrs["skipped"]),
        report=json.loads(handle.attrs["report"]),
    )


def complete_shard(plan: ShardPlan) -> ShardInfo | None:
    """The info of the shard an earlier run completed for this plan, or None if it must be (re)written.

    A shard with skipped clips is rewritten too: the user may have fixed those inputs since.
    """
    if not plan.path.is_file():
        return None
    try:
        with h5py.File(plan.path, "r") as handle:
            if handle.attrs.get("fingerprint") != plan.fingerprint:
                log.info("%s was planned differently: rewriting it", plan.path.name)
                return None
            info = _info_from_file(plan.path, handle)
    except (OSError, KeyError, ValueError):
        log.warning("%s is unreadable: rewriting it", plan.path.name)
        return None
    return None if info.skipped else info


def write_shard(plan: ShardPlan, records: list, skipped: list[dict], compression: str | None = None) -> ShardInfo:
    """Write the clip records (ClipRecord) of one shard atomically and return its info."""
    settings = plan.settings
    T, S, c, K = settings.frames_per_clip, settings.size, settings.crop_size, settings.max_boxes
    n = len(records)

    def stack(attribute: str, shape: tuple, dtype) -> np.ndarray:
        if n == 0:
            return np.zeros((0, *shape), dtype)
        return np.stack([getattr(record, attribute) for record in records]).astype(dtype, copy=False)

    arrays = {
        "frames": stack("frames", (T, S, S, 3), np.uint8),
        "masks": stack("masks", (T, S, S), np.uint8),
        "mask_valid": stack("mask_valid", (T,), bool),
        "crops": stack("crops", (T, c, c, 3), np.uint8),
        "crop_valid": stack("crop_valid", (T,), bool),
        "boxes": stack("boxes", (T, K, 4), np.float32),
        "audio": stack("audio", (T, 128), np.float32),
        "label": np.array([record.label for record in records], np.int16),
        "sounding": stack("sounding", (len(settings.classes),), bool),
    }
    if settings.has_other_masks:
        arrays["other_masks"] = stack("other_masks", (T, S, S), np.uint8)
        arrays["other_label"] = np.array([record.other_label for record in records], np.int16)
    strings = {
        "name": np.array([record.name for record in records], dtype=object),
        "split": np.array([record.split for record in records], dtype=object),
    }
    report: Counter = Counter()
    for record in records:
        report.update(record.report)
    class_counts = Counter(settings.classes[r.label] if r.label >= 0 else "none" for r in records)
    checksums = {key: dataset_checksum(values) for key, values in {**arrays, **strings}.items()}

    temporary = plan.path.with_name(plan.path.name + f"{TEMPORARY_SUFFIX}-{os.getpid()}")
    with h5py.File(temporary, "w", track_order=False) as handle:
        for key, values in arrays.items():
            # One chunk per clip: a reader gets a whole clip in one read, and nothing more.
            chunks = (1, *values.shape[1:]) if n and values.ndim > 1 else None
            handle.create_dataset(key, data=values, chunks=chunks, track_times=False,
                                  compression=compression if chunks else None)
        for key, values in strings.items():
            handle.create_dataset(key, data=values, dtype=h5py.string_dtype(), track_times=False)
        handle.attrs["schema_version"] = SCHEMA_VERSION
        handle.attrs["index"] = plan.index
        handle.attrs["fingerprint"] = plan.fingerprint
        handle.attrs["splits"] = json.dumps(dict(sorted(Counter(strings["split"].tolist()).items())))
        handle.attrs["classes"] = json.dumps(dict(sorted(class_counts.items())))
        handle.attrs["checksums"] = json.dumps(checksums, sort_keys=True)
        handle.attrs["skipped"] = json.dumps(skipped)
        handle.attrs["report"] = json.dumps(dict(sorted(report.items())))
    os.replace(temporary, plan.path)
    with h5py.File(plan.path, "r") as handle:
        return _info_from_file(plan.path, handle)


NEGATIVES = "negatives.h5"


def write_negatives(out: Path, embeddings: dict[str, np.ndarray]) -> dict:
    """Write the negative-audio embeddings (silence, noise) beside the shards; returns their manifest entry."""
    path = Path(out) / NEGATIVES
    embeddings = {key: values.astype(np.float32) for key, values in embeddings.items()}
    temporary = path.with_name(path.name + f"{TEMPORARY_SUFFIX}-{os.getpid()}")
    with h5py.File(temporary, "w", track_order=False) as handle:
        for key, values in embeddings.items():
            handle.create_dataset(key, data=values, track_times=False)
    os.replace(temporary, path)
    return {"file": NEGATIVES, "checksums": {key: dataset_checksum(v) for key, v in embeddings.items()},
            "shapes": {key: list(v.shape) for key, v in embeddings.items()}}


def read_negatives(shards_dir: Path) -> dict[str, np.ndarray]:
    """{"silence": [1,T,128], "noise": [M,T,128]} float32 written by `avsprep crops` (InputError if absent)."""
    path = Path(shards_dir) / NEGATIVES
    try:
        with h5py.File(path, "r") as handle:
            return {key: handle[key][()] for key in handle}
    except (OSError, KeyError) as error:
        raise InputError(path, f"cannot read negative-audio embeddings ({error}); re-run avsprep crops") from None


def manifest_name(num_parts: int, part_index: int) -> str:
    return MANIFEST if num_parts == 1 else f"manifest.part-{part_index:03d}-of-{num_parts:03d}.json"


def write_manifest(out: Path, settings: ShardSettings, infos: list[ShardInfo], clips_per_shard: int,
                   num_parts: int, part_index: int, discovery_skips: list[dict], negatives: dict | None = None) -> dict:
    """Write the manifest (atomically) listing the complete shards of this part; returns it."""
    splits: Counter = Counter()
    classes: Counter = Counter()
    report: Counter = Counter()
    for info in infos:
        splits.update(info.splits)
        classes.update(info.classes)
        report.update(info.report)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "frames_per_clip": settings.frames_per_clip,
        "image_size": settings.size,
        "crop_size": settings.crop_size,
        "max_boxes": settings.max_boxes,
        "classes": settings.classes,
        "embedder": settings.embedder,
        "audio_dim": 128,
        "has_audio": settings.has_audio,
        "has_other_masks": settings.has_other_masks,
        "clips_per_shard": clips_per_shard,
        "num_parts": num_parts,
        "part_index": part_index,
        "clips": sum(info.clips for info in infos),
        "splits": dict(sorted(splits.items())),
        "class_counts": dict(sorted(classes.items())),
        "report": dict(sorted(report.items())),
        "skipped": discovery_skips + [s for info in infos for s in info.skipped],
        "negatives": negatives,
        "shards": [{"file": i.file, "index": i.index, "clips": i.clips, "splits": i.splits,
                    "checksums": i.checksums, "bytes": i.bytes} for i in sorted(infos, key=lambda i: i.index)],
    }
    path = Path(out) / manifest_name(num_parts, part_index)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    temporary.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return manifest


def _settings_from_manifest(manifest: dict) -> ShardSettings:
    return ShardSettings(
        frames_per_clip=manifest["frames_per_clip"], size=manifest["image_size"], crop_size=manifest["crop_size"],
        max_boxes=manifest["max_boxes"], classes=manifest["classes"], embedder=manifest["embedder"],
        has_other_masks=manifest["has_other_masks"], has_audio=manifest["has_audio"],
    )


def merge_parts(part_dirs: list[Path], out: Path) -> dict:
    """Join the parts written by `--num-parts K --part-index i` runs into one shard folder whose manifest is the one
    a single run would have written (DESIGN §10). Shards are copied into `out` unless they are already there."""
    import shutil

    parts: dict[int, tuple[Path, dict]] = {}
    for directory in map(Path, part_dirs):
        found = sorted(directory.glob("manifest.part-*-of-*.json")) or sorted(directory.glob(MANIFEST))
        if not found:
            raise InputError(directory, "no manifest.part-*.json: not the output of `avsprep crops --num-parts`")
        for path in found:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest["part_index"] in parts:
                raise InputError(path, f"part {manifest['part_index']} is given twice")
            parts[manifest["part_index"]] = (directory, manifest)
    first = next(iter(parts.values()))[1]
    settings, num_parts = _settings_from_manifest(first), first["num_parts"]
    missing = sorted(set(range(num_parts)) - set(parts))
    if missing:
        raise InputError(None, f"parts {missing} of {num_parts} are missing")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos, shard_skips = [], set()
    for index, (directory, manifest) in sorted(parts.items()):
        if _settings_from_manifest(manifest) != settings or manifest["num_parts"] != num_parts \
                or manifest["clips_per_shard"] != first["clips_per_shard"]:
            raise InputError(directory, "this part was written with other settings than part 0")
        for entry in manifest["shards"]:
            target = out / entry["file"]
            if (directory / entry["file"]).resolve() != target.resolve():
                shutil.copyfile(directory / entry["file"], target.with_name(target.name + TEMPORARY_SUFFIX))
                os.replace(target.with_name(target.name + TEMPORARY_SUFFIX), target)
            with h5py.File(target, "r") as handle:
                info = _info_from_file(target, handle)
            if info.checksums != entry["checksums"]:
                raise InputError(target, "shard does not match its part's manifest")
            infos.append(info)
            shard_skips.update(json.dumps(s, sort_keys=True) for s in info.skipped)
    # Every part lists the clips that failed before sharding; they are the same in each part: keep them once.
    discovery_skips = [s for s in first["skipped"] if json.dumps(s, sort_keys=True) not in shard_skips]
    negatives = None
    if first.get("negatives"):
        source = next(iter(parts.values()))[0] / NEGATIVES
        if source.resolve() != (out / NEGATIVES).resolve():
            shutil.copyfile(source, out / NEGATIVES)
        negatives = first["negatives"]
    return write_manifest(out, settings, infos, first["clips_per_shard"], 1, 0, discovery_skips, negatives)


def read_manifest(shards_dir: Path) -> dict:
    """The manifest of a shard folder. InputError if it is missing, unreadable or of another schema."""
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no manifest: not a shard folder, or `avsprep crops` has not finished") from None
    except (OSError, ValueError) as error:
        raise InputError(path, f"unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise InputError(path, f"schema version {manifest.get('schema_version') if isinstance(manifest, dict) else '?'}"
                               f" is not {SCHEMA_VERSION}")
    return manifest


def expected_shapes(manifest: dict, clips: int) -> dict[str, tuple[tuple, str]]:
    """Dataset name -> (shape, dtype) that a shard of `clips` clips must have."""
    T, S, c, K = manifest["frames_per_clip"], manifest["image_size"], manifest["crop_size"], manifest["max_boxes"]
    shapes = {
        "frames": ((clips, T, S, S, 3), "uint8"), "masks": ((clips, T, S, S), "uint8"),
        "mask_valid": ((clips, T), "bool"), "crops": ((clips, T, c, c, 3), "uint8"),
        "crop_valid": ((clips, T), "bool"), "boxes": ((clips, T, K, 4), "float32"),
        "audio": ((clips, T, manifest["audio_dim"]), "float32"), "label": ((clips,), "int16"),
        "sounding": ((clips, len(manifest["classes"])), "bool"),
        "name": ((clips,), "object"), "split": ((clips,), "object"),
    }
    if manifest["has_other_masks"]:
        shapes["other_masks"] = ((clips, T, S, S), "uint8")
        shapes["other_label"] = ((clips,), "int16")
    return shapes


def verify(shards_dir: Path, progress=None) -> list[str]:
    """Recheck every listed shard's datasets: presence, shape, dtype and checksum. Returns the problems found."""
    manifest = read_manifest(shards_dir)
    problems = []
    for entry in manifest["shards"]:
        path = Path(shards_dir) / entry["file"]
        try:
            with h5py.File(path, "r") as handle:
                for key, (shape, dtype) in expected_shapes(manifest, entry["clips"]).items():
                    if key not in handle:
                        problems.append(f"{path}: dataset {key!r} is missing")
                        continue
                    dataset = handle[key]
                    values = dataset.asstr()[()] if key in STRING_DATASETS else dataset[()]
                    actual_dtype = "object" if key in STRING_DATASETS else str(dataset.dtype)
                    if tuple(dataset.shape) != shape or actual_dtype != dtype:
                        problems.append(f"{path}: {key} is {tuple(dataset.shape)} {actual_dtype}, expected {shape} {dtype}")
                    elif dataset_checksum(np.asarray(values)) != entry["checksums"].get(key):
                        problems.append(f"{path}: checksum of {key} does not match the manifest")
        except OSError as error:
            problems.append(f"{path}: cannot read shard ({error})")
        if progress:
            progress(1)
    if manifest.get("negatives"):
        try:
            negatives = read_negatives(shards_dir)
            for key, checksum in manifest["negatives"]["checksums"].items():
                if key not in negatives or dataset_checksum(negatives[key]) != checksum:
                    problems.append(f"{Path(shards_dir) / NEGATIVES}: checksum of {key} does not match the manifest")
        except InputError as error:
            problems.append(str(error))
    return problems


def summarize(shards_dir: Path) -> dict:
    """What `avsprep inspect` shows: clips per split and class, shapes and dtypes, embedder, sizes on disk."""
    manifest = read_manifest(shards_dir)
    per_split_class: dict[str, Counter] = {}
    for entry in manifest["shards"]:
        with h5py.File(Path(shards_dir) / entry["file"], "r") as handle:
            for split, label in zip(handle["split"].asstr()[()], handle["label"][()]):
                name = manifest["classes"][label] if label >= 0 else "none"
                per_split_class.setdefault(split, Counter())[name] += 1
    return {
        "shards_dir": str(shards_dir),
        "clips": manifest["clips"],
        "splits": manifest["splits"],
        "clips_per_split_and_class": {s: dict(sorted(c.items())) for s, c in sorted(per_split_class.items())},
        "classes": manifest["classes"],
        "embedder": manifest["embedder"],
        "frames_per_clip": manifest["frames_per_clip"],
        "shapes": {key: {"shape": ["N", *shape[1:]], "dtype": dtype}
                   for key, (shape, dtype) in expected_shapes(manifest, 0).items()},
        "shards": len(manifest["shards"]),
        "bytes_on_disk": sum(entry["bytes"] for entry in manifest["shards"]),
        "skipped": len(manifest["skipped"]),
        "report": manifest["report"],
    }
