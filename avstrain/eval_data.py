"""What every evaluation suite shares (default, reliance, semantic, localisation): the clips of a split in split
order and their batches, donors of other clips' audio, the negative embeddings, progress, and text tables.

Every suite identifies a clip by its position in the split (shard order), so its figures do not depend on batching
or workers; donors are drawn from generators seeded by (seed, condition, position).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from avsprep.errors import InputError
from avsprep.shards import read_negatives
from avstrain.data import ShardDataset

log = logging.getLogger(__name__)

# Separate random streams per suite condition, so adding one condition does not change another's draws.
STREAM_SWAP, STREAM_NOISE, STREAM_OFFSCREEN = 1, 2, 3

Progress = Callable[[int], None]  # called with the number of clips just scored


def model_uses_audio(model: nn.Module) -> bool:
    """False for the vision-only model (`config.audio == False`), which ignores its audio input."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "audio", True))


# --------------------------------------------------------------------------------------------------------------
# The split: which clips, in which order


@dataclass
class SplitTable:
    """Small per-clip facts of a split, in split order (shard order, as `ShardDataset(shuffle=False)` reads it).

    names [N], labels [N] int64 (-1: no class), audio [N,T,128] float32 or None when not asked for.
    """

    names: list[str]
    labels: np.ndarray
    audio: np.ndarray | None

    def __post_init__(self) -> None:
        self.position = {name: i for i, name in enumerate(self.names)}
        if len(self.position) != len(self.names):
            raise InputError(None, "clip names are not unique within the split; cannot identify clips")

    def __len__(self) -> int:
        return len(self.names)


def read_split_table(dataset: ShardDataset, with_audio: bool = False) -> SplitTable:
    """Names, labels (and audio) of every clip of the dataset's split, read from the shards' small datasets only
    (one read per shard file; frames and masks are not touched)."""
    rows_per_file: dict[str, list[int]] = {}
    for file, row in dataset.index:
        rows_per_file.setdefault(file, []).append(row)
    names, labels, audio = [], [], []
    for file, rows in rows_per_file.items():  # dict order = first appearance = split order
        with h5py.File(dataset.shards_dir / file, "r") as handle:
            # Rows come from np.flatnonzero, so they increase, as h5py's list indexing requires.
            names.extend(handle["name"].asstr()[rows].tolist())
            labels.append(handle["label"][rows].astype(np.int64))
            if with_audio:
                audio.append(handle["audio"][rows].astype(np.float32))
    return SplitTable(names=names, labels=np.concatenate(labels),
                      audio=np.concatenate(audio) if with_audio else None)


def batches(dataset: ShardDataset, table: SplitTable, batch_size: int, num_workers: int, max_clips: int | None,
             pin_memory: bool) -> Iterator[tuple[dict, list[int]]]:
    """DataLoader batches with each clip's split position, limited to the first `max_clips` clips of the split
    (in split order, whatever the worker interleaving), stopping as soon as all of those have been seen."""
    limit = len(table) if max_clips is None else min(max_clips, len(table))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
    seen = 0
    for batch in loader:
        positions = [table.position[name] for name in batch["name"]]
        keep = [i for i, p in enumerate(positions) if p < limit]
        if len(keep) < len(positions):
            batch = select_rows(batch, keep)
            positions = [positions[i] for i in keep]
        if positions:
            yield batch, positions
        seen += len(positions)
        if seen >= limit:
            break


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The given rows of a collated batch (tensors and the list of names)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    return {key: [value[i] for i in rows] if isinstance(value, list) else value[index] for key, value in batch.items()}


def eval_dataset(shards_dir: str | Path, split: str) -> ShardDataset:
    # rank 0 of 1 explicitly: under torch.distributed every rank evaluates the whole split, not a share of it.
    return ShardDataset(shards_dir, split=split, shuffle=False, rank=0, world_size=1)


def report_progress(progress: Progress | None, done: int, new: int) -> None:
    if progress is not None:
        progress(new)
    elif done % 100 < new:  # about every 100 clips
        log.info("%d clips scored", done)


@dataclass
class DonorPicker:
    """Deterministic choice of the clip whose audio another clip is given (docs/design.md §9).

    labels [N] of the split, in split order. Each choice draws from a generator seeded by (seed, condition, the
    receiving clip's position), so it does not depend on batching, workers or which other clips are scored.
    """

    labels: np.ndarray
    seed: int = 0

    def swap(self, position: int, other_label: int) -> int | None:
        """Another clip whose primary label is `other_label` (the visible, silent object's class); None if none."""
        if other_label < 0:
            return None
        candidates = np.flatnonzero(self.labels == other_label)
        return self._pick(candidates[candidates != position], STREAM_SWAP, position)

    def offscreen(self, position: int, visible: set[int]) -> int | None:
        """Another clip whose primary label is a class not `visible` in this one; None if there is none."""
        off = (self.labels >= 0) & ~np.isin(self.labels, sorted(visible))
        candidates = np.flatnonzero(off)
        return self._pick(candidates[candidates != position], STREAM_OFFSCREEN, position)

    def _pick(self, candidates: np.ndarray, stream: int, position: int) -> int | None:
        if not len(candidates):
            return None
        rng = np.random.default_rng([self.seed, stream, position])
        return int(candidates[rng.integers(len(candidates))])


def visible_classes(label: int, other_label: int, sounding: Tensor) -> set[int]:
    """Classes in view of a clip: its sounding classes ([C] bool), its primary label and the other object's."""
    visible = set(torch.nonzero(sounding).flatten().tolist())
    visible.update(c for c in (label, other_label) if c >= 0)
    return visible


def load_negatives(shards_dir: str | Path, frames_per_clip: int) -> tuple[Tensor, Tensor]:
    """Silence [1,T,128] and noise [M,T,128] embeddings made with the dataset's embedder."""
    negatives = read_negatives(Path(shards_dir))
    silence, noise = (torch.from_numpy(negatives[key]).float() for key in ("silence", "noise"))
    for key, value in (("silence", silence), ("noise", noise)):
        if value.ndim != 3 or value.shape[1] != frames_per_clip or not len(value):
            raise InputError(Path(shards_dir) / "negatives.h5",
                             f"{key} embeddings have shape {tuple(value.shape)}, expected [M,{frames_per_clip},D]")
    return silence, noise


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def text_table(header: list[str], rows: list[list[object]], names: int = 1) -> list[str]:
    """Aligned text rows: the first `names` columns left-aligned, the numbers right-aligned."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    return ["  ".join(cell.ljust(w) if c < names else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in cells]
