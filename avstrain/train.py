"""The training loop, in the shape of torchvision's `references/segmentation/train.py`:

    train(config, shards_dir, run_dir, resume=False)
        set up (seeds, device, data, model, optimiser), resume from last.pt, then per epoch
        train_one_epoch(...)   -> train_step(...) per batch
        validate(...)          -> the model kind's default suite; best.pt by the kind's metric

writes `run_dir/config.toml` (resolved), `steps.jsonl` (per-step loss parts), `metrics.jsonl` (per-epoch validation),
`last.pt`, `best.pt` and `step-<n>.pt` every `train.checkpoint_every` steps (`avstrain.checkpoint`). `resume=True`
continues from `last.pt` exactly: same data order, optimiser and RNG state, so the per-step losses equal an
uninterrupted run's on CPU. What the loop needs of the model (its batch fields, forward, loss, metric, suites) comes
from its kind in the registry (`avstrain.models.registry`), so the loop is the same for every model family.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from avsprep.shards import read_manifest, read_negatives
from avstrain.checkpoint import CheckpointSaver, RunState, load_checkpoint, restore
from avstrain.config import Config, ConfigError, OptimConfig, config_to_toml
from avstrain.data import Augmentation, ShardDataset
from avstrain.losses import LossOutput
from avstrain.models import ModelKind, build_for_shards, get_kind
from avstrain.runtime import autocast, resolve_amp, to_channels_last, training_device

log = logging.getLogger(__name__)

# progress(n, total): n more steps done (the first call: the steps a resumed run starts from) of `total` in all.
Progress = Callable[[int, int], None]
# timer(phase) is called as each phase of a step ends: "forward" (forward and loss), "backward", "optimizer".
Timer = Callable[[str], None]
IMAGE_FIELDS = ("frames", "crops")  # [B,T,S,S,3] uint8 in the shards, [B,T,3,S,S] for the model


class NegativeAudio:
    """Replaces a clip's audio by silence, noise or an off-screen class with probability p (docs/design.md §7)."""

    def __init__(self, shards_dir: Path, probability: float, kinds: tuple[str, ...], generator: torch.Generator):
        self.probability = probability
        self.kinds = kinds
        self.generator = generator
        self.embeddings = {k: torch.from_numpy(v) for k, v in read_negatives(shards_dir).items()} if probability else {}

    def apply(self, batch: dict, share: float = 1.0) -> None:
        """In place on a CPU batch: audio replaced, masks emptied and all frames supervised, crops invalid; each clip
        with probability `share` × p (the draws are the same whatever the share, so resume stays exact)."""
        if not self.probability:
            return
        B = batch["audio"].shape[0]
        draws = torch.rand(B, generator=self.generator)
        kinds = torch.randint(len(self.kinds), (B,), generator=self.generator)
        picks = torch.randint(1 << 30, (B,), generator=self.generator)
        true_audio = batch["audio"].clone()  # off-screen donors give their own sound, not a negative drawn before
        for i in range(B):
            if draws[i] >= self.probability * share:
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


class AudioSwap:
    """With probability p a clip trades the roles of its two visible objects: its audio becomes the sound of a batch
    clip in which the other object's class sounds alone, and the other object's mask becomes the target (docs/design.md
    §17). The swap test's choice, taught directly: which of the objects in view does this sound belong to?"""

    def __init__(self, probability: float, generator: torch.Generator):
        self.probability = probability
        self.generator = generator  # the run's negative-audio generator: checkpointed, one per rank

    def apply(self, batch: dict) -> None:
        """In place on a CPU batch with other-object fields; a clip without a donor in the batch keeps its audio."""
        if not self.probability or "other_label" not in batch:
            return
        B = batch["audio"].shape[0]
        draws = torch.rand(B, generator=self.generator)
        picks = torch.randint(1 << 30, (B,), generator=self.generator)
        alone = batch["sounding"].sum(dim=1) == 1  # [B]: one sounding class, so the swapped target is one object
        true_audio, labels = batch["audio"].clone(), batch["label"].tolist()
        for i in range(B):
            other = int(batch["other_label"][i])
            if draws[i] >= self.probability or other < 0 or not alone[i]:
                continue
            donors = [j for j in range(B) if j != i and alone[j] and labels[j] == other]
            if not donors:
                continue
            batch["audio"][i] = true_audio[donors[int(picks[i]) % len(donors)]]
            batch["masks"][i], batch["other_masks"][i] = batch["other_masks"][i].clone(), batch["masks"][i].clone()
            batch["other_label"][i], batch["label"][i] = labels[i], other
            batch["sounding"][i] = False
            batch["sounding"][i, other] = True
            batch["crop_valid"][i] = False  # the crop is the first object's


