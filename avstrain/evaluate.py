"""Evaluation of an AVS model on a split of the shards: metrics (docs/design.md §8) and the audio-reliance suite (§9).

`evaluate` scores the clips' own audio against their masks, overall and per class. `reliance_suite` asks whether the
mask follows the sound: the clip's own audio (mIoU, F), the audio of the other visible object's class taken from
another clip (scored against that object's mask), and silence, noise and an off-screen class (FPR: with such
audio nothing should be segmented).

Both stream: clips go through the model one DataLoader batch at a time and into O(1) meters, so no prediction or
mask of the whole split is ever held. The only per-split state is a small table (clip names, labels and, for the
suite, audio embeddings: N×T×128 floats) read straight from the shards' small datasets, never from the frames.

Every number is independent of `batch_size` and `num_workers`: clips are identified by their position in the split
(shard order), donor audio is drawn per clip from a generator seeded by (seed, position), and the reference's
per-batch F-measure (`f_avsbench`, 4 clips per batch in split order) is rebuilt through a small reorder buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from avstrain.eval_data import (STREAM_NOISE, DonorPicker, Progress, SplitTable,
                                batches, eval_dataset, load_negatives, model_uses_audio, read_split_table,
                                report_progress, select_rows, text_table, visible_classes)
from avstrain.localisation import format_localisation_table
from avstrain.metrics import FPRMeter, SegmentationMeter
from avstrain.runtime import autocast, eval_mode
from avstrain.semantic_eval import evaluate_semantic, is_semantic, reliance_semantic

log = logging.getLogger(__name__)

# The reference's test loader scores batches of 4 clips; `f_avsbench` averages the F-measure of such batches.
REFERENCE_CLIPS_PER_BATCH = 4
NO_CLASS = "none"





# --------------------------------------------------------------------------------------------------------------
# The model call


@torch.no_grad()
def predict_logits(model: nn.Module, batch: dict, device: torch.device | str,
                   amp_dtype: torch.dtype | None = None, audio: Tensor | None = None) -> Tensor:
    """Mask logits of a batch of clips.

    batch["frames"] [B,T,S,S,3] uint8 as the dataset yields them (the model normalises); batch["audio"] [B,T,128],
    or `audio` [B,T,128] in its place (the reliance suite feeds other audio to the same frames).
    Returns [B,T,1,S,S] float32 on the CPU. The caller puts the model in eval mode (`evaluate` and `reliance_suite`
    do, and restore the previous mode); the model must already be on `device`.
    """
    device = torch.device(device)
    frames = batch["frames"].to(device, non_blocking=True).permute(0, 1, 4, 2, 3)  # [B,T,3,S,S]
    audio = batch["audio"] if audio is None else audio
    with autocast(device, amp_dtype):
        output = model(frames, audio.to(device, non_blocking=True))
    return output.logits.float().cpu()


# --------------------------------------------------------------------------------------------------------------
# Streaming scores


class _ReferenceBatches:
    """`f_avsbench`: the F-measure of consecutive batches of 4 clips in split order, averaged over batches.

    Clips may arrive out of split order (DataLoader workers interleave); they wait in a buffer, bounded by the
    loader's look-ahead (about batch_size × num_workers clips), until every earlier position has arrived.
    """

    def __init__(self) -> None:
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}
        self._next = 0
        self._group = SegmentationMeter()
        self._group_clips = 0
        self._score_sum = 0.0
        self._batches = 0

    def add(self, position: int, logits: Tensor, target: Tensor) -> None:
        """One clip's valid frames: logits, target [t,S,S]."""
        self._pending[position] = (logits, target)
        while self._next in self._pending:
            self._feed(*self._pending.pop(self._next))
            self._next += 1

    def _feed(self, logits: Tensor, target: Tensor) -> None:
        if len(logits):
            self._group.update(logits, target)
        self._group_clips += 1
        if self._group_clips == REFERENCE_CLIPS_PER_BATCH:
            self._close()

    def _close(self) -> None:
        # A batch's own dataset-level F (0 when all its masks are empty) is the reference's per-batch figure.
        self._score_sum += self._group.compute()["f"]
        self._batches += 1
        self._group.reset()
        self._group_clips = 0

    def compute(self) -> float:
        # Clips that never came (a subset was scored) leave gaps: the rest are taken in position order.
        for position in sorted(self._pending):
            self._feed(*self._pending.pop(position))
        if self._group_clips:  # the last, partial batch counts as one, as in the reference's DataLoader
            self._close()
        return self._score_sum / self._batches if self._batches else 0.0


