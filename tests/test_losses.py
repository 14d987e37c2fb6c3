"""Each loss part on small cases computed by hand, and their weighted combination."""

import math

import pytest
import torch

from avstrain.config import LossConfig
from avstrain.losses import (avm_cosine_loss, avm_kl_loss, compute_loss, crop_audio_loss, crop_classification_loss,
                             crop_temporal_loss, dice_loss, av_score_loss, mask_bce_loss)
from avstrain.models import AVSOutput


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _normalise(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(n, 1e-12) for x in v]


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_bce_uses_only_frames_with_masks():
    logits = torch.tensor([[[[2.0, -1.0]], [[50.0, 50.0]]]])  # [B=1, T=2, H=1, W=2]
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    valid = torch.tensor([[True, False]])  # the second frame has no mask: its confident mistake must not count
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert mask_bce_loss(logits, masks, valid).item() == pytest.approx(expected, rel=1e-6)
    assert mask_bce_loss(logits.unsqueeze(2), masks, valid).item() == pytest.approx(expected, rel=1e-6)
    all_frames = (expected * 2 + 2 * (50 + math.log(1 + math.exp(-50.0)))) / 4
    assert mask_bce_loss(logits, masks).item() == pytest.approx(all_frames, rel=1e-6)


def test_bce_without_masks_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = mask_bce_loss(logits, torch.ones(2, 3, 4, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_bce_is_stable_for_extreme_logits():
    loss = mask_bce_loss(torch.tensor([[[[-200.0, 200.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(200.0)


# One clip, B·T = 2 frames, C = 3 channels, stage 0 at 2×2, logits at 4×4.
LOGITS = torch.tensor([[[[3.0, 1.0, -2.0, -4.0],
                         [1.0, -1.0, -4.0, -2.0],
                         [0.5, 0.5, 2.0, 2.0],
                         [0.5, 0.5, 2.0, -6.0]]],
                       [[[-3.0, -3.0, -3.0, -3.0],
                         [-3.0, -3.0, -3.0, -3.0],
                         [-3.0, -3.0, -3.0, -3.0],
                         [-3.0, -3.0, -3.0, -3.0]]]]).view(1, 2, 1, 4, 4)
MAP = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[0.5, 0.0], [2.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]],
                    [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]]])  # [2, 3, 2, 2]
AUDIO = torch.tensor([[[0.2, -1.0, 0.5], [1.0, 1.0, -0.5]]])  # [B=1, T=2, C=3]


def _quadrant_means(frame):
    rows = LOGITS[0, frame, 0]
    return [[rows[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean().item() for j in range(2)] for i in range(2)]


def test_avm_kl_by_hand():
    expected = 0.0
    for frame in range(2):
        # Pool the logits to the stage size, then sigmoid (the MS3 recipe's order).
        mask = [[_sigmoid(m) for m in row] for row in _quadrant_means(frame)]
        v = [sum(MAP[frame, c, i, j].item() * mask[i][j] for i in range(2) for j in range(2)) / 4 for c in range(3)]
        p_a = _softmax(_normalise(AUDIO[0, frame].tolist()))
        p_v = _softmax(_normalise(v))
        expected += sum(pa * (math.log(pa) - math.log(pv)) for pa, pv in zip(p_a, p_v))  # summed over the batch
    loss = avm_kl_loss(LOGITS, [MAP], {0: AUDIO}, stages=(0,))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Two stages holding the same data average to the same value.
    two = avm_kl_loss(LOGITS, [MAP, MAP], {0: AUDIO, 1: AUDIO}, stages=(0, 1))
    assert two.item() == pytest.approx(expected, rel=1e-5)


def test_avm_cosine_by_hand():
    expected = []
    for frame in range(2):
        # Sigmoid first, then pool, then binarise at 0.5 (the S4 code's order).
        rows = torch.sigmoid(LOGITS[0, frame, 0])
        mask = [[rows[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean().item() > 0.5 for j in range(2)] for i in range(2)]
        count = sum(m for row in mask for m in row)
        v = [sum(MAP[frame, c, i, j].item() for i in range(2) for j in range(2) if mask[i][j]) / (count + 1e-6)
             for c in range(3)]
        cos = sum(x * y for x, y in zip(_normalise(v), _normalise(AUDIO[0, frame].tolist())))
        expected.append(-math.log(max(cos, 0.0) + 1e-6))
    # Frame 0: quadrants 0 and 3 are objects; frame 1 has none, which must give -log(1e-6), not NaN.
    assert expected[1] == pytest.approx(-math.log(1e-6))
    loss = avm_cosine_loss(LOGITS, [MAP], {0: AUDIO}, stages=(0,))
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_avm_orders_differ_so_the_tests_can_tell():
    # sigmoid(mean) > 0.5 and mean(sigmoid) > 0.5 disagree on quadrant (1, 1) of frame 0, so the hand-computed
    # cases above pin the order (pool then sigmoid, or sigmoid then pool) each variant uses.
    block = LOGITS[0, 0, 0, 2:4, 2:4]
    assert (block.mean() > 0) != (torch.sigmoid(block).mean() > 0.5)


def test_avm_needs_tpavi_at_the_stage():
    with pytest.raises(ValueError, match="TPAVI"):
        avm_kl_loss(LOGITS, [MAP, MAP], {0: AUDIO}, stages=(0, 1))


def test_avm_gradients_are_finite_for_empty_masks():
    logits = torch.full((1, 2, 1, 4, 4), -30.0, requires_grad=True)
    stage_map = MAP.clone().requires_grad_(True)
    for fn in (avm_kl_loss, avm_cosine_loss):
        loss = fn(logits, [stage_map], {0: AUDIO}, stages=(0,))
        loss.backward()
        assert math.isfinite(loss.item())
        assert torch.isfinite(logits.grad).all() and torch.isfinite(stage_map.grad).all()


def test_crop_classification():
    logits = torch.zeros(2, 3, 4)
    logits[1, 2] = torch.tensor([0.0, 0.0, 5.0, 0.0])
    labels = torch.tensor([1, 2])
    valid = torch.tensor([[True, False, False], [False, False, True]])
    # Uniform logits give log 4; the confident right answer gives log(3 + e^5) - 5.
    expected = (math.log(4) + math.log(3 + math.exp(5)) - 5) / 2
    assert crop_classification_loss(logits, labels, valid).item() == pytest.approx(expected, rel=1e-6)
    # Unknown class (-1) is ignored.
    assert crop_classification_loss(logits, torch.tensor([-1, 2]), valid).item() == pytest.approx(
        math.log(3 + math.exp(5)) - 5, rel=1e-6)
    assert crop_classification_loss(logits, labels, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_crop_temporal():
    emb = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [0.0, 1.0]]])  # [1, 4, 2]
    # PairwiseDistance adds eps = 1e-6 to the difference.
    d01 = math.dist([0.0 - 3.0 + 1e-6, 0.0 - 4.0 + 1e-6], [0, 0])
    d12 = math.sqrt(2) * 1e-6
    d23 = math.dist([3.0 + 1e-6, 3.0 + 1e-6], [0, 0])
    assert crop_temporal_loss(emb).item() == pytest.approx((d01 + d12 + d23) / 3, rel=1e-6)
    valid = torch.tensor([[True, True, False, True]])  # only the pair (0, 1) has both crops
    assert crop_temporal_loss(emb, valid).item() == pytest.approx(d01, rel=1e-6)
    assert crop_temporal_loss(emb, torch.tensor([[True, False, True, False]])).item() == 0.0
    assert crop_temporal_loss(emb[:, :1]).item() == 0.0


def test_crop_audio():
    emb = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    audio = torch.tensor([[5.0, 0.0]])
    assert crop_audio_loss(emb, audio).item() == pytest.approx(1.0)  # (0 + 1 + 2) / 3
    assert crop_audio_loss(emb, audio, torch.tensor([[True, False, True]])).item() == pytest.approx(1.0)
    assert crop_audio_loss(emb, audio, torch.tensor([[False, True, True]])).item() == pytest.approx(1.5)
    assert crop_audio_loss(emb, audio, torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def _output(with_crops=True):
    gen = torch.Generator().manual_seed(0)
    return AVSOutput(
        logits=torch.randn(1, 2, 1, 4, 4, generator=gen).requires_grad_(),
        stage_maps=[MAP.clone().requires_grad_()],
        audio_proj={0: AUDIO.clone().requires_grad_()},
        crop_embedding=torch.randn(1, 2, 5, generator=gen).requires_grad_() if with_crops else None,
        crop_logits=torch.randn(1, 2, 3, generator=gen).requires_grad_() if with_crops else None,
        crop_audio=torch.randn(1, 5, generator=gen).requires_grad_() if with_crops else None,
    )


def test_compute_loss_weights_and_parts():
    out = _output()
    masks = (torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    labels, valid = torch.tensor([2]), torch.tensor([[True, True]])
    config = LossConfig(bce=1.0, avm=0.5, avm_variant="cosine", avm_stages=(0,), crop_cls=0.2, crop_temporal=0.3,
                        crop_audio=0.4)
    result = compute_loss(out, config, masks, labels=labels, crop_valid=valid)
    parts = {
        "bce": mask_bce_loss(out.logits, masks),
        "avm": avm_cosine_loss(out.logits, out.stage_maps, out.audio_proj, (0,)),
        "crop_cls": crop_classification_loss(out.crop_logits, labels, valid),
        "crop_temporal": crop_temporal_loss(out.crop_embedding, valid),
        "crop_audio": crop_audio_loss(out.crop_embedding, out.crop_audio, valid),
    }
    assert set(result.parts) == set(parts)
    for name, value in parts.items():
        assert result.parts[name].item() == pytest.approx(value.item(), rel=1e-6)
        assert not result.parts[name].requires_grad
    weights = {"bce": 1.0, "avm": 0.5, "crop_cls": 0.2, "crop_temporal": 0.3, "crop_audio": 0.4}
    assert result.total.item() == pytest.approx(sum(weights[k] * v.item() for k, v in parts.items()), rel=1e-6)
    result.total.backward()
    assert out.crop_audio.grad is not None and out.stage_maps[0].grad is not None


def test_zero_weight_switches_a_part_off():
    out = _output(with_crops=False)
    masks = torch.zeros(1, 2, 4, 4)
    result = compute_loss(out, LossConfig(), masks)  # the default recipe: BCE only, crop losses off
    assert set(result.parts) == {"bce"}
    assert result.total.item() == pytest.approx(result.parts["bce"].item())
    with pytest.raises(ValueError, match="crop_temporal"):
        compute_loss(out, LossConfig(crop_temporal=1.0), masks)
    with pytest.raises(ValueError, match="nothing to train"):
        compute_loss(out, LossConfig(bce=0.0), masks)
    with pytest.raises(ValueError, match="avm_variant"):
        LossConfig(avm_variant="l2")


# ------------------------------------------------------------------------------------------------------------
# Opt-in parts for training from scratch (docs/design.md §17): positive weighting, soft Dice, TPAVI's localisation scores


def test_pos_weight_scales_the_positive_pixels_only():
    logits = torch.tensor([[[[2.0, -1.0]]]])  # [B=1, T=1, H=1, W=2]
    masks = torch.tensor([[[[1.0, 0.0]]]])
    pos, neg = math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0))
    assert mask_bce_loss(logits, masks, pos_weight=3.0).item() == pytest.approx((3 * pos + neg) / 2, rel=1e-6)
    assert mask_bce_loss(logits, masks, pos_weight=1.0).item() == pytest.approx((pos + neg) / 2, rel=1e-6)


def test_dice_by_hand_and_only_frames_with_masks():
    logits = torch.tensor([[[[0.0, 0.0]], [[3.0, -3.0]], [[9.0, 9.0]]]])  # [B=1, T=3, H=1, W=2]
    masks = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])
    p1, p2 = _sigmoid(3.0), _sigmoid(-3.0)
    frame0 = 1 - (2 * 0.5 + 1) / (0.5 + 0.5 + 1 + 1)
    frame1 = 1 - (2 * p1 + 1) / (p1 + p2 + 1 + 1)
    frame2 = 1 - 1 / (2 * _sigmoid(9.0) + 1)  # empty mask: asks for nothing predicted
    assert dice_loss(logits, masks).item() == pytest.approx((frame0 + frame1 + frame2) / 3, rel=1e-6)
    valid = torch.tensor([[True, True, False]])
    assert dice_loss(logits, masks, valid).item() == pytest.approx((frame0 + frame1) / 2, rel=1e-6)
    assert dice_loss(logits.unsqueeze(2), masks, valid).item() == pytest.approx((frame0 + frame1) / 2, rel=1e-6)
    perfect = torch.where(masks > 0, 30.0, -30.0)
    assert dice_loss(perfect, masks, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_without_masks_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = dice_loss(logits, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_av_score_loss_against_the_pooled_mask():
    scores = torch.tensor([[[[1.0, -2.0]]]])  # [B=1, T=1, h=1, w=2] at stage 0
    masks = torch.tensor([[[[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]]])  # [1, 1, H=2, W=4]: pooled [1.0, 0.25]
    def bce(x, t):
        return -(t * math.log(_sigmoid(x)) + (1 - t) * math.log(1 - _sigmoid(x)))
    expected = (bce(1.0, 1.0) + bce(-2.0, 0.25)) / 2
    assert av_score_loss({0: scores}, masks).item() == pytest.approx(expected, rel=1e-6)
    assert av_score_loss({0: scores}, masks, torch.tensor([[False]])).item() == 0.0
    with pytest.raises(ValueError, match="needs TPAVI there"):
        av_score_loss({0: scores}, masks, stage=2)


def test_new_parts_are_off_by_default_and_weighted_when_on():
    torch.manual_seed(0)
    B, T, H, W = 2, 2, 8, 8
    output = AVSOutput(logits=torch.randn(B, T, 1, H, W), stage_maps=[], av_scores={0: torch.randn(B, T, 2, 2)})
    masks = (torch.rand(B, T, H, W) > 0.7).float()
    default = compute_loss(output, LossConfig(), masks)
    assert set(default.parts) == {"bce"}  # the reference's loss, unchanged
    assert default.total.item() == pytest.approx(mask_bce_loss(output.logits, masks).item())
    config = LossConfig(bce=1.0, pos_weight=2.0, dice=0.5, av=0.25)
    losses = compute_loss(output, config, masks)
    assert set(losses.parts) == {"bce", "dice", "av"}
    expected = (mask_bce_loss(output.logits, masks, pos_weight=2.0) + 0.5 * dice_loss(output.logits, masks)
                + 0.25 * av_score_loss(output.av_scores, masks))
    assert losses.total.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("field, value", [("dice", -1.0), ("av", -0.5), ("pos_weight", 0.0), ("av_stage", 4)])
def test_bad_new_loss_fields(field, value):
    with pytest.raises(ValueError):
        LossConfig(**{field: value})
