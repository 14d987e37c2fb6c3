"""The factorised TPAVI equals the reference's N×N formula (docs/design.md §6)."""

import pytest
import torch

from avstrain.models.tpavi import TPAVI, tpavi_naive


def _randomised_block(channels: int, audio_dim: int, seed: int) -> TPAVI:
    torch.manual_seed(seed)
    block = TPAVI(channels, audio_dim).double()
    # W_z's BatchNorm starts at zero, which would make the attention path invisible: randomise every norm.
    with torch.no_grad():
        for norm in (block.out_bn, block.norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        block.out_bn.running_mean.normal_()
        block.out_bn.running_var.uniform_(0.5, 2.0)
    return block


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("B,C,T,h,w,audio_dim", [
    (1, 8, 5, 4, 4, 128),
    (2, 16, 5, 7, 6, 128),
    (3, 6, 1, 3, 5, 12),
    (2, 32, 4, 9, 9, 64),
])
def test_factorised_matches_naive(B, C, T, h, w, audio_dim, train):
    block = _randomised_block(C, audio_dim, seed=B * 1000 + C * 10 + h)
    visual = torch.randn(B, C, T, h, w, dtype=torch.float64)
    audio = torch.randn(B, T, audio_dim, dtype=torch.float64)
    block.train(train)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    fast = block(visual, audio)
    after_fast = {k: v.clone() for k, v in block.state_dict().items()}
    block.load_state_dict(state)  # train mode updates the BN running stats: start the naive pass from the same ones
    slow, slow_audio = tpavi_naive(block, visual, audio)

    assert fast.visual.shape == (B, C, T, h, w)
    assert (fast.visual - slow).abs().max().item() <= 1e-8
    assert (fast.audio_proj - slow_audio).abs().max().item() <= 1e-8
    if train:
        for k in ("out_bn.running_mean", "out_bn.running_var"):
            torch.testing.assert_close(after_fast[k], block.state_dict()[k], rtol=0, atol=1e-10)
    # Guard against a vacuous comparison: the attention path must move the output well beyond the tolerance.
    block.eval()
    with torch.no_grad():
        without_attention = block.norm((block.out_bn(block.out_conv(torch.zeros_like(visual[:, : C // 2])))
                                        + visual).permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        assert (block(visual, audio).visual - without_attention).abs().max() > 1e-3


def test_factorised_gradients_match_naive():
    block = _randomised_block(8, 16, seed=3).train()
    visual = torch.randn(2, 8, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    audio = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 8, 3, 5, 4, dtype=torch.float64)

    grads = []
    for forward in (lambda: block(visual, audio).visual, lambda: tpavi_naive(block, visual, audio)[0]):
        block.zero_grad()
        visual.grad = audio.grad = None
        (forward() * weight).sum().backward()
        grads.append([visual.grad.clone(), audio.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    for fast, slow in zip(*grads):
        assert (fast - slow).abs().max().item() <= 1e-8


def test_av_scores_are_theta_dot_phi():
    block = _randomised_block(8, 16, seed=5).eval()
    visual = torch.randn(1, 8, 2, 3, 3, dtype=torch.float64)
    audio = torch.randn(1, 2, 16, dtype=torch.float64)
    out = block(visual, audio)
    theta = block.theta(visual)  # [1, 4, 2, 3, 3]
    audio_map = out.audio_proj.permute(0, 2, 1)[..., None, None].expand(1, 8, 2, 3, 3)
    phi = block.phi(audio_map)  # [1, 4, 2, 3, 3], constant over h, w
    expected = (theta * phi).sum(1)  # [1, 2, 3, 3]
    assert out.av_scores.shape == (1, 2, 3, 3)
    assert (out.av_scores - expected).abs().max().item() <= 1e-10


def test_fresh_block_is_layernorm_of_input():
    # W_z's BatchNorm is zero-initialised, as in the reference: a new block passes V through the LayerNorm only.
    torch.manual_seed(0)
    block = TPAVI(8, 16).eval()
    visual = torch.randn(1, 8, 2, 3, 3)
    out = block(visual, torch.randn(1, 2, 16))
    expected = torch.nn.functional.layer_norm(visual.permute(0, 2, 3, 4, 1), (8,)).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(out.visual, expected)


def test_naive_flag_runs_the_reference_formula_with_the_same_outputs():
    # The training benchmark builds the reference-style model by switching its blocks to the N×N formula.
    block = _randomised_block(8, 16, seed=7).eval()
    visual = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    audio = torch.randn(2, 3, 16, dtype=torch.float64)
    fast = block(visual, audio)
    block.naive = True
    slow = block(visual, audio)
    reference, _ = tpavi_naive(block, visual, audio)
    assert torch.equal(slow.visual, reference)
    for name in ("visual", "audio_proj", "av_scores"):
        assert (getattr(fast, name) - getattr(slow, name)).abs().max().item() <= 1e-8


@pytest.mark.parametrize("bn_init", [0.0, 0.25])
def test_bn_init_decides_whether_the_interaction_gets_gradient_at_step_one(bn_init):
    # The reference's zero init (bn_init 0) gives theta, phi, g, W_z and the audio projection no gradient until the
    # BatchNorm weight has moved; a non-zero init (model.tpavi_bn_init) trains them from the first step.
    torch.manual_seed(0)
    block = TPAVI(8, 16, bn_init=bn_init).train()
    assert torch.all(block.out_bn.weight == bn_init) and torch.all(block.out_bn.bias == 0)
    out = block(torch.randn(2, 8, 3, 4, 4), torch.randn(2, 3, 16))
    (out.visual * torch.randn_like(out.visual)).sum().backward()
    for part in (block.theta, block.phi, block.g, block.out_conv, block.audio_proj):
        grad = part.weight.grad.abs().max().item()
        assert (grad > 0) == (bn_init != 0), (part, grad)


def test_model_passes_tpavi_bn_init_to_every_block():
    from avstrain.config import ModelConfig
    from avstrain.models import build_model
    model = build_model(ModelConfig(backbone="resnet18", channels=8, image_size=32, tpavi_bn_init=0.1))
    assert len(model.tpavi) == 4
    for block in model.tpavi.values():
        assert torch.allclose(block.out_bn.weight, torch.full_like(block.out_bn.weight, 0.1))
    reference = build_model(ModelConfig(backbone="resnet18", channels=8, image_size=32))
    assert all(torch.all(block.out_bn.weight == 0) for block in reference.tpavi.values())
