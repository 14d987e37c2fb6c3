"""The sound-source localisation and correspondence kinds (senocak, avenet, avolnet; docs/design.md §13): their
networks, their losses on hand-computed cases, the localisation suite's JSON, and CLI training of each config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from avstrain.cli import main as avstrain_main
from avstrain.config import ConfigError, load_config
from avstrain.data import ShardDataset
from avstrain.localisation import (avc_accuracies, choose_av_sign, format_localisation_table, localisation_suite,
                                   probe_for)
from avstrain.localisation_losses import (NO_NEGATIVE, avc_loss, ground_truth_attention, ground_truth_maps,
                                          keeps_ground_truth, negative_audio, pick_negatives,
                                          senocak_supervised_loss, senocak_unsupervised_loss)
from avstrain.models import build_backbone, build_model, get_kind, registered_kinds
from avstrain.train import to_device
from helpers import synth_shards

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = ("senocak", "avenet", "avolnet")
SMALL = ["model.backbone=resnet18", "model.image_size=32", "train.amp=fp32"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 clips of 3 classes, T = 2, 32 px: every split has swap and off-screen donors."""
    return synth_shards(tmp_path_factory.mktemp("loc"), frames_per_clip=2, clips=24, size=32)


def small(kind: str, *overrides: str):
    config = load_config(None, [f"model.kind={kind}", *SMALL, *overrides])
    torch.manual_seed(0)
    return build_model(config.model), config


def device_batch(shards: Path, kind: str, config, clips: int = 6) -> dict:
    loader = torch.utils.data.DataLoader(ShardDataset(shards, "train", shuffle=False), batch_size=clips)
    return to_device(next(iter(loader)), torch.device("cpu"), get_kind(kind).batch_fields(config), 32)


# --------------------------------------------------------------------------------------------------------------
# Config and registry


def test_every_kind_defaults_load_cleanly():
    for kind in registered_kinds():
        config = load_config(None, [f"model.kind={kind}"])
        assert {name: getattr(config.loss, name) for name in get_kind(kind).losses} == dict(get_kind(kind).losses)
    for path in CONFIGS.glob("synth-*.toml"):
        load_config(path)


@pytest.mark.parametrize("kind, override", [("avenet", "loss.bce=1"), ("avolnet", "loss.senocak_sup=1"),
                                            ("senocak", "loss.avc=0.5"), ("tpavi", "loss.avc=1")])
def test_a_loss_the_kind_does_not_have_is_a_one_line_config_error(kind, override):
    with pytest.raises(ConfigError, match=f"loss.{override.split('.')[1].split('=')[0]} does not apply"):
        load_config(None, [f"model.kind={kind}", override])
    result = CliRunner().invoke(avstrain_main, ["train", "--shards", ".", "--set", f"model.kind={kind}",
                                                "--set", override])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("avstrain: error: loss.")


def test_options_of_the_localisers_are_checked():
    with pytest.raises(ConfigError, match="does not read model.feature_stage"):
        load_config(None, ["model.feature_stage=2"])  # tpavi
    with pytest.raises(ConfigError, match="freeze_backbone needs model.backbone_weights"):
        load_config(None, ["model.kind=senocak", "model.freeze_backbone=true"])
    with pytest.raises(ConfigError, match="supervised_fraction"):
        load_config(None, ["model.kind=senocak", "loss.supervised_fraction=1.5"])


# --------------------------------------------------------------------------------------------------------------
# Networks


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward_through_the_kind(shards, kind):
    model, config = small(kind)
    batch = device_batch(shards, kind, config)
    output = get_kind(kind).forward(model, batch)
    losses = get_kind(kind).compute_loss(output, batch, config.loss)
    losses.total.backward()
    assert set(losses.parts) == set(get_kind(kind).losses) and torch.isfinite(losses.total)
    assert model.visual.backbone.conv1.weight.grad.abs().sum() > 0  # the trunk trains
    assert output.negative_valid.shape == (6,) and output.negative_valid.any()
    if kind != "avenet":
        assert output.heatmap.shape == (6, 2, 4, 4)  # stride 8 on 32 px
        assert set(model.heatmaps(batch["frames"], batch["audio"])) == {kind}
    else:
        assert output.logits.shape == (6, 2, 2)
        assert torch.allclose(output.image_embedding.norm(dim=-1), torch.ones(6, 2))


