"""Video files in and out with PyAV (docs/design.md §15): frames by timestamp, audio as 16 kHz mono, and a writer.

Reading
-------
Times are seconds from the video's start (its video stream's first timestamp), as exact fractions. The frame
*shown* at time t is the last frame whose presentation timestamp is <= t, so variable frame rates need nothing
special. Frames are decoded once, in order; only the frames asked for are converted to RGB. A display matrix
(phones store portrait video as landscape plus a rotation) is honoured: frames come out as a player shows them.

Audio is resampled by FFmpeg's resampler channel by channel and mixed to mono by the mean of the channels (as
`avsprep.audio.load_audio` mixes WAVs); sample 0 is at the video's start, so frames and audio of a second agree.

Errors (an empty, unreadable or truncated file, no video or no audio track) are `InputError(path, problem)`.

Writing
-------
`VideoWriter` encodes RGB frames at a frame rate (H.264 when the FFmpeg build has libx264, as PyAV's wheels do;
MPEG-4 part 2 otherwise) and float audio as AAC, into any container FFmpeg guesses from the suffix (mp4, mkv).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from avsprep.errors import InputError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
AUDIO_RATE = 16000
# A stream that decodes to this much less than its header's duration is truncated (a damaged download); real
# files end within a frame or an audio packet of what their header says.
TRUNCATION_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` reads from a video file's headers and first frame."""

    path: Path
    width: int  # as displayed, after rotation
    height: int
    rotation: int  # degrees counter-clockwise that the display matrix turns the coded picture (0, 90, 180, -90)
    frame_rate: Fraction | None  # average frame rate, when the container knows it
    duration: float | None  # seconds, from the header
    audio_rate: int | None  # None: no audio track
    audio_channels: int | None


@contextlib.contextmanager
def _ffmpeg_errors(path: Path, what: str) -> Iterator[None]:
    """FFmpeg's exceptions (and PyAV's own ValueErrors on broken data) as one InputError naming the file."""
    import av

    try:
        yield
    except EOFError:  # av.error.EOFError is one too: the data ends before FFmpeg found anything to decode
        raise InputError(path, f"{what} (no data: a zero-length or cut-off file)") from None
    except (av.error.FFmpegError, ValueError) as error:
        # FFmpegError's own text repeats the path; its strerror is FFmpeg's message alone
        raise InputError(path, f"{what} ({getattr(error, 'strerror', None) or error})") from None


@contextlib.contextmanager
def open_video(path: Path, need_audio: bool = False) -> Iterator:
    """An open PyAV input container with a video stream (and an audio stream if `need_audio`); closed on exit."""
    import av

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise InputError(path, f"cannot read video file ({error.strerror or error})") from None
    if size == 0:
        raise InputError(path, "video file is empty (0 bytes)")
    with _ffmpeg_errors(path, "unreadable or truncated video file"):
        container = av.open(str(path), "r")
    try:
        if not container.streams.video:
            raise InputError(path, "no video stream" + ("" if container.duration else " (a zero-length video)"))
        if need_audio and not container.streams.audio:
            raise InputError(path, "no audio track")
        yield container
    finally:
        container.close()


def _origin(container) -> Fraction:
    """The video's time zero in container seconds: its video stream's first timestamp."""
    stream = container.streams.video[0]
    return Fraction(stream.start_time or 0) * stream.time_base


def _header_duration(container, stream) -> float | None:
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    return None if container.duration is None else container.duration / 1_000_000  # AV_TIME_BASE


def _check_complete(path: Path, decoded_s: float, header_s: float | None, kind: str) -> None:
    if header_s is not None and decoded_s < header_s - TRUNCATION_TOLERANCE_S:
        raise InputError(path, f"truncated: the {kind} stream decodes to {decoded_s:.2f} s of the "
                               f"{header_s:.2f} s its header gives")


