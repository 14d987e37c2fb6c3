"""HDF5 shards and their manifest: planning, writing, resuming, reading back and verifying.

One HDF5 file per `clips_per_shard` clips, chunked per clip so that one read returns one clip. Clips are sorted by
name and shard j holds clips [j*N, (j+1)*N) of that order (docs/design.md §10), which makes the split of the work across
processes or machines deterministic. Each shard is written under a temporary name and renamed when complete;
`manifest.json` is written last and lists only complete shards, with a sha256 per dataset over its raw bytes
(the HDF5 file's own metadata may differ between library versions; the arrays may not).

Schema v2 (docs/design.md §16) keeps nothing in the HDF5 global heap, where two or three flipped bytes can send libhdf5 into
an endless loop: strings are fixed-length UTF-8, the attributes fixed-length byte strings of JSON. Every dataset
carries a fletcher32 checksum per chunk, so a damaged chunk fails when it is read; fletcher32 does not cover the
attributes, so `open_shard` holds them against the manifest. v1 shards (variable-length strings, no fletcher32)
still read.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np

from avsprep.embedding import EMBEDDING_DIM
from avsprep.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TEMPORARY_SUFFIX = ".partial"


# ----------------------------------------------------------------------------------------------------------------
# The shard schema: the one place that says what a shard holds. Writing (`write_shard`), checking (`expected_shapes`,
# `schema_problems`, `verify`), `avsprep inspect` and avstrain's dataset all derive from it; a test holds the README's
# table against it. A new dataset is one row here (and the ClipRecord attribute of the same name that holds it).


@dataclass(frozen=True)
class ShardField:
    """One dataset of a shard. Its first dimension is the clips, N."""

    name: str  # the dataset, and the ClipRecord attribute that holds one clip's value
    shape: tuple[str | int, ...]  # template over the dims of `shard_dims`, e.g. ("N", "T", "S", "S", 3)
    dtype: str  # numpy dtype name, or "str": UTF-8 strings, fixed-length in v2 (`asstr()` reads them as object)
    meaning: str
    only_if: str | None = None  # the ShardSettings / manifest flag without which a shard lacks this dataset

    @property
    def is_string(self) -> bool:
        return self.dtype == "str"

    @property
    def stored_dtype(self) -> str:
        """The dtype name a reader sees (`_dtype_name`)."""
        return "object" if self.is_string else self.dtype


SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: variable-length strings and attributes, no fletcher32
# The file format of HDF5 1.10: superblock and object headers carry checksums (so more metadata damage is found on
# opening) and store an attribute over 64 KiB (a long `skipped` list) densely, in a fractal heap, still not the
# global heap; and each chunk index is a fixed array with checksums, where 1.8's version-1 B-tree has none (a flipped
# byte of a chunk address there read another place of the file as the chunk: zeros, whose fletcher32 is zero too).
LIBVER = ("v110", "latest")
SHARD_SCHEMA: tuple[ShardField, ...] = (
    ShardField("frames", ("N", "T", "S", "S", 3), "uint8", "RGB frames resized to S×S (area interpolation)"),
    ShardField("masks", ("N", "T", "S", "S"), "uint8",
               "sounding-object masks, 0/1; class indices where mask_classes > 1 (nearest-neighbour resize)"),
    ShardField("mask_valid", ("N", "T"), "bool", "frames with a mask file"),
    ShardField("frame_valid", ("N", "T"), "bool", "real frames; false: padding, zero frame and zero audio (AVSS)",
               only_if="has_frame_valid"),
    ShardField("crops", ("N", "T", "c", "c", 3), "uint8", "crop of the union of the frame's sounding boxes"),
    ShardField("crop_valid", ("N", "T"), "bool", "frames with a box (and so a crop)"),
    ShardField("boxes", ("N", "T", "K", 4), "float32", "normalised xyxy of the clipped boxes, NaN padding"),
    ShardField("audio", ("N", "T", "E"), "float32", "one audio embedding per second"),
    ShardField("label", ("N",), "int16", "primary class: the CSV category, else the most frequent box class; -1: none"),
    ShardField("sounding", ("N", "C"), "bool", "every sounding class (boxes, CSV category, CSV sounding_categories)"),
    ShardField("other_masks", ("N", "T", "S", "S"), "uint8", "masks of the visible non-sounding object, 0/1",
               only_if="has_other_masks"),
    ShardField("other_label", ("N",), "int16", "class of the visible non-sounding object; -1: none",
               only_if="has_other_masks"),
    ShardField("name", ("N",), "str", "clip name"),
    ShardField("split", ("N",), "str", "train, val or test"),
    ShardField("subset", ("N",), "str", "AVSBench-semantic version folder of the clip: v1s, v1m or v2",
               only_if="has_subset"),
)
STRING_DATASETS = tuple(field.name for field in SHARD_SCHEMA if field.is_string)


def shard_dims(frames_per_clip: int, size: int, crop_size: int, max_boxes: int, num_classes: int,
               audio_dim: int = EMBEDDING_DIM) -> dict[str, int]:
    """The sizes the shape templates name: T frames per clip, S image side, c crop side, K boxes per frame,
    C classes, E audio embedding size."""
    return {"T": frames_per_clip, "S": size, "c": crop_size, "K": max_boxes, "C": num_classes, "E": audio_dim}


def schema_fields(flags: dict[str, bool]) -> list[ShardField]:
    """The datasets of a shard written with these flags (`has_other_masks`, ...), in the order they are written."""
    return [field for field in SHARD_SCHEMA if field.only_if is None or flags.get(field.only_if)]


def field_shape(field: ShardField, dims: dict[str, int], clips: int) -> tuple[int, ...]:
    """A field's shape for a shard of `clips` clips."""
    return tuple(clips if dim == "N" else dims[dim] if isinstance(dim, str) else dim for dim in field.shape)


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
    box_source: str = "annotations"  # or "masks" (`avsprep avsbench --boxes-from-masks`)
    # 1: masks are 0/1; K > 1: class indices 0..K-1, 0 background, c the class list's c - 1 (AVSS, docs/design.md §14).
    mask_classes: int = 1
    has_frame_valid: bool = True  # shards written before issue 15 lack `frame_valid` (every frame real)
    # AVSS: each clip's version folder (`subset`), so that predictions can go back into the download's layout.
    has_subset: bool = False


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
        settings = asdict(self.settings)
        if not settings["has_subset"]:  # added later: off, it leaves the identity of shards written before unchanged
            del settings["has_subset"]
        payload = json.dumps([settings, [clip.name for clip in self.clips]], sort_keys=True)
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


