"""`avstrain predict --video` with the video's own sound and `--out-video`, on a model trained here for a few epochs.

A synthetic clip's PNG frames and WAV are encoded into an mp4 (second k shows frame k, the WAV as AAC): the masks
predicted from the mp4 must match those predicted from the PNGs and the WAV, and the output video must keep the
source's duration and sound. The clip's frames are larger than the model's input (128 px against 64), as a
video's are: H.264 codes colour at half resolution, which the resize to the model's input then averages away.

A localiser (senocak, avolnet, 2 training steps) draws its heat map over the video instead, and AVE-Net, which draws
neither, is a one-line error; `tools/video_still.py` saves one frame of such a video.
"""
from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner

from avsprep.audio import clip_examples, make_embedder
from avsprep.cli import main as avsprep_main
from avsprep.crops import read_image, resize
from avsprep.video import VideoWriter, decode_audio, iter_frames, read_audio
from avstrain.cli import main as avstrain_main
from avstrain.config import load_config
from avstrain.runtime import load_for_inference
from avstrain.train import train
from avstrain.visualise import predict_with_heat

T, VIDEO_SIZE, SIZE, FPS = 3, 128, 64, 25
CONFIG = ["model.backbone=resnet18", "model.channels=16", f"model.image_size={SIZE}", "optim.batch_size=4",
          "train.workers=0", "eval.batch_size=8", "optim.epochs=5", "train.amp=fp32", "optim.lr=0.003"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic clips, their shards, and a model trained on them for a few epochs (about 20 s of CPU)."""
    root = tmp_path_factory.mktemp("videopredict")
    raw, shards = root / "raw", root / "shards"
    runner = CliRunner()
    result = runner.invoke(avsprep_main, ["synth", "--out", str(raw), "--clips", "32", "--num-classes", "3",
                                          "--size", str(VIDEO_SIZE), "--frames-per-clip", str(T)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(avsprep_main, [
        "crops", "--voc", str(raw / "labels"), "--images", str(raw / "visual_frames"), "--masks", str(raw / "gt_masks"),
        "--audio", str(raw / "audio_wav"), "--meta", str(raw / "meta.csv"), "--out", str(shards), "--size", str(SIZE),
        "--crop-size", "32", "--frames-per-clip", str(T), "--clips-per-shard", "16"])
    assert result.exit_code == 0, result.output
    train(load_config(None, CONFIG), shards, root / "run")
    return raw, root / "run" / "best.pt"


@pytest.fixture(scope="module")
def clip(trained, tmp_path_factory):
    """The test clip on which the model finds the most (a mask of a few pixels would make the IoU a count of
    boundary pixels) as PNGs + WAV, and the same clip as an mp4 (H.264 + AAC): (frames, wav, mp4)."""
    raw, checkpoint = trained
    with (raw / "meta.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    inputs = []
    for row in rows:
        name, category = row["name"], row["category"]
        inputs.append(([raw / "visual_frames" / "test" / category / name / f"{name}_{k}.png" for k in range(1, T + 1)],
                       raw / "audio_wav" / "test" / category / f"{name}.wav"))
    frames, wav = max(inputs, key=lambda i: _png_and_wav_masks(checkpoint, *i).sum())
    samples, rate = soundfile.read(wav, dtype="float32")
    mp4 = tmp_path_factory.mktemp("clip") / f"{wav.stem}.mp4"
    with VideoWriter(mp4, FPS, VIDEO_SIZE, VIDEO_SIZE, audio_rate=rate, audio_channels=1, crf=10) as writer:
        writer.write_audio(samples[None, :T * rate])
        for k in range(T):
            for _ in range(FPS):
                writer.write_frame(read_image(frames[k]))
    return frames, wav, mp4


def _png_and_wav_masks(checkpoint: Path, frames: list[Path], wav: Path) -> np.ndarray:
    """[T,S,S] bool: the model on the clip's own PNG frames and WAV, as the shards feed it."""
    model, _, runtime = load_for_inference(checkpoint, device="cpu")
    pictures = torch.from_numpy(np.stack([resize(read_image(f), SIZE) for f in frames]))[None]
    audio = torch.from_numpy(make_embedder("logmel-stats").embed(clip_examples(wav, T)[0])).float()[None]
    return predict_with_heat(model, pictures, audio, "cpu", runtime.amp_dtype).probabilities[0].numpy() > 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_predict_video_reads_its_own_sound_and_writes_a_video(trained, clip, tmp_path):
    _, checkpoint = trained
    frames, wav, mp4 = clip
    out, out_video = tmp_path / "masks", tmp_path / "segmented.mp4"
    result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(checkpoint), "--video", str(mp4),
                                                "--out", str(out), "--out-video", str(out_video)])
    assert result.exit_code == 0, result.output
    assert f"{T} frames at 1 per second" in result.output and "audio from the video" in result.output

    # Masks are written at the video's size, nearest-neighbour from the model's: compare at the model's.
    from_video = np.stack([read_image(out / f"{mp4.stem}_{k}.png")[::2, ::2, 0] > 127 for k in range(1, T + 1)])
    reference = _png_and_wav_masks(checkpoint, frames, wav)
    assert reference.mean() > 0.02, "the trained model should segment something"
    assert _iou(from_video, reference) >= 0.95

    # The output video: every source frame (within one frame of the source's duration), the mask drawn in red
    # where it was predicted, and the source's sound after the codec's delay.
    source_times = [t for t, _ in iter_frames(mp4)]
    written = list(iter_frames(out_video))
    assert abs(len(written) - len(source_times)) <= 1 and written[1][0] == Fraction(1, FPS)
    first_mask = cv2.resize(reference[0].astype(np.uint8), (VIDEO_SIZE, VIDEO_SIZE), interpolation=cv2.INTER_NEAREST) > 0
    picture = written[FPS // 2][1].astype(int)
    redness = picture[..., 0] - picture[..., 1]
    assert redness[first_mask].mean() > redness[~first_mask].mean() + 40
    source_audio, source_rate = decode_audio(mp4)
    output_audio, output_rate = decode_audio(out_video)
    assert output_rate == source_rate and output_audio.shape[0] == 1
    assert _delayed_correlation(source_audio[0], output_audio[0]) >= 0.99


def _delayed_correlation(source: np.ndarray, output: np.ndarray, max_lag: int = 4096) -> float:
    """The correlation of the two signals at the lag (within ±max_lag samples) where it is highest."""
    body = source[max_lag:-max_lag]
    best = -1.0
    for lag in range(-max_lag, max_lag + 1, 1):
        segment = output[max_lag + lag:max_lag + lag + body.size]
        if segment.size == body.size:
            best = max(best, float(np.dot(body, segment) / (np.linalg.norm(body) * np.linalg.norm(segment) + 1e-12)))
    return best


def test_audio_option_overrides_the_video_sound(trained, clip, tmp_path):
    _, checkpoint = trained
    _, wav, mp4 = clip
    silent = tmp_path / "silence.wav"
    soundfile.write(silent, np.zeros(T * 16000, np.float32), 16000)
    out = tmp_path / "o"
    result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(checkpoint), "--video", str(mp4),
                                                "--audio", str(silent), "--out", str(out),
                                                "--out-video", str(tmp_path / "v.mkv")])
    assert result.exit_code == 0, result.output
    assert f"audio from {silent}" in result.output
    assert np.abs(read_audio(tmp_path / "v.mkv")).max() < 1e-3  # the given (silent) sound was muxed in


