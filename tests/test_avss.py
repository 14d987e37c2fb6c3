"""AVSS, the semantic AVSBench setting (issue 15, DESIGN §14): the 71-class model with its per-frame flag and
TPAVI windows, the CE and semantic AVM losses, the AVSS checkpoint layouts, the import and the recipe's smoke."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from avstrain.config import ModelConfig
from avstrain.losses import avm_kl_loss, avm_semantic_loss, semantic_ce_loss
from avstrain.models import AVSBenchCheckpointError, build_model, load_avsbench_checkpoint
from avstrain.models.avsbench_compat import checkpoint_layout
from tests.helpers import REFERENCE


def _tsv_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            keys[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return keys


def _random_state(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {key: torch.randint(1, 10**6, shape, generator=gen) if key.endswith("num_batches_tracked")
            else torch.randn(shape, generator=gen) for key, shape in keys.items()}


def _small(**overrides) -> ModelConfig:
    options = dict(backbone="resnet18", channels=16, image_size=64, mask_classes=4, audio_proj_bias=False,
                   tpavi_window=5)
    return ModelConfig(**{**options, **overrides})


# --- the model ---------------------------------------------------------------------------------------------------

def test_padded_frames_give_zero_logits():
    torch.manual_seed(0)
    model = build_model(_small()).eval()
    frames = torch.randint(0, 256, (2, 10, 3, 64, 64), dtype=torch.uint8)
    audio = torch.randn(2, 10, 128)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 5:] = False
    with torch.no_grad():
        out = model(frames, audio, frame_valid=valid)
    assert out.logits.shape == (2, 10, 4, 64, 64)
    assert out.logits[0, 5:].abs().max() == 0
    assert out.logits[0, :5].abs().max() > 0 and out.logits[1].abs().min() >= 0
    assert all(m.view(2, 10, *m.shape[1:])[0, 5:].abs().max() == 0 for m in out.stage_maps)
    assert out.logits[0, 5:].argmax(1).eq(0).all()  # padded frames predict background


def test_skipping_padded_frames_in_the_backbone_changes_nothing():
    """Eval mode runs only real frames through the backbone; the outputs equal the full batch's."""
    torch.manual_seed(0)
    model = build_model(_small()).eval()
    frames = torch.randint(0, 256, (1, 10, 3, 64, 64), dtype=torch.uint8)
    audio = torch.randn(1, 10, 128)
    valid = torch.tensor([[True] * 5 + [False] * 5])
    with torch.no_grad():
        skipped = model(frames, audio, frame_valid=valid).logits
        full = model._backbone_maps(frames, None)  # every frame through the backbone
        model._backbone_maps = lambda f, v: [m * v.reshape(-1, 1, 1, 1).float() for m in full]  # noqa: ARG005
        reference = model(frames, audio, frame_valid=valid).logits
    torch.testing.assert_close(skipped, reference)


def test_tpavi_windows_are_independent():
    """With tpavi_window = 5 a 10-frame clip is two clips of 5: changing frames 5-9 leaves frames 0-4 alone."""
    torch.manual_seed(0)
    model = build_model(_small()).eval()
    for block in model.tpavi.values():  # a fresh TPAVI is the identity (zero BN): give it an effect
        torch.nn.init.normal_(block.out_bn.weight)
    frames = torch.randint(0, 256, (1, 10, 3, 64, 64), dtype=torch.uint8)
    audio = torch.randn(1, 10, 128)
    other = frames.clone()
    other[:, 5:] = torch.randint(0, 256, (1, 5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model(frames, audio).logits, model(other, audio).logits
        whole = build_model(_small(tpavi_window=None)).eval()
        whole.load_state_dict(model.state_dict())
        c, d = whole(frames, audio).logits, whole(other, audio).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (c[:, :5] - d[:, :5]).abs().max() > 0  # one window of 10: the first frames see the others


def test_audio_projection_without_bias():
    model = build_model(_small())
    assert all(block.audio_proj.bias is None for block in model.tpavi.values())
    assert model.head[4].out_channels == 4


# --- losses ------------------------------------------------------------------------------------------------------

def test_semantic_ce_averages_pixels_then_labelled_frames():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 3, 2, 2)
    masks = torch.randint(0, 3, (1, 3, 2, 2))
    valid = torch.tensor([[True, False, True]])
    per_frame = [F.cross_entropy(logits[0, t][None], masks[0, t][None]) for t in range(3)]
    expected = (per_frame[0] + per_frame[2]) / 2
    torch.testing.assert_close(semantic_ce_loss(logits, masks, valid), expected)


def test_semantic_avm_by_hand():
    """foreground = argmax ≠ 0, pooled; v = mean(map × fg); Σ_C KL per frame; flag-weighted mean; no L2 norm."""
    logits = torch.zeros(1, 2, 3, 2, 2)
    logits[0, 0, 1, 0, 0] = 5.0  # frame 0: one foreground pixel (top left)
    logits[0, 1, 2] = 5.0  # frame 1: all foreground
    stage = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).view(2, 2, 2, 2)  # [B·T=2, C=2, 2, 2]
    audio = torch.tensor([[[1.0, -1.0], [0.5, 2.0]]])  # [B=1, T=2, C=2]
    valid = torch.tensor([[True, True]])

    def kl(v, a):  # Σ_C p_a (log p_a − log p_v)
        p, q = torch.softmax(a, -1), torch.log_softmax(v, -1)
        return (p * (p.log() - q)).sum()

    v0 = stage[0, :, 0, 0] / 4  # mean over the 4 pixels of map × (1 at one pixel)
    v1 = stage[1].mean(dim=(1, 2))
    expected = (kl(v0, audio[0, 0]) + kl(v1, audio[0, 1])) / 2
    got = avm_semantic_loss(logits, [stage], {0: audio}, stages=(0,), mask_valid=valid)
    torch.testing.assert_close(got, expected)
    only_first = avm_semantic_loss(logits, [stage], {0: audio}, stages=(0,), mask_valid=torch.tensor([[True, False]]))
    torch.testing.assert_close(only_first, kl(v0, audio[0, 0]))


