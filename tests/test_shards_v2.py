"""Shard schema v2 (docs/design.md §16): nothing in the global heap, fletcher32 on every dataset, attributes held against the
manifest, v1 still readable, and damage of any kind either reported in one line or harmless."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from avsprep.cli import main as avsprep_main
from avsprep.errors import InputError
from avsprep.shards import (SCHEMA_VERSION, ShardReader, fletcher32, fletcher32_matches, json_attribute, read_manifest,
                            rewrite_as_v1, verify)
from avstrain.data import ShardDataset
from helpers import crops_args, make_dataset
from shard_fuzz import clips_digest, random_damages, run_cases

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A v2 folder of 6 tiny clips in shards of 2 (train, val and test in each)."""
    root = tmp_path_factory.mktemp("v2")
    dataset = make_dataset(root / "data", clips=6, frames_per_clip=2, width=32, height=24)
    result = CliRunner().invoke(avsprep_main, crops_args(dataset, root / "shards", frames_per_clip=2, size=16))
    assert result.exit_code == 0, result.output
    return root / "shards"


def copy(shards: Path, tmp_path: Path) -> Path:
    shutil.copytree(shards, tmp_path / "shards")
    return tmp_path / "shards"


def variable_length_items(path: Path) -> list[str]:
    """Every dataset and attribute of an HDF5 file whose type is variable-length (stored in the global heap)."""
    found = []

    def variable(type_id) -> bool:
        return type_id.get_class() == h5py.h5t.VLEN or (type_id.get_class() == h5py.h5t.STRING
                                                          and type_id.is_variable_str())

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and variable(item.id.get_type()):
            found.append(name)
        for key in item.attrs:
            if variable(item.attrs.get_id(key).get_type()):
                found.append(f"{name}@{key}")

    with h5py.File(path, "r") as handle:
        visit("/", handle)
        handle.visititems(visit)
    return found


def test_v2_keeps_nothing_in_the_global_heap_and_checksums_every_dataset(shards):
    assert read_manifest(shards)["schema_version"] == SCHEMA_VERSION == 2
    files = sorted(shards.glob("*.h5"))
    assert len(files) >= 3
    for path in files:
        assert variable_length_items(path) == [], path
        with h5py.File(path, "r") as handle:
            assert all(dataset.fletcher32 for dataset in handle.values()), path
            assert h5py.check_string_dtype(handle["name"].dtype).length is not None if "name" in handle else True
    summary = CliRunner().invoke(avsprep_main, ["inspect", str(shards), "--json"])
    assert json.loads(summary.output)["schema_version"] == 2


def test_v1_shards_still_read(shards, tmp_path):
    old = copy(shards, tmp_path)
    rewrite_as_v1(old)
    assert variable_length_items(old / "shard-00000.h5")  # it really is v1
    assert verify(old) == []
    assert clips_digest(old) == clips_digest(shards)
    for split in ("train", "val"):
        mine = {item["name"]: item for item in ShardDataset(old, split, shuffle=False)}
        reference = {item["name"]: item for item in ShardDataset(shards, split, shuffle=False)}
        assert mine.keys() == reference.keys()
        for name, item in mine.items():
            assert all(np.array_equal(np.asarray(item[k]), np.asarray(reference[name][k]), equal_nan=True)
                       for k in item if k != "name")
    summary = CliRunner().invoke(avsprep_main, ["inspect", str(old), "--json"])
    assert json.loads(summary.output)["schema_version"] == 1


def test_attributes_are_held_against_the_manifest(shards, tmp_path):
    damaged = copy(shards, tmp_path)
    shard = damaged / "shard-00000.h5"
    with h5py.File(shard, "r+") as handle:
        splits = json.loads(handle.attrs["splits"])
        handle.attrs["splits"] = json_attribute({**splits, "train": splits.get("train", 0) + 1})
    with pytest.raises(InputError, match=f"{shard}: attributes splits do not match the manifest"):
        ShardDataset(damaged, "train")
    assert verify(damaged) == [f"{shard}: attributes splits do not match the manifest"]


def flip_chunk_byte(path: Path, dataset: str, chunk: int) -> None:
    with h5py.File(path, "r") as handle:
        offset = handle[dataset].id.get_chunk_info(chunk).byte_offset
    with path.open("r+b") as handle:
        handle.seek(offset + 10)
        value = handle.read(1)[0]
        handle.seek(offset + 10)
        handle.write(bytes([value ^ 0x5A]))


