"""Metrics on hand-made masks with known answers, and the streaming meters against the one-shot functions."""

import math

import pytest
import torch

from avstrain.metrics import (FPRMeter, SegmentationMeter, f_measure, f_measure_avsbench, fpr, frame_f_curves,
                              frame_ious, mask_iou, ndcg)

POS, NEG = 20.0, -20.0


def _logit(p):
    return math.log(p / (1 - p))


def _reference_f_curve(logits, target, num=255):
    """The AVSBench evaluation loop, literally: 255 thresholds, one pass each, float32, NaN -> 0."""
    prob = torch.sigmoid(logits)
    thresholds = torch.linspace(0, 1 - 1e-10, num)
    prec, recall = torch.zeros(num), torch.zeros(num)
    for i in range(num):
        pred = (prob >= thresholds[i]).float()
        tp = (pred * target).sum()
        prec[i], recall[i] = tp / (pred.sum() + 1e-20), tp / (target.sum() + 1e-20)
    f = 1.3 * prec * recall / (0.3 * prec + recall)
    f[f != f] = 0
    return f


def test_iou_by_hand():
    logits = torch.tensor([[[POS, POS], [NEG, NEG]],
                           [[NEG, POS], [NEG, NEG]],
                           [[0.0, NEG], [NEG, NEG]]])  # logit 0 is sigmoid 0.5: not positive
    target = torch.tensor([[[0, 1], [0, 1]],
                           [[0, 0], [0, 0]],
                           [[0, 0], [0, 0]]], dtype=torch.float32)
    # 1 shared of 3 in the union; empty target: 3 of 4 pixels correctly empty; empty and nothing predicted: 1.
    expected = [1 / 3, 3 / 4, 1.0]
    assert frame_ious(logits, target).tolist() == pytest.approx(expected, rel=1e-6)
    assert mask_iou(logits, target) == pytest.approx(sum(expected) / 3, rel=1e-6)


def test_iou_all_positive_predictions():
    logits = torch.full((2, 4, 4), POS)
    target = torch.zeros(2, 4, 4)
    target[0, :2] = 1
    assert frame_ious(logits, target).tolist() == pytest.approx([0.5, 0.0], abs=1e-6)


def test_iou_accepts_model_shaped_tensors():
    logits = torch.randn(2, 5, 1, 8, 8)
    target = (torch.rand(2, 5, 8, 8) > 0.5).float()
    assert mask_iou(logits, target) == pytest.approx(mask_iou(logits.view(10, 8, 8), target.view(10, 8, 8)))