class _Scores:
    """mIoU and F over the valid frames of the clips given; with `reference_batches`, `f_avsbench` too."""

    def __init__(self, reference_batches: bool = True) -> None:
        self.meter = SegmentationMeter()  # its own f_avsbench assumes fixed frames per clip; ours does not
        self.reference = _ReferenceBatches() if reference_batches else None
        self.clips = 0
        self.frames = 0

    def add(self, position: int, logits: Tensor, target: Tensor, valid: Tensor) -> None:
        """One clip: logits [T,1,S,S] or [T,S,S], target [T,S,S], valid [T] bool (frames that have a mask)."""
        logits, target = logits.reshape(target.shape)[valid], target[valid]
        if len(logits):
            self.meter.update(logits, target)
        if self.reference is not None:
            self.reference.add(position, logits, target)
        self.clips += 1
        self.frames += int(valid.sum())

    def compute(self) -> dict[str, float]:
        scores = self.meter.compute()
        result = {"miou": scores["miou"], "f": scores["f"]}
        if self.reference is not None:
            result["f_avsbench"] = self.reference.compute()
        return result


def _class_name(classes: list[str], label: int) -> str:
    return classes[label] if label >= 0 else NO_CLASS


# --------------------------------------------------------------------------------------------------------------
# evaluate


def evaluate(model: nn.Module, shards_dir: str | Path, split: str = "test", device: torch.device | str = "cpu",
             amp_dtype: torch.dtype | None = None, batch_size: int = 4, num_workers: int = 0,
             max_clips: int | None = None, progress: Progress | None = None) -> dict:
    """mIoU, F and F_avsbench of a split with the clips' own audio, overall and per primary class.

    Only frames with `mask_valid` count (S4 training clips have a mask on frame 1 only). `max_clips` scores the
    first clips of the split only. The model is moved to `device`, run in eval mode, and left in the mode it had.
    Returns {"split", "overall": {"miou", "f", "f_avsbench", "clips", "frames"},
    "per_class": {name: {"miou", "f", "clips"}}} (name "none" for clips without a class).
    A semantic model (`model.mask_classes` > 1) is scored by the official AVSS metric (`evaluate_semantic`).
    """

    if is_semantic(model):
        return evaluate_semantic(model, shards_dir, split, device, amp_dtype, batch_size, num_workers, max_clips,
                                 progress)
    device = torch.device(device)
    dataset = eval_dataset(shards_dir, split)
    table = read_split_table(dataset)
    overall = _Scores()
    per_class: dict[str, _Scores] = {}
    model.to(device)
    with eval_mode(model):
        for batch, positions in batches(dataset, table, batch_size, num_workers, max_clips, device.type == "cuda"):
            logits = predict_logits(model, batch, device, amp_dtype)  # [B,T,1,S,S]
            for i, position in enumerate(positions):
                clip = (position, logits[i], batch["masks"][i], batch["mask_valid"][i])
                overall.add(*clip)
                name = _class_name(dataset.classes, int(batch["label"][i]))
                per_class.setdefault(name, _Scores(reference_batches=False)).add(*clip)
            report_progress(progress, overall.clips, len(positions))
    log.info("evaluated %d clips (%d frames) of split %r", overall.clips, overall.frames, split)
    order = {name: i for i, name in enumerate([*dataset.classes, NO_CLASS])}
    return {
        "split": split,
        "overall": {**overall.compute(), "clips": overall.clips, "frames": overall.frames},
        "per_class": {name: {**scores.compute(), "clips": scores.clips}
                      for name, scores in sorted(per_class.items(), key=lambda item: order[item[0]])},
    }


# --------------------------------------------------------------------------------------------------------------
# The audio-reliance suite


def _with_donors(donors: list[int | None]) -> tuple[list[int], list[int], list[int]]:
    """Split a batch's rows by whether a donor was found: (rows with one, their donors' positions, rows without)."""
    rows = [i for i, donor in enumerate(donors) if donor is not None]
    return rows, [donors[i] for i in rows], [i for i, donor in enumerate(donors) if donor is None]


# predict(rows, audio): logits [len(rows),T,1,S,S] of some rows of a batch heard with audio [len(rows),T,128]
RowPredictor = Callable[[list[int], Tensor], Tensor]


