"""The training loop: a plain, readable loop in the style of torchvision's `references/` scripts.

    train(config, shards_dir, run_dir, resume=False)

writes `run_dir/config.toml` (resolved), `steps.jsonl` (per-step loss parts), `metrics.jsonl` (per-epoch validation),
`last.pt`, `best.pt` and `step-<n>.pt` every `train.checkpoint_every` steps. Checkpoints hold only tensors and plain
values (model, optimiser, epoch, step, data position, RNG states, config), load with `weights_only=True`, and are
written atomically. `resume=True` continues from `last.pt` exactly: same data order, optimiser and RNG state, so the
per-step losses equal an uninterrupted run's on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from avsprep.errors import InputError
from avsprep.shards import read_manifest, read_negatives
from avstrain.config import Config, ConfigError, config_to_dict, config_to_toml
from avstrain.data import Augmentation, ShardDataset
from avstrain.evaluate import autocast, evaluate
from avstrain.losses import compute_loss
from avstrain.models import build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "avs-toolkit checkpoint v1"


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (about 3x fp32 for ResNet-50 fwd+bwd on these machines)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch without the probes
        return False


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp` on this device, or None for fp32."""
    if amp == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if cpu_has_native_bf16():
        # "auto" too: on the synthetic benchmark bf16 matched fp32 (test mIoU 0.873 vs 0.876) at 1.45x the speed.
        return torch.bfloat16
    if amp == "bf16":
        log.warning("train.amp = bf16 but this CPU has no native bf16 (AMX / AVX512-BF16): running fp32")
    return None


def to_channels_last(model: torch.nn.Module) -> None:
    """channels-last for the 2-D convolutions (TPAVI's Conv3d weights are 5-D and stay as they are)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)


def save_atomic(state: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".partial")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `train` (weights-only load: nothing but tensors and plain values is unpickled)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "checkpoint not found") from None
    except Exception as error:  # torch raises several types for files that are not checkpoints
        first_line = (str(error).splitlines() or [type(error).__name__])[0]  # an empty file gives an empty message
        raise InputError(path, f"not a loadable checkpoint ({first_line[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, "not an avs-toolkit checkpoint (use --format avsbench for the reference's)")
    return state


def _rng_state(negatives_generator: torch.Generator) -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "negatives": negatives_generator.get_state(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "python": random.getstate(),
    }


def _restore_rng(state: dict, negatives_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    negatives_generator.set_state(state["negatives"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(_as_python_rng_state(state["python"]))


def _as_python_rng_state(state) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


class NegativeAudio:
    """Replaces a clip's audio by silence, noise or an off-screen class with probability p (DESIGN §7)."""

    def __init__(self, shards_dir: Path, probability: float, kinds: tuple[str, ...], generator: torch.Generator):
        self.probability = probability
        self.kinds = kinds
        self.generator = generator
        self.embeddings = {k: torch.from_numpy(v) for k, v in read_negatives(shards_dir).items()} if probability else {}

    def apply(self, batch: dict) -> None:
        """In place on a CPU batch: audio replaced, masks emptied and all frames supervised, crops invalid."""
        if not self.probability:
            return
        B = batch["audio"].shape[0]
        draws = torch.rand(B, generator=self.generator)
        kinds = torch.randint(len(self.kinds), (B,), generator=self.generator)
        picks = torch.randint(1 << 30, (B,), generator=self.generator)
        true_audio = batch["audio"].clone()  # off-screen donors give their own sound, not a negative drawn before
        for i in range(B):
            if draws[i] >= self.probability:
                continue
            kind = self.kinds[int(kinds[i])]
            audio = self._offscreen(batch, true_audio, i, int(picks[i])) if kind == "offscreen" else None
            if audio is None:  # silence, noise, or no off-screen donor in this batch
                bank = self.embeddings["silence" if kind == "silence" else "noise"]
                audio = bank[int(picks[i]) % len(bank)]
            batch["audio"][i] = audio
            batch["masks"][i] = 0
            batch["mask_valid"][i] = True
            batch["crop_valid"][i] = False

    @staticmethod
    def _offscreen(batch: dict, true_audio: torch.Tensor, i: int, pick: int) -> torch.Tensor | None:
        """The audio of another clip of the batch whose class is not visible in clip i."""
        visible = batch["sounding"][i].clone()
        other = int(batch["other_label"][i]) if "other_label" in batch else -1
        if other >= 0:
            visible[other] = True
        donors = [j for j in range(batch["label"].shape[0])
                  if j != i and batch["label"][j] >= 0 and not visible[batch["label"][j]]]
        return true_audio[donors[pick % len(donors)]] if donors else None


