"""AVSS, the semantic AVSBench setting (issue 15, docs/design.md §14): the 71-class model with its per-frame flag and
TPAVI windows, the CE and semantic AVM losses, the AVSS checkpoint layouts, the import and the recipe's smoke."""
from __future__ import annotations

import csv
import json
import re

import cv2
import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from avsprep.cli import main as avsprep_main

from avstrain.config import ModelConfig
from avstrain.losses import avm_kl_loss, avm_semantic_loss, semantic_ce_loss
from avstrain.models import AVSBenchCheckpointError, build_model, load_avsbench_checkpoint
from avstrain.models.avsbench_compat import checkpoint_layout
from tests.helpers import REFERENCE, read_all, tone


def _tsv_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            keys[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return keys


def _random_state(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    from tests.test_avsbench_compat import _random_checkpoint  # the S4/MS3 tests' random state dict

    return _random_checkpoint(keys)


def _finite_state(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A random state dict of these keys whose forward pass stays finite: the shared helper's N(0, 1) everywhere
    (negative BN variances, unscaled weights) turns a 1186-tensor PVT into NaN logits, which score as all background
    whatever was loaded. Matrices and kernels N(0, 1/fan_in), norm scales near 1, variances in [0.5, 1.5)."""
    gen, state = torch.Generator().manual_seed(0), {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10**6, shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 1 and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(1, int(np.prod(shape[1:])))
            state[key] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    return state


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


# --- the import --------------------------------------------------------------------------------------------------

AVSS_NAMES = ["background", "dog", "guitar", "car"]


def _write_clip(home, version, uid, frames, masks, seconds, other=None):
    """frames: [n,H,W,3] RGB; masks {i: class-index map [H,W]} written as palette colours; other: an extra mask."""
    from avsprep.palette import classes_to_colours

    folder = home / version / uid
    (folder / "frames").mkdir(parents=True)
    (folder / "labels_rgb").mkdir()
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / "frames" / f"{i}.jpg"), frame[..., ::-1])
    for i, classes in masks.items():
        colours = classes_to_colours(classes)
        if other is not None and i == 0:
            colours[0, 0] = other  # one off-palette pixel
        cv2.imwrite(str(folder / "labels_rgb" / f"{i}.png"), colours[..., ::-1])
    soundfile.write(folder / "audio.wav", tone(440, seconds), 16000)


def make_avss_tree(root, names=AVSS_NAMES):
    """v1s train (5 frames, masks of all five but only frame 0 trains), v1m val (frame 3's mask missing, one
    off-palette pixel), v2 test (10 frames)."""
    home = root / "AVSBench-semantic"
    home.mkdir(parents=True)
    (home / "label2idx.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    rng = np.random.default_rng(0)
    H = W = 32
    square = np.zeros((H, W), np.uint8)
    square[8:16, 8:16] = 1  # dog
    two = square.copy()
    two[20:28, 4:30] = 3  # dog and car
    _write_clip(home, "v1s", "a_v1s", rng.integers(0, 255, (5, H, W, 3), dtype=np.uint8),
                {i: square for i in range(5)}, 5.2)
    _write_clip(home, "v1m", "b_v1m", rng.integers(0, 255, (5, H, W, 3), dtype=np.uint8),
                {i: two for i in (0, 1, 2, 4)}, 5.2, other=(7, 7, 7))
    _write_clip(home, "v2", "c_v2", rng.integers(0, 255, (10, H, W, 3), dtype=np.uint8),
                {i: square * 2 for i in range(10)}, 10.2)
    with (home / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"])
        writer.writerow(["x", "a_v1s", 0, 0, "dog", "train", "v1s"])
        writer.writerow(["y", "b_v1m", 0, 0, "dog", "val", "v1m"])
        writer.writerow(["z", "c_v2", 0, 0, "guitar", "test", "v2"])
    return home


def _import(home, out, *extra):
    return CliRunner().invoke(avsprep_main, ["avsbench", "--root", str(home), "--subset", "avss", "--out", str(out),
                                             "--size", "32", "--crop-size", "16", *extra], catch_exceptions=False)


def test_avss_tree_to_shards_field_by_field(tmp_path):
    home = make_avss_tree(tmp_path)
    result = _import(home, tmp_path / "shards")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["classes"] == ["dog", "guitar", "car"] and manifest["mask_classes"] == 4
    assert manifest["frames_per_clip"] == 10
    assert manifest["report"]["masks_missing"] == 1 and manifest["report"]["mask_off_palette_pixels"] == 1
    _, data = read_all(tmp_path / "shards")
    order = list(data["name"])
    a, b, c = (order.index(n) for n in ("a_v1s", "b_v1m", "c_v2"))
    assert data["frame_valid"][a].tolist() == [True] * 5 + [False] * 5
    assert data["frame_valid"][c].all()
    assert data["mask_valid"][a].tolist() == [True] + [False] * 9  # v1s train: frame 0 only
    assert data["mask_valid"][b].tolist() == [True, True, True, False, True] + [False] * 5  # frame 3 missing
    assert data["mask_valid"][c].all()
    assert data["masks"].dtype == np.uint8
    assert set(np.unique(data["masks"][b, 0])) == {0, 1, 3}  # class indices, the off-palette pixel background
    assert data["masks"][b, 0, 0, 0] == 0 and data["masks"][b, 0, 24, 10] == 3
    assert set(np.unique(data["masks"][c])) == {0, 2}
    assert not data["frames"][a, 5:].any() and not data["audio"][a, 5:].any()  # zero padding
    assert data["audio"][a, :5].any(axis=1).all() and data["audio"][c].any(axis=1).all()
    assert data["sounding"][b].tolist() == [True, False, True] and data["sounding"][c].tolist() == [False, True, False]
    assert np.isfinite(data["boxes"][b, 0]).all(axis=1).sum() == 2  # one box per class (dog, car)
    assert data["crop_valid"][b, 0] and not data["crop_valid"][a, 5]
    assert manifest["has_subset"] and [data["subset"][i] for i in (a, b, c)] == ["v1s", "v1m", "v2"]


def test_avss_versions_and_bad_input(tmp_path):
    home = make_avss_tree(tmp_path)
    result = _import(home, tmp_path / "v2", "--versions", "v2")
    assert result.exit_code == 0 and json.loads((tmp_path / "v2" / "manifest.json").read_text())["clips"] == 1
    cv2.imwrite(str(home / "v1s" / "a_v1s" / "frames" / "5.jpg"), np.zeros((32, 32, 3), np.uint8))  # a 6th frame
    cv2.imwrite(str(home / "v1m" / "b_v1m" / "labels_rgb" / "0.png"), np.zeros((32, 32), np.uint8))  # grey
    result = CliRunner().invoke(avsprep_main, ["avsbench", "--root", str(home), "--subset", "avss", "--out",
                                               str(tmp_path / "bad"), "--size", "32"])
    assert result.exit_code == 2 and "a_v1s" in result.output and "6 frames" in result.output
    result = _import(home, tmp_path / "skip", "--on-error", "skip")
    assert result.exit_code == 0, result.output
    skipped = json.loads((tmp_path / "skip" / "manifest.json").read_text())["skipped"]
    assert sorted(s["clip"] for s in skipped) == ["a_v1s", "b_v1m"]
    assert "expected 8-bit RGB" in " ".join(s["error"] for s in skipped)


# --- the recipe, evaluation --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def avss_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("avss")
    result = _import(make_avss_tree(root), root / "shards")
    assert result.exit_code == 0, result.output
    return root / "shards"


def test_avss_recipe_smoke_and_semantic_eval(avss_shards, tmp_path):
    """The AVSS ResNet-50 recipe (its model and losses; 64 px, K from the tiny shards) runs two steps at batch 1;
    evaluation reports the semantic figures in evaluate's shape."""
    from pathlib import Path

    from avstrain.config import ConfigError, load_config
    from avstrain.evaluate import evaluate
    from avstrain.train import train

    recipe = Path(__file__).resolve().parents[1] / "configs" / "avsbench-avss-r50.toml"
    overrides = ["optim.batch_size=1", "train.max_steps=2", "train.workers=0", "model.image_size=64",
                 "data.val_split=val"]
    with pytest.raises(ConfigError, match="mask_classes = 71 but the shards' masks have 4"):
        train(load_config(recipe, overrides), avss_shards, tmp_path / "wrong")
    result = train(load_config(recipe, [*overrides, "model.mask_classes=0"]), avss_shards, tmp_path / "run")
    assert result["steps"] == 2
    model = result["model"]
    assert model.config.mask_classes == 4 and model.config.tpavi_window == 5
    scores = evaluate(model, avss_shards, split="test")
    overall = scores["overall"]
    assert set(overall) >= {"miou", "f", "miou_real_frames", "f_real_frames", "clips", "frames"}
    assert overall["clips"] == 1 and overall["frames"] == 10
    assert list(scores["per_class"]) == ["background", "dog", "guitar", "car"]
    assert 0 <= overall["miou"] <= 1 and overall["miou"] == pytest.approx(
        sum(c["miou"] for c in scores["per_class"].values()) / 4)
    # colour PNGs in both layouts; scored against the tree they equal the real-frame figure of eval
    from avstrain.evaluate import reliance_suite
    from avstrain.semantic_predict import score_semantic, write_semantic_predictions

    _predict_through_cli(tmp_path / "run" / "last.pt", avss_shards, tmp_path / "pred")
    assert write_semantic_predictions(model, avss_shards, tmp_path / "ref", "test", layout="reference") == 10
    assert cv2.imread(str(tmp_path / "ref" / "c_v2" / "c_v2_9.png")).shape == (240, 360, 3)
    home = avss_shards.parent / "AVSBench-semantic"
    for pred in ("pred", "ref"):
        scored = score_semantic(tmp_path / pred, home / "v2", num_classes=4)
        assert scored["frames"] == 10 and scored["missing_predictions"] == 0
    assert score_semantic(tmp_path / "pred", home / "v2", num_classes=4)["miou"] == pytest.approx(
        overall["miou_real_frames"], abs=1e-9)
    # the whole download holds every split's masks: --split keeps the test clips (the train clip has no prediction)
    from avstrain.cli import main as avstrain_main

    result = CliRunner().invoke(avstrain_main, ["score", "--semantic", "--pred", str(tmp_path / "pred"), "--gt",
                                                str(home), "--num-classes", "4", "--split", "test", "--out",
                                                str(tmp_path / "scored.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "scored.json").read_text())
    assert scored["frames"] == 10 and scored["clips"] == 1 and scored["missing_predictions"] == 0
    assert scored["miou"] == pytest.approx(overall["miou_real_frames"], abs=1e-9)
    reliance = reliance_suite(model, avss_shards, split="test")
    assert set(reliance) >= {"true", "swap", "silence", "noise"} and 0 <= reliance["silence"]["fpr"] <= 1
    from avstrain.runtime import load_for_inference

    loaded, _, _ = load_for_inference(tmp_path / "run" / "last.pt")  # the head as the shards sized it
    assert loaded.config.mask_classes == 4


def _predict_through_cli(checkpoint, shards, out):
    """`avstrain predict` on semantic shards writes the download's layout, <label>/<uid>/labels_rgb/<i>.png: the
    clip's version folder, i from 0, real frames only (the v1m clip's five, the v2 clip's ten)."""
    from avstrain.cli import main as avstrain_main

    for split in ("val", "test"):
        result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(checkpoint), "--shards",
                                                    str(shards), "--out", str(out), "--split", split],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*.png"))
    assert written == sorted([*(f"v1m/b_v1m/labels_rgb/{i}.png" for i in range(5)),
                              *(f"v2/c_v2/labels_rgb/{i}.png" for i in range(10))])
    assert cv2.imread(str(out / "v2" / "c_v2" / "labels_rgb" / "9.png")).shape == (32, 32, 3)


def test_prediction_folders_of_shards_without_subset(caplog):
    """Shards imported before `subset` existed do not know a clip's version: `<split>/` stands in, with a warning."""
    from types import SimpleNamespace

    from avstrain.semantic_predict import clip_folders

    assert clip_folders(SimpleNamespace(manifest={"has_frame_valid": True}, shards_dir="old")) == {}
    assert "<split>/<uid>/" in caplog.text


def test_synth_semantic_tree_imports(tmp_path):
    """`avsprep synth --semantic` writes an AVSS tree (mixed 5- and 10-frame clips, other-object masks) that
    `avsprep avsbench --subset avss` reads, with the silent object's class for the swap test."""
    runner = CliRunner()
    result = runner.invoke(avsprep_main, ["synth", "--semantic", "--out", str(tmp_path / "tree"), "--clips", "8",
                                          "--size", "64"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    label2idx = json.loads((tmp_path / "tree" / "label2idx.json").read_text())
    assert list(label2idx.values()) == list(range(6)) and next(iter(label2idx)) == "background"
    result = _import(tmp_path / "tree", tmp_path / "shards", "--size", "64")
    assert result.exit_code == 0, result.output
    manifest, data = read_all(tmp_path / "shards")
    assert manifest["mask_classes"] == 6 and manifest["has_other_masks"] and manifest["clips"] == 8
    real = data["frame_valid"].sum(1)
    assert set(real.tolist()) <= {5, 10}
    assert (data["other_label"] >= 0).all() and data["other_masks"].max() == 1
    labelled = data["masks"][data["mask_valid"]]
    assert labelled.max() <= 5 and (labelled > 0).any()


def _eval_released_layout(tmp_path, keys_file: str, recipe_name: str) -> tuple[dict, dict]:
    """A finite random state dict of exactly the keys of `keys_file`, saved as a released AVSS checkpoint and
    evaluated by the CLI (`eval --format avsbench --config configs/<recipe_name>`, 224 px, one 10-frame test clip of
    71-class shards). Returns (the eval JSON, `evaluate` of the same weights loaded in memory: overall)."""
    from avstrain.cli import main as avstrain_main
    from avstrain.config import load_config
    from avstrain.evaluate import evaluate

    names = ["background", *(f"class_{i:02d}" for i in range(1, 71))]
    assert _import(make_avss_tree(tmp_path, names), tmp_path / "shards").exit_code == 0
    state = _finite_state(_tsv_keys(keys_file))
    torch.save(state, tmp_path / "AVSS.pth")
    recipe = REFERENCE.parents[2] / "configs" / recipe_name
    result = CliRunner().invoke(avstrain_main, [
        "eval", "--checkpoint", str(tmp_path / "AVSS.pth"), "--format", "avsbench", "--config", str(recipe),
        "--shards", str(tmp_path / "shards"), "--split", "test", "--set", "train.amp=fp32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "AVSS-eval-test.json").read_text())
    assert list(scores["per_class"]) == names and scores["overall"]["frames"] == 10
    model = build_model(load_config(recipe, ["train.amp=fp32"]).model)
    load_avsbench_checkpoint(model, state)
    return scores, evaluate(model, tmp_path / "shards", split="test")["overall"]


def _assert_loaded_weights_decide(scores: dict, expected: dict) -> None:
    assert scores["overall"]["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert scores["overall"]["f"] == pytest.approx(expected["f"], abs=1e-6)
    assert scores["overall"]["miou"] != pytest.approx(15 / 16 / 71)  # not all background (the square is 1/16)


def test_released_avss_layout_evaluates_through_format_avsbench(tmp_path):
    """The released AVSS ResNet-50 layout (626 keys) through the CLI with the R50 AVSS config: the semantic JSON,
    every class by name, and the figures of the same weights in memory (so the loaded weights decide them)."""
    _assert_loaded_weights_decide(*_eval_released_layout(tmp_path, "avsbench_avss_resnet50_keys.tsv",
                                                         "avsbench-avss-r50.toml"))


def test_released_avss_pvt_layout_evaluates_through_format_avsbench(tmp_path):
    """The released AVSS PVT-v2-b5 layout (1186 keys, `encoder_backbone.*` onto timm) through the CLI with the PVT
    AVSS config, checked the same way."""
    pytest.importorskip("timm")
    _assert_loaded_weights_decide(*_eval_released_layout(tmp_path, "avsbench_avss_pvt_v2_b5_keys.tsv",
                                                         "avsbench-avss-pvt.toml"))
