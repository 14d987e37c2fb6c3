"""The model registry (model.kind, loss weights per kind), the checkpoint format, the runtime (eval_mode,
load_for_inference) and the trainer's public step, without shards."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from avstrain.checkpoint import (CHECKPOINT_FORMAT, RunState, load_checkpoint, make_checkpoint, metadata,
                                 model_from_checkpoint, save_atomic)
from avstrain.cli import main as avstrain_main
from avstrain.config import ConfigError, ModelConfig, build_config, config_to_dict, load_config
from avstrain.models import build_model, get_kind, registry
from avstrain.runtime import Runtime, eval_mode, load_for_inference
from avstrain.train import to_device, train_step

SMALL = ["model.backbone=resnet18", "model.channels=16", "model.image_size=64", "train.amp=fp32"]


class Correspondence(registry.ModelKind):
    """A stand-in for a future family: one loss of its own, one model option."""

    options = ("backbone",)
    losses = {"crop_audio": 1.0}

    def build(self, config):
        return torch.nn.Linear(2, 2)


@pytest.fixture
def other_kind(monkeypatch):
    kind = Correspondence()
    kind.name = "avenet"
    monkeypatch.setitem(registry._KINDS, "avenet", kind)
    return kind


def test_unknown_kind_is_one_line_config_error():
    with pytest.raises(ConfigError, match="model.kind must be one of .*tpavi.*, got 'nosuch'"):
        load_config(None, ["model.kind=nosuch"])
    result = CliRunner().invoke(avstrain_main, ["train", "--shards", ".", "--set", "model.kind=nosuch"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("avstrain: error: model.kind")


def test_kind_gives_loss_defaults_and_refuses_losses_it_does_not_use(other_kind):
    assert load_config(None, []).model.kind == "tpavi" and load_config(None, []).loss.bce == 1.0
    config = load_config(None, ["model.kind=avenet"])
    assert (config.loss.bce, config.loss.crop_audio) == (0.0, 1.0)  # tpavi's default bce is not avenet's
    assert load_config(None, ["model.kind=avenet", "loss.bce=0"]).loss.bce == 0.0  # zero is allowed explicitly
    with pytest.raises(ConfigError, match="loss.bce does not apply to model.kind = 'avenet'"):
        load_config(None, ["model.kind=avenet", "loss.bce=1"])
    with pytest.raises(ConfigError, match="does not read model.channels"):
        load_config(None, ["model.kind=avenet", "model.channels=8"])
    assert build_config(config_to_dict(config)) == config  # a resolved config (checkpoint, config.toml) reloads
    assert isinstance(build_model(config.model), torch.nn.Linear)


def test_tpavi_kind_declares_what_the_loop_needs():
    kind = get_kind("tpavi")
    config = load_config(None, SMALL)
    assert kind.best_metric == "overall.miou" and {"default", "reliance"} <= set(kind.suites())
    assert "crops" not in kind.batch_fields(config)
    crops = load_config(None, [*SMALL, "model.crop_mode=separate", "loss.crop_cls=0.5"])
    assert "crops" in kind.batch_fields(crops) and not kind.find_unused_parameters(crops)
    assert kind.find_unused_parameters(load_config(None, [*SMALL, "model.crop_mode=shared"]))


@pytest.mark.parametrize("mode", ["off", "separate", "shared"])
def test_embed_crops_uses_the_trunk_of_the_crop_mode(mode):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", channels=16, image_size=64, crop_mode=mode,
                                    crop_embed_dim=24)).eval()
    crops = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        embedding = model.embed_crops(crops)
        x = model.normalize(crops)
        if mode == "off":
            expected = model.backbone(x)[-1].mean(dim=(2, 3))  # [N, 512]: the last stage, pooled
        else:
            shared = model.backbone if mode == "shared" else None
            expected = model.crop_encoder(x, shared_trunk=shared).embedding  # [N, 24]
    assert embedding.shape == (3, 512 if mode == "off" else 24)
    assert torch.equal(embedding, expected)
    assert ("no crop encoder" in model.crop_embedding_source) == (mode == "off")


def test_eval_mode_restores_the_mode():
    model = torch.nn.Sequential(torch.nn.Dropout())
    with eval_mode(model):
        assert not model.training
    assert model.training
    model.eval()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert not model.training


def test_checkpoint_round_trip_and_load_for_inference(tmp_path):
    config = load_config(None, SMALL)
    torch.manual_seed(0)
    model = build_model(config.model)
    path = tmp_path / "best.pt"
    save_atomic(make_checkpoint(model, config, ["a", "b"], run=RunState(epoch=3, step=9, best_metric=0.5),
                                optimizer=torch.optim.Adam(model.parameters()), embedder="logmel-stats"), path)
    assert not (tmp_path / "best.pt.partial").exists()
    state = load_checkpoint(path)
    assert state["format"] == CHECKPOINT_FORMAT and (state["epoch"], state["step"], state["best_miou"]) == (3, 9, 0.5)
    assert set(metadata(state)) & {"model", "optimizer", "rng"} == set()
    rebuilt, rebuilt_config = model_from_checkpoint(state)
    assert rebuilt_config == config
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))

    loaded, _, runtime = load_for_inference(path, device="cpu")
    assert not loaded.training and runtime == Runtime(torch.device("cpu"), None, True, metadata(state))
    assert loaded.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert runtime.checkpoint["embedder"] == "logmel-stats" and runtime.describe() == "cpu, fp32, channels-last"


def test_train_step_is_one_optimiser_step():
    config = load_config(None, [*SMALL, "model.image_size=32"])
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"frames": torch.randint(0, 256, (2, 2, 64, 64, 3), dtype=torch.uint8),
             "masks": torch.randint(0, 2, (2, 2, 64, 64), dtype=torch.uint8), "audio": torch.randn(2, 2, 128),
             "mask_valid": torch.ones(2, 2, dtype=torch.bool), "crop_valid": torch.ones(2, 2, dtype=torch.bool),
             "label": torch.zeros(2, dtype=torch.long), "name": ["a", "b"]}
    inputs = to_device(batch, torch.device("cpu"), (*get_kind("tpavi").batch_fields(config), "name"), 32)
    assert inputs["frames"].shape == (2, 2, 3, 32, 32) and inputs["masks"].shape == (2, 2, 32, 32)
    assert inputs["name"] == ["a", "b"]
    before = model.head[4].weight.detach().clone()
    phases = []
    losses = train_step(model, optimizer, inputs, config, torch.device("cpu"), None, timer=phases.append)
    assert phases == ["forward", "backward", "optimizer"] and set(losses.parts) == {"bce"}
    assert not torch.equal(before, model.head[4].weight)
