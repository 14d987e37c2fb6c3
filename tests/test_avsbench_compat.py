"""Official AVSBench checkpoints load onto AVSModel, and the reference's building blocks are reproduced."""

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from avstrain.config import ModelConfig
from avstrain.models import AVSBenchCheckpointError, build_model, load_avsbench_checkpoint, map_avsbench_key

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
GOLDEN_ATOL = 1e-5


def _reference(name: str) -> Path:
    path = REFERENCE_DIR / name
    assert path.is_file(), f"reference data {path} is missing (expected in tests/data/reference)"
    return path


def _tsv_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in _reference("avsbench_resnet50_keys.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            keys[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return keys


def _random_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10**6, shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def checkpoint():
    return _random_checkpoint(_tsv_keys())


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet50", channels=256))


def test_every_reference_key_lands(full_model, checkpoint):
    keys = _tsv_keys()
    assert len(keys) == 630
    state = checkpoint
    load_avsbench_checkpoint(full_model, state)
    own = full_model.state_dict()

    used = {k for k in keys if not k.startswith(("resnet.layer3_2.", "resnet.layer4_2."))}
    targets = {map_avsbench_key(k): k for k in used}
    assert len(targets) == len(used), "two checkpoint keys map onto one model key"
    assert set(targets) == set(own), "the mapping does not cover the model exactly"
    for target, source in targets.items():
        assert torch.equal(own[target], state[source]), f"{source} did not land on {target}"

    # Spot checks written out by hand, independent of the mapping rules.
    for source, target in [
        ("resnet.conv1.weight", "backbone.conv1.weight"),
        ("resnet.layer3_1.5.bn3.running_var", "backbone.layer3.5.bn3.running_var"),
        ("resnet.layer4_1.0.downsample.0.weight", "backbone.layer4.0.downsample.0.weight"),
        ("conv4.conv2d_list.3.bias", "necks.3.convs.3.bias"),
        ("path1.resConfUnit2.conv1.weight", "decoder.0.rcu2.conv1.weight"),
        ("tpavi_b3.align_channel.weight", "tpavi.2.audio_proj.weight"),
        ("tpavi_b1.W_z.1.running_mean", "tpavi.0.out_bn.running_mean"),
        ("tpavi_b4.norm_layer.bias", "tpavi.3.norm.bias"),
        ("output_conv.4.weight", "head.4.weight"),
    ]:
        assert torch.equal(own[target], state[source])
    # The unused copies are ignored, not loaded over the used ones.
    assert not torch.equal(own["backbone.layer3.0.conv1.weight"], state["resnet.layer3_2.0.conv1.weight"])


def test_module_prefix_is_accepted(full_model, checkpoint):
    state = {f"module.{k}": v * 2 for k, v in checkpoint.items()}
    load_avsbench_checkpoint(full_model, state)
    assert torch.equal(full_model.state_dict()["head.0.bias"], state["module.output_conv.0.bias"])


@pytest.mark.parametrize("damage", ["missing", "misshaped", "unexpected"])
def test_bad_checkpoint_fails_loudly_and_loads_nothing(full_model, checkpoint, damage):
    state = dict(checkpoint)
    key = "tpavi_b2.theta.weight"
    if damage == "missing":
        del state[key]
        pattern = r"missing \[tpavi\.1\.theta\.weight\]"
    elif damage == "misshaped":
        state[key] = torch.zeros(128, 256, 1, 1)
        pattern = r"mis-shaped \[tpavi\.1\.theta\.weight"
    else:
        state["decoder_extra.weight"] = torch.zeros(1)
        pattern = r"decoder_extra\.weight"
    before = full_model.state_dict()["head.0.weight"].clone()
    with pytest.raises(AVSBenchCheckpointError, match=pattern):
        load_avsbench_checkpoint(full_model, state)
    assert torch.equal(full_model.state_dict()["head.0.weight"], before)


def test_model_without_a_stage_rejects_its_tpavi_keys(checkpoint):
    model = build_model(ModelConfig(backbone="resnet50", channels=256, tpavi_stages=(0, 1, 2)))
    with pytest.raises(AVSBenchCheckpointError, match=r"unexpected \(mapped names\) \[tpavi\.3\."):
        load_avsbench_checkpoint(model, checkpoint)


# Golden outputs of the reference blocks at C=32, loaded through the same key mapping.

@pytest.fixture(scope="module")
def golden():
    state = torch.load(_reference("avsbench_blocks_c32_state.pt"), map_location="cpu", weights_only=True)
    with np.load(_reference("avsbench_blocks_c32_io.npz")) as io:
        tensors = {k: torch.from_numpy(io[k]) for k in io.files}
    torch.manual_seed(0)
    # ResNet-18's stage 1 has the 64 channels of the golden neck.
    model = build_model(ModelConfig(backbone="resnet18", channels=32, image_size=96, tpavi_stages=(0,)))
    load_avsbench_checkpoint(model, state, allow_missing=True)
    return model.eval(), tensors


def _max_diff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_golden_neck(golden):
    model, io = golden
    with torch.no_grad():
        assert _max_diff(model.necks[0](io["neck_in"]), io["neck_out"]) <= GOLDEN_ATOL


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_golden_tpavi(golden, mode):
    model, io = golden
    block = copy.deepcopy(model.tpavi["0"]).train(mode == "train")
    with torch.no_grad():
        out = block(io[f"tpavi_{mode}_visual_in"], io[f"tpavi_{mode}_audio_in"])
    assert _max_diff(out.visual, io[f"tpavi_{mode}_out"]) <= GOLDEN_ATOL
    assert _max_diff(out.audio_proj, io[f"tpavi_{mode}_audio_proj"]) <= GOLDEN_ATOL


def test_golden_fusion_two_inputs(golden):
    model, io = golden
    with torch.no_grad():
        out, left = model.decoder[2](io["ffb_a_in"], io["ffb_b_in"])
    assert _max_diff(out, io["ffb_out_two_inputs"]) <= GOLDEN_ATOL
    # The reference's in-place ReLU changes its second input; that changed map is what the AVM loss reads.
    assert _max_diff(left, io["ffb_b_after"]) <= GOLDEN_ATOL
    assert _max_diff(io["ffb_b_in"], io["ffb_b_after"]) > 1e-2


def test_golden_fusion_one_input(golden):
    model, io = golden
    with torch.no_grad():
        out, left = model.decoder[2](io["ffb_single_in"])
    assert _max_diff(out, io["ffb_out_one_input"]) <= GOLDEN_ATOL
    assert _max_diff(left, io["ffb_single_after"]) <= GOLDEN_ATOL


def test_golden_head(golden):
    model, io = golden
    with torch.no_grad():
        assert _max_diff(model.head(io["head_in"]), io["head_out"]) <= GOLDEN_ATOL
