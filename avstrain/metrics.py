"""Evaluation metrics with AVSBench semantics (docs/design.md §8), as functions and as streaming meters.

The meters keep O(1) state per split (sums and a 255-point curve), so evaluation never holds predictions or masks
of a whole test set: feed them batch by batch, in clip order, and read ``compute()`` at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_THRESHOLDS = 255
BETA2 = 0.3
IOU_EPS = 1e-7
PR_EPS = 1e-20


def _as_frames(x: Tensor) -> Tensor:
    """[N, H, W] or [N, 1, H, W] or [B, T, (1,) H, W] -> [N, H, W]."""
    if x.dim() == 5 or (x.dim() == 4 and x.shape[1] == 1):
        x = x.reshape(-1, *x.shape[-2:])
    elif x.dim() == 4:
        x = x.flatten(0, 1)
    if x.dim() != 3:
        raise ValueError(f"expected frames [N, H, W], got shape {tuple(x.shape)}")
    return x


def _binary(target: Tensor) -> Tensor:
    return target > 0.5


def frame_ious(logits: Tensor, target: Tensor) -> Tensor:
    """Per-frame IoU [N] of sigmoid(logits) > 0.5 against the target; a frame with an empty target scores the
    fraction of pixels correctly left empty, |¬P∩¬G| / (H·W). logits, target [N, H, W]."""
    logits, target = _as_frames(logits), _as_frames(target)
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    pred = torch.sigmoid(logits.float()) > 0.5
    gt = _binary(target)
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    empty = ~gt.flatten(1).any(1)
    inter = torch.where(empty, (~pred & ~gt).flatten(1).sum(1).double(), inter)
    union = torch.where(empty, torch.full_like(union, gt.shape[1] * gt.shape[2]), union)
    return inter / (union + IOU_EPS)


def mask_iou(logits: Tensor, target: Tensor) -> float:
    """mIoU (M_J): mean of ``frame_ious`` over frames. logits, target [N, H, W]."""
    ious = frame_ious(logits, target)
    return float(ious.mean()) if ious.numel() else 0.0


def frame_f_curves(logits: Tensor, target: Tensor, num_thresholds: int = NUM_THRESHOLDS,
                   beta2: float = BETA2) -> tuple[Tensor, Tensor]:
    """F-measure curves of each frame over thresholds linspace(0, 1 − 1e-10, 255) on sigmoid probabilities.

    logits, target [N, H, W] -> (curves [N, num_thresholds] float64, nonempty [N] bool). Frames with an empty target
    get a zero curve and nonempty False: AVSBench leaves them out of the F-measure. Precision, recall and F follow
    the reference in float32 (its 1e-20 guards, NaN → 0). The per-threshold counts come from one histogram per
    frame (``searchsorted`` puts each pixel above exactly the thresholds it passes, p ≥ th), which gives the
    reference's counts without its 255 passes over the image.
    """
    logits, target = _as_frames(logits), _as_frames(target)
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    n = logits.shape[0]
    prob = torch.sigmoid(logits.float()).flatten(1)  # [N, HW]
    gt = _binary(target).flatten(1)  # [N, HW]
    thresholds = torch.linspace(0, 1 - 1e-10, num_thresholds, device=prob.device)  # float32, as the reference
    passed = torch.searchsorted(thresholds, prob.contiguous(), right=True)  # [N, HW]: #thresholds with th <= p
    bins = num_thresholds + 1
    offset = torch.arange(n, device=prob.device)[:, None] * bins
    hist_all = torch.bincount((passed + offset).flatten(), minlength=n * bins).view(n, bins)
    hist_tp = torch.bincount((passed + offset)[gt], minlength=n * bins).view(n, bins)
    # predicted positive at threshold i <=> passed > i: reverse cumulative sums over bins 1..255.
    positives = hist_all.flip(1).cumsum(1).flip(1)[:, 1:].float()  # [N, thresholds]
    tp = hist_tp.flip(1).cumsum(1).flip(1)[:, 1:].float()
    gt_count = gt.sum(1, keepdim=True).float()
    precision = tp / (positives + PR_EPS)
    recall = tp / (gt_count + PR_EPS)
    f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
    f = torch.nan_to_num(f, nan=0.0)
    nonempty = gt_count[:, 0] > 0
    f = torch.where(nonempty[:, None], f, torch.zeros_like(f))
    return f.double(), nonempty


def f_measure(logits: Tensor, target: Tensor) -> float:
    """Dataset-level F-measure (M_F, β² = 0.3): max over thresholds of the mean curve of the frames with a
    non-empty target; 0 when there are none. logits, target [N, H, W]."""
    curves, nonempty = frame_f_curves(logits, target)
    if not nonempty.any():
        return 0.0
    return float(curves[nonempty].mean(0).max())


def f_measure_avsbench(logits: Tensor, target: Tensor, clips_per_batch: int = 4, frames_per_clip: int = 5) -> float:
    """The figure the reference test script reports: F-measure per test batch of ``clips_per_batch`` clips
    (frames in clip order), a batch with only empty masks scoring 0, averaged over batches (the last, partial
    batch included). logits, target [N, H, W]."""
    meter = SegmentationMeter(clips_per_batch=clips_per_batch, frames_per_clip=frames_per_clip)
    meter.update(logits, target)
    return meter.compute()["f_avsbench"]


def fpr(logits: Tensor) -> float:
    """False-positive rate on clips whose target is empty (negative audio): the fraction of pixels with
    sigmoid(logit) > 0.5. logits [N, H, W] (any shape)."""
    if logits.numel() == 0:
        return 0.0
    return float((torch.sigmoid(logits.float()) > 0.5).double().mean())


def ndcg(query: Tensor, gallery: Tensor, query_labels: Tensor, gallery_labels: Tensor, k: int | None = 30,
         exclude_self: bool = False) -> float:
    """Mean nDCG@k of retrieval (Arandjelović & Zisserman 2018), by `sklearn.metrics.ndcg_score`: each query (e.g.
    an audio embedding) ranks the gallery (e.g. image embeddings) by cosine similarity (for L2-normalised embeddings
    the order of the Euclidean distance); an item is relevant (gain 1) when its label equals the query's. Queries
    with no relevant item are left out; 0 when no query is left. Tied scores share their gains (sklearn's default).

    query [Q, D], gallery [G, D], query_labels [Q], gallery_labels [G]; k = None ranks the whole gallery.
    `exclude_self`: query and gallery are the same items (im→im, aud→aud), and an item never retrieves itself.
    """
    from sklearn.metrics import ndcg_score

    q = torch.nn.functional.normalize(query.double(), dim=-1)
    g = torch.nn.functional.normalize(gallery.double(), dim=-1)
    scores = q @ g.T  # [Q, G]
    relevant = (query_labels[:, None] == gallery_labels[None, :]).double()  # [Q, G]
    if exclude_self:  # drop the diagonal: [Q, G - 1]
        off_diagonal = ~torch.eye(len(q), dtype=torch.bool)
        scores, relevant = (x[off_diagonal].view(len(q), -1) for x in (scores, relevant))
    keep = relevant.sum(1) > 0
    if not keep.any():
        return 0.0
    if relevant.shape[1] == 1:  # sklearn refuses a single document; a lone relevant item is ranked first
        return 1.0
    return float(ndcg_score(relevant[keep].numpy(), scores[keep].numpy(), k=k))


class SegmentationMeter:
    """Streaming mIoU, F-measure and the reference's per-batch F-measure.

    ``update`` takes frames in clip order ([N, H, W] logits and targets, any N); ``compute`` returns
    ``{"miou", "f", "f_avsbench"}``. The AVSBench batching (``clips_per_batch`` clips of ``frames_per_clip``
    frames) is rebuilt from the frame order, whatever batch sizes the caller uses.
    """

    def __init__(self, clips_per_batch: int = 4, frames_per_clip: int = 5,
                 num_thresholds: int = NUM_THRESHOLDS) -> None:
        self.batch_frames = clips_per_batch * frames_per_clip
        self.num_thresholds = num_thresholds
        self.reset()

    def reset(self) -> None:
        self.frames = 0
        self.iou_sum = 0.0
        self.f_sum = torch.zeros(self.num_thresholds, dtype=torch.float64)
        self.f_frames = 0
        self._batch_sum = torch.zeros(self.num_thresholds, dtype=torch.float64)
        self._batch_nonempty = 0
        self._batch_seen = 0
        self._batch_scores_sum = 0.0
        self._batches = 0

    def update(self, logits: Tensor, target: Tensor) -> None:
        logits, target = _as_frames(logits.detach()), _as_frames(target.detach())
        self.frames += logits.shape[0]
        self.iou_sum += float(frame_ious(logits, target).sum())
        curves, nonempty = frame_f_curves(logits, target, self.num_thresholds)
        curves, nonempty = curves.cpu(), nonempty.cpu()
        self.f_sum += curves.sum(0)  # empty frames contribute zero curves
        self.f_frames += int(nonempty.sum())
        start = 0
        while start < len(curves):
            take = min(self.batch_frames - self._batch_seen, len(curves) - start)
            self._batch_sum += curves[start:start + take].sum(0)
            self._batch_nonempty += int(nonempty[start:start + take].sum())
            self._batch_seen += take
            start += take
            if self._batch_seen == self.batch_frames:
                self._close_batch()

    def _batch_score(self) -> float:
        if self._batch_nonempty == 0:
            return 0.0
        return float((self._batch_sum / self._batch_nonempty).max())

    def _close_batch(self) -> None:
        self._batch_scores_sum += self._batch_score()
        self._batches += 1
        self._batch_sum.zero_()
        self._batch_nonempty = 0
        self._batch_seen = 0

    def compute(self) -> dict[str, float]:
        """``miou`` (mean over frames), ``f`` (dataset level), ``f_avsbench`` (mean over reference batches)."""
        scores, batches = self._batch_scores_sum, self._batches
        if self._batch_seen:  # the last, partial batch counts as one, as in the reference's DataLoader
            scores, batches = scores + self._batch_score(), batches + 1
        return {
            "miou": self.iou_sum / self.frames if self.frames else 0.0,
            "f": float((self.f_sum / self.f_frames).max()) if self.f_frames else 0.0,
            "f_avsbench": scores / batches if batches else 0.0,
        }


class FPRMeter:
    """Streaming ``fpr``: positive pixels over all pixels, over every update."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.positive = 0
        self.pixels = 0

    def update(self, logits: Tensor) -> None:
        self.positive += int((torch.sigmoid(logits.detach().float()) > 0.5).sum())
        self.pixels += logits.numel()

    def compute(self) -> float:
        return self.positive / self.pixels if self.pixels else 0.0


__all__ = ["mask_iou", "f_measure", "f_measure_avsbench", "fpr", "ndcg", "frame_ious", "frame_f_curves",
           "SegmentationMeter", "FPRMeter"]


# --- Semantic segmentation (AVSS, docs/design.md §14) ------------------------------------------------------------

SEMANTIC_EPS = 2.220446049250313e-16  # the reference's IoU epsilon (numpy's float64 machine epsilon)


class SemanticMeter:
    """The official AVSS metric, streaming: per-frame, per-class IoU and F accumulated over the frames where the class
    is in the union of prediction and target, then the mean over **all** K classes, background included (a class that
    never occurs counts 0), as `avs_scripts/avss/utils/compute_color_metrics.py` with `test.py` computes it.

    Per frame and class c: I = |pred=c ∧ gt=c|, P = |pred=c|, G = |gt=c|, U = P + G − I; IoU = I / (U + ε);
    F = (1 + β²)·prec·rec / (β²·prec + rec) with prec = I/P, rec = I/G, NaN → 0; count_c += 1 where U > 0.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.iou_sum = torch.zeros(self.num_classes, dtype=torch.float64)
        self.f_sum = torch.zeros(self.num_classes, dtype=torch.float64)
        self.count = torch.zeros(self.num_classes, dtype=torch.float64)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """logits [N,K,H,W] (or class indices [N,H,W] of a prediction already made); target [N,H,W] class indices."""
        pred = logits.argmax(1) if logits.dim() == 4 else logits
        pred, target = pred.flatten(1).long(), target.flatten(1).long().to(pred.device)  # [N, H·W]
        classes = torch.arange(self.num_classes, device=pred.device)[None, :, None]  # [1, K, 1]
        p_hit, g_hit = pred[:, None] == classes, target[:, None] == classes  # [N, K, H·W]
        inter = (p_hit & g_hit).sum(-1).double().cpu()  # [N, K]
        p_count, g_count = p_hit.sum(-1).double().cpu(), g_hit.sum(-1).double().cpu()
        union = p_count + g_count - inter
        iou = inter / (union + SEMANTIC_EPS)
        precision, recall = inter / p_count, inter / g_count  # 0/0 = NaN where the class is absent: F → 0 below
        f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
        self.iou_sum += iou.sum(0)
        self.f_sum += torch.nan_to_num(f, nan=0.0).sum(0)
        self.count += (union > 0).double().sum(0)

    def per_class(self) -> tuple[Tensor, Tensor]:
        """(IoU [K], F [K]) per class: Σ over frames / frames where the class occurred; 0 for a class never seen."""
        iou = torch.nan_to_num(self.iou_sum / self.count, nan=0.0)
        f = torch.nan_to_num(self.f_sum / self.count, nan=0.0)
        return iou, f

    def compute(self) -> dict[str, float]:
        iou, f = self.per_class()
        return {"miou": float(iou.mean()), "f": float(f.mean())}


def semantic_scores(logits: Tensor, target: Tensor) -> dict[str, float]:
    """The official AVSS mIoU and F of one set of frames: logits [N,K,H,W], target [N,H,W] class indices."""
    meter = SemanticMeter(logits.shape[1])
    meter.update(logits, target)
    return meter.compute()


# --- Sound-source localisation (docs/design.md §13) --------------------------------------------------------------

CIOU_SUCCESS = 0.5
AUC_THRESHOLDS = tuple(0.05 * i for i in range(21))


def upsample_heatmaps(heatmaps: Tensor, size: tuple[int, int]) -> Tensor:
    """[N,h,w] → [N,H,W] float32, bilinear (align_corners False), as the field's evaluators resize heat maps."""
    maps = heatmaps.float()[:, None]
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps[:, 0]


def _top_half(maps: Tensor) -> Tensor:
    """Min-max normalise each map and keep the pixels ≥ the value at sorted position int(H·W/2): [N,H,W] → {0,1}.

    A constant map normalises to zeros, every pixel equals the threshold, so it predicts the whole frame.
    """
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    normalised = (flat - low) / torch.where(high > low, high - low, torch.ones_like(high))
    threshold = normalised.sort(1).values[:, flat.shape[1] // 2, None]
    return (normalised >= threshold).float().reshape(maps.shape)


def ciou_per_sample(heatmaps: Tensor, gt_maps: Tensor) -> Tensor:
    """cIoU of each sample [N]: Σ(pred·gt) / (Σgt + Σ pred·[gt = 0]), pred = the top half of the upsampled map,
    gt soft in [0, 1] (e.g. min(Σ boxes / 2, 1)) or binary."""
    gt = gt_maps.float()
    pred = _top_half(upsample_heatmaps(heatmaps, tuple(gt.shape[-2:])))
    inter = (pred * gt).flatten(1).sum(1)
    return inter / (gt.flatten(1).sum(1) + (pred * (gt == 0)).flatten(1).sum(1))


def localisation_scores(heatmaps: Tensor, gt_maps: Tensor) -> dict[str, float]:
    """The field's shared localisation evaluator (LVS, EZ-VSL, SLAVC): heat maps [N,h,w], ground truth [N,H,W].

    "ciou": fraction of samples with cIoU ≥ 0.5; "auc": area under that success rate over thresholds 0, 0.05, …, 1
    (`sklearn.metrics.auc`); "mean_ciou": the mean cIoU.
    """
    return _success_scores(ciou_per_sample(heatmaps, gt_maps))


def ciou_ceiling(gt_maps: Tensor) -> Tensor:
    """The best cIoU any heat map can reach under the top-half rule, per sample [N] (gt [N,H,W] soft or binary).

    The rule predicts at least the H·W − int(H·W/2) pixels at or above the median position; the best map ranks every
    object pixel first (ties may keep all of them) and fills the rest of that half with background, so an object
    smaller than half the frame caps cIoU at about twice its area fraction."""
    gt = gt_maps.float().flatten(1)  # [N,H·W]
    keep = gt.shape[1] - gt.shape[1] // 2
    background = (keep - (gt > 0).sum(1)).clamp(min=0)  # [N] background pixels the rule forces in
    return gt.sum(1) / (gt.sum(1) + background)


def localisation_ceiling(gt_maps: Tensor) -> dict[str, float]:
    """`localisation_scores` of the best heat map the top-half rule allows (`ciou_ceiling`): what a perfect localiser
    would score on these ground-truth maps [N,H,W]."""
    return _success_scores(ciou_ceiling(gt_maps))


def _success_scores(cious: Tensor) -> dict[str, float]:
    from sklearn.metrics import auc

    cious = cious.double()
    success = [float((cious >= t).double().mean()) for t in AUC_THRESHOLDS]
    return {"ciou": float((cious >= CIOU_SUCCESS).double().mean()), "auc": float(auc(AUC_THRESHOLDS, success)),
            "mean_ciou": float(cious.mean())}


def pointing_hits(heatmaps: Tensor, gt_maps: Tensor) -> Tensor:
    """Pointing game per sample [N] bool, read on the heat map's own grid: the centre of its maximal cell (first one
    on ties), mapped to the ground truth's resolution, lies inside the object (gt > 0). heatmaps [N,h,w], gt [N,H,W]."""
    n, h, w = heatmaps.shape
    height, width = gt_maps.shape[-2:]
    cell = heatmaps.flatten(1).float().argmax(1)  # [N]
    rows = ((cell // w).double() + 0.5) * height / h
    cols = ((cell % w).double() + 0.5) * width / w
    rows, cols = rows.long().clamp(0, height - 1), cols.long().clamp(0, width - 1)
    return gt_maps[torch.arange(n), rows, cols] > 0


def pixel_average_precision(heatmaps: Tensor, gt_maps: Tensor) -> float:
    """Average precision (`sklearn.metrics.average_precision_score`) of the upsampled heat maps' pixels against the
    object pixels (gt > 0) over all samples: size-independent, unlike the top-half rule."""
    from sklearn.metrics import average_precision_score

    maps = upsample_heatmaps(heatmaps, tuple(gt_maps.shape[-2:]))
    labels = (gt_maps > 0).flatten().numpy()
    if not labels.any():
        return float("nan")
    return float(average_precision_score(labels, maps.flatten().double().numpy()))