def test_binary_avm_without_normalisation_by_hand():
    """The MS3/AVSS recipes' KL AVM: sigmoid(avg-pooled logits) as the mask, no L2 normalisation, summed."""
    logits = torch.tensor([[[[[0.0, 2.0], [-2.0, 1.0]]]]])  # [1, 1, 1, 2, 2]
    stage = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [1.0, 0.5]]]])  # [1, 2, 2, 2]
    audio = torch.tensor([[[0.3, -0.7]]])
    mask = torch.sigmoid(logits[0, 0, 0])
    v = (stage[0] * mask).mean(dim=(1, 2))
    p = torch.softmax(audio[0, 0], -1)
    expected = (p * (p.log() - torch.log_softmax(v, -1))).sum()
    torch.testing.assert_close(avm_kl_loss(logits, [stage], {0: audio}, stages=(0,), normalise=False), expected)
    assert not torch.isclose(avm_kl_loss(logits, [stage], {0: audio}, stages=(0,), normalise=True), expected)


# --- checkpoints -------------------------------------------------------------------------------------------------

def _avss_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(backbone="resnet50", channels=256, mask_classes=71, audio_proj_bias=False,
                                 tpavi_window=5), **overrides})


def test_avss_resnet50_checkpoint_loads_every_tensor():
    keys = _tsv_keys("avsbench_avss_resnet50_keys.tsv")
    assert len(keys) == 626
    state = _random_state(keys)
    assert checkpoint_layout(state) == {"mask_classes": 71, "audio_proj_bias": False, "backbone": "resnet50"}
    model = build_model(_avss_config())
    load_avsbench_checkpoint(model, state)
    own = model.state_dict()
    torch.testing.assert_close(own["head.4.weight"], state["output_conv.4.weight"])
    torch.testing.assert_close(own["tpavi.2.audio_proj.weight"], state["tpavi_b3.align_channel.weight"])
    torch.testing.assert_close(own["backbone.layer4.2.conv3.weight"], state["resnet.layer4_1.2.conv3.weight"])
    used = [k for k in keys if not re.match(r"resnet\.layer[34]_2\.", k)]
    assert len(used) == len(own)  # every model tensor comes from the checkpoint


def test_avss_checkpoint_into_a_binary_config_names_the_fields():
    state = _random_state(_tsv_keys("avsbench_avss_resnet50_keys.tsv"))
    model = build_model(_avss_config(mask_classes=1, audio_proj_bias=True))
    with pytest.raises(AVSBenchCheckpointError, match="model.mask_classes = 1.*71.*audio_proj_bias"):
        load_avsbench_checkpoint(model, state)


def test_avss_pvt_checkpoint_loads_every_tensor():
    pytest.importorskip("timm")
    keys = _tsv_keys("avsbench_avss_pvt_v2_b5_keys.tsv")
    assert len(keys) == 1186
    state = _random_state(keys)
    model = build_model(_avss_config(backbone="pvt_v2_b5"))
    load_avsbench_checkpoint(model, state)
    own = model.state_dict()
    assert len(own) == len(keys)
    torch.testing.assert_close(own["backbone.body.stages.3.blocks.2.mlp.dwconv.weight"],
                               state["encoder_backbone.block4.2.mlp.dwconv.dwconv.weight"])
    torch.testing.assert_close(own["backbone.body.stages.1.downsample.proj.weight"],
                               state["encoder_backbone.patch_embed2.proj.weight"])
