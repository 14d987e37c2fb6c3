"""Visualisation commands on real tiny shards and runs: avsprep tsne / preview, avstrain predict --overlays /
--video, avstrain plot / report. Pictures are checked for size and for content (not blank)."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from helpers import make_dataset, synth_shards, tone, write_voc

from avsprep.cli import main as avsprep_main
from avstrain.cli import main as avstrain_main
from avstrain.config import load_config
from avstrain.train import train

T = 2
TINY = ["model.backbone=resnet18", "model.channels=16", "model.image_size=64", "optim.batch_size=4",
        "train.workers=0", "eval.batch_size=4", "optim.epochs=1", "train.amp=fp32"]


def picture(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    return image


def assert_not_blank(image: np.ndarray, min_std: float = 10.0) -> None:
    assert float(image.std()) > min_std, f"picture looks blank (pixel std {image.std():.1f})"


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and "error:" in lines[-1].lower() and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synth_shards(tmp_path_factory.mktemp("vis"), frames_per_clip=T, clips=24, clips_per_shard=8)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs: one with a separate crop encoder (one epoch, validated), one without (one step)."""
    root = tmp_path_factory.mktemp("runs")
    train(load_config(None, TINY + ["model.crop_mode=separate", "loss.crop_cls=0.5"]), shards, root / "crops")
    train(load_config(None, TINY + ["train.max_steps=1"]), shards, root / "plain")
    return {"crops": root / "crops", "plain": root / "plain"}


# ----------------------------------------------------------------------------------------------------------------
# avsprep tsne


def test_tsne_two_checkpoints_side_by_side_with_silhouette(shards, runs, tmp_path):
    out = tmp_path / "tsne.png"
    result = CliRunner().invoke(avsprep_main, ["tsne", "--shards", str(shards), "--split", "train",
                                               "--checkpoint", str(runs["crops"] / "best.pt"),
                                               "--checkpoint", str(runs["plain"] / "best.pt"), "--out", str(out),
                                               "--iterations", "250"])
    assert result.exit_code == 0, result.output
    assert "crop encoder (separate)" in result.output
    assert "segmentation backbone" in result.output  # the run without a crop encoder
    scores = [float(s) for s in re.findall(r"silhouette of the classes: t-SNE (-?\d\.\d+)", result.output)]
    assert len(scores) == 2 and all(-1 <= s <= 1 for s in scores)
    assert re.search(r"embedding \d+\.\d s, PCA \+ t-SNE \d+\.\d s", result.output)
    image = picture(out)
    height, width = image.shape[:2]
    assert height >= 400 and width > 1.8 * height  # two panels and a legend
    assert_not_blank(image)


def test_tsne_subsamples_and_library_result(shards, runs, tmp_path):
    from avsprep.tsne import TSNESettings, run_tsne

    result = run_tsne([runs["crops"] / "best.pt"], shards, tmp_path / "t.png",
                      TSNESettings(split="train", max_points=12, iterations=250))
    assert len(result.sample.labels) == 12 and result.sample.available > 12
    assert result.sample.crops.shape == (12, 32, 32, 3)
    panel = result.panels[0]
    assert panel.points.shape == (12, 2) and np.isfinite(panel.points).all()
    assert panel.embed_seconds > 0 and panel.tsne_seconds > 0
    # Same seed, same crops: the sample is deterministic.
    again = run_tsne([runs["crops"] / "best.pt"], shards, tmp_path / "u.png",
                     TSNESettings(split="train", max_points=12, iterations=250))
    assert np.array_equal(again.sample.crops, result.sample.crops)


def test_tsne_bad_input(shards, runs, tmp_path):
    runner = CliRunner()
    base = ["tsne", "--shards", str(shards), "--out", str(tmp_path / "x.png")]
    one_line_error(runner.invoke(avsprep_main, base + ["--checkpoint", str(runs["crops"] / "best.pt"),
                                                       "--split", "nosuch"]), "needs at least")
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    one_line_error(runner.invoke(avsprep_main, base + ["--checkpoint", str(bogus), "--split", "train"]),
                   "bogus.pt")
    assert not (tmp_path / "x.png").exists()


def test_avsprep_does_not_import_torch_at_start():
    code = "import sys, avsprep.cli, avsprep.tsne, avsprep.preview; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------------------------------------------------
# avsprep preview


