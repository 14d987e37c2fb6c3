"""Load the official AVSBench TPAVI checkpoints into ``AVSModel``.

Three layouts (``tests/data/reference/``): S4/MS3 ResNet-50 (``avsbench_resnet50_keys.tsv``: a binary head,
``align_channel`` with bias), AVSS ResNet-50 (``avsbench_avss_resnet50_keys.tsv``, 626 keys: a 71-class head,
``align_channel`` without bias) and AVSS PVT-v2-b5 (``avsbench_avss_pvt_v2_b5_keys.tsv``: the backbone under
``encoder_backbone.*`` in the original PVT repository's names, mapped here onto timm's). The ResNet checkpoints hold
two copies of layers 3 and 4; the forward pass uses ``layer3_1``/``layer4_1``, the ``_2`` copies are ignored.
"""

from __future__ import annotations

import logging
import re

from torch import Tensor, nn

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("resnet.layer3_2.", "resnet.layer4_2.")

# (pattern on the reference key, replacement giving the AVSModel key); first match wins.
_TPAVI_PARTS = {"align_channel": "audio_proj", "norm_layer": "norm", "W_z.0": "out_conv", "W_z.1": "out_bn",
                "theta": "theta", "phi": "phi", "g": "g"}
def _pvt_key(m: re.Match) -> str:
    """An original-PVT-v2 key (``encoder_backbone.<key>``) -> the timm model's key under ``backbone.body``."""
    key = m[1].replace("dwconv.dwconv", "dwconv")
    key = re.sub(r"^patch_embed1\.", "patch_embed.", key)
    key = re.sub(r"^patch_embed([234])\.", lambda n: f"stages.{int(n[1]) - 1}.downsample.", key)
    key = re.sub(r"^block([1-4])\.(\d+)\.", lambda n: f"stages.{int(n[1]) - 1}.blocks.{n[2]}.", key)
    key = re.sub(r"^norm([1-4])\.", lambda n: f"stages.{int(n[1]) - 1}.norm.", key)
    return f"backbone.body.{key}"


_RULES: list[tuple[re.Pattern[str], object]] = [
    (re.compile(r"^encoder_backbone\.(.+)$"), _pvt_key),
    (re.compile(r"^resnet\.layer([34])_1\.(.+)$"), lambda m: f"backbone.layer{m[1]}.{m[2]}"),
    (re.compile(r"^resnet\.((?:conv1|bn1|layer1|layer2)\..+)$"), lambda m: f"backbone.{m[1]}"),
    (re.compile(r"^conv([1-4])\.conv2d_list\.(\d+)\.(.+)$"), lambda m: f"necks.{int(m[1]) - 1}.convs.{m[2]}.{m[3]}"),
    (re.compile(r"^path([1-4])\.resConfUnit([12])\.(conv[12]\..+)$"),
     lambda m: f"decoder.{int(m[1]) - 1}.rcu{m[2]}.{m[3]}"),
    (re.compile(r"^tpavi_b([1-4])\.(align_channel|norm_layer|W_z\.[01]|theta|phi|g)\.(.+)$"),
     lambda m: f"tpavi.{int(m[1]) - 1}.{_TPAVI_PARTS[m[2]]}.{m[3]}"),
    (re.compile(r"^output_conv\.([024])\.(.+)$"), lambda m: f"head.{m[1]}.{m[2]}"),
]


class AVSBenchCheckpointError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""


def checkpoint_layout(state_dict: dict[str, Tensor]) -> dict:
    """What a reference state dict says of the model it fits: {"mask_classes", "audio_proj_bias", "backbone"}
    ("resnet50" or "pvt_v2_b5"); None for what it does not show (no head, no TPAVI: a partial state dict)."""
    keys = {k.removeprefix("module."): v for k, v in state_dict.items()}
    head = keys.get("output_conv.4.weight")
    tpavi = [k for k in keys if re.match(r"^tpavi_b[1-4]\.align_channel\.weight$", k)]
    backbone = ("pvt_v2_b5" if any(k.startswith("encoder_backbone.") for k in keys)
                else "resnet50" if any(k.startswith("resnet.") for k in keys) else None)
    return {"mask_classes": None if head is None else int(head.shape[0]),
            "audio_proj_bias": None if not tpavi else all(k.replace("weight", "bias") in keys for k in tpavi),
            "backbone": backbone}


