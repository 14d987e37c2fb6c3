"""`avsprep synth` beyond its default: --style families, JPEG and non-square frames, WAV rate and channels, and
--sounds (recordings split by time). The default set itself is tested in test_synth.py."""
from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from lxml import etree
from scipy.signal import fftconvolve, resample_poly

from avsprep.audio import LogMelStatsEmbedder, load_audio, waveform_to_examples
from avsprep.cli import main
from avsprep.synth import SynthConfig, class_names, class_specs, generate, render_class_audio, sample_scene
from avsprep.synth_recordings import SPLIT_PARTS
from avsprep.synth_styles import SOUND_KINDS

SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def _synth(out: Path, *options: str) -> Path:
    result = CliRunner().invoke(main, ["synth", "--out", str(out), *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _rows(root: Path, table: str = "meta.csv") -> list[dict[str, str]]:
    with open(root / table, newline="") as f:
        return list(csv.DictReader(f))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _wav(root: Path, row: dict[str, str]) -> Path:
    return root / "audio_wav" / row["split"] / row["category"] / f"{row['name']}.wav"


def _content_digest(root: Path) -> str:
    """sha256 over file names, decoded PNG pixels, WAV samples and the bytes of every other file: what the files
    hold, independent of the PNG encoder's version."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        if path.suffix == ".png":
            pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            digest.update(str(pixels.shape).encode() + pixels.tobytes())
        elif path.suffix == ".wav":
            samples, rate = sf.read(path, dtype="int16")
            digest.update(str((samples.shape, rate)).encode() + samples.tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- the default


@pytest.mark.parametrize("options, digest", [
    ({"clips": 4, "size": 48, "yolo": True}, "db69d1de1eb5dc623c06676a56ba8472e2046092f603435cd43232c01027975d"),
    ({"clips": 3, "size": 48, "difficulty": "hard", "frames_per_clip": 2},
     "3020903aa0d4553d3e54d5dd5d030c3bc82513cf8d1a2b73936594971b02f5a4"),
])
def test_default_set_is_what_the_generator_wrote_before_styles(options, digest, tmp_path):
    """Digests of the generator before --style and the format options existed (commit 25c1c4f): every option at its
    default must still write exactly that set, info.json included."""
    generate(SynthConfig(out=tmp_path / "set", **options))
    assert _content_digest(tmp_path / "set") == digest


# ----------------------------------------------------------------------------------------------- styles, formats


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> Path:
    """Style 1, JPEG 96x64 frames, 44.1 kHz stereo WAVs."""
    return _synth(tmp_path_factory.mktemp("styled") / "set", "--clips", "8", "--style", "1", "--image-format", "jpg",
                  "--width", "96", "--height", "64", "--sample-rate", "44100", "--channels", "2",
                  "--frames-per-clip", "2", "--yolo")


@pytest.fixture(scope="module")
def styled_plain(tmp_path_factory) -> Path:
    """The same scenes as `styled` written in the default formats (PNG, 16 kHz mono)."""
    return _synth(tmp_path_factory.mktemp("plain") / "set", "--clips", "8", "--style", "1", "--width", "96",
                  "--height", "64", "--frames-per-clip", "2", "--yolo")


def test_style_classes_are_none_of_the_default_ones():
    default = class_specs(12)
    default_looks = {(s.shape, s.colour_rgb) for s in default}
    for style in (1, 2, 3):
        specs = class_specs(10, style)
        assert [s.name for s in specs] == sorted(s.name for s in specs) and len({s.name for s in specs}) == 10
        assert not {s.name for s in specs} & set(class_names(12))
        assert not {(s.shape, s.colour_rgb) for s in specs} & default_looks
        assert {s.sound for s in specs} == set(SOUND_KINDS)   # all five kinds, none of the default's two
        assert len({s.shape for s in specs}) == 10
        bands = sorted(s.band_hz for s in specs)
        assert all(a[1] < b[0] for a, b in zip(bands, bands[1:])), "bands must not overlap"
    assert class_specs(5, 2) != class_specs(5, 3)
    assert class_specs(5, 2) == class_specs(5, 2)


def test_style_sounds_are_told_apart_by_the_default_embedder():
    """Nearest-centroid accuracy of logmel-stats embeddings of clean one-second class sounds, leave-one-out."""
    embedder = LogMelStatsEmbedder()
    for style in (1, 2):
        features, labels = [], []
        for spec in class_specs(10, style):
            for instance in range(4):
                audio = render_class_audio(spec.index, 1.0, np.random.default_rng([style, instance]), 10, style)
                features.append(embedder.embed(waveform_to_examples(audio))[0])
                labels.append(spec.index)
        features, labels = np.stack(features), np.array(labels)
        correct = 0
        for i in range(len(labels)):
            others = np.arange(len(labels)) != i
            centroids = np.stack([features[others & (labels == c)].mean(axis=0) for c in range(10)])
            correct += int(np.argmin(((centroids - features[i]) ** 2).sum(axis=1)) == labels[i])
        assert correct / len(labels) >= 0.95, (style, correct)


def test_jpeg_non_square_frames_masks_and_labels(styled):
    names = set(class_names(5, 1))
    for row in _rows(styled):
        assert row["category"] in names and row["other_category"] in names
        for k in (1, 2):
            stem = f"{row['name']}_{k}"
            frame = cv2.imread(str(styled / "visual_frames" / row["split"] / row["category"] / row["name"] /
                                   f"{stem}.jpg"), cv2.IMREAD_UNCHANGED)
            assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
            mask = cv2.imread(str(styled / "gt_masks" / row["split"] / row["category"] / row["name"] / f"{stem}.png"),
                              cv2.IMREAD_UNCHANGED)
            assert mask.shape == (64, 96) and set(np.unique(mask)) == {0, 255}
            xml = etree.parse(str(styled / "labels" / row["split"] / row["category"] / row["name"] / f"{stem}.xml"),
                              SAFE_PARSER).getroot()
            assert xml.findtext("filename") == f"{stem}.jpg"
            assert (styled / xml.findtext("path")).is_file()
            assert [xml.find("size").findtext(t) for t in ("width", "height")] == ["96", "64"]
            ys, xs = np.nonzero(mask)
            box = [int(xml.find("object/bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            _, cx, cy, w, h = map(float, (styled / "yolo" / row["split"] / row["category"] / row["name"] /
                                          f"{stem}.txt").read_text().split())
            assert np.allclose([cx, cy, w, h], [(box[0] + box[2]) / 192, (box[1] + box[3]) / 128,
                                                (box[2] - box[0]) / 96, (box[3] - box[1]) / 64], atol=1e-6)
    assert not list(styled.glob("visual_frames/**/*.png"))


def test_formats_change_the_files_not_the_content(styled, styled_plain):
    for row in _rows(styled):
        jpeg = sorted((styled / "visual_frames").rglob(f"{row['name']}_*.jpg"))
        png = sorted((styled_plain / "visual_frames").rglob(f"{row['name']}_*.png"))
        for a, b in zip(jpeg, png, strict=True):
            # The same picture, JPEG-compressed: equal once the pixel noise (which JPEG smooths away) is blurred out.
            smooth = [cv2.GaussianBlur(cv2.imread(str(path)), (5, 5), 0).astype(int) for path in (a, b)]
            assert np.abs(smooth[0] - smooth[1]).mean() < 2.5, a.name
        info = sf.info(str(_wav(styled, row)))
        assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_16")
        stereo, _ = sf.read(_wav(styled, row))
        assert np.array_equal(stereo[:, 0], stereo[:, 1])
        assert len(stereo) == round(2.05 * 44100)
        # The 44.1 kHz sound brought back to 16 kHz is the 16 kHz one.
        back, plain = load_audio(_wav(styled, row)), load_audio(_wav(styled_plain, row))
        assert np.corrcoef(back[100:-100], plain[100:-100])[0, 1] > 0.99


def test_same_seed_same_bytes_also_with_two_workers(styled, tmp_path):
    again = _synth(tmp_path / "again", "--clips", "8", "--style", "1", "--image-format", "jpg", "--width", "96",
                   "--height", "64", "--sample-rate", "44100", "--channels", "2", "--frames-per-clip", "2",
                   "--yolo", "--workers", "2")
    assert _hashes(again) == _hashes(styled)


@pytest.mark.parametrize("options", [{"style": 2}, {"style": 3, "width": 72, "height": 48}])
def test_no_visual_cue_in_styles(options):
    config = SynthConfig(out=Path("unused"), size=48, **options)
    scenes = [sample_scene(np.random.default_rng([11, i]), config) for i in range(400)]
    assert scenes[0].full_masks.shape[2:] == (config.frame_height, config.frame_width)
    assert abs(np.mean([s.sounding[0] == 0 for s in scenes]) - 0.5) < 0.08
    sounding = np.array([s.visible_masks[s.sounding[0]].sum() for s in scenes], dtype=float)
    other = np.array([s.visible_masks[s.other].sum() for s in scenes], dtype=float)
    assert abs(sounding.mean() / other.mean() - 1) < 0.07
    diff = sounding - other
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(len(diff))
    moves = [(np.linalg.norm(np.diff(s.objects[s.sounding[0]].centres[[0, -1]], axis=0)),
              np.linalg.norm(np.diff(s.objects[s.other].centres[[0, -1]], axis=0))) for s in scenes]
    assert abs(np.mean([m[0] for m in moves]) / np.mean([m[1] for m in moves]) - 1) < 0.1


@pytest.mark.parametrize("options", [{"image_format": "gif"}, {"channels": 0}, {"channels": 9},
                                     {"sample_rate": 4000}, {"width": 20}, {"height": 16}, {"style": -1}])
def test_bad_format_options_are_rejected(options, tmp_path):
    with pytest.raises(ValueError):
        generate(SynthConfig(out=tmp_path / "x", **options))
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------- --sounds


def _animal(kind: str, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A few seconds of an animal-like call: barks, meows, trills or croaks at random times over room noise."""
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.003 * rng.standard_normal(len(t))
    start = rng.uniform(0.0, 0.3)
    while start < seconds - 0.5:
        length = {"dog": 0.25, "cat": 0.8, "bird": 0.12, "frog": 0.4}[kind]
        local = t[(t >= start) & (t < start + length)] - start
        envelope = np.sin(np.pi * local / length)
        if kind == "dog":
            call = rng.standard_normal(len(local)) * np.sin(2 * np.pi * 420 * local) * np.exp(-6 * local)
        elif kind == "cat":
            pitch = 550 + 150 * np.sin(np.pi * local / length)
            call = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / rate) / k for k in (1, 2, 3))
        elif kind == "bird":
            call = np.sin(2 * np.pi * (3000 * local + 0.5 * 12000 * local ** 2))
        else:
            call = np.sin(2 * np.pi * 180 * local) * (np.sin(2 * np.pi * 30 * local) > 0)
        index = np.searchsorted(t, start)
        wave[index:index + len(local)] += 0.3 * rng.uniform(0.6, 1.0) * envelope * call
        start += length + rng.uniform(0.05, 0.6)
    return wave