def test_feature_stage_and_the_dropped_stages():
    model, _ = small("senocak", "model.feature_stage=2")
    assert model.visual.stride == 16 and isinstance(model.visual.backbone.layer4, nn.Identity)
    assert model(torch.zeros(1, 1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 1, 128)).heatmap.shape[-2:] == (2, 2)
    assert small("avenet")[0].visual.stage == 1


def test_frozen_backbone_with_weights(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(build_backbone("resnet18").state_dict(), weights)  # a torchvision-layout file, as ImageNet's
    model, _ = small("avolnet", f"model.backbone_weights='{weights}'", "model.freeze_backbone=true")
    model.train()
    assert not model.visual.backbone.training and not any(p.requires_grad for p in model.visual.backbone.parameters())
    assert all(p.requires_grad for p in model.vision_head.parameters())


def test_senocak_attention_is_a_softmax_of_relu_cosines():
    model, _ = small("senocak")
    maps = torch.randn(2, model.visual.channels, 3, 3)
    audio = torch.randn(2, 128)
    sound = nn.functional.normalize(model.sound_branch(audio), dim=-1)
    cosine = torch.einsum("nchw,nc->nhw", nn.functional.normalize(maps, dim=1), sound)
    expected = cosine.clamp(min=0).flatten(1).softmax(1).view(2, 3, 3)
    assert torch.allclose(model.attend(maps, audio).exp(), expected, atol=1e-6)


def test_deaf_models_hear_a_constant():
    for kind in ("senocak", "avolnet"):
        model, _ = small(kind, "model.audio=false")
        frames = torch.randint(0, 255, (1, 1, 3, 32, 32), dtype=torch.uint8)
        a, b = (model.heatmaps(frames, torch.randn(1, 1, 128))[kind] for _ in range(2))
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# Losses and what they need of a batch


def test_senocak_unsupervised_loss_by_hand():
    visual, positive, negative = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p_own = 1 / (1 + math.e)  # softmax([d+, d-]) = softmax([1, 2])
    assert senocak_unsupervised_loss(visual, positive, negative).item() == pytest.approx(p_own ** 2)
    # Only the samples with a negative count.
    twice = senocak_unsupervised_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0], [0, 0]]),
                                      torch.tensor([[0, 2.0], [0, 0]]), valid=torch.tensor([True, False]))
    assert twice.item() == pytest.approx(p_own ** 2)


def test_senocak_supervised_loss_and_its_target_by_hand():
    masks = torch.zeros(3, 4, 4)
    masks[0, :2, :2] = 1
    boxes = torch.full((3, 1, 4), float("nan"))
    boxes[1, 0] = torch.tensor([0.5, 0.5, 1.0, 1.0])  # frame 1 has no mask, a box in the bottom-right quarter
    target, valid = ground_truth_attention(masks, torch.tensor([True, False, False]), boxes, (2, 2))
    assert valid.tolist() == [True, True, False]
    assert target[0].flatten().tolist() == [1, 0, 0, 0] and target[1].flatten().tolist() == [0, 0, 0, 1]
    uniform = torch.full((3, 2, 2), math.log(1 / 4))
    assert senocak_supervised_loss(uniform, target, valid).item() == pytest.approx(math.log(4))
    peaked = torch.log(torch.tensor([[0.7, 0.1], [0.1, 0.1]])).expand(3, 2, 2)
    assert senocak_supervised_loss(peaked, target, valid).item() == pytest.approx((-math.log(0.7) - math.log(0.1)) / 2)
    full, has = ground_truth_maps(masks, torch.tensor([True, False, False]), boxes)
    assert has.tolist() == [True, True, False] and full[1].sum() == 4 and full[1, 2:, 2:].all()


def test_avc_loss_by_hand():
    assert avc_loss(torch.zeros(4, 2), torch.tensor([1, 0, 1, 0]).bool()).item() == pytest.approx(math.log(2))
    logits = torch.tensor([2.0, -1.0, 5.0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2  # the third pair does not count
    assert avc_loss(logits, torch.tensor([True, False, True]), torch.tensor([True, True, False])).item() == \
        pytest.approx(expected)


def test_negatives_are_clips_whose_class_is_not_in_view():
    label, other = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 0, 2])
    sounding = nn.functional.one_hot(label, 3).bool()
    assert pick_negatives(label, other, sounding).tolist() == [2, 2, 1, 1]
    assert pick_negatives(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.zeros(2, 3, dtype=torch.bool)).tolist() \
        == [NO_NEGATIVE, NO_NEGATIVE]
    audio = torch.arange(4 * 2 * 1.0).view(4, 2, 1)  # second t of the negative for second t
    assert negative_audio(audio, torch.tensor([2, NO_NEGATIVE, 1, 1]))[:, :, 0].tolist() == [[4, 5], [2, 3], [2, 3],
                                                                                            [2, 3]]