# --------------------------------------------------------------------------------------------------------------
# Pieces of the set-up (public: tools/bench_train.py builds its rows from them)


@dataclass(frozen=True)
class Distributed:
    """This process's place under torchrun: rank, world size, and whether it started the process group."""

    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the process group under torchrun (WORLD_SIZE > 1; gloo on CPU, nccl on GPU); one process otherwise."""
    if torch.distributed.is_initialized():
        return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size(), owns_process_group=True)


def end_distributed(dist: Distributed) -> None:
    if dist.owns_process_group:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def seed_everything(seed: int, threads: int = 0) -> None:
    """torch, numpy and Python RNGs seeded alike; `threads` > 0 sets torch's intra-op threads."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def training_dataset(config: Config, shards_dir: Path) -> ShardDataset:
    """The shuffled, augmented training split."""
    data = config.data
    augmentation = Augmentation(data.flip, data.brightness, data.contrast) if data.augment else None
    return ShardDataset(shards_dir, data.train_split, shuffle=True, seed=config.train.seed,
                        buffer_size=data.buffer_size, augmentation=augmentation)


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=optim.lr,
                            weight_decay=optim.weight_decay)


def learning_rate(config: Config, step: int, total_steps: int) -> float:
    """The learning rate of `step` (0-based): linear warm-up, then constant or cosine to 0 at `total_steps`."""
    lr = config.optim.lr
    if config.optim.warmup_steps and step < config.optim.warmup_steps:
        return lr * (step + 1) / config.optim.warmup_steps
    if config.optim.lr_schedule == "cosine":
        progress = min(1.0, (step - config.optim.warmup_steps) / max(1, total_steps - config.optim.warmup_steps))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def first_negative_epoch(config: Config, heard_epoch: int) -> int | None:
    """The first epoch (0-based) that draws negative audio: `train.negatives_from_epoch` and, with
    `train.negatives_start = "hears"`, not before `heard_epoch` (the epoch count at the validation that found the
    model hearing, so negatives start with the next epoch); None while it has not heard."""
    if config.train.negatives_start == "hears":
        return max(config.train.negatives_from_epoch, heard_epoch) if heard_epoch >= 0 else None
    return config.train.negatives_from_epoch


def negatives_active(config: Config, epoch: int, heard_epoch: int) -> bool:
    """Whether negative audio is drawn in `epoch` (0-based)."""
    first = first_negative_epoch(config, heard_epoch)
    return first is not None and epoch >= first


def negatives_share(config: Config, step: int, first_step: int) -> float:
    """The fraction of `train.negatives` drawn at `step` (0-based): rising linearly over `train.negatives_ramp` steps
    from `first_step`, the first step with negatives, then 1. A sudden 20 % of empty targets knocked validation mIoU
    from 0.81 to 0.34–0.55 for three to five epochs (docs/design.md §17)."""
    ramp = config.train.negatives_ramp
    return 1.0 if not ramp else min(1.0, (step - first_step + 1) / ramp)


