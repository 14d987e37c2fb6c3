"""Ablation of the audio pathway and the crop losses on the synthetic benchmark, over several seeds.

Variants (each a set of `--set`-style overrides on top of the base config):
  vision-only      model.audio=false (no TPAVI: the lower bound a model without sound can reach)
  tpavi            the base config (configs/synth-cpu.toml: TPAVI with the from-scratch options of docs/design.md §17)
  tpavi-reference  TPAVI as the AVSBench recipe trains it: the four from-scratch options off, negatives by epoch
  tpavi+avm        + the AVM loss (KL form, lambda_1 = 0.5, without L2 normalisation as the reference)
  reference+avm    the same AVM on the reference recipe (tpavi-reference)
  crops-separate   + the seed's three crop losses, crop encoder with its own ResNet-18
  crops-shared     + the same losses, crops through the segmentation backbone

One run folder per variant and seed (runs/ablation/<variant>-s<seed>/), each evaluated with the reliance suite on
the test split; prints a markdown table of mean ± std of true-audio mIoU, swap mIoU and FPRs, and writes it to
runs/ablation/summary.json. Finished runs are reused (a run folder with reliance.json), so an interrupted
ablation resumes.

The default schedule is shorter than `make train`'s so that 5 variants x 3 seeds fit in an hour on 2 cores:
32 px shards (make them with `avsprep crops ... --size 32 --crop-size 32`), 8 epochs, negatives from epoch 4,
and `--jobs 2` single-threaded runs side by side (small models use 2 cores better as 2 processes than as
2 threads of one).

    .venv/bin/python tools/ablate.py --shards data/synth-shards-32 [--seeds 0 1 2] [--jobs 2] [--set k=v]...
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import time
from pathlib import Path

import torch

from avstrain.config import load_config
from avstrain.evaluate import reliance_suite
from avstrain.runtime import load_for_inference
from avstrain.train import train

# The ablation schedule (overridable with --set): see the module docstring.
SCHEDULE = ["model.image_size=32", "optim.epochs=8", "train.negatives_from_epoch=4", "train.workers=0"]
CROP_LOSSES = ["loss.crop_cls=0.5", "loss.crop_temporal=0.1", "loss.crop_audio=0.5"]
# The AVSBench recipe's TPAVI: the from-scratch options of docs/design.md §17 off, negative audio by epoch.
REFERENCE = ["model.tpavi_bn_init=0", "model.audio_norm=false", "model.audio_clip=0", "loss.dice=0", "loss.av=0",
             "train.negatives_start=epoch", "train.negatives_ramp=0", "train.swap=0"]
VARIANTS: dict[str, list[str]] = {
    "vision-only": ["model.audio=false"],
    "tpavi": [],
    "tpavi-reference": REFERENCE,
    "tpavi+avm": ["loss.avm=0.5"],
    "reference+avm": [*REFERENCE, "loss.avm=0.5"],
    "crops-separate": ["model.crop_mode=separate", *CROP_LOSSES],
    "crops-shared": ["model.crop_mode=shared", *CROP_LOSSES],
}


def run_variant(name: str, seed: int, args) -> dict:
    """Train and evaluate one variant with one seed (or reuse its finished run folder); the reliance results."""
    overrides = [*SCHEDULE, *args.set, *VARIANTS[name], f"train.seed={seed}", f"train.threads={args.threads}"]
    return train_and_evaluate(args.config, overrides, args.shards, args.runs / f"{name}-s{seed}", f"{name} seed {seed}",
                              args.threads)


def train_and_evaluate(config_path: Path, overrides: list[str], shards: Path, run_dir: Path, label: str,
                       threads: int) -> dict:
    """Train `config_path` with `overrides` into `run_dir` and run the reliance suite on the test split with its
    best.pt; the results are written to `run_dir/reliance.json`, which a later call reuses instead of training."""
    results_file = run_dir / "reliance.json"
    if results_file.is_file():
        return json.loads(results_file.read_text())
    torch.set_num_threads(threads)
    config = load_config(config_path, overrides)
    start = time.perf_counter()
    train(config, shards, run_dir, resume=True)
    model, config, runtime = load_for_inference(run_dir / "best.pt")
    results = reliance_suite(model, shards, "test", runtime.device, runtime.amp_dtype,
                             batch_size=config.eval.batch_size)
    results["seconds"] = time.perf_counter() - start
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{label}: mIoU {results['true']['miou']:.3f}, swap {results['swap'].get('miou_other', float('nan')):.3f}"
          f" ({results['seconds']:.0f} s)", flush=True)
    return results


def _run_job(job: tuple[str, int, argparse.Namespace]) -> dict:
    logging.basicConfig(level=logging.WARNING)
    return run_variant(*job)


def run_jobs(worker, jobs: list, processes: int) -> tuple[list, float]:
    """(worker(job) for each job in job order, wall seconds), `processes` spawned processes at a time."""
    start = time.perf_counter()
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(worker, jobs, chunksize=1)
    else:
        results = [worker(job) for job in jobs]
    return results, time.perf_counter() - start


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/synth-cpu.toml"))
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Override for every run, after the ablation schedule, e.g. --set optim.epochs=6")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args()

    # Costliest variants first, so that the two job slots finish close together.
    by_cost = sorted(args.variants, key=lambda name: -list(VARIANTS).index(name))
    jobs = [(name, seed, args) for name in by_cost for seed in args.seeds]
    results, wall = run_jobs(_run_job, jobs, args.jobs)
    summary = {}
    for name in args.variants:  # in the order of VARIANTS
        runs = [r for (variant, _, _), r in zip(jobs, results) if variant == name]
        summary[name] = {
            "miou": [r["true"]["miou"] for r in runs],
            "swap_miou": [r["swap"].get("miou_other", float("nan")) for r in runs],
            "fpr_silence": [r["silence"]["fpr"] for r in runs],
            "fpr_offscreen": [r["offscreen"].get("fpr", float("nan")) for r in runs],
        }
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "summary.json").write_text(json.dumps({"seeds": args.seeds, "overrides": [*SCHEDULE, *args.set],
                                                        "wall_seconds": wall, "jobs": args.jobs,
                                                        "variants": summary}, indent=1) + "\n")
    print(f"\nwhole ablation: {wall / 60:.1f} min wall, {len(jobs)} runs, {args.jobs} at a time")
    print(f"\n| variant | mIoU (true audio) | swap mIoU | FPR silence | FPR off-screen |  ({len(args.seeds)} seeds)")
    print("|---|---|---|---|---|")
    for name, values in summary.items():
        print(f"| {name} | {mean_std(values['miou'])} | {mean_std(values['swap_miou'])} | "
              f"{mean_std(values['fpr_silence'])} | {mean_std(values['fpr_offscreen'])} |")


if __name__ == "__main__":
    main()
