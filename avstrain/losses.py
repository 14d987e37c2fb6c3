"""Training losses (docs/design.md §7, §17): mask BCE, soft Dice, TPAVI's localisation scores, AVSBench's
audio–visual matching (AVM-AV), the AVSS cross-entropy and the seed's crop losses.

``compute_loss`` combines them with the weights of a ``LossConfig`` (weight 0 = not computed) and returns the
total plus the unweighted parts for logging. Each part is also a public function for use on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LossConfig

if TYPE_CHECKING:  # the model's file imports this one
    from .models.tpavi_avs import AVSOutput


@dataclass
class LossOutput:
    total: Tensor  # scalar, Σ weight·part, carries the graph
    parts: dict[str, Tensor]  # unweighted, detached scalars keyed bce / ce / dice / av / avm / crop_*


def _zero(like: Tensor) -> Tensor:
    # Keeps the graph (and DDP's view of used parameters) intact when a batch has nothing to supervise.
    return like.sum() * 0.0


def mask_bce_loss(logits: Tensor, masks: Tensor, mask_valid: Tensor | None = None,
                  pos_weight: float = 1.0) -> Tensor:
    """Binary cross-entropy of sigmoid(logits) against the masks, averaged over the pixels of the frames that have a
    mask (S4: frame 1; MS3 and the synthetic data: all frames).

    logits [B, T, 1, H, W] or [B, T, H, W]; masks [B, T, H, W] in {0, 1}; mask_valid [B, T] bool (None = all).
    Computed with logits (the stable form of BCE on sigmoid): the reference S4 script feeds sigmoid outputs to
    ``BCEWithLogitsLoss``, a double sigmoid that we do not copy. ``pos_weight`` multiplies the loss of the positive
    pixels (1: plain BCE, the reference).
    """
    logits = logits.reshape(masks.shape)
    weight = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    if mask_valid is not None:
        mask_valid = mask_valid.bool()
        if not mask_valid.any():
            return _zero(logits)
        logits, masks = logits[mask_valid], masks[mask_valid]
    return F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype), pos_weight=weight)


def dice_loss(logits: Tensor, masks: Tensor, mask_valid: Tensor | None = None, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss per supervised frame, 1 − (2 Σ p·m + s) / (Σ p + Σ m + s) with p = sigmoid(logits), averaged
    over the frames that have a mask. An empty mask (negative audio) gives 1 − s / (Σ p + s): it asks for nothing.

    logits [B, T, 1, H, W] or [B, T, H, W]; masks [B, T, H, W] in {0, 1}; mask_valid [B, T] bool (None = all).
    In float32 (sums over a frame's pixels). Not in the AVSBench recipes (docs/design.md §17).
    """
    logits = logits.reshape(masks.shape)
    if mask_valid is not None:
        mask_valid = mask_valid.bool()
        if not mask_valid.any():
            return _zero(logits)
        logits, masks = logits[mask_valid], masks[mask_valid]  # [N, H, W]
    prob = torch.sigmoid(logits.float()).flatten(-2)  # [N, H·W]
    target = masks.float().flatten(-2)
    dice = (2 * (prob * target).sum(-1) + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)
    return (1.0 - dice).mean()


def av_score_loss(av_scores: dict[int, Tensor], masks: Tensor, mask_valid: Tensor | None = None,
                  stage: int = 0) -> Tensor:
    """BCE of TPAVI's localisation scores θ_i·φ_t at one stage, as logits, against the mask area-pooled to that
    stage's size (a soft target in [0, 1]), over the supervised frames: the positions of the sounding object should
    match their frame's audio, every other position (and every position under negative audio) should not.

    av_scores {stage: [B, T, h, w]}; masks [B, T, H, W]; mask_valid [B, T] bool (None = all). Not in the AVSBench
    recipes (docs/design.md §17).
    """
    if stage not in av_scores:
        raise ValueError(f"loss.av at stage {stage} needs TPAVI there; the model has TPAVI at {sorted(av_scores)}")
    scores = av_scores[stage]  # [B, T, h, w]
    target = F.adaptive_avg_pool2d(masks.float().flatten(0, 1)[:, None], scores.shape[-2:]).view(scores.shape)
    if mask_valid is not None:
        mask_valid = mask_valid.bool()
        if not mask_valid.any():
            return _zero(scores)
        scores, target = scores[mask_valid], target[mask_valid]
    return F.binary_cross_entropy_with_logits(scores.float(), target)


