#!/usr/bin/env python
"""Clips per second of `avstrain.data.ShardDataset` against the reference's per-file loading and a memmap floor.

Every loader runs through the same `torch.utils.data.DataLoader` settings (batch 4, 2 workers, training order) over
the same synthetic clips (`avsprep synth` + `avsprep crops`, generated once into data/bench-loader/ and reused):

- **per-file (reference)**: per clip what the AVSBench S4 loader plus the seed's crop code do: open the T PNG frames
  with PIL and normalise them (torchvision ToTensor + Normalize, as the reference's `img_transform`); open them again,
  crop the sounding object's box and resize it with PIL (then the same transform); open the mask PNGs (mode '1' +
  ToTensor, as the reference); unpickle the clip's [T,1,96,64] log-mel tensor (written at setup from the clip's WAV,
  the way the reference ships `audio_log_mel/*.pkl`). Boxes are handed to it in memory (no XML parsing per step).
  It yields normalised float32 tensors because that is what the reference loader yields.
- **ShardDataset**: what `avstrain train` iterates, without augmentation (and, as a second row, with the trainer's
  default augmentation). It yields uint8 frames/crops/masks: normalisation happens on the device inside the model,
  so the bytes that cross from workers to the main process are 4x fewer. Both are what each pipeline feeds its
  training step; that difference is part of the design being measured.
- **memmap floor**: a map-style Dataset over NumPy memmaps (`np.load(mmap_mode='r')`) of the same uint8 frames,
  crops, masks and float32 audio: the least any loader that hands over these arrays can do. A second memmap row
  (not a target) also carries the small fields ShardDataset yields (valid flags, boxes, label, sounding, name): the
  DataLoader pays per tensor of a batch (a shared-memory segment and a file descriptor each), whatever its size.

Throughput is timed from the first batch to the last (worker start-up excluded, the same for all), best of
`--repeats` epochs, loaders interleaved so that other load on the machine hits them alike. Peak RSS: one process per
dataset size iterates one ShardDataset epoch; the figure is the main process's VmHWM plus each worker's VmHWM (read by
the worker when its stream ends), for `--rss-clips` and 10x as many clips. Last, each loader's per-clip work is
profiled in one process (making items, collating them) beside its cost through the DataLoader, which shows how much
of a clip's time is the hand-over from worker to main process that every loader pays.

ShardDataset reads schema v2 shards (fletcher32 on every chunk); a row over a v1 copy of the same shards (no
checksums) measures what the checksums cost to read.

Targets: ShardDataset (v2) >= 0.85x the memmap floor, with augmentation >= 0.6x; peak RSS at 10x the clips within
20%. The ratio to the per-file loader stays in the table (the floor itself is only ~8x it here). Exits with status 1
when a target is missed.

    .venv/bin/python tools/bench_loader.py [--clips 400] [--size 224] [--rss-clips 200] [--rss-size 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avsprep.audio import clip_examples  # noqa: E402
from avsprep.shards import rewrite_as_v1  # noqa: E402
from avstrain.data import Augmentation, ShardDataset  # noqa: E402

FLOOR_TARGET = 0.85
AUGMENTED_FLOOR_TARGET = 0.6
RSS_TARGET = 0.20
BATCH, WORKERS, T = 4, 2, 5
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FLOOR_KEYS = ("frames", "crops", "masks", "audio")
# Everything else ShardDataset yields per clip (the shards hold no other masks here): the second memmap row.
ALL_KEYS = FLOOR_KEYS + ("mask_valid", "crop_valid", "boxes", "label", "sounding", "name")


def _run(command: list) -> None:
    subprocess.run([str(c) for c in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def prepare(root: Path, clips: int, size: int, per_file: bool) -> Path:
    """Synthetic clips -> shards (every clip in split 'train'); with `per_file`, also the reference's log-mel pickles,
    the boxes in pixels and the memmap copies of the shard arrays. Cached: a complete folder is reused."""
    data = root / f"{clips}x{size}"
    ready = data / ("ready-all.json" if per_file else "ready.json")
    if ready.is_file() and (not per_file or (data / "shards-v1" / "manifest.json").is_file()):
        return data
    synth, shards = data / "synth", data / "shards"
    if not (synth / "meta.csv").is_file():
        print(f"generating {clips} synthetic clips at {size} px into {synth} ...", flush=True)
        _run([sys.executable, "-m", "avsprep.cli", "synth", "--out", synth, "--clips", clips, "--size", size,
              "--workers", WORKERS])
    if not (shards / "manifest.json").is_file():
        # No --meta (so every clip is in 'train', the split the trainer streams) and no --other-masks (the
        # reference does not read them): the shards hold what both loaders read.
        _run([sys.executable, "-m", "avsprep.cli", "crops", "--voc", synth / "labels", "--images",
              synth / "visual_frames", "--masks", synth / "gt_masks", "--audio", synth / "audio_wav", "--out", shards,
              "--size", size, "--crop-size", size, "--workers", WORKERS])
    if per_file and not (data / "per_file.json").is_file():
        _prepare_per_file(data, synth, shards, size)
    if per_file and not (data / "memmap" / "name.npy").is_file():
        _prepare_memmap(data, shards)
    if per_file and not (data / "shards-v1" / "manifest.json").is_file():
        shutil.rmtree(data / "shards-v1", ignore_errors=True)
        shutil.copytree(shards, data / "shards-v1.partial")
        rewrite_as_v1(data / "shards-v1.partial")
        os.replace(data / "shards-v1.partial", data / "shards-v1")
    ready.write_text(json.dumps({"clips": clips, "size": size}))
    return data


def _prepare_per_file(data: Path, synth: Path, shards: Path, size: int) -> None:
    frames = {p.stem: p for p in (synth / "visual_frames").rglob("*.png")}
    masks = {p.stem: p for p in (synth / "gt_masks").rglob("*.png")}
    wavs = {p.stem: p for p in (synth / "audio_wav").rglob("*.wav")}
    (data / "logmel").mkdir(exist_ok=True)
    records = []
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["shards"]:
        with h5py.File(shards / entry["file"], "r") as handle:
            names = handle["name"].asstr()[()]
            boxes, valid = handle["boxes"][()], handle["crop_valid"][()]
        for name, clip_boxes, clip_valid in zip(names, boxes, valid):
            pickle_path = data / "logmel" / f"{name}.pkl"
            examples, _ = clip_examples(wavs[name], T)  # [T, 96, 64], the reference's audio_log_mel content
            with pickle_path.open("wb") as handle:
                pickle.dump(torch.from_numpy(examples).unsqueeze(1), handle)  # [T, 1, 96, 64], as the reference
            pixel_boxes = []
            for box, ok in zip(clip_boxes, clip_valid):
                # The crop the shard holds: the sounding box (first slot); the whole frame where there is none.
                x0, y0, x1, y1 = (np.round(box[0] * size).astype(int).tolist() if ok else [0, 0, size, size])
                pixel_boxes.append((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
            records.append({"frames": [str(frames[f"{name}_{k}"]) for k in range(1, T + 1)],
                            "masks": [str(masks[f"{name}_{k}"]) for k in range(1, T + 1)],
                            "logmel": str(pickle_path), "boxes": pixel_boxes})
    (data / "per_file.json").write_text(json.dumps(records))


def _prepare_memmap(data: Path, shards: Path) -> None:
    """The shards' arrays as .npy files, clips in shard order (names as fixed-width unicode)."""
    arrays = {key: [] for key in ALL_KEYS}
    for entry in json.loads((shards / "manifest.json").read_text())["shards"]:
        with h5py.File(shards / entry["file"], "r") as handle:
            for key in ALL_KEYS:
                arrays[key].append(handle[key].asstr()[()].astype(str) if key == "name" else handle[key][()])
    (data / "memmap").mkdir(exist_ok=True)
    for key, parts in arrays.items():
        np.save(data / "memmap" / f"{key}.npy", np.concatenate(parts))


