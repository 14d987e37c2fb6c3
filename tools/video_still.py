"""One still of `avstrain predict --video ... --out-video` on a synthetic test clip, for the README.

What it is for: the README shows the mask overlay grids of the `make train` model, not what `--out-video` writes.
This tool makes that picture from the real run. Given the checkpoint (`runs/synth-cpu/best.pt`), the shards it was
trained on (their test split names the clips the model never trained on) and the synthetic data the shards were made
from (the frames at their full size and the WAVs, which the shards do not keep), it

1. encodes one test clip as an mp4 with `avsprep.video.VideoWriter`: second k shows frame k for 25 frames, and the
   clip's WAV is the sound track (AAC), as `tests/test_video_predict.py` builds its video;
2. runs `avstrain predict --checkpoint C --video clip.mp4 --out DIR --out-video segmented.mp4` on it, in a
   subprocess: the command users run, not a copy of its code path;
3. saves the frame of `segmented.mp4` shown at `--time` seconds (default: the middle of the clip's middle second)
   as a JPEG.

    .venv/bin/python tools/video_still.py --checkpoint runs/synth-cpu/best.pt --shards data/synth-shards-64 \\
        --data data/synth --out docs/make-train-video-still.jpg [--clip NAME] [--time SECONDS] [--keep DIR]

Without `--clip`, the clip is the first of the shards' test split (split order), so the choice is not a pick of the
best-looking result. `--keep DIR` keeps the mp4, the predictions and the output video there (default: a temporary
folder, removed). Exit code 2 with one line on bad input.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import soundfile

from avsprep.crops import read_image
from avsprep.errors import InputError
from avsprep.video import VideoWriter, iter_frames
from avstrain.data import ShardDataset
from avstrain.eval_data import read_split_table

FRAME_RATE = 25


def first_test_clip(shards: Path) -> str:
    """The name of the first clip of the shards' test split (split order)."""
    names = read_split_table(ShardDataset(shards, "test", shuffle=False)).names
    if not names:
        raise InputError(shards, "the test split has no clip")
    return names[0]


def clip_sources(data: Path, name: str) -> tuple[list[Path], Path]:
    """The clip's frames `<name>_<k>.png` (k = 1..T, in order) under data/visual_frames and its WAV under
    data/audio_wav, found by name whatever their split and class folders (the `avsprep synth` layout)."""
    frames: dict[int, Path] = {}
    for path in (data / "visual_frames").rglob(f"{name}_*"):
        k = path.stem.rpartition("_")[2]
        if path.parent.name == name and k.isdigit():
            frames[int(k)] = path
    if not frames or sorted(frames) != list(range(1, len(frames) + 1)):
        raise InputError(data / "visual_frames", f"no frames {name}_1..{name}_T of clip {name}")
    wavs = sorted((data / "audio_wav").rglob(f"{name}.wav"))
    if len(wavs) != 1:
        raise InputError(data / "audio_wav", f"{len(wavs)} files {name}.wav, expected one")
    return [frames[k] for k in sorted(frames)], wavs[0]


def encode_clip(frames: list[Path], wav: Path, out: Path) -> Path:
    """An mp4 of the clip: frame k [H,W,3] for the whole of second k at 25 fps, the WAV's first T seconds as AAC."""
    samples, rate = soundfile.read(wav, dtype="float32", always_2d=True)  # [n, C]
    pictures = [read_image(path) for path in frames]
    height, width = pictures[0].shape[:2]
    with VideoWriter(out, FRAME_RATE, width, height, audio_rate=rate, audio_channels=samples.shape[1],
                     crf=10) as writer:
        writer.write_audio(np.ascontiguousarray(samples[:len(frames) * rate].T))
        for picture in pictures:
            if picture.shape[:2] != (height, width):
                raise InputError(frames[0].parent, "the clip's frames differ in size")
            for _ in range(FRAME_RATE):
                writer.write_frame(picture)
    return out


def predict_video(checkpoint: Path, video: Path, work: Path) -> Path:
    """`avstrain predict --video --out-video` in a subprocess; the output video's path."""
    out_video = work / "segmented.mp4"
    command = [sys.executable, "-m", "avstrain", "predict", "--checkpoint", str(checkpoint), "--video", str(video),
               "--out", str(work / "predict"), "--out-video", str(out_video)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise InputError(checkpoint, f"avstrain predict failed (exit {result.returncode}): {lines[-1]}")
    print(result.stdout.strip())
    return out_video


def save_frame(video: Path, time: Fraction, out: Path) -> Fraction:
    """Write the frame of `video` shown at `time` (the last one starting at or before it) as a JPEG; its time."""
    chosen = None
    for start, frame in iter_frames(video):
        if start > time and chosen is not None:
            break
        chosen = (start, frame)
    if chosen is None:
        raise InputError(video, "no frame")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(chosen[1], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise InputError(out, "cannot write the JPEG")
    return chosen[0]


def make_still(args: argparse.Namespace, work: Path) -> None:
    name = args.clip or first_test_clip(args.shards)
    frames, wav = clip_sources(args.data, name)
    video = encode_clip(frames, wav, work / f"{name}.mp4")
    segmented = predict_video(args.checkpoint, video, work)
    # Second k is shown over [k, k + 1): by default the middle of the middle second, away from any change of frame.
    time = Fraction(len(frames) // 2) + Fraction(1, 2) if args.time is None else Fraction(args.time)
    shown = save_frame(segmented, time, args.out)
    print(f"wrote {args.out}: clip {name} ({len(frames)} s), the output video's frame shown at {float(shown):.2f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="e.g. runs/synth-cpu/best.pt")
    parser.add_argument("--shards", type=Path, required=True, help="the shards it was trained on (test split)")
    parser.add_argument("--data", type=Path, default=Path("data/synth"),
                        help="the avsprep synth folder the shards were made from (visual_frames/, audio_wav/)")
    parser.add_argument("--out", type=Path, required=True, help="the JPEG, e.g. docs/make-train-video-still.jpg")
    parser.add_argument("--clip", help="a test clip's name (default: the first of the test split)")
    parser.add_argument("--time", type=float, help="seconds into the clip (default: middle of its middle second)")
    parser.add_argument("--keep", type=Path, help="keep the mp4, predictions and output video in this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            make_still(args, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="video-still-") as work:
                make_still(args, Path(work))
    except InputError as error:
        print(f"video_still: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