@contextmanager
def _writing(temporary: Path, final: Path, reserve: int = 0):
    """A failed write (disk full, file size limit, quota, permissions) becomes one InputError naming the file. The
    temporary is removed so that it holds no space; shards completed before stay, and a re-run resumes.

    `reserve`: bytes to allocate for the temporary before HDF5 writes it (HDF5 then truncates it and writes).
    HDF5 does not recover from a failed write: h5py reports it, but the process then crashes at exit
    (segfault, h5py 3.16). So a full disk must be found before HDF5 starts, by allocating the space."""
    try:
        if reserve:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.posix_fallocate(descriptor, 0, reserve)
            finally:
                os.close(descriptor)
        yield
    except OSError as error:
        temporary.unlink(missing_ok=True)
        # h5py's messages run over several lines; the errno says it in a few words
        reason = os.strerror(error.errno) if error.errno else (str(error).splitlines() or [type(error).__name__])[0]
        raise InputError(final, f"cannot write ({reason}); files completed before are intact: "
                                f"free space and re-run the same command to resume") from None


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


def fixed_length_strings(values: list[str]) -> np.ndarray:
    """[N] fixed-length UTF-8 (as long as the longest encoded value), which h5py stores outside the global heap."""
    encoded = [value.encode() for value in values]
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", max([len(v) for v in encoded], default=0) or 1))


def json_attribute(value) -> np.bytes_:
    """A JSON attribute as a fixed-length byte string (a Python str would be variable-length, in the global heap)."""
    return np.bytes_(json.dumps(value, sort_keys=True).encode())


def attribute_text(handle: h5py.File, key: str) -> str:
    """An attribute written as text: bytes in v2, str in v1. KeyError if absent."""
    value = handle.attrs[key]
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


def _info_from_file(path: Path, handle: h5py.File) -> ShardInfo:
    attribute = {key: json.loads(attribute_text(handle, key)) for key in ("splits", "classes", "checksums",
                                                                          "skipped", "report")}
    return ShardInfo(index=int(handle.attrs["index"]), file=path.name, clips=int(handle["name"].shape[0]),
                     bytes=path.stat().st_size, **attribute)


def complete_shard(plan: ShardPlan) -> ShardInfo | None:
    """The info of the shard an earlier run completed for this plan, or None if it must be (re)written.

    A shard with skipped clips is rewritten too: the user may have fixed those inputs since.
    """
    if not plan.path.is_file():
        return None
    try:
        with h5py.File(plan.path, "r") as handle:
            if "fingerprint" not in handle.attrs or attribute_text(handle, "fingerprint") != plan.fingerprint:
                log.info("%s was planned differently: rewriting it", plan.path.name)
                return None
            info = _info_from_file(plan.path, handle)
    except (OSError, KeyError, ValueError):
        log.warning("%s is unreadable: rewriting it", plan.path.name)
        return None
    return None if info.skipped else info


