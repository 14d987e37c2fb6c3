"""Config loading, the training loop (files, checkpoints, exact resume) and the avstrain CLI, on real tiny shards."""
import json
import logging

import pytest
import torch
from click.testing import CliRunner

from helpers import synth_shards
from avstrain.cli import main as avstrain_main
from avstrain.config import ConfigError, build_config, config_to_toml, load_config
from avstrain.train import train

import tomllib

TINY = ["--set", "model.backbone=resnet18", "--set", "model.channels=16", "--set", "model.image_size=64",
        "--set", "optim.batch_size=4", "--set", "train.workers=2", "--set", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synth_shards(tmp_path_factory.mktemp("synth"), frames_per_clip=3, clips=24, num_classes=5,
                        clips_per_shard=8)


def test_config_file_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nbackbone = "resnet18"\nchannels = 32\n[optim]\nlr = 1\n')
    config = load_config(path, ["model.backbone_weights=weights/resnet18.pth", "loss.avm=0.5",
                                "model.tpavi_stages=[2, 3]", "train.amp=fp32"])
    assert config.model.channels == 32 and config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.model.backbone_weights == "weights/resnet18.pth"  # not TOML: taken as a plain string
    assert config.model.tpavi_stages == (2, 3) and config.loss.avm == 0.5 and config.train.amp == "fp32"
    assert build_config(tomllib.loads(config_to_toml(config))) == config


@pytest.mark.parametrize("override, message", [
    ("model.bogus=1", "unknown key"),
    ("nosuch.key=1", "unknown config section"),
    ("optim.lr=fast", "must be float"),
    ("model.backbone=resnet1000", "model.backbone must be one of"),
    ("justakey", "section.key=value"),
])
def test_bad_config_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.toml")):
        load_config(path)


def tiny_config(*extra):
    overrides = [TINY[i + 1] for i in range(0, len(TINY), 2)] + list(extra)
    return load_config(None, overrides)


def test_train_writes_run_folder_and_loadable_checkpoints(shards, tmp_path):
    config = tiny_config("optim.epochs=2", "train.checkpoint_every=3", "train.negatives=0.5")
    result = train(config, shards, tmp_path / "run")
    run = tmp_path / "run"
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, result["steps"] + 1))
    assert {"loss", "bce", "lr", "epoch"} <= set(steps[0])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert 0.0 <= metrics[-1]["val"]["overall"]["miou"] <= 1.0
    for name in ("last.pt", "best.pt", "step-3.pt"):
        state = torch.load(run / name, weights_only=True)
        assert state["config"]["model"]["channels"] == 16
    assert build_config(tomllib.loads((run / "config.toml").read_text())) == config


def test_resume_continues_exactly(shards, tmp_path):
    """A run stopped mid-epoch and resumed logs the same per-step losses as an uninterrupted run."""
    extra = ("optim.epochs=2", "train.negatives=0.5", "model.crop_mode=separate", "loss.crop_cls=0.5",
             "loss.crop_temporal=0.1", "loss.crop_audio=0.1")
    whole = tmp_path / "whole"
    train(tiny_config(*extra), shards, whole)
    parted = tmp_path / "parted"
    train(tiny_config(*extra, "train.max_steps=3"), shards, parted)  # stops inside epoch 0 (4 steps per epoch)
    with (parted / "steps.jsonl").open("a") as log:  # a step logged after the last checkpoint, then a crash
        log.write(json.dumps({"epoch": 0, "step": 4, "loss": -1.0}) + "\n")
    train(tiny_config(*extra), shards, parted, resume=True)
    expected = (whole / "steps.jsonl").read_text().splitlines()
    assert (parted / "steps.jsonl").read_text().splitlines() == expected
    assert (parted / "metrics.jsonl").read_text().count("\n") == 2


