#!/usr/bin/env python
"""Does this tree train exactly as an earlier commit did? Same seed, same config: the same initial weights and the
same per-step losses, line for line.

    .venv/bin/python tools/check_training_unchanged.py --against 4f43748 [--steps 100] [--clips 120]

It checks the commit out with `git worktree` into a temporary folder, makes one small synthetic data set with that
commit's `avsprep` (`synth` and `crops` at 64 px, 70 % of the clips for training, so that 100 steps of batch 8 span
about nine epochs: validation, best.pt and negative audio from epoch 6 all happen), and runs `avstrain train
--config configs/synth-cpu.toml --set train.max_steps=<steps>` in both trees, one process each, side by side, each
importing its own tree's packages (`PYTHONPATH`, checked). It then compares

- the initial state dict: a sha256 of every tensor of the model as the trainer built it, taken just before its first
  forward call (a global forward pre-hook, so the trainer's own code path builds it in both trees);
- `steps.jsonl`, line for line (epoch, step, learning rate, loss and every loss part, as JSON);
- `metrics.jsonl` without its timings (the validation results of every epoch).

Prints what it compared and every difference; exits 1 on any difference, 0 when all is identical.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("train_seconds", "clips_per_second")

# Run in a tree's root with PYTHONPATH pointing there: train through that tree's CLI, hashing the initial weights.
DRIVER = r"""
import hashlib, json, sys
from pathlib import Path
import torch
import avstrain
assert Path(avstrain.__file__).resolve().is_relative_to(Path.cwd().resolve()), avstrain.__file__
from avstrain.cli import main

out, args = Path(sys.argv[1]), sys.argv[2:]
initial = {}

def snapshot(module, inputs):
    # The first forward call of the run is the model's own (an outer module is called before its children).
    if not initial:
        initial["module"] = type(module).__name__
        initial["tensors"] = {
            key: hashlib.sha256(f"{tuple(value.shape)} {value.dtype} ".encode()
                                + value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
                                ).hexdigest()
            for key, value in module.state_dict().items()}

torch.nn.modules.module.register_module_forward_pre_hook(snapshot)
try:
    main(args, standalone_mode=False)
finally:
    out.write_text(json.dumps(initial, indent=1))
"""


def run(command: list[str], cwd: Path, log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    stream = log.open("w") if log else subprocess.DEVNULL
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=stream, stderr=subprocess.STDOUT)


def wait(process: subprocess.Popen, what: str, log: Path | None = None) -> None:
    if process.wait() != 0:
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        raise SystemExit(f"{what} failed (exit {process.returncode})\n{tail}")


def make_shards(tree: Path, work: Path, clips: int) -> Path:
    """Synthetic clips and their 64 px shards, made once with `tree`'s avsprep."""
    raw, shards = work / "synth", work / "shards"
    python = [sys.executable, "-m", "avsprep.cli"]
    wait(run([*python, "synth", "--out", str(raw), "--clips", str(clips), "--size", "64", "--seed", "0"], tree),
         "avsprep synth")
    wait(run([*python, "crops", "--voc", str(raw / "labels"), "--images", str(raw / "visual_frames"),
              "--masks", str(raw / "gt_masks"), "--other-masks", str(raw / "other_masks"),
              "--audio", str(raw / "audio_wav"), "--meta", str(raw / "meta.csv"), "--out", str(shards),
              "--size", "64", "--crop-size", "64", "--workers", "1"], tree), "avsprep crops")
    return shards


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def without_timings(lines: list[str]) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def compare(old: Path, new: Path, steps: int) -> list[str]:
    """Every difference between the two runs' initial weights, steps.jsonl and metrics.jsonl."""
    problems = []
    initial = [json.loads((run_dir / "initial.json").read_text()) for run_dir in (old, new)]
    if not initial[0].get("tensors"):
        problems.append("the old tree's run made no forward call: no initial weights to compare")
    for key in sorted(set(initial[0].get("tensors", {})) | set(initial[1].get("tensors", {}))):
        a, b = (side.get("tensors", {}).get(key) for side in initial)
        if a != b:
            problems.append(f"initial tensor {key}: {a or 'missing'} (old) vs {b or 'missing'} (new)")
    if initial[0].get("module") != initial[1].get("module"):
        problems.append(f"first module called: {initial[0].get('module')} (old) vs {initial[1].get('module')} (new)")
    old_steps, new_steps = read_lines(old / "synth" / "steps.jsonl"), read_lines(new / "synth" / "steps.jsonl")
    if len(old_steps) != steps:
        problems.append(f"the old tree logged {len(old_steps)} steps, not {steps}")
    for number, (a, b) in enumerate(zip(old_steps, new_steps), start=1):
        if a != b:
            problems.append(f"steps.jsonl line {number}:\n  old {a}\n  new {b}")
    if len(old_steps) != len(new_steps):
        problems.append(f"steps.jsonl: {len(old_steps)} lines (old) vs {len(new_steps)} (new)")
    old_metrics, new_metrics = (without_timings(read_lines(d / "synth" / "metrics.jsonl")) for d in (old, new))
    if old_metrics != new_metrics:
        problems.append(f"metrics.jsonl (timings aside) differs: {len(old_metrics)} vs {len(new_metrics)} epochs"
                        + "".join(f"\n  epoch {a.get('epoch')}: old {a.get('val', {}).get('overall')} new "
                                  f"{b.get('val', {}).get('overall')}"
                                  for a, b in zip(old_metrics, new_metrics) if a != b))
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="4f43748", help="the commit to compare with")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--clips", type=int, default=120, help="synthetic clips (70 %% train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="check-training-"))
    work.mkdir(parents=True, exist_ok=True)
    old_tree = work / "old-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(old_tree), args.against],
                   check=True, capture_output=True)
    try:
        shards = make_shards(old_tree, work, args.clips)
        overrides = [f"train.max_steps={args.steps}", f"train.seed={args.seed}", "train.threads=1", "train.workers=1"]
        processes = {}
        for name, tree in (("old", old_tree), ("new", ROOT)):
            run_dir = work / f"runs-{name}"
            run_dir.mkdir(exist_ok=True)
            command = [sys.executable, "-c", DRIVER, str(run_dir / "initial.json"), "train",
                       "--config", str(tree / "configs" / "synth-cpu.toml"), "--shards", str(shards),
                       "--runs", str(run_dir), "--name", "synth", *[a for o in overrides for a in ("--set", o)]]
            processes[name] = (run(command, tree, log=run_dir / "train.log"), run_dir / "train.log")
        for name, (process, log) in processes.items():
            wait(process, f"training in the {name} tree", log)
        problems = compare(work / "runs-old", work / "runs-new", args.steps)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
    tensors = len(json.loads((work / "runs-new" / "initial.json").read_text()).get("tensors", {}))
    steps = len(read_lines(work / "runs-new" / "synth" / "steps.jsonl"))
    epochs = len(read_lines(work / "runs-new" / "synth" / "metrics.jsonl"))
    print(f"against {args.against}: {args.clips} synthetic clips at 64 px, configs/synth-cpu.toml, seed {args.seed}, "
          f"{args.steps} steps; work folder {work}")
    print(f"compared: {tensors} initial tensors (sha256), {steps} lines of steps.jsonl, {epochs} validated epochs "
          f"of metrics.jsonl")
    for problem in problems:
        print(f"DIFFERENT: {problem}")
    print("identical" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
