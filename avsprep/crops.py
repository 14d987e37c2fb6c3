"""The `avsprep crops` stage: turn each clip's files into arrays and write them as shards.

Per clip: frames and masks resized to `size`; per frame the crop of the sounding object's box (the union of the
sounding boxes when there are several) resized to `crop_size`; boxes normalised to [0, 1]; the audio as one
embedding per second. Shards are the unit of work: each is written whole by one process under a temporary
name and renamed when complete, so a re-run after a crash redoes only the shards that are missing.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import queue
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from avsprep import audio as audio_lib
from avsprep.annotations import Box, clip_box, parse_yolo
from avsprep.clips import ClipSource, Discovery, FrameSource
from avsprep.embedding import EMBEDDING_DIM
from avsprep.errors import InputError
from avsprep.images import decode_image
from avsprep.palette import colours_to_classes
from avsprep import shards as shard_io

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("frames", "masks", "crops", "other_masks")  # a clip's image-sized arrays (`ClipBuilder.shard_rows`)


@dataclass
class CropsConfig:
    """Everything `avsprep crops` needs besides the inputs' locations."""

    out: Path
    size: int = 224
    crop_size: int = 224
    max_boxes: int = 4
    embedder: str = "logmel-stats"
    vggish_weights: Path | None = None
    vggish_pca: Path | None = None
    clips_per_shard: int = 64
    workers: int = 1
    num_parts: int = 1
    part_index: int = 0
    on_error: str = "error"  # "error": stop at the first bad clip (exit 2); "skip": skip it and count it
    compression: str | None = None  # None or "gzip"/"lzf"; off by default: decode time costs more than disk
    # Frames without an annotation get the bounding box of their mask's non-zero pixels (one box per frame), named
    # by the clip's category: AVSBench has masks but no boxes, and this lets the crop losses run on it.
    boxes_from_masks: bool = False

    def __post_init__(self) -> None:
        # Checked here, when the command line builds it: before discovery, which may take minutes.
        if self.on_error not in ("error", "skip"):
            raise InputError(None, f"--on-error must be 'error' or 'skip', not {self.on_error!r}")
        if not 0 <= self.part_index < self.num_parts:
            raise InputError(None, f"--part-index must lie in 0..{self.num_parts - 1}")


@dataclass
class ClipRecord:
    """One clip as arrays (T frames, S = size, c = crop_size, K = max_boxes, C = classes)."""

    name: str
    split: str
    frames: np.ndarray  # [T,S,S,3] uint8 RGB
    masks: np.ndarray  # [T,S,S] uint8, 0/1
    mask_valid: np.ndarray  # [T] bool
    frame_valid: np.ndarray  # [T] bool: false for the zero frames that pad a short clip (AVSS)
    crops: np.ndarray  # [T,c,c,3] uint8 RGB
    crop_valid: np.ndarray  # [T] bool
    boxes: np.ndarray  # [T,K,4] float32 normalised xyxy, NaN padded
    audio: np.ndarray  # [T,E] float32, E = EMBEDDING_DIM
    label: int  # primary class, -1: none
    sounding: np.ndarray  # [C] bool
    other_masks: np.ndarray | None  # [T,S,S] uint8, 0/1
    other_label: int
    report: Counter = field(default_factory=Counter)
    subset: str = ""  # AVSS: the clip's version folder (written only where the shards have `subset`)


def read_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 [H,W,3] (grayscale, 16-bit and RGBA are converted). InputError if unreadable."""
    # IMREAD_UNCHANGED and our own conversion: IMREAD_COLOR costs a quarter more per decode.
    image = decode_image(path, cv2.IMREAD_UNCHANGED)  # pixel cap and truncated-JPEG check first
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(path, f"unsupported image sample type {image.dtype}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    conversion = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}.get(channels)
    if conversion is None:
        raise InputError(path, f"unsupported image with {channels} channels")
    return cv2.cvtColor(image, conversion)


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as 0/1 uint8 [H,W]: any non-zero pixel is object (covers 0/255 and palette masks)."""
    mask = decode_image(path, cv2.IMREAD_GRAYSCALE, "mask image")
    return (mask > 0).astype(np.uint8)