def test_the_clips_that_keep_their_ground_truth():
    names = [f"clip{i}" for i in range(2000)]
    kept = keeps_ground_truth(names, 0.1, seed=0)
    assert 0.08 < kept.double().mean() < 0.12
    assert torch.equal(kept[:7], keeps_ground_truth(names[:7], 0.1, seed=0))  # per clip, whatever the batch
    assert not torch.equal(kept, keeps_ground_truth(names, 0.1, seed=1))
    assert not keeps_ground_truth(names, 0.0).any() and keeps_ground_truth(names, 1.0).all()


def test_without_ground_truth_the_supervised_loss_gets_nothing(shards):
    model, config = small("senocak", "loss.supervised_fraction=0", "loss.senocak_unsup=0")
    batch = device_batch(shards, "senocak", config)
    losses = get_kind("senocak").compute_loss(get_kind("senocak").forward(model, batch), batch, config.loss)
    assert losses.total.item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# The localisation suite


class Oracle(nn.Module):
    """Knows every clip: heat map = the mask of the visible object whose class it hears (zeros for anything else),
    correspondence = 1 when the heard class is in view."""

    def __init__(self, clips: list[dict]) -> None:
        super().__init__()
        self.objects, self.sound = {}, {}
        for clip in clips:
            key = clip["frames"].contiguous().numpy().tobytes()
            self.objects[key] = {int(clip["label"]): clip["masks"], int(clip["other_label"]): clip["other_masks"]}
            self.sound[clip["audio"].contiguous().numpy().tobytes()] = int(clip["label"])

    def _scene(self, frames: Tensor) -> dict:
        return self.objects[frames.permute(0, 2, 3, 1).contiguous().numpy().tobytes()]

    def heatmaps(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        maps = torch.zeros(frames.shape[0], frames.shape[1], *frames.shape[-2:])
        for b in range(len(frames)):
            heard = self.sound.get(audio[b].contiguous().numpy().tobytes())
            maps[b] = self._scene(frames[b]).get(heard, maps[b]).float()
        return {"oracle": maps}

    def correspondence(self, frames: Tensor, audio: Tensor) -> Tensor:
        return torch.stack([torch.full((frames.shape[1],), float(self.sound.get(audio[b].contiguous().numpy()
                                                                                .tobytes()) in self._scene(frames[b])))
                            for b in range(len(frames))])


def test_suite_of_an_oracle(shards):
    oracle = Oracle(list(ShardDataset(shards, "test", shuffle=False)))
    result = localisation_suite(oracle, shards, "test", batch_size=3)
    assert result["kind"] == "Oracle" and set(result) == {"kind", "split", "clips", "true", "swap", "maps", "avc"}
    assert result["true"]["pointing"] == 1.0 and result["swap"]["pointing_other"] == 1.0
    assert result["true"]["ap"] == pytest.approx(1.0)
    # The top-half rule: a binary map of an object smaller than half the frame ties at its median value, so it
    # predicts the whole frame; the size-independent figures above are why they are reported beside cIoU.
    assert result["true"]["ciou"] == 0.0 and result["true"]["mean_ciou"] < 0.5
    # The silent visible object's sound is in view too: frame-level correspondence cannot tell it from the own.
    assert result["avc"]["accuracy"] == 1.0 and result["avc"]["hard"] == 0.5
    assert result == localisation_suite(oracle, shards, "test", batch_size=5)
    assert "oracle" in format_localisation_table(result)


def test_avc_accuracy_counts_balanced_pairs():
    accuracies = avc_accuracies(torch.tensor([0.9, 0.6, 0.2]), torch.tensor([0.1, 0.7, 0.5]), None, None)
    assert accuracies == {"accuracy": pytest.approx((2 / 3 + 2 / 3) / 2), "pairs": 3}


def test_retrieval_of_perfect_embeddings_and_chance(shards):
    class Embeddings(nn.Module):
        """Images and audio embedded by the clip's class, known from each clip's audio and frames."""

        def __init__(self) -> None:
            super().__init__()
            self.by_audio = {c["audio"][1].contiguous().numpy().tobytes(): int(c["label"])
                             for c in ShardDataset(shards, "test", shuffle=False)}
            self.by_image = {c[k][1].permute(2, 0, 1).contiguous().numpy().tobytes(): int(c["label"])
                             for c in ShardDataset(shards, "test", shuffle=False) for k in ("crops", "frames")}

        def embed_images(self, images):
            return nn.functional.one_hot(torch.tensor([self.by_image[i.contiguous().numpy().tobytes()]
                                                       for i in images]), 3).float()

        def embed_audio(self, audio):
            return nn.functional.one_hot(torch.tensor([self.by_audio[a.contiguous().numpy().tobytes()]
                                                       for a in audio]), 3).float()

    result = localisation_suite(Embeddings(), shards, "test", batch_size=4)
    retrieval = result["retrieval"]
    assert set(result) == {"kind", "split", "clips", "retrieval"}
    assert all(retrieval[k] == pytest.approx(1.0) for k in ("im2aud", "aud2im", "im2im", "aud2aud"))
    assert retrieval["frame"]["im2aud"] == pytest.approx(1.0) and retrieval["items"] == result["clips"]
    assert all(0 < retrieval["chance"][k] < 1 for k in ("im2aud", "aud2im", "im2im", "aud2aud"))


@pytest.mark.parametrize("kind, sections", [("senocak", {"true", "swap", "maps"}),
                                            ("avolnet", {"true", "swap", "maps", "avc"}),
                                            ("avenet", {"avc", "retrieval"}),
                                            ("tpavi", {"true", "swap", "maps"})])
def test_suite_sections_per_kind(shards, kind, sections):
    model, _ = small(kind, *(["model.channels=16"] if kind == "tpavi" else []))
    result = localisation_suite(model, shards, "test", batch_size=4)
    assert result["kind"] == kind and set(result) == {"kind", "split", "clips", *sections}
    if kind == "tpavi":
        assert set(result["maps"]) == {"tpavi_mask", "tpavi_av"}
        assert result["maps"]["tpavi_av"]["sign"] == choose_av_sign(model, shards, "val")
        assert result["maps"]["tpavi_av"]["sign_split"] == "val"
        flipped = localisation_suite(model, shards, "test", batch_size=4, av_sign=-result["maps"]["tpavi_av"]["sign"])
        assert flipped["maps"]["tpavi_av"]["sign_split"] == "given"
    json.dumps(result)


def test_probe_of_a_kind_without_heat_maps():
    probe = probe_for(small("avenet")[0])
    assert probe.heatmaps is None and probe.correspondence is not None and probe.embed_images is not None


# --------------------------------------------------------------------------------------------------------------
# The CLI: 2 training steps of each config, then the localisation suite


@pytest.mark.parametrize("config", ["synth-senocak", "synth-avolnet", "synth-avenet"])
def test_two_steps_of_each_config_then_eval(shards, tmp_path, config):
    runner = CliRunner()
    result = runner.invoke(avstrain_main, ["train", "--config", str(CONFIGS / f"{config}.toml"), "--shards",
                                           str(shards), "--name", "run", "--runs", str(tmp_path), "--set",
                                           "train.max_steps=2", "--set", "optim.batch_size=4", "--set",
                                           "model.image_size=32", "--set", "train.workers=0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(avstrain_main, ["eval", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--shards",
                                           str(shards), "--split", "test", "--suite", "localisation"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "run" / "localisation.json").read_text())
    assert written["kind"] == config.removeprefix("synth-")
    assert "localisation suite" in result.output
    if config == "synth-senocak":  # the run's page shows the suite's table
        result = runner.invoke(avstrain_main, ["report", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        assert "localisation suite (senocak)" in (tmp_path / "run" / "report.html").read_text()


def test_predict_and_overlays_draw_a_localisers_heat_maps(shards, tmp_path):
    from avsprep.errors import InputError
    from avstrain.predict import write_predictions
    from avstrain.visualise import write_overlays

    model, _ = small("avolnet")
    written = write_predictions(model, shards, tmp_path / "pred", "test", batch_size=4)
    pngs = sorted((tmp_path / "pred").rglob("*.png"))
    assert written == len(pngs) == 2 * len(ShardDataset(shards, "test", shuffle=False))
    result = write_overlays(model, shards, tmp_path / "overlays", 2, "test")
    assert len(result.written) == 2 and result.conditions[:2] == ["own", "swap"]
    with pytest.raises(InputError, match="neither masks nor heat maps"):
        write_overlays(small("avenet")[0], shards, tmp_path / "none", 1, "test")