def semantic_ce_loss(logits: Tensor, masks: Tensor, mask_valid: Tensor | None = None) -> Tensor:
    """K-class cross-entropy as the AVSS reference computes it (docs/design.md §14): no class weights, no ignore index,
    averaged over the pixels of each frame, then over the labelled frames (Σ frame loss · flag / Σ flag).

    logits [B, T, K, H, W]; masks [B, T, H, W] class indices (0 background); mask_valid [B, T] bool (None = all).
    """
    per_pixel = F.cross_entropy(logits.flatten(0, 1), masks.flatten(0, 1).long(), reduction="none")  # [B·T, H, W]
    per_frame = per_pixel.mean(dim=(-2, -1))  # [B·T]
    if mask_valid is None:
        return per_frame.mean()
    flag = mask_valid.reshape(-1).to(per_frame.dtype)
    if not flag.any():
        return _zero(logits)
    return (per_frame * flag).sum() / flag.sum()


def avm_semantic_loss(logits: Tensor, stage_maps: list[Tensor], audio_proj: dict[int, Tensor],
                      stages: tuple[int, ...] = (0, 1, 2, 3), mask_valid: Tensor | None = None,
                      normalise: bool = False) -> Tensor:
    """The AVSS reference's AVM (docs/design.md §14), KL form on a semantic head.

    Per stage: foreground = (argmax over classes ≠ 0) as float, without gradient, average-pooled to the stage's
    h×w; v = spatial mean of stage map × foreground [B·T, C]; a = TPAVI's audio projection [B·T, C]; per frame
    Σ_C KL(softmax a ‖ softmax v); × labelled-frame flag, / Σ flag. Mean over stages. No L2 normalisation (unless
    `normalise`). logits [B, T, K, H, W]; stage_maps 4 × [B·T, C, h, w]; audio_proj {stage: [B, T, C]};
    mask_valid [B, T] bool (None = all).
    """
    with torch.no_grad():
        foreground = (logits.flatten(0, 1).argmax(dim=1, keepdim=True) != 0).to(stage_maps[0].dtype)  # [B·T,1,H,W]
    flag = (torch.ones(foreground.shape[0], device=logits.device) if mask_valid is None
            else mask_valid.reshape(-1).to(foreground.dtype))  # [B·T]
    if not flag.any():
        return _zero(logits)
    total = _zero(logits)
    for s in stages:
        v_map, a = _stage_inputs(logits, stage_maps, audio_proj, s)
        mask = F.adaptive_avg_pool2d(foreground, v_map.shape[-2:])  # [B·T, 1, h, w]
        v = (v_map * mask).mean(dim=(-2, -1))  # [B·T, C]
        if normalise:
            v, a = F.normalize(v, dim=-1), F.normalize(a, dim=-1)
        per_frame = F.kl_div(F.log_softmax(v, dim=-1), F.softmax(a, dim=-1), reduction="none").sum(-1)  # [B·T]
        total = total + (per_frame * flag).sum() / flag.sum()
    return total / len(stages)


def _stage_inputs(logits: Tensor, stage_maps: list[Tensor], audio_proj: dict[int, Tensor], stage: int):
    if stage not in audio_proj:
        raise ValueError(f"AVM loss at stage {stage} needs TPAVI there; the model has TPAVI at {sorted(audio_proj)}")
    v_map = stage_maps[stage]  # [B·T, C, h, w]
    a = audio_proj[stage].reshape(-1, v_map.shape[1])  # [B·T, C]
    return v_map, a


