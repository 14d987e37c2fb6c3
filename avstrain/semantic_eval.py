"""Evaluation of a semantic (K-class) TPAVI model on semantic shards (AVSS, docs/design.md §14).

The official metric (`SemanticMeter`): per-frame, per-class IoU and F over the frames where the class is in the
union, mean over all K classes, background included. As the reference does, every frame of a clip is scored,
padded ones too (their target is background and their logits are zero, so they predict background); frames that
are real but have no mask are left out. `miou_real_frames` scores the real frames only. The result keeps the shape
of `evaluate`'s: `overall.miou` and `overall.f` are the semantic figures, `per_class` is keyed by class name with
that class's IoU and F (background included).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from avstrain.eval_data import (DonorPicker, batches, eval_dataset, load_negatives, read_split_table, report_progress,
                                select_rows)
from avstrain.metrics import SemanticMeter
from avstrain.runtime import autocast, eval_mode

log = logging.getLogger(__name__)

BACKGROUND = "background"


def is_semantic(model: nn.Module) -> bool:
    """Whether the model has a K-class mask head (K > 1)."""
    return int(getattr(getattr(model, "config", None), "mask_classes", 1)) > 1


@torch.no_grad()
def semantic_logits(model: nn.Module, batch: dict, device: torch.device | str, amp_dtype: torch.dtype | None = None,
                    audio: Tensor | None = None) -> Tensor:
    """[B,T,K,S,S] float32 on the CPU for a dataset batch (frames [B,T,S,S,3] uint8), with its `frame_valid`."""
    device = torch.device(device)
    frames = batch["frames"].to(device).permute(0, 1, 4, 2, 3)  # [B,T,3,S,S]
    audio = batch["audio"] if audio is None else audio
    with autocast(device, amp_dtype):
        output = model(frames, audio.to(device), frame_valid=batch["frame_valid"].to(device))
    return output.logits.float().cpu()


def scored_frames(batch: dict) -> tuple[Tensor, Tensor]:
    """(all: frames the reference scores [B,T] — those with a mask and the padded ones; real: those with a mask)."""
    real = batch["mask_valid"].bool() & batch["frame_valid"].bool()
    return real | ~batch["frame_valid"].bool(), real


class SemanticScores:
    """The official metric over every scored frame and over the real frames, fed clip by clip."""

    def __init__(self, num_classes: int) -> None:
        self.all, self.real = SemanticMeter(num_classes), SemanticMeter(num_classes)
        self.clips = self.frames = 0

    def add(self, logits: Tensor, target: Tensor, scored: Tensor, real: Tensor) -> None:
        """logits [T,K,S,S], target [T,S,S] class indices, scored / real [T] bool."""
        if scored.any():
            self.all.update(logits[scored], target[scored])
        if real.any():
            self.real.update(logits[real], target[real])
        self.clips += 1
        self.frames += int(scored.sum())

    def overall(self) -> dict:
        scores, real = self.all.compute(), self.real.compute()
        return {**scores, "miou_real_frames": real["miou"], "f_real_frames": real["f"], "clips": self.clips,
                "frames": self.frames}

    def per_class(self, names: list[str]) -> dict:
        iou, f = self.all.per_class()
        return {name: {"miou": float(iou[k]), "f": float(f[k]), "frames": int(self.all.count[k])}
                for k, name in enumerate(names)}


def evaluate_semantic(model: nn.Module, shards_dir: str | Path, split: str = "test", device: torch.device | str = "cpu",
                      amp_dtype: torch.dtype | None = None, batch_size: int = 4, num_workers: int = 0,
                      max_clips: int | None = None, progress=None) -> dict:
    """`evaluate` for a semantic model: {"split", "overall": {"miou", "f", "miou_real_frames", "f_real_frames",
    "clips", "frames"}, "per_class": {name: {"miou", "f", "frames"}}} (background first)."""

    device = torch.device(device)
    dataset = eval_dataset(shards_dir, split)
    table = read_split_table(dataset)
    k = model.config.mask_classes
    names = [BACKGROUND, *dataset.classes]
    if len(names) != k:
        raise ValueError(f"the model has {k} mask classes, the shards {len(names)} (background + "
                         f"{len(dataset.classes)} classes)")
    scores = SemanticScores(k)
    model.to(device)
    with eval_mode(model):
        for batch, positions in batches(dataset, table, batch_size, num_workers, max_clips, device.type == "cuda"):
            logits = semantic_logits(model, batch, device, amp_dtype)
            scored, real = scored_frames(batch)
            for i in range(len(positions)):
                scores.add(logits[i], batch["masks"][i].long(), scored[i], real[i])
            report_progress(progress, scores.clips, len(positions))
    log.info("evaluated %d clips (%d frames) of split %r, %d classes", scores.clips, scores.frames, split, k)
    return {"split": split, "overall": scores.overall(), "per_class": scores.per_class(names)}


def _non_background_rate(logits: Tensor, real: Tensor) -> tuple[float, int]:
    """(pixels predicted as a class ≠ background, pixels) over the real frames: logits [B,T,K,S,S], real [B,T]."""
    pred = logits.argmax(2)[real]  # [n, S, S]
    return float((pred != 0).sum()), pred.numel()


def reliance_semantic(model: nn.Module, shards_dir: str | Path, split: str = "test",
                      device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None, batch_size: int = 4,
                      num_workers: int = 0, seed: int = 0, max_clips: int | None = None, progress=None) -> dict:
    """The reliance suite per class (docs/design.md §9, §14). "true": the official metric with the clip's own audio;
    "swap": the audio of a clip whose class is the visible silent object's, scored against that object's mask as
    its class (miou_other: the official mean over all K; miou_other_present: over the classes that occur);
    "silence" / "noise": FPR = the share of real-frame pixels predicted as any class but background."""

    device = torch.device(device)
    dataset = eval_dataset(shards_dir, split)
    table = read_split_table(dataset, with_audio=True)
    silence, noise = load_negatives(shards_dir, dataset.manifest["frames_per_clip"])
    donors, donor_audio = DonorPicker(table.labels, seed), torch.from_numpy(table.audio)
    k = model.config.mask_classes
    true, swap = SemanticScores(k), SemanticScores(k)
    fpr = {"silence": [0.0, 0], "noise": [0.0, 0]}
    has_other = bool(dataset.manifest.get("has_other_masks"))
    model.to(device)
    with eval_mode(model):
        for batch, positions in batches(dataset, table, batch_size, num_workers, max_clips, device.type == "cuda"):
            scored, real = scored_frames(batch)
            flag = batch["frame_valid"].float()[..., None]  # [B,T,1]: padded seconds keep zero audio
            logits = semantic_logits(model, batch, device, amp_dtype)
            for i in range(len(positions)):
                true.add(logits[i], batch["masks"][i].long(), scored[i], real[i])
            for name, audio in (("silence", silence.expand(len(positions), -1, -1)),
                                ("noise", noise[[p % len(noise) for p in positions]])):
                hits, total = _non_background_rate(semantic_logits(model, batch, device, amp_dtype, audio * flag), real)
                fpr[name][0] += hits
                fpr[name][1] += total
            if has_other:
                _add_swap(model, batch, positions, donors, donor_audio, swap, device, amp_dtype)
            report_progress(progress, true.clips, len(positions))
    iou, _ = swap.all.per_class()
    present = swap.all.count > 0
    return {"split": split, "true": true.overall(),
            "swap": {"miou_other": swap.overall()["miou"] if swap.clips else None,
                     "miou_other_present": float(iou[present].mean()) if present.any() else None,
                     "clips": swap.clips},
            **{name: {"fpr": hits / max(total, 1), "clips": true.clips} for name, (hits, total) in fpr.items()}}


def _add_swap(model, batch, positions, donors, donor_audio, swap: SemanticScores, device, amp_dtype) -> None:
    """Clips with a visible silent object get a donor clip's audio of that object's class; the target is that
    object's mask as its class (other_masks × (other_label + 1))."""

    picks = [(i, donors.swap(p, int(batch["other_label"][i]))) for i, p in enumerate(positions)]
    rows = [i for i, donor in picks if donor is not None]
    if not rows:
        return
    sub = select_rows(batch, rows)
    audio = donor_audio[[donor for _, donor in picks if donor is not None]] * sub["frame_valid"].float()[..., None]
    logits = semantic_logits(model, sub, device, amp_dtype, audio)
    target = sub["other_masks"].long() * (sub["other_label"].long() + 1)[:, None, None, None]
    scored, real = scored_frames(sub)
    for i in range(len(rows)):
        swap.add(logits[i], target[i], scored[i], real[i])
