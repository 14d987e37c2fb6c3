"""Streaming clips out of `avsprep` shards for training and evaluation.

`ShardDataset` is an IterableDataset: each DataLoader worker of each distributed rank (a "consumer") gets its own
disjoint block of the split's clips, reads them one chunk (one clip) at a time, and never loads a shard whole.
The order of an epoch is a pure function of (seed, epoch, rank, worker), computed from indices alone, so it can be
reproduced (and a resumed run can skip what it has already seen) without reading any data.

Frames and crops stay uint8 until they reach the device: small transfers from workers, and the model normalises
them there. A DataLoader worker hands a batch of clips to the main process as one block of shared memory
(`collate_clips`), not one per field.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
# `collate` and its type map are how torch documents extending default_collate to a type of one's own.
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from avsprep.errors import InputError
from avsprep.shards import HDF5_READ_ERRORS, SHARD_SCHEMA, ShardReader, open_shard, read_manifest

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 8
# The arrays every shard has (the strings and the optional datasets are read apart): from the one schema table.
CLIP_FIELDS = tuple(field.name for field in SHARD_SCHEMA if field.only_if is None and not field.is_string)
READ_FIELDS = (*CLIP_FIELDS, *(field.name for field in SHARD_SCHEMA
                               if field.only_if in ("has_other_masks", "has_frame_valid")), "name")


@dataclass
class Augmentation:
    """Light, clip-consistent augmentation (the same flip and jitter for every frame of a clip)."""

    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.2  # frames scaled by a factor in [1 - b, 1 + b]
    contrast: float = 0.2  # deviation from the clip mean scaled by a factor in [1 - c, 1 + c]


def _apply_augmentation(clip: dict[str, np.ndarray], augmentation: Augmentation, rng: np.random.Generator) -> None:
    """Flip and jitter one clip's arrays in place (they are the clip's own, fresh from the reader): uint8 all the
    way, no copies. The jitter's mean is taken after the flip, as it always was, so that outputs stay bit-identical
    (a float32 sum depends on the order of the pixels)."""
    if rng.random() < augmentation.flip:
        for key in ("frames", "masks", "other_masks", "crops"):
            if key in clip:
                _flip_x(clip[key])
        boxes = clip["boxes"].copy()
        boxes[..., 0], boxes[..., 2] = 1.0 - clip["boxes"][..., 2], 1.0 - clip["boxes"][..., 0]
        clip["boxes"] = boxes
    brightness = 1.0 + rng.uniform(-augmentation.brightness, augmentation.brightness)
    contrast = 1.0 + rng.uniform(-augmentation.contrast, augmentation.contrast)
    for key in ("frames", "crops"):
        # The jitter maps each of the 256 pixel values alike: a lookup table keeps the pixels uint8 (converting
        # the frames to float cost 3-4x the loader's throughput at 224 px).
        mean = clip[key].mean(dtype=np.float32)
        table = np.clip((np.arange(256, dtype=np.float32) - mean) * contrast + mean * brightness, 0, 255)
        _look_up(clip[key], table.astype(np.uint8))


def _flip_x(array: np.ndarray) -> None:
    """Reverse axis 2 (x) of a [T,H,W] or [T,H,W,C] array in place. OpenCV's flip swaps the two ends of each row,
    so it may write into its source; it is several times faster than NumPy's reversed copy."""
    t, h, w = array.shape[:3]
    if array.flags.c_contiguous and array.dtype == np.uint8 and array.ndim in (3, 4) and array.size:
        rows = array.reshape(t * h, w, *array.shape[3:])
        cv2.flip(rows, 1, dst=rows)
    else:
        array[...] = array[:, :, ::-1].copy()


def _look_up(array: np.ndarray, table: np.ndarray) -> None:
    """array = table[array] in place (uint8 array and table [256])."""
    if array.flags.c_contiguous and array.size:
        flat = array.reshape(len(array), -1)
        cv2.LUT(flat, table, dst=flat)
    else:
        array[...] = table[array]


class ClipItem(dict):
    """One clip as ShardDataset yields it: a dict of tensors and its `name`, of its own type only so that the
    DataLoader's default collation stacks a batch of them with `collate_clips`."""