class _Reliance:
    """The suite's inputs (donor audio, negatives) and meters, filled one batch at a time (docs/design.md §9)."""

    def __init__(self, table: SplitTable, silence: Tensor, noise: Tensor, has_other: bool, seed: int) -> None:
        self.donors = DonorPicker(table.labels, seed)
        self.donor_audio = torch.from_numpy(table.audio)  # [N,T,128]
        self.silence, self.noise, self.has_other, self.seed = silence, noise, has_other, seed
        self.true = _Scores()
        self.swap = _Scores(reference_batches=False)
        self.fprs = {name: FPRMeter() for name in ("silence", "noise", "offscreen")}
        self.clips = {name: 0 for name in self.fprs}
        self.skipped = {"swap": 0, "offscreen": 0}

    def add(self, batch: dict, positions: list[int], true_logits: Tensor, predict: RowPredictor) -> None:
        """One batch: its true-audio logits [B,T,1,S,S]; `predict(rows, audio)` scores rows with other audio."""
        for i, position in enumerate(positions):
            self.true.add(position, true_logits[i], batch["masks"][i], batch["mask_valid"][i])
        if self.has_other:
            self._add_swap(batch, positions, predict)
        B, every = len(positions), list(range(len(positions)))
        self.fprs["silence"].update(predict(every, self.silence.expand(B, -1, -1)))
        picks = [int(np.random.default_rng([self.seed, STREAM_NOISE, p]).integers(len(self.noise)))
                 for p in positions]
        self.fprs["noise"].update(predict(every, self.noise[picks]))
        self.clips["silence"] += B
        self.clips["noise"] += B
        self._add_offscreen(batch, positions, predict)

    def _add_swap(self, batch: dict, positions: list[int], predict: RowPredictor) -> None:
        rows, sources, missing = _with_donors([self.donors.swap(p, int(batch["other_label"][i]))
                                               for i, p in enumerate(positions)])
        # Clips without another object in view have nothing to swap to: neither scored nor skipped.
        self.skipped["swap"] += sum(int(batch["other_label"][i]) >= 0 for i in missing)
        if rows:
            logits = predict(rows, self.donor_audio[sources])
            for k, i in enumerate(rows):
                self.swap.add(positions[i], logits[k], batch["other_masks"][i], batch["mask_valid"][i])

    def _add_offscreen(self, batch: dict, positions: list[int], predict: RowPredictor) -> None:
        other_labels = batch["other_label"].tolist() if "other_label" in batch else [-1] * len(positions)
        rows, sources, missing = _with_donors([
            self.donors.offscreen(p, visible_classes(int(batch["label"][i]), other_labels[i], batch["sounding"][i]))
            for i, p in enumerate(positions)])
        self.skipped["offscreen"] += len(missing)
        if rows:
            self.fprs["offscreen"].update(predict(rows, self.donor_audio[sources]))
            self.clips["offscreen"] += len(rows)

    def result(self, split: str) -> dict:
        result: dict = {"split": split, "true": {**self.true.compute(), "clips": self.true.clips}}
        if self.swap.clips:
            scores = self.swap.compute()
            result["swap"] = {"miou_other": scores["miou"], "f_other": scores["f"], "clips": self.swap.clips,
                              "skipped": self.skipped["swap"]}
        elif not self.has_other:
            result["swap"] = {"clips": 0, "note": "the shards have no other-object masks (avsprep crops --other-masks)"}
        else:
            result["swap"] = {"clips": 0, "skipped": self.skipped["swap"],
                              "note": "no clip has another visible object with a donor clip of its class in this split"}
        for name, meter in self.fprs.items():
            if self.clips[name]:
                result[name] = {"fpr": meter.compute(), "clips": self.clips[name]}
            else:
                result[name] = {"clips": 0, "note": "no clip of the split has a class out of view to borrow audio from"}
            if name == "offscreen":
                result[name]["skipped"] = self.skipped["offscreen"]
        return result


