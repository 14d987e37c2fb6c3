"""The AVS model end to end: shapes, gradients, vision-only mode, crop encoder modes, local backbone weights."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from avstrain.config import ModelConfig
from avstrain.models import AVSModel, AVSOutput, build_backbone, build_model


def _inputs(B, T, size, audio_dim=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (B, T, 3, size, size), dtype=torch.uint8, generator=gen)
    audio = torch.randn(B, T, audio_dim, generator=gen)
    return frames, audio


def _check_output(out: AVSOutput, B, T, size, channels, stages):
    assert out.logits.shape == (B, T, 1, size, size)
    assert [tuple(m.shape) for m in out.stage_maps] == [
        (B * T, channels, size // s, size // s) for s in (4, 8, 16, 32)]
    assert sorted(out.audio_proj) == sorted(stages) and sorted(out.av_scores) == sorted(stages)
    for s in stages:
        assert out.audio_proj[s].shape == (B, T, channels)
        assert out.av_scores[s].shape == (B, T, size // (4 * 2**s), size // (4 * 2**s))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("backbone,size,channels", [("resnet18", 96, 64), ("resnet50", 224, 256)])
def test_forward_backward(backbone, size, channels):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, channels=channels, image_size=size)).train()
    frames, audio = _inputs(1, 5, size)
    out = model(frames, audio)
    _check_output(out, 1, 5, size, channels, (0, 1, 2, 3))
    (out.logits.mean() + sum(m.mean() for m in out.stage_maps)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_stage_maps_are_what_the_reference_leaves():
    # The reference's in-place ReLUs leave every stage map rectified; the decoder must read those same maps.
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", channels=32, image_size=64, tpavi_stages=(1, 3))).eval()
    frames, audio = _inputs(2, 3, 64)
    with torch.no_grad():
        out = model(frames, audio)
        x = model.normalize(frames.flatten(0, 1))
        maps = [neck(f) for neck, f in zip(model.necks, model.backbone(x))]
        for s in (1, 3):
            v = maps[s].view(2, 3, *maps[s].shape[1:]).transpose(1, 2)
            maps[s] = model.tpavi[str(s)](v, audio).visual.transpose(1, 2).reshape(maps[s].shape)
    for s in range(4):
        torch.testing.assert_close(out.stage_maps[s], F.relu(maps[s]))
    assert all((m < 0).any() for m in maps), "the test needs maps with negative values"


def test_uint8_and_float_frames_agree():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", channels=16, image_size=64)).eval()
    frames, audio = _inputs(1, 2, 64)
    with torch.no_grad():
        a = model(frames, audio).logits
        b = model(frames.float() / 255.0, audio).logits
    torch.testing.assert_close(a, b)


def test_vision_only_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", channels=32, image_size=64, audio=False))
    assert len(model.tpavi) == 0 and not any(n.startswith("tpavi") for n, _ in model.named_parameters())
    frames, _ = _inputs(2, 5, 64)
    out = model(frames)
    _check_output(out, 2, 5, 64, 32, ())
    out.logits.mean().backward()
    assert model.head[0].weight.grad is not None


def test_audio_is_required_with_tpavi():
    model = build_model(ModelConfig(backbone="resnet18", channels=16, image_size=64))
    frames, audio = _inputs(1, 5, 64)
    with pytest.raises(ValueError, match="audio must be"):
        model(frames)
    with pytest.raises(ValueError, match="audio must be"):
        model(frames, audio[:, :4])


def test_audio_changes_the_prediction():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", channels=16, image_size=64)).eval()
    with torch.no_grad():
        for block in model.tpavi.values():  # W_z's BatchNorm starts at zero, which would mute the audio
            block.out_bn.weight.fill_(1.0)
        frames, audio = _inputs(1, 5, 64)
        a = model(frames, audio).logits
        b = model(frames, torch.randn_like(audio)).logits
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_crop_encoder(mode):
    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", channels=16, image_size=64, crop_mode=mode, crop_backbone="resnet18",
                         num_classes=7, crop_embed_dim=24)
    model = build_model(config)
    keys = model.state_dict().keys()
    assert any(k.startswith("crop_encoder.trunk.") for k in keys) == (mode == "separate")
    frames, audio = _inputs(2, 5, 64)
    crops = torch.randint(0, 256, (2, 5, 3, 48, 48), dtype=torch.uint8)
    out = model(frames, audio, crops=crops)
    assert out.crop_embedding.shape == (2, 5, 24)
    assert out.crop_logits.shape == (2, 5, 7)
    assert out.crop_audio.shape == (2, 24)

    (out.crop_logits.sum() + out.crop_audio.sum()).backward()
    backbone_grad = model.backbone.layer4[0].conv1.weight.grad
    if mode == "shared":  # the crop losses reach the segmentation backbone
        assert backbone_grad is not None and backbone_grad.abs().sum() > 0
    else:
        assert backbone_grad is None
        assert model.crop_encoder.trunk.layer4[0].conv1.weight.grad.abs().sum() > 0
    assert model.crop_encoder.audio_proj.weight.grad.abs().sum() > 0


def test_crops_without_encoder_are_rejected():
    model = build_model(ModelConfig(backbone="resnet18", channels=16, image_size=64))
    frames, audio = _inputs(1, 2, 64)
    with pytest.raises(ValueError, match="no crop encoder"):
        model(frames, audio, crops=torch.zeros(1, 2, 3, 32, 32))


def test_backbone_weights_load_from_local_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision layout, classifier included

    model = build_model(ModelConfig(backbone="resnet18", backbone_weights=str(path), channels=16, image_size=64))
    for name, tensor in reference.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(model.backbone.state_dict()[name], tensor), name

    torch.save({"state_dict": reference.state_dict()}, tmp_path / "wrapped.pth")
    assert torch.equal(build_backbone("resnet18", tmp_path / "wrapped.pth").layer4[1].bn2.weight,
                       reference.layer4[1].bn2.weight)

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="unexpected"):
        build_backbone("resnet18", tmp_path / "resnet34.pth")
    with pytest.raises(FileNotFoundError):
        build_backbone("resnet18", tmp_path / "absent.pth")


@pytest.mark.parametrize("name,channels", [("resnet18", (64, 128, 256, 512)), ("resnet34", (64, 128, 256, 512)),
                                           ("resnet50", (256, 512, 1024, 2048))])
def test_backbone_strides_and_channels(name, channels):
    backbone = build_backbone(name).eval()
    assert backbone.channels == channels
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32))]


def test_pvt_v2_backbone(tmp_path):
    timm = pytest.importorskip("timm")
    backbone = build_backbone("pvt_v2_b0").eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, c, 64 // s, 64 // s)
                                              for c, s in zip(backbone.channels, (4, 8, 16, 32))]
    reference = timm.create_model("pvt_v2_b0", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "pvt_v2_b0.pth")
    loaded = build_backbone("pvt_v2_b0", tmp_path / "pvt_v2_b0.pth")
    for name, tensor in reference.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(loaded.body.state_dict()[name], tensor), name


def test_pvt_without_timm_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ImportError, match=r"avs-toolkit\[timm\]"):
        build_backbone("pvt_v2_b5")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(backbone="vgg16")
    with pytest.raises(ValueError, match="crop_mode"):
        ModelConfig(crop_mode="both")
    with pytest.raises(ValueError, match="tpavi_stages"):
        ModelConfig(tpavi_stages=(0, 4))
    assert ModelConfig(tpavi_stages=[2, 3]).tpavi_stages == (2, 3)
    assert isinstance(build_model(ModelConfig(backbone="resnet18", channels=8, image_size=64)), AVSModel)