# ----------------------------------------------------------------------------------------------------------------
# Localisers: the heat map over the video (senocak, avolnet), and AVE-Net, which draws nothing

LOCALISER_SIZE = 64
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def localiser_clip(tmp_path_factory):
    """Shards of 24 clips (T = 2, 64 px) and one test clip's PNG frames and WAV as an mp4 (H.264 + AAC)."""
    from helpers import synth_shards

    root = tmp_path_factory.mktemp("localiservideo")
    shards = synth_shards(root, frames_per_clip=2, clips=24, size=LOCALISER_SIZE)
    raw = root / "raw"
    with (raw / "meta.csv").open(newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["split"] == "test")
    name, category = row["name"], row["category"]
    samples, rate = soundfile.read(raw / "audio_wav" / "test" / category / f"{name}.wav", dtype="float32")
    mp4 = root / f"{name}.mp4"
    with VideoWriter(mp4, FPS, LOCALISER_SIZE, LOCALISER_SIZE, audio_rate=rate, audio_channels=1, crf=10) as writer:
        writer.write_audio(samples[None, :2 * rate])
        for k in (1, 2):
            frame = read_image(raw / "visual_frames" / "test" / category / name / f"{name}_{k}.png")
            for _ in range(FPS):
                writer.write_frame(frame)
    return shards, mp4