def _stacked(field: ShardField, records: list, dims: dict[str, int]) -> np.ndarray:
    """One field of every record, [N, ...] in the field's dtype."""
    if field.is_string:
        return fixed_length_strings([getattr(record, field.name) for record in records])
    if not records:
        return np.zeros(field_shape(field, dims, 0), field.dtype)
    return np.stack([getattr(record, field.name) for record in records]).astype(field.dtype, copy=False)


def write_shard(plan: ShardPlan, records: list, skipped: list[dict], compression: str | None = None,
                stacked: dict[str, np.ndarray] | None = None) -> ShardInfo:
    """Write the clip records (ClipRecord) of one shard atomically and return its info. `stacked`: fields already
    as [len(records), ...] arrays (the records' rows, built in place), written as they are."""
    settings = plan.settings
    dims = shard_dims(settings.frames_per_clip, settings.size, settings.crop_size, settings.max_boxes,
                      len(settings.classes))
    fields = schema_fields(asdict(settings))
    stacked = stacked or {}
    arrays = {field.name: stacked[field.name] if field.name in stacked else _stacked(field, records, dims)
              for field in fields if not field.is_string}
    strings = {field.name: _stacked(field, records, dims) for field in fields if field.is_string}
    report: Counter = Counter()
    for record in records:
        report.update(record.report)
    class_counts = Counter(settings.classes[r.label] if r.label >= 0 else "none" for r in records)
    checksums = {key: dataset_checksum(values) for key, values in {**arrays, **strings}.items()}

    temporary = plan.path.with_name(plan.path.name + f"{TEMPORARY_SUFFIX}-{os.getpid()}")
    # Room for the uncompressed arrays: an upper bound of the file but for its metadata (measured: 13 kB)
    reserve = sum(v.nbytes for v in arrays.values()) + sum(v.nbytes for v in strings.values()) * 2 + 2**16
    attributes = {"splits": Counter(value.decode() for value in strings["split"].tolist()), "classes": class_counts,
                  "checksums": checksums, "skipped": skipped, "report": report}
    with _writing(temporary, plan.path, reserve), \
            h5py.File(temporary, "w", track_order=False, libver=LIBVER) as handle:
        for key, values in {**arrays, **strings}.items():
            # One chunk per clip: a reader gets a whole clip in one read, and nothing more. 1-D datasets (labels,
            # names) and empty ones (`sounding` without classes) take h5py's chunks: fletcher32 needs chunks.
            chunks = (1, *values.shape[1:]) if values.size and values.ndim > 1 else True
            handle.create_dataset(key, data=values, chunks=chunks, track_times=False, fletcher32=True,
                                  compression=compression if values.size and values.ndim > 1 else None)
        handle.attrs["schema_version"] = SCHEMA_VERSION
        handle.attrs["index"] = plan.index
        handle.attrs["fingerprint"] = np.bytes_(plan.fingerprint.encode())
        for key, value in attributes.items():
            handle.attrs[key] = json_attribute(value)
    os.replace(temporary, plan.path)
    with h5py.File(plan.path, "r") as handle:
        return _info_from_file(plan.path, handle)


NEGATIVES = "negatives.h5"


