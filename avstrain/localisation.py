"""The localisation suite (`avstrain eval --suite localisation`, docs/design.md §13): "where is the sound?", asked
the same way of every model kind.

- "true": the heat map of each frame with its own audio against the sounding object's mask (or box map where the
  frame has no mask): the field's evaluator (cIoU success rate, AUC, mean cIoU), the pointing game on the heat
  map's own grid and pixel average precision (`avstrain.metrics`).
- "swap": the same frames with the audio of the other visible object's class, taken as the reliance suite takes it
  (`DonorPicker.swap`); the pointing game against the other object's mask (`pointing_other`): does the map move?
- "avc": audio-visual correspondence accuracy on balanced pairs, each frame with its own second and with the same
  second of a clip whose class is not in view (`accuracy`), or of the silent visible object's class (`hard`).
- "retrieval": nDCG@30 im→aud, aud→im, im→im, aud→aud with relevance = same class, one item per clip (its middle
  second); the image item is the crop of the sounding object (a whole frame shows two classes), with the
  whole-frame figures (`frame`) and random embeddings (`chance`) beside them.

A kind answers what it can (`Probe`): Senocak and AVOL-Net heat maps, AVOL-Net and AVE-Net correspondence, AVE-Net
embeddings; TPAVI gives two heat maps without retraining, its mask probabilities (`tpavi_mask`) and its finest
stage's `av_scores` (`tpavi_av`), whose sign training does not fix (the block's output is multiplied by g): it is
chosen once, on the validation split, by the pointing game, and stated in the result. Sections a kind cannot produce
are absent. Every draw is seeded per clip position, so the figures do not depend on batching or workers.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avsprep.errors import InputError
from avstrain.eval_data import (DonorPicker, Progress, SplitTable, batches, eval_dataset, report_progress, text_table,
                                read_split_table, visible_classes)
from avstrain.localisation_losses import ground_truth_maps
from avstrain.metrics import localisation_ceiling, localisation_scores, ndcg, pixel_average_precision, pointing_hits
from avstrain.models.tpavi_avs import AVSModel
from avstrain.runtime import autocast, eval_mode

log = logging.getLogger(__name__)

RETRIEVAL_K = 30
CHANCE_DRAWS = 20  # random embeddings drawn for the chance figures, averaged
_STREAM_CHANCE = 11  # beside evaluate's donor streams


@dataclass
class Probe:
    """What the suite can ask of a model; None where the kind has no such output.

    heatmaps(frames [B,T,3,H,W], audio [B,T,D]) -> {name: [B,T,h,w]}; correspondence(frames, audio) -> P [B,T];
    embed_images(images [N,3,H,W]) -> [N,E]; embed_audio(audio [N,D]) -> [N,E].
    """

    heatmaps: Callable[[Tensor, Tensor], dict[str, Tensor]] | None = None
    correspondence: Callable[[Tensor, Tensor], Tensor] | None = None
    embed_images: Callable[[Tensor], Tensor] | None = None
    embed_audio: Callable[[Tensor], Tensor] | None = None


def tpavi_heatmaps(model: AVSModel, frames: Tensor, audio: Tensor, av_sign: int = 1) -> dict[str, Tensor]:
    """TPAVI's two heat maps: mask probabilities [B,T,H,W] and ±av_scores of its finest TPAVI stage [B,T,h,w]."""
    output = model(frames, audio)
    maps = {"tpavi_mask": output.logits[:, :, 0].float().sigmoid()}
    if output.av_scores:  # the vision-only model has none
        maps["tpavi_av"] = av_sign * output.av_scores[min(output.av_scores)].float()
    return maps


def probe_for(model: nn.Module, av_sign: int = 1) -> Probe:
    """The suite's view of a model: TPAVI through `tpavi_heatmaps`, the other kinds through their own methods."""
    if isinstance(model, AVSModel):
        return Probe(heatmaps=functools.partial(tpavi_heatmaps, model, av_sign=av_sign))
    return Probe(*(getattr(model, name, None) for name in ("heatmaps", "correspondence", "embed_images",
                                                             "embed_audio")))