def reliance_suite(model: nn.Module, shards_dir: str | Path, split: str = "test", device: torch.device | str = "cpu",
                   amp_dtype: torch.dtype | None = None, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                   max_clips: int | None = None, progress: Progress | None = None) -> dict:
    """Does the mask follow the sound? Scores the same frames under five kinds of audio (docs/design.md §9).

    - "true": the clip's own audio against its masks (miou, f, f_avsbench over frames with masks);
    - "swap": clips with another visible object (other_label >= 0, shards with other masks) get the audio of
      another clip of the split whose primary label is that object's class, scored against the other object's
      mask (miou_other, f_other); clips with no such donor are counted as "skipped";
    - "silence" / "noise": the negative-audio embeddings beside the shards (one of the M noise clips, seeded, per
      clip); "offscreen": the audio of another clip whose class is not visible in this one. These three are scored
      by FPR over all T frames, the target being empty.

    Donor audio comes from a first, cheap pass over the split's audio embeddings (N×T×128), then one streaming
    pass scores the clips. A vision-only model ignores audio, so its one prediction per clip serves every
    condition. `max_clips` scores the first clips of the split only (donors still come from the whole split).
    Returns {"split", "true": {...}, "swap": {...}, "silence": {"fpr", "clips"}, "noise": {...},
    "offscreen": {"fpr", "clips", "skipped"}}; a condition that scored no clip is {"clips": 0, "note": why}.
    A semantic model is scored per class (`reliance_semantic`).
    """

    if is_semantic(model):
        return reliance_semantic(model, shards_dir, split, device, amp_dtype, batch_size, num_workers, seed,
                                 max_clips, progress)
    device = torch.device(device)
    dataset = eval_dataset(shards_dir, split)
    table = read_split_table(dataset, with_audio=True)
    silence, noise = load_negatives(shards_dir, dataset.manifest["frames_per_clip"])
    suite = _Reliance(table, silence, noise, bool(dataset.manifest.get("has_other_masks")), seed)
    uses_audio = model_uses_audio(model)
    model.to(device)
    with eval_mode(model):
        for batch, positions in batches(dataset, table, batch_size, num_workers, max_clips, device.type == "cuda"):
            true_logits = predict_logits(model, batch, device, amp_dtype)  # [B,T,1,S,S]

            def predict(rows: list[int], audio: Tensor) -> Tensor:
                """Logits [len(rows),T,1,S,S] of these rows heard with `audio` [len(rows),T,128] instead of their
                own. A model that ignores audio predicts the same with any audio: its true-audio logits serve."""
                if not uses_audio:
                    return true_logits[rows]
                return predict_logits(model, select_rows(batch, rows), device, amp_dtype, audio=audio)

            suite.add(batch, positions, true_logits, predict)
            report_progress(progress, suite.true.clips, len(positions))
    log.info("reliance suite on %d clips of split %r (swap %d, skipped %d; off-screen %d, skipped %d)",
             suite.true.clips, split, suite.swap.clips, suite.skipped["swap"], suite.clips["offscreen"],
             suite.skipped["offscreen"])
    return suite.result(split)


# --------------------------------------------------------------------------------------------------------------
# Does it hear yet? (the trainer's check for train.negatives_start = "hears", docs/design.md §17)


class _Hearing:
    """mIoU against the clip's own mask with its own audio and with the other visible object's audio, and the mean
    probability inside the sounding and the silent object; filled one clip at a time."""

    def __init__(self) -> None:
        self.true, self.swapped = SegmentationMeter(), SegmentationMeter()
        self.sums = {"p_target": 0.0, "p_other": 0.0, "p_other_swap": 0.0}
        self.pixels = {name: 0 for name in self.sums}
        self.clips = 0

    def add(self, own: Tensor, swapped: Tensor, target: Tensor, silent: Tensor) -> None:
        """Logits [F,S,S] with the own and with the swapped audio, masks [F,S,S] of the sounding and the silent
        object, over the F frames that have masks."""
        self.true.update(own, target)
        self.swapped.update(swapped, target)
        for name, logits, where in (("p_target", own, target), ("p_other", own, silent),
                                    ("p_other_swap", swapped, silent)):
            inside = where > 0
            self.sums[name] += float(torch.sigmoid(logits.float())[inside].sum())
            self.pixels[name] += int(inside.sum())
        self.clips += 1

    def result(self) -> dict:
        true, swapped = self.true.compute()["miou"], self.swapped.compute()["miou"]
        means = {name: self.sums[name] / self.pixels[name] if self.pixels[name] else 0.0 for name in self.sums}
        return {"miou_true": true, "miou_swap": swapped, "gap": true - swapped, **means, "clips": self.clips}