class PerFileClips(Dataset):
    """The reference's per-clip work (AVSBench S4Dataset.__getitem__ + the seed's PIL crops), one clip per index."""

    def __init__(self, records: list[dict], crop_size: int, with_crops: bool = True):
        self.records = records
        self.crop_size = crop_size
        self.with_crops = with_crops  # False: the AVSBench loader alone (no seed crops), as tools/bench_train.py
        self.img_transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        self.mask_transform = transforms.Compose([transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        record = self.records[index]
        with open(record["logmel"], "rb") as handle:
            audio_log_mel = pickle.load(handle).detach()  # [T, 1, 96, 64]
        imgs = [self.img_transform(Image.open(path).convert("RGB")) for path in record["frames"]]
        crops = []
        for path, box in zip(record["frames"], record["boxes"] if self.with_crops else []):
            crop = Image.open(path).convert("RGB").crop(box).resize((self.crop_size, self.crop_size),
                                                                   Image.BILINEAR)
            crops.append(self.img_transform(crop))
        masks = [self.mask_transform(Image.open(path).convert("1")) for path in record["masks"]]
        return torch.stack(imgs), audio_log_mel, torch.stack(masks), torch.stack(crops) if crops else torch.empty(0)


class MemmapClips(Dataset):
    """The floor: one clip = one slice of each memmapped array, copied out as a tensor (a str for `name`)."""

    def __init__(self, folder: Path, keys: tuple[str, ...] = FLOOR_KEYS):
        self.arrays = {key: np.load(folder / f"{key}.npy", mmap_mode="r") for key in keys}

    def __len__(self) -> int:
        return len(self.arrays["audio"])

    def __getitem__(self, index: int) -> dict:
        return {key: str(array[index]) if key == "name" else torch.from_numpy(np.array(array[index]))
                for key, array in self.arrays.items()}


def _loader(dataset) -> DataLoader:
    shuffle = None if isinstance(dataset, ShardDataset) else True  # ShardDataset shuffles itself (streamed)
    return DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, shuffle=shuffle)


def _batch_clips(batch) -> int:
    return len(batch["audio"]) if isinstance(batch, dict) else len(batch[1])


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the DataLoader's workers, once an epoch ends)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def clips_per_second(dataset) -> tuple[float, float]:
    """One epoch: (clips after the first batch over the time from the first batch to the last, CPU milliseconds
    per clip of the whole epoch, workers included: on a shared machine the steadier figure)."""
    start, clips, cpu = None, 0, _cpu_seconds()
    for batch in _loader(dataset):
        if start is None:
            start = time.perf_counter()
        else:
            clips += _batch_clips(batch)
    rate = clips / (time.perf_counter() - start)
    return rate, (_cpu_seconds() - cpu) * 1e3 / len(dataset)


def _vm_kib(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class PeakRecordingShardDataset(ShardDataset):
    """ShardDataset whose workers write their peak RSS (VmHWM) to `report_dir` when their stream ends."""

    report_dir: str = ""

    def __iter__(self):
        yield from super().__iter__()
        Path(self.report_dir, str(os.getpid())).write_text(str(_vm_kib("VmHWM")))


def rss_worker(shards: Path) -> dict:
    """Peak RSS (KiB) of one ShardDataset epoch through the benchmark's DataLoader: main process and workers."""
    with tempfile.TemporaryDirectory() as report_dir:
        dataset = PeakRecordingShardDataset(shards, "train", shuffle=True, seed=0)
        dataset.report_dir = report_dir
        clips = sum(_batch_clips(batch) for batch in _loader(dataset))
        workers = [int(p.read_text()) for p in Path(report_dir).iterdir()]
    return {"clips": clips, "main_kib": _vm_kib("VmHWM"), "workers_kib": workers}


def measure_rss(shards: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--rss-worker", str(shards)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"RSS worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile(datasets: dict, clips: int = 48) -> dict[str, tuple[float, float]]:
    """Per-clip milliseconds of making the items and of collating them into batches, in this process (no workers):
    the work a worker does, without the hand-over to the main process. Returns {loader: (items ms, collate ms)}."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    for name, (dataset, _) in datasets.items():
        stream = iter(dataset) if isinstance(dataset, ShardDataset) else (dataset[i] for i in range(len(dataset)))
        next(stream)  # opens files, primes caches
        start = time.perf_counter()
        items = [next(stream) for _ in range(clips)]
        made = time.perf_counter()
        for i in range(0, clips, BATCH):
            default_collate(items[i:i + BATCH])
        out[name] = ((made - start) * 1e3 / clips, (time.perf_counter() - made) * 1e3 / clips)
    torch.set_num_threads(threads)
    return out


@dataclass
class Row:
    name: str
    yields: str
    best: float = 0.0
    cpu_ms: float = float("inf")  # least CPU time per clip of the epochs


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=400, help="clips of the throughput data set")
    parser.add_argument("--size", type=int, default=224, help="frame and crop side of the throughput data set")
    parser.add_argument("--rss-clips", type=int, default=200, help="smaller data set of the RSS check (and 10x it)")
    parser.add_argument("--rss-size", type=int, default=32, help="frame side of the RSS data sets (setup speed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("data/bench-loader"))
    parser.add_argument("--rss-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker)))
        return 0

    data = prepare(args.data, args.clips, args.size, per_file=True)
    rss_data = [prepare(args.data, n, args.rss_size, per_file=False) for n in (args.rss_clips, 10 * args.rss_clips)]
    records = json.loads((data / "per_file.json").read_text())
    datasets = {
        "per-file (reference)": (PerFileClips(records, args.size), "float32, normalised"),
        "ShardDataset": (ShardDataset(data / "shards", "train", shuffle=True, seed=0), "uint8"),
        "ShardDataset, v1 shards": (ShardDataset(data / "shards-v1", "train", shuffle=True, seed=0), "uint8"),
        "ShardDataset + augmentation": (ShardDataset(data / "shards", "train", shuffle=True, seed=0,
                                                     augmentation=Augmentation()), "uint8"),
        "memmap floor": (MemmapClips(data / "memmap"), "uint8"),
        # Not a target: the floor carrying every field ShardDataset yields. Each tensor of a batch costs the
        # DataLoader a shared-memory segment and a file descriptor, whatever its size.
        "memmap, ShardDataset's fields": (MemmapClips(data / "memmap", ALL_KEYS), "uint8"),
    }
    rows = {name: Row(name, yields) for name, (_, yields) in datasets.items()}
    for name, (dataset, _) in datasets.items():  # warm the page cache and the imports of every loader once
        clips_per_second(dataset)
    for _ in range(args.repeats):
        for name, (dataset, _) in datasets.items():
            rate, cpu_ms = clips_per_second(dataset)
            rows[name].best, rows[name].cpu_ms = max(rows[name].best, rate), min(rows[name].cpu_ms, cpu_ms)
    rss = [measure_rss(folder / "shards") for folder in rss_data]

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores (shared with other jobs: compare ratios, not absolutes); "
          f"torch {torch.__version__}")
    print(f"{args.clips} clips of T={T} at {args.size} px (crops {args.size} px); DataLoader batch {BATCH}, "
          f"{WORKERS} workers; best of {args.repeats} epochs, timed from the first batch to the last")
    print(f"{'loader':30s} {'yields':22s} {'clips/s':>9s} {'vs per-file':>12s} {'vs floor':>9s} "
          f"{'CPU ms/clip':>12s} {'CPU vs floor':>13s}")
    per_file, floor = rows["per-file (reference)"].best, rows["memmap floor"].best
    for row in rows.values():
        print(f"{row.name:30s} {row.yields:22s} {row.best:9.1f} {row.best / per_file:11.1f}x "
              f"{row.best / floor:8.2f}x {row.cpu_ms:12.2f} {rows['memmap floor'].cpu_ms / row.cpu_ms:12.2f}x")
    of_floor, augmented = rows["ShardDataset"].best / floor, rows["ShardDataset + augmentation"].best / floor
    v1 = rows["ShardDataset, v1 shards"]
    print(f"v2 / v1 shards: {rows['ShardDataset'].best / v1.best:.2f}x the throughput, "
          f"{rows['ShardDataset'].cpu_ms / v1.cpu_ms:.2f}x the CPU time per clip (the read cost of fletcher32)")

    totals = [r["main_kib"] + sum(r["workers_kib"]) for r in rss]
    growth = totals[1] / totals[0] - 1
    shard_files = [len(json.loads((folder / "shards" / "manifest.json").read_text())["shards"]) for folder in rss_data]
    print(f"\npeak RSS of one ShardDataset epoch (main + {WORKERS} workers, VmHWM), {args.rss_size} px clips:")
    print(f"{'clips':>8s} {'main MiB':>9s} {'workers MiB':>16s} {'total MiB':>10s}")
    for r, total in zip(rss, totals):
        workers = " + ".join(f"{w / 1024:.0f}" for w in r["workers_kib"])
        print(f"{r['clips']:8d} {r['main_kib'] / 1024:9.0f} {workers:>16s} {total / 1024:10.0f}")
    per_worker = (sum(rss[1]["workers_kib"]) - sum(rss[0]["workers_kib"])) / WORKERS
    print(f"growth per worker: {per_worker / 1024:+.1f} MiB for {shard_files[1] - shard_files[0]} more shard files "
          f"({per_worker / max(1, shard_files[1] - shard_files[0]):.0f} KiB per shard file)")

    work = profile(datasets)
    print(f"\nper-clip work in one process (make items, collate batches of {BATCH}; no workers, no hand-over):")
    print(f"{'loader':30s} {'items ms':>9s} {'collate ms':>11s} {'pipeline ms':>12s}")
    for name, (items, collate) in work.items():
        # With the work spread over the workers, the rest of the wall time per clip is the hand-over to the main
        # process (shared-memory segments, file descriptors, unpickling) and waiting for the CPU.
        print(f"{name:30s} {items:9.2f} {collate:11.2f} {WORKERS * 1e3 / rows[name].best:12.2f}")
    print("(pipeline ms = workers x wall time per clip through the DataLoader)")

    checks = [(f"ShardDataset / memmap floor = {of_floor:.2f}x (target >= {FLOOR_TARGET}x)", of_floor >= FLOOR_TARGET),
              (f"ShardDataset + augmentation / memmap floor = {augmented:.2f}x (target >= {AUGMENTED_FLOOR_TARGET}x)",
               augmented >= AUGMENTED_FLOOR_TARGET),
              (f"peak RSS at {10 * args.rss_clips} vs {args.rss_clips} clips: {growth:+.1%} "
               f"(target within {RSS_TARGET:.0%})", abs(growth) <= RSS_TARGET)]
    print()
    for text, ok in checks:
        print(f"{text}: {'met' if ok else 'MISSED'}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