def _to_device(batch: dict, device: torch.device, image_size: int, with_crops: bool) -> dict:
    """Move a batch to the device in the model's layout; frames stay uint8 until there, then resize if needed."""
    non_blocking = device.type == "cuda"
    frames = batch["frames"].to(device, non_blocking=non_blocking).permute(0, 1, 4, 2, 3)  # [B,T,3,S,S]
    masks = batch["masks"].to(device, non_blocking=non_blocking).float()  # [B,T,S,S]
    B, T, _, S, _ = frames.shape
    if S != image_size:
        frames = F.interpolate(frames.flatten(0, 1).float() / 255.0, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True).view(B, T, 3, image_size, image_size)
        masks = F.interpolate(masks, size=(image_size, image_size), mode="nearest")
    out = {"frames": frames, "masks": masks, "audio": batch["audio"].to(device),
           "mask_valid": batch["mask_valid"].to(device), "crop_valid": batch["crop_valid"].to(device),
           "label": batch["label"].to(device)}
    if with_crops:
        out["crops"] = batch["crops"].to(device, non_blocking=non_blocking).permute(0, 1, 4, 2, 3)  # [B,T,3,c,c]
    return out


def _truncate_log(path: Path, key: str, last: int) -> None:
    """Keep the JSON lines of `path` whose `key` is at most `last` (all of them gone when last is 0)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)[key] <= last]
    path.write_text("".join(line + "\n" for line in kept))


def _learning_rate(config: Config, step: int, total_steps: int) -> float:
    lr = config.optim.lr
    if config.optim.warmup_steps and step < config.optim.warmup_steps:
        return lr * (step + 1) / config.optim.warmup_steps
    if config.optim.lr_schedule == "cosine":
        progress = min(1.0, (step - config.optim.warmup_steps) / max(1, total_steps - config.optim.warmup_steps))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def build_for_shards(config: Config, manifest: dict) -> torch.nn.Module:
    """The model of `config.model`, with the crop classifier sized to the shards' class map."""
    uses_crops = config.model.crop_mode != "off"
    if config.loss.crop_cls > 0 and not manifest["classes"]:
        raise ConfigError("loss.crop_cls > 0 needs class labels, and these shards have none "
                          "(AVSBench MS3 has no classes): set loss.crop_cls=0")
    model_config = dataclasses.replace(config.model, num_classes=len(manifest["classes"]) if uses_crops else 0)
    return build_model(model_config)


def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group) under torchrun; (0, 1, False) otherwise."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), True