def _model_frames(batch: dict, device: torch.device, model: nn.Module) -> Tensor:
    """The batch's frames [B,T,3,S,S] on the device, resized to the model's `image_size` if the shards differ."""
    frames = batch["frames"].to(device).permute(0, 1, 4, 2, 3)  # [B,T,3,S,S] uint8
    size = getattr(getattr(model, "config", None), "image_size", frames.shape[-1])
    if frames.shape[-1] == size:
        return frames
    B, T = frames.shape[:2]
    resized = F.interpolate(frames.flatten(0, 1).float() / 255.0, size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized.view(B, T, 3, size, size)


@dataclass
class _MapScores:
    """One heat map source over the split: maps [n,h,w] with their ground truth [n,H,W] (the masks are 0/1, kept as
    bool), and the swap test's pointing hits."""

    maps: list[Tensor] = field(default_factory=list)
    truth: list[Tensor] = field(default_factory=list)
    swap_hits: list[Tensor] = field(default_factory=list)

    def result(self) -> dict:
        out: dict = {}
        if self.maps:
            maps, truth = torch.cat(self.maps), torch.cat(self.truth).float()
            out["true"] = {**localisation_scores(maps, truth), "pointing": float(pointing_hits(maps, truth).double()
                                                                                   .mean()),
                           "ap": pixel_average_precision(maps, truth), "frames": len(maps),
                           "ceiling": localisation_ceiling(truth)}
        if self.swap_hits:
            hits = torch.cat(self.swap_hits)
            out["swap"] = {"pointing_other": float(hits.double().mean()), "frames": len(hits)}
        return out


class _Localisation:
    """The suite's inputs (donors) and accumulators, filled one batch at a time."""

    def __init__(self, table: SplitTable, probe: Probe, device: torch.device, amp_dtype: torch.dtype | None,
                 seed: int) -> None:
        self.seed = seed
        self.donors = DonorPicker(table.labels, seed)
        self.donor_audio = torch.from_numpy(table.audio)  # [N,T,D]
        self.probe, self.device, self.amp_dtype = probe, device, amp_dtype
        self.maps: dict[str, _MapScores] = {}
        self.avc = {"positive": [], "negative": [], "hard_positive": [], "hard": []}
        self.items: dict[str, list[Tensor]] = {"crop": [], "frame": [], "audio": [], "label": []}
        self.clips = 0

    def _run(self, function: Callable, *inputs: Tensor):
        with autocast(self.device, self.amp_dtype):
            return function(*(x.to(self.device) for x in inputs))

    def _swap_rows(self, batch: dict, positions: list[int]) -> tuple[list[int], Tensor]:
        """Rows with a donor of the other visible object's class, and that donor audio [rows,T,D]."""
        if "other_label" not in batch:
            return [], self.donor_audio[:0]
        donors = [self.donors.swap(p, int(batch["other_label"][i])) for i, p in enumerate(positions)]
        rows = [i for i, d in enumerate(donors) if d is not None]
        return rows, self.donor_audio[[donors[i] for i in rows]]

    def _offscreen_rows(self, batch: dict, positions: list[int]) -> tuple[list[int], Tensor]:
        """Rows with a donor whose class is not in view, and that donor audio [rows,T,D]."""
        others = batch["other_label"].tolist() if "other_label" in batch else [-1] * len(positions)
        donors = [self.donors.offscreen(p, visible_classes(int(batch["label"][i]), others[i], batch["sounding"][i]))
                  for i, p in enumerate(positions)]
        rows = [i for i, d in enumerate(donors) if d is not None]
        return rows, self.donor_audio[[donors[i] for i in rows]]

    def add(self, batch: dict, positions: list[int], frames: Tensor) -> None:
        swap = self._swap_rows(batch, positions)
        if self.probe.heatmaps is not None:
            self._add_heatmaps(batch, frames, swap)
        if self.probe.correspondence is not None:
            self._add_correspondence(batch, positions, frames, swap)
        if self.probe.embed_images is not None:
            self._add_items(batch, frames)
        self.clips += len(positions)

    def _add_heatmaps(self, batch: dict, frames: Tensor, swap: tuple[list[int], Tensor]) -> None:
        truth, valid = ground_truth_maps(batch["masks"].flatten(0, 1), batch["mask_valid"].flatten(0, 1),
                                         batch["boxes"].flatten(0, 1))  # [B·T,S,S], [B·T]
        for name, maps in self._run(self.probe.heatmaps, frames, batch["audio"]).items():
            scores = self.maps.setdefault(name, _MapScores())
            scores.maps.append(maps.float().cpu().flatten(0, 1)[valid])
            scores.truth.append(truth[valid].bool())
        rows, audio = swap
        if not rows:
            return
        other_valid = batch["mask_valid"][rows].flatten()  # the other object's mask exists where the frame's does
        other = batch["other_masks"][rows].flatten(0, 1)[other_valid]  # [n,S,S]
        for name, maps in self._run(self.probe.heatmaps, frames[rows], audio).items():
            hits = pointing_hits(maps.float().cpu().flatten(0, 1)[other_valid], other)
            self.maps[name].swap_hits.append(hits)

    def _add_correspondence(self, batch: dict, positions: list[int], frames: Tensor,
                            swap: tuple[list[int], Tensor]) -> None:
        positive = self._run(self.probe.correspondence, frames, batch["audio"]).float().cpu()  # [B,T]
        for (rows, audio), keys in ((self._offscreen_rows(batch, positions), ("positive", "negative")),
                                    (swap, ("hard_positive", "hard"))):
            if rows:
                self.avc[keys[0]].append(positive[rows].flatten())
                self.avc[keys[1]].append(self._run(self.probe.correspondence, frames[rows], audio).float().cpu()
                                         .flatten())

    def _add_items(self, batch: dict, frames: Tensor) -> None:
        """One retrieval item per clip with a class and a crop at its middle second t*."""
        t = frames.shape[1] // 2
        rows = [i for i in range(len(frames)) if batch["crop_valid"][i, t] and int(batch["label"][i]) >= 0]
        if not rows:
            return
        crops = batch["crops"][rows, t].permute(0, 3, 1, 2)  # [n,3,c,c] uint8
        self.items["crop"].append(self._run(self.probe.embed_images, crops).float().cpu())
        self.items["frame"].append(self._run(self.probe.embed_images, frames[rows, t]).float().cpu())
        self.items["audio"].append(self._run(self.probe.embed_audio, batch["audio"][rows, t]).float().cpu())
        self.items["label"].append(batch["label"][rows].long())

    def result(self) -> dict:
        out: dict = {}
        if self.maps:
            out["maps"] = {name: scores.result() for name, scores in self.maps.items()}
            primary = next(iter(out["maps"].values()))
            out.update({key: primary[key] for key in ("true", "swap") if key in primary})
        if self.avc["positive"] or self.avc["hard"]:
            out["avc"] = avc_accuracies(**{k: torch.cat(v) if v else None for k, v in self.avc.items()})
        if self.items["label"]:
            items = (torch.cat(self.items[k]) for k in ("crop", "frame", "audio", "label"))
            out["retrieval"] = retrieval_scores(*items, seed=self.seed)
        return out


def _balanced_accuracy(positive: Tensor, negative: Tensor) -> float:
    """Pairs of P(corresponds) for a frame with its own audio [n] and with a negative [n]: each right answer counts
    half a pair (P > 0.5 for the positive, ≤ 0.5 for the negative)."""
    return float(((positive > 0.5).double().mean() + (negative <= 0.5).double().mean()) / 2)


def avc_accuracies(positive: Tensor | None, negative: Tensor | None, hard_positive: Tensor | None,
                   hard: Tensor | None) -> dict:
    """AVC accuracy on balanced pairs with an off-screen class as the negative ("accuracy") and with the silent
    visible object's class ("hard"); each input [n] of correspondence probabilities, None where no pair exists."""
    out: dict = {}
    if positive is not None:
        out.update(accuracy=_balanced_accuracy(positive, negative), pairs=len(positive))
    if hard is not None:
        out.update(hard=_balanced_accuracy(hard_positive, hard), hard_pairs=len(hard))
    return out


def _four_ndcgs(images: Tensor, audio: Tensor, labels: Tensor) -> dict[str, float]:
    return {"im2aud": ndcg(images, audio, labels, labels, RETRIEVAL_K),
            "aud2im": ndcg(audio, images, labels, labels, RETRIEVAL_K),
            "im2im": ndcg(images, images, labels, labels, RETRIEVAL_K, exclude_self=True),
            "aud2aud": ndcg(audio, audio, labels, labels, RETRIEVAL_K, exclude_self=True)}


def retrieval_scores(crops: Tensor, frames: Tensor, audio: Tensor, labels: Tensor, seed: int = 0) -> dict:
    """nDCG@30 with crop items, the same with whole-frame items (`frame`), and the mean over `CHANCE_DRAWS` draws of
    random Gaussian embeddings for the same items (`chance`). Embeddings [n,E], labels [n]."""
    rng = torch.Generator().manual_seed(seed * 100 + _STREAM_CHANCE)
    draws = [_four_ndcgs(torch.randn(crops.shape, generator=rng), torch.randn(audio.shape, generator=rng), labels)
             for _ in range(CHANCE_DRAWS)]
    chance = {key: float(np.mean([d[key] for d in draws])) for key in draws[0]}
    return {**_four_ndcgs(crops, audio, labels), "frame": _four_ndcgs(frames, audio, labels), "chance": chance,
            "items": len(labels), "k": RETRIEVAL_K}


def _kind_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "kind", None) or ("tpavi" if isinstance(model, AVSModel) else type(model).__name__)


