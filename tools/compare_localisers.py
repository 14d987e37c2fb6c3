"""Side by side on "where is the sound?": Senocak's localiser (unsupervised, semi-supervised, supervised), AVOL-Net,
AVE-Net and TPAVI, trained on the same shards and scored by the localisation suite (docs/design.md §13).

Variants (a config of `configs/` plus `--set`-style overrides):
  senocak-unsup     synth-senocak.toml, loss.supervised_fraction=0 (no localisation label at all)
  senocak-semi      synth-senocak.toml as it is (10 % of the training clips keep their ground truth)
  senocak-sup       synth-senocak.toml, loss.senocak_unsup=0, loss.supervised_fraction=1
  avolnet           synth-avolnet.toml (correspondence only)
  avenet            synth-avenet.toml (correspondence only; no heat map: AVC and retrieval)
  tpavi             synth-cpu.toml, the `make train` recipe (every mask): two rows, its mask probabilities and its
                    finest-stage av_scores (sign chosen on the validation split)
  senocak-semi-deaf, senocak-sup-deaf   the deaf controls (model.audio=false: constant audio), not run by default

One run folder per variant and seed (runs/localisers/<variant>-s<seed>/: the configs' own runs, with their own
schedule, so `avstrain train --config configs/synth-avolnet.toml --name localisers/avolnet-s0` makes the same folder),
evaluated on the test split; the runs
that saw no localisation label (senocak-unsup, avolnet) are scored from `last.pt`, since their `best.pt` is chosen
by the validation split's pointing game, which reads its masks. Finished runs are reused: a folder with
localisation.json, or a run the summary records (under "runs") for the same recipe (every config file by sha256,
schedule and overrides), so an interrupted comparison resumes, in a later session on a new machine too. Writes <summary-dir>/summary.json and <summary-dir>/table.md (mean ±
std over seeds: pointing, swap pointing_other, AP, cIoU, AUC, nDCG@30 im→aud and aud→im with crop items, AVC
accuracy and its hard form) and prints the table.

The localisers and AVE-Net train with their configs' schedules (6 epochs; `--epochs` to change), TPAVI with a
shorter one than `make train`'s (`--tpavi-epochs 8`, negatives from half-way, against 20 epochs); `--jobs 2
--threads 1` trains two single-threaded runs side by side (small models use 2 cores better as 2 processes).

    .venv/bin/python tools/compare_localisers.py --shards data/synth-shards-64 [--seeds 0 1 2] [--jobs 2 --threads 1]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ablate import mean_std, run_jobs
from avstrain.config import load_config
from avstrain.localisation import localisation_suite
from avstrain.runtime import load_for_inference
from avstrain.train import train

SENOCAK, AVOLNET, AVENET, TPAVI = (Path("configs") / f"synth-{name}.toml"
                                   for name in ("senocak", "avolnet", "avenet", "cpu"))
# variant -> (config, overrides, fraction of training clips with localisation ground truth, checkpoint scored)
VARIANTS: dict[str, tuple[Path, list[str], float, str]] = {
    "senocak-unsup": (SENOCAK, ["loss.supervised_fraction=0"], 0.0, "last.pt"),
    "senocak-semi": (SENOCAK, [], 0.1, "best.pt"),
    "senocak-sup": (SENOCAK, ["loss.senocak_unsup=0", "loss.supervised_fraction=1"], 1.0, "best.pt"),
    "avolnet": (AVOLNET, [], 0.0, "last.pt"),
    "avenet": (AVENET, [], 0.0, "best.pt"),
    "tpavi": (TPAVI, [], 1.0, "best.pt"),
    "senocak-semi-deaf": (SENOCAK, ["model.audio=false"], 0.1, "best.pt"),
    "senocak-sup-deaf": (SENOCAK, ["loss.senocak_unsup=0", "loss.supervised_fraction=1", "model.audio=false"], 1.0,
                         "best.pt"),
}
DEFAULT_VARIANTS = ["senocak-unsup", "senocak-semi", "senocak-sup", "avolnet", "avenet", "tpavi"]
# Columns of the table: (heading, path into one heat map's or the run's result).
COLUMNS = [("pointing", "true.pointing"), ("swap pointing_other", "swap.pointing_other"), ("AP", "true.ap"),
           ("cIoU", "true.ciou"), ("AUC", "true.auc"), ("mean cIoU", "true.mean_ciou"),
           ("nDCG im→aud", "retrieval.im2aud"),
           ("nDCG aud→im", "retrieval.aud2im"), ("AVC acc.", "avc.accuracy"), ("AVC hard", "avc.hard")]


def schedule(name: str, args) -> list[str]:
    """The overrides of the schedule: TPAVI's shorter one, the others' configs unless --epochs is given."""
    if name == "tpavi":
        return [f"optim.epochs={args.tpavi_epochs}", f"train.negatives_from_epoch={args.tpavi_epochs // 2}"]
    return [f"optim.epochs={args.epochs}"] if args.epochs else []


def run_variant(name: str, seed: int, args) -> dict:
    """Train and evaluate one variant with one seed (or reuse its finished run folder): the localisation result."""
    run_dir = args.runs / f"{name}-s{seed}"
    results_file = run_dir / "localisation.json"
    if results_file.is_file():
        return json.loads(results_file.read_text())
    config_path, overrides, _, checkpoint = VARIANTS[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = [f"train.threads={args.threads}"] if args.threads else []
    # Pool processes (--jobs > 1) are daemons, which may not start loader processes of their own.
    workers = ["train.workers=0"] if args.jobs > 1 else []
    config = load_config(config_path, [*schedule(name, args), *args.set, *overrides, f"train.seed={seed}", *threads,
                                       *workers])
    start, cpu = time.perf_counter(), time.process_time()
    train(config, args.shards, run_dir, resume=True)
    model, config, runtime = load_for_inference(run_dir / checkpoint)
    results = localisation_suite(model, args.shards, "test", runtime.device, runtime.amp_dtype,
                                 batch_size=config.eval.batch_size)
    # process_time counts this process only: with train.workers > 0 the loader's processes come on top.
    results.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu, checkpoint=checkpoint)
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{name} seed {seed}: {_brief(results)} ({results['seconds']:.0f} s)", flush=True)
    return results


def recipe(args) -> dict:
    """What makes a recorded run the same experiment: the configs by content, the schedule, the overrides."""
    configs = sorted({str(config) for config, _, _, _ in VARIANTS.values()})
    return {"configs": {name: hashlib.sha256(Path(name).read_bytes()).hexdigest() for name in configs},
            "epochs": args.epochs, "tpavi_epochs": args.tpavi_epochs, "overrides": args.set}


def recorded_runs(args) -> dict[str, dict]:
    """"<variant>-s<seed>" -> localisation result of the runs in the existing summary, if it is the same recipe."""
    summary = args.summary_dir / "summary.json"
    if not summary.is_file():
        return {}
    previous = json.loads(summary.read_text())
    if {key: previous.get(key) for key in recipe(args)} != recipe(args):
        return {}
    return previous.get("runs", {})


def _brief(results: dict) -> str:
    parts = [f"pointing {results['true']['pointing']:.3f}"] if "true" in results else []
    parts += [f"AVC {results['avc']['accuracy']:.3f}"] if "avc" in results else []
    return ", ".join(parts)


def _run_job(job: tuple[str, int, argparse.Namespace]) -> dict:
    logging.basicConfig(level=logging.WARNING)
    return run_variant(*job)


def _lookup(result: dict, path: str) -> float | None:
    for key in path.split("."):
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def rows_of(name: str, runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{row: {column path: [value per seed]}}: one row per heat map (TPAVI has two); correspondence and retrieval
    on the first."""
    maps = list(runs[0].get("maps", {})) or [None]
    rows = {}
    for i, heat_map in enumerate(maps):
        values = {}
        for _, path in COLUMNS:
            per_map = path.split(".")[0] in ("true", "swap")
            if not per_map and i > 0:
                continue
            found = [_lookup(run["maps"][heat_map] if per_map and heat_map else run, path) for run in runs]
            if any(v is not None for v in found):
                values[path] = [v for v in found if v is not None]
        rows[name if len(maps) == 1 else f"{name} ({heat_map.removeprefix('tpavi_')})"] = values
    return rows