def fit_to_run(config: Config, manifest: dict) -> Config:
    """The config as this run can train it, each change logged (and recorded in config.toml and the checkpoints).

    A vision-only model (`model.audio = false`) sees the same frames with and without their sound: negative audio
    would only teach it to predict nothing, and without TPAVI there are no scores for `loss.av`; the baseline trains
    on the true targets alone (no swaps either). `train.negatives_start = "hears"` and `train.swap` use the other
    visible object: shards without other-object masks leave nothing to measure, so negatives start by epoch, and
    nothing is swapped.
    """
    train, loss = config.train, config.loss
    if not config.model.audio:
        for section, name in (("train", "negatives"), ("train", "swap"), ("loss", "av")):
            if getattr(getattr(config, section), name):
                log.warning("model.audio = false: %s.%s = %s is ignored", section, name,
                            getattr(getattr(config, section), name))
        train, loss = dataclasses.replace(train, negatives=0.0, swap=0.0), dataclasses.replace(loss, av=0.0)
    if train.swap and not manifest.get("has_other_masks"):
        log.warning("train.swap needs shards with other-object masks (avsprep crops --other-masks); these have none, "
                    "so no clip is swapped")
        train = dataclasses.replace(train, swap=0.0)
    if train.negatives_start == "hears" and train.negatives and not manifest.get("has_other_masks"):
        log.warning("train.negatives_start = 'hears' needs shards with other-object masks (avsprep crops "
                    "--other-masks); these have none, so negatives start by epoch (train.negatives_from_epoch)")
        train = dataclasses.replace(train, negatives_start="epoch")
    return dataclasses.replace(config, train=train, loss=loss)


def make_negatives(config: Config, shards_dir: Path, generator: torch.Generator) -> NegativeAudio:
    return NegativeAudio(shards_dir, config.train.negatives, config.train.negative_kinds, generator)


def to_device(batch: dict, device: torch.device, fields: tuple[str, ...], image_size: int) -> dict:
    """The batch's `fields` on the device in the model's layout: frames and crops [B,T,3,S,S], still uint8 unless
    frames and masks need resizing to `image_size` (then float, frames in 0..1); masks float. A field the batch
    lacks is left out (`other_label` of shards without other masks); values that are not tensors (`name`, a list of
    strings) pass as they are."""
    non_blocking = device.type == "cuda"
    out = {}
    for key in (key for key in fields if key in batch):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=non_blocking)
        out[key] = value.permute(0, 1, 4, 2, 3) if key in IMAGE_FIELDS else value  # [B,T,3,S,S]
    if "masks" in out:
        out["masks"] = out["masks"].float()  # [B,T,S,S]
    frames = out.get("frames")
    if frames is not None and frames.shape[-1] != image_size:
        B, T = frames.shape[:2]
        out["frames"] = F.interpolate(frames.flatten(0, 1).float() / 255.0, size=(image_size, image_size),
                                      mode="bilinear", align_corners=False, antialias=True
                                      ).view(B, T, 3, image_size, image_size)
        if "masks" in out:
            out["masks"] = F.interpolate(out["masks"], size=(image_size, image_size), mode="nearest")
    return out


# --------------------------------------------------------------------------------------------------------------
# The step, the epoch, validation


def train_step(network: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, config: Config,
               device: torch.device, amp_dtype: torch.dtype | None, kind: ModelKind | None = None,
               timer: Timer | None = None) -> LossOutput:
    """One optimisation step on a device batch (`to_device`): forward and loss under autocast, backward, gradient
    clipping (`optim.grad_clip`), optimiser step. `network` is the model or its DistributedDataParallel wrapper;
    the kind (default: `config.model.kind`'s) says how the batch goes through it and into the loss."""
    kind = kind or get_kind(config.model.kind)
    with autocast(device, amp_dtype):
        output = kind.forward(network, batch)
        losses = kind.compute_loss(output, batch, config.loss)
    if timer:
        timer("forward")
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    if timer:
        timer("backward")
    if config.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.optim.grad_clip)
    optimizer.step()
    if timer:
        timer("optimizer")
    return losses


@dataclass
class Session:
    """What a run trains with; fixed once set up (what changes is the `RunState`)."""

    config: Config
    kind: ModelKind
    model: nn.Module
    network: nn.Module  # what the steps call: the model itself, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    dataset: ShardDataset
    negatives: NegativeAudio
    swaps: AudioSwap
    saver: CheckpointSaver
    device: torch.device
    amp_dtype: torch.dtype | None
    batches_per_epoch: int
    total_steps: int