def choose_av_sign(model: AVSModel, shards_dir: str | Path, split: str = "val", device: torch.device | str = "cpu",
                   amp_dtype: torch.dtype | None = None, batch_size: int = 4, num_workers: int = 0,
                   max_clips: int | None = None) -> int:
    """The sign of TPAVI's `av_scores` that points better on `split` with the clips' own audio: +1 or -1 (ties +1)."""
    device = torch.device(device)
    dataset = eval_dataset(shards_dir, split)
    table = read_split_table(dataset)
    hits = {1: [], -1: []}
    with eval_mode(model), torch.no_grad():
        for batch, _ in batches(dataset, table, batch_size, num_workers, max_clips, device.type == "cuda"):
            with autocast(device, amp_dtype):
                maps = tpavi_heatmaps(model, _model_frames(batch, device, model), batch["audio"].to(device))
            if "tpavi_av" not in maps:
                return 1
            truth, valid = ground_truth_maps(batch["masks"].flatten(0, 1), batch["mask_valid"].flatten(0, 1),
                                             batch["boxes"].flatten(0, 1))
            av = maps["tpavi_av"].float().cpu().flatten(0, 1)[valid]
            for sign in hits:
                hits[sign].append(pointing_hits(sign * av, truth[valid]))
    rates = {sign: float(torch.cat(h).double().mean()) if h else 0.0 for sign, h in hits.items()}
    log.info("TPAVI av_scores sign chosen on split %r: pointing %.4f with +1, %.4f with -1", split, rates[1], rates[-1])
    return 1 if rates[1] >= rates[-1] else -1