def test_preview_contact_sheets(tmp_path):
    dirs = make_dataset(tmp_path / "d", clips=4, frames_per_clip=3)
    # A box sticking out of the 80x60 frame (drawn clipped), a frame without annotation, a malformed clip.
    write_voc(dirs["labels"] / "clip000_2.xml", "clip000_2.png", 80, 60, [("cat", 50, 40, 95, 70), ("dog", 1, 1, 20, 20)])
    (dirs["labels"] / "clip001_3.xml").unlink()
    (dirs["labels"] / "clip002_1.xml").write_text("<annotation><filename>clip002_1.png</filename>")
    out = tmp_path / "previews"
    result = CliRunner().invoke(avsprep_main, ["preview", "--voc", str(dirs["labels"]), "--images",
                                               str(dirs["frames"]), "--out", str(out), "--frames-per-clip", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["clip000.png", "clip001.png", "clip003.png"]
    assert "1 frames without annotation" in result.output
    assert "clip002" in result.output and "malformed XML" in result.output
    sheet = picture(out / "clip000.png")
    assert sheet.shape[0] >= 180 and sheet.shape[1] > 3 * 180  # three frames side by side at height 180
    assert_not_blank(sheet)
    # The 'cat' box (first class: the first palette colour, BGR on disk) and 'dog' (the second) are drawn.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(sheet.astype(int) - rgb[::-1]).sum(axis=2) < 10).sum() > 50


def test_preview_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(avsprep_main, ["preview", "--voc", str(tmp_path / "empty"),
                                               "--out", str(tmp_path / "p")])
    one_line_error(result, "no annotated clips")


# ----------------------------------------------------------------------------------------------------------------
# avstrain predict --overlays / --video


def test_predict_overlays_with_swapped_and_silent_audio(shards, runs, tmp_path):
    out = tmp_path / "pred"
    result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(runs["crops"] / "best.pt"),
                                                "--shards", str(shards), "--out", str(out), "--overlays", "2"])
    assert result.exit_code == 0, result.output
    assert "own, swap, silence" in result.output
    grids = sorted((out / "overlays").glob("*.png"))
    assert len(grids) == 2
    for grid in grids:
        image = picture(grid)
        # 8 rows (frame, truth, 3 x prediction + heat map) of T = 2 columns: a tall picture.
        assert image.shape[0] > 2 * image.shape[1] and image.shape[0] >= 800
        assert_not_blank(image)
    assert list(out.rglob("*_1.png"))  # the masks are still written


def test_heat_map_is_the_finest_tpavi_score_and_depends_on_audio(shards, runs):
    import torch
    import torch.nn.functional as F

    from avstrain.data import ShardDataset
    from avstrain.checkpoint import load_checkpoint, model_from_checkpoint
    from avstrain.visualise import predict_with_heat

    model, _ = model_from_checkpoint(load_checkpoint(runs["crops"] / "best.pt"))
    model.eval()
    clip = next(iter(ShardDataset(shards, "test", shuffle=False)))
    frames = clip["frames"][None].expand(2, -1, -1, -1, -1)
    audio = torch.stack([clip["audio"], torch.zeros_like(clip["audio"])])
    prediction = predict_with_heat(model, frames, audio)
    assert prediction.probabilities.shape == prediction.heat.shape == (2, T, 64, 64)
    with torch.no_grad():
        scores = model(frames.permute(0, 1, 4, 2, 3), audio).av_scores[0]  # stage 0: [2,T,16,16]
    expected = F.interpolate(scores.flatten(0, 1)[:, None], size=(64, 64), mode="bilinear")[:, 0].view(2, T, 64, 64)
    assert torch.allclose(prediction.heat, expected, atol=1e-5)
    assert not torch.allclose(prediction.heat[0], prediction.heat[1])