def _write_recordings(root: Path) -> Path:
    """Four classes, two recordings each (8 and 10 s): 16 kHz mono PCM_16, 16 kHz stereo float, 22.05 kHz stereo."""
    formats = {"dog": (16000, 1, "PCM_16"), "cat": (16000, 2, "FLOAT"), "bird": (22050, 2, "PCM_16"),
               "frog": (16000, 1, "PCM_24")}
    for c, (kind, (rate, channels, subtype)) in enumerate(formats.items()):
        (root / kind).mkdir(parents=True)
        for r, seconds in enumerate((8.0, 10.0)):
            wave = _animal(kind, seconds, rate, np.random.default_rng([c, r]))
            data = np.stack([wave, 0.8 * wave], axis=1) if channels == 2 else wave
            sf.write(root / kind / f"take{r}.wav", data, rate, subtype=subtype)
    return root


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("recorded")
    sounds = _write_recordings(base / "sounds")
    out = _synth(base / "set", "--sounds", str(sounds), "--clips", "30", "--size", "48", "--frames-per-clip", "1",
                 "--difficulty", "hard")
    return sounds, out


def _normalised_correlation(clip: np.ndarray, recording: np.ndarray) -> np.ndarray:
    """Pearson-like correlation of `clip` with every window of `recording` of its length."""
    clip = clip - clip.mean()
    products = fftconvolve(recording, clip[::-1], mode="valid")
    cumulative = np.concatenate([[0.0], np.cumsum(recording ** 2)])
    energy = cumulative[len(clip):] - cumulative[:-len(clip)]
    return products / np.sqrt(np.maximum(energy, 1e-12) * (clip ** 2).sum())


