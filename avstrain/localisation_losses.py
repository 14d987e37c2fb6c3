"""Losses of the sound-source localisation and audio-visual correspondence models (docs/design.md §13), and what
they need of a batch: negative audio on the same one-second grid, the ground-truth attention map, and which
training clips keep their ground truth in semi-supervised training.

- `senocak_unsupervised_loss`: Senocak et al.'s L_U, softmax of the distances to the own and to a negative sound
  feature against [0, 1], squared error.
- `senocak_supervised_loss`: their L_S, cross-entropy of the attention against the ground-truth map.
- `avc_loss`: audio-visual correspondence (Arandjelović & Zisserman): cross-entropy of two-way logits (AVE-Net) or
  logistic loss of one logit (AVOL-Net) against "this frame goes with this audio"; `correspondence_loss` applies it
  to a model's positive and negative pairs.

Negatives are other clips of the same batch whose class is not visible in the frame: every synthetic scene shows two
classes, so the silent visible object's sound is not a negative at the frame level.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LossConfig
from .eval_data import visible_classes
from .losses import LossOutput

NO_NEGATIVE = -1


def pick_negatives(label: Tensor, other_label: Tensor | None, sounding: Tensor) -> Tensor:
    """For each clip of a batch, another clip of the batch whose primary class is not visible in it.

    label [B] (-1: none), other_label [B] or None, sounding [B,C] bool -> [B] long, `NO_NEGATIVE` where no clip of
    the batch qualifies. Deterministic: the first qualifying clip after it in batch order, cyclically (the batch
    order is already shuffled), so a resumed run draws exactly what an uninterrupted one does.
    """

    labels = label.tolist()
    others = other_label.tolist() if other_label is not None else [-1] * len(labels)
    batch = len(labels)
    negatives = []
    for i in range(batch):
        visible = visible_classes(labels[i], others[i], sounding[i])
        donors = (j % batch for j in range(i + 1, i + batch))
        negatives.append(next((j for j in donors if labels[j] >= 0 and labels[j] not in visible), NO_NEGATIVE))
    return torch.tensor(negatives, dtype=torch.long, device=label.device)


def negative_audio(audio: Tensor, negatives: Tensor) -> Tensor:
    """audio [B,T,D], negatives [B] from `pick_negatives` -> [B,T,D]: second t of the negative clip for second t
    of each clip (the same time grid as the positives); a clip without a negative gets its own audio, which the
    losses then leave out."""
    return audio[torch.where(negatives >= 0, negatives, torch.arange(len(negatives), device=negatives.device))]


def keeps_ground_truth(names: Sequence[str], fraction: float, seed: int = 0) -> Tensor:
    """[B] bool: which clips keep their localisation ground truth when only `fraction` of the training clips do.

    A pure function of (seed, clip name): the same clips keep it in every epoch, on every rank and after a resume,
    and the others never expose it. 0 keeps none, 1 keeps all.
    """
    if fraction >= 1:
        return torch.ones(len(names), dtype=torch.bool)
    # A cryptographic hash, so that similar names (clip0001, clip0002, ...) still give independent draws in [0, 1).
    draws = [int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big") / 2 ** 64
             for name in names]
    return torch.tensor([draw < fraction for draw in draws], dtype=torch.bool)


def _masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of values [N] over valid [N] (all when None); 0 with the graph kept when nothing is valid."""
    if valid is None:
        return values.mean()
    if not valid.any():
        return values.sum() * 0.0
    return values[valid].mean()


def senocak_unsupervised_loss(visual: Tensor, positive: Tensor, negative: Tensor, valid: Tensor | None = None
                              ) -> Tensor:
    """L_U = mean((softmax([d+, d-]) - [0, 1])²), d± = ‖f_v - f_s±‖₂.

    visual f_v, positive f_s+, negative f_s- [N,D] (any leading shape, flattened); valid [N] bool: samples that have
    a negative. The mean runs over the two entries and the valid samples.
    """
    visual, positive, negative = (x.reshape(-1, x.shape[-1]).float() for x in (visual, positive, negative))
    distances = torch.stack([(visual - positive).norm(dim=1), (visual - negative).norm(dim=1)], dim=1)  # [N, 2]
    target = torch.tensor([0.0, 1.0], device=visual.device)
    errors = ((distances.softmax(dim=1) - target) ** 2).mean(dim=1)  # [N]
    return _masked_mean(errors, None if valid is None else valid.reshape(-1))


