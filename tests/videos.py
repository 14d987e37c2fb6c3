"""Real video files for tests, encoded with PyAV: a frame counter drawn as blocks and a tone whose pitch says the second.

Each frame shows its index as 10 bits, a 2 x 5 grid of black/white blocks in the top-left corner of the picture as
displayed (so a reader that ignores rotation metadata reads garbage); the audio of second s is a sine of
`pitch(s)` Hz. `read_counter` and `dominant_pitch` read them back.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BITS_ROWS, BITS_COLUMNS = 2, 5


def pitch(second: int) -> float:
    """The tone of second s: 400 Hz, then 150 Hz higher each second (well apart at 16 kHz)."""
    return 400.0 + 150.0 * second


def counter_image(index: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 [height, width, 3]: a mid-grey picture with `index` as a block pattern (bit b at row b // 5)."""
    image = np.full((height, width, 3), 90, np.uint8)
    block = min(width // BITS_COLUMNS, height // (BITS_ROWS + 1))
    for bit in range(BITS_ROWS * BITS_COLUMNS):
        row, column = divmod(bit, BITS_COLUMNS)
        value = 255 if index >> bit & 1 else 0
        image[row * block:(row + 1) * block, column * block:(column + 1) * block] = value
    return image


def read_counter(image: np.ndarray) -> int:
    """The index drawn by `counter_image`, from the block centres (any size the picture was scaled to)."""
    height, width = image.shape[:2]
    block = min(width / BITS_COLUMNS, height / (BITS_ROWS + 1))
    gray = image.mean(axis=2)
    index = 0
    for bit in range(BITS_ROWS * BITS_COLUMNS):
        row, column = divmod(bit, BITS_COLUMNS)
        y, x = int((row + 0.5) * block), int((column + 0.5) * block)
        index |= int(gray[y, x] > 128) << bit
    return index


def tone_track(seconds: float, rate: int, channels: int) -> np.ndarray:
    """float32 [channels, N]: second s is a sine of pitch(s), phase-continuous, in every channel (0.4 amplitude)."""
    t = np.arange(int(round(seconds * rate))) / rate
    frequency = np.array([pitch(int(s)) for s in t])
    phase = 2 * np.pi * np.cumsum(frequency) / rate
    wave = (0.4 * np.sin(phase)).astype(np.float32)
    return np.repeat(wave[None], channels, axis=0)


def dominant_pitch(samples: np.ndarray, rate: int) -> float:
    """The frequency of the strongest FFT bin of `samples` [N] (Hann window)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[np.argmax(spectrum)])


def encode_video(path: Path, seconds: float, fps: Fraction | int, width: int = 80, height: int = 48,
                 codec: str = "libx264", audio_rate: int | None = 44100, channels: int = 2, rotation: int = 0,
                 frame_times: list[Fraction] | None = None) -> list[Fraction]:
    """Encode a counter video with a tone track; returns every frame's presentation time in seconds.

    `width` x `height` is the picture as displayed; with `rotation` (degrees counter-clockwise, a multiple of 90)
    the stored picture is turned the other way and the display matrix says how to turn it back.
    `frame_times`: explicit times (a variable frame rate; the stream's time base is then 1/1000 s).
    """
    fps = Fraction(fps)
    times = frame_times or [Fraction(i) / fps for i in range(int(seconds * fps))]
    turns = rotation // 90 % 4
    coded_w, coded_h = (height, width) if turns % 2 else (width, height)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000) if frame_times else 1 / fps
        if rotation:
            stream.set_display_rotation(rotation)
        audio = container.add_stream("aac", rate=audio_rate, layout="mono" if channels == 1 else "stereo") \
            if audio_rate else None
        container.start_encoding()  # the header, also for a video of no frames at all
        for index, time in enumerate(times):
            picture = np.ascontiguousarray(np.rot90(counter_image(index, width, height), -turns))
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = round(time / stream.codec_context.time_base)
            frame.time_base = stream.codec_context.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio is not None:
            track = tone_track(seconds, audio_rate, channels)
            for start in range(0, track.shape[1], 1024):
                block = av.AudioFrame.from_ndarray(np.ascontiguousarray(track[:, start:start + 1024]), format="fltp",
                                                   layout=audio.layout.name)
                block.sample_rate, block.pts = audio_rate, start
                container.mux(audio.encode(block))
            container.mux(audio.encode(None))
    return times


def expected_frame(times: list[Fraction], t: Fraction) -> int:
    """The index of the frame shown at time t: the last one whose time is <= t."""
    return max(i for i, time in enumerate(times) if time <= t)
