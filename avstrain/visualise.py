"""Pictures of what the model does: overlay grids over shard clips, and segmentation of a user's own video.

Overlay grid (`avstrain predict ... --overlays N`), one PNG per clip, T columns, rows:

- the frame; the ground truth (sounding object filled green, the other visible object outlined orange);
- for each kind of audio — the clip's own, the other visible object's (the swap of the reliance suite: the audio of
  another clip of the split whose class is that object's), silence — the predicted mask (red) over the frame with
  the object it should follow outlined, and the TPAVI audio-visual heat map over the frame.

The heat map is the per-position score θ_i·φ_t of the finest TPAVI stage (`AVSOutput.av_scores`, docs/design.md §6), or
for the localisers (senocak, avolnet; docs/design.md §13), which draw no mask, their own heat map (the row's label then
gives the pointing game: frames whose maximum lies in the object the audio should point to), upsampled bilinearly
to the frame. Its colour scale is shared by all rows and frames of a clip (1st..99th
percentile), so the rows compare: with the other object's audio the hot region should move to the other object.

`segment_video` runs a checkpoint on a video file, without shards: frames at 1 per second, the frame shown at the
middle of each second (t = k + 0.5 s by timestamp, the centre of audio example k; `avsprep.video`, as `avsprep
frames` takes them), resized to the model's square input as `avsprep crops` resizes frames, and the video's own
sound track (or a separate audio file) embedded with the embedder the training shards were made with (recorded in
the checkpoint), one 128-d vector per second. A localiser's per-second output is its heat map instead of a mask;
AVE-Net, which draws neither, is refused before the video is read (`check_draws`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avsprep.errors import InputError
from avsprep.shards import read_negatives
from avstrain.data import ShardDataset
from avstrain.eval_data import DonorPicker, model_uses_audio, read_split_table
from avstrain.models.tpavi_avs import AVSModel
from avstrain.runtime import autocast, eval_mode

log = logging.getLogger(__name__)

NOTHING_TO_DRAW = ("draws neither masks nor heat maps (AVE-Net: its outputs are correspondence and embeddings, see "
                   "avstrain eval --suite localisation)")

PREDICTION_RGB = np.array([230, 40, 40], np.float32)
TARGET_RGB = (40, 200, 40)
OTHER_RGB = (255, 150, 0)


# --------------------------------------------------------------------------------------------------------------
# Model call with the heat map


@dataclass
class Prediction:
    """probabilities [B,T,S,S] float32 (sigmoid of the logits; None for a localiser, which draws no mask);
    heat [B,T,S,S] float32 or None (the vision-only TPAVI model has none)."""

    probabilities: Tensor | None
    heat: Tensor | None


def _to_frame_size(maps: Tensor, size: int) -> Tensor:
    """[B,T,h,w] -> [B,T,S,S] float32 on the CPU, bilinear."""
    B, T = maps.shape[:2]
    return F.interpolate(maps.float().flatten(0, 1)[:, None], size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].view(B, T, size, size).cpu()


@torch.no_grad()
def predict_with_heat(model: nn.Module, frames: Tensor, audio: Tensor, device: torch.device | str = "cpu",
                      amp_dtype: torch.dtype | None = None) -> Prediction:
    """frames [B,T,S,S,3] uint8, audio [B,T,128] -> Prediction at frame size S (model in eval mode, on device).

    A model with `heatmaps` (the localisers) gives its first heat map; TPAVI its masks and finest `av_scores`."""
    device = torch.device(device)
    size = frames.shape[2]
    with autocast(device, amp_dtype):
        if hasattr(model, "heatmaps"):
            maps = model.heatmaps(frames.to(device).permute(0, 1, 4, 2, 3), audio.to(device))
            return Prediction(None, _to_frame_size(next(iter(maps.values())), size))
        output = model(frames.to(device).permute(0, 1, 4, 2, 3), audio.to(device))
    if not hasattr(output, "av_scores"):
        raise InputError(None, f"this model {NOTHING_TO_DRAW}")
    probabilities = torch.sigmoid(output.logits.float())[:, :, 0].cpu()
    heat = None
    if output.av_scores:
        heat = _to_frame_size(output.av_scores[min(output.av_scores)], size)  # the finest TPAVI stage
    return Prediction(probabilities, heat)


def check_draws(model: nn.Module) -> None:
    """InputError unless the model draws a mask (TPAVI) or a heat map (the localisers): AVE-Net draws neither.

    Asked before a video is decoded, so that an AVE-Net checkpoint fails at once rather than after the work."""
    if not (isinstance(model, AVSModel) or hasattr(model, "heatmaps")):
        kind = getattr(getattr(model, "config", None), "kind", type(model).__name__)
        raise InputError(None, f"model.kind = {kind!r} {NOTHING_TO_DRAW}")


# --------------------------------------------------------------------------------------------------------------
# Drawing


def _outline(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.ascontiguousarray(image), contours, -1, color, 1)


def mask_overlay(frame: np.ndarray, mask: np.ndarray, outline: np.ndarray | None = None,
                 outline_color: tuple[int, int, int] = TARGET_RGB, fill: np.ndarray = PREDICTION_RGB) -> np.ndarray:
    """frame [S,S,3] uint8 with mask [S,S] bool filled at 55 % and, optionally, another mask's outline."""
    picture = frame.astype(np.float32)
    picture[mask] = 0.45 * picture[mask] + 0.55 * fill
    picture = picture.clip(0, 255).astype(np.uint8)
    return _outline(picture, outline, outline_color) if outline is not None else picture


