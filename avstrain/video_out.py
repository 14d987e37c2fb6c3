"""`avstrain predict --video V --out-video OUT.mp4`: the segmentation as a video to watch and hear.

Every source frame, at the source's frame rate and size, with the predicted mask of the audio second it falls in
(second s covers [s, s + 1) from the video's start; frames after the last predicted second keep its mask) filled in
red, and the source's own sound track (or the `--audio` file) encoded as AAC beside it. The model's masks are
S x S; each is resized to the frame bilinearly on the probabilities and thresholded at 0.5, so edges stay smooth.

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
from avstrain.visualise import mask_overlay

log = logging.getLogger(__name__)


@dataclass
class SegmentationVideo:
    path: Path
    frames: int
    frame_rate: Fraction
    audio: str  # where the sound came from: "video", an audio file's path, or "none"


def _file_audio(path: Path, block: int = 65536) -> tuple[Iterator[np.ndarray], int, int]:
    """An audio file's blocks [C, n] float32 at its own rate, the rate and the channels."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.SoundFileError, RuntimeError, OSError) as error:
        raise InputError(path, f"cannot read audio ({error})") from None
    blocks = (data.T for data in soundfile.blocks(str(path), blocksize=block, dtype="float32", always_2d=True))
    return blocks, info.samplerate, info.channels


def _masks_at(probabilities: np.ndarray, width: int, height: int) -> Callable[[int], np.ndarray]:
    """second -> mask [height, width] bool, the last one computed kept (frames come in time order)."""
    cache: dict[int, np.ndarray] = {}

    def mask(second: int) -> np.ndarray:
        if second not in cache:
            cache.clear()
            cache[second] = cv2.resize(probabilities[second], (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
        return cache[second]

    return mask


def write_segmentation_video(source: Path, probabilities: np.ndarray, out: Path, audio: Path | None = None,
                             progress: Callable[[int, int | None], None] | None = None) -> SegmentationVideo:
    """Write `out` (mp4, mkv: by its suffix) from the `source` video and per-second mask probabilities [n,S,S].

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
    mask = _masks_at(probabilities.astype(np.float32), info.width, info.height)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = 0
    with video_io.VideoWriter(partial, rate, info.width, info.height, audio_rate, channels) as writer:
        # The sound first: encoded it is small, and the muxer interleaves it with the frames as they come.
        for block in blocks:
            writer.write_audio(block)
        for time, frame in video_io.iter_frames(source):
            writer.write_frame(mask_overlay(frame, mask(min(int(time), len(probabilities) - 1))))
            frames += 1
            if progress is not None:
                progress(1, total)
    os.replace(partial, out)
    log.info("%s: %d frames at %s fps, audio from %s", out, frames, rate, audio_name)
    return SegmentationVideo(path=out, frames=frames, frame_rate=rate, audio=audio_name)