def write_video(path: Path, seconds: float, fps: int = 10, size: tuple[int, int] = (96, 72)) -> None:
    """A real mp4 (OpenCV mp4v): frame i is filled with grey level 4·i, so a sampled frame tells its index."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(int(seconds * fps)):
        image = np.full((size[1], size[0], 3), 4 * i, np.uint8)
        cv2.circle(image, (20 + i, size[1] // 2), 10, (0, 0, 255), -1)
        writer.write(image)
    writer.release()


def test_predict_video_one_frame_per_second(runs, tmp_path):
    from avstrain.visualise import sample_video_frames

    video, audio = tmp_path / "clip.mp4", tmp_path / "clip.wav"
    write_video(video, 3.2)
    soundfile.write(audio, tone(440, 3.3), 16000)
    frames, fps = sample_video_frames(video)
    assert fps == 10 and len(frames) == 3
    # Frames 5, 15, 25 (the middle of each second): grey levels 20, 60, 100 in a corner away from the circle.
    assert [round(float(f[:8, -8:].mean()) / 4) for f in frames] == pytest.approx([5, 15, 25], abs=1)

    out = tmp_path / "out"
    result = CliRunner().invoke(avstrain_main, ["predict", "--checkpoint", str(runs["crops"] / "best.pt"),
                                                "--video", str(video), "--audio", str(audio), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 frames at 1 per second" in result.output and "logmel-stats" in result.output
    masks = [picture(out / f"clip_{k}.png") for k in (1, 2, 3)]
    assert all(m.shape[:2] == (72, 96) and set(np.unique(m)) <= {0, 255} for m in masks)
    grids = sorted(out.glob("clip_overlay_*.png"))
    assert len(grids) == 2  # T = 2 seconds per window (the training shards'): seconds 1-2 and 3
    assert_not_blank(picture(grids[0]))


def test_predict_video_bad_input(runs, tmp_path):
    video, audio = tmp_path / "clip.mp4", tmp_path / "clip.wav"
    write_video(video, 2.0)
    soundfile.write(audio, tone(440, 2.1), 16000)
    runner = CliRunner()
    base = ["predict", "--checkpoint", str(runs["crops"] / "best.pt"), "--out", str(tmp_path / "o")]
    one_line_error(runner.invoke(avstrain_main, base + ["--video", str(video)]), "clip.mp4: no audio track")
    one_line_error(runner.invoke(avstrain_main, base + ["--video", str(audio), "--audio", str(audio)]),
                   "clip.wav: no video stream")
    one_line_error(runner.invoke(avstrain_main, base + ["--video", str(video), "--audio", str(audio),
                                                        "--vggish-weights", str(audio)]), "logmel-stats")
    one_line_error(runner.invoke(avstrain_main, base), "exactly one of --shards")


# ----------------------------------------------------------------------------------------------------------------
# avstrain plot / report


def test_plot_curves(runs, tmp_path):
    result = CliRunner().invoke(avstrain_main, ["plot", str(runs["crops"]), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    image = picture(tmp_path / "c.png")
    assert image.shape[1] >= 1200 and image.shape[0] >= 350
    assert_not_blank(image, 5.0)


def test_plot_bad_input(runs, tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    one_line_error(runner.invoke(avstrain_main, ["plot", str(tmp_path / "empty")]), "steps.jsonl")
    broken = tmp_path / "broken"
    shutil.copytree(runs["plain"], broken)
    with (broken / "steps.jsonl").open("a") as handle:
        handle.write("{not json\n")
    one_line_error(runner.invoke(avstrain_main, ["plot", str(broken)]), "line 2")


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_report_is_self_contained_and_every_image_loads(shards, runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["crops"], run)
    runner = CliRunner()
    for args in (["predict", "--checkpoint", str(run / "best.pt"), "--shards", str(shards),
                  "--out", str(run / "predictions"), "--overlays", "1"],
                 ["eval", "--checkpoint", str(run / "best.pt"), "--shards", str(shards), "--suite", "reliance"]):
        result = runner.invoke(avstrain_main, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(avsprep_main, ["tsne", "--shards", str(shards), "--split", "train", "--checkpoint",
                                          str(run / "best.pt"), "--out", str(run / "tsne.png"), "--iterations", "250"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(avstrain_main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text(encoding="utf-8")
    for heading in ("Evaluation", "Training curves", "t-SNE", "Predictions", "Validation per epoch", "Config"):
        assert f"<h2>{heading}" in page
    assert "swap" in page and "miou_other" in page  # the reliance table

    parser = _Images()
    parser.feed(page)
    assert len(parser.sources) == 3  # curves, t-SNE, one overlay grid
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,"), source[:60]  # self-contained: no links
        image = cv2.imdecode(np.frombuffer(base64.b64decode(source.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] > 100
        assert_not_blank(image, 5.0)

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:  # Debian's chromium: let the page's own script count the images that decoded
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                              "--dump-dom", (run / "report.html").as_uri()],
                             check=False, capture_output=True, text=True, timeout=120).stdout
        loaded = re.search(r'data-images-loaded="(\d+)"', dom)
        assert loaded and int(loaded.group(1)) == len(parser.sources), dom[:500]


def test_report_bad_input(tmp_path):
    one_line_error(CliRunner().invoke(avstrain_main, ["report", str(tmp_path / "nothing")]), "")