def train_one_epoch(session: Session, run: RunState, steps_log: IO[str], progress: Progress | None = None) -> int:
    """Train from the run's position to the end of its epoch or to `train.max_steps`; returns the clips seen.

    Each step is logged to `steps_log` (one JSON line: epoch, step, lr, loss and its parts); `step-<n>.pt` is
    written every `train.checkpoint_every` steps."""
    config, model, optimizer = session.config, session.model, session.optimizer
    model.train()
    session.dataset.set_epoch(run.epoch, skip_batches=run.batch_in_epoch, batch_size=config.optim.batch_size)
    # The loader draws its workers' base seed from this generator, not from torch's global RNG: a resumed epoch
    # would otherwise draw it a second time, leaving the global RNG one draw ahead of an uninterrupted run's.
    base_seed = torch.Generator().manual_seed(config.train.seed * 1_000_003 + run.epoch)
    loader = DataLoader(session.dataset, batch_size=config.optim.batch_size, num_workers=config.train.workers,
                        pin_memory=session.device.type == "cuda", generator=base_seed)
    fields = session.kind.batch_fields(config)
    clips = 0
    for batch in loader:
        session.swaps.apply(batch)
        if negatives_active(config, run.epoch, run.heard_epoch):
            first_step = first_negative_epoch(config, run.heard_epoch) * session.batches_per_epoch
            session.negatives.apply(batch, negatives_share(config, run.step, first_step))
        inputs = to_device(batch, session.device, fields, config.model.image_size)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, run.step, session.total_steps)
        losses = train_step(session.network, optimizer, inputs, config, session.device, session.amp_dtype,
                            session.kind)
        run.step += 1
        run.batch_in_epoch += 1
        clips += batch["audio"].shape[0]
        record = {"epoch": run.epoch, "step": run.step, "lr": optimizer.param_groups[0]["lr"],
                  **_mean_over_ranks({"loss": losses.total.detach(), **losses.parts})}
        steps_log.write(json.dumps(record) + "\n")
        steps_log.flush()
        if config.train.checkpoint_every and run.step % config.train.checkpoint_every == 0:
            session.saver.save_step(run)
        if progress:
            progress(1, session.total_steps)
        if config.train.max_steps and run.step >= config.train.max_steps:
            break
    return clips


