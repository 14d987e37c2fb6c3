"""Tests of avsprep.audio: the VGGish-compatible log-mel against the reference vectors, loading and its errors,
clip padding, and the embedders (weight-free statistics, VGGish from a local file, PCA post-processing)."""
from __future__ import annotations

import io
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from scipy.signal import resample_poly

from avsprep.audio import (
    EMBEDDING_DIM,
    SAMPLE_RATE,
    SAMPLES_PER_EXAMPLE,
    LogMelStatsEmbedder,
    clip_examples,
    load_audio,
    make_embedder,
    waveform_to_examples,
)
from avsprep.vggish import VGGish, VGGishEmbedder
from avsprep.errors import InputError

log = logging.getLogger(__name__)

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
SIGNALS = ("chirp", "tones", "noise", "silence", "square")

# Documented in avsprep/audio.py: measured max 0.193, mean <= 0.005 on these signals.
TOL_44K_MAX = 0.25
TOL_44K_MEAN = 0.01


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "vggish_logmel_16k.npz") as data:
        return {key: data[key] for key in data.files}


def tone(freq_hz: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Log-mel against the reference


@pytest.mark.parametrize("name", SIGNALS)
def test_examples_match_reference(reference, name):
    expected = reference[f"{name}_examples"]
    examples = waveform_to_examples(reference[f"{name}_wave_int16"] / 32768.0)
    assert examples.dtype == np.float32
    assert examples.shape == expected.shape
    np.testing.assert_allclose(examples, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", SIGNALS)
def test_examples_match_reference_through_16k_wav(reference, name, tmp_path):
    wav = tmp_path / f"{name}.wav"
    sf.write(wav, reference[f"{name}_wave_int16"], SAMPLE_RATE, subtype="PCM_16")
    samples = load_audio(wav)
    assert samples.dtype == np.float32 and samples.ndim == 1
    np.testing.assert_allclose(waveform_to_examples(samples), reference[f"{name}_examples"], rtol=0, atol=1e-4)


def test_44k_stereo_within_documented_tolerance(reference, tmp_path):
    """Up to 44.1 kHz, stereo float WAV, back through load_audio: only the resampler differs from the reference."""
    worst_max, worst_mean = 0.0, 0.0
    for name in SIGNALS:
        wave = reference[f"{name}_wave_int16"] / 32768.0
        up = resample_poly(wave, 441, 160)
        wav = tmp_path / f"{name}-44k.wav"
        sf.write(wav, np.stack([up, up], axis=1), 44100, subtype="FLOAT")
        examples = waveform_to_examples(load_audio(wav))
        expected = reference[f"{name}_examples"]
        assert examples.shape == expected.shape
        diff = np.abs(examples - expected)
        log.info("44.1 kHz %s: max abs %.4f, mean abs %.5f", name, diff.max(), diff.mean())
        worst_max, worst_mean = max(worst_max, float(diff.max())), max(worst_mean, float(diff.mean()))
    assert worst_max <= TOL_44K_MAX, worst_max
    assert worst_mean <= TOL_44K_MEAN, worst_mean


# --------------------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize(
    ("subtype", "atol"),
    [("PCM_U8", 1 / 128), ("PCM_16", 1 / 32768), ("PCM_24", 2**-23), ("PCM_32", 2**-31), ("FLOAT", 0), ("DOUBLE", 0)],
)
def test_wav_subtypes_load(tmp_path, subtype, atol):
    signal = tone(440.0, 0.5)
    wav = tmp_path / f"{subtype}.wav"
    sf.write(wav, signal, SAMPLE_RATE, subtype=subtype)
    samples = load_audio(wav)
    assert samples.dtype == np.float32 and samples.shape == signal.shape
    np.testing.assert_allclose(samples, signal, rtol=0, atol=atol + 1e-7)


def test_stereo_mixes_by_mean(tmp_path):
    left, right = tone(440.0, 0.5), tone(1000.0, 0.5, amplitude=0.25)
    wav = tmp_path / "stereo.wav"
    sf.write(wav, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(wav), (left + right) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("rate", [48000, 22050, 8000])
def test_other_rates_resample_to_16k(tmp_path, rate):
    wav = tmp_path / f"{rate}.wav"
    sf.write(wav, tone(440.0, 2.0, rate=rate), rate, subtype="PCM_16")
    samples = load_audio(wav)
    assert samples.shape == (2 * SAMPLE_RATE,)
    # Away from the edges the 440 Hz tone survives resampling.
    np.testing.assert_allclose(samples[1000:-1000], tone(440.0, 2.0)[1000:-1000], rtol=0, atol=2e-3)


def _assert_input_error_names(path: Path, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        load_audio(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_wav_raises(tmp_path, bad_value):
    signal = tone(440.0, 0.5)
    signal[100] = bad_value
    wav = tmp_path / "bad.wav"
    sf.write(wav, signal, SAMPLE_RATE, subtype="FLOAT")
    _assert_input_error_names(wav, "NaN or infinite")


def test_garbage_wav_raises(tmp_path):
    wav = tmp_path / "garbage.wav"
    wav.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_input_error_names(wav, "cannot read audio")


def test_truncated_wav_raises(tmp_path):
    wav = tmp_path / "cut.wav"
    sf.write(wav, tone(440.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    data = wav.read_bytes()
    wav.write_bytes(data[: len(data) // 2])
    _assert_input_error_names(wav, "truncated")


def test_streamed_wav_with_placeholder_size_loads(tmp_path):
    """Writers that stream to a pipe leave 0xFFFFFFFF as the data size; the file is complete, not truncated."""
    wav = tmp_path / "streamed.wav"
    signal = tone(440.0, 0.5)
    sf.write(wav, signal, SAMPLE_RATE, subtype="PCM_16")
    data = bytearray(wav.read_bytes())
    data_chunk = data.find(b"data")
    data[4:8] = data[data_chunk + 4 : data_chunk + 8] = struct.pack("<I", 0xFFFFFFFF)
    wav.write_bytes(bytes(data))
    np.testing.assert_allclose(load_audio(wav), signal, rtol=0, atol=1 / 32768)


def test_empty_and_missing_wav_raise(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), SAMPLE_RATE, subtype="PCM_16")
    _assert_input_error_names(empty, "no samples")
    _assert_input_error_names(tmp_path / "absent.wav", "not found")


# --------------------------------------------------------------------------------------------------------------------
# Clips


@pytest.fixture
def square_wav(reference, tmp_path) -> Path:
    """The reference square wave: 4.3 s, 4 whole examples."""
    wav = tmp_path / "square.wav"
    sf.write(wav, reference["square_wave_int16"], SAMPLE_RATE, subtype="PCM_16")
    return wav


def test_clip_examples_repeats_last_example_when_short(reference, square_wav):
    expected = reference["square_examples"]
    examples, padded = clip_examples(square_wav, 6)
    assert examples.shape == (6, 96, 64) and examples.dtype == np.float32
    assert padded == 2
    np.testing.assert_allclose(examples[:4], expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(examples[4], examples[3])
    np.testing.assert_array_equal(examples[5], examples[3])


@pytest.mark.parametrize("seconds", [1, 3, 4])
def test_clip_examples_takes_first_examples(reference, square_wav, seconds):
    examples, padded = clip_examples(square_wav, seconds)
    assert padded == 0
    np.testing.assert_allclose(examples, reference["square_examples"][:seconds], rtol=0, atol=1e-4)


def test_clip_examples_shorter_than_one_example_is_zero_padded(tmp_path):
    short = tone(440.0, 0.5)
    wav = tmp_path / "short.wav"
    sf.write(wav, short, SAMPLE_RATE, subtype="FLOAT")
    examples, padded = clip_examples(wav, 5)
    assert examples.shape == (5, 96, 64) and padded == 5
    waveform = np.zeros(SAMPLES_PER_EXAMPLE, dtype=np.float32)
    waveform[: short.size] = short
    np.testing.assert_array_equal(examples, np.repeat(waveform_to_examples(waveform), 5, axis=0))
    # Exactly one example's worth of samples is real audio, not padding.
    sf.write(wav, tone(440.0, SAMPLES_PER_EXAMPLE / SAMPLE_RATE), SAMPLE_RATE, subtype="FLOAT")
    assert clip_examples(wav, 1)[1] == 0


# --------------------------------------------------------------------------------------------------------------------
# Weight-free embedder


def test_logmel_stats_embedder_is_mean_and_std(reference):
    examples = reference["chirp_examples"]
    embedder = make_embedder("logmel-stats")
    assert isinstance(embedder, LogMelStatsEmbedder) and embedder.name == "logmel-stats"
    embeddings = embedder.embed(examples)
    assert embeddings.shape == (5, EMBEDDING_DIM) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings[:, :64], examples.mean(axis=1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(embeddings[:, 64:], examples.std(axis=1), rtol=0, atol=1e-5)
    # Deterministic, and independent of how examples are batched.
    np.testing.assert_array_equal(embedder.embed(examples), embeddings)
    np.testing.assert_array_equal(embedder.embed(examples[2:3]), embeddings[2:3])
    assert embedder.embed(np.zeros((0, 96, 64), np.float32)).shape == (0, EMBEDDING_DIM)


def test_logmel_stats_separates_two_tones():
    embedder = LogMelStatsEmbedder()
    low = embedder.embed(waveform_to_examples(tone(440.0, 2.0)))
    high = embedder.embed(waveform_to_examples(tone(2500.0, 2.0)))
    within = np.linalg.norm(low[0] - low[1])  # two seconds of the same tone
    between = np.linalg.norm(low[0] - high[0])
    assert between > 10.0 and between > 100 * within, (between, within)


def test_embedder_rejects_wrong_shape():
    with pytest.raises(ValueError, match="96, 64"):
        LogMelStatsEmbedder().embed(np.zeros((2, 64, 96), np.float32))


# --------------------------------------------------------------------------------------------------------------------
# VGGish


def tsv_layout() -> dict[str, tuple[int, ...]]:
    layout = {}
    for line in (REFERENCE / "vggish_keys.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            layout[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return layout


@pytest.fixture(scope="module")
def random_vggish(tmp_path_factory) -> tuple[VGGish, Path]:
    torch.manual_seed(0)
    model = VGGish().eval()
    path = tmp_path_factory.mktemp("vggish") / "vggish-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def examples_batch() -> np.ndarray:
    return np.random.default_rng(1).normal(0.0, 2.0, (7, 96, 64)).astype(np.float32)


def reference_port_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The public port's forward written out from vggish_keys.tsv, independently of VGGish: conv/ReLU/pool blocks,
    transpose(1, 3).transpose(1, 2) to channels last, flatten, three Linear+ReLU."""
    x = x.unsqueeze(1)
    for index in (0, 3, 6, 8, 11, 13):
        x = F.relu(F.conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
        if index in (0, 3, 8, 13):
            x = F.max_pool2d(x, 2)
    x = x.transpose(1, 3).transpose(1, 2).contiguous().view(x.shape[0], -1)
    for index in (0, 2, 4):
        x = F.relu(F.linear(x, state[f"embeddings.{index}.weight"], state[f"embeddings.{index}.bias"]))
    return x


def test_vggish_state_dict_matches_tsv_layout(random_vggish):
    _, path = random_vggish
    state = torch.load(path, weights_only=True, mmap=True)
    assert {key: tuple(value.shape) for key, value in state.items()} == tsv_layout()
    assert list(state) == list(tsv_layout())


def test_vggish_embedder_loads_saved_weights(random_vggish, examples_batch):
    model, path = random_vggish
    embedder = VGGishEmbedder(path, batch_size=3)  # 7 examples: batches of 3, 3, 1
    assert embedder.name == "vggish"
    embeddings = embedder.embed(examples_batch)
    assert embeddings.shape == (7, EMBEDDING_DIM) and embeddings.dtype == np.float32
    with torch.inference_mode():
        in_memory = model(torch.from_numpy(examples_batch)).numpy()
        written_out = reference_port_forward(model.state_dict(), torch.from_numpy(examples_batch)).numpy()
    np.testing.assert_allclose(embeddings, in_memory, rtol=0, atol=1e-5)
    np.testing.assert_allclose(embeddings, written_out, rtol=0, atol=1e-5)
    assert (embeddings >= 0).all() and (embeddings > 0).any()  # raw post-ReLU output
    assert embedder.embed(examples_batch[:0]).shape == (0, EMBEDDING_DIM)


def test_vggish_embedder_pickles_without_weights(random_vggish, examples_batch):
    _, path = random_vggish
    embedder = make_embedder("vggish", vggish_weights=path)
    expected = embedder.embed(examples_batch[:2])
    payload = pickle.dumps(embedder)
    assert len(payload) < 10_000  # the network is reloaded by the receiving process, not shipped
    np.testing.assert_array_equal(pickle.loads(payload).embed(examples_batch[:2]), expected)


@pytest.mark.parametrize("storage", ["numpy-1-legacy", "numpy-arrays", "tensors"])
def test_vggish_pca_postprocessing(random_vggish, examples_batch, tmp_path, storage):
    model, path = random_vggish
    with torch.inference_mode():
        raw = model(torch.from_numpy(examples_batch)).numpy().astype(np.float64)
    rng = np.random.default_rng(2)
    rotation, _ = np.linalg.qr(rng.normal(size=(EMBEDDING_DIM, EMBEDDING_DIM)))
    means = raw.mean(axis=0) + rng.normal(0.0, raw.std() * 0.1, EMBEDDING_DIM)
    # Scale so that the projections reach past ±2 and the clamp is exercised.
    vectors = rotation * (3.0 / ((raw - means) @ rotation.T).std())
    expected = np.round((np.clip((raw - means) @ vectors.T, -2.0, 2.0) + 2.0) * 255.0 / 4.0)

    pca_path = tmp_path / "pca.pth"
    if storage == "numpy-1-legacy":
        # How the public vggish_pca_params file (2019) stores them: NumPy arrays pickled by NumPy 1.x, whose
        # reconstructor is named numpy.core.multiarray, in torch's pre-zip format.
        buffer = io.BytesIO()
        torch.save({"pca_eigen_vectors": vectors, "pca_means": means}, buffer, _use_new_zipfile_serialization=False)
        legacy = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n" in legacy
        pca_path.write_bytes(legacy)
    elif storage == "numpy-arrays":
        torch.save({"pca_eigen_vectors": vectors, "pca_means": means}, pca_path)
    else:
        torch.save(
            {"pca_eigen_vectors": torch.from_numpy(vectors), "pca_means": torch.from_numpy(means).reshape(-1, 1)},
            pca_path,
        )
    embeddings = make_embedder("vggish", vggish_weights=path, vggish_pca=pca_path).embed(examples_batch)
    assert embeddings.dtype == np.float32
    assert {0.0, 255.0} <= set(np.unique(embeddings)) and len(np.unique(embeddings)) > 20
    # float32 on the device against float64 here: a value may round to the neighbouring level.
    assert np.abs(embeddings - expected).max() <= 1.0
    assert (embeddings == expected).mean() > 0.99


def _save_small_state(path: Path, rename: dict[str, str] | None = None, reshape: dict[str, tuple] | None = None):
    """A state dict with the TSV's keys and 1-element tensors, except where renamed or given a shape."""
    rename, reshape = rename or {}, reshape or {}
    state = {rename.get(key, key): torch.zeros(reshape.get(key, (1,))) for key in tsv_layout()}
    torch.save(state, path)


def test_vggish_wrong_key_raises(tmp_path):
    path = tmp_path / "wrong-key.pth"
    _save_small_state(path, rename={"embeddings.4.weight": "embeddings.6.weight"})
    expected = r"missing key 'embeddings\.4\.weight'.*unexpected key 'embeddings\.6\.weight'"
    with pytest.raises(InputError, match=expected):
        VGGishEmbedder(path).load()


def test_vggish_wrong_shape_raises(tmp_path):
    path = tmp_path / "wrong-shape.pth"
    _save_small_state(path, reshape={"features.0.weight": (32, 1, 3, 3)})
    with pytest.raises(InputError, match=r"'features\.0\.weight' has shape \(32, 1, 3, 3\), expected \(64, 1, 3, 3\)"):
        VGGishEmbedder(path).load()


class _NotWeights:
    """Pickles as a reference to this module's class: a weights_only load must refuse it."""


@pytest.mark.parametrize(
    "content",
    [b"not a torch file", "pickled-object", "tensor-not-dict"],
)
def test_vggish_unloadable_files_raise(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "pickled-object":
        torch.save({"features.0.weight": _NotWeights()}, path)
    elif content == "tensor-not-dict":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as info:
        VGGishEmbedder(path).load()
    assert str(path) in str(info.value)


def test_make_embedder_errors(tmp_path):
    with pytest.raises(InputError, match="--vggish-weights"):
        make_embedder("vggish")
    with pytest.raises(InputError, match="not found") as info:
        make_embedder("vggish", vggish_weights=tmp_path / "absent.pth")
    assert "absent.pth" in str(info.value)
    with pytest.raises(InputError, match="unknown embedder 'openl3'"):
        make_embedder("openl3")
    with pytest.raises(InputError, match="only to --embedder vggish"):
        make_embedder("logmel-stats", vggish_weights=tmp_path / "w.pth")