def _check_layout(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """A readable error when the config built another head, audio projection or backbone than the checkpoint's."""
    config = getattr(model, "config", None)
    if config is None:
        return
    layout = checkpoint_layout(state_dict)
    wanted = {"mask_classes": config.mask_classes, "audio_proj_bias": config.audio_proj_bias,
              "backbone": config.backbone}
    wrong = [f"model.{k} = {str(wanted[k]).lower()} (the checkpoint's: {str(v).lower()})"
             for k, v in layout.items() if v is not None and v != wanted[k]]
    if wrong:
        hint = (" (the AVSS layout: configs/avsbench-avss-r50.toml or -pvt.toml)" if layout["mask_classes"] not in
                (None, 1) else "")
        raise AVSBenchCheckpointError(f"the checkpoint does not fit the config{hint}: set {'; '.join(wrong)}")


def map_avsbench_key(key: str) -> str | None:
    """The ``AVSModel`` state-dict key of a reference checkpoint key; None for an unused ``layer3_2``/``layer4_2``
    copy. Raises ``KeyError`` for a key outside the reference layout."""
    key = key.removeprefix("module.")  # checkpoints saved from a DataParallel wrapper
    if key.startswith(IGNORED_PREFIXES):
        return None
    for pattern, replace in _RULES:
        m = pattern.match(key)
        if m:
            return replace(m)  # type: ignore[operator]
    raise KeyError(key)


def convert_avsbench_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a reference state dict to ``AVSModel`` keys, dropping the ignored copies.

    Raises ``AVSBenchCheckpointError`` listing every key outside the reference layout.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        try:
            new = map_avsbench_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if new is not None:
            out[new] = value
    if unknown:
        raise AVSBenchCheckpointError(f"keys outside the AVSBench layout: {_few(unknown)}")
    return out


def load_avsbench_checkpoint(model: nn.Module, state_dict: dict[str, Tensor], allow_missing: bool = False) -> None:
    """Load an official AVSBench TPAVI checkpoint (a state dict, as ``torch.load(..., weights_only=True)`` gives it)
    into ``model``, an ``AVSModel`` built with the checkpoint's backbone (``resnet50``; ``pvt_v2_b5`` for AVSS PVT),
    ``channels=256``, its TPAVI stages and, for AVSS, ``mask_classes=71`` and ``audio_proj_bias=False`` (the
    layout is read from the state dict and a config that differs is an error naming the fields to set).

    Every checkpoint tensor must land on a model tensor of the same shape, and every model tensor must be given
    (the crop encoder aside, which AVSBench does not have); otherwise ``AVSBenchCheckpointError`` lists what is
    wrong and nothing is loaded. ``allow_missing=True`` loads a partial state dict (single blocks) with the same
    mapping and checks.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    _check_layout(model, state_dict)
    converted = convert_avsbench_state_dict(state_dict)
    own = model.state_dict()
    unexpected = sorted(k for k in converted if k not in own)
    misshaped = sorted(f"{k}: checkpoint {tuple(converted[k].shape)}, model {tuple(own[k].shape)}"
                       for k in converted if k in own and converted[k].shape != own[k].shape)
    missing = [] if allow_missing else sorted(
        k for k in own if k not in converted and not k.startswith("crop_encoder."))
    if unexpected or misshaped or missing:
        raise AVSBenchCheckpointError(
            "AVSBench checkpoint does not fit the model (expects backbone resnet50, channels 256, TPAVI stages as "
            f"in the checkpoint): missing {_few(missing)}; unexpected (mapped names) {_few(unexpected)}; "
            f"mis-shaped {_few(misshaped)}")
    result = model.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys  # checked above
    ignored = sum(1 for k in state_dict if k.removeprefix("module.").startswith(IGNORED_PREFIXES))
    log.info("loaded %d AVSBench tensors (%d unused layer3_2/layer4_2 tensors ignored)", len(converted), ignored)


def _few(items: list[str], n: int = 10) -> str:
    if not items:
        return "none"
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"
