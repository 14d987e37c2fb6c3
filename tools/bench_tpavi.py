#!/usr/bin/env python
"""Naive vs factorised TPAVI: time and memory of one forward+backward on CPU.

Default size is stage 1 of a 224 px clip: B=1, T=5, 56×56, C=256, where the reference builds a 15680×15680
affinity. Each variant runs in its own process. After a warm-up iteration it times ``--repeats-*`` iterations
(median reported). Then it measures memory: glibc is switched to serving every allocation above 64 KiB by mmap
(and trimmed), so freed tensors go back to the kernel and an iteration's peak is its own rather than hidden in a
heap grown earlier; one more iteration re-warms under that allocator, the resident set is taken as the baseline,
the kernel's peak-RSS mark is reset (/proc/self/clear_refs; 1 ms sampling where that is not allowed) and a last
iteration runs. Memory = its peak RSS over the baseline. Timing runs before the switch because mmap-per-tensor
page faults would slow the small, fast variant far more than the big one.

Exits with status 1 when the factorised block is not at least 15× faster and 10× lighter than the naive one.
Usage: python tools/bench_tpavi.py [--repeats-naive 2] [--repeats-factorised 5] [--size 56] [--channels 256]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SPEED_TARGET = 15.0
MEMORY_TARGET = 10.0


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident set (KiB) over a region: the kernel's VmHWM after a reset, or 1 ms sampling without one."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.kernel = True
        except OSError:
            self.kernel = False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kib("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.kernel:
            self.peak = _rss_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()


def worker(variant: str, repeats: int, size: int, channels: int, frames: int, threads: int) -> dict:
    import gc

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from avsprep.embedding import EMBEDDING_DIM
    from avstrain.models.tpavi import TPAVI, tpavi_naive

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    block = TPAVI(channels, EMBEDDING_DIM).train()
    with torch.no_grad():  # a zero W_z BatchNorm would leave the attention path without gradient
        block.out_bn.weight.uniform_(0.5, 1.5)
    visual = torch.randn(1, channels, frames, size, size, requires_grad=True)
    audio = torch.randn(1, frames, EMBEDDING_DIM, requires_grad=True)
    weight = torch.randn(1, channels, frames, size, size)

    def step() -> None:
        out = block(visual, audio).visual if variant == "factorised" else tpavi_naive(block, visual, audio)[0]
        (out * weight).sum().backward()

    step()  # warm-up: allocates .grad buffers, primes oneDNN kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    _return_freed_memory_to_kernel()
    step()  # re-warm under the new allocator settings
    growths = []
    for _ in range(3):  # an iteration served from memory that was not returned reads low: keep the largest
        gc.collect()
        _return_freed_memory_to_kernel()
        baseline = _rss_kib("VmRSS")
        with PeakRSS() as peak:
            step()
        growths.append((peak.peak - baseline) / 1024)
    return {"variant": variant, "time_s": statistics.median(times), "times_s": times,
            "peak_growth_mib": max(growths), "peak_growths_mib": growths,
            "peak_method": "VmHWM" if peak.kernel else "sampling", "threads": threads}


def _return_freed_memory_to_kernel() -> None:
    """Serve allocations above 64 KiB by mmap from now on (fixing glibc's otherwise adaptive threshold) and
    give the heap's free memory back, so RSS tracks live tensors."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 64 * 1024) and libc.mallopt(m_trim_threshold, 128 * 1024)):
        raise RuntimeError("mallopt failed: cannot make memory figures comparable")
    libc.malloc_trim(0)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    repeats = args.repeats_naive if variant == "naive" else args.repeats_factorised
    cmd = [sys.executable, __file__, "--worker", variant, "--repeats", str(repeats), "--size", str(args.size),
           "--channels", str(args.channels), "--frames", str(args.frames), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["naive", "factorised"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--repeats-naive", type=int, default=2)
    parser.add_argument("--repeats-factorised", type=int, default=5)
    parser.add_argument("--size", type=int, default=56, help="h = w of the stage map (56: stage 1 of 224 px)")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    args = parser.parse_args()

    if args.worker:
        result = worker(args.worker, args.repeats, args.size, args.channels, args.frames, args.threads)
        print(json.dumps(result))
        return 0

    n = args.frames * args.size * args.size
    print(f"TPAVI forward+backward on CPU: B=1, T={args.frames}, {args.size}x{args.size}, C={args.channels} "
          f"(N = T*h*w = {n}), {args.threads} threads, one process per variant, after a warm-up iteration")
    results = {v: run_variant(v, args) for v in ("naive", "factorised")}
    print(f"{'variant':<12}{'time (s)':>12}{'peak growth (MiB)':>20}")
    for v, r in results.items():
        print(f"{v:<12}{r['time_s']:>12.3f}{r['peak_growth_mib']:>20.1f}")
    speed = results["naive"]["time_s"] / results["factorised"]["time_s"]
    # The factorised block's output alone is T*h*w*C floats; a smaller growth means the measurement failed.
    floor_mib = args.frames * args.size * args.size * args.channels * 4 / 2**20
    measured = results["factorised"]["peak_growth_mib"] >= floor_mib
    memory = results["naive"]["peak_growth_mib"] / max(results["factorised"]["peak_growth_mib"], floor_mib)
    if not measured:
        print(f"factorised peak growth below its own output size ({floor_mib:.1f} MiB): memory not measured")
    ok = speed >= SPEED_TARGET and memory >= MEMORY_TARGET and measured
    print(f"factorised: {speed:.1f}x faster (target >= {SPEED_TARGET:.0f}x), {memory:.1f}x less memory "
          f"(target >= {MEMORY_TARGET:.0f}x); peak measured by {results['naive']['peak_method']}: "
          f"{'OK' if ok else 'TARGET MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
