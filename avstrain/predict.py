"""Predicted masks as files: write them in the AVSBench layout, and score any method's mask PNGs against ground truth.

Written masks are 0/255 single-channel PNGs named like the ground truth, frame numbers 1..T (docs/design.md §12):
`<out>/<split>/<category>/<clip>/<clip>_<k>.png` (S4 layout; clips without a class go to `<out>/<split>/<clip>/`).
Scoring finds files by stem, recursively, under both roots, so it reads the S4 and MS3 layouts alike; the reference's
own `save_mask` numbers frames from 0, which `index_base=0` accounts for.

A localiser (senocak, avolnet; docs/design.md §13) predicts heat maps, not masks: they are written in the same layout as
8-bit grey PNGs, each frame's map upsampled to the frame and scaled from its minimum (0) to its maximum (255).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from avsprep.errors import InputError
from avstrain.data import ShardDataset
from avstrain.evaluate import predict_logits
from avstrain.visualise import check_draws, predict_with_heat, scale_heat
from avstrain.metrics import FPRMeter, SegmentationMeter
from avstrain.runtime import eval_mode

log = logging.getLogger(__name__)

# Binary masks scored as logits: far enough from 0 that every F-measure threshold sees them as 0 or 1.
BINARY_LOGIT = 20.0


def write_predictions(model: torch.nn.Module, shards_dir: str | Path, out: str | Path, split: str = "test",
                      device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None, batch_size: int = 4,
                      progress: Callable[[int], None] | None = None) -> int:
    """Write sigmoid(logit) > 0.5 as 0/255 PNGs for every clip of the split (a localiser: its heat maps, scaled to
    0..255 per frame); returns the number of files written. AVE-Net, which draws neither, is an InputError."""
    check_draws(model)
    device, out = torch.device(device), Path(out)
    dataset = ShardDataset(shards_dir, split, shuffle=False)
    written = 0
    model.to(device)
    with eval_mode(model):
        for batch in DataLoader(dataset, batch_size=batch_size):
            if hasattr(model, "heatmaps"):
                masks = scale_heat(predict_with_heat(model, batch["frames"], batch["audio"], device, amp_dtype)
                                   .heat.numpy())
            else:
                logits = predict_logits(model, batch, device, amp_dtype)  # [B,T,1,S,S]
                masks = ((logits[:, :, 0] > 0).numpy() * 255).astype(np.uint8)  # sigmoid > 0.5 <=> logit > 0
            for name, label, clip_masks in zip(batch["name"], batch["label"].tolist(), masks):
                folder = out / split / (dataset.classes[label] if label >= 0 else "") / name
                folder.mkdir(parents=True, exist_ok=True)
                for k, mask in enumerate(clip_masks, start=1):
                    cv2.imwrite(str(folder / f"{name}_{k}.png"), mask)
                    written += 1
            if progress:
                progress(len(batch["name"]))
    return written


def _index_pngs(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise InputError(root, "directory does not exist")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.png")):
        if path.stem in found:
            raise InputError(path, f"two masks named {path.stem}: also {found[path.stem]}")
        found[path.stem] = path
    return found


def _read_binary(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InputError(path, "cannot read mask image")
    if shape is not None and mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8) if shape is not None else (mask > 0).astype(np.uint8)


def score_directories(pred: str | Path, gt: str | Path, index_base: int = 1, csv_path: str | Path | None = None,
                      frames_per_clip: int = 5) -> dict:
    """Score predicted mask PNGs (> 127 is object) against ground-truth PNGs (> 0 is object: 0/255 and palette).

    Ground truth `<clip>_<k>` (k from 1) is matched with the prediction `<clip>_<k - 1 + index_base>`. A missing
    prediction is bad input. Returns {"miou", "f", "f_avsbench", "fpr", "frames", "clips"}; `fpr` is over the frames
    whose ground truth is empty (None when there are none). Writes a per-clip CSV (clip, frames, miou, f) if asked.
    """
    pred_index, gt_index = _index_pngs(Path(pred)), _index_pngs(Path(gt))
    if not gt_index:
        raise InputError(gt, "no ground-truth PNGs")
    clips: dict[str, list[tuple[int, Path]]] = {}
    for stem, path in gt_index.items():
        clip, _, k = stem.rpartition("_")
        if not clip or not k.isdigit():
            raise InputError(path, "ground-truth name is not <clip>_<k>")
        clips.setdefault(clip, []).append((int(k), path))
    overall = SegmentationMeter(clips_per_batch=4, frames_per_clip=frames_per_clip)
    empty_fpr, rows = FPRMeter(), []
    for clip in sorted(clips):
        per_clip = SegmentationMeter(clips_per_batch=1, frames_per_clip=len(clips[clip]))
        for k, gt_path in sorted(clips[clip]):
            target = _read_binary(gt_path)
            pred_stem = f"{clip}_{k - 1 + index_base}"
            if pred_stem not in pred_index:
                raise InputError(pred, f"no predicted mask {pred_stem}.png for {gt_path.name}")
            prediction = _read_binary(pred_index[pred_stem], target.shape)
            logits = torch.from_numpy(prediction).float().mul(2 * BINARY_LOGIT).sub(BINARY_LOGIT)[None]
            target_tensor = torch.from_numpy(target).float()[None]
            overall.update(logits, target_tensor)
            per_clip.update(logits, target_tensor)
            if not target.any():
                empty_fpr.update(logits)
        scores = per_clip.compute()
        rows.append({"clip": clip, "frames": len(clips[clip]), "miou": scores["miou"], "f": scores["f"]})
    result = {**overall.compute(), "fpr": empty_fpr.compute() if empty_fpr.pixels else None,
              "frames": sum(r["frames"] for r in rows), "clips": len(rows)}
    if csv_path is not None:
        with Path(csv_path).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["clip", "frames", "miou", "f"])
            writer.writeheader()
            writer.writerows(rows)
    return result