def test_damaged_chunk_in_a_dataloader_worker_is_one_line_exit_2(shards, tmp_path):
    """fletcher32 finds the flipped byte when a worker reads the clip; the CLI ends in the worker's one line."""
    damaged = copy(shards, tmp_path)
    shard = damaged / "shard-00000.h5"
    with h5py.File(shard, "r") as handle:
        row = list(handle["split"].asstr()[()]).index("train")
    flip_chunk_byte(shard, "frames", row)
    settings = ["model.backbone=resnet18", "model.channels=8", "model.image_size=32", "optim.batch_size=1",
                "optim.epochs=1", "train.workers=2", "train.threads=1", "train.amp=fp32", "eval.batch_size=2"]
    command = [sys.executable, "-m", "avstrain", "train", "--shards", str(damaged), "--runs", str(tmp_path / "runs"),
               *[arg for setting in settings for arg in ("--set", setting)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "Traceback" not in output and "DataLoader worker" not in output, output
    last = output.splitlines()[-1]
    assert f"{shard}: dataset frames: cannot read clip {row}" in last, output


def fuzz(shards: Path, tmp_path: Path, cases: int, seed: int) -> tuple[dict, list]:
    """`cases` damages of one shard, each read in a torch-free child under a timeout. Returns the outcome counts and
    the findings: cases that hung, raised anything but a one-line InputError naming the shard, or read back other
    clips than the original."""
    good = clips_digest(shards)
    shard = "shard-00000.h5"
    base = (shards / shard).read_bytes()
    folders = []
    for case, damage in enumerate(random_damages(shards / shard, cases, seed)):
        folder = tmp_path / f"case-{case:05d}"
        folder.mkdir()
        for path in shards.iterdir():
            if path.name != shard:
                os.link(path, folder / path.name)  # read-only here: links instead of copies
        (folder / shard).write_bytes(damage.apply(base))
        folders.append(folder)
    results = run_cases(folders)
    damages = random_damages(shards / shard, cases, seed)
    counts = {"error": 0, "exact": 0, "metadata": sum(damage.in_metadata for damage in damages)}
    findings = []  # every case that is neither: all of them, for the note
    for case, result in sorted(results.items()):
        assert not result.get("torch"), "the reader imported torch"
        if "hang" in result or "other" in result:
            findings.append((case, damages[case], result))
        elif "error" in result:
            assert result["error"].startswith(str(folders[case] / shard) + ": ") and "\n" not in result["error"]
            counts["error"] += 1
        elif result["digest"] == good:
            counts["exact"] += 1
        else:
            findings.append((case, damages[case], "read back different clips"))
    print(f"{cases} damages: {counts}, findings: {findings}")
    assert len(results) == cases
    return counts, findings


def test_fuzz_100_damages(shards, tmp_path):
    counts, findings = fuzz(shards, tmp_path, 100, seed=17)
    assert not findings and counts["error"] + counts["exact"] == 100 and counts["metadata"] >= 33


@pytest.mark.slow
def test_fuzz_3000_damages(shards, tmp_path):
    """As the 100, in 3000. With HDF5 1.8's format one of these (a flipped byte of a chunk address in a version-1
    B-tree, which has no checksum, pointing at zeros) read back as zeros; 1.10's fixed-array indexes carry checksums."""
    counts, findings = fuzz(shards, tmp_path, 3000, seed=1700)
    assert not findings and counts["error"] + counts["exact"] == 3000, findings


def test_fletcher32_is_the_checksum_hdf5_stores(tmp_path):
    """The reader checks fletcher32 itself (vectorised, `ShardReader`'s frames reads): it must agree with libhdf5
    on every length (odd ones too), on all-zero and all-0xFF data, and see a flipped bit."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 2, 3, 511, 512, 513, 4097, 250881, 752640)]
    arrays += [np.full(n, 255, np.uint8) for n in (2, 1024, 100001)] + [np.zeros(1000, np.uint8)]
    arrays += [(rng.random(30000) < 0.01).astype(np.uint8)]
    path = tmp_path / "checksums.h5"
    with h5py.File(path, "w") as handle:
        for i, values in enumerate(arrays):
            handle.create_dataset(str(i), data=values[None], chunks=(1, values.size), fletcher32=True)
    with h5py.File(path, "r") as handle:
        for i, values in enumerate(arrays):
            _, raw = handle[str(i)].id.read_direct_chunk((0, 0))
            assert fletcher32(values) == int.from_bytes(raw[-4:], "little"), values.size
            assert fletcher32_matches(values, raw[-4:])
            damaged = values.copy()
            damaged[len(damaged) // 2] ^= 4
            assert not fletcher32_matches(damaged, raw[-4:]), values.size


def test_damage_is_found_by_the_reader_in_small_and_in_image_datasets(shards, tmp_path):
    """Small datasets are read whole when a shard opens, frames a clip at a time: damage in either is one line
    naming the shard and the dataset; the clips around damaged frames still read."""
    small = copy(shards, tmp_path / "small")
    flip_chunk_byte(small / "shard-00000.h5", "audio", 1)
    with pytest.raises(InputError, match=r"shard-00000\.h5: dataset audio: cannot read, damaged \("):
        ShardReader(small, ("frames", "audio")).read_clip("shard-00000.h5", 0)
    frames = copy(shards, tmp_path / "frames")
    flip_chunk_byte(frames / "shard-00000.h5", "frames", 1)
    reader = ShardReader(frames, ("frames", "audio"))
    with pytest.raises(InputError, match=r"shard-00000\.h5: dataset frames: cannot read clip 1, damaged \("):
        reader.read_clip("shard-00000.h5", 1)
    intact = ShardReader(shards, ("frames", "audio")).read_clip("shard-00000.h5", 0)
    assert np.array_equal(reader.read_clip("shard-00000.h5", 0)["frames"], intact["frames"])
