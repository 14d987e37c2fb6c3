"""The TPAVI audio-visual segmentation model (AVSBench, Zhou et al. ECCV 2022), docs/design.md §6, registered as
``model.kind = "tpavi"``.

backbone (4 stages) -> four-dilation necks to C -> TPAVI at chosen stages -> fusion decoder from stride 32 up -> head.
Numerically it is the reference model, including the side effect of its in-place ReLUs (see ``FeatureFusionBlock``);
``load_avsbench_checkpoint`` maps the official checkpoints onto it. ``TPAVIKind`` (at the end) tells the training
loop what it needs: mask BCE, AVM and the crop losses, batches of frames, masks and audio, best.pt by validation mIoU,
the default and the audio-reliance evaluation suites.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError, LossConfig, ModelConfig
from ..data import ShardDataset
from ..eval_data import read_split_table
from ..losses import LossOutput, compute_loss
from .backbones import Backbone, build_backbone
from .crop_encoder import CropEncoder
from .registry import ModelKind, register_model
from .tpavi import TPAVI

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AVSOutput:
    """What ``AVSModel.forward`` returns. B clips of T frames; stage k has size h_k × w_k (stride 4·2^k)."""

    logits: Tensor  # [B, T, K, H, W] mask logits (K = model.mask_classes; 1 for the binary head)
    # The four [B·T, C, h_k, w_k] maps after TPAVI, as the reference leaves them (ReLU'd by the decoder), which is
    # what its AVM loss reads.
    stage_maps: list[Tensor]
    audio_proj: dict[int, Tensor] = field(default_factory=dict)  # per TPAVI stage: [B, T, C]
    av_scores: dict[int, Tensor] = field(default_factory=dict)  # per TPAVI stage: [B, T, h_k, w_k], θ_i·φ_t
    crop_embedding: Tensor | None = None  # [B, T, E] when crops were given
    crop_logits: Tensor | None = None  # [B, T, num_classes] when crops were given and a classifier exists
    crop_audio: Tensor | None = None  # [B, E]: the clip's audio averaged over T and projected, for crop agreement


class DilatedNeck(nn.Module):
    """Sum of four 3×3 convs with dilation = padding = 3, 6, 12, 18 (the reference's ``Classifier_Module``)."""

    def __init__(self, in_channels: int, channels: int, dilations: tuple[int, ...] = (3, 6, 12, 18)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.convs:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, in_channels, h, w] -> [N, channels, h, w]."""
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class ResidualConvUnit(nn.Module):
    """conv3×3(relu(conv3×3(relu(x)))) + relu(x).

    The residual is relu(x), not x: the reference applies ``nn.ReLU(inplace=True)`` to its input first, so the
    skip path sees the rectified tensor, and so does every other holder of that tensor.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, C, h, w] -> (out [N, C, h, w], relu(x), i.e. x as the reference leaves it)."""
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x, x


class FeatureFusionBlock(nn.Module):
    """out = up2(RCU₂(a + RCU₁(b))) with two inputs, up2(RCU₂(a)) with one; bilinear, align_corners=True."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.rcu1 = ResidualConvUnit(channels)
        self.rcu2 = ResidualConvUnit(channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [N, C, h, w], skip [N, C, h, w] or None -> (out [N, C, 2h, 2w], left [N, C, h, w]).

        ``left`` is the stage map as the reference's in-place ReLU leaves it: relu(skip) for a two-input block,
        relu(x) for the one-input top block. The model returns these as ``stage_maps``.
        """
        if skip is None:
            out, left = self.rcu2(x)
        else:
            residual, left = self.rcu1(skip)
            out, _ = self.rcu2(x + residual)
        return F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True), left


class Upsample(nn.Module):
    def __init__(self, scale_factor: float, mode: str = "bilinear", align_corners: bool = False) -> None:
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


def make_head(channels: int, classes: int = 1) -> nn.Sequential:
    """conv3×3 C→128, ×2 bilinear (align_corners=False, unlike the decoder), conv3×3 128→32, ReLU,
    conv1×1 32→classes (1: binary; AVSS: 71).

    Indices 0, 2, 4 hold the convs, as the reference's ``output_conv`` does.
    """
    return nn.Sequential(
        nn.Conv2d(channels, 128, kernel_size=3, padding=1),
        Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(128, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, classes, kernel_size=1),
    )


class AVSModel(nn.Module):
    """TPAVI AVS model. ``forward(frames [B,T,3,H,W], audio [B,T,audio_dim]) -> AVSOutput``; H, W multiples of 32."""

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None,
                 crop_encoder: CropEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone, config.backbone_weights)
        c = config.channels
        self.necks = nn.ModuleList(DilatedNeck(cin, c) for cin in self.backbone.channels)
        self.tpavi_stages = tuple(sorted(config.tpavi_stages)) if config.audio else ()
        self.tpavi = nn.ModuleDict({str(s): TPAVI(c, config.audio_dim, audio_proj_bias=config.audio_proj_bias,
                                                  bn_init=config.tpavi_bn_init)
                                    for s in self.tpavi_stages})
        # decoder[k] fuses stage k (the reference's path{k+1}); it runs from k = 3 down to 0.
        self.decoder = nn.ModuleList(FeatureFusionBlock(c) for _ in range(4))
        # The top block has one input, so its rcu1 never runs; the reference keeps it (and its checkpoint weights).
        # Frozen, so that DistributedDataParallel does not wait for gradients that never come.
        self.decoder[3].rcu1.requires_grad_(False)
        if config.mask_classes < 1:
            raise ValueError("model.mask_classes = 0 must be resolved from the shards before the model is built")
        self.head = make_head(c, config.mask_classes)
        self.crop_encoder = crop_encoder
        if config.audio_norm:
            # Per-dimension mean and std of the training audio (`set_audio_stats`), saved with the weights.
            self.register_buffer("audio_mean", torch.zeros(config.audio_dim))
            self.register_buffer("audio_std", torch.ones(config.audio_dim))
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def set_audio_stats(self, mean: Tensor, std: Tensor, eps: float = 1e-3) -> None:
        """Mean and std [audio_dim] of the training audio embeddings (`model.audio_norm`); std floored at eps."""
        if not self.config.audio_norm:
            raise ValueError("set_audio_stats needs a model built with model.audio_norm = true")
        self.audio_mean.copy_(mean)
        self.audio_std.copy_(std.clamp(min=eps))

    def normalize_audio(self, audio: Tensor) -> Tensor:
        """audio [..., audio_dim] standardised with the training statistics (as it is without `audio_norm`)."""
        if not self.config.audio_norm:
            return audio
        audio = (audio - self.audio_mean.to(audio.dtype)) / self.audio_std.to(audio.dtype)
        if self.config.audio_clip:
            audio = self.config.audio_clip * torch.tanh(audio / self.config.audio_clip)  # smooth, into ±audio_clip
        return audio

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [N,3,H,W] in 0..255 or float in 0..1 -> ImageNet-normalised float."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def forward(self, frames: Tensor, audio: Tensor | None = None, crops: Tensor | None = None,
                frame_valid: Tensor | None = None) -> AVSOutput:
        """Segment the sounding object.

        frames [B, T, 3, H, W] (uint8, or float in 0..1); audio [B, T, audio_dim] (required unless the model was
        built with ``audio=False``); crops [B, T, 3, h, w] of the annotated objects, only with a crop encoder.
        Crops go through the same forward so that DistributedDataParallel sees every parameter used.
        frame_valid [B, T] bool (AVSS, docs/design.md §14): 1 real, 0 padded; it multiplies the necks, the TPAVI outputs,
        the decoder outputs and the logits, where the reference multiplies its per-frame flag, so padded frames give
        zero logits. Padded frames skip the backbone (their maps are zeroed at the necks anyway).
        """
        B, T, _, H, W = frames.shape
        if self.tpavi_stages and (audio is None or audio.shape[:2] != (B, T)):
            raise ValueError(f"audio must be [B={B}, T={T}, {self.config.audio_dim}], "
                             f"got {None if audio is None else tuple(audio.shape)}")
        if audio is not None:
            audio = self.normalize_audio(audio)  # [B, T, audio_dim]
        flag = None if frame_valid is None else frame_valid.reshape(B * T, 1, 1, 1).to(self.pixel_mean.dtype)
        maps = [neck(f) for neck, f in zip(self.necks, self._backbone_maps(frames, frame_valid))]  # 4×[B·T,C,h,w]
        maps = [_flagged(m, flag) for m in maps]

        audio_proj: dict[int, Tensor] = {}
        av_scores: dict[int, Tensor] = {}
        for s in self.tpavi_stages:
            maps[s], audio_proj[s], av_scores[s] = self._tpavi(s, maps[s], audio, B, T)
            maps[s] = _flagged(maps[s], flag)

        d, maps[3] = self.decoder[3](maps[3])  # [B·T, C, H/16, W/16]
        d = _flagged(d, flag)
        for s in (2, 1, 0):
            d, maps[s] = self.decoder[s](d, maps[s])  # ends at [B·T, C, H/2, W/2]
            d = _flagged(d, flag)
        logits = _flagged(self.head(d), flag).view(B, T, -1, H, W)

        output = AVSOutput(logits=logits, stage_maps=maps, audio_proj=audio_proj, av_scores=av_scores)
        if crops is not None:
            if self.crop_encoder is None:
                raise ValueError("crops were given but the model has no crop encoder (model.crop_mode = 'off')")
            shared = self.backbone if self.crop_encoder.trunk is None else None
            crop_out = self.crop_encoder(self.normalize(crops.flatten(0, 1)), shared_trunk=shared)
            output.crop_embedding = crop_out.embedding.view(B, T, -1)
            if crop_out.logits is not None:
                output.crop_logits = crop_out.logits.view(B, T, -1)
            if audio is not None:
                output.crop_audio = self.crop_encoder.project_audio(audio)
        return output

    def _backbone_maps(self, frames: Tensor, frame_valid: Tensor | None) -> list[Tensor]:
        """frames [B, T, 3, H, W] -> the four backbone maps [B·T, c_k, h_k, w_k]. With frame_valid, only real
        frames run (in eval mode; BatchNorm in train mode needs the batch the reference gives it); padded frames get
        zero maps, which the flag at the necks makes equivalent: the neck of a padded frame is multiplied by 0."""
        x = self.normalize(frames.flatten(0, 1))  # [B·T, 3, H, W]
        if frame_valid is not None:  # the reference's padded frames are zeros after the ImageNet normalisation
            x = x * frame_valid.reshape(-1, 1, 1, 1).to(x.dtype)
        if frame_valid is None or self.training or bool(frame_valid.all()):
            return self.backbone(x)
        keep = frame_valid.reshape(-1).bool()
        real = self.backbone(x[keep])
        out = []
        for m in real:
            full = m.new_zeros((x.shape[0], *m.shape[1:]))
            full[keep] = m
            out.append(full)
        return out

    def _tpavi(self, s: int, stage_map: Tensor, audio: Tensor, B: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
        """TPAVI at stage s over windows of `model.tpavi_window` frames (the AVSS reference: 5, so a 10-frame clip
        is two independent windows). stage_map [B·T, C, h, w], audio [B, T, A] -> (map [B·T, C, h, w],
        audio_proj [B, T, C], av_scores [B, T, h, w])."""
        _, C, h, w = stage_map.shape
        window = self.config.tpavi_window or T
        if T % window:
            raise ValueError(f"clips of T={T} frames do not split into TPAVI windows of {window}")
        n = B * T // window
        v = stage_map.view(n, window, C, h, w).transpose(1, 2)  # [B·T/window, C, window, h, w]
        out = self.tpavi[str(s)](v, audio.reshape(n, window, -1))
        visual = out.visual.transpose(1, 2).reshape(B * T, C, h, w)
        return visual, out.audio_proj.reshape(B, T, C), out.av_scores.reshape(B, T, h, w)

    @property
    def crop_embedding_source(self) -> str:
        """Which network `embed_crops` uses, in words."""
        if self.crop_encoder is None:
            return "segmentation backbone, pooled last stage (no crop encoder)"
        shared = self.crop_encoder.trunk is None
        return "crop encoder on the segmentation backbone (shared)" if shared else "crop encoder (separate)"

    def embed_crops(self, crops: Tensor) -> Tensor:
        """crops [N, 3, h, w] (uint8, or float in 0..1) -> embeddings [N, E].

        The crop encoder's embedding (Linear after its pooled trunk: its own in ``separate`` mode, the segmentation
        backbone in ``shared`` mode); without a crop encoder, the segmentation backbone's last stage, globally
        average-pooled (E = channels of stage 4).
        """
        x = self.normalize(crops)
        if self.crop_encoder is None:
            return self.backbone(x)[-1].mean(dim=(2, 3))  # [N, C4]
        shared = self.backbone if self.crop_encoder.trunk is None else None
        return self.crop_encoder(x, shared_trunk=shared).embedding  # [N, E]


def _flagged(x: Tensor, flag: Tensor | None) -> Tensor:
    """x [B·T, ...] times the per-frame flag [B·T, 1, 1, 1] (no-op without one)."""
    return x if flag is None else x * flag


def build_tpavi(config: ModelConfig) -> AVSModel:
    """Build the AVS model of ``config``, loading local backbone weights where the config names them."""
    backbone = build_backbone(config.backbone, config.backbone_weights)
    crop_encoder = None
    if config.crop_mode != "off":
        if config.crop_mode == "separate":
            trunk = build_backbone(config.crop_backbone, config.crop_backbone_weights)
            trunk_channels = trunk.channels[-1]
        else:
            trunk, trunk_channels = None, backbone.channels[-1]
        crop_encoder = CropEncoder(trunk_channels, num_classes=config.num_classes, embed_dim=config.crop_embed_dim,
                                   audio_dim=config.audio_dim, trunk=trunk)
    model = AVSModel(config, backbone=backbone, crop_encoder=crop_encoder)
    log.info("built AVS model: %s, C=%d, TPAVI stages %s, crop mode %s, %.1fM parameters", config.backbone,
             config.channels, model.tpavi_stages, config.crop_mode,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def check_semantic_losses(loss: LossConfig, mask_classes: int) -> None:
    """ConfigError for a loss that does not fit the head: BCE on a K-class head, CE or kl_semantic on a binary one."""
    if mask_classes > 1 and (loss.bce > 0 or (loss.avm > 0 and loss.avm_variant != "kl_semantic")):
        raise ConfigError(f"a {mask_classes}-class head trains with loss.ce and loss.avm_variant='kl_semantic': "
                          "set loss.bce=0 (and loss.avm_variant='kl_semantic' or loss.avm=0)")
    if mask_classes == 1 and (loss.ce > 0 or (loss.avm > 0 and loss.avm_variant == "kl_semantic")):
        raise ConfigError("loss.ce and loss.avm_variant='kl_semantic' need a semantic head (model.mask_classes > 1)")


def _unwrap(network: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or compiled) wrapper."""
    while hasattr(network, "module") or hasattr(network, "_orig_mod"):
        network = getattr(network, "module", None) or network._orig_mod
    return network