def _raw_frames(path: Path, container, threads: int) -> Iterator[tuple[Fraction, Fraction, object]]:
    """(start, end, av.VideoFrame) for every frame in presentation order, in seconds from the video's start; at the
    end, checks that the stream was complete."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    origin = _origin(container)
    step = 1 / Fraction(stream.average_rate) if stream.average_rate else Fraction(1, 25)
    time, last_end, count = None, Fraction(0), 0
    with _ffmpeg_errors(path, "cannot decode video (damaged or truncated file)"):
        for frame in container.decode(stream):
            time_base = Fraction(frame.time_base or stream.time_base)
            if frame.pts is None:  # some AVI streams: the slot after the previous frame
                time = Fraction(0) if time is None else time + step
            else:
                time = frame.pts * time_base - origin
            end = time + (frame.duration * time_base if frame.duration else step)
            last_end = max(last_end, end)
            count += 1
            yield time, end, frame
    if count == 0:
        raise InputError(path, "no video frames (zero-length video)")
    _check_complete(path, float(last_end), _header_duration(container, stream), "video")


def _to_rgb(frame) -> np.ndarray:
    """An av.VideoFrame as RGB uint8 [H,W,3] as displayed (rotated by its display matrix)."""
    image = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def probe(path: Path) -> VideoInfo:
    """Stream facts of a video file; decodes its first frame to learn the rotation. InputError if unreadable."""
    path = Path(path)
    with open_video(path) as container:
        stream = container.streams.video[0]
        _, _, frame = next(_raw_frames(path, container, threads=1))  # InputError when there is none
        image = _to_rgb(frame)
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            path=path, width=image.shape[1], height=image.shape[0], rotation=int(frame.rotation or 0),
            frame_rate=Fraction(stream.average_rate) if stream.average_rate else None,
            duration=_header_duration(container, stream),
            audio_rate=audio.rate if audio else None, audio_channels=audio.channels if audio else None,
        )


def iter_frames(path: Path, threads: int = 0) -> Iterator[tuple[Fraction, np.ndarray]]:
    """Every frame of the video: (seconds from the start, RGB uint8 [H,W,3] as displayed). `threads` 0: FFmpeg's choice."""
    path = Path(path)
    with open_video(path) as container:
        for time, _, frame in _raw_frames(path, container, threads):
            yield time, _to_rgb(frame)


def frames_at(path: Path, times: Iterable[Fraction], threads: int = 0) -> Iterator[tuple[Fraction, np.ndarray]]:
    """The frame shown at each of `times` (ascending seconds from the start; may be endless): (t, RGB [H,W,3]).

    Stops at the first time after the video's last frame has ended. One decoding pass, no seeking.
    """
    path = Path(path)
    wanted = iter(times)
    t = next(wanted, None)
    with open_video(path) as container:
        shown, shown_end = None, Fraction(0)
        for time, end, frame in _raw_frames(path, container, threads):
            while t is not None and shown is not None and time > t:
                yield t, _to_rgb(shown)  # `shown` is on screen from its timestamp until this frame's
                t = next(wanted, None)
            if t is None:
                return  # the rest of the file is not needed
            shown, shown_end = frame, end
        while t is not None and shown is not None and t < shown_end:
            yield t, _to_rgb(shown)
            t = next(wanted, None)


def frames_each_second(path: Path, threads: int = 0) -> Iterator[np.ndarray]:
    """The frame shown at the middle of second s (s = 0, 1, ...: t = s + 0.5) for every second the video covers."""
    middles = (Fraction(2 * s + 1, 2) for s in itertools.count())
    for _, image in frames_at(path, middles, threads):
        yield image


def _decoded_audio(path: Path, container, rate: int | None) -> Iterator[np.ndarray]:
    """Blocks of float32 audio [C, n] at `rate` (None: the stream's own), in order; checks completeness."""
    import av

    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="fltp", layout=None, rate=rate or stream.rate)
    decoded = 0
    with _ffmpeg_errors(path, "cannot decode audio (damaged or truncated file)"):
        for frame in container.decode(stream):
            decoded += frame.samples / frame.sample_rate
            for block in resampler.resample(frame):
                yield block.to_ndarray()
        for block in resampler.resample(None):
            yield block.to_ndarray()
    if decoded == 0:
        raise InputError(path, "audio track has no samples")
    if stream.duration is not None:  # only the stream's own duration: a container's may be the video's
        _check_complete(path, decoded, float(stream.duration * stream.time_base), "audio")


def _audio_start(container) -> Fraction:
    """Where the audio track starts, in seconds from the video's start (AAC in mp4: 0)."""
    stream = container.streams.audio[0]
    return Fraction(stream.start_time or 0) * stream.time_base - _origin(container)