def localisation_suite(model: nn.Module, shards_dir: str | Path, split: str = "test",
                       device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None, batch_size: int = 4,
                       num_workers: int = 0, max_clips: int | None = None, seed: int = 0, av_sign: int | None = None,
                       sign_split: str = "val", progress: Progress | None = None) -> dict:
    """Where is the sound? (module docstring). The model is moved to `device`, run in eval mode and left in the mode
    it had. `max_clips` scores the first clips of the split (donors still come from the whole split). For TPAVI,
    `av_sign` fixes the sign of `av_scores`; None chooses it on `sign_split` (`choose_av_sign`).

    Returns {"kind", "split", "clips", "true": {"ciou", "auc", "mean_ciou", "pointing", "ap", "frames"},
    "swap": {"pointing_other", "frames"}, "maps": {name: {"true", "swap"}} (the first map is the one at the top),
    "avc": {"accuracy", "pairs", "hard", "hard_pairs"}, "retrieval": {"im2aud", "aud2im", "im2im", "aud2aud",
    "frame": {...}, "chance": {...}, "items", "k"}}, without the sections the kind cannot produce.
    """
    device = torch.device(device)
    model.to(device)
    kind = _kind_of(model)
    sign = None
    if isinstance(model, AVSModel):
        sign = av_sign if av_sign is not None else _sign_or_default(model, shards_dir, sign_split, device, amp_dtype,
                                                                  batch_size, num_workers)
    dataset = eval_dataset(shards_dir, split)
    table = read_split_table(dataset, with_audio=True)
    suite = _Localisation(table, probe_for(model, sign or 1), device, amp_dtype, seed)
    with eval_mode(model), torch.no_grad():
        for batch, positions in batches(dataset, table, batch_size, num_workers, max_clips, device.type == "cuda"):
            suite.add(batch, positions, _model_frames(batch, device, model))
            report_progress(progress, suite.clips, len(positions))
    result = {"kind": kind, "split": split, "clips": suite.clips, **suite.result()}
    if sign is not None and "tpavi_av" in result.get("maps", {}):
        result["maps"]["tpavi_av"].update(sign=sign, sign_split=sign_split if av_sign is None else "given")
    log.info("localisation suite (%s) on %d clips of split %r", kind, suite.clips, split)
    return result


