"""Damaging a shard and reading it back in a subprocess that imports only h5py and `avsprep.shards` (no torch).

A libhdf5 hang cannot be interrupted from Python, so every read runs in a child process: `python shard_fuzz.py
FOLDER...` reads each folder (one damaged shard and its manifest) with a SIGALRM per folder whose default action
ends the child even inside libhdf5, and prints one JSON line per folder: `{"case": i, "error": message}` or
`{"case": i, "digest": sha256 of every clip}`. The parent (`run_cases`) restarts the child after the case that
ended it and records that case as a hang.
"""
from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
SECONDS_PER_CASE = 10


@dataclass(frozen=True)
class Damage:
    """One damage of a file's bytes: `kind` flip (1-4 bytes), cut (truncate) or zero (a 4 KiB page)."""

    kind: str
    offset: int
    in_metadata: bool
    masks: tuple[int, ...] = ()

    def apply(self, data: bytes) -> bytes:
        if self.kind == "cut":
            return data[:self.offset]
        damaged = bytearray(data)
        if self.kind == "zero":
            start = self.offset - self.offset % PAGE
            damaged[start:start + PAGE] = bytes(len(damaged[start:start + PAGE]))
        else:
            for step, mask in enumerate(self.masks):
                position = min(self.offset + step * 7, len(damaged) - 1)
                damaged[position] ^= mask
        return bytes(damaged)


def metadata_offsets(path: Path) -> list[int]:
    """The byte offsets of a shard that hold HDF5 metadata (superblock, object headers, B-trees, heaps): every
    offset outside the datasets' chunks."""
    import h5py

    data_bytes = set()
    with h5py.File(path, "r") as handle:
        for dataset in handle.values():
            for index in range(dataset.id.get_num_chunks()):
                chunk = dataset.id.get_chunk_info(index)
                data_bytes.update(range(chunk.byte_offset, chunk.byte_offset + chunk.size))
    return [offset for offset in range(path.stat().st_size) if offset not in data_bytes]


def random_damages(path: Path, count: int, seed: int) -> list[Damage]:
    """`count` damages of the shard at `path`, a third of them inside its HDF5 metadata."""
    rng = random.Random(seed)
    size, metadata = path.stat().st_size, metadata_offsets(path)
    damages = []
    for case in range(count):
        in_metadata = case % 3 == 0
        offset = rng.choice(metadata) if in_metadata else rng.randrange(size)
        kind = rng.choice(["flip", "flip", "cut", "zero"])
        masks = tuple(rng.randrange(1, 256) for _ in range(rng.randint(1, 4)))
        damages.append(Damage(kind, offset, in_metadata, masks))
    return damages


def clips_digest(folder: Path) -> str:
    """sha256 over every clip of every listed shard, read as training reads them: manifest, open_shard (schema and
    attributes), then every dataset of every row through ShardReader."""
    from avsprep.shards import SHARD_SCHEMA, ShardReader, open_shard, read_manifest

    manifest = read_manifest(folder)
    reader = ShardReader(folder, tuple(field.name for field in SHARD_SCHEMA))
    digest = hashlib.sha256()
    for entry in manifest["shards"]:
        open_shard(folder, manifest, entry).close()
        for row in range(entry["clips"]):
            for key, value in sorted(reader.read_clip(entry["file"], row).items()):
                digest.update(key.encode() + (value.encode() if isinstance(value, str) else value.tobytes()))
    reader.close()
    return digest.hexdigest()


def run_cases(folders: list[Path], timeout_per_case: int = SECONDS_PER_CASE) -> dict[int, dict]:
    """Case index -> its child's JSON line, or {"hang": True} for a case that ended the child without a line."""
    results: dict[int, dict] = {}
    start = 0
    while start < len(folders):
        command = [sys.executable, __file__, str(timeout_per_case), *map(str, folders[start:])]
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=timeout_per_case * (len(folders) - start) + 30)
        for line in done.stdout.splitlines():
            result = json.loads(line)
            results[start + result.pop("case")] = result
        finished = [case for case in results if case >= start]
        if len(finished) == len(folders) - start:
            break
        stuck = start + len(finished)  # the case it was reading when it ended
        results[stuck] = {"hang": True, "returncode": done.returncode, "stderr": done.stderr[-500:]}
        start = stuck + 1
    return results


def _child(timeout_per_case: int, folders: list[str]) -> None:
    from avsprep.errors import InputError

    for case, folder in enumerate(folders):
        signal.alarm(timeout_per_case)  # no handler: the default action ends the process, even inside libhdf5
        try:
            result = {"digest": clips_digest(Path(folder))}
        except InputError as error:
            result = {"error": str(error)}
        except Exception as error:  # anything else is a finding: not the one-line InputError
            result = {"other": f"{type(error).__name__}: {error}"}
        signal.alarm(0)
        print(json.dumps({"case": case, "torch": "torch" in sys.modules, **result}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child(int(sys.argv[1]), sys.argv[2:])
