"""The localisation metrics on hand-made cases: soft ground truth, ties at the median, constant maps, a peak outside."""
import pytest
import torch

from avstrain.metrics import (ciou_ceiling, ciou_per_sample, localisation_ceiling, localisation_scores,
                              pixel_average_precision, pointing_hits)


def test_ciou_with_soft_ground_truth():
    heat = torch.tensor([[[4.0, 3.0], [1.0, 0.0]]])  # sorted 0,1,3,4; position 2 → 3: keep 4 and 3 (top row)
    gt = torch.tensor([[[1.0, 0.5], [0.5, 0.0]]])  # two annotators' boxes: min(Σ/2, 1)
    # pred·gt = 1 + 0.5; Σgt = 2; pred on gt = 0: none → 1.5 / 2
    assert ciou_per_sample(heat, gt).item() == pytest.approx(0.75)


def test_ties_at_the_median_are_kept():
    heat = torch.tensor([[[1.0, 2.0], [2.0, 2.0]]])  # sorted 1,2,2,2: threshold 2, three pixels kept
    gt = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    # pred·gt = 1; Σgt = 1; pred on background = 2 → 1/3
    assert ciou_per_sample(heat, gt).item() == pytest.approx(1 / 3)


def test_constant_map_predicts_the_whole_frame():
    gt = torch.zeros(1, 4, 4)
    gt[0, :2, :] = 1  # half the frame
    ciou = ciou_per_sample(torch.full((1, 2, 2), 7.0), gt).item()
    assert ciou == pytest.approx(8 / (8 + 8))


def test_scores_success_rate_and_auc():
    gt = torch.zeros(2, 2, 2)
    gt[:, 0, :] = 1
    good = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    bad = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    scores = localisation_scores(torch.stack([good, bad]), gt)
    assert scores["ciou"] == 0.5  # cIoU 1 and 0
    assert scores["mean_ciou"] == pytest.approx(0.5)
    # success rate 1 at threshold 0, 0.5 for thresholds 0.05..1: trapezoids 0.05·0.75 + 0.95·0.5
    assert scores["auc"] == pytest.approx(0.05 * 0.75 + 0.95 * 0.5)


def test_heat_map_is_upsampled_to_the_ground_truth():
    heat = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    gt = torch.zeros(1, 8, 8)
    gt[0, :4, :4] = 1
    assert ciou_per_sample(heat, gt).item() > 0.4


def test_pointing_game_on_the_heat_maps_grid():
    gt = torch.zeros(2, 8, 8)
    gt[:, 4:, 4:] = 1  # the bottom-right quarter
    inside = torch.zeros(2, 2)
    inside[1, 1] = 1.0
    outside = torch.zeros(2, 2)
    outside[0, 0] = 1.0  # peak outside the object
    hits = pointing_hits(torch.stack([inside, outside]), gt)
    assert hits.tolist() == [True, False]


def test_pixel_average_precision():
    gt = torch.zeros(1, 2, 2)
    gt[0, 0, 0] = 1
    perfect = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    worst = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    assert pixel_average_precision(perfect, gt) == pytest.approx(1.0)
    assert pixel_average_precision(worst, gt) == pytest.approx(0.25)


def test_ciou_ceiling_of_the_top_half_rule():
    gt = torch.zeros(1, 2, 2)
    gt[0, 0, 0] = 1  # a quarter of the frame: the rule keeps two pixels, one of them background
    assert ciou_ceiling(gt).item() == pytest.approx(0.5)
    # success 1 up to threshold 0.5, 0 from 0.55: 0.5 plus the trapezoid between them
    assert localisation_ceiling(gt) == {"ciou": 1.0, "auc": pytest.approx(0.5 + 0.05 * 0.5),
                                        "mean_ciou": pytest.approx(0.5)}
    half = torch.zeros(1, 2, 2)
    half[0, 0, :] = 0.5  # soft ground truth over half the frame: all of it fits
    assert ciou_ceiling(half).item() == pytest.approx(1.0)


def test_no_heat_map_beats_the_ceiling_and_the_best_one_reaches_it():
    generator = torch.Generator().manual_seed(0)
    gt = (torch.rand(16, 8, 8, generator=generator) < 0.2).float()
    ceiling = ciou_ceiling(gt)
    assert (ciou_per_sample(torch.rand(16, 8, 8, generator=generator), gt) <= ceiling + 1e-6).all()
    best = gt + 0.5 * torch.rand(16, 8, 8, generator=generator)  # object pixels first, background in random order
    assert torch.allclose(ciou_per_sample(best, gt), ceiling)