def write_negatives(out: Path, embeddings: dict[str, np.ndarray]) -> dict:
    """Write the negative-audio embeddings (silence, noise) beside the shards; returns their manifest entry."""
    path = Path(out) / NEGATIVES
    embeddings = {key: values.astype(np.float32) for key, values in embeddings.items()}
    temporary = path.with_name(path.name + f"{TEMPORARY_SUFFIX}-{os.getpid()}")
    reserve = sum(v.nbytes for v in embeddings.values()) + 2**16
    with _writing(temporary, path, reserve), h5py.File(temporary, "w", track_order=False, libver=LIBVER) as handle:
        for key, values in embeddings.items():
            handle.create_dataset(key, data=values, chunks=True, fletcher32=True, track_times=False)
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
                   num_parts: int, part_index: int, discovery_skips: list[dict], negatives: dict | None = None,
                   schema_version: int = SCHEMA_VERSION) -> dict:
    """Write the manifest (atomically) listing the complete shards of this part; returns it."""
    splits: Counter = Counter()
    classes: Counter = Counter()
    report: Counter = Counter()
    for info in infos:
        splits.update(info.splits)
        classes.update(info.classes)
        report.update(info.report)
    manifest = {
        "schema_version": schema_version,  # merge_parts keeps its parts' version
        "frames_per_clip": settings.frames_per_clip,
        "image_size": settings.size,
        "crop_size": settings.crop_size,
        "max_boxes": settings.max_boxes,
        "classes": settings.classes,
        "embedder": settings.embedder,
        "audio_dim": EMBEDDING_DIM,
        "has_audio": settings.has_audio,
        "has_other_masks": settings.has_other_masks,
        "box_source": settings.box_source,
        "mask_classes": settings.mask_classes,
        "has_frame_valid": settings.has_frame_valid,
        "has_subset": settings.has_subset,
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
    with _writing(temporary, path):
        temporary.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return manifest


def _settings_from_manifest(manifest: dict) -> ShardSettings:
    return ShardSettings(
        frames_per_clip=manifest["frames_per_clip"], size=manifest["image_size"], crop_size=manifest["crop_size"],
        max_boxes=manifest["max_boxes"], classes=manifest["classes"], embedder=manifest["embedder"],
        has_other_masks=manifest["has_other_masks"], has_audio=manifest["has_audio"],
        box_source=manifest.get("box_source", "annotations"),
        mask_classes=manifest.get("mask_classes", 1), has_frame_valid=manifest.get("has_frame_valid", False),
        has_subset=manifest.get("has_subset", False),
    )


def merge_parts(part_dirs: list[Path], out: Path) -> dict:
    """Join the parts written by `--num-parts K --part-index i` runs into one shard folder whose manifest is the one
    a single run would have written (docs/design.md §10). Shards are copied into `out` unless they are already there."""
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
    return write_manifest(out, settings, infos, first["clips_per_shard"], 1, 0, discovery_skips, negatives,
                          first["schema_version"])


def read_manifest(shards_dir: Path) -> dict:
    """The manifest of a shard folder. InputError if it is missing, unreadable or of another schema."""
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no manifest: not a shard folder, or `avsprep crops` has not finished") from None
    except (OSError, ValueError) as error:
        raise InputError(path, f"unreadable manifest ({error})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else "?"
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise InputError(path, f"schema version {version} is not one of {', '.join(map(str, READABLE_VERSIONS))}")
    problem = _manifest_problem(manifest)
    if problem:
        raise InputError(path, f"damaged manifest: {problem}")
    return manifest


_MANIFEST_FIELDS = {"frames_per_clip": int, "image_size": int, "crop_size": int, "max_boxes": int, "audio_dim": int,
                    "classes": list, "embedder": str, "has_audio": bool, "has_other_masks": bool, "clips": int,
                    "splits": dict, "skipped": list, "report": dict, "shards": list}
_SHARD_FIELDS = {"file": str, "clips": int, "splits": dict, "checksums": dict}


def _manifest_problem(manifest: dict) -> str | None:
    """The first field of a manifest that is missing or of the wrong type, or a shard entry naming a file outside
    the folder; None when the manifest is whole. (Readers index these fields without further checks.)"""
    for fields, entries, where in ((_MANIFEST_FIELDS, [manifest], ""),
                                   (_SHARD_FIELDS, manifest.get("shards") or [], "shards[].")):
        for entry in entries:
            if not isinstance(entry, dict):
                return f"{where or 'manifest'} is not an object"
            for key, kind in fields.items():
                # bool is an int in Python: a count of True is as wrong as a string
                if not isinstance(entry.get(key), kind) or (kind is int and isinstance(entry.get(key), bool)):
                    return f"{where}{key} is missing or not of type {kind.__name__}"
            if where and (entry["file"] != Path(entry["file"]).name or entry["file"] in ("", ".", "..")):
                return f"shard file {entry['file']!r} is not a file name in the shard folder"
    return None


def expected_shapes(manifest: dict, clips: int) -> dict[str, tuple[tuple, str]]:
    """Dataset name -> (shape, dtype name as a reader sees it) that a shard of `clips` clips must have."""
    dims = shard_dims(manifest["frames_per_clip"], manifest["image_size"], manifest["crop_size"],
                      manifest["max_boxes"], len(manifest["classes"]), manifest["audio_dim"])
    return {field.name: (field_shape(field, dims, clips), field.stored_dtype) for field in schema_fields(manifest)}


# What h5py raises for a damaged file, depending on which structure the damage hit (found by fuzzing).
HDF5_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


def _dtype_name(dataset: h5py.Dataset) -> str:
    return "object" if h5py.check_string_dtype(dataset.dtype) is not None else str(dataset.dtype)


def schema_problems(handle: h5py.File, manifest: dict, clips: int) -> list[str]:
    """What is missing, mis-shaped or of the wrong dtype in an open shard of `clips` clips (metadata only: no
    dataset is read). Empty when the shard has the manifest's schema."""
    problems = []
    for key, (shape, dtype) in expected_shapes(manifest, clips).items():
        dataset = handle.get(key)
        if not isinstance(dataset, h5py.Dataset):
            problems.append(f"dataset {key!r} is missing")
        elif tuple(dataset.shape) != shape or _dtype_name(dataset) != dtype:
            problems.append(f"{key} is {tuple(dataset.shape)} {_dtype_name(dataset)}, expected {shape} {dtype}")
    return problems


def open_shard(shards_dir: Path, manifest: dict, entry: dict) -> h5py.File:
    """Open a shard the manifest lists, read-only, after checking its schema (no data read).
    InputError naming the shard when it is unreadable (truncated, not HDF5) or of another schema."""
    path = Path(shards_dir) / entry["file"]
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise InputError(path, f"cannot read shard ({error}); `avsprep inspect --verify` checks them all") from None
    try:
        problems = schema_problems(handle, manifest, entry["clips"])
        if not problems and manifest["schema_version"] >= 2:
            problems = attribute_problems(handle, entry)
    except HDF5_READ_ERRORS as error:  # HDF5 metadata damaged past the superblock
        problems = [f"cannot read shard ({error})"]
    if problems:
        handle.close()
        raise InputError(path, problems[0])
    return handle


def attribute_problems(handle: h5py.File, entry: dict) -> list[str]:
    """Where a v2 shard's attributes disagree with its manifest entry, or are not the JSON written (fletcher32
    covers only the datasets). Reads no dataset. Empty when they agree."""
    try:
        info = _info_from_file(Path(handle.filename), handle)
        attribute_text(handle, "fingerprint")
    except (*HDF5_READ_ERRORS, UnicodeDecodeError) as error:
        return [f"damaged attributes ({error})"]
    wrong = [key for key in ("clips", "splits", "checksums") if getattr(info, key) != entry[key]]
    wrong += [] if isinstance(info.skipped, list) and isinstance(info.report, dict) else ["skipped/report"]
    return [f"attributes {', '.join(wrong)} do not match the manifest"] if wrong else []


def verify(shards_dir: Path, progress=None) -> list[str]:
    """Recheck every listed shard's datasets: presence, shape, dtype and checksum. Returns the problems found."""
    manifest = read_manifest(shards_dir)
    problems = []
    for entry in manifest["shards"]:
        path = Path(shards_dir) / entry["file"]
        try:
            with h5py.File(path, "r") as handle:
                wrong = schema_problems(handle, manifest, entry["clips"])
                if not wrong and manifest["schema_version"] >= 2:
                    wrong = attribute_problems(handle, entry)
                problems.extend(f"{path}: {problem}" for problem in wrong)
                for key in expected_shapes(manifest, entry["clips"]):
                    if any(problem.startswith((f"{key} ", f"dataset {key!r}")) for problem in wrong):
                        continue
                    dataset = handle[key]
                    try:
                        values = dataset.asstr()[()] if key in STRING_DATASETS else dataset[()]
                    except HDF5_READ_ERRORS as error:  # fletcher32 found a damaged chunk
                        problems.append(f"{path}: dataset {key}: cannot read ({_first_line(error)})")
                        continue
                    if dataset_checksum(np.asarray(values)) != entry["checksums"].get(key):
                        problems.append(f"{path}: checksum of {key} does not match the manifest")
        except HDF5_READ_ERRORS as error:
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


def summarize(shards_dir: Path, skip_unreadable: bool = False) -> dict:
    """What `avsprep inspect` shows: clips per split and class, shapes and dtypes, embedder, sizes on disk.
    A shard that cannot be read is an InputError, or with `skip_unreadable` (for `--verify`, which reports it)
    left out of the per-class counts."""
    manifest = read_manifest(shards_dir)
    per_split_class: dict[str, Counter] = {}
    for entry in manifest["shards"]:
        try:
            handle = open_shard(shards_dir, manifest, entry)
        except InputError:
            if skip_unreadable:
                continue
            raise
        with handle:
            try:
                rows = list(zip(handle["split"].asstr()[()], handle["label"][()]))
            except HDF5_READ_ERRORS as error:
                if skip_unreadable:
                    continue
                raise InputError(Path(shards_dir) / entry["file"], f"cannot read shard ({error})") from None
        for split, label in rows:
            name = manifest["classes"][label] if 0 <= label < len(manifest["classes"]) else "none"
            per_split_class.setdefault(split, Counter())[name] += 1
    return {
        "shards_dir": str(shards_dir),
        "schema_version": manifest["schema_version"],
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


def rewrite_as_v1(folder: Path) -> None:
    """Rewrite a shard folder in place as schema v1 wrote it (variable-length strings and str attributes, no
    fletcher32): the fixture of the tests that v1 still reads, and the v1 row of tools/bench_loader.py."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    for entry in manifest["shards"]:
        path = Path(folder) / entry["file"]
        with h5py.File(path, "r") as source:
            arrays = {key: source[key].asstr()[()] if key in STRING_DATASETS else source[key][()] for key in source}
            attributes = {key: value.decode() if isinstance(value, bytes) else value
                          for key, value in source.attrs.items()}
        with h5py.File(path, "w", track_order=False) as target:
            for key, values in arrays.items():
                chunks = (1, *values.shape[1:]) if values.size and values.ndim > 1 else None
                target.create_dataset(key, data=values, chunks=chunks, track_times=False,
                                      dtype=h5py.string_dtype() if key in STRING_DATASETS else None)
            target.attrs.update({**attributes, "schema_version": 1})
    (Path(folder) / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 1}, indent=1) + "\n")


# ShardReader reads the image-sized datasets (frames, masks, crops, other masks: hundreds of kB a clip) a clip at a time
# and the others (flags, boxes, audio embeddings, labels, names: a few kB a clip) whole, once when it opens a shard:
# an HDF5 call per clip and small dataset cost about as much as reading the frames.
PER_CLIP_DATASETS = frozenset(field.name for field in SHARD_SCHEMA if {"S", "c"} & set(field.shape))
_WORDS_PER_ROW = 256  # `fletcher32`: a row of 256 16-bit words sums to below 2**24, so float32 sums it exactly


def _fold(total: int) -> int:
    """A Fletcher sum as HDF5 leaves it: mod 65535, but 65535 rather than 0 for a non-zero multiple of 65535 (its
    end-around folds never reach 0 once a word was non-zero)."""
    return 0 if total == 0 else (total - 1) % 65535 + 1


def fletcher32(data: np.ndarray) -> int:
    """HDF5's Fletcher-32 checksum of `data` (uint8 [L], contiguous), the value its fletcher32 filter stores after
    a chunk, vectorised: about 0.15 ms for the 750 kB of a clip's frames, a fraction of libhdf5's byte loop.

    HDF5 sums the big-endian 16-bit words w_1..w_n (an odd last byte is the high byte of one more word):
    sum1 = sum of w_i, sum2 = sum of (n - i + 1) w_i, each folded mod 65535 (`_fold`); it stores (sum2 << 16) | sum1.
    With the words in rows of h (word i at row r, column c: i = r h + c + 1), sum2 = n sum1 - h sum_r r W_r -
    sum_c c V_c, where W_r and V_c are the rows' and columns' sums of words: OpenCV reductions, exact in int32 and
    float32. Little-endian machines only (the uint16 view); exact for chunks below 256 MiB (int64 products)."""
    data = data.reshape(-1)
    words, h = data.size // 2, _WORDS_PER_ROW
    rows = words // h
    sum1 = sum2 = 0
    if rows:
        block = data[:2 * rows * h].reshape(rows, 2 * h)  # byte 2k: the high byte a of a word, 2k + 1: its low byte b
        byte_rows = cv2.reduce(block, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).reshape(-1).astype(np.int64)  # a + b
        little_rows = cv2.reduce(block.view(np.uint16), 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F)  # a + 256 b
        word_rows = 257 * byte_rows - little_rows.reshape(-1).astype(np.int64)  # W_r: 256 a + b
        byte_columns = cv2.reduce(block, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).reshape(-1).astype(np.int64)
        word_columns = 256 * byte_columns[0::2] + byte_columns[1::2]  # V_c
        sum1 = int(word_rows.sum())
        sum2 = (rows * h * sum1 - h * int(np.arange(rows) @ word_rows) - int(np.arange(h) @ word_columns))
    # The fewer than h words left: appended, they add t to the weight of each word before them
    tail = data[2 * rows * h:2 * words].astype(np.int64)
    if tail.size:
        tail_words = 256 * tail[0::2] + tail[1::2]
        sum2 += tail_words.size * sum1 + int(np.arange(tail_words.size, 0, -1) @ tail_words)
        sum1 += int(tail_words.sum())
    if data.size % 2:
        sum1 += 256 * int(data[-1])
        sum2 += sum1
    return (_fold(sum2) << 16) | _fold(sum1)


def fletcher32_matches(data: np.ndarray, stored: bytes) -> bool:
    """Whether `stored` (the 4 bytes after a chunk, little-endian) is a checksum HDF5 accepts for `data`: its own, or
    the one with each half byte-swapped (what HDF5 before 1.6.3 wrote; HDF5 accepts both)."""
    value, computed = int.from_bytes(stored, "little"), fletcher32(data)
    return value in (computed, ((computed & 0x00FF00FF) << 8) | ((computed >> 8) & 0x00FF00FF))


class _BufferPool:
    """Memory for the rows read a clip at a time, given out again once nothing but the pool holds it (the arrays and
    tensors made from it are gone). Fresh memory costs the kernel a page fault per 4 KiB, because glibc hands freed
    megabytes back: about as much as reading the rows (~0.9 ms of a 224 px clip)."""

    def __init__(self, limit: int = 32):
        self.limit = limit  # buffers kept per size: a DataLoader worker holds a batch of items, a few more in flight
        self.buffers: dict[int, list[np.ndarray]] = {}

    def get(self, size: int) -> np.ndarray:
        """A uint8 [size] buffer that nothing else references."""
        pool = self.buffers.setdefault(size, [])
        for buffer in pool:
            if sys.getrefcount(buffer) <= 3:  # the list, `buffer` and getrefcount's argument: no array uses it
                return buffer
        buffer = np.empty(size, np.uint8)
        if len(pool) < self.limit:
            pool.append(buffer)
        return buffer


class _RowReader:
    """Reads one row (one clip) of a dataset into a new array, or the whole dataset, each in one HDF5 call through
    h5py's low-level API, without h5py's selection machinery (most of the cost of a small read)."""

    def __init__(self, dataset: h5py.Dataset, pool: _BufferPool | None = None):
        # Everything from the low-level objects, once: each h5py property asks HDF5 again (a shard is opened per
        # worker and per eviction from the LRU, and its datasets' properties were a third of that).
        self.dataset, self.pool = dataset, pool or _BufferPool(0)
        self.shape, self.dtype = dataset.id.shape, dataset.dtype
        self.row_shape = tuple(self.shape[1:])
        self.string = h5py.check_string_dtype(self.dtype) is not None
        self.variable = h5py.check_vlen_dtype(self.dtype) is not None  # v1 strings: through h5py
        self.file_space = dataset.id.get_space()
        self.memory_space = h5py.h5s.create_simple(self.row_shape or (1,))
        self.count = (1, *self.row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        plist = dataset.id.get_create_plist()
        self.chunks = plist.get_chunk() if plist.get_layout() == h5py.h5d.CHUNKED else None
        filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        self.checked = h5py.h5z.FILTER_FLETCHER32 in filters
        self.transformed = bool(filters - {h5py.h5z.FILTER_FLETCHER32})  # compressed (or shuffled): raw != data
        # A row whose chunk is the row and whose only filter is fletcher32 is read as its stored chunk (`_read_chunk`)
        self.direct = (self.chunks == (1, *self.row_shape) and 0 < self.row_bytes < 2**28 and not self.string
                       and not self.transformed and sys.byteorder == "little")
        self.stored_bytes = self.row_bytes + 4 * self.checked

    def chunk_index_is_whole(self, file_size: int) -> bool:
        """Whether the dataset's chunk index lists exactly the chunks its shape needs, each inside the file and of a
        plausible size. HDF5 reads a chunk that its index lookup cannot find as the fill value, silently: a damaged
        index (a lost entry, a wrong entry count, an address past the end; found by fuzzing) would give zeros that
        fletcher32 never sees."""
        if self.chunks is None:
            return True
        expected = set(itertools.product(*(range(0, size, step) for size, step in zip(self.shape, self.chunks))))
        found: list = []
        self.dataset.id.chunk_iter(found.append)
        checksum = 4 * self.checked
        most = int(np.prod(self.chunks)) * self.dtype.itemsize + checksum + 64  # (64: a compressor's header)
        placed = all(0 < info.byte_offset and info.byte_offset + info.size <= file_size and checksum < info.size
                     and (info.size <= most or self.transformed) for info in found)
        offsets = {tuple(info.chunk_offset) for info in found}
        return self.dataset.id.get_num_chunks() == len(found) == len(expected) and offsets == expected and placed

    def read(self, row: int) -> np.ndarray | str:
        """[row] of the dataset: an array of the row's shape, or a str for a string dataset."""
        if self.direct:
            out = self._read_chunk(row)
            if out is not None:
                return out
        if self.variable:
            return self.dataset.asstr()[row]
        out = np.empty(self.row_shape, self.dtype)
        self.file_space.select_hyperslab((row, *(0,) * len(self.row_shape)), self.count)
        self.dataset.id.read(self.memory_space, self.file_space, out)
        if not out.reshape(-1).view(np.uint8).any():
            self._check_stored(row, out[np.newaxis])  # all zeros: the fill value, what HDF5 gives for a lost chunk
        return out[()].decode() if self.string else out

    def _read_chunk(self, row: int) -> np.ndarray | None:
        """[row] read as its stored chunk: one HDF5 call, without the filter pipeline and the chunk cache, its
        fletcher32 checked here (HDF5's check and its copy out of the chunk cache were most of a frames read). None
        where the chunk is not what an intact one is (not found, another size, wrong checksum): the caller then
        reads through HDF5, which names the damage."""
        buffer = self.pool.get(self.stored_bytes)
        try:
            filter_mask, raw = self.dataset.id.read_direct_chunk((row, *(0,) * len(self.row_shape)), out=buffer)
        except HDF5_READ_ERRORS:
            return None
        data = buffer[:self.row_bytes]
        if filter_mask or len(raw) != self.stored_bytes or (
                self.checked and not fletcher32_matches(data, buffer[self.row_bytes:].tobytes())):
            return None
        return data.view(self.dtype).reshape(self.row_shape)

    def read_all(self) -> np.ndarray | list[str]:
        """The whole dataset, [N, ...] (a string dataset: N str), in one HDF5 call; a chunk read back as all zeros is
        checked against the stored chunk, as in `read`."""
        if self.variable:
            return list(self.dataset.asstr()[()])
        out = np.empty(self.shape, self.dtype)
        if out.size:
            self.dataset.id.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
            step = self.chunks[0] if self.chunks else len(out)
            zero_rows = ~out.reshape(len(out), -1).view(np.uint8).any(axis=1)
            for start in range(0, len(out), step):
                if zero_rows[start:start + step].all():
                    self._check_stored(start, out[start:start + step])
        return [value.decode() for value in out.tolist()] if self.string else out

    def _check_stored(self, row: int, out: np.ndarray) -> None:
        """Raise (OSError) unless the chunk holding rows row .. row + len(out) - 1 is stored and holds `out`
        [k, ...]. Rare: only rows of zeros come here (labels 0, empty masks), and the chunk is read raw, without
        HDF5's lookup for the fill value."""
        if self.chunks is None:
            return
        start = row - row % self.chunks[0]
        _, raw = self.dataset.id.read_direct_chunk((start, *(0,) * len(self.row_shape)))  # OSError if not stored
        if self.transformed:
            return
        data = raw[:-4] if self.checked else raw
        stored = np.frombuffer(data, self.dtype, count=int(np.prod(self.chunks))).reshape(self.chunks)
        if stored[row - start:row - start + len(out)].tobytes() != out.tobytes():
            raise OSError("the chunk index does not find the stored chunk")


class ShardReader:
    """Clips of a shard folder by (shard file, row), as dicts of numpy arrays; torch-free (the fuzz test reads
    damaged shards with only this and h5py imported). A damaged chunk (fletcher32) or HDF5 structure is an
    InputError naming the shard and the dataset.

    Open shards are kept least recently used first, at most `max_open` (each open file holds ~1 MiB of HDF5
    metadata cache), each with its datasets looked up once (h5py's `handle[key]` costs as much as the read of a
    small chunk) and its small datasets read whole (`PER_CLIP_DATASETS` are read a clip at a time): a damaged chunk
    of those stops the opening of the shard, not the read of its clip."""

    def __init__(self, shards_dir: Path, fields: tuple[str, ...], max_open: int = 8):
        self.shards_dir, self.fields, self.max_open = Path(shards_dir), fields, max_open
        self.pool = _BufferPool()
        # file -> (handle, {field: its _RowReader, or the whole dataset as read}), fields in the order of `fields`
        self._open: OrderedDict[str, tuple[h5py.File, dict[str, _RowReader | np.ndarray | list[str]]]] = OrderedDict()

    def _sources(self, file: str) -> dict[str, _RowReader | np.ndarray | list[str]]:
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file][1]
        if len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1][0].close()
        path = self.shards_dir / file
        handle = None
        try:
            handle = h5py.File(path, "r")
            readers = {key: _RowReader(handle[key], self.pool) for key in self.fields if key in handle}
            damaged = [key for key, reader in readers.items() if not reader.chunk_index_is_whole(path.stat().st_size)]
        except HDF5_READ_ERRORS as error:
            if handle is not None:
                handle.close()
            raise InputError(path, f"cannot read shard ({_first_line(error)})") from None
        if damaged:
            handle.close()
            raise InputError(path, f"dataset {damaged[0]}: its chunk index is damaged")
        sources: dict[str, _RowReader | np.ndarray | list[str]] = {}
        for key, reader in readers.items():
            try:
                sources[key] = reader if key in PER_CLIP_DATASETS else reader.read_all()
            except HDF5_READ_ERRORS as error:
                handle.close()
                raise InputError(path, f"dataset {key}: cannot read, damaged ({_first_line(error)}); "
                                       "`avsprep inspect --verify` checks every shard") from None
        self._open[file] = (handle, sources)
        return sources

    def read_clip(self, file: str, row: int) -> dict[str, np.ndarray | str]:
        """One clip: each of `fields` the shard has, [row] of the dataset (strings as str), each a new array."""
        clip = {}
        for key, source in self._sources(file).items():
            if isinstance(source, list):
                clip[key] = source[row]
            elif isinstance(source, np.ndarray):
                clip[key] = np.array(source[row])  # a copy: an item owns its arrays, as one read per clip gave
            else:
                try:
                    clip[key] = source.read(row)
                except HDF5_READ_ERRORS as error:
                    raise InputError(self.shards_dir / file, f"dataset {key}: cannot read clip {row}, damaged "
                                     f"({_first_line(error)}); `avsprep inspect --verify` checks every shard") from None
        return clip

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()

    def __getstate__(self) -> dict:
        # Open HDF5 handles do not cross process boundaries; buffers need not.
        return {**self.__dict__, "_open": OrderedDict(), "pool": _BufferPool()}


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]
