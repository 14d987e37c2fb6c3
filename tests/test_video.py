"""Videos in and out (avsprep.video) and `avsprep frames` (avsprep.frames) on real files encoded with PyAV.

Every frame carries its index as a block pattern and every second of audio its own pitch (tests/videos.py), so a
wrong frame, a wrong second, an ignored rotation or a shifted audio track all read back as wrong numbers.
"""
import csv
import os
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile

from avsprep import video as video_io
from avsprep.errors import InputError
from avsprep.frames import FramesConfig, extract_clips
from videos import counter_image, dominant_pitch, encode_video, expected_frame, pitch, read_counter

NTSC = Fraction(30000, 1001)


def _variable_times(seconds: float, seed: int = 0) -> list[Fraction]:
    """Frame times 20..89 ms apart (whole milliseconds, so that Matroska's 1 ms time base keeps them exactly)."""
    rng = np.random.default_rng(seed)
    times = [Fraction(0)]
    while times[-1] + Fraction(90, 1000) < seconds:
        times.append(times[-1] + Fraction(int(rng.integers(20, 90)), 1000))
    return times


# name -> (encode_video arguments, expected clips of 5 s, whole seconds left over)
VIDEOS = {
    "cam/street.mp4": (dict(seconds=12, fps=25), 2, 2),  # H.264 + AAC stereo 44.1 kHz
    "ntsc.mkv": (dict(seconds=7, fps=NTSC, codec="mpeg4", audio_rate=48000, channels=1), 1, 2),
    "portrait.mov": (dict(seconds=10, fps=25, rotation=90), 2, 0),  # stored sideways, a display matrix turns it
    "vfr.mkv": (dict(seconds=8, fps=25, frame_times=_variable_times(8)), 1, 3),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """The four videos under one folder, and each one's frame times."""
    root = tmp_path_factory.mktemp("videos")
    times = {}
    for name, (arguments, _, _) in VIDEOS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        times[name] = encode_video(root / name, **arguments)
    return root, times


@pytest.fixture(scope="module")
def extracted(videos, tmp_path_factory):
    """`extract_clips` of the four videos with two worker processes."""
    root, _ = videos
    out = tmp_path_factory.mktemp("frames")
    config = FramesConfig(videos=root, out=out, val_fraction=0.25, test_fraction=0.25, seed=3, workers=2)
    return config, extract_clips(config)


def _meta(out: Path) -> list[dict]:
    with (out / "meta.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _read_png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------------------------
# avsprep.video


@pytest.mark.parametrize("name", VIDEOS)
def test_frame_shown_at_the_middle_of_each_second(videos, name):
    root, times = videos
    seconds = VIDEOS[name][0]["seconds"]
    got = [read_counter(image) for image in video_io.frames_each_second(root / name)]
    assert got == [expected_frame(times[name], Fraction(2 * s + 1, 2)) for s in range(seconds)]


def test_ntsc_rate_picks_the_frame_before_the_half_second(videos):
    # At 29.97 fps frame 15 starts at 0.5005 s, 0.5 ms after the middle of second 0: the frame shown is 14.
    root, _ = videos
    assert read_counter(next(video_io.frames_each_second(root / "ntsc.mkv"))) == 14


def test_rotation_metadata_is_honoured(videos):
    root, _ = videos
    info = video_io.probe(root / "portrait.mov")
    assert (info.rotation, info.width, info.height) == (90, 80, 48)  # stored 48 x 80
    first = next(video_io.frames_each_second(root / "portrait.mov"))
    assert first.shape == (48, 80, 3)
    assert read_counter(np.rot90(first, -1)) != 12  # read as stored, the pattern says something else


def test_probe(videos):
    root, _ = videos
    info = video_io.probe(root / "ntsc.mkv")
    assert (info.width, info.height, info.rotation, info.frame_rate) == (80, 48, 0, NTSC)
    assert (info.audio_rate, info.audio_channels) == (48000, 1)
    assert info.duration == pytest.approx(7, abs=0.05)


@pytest.mark.parametrize("name", ["cam/street.mp4", "ntsc.mkv"])
def test_audio_is_16k_mono_aligned_with_the_video(videos, name):
    root, _ = videos
    audio = video_io.read_audio(root / name)
    seconds = VIDEOS[name][0]["seconds"]
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size / 16000 - seconds) < 0.05  # AAC pads its last packet a little
    # The middle 0.75 s of each second: AAC's pre-echo at a pitch change stays out of the window.
    for s in range(seconds):
        window = audio[s * 16000 + 2000:(s + 1) * 16000 - 2000]
        assert dominant_pitch(window, 16000) == pytest.approx(pitch(s), abs=3)
        assert np.sqrt(np.mean(window**2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.05)  # the mean of equal channels


def test_writer_round_trip(tmp_path):
    rate, samples = 44100, np.sin(2 * np.pi * 440 * np.arange(2 * 44100) / 44100).astype(np.float32) * 0.3
    with video_io.VideoWriter(tmp_path / "out.mp4", 25, 81, 47, audio_rate=rate, audio_channels=2) as out:
        for index in range(50):
            out.write_frame(counter_image(index, 81, 47))
            out.write_audio(np.stack([samples, -samples])[:, index * 1764:(index + 1) * 1764])
    frames = list(video_io.iter_frames(tmp_path / "out.mp4"))
    assert [read_counter(image) for _, image in frames] == list(range(50))
    assert frames[1][0] == Fraction(1, 25) and frames[0][1].shape == (48, 82, 3)  # padded to even
    audio, audio_rate = video_io.decode_audio(tmp_path / "out.mp4")
    assert audio_rate == rate and audio.shape[0] == 2
    middle = slice(rate // 2, rate)  # away from the encoder's start and end
    assert np.corrcoef(audio[0, middle], samples[middle])[0, 1] > 0.99
    assert np.corrcoef(audio[1, middle], -samples[middle])[0, 1] > 0.99


# ----------------------------------------------------------------------------------------------------------------
# avsprep frames


def test_every_clip_has_the_frames_and_sound_of_its_seconds(videos, extracted):
    root, times = videos
    config, result = extracted
    rows = _meta(config.out)
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    assert {name: len(by_source[name]) for name in VIDEOS} == {name: VIDEOS[name][1] for name in VIDEOS}
    for row in rows:
        name, start, seconds = row["name"], int(row["start"]), int(row["seconds"])
        assert seconds == 5
        frames = sorted((config.out / "frames" / name).iterdir())
        assert [p.name for p in frames] == sorted(f"{name}_{k}.png" for k in range(1, 6))
        for k in range(1, 6):
            second = start + k - 1
            image = _read_png(config.out / "frames" / name / f"{name}_{k}.png")
            assert read_counter(image) == expected_frame(times[row["source"]], Fraction(2 * second + 1, 2)), (name, k)
        audio, rate = soundfile.read(config.out / "audio" / f"{name}.wav", dtype="float32")
        assert rate == 16000 and audio.ndim == 1 and audio.size == 5 * 16000
        for k in range(5):
            window = audio[k * 16000 + 2000:(k + 1) * 16000 - 2000]
            assert dominant_pitch(window, 16000) == pytest.approx(pitch(start + k), abs=3), (name, k)
    report = result.report()
    assert report["clips"] == report["clips_written"] == 6
    assert report["dropped_seconds"] == sum(v[2] for v in VIDEOS.values())
    assert not list(config.out.glob(".partial/*"))


def test_clip_names_and_splits(extracted):
    config, _ = extracted
    rows = _meta(config.out)
    assert [row["name"] for row in rows if row["source"] == "cam/street.mp4"] == ["cam__street_00000", "cam__street_00005"]
    splits = {}
    for row in rows:
        splits.setdefault(row["source"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())  # a video's clips share its split
    assert sorted(s.pop() for s in splits.values()) == ["test", "train", "train", "val"]


def test_rotated_frames_are_upright_in_the_pngs(extracted):
    config, _ = extracted
    assert _read_png(config.out / "frames" / "portrait_00000" / "portrait_00000_1.png").shape == (48, 80, 3)


def test_size_pad_and_classes(videos, tmp_path):
    root, times = videos
    classes = tmp_path / "classes.txt"
    classes.write_text("guitar\ndog\n")
    single = tmp_path / "in"
    single.mkdir()
    os.link(root / "ntsc.mkv", single / "ntsc.mkv")
    config = FramesConfig(videos=single, out=tmp_path / "out", size=24, pad_short_clips=True, classes=classes)
    result = extract_clips(config)
    assert [(c.name, c.start, c.seconds) for c in result.videos[0].clips] == [("ntsc_00000", 0, 5), ("ntsc_00005", 5, 2)]
    image = _read_png(tmp_path / "out" / "frames" / "ntsc_00005" / "ntsc_00005_2.png")
    assert image.shape == (24, 40, 3)  # shorter side 24, aspect kept
    assert read_counter(image) == expected_frame(times["ntsc.mkv"], Fraction(13, 2))
    assert soundfile.info(tmp_path / "out" / "audio" / "ntsc_00005.wav").frames == 2 * 16000
    assert (tmp_path / "out" / "predefined_classes.txt").read_text() == "guitar\ndog\n"
    assert [row["seconds"] for row in _meta(tmp_path / "out")] == ["5", "2"]


def test_rerun_keeps_complete_clips_and_redoes_the_rest(videos, tmp_path):
    root, _ = videos
    config = FramesConfig(videos=root, out=tmp_path / "out")
    extract_clips(config)
    out = config.out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    meta_before = (out / "meta.csv").read_text()
    # An interrupted run: one clip lost its WAV (moved last), another left a half-written temporary.
    (out / "audio" / "cam__street_00005.wav").unlink()
    (out / ".partial" / "vfr_00000" / "frames").mkdir(parents=True)
    (out / ".partial" / "vfr_00000" / "frames" / "vfr_00000_1.png").write_bytes(b"half")
    report = extract_clips(config).report()
    assert (report["clips_written"], report["clips_kept"]) == (1, 5)
    assert (out / "meta.csv").read_text() == meta_before
    assert not (out / ".partial").exists()
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert after.keys() == before.keys()
    assert [p.parent.name for p in after if after[p] != before[p]] == ["cam__street_00005"] * 5
    # Unchanged videos whose clips are complete are not decoded again; a touched one is, and its clips are kept.
    os.utime(root / "ntsc.mkv")
    report = extract_clips(config).report()
    assert (report["clips_written"], report["clips_kept"]) == (0, 6)


def test_rerun_with_other_settings_is_refused(videos, tmp_path):
    root, _ = videos
    extract_clips(FramesConfig(videos=root, out=tmp_path / "out"))
    with pytest.raises(InputError, match="was made with"):
        extract_clips(FramesConfig(videos=root, out=tmp_path / "out", clip_seconds=4))


def _truncated(path: Path) -> None:
    encode_video(path, 8, 25)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 6 // 10])


BAD_VIDEOS = {
    "silent.mp4": (lambda p: encode_video(p, 6, 25, audio_rate=None), "no audio track"),
    "cut.mkv": (_truncated, "truncated: the video stream decodes to"),
    "cut-index.mp4": (_truncated, "unreadable or truncated video file"),  # mp4 keeps its index at the end
    "garbage.avi": (lambda p: p.write_bytes(b"RIFF not really a video" * 10), "unreadable or truncated"),
    "empty.webm": (lambda p: p.write_bytes(b""), "video file is empty"),
    "nothing.mp4": (lambda p: encode_video(p, 0, 25), "zero-length video"),
    "short.mp4": (lambda p: encode_video(p, 3, 25), "shorter than one clip"),
}


@pytest.mark.parametrize("name", BAD_VIDEOS)
def test_bad_video_is_one_error_naming_it(tmp_path, name):
    make, problem = BAD_VIDEOS[name]
    (tmp_path / "in").mkdir()
    make(tmp_path / "in" / name)
    with pytest.raises(InputError, match=problem) as caught:
        extract_clips(FramesConfig(videos=tmp_path / "in", out=tmp_path / "out"))
    assert caught.value.path == tmp_path / "in" / name and "\n" not in str(caught.value)


def test_bad_videos_are_skipped_and_counted(videos, tmp_path):
    root, _ = videos
    (tmp_path / "in").mkdir()
    os.link(root / "vfr.mkv", tmp_path / "in" / "vfr.mkv")
    for name, (make, _) in BAD_VIDEOS.items():
        make(tmp_path / "in" / name)
    result = extract_clips(FramesConfig(videos=tmp_path / "in", out=tmp_path / "out", on_error="skip", workers=2))
    assert sorted(s["video"] for s in result.skipped) == sorted(BAD_VIDEOS)
    assert [row["name"] for row in _meta(tmp_path / "out")] == ["vfr_00000"]


def test_two_videos_giving_the_same_clip_names_are_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_bytes(b"x")
    (tmp_path / "in" / "a.mkv").write_bytes(b"x")
    with pytest.raises(InputError, match="same clip names"):
        extract_clips(FramesConfig(videos=tmp_path / "in", out=tmp_path / "out"))
