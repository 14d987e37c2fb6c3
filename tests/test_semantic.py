"""AVSS pieces: the AVSBench-semantic palette and the official semantic metric, on hand-computed cases."""
import numpy as np
import pytest
import torch

from avsprep.palette import AVSS_CLASSES, classes_to_colours, colours_to_classes, nearest_palette_classes, palette
from avstrain.metrics import SEMANTIC_EPS, SemanticMeter, semantic_scores


def test_palette_known_colours():
    colours = palette(AVSS_CLASSES)
    assert colours.shape == (71, 3) and colours.dtype == np.uint8
    assert tuple(colours[0]) == (0, 0, 0)
    assert tuple(colours[1]) == (128, 0, 0)
    assert tuple(colours[2]) == (0, 128, 0)
    assert tuple(colours[3]) == (128, 128, 0)
    assert tuple(colours[8]) == (64, 0, 0)
    assert len({tuple(c) for c in colours}) == 71  # all distinct


def test_palette_round_trip_all_classes():
    classes = np.arange(AVSS_CLASSES, dtype=np.uint8).reshape(1, 71).repeat(3, 0)
    back, off = colours_to_classes(classes_to_colours(classes))
    np.testing.assert_array_equal(back, classes)
    assert off == 0


def test_off_palette_colours_are_background_and_counted():
    rgb = classes_to_colours(np.array([[1, 2], [3, 0]], dtype=np.uint8))
    rgb[0, 1] = (1, 2, 3)  # in no palette entry
    classes, off = colours_to_classes(rgb)
    np.testing.assert_array_equal(classes, [[1, 0], [3, 0]])
    assert off == 1
    # a palette colour beyond the first K classes is off-palette for K classes
    _, off = colours_to_classes(classes_to_colours(np.array([[71]], dtype=np.uint8)))
    assert off == 1


def test_nearest_palette_colour():
    rgb = np.array([[[120, 5, 3], [0, 0, 10]]], dtype=np.uint8)
    np.testing.assert_array_equal(nearest_palette_classes(rgb), [[1, 0]])


def one_hot_logits(pred: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(pred).long(), num_classes).permute(0, 3, 1, 2).float()


def reference_metric(preds, targets, num_classes):
    """The reference's arithmetic written out with numpy, frame by frame."""
    iou_sum, f_sum, count = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for p, g in zip(preds, targets):
        for c in range(num_classes):
            i, pc, gc = np.sum((p == c) & (g == c)), np.sum(p == c), np.sum(g == c)
            u = pc + gc - i
            iou_sum[c] += i / (u + SEMANTIC_EPS)
            with np.errstate(invalid="ignore", divide="ignore"):
                prec, rec = i / pc, i / gc
                f = 1.3 * prec * rec / (0.3 * prec + rec)
            f_sum[c] += 0.0 if np.isnan(f) else f
            count[c] += u > 0
    with np.errstate(invalid="ignore"):
        iou, f = np.nan_to_num(iou_sum / count), np.nan_to_num(f_sum / count)
    return iou.mean(), f.mean()


def test_semantic_metric_hand_case_k3():
    # frame 0: class 1 right, class 2 only in the prediction; frame 1: class 2 only in the target; frame 2: padded
    # (all background in both: adds IoU = F = 1 to background, as the reference scores padded frames).
    target = np.array([[[1, 1], [0, 0]], [[2, 0], [0, 0]], [[0, 0], [0, 0]]])
    pred = np.array([[[1, 1], [2, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    scores = semantic_scores(one_hot_logits(pred, 3), torch.as_tensor(target))
    # background: frame0 I=1,U=2 → .5; frame1 I=3,U=4 → .75; frame2 → 1. Mean .75 over 3 frames.
    # class 1: frame0 IoU 1 (count 1). class 2: frame0 0 (pred only), frame1 0 (target only), count 2 → 0.
    expected_miou = (0.75 + 1.0 + 0.0) / 3
    assert scores["miou"] == pytest.approx(expected_miou, abs=1e-12)
    ref_iou, ref_f = reference_metric(pred, target, 3)
    assert scores["miou"] == pytest.approx(ref_iou, abs=1e-12)
    assert scores["f"] == pytest.approx(ref_f, abs=1e-12)


def test_semantic_meter_streams_like_one_call_and_counts_absent_classes_zero():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(6, 5, 5))
    logits = torch.as_tensor(rng.normal(size=(6, 6, 5, 5)))  # K = 6: classes 4, 5 never in the target
    meter = SemanticMeter(6)
    for i in range(0, 6, 2):
        meter.update(logits[i:i + 2], torch.as_tensor(target[i:i + 2]))
    whole = semantic_scores(logits, torch.as_tensor(target))
    assert meter.compute() == pytest.approx(whole)
    ref_iou, ref_f = reference_metric(logits.argmax(1).numpy(), target, 6)
    assert whole["miou"] == pytest.approx(ref_iou) and whole["f"] == pytest.approx(ref_f)
