"""Training curves of a run folder: loss parts per step (`steps.jsonl`) and validation metrics per epoch
(`metrics.jsonl`) over epochs, as one PNG (`avstrain plot runs/x/` writes `runs/x/curves.png`)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from avsprep.errors import InputError

log = logging.getLogger(__name__)

NOT_LOSSES = {"epoch", "step", "lr"}
VALIDATION = ("miou", "f", "f_avsbench")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist). InputError naming the line if one is bad."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise InputError(path, f"line {number} is not JSON ({error})") from None
        if not isinstance(record, dict):
            raise InputError(path, f"line {number} is not a JSON object")
        records.append(record)
    return records


def step_epochs(steps: list[dict]) -> np.ndarray:
    """Fractional epoch of each step: epoch e's n steps sit at e + 1/n, e + 2/n, ..., e + 1."""
    epochs = np.array([int(s.get("epoch", 0)) for s in steps])
    x = np.zeros(len(steps))
    for epoch in np.unique(epochs):
        where = np.flatnonzero(epochs == epoch)
        x[where] = epoch + np.arange(1, len(where) + 1) / len(where)
    return x


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or len(values) < 2:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw `run_dir/steps.jsonl` (loss parts, smoothed over about half an epoch, raw in pale; learning rate) and
    `run_dir/metrics.jsonl` (validation mIoU, F, F_avsbench) against epochs; returns the PNG path
    (default `run_dir/curves.png`). InputError when the folder has no logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder does not exist")
    steps = read_jsonl(run_dir / "steps.jsonl")
    if not steps:
        raise InputError(run_dir / "steps.jsonl", "no training steps logged: not a run folder, or not started")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / "curves.png"

    x = step_epochs(steps)
    epochs = math.ceil(x.max())
    fig, (ax_loss, ax_lr, ax_val) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2, 1, 2]})
    cmap = plt.get_cmap("tab10")
    _plot_losses(ax_loss, steps, x, window=max(1, len(steps) // max(1, epochs) // 2), cmap=cmap)
    _plot_learning_rate(ax_lr, steps, x)
    _plot_validation(ax_val, metrics, epochs, cmap)
    fig.suptitle(run_dir.name, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    log.info("wrote %s", out)
    return out


def _plot_losses(ax, steps: list[dict], x: np.ndarray, window: int, cmap) -> None:
    """Every loss part per step: raw in pale, the trailing mean over `window` steps bold; log scale if all > 0."""
    parts = [key for key in steps[0] if key not in NOT_LOSSES and isinstance(steps[0][key], (int, float))]
    parts = ["loss"] + [p for p in parts if p != "loss"] if "loss" in parts else parts
    positive = True
    for i, part in enumerate(parts):
        values = np.array([float(s.get(part, np.nan)) for s in steps])
        ok = np.isfinite(values)
        if not ok.any():
            continue
        positive &= bool((values[ok] > 0).all())
        colour = cmap(i % 10)
        ax.plot(x[ok], values[ok], color=colour, alpha=0.2, linewidth=0.7)
        ax.plot(x[ok], _smooth(values[ok], window), color=colour, linewidth=1.6,
                label=part + (" (total)" if part == "loss" and len(parts) > 1 else ""))
    if positive:
        ax.set_yscale("log")
    ax.set_title(f"training loss parts ({len(steps)} steps; lines: mean of {window} steps)", fontsize=10)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _plot_learning_rate(ax, steps: list[dict], x: np.ndarray) -> None:
    lr = np.array([float(s.get("lr", np.nan)) for s in steps])
    ax.plot(x, lr, color="black", linewidth=1.2)
    ax.set_title("learning rate", fontsize=10)
    ax.set_xlabel("epoch")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)


def _plot_validation(ax, metrics: list[dict], epochs: int, cmap) -> None:
    """Validation mIoU, F and F_avsbench per validated epoch, the best mIoU's epoch marked."""
    if metrics:
        validated = [m["epoch"] for m in metrics]
        for i, key in enumerate(VALIDATION):
            values = [m.get("val", {}).get("overall", {}).get(key) for m in metrics]
            if any(v is not None for v in values):
                ax.plot(validated, [np.nan if v is None else v for v in values], marker="o", markersize=3,
                        color=cmap(i), label=key)
        best = max(metrics, key=lambda m: m.get("val", {}).get("overall", {}).get("miou", -1))
        best_miou = best.get("val", {}).get("overall", {}).get("miou")
        if best_miou is not None:
            ax.axvline(best["epoch"], color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"validation (best mIoU {best_miou:.3f} at epoch {best['epoch']})", fontsize=10)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no validation logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("validation", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_xlim(0, max(epochs, 1) + 0.2)
    ax.grid(alpha=0.3)


__all__ = ["plot_run", "read_jsonl", "step_epochs"]