def ground_truth_maps(masks: Tensor, mask_valid: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Where the object is, per frame: its mask, or the map of its boxes where the frame has no mask.

    masks [N,H,W] (0/1), mask_valid [N] bool, boxes [N,K,4] normalised xyxy (NaN padding) -> (maps [N,H,W] float
    0/1, valid [N] bool: frames with a mask or a box).
    """
    height, width = masks.shape[-2:]
    rows = (torch.arange(height, device=masks.device) + 0.5) / height  # pixel centres, normalised
    cols = (torch.arange(width, device=masks.device) + 0.5) / width
    x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))  # [N,K,1,1]
    inside = (cols >= x0) & (cols < x1) & (rows[:, None] >= y0) & (rows[:, None] < y1)  # [N,K,H,W]; NaN: False
    maps = torch.where(mask_valid[:, None, None].bool(), masks.float(), inside.any(dim=1).float())  # [N,H,W]
    return maps, mask_valid.bool() | inside.flatten(1).any(dim=1)


def ground_truth_attention(masks: Tensor, mask_valid: Tensor, boxes: Tensor, size: tuple[int, int]
                           ) -> tuple[Tensor, Tensor]:
    """α_GT: the ground-truth map (`ground_truth_maps`) at the attention size, normalised to sum 1.

    -> (maps [N,h,w], valid [N] bool: frames whose map is not empty).
    """
    full, _ = ground_truth_maps(masks, mask_valid, boxes)
    maps = F.adaptive_avg_pool2d(full[:, None], size)[:, 0]  # [N,h,w]: the object's share of each cell
    total = maps.flatten(1).sum(1)
    valid = total > 0
    return maps / torch.where(valid, total, torch.ones_like(total))[:, None, None], valid


def senocak_supervised_loss(log_attention: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """L_S = -Σ α_GT log α, averaged over the valid samples.

    log_attention [N,h,w] (log-softmax over the positions), target α_GT [N,h,w] summing to 1, valid [N] bool.
    """
    losses = -(target.float() * log_attention.float()).flatten(1).sum(1)  # [N]
    return _masked_mean(losses, valid)


def avc_loss(logits: Tensor, positive: Tensor, valid: Tensor | None = None) -> Tensor:
    """Audio-visual correspondence: logits [N,2] (AVE-Net: class 1 = corresponds) → cross-entropy, or [N] (AVOL-Net:
    the MIL logit) → logistic loss; positive [N] bool: the pair corresponds; valid [N] bool: pairs that count."""
    if logits.dim() == 2:
        losses = F.cross_entropy(logits.float(), positive.long(), reduction="none")
    else:
        losses = F.binary_cross_entropy_with_logits(logits.float(), positive.float(), reduction="none")
    return _masked_mean(losses, valid)


def correspondence_loss(output, config: LossConfig) -> LossOutput:
    """AVC over balanced pairs: each frame with its own second (positive) and with its negative's (negative, where
    the batch had one). Shared by AVE-Net ([B,T,2] logits) and AVOL-Net ([B,T] logits)."""
    T = output.logits.shape[1]
    positives = output.logits.flatten(0, 1)  # [B·T, 2] or [B·T]
    negatives = output.negative_logits.flatten(0, 1)
    negative_valid = output.negative_valid.repeat_interleave(T)  # [B·T]
    logits = torch.cat([positives, negatives])
    labels = torch.cat([torch.ones_like(negative_valid), torch.zeros_like(negative_valid)])
    valid = torch.cat([torch.ones_like(negative_valid), negative_valid])
    part = avc_loss(logits, labels, valid)
    return LossOutput(total=config.avc * part, parts={"avc": part.detach()})


__all__ = ["NO_NEGATIVE", "avc_loss", "correspondence_loss", "ground_truth_attention", "ground_truth_maps",
           "keeps_ground_truth", "negative_audio", "pick_negatives", "senocak_supervised_loss",
           "senocak_unsupervised_loss"]