def test_f_measure_single_frame_by_hand():
    # Pixels: a (object, p = 0.9), b (p = 0.2), c and d (p = 0).
    logits = torch.tensor([[[_logit(0.9), _logit(0.2)], [-200.0, -200.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    curves, nonempty = frame_f_curves(logits, target)
    thresholds = torch.linspace(0, 1 - 1e-10, 255)
    f_all, f_ab = 1.3 * 0.25 / (0.3 * 0.25 + 1), 1.3 * 0.5 / (0.3 * 0.5 + 1)
    expected = torch.where(thresholds <= 0, f_all,
                           torch.where(thresholds <= 0.2, f_ab, torch.where(thresholds <= 0.9, 1.0, 0.0)))
    assert nonempty.tolist() == [True]
    torch.testing.assert_close(curves[0].float(), expected.float(), rtol=0, atol=1e-6)
    assert f_measure(logits, target) == pytest.approx(1.0)


def test_f_measure_matches_the_reference_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 16, 16, generator=gen) * 3
    target = (torch.rand(6, 16, 16, generator=gen) > 0.6).float()
    target[2] = 0  # empty frames are left out
    logits[3] = POS  # all positive
    curves, nonempty = frame_f_curves(logits, target)
    for i in range(6):
        if nonempty[i]:
            torch.testing.assert_close(curves[i].float(), _reference_f_curve(logits[i], target[i]), rtol=0,
                                       atol=1e-6)
    mean_curve = torch.stack([_reference_f_curve(logits[i], target[i]) for i in range(6) if i != 2]).mean(0)
    assert f_measure(logits, target) == pytest.approx(mean_curve.max().item(), rel=1e-6)


def test_f_measure_is_max_of_mean_not_mean_of_max():
    # Frame 0 is perfect only at high thresholds, frame 1 only at low ones.
    logits = torch.tensor([[[_logit(0.9), _logit(0.6)]], [[_logit(0.3), -200.0]]])
    target = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    mean_curve = (_reference_f_curve(logits[0], target[0]) + _reference_f_curve(logits[1], target[1])) / 2
    assert f_measure(logits, target) == pytest.approx(mean_curve.max().item(), rel=1e-6)
    assert f_measure(logits, target) < 1.0


def test_f_measure_all_positive_and_nan_prone_cases():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    # Everything positive: P = 0.5, R = 1 until the last threshold (1.0 in float32), where P = R = 0 (NaN -> 0).
    assert f_measure(torch.full((1, 4, 4), 10.0), target) == pytest.approx(1.3 * 0.5 / (0.15 + 1), rel=1e-6)
    # Nothing positive anywhere but at threshold 0: finite, no NaN.
    value = f_measure(torch.full((1, 4, 4), -200.0), target)
    assert math.isfinite(value) and value == pytest.approx(1.3 * 0.5 / (0.15 + 1), rel=1e-6)
    # Only empty targets: the frames are left out and the score is 0, not NaN.
    assert f_measure(torch.randn(3, 4, 4), torch.zeros(3, 4, 4)) == 0.0


def test_f_avsbench_batches_by_hand():
    perfect = torch.tensor([[POS, NEG], [NEG, NEG]])
    gt = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    half = torch.tensor([[POS, POS], [NEG, NEG]])
    empty = torch.zeros(2, 2)
    logits = torch.stack([perfect, half, half, half, half])
    target = torch.stack([gt, empty, empty, empty, gt])
    # Batches of one clip of two frames: [perfect, empty] -> 1; [empty, empty] -> 0; partial [half] -> F(P=.5, R=1).
    f_half = 1.3 * 0.5 / (0.3 * 0.5 + 1)
    expected = (1.0 + 0.0 + f_half) / 3
    assert f_measure_avsbench(logits, target, clips_per_batch=1, frames_per_clip=2) == pytest.approx(expected,
                                                                                                  rel=1e-6)
    # The dataset-level figure averages the curves of the two non-empty frames instead.
    assert f_measure(logits, target) == pytest.approx((1.0 + f_half) / 2, rel=1e-6)


@pytest.mark.parametrize("chunks", [[20], [1] * 20, [3, 7, 1, 9], [13, 7]])
def test_streaming_meter_equals_functions(chunks):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 12, 12, generator=gen) * 2
    target = (torch.rand(20, 12, 12, generator=gen) > 0.7).float()
    target[5:12] = 0  # a whole reference batch of empty masks, among others
    meter = SegmentationMeter(clips_per_batch=2, frames_per_clip=3)
    start = 0
    for n in chunks:
        meter.update(logits[start:start + n], target[start:start + n])
        start += n
    result = meter.compute()
    assert result["miou"] == pytest.approx(mask_iou(logits, target), rel=1e-9)
    assert result["f"] == pytest.approx(f_measure(logits, target), rel=1e-9)
    by_batch = [f_measure(logits[i:i + 6], target[i:i + 6]) for i in range(0, 20, 6)]
    assert result["f_avsbench"] == pytest.approx(sum(by_batch) / len(by_batch), rel=1e-9)
    assert by_batch[1] == 0.0  # frames 6..11 are all empty


def test_empty_meter_reports_zeros():
    assert SegmentationMeter().compute() == {"miou": 0.0, "f": 0.0, "f_avsbench": 0.0}
    assert FPRMeter().compute() == 0.0


def test_fpr():
    logits = torch.tensor([[[5.0, -5.0, 0.0, 1.0], [-1.0, -3.0, 2.0, -9.0]]])  # 3 of 8 above 0.5 (0 is not)
    assert fpr(logits) == pytest.approx(3 / 8)
    meter = FPRMeter()
    meter.update(logits)
    meter.update(torch.full((1, 2, 4), NEG))
    assert meter.compute() == pytest.approx(3 / 16)
    assert fpr(torch.empty(0, 4, 4)) == 0.0


def test_ndcg_by_hand():
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.1], [0.8, 0.6], [0.0, 1.0]])  # ranked 0, 1, 2 by cosine
    q_labels, g_labels = torch.tensor([0]), torch.tensor([1, 0, 0])
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg(query, gallery, q_labels, g_labels, k=None) == pytest.approx(dcg / idcg)
    assert ndcg(query, gallery, q_labels, g_labels, k=1) == 0.0
    assert ndcg(query, gallery, torch.tensor([1]), g_labels) == pytest.approx(1.0)
    # A query with no relevant item is left out rather than scored 0/0.
    two = ndcg(torch.cat([query, query]), gallery, torch.tensor([0, 7]), g_labels, k=None)
    assert two == pytest.approx(dcg / idcg)
    assert ndcg(query, gallery, torch.tensor([7]), g_labels) == 0.0