@torch.no_grad()
def hearing(model: nn.Module, shards_dir: str | Path, split: str = "val", device: torch.device | str = "cpu",
            amp_dtype: torch.dtype | None = None, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
            max_clips: int | None = None) -> dict:
    """Does the model hear? The same frames with their own audio and with the audio of the other visible object's
    class (the reliance suite's swap donor), both scored against the clip's own mask.

    A model that ignores the sound scores the same under both; one that follows it loses its target when the audio
    names the other object. Over the clips with another visible object and a donor: "miou_true", "miou_swap",
    "gap" = miou_true − miou_swap, the mean sigmoid probability inside the sounding object ("p_target") and inside
    the silent one ("p_other") with the true audio, and inside the silent one given its class's audio
    ("p_other_swap"); "clips" scored; "split". Shards without other-object masks score no clip (every figure 0).
    """
    device = torch.device(device)
    dataset = eval_dataset(shards_dir, split)
    scores = _Hearing()
    if not dataset.manifest.get("has_other_masks"):
        return {"split": split, **scores.result()}
    table = read_split_table(dataset, with_audio=True)
    donors, donor_audio = DonorPicker(table.labels, seed), torch.from_numpy(table.audio)  # [N,T,128]
    model.to(device)
    with eval_mode(model):
        for batch, positions in batches(dataset, table, batch_size, num_workers, max_clips, device.type == "cuda"):
            rows, sources, _ = _with_donors([donors.swap(p, int(batch["other_label"][i]))
                                             for i, p in enumerate(positions)])
            if not rows:
                continue
            sub = select_rows(batch, rows)
            own = predict_logits(model, sub, device, amp_dtype)  # [R,T,1,S,S]
            swapped = predict_logits(model, sub, device, amp_dtype, audio=donor_audio[sources])
            for k in range(len(rows)):
                valid = sub["mask_valid"][k]  # [T]
                if valid.any():
                    shape = sub["masks"][k].shape  # [T,S,S]
                    scores.add(own[k].reshape(shape)[valid], swapped[k].reshape(shape)[valid],
                               sub["masks"][k][valid], sub["other_masks"][k][valid])
    return {"split": split, **scores.result()}


# --------------------------------------------------------------------------------------------------------------
# Table


def format_table(results: dict) -> str:
    """A plain-text table of an `evaluate`, a `reliance_suite`, a `hearing` or a `localisation_suite` result."""
    if "gap" in results:
        rows = [[name, results[name]] for name in ("miou_true", "miou_swap", "gap", "p_target", "p_other",
                                                   "p_other_swap", "clips")]
        return "\n".join([f"hearing, split {results.get('split', '?')}"] + text_table(["figure", "value"], rows))
    if "kind" in results:

        return format_localisation_table(results)
    split = results.get("split", "?")
    if "overall" in results:
        overall = results["overall"]
        rows = [["overall", overall.get("miou"), overall.get("f"), overall.get("f_avsbench"), overall.get("clips")]]
        rows += [[name, scores.get("miou"), scores.get("f"), None, scores.get("clips")]
                 for name, scores in results.get("per_class", {}).items()]
        lines = [f"split {split}"] + text_table(["class", "miou", "f", "f_avsbench", "clips"], rows)
        return "\n".join(lines)
    if "true" in results:
        rows = []
        notes = []
        for condition, metrics in (("true", ("miou", "f", "f_avsbench")), ("swap", ("miou_other", "f_other")),
                                   ("silence", ("fpr",)), ("noise", ("fpr",)), ("offscreen", ("fpr",))):
            entry = results.get(condition, {})
            for k, metric in enumerate(metrics):
                first = k == 0
                rows.append([condition if first else "", metric, entry.get(metric),
                             entry.get("clips") if first else "", entry.get("skipped", "") if first else ""])
            if "note" in entry:
                notes.append(f"{condition}: {entry['note']}")
        lines = [f"audio-reliance suite, split {split}"]
        lines += text_table(["audio", "metric", "value", "clips", "skipped"], rows, names=2)
        lines += [f"note: {note}" for note in notes]
        return "\n".join(lines)
    raise ValueError("not an evaluate or reliance_suite result: expected an 'overall' or a 'true' key")


__all__ = ["DonorPicker", "SplitTable", "evaluate", "format_table", "hearing", "model_uses_audio", "predict_logits",
           "read_split_table", "reliance_suite", "visible_classes"]