def heat_overlay(frame: np.ndarray, heat: np.ndarray, low: float, high: float) -> np.ndarray:
    """frame [S,S,3] uint8 blended with heat [S,S] in the `inferno` colour map over [low, high]."""
    scaled = (np.clip((heat - low) / max(high - low, 1e-12), 0, 1) * 255).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB).astype(np.float32)
    return (0.35 * frame + 0.65 * colours).clip(0, 255).astype(np.uint8)


def heat_scale(heat: np.ndarray) -> tuple[float, float]:
    """The colour scale (low, high) of heat maps [..., H, W] shown together: their 1st and 99th percentiles, so
    that one hot cell does not wash out the rest."""
    return float(np.percentile(heat, 1)), float(np.percentile(heat, 99))


def scale_heat(heat: np.ndarray) -> np.ndarray:
    """heat [..., H, W] float -> uint8 [..., H, W], each map from its minimum (0) to its maximum (255)."""
    flat = heat.reshape(*heat.shape[:-2], -1).astype(np.float32)
    low, high = flat.min(-1, keepdims=True), flat.max(-1, keepdims=True)
    scaled = (flat - low) / np.maximum(high - low, 1e-12)
    return (scaled.reshape(heat.shape) * 255).round().astype(np.uint8)


def draw_grid(rows: list[tuple[str, list[np.ndarray]]], title: str, out: Path, cell: int = 128) -> Path:
    """A grid of RGB pictures, one labelled row each, each picture scaled to cell x cell; written as a PNG.

    Drawn with OpenCV rather than matplotlib subplots: 40 axes cost about 3 s a grid, this about 50 ms.
    """
    columns = max(len(pictures) for _, pictures in rows)
    label_width, header, gap = 200, 44, 4
    height = header + len(rows) * (cell + gap)
    width = label_width + columns * (cell + gap)
    canvas = np.full((height, width, 3), 255, np.uint8)
    _put_lines(canvas, [title], 8, 20, scale=0.55)
    for c in range(columns):
        _put_lines(canvas, [f"t = {c + 1}"], label_width + c * (cell + gap) + cell // 2 - 22, header - 8)
    for r, (label, pictures) in enumerate(rows):
        top = header + r * (cell + gap)
        lines = label.split("\n")
        _put_lines(canvas, lines, 8, top + cell // 2 - 9 * (len(lines) - 1) + 5)
        for c, image in enumerate(pictures):
            interpolation = cv2.INTER_NEAREST if image.shape[0] <= cell else cv2.INTER_AREA
            left = label_width + c * (cell + gap)
            canvas[top:top + cell, left:left + cell] = cv2.resize(image, (cell, cell), interpolation=interpolation)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise InputError(out, "cannot write the picture")
    return out


def _put_lines(canvas: np.ndarray, lines: list[str], x: int, y: int, scale: float = 0.45) -> None:
    for i, line in enumerate(lines):
        cv2.putText(canvas, line, (x, y + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _pointing_label(heat: np.ndarray, follow: np.ndarray | None, valid: np.ndarray) -> str:
    """"pointing k/n": frames (with a mask) whose heat map [T,S,S] peaks inside `follow` [T,S,S]."""
    if follow is None:
        return ""
    frames = [t for t in range(len(heat)) if valid[t]]
    hits = sum(bool(follow[t].flat[int(np.argmax(heat[t]))]) for t in frames)
    return f"pointing {hits}/{len(frames)}" if frames else ""


def _iou(prediction: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(prediction, target).sum()
    return float(np.logical_and(prediction, target).sum() / union) if union else 1.0


# --------------------------------------------------------------------------------------------------------------
# Overlays over shard clips


@dataclass
class OverlayResult:
    written: list[Path] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)  # the kinds of audio drawn: "own", "swap", "silence"


@dataclass
class _Condition:
    """One kind of audio given to a clip: audio [T,128]; `follow` [T,S,S] bool is the mask it should produce."""

    kind: str
    label: str
    audio: Tensor
    follow: np.ndarray | None
    colour: tuple[int, int, int]


def write_overlays(model: nn.Module, shards_dir: str | Path, out: str | Path, clips: int, split: str = "test",
                   device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> OverlayResult:
    """Overlay grids of the first `clips` clips of the split (split order), as `<out>/<clip>.png`.

    Rows per clip: frame, ground truth, then per audio condition (own, the other object's, silence) the prediction
    and the heat map. The swap donor is chosen as `reliance_suite` chooses it (same seed, same clip); a condition
    without audio to give (no other object or no donor clip; no negatives.h5 for silence) is left out of that
    clip's grid. A model without TPAVI (vision-only) has no heat-map rows.
    """
    device, out = torch.device(device), Path(out)
    dataset = ShardDataset(shards_dir, split, shuffle=False, rank=0, world_size=1)
    table = read_split_table(dataset, with_audio=True)
    donors = DonorPicker(table.labels, seed)
    try:
        silence = torch.from_numpy(read_negatives(Path(shards_dir))["silence"][0]).float()  # [T,128]
    except InputError as error:
        log.warning("no silence row: %s", error)
        silence = None
    classes = dataset.classes
    result = OverlayResult()
    model.to(device)
    with eval_mode(model):
        for clip in dataset:
            if len(result.written) >= clips:
                break
            name = clip["name"]
            label, other = int(clip["label"]), int(clip.get("other_label", torch.tensor(-1)))
            target = clip["masks"].numpy().astype(bool)
            other_mask = clip["other_masks"].numpy().astype(bool) if "other_masks" in clip else None
            conditions = _conditions(clip, classes, table, donors, silence, target, other_mask)
            frames = clip["frames"][None].expand(len(conditions), -1, -1, -1, -1)
            audio = torch.stack([condition.audio for condition in conditions])  # [K,T,128]
            prediction = predict_with_heat(model, frames, audio, device, amp_dtype)
            path = _clip_grid(name, clip, classes, label, other, target, other_mask, conditions, prediction,
                              out / f"{name}.png")
            result.written.append(path)
            drawn = set(result.conditions) | {condition.kind for condition in conditions}
            result.conditions = [kind for kind in ("own", "swap", "silence") if kind in drawn]
            if progress:
                progress(1)
    return result


def _conditions(clip: dict, classes: list[str], table, donors: DonorPicker, silence: Tensor | None,
                target: np.ndarray, other_mask: np.ndarray | None) -> list[_Condition]:
    """The kinds of audio a clip's grid shows: its own, the other visible object's (if a donor exists), silence."""
    label, other = int(clip["label"]), int(clip.get("other_label", torch.tensor(-1)))
    conditions = [_Condition("own", f"own audio ({_class(classes, label)})", clip["audio"], target, TARGET_RGB)]
    donor = donors.swap(table.position[clip["name"]], other) if other_mask is not None else None
    if donor is not None:
        conditions.append(_Condition("swap", f"{classes[other]} audio\n(clip {table.names[donor]})",
                                     torch.from_numpy(table.audio[donor]), other_mask, OTHER_RGB))
    if silence is not None and silence.shape[0] == clip["audio"].shape[0]:
        conditions.append(_Condition("silence", "silence", silence, None, TARGET_RGB))
    return conditions


def _class(classes: list[str], label: int) -> str:
    return classes[label] if 0 <= label < len(classes) else "none"


def _clip_grid(name: str, clip: dict, classes: list[str], label: int, other: int, target: np.ndarray,
               other_mask: np.ndarray | None, conditions: list[_Condition], prediction: Prediction,
               path: Path) -> Path:
    frames = clip["frames"].numpy()  # [T,S,S,3]
    valid = clip["mask_valid"].numpy()
    T = len(frames)
    truth = []
    for t in range(T):
        sounding = target[t] & valid[t]
        picture = _outline(mask_overlay(frames[t], sounding, fill=np.array((0, 255, 0), np.float32)), sounding,
                           TARGET_RGB)
        truth.append(_outline(picture, other_mask[t], OTHER_RGB) if other_mask is not None else picture)
    rows = [("frame", list(frames)), ("ground truth", truth)]
    heat = prediction.heat.numpy() if prediction.heat is not None else None
    low, high = heat_scale(heat) if heat is not None else (0.0, 1.0)
    for i, condition in enumerate(conditions):
        if prediction.probabilities is None:  # a localiser: its heat map is the prediction
            rows.append((f"{condition.label}\n{_pointing_label(heat[i], condition.follow, valid)}",
                         [heat_overlay(frames[t], heat[i, t], low, high) for t in range(T)]))
            continue
        predicted = prediction.probabilities[i].numpy() > 0.5  # [T,S,S]
        follow = condition.follow
        if follow is None:
            score = f"{predicted.mean():.1%} on"
        else:
            ious = [_iou(predicted[t], follow[t]) for t in range(T) if valid[t]]
            score = f"IoU {np.mean(ious):.2f}" if ious else ""
        rows.append((f"{condition.label}\n{score}",
                     [mask_overlay(frames[t], predicted[t], None if follow is None else follow[t], condition.colour)
                      for t in range(T)]))
        if heat is not None:
            rows.append(("heat map", [heat_overlay(frames[t], heat[i, t], low, high) for t in range(T)]))
    title = f"{name}: sounding {_class(classes, label)}" + (f", also visible {_class(classes, other)}"
                                                            if other >= 0 else "")
    return draw_grid(rows, title, path)


# --------------------------------------------------------------------------------------------------------------
# A user's own video


@dataclass
class VideoResult:
    masks: list[Path]
    overlays: list[Path]
    seconds: int  # frames sampled (one per second)
    fps: float
    audio_padded: int  # seconds of audio repeated because the audio was shorter than the video
    embedder: str
    probabilities: np.ndarray | None = None  # [seconds,S,S] float32: the mask probabilities (for --out-video)
    heat: np.ndarray | None = None  # [seconds,S,S] float32: a localiser's heat maps, in place of probabilities


def sample_video_frames(path: str | Path, max_seconds: int = 0) -> tuple[list[np.ndarray], float]:
    """RGB frames [H,W,3] uint8 at 1 per second (the frame shown at t = k + 0.5 s, k = 0, 1, ...) and the frame rate.

    One decoding pass with PyAV (`avsprep.video`), rotation metadata honoured; `max_seconds` > 0 stops early.
    """
    from itertools import islice

    from avsprep import video as video_io

    info = video_io.probe(path)
    seconds = video_io.frames_each_second(path)
    frames = list(islice(seconds, max_seconds) if max_seconds else seconds)
    if not frames:  # shorter than half a second: its first frame stands for its one second
        frames = [next(video_io.iter_frames(path))[1]]
    return frames, float(info.frame_rate or 0)


def choose_embedder(state: dict, checkpoint: str | Path, vggish_weights: str | Path | None = None,
                    vggish_pca: str | Path | None = None):
    """The audio embedder the checkpoint was trained with (recorded from its shards' manifest).

    A checkpoint trained on VGGish embeddings needs `vggish_weights`; one trained on the weight-free `logmel-stats`
    refuses them. Checkpoints written before the embedder was recorded use `logmel-stats` unless VGGish weights are
    given.
    """
    from avsprep.audio import make_embedder

    recorded = state.get("embedder")
    if recorded == "vggish" and vggish_weights is None:
        raise InputError(checkpoint, "was trained on VGGish audio embeddings: give --vggish-weights FILE "
                                     "(and --vggish-pca FILE if the shards used PCA)")
    if recorded == "logmel-stats" and (vggish_weights is not None or vggish_pca is not None):
        raise InputError(checkpoint, "was trained on logmel-stats audio embeddings; --vggish-weights does not apply")
    if recorded is None:
        recorded = "vggish" if vggish_weights is not None else "logmel-stats"
        log.warning("%s does not record its audio embedder; using %s", checkpoint, recorded)
    return make_embedder(recorded, vggish_weights, vggish_pca)


def segment_video(model: nn.Module, video: str | Path, audio: str | Path | None, out: str | Path, embedder=None,
                  frames_per_clip: int = 5, image_size: int | None = None, device: torch.device | str = "cpu",
                  amp_dtype: torch.dtype | None = None, max_seconds: int = 0) -> VideoResult:
    """Segment the sounding object in a video: `<out>/<stem>_<k>.png` 0/255 masks at the video's resolution
    (k = 1..n, one per second) and `<out>/<stem>_overlay_<w>.png` grids (frame, prediction, heat map) per window.

    The n seconds are cut into windows of `frames_per_clip` (the last may be shorter; TPAVI takes any T). The sound
    is the video's own track unless `audio` (WAV/FLAC/OGG, any rate) is given; a vision-only model needs neither.
    A localiser (senocak, avolnet) writes its heat maps instead of masks, as `predict --shards` does (8-bit grey,
    each second's map from its minimum to its maximum), and `VideoResult.heat` in place of `probabilities`.
    """
    from avsprep.crops import resize

    check_draws(model)
    video, out = Path(video), Path(out)
    uses_audio = model_uses_audio(model)
    frames, fps = sample_video_frames(video, max_seconds)
    n = len(frames)
    size = image_size or model.config.image_size
    inputs = torch.from_numpy(np.stack([resize(frame, size) for frame in frames]))  # [n,S,S,3]
    embeddings, padded, name = _video_audio(video, audio, embedder if uses_audio else None, n)  # [n,128]
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    masks, overlays, maps = [], [], []  # maps: per window, the probabilities [t,S,S] (or a localiser's heat maps)
    model.to(device)
    with eval_mode(model):
        for w, start in enumerate(range(0, n, frames_per_clip), start=1):
            stop = min(n, start + frames_per_clip)
            prediction = predict_with_heat(model, inputs[None, start:stop], embeddings[None, start:stop], device,
                                           amp_dtype)
            localiser = prediction.probabilities is None  # its heat map is the prediction
            maps.append((prediction.heat if localiser else prediction.probabilities)[0].numpy())
            predicted = None if localiser else maps[-1] > 0.5  # [t,S,S]
            masks += _write_video_maps(maps[-1] if localiser else predicted, frames[start:stop], out, video.stem,
                                       first=start + 1)
            title = f"{video.name}, seconds {start + 1}-{stop}" + ("" if uses_audio else " (vision-only model)")
            overlays.append(_window_grid(inputs[start:stop].numpy(), predicted, prediction, title,
                                         out / f"{video.stem}_overlay_{w}.png"))
    joined = np.concatenate(maps)
    return VideoResult(masks=masks, overlays=overlays, seconds=n, fps=fps, audio_padded=padded, embedder=name,
                       probabilities=None if localiser else joined, heat=joined if localiser else None)


def _video_audio(video: Path, audio: str | Path | None, embedder, seconds: int) -> tuple[Tensor, int, str]:
    """(embeddings [seconds,128], seconds of audio padded, the embedder's name) of the `audio` file if given, else
    of the video's own sound track; zeros when no embedder is given (a model that does not listen)."""
    from avsprep import video as video_io
    from avsprep.audio import examples_for_seconds, load_audio

    if embedder is None:
        return torch.zeros(seconds, 128), 0, "none"
    source = audio or video
    samples = load_audio(audio) if audio is not None else video_io.read_audio(video)
    examples, padded = examples_for_seconds(samples, seconds, str(source))  # [n,96,64]
    if padded:
        log.warning("%s: audio is %d s shorter than the %d s of video; its last second is repeated",
                    source, padded, seconds)
    return torch.from_numpy(embedder.embed(examples)).float(), padded, embedder.name


def _write_video_maps(maps: np.ndarray, frames: list[np.ndarray], out: Path, stem: str, first: int) -> list[Path]:
    """maps [t,S,S] as PNGs at each frame's own resolution, `<stem>_<first + i>.png`: bool masks as 0/255
    (nearest), float heat maps bilinearly, then scaled from their minimum (0) to their maximum (255)."""
    paths = []
    for t, frame in enumerate(frames):
        height, width = frame.shape[:2]
        if maps.dtype == bool:
            picture = cv2.resize(maps[t].astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_NEAREST)
        else:
            picture = scale_heat(cv2.resize(maps[t], (width, height), interpolation=cv2.INTER_LINEAR))
        path = out / f"{stem}_{first + t}.png"
        cv2.imwrite(str(path), picture)
        paths.append(path)
    return paths


def _window_grid(window: np.ndarray, predicted: np.ndarray | None, prediction: Prediction, title: str,
                 path: Path) -> Path:
    """Frame, prediction and heat-map rows of one window: window [t,S,S,3], predicted [t,S,S] bool (None for a
    localiser, which has only the heat-map row; the vision-only TPAVI model has no heat map)."""
    rows = [("frame", list(window))]
    if predicted is not None:
        rows.append(("prediction", [mask_overlay(frame, mask) for frame, mask in zip(window, predicted)]))
    if prediction.heat is not None:
        heat = prediction.heat[0].numpy()
        low, high = heat_scale(heat)
        rows.append(("heat map", [heat_overlay(window[t], heat[t], low, high) for t in range(len(window))]))
    return draw_grid(rows, title, path)


__all__ = ["OverlayResult", "Prediction", "VideoResult", "check_draws", "choose_embedder", "draw_grid",
           "heat_overlay", "heat_scale", "mask_overlay", "predict_with_heat", "sample_video_frames", "scale_heat",
           "segment_video", "write_overlays"]
