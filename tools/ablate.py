"""Ablation of the audio pathway and the crop losses on the synthetic benchmark, over several seeds.

Variants (each a set of `--set`-style overrides on top of the base config):
  vision-only      model.audio=false (no TPAVI: the lower bound a model without sound can reach)
  tpavi            the base config (TPAVI, mask BCE)
  tpavi+avm        + the AVM loss (KL form, lambda_1 = 0.5)
  crops-separate   + the seed's three crop losses, crop encoder with its own ResNet-18
  crops-shared     + the same losses, crops through the segmentation backbone

One run folder per variant and seed (runs/ablation/<variant>-s<seed>/), each evaluated with the reliance suite on
the test split; prints a markdown table of mean ± std of true-audio mIoU, swap mIoU and FPRs, and writes it to
runs/ablation/summary.json.

    .venv/bin/python tools/ablate.py --shards data/synth-shards-96 [--seeds 0 1 2] [--set optim.epochs=6]...
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from avstrain.config import load_config
from avstrain.evaluate import reliance_suite
from avstrain.train import load_checkpoint, model_from_checkpoint, resolve_amp, train

CROP_LOSSES = ["loss.crop_cls=0.5", "loss.crop_temporal=0.1", "loss.crop_audio=0.5"]
VARIANTS: dict[str, list[str]] = {
    "vision-only": ["model.audio=false"],
    "tpavi": [],
    "tpavi+avm": ["loss.avm=0.5"],
    "crops-separate": ["model.crop_mode=separate", *CROP_LOSSES],
    "crops-shared": ["model.crop_mode=shared", *CROP_LOSSES],
}


def run_variant(name: str, seed: int, args) -> dict:
    run_dir = args.runs / f"{name}-s{seed}"
    config = load_config(args.config, [*args.set, *VARIANTS[name], f"train.seed={seed}"])
    train(config, args.shards, run_dir, resume=True)
    model, config = model_from_checkpoint(load_checkpoint(run_dir / "best.pt"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = reliance_suite(model, args.shards, "test", device, resolve_amp(config.train.amp, device),
                             batch_size=config.eval.batch_size)
    (run_dir / "reliance.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


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
                        help="Override for every run, e.g. a shorter schedule: --set optim.epochs=6")
    args = parser.parse_args()

    summary = {}
    for name in args.variants:
        runs = [run_variant(name, seed, args) for seed in args.seeds]
        summary[name] = {
            "miou": [r["true"]["miou"] for r in runs],
            "swap_miou": [r["swap"].get("miou_other", float("nan")) for r in runs],
            "fpr_silence": [r["silence"]["fpr"] for r in runs],
            "fpr_offscreen": [r["offscreen"].get("fpr", float("nan")) for r in runs],
        }
        print(f"{name}: {summary[name]}", flush=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "summary.json").write_text(json.dumps({"seeds": args.seeds, "overrides": args.set,
                                                        "variants": summary}, indent=1) + "\n")
    print(f"\n| variant | mIoU (true audio) | swap mIoU | FPR silence | FPR off-screen |  ({len(args.seeds)} seeds)")
    print("|---|---|---|---|---|")
    for name, values in summary.items():
        print(f"| {name} | {mean_std(values['miou'])} | {mean_std(values['swap_miou'])} | "
              f"{mean_std(values['fpr_silence'])} | {mean_std(values['fpr_offscreen'])} |")


if __name__ == "__main__":
    main()
