"""Image backbones behind one interface: four stage maps at strides 4, 8, 16, 32.

ResNet-18/34/50 come from torchvision (built with ``weights=None``); PVT-v2 comes from ``timm`` when the optional
``[timm]`` extra is installed. ImageNet weights are only ever read from a local file the user names.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50")
STRIDES = (4, 8, 16, 32)


class Backbone(nn.Module, abc.ABC):
    """Common interface: ``forward(x [N,3,H,W]) -> [s1, s2, s3, s4]`` with s_k of shape
    [N, channels[k], H/strides[k], W/strides[k]]."""

    channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int] = STRIDES

    @abc.abstractmethod
    def forward(self, x: Tensor) -> list[Tensor]: ...

    @abc.abstractmethod
    def load_weights(self, path: str | Path) -> None:
        """Load ImageNet weights from a local file."""

    def keep_stages(self, last: int) -> None:
        """Drop the stages after stage `last` (0..3): they become identities, so a model that reads stage `last`
        pays nothing for them and has no parameter without a gradient. The maps after `last` then repeat it."""
        for k in range(last + 1, len(STRIDES)):
            self._replace_stage(k, nn.Identity())
        self.channels = tuple(c if k <= last else self.channels[last] for k, c in enumerate(self.channels))
        self.strides = tuple(s if k <= last else self.strides[last] for k, s in enumerate(self.strides))

    @abc.abstractmethod
    def _replace_stage(self, k: int, module: nn.Module) -> None: ...


class ResNetBackbone(Backbone):
    """torchvision ResNet without its classifier.

    The stem and the four layers keep torchvision's attribute names, so a torchvision state dict (minus ``fc.*``)
    loads as is, and the AVSBench checkpoint's ``resnet.layer3_1``/``layer4_1`` map onto ``layer3``/``layer4``.
    """

    def __init__(self, name: str = "resnet50") -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; expected one of {RESNETS}")
        net = getattr(torchvision.models, name)(weights=None)
        self.name = name
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if name == "resnet50" else 1
        self.channels = tuple(c * expansion for c in (64, 128, 256, 512))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [N, 64, H/4, W/4]
        s1 = self.layer1(x)  # [N, c1, H/4, W/4]
        s2 = self.layer2(s1)  # [N, c2, H/8, W/8]
        s3 = self.layer3(s2)  # [N, c3, H/16, W/16]
        s4 = self.layer4(s3)  # [N, c4, H/32, W/32]
        return [s1, s2, s3, s4]

    def load_weights(self, path: str | Path) -> None:
        """Load a torchvision-format ResNet state dict from a local file; the classifier (``fc.*``) is dropped.

        Any other missing, unexpected or mis-shaped key raises: a silently half-loaded backbone trains badly.
        """
        state = _read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        _strict_load(self, state, source=str(path))
        log.info("loaded %s weights from %s", self.name, path)

    def _replace_stage(self, k: int, module: nn.Module) -> None:
        setattr(self, f"layer{k + 1}", module)


class PVTv2Backbone(Backbone):
    """PVT-v2 (``pvt_v2_b0`` .. ``pvt_v2_b5``) from timm, classifier removed.

    The full timm model is built (not timm's ``features_only`` wrapper, which renames modules) so that a timm
    checkpoint loads by its own keys; the four stage outputs are collected by running the stages one by one.
    """

    def __init__(self, name: str = "pvt_v2_b5") -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:  # the extra is optional; say how to get it
            raise ImportError(f"backbone {name!r} needs timm: pip install 'avs-toolkit[timm]'") from err
        self.name = name
        self.body = timm.create_model(name, pretrained=False, num_classes=0)
        self.channels = tuple(info["num_chs"] for info in self.body.feature_info)
        reductions = tuple(info["reduction"] for info in self.body.feature_info)
        if reductions != STRIDES:
            raise ValueError(f"{name} gives strides {reductions}, expected {STRIDES}")

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.body.patch_embed(x)
        maps = []
        for stage in self.body.stages:
            x = stage(x)  # [N, c_k, H/s_k, W/s_k]
            maps.append(x)
        return maps

    def load_weights(self, path: str | Path) -> None:
        """Load a PVT-v2 state dict from a local file, in timm's layout or the original PVT repository's (which
        AVSBench's PVT weights use; timm's own filter renames it); the classifier (``head.*``) is dropped."""
        from timm.models import pvt_v2

        state = _read_state_dict(path)
        remap = getattr(pvt_v2, "_checkpoint_filter_fn", None)  # private in timm: tolerate its absence
        if remap is not None:
            state = remap(state, self.body)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        _strict_load(self.body, state, source=str(path))
        log.info("loaded %s weights from %s", self.name, path)

    def _replace_stage(self, k: int, module: nn.Module) -> None:
        self.body.stages[k] = module


def build_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """Build a backbone by name (``resnet18|34|50``, ``pvt_v2_b0..b5``), loading local weights when given."""
    if name in RESNETS:
        backbone: Backbone = ResNetBackbone(name)
    elif name.startswith("pvt_v2_"):
        backbone = PVTv2Backbone(name)
    else:
        raise ValueError(f"unknown backbone {name!r}; expected one of {RESNETS} or pvt_v2_b0..b5")
    if weights is not None:
        backbone.load_weights(weights)
    return backbone


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept the usual wrappers around a bare state dict.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _strict_load(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(
            f"weights in {source} do not fit the backbone: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, "
            f"mis-shaped {_few([f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in misshaped])}")
    module.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 8) -> str:
    if not items:
        return "none"
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"