def uses_crops(config: Config) -> bool:
    """Whether training feeds crops: a crop encoder and at least one crop loss."""
    loss = config.loss
    return config.model.crop_mode != "off" and bool(loss.crop_cls or loss.crop_temporal or loss.crop_audio)


@register_model("tpavi")
class TPAVIKind(ModelKind):
    """The TPAVI segmentation model: masks from frames and audio, optionally a crop encoder with its losses."""

    options = ("backbone", "backbone_weights", "channels", "image_size", "tpavi_stages", "audio", "audio_dim",
               "crop_mode", "crop_backbone", "crop_backbone_weights", "crop_embed_dim", "num_classes",
               "mask_classes", "audio_proj_bias", "tpavi_window", "tpavi_bn_init", "audio_norm", "audio_clip")
    losses = {"bce": 1.0, "ce": 0.0, "dice": 0.0, "av": 0.0, "avm": 0.0, "crop_cls": 0.0, "crop_temporal": 0.0,
              "crop_audio": 0.0}
    best_metric = "overall.miou"

    def build(self, config: ModelConfig) -> AVSModel:
        return build_tpavi(config)

    def for_shards(self, config: Config, manifest: dict) -> ModelConfig:
        """The crop classifier sized to the shards' class map (no classifier without a crop encoder), the mask
        head to the shards' mask classes (`model.mask_classes = 0`: from the manifest)."""
        if config.loss.crop_cls > 0 and not manifest["classes"]:
            raise ConfigError("loss.crop_cls > 0 needs class labels, and these shards have none "
                              "(AVSBench MS3 has no classes): set loss.crop_cls=0")
        classes = len(manifest["classes"]) if config.model.crop_mode != "off" else 0
        shards_k = int(manifest.get("mask_classes", 1))
        mask_classes = config.model.mask_classes or shards_k
        if mask_classes != shards_k:
            raise ConfigError(f"model.mask_classes = {mask_classes} but the shards' masks have {shards_k} "
                              f"({'binary' if shards_k == 1 else 'semantic'}): set model.mask_classes={shards_k} or 0")
        check_semantic_losses(config.loss, mask_classes)
        if config.loss.av and config.model.audio and config.loss.av_stage not in config.model.tpavi_stages:
            raise ConfigError(f"loss.av reads TPAVI's scores at loss.av_stage = {config.loss.av_stage}, which is not "
                              f"in model.tpavi_stages = {list(config.model.tpavi_stages)}")
        return dataclasses.replace(config.model, num_classes=classes, mask_classes=mask_classes)

    def prepare(self, model: AVSModel, config: Config, shards_dir: Path) -> None:
        """`model.audio_norm`: the per-dimension mean and std of the training split's audio embeddings, read from
        the shards' small datasets (the same on every rank)."""
        if not (config.model.audio_norm and config.model.audio):
            return
        dataset = ShardDataset(shards_dir, config.data.train_split, shuffle=False, rank=0, world_size=1)
        audio = torch.from_numpy(read_split_table(dataset, with_audio=True).audio)  # [N, T, audio_dim]
        flat = audio.reshape(-1, audio.shape[-1]).double()
        model.set_audio_stats(flat.mean(0).float(), flat.std(0).float())

    def batch_fields(self, config: Config) -> tuple[str, ...]:
        fields = ("frames", "masks", "audio", "mask_valid", "frame_valid", "crop_valid", "label")
        return (*fields, "crops") if uses_crops(config) else fields

    def forward(self, network: nn.Module, batch: dict) -> AVSOutput:
        # The per-frame flag is the AVSS model's (docs/design.md §14); the binary S4/MS3 models run without it.
        semantic = _unwrap(network).config.mask_classes > 1
        return network(batch["frames"], batch["audio"], batch.get("crops"),
                       frame_valid=batch.get("frame_valid") if semantic else None)

    def compute_loss(self, output: AVSOutput, batch: dict, config: LossConfig) -> LossOutput:
        return compute_loss(output, config, batch["masks"], batch["mask_valid"], batch["label"], batch["crop_valid"])

    def find_unused_parameters(self, config: Config) -> bool:
        return config.model.crop_mode != "off" and not uses_crops(config)  # a crop encoder that gets no crops

    def suites(self) -> dict:
        from avstrain.evaluate import evaluate, hearing, reliance_suite  # evaluate -> runtime -> checkpoint -> models

        from avstrain.localisation import localisation_suite  # TPAVI's mask and av_scores as heat maps (§13)

        return {"default": evaluate, "reliance": reliance_suite, "localisation": localisation_suite,
                "hearing": hearing}