def _sign_or_default(model: AVSModel, shards_dir: str | Path, split: str, *args) -> int:
    try:
        return choose_av_sign(model, shards_dir, split, *args)
    except InputError:  # no such split beside the shards
        log.warning("no split %r to choose the sign of TPAVI's av_scores on: using +1", split)
        return 1


def format_localisation_table(result: dict) -> str:
    """A plain-text table of a `localisation_suite` result: one row per heat map, then AVC and retrieval."""
    lines = [f"localisation suite ({result.get('kind')}), split {result.get('split')}, {result.get('clips')} clips"]
    rows = []
    for name, scores in result.get("maps", {}).items():
        true, swap = scores.get("true", {}), scores.get("swap", {})
        rows.append([name, true.get("pointing"), swap.get("pointing_other"), true.get("ap"), true.get("ciou"),
                     true.get("auc"), true.get("mean_ciou"), scores.get("sign", "")])
    if rows:
        lines += text_table(["heat map", "pointing", "swap pointing_other", "ap", "ciou", "auc", "mean_ciou", "sign"],
                        rows)
    if "avc" in result:
        avc = result["avc"]
        lines += text_table(["avc", "accuracy", "hard", "pairs"],
                        [["", avc.get("accuracy"), avc.get("hard"), avc.get("pairs")]])
    if "retrieval" in result:
        retrieval = result["retrieval"]
        keys = ("im2aud", "aud2im", "im2im", "aud2aud")
        rows = [[label, *(source.get(k) for k in keys)] for label, source in
                (("crops", retrieval), ("frames", retrieval["frame"]), ("chance", retrieval["chance"]))]
        lines += text_table([f"nDCG@{retrieval['k']} ({retrieval['items']} items)", *keys], rows)
    return "\n".join(lines)


__all__ = ["Probe", "avc_accuracies", "choose_av_sign", "format_localisation_table", "localisation_suite",
           "probe_for", "retrieval_scores", "tpavi_heatmaps"]