def test_sounds_become_the_classes_and_clips_sound_like_them(recorded):
    sounds, out = recorded
    rows, scenes = _rows(out), {r["name"]: r for r in _rows(out, "scenes.csv")}
    assert {r["category"] for r in rows} <= {"bird", "cat", "dog", "frog"}
    assert sorted({r["split"] for r in rows}) == ["test", "train", "val"]
    for row in rows:
        excerpts = scenes[row["name"]]["audio_excerpts"].split(";")
        assert len(excerpts) == 2     # the sounding class, then hard mode's off-screen distractor
        for excerpt, category in zip(excerpts, (row["category"], scenes[row["name"]]["distractor_category"])):
            file, start = excerpt.split("@")
            assert file.split("/")[0] == category
            recording, rate = sf.read(sounds / file)
            length = np.ceil(1.05 * rate)
            part = SPLIT_PARTS[row["split"]]
            assert part[0] * len(recording) <= int(start) and int(start) + length <= part[1] * len(recording) + 1
        clip = sf.read(_wav(out, row))[0]
        file, start = excerpts[0].split("@")
        recording, rate = sf.read(sounds / file, always_2d=True)
        recording = recording.mean(axis=1)
        if rate == 16000:
            # Sample-exact: of all windows of the whole recording, the clip matches the one it names, in its part.
            correlation = _normalised_correlation(clip, recording)
            assert int(np.argmax(correlation)) == int(start), row["name"]
            assert correlation.max() > 0.9
        else:
            excerpt = resample_poly(recording[int(start):int(start) + round(1.05 * rate)], 320, 441)[:len(clip)]
            assert np.corrcoef(excerpt, clip[:len(excerpt)])[0, 1] > 0.9, row["name"]