def test_avsbench_recipe_smoke(shards, tmp_path):
    """The AVSBench S4 ResNet-50 recipe runs two steps (batch 1) on tiny synthetic shards."""
    from pathlib import Path
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "avsbench-s4-r50.toml",
                         ["optim.batch_size=1", "train.max_steps=2", "train.workers=0"])
    result = train(config, shards, tmp_path / "s4")
    assert result["steps"] == 2
    assert (tmp_path / "s4" / "last.pt").exists()


def test_cli_train_eval_and_bad_input(shards, tmp_path):
    runner = CliRunner()
    result = runner.invoke(avstrain_main, ["train", "--shards", str(shards), "--name", "cli", "--runs", str(tmp_path),
                                           *TINY, "--set", "optim.epochs=1"])
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "cli" / "best.pt"
    result = runner.invoke(avstrain_main, ["eval", "--checkpoint", str(checkpoint), "--shards", str(shards)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cli" / "eval-test.json").read_text())
    assert report["split"] == "test" and set(report["overall"]) >= {"miou", "f", "f_avsbench"}
    assert sum(c["clips"] for c in report["per_class"].values()) == report["overall"]["clips"]
    result = runner.invoke(avstrain_main, ["eval", "--checkpoint", str(checkpoint), "--shards", str(shards),
                                           "--suite", "reliance"])
    assert result.exit_code == 0, result.output
    reliance = json.loads((tmp_path / "cli" / "reliance.json").read_text())
    assert {"true", "swap", "silence", "noise", "offscreen"} <= set(reliance)
    result = runner.invoke(avstrain_main, ["eval", "--checkpoint", str(checkpoint), "--shards", str(shards),
                                           "--suite", "hearing", "--split", "val"])
    assert result.exit_code == 0, result.output
    assert "hearing, split val" in result.output and "miou_swap" in result.output
    heard = json.loads((tmp_path / "cli" / "hearing.json").read_text())
    assert heard["split"] == "val" and heard["clips"] > 0 and heard["gap"] == heard["miou_true"] - heard["miou_swap"]

    bad = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad)
    result = runner.invoke(avstrain_main, ["eval", "--checkpoint", str(bad), "--shards", str(shards)])
    assert result.exit_code == 2 and "not an avs-toolkit checkpoint" in result.output
    result = runner.invoke(avstrain_main, ["train", "--shards", str(shards), "--set", "model.nope=1"])
    assert result.exit_code == 2 and "unknown key" in result.output


def test_vision_only_model_ignores_negative_audio(shards, tmp_path, caplog):
    """A model that cannot hear would only learn to predict nothing from negative audio: it is switched off."""
    config = tiny_config("model.audio=false", "train.negatives=1.0", "train.max_steps=2", "loss.av=1.0",
                         "train.negatives_start=hears", "model.audio_norm=true")
    with caplog.at_level("WARNING", logger="avstrain.train"):
        train(config, shards, tmp_path / "deaf")
    assert "train.negatives = 1.0 is ignored" in caplog.text
    assert "loss.av = 1.0 is ignored" in caplog.text  # no TPAVI, no localisation scores
    steps = [json.loads(line) for line in (tmp_path / "deaf" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["bce"] > 0 for s in steps)


def test_predict_writes_avsbench_layout_and_score_reads_it(shards, tmp_path):
    """predict -> PNGs named like the ground truth; scoring them gives evaluate's mIoU; the ground truth scored
    against itself is perfect, also with the reference's 0-based numbering; a missing prediction is bad input."""
    import cv2
    import numpy as np

    runner = CliRunner()
    assert runner.invoke(avstrain_main, ["train", "--shards", str(shards), "--name", "p", "--runs", str(tmp_path),
                                         *TINY, "--set", "optim.epochs=1"]).exit_code == 0
    out = tmp_path / "pred"
    result = runner.invoke(avstrain_main, ["predict", "--checkpoint", str(tmp_path / "p" / "best.pt"),
                                           "--shards", str(shards), "--out", str(out), "--split", "test"])
    assert result.exit_code == 0, result.output
    files = sorted(out.rglob("*.png"))
    assert files and all(f.parts[-4] == "test" and f.stem.startswith(f.parent.name + "_") for f in files)
    assert {f.stem.rsplit("_", 1)[1] for f in files} == {"1", "2", "3"}
    assert set(np.unique(cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE))) <= {0, 255}

    gt = shards.parent / "raw" / "gt_masks" / "test"
    result = runner.invoke(avstrain_main, ["score", "--pred", str(out), "--gt", str(gt), "--csv", str(tmp_path / "c.csv"),
                                           "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["clips"] == len(files) // 3
    # The files hold sigmoid > 0.5, so their mIoU is evaluate's (F differs: evaluate sweeps probabilities).
    assert runner.invoke(avstrain_main, ["eval", "--checkpoint", str(tmp_path / "p" / "best.pt"),
                                         "--shards", str(shards), "--out", str(tmp_path / "e.json")]).exit_code == 0
    assert scores["miou"] == pytest.approx(json.loads((tmp_path / "e.json").read_text())["overall"]["miou"])
    assert (tmp_path / "c.csv").read_text().count("\n") == scores["clips"] + 1

    zero_based = tmp_path / "zero"
    for path in gt.rglob("*.png"):
        clip, k = path.stem.rsplit("_", 1)
        target = zero_based / path.parent.name / f"{clip}_{int(k) - 1}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    result = runner.invoke(avstrain_main, ["score", "--pred", str(zero_based), "--gt", str(gt), "--index-base", "0",
                                           "--out", str(tmp_path / "self.json")])
    assert result.exit_code == 0, result.output
    perfect = json.loads((tmp_path / "self.json").read_text())
    assert perfect["miou"] == pytest.approx(1.0) and perfect["f"] == pytest.approx(1.0, abs=1e-6)

    next(zero_based.rglob("*.png")).unlink()
    result = runner.invoke(avstrain_main, ["score", "--pred", str(zero_based), "--gt", str(gt), "--index-base", "0"])
    assert result.exit_code == 2 and "no predicted mask" in result.output


def test_negative_audio_replaces_sound_and_empties_the_target(shards):
    from avsprep.shards import read_negatives
    from avstrain.train import NegativeAudio

    def batch():
        labels = torch.tensor([0, 1, 2, 0])
        sounding = torch.nn.functional.one_hot(labels, 3).bool()
        return {"audio": torch.arange(4.0).view(4, 1, 1).expand(4, 3, 128).clone(), "label": labels,
                "sounding": sounding, "other_label": torch.tensor([1, 2, 0, 1]),
                "masks": torch.ones(4, 3, 8, 8, dtype=torch.uint8), "mask_valid": torch.zeros(4, 3, dtype=torch.bool),
                "crop_valid": torch.ones(4, 3, dtype=torch.bool)}

    silence = torch.from_numpy(read_negatives(shards)["silence"][0])
    b = batch()
    NegativeAudio(shards, 1.0, ("silence",), torch.Generator().manual_seed(0)).apply(b)
    assert all(torch.equal(b["audio"][i], silence) for i in range(4))
    assert not b["masks"].any() and b["mask_valid"].all() and not b["crop_valid"].any()

    b = batch()
    NegativeAudio(shards, 1.0, ("offscreen",), torch.Generator().manual_seed(0)).apply(b)
    # Clip 0 shows classes 0 and 1: its sound must come from clip 2 (class 2), the only class not in view.
    assert torch.equal(b["audio"][0], torch.full((3, 128), 2.0))
    # Clip 1 shows 1 and 2: donors are clips 0 and 3 (class 0), with their own, not already replaced, sound.
    assert b["audio"][1, 0, 0].item() in (0.0, 3.0)

    b = batch()
    NegativeAudio(shards, 0.0, ("silence",), torch.Generator().manual_seed(0)).apply(b)
    assert torch.equal(b["audio"], batch()["audio"]) and b["masks"].all()


def test_audio_swap_gives_the_other_objects_sound_and_mask():
    from avstrain.train import AudioSwap

    def batch():
        labels = torch.tensor([0, 1, 0, 2])
        return {"audio": torch.arange(4.0).view(4, 1, 1).expand(4, 3, 128).clone(), "label": labels,
                "sounding": torch.nn.functional.one_hot(labels, 3).bool(), "other_label": torch.tensor([1, 0, -1, 1]),
                "masks": torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                "other_masks": torch.ones(4, 3, 8, 8, dtype=torch.uint8), "crop_valid": torch.ones(4, 3, dtype=torch.bool)}

    b = batch()
    AudioSwap(1.0, torch.Generator().manual_seed(0)).apply(b)
    # Clip 0 shows 0 (sounding) and 1: class 1 sounds alone only in clip 1, so clip 0 hears clip 1's sound.
    assert torch.equal(b["audio"][0], torch.full((3, 128), 1.0))
    assert b["masks"][0].all() and not b["other_masks"][0].any() and not b["crop_valid"][0].any()
    assert (b["label"][0].item(), b["other_label"][0].item(), b["sounding"][0].tolist()) == (1, 0, [False, True, False])
    assert b["audio"][1, 0, 0].item() in (0.0, 2.0)  # class 0 sounds in clips 0 and 2 (clip 0's own, not its swap)
    assert torch.equal(b["audio"][2], batch()["audio"][2])  # nothing else in view: kept
    # Clip 3 shows 2 and 1: it hears clip 1's own sound, though clip 1 itself was swapped first.
    assert torch.equal(b["audio"][3], torch.full((3, 128), 1.0)) and b["masks"][3].all()
    b = batch()
    AudioSwap(0.0, torch.Generator().manual_seed(0)).apply(b)
    assert all(torch.equal(b[k], batch()[k]) for k in b)


def test_audio_swap_needs_other_masks_and_a_model_that_hears(tmp_path, caplog):
    from avstrain.train import fit_to_run
    with caplog.at_level(logging.WARNING):
        assert fit_to_run(tiny_config("train.swap=0.3"), {"has_other_masks": False}).train.swap == 0
        assert fit_to_run(tiny_config("train.swap=0.3", "model.audio=false"), {"has_other_masks": True}).train.swap == 0
    assert "train.swap needs shards with other-object masks" in caplog.text
    assert fit_to_run(tiny_config("train.swap=0.3"), {"has_other_masks": True}).train.swap == 0.3
    with pytest.raises(ConfigError, match="train.swap"):
        tiny_config("train.swap=1.5")


def test_checkpoint_loads_without_the_backbone_weight_file(shards, tmp_path):
    """A model trained from a local ImageNet file evaluates from its checkpoint alone (the file may be gone)."""
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    config = tiny_config("optim.epochs=1", f"model.backbone_weights={weights}")
    train(config, shards, tmp_path / "run")
    weights.unlink()
    result = CliRunner().invoke(avstrain_main, ["eval", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                                                "--shards", str(shards), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "eval-test.json").read_text())["overall"]["miou"] >= 0.0


# ------------------------------------------------------------------------------------------------------------
# train.negatives_start = "hears": negative audio once validation shows the model follows the sound (docs/design.md §17)


def test_negatives_active_by_epoch_and_by_hearing():
    from avstrain.train import negatives_active
    by_epoch = tiny_config("train.negatives_from_epoch=2")
    assert [negatives_active(by_epoch, e, -1) for e in range(4)] == [False, False, True, True]
    hears = tiny_config("train.negatives_from_epoch=2", "train.negatives_start=hears")
    assert [negatives_active(hears, e, -1) for e in range(4)] == [False] * 4  # never heard: never
    assert [negatives_active(hears, e, 1) for e in range(4)] == [False, False, True, True]  # and not before epoch 2
    assert [negatives_active(hears, e, 3) for e in range(5)] == [False, False, False, True, True]
    from avstrain.train import first_negative_epoch, negatives_share
    assert [first_negative_epoch(hears, heard) for heard in (-1, 1, 3)] == [None, 2, 3]
    ramp = tiny_config("train.negatives_ramp=4")
    assert [negatives_share(ramp, step, 10) for step in range(10, 15)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert negatives_share(by_epoch, 10, 10) == 1.0
    with pytest.raises(ConfigError, match="negatives_ramp"):
        tiny_config("train.negatives_ramp=-1")
    with pytest.raises(ConfigError, match="negatives_start"):
        tiny_config("train.negatives_start=soon")
    with pytest.raises(ConfigError, match="hears_margin"):
        tiny_config("train.hears_margin=0")


def _hears_after(epochs_heard, monkeypatch):
    """Stub the hearing check: the model 'hears' at validations after `epochs_heard` epochs or more."""
    import avstrain.evaluate as evaluation
    calls = []

    def fake_hearing(model, shards_dir, split, *args, **kwargs):
        calls.append(split)
        done = len(calls)
        return {"gap": 1.0 if done >= epochs_heard else 0.0, "miou_true": 0.0, "miou_swap": 0.0, "clips": 4}
    monkeypatch.setattr(evaluation, "hearing", fake_hearing)  # the tpavi kind's "hearing" suite
    return calls


def test_negatives_start_when_the_model_hears_and_the_decision_is_checkpointed(shards, tmp_path, monkeypatch):
    import avstrain.train as training
    calls = _hears_after(2, monkeypatch)
    drawn = []
    apply = training.NegativeAudio.apply
    monkeypatch.setattr(training.NegativeAudio, "apply",
                        lambda self, batch, share=1.0: (drawn.append(1), apply(self, batch, share)))
    config = tiny_config("optim.epochs=3", "train.negatives=0.5", "train.negatives_start=hears")
    result = train(config, shards, tmp_path / "run")
    steps_per_epoch = result["steps"] // 3
    assert len(calls) == 2  # checked after epochs 1 and 2; once heard, no more checks
    assert len(drawn) == steps_per_epoch  # negatives only in the third epoch
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["heard_epoch"] for m in metrics] == [-1, 2, 2]
    assert "hearing" in metrics[0] and "hearing" not in metrics[2]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["heard_epoch"] == 2


def test_best_checkpoint_comes_from_epochs_trained_with_negative_audio(shards, tmp_path, monkeypatch):
    """Validation scores the true audio alone: an epoch before negatives may score best, yet best.pt must be one that
    learned to stay dark (the generalisation runs' silence FPR 0.15 came from such a best.pt)."""
    import avstrain.train as training
    falling = iter([0.9, 0.8, 0.7, 0.9, 0.8, 0.7])
    monkeypatch.setattr(training, "metric_value", lambda results, path: next(falling))
    _hears_after(2, monkeypatch)
    extra = ("optim.epochs=3", "train.negatives_start=hears")
    train(tiny_config(*extra, "train.negatives=0.5"), shards, tmp_path / "negatives")
    assert torch.load(tmp_path / "negatives" / "best.pt", weights_only=True)["epoch"] == 3  # the one epoch with them
    _hears_after(2, monkeypatch)
    train(tiny_config(*extra, "train.negatives=0"), shards, tmp_path / "none")
    assert torch.load(tmp_path / "none" / "best.pt", weights_only=True)["epoch"] == 1


def test_resume_after_the_model_heard_continues_exactly(shards, tmp_path, monkeypatch):
    extra = ("optim.epochs=3", "train.negatives=0.5", "train.negatives_start=hears")
    _hears_after(1, monkeypatch)
    train(tiny_config(*extra), shards, tmp_path / "whole")
    _hears_after(1, monkeypatch)
    steps_per_epoch = len((tmp_path / "whole" / "steps.jsonl").read_text().splitlines()) // 3
    parted = tmp_path / "parted"
    train(tiny_config(*extra, f"train.max_steps={steps_per_epoch + 2}"), shards, parted)  # heard, stopped in epoch 1
    assert torch.load(parted / "last.pt", weights_only=True)["heard_epoch"] == 1
    import avstrain.evaluate as evaluation
    monkeypatch.setattr(evaluation, "hearing", lambda *a, **k: pytest.fail("a resumed run that heard checks again"))
    train(tiny_config(*extra), shards, parted, resume=True)
    assert (parted / "steps.jsonl").read_text().splitlines() == (tmp_path / "whole" / "steps.jsonl").read_text().splitlines()


def test_reference_recipes_keep_the_reference_model_and_losses():
    from pathlib import Path
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/avsbench-*.toml")):
        config = load_config(path)
        assert config.model.tpavi_bn_init == 0.0, path
        assert (config.loss.dice, config.loss.av, config.loss.pos_weight) == (0.0, 0.0, 1.0), path
        assert config.train.negatives_start == "epoch", path
        assert (config.model.audio_norm, config.model.audio_clip) == (False, 0.0), path
        assert (config.train.swap, config.train.negatives_ramp) == (0.0, 0), path


def test_audio_norm_standardises_with_the_training_split_and_travels_in_the_checkpoint(shards, tmp_path):
    import numpy as np
    from avstrain.data import ShardDataset
    from avstrain.evaluate import read_split_table
    from avstrain.checkpoint import load_checkpoint, model_from_checkpoint
    train(tiny_config("optim.epochs=1", "model.audio_norm=true"), shards, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    audio = read_split_table(ShardDataset(shards, "train", shuffle=False), with_audio=True).audio
    flat = audio.reshape(-1, audio.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(state["model"]["audio_mean"].numpy(), flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["model"]["audio_std"].numpy(), np.maximum(flat.std(0, ddof=1), 1e-3),
                               rtol=1e-4, atol=1e-5)
    model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"))
    standardised = model.normalize_audio(torch.from_numpy(audio))
    assert standardised.reshape(-1, audio.shape[-1]).mean(0).abs().max() < 1e-3
    # Off (the reference): no buffers, the embeddings reach TPAVI as they are.
    from avstrain.models import build_model
    plain = build_model(tiny_config().model)
    assert "audio_mean" not in plain.state_dict()
    assert torch.equal(plain.normalize_audio(torch.from_numpy(audio)), torch.from_numpy(audio))


def test_audio_clip_squashes_far_audio_and_keeps_the_near():
    from avstrain.models import build_model
    model = build_model(tiny_config("model.audio_norm=true", "model.audio_clip=3").model)
    model.set_audio_stats(torch.zeros(128), torch.ones(128))
    z = torch.tensor([0.0, 0.5, -1.0, 8.0, -16.0]).repeat(128, 1).T  # [5, 128]
    out = model.normalize_audio(z)[:, 0]
    assert out.abs().max() < 3 and out[3] > 2.9 and out[4] < -2.99  # silence-like -16 sigma: near -3, still apart
    torch.testing.assert_close(out[:3], z[:3, 0], atol=0.04, rtol=0.0)  # the training audio's range barely moves
    with pytest.raises(ConfigError, match="audio_clip"):
        tiny_config("model.audio_clip=3")  # without audio_norm
    with pytest.raises(ConfigError, match="audio_clip"):
        tiny_config("model.audio_norm=true", "model.audio_clip=-1")


def test_hears_without_other_masks_falls_back_to_the_epoch_schedule(tmp_path, caplog):
    plain = synth_shards(tmp_path / "plain", frames_per_clip=3, clips=12, num_classes=3, other_masks=False)
    config = tiny_config("optim.epochs=1", "train.max_steps=2", "train.negatives=0.5", "train.negatives_start=hears")
    with caplog.at_level("WARNING", logger="avstrain.train"):
        train(config, plain, tmp_path / "run")
    assert "needs shards with other-object masks" in caplog.text
    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text())["train"]["negatives_start"] == "epoch"


def test_loss_av_needs_tpavi_at_its_stage(shards, tmp_path):
    with pytest.raises(ConfigError, match="loss.av_stage = 0"):
        train(tiny_config("loss.av=1.0", "model.tpavi_stages=[2, 3]"), shards, tmp_path / "run")