def avm_kl_loss(logits: Tensor, stage_maps: list[Tensor], audio_proj: dict[int, Tensor],
                stages: tuple[int, ...] = (0, 1, 2, 3), normalise: bool = True) -> Tensor:
    """AVM-AV, KL form (the reference MS3 recipe with ``normalise=False``, ``loss.avm_normalise``'s default).

    Per stage: average-pool the mask logits to the stage size, then sigmoid; v = spatial mean of stage map × mask;
    with `normalise`, L2-normalise v and the projected audio a (the reference does not: docs/design.md §7 said it did
    until issue 15); KL(softmax(a) ‖ softmax(v)) summed over the batch. Mean over stages.
    logits [B, T, 1, H, W]; stage_maps 4 × [B·T, C, h, w]; audio_proj {stage: [B, T, C]}.
    """
    pred = logits.flatten(0, 1)  # [B·T, 1, H, W]
    total = _zero(logits)
    for s in stages:
        v_map, a = _stage_inputs(logits, stage_maps, audio_proj, s)
        mask = torch.sigmoid(F.adaptive_avg_pool2d(pred, v_map.shape[-2:]))  # [B·T, 1, h, w]
        v = (v_map * mask).mean(dim=(-2, -1))  # [B·T, C]
        if normalise:
            v, a = F.normalize(v, dim=-1), F.normalize(a, dim=-1)
        total = total + F.kl_div(F.log_softmax(v, dim=-1), F.softmax(a, dim=-1), reduction="sum")
    return total / len(stages)


def avm_cosine_loss(logits: Tensor, stage_maps: list[Tensor], audio_proj: dict[int, Tensor],
                    stages: tuple[int, ...] = (0, 1, 2, 3)) -> Tensor:
    """AVM-AV in the thresholded-cosine form of the reference S4 code.

    Per stage: sigmoid the logits, average-pool to the stage size, binarise at 0.5; v = stage map summed over the
    object pixels / (their count + 1e-6); L2-normalise v and a; loss = mean over frames of −log(relu(cos) + 1e-6).
    Mean over stages. Shapes as in ``avm_kl_loss``.
    """
    prob = torch.sigmoid(logits.flatten(0, 1))  # [B·T, 1, H, W]
    total = _zero(logits)
    for s in stages:
        v_map, a = _stage_inputs(logits, stage_maps, audio_proj, s)
        mask = (F.adaptive_avg_pool2d(prob, v_map.shape[-2:]) > 0.5).to(v_map.dtype)  # [B·T, 1, h, w]
        count = mask.sum(dim=(-2, -1))  # [B·T, 1]
        v = (v_map * mask).sum(dim=(-2, -1)) / (count + 1e-6)  # [B·T, C]
        v, a = F.normalize(v, dim=-1), F.normalize(a, dim=-1)
        cos = (v * a).sum(dim=-1)  # [B·T]
        total = total + (-torch.log(F.relu(cos) + 1e-6)).mean()
    return total / len(stages)


def _per_crop_labels(labels: Tensor, shape: torch.Size) -> Tensor:
    return labels[:, None].expand(shape) if labels.dim() == 1 else labels


def crop_classification_loss(crop_logits: Tensor, labels: Tensor, crop_valid: Tensor | None = None) -> Tensor:
    """Cross-entropy of each valid crop's logits with its clip's class.

    crop_logits [B, T, K]; labels [B] (the clip's class) or [B, T], with -1 = unknown (ignored);
    crop_valid [B, T] bool (None = all).
    """
    labels = _per_crop_labels(labels, crop_logits.shape[:2]).long()
    keep = labels >= 0
    if crop_valid is not None:
        keep = keep & crop_valid.bool()
    if not keep.any():
        return _zero(crop_logits)
    return F.cross_entropy(crop_logits[keep], labels[keep])


