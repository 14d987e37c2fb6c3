"""`avstrain predict --video V --out-video OUT.mp4`: the segmentation as a video to watch and hear.

Every source frame, at the source's frame rate and size, with the predicted mask of the audio second it falls in
(second s covers [s, s + 1) from the video's start; frames after the last predicted second keep its mask) filled in
red, and the source's own sound track (or the `--audio` file) encoded as AAC beside it. The model's masks are
S x S; each is resized to the frame bilinearly on the probabilities and thresholded at 0.5, so edges stay smooth.

A localiser (senocak, avolnet) draws no mask: its heat map of the second, resized bilinearly, is blended over the
frame in the `inferno` colour map as the overlay grids draw it (`avstrain.visualise.heat_overlay`), on one colour
scale for the whole video (1st..99th percentile of all its seconds), so that brighter means hotter in every frame.

Written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import soundfile

from avsprep import video as video_io
from avsprep.errors import InputError
from avstrain.visualise import heat_overlay, heat_scale, mask_overlay

log = logging.getLogger(__name__)


@dataclass
class SegmentationVideo:
    path: Path
    frames: int
    frame_rate: Fraction
    audio: str  # where the sound came from: "video", an audio file's path, or "none"
    overlay: str = "mask"  # what is drawn over the frames: "mask" or "heat map"


def _file_audio(path: Path, block: int = 65536) -> tuple[Iterator[np.ndarray], int, int]:
    """An audio file's blocks [C, n] float32 at its own rate, the rate and the channels."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.SoundFileError, RuntimeError, OSError) as error:
        raise InputError(path, f"cannot read audio ({error})") from None
    blocks = (data.T for data in soundfile.blocks(str(path), blocksize=block, dtype="float32", always_2d=True))
    return blocks, info.samplerate, info.channels


def _maps_at(maps: np.ndarray, width: int, height: int,
             then: Callable[[np.ndarray], np.ndarray] = lambda resized: resized) -> Callable[[int], np.ndarray]:
    """second -> then(maps[second] resized bilinearly to [height, width]); the last one computed is kept (frames
    come in time order, about 25 to a second)."""
    cache: dict[int, np.ndarray] = {}

    def resized(second: int) -> np.ndarray:
        if second not in cache:
            cache.clear()
            cache[second] = then(cv2.resize(maps[second], (width, height), interpolation=cv2.INTER_LINEAR))
        return cache[second]

    return resized


def _painter(probabilities: np.ndarray | None, heat: np.ndarray | None, width: int, height: int
             ) -> tuple[Callable[[np.ndarray, int], np.ndarray], int, str]:
    """(draw(frame [H,W,3] uint8, second) -> frame, the number of seconds predicted, what is drawn)."""
    if (probabilities is None) == (heat is None):
        raise ValueError("give exactly one of probabilities and heat")
    if probabilities is not None:
        mask = _maps_at(probabilities.astype(np.float32), width, height, then=lambda resized: resized > 0.5)
        return (lambda frame, second: mask_overlay(frame, mask(second))), len(probabilities), "mask"
    low, high = heat_scale(heat)
    hot = _maps_at(heat.astype(np.float32), width, height)
    return (lambda frame, second: heat_overlay(frame, hot(second), low, high)), len(heat), "heat map"


def write_segmentation_video(source: Path, probabilities: np.ndarray | None, out: Path, audio: Path | None = None,
                             progress: Callable[[int, int | None], None] | None = None,
                             heat: np.ndarray | None = None) -> SegmentationVideo:
    """Write `out` (mp4, mkv: by its suffix) from the `source` video and per-second mask probabilities [n,S,S],
    or, for a localiser, `probabilities=None` and its per-second heat maps `heat` [n,S,S].

    `audio`: a file to use instead of the video's own sound track (a video without one gets a silent output).
    `progress(newly_done, total)` counts frames (the total from the header's duration, when it has one).
    """
    source, out = Path(source), Path(out)
    info = video_io.probe(source)
    rate = info.frame_rate or Fraction(25)
    if audio is not None:
        blocks, audio_rate, channels = _file_audio(audio)
        audio_name = str(audio)
    elif info.audio_rate is not None:
        blocks, audio_rate, channels = video_io.iter_audio(source), info.audio_rate, info.audio_channels
        audio_name = "video"
    else:
        blocks, audio_rate, channels, audio_name = iter(()), None, 1, "none"
    total = round(info.duration * rate) if info.duration else None
    draw, seconds, overlay = _painter(probabilities, heat, info.width, info.height)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = 0
    with video_io.VideoWriter(partial, rate, info.width, info.height, audio_rate, channels) as writer:
        # The sound first: encoded it is small, and the muxer interleaves it with the frames as they come.
        for block in blocks:
            writer.write_audio(block)
        for time, frame in video_io.iter_frames(source):
            writer.write_frame(draw(frame, min(int(time), seconds - 1)))
            frames += 1
            if progress is not None:
                progress(1, total)
    os.replace(partial, out)
    log.info("%s: %d frames at %s fps, %s overlaid, audio from %s", out, frames, rate, overlay, audio_name)
    return SegmentationVideo(path=out, frames=frames, frame_rate=rate, audio=audio_name, overlay=overlay)
