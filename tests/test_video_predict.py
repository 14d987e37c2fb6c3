"""`avstrain predict --video` with the video's own sound and `--out-video`, on a model trained here for a few epochs.

A synthetic clip's PNG frames and WAV are encoded into an mp4 (second k shows frame k, the WAV as AAC): the masks
predicted from the mp4 must match those predicted from the PNGs and the WAV, and the output video must keep the
source's duration and sound. The clip's frames are larger than the model's input (128 px against 64), as a
video's are: H.264 codes colour at half resolution, which the resize to the model's input then averages away.
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
