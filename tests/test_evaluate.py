"""avstrain.evaluate: metrics over a split and the audio-reliance suite, on real tiny shards."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

import avstrain.evaluate as evaluation
from avsprep.cli import main as avsprep_main
from avstrain.config import ModelConfig
from avstrain.data import ShardDataset
from avstrain.eval_data import DonorPicker, read_split_table, visible_classes
from avstrain.evaluate import evaluate, format_table, reliance_suite
from avstrain.metrics import f_measure, f_measure_avsbench, mask_iou
from avstrain.models import build_model
from helpers import crops_args, make_dataset, synth_shards

SIZE = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 clips of 3 classes, T=3: the train split (about 28 clips) has swap and off-screen donors."""
    return synth_shards(tmp_path_factory.mktemp("synth"), frames_per_clip=3, clips=40)


@pytest.fixture(scope="module")
def shards_t1(tmp_path_factory) -> Path:
    return synth_shards(tmp_path_factory.mktemp("synth-t1"), frames_per_clip=1, clips=20)


@pytest.fixture(scope="module")
def plain_shards(tmp_path_factory) -> Path:
    """Shards made without --other-masks (labelImg-style data, T=3, 32 px)."""
    root = tmp_path_factory.mktemp("plain")
    result = CliRunner().invoke(avsprep_main, crops_args(make_dataset(root / "raw", clips=12), root / "shards"))
    assert result.exit_code == 0, result.output
    return root / "shards"


def clips_of(shards_dir: Path, split: str) -> list[dict]:
    return list(ShardDataset(shards_dir, split=split, shuffle=False))


# --------------------------------------------------------------------------------------------------------------
# Hand-built models with the AVSModel forward signature: forward(frames [B,T,3,H,W] uint8, audio [B,T,128]).


class ConstantModel(nn.Module):
    """Logits `value` everywhere: +10 predicts every pixel, -10 none."""

    def __init__(self, value: float, audio: bool = True) -> None:
        super().__init__()
        self.value = value
        self.config = SimpleNamespace(audio=audio)

    def forward(self, frames: Tensor, audio: Tensor) -> SimpleNamespace:
        B, T, _, H, W = frames.shape
        return SimpleNamespace(logits=torch.full((B, T, 1, H, W), self.value))