def crop_temporal_loss(crop_embedding: Tensor, crop_valid: Tensor | None = None) -> Tensor:
    """Mean L2 distance (``PairwiseDistance``, eps 1e-6) between embeddings of consecutive crops of a clip; a pair
    counts only when both crops are valid. crop_embedding [B, T, E]; crop_valid [B, T] bool (None = all)."""
    if crop_embedding.shape[1] < 2:
        return _zero(crop_embedding)
    pair = torch.ones(crop_embedding.shape[:1] + (crop_embedding.shape[1] - 1,), dtype=torch.bool,
                      device=crop_embedding.device)  # [B, T-1]
    if crop_valid is not None:
        pair = crop_valid[:, :-1].bool() & crop_valid[:, 1:].bool()
    if not pair.any():
        return _zero(crop_embedding)
    dist = F.pairwise_distance(crop_embedding[:, :-1][pair], crop_embedding[:, 1:][pair])  # [pairs]
    return dist.mean()


def crop_audio_loss(crop_embedding: Tensor, audio_embedding: Tensor, crop_valid: Tensor | None = None) -> Tensor:
    """Mean of 1 − cos(audio, crop) over valid crops.

    crop_embedding [B, T, E]; audio_embedding [B, E] (the clip's audio averaged over T and projected);
    crop_valid [B, T] bool (None = all).
    """
    cos = F.cosine_similarity(crop_embedding, audio_embedding[:, None, :].expand_as(crop_embedding), dim=-1)  # [B,T]
    if crop_valid is not None:
        if not crop_valid.any():
            return _zero(crop_embedding)
        cos = cos[crop_valid.bool()]
    return (1.0 - cos).mean()


def _avm(output: AVSOutput, config: LossConfig, mask_valid: Tensor | None) -> Tensor:
    """The AVM form `loss.avm_variant` names, on the model's output."""
    args = (output.logits, output.stage_maps, output.audio_proj, config.avm_stages)
    if config.avm_variant == "kl_semantic":
        return avm_semantic_loss(*args, mask_valid=mask_valid, normalise=config.avm_normalise)
    if config.avm_variant == "kl":
        return avm_kl_loss(*args, normalise=config.avm_normalise)
    return avm_cosine_loss(*args)


def compute_loss(output: AVSOutput, config: LossConfig, masks: Tensor, mask_valid: Tensor | None = None,
                 labels: Tensor | None = None, crop_valid: Tensor | None = None) -> LossOutput:
    """Weighted sum of the losses switched on in ``config``.

    output: the model's ``AVSOutput``; masks [B, T, H, W]; mask_valid [B, T] (frames that have a mask);
    labels [B] clip classes (crop classification); crop_valid [B, T] (frames whose crop is real).
    Raises ValueError when a switched-on loss lacks its inputs (e.g. crop losses without crops).
    """
    parts: dict[str, Tensor] = {}
    if config.bce > 0:
        parts["bce"] = mask_bce_loss(output.logits, masks, mask_valid, config.pos_weight)
    if config.dice > 0:
        parts["dice"] = dice_loss(output.logits, masks, mask_valid)
    if config.av > 0:
        parts["av"] = av_score_loss(output.av_scores, masks, mask_valid, config.av_stage)
    if config.ce > 0:
        parts["ce"] = semantic_ce_loss(output.logits, masks, mask_valid)
    if config.avm > 0:
        parts["avm"] = _avm(output, config, mask_valid)
    if config.crop_cls > 0:
        if output.crop_logits is None or labels is None:
            raise ValueError("loss.crop_cls > 0 needs crops, a crop classifier (model.num_classes > 0) and labels")
        parts["crop_cls"] = crop_classification_loss(output.crop_logits, labels, crop_valid)
    if config.crop_temporal > 0:
        if output.crop_embedding is None:
            raise ValueError("loss.crop_temporal > 0 needs crops and a crop encoder")
        parts["crop_temporal"] = crop_temporal_loss(output.crop_embedding, crop_valid)
    if config.crop_audio > 0:
        if output.crop_embedding is None or output.crop_audio is None:
            raise ValueError("loss.crop_audio > 0 needs crops, audio and a crop encoder")
        parts["crop_audio"] = crop_audio_loss(output.crop_embedding, output.crop_audio, crop_valid)
    if not parts:
        raise ValueError("every loss weight is 0: nothing to train")
    total = sum(getattr(config, name) * value for name, value in parts.items())
    return LossOutput(total=total, parts={name: value.detach() for name, value in parts.items()})