def train(config: Config, shards_dir: str | Path, run_dir: str | Path, resume: bool = False,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Train per `config` on the shards; returns {"best_miou", "last": last validation metrics, "steps", "model"}.

    `progress(steps_done, total_steps)` is called after each step. Under `torchrun` (WORLD_SIZE > 1) the model is
    wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU), each rank streams its own block of clips, and
    rank 0 alone validates and writes the run folder. Exact resume is tested for a single process.
    """
    shards_dir, run_dir = Path(shards_dir), Path(run_dir)
    rank, world_size, owns_process_group = _init_distributed()
    is_main = rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(shards_dir)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed)
    random.seed(config.train.seed)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    amp_dtype = resolve_amp(config.train.amp, device)
    log.info("rank %d of %d, device %s, %s, %d threads", rank, world_size, device,
             "bf16 autocast" if amp_dtype else "fp32", torch.get_num_threads())

    augmentation = Augmentation(config.data.flip, config.data.brightness, config.data.contrast) \
        if config.data.augment else None
    dataset = ShardDataset(shards_dir, config.data.train_split, shuffle=True, seed=config.train.seed,
                           buffer_size=config.data.buffer_size, augmentation=augmentation)
    loader_kwargs = dict(batch_size=config.optim.batch_size, num_workers=config.train.workers,
                         pin_memory=device.type == "cuda")
    batches_per_epoch = sum(math.ceil(len(dataset.consumer_order(w, max(1, config.train.workers)))
                                      / config.optim.batch_size) for w in range(max(1, config.train.workers)))
    total_steps = batches_per_epoch * config.optim.epochs
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)

    model = build_for_shards(config, manifest).to(device)
    if config.train.channels_last:
        to_channels_last(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                                 weight_decay=config.optim.weight_decay)
    negatives_generator = torch.Generator().manual_seed(config.train.seed + rank)  # ranks draw differently
    negatives_probability = config.train.negatives
    if negatives_probability and not config.model.audio:
        # A model that cannot hear sees the same frames with and without their sound: negative audio would only
        # teach it to predict nothing. The vision-only baseline trains on the true targets alone.
        log.warning("model.audio = false: train.negatives = %s is ignored", negatives_probability)
        negatives_probability = 0.0
    negatives = NegativeAudio(shards_dir, negatives_probability, config.train.negative_kinds, negatives_generator)
    crops_needed = config.model.crop_mode != "off" and (config.loss.crop_cls or config.loss.crop_temporal
                                                         or config.loss.crop_audio)
    network = model  # what the steps call: the model itself, or its DistributedDataParallel wrapper
    if world_size > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=config.model.crop_mode != "off" and not crops_needed)

    epoch, step, batch_in_epoch, best_miou = 0, 0, 0, -1.0
    last_checkpoint = run_dir / "last.pt"
    if resume and last_checkpoint.is_file():
        state = load_checkpoint(last_checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        best_miou = state["best_miou"]
        _restore_rng(state["rng"], negatives_generator)
        log.info("resuming from %s at epoch %d, step %d", last_checkpoint, epoch, step)
    elif resume:
        log.info("--resume: no %s yet, starting from scratch", last_checkpoint)
    # Logs hold exactly the steps and epochs up to the state we start from: a crash after the last checkpoint
    # must not leave steps that the resumed run will log again.
    if is_main:
        _truncate_log(run_dir / "steps.jsonl", "step", step)
        _truncate_log(run_dir / "metrics.jsonl", "epoch", epoch)
        (run_dir / "config.toml").write_text(config_to_toml(config), encoding="utf-8")

    def checkpoint(path: Path) -> None:
        if not is_main:
            return
        save_atomic({
            "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "best_miou": best_miou,
            "config": config_to_dict(config), "classes": manifest["classes"], "rng": _rng_state(negatives_generator),
            # The audio embedder of the training shards: `avstrain predict --video` must embed a user's audio alike.
            "embedder": manifest.get("embedder"), "frames_per_clip": manifest.get("frames_per_clip"),
        }, path)

    last_metrics: dict = {}
    if progress:
        progress(step, total_steps)
    with (run_dir / "steps.jsonl").open("a") if is_main else open(os.devnull, "w") as steps_log:
        while epoch < config.optim.epochs and not (config.train.max_steps and step >= config.train.max_steps):
            model.train()
            dataset.set_epoch(epoch, skip_batches=batch_in_epoch, batch_size=config.optim.batch_size)
            started, clips = time.perf_counter(), 0
            for batch in DataLoader(dataset, **loader_kwargs):
                if epoch >= config.train.negatives_from_epoch:
                    negatives.apply(batch)
                inputs = _to_device(batch, device, config.model.image_size, crops_needed)
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(config, step, total_steps)
                with autocast(device, amp_dtype):
                    output = network(inputs["frames"], inputs["audio"], inputs.get("crops"))
                    losses = compute_loss(output, config.loss, inputs["masks"], inputs["mask_valid"],
                                          inputs["label"], inputs["crop_valid"])
                optimizer.zero_grad(set_to_none=True)
                losses.total.backward()
                if config.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                step += 1
                batch_in_epoch += 1
                clips += batch["audio"].shape[0]
                record = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                          "loss": float(losses.total.detach()), **{k: float(v) for k, v in losses.parts.items()}}
                steps_log.write(json.dumps(record) + "\n")
                steps_log.flush()
                if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
                    checkpoint(run_dir / f"step-{step}.pt")
                    checkpoint(last_checkpoint)
                if progress:
                    progress(step, total_steps)
                if config.train.max_steps and step >= config.train.max_steps:
                    break
            if batch_in_epoch < batches_per_epoch:  # stopped by train.max_steps inside the epoch
                checkpoint(last_checkpoint)
                break
            epoch, batch_in_epoch = epoch + 1, 0
            seconds = time.perf_counter() - started
            if is_main and (epoch % config.eval.every == 0 or epoch == config.optim.epochs):
                last_metrics = evaluate(model, shards_dir, config.data.val_split, device, amp_dtype,
                                        batch_size=config.eval.batch_size, max_clips=config.eval.max_clips or None)
                miou = last_metrics["overall"]["miou"]
                with (run_dir / "metrics.jsonl").open("a") as metrics_log:
                    metrics_log.write(json.dumps({"epoch": epoch, "step": step, "train_seconds": round(seconds, 2),
                                                  "clips_per_second": round(clips / max(seconds, 1e-9), 2),
                                                  "val": last_metrics}) + "\n")
                log.info("epoch %d: val mIoU %.4f, F %.4f (%.1f clips/s)", epoch, miou,
                         last_metrics["overall"]["f"], clips / max(seconds, 1e-9))
                if miou > best_miou:
                    best_miou = miou
                    checkpoint(run_dir / "best.pt")
            checkpoint(last_checkpoint)
            if world_size > 1:
                torch.distributed.barrier()  # the other ranks wait while rank 0 validates
    if not (run_dir / "best.pt").exists():
        checkpoint(run_dir / "best.pt")  # a run stopped before its first validation still leaves a usable model
    if owns_process_group:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"best_miou": best_miou, "last": last_metrics, "steps": step, "model": model}


def model_from_checkpoint(state: dict) -> tuple[torch.nn.Module, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    from avstrain.config import build_config

    config = build_config(state["config"])
    # Every tensor comes from the checkpoint: the ImageNet weight files it was trained from need not be at hand.
    no_weight_files = dataclasses.replace(config, model=dataclasses.replace(
        config.model, backbone_weights=None, crop_backbone_weights=None))
    model = build_for_shards(no_weight_files, {"classes": state["classes"]})
    model.load_state_dict(state["model"])
    return model, config
