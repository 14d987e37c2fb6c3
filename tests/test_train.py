"""Config loading, the training loop (files, checkpoints, exact resume) and the avstrain CLI, on real tiny shards."""
import json

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

    bad = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad)
    result = runner.invoke(avstrain_main, ["eval", "--checkpoint", str(bad), "--shards", str(shards)])
    assert result.exit_code == 2 and "not an avs-toolkit checkpoint" in result.output
    result = runner.invoke(avstrain_main, ["train", "--shards", str(shards), "--set", "model.nope=1"])
    assert result.exit_code == 2 and "unknown key" in result.output


def test_vision_only_model_ignores_negative_audio(shards, tmp_path, caplog):
    """A model that cannot hear would only learn to predict nothing from negative audio: it is switched off."""
    config = tiny_config("model.audio=false", "train.negatives=1.0", "train.max_steps=2")
    with caplog.at_level("WARNING", logger="avstrain.train"):
        train(config, shards, tmp_path / "deaf")
    assert "train.negatives = 1.0 is ignored" in caplog.text
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
