"""Audio → VGGish-compatible log-mel examples → one EMBEDDING_DIM (128-d) embedding per second (docs/design.md §5).

Pipeline
--------
``load_audio`` reads any file soundfile can read (8/16/24/32-bit PCM, float), mixes to mono by the mean of the
channels and resamples to 16 kHz with ``scipy.signal.resample_poly``. ``waveform_to_examples`` reproduces the
input pipeline of the reference VGGish (``vggish_input`` / ``mel_features``): 25 ms frames (400 samples) every
10 ms (160), no centring or padding, periodic Hann window, |rfft| with 512 points, 64 mel bands 125–7500 Hz whose
triangles are linear in the HTK mel domain, log(mel + 0.01), examples of 96 frames with hop 96 (0.96 s).
``clip_examples`` gives exactly T examples for a T-second clip, repeating the last one when the audio is short,
as the AVSBench preprocessing does. An embedder then maps each [96, 64] example to 128 numbers.

Accuracy
--------
- 16 kHz input (int16 samples, directly or through a 16-bit WAV): matches ``reference/vggish_logmel_16k.npz``
  to 1e-4 (measured max abs difference: 0.0 on all five signals; float64 arithmetic, like the reference).
- Other rates: the reference resamples with resampy (kaiser_best), we use ``resample_poly``'s default Kaiser
  filter, so the match is looser. Measured on the five reference signals taken up to 44.1 kHz (resample_poly),
  written as a float stereo WAV and read back through ``load_audio``, against the 16 kHz reference examples:
  max abs log-mel difference 0.193 (noise; chirp 0.123, square 0.178, tones 0.033, silence 0.0), mean abs
  difference <= 0.005; the largest differences are in the top band (7.25-7.5 kHz, near both resamplers' cut-off)
  and in near-silent bands, where log(mel + 0.01) magnifies tiny errors. ``tests/test_audio.py`` asserts
  max <= 0.25 and mean <= 0.01. For scale: the reference's own resampy path on the same files is further from
  the 16 kHz vectors (max 0.565), and our output differs from it by max 0.372, mean <= 0.006. A 16-bit stereo
  WAV adds quantisation noise in near-silent bands (chirp 0.133, tones 0.053) and clips the square wave's Gibbs
  overshoot at 44.1 kHz (max 0.255, mean 0.054); the test uses a float WAV so that it measures the resampler.

Embedders
---------
- ``logmel-stats`` (:class:`LogMelStatsEmbedder`, the default): weight-free and deterministic. Per example, the
  mean and the standard deviation over its 96 frames of each of the 64 log-mel bands, concatenated
  ``[mean_0..mean_63, std_0..std_63]``: the long-term spectrum and its variability, enough to tell sound classes
  apart on synthetic data and a baseline for real data.
- ``vggish`` (:class:`VGGishEmbedder`): the VGGish network with weights from a local file in the layout of the
  public PyTorch port (``reference/vggish_keys.tsv``); raw 128-d post-ReLU output by default (what the AVSBench
  checkpoints were trained with), optional PCA post-processing. Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from avsprep.embedding import EMBEDDING_DIM, FRAMES_PER_EXAMPLE, NUM_BANDS, Embedder, check_examples
from avsprep.errors import InputError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
EXAMPLE_SECONDS = 0.96

FRAME_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512  # next power of two above FRAME_LENGTH, as mel_features chooses it
MEL_LOW_HZ = 125.0
MEL_HIGH_HZ = 7500.0
LOG_OFFSET = 0.01
# Samples needed for one whole example: the last of its 96 frames starts 95 hops in.
SAMPLES_PER_EXAMPLE = (FRAMES_PER_EXAMPLE - 1) * HOP_LENGTH + FRAME_LENGTH  # 15600

EMBEDDER_NAMES = ("logmel-stats", "vggish")

# HTK mel scale constants used by VGGish's mel_features.
_MEL_BREAK_HZ = 700.0
_MEL_HIGH_Q = 1127.0

# Placeholder data-chunk sizes that streaming writers (e.g. ffmpeg to a pipe) leave in a WAV header; libsndfile
# reports them as a size mismatch, but the file is complete.
_STREAMING_DATA_SIZES = {0, 0x7FFFFFFF, 0xFFFFFFFF}
_DATA_SIZE_MISMATCH = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file as float32 mono samples at 16 kHz, shape [num_samples].

    PCM is scaled by soundfile to [-1, 1) (16-bit: samples / 32768, as the reference does). Channels are mixed
    by their mean. Raises InputError naming the file when it is missing, unreadable, truncated, empty, or holds
    NaN/inf samples.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "audio file not found")
    try:
        with sf.SoundFile(str(path)) as audio:
            libsndfile_log, rate = audio.extra_info, audio.samplerate
            data = audio.read(dtype="float64", always_2d=True)  # [num_samples, channels]
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise InputError(path, f"cannot read audio ({exc})") from exc
    _check_not_truncated(path, libsndfile_log)
    if data.shape[0] == 0:
        raise InputError(path, "audio has no samples")
    if not np.isfinite(data).all():
        raise InputError(path, "audio holds NaN or infinite samples")
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        common = math.gcd(SAMPLE_RATE, int(rate))
        from scipy.signal import resample_poly  # imported here: it costs a second at start-up

        mono = resample_poly(mono, SAMPLE_RATE // common, int(rate) // common)
    return mono.astype(np.float32)


def _check_not_truncated(path: Path, libsndfile_log: str) -> None:
    """libsndfile quietly reads what is there when a WAV/AIFF header promises more data than the file holds;
    its log says ``data : <declared> (should be <present>)``. A cut-off file must not pass as a short clip."""
    match = _DATA_SIZE_MISMATCH.search(libsndfile_log or "")
    if match is None:
        return
    declared, present = int(match.group(1)), int(match.group(2))
    if declared not in _STREAMING_DATA_SIZES and present < declared:
        raise InputError(path, f"audio file is truncated (header declares {declared} data bytes, file holds {present})")


# ---------------------------------------------------------------------------------------------------------------------
# Log-mel


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return _MEL_HIGH_Q * np.log1p(np.asarray(hz, dtype=np.float64) / _MEL_BREAK_HZ)


@lru_cache(maxsize=1)
def mel_matrix() -> np.ndarray:
    """The [257, 64] float64 matrix that maps |rfft| bins to mel bands, built as mel_features does it:
    band edges equally spaced in HTK mel between 125 and 7500 Hz, triangles linear in mel (not in Hz),
    the DC bin zeroed."""
    num_bins = FFT_LENGTH // 2 + 1
    bins_mel = _hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, num_bins))
    edges = np.linspace(_hz_to_mel(MEL_LOW_HZ), _hz_to_mel(MEL_HIGH_HZ), NUM_BANDS + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bins_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    weights.setflags(write=False)  # shared cached value
    return weights


@lru_cache(maxsize=1)
def _periodic_hann() -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2 * np.pi / FRAME_LENGTH * np.arange(FRAME_LENGTH))
    window.setflags(write=False)
    return window


def log_mel_frames(samples_16k: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram [num_frames, 64] float64 of 16 kHz mono samples; num_frames = 1 + (N - 400) // 160
    (0 when N < 400)."""
    samples = np.asarray(samples_16k, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples of shape [N], got {samples.shape}")
    if samples.size < FRAME_LENGTH:
        return np.zeros((0, NUM_BANDS), dtype=np.float64)
    frames = sliding_window_view(samples, FRAME_LENGTH)[::HOP_LENGTH]  # a view: [num_frames, 400]
    magnitude = np.abs(np.fft.rfft(frames * _periodic_hann(), FFT_LENGTH))  # [num_frames, 257]
    return np.log(magnitude @ mel_matrix() + LOG_OFFSET)


def waveform_to_examples(samples_16k: np.ndarray) -> np.ndarray:
    """VGGish input examples [n, 96, 64] float32 of 16 kHz mono samples (float, full scale ±1).

    n = num_frames // 96; trailing frames that do not fill an example are dropped, as in the reference, so audio
    shorter than 15600 samples (0.975 s) gives n = 0.
    """
    log_mel = log_mel_frames(samples_16k)
    n = log_mel.shape[0] // FRAMES_PER_EXAMPLE
    examples = log_mel[: n * FRAMES_PER_EXAMPLE].reshape(n, FRAMES_PER_EXAMPLE, NUM_BANDS)
    return examples.astype(np.float32)


def clip_examples(path: str | Path, num_seconds: int) -> tuple[np.ndarray, int]:
    """Exactly ``num_seconds`` examples [T, 96, 64] float32 for the clip's audio file, and how many were padded.

    Longer audio keeps its first T examples (only the samples they need are analysed). Shorter audio repeats
    its last example up to T, as the AVSBench preprocessing does; ``padded`` counts the repeated examples.
    Audio shorter than one example (< 0.975 s) is zero-padded at the end to one example; that example is not
    wholly real audio, so all T examples count as padded.
    """
    return examples_for_seconds(load_audio(path), num_seconds, str(path))


def examples_for_seconds(samples: np.ndarray, num_seconds: int, source: str = "audio") -> tuple[np.ndarray, int]:
    """`clip_examples` for samples already in memory: float32 mono [N] at 16 kHz (e.g. a video's sound track)."""
    if num_seconds < 1:
        raise ValueError(f"num_seconds must be >= 1, got {num_seconds}")
    needed = (num_seconds * FRAMES_PER_EXAMPLE - 1) * HOP_LENGTH + FRAME_LENGTH
    examples = waveform_to_examples(samples[:needed])
    if examples.shape[0] == 0:
        log.debug("%s: %d samples is shorter than one example; zero-padding", source, samples.size)
        padded_wave = np.zeros(SAMPLES_PER_EXAMPLE, dtype=np.float32)
        padded_wave[: samples.size] = samples
        examples = waveform_to_examples(padded_wave)
        padded = num_seconds
    else:
        padded = num_seconds - examples.shape[0]
    if examples.shape[0] < num_seconds:
        repeats = np.repeat(examples[-1:], num_seconds - examples.shape[0], axis=0)
        examples = np.concatenate([examples, repeats], axis=0)
    return examples, padded


# ---------------------------------------------------------------------------------------------------------------------
# Embedders


# The example and embedding shapes, the Embedder protocol and check_examples live in avsprep.embedding (imported
# above, also by avsprep.vggish).


class LogMelStatsEmbedder:
    """Weight-free default: per example, mean and std over the 96 frames of each of the 64 log-mel bands.

    Output [n, 128] float32 = ``[mean_0..mean_63, std_0..std_63]`` (std with ddof=0). Computed in float64, so the
    result is deterministic and independent of batch size.
    """

    name = "logmel-stats"

    def embed(self, examples: np.ndarray) -> np.ndarray:
        examples = check_examples(examples).astype(np.float64, copy=False)
        stats = np.concatenate([examples.mean(axis=1), examples.std(axis=1)], axis=1)
        return stats.astype(np.float32)


def make_embedder(
    name: str,
    vggish_weights: str | Path | None = None,
    vggish_pca: str | Path | None = None,
) -> Embedder:
    """Build the embedder called ``name`` (one of EMBEDDER_NAMES). Cheap: VGGish weights load on first use."""
    if name == "logmel-stats":
        if vggish_weights is not None or vggish_pca is not None:
            raise InputError(None, "--vggish-weights/--vggish-pca apply only to --embedder vggish")
        return LogMelStatsEmbedder()
    if name == "vggish":
        if vggish_weights is None:
            raise InputError(
                None, "--embedder vggish needs --vggish-weights FILE (e.g. vggish-10086976.pth); nothing is downloaded"
            )
        from avsprep.vggish import VGGishEmbedder  # torch is imported only when VGGish is asked for

        return VGGishEmbedder(vggish_weights, pca_path=vggish_pca)
    raise InputError(None, f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDER_NAMES)}")