def iter_audio(path: Path, rate: int | None = None) -> Iterator[np.ndarray]:
    """The audio track as float32 blocks [C, n] at `rate` (None: its own) in order, sample 0 at the video's start:
    silence before a track that starts late, the part before the video cut from one that starts early."""
    path = Path(path)
    with open_video(path, need_audio=True) as container:
        stream = container.streams.audio[0]
        offset = round(_audio_start(container) * (rate or stream.rate))  # samples
        if offset > 0:
            yield np.zeros((stream.channels, offset), np.float32)
        for block in _decoded_audio(path, container, rate):
            if offset < 0:
                block, offset = block[:, -offset:], min(0, offset + block.shape[1])
            yield block


def read_audio(path: Path, rate: int = AUDIO_RATE) -> np.ndarray:
    """The audio track as float32 mono [N] at `rate`, sample 0 at the video's start (mean of the channels).

    The whole track is held in memory: 230 MB per hour at 16 kHz.
    """
    blocks = [block.mean(axis=0) for block in iter_audio(path, rate)]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """The audio track at its own rate and channels: (float32 [C, N], rate), sample 0 at the video's start."""
    info = probe(path)
    if info.audio_rate is None:
        raise InputError(path, "no audio track")
    blocks = list(iter_audio(path))
    return (np.concatenate(blocks, axis=1) if blocks else np.zeros((info.audio_channels, 0), np.float32)), info.audio_rate


def _layout_name(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


class VideoWriter:
    """Write RGB frames at a constant frame rate and, optionally, float audio as AAC into one file.

    `with VideoWriter(path, rate, width, height, audio_rate=48000, audio_channels=2) as out:` then
    `out.write_frame(rgb [H,W,3] uint8)` and `out.write_audio(samples [C,n] float32)` in any interleaving.
    Odd frame sizes are padded by one edge row/column (H.264 and MPEG-4 code 4:2:0 in 2x2 blocks).
    """

    def __init__(self, path: Path, frame_rate: Fraction, width: int, height: int, audio_rate: int | None = None,
                 audio_channels: int = 1, crf: int = 20):
        import av

        self.path = Path(path)
        self.width, self.height = width, height
        self.container = av.open(str(self.path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.video = self.container.add_stream(codec, rate=Fraction(frame_rate).limit_denominator(1_000_000))
        self.video.width, self.video.height = width + width % 2, height + height % 2
        self.video.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.video.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            self.video.bit_rate = 4_000_000
        self.audio = None
        if audio_rate is not None:
            self.audio = self.container.add_stream("aac", rate=audio_rate, layout=_layout_name(audio_channels))
            self.audio.bit_rate = 128_000 * audio_channels
        self.pending = np.zeros((audio_channels, 0), np.float32)  # samples waiting for a whole AAC frame
        self.frames_written, self.samples_written = 0, 0

    def write_frame(self, image: np.ndarray) -> None:
        """Append one RGB uint8 [H,W,3] frame of the size given at construction."""
        import av

        if image.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame is {image.shape[1]}x{image.shape[0]}, the video {self.width}x{self.height}")
        pad = ((0, self.height % 2), (0, self.width % 2), (0, 0))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.pad(image, pad, mode="edge")), format="rgb24")
        frame.pts = self.frames_written
        self.frames_written += 1
        self.container.mux(self.video.encode(frame))

    def write_audio(self, samples: np.ndarray) -> None:
        """Append float audio [C, n] (C as given at construction), values in [-1, 1]."""
        if self.audio is None:
            raise ValueError("this VideoWriter has no audio stream (give audio_rate)")
        self.pending = np.concatenate([self.pending, np.asarray(samples, np.float32).reshape(self.pending.shape[0], -1)], 1)
        self._encode_audio(final=False)

    def _encode_audio(self, final: bool) -> None:
        import av

        size = self.audio.codec_context.frame_size or 1024  # the AAC encoder takes whole frames of 1024
        while self.pending.shape[1] >= size or (final and self.pending.shape[1]):
            block, self.pending = self.pending[:, :size], self.pending[:, size:]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=self.audio.layout.name)
            frame.sample_rate, frame.pts = self.audio.rate, self.samples_written
            self.samples_written += block.shape[1]
            self.container.mux(self.audio.encode(frame))

    def close(self) -> None:
        """Flush the encoders and finish the file."""
        self.container.mux(self.video.encode(None))
        if self.audio is not None:
            self._encode_audio(final=True)
            self.container.mux(self.audio.encode(None))
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.container.close()  # leave the partial file; the caller writes under a temporary name