def collate_clips(batch: list[ClipItem], *, collate_fn_map: dict | None = None) -> dict:
    """default_collate for ClipItems: the same dict (each tensor stacked on a new first axis, names as a list).

    In a DataLoader worker the stacked tensors are views of one block of shared memory. A worker hands every
    tensor's storage to the main process as a shared-memory segment and a file descriptor of its own, which the
    main process fetches over a connection of its own: about 0.5 ms of CPU per tensor and batch here (measured:
    the memmap floor with and without ShardDataset's small fields), ten tensors a batch. One block costs one."""
    collate_fn_map = collate_fn_map or default_collate_fn_map  # (called directly: strings need the default map)
    first = batch[0]
    stacked = [key for key, value in first.items() if isinstance(value, torch.Tensor)
               and value.layout == torch.strided and value.device.type == "cpu"]
    if get_worker_info() is None or not stacked:
        return {key: collate([item[key] for item in batch], collate_fn_map=collate_fn_map) for key in first}
    layout, size = {}, 0
    for key in stacked:
        shape = (len(batch), *first[key].shape)
        layout[key] = (size, first[key].dtype, shape)
        size += -(-math.prod(shape) * first[key].element_size() // 64) * 64  # aligned for a view of any dtype
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
    out = _PackedBatch()
    for key in first:
        if key in layout:
            out[key] = torch.stack([item[key] for item in batch], 0, out=_view(block, *layout[key]))
        else:
            out[key] = collate([item[key] for item in batch], collate_fn_map=collate_fn_map)
    out.block, out.layout = block, layout
    return out


# Only batches of ClipItems take this path: every other type collates as before.
default_collate_fn_map[ClipItem] = collate_clips


class _PackedBatch(dict):
    """A collated batch whose tensors are views of one tensor, `block`: pickled (a worker sending it to the main
    process) as that tensor and where each view lies in it, unpickled as a plain dict (`_unpack_batch`)."""

    block: torch.Tensor
    layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]]  # key -> (byte offset, dtype, shape)

    def __reduce__(self):
        return _unpack_batch, (self.block, self.layout, {key: value for key, value in self.items()
                                                         if key not in self.layout}, list(self))


def _unpack_batch(block: torch.Tensor, layout: dict, rest: dict, order: list[str]) -> dict:
    """The batch as a plain dict in its keys' order. The small tensors (flags, boxes, labels, audio) are copied out
    of the block, so that keeping one of them does not keep the batch's frames alive; the image-sized ones stay
    views of it."""
    batch = {}
    for key in order:
        if key in layout:
            view = _view(block, *layout[key])
            batch[key] = view.clone() if view.nbytes < 2**16 else view
        else:
            batch[key] = rest[key]
    return batch


