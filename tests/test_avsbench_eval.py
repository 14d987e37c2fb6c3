"""Released AVSBench checkpoints: `avstrain eval --format avsbench`, tools/convert_avsbench_checkpoint.py, and the
AVSBench configs. The checkpoint is a random-weight model saved in the official key layout
(tests/data/reference/avsbench_resnet50_keys.tsv); the shards come from a miniature AVSBench download."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from avsprep.cli import main as avsprep_main
from avstrain.cli import main as avstrain_main
from avstrain.config import ModelConfig, load_config
from avstrain.data import ShardDataset
from avstrain.evaluate import evaluate
from avstrain.models import build_model, map_avsbench_key
from test_avsbench_compat import _tsv_keys
from test_avsbench_import import make_avsbench

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # a multiple of 32, small enough for ResNet-50 on a CPU
SMALL = ["--set", f"model.image_size={SIZE}", "--set", "train.amp=fp32"]


def avsbench_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official checkpoint's keys, exactly as the TSV lists them (630 keys): what
    `torch.save(model.module.state_dict())` gives in the reference code. The unused layer3_2/layer4_2 copies get
    other random values, so loading them by mistake would show."""
    own = model.state_dict()
    generator = torch.Generator().manual_seed(1)
    state, landed = {}, set()
    for key, shape in _tsv_keys().items():
        target = map_avsbench_key(key)
        if target is None:
            state[key] = (torch.randint(1, 100, shape, generator=generator) if key.endswith("num_batches_tracked")
                          else torch.randn(shape, generator=generator))
        else:
            state[key] = own[target].clone()
            landed.add(target)
        assert tuple(state[key].shape) == shape, key
    assert landed == set(own)
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(the in-memory model, its checkpoint in the AVSBench layout, shards of a miniature S4 download)."""
    tmp = tmp_path_factory.mktemp("avsbench-eval")
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet50", channels=256, image_size=SIZE)).eval()
    # Random BatchNorm statistics and TPAVI output BN (zero at init) so that every tensor matters.
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
        for block in model.tpavi.values():
            block.out_bn.weight.normal_(0.0, 0.5)
            block.out_bn.bias.normal_(0.0, 0.5)
    make_avsbench(tmp / "AVSBench", "s4")
    shards = tmp / "shards"
    result = CliRunner().invoke(avsprep_main, ["avsbench", "--root", str(tmp / "AVSBench"), "--subset", "s4",
                                               "--out", str(shards), "--size", str(SIZE), "--crop-size", "16"])
    assert result.exit_code == 0, result.output
    # Centre the output on the val clip, so that about half its pixels are predicted positive: a mask that is all
    # one value would score the same under many wrong weights.
    clip = next(iter(ShardDataset(shards, "val", shuffle=False)))
    with torch.no_grad():
        logits = model(clip["frames"][None].permute(0, 1, 4, 2, 3), clip["audio"][None]).logits
        model.head[4].bias -= logits.median()
    checkpoint = tmp / "S4_best.pth"
    torch.save(avsbench_layout(model), checkpoint)
    return model, checkpoint, shards


def convert(*args):
    """tools/convert_avsbench_checkpoint.py through its command line, in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("convert_avsbench_checkpoint",
                                                  REPO / "tools" / "convert_avsbench_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return CliRunner().invoke(tool.main, list(map(str, args)), catch_exceptions=False)


def run_eval(*args):
    return CliRunner().invoke(avstrain_main, ["eval", *map(str, args)], catch_exceptions=False)


def test_released_checkpoint_evaluates_as_the_model_it_holds(released, tmp_path):
    model, checkpoint, shards = released
    out = tmp_path / "eval.json"
    result = run_eval("--checkpoint", checkpoint, "--format", "avsbench", "--config",
                      REPO / "configs" / "avsbench-s4-r50.toml", *SMALL, "--shards", shards, "--split", "val",
                      "--out", out)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    direct = evaluate(model, shards, "val")  # the model in memory, fp32
    assert set(scores["overall"]) >= {"miou", "f", "f_avsbench"}
    assert scores["overall"]["frames"] == 5
    for key in ("miou", "f", "f_avsbench"):
        assert scores["overall"][key] == pytest.approx(direct["overall"][key], abs=1e-6), key
    # Not a degenerate prediction: the loaded weights decide the number.
    assert 0.0 < scores["overall"]["miou"] < 1.0


def test_converted_checkpoint_evaluates_the_same(released, tmp_path):
    _, checkpoint, shards = released
    converted = tmp_path / "converted" / "best.pt"
    done = convert(checkpoint, converted, "--config", REPO / "configs" / "avsbench-s4-r50.toml", *SMALL)
    assert done.exit_code == 0, done.output
    assert f"wrote {converted}" in done.output
    state = torch.load(converted, map_location="cpu", weights_only=True)
    assert state["format"] == "avs-toolkit checkpoint v1"
    assert state["config"]["model"]["backbone"] == "resnet50" and state["config"]["model"]["backbone_weights"] is None

    assert run_eval("--checkpoint", converted, "--shards", shards, "--split", "test").exit_code == 0
    result = run_eval("--checkpoint", checkpoint, "--format", "avsbench", *SMALL, "--shards", shards, "--split", "test")
    assert result.exit_code == 0, result.output
    # Default outputs: beside each checkpoint; a released one's is named after it (S4_best.pth, MS3_best.pth share a
    # folder).
    ours, theirs = converted.parent / "eval-test.json", checkpoint.parent / "S4_best-eval-test.json"
    assert json.loads(ours.read_text()) == json.loads(theirs.read_text())
    assert json.loads(ours.read_text())["overall"]["frames"] == 5


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_checkpoint_that_does_not_fit_the_config(released, tmp_path):
    _, checkpoint, shards = released
    result = run_eval("--checkpoint", checkpoint, "--format", "avsbench", *SMALL, "--set", "model.tpavi_stages=[0, 1]",
                      "--shards", shards, "--out", tmp_path / "x.json")
    _one_line_error(result, "S4_best.pth", "unexpected", "tpavi.2.")


def test_format_mismatches_and_bad_files(released, tmp_path):
    _, checkpoint, shards = released
    # A released checkpoint without --format avsbench, and the other way round.
    _one_line_error(run_eval("--checkpoint", checkpoint, "--shards", shards), "S4_best.pth", "--format avsbench")
    ours = tmp_path / "ours.pt"
    torch.save({"format": "avs-toolkit checkpoint v1"}, ours)
    _one_line_error(run_eval("--checkpoint", ours, "--format", "avsbench", "--shards", shards), "ours.pt",
                    "without --format avsbench")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    _one_line_error(run_eval("--checkpoint", garbage, "--format", "avsbench", "--shards", shards), "garbage.pth")
    _one_line_error(run_eval("--checkpoint", checkpoint, "--set", "train.amp=fp32", "--shards", shards),
                    "apply to --format avsbench")
    _one_line_error(convert(tmp_path / "missing.pth", tmp_path / "out.pt"), "missing.pth", "not found")
    assert not (tmp_path / "out.pt").exists()


def test_pvt_config():
    config = load_config(REPO / "configs" / "avsbench-s4-pvt.toml", ["model.backbone_weights=pvt_v2_b5.pth"])
    r50 = load_config(REPO / "configs" / "avsbench-s4-r50.toml")
    assert config.model.backbone == "pvt_v2_b5" and config.model.backbone_weights == "pvt_v2_b5.pth"
    # The same recipe as the ResNet-50 one but for the backbone.
    assert (config.model.channels, config.model.image_size, config.model.tpavi_stages) == \
        (r50.model.channels, r50.model.image_size, r50.model.tpavi_stages) == (256, 224, (0, 1, 2, 3))
    assert config.loss == r50.loss and config.optim == r50.optim and config.data == r50.data
    pytest.importorskip("timm")
    model = build_model(ModelConfig(**{**vars(config.model), "backbone_weights": None, "image_size": SIZE})).eval()
    assert model.backbone.channels == (64, 128, 320, 512)
    with torch.no_grad():
        out = model(torch.zeros(1, 2, 3, SIZE, SIZE), torch.zeros(1, 2, 128))
    assert out.logits.shape == (1, 2, 1, SIZE, SIZE)