def read_colour_mask(path: Path, num_classes: int) -> tuple[np.ndarray, int]:
    """An AVSS colour mask PNG as class indices uint8 [H,W] by the palette (docs/design.md §14) and the number of
    off-palette pixels (read as background). InputError for a mask that is not RGB."""
    image = decode_image(path, cv2.IMREAD_UNCHANGED, "colour mask")
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        shape = "grayscale" if image.ndim == 2 else f"{image.shape[2]}-channel {image.dtype}"
        raise InputError(path, f"colour mask is {shape}, expected 8-bit RGB (the AVSS palette)")
    return colours_to_classes(cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB), num_classes)


def class_boxes(classes: np.ndarray, width: int, height: int, names: list[str]) -> list[Box]:
    """One box per class present in a class-index mask [h,w] (index c is names[c - 1]), in frame pixels."""
    return [box for c in np.unique(classes) if c > 0
            for box in mask_boxes((classes == c).astype(np.uint8), width, height, names[c - 1])]


def resize(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize to size x size: area interpolation for pictures, nearest for masks (which must stay 0/1)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def resize_into(image: np.ndarray, out: np.ndarray, nearest: bool = False) -> None:
    """`resize(image, len(out), nearest)` written into `out` [size, size, ...] (a row of a shard's array)."""
    if image.shape[:2] == out.shape[:2]:
        out[...] = image
        return
    resized = cv2.resize(image, out.shape[1::-1], dst=out,
                         interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
    if resized is not out:  # OpenCV allocates anew where `out` does not suit it
        out[...] = resized


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """`image[ymin:ymax, xmin:xmax]` resized to size x size. box = (xmin, ymin, xmax, ymax) in pixel edges."""
    xmin, ymin, xmax, ymax = box
    return resize(np.ascontiguousarray(image[ymin:ymax, xmin:xmax]), size)


def union_box(boxes: list[Box]) -> tuple[int, int, int, int]:
    return (min(b.xmin for b in boxes), min(b.ymin for b in boxes), max(b.xmax for b in boxes), max(b.ymax for b in boxes))


def mask_boxes(mask: np.ndarray, width: int, height: int, name: str) -> list[Box]:
    """The bounding box of a 0/1 mask [h,w]'s non-zero pixels, in pixel edges of a width x height frame; [] for an
    empty mask. One box for all objects of the frame: the crop is their union either way (as for several annotated
    boxes). A mask of another size than its frame is scaled, the box rounded outwards."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    mask_height, mask_width = mask.shape
    xmin, ymin = int(columns[0]) * width // mask_width, int(rows[0]) * height // mask_height
    xmax = -(-(int(columns[-1]) + 1) * width // mask_width)  # ceiling division
    ymax = -(-(int(rows[-1]) + 1) * height // mask_height)
    return [Box(name, xmin, ymin, xmax, ymax)]


class ClipBuilder:
    """Builds ClipRecords; one per process, because it holds the audio embedder."""

    def __init__(self, config: CropsConfig, classes: list[str], frames_per_clip: int, has_other_masks: bool,
                 mask_classes: int = 1, embedder=None):
        self.config = config
        self.mask_classes = mask_classes
        self.classes = classes
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.T = frames_per_clip
        self.has_other_masks = has_other_masks
        if embedder is None:
            embedder = audio_lib.make_embedder(config.embedder, config.vggish_weights, config.vggish_pca)
        self.embedder = embedder
        self._rows: dict[str, np.ndarray] | None = None  # `shard_rows`

    def build(self, clip: ClipSource, out: dict[str, np.ndarray] | None = None) -> ClipRecord:
        """Read, crop, resize and embed one clip. Raises InputError naming the offending file.

        `out`: where to write the image-sized arrays (`frames` [T,S,S,3], `masks`, `crops`, `other_masks`), e.g.
        row i of each of `shard_rows`; the record then holds these views. Otherwise they are new arrays."""
        report: Counter = Counter()
        box_names: Counter = Counter()  # classes of the clip's boxes, for its label
        arrays = self._empty_arrays(out)
        decoded: dict[Path, np.ndarray] = {}  # padded clips repeat a frame: decode it once
        for t, frame in enumerate(clip.frames):
            if frame.image not in decoded:
                decoded[frame.image] = read_image(frame.image)
            self._add_frame(arrays, t, frame, decoded[frame.image], clip.category, report, box_names)
        report["frames_padded"] += clip.padded_frames
        arrays["frame_valid"][:len(clip.frames)] = True
        for key in IMAGE_FIELDS:  # frames after a short clip are zero (AVSS padding)
            if arrays[key] is not None:
                arrays[key][len(clip.frames):] = 0
        report.update(clip.report)
        audio = self._embed_audio(clip, report)
        label, sounding = self._labels(clip, box_names, arrays["masks"], arrays["mask_valid"])
        return ClipRecord(name=clip.name, split=clip.split, **arrays, audio=audio, label=label, sounding=sounding,
                          other_label=self.class_index.get(clip.other_category or "", -1), report=report,
                          subset=clip.subset)

    def _empty_arrays(self, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray | None]:
        """The per-frame arrays of one clip, as a clip without masks or boxes has them; `out`'s image-sized rows as
        they are (zeroing 2 MB a 224 px clip cost 1 ms that the frames' own writes make needless)."""
        S, c, K, T = self.config.size, self.config.crop_size, self.config.max_boxes, self.T
        if out is None:
            out = {"frames": np.zeros((T, S, S, 3), np.uint8), "masks": np.zeros((T, S, S), np.uint8),
                   "crops": np.zeros((T, c, c, 3), np.uint8),
                   "other_masks": np.zeros((T, S, S), np.uint8) if self.has_other_masks else None}
        else:  # not zeroed here: `_add_frame` writes or zeroes each frame's rows, `build` the padding's
            out = {key: out.get(key) for key in IMAGE_FIELDS}
        return {**out, "mask_valid": np.zeros(T, bool), "frame_valid": np.zeros(T, bool),
                "crop_valid": np.zeros(T, bool), "boxes": np.full((T, K, 4), np.nan, np.float32)}

    def shard_rows(self, clips: int) -> dict[str, np.ndarray]:
        """[clips, ...] arrays of the image-sized fields of a shard, whose rows `build` can write (`out`): the same
        memory for every shard this builder writes. Fresh arrays per clip cost a page fault per 4 KiB, and stacking
        them into the shard's arrays a copy of 2.3 MB per 224 px clip."""
        S, c, T = self.config.size, self.config.crop_size, self.T
        if self._rows is None or len(self._rows["frames"]) < clips:
            shapes = {"frames": (T, S, S, 3), "masks": (T, S, S), "crops": (T, c, c, 3), "other_masks": (T, S, S)}
            self._rows = {key: np.empty((clips, *shape), np.uint8) for key, shape in shapes.items()
                          if key != "other_masks" or self.has_other_masks}
        return {key: values[:clips] for key, values in self._rows.items()}

    def _add_frame(self, arrays: dict, t: int, frame: FrameSource, image: np.ndarray, category: str | None,
                   report: Counter, box_names: Counter) -> None:
        """Frame t of a clip into `arrays`: the resized image, its mask, the crop of its boxes and the boxes."""
        S, c, K = self.config.size, self.config.crop_size, self.config.max_boxes
        height, width = image.shape[:2]
        resize_into(image, arrays["frames"][t])
        mask = self._read_mask(frame.mask, report) if frame.mask is not None else None
        frame_boxes = self._frame_boxes(frame, width, height, report)
        if not frame_boxes and mask is not None and (self.config.boxes_from_masks or self.mask_classes > 1):
            frame_boxes = (class_boxes(mask, width, height, self.classes) if self.mask_classes > 1
                           else mask_boxes(mask, width, height, category or ""))
            report["mask_boxes"] += len(frame_boxes)
        # Mask boxes of a clip without a category (AVSBench MS3) have no class: they give crops, not labels.
        box_names.update(box.name for box in frame_boxes if box.name in self.class_index)
        if frame_boxes:
            arrays["crops"][t] = crop_and_resize(image, union_box(frame_boxes), c)
            arrays["crop_valid"][t] = True
            if len(frame_boxes) > K:
                report["boxes_dropped"] += len(frame_boxes) - K
            for k, box in enumerate(frame_boxes[:K]):
                arrays["boxes"][t, k] = (box.xmin / width, box.ymin / height, box.xmax / width, box.ymax / height)
        else:
            arrays["crops"][t] = 0
        if mask is not None:
            resize_into(mask, arrays["masks"][t], nearest=True)
            arrays["mask_valid"][t] = True
        else:
            arrays["masks"][t] = 0
        if arrays["other_masks"] is not None:
            if frame.other_mask is not None:
                resize_into(read_mask(frame.other_mask), arrays["other_masks"][t], nearest=True)
            else:
                arrays["other_masks"][t] = 0

    def _read_mask(self, path: Path, report: Counter) -> np.ndarray:
        """0/1 [H,W] for binary shards; class indices [H,W] for semantic ones (off-palette pixels counted)."""
        if self.mask_classes == 1:
            return read_mask(path)
        classes, off_palette = read_colour_mask(path, self.mask_classes)
        report["mask_off_palette_pixels"] += off_palette
        return classes

    def _embed_audio(self, clip: ClipSource, report: Counter) -> np.ndarray:
        """[T,E] float32: one embedding per second of the clip's audio; zeros for a clip without audio, and zeros
        for the seconds after a short clip's last frame (AVSS pads so: zero examples, not repeated ones)."""
        audio = np.zeros((self.T, EMBEDDING_DIM), np.float32)
        if clip.audio is None:
            return audio
        seconds = min(len(clip.frames), self.T)
        examples, padded = audio_lib.clip_examples(clip.audio, seconds)
        report["audio_padded_seconds"] += padded
        report["audio_padded_clips"] += bool(padded)
        audio[:seconds] = self.embedder.embed(examples)
        return audio

    def _labels(self, clip: ClipSource, box_names: Counter, masks: np.ndarray,
                mask_valid: np.ndarray) -> tuple[int, np.ndarray]:
        """(primary class, -1: none; sounding [C] bool) from the clip's metadata and its boxes' classes."""
        sounding = np.zeros(len(self.classes), bool)
        for name in (*box_names, *clip.sounding_categories, *([clip.category] if clip.category else [])):
            if name in self.class_index:
                sounding[self.class_index[name]] = True
        if self.mask_classes > 1:  # semantic masks: every class seen in a mask (index c is class c - 1)
            present = np.unique(masks[mask_valid]) if mask_valid.any() else np.zeros(0, np.uint8)
            sounding[present[present > 0].astype(np.intp) - 1] = True
        if clip.category in self.class_index:
            return self.class_index[clip.category], sounding
        if box_names:
            # The most frequent box class; ties go to the first name in sorted order, so runs agree.
            return self.class_index[min(box_names, key=lambda n: (-box_names[n], n))], sounding
        return -1, sounding

    def _frame_boxes(self, frame, width: int, height: int, report: Counter) -> list[Box]:
        annotation = frame.annotation
        if annotation is None and frame.yolo_file is not None:
            annotation = parse_yolo(frame.yolo_file, self.classes, frame.image.name, width, height)
        if annotation is None:
            return []
        if annotation.width is not None and (annotation.width, annotation.height) != (width, height):
            raise InputError(annotation.source, f"<size> says {annotation.width}x{annotation.height} "
                                                f"but {frame.image.name} is {width}x{height}")
        clipped_boxes = []
        for box in annotation.boxes:
            clipped, was_clipped = clip_box(box, width, height, annotation.source)
            report["boxes_clipped"] += was_clipped
            clipped_boxes.append(clipped)
        return clipped_boxes


def negative_audio_embeddings(embedder, frames_per_clip: int, noise_clips: int = 16,
                               seed: int = 0) -> dict[str, np.ndarray]:
    """Embeddings of audio that should segment nothing, made with the dataset's own embedder, so that training
    and evaluation with negative audio (docs/design.md §7, §9) never need the audio network:
    `silence` [1,T,128] (digital silence) and `noise` [noise_clips,T,128] (white noise, RMS 0.01..0.3)."""
    seconds = frames_per_clip * audio_lib.EXAMPLE_SECONDS + 0.1
    samples = int(seconds * audio_lib.SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    waves = [np.zeros(samples, np.float32)]
    waves += [(rng.standard_normal(samples) * rng.uniform(0.01, 0.3)).astype(np.float32) for _ in range(noise_clips)]
    embeddings = np.stack([embedder.embed(audio_lib.waveform_to_examples(wave)[:frames_per_clip]) for wave in waves])
    return {"silence": embeddings[:1], "noise": embeddings[1:]}


# ----------------------------------------------------------------------------------------------------------------
# Running the stage: plan shards, build the missing ones in worker processes, write the manifest.

_worker: dict = {}


def _init_worker(config: CropsConfig, progress) -> None:
    """Set up a process: one thread (the processes are the parallelism) and its own embedder. Its ClipBuilder comes
    with its first shard (`_builder`): worker processes start while discovery is still finding the classes."""
    # One thread per process for OpenCV and BLAS: the processes are the parallelism, and BLAS threads spinning
    # on the small log-mel products slowed a whole single-process run down 2x in profiles.
    cv2.setNumThreads(1)
    threadpool_limits(1)
    _worker.pop("builder_args", None)  # a builder of an earlier run in this process is not this run's
    _worker["config"] = config
    _worker["embedder"] = audio_lib.make_embedder(config.embedder, config.vggish_weights, config.vggish_pca)
    # After the embedder: VGGish is what imports torch (never imported for nothing)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    _worker["progress"] = progress.put if hasattr(progress, "put") else progress  # a Queue in worker processes


def _init_pool_worker(config: CropsConfig, progress) -> None:
    """`_init_worker` for a process of our own pool, whose memory allocator may be tuned (`keep_freed_memory`)."""
    keep_freed_memory()
    _init_worker(config, progress)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Have glibc keep freed blocks below `mmap_threshold` bytes in the process's heap, and give the heap back to
    the kernel only above `trim_threshold` free bytes at its top. False where malloc is not glibc's.

    By default glibc maps each block above 128 KiB (later: above the largest freed one) anew and unmaps it when
    freed, so every clip's decoded frames, FFT arrays and HDF5 buffers cost a page fault per 4 KiB again: 0.9
    million faults and a third more CPU time for `avsprep crops` of 1000 clips at 224 px (43 thousand with this;
    the audio of a clip 2.7 ms instead of 6). Process-wide, so only for processes of our own."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def _builder(builder_args: tuple) -> ClipBuilder:
    """This process's ClipBuilder for (classes, frames_per_clip, has_other_masks, mask_classes)."""
    if _worker.get("builder_args") != builder_args:
        _worker["builder"] = ClipBuilder(_worker["config"], *builder_args, embedder=_worker["embedder"])
        _worker["builder_args"] = builder_args
    return _worker["builder"]


def _write_shard(task: tuple[shard_io.ShardPlan, tuple]) -> shard_io.ShardInfo:
    """Build and write one planned shard; task = (plan, the ClipBuilder's arguments but the config)."""
    task, builder_args = task
    builder = _builder(builder_args)
    rows = builder.shard_rows(len(task.clips))  # each clip is built into the next row; a skipped one's is reused
    records, skipped = [], []
    for clip in task.clips:
        try:
            records.append(builder.build(clip, {key: values[len(records)] for key, values in rows.items()}))
        except InputError as error:
            if builder.config.on_error != "skip":
                raise
            skipped.append({"clip": clip.name, "error": str(error)})
        _worker["progress"](1)
    stacked = {key: values[:len(records)] for key, values in rows.items()}
    return shard_io.write_shard(task, records, skipped, builder.config.compression, stacked)


@dataclass
class CropsResult:
    manifest: dict
    written: int  # shards written in this run
    reused: int  # complete shards found from an earlier run
    skipped: list[dict]  # clips skipped for bad input: {"clip", "error"}


def run_crops(found: Discovery | Callable[[], Discovery], config: CropsConfig,
              progress: Callable[[int, int], None] | None = None) -> CropsResult:
    """Build the shards of this part (`num_parts`/`part_index`) of what a reader found (`avsprep.clips.discover`,
    `avsprep.avsbench.discover_avsbench`) into `config.out`, and write its manifest.

    `found` may also be the function that finds it: then the worker processes start first, and import and make
    their embedders while it runs (discovery is serial and took 1.6 s of 11 for 1000 clips).
    With on_error="error" the first bad clip raises InputError (shards completed so far stay, and a re-run
    resumes); with "skip" bad clips are left out and listed in the result and the manifest.
    `progress(newly_done, total)` is called as clips complete (counts of clips).
    """
    with _worker_pool(config, config.workers if callable(found) else 0) as pool:
        return _run_crops(found() if callable(found) else found, config, progress, pool)


def _run_crops(found: Discovery, config: CropsConfig, progress: Callable[[int, int], None] | None,
               pool: tuple | None) -> CropsResult:
    """`run_crops` on what was found, in `pool` (pool, progress queue) if started, else in its own or this process."""
    if found.problems and config.on_error != "skip":
        raise next(iter(found.problems.values()))
    discovery_skips = [{"clip": name, "error": str(error)} for name, error in found.problems.items()]
    if not found.clips:
        raise InputError(found.source, "no usable clips found")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = shard_io.ShardSettings(
        frames_per_clip=found.frames_per_clip, size=config.size, crop_size=config.crop_size,
        max_boxes=config.max_boxes, classes=found.classes, embedder=config.embedder,
        has_other_masks=found.has_other_masks, has_audio=found.has_audio,
        box_source="masks" if config.boxes_from_masks or found.mask_classes > 1 else "annotations",
        mask_classes=found.mask_classes, has_subset=any(clip.subset for clip in found.clips),
    )
    plans = shard_io.plan_shards(found.clips, out, settings, config.clips_per_shard,
                                 config.num_parts, config.part_index)
    shard_io.remove_stale_temporaries(out)
    done = {plan.index: info for plan in plans if (info := shard_io.complete_shard(plan)) is not None}
    todo = [plan for plan in plans if plan.index not in done]
    total = sum(plan.clips_planned for plan in plans)
    report_progress = (lambda n: progress(n, total)) if progress else (lambda n: None)
    report_progress(sum(plan.clips_planned for plan in plans if plan.index in done))
    log.info("%d shards to write, %d already complete", len(todo), len(done))
    builder_args = (found.classes, found.frames_per_clip, found.has_other_masks, found.mask_classes)
    with _worker_pool(config, 0 if pool else config.workers, len(todo)) as started:
        done.update((info.index, info) for info in _build_shards(
            [(plan, builder_args) for plan in todo], config, report_progress, pool or started))

    infos = [done[plan.index] for plan in plans]
    negatives = None
    if settings.has_audio:
        embedder = audio_lib.make_embedder(config.embedder, config.vggish_weights, config.vggish_pca)
        negatives = shard_io.write_negatives(out, negative_audio_embeddings(embedder, found.frames_per_clip))
    manifest = shard_io.write_manifest(out, settings, infos, config.clips_per_shard, config.num_parts,
                                       config.part_index, discovery_skips, negatives)
    skipped = discovery_skips + [s for info in infos for s in info.skipped]
    return CropsResult(manifest=manifest, written=len(todo), reused=len(plans) - len(todo), skipped=skipped)


@contextmanager
def _worker_pool(config: CropsConfig, workers: int, shards: int | None = None) -> Iterator[tuple | None]:
    """(pool, progress queue) of `workers` processes (at most `shards`), or None for fewer than two."""
    workers = min(workers, shards if shards is not None else workers)
    if workers <= 1:
        yield None
        return
    # spawn, not fork: a forked child of a process whose OpenCV (or torch) thread pool has run can hang, and
    # library callers may well have used OpenCV before. A fresh worker imports in about 0.3 s (no torch).
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    with context.Pool(workers, initializer=_init_pool_worker, initargs=(config, progress_queue)) as pool:
        yield pool, progress_queue


def _build_shards(tasks: list[tuple[shard_io.ShardPlan, tuple]], config: CropsConfig,
                  report_progress: Callable[[int], None], pool: tuple | None) -> list[shard_io.ShardInfo]:
    """Write the planned shards (`_write_shard` tasks), in this process or in the pool; `report_progress(n)` per n
    clips."""
    if pool is None:
        _init_worker(config, report_progress)
        return [_write_shard(task) for task in tasks]
    pool, progress_queue = pool
    pending = pool.map_async(_write_shard, tasks, chunksize=1)
    while not pending.ready():
        try:
            report_progress(progress_queue.get(timeout=0.2))
        except queue.Empty:
            pass
    infos = pending.get()  # re-raises a worker's InputError here
    while not progress_queue.empty():
        report_progress(progress_queue.get())
    return infos
