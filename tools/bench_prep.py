"""Benchmark `avsprep crops --workers 2` against the floor: merely decoding the same frames and masks.

Both are measured in this run on the same synthetic clips (generated once into data/bench-synth). The floor is
`cv2.imread` of every frame, mask and other-object mask that `crops` reads, spread over 2 processes; `crops` is the
whole command (process start, imports, XML, audio, crops, HDF5 writes, manifest) as a user runs it.
Target: crops <= 1.5x the floor.

    .venv/bin/python tools/bench_prep.py [--clips 1000] [--size 224]
"""
from __future__ import annotations

import argparse
import multiprocessing
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2

TARGET = 1.5


def decode(paths: list[str]) -> int:
    cv2.setNumThreads(1)
    pixels = 0
    for path in paths:
        pixels += cv2.imread(path, cv2.IMREAD_UNCHANGED).size
    return pixels


def floor_seconds(data: Path, workers: int) -> float:
    paths = sorted(str(p) for folder in ("visual_frames", "gt_masks", "other_masks") for p in (data / folder).rglob("*.png"))
    chunks = [paths[i::workers] for i in range(workers)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(decode, chunks)
    return time.perf_counter() - start


def crops_seconds(data: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "avsprep.cli", "crops", "--voc", data / "labels", "--images", data / "visual_frames",
               "--masks", data / "gt_masks", "--other-masks", data / "other_masks", "--audio", data / "audio_wav",
               "--meta", data / "meta.csv", "--out", out, "--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run([str(c) for c in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("data/bench-synth"))
    args = parser.parse_args()
    data = args.data / f"{args.clips}x{args.size}"
    if not (data / "meta.csv").is_file():
        print(f"generating {args.clips} synthetic clips at {args.size} px into {data} ...", flush=True)
        subprocess.run([sys.executable, "-m", "avsprep.cli", "synth", "--out", str(data), "--clips", str(args.clips),
                        "--size", str(args.size), "--workers", str(args.workers)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = args.data / "shards"
    floor_seconds(data, args.workers)  # warm the page cache so both read from memory
    floor = min(floor_seconds(data, args.workers) for _ in range(2))
    crops = min(crops_seconds(data, out, args.workers) for _ in range(2))
    ratio = crops / floor
    print(f"machine: {platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores, "
          f"{args.clips} clips at {args.size} px, {args.workers} workers (best of 2)")
    print(f"{'what':44s} {'seconds':>8s} {'clips/s':>8s}")
    print(f"{'floor: cv2.imread frames + masks':44s} {floor:8.2f} {args.clips / floor:8.1f}")
    print(f"{'avsprep crops (whole command)':44s} {crops:8.2f} {args.clips / crops:8.1f}")
    print(f"crops / floor = {ratio:.2f}x (target <= {TARGET}x): {'met' if ratio <= TARGET else 'MISSED'}")
    shutil.rmtree(out, ignore_errors=True)
    sys.exit(0 if ratio <= TARGET else 1)


if __name__ == "__main__":
    main()