def ceiling_of(results: list[dict]) -> dict | None:
    """The split's cIoU ceiling (`localisation_ceiling` of its ground truth) from the first result that has one."""
    for result in results:
        for scores in [result, *result.get("maps", {}).values()]:
            if "ceiling" in scores.get("true", {}):
                return scores["true"]["ceiling"]
    return None


def table(summary: dict, seeds: list[int], ceiling: dict | None) -> str:
    lines = [f"| variant | localisation labels | {' | '.join(h for h, _ in COLUMNS)} |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for row, entry in summary.items():
        cells = [mean_std(entry["values"][path]) if entry["values"].get(path) else "–" for _, path in COLUMNS]
        lines.append(f"| {row} | {entry['labels']:.0%} | {' | '.join(cells)} |")
    text = "\n".join(lines) + f"\n\nTest split, mean ± std over seeds {', '.join(map(str, seeds))}.\n"
    if ceiling:
        # Small objects score cIoU 0 in every row: the top-half rule caps it at about twice their share of the frame.
        text += (f"A perfect localiser scores cIoU {ceiling['ciou']:.3f}, AUC {ceiling['auc']:.3f} and mean cIoU "
                 f"{ceiling['mean_ciou']:.3f} on this split (the field's evaluator keeps at least the top half of "
                 "every heat map).\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--runs", type=Path, default=Path("runs/localisers"))
    parser.add_argument("--summary-dir", type=Path, default=Path("docs/localisers"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, help="epochs of the localisers and AVE-Net (default: their configs')")
    parser.add_argument("--tpavi-epochs", type=int, default=8, help="epochs of TPAVI (negatives from half-way)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Override for every run, after the schedule")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side, one process each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    args = parser.parse_args()

    runs = recorded_runs(args)
    jobs = [(name, seed, args) for name in args.variants for seed in args.seeds]
    jobs.sort(key=lambda job: job[0] != "tpavi")  # the costliest first, so that the job slots finish together
    todo = [job for job in jobs if f"{job[0]}-s{job[1]}" not in runs]
    done, wall = run_jobs(_run_job, todo, args.jobs)
    runs.update({f"{name}-s{seed}": result for (name, seed, _), result in zip(todo, done)})
    results = [runs[f"{name}-s{seed}"] for name, seed, _ in jobs]
    summary = {}
    for name in args.variants:
        per_seed = [r for (variant, _, _), r in zip(jobs, results) if variant == name]
        for row, values in rows_of(name, per_seed).items():
            summary[row] = {"labels": VARIANTS[name][2], "checkpoint": VARIANTS[name][3], "values": values}
    args.summary_dir.mkdir(parents=True, exist_ok=True)
    (args.summary_dir / "summary.json").write_text(json.dumps({
        **recipe(args), "seeds": args.seeds, "wall_seconds_this_call": wall, "jobs": args.jobs,
        "seconds_per_run": [r.get("seconds") for r in results], "rows": summary, "runs": runs}, indent=1) + "\n")
    text = table(summary, args.seeds, ceiling_of(results))
    (args.summary_dir / "table.md").write_text(text)
    print(f"\nwhole comparison: {wall / 60:.1f} min wall, {len(jobs)} runs, {args.jobs} at a time\n\n{text}")


if __name__ == "__main__":
    main()