class BrightnessModel(nn.Module):
    """Logits from pixel brightness: a fixed, varied, imperfect segmenter that ignores audio."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(audio=False)

    def forward(self, frames: Tensor, audio: Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=(frames.float().mean(2, keepdim=True) - 110.0) / 20.0)


def frames_key(frames: Tensor) -> bytes:
    """frames [T,S,S,3] uint8 as the dataset yields them."""
    return frames.contiguous().numpy().tobytes()


class SoundOracle(nn.Module):
    """Segments exactly the visible object whose class the audio is the sound of, and nothing for any other audio.

    It knows every clip: frames -> (primary class, {class: that object's masks}), audio -> class. Such a model
    scores mIoU 1 with true audio, mIoU 1 against the other object's mask with swapped audio, and FPR 0 for
    silence, noise and off-screen sounds: the suite's ideal. With `follow_sound=False` it segments the clip's
    primary object whatever it hears: perfect with true audio, and everything the suite is there to catch.
    """

    def __init__(self, clips: list[dict], follow_sound: bool = True) -> None:
        super().__init__()
        self.config = SimpleNamespace(audio=True)
        self.follow_sound = follow_sound
        self.objects = {}
        self.sound = {}
        for clip in clips:
            label, other = int(clip["label"]), int(clip["other_label"])
            self.objects[frames_key(clip["frames"])] = (label, {label: clip["masks"], other: clip["other_masks"]})
            self.sound[clip["audio"].numpy().tobytes()] = label

    def forward(self, frames: Tensor, audio: Tensor) -> SimpleNamespace:
        B, T, _, H, W = frames.shape
        logits = torch.full((B, T, 1, H, W), -10.0)
        for b in range(B):
            primary, objects = self.objects[frames_key(frames[b].permute(0, 2, 3, 1))]
            heard = self.sound.get(audio[b].contiguous().numpy().tobytes()) if self.follow_sound else primary
            if heard in objects:
                logits[b, :, 0] = torch.where(objects[heard].bool(), 10.0, -10.0)
        return SimpleNamespace(logits=logits)


def small_model(audio: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", channels=16, image_size=SIZE, audio=audio))


# --------------------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_json_shape_and_per_class_counts_add_up(shards):
    result = evaluate(ConstantModel(-10.0), shards, split="train")
    assert set(result) == {"split", "overall", "per_class"} and result["split"] == "train"
    assert set(result["overall"]) == {"miou", "f", "f_avsbench", "clips", "frames"}
    clips = clips_of(shards, "train")
    assert result["overall"]["clips"] == len(clips)
    assert result["overall"]["frames"] == sum(int(clip["mask_valid"].sum()) for clip in clips)
    assert sum(entry["clips"] for entry in result["per_class"].values()) == len(clips)
    classes = ShardDataset(shards, split="train").classes
    for name, entry in result["per_class"].items():
        assert set(entry) == {"miou", "f", "clips"} and name in classes
        assert entry["clips"] == sum(classes[int(clip["label"])] == name for clip in clips)
    # Predicting nothing scores IoU 0 on every frame with an object (every synthetic frame has one). (F is not 0:
    # at the reference's threshold 0 every pixel counts as positive.)
    assert result["overall"]["miou"] == pytest.approx(0.0, abs=1e-6)


def test_oracle_scores_one_overall_and_per_class(shards):
    result = evaluate(SoundOracle(clips_of(shards, "train")), shards, split="train")
    for key in ("miou", "f", "f_avsbench"):
        assert result["overall"][key] == pytest.approx(1.0)
    assert all(entry["miou"] == pytest.approx(1.0) for entry in result["per_class"].values())


def test_evaluate_matches_metrics_over_the_whole_split_at_once(shards):
    """A fixed imperfect segmenter: the streaming figures equal the metrics computed on every frame at once."""
    model = BrightnessModel()
    clips = clips_of(shards, "test")
    frames = torch.stack([clip["frames"] for clip in clips]).permute(0, 1, 4, 2, 3)
    logits = model(frames, None).logits[:, :, 0].flatten(0, 1)
    masks = torch.stack([clip["masks"] for clip in clips]).flatten(0, 1)
    assert all(clip["mask_valid"].all() for clip in clips)  # so every frame counts
    result = evaluate(model, shards, split="test", batch_size=3)["overall"]
    assert 0.05 < result["miou"] < 0.95  # a non-trivial figure, or the comparison proves little
    assert result["miou"] == pytest.approx(mask_iou(logits, masks), abs=1e-9)
    assert result["f"] == pytest.approx(f_measure(logits, masks), abs=1e-9)
    assert result["f_avsbench"] == pytest.approx(f_measure_avsbench(logits, masks, 4, 3), abs=1e-9)


def test_only_frames_with_masks_count(shards, monkeypatch):
    """Frames without a mask (S4 training clips have one on frame 1 only) are left out of every figure."""
    clips = clips_of(shards, "train")
    oracle = SoundOracle(clips)  # segments the sounding object on every frame
    real_iter = ShardDataset.__iter__

    def first_frame_only(self):
        for clip in real_iter(self):
            clip["mask_valid"][1:] = False
            clip["masks"][1:] = 0  # scored as empty frames (IoU < 1 against the oracle's object) if counted
            yield clip

    monkeypatch.setattr(ShardDataset, "__iter__", first_frame_only)
    result = evaluate(oracle, shards, split="train")["overall"]
    assert result["frames"] == result["clips"] == len(clips)
    assert result["miou"] == pytest.approx(1.0)


def test_evaluate_streams_and_does_not_depend_on_batching_or_workers(shards, monkeypatch):
    calls = []
    real_predict = evaluation.predict_logits

    def counting_predict(model, batch, *args, **kwargs):
        calls.append(len(batch["name"]))
        return real_predict(model, batch, *args, **kwargs)

    monkeypatch.setattr(evaluation, "predict_logits", counting_predict)
    model = BrightnessModel()
    reference = evaluate(model, shards, split="train", batch_size=4, num_workers=0)
    n = reference["overall"]["clips"]
    assert calls == [4] * (n // 4) + ([n % 4] if n % 4 else [])  # one model call per batch, fed as it comes
    for batch_size, num_workers in ((1, 2), (3, 2)):
        other = evaluate(model, shards, split="train", batch_size=batch_size, num_workers=num_workers)
        assert other["overall"] == pytest.approx(reference["overall"], abs=1e-12)
        assert other["per_class"].keys() == reference["per_class"].keys()
        for name, entry in reference["per_class"].items():
            assert other["per_class"][name] == pytest.approx(entry, abs=1e-12)


def test_max_clips_takes_the_first_clips_of_the_split_whatever_the_workers(shards):
    model = BrightnessModel()
    one = evaluate(model, shards, split="train", max_clips=5)
    two = evaluate(model, shards, split="train", max_clips=5, batch_size=2, num_workers=2)
    assert one["overall"]["clips"] == two["overall"]["clips"] == 5
    assert two["overall"] == pytest.approx(one["overall"], abs=1e-12)


def test_evaluate_restores_the_training_mode(shards):
    model = BrightnessModel().train()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    evaluate(model, shards, split="test")
    assert modes and not any(modes) and model.training


# --------------------------------------------------------------------------------------------------------------
# The reliance suite


def test_suite_shape_and_the_ideal_model(shards):
    clips = clips_of(shards, "train")
    result = reliance_suite(SoundOracle(clips), shards, split="train")
    assert set(result) == {"split", "true", "swap", "silence", "noise", "offscreen"}
    assert result["true"] == pytest.approx({"miou": 1.0, "f": 1.0, "f_avsbench": 1.0, "clips": len(clips)})
    with_other = sum(int(clip["other_label"]) >= 0 for clip in clips)
    assert result["swap"]["clips"] > 0 and result["swap"]["clips"] + result["swap"]["skipped"] == with_other
    assert result["swap"]["miou_other"] == pytest.approx(1.0) and result["swap"]["f_other"] == pytest.approx(1.0)
    for condition in ("silence", "noise", "offscreen"):
        assert result[condition]["fpr"] == 0.0, condition
    assert result["silence"]["clips"] == result["noise"]["clips"] == len(clips)
    assert result["offscreen"]["clips"] + result["offscreen"]["skipped"] == len(clips)
    assert result["offscreen"]["clips"] > 0


def test_suite_catches_a_model_that_ignores_the_sound(shards):
    """Segmenting the clip's primary object whatever is heard: perfect with true audio, wrong under the swap,
    and false positives for every negative audio."""
    blind = SoundOracle(clips_of(shards, "train"), follow_sound=False)
    result = reliance_suite(blind, shards, split="train")
    assert result["true"]["miou"] == pytest.approx(1.0)
    assert result["swap"]["miou_other"] < 0.5
    for condition in ("silence", "noise", "offscreen"):
        assert result[condition]["fpr"] > 0.05, condition


@pytest.mark.parametrize("value, expected", [(-10.0, 0.0), (10.0, 1.0)])
def test_suite_fpr_of_empty_and_full_predictions(shards, value, expected):
    result = reliance_suite(ConstantModel(value), shards, split="train")
    for condition in ("silence", "noise", "offscreen"):
        assert result[condition]["fpr"] == expected, condition


def test_swap_and_offscreen_donors(shards):
    table = read_split_table(ShardDataset(shards, split="train", shuffle=False), with_audio=True)
    picker = DonorPicker(table.labels, seed=0)
    classes = sorted(set(table.labels.tolist()))
    assert len(classes) == 3
    picks = []
    for position in range(len(table)):
        for label in classes:
            donor = picker.swap(position, label)
            assert donor is not None and donor != position and table.labels[donor] == label
            picks.append(donor)
        visible = {int(table.labels[position])}
        donor = picker.offscreen(position, visible)
        assert donor is not None and donor != position and int(table.labels[donor]) not in visible
        assert picker.offscreen(position, set(classes)) is None  # every class in view: no off-screen sound
    assert picker.swap(0, -1) is None
    # The only clip of a class cannot donate to itself.
    assert DonorPicker(np.array([0, 1, 1]), seed=0).swap(0, 0) is None
    # Deterministic per seed; another seed draws differently.
    assert picks == [DonorPicker(table.labels, 0).swap(p, c) for p in range(len(table)) for c in classes]
    assert picks != [DonorPicker(table.labels, 1).swap(p, c) for p in range(len(table)) for c in classes]


def test_visible_classes():
    sounding = torch.tensor([False, True, False, False])
    assert visible_classes(1, 3, sounding) == {1, 3}
    assert visible_classes(-1, -1, torch.zeros(4, dtype=torch.bool)) == set()


def test_suite_does_not_depend_on_batching_or_workers(shards):
    model = small_model()
    reference = reliance_suite(model, shards, split="test", batch_size=4)
    other = reliance_suite(model, shards, split="test", batch_size=1, num_workers=2)
    assert other.keys() == reference.keys()
    for key in ("true", "swap", "silence", "noise", "offscreen"):
        assert other[key] == pytest.approx(reference[key], abs=1e-12), key


def test_suite_without_other_masks(plain_shards):
    result = reliance_suite(BrightnessModel(), plain_shards, split="train")
    assert result["swap"]["clips"] == 0 and "note" in result["swap"]
    assert 0.0 <= result["silence"]["fpr"] <= 1.0 and result["true"]["clips"] > 0
    assert "note: swap" in format_table(result)


def test_frames_per_clip_one(shards_t1):
    model = small_model()
    result = evaluate(model, shards_t1, split="train")
    assert result["overall"]["frames"] == result["overall"]["clips"] > 0
    suite = reliance_suite(model, shards_t1, split="train", max_clips=6)
    assert suite["true"]["clips"] == 6 and suite["swap"]["clips"] > 0
    assert all(0.0 <= suite[key]["fpr"] <= 1.0 for key in ("silence", "noise", "offscreen"))


def test_vision_only_model(shards, monkeypatch):
    """A model without audio runs once per batch: its one prediction serves every audio condition."""
    calls = []
    real_predict = evaluation.predict_logits
    monkeypatch.setattr(evaluation, "predict_logits", lambda *a, **k: calls.append(1) or real_predict(*a, **k))
    model = small_model(audio=False)
    result = reliance_suite(model, shards, split="test", batch_size=4)
    assert len(calls) == math.ceil(result["true"]["clips"] / 4)
    assert result["silence"]["fpr"] == result["noise"]["fpr"]  # the same predictions, whatever the audio
    assert evaluate(model, shards, split="test")["overall"]["miou"] == pytest.approx(result["true"]["miou"])


def test_random_resnet18_end_to_end(shards):
    model = small_model()
    result = evaluate(model, shards, split="test", amp_dtype=torch.bfloat16)
    suite = reliance_suite(model, shards, split="test", seed=3)
    for value in (*result["overall"].values(), *suite["true"].values(), suite["noise"]["fpr"]):
        assert math.isfinite(value) and value >= 0
    assert 0.0 <= result["overall"]["miou"] <= 1.0 and 0.0 <= suite["offscreen"]["fpr"] <= 1.0
    table = format_table(suite)
    assert all(word in table for word in ("true", "swap", "miou_other", "silence", "noise", "offscreen"))


# --------------------------------------------------------------------------------------------------------------
# Table


def test_format_table_of_both_shapes(shards):
    result = evaluate(BrightnessModel(), shards, split="test")
    table = format_table(result)
    assert table.splitlines()[0] == "split test"
    assert f"{result['overall']['miou']:.4f}" in table
    for name in result["per_class"]:
        assert name in table
    suite = reliance_suite(ConstantModel(10.0), shards, split="test")
    assert "1.0000" in format_table(suite)  # the FPR of an all-positive prediction
    with pytest.raises(ValueError):
        format_table({"split": "test"})


# --------------------------------------------------------------------------------------------------------------
# hearing: the trainer's "does it hear yet?" check (train.negatives_start = "hears")


def test_hearing_of_a_model_that_follows_the_sound_and_of_one_that_does_not(shards):
    clips = clips_of(shards, "train")
    heard = evaluation.hearing(SoundOracle(clips), shards, split="train")
    assert heard["clips"] > 0
    assert heard["miou_true"] == pytest.approx(1.0) and heard["miou_swap"] == pytest.approx(0.0, abs=1e-6)
    assert heard["gap"] == pytest.approx(1.0)
    assert heard["p_target"] > 0.99 and heard["p_other"] < 0.01 and heard["p_other_swap"] > 0.99
    deaf = evaluation.hearing(SoundOracle(clips, follow_sound=False), shards, split="train")
    assert deaf["clips"] == heard["clips"]
    assert deaf["miou_true"] == pytest.approx(1.0) and deaf["miou_swap"] == pytest.approx(1.0)
    assert deaf["gap"] == pytest.approx(0.0) and deaf["p_other_swap"] < 0.01
    # The same numbers whatever the batching (donors are drawn per clip).
    again = evaluation.hearing(SoundOracle(clips), shards, split="train", batch_size=3)
    assert again.pop("split") == heard.pop("split") == "train"
    assert again == pytest.approx(heard)


def test_hearing_without_other_masks_scores_nothing(plain_shards):
    result = evaluation.hearing(ConstantModel(10.0), plain_shards, split="train")
    assert result["clips"] == 0 and result["gap"] == 0.0