def _mean_over_ranks(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The step's loss and its parts averaged over the DDP ranks (what the averaged gradients followed), so that
    rank 0's log covers every rank; the values themselves without DDP."""
    flat = torch.tensor([float(value) for value in values.values()], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
    return dict(zip(values, flat.tolist()))


def metric_value(results: dict, path: str) -> float:
    """The value at a dotted path of a suite's result ("overall.miou")."""
    for key in path.split("."):
        results = results[key]
    return float(results)


def validate(session: Session, shards_dir: Path, run: RunState, run_dir: Path, seconds: float, clips: int) -> dict:
    """Score the validation split with the kind's default suite (and, when asked or waiting for it, whether the
    model hears), log it to metrics.jsonl, keep best.pt."""
    config = session.config
    suites = session.kind.suites()
    options = {"batch_size": config.eval.batch_size, "max_clips": config.eval.max_clips or None}
    results = suites["default"](session.model, shards_dir, config.data.val_split, session.device, session.amp_dtype,
                                **options)
    record = {"epoch": run.epoch, "step": run.step, "train_seconds": round(seconds, 2),
              "clips_per_second": round(clips / max(seconds, 1e-9), 2), "val": results}
    if config.eval.hearing or waits_to_hear(session, run):
        record["hearing"] = suites["hearing"](session.model, shards_dir, config.data.val_split, session.device,
                                              session.amp_dtype, **options)
        _note_hearing(session, run, record["hearing"])
    if config.train.negatives_start == "hears":
        record["heard_epoch"] = run.heard_epoch
    with (run_dir / "metrics.jsonl").open("a") as metrics_log:
        metrics_log.write(json.dumps(record) + "\n")
    value = metric_value(results, session.kind.best_metric)
    log.info("epoch %d: val %s %.4f (%.1f clips/s)", run.epoch, session.kind.best_metric, value,
             clips / max(seconds, 1e-9))
    if first_epoch_with_negatives(session, run):
        # Validation scores the true audio alone, so an epoch before negative audio can score best and yet never have
        # learned to stay dark under silence: best.pt is chosen among the epochs of the whole recipe.
        log.info("epoch %d: the first epoch with negative audio; best.pt is chosen from here on", run.epoch)
        run.best_metric = -1.0
    if value > run.best_metric:
        run.best_metric = value
        session.saver.save_best(run)
    return results


def first_epoch_with_negatives(session: Session, run: RunState) -> bool:
    """Whether the epoch just trained (0-based `run.epoch - 1`) is the first that drew negative audio."""
    if not session.negatives.probability:
        return False
    return run.epoch - 1 == first_negative_epoch(session.config, run.heard_epoch)


def waits_to_hear(session: Session, run: RunState) -> bool:
    """Whether negative audio waits for the model to hear (`train.negatives_start = "hears"`, not heard yet)."""
    return (session.config.train.negatives_start == "hears" and run.heard_epoch < 0
            and bool(session.negatives.probability))


def _note_hearing(session: Session, run: RunState, heard: dict) -> None:
    """Start negatives with the next epoch once the true audio beats the other object's by `train.hears_margin`."""
    if waits_to_hear(session, run) and heard["clips"] and heard["gap"] >= session.config.train.hears_margin:
        run.heard_epoch = run.epoch
        log.info("epoch %d: the model hears (val mIoU %.3f with its own audio, %.3f with the other object's): "
                 "negative audio starts", run.epoch, heard["miou_true"], heard["miou_swap"])


def _share_hearing(session: Session, run: RunState, dist: Distributed) -> None:
    """Under DDP rank 0 alone validates and decides; every rank must start negatives at the same step."""
    if dist.world_size > 1 and session.config.train.negatives_start == "hears":
        decision = torch.tensor([run.heard_epoch], dtype=torch.int64, device=session.device)
        torch.distributed.broadcast(decision, src=0)
        run.heard_epoch = int(decision.item())


# --------------------------------------------------------------------------------------------------------------
# train


def _schedule(config: Config, dataset: ShardDataset) -> tuple[int, int]:
    """(batches per epoch, total steps of the run)."""
    workers = max(1, config.train.workers)
    batches_per_epoch = sum(math.ceil(len(dataset.consumer_order(w, workers)) / config.optim.batch_size)
                            for w in range(workers))
    total_steps = batches_per_epoch * config.optim.epochs
    return batches_per_epoch, min(total_steps, config.train.max_steps) if config.train.max_steps else total_steps


def _set_up(config: Config, shards_dir: Path, run_dir: Path, dist: Distributed) -> tuple[Session, RunState]:
    """Seeds, device and precision, data, model, optimiser, negative audio, the checkpoint saver."""
    manifest = read_manifest(shards_dir)
    config = fit_to_run(config, manifest)
    seed_everything(config.train.seed, config.train.threads)
    device = training_device()
    amp_dtype = resolve_amp(config.train.amp, device)
    log.info("rank %d of %d, device %s, %s, %d threads", dist.rank, dist.world_size, device,
             "bf16 autocast" if amp_dtype else "fp32", torch.get_num_threads())
    dataset = training_dataset(config, shards_dir)
    batches_per_epoch, total_steps = _schedule(config, dataset)
    kind = get_kind(config.model.kind)
    if (config.train.negatives_start == "hears" or config.eval.hearing) and "hearing" not in kind.suites():
        raise ConfigError(f"train.negatives_start = 'hears' and eval.hearing need a hearing check, which "
                          f"model.kind = {kind.name!r} does not have")
    model = build_for_shards(config, manifest)
    kind.prepare(model, config, shards_dir)  # a resumed run overwrites it from last.pt
    model = model.to(device)
    if config.train.channels_last:
        to_channels_last(model)
    optimizer = make_optimizer(model, config.optim)
    run = RunState(negatives=torch.Generator().manual_seed(config.train.seed + dist.rank))  # ranks draw differently
    negatives = make_negatives(config, shards_dir, run.negatives)
    network = model
    if dist.world_size > 1:
        network = nn.parallel.DistributedDataParallel(model,
                                                      find_unused_parameters=kind.find_unused_parameters(config))
    saver = CheckpointSaver(run_dir, model, optimizer, config, manifest, enabled=dist.is_main)
    swaps = AudioSwap(config.train.swap, run.negatives)
    session = Session(config, kind, model, network, optimizer, dataset, negatives, swaps, saver, device, amp_dtype,
                      batches_per_epoch, total_steps)
    return session, run


def _resume(session: Session, run: RunState) -> None:
    last = session.saver.last
    if not last.is_file():
        log.info("--resume: no %s yet, starting from scratch", last)
        return
    restore(load_checkpoint(last), session.model, session.optimizer, run)
    log.info("resuming from %s at epoch %d, step %d", last, run.epoch, run.step)


def _start_logs(run_dir: Path, run: RunState, config: Config) -> None:
    """Logs hold exactly the steps and epochs up to the state we start from: a crash after the last checkpoint must
    not leave steps that the resumed run will log again."""
    _truncate_log(run_dir / "steps.jsonl", "step", run.step)
    _truncate_log(run_dir / "metrics.jsonl", "epoch", run.epoch)
    (run_dir / "config.toml").write_text(config_to_toml(config), encoding="utf-8")


def _truncate_log(path: Path, key: str, last: int) -> None:
    """Keep the JSON lines of `path` whose `key` is at most `last` (all of them gone when last is 0)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)[key] <= last]
    path.write_text("".join(line + "\n" for line in kept))


def _running(config: Config, run: RunState) -> bool:
    return run.epoch < config.optim.epochs and not (config.train.max_steps and run.step >= config.train.max_steps)


def train(config: Config, shards_dir: str | Path, run_dir: str | Path, resume: bool = False,
          progress: Progress | None = None) -> dict:
    """Train per `config` on the shards; returns {"best_metric": the best value of the kind's validation metric
    (tpavi: mIoU; -1: not validated yet), "last": last validation results, "steps", "model"}.

    `progress(n, total_steps)` is called with the steps done so far, then after each step. Under `torchrun`
    (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, each rank streams its own block of clips, and
    rank 0 alone validates and writes the run folder (its steps.jsonl logs the loss averaged over the ranks).
    A resume restores every rank's RNGs and data position.
    """
    shards_dir, run_dir = Path(shards_dir), Path(run_dir)
    dist = init_distributed()
    run_dir.mkdir(parents=True, exist_ok=True)
    session, run = _set_up(config, shards_dir, run_dir, dist)
    config = session.config  # as the set-up resolved it for these shards
    if resume:
        _resume(session, run)
    if dist.is_main:
        _start_logs(run_dir, run, config)
    last_metrics: dict = {}
    if progress:
        progress(run.step, session.total_steps)
    with (run_dir / "steps.jsonl").open("a") if dist.is_main else open(os.devnull, "w") as steps_log:
        while _running(config, run):
            started = time.perf_counter()
            clips = train_one_epoch(session, run, steps_log, progress)
            if run.batch_in_epoch < session.batches_per_epoch:  # stopped by train.max_steps inside the epoch
                session.saver.save_last(run)
                break
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
            seconds = time.perf_counter() - started
            if dist.is_main and (run.epoch % config.eval.every == 0 or run.epoch == config.optim.epochs):
                last_metrics = validate(session, shards_dir, run, run_dir, seconds, clips)
            _share_hearing(session, run, dist)
            session.saver.save_last(run)
            if dist.world_size > 1:
                torch.distributed.barrier()  # the other ranks wait while rank 0 validates
    if not session.saver.best.exists():
        session.saver.save_best(run)  # a run stopped before its first validation still leaves a usable model
    end_distributed(dist)
    return {"best_metric": run.best_metric, "last": last_metrics, "steps": run.step, "model": session.model}


__all__ = ["AudioSwap", "Distributed", "NegativeAudio", "Session", "end_distributed", "first_negative_epoch",
           "fit_to_run", "init_distributed", "learning_rate", "make_negatives", "make_optimizer", "metric_value",
           "negatives_active", "negatives_share", "seed_everything", "to_device", "train", "train_one_epoch",
           "train_step", "training_dataset", "validate", "waits_to_hear"]