def test_test_audio_is_never_heard_in_training(recorded):
    """Every train clip's excerpts lie in the first 70 % of their recording, every test clip's in the last 15 %."""
    sounds, out = recorded
    heard: dict[str, list[tuple[int, int]]] = {}
    for row in _rows(out, "scenes.csv"):
        for excerpt in row["audio_excerpts"].split(";"):
            file, start = excerpt.split("@")
            info = sf.info(str(sounds / file))
            span = (int(start), int(start) + int(np.ceil(1.05 * info.samplerate)))
            heard.setdefault(row["split"], []).append(span)
            lo, hi = SPLIT_PARTS[row["split"]]
            assert round(lo * info.frames) <= span[0] and span[1] <= round(hi * info.frames)
    assert heard["train"] and heard["test"]


def test_sounds_set_is_deterministic_and_relocatable(recorded, tmp_path):
    sounds, out = recorded
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in sounds.rglob("*.wav"):
        (moved / path.parent.name).mkdir(exist_ok=True)
        (moved / path.parent.name / path.name).write_bytes(path.read_bytes())
    again = _synth(tmp_path / "again", "--sounds", str(moved), "--clips", "30", "--size", "48",
                   "--frames-per-clip", "1", "--difficulty", "hard", "--workers", "2")
    assert _hashes(again) == _hashes(out)


def _fails(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["synth", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def test_bad_sounds_folders_are_one_line_naming_the_culprit(tmp_path):
    sounds = _write_recordings(tmp_path / "sounds")
    common = ["--clips", "4", "--size", "48", "--frames-per-clip", "1"]

    two = tmp_path / "two"
    for kind in ("dog", "cat"):
        (two / kind).mkdir(parents=True)
        (two / kind / "a.wav").write_bytes((sounds / kind / "take0.wav").read_bytes())
    assert str(two) in _fails(["--out", str(tmp_path / "o1"), "--sounds", str(two), *common])

    (sounds / "owl").mkdir()
    (sounds / "owl" / "notes.txt").write_text("no recordings yet")
    assert str(sounds / "owl") in _fails(["--out", str(tmp_path / "o2"), "--sounds", str(sounds), *common])

    (sounds / "owl" / "hoot.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    assert str(sounds / "owl" / "hoot.wav") in _fails(["--out", str(tmp_path / "o3"), "--sounds", str(sounds), *common])

    sf.write(sounds / "owl" / "hoot.wav", np.zeros(16000 * 5), 16000)   # 5 s: its 15 % parts hold no 1.05 s clip
    message = _fails(["--out", str(tmp_path / "o4"), "--sounds", str(sounds), *common])
    assert str(sounds / "owl" / "hoot.wav") in message and "too short" in message

    shutil.rmtree(sounds / "owl")
    assert "--num-classes" in _fails(["--out", str(tmp_path / "o5"), "--sounds", str(sounds), "--num-classes", "5",
                                      *common])
    assert not any((tmp_path / f"o{k}").exists() for k in range(1, 6))