def _two_steps(kind: str, shards: Path, runs: Path) -> Path:
    """best.pt of 2 training steps of configs/synth-<kind>.toml through the CLI (a few seconds)."""
    result = CliRunner().invoke(avstrain_main, [
        "train", "--config", str(CONFIGS / f"synth-{kind}.toml"), "--shards", str(shards), "--name", kind,
        "--runs", str(runs), "--set", "train.max_steps=2", "--set", "optim.batch_size=4", "--set", "train.workers=0",
        "--set", "train.amp=fp32"])
    assert result.exit_code == 0, result.output
    return runs / kind / "best.pt"


@pytest.mark.parametrize("kind", ["senocak", "avolnet"])
def test_a_localisers_video_shows_its_heat_map_and_keeps_the_sound(localiser_clip, tmp_path, kind):
    shards, mp4 = localiser_clip
    checkpoint = _two_steps(kind, shards, tmp_path / "runs")
    out, out_video = tmp_path / "heat", tmp_path / "heat.mp4"
    result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(checkpoint), "--video", str(mp4),
                                                "--out", str(out), "--out-video", str(out_video)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 heat maps" in result.output and "heat map overlaid" in result.output

    # The heat maps `--out` wrote (0..255 per second, at the video's size) say where the map is hot and cold; the
    # video blends inferno over the frame there: near white where hot, near black where cold.
    source, written = dict(iter_frames(mp4)), dict(iter_frames(out_video))
    assert abs(len(written) - len(source)) <= 1
    for second in (0, 1):
        heat = cv2.imread(str(out / f"{mp4.stem}_{second + 1}.png"), cv2.IMREAD_GRAYSCALE)
        hot, cold = heat >= 200, heat <= 55
        assert hot.any() and cold.any()
        time = Fraction(second * FPS + FPS // 2, FPS)
        before, after = source[time].astype(float).mean(-1), written[time].astype(float).mean(-1)
        assert np.abs(after - before)[hot].mean() > 30  # the frame changed where the map is hot
        assert (after - before)[hot].mean() > (after - before)[cold].mean() + 60
    source_audio, source_rate = decode_audio(mp4)
    output_audio, output_rate = decode_audio(out_video)
    assert output_rate == source_rate and output_audio.shape[0] == 1
    assert _delayed_correlation(source_audio[0], output_audio[0]) >= 0.99


def test_avenet_has_nothing_to_draw_over_a_video(localiser_clip, tmp_path):
    shards, mp4 = localiser_clip
    checkpoint = _two_steps("avenet", shards, tmp_path / "runs")
    out = tmp_path / "nothing"
    result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(checkpoint), "--video", str(mp4),
                                                "--out", str(out), "--out-video", str(tmp_path / "v.mp4")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("avstrain: error: model.kind = 'avenet' draws neither masks")
    assert not out.exists() and not (tmp_path / "v.mp4").exists()  # refused before the video was read
    result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(checkpoint), "--shards", str(shards),
                                                "--out", str(out)])
    assert result.exit_code == 2 and "draws neither masks" in result.output and "Traceback" not in result.output


def test_video_still_tool_saves_a_frame_of_the_output_video(trained, tmp_path):
    """tools/video_still.py on the model trained above: the JPEG is the output video's frame at 1.5 s (T = 3)."""
    import importlib.util

    raw, checkpoint = trained
    path = Path(__file__).resolve().parents[1] / "tools" / "video_still.py"
    spec = importlib.util.spec_from_file_location("video_still", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    still, work = tmp_path / "still.jpg", tmp_path / "work"
    assert tool.main(["--checkpoint", str(checkpoint), "--shards", str(raw.parent / "shards"), "--data", str(raw),
                      "--out", str(still), "--keep", str(work)]) == 0
    picture = cv2.cvtColor(cv2.imread(str(still)), cv2.COLOR_BGR2RGB).astype(float)
    shown = dict(iter_frames(work / "segmented.mp4"))[Fraction(37, FPS)]  # shown over [1.48, 1.52)
    assert picture.shape == shown.shape == (VIDEO_SIZE, VIDEO_SIZE, 3)
    assert np.abs(picture - shown).mean() < 4  # JPEG at quality 92
    assert tool.main(["--checkpoint", str(checkpoint), "--shards", str(raw.parent / "shards"), "--data", str(raw),
                      "--out", str(still), "--clip", "no_such_clip"]) == 2