def _view(block: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of `dtype` and `shape` at byte `offset` of a uint8 block."""
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return block[offset:offset + size].view(dtype).view(shape)


class ShardDataset(IterableDataset):
    """Clips of one split of a shard folder, as dicts of tensors.

    Each item (a `ClipItem`: a dict): `frames` [T,S,S,3] uint8, `masks` [T,S,S] uint8, `mask_valid` [T] bool,
    `crops` [T,c,c,3] uint8, `crop_valid` [T] bool, `boxes` [T,K,4] float32, `audio` [T,128] float32,
    `label` int64 scalar, `sounding` [C] bool, `name` str, and `other_masks` [T,S,S] uint8 / `other_label` where
    the shards have them.

    Training (`shuffle=True`): every epoch the clips are permuted (seed, epoch), cut into one contiguous block
    per rank of equal size (at most world_size - 1 clips wait for the next epoch, so ranks take equal steps),
    then per DataLoader worker; a shuffle buffer mixes each consumer's stream. Evaluation (`shuffle=False`):
    every clip exactly once, in shard order.
    """

    def __init__(self, shards_dir: str | Path, split: str = "train", shuffle: bool = True, seed: int = 0,
                 buffer_size: int = 256, augmentation: Augmentation | None = None,
                 rank: int | None = None, world_size: int | None = None):
        self.shards_dir = Path(shards_dir)
        self.manifest = read_manifest(self.shards_dir)
        self.split = split
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_size = buffer_size
        self.augmentation = augmentation
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size = rank or 0, world_size or 1
        self.epoch = 0
        self.skip_batches, self.batch_size = 0, 1  # resuming mid-epoch: batches the DataLoader already gave out
        self.index = self._index_split()
        if not self.index:
            raise InputError(self.shards_dir, f"no clips of split {split!r}")
        # At most MAX_OPEN_SHARDS open: each open file holds ~1 MiB of HDF5 metadata cache, which grew a worker's
        # memory with the size of the dataset.
        self.reader = ShardReader(self.shards_dir, READ_FIELDS, MAX_OPEN_SHARDS)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def _index_split(self) -> list[tuple[str, int]]:
        """(shard file, row) of every clip of the split, in shard order; reads only the small `split` datasets."""
        index = []
        for entry in self.manifest["shards"]:
            if not entry["splits"].get(self.split):
                continue
            # Schema checked here, in the main process: a truncated or foreign shard is a one-line InputError
            # rather than a KeyError inside a DataLoader worker.
            with open_shard(self.shards_dir, self.manifest, entry) as handle:
                try:
                    splits = handle["split"].asstr()[()]
                except HDF5_READ_ERRORS as error:
                    raise InputError(self.shards_dir / entry["file"], f"cannot read shard ({error})") from None
            index.extend((entry["file"], int(row)) for row in np.flatnonzero(splits == self.split))
        return index

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Select the epoch's order. To resume mid-epoch, `skip_batches` is the number of batches of
        `batch_size` that a DataLoader over this dataset (same num_workers) has already yielded this epoch."""
        self.epoch, self.skip_batches, self.batch_size = epoch, skip_batches, batch_size

    def _resume_plan(self, num_workers: int) -> tuple[list[int], list[int]]:
        """Where each worker stands after the first `skip_batches` batches of the epoch.

        A DataLoader over an IterableDataset takes whole batches from its workers in turn and drops a worker from
        the turn once it is exhausted. Replaying that on batch counts gives the clips each worker's stream has
        given out, and whose turn is next. Returns (stream of each DataLoader worker, clips to skip per stream):
        the streams are rotated so that the new DataLoader's first worker continues the old turn.
        """
        if not self.skip_batches:
            return list(range(num_workers)), [0] * num_workers
        batches = [math.ceil(len(self.consumer_order(w, num_workers)) / self.batch_size) for w in range(num_workers)]
        produced = [0] * num_workers
        active, turn = list(range(num_workers)), 0
        for _ in range(self.skip_batches):
            while active and produced[active[turn % len(active)]] >= batches[active[turn % len(active)]]:
                active.pop(turn % len(active))
            if not active:
                break
            produced[active[turn % len(active)]] += 1
            turn += 1
        rotated = active[turn % len(active):] + active[:turn % len(active)] if active else []
        streams = [w for w in rotated if produced[w] < batches[w]]
        streams += [w for w in range(num_workers) if w not in streams]  # exhausted: they yield nothing
        return streams, [count * self.batch_size for count in produced]

    def __len__(self) -> int:
        """Clips this rank yields per epoch (over all its DataLoader workers)."""
        n = len(self.index)
        return n // self.world_size if self.shuffle else len(range(self.rank, n, self.world_size))

    def consumer_order(self, worker: int = 0, num_workers: int = 1) -> list[tuple[str, int]]:
        """The clips one (rank, worker) reads this epoch, in order. Pure function of seed, epoch and position."""
        if not self.shuffle:
            return self.index[self.rank::self.world_size][worker::num_workers]
        rng = np.random.default_rng([self.seed, self.epoch])
        permuted = [self.index[i] for i in rng.permutation(len(self.index))]
        per_rank = len(permuted) // self.world_size
        block = permuted[self.rank * per_rank:(self.rank + 1) * per_rank]
        # Sort each worker's block by position: shards are then read front to back, chunk after chunk.
        mine = sorted(block[worker::num_workers], key=lambda item: (item[0], item[1]))
        return self._buffer_shuffle(mine, np.random.default_rng([self.seed, self.epoch, self.rank, worker]))

    def _buffer_shuffle(self, stream: list, rng: np.random.Generator) -> list:
        """A streaming shuffle buffer, simulated on indices: reads stay nearly sequential, the order is mixed."""
        buffer, out = [], []
        for item in stream:
            buffer.append(item)
            if len(buffer) >= self.buffer_size:
                out.append(buffer.pop(int(rng.integers(len(buffer)))))
        while buffer:
            out.append(buffer.pop(int(rng.integers(len(buffer)))))
        return out

    def read_clip(self, file: str, row: int) -> dict[str, np.ndarray]:
        """One clip's arrays, one chunk read per dataset (InputError naming the shard and dataset if damaged)."""
        return self.reader.read_clip(file, row)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        streams, skips = self._resume_plan(num_workers)
        stream = streams[worker]
        order = self.consumer_order(stream, num_workers)[skips[stream]:]
        for file, row in order:
            clip = self.read_clip(file, row)
            if "frame_valid" not in clip:  # shards written before issue 15: every frame is real
                clip["frame_valid"] = np.ones(len(clip["mask_valid"]), bool)
            if self.augmentation is not None:
                # Seeded per clip, so skipping (resume) or another worker count leaves each clip's draw unchanged.
                shard = int(file.removeprefix("shard-").removesuffix(".h5"))
                _apply_augmentation(clip, self.augmentation, np.random.default_rng([self.seed, self.epoch, shard, row]))
            yield ClipItem({key: value if key == "name" else torch.as_tensor(np.asarray(value))
                            for key, value in clip.items()})
