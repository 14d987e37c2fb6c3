"""`avsprep crops` and `avsprep inspect` end to end, through the CLI, on real files."""
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import h5py
import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from avsprep import audio as audio_lib
from avsprep.cli import main
from avsprep.crops import crop_and_resize
from helpers import crops_args, make_dataset, read_all, write_voc


def run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "data")


def test_crops_then_inspect_verify(dataset, tmp_path):
    out = tmp_path / "shards"
    result = run(crops_args(dataset, out))
    assert result.exit_code == 0, result.output
    assert "6 clips in 3 shards" in result.output
    inspected = run(["inspect", str(out), "--verify", "--json"])
    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.stdout)
    assert summary["clips"] == 6 and summary["verify"]["ok"]
    assert summary["splits"] == {"test": 2, "train": 2, "val": 2}
    assert summary["clips_per_split_and_class"]["train"] == {"cat": 1, "dog": 1}

    manifest, arrays = read_all(out)
    assert manifest["classes"] == ["cat", "dog"] and manifest["embedder"] == "logmel-stats"
    assert list(arrays["name"]) == [f"clip{i:03d}" for i in range(6)]
    assert list(arrays["split"]) == ["train", "val", "test"] * 2
    assert arrays["frames"].shape == (6, 3, 32, 32, 3) and arrays["crops"].shape == (6, 3, 24, 24, 3)
    assert arrays["mask_valid"].all() and arrays["crop_valid"].all()
    assert list(arrays["label"]) == [0, 1] * 3
    assert arrays["sounding"].tolist() == [[True, False], [False, True]] * 3

    # Pixels are exactly an OpenCV read + crop + resize of the labelled box.
    image = cv2.cvtColor(cv2.imread(str(dataset["frames"] / "clip004_2.png")), cv2.COLOR_BGR2RGB)
    xml = (dataset["labels"] / "clip004_2.xml").read_text()
    box = [int(xml.split(f"<{tag}>")[1].split("<")[0]) for tag in ("xmin", "ymin", "xmax", "ymax")]
    np.testing.assert_array_equal(arrays["crops"][4, 1], crop_and_resize(image, tuple(box), 24))
    np.testing.assert_array_equal(arrays["frames"][4, 1], cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA))
    np.testing.assert_allclose(arrays["boxes"][4, 1, 0], np.array(box) / [80, 60, 80, 60], rtol=1e-6)
    assert np.isnan(arrays["boxes"][4, 1, 1:]).all()
    mask = cv2.imread(str(dataset["masks"] / "clip004_2.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(arrays["masks"][4, 1], cv2.resize((mask > 0).astype(np.uint8), (32, 32),
                                                                    interpolation=cv2.INTER_NEAREST))
    examples, padded = audio_lib.clip_examples(dataset["audio"] / "clip004.wav", 3)
    np.testing.assert_allclose(arrays["audio"][4], audio_lib.LogMelStatsEmbedder().embed(examples), rtol=1e-6)
    assert padded == 0

    # Negative audio for training and the reliance suite, made with the same embedder.
    from avsprep.shards import read_negatives
    negatives = read_negatives(out)
    assert negatives["silence"].shape == (1, 3, 128) and negatives["noise"].shape == (16, 3, 128)
    assert not np.allclose(negatives["silence"][0], negatives["noise"][0])
    assert manifest["negatives"]["shapes"] == {"noise": [16, 3, 128], "silence": [1, 3, 128]}


def shard_bytes(shards_dir):
    return {p.name: p.read_bytes() for p in sorted(shards_dir.iterdir())}


def test_same_input_same_bytes_and_workers_agree(dataset, tmp_path):
    assert run(crops_args(dataset, tmp_path / "a")).exit_code == 0
    assert run(crops_args(dataset, tmp_path / "b") + ["--workers", "2"]).exit_code == 0
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_rerun_reuses_complete_shards(dataset, tmp_path):
    out = tmp_path / "shards"
    run(crops_args(dataset, out))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    result = run(crops_args(dataset, out))
    assert "0 written, 3 already complete" in result.output
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}


def test_killed_run_resumes_to_the_same_clips(tmp_path):
    dataset = make_dataset(tmp_path / "data", clips=24, width=160, height=120)
    reference = tmp_path / "reference"
    assert run(crops_args(dataset, reference) + ["--clips-per-shard", "1"]).exit_code == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "avsprep.cli", *crops_args(dataset, out), "--clips-per-shard", "1"]
    rng = np.random.default_rng(0)
    kills = 0
    for trial in range(5):  # killed at random points, each re-run going further
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        target = len(list(out.glob("shard-*.h5"))) + int(rng.integers(1, 4))
        while time.time() < deadline and len(list(out.glob("shard-*.h5"))) < target and process.poll() is None:
            time.sleep(0.005)
        if process.poll() is not None:
            break  # it finished before the kill: nothing left to interrupt
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
        assert not (out / "manifest.json").exists()  # a killed run never lists anything
    assert kills >= 1
    result = run(crops_args(dataset, out) + ["--clips-per-shard", "1"])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.partial*"))
    assert shard_bytes(out) == shard_bytes(reference)
    assert run(["inspect", str(out), "--verify"]).exit_code == 0


def test_parts_together_equal_one_run(dataset, tmp_path):
    run(crops_args(dataset, tmp_path / "whole"))
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    shards = {}
    for part in range(3):
        out = tmp_path / f"part{part}"
        assert run(crops_args(dataset, out) + ["--num-parts", "3", "--part-index", str(part)]).exit_code == 0
        manifest = json.loads((out / f"manifest.part-{part:03d}-of-003.json").read_text())
        shards.update({entry["file"]: entry for entry in manifest["shards"]})
    assert [shards[name] for name in sorted(shards)] == whole["shards"]
    # `avsprep merge` joins them into what one run writes, byte for byte.
    result = run(["merge", *(str(tmp_path / f"part{i}") for i in range(3)), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert shard_bytes(tmp_path / "merged") == shard_bytes(tmp_path / "whole")
    assert run(["inspect", str(tmp_path / "merged"), "--verify"]).exit_code == 0
    incomplete = CliRunner().invoke(main, ["merge", str(tmp_path / "part0"), "--out", str(tmp_path / "m2")])
    assert incomplete.exit_code == 2 and "parts [1, 2] of 3 are missing" in incomplete.output


def test_verify_catches_tampering(dataset, tmp_path):
    out = tmp_path / "shards"
    run(crops_args(dataset, out))
    with h5py.File(out / "shard-00001.h5", "r+") as handle:
        handle["frames"][0, 0, 0, 0, 0] ^= 1
    result = run(["inspect", str(out), "--verify"])
    assert result.exit_code == 1
    assert "shard-00001.h5: checksum of frames" in result.output


def corrupt(dataset, case):
    """Apply one kind of bad input to clip002 (or the run) and return the file the error must name."""
    labels, frames = dataset["labels"], dataset["frames"]
    if case == "malformed xml":
        (labels / "clip002_1.xml").write_text("<annotation><filename>")
        return labels / "clip002_1.xml"
    if case in ("inverted box", "nan box", "outside image"):
        box = {"inverted box": (50, 10, 20, 40), "nan box": ("nan", 10, 20, 40), "outside image": (90, 10, 120, 40)}[case]
        write_voc(labels / "clip002_2.xml", "clip002_2.png", 80, 60, [("dog", *box)])
        return labels / "clip002_2.xml"
    if case == "missing frame":
        (frames / "clip002_3.png").unlink()
        return labels / "clip002_3.xml"  # the annotation whose frame is missing
    if case == "missing audio":
        (dataset["audio"] / "clip002.wav").unlink()
        return dataset["audio"]
    if case == "unreadable image":
        (frames / "clip002_1.png").write_bytes(b"not a png at all")
        return frames / "clip002_1.png"
    if case == "unreadable wav":
        (dataset["audio"] / "clip002.wav").write_bytes(b"RIFF....WAVEfmt garbage")
        return dataset["audio"] / "clip002.wav"
    if case == "unknown class":
        write_voc(labels / "clip002_1.xml", "clip002_1.png", 80, 60, [("zebra", 1, 1, 20, 20)])
        return labels / "clip002_1.xml"
    raise AssertionError(case)


BAD_CASES = ["malformed xml", "inverted box", "nan box", "outside image", "missing frame", "missing audio",
             "unreadable image", "unreadable wav", "unknown class"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_exit_2_or_skipped_and_counted(dataset, tmp_path, case):
    named = corrupt(dataset, case)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    args = crops_args(dataset, tmp_path / "strict") + ["--classes", str(classes)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("avsprep: error: ") and str(named) in lines[-1], result.output
    assert "Traceback" not in result.output

    skip = run(crops_args(dataset, tmp_path / "skip") + ["--classes", str(classes), "--on-error", "skip"])
    assert skip.exit_code == 0, skip.output
    assert "5 clips" in skip.output and "skipped 1 clips" in skip.output and "clip002" in skip.output
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["clips"] == 5 and [s["clip"] for s in manifest["skipped"]] == ["clip002"]


def test_empty_input_is_an_error(tmp_path):
    (tmp_path / "labels").mkdir()
    result = CliRunner().invoke(main, ["crops", "--voc", str(tmp_path / "labels"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "no usable clips" in result.output


def test_plain_image_set_and_short_clips(tmp_path):
    dataset = make_dataset(tmp_path / "data", clips=2, frames_per_clip=2)
    cv2.imwrite(str(dataset["frames"] / "lonely.png"), np.zeros((60, 80, 3), np.uint8))  # no annotation
    # T = 1: each image is a clip of its own (<clip>_1 is <clip>, other names their stem); an unannotated frame
    # has no valid crop.
    out = tmp_path / "t1"
    result = run(["crops", "--voc", str(dataset["labels"]), "--images", str(dataset["frames"]), "--out", str(out),
                  "--frames-per-clip", "1", "--size", "16", "--crop-size", "16"])
    assert result.exit_code == 0, result.output
    _, arrays = read_all(out)
    assert list(arrays["name"]) == ["clip000", "clip000_2", "clip001", "clip001_2", "lonely"]
    assert arrays["crop_valid"][:, 0].tolist() == [True, True, True, True, False]
    assert arrays["label"][-1] == -1
    # T = 2: clip000 without frame 2 is bad input, or padded on request.
    (dataset["frames"] / "lonely.png").unlink()
    (dataset["frames"] / "clip000_2.png").unlink()
    (dataset["labels"] / "clip000_2.xml").unlink()
    strict = CliRunner().invoke(main, crops_args(dataset, tmp_path / "t2", frames_per_clip=2))
    assert strict.exit_code == 2 and "lacks frame(s) [2]" in strict.output
    padded = run(crops_args(dataset, tmp_path / "t2", frames_per_clip=2) + ["--pad-short-clips"])
    assert padded.exit_code == 0 and "frames_padded 1" in padded.output
    _, arrays = read_all(tmp_path / "t2")
    np.testing.assert_array_equal(arrays["frames"][0, 1], arrays["frames"][0, 0])


def test_short_audio_is_padded_and_counted(dataset, tmp_path):
    soundfile.write(dataset["audio"] / "clip001.wav", np.zeros(16000 * 2, np.float32), 16000)
    result = run(crops_args(dataset, tmp_path / "s"))
    assert result.exit_code == 0 and "audio_padded_clips 1" in result.output


@pytest.mark.parametrize("kind", ["gray", "gray16", "rgba", "rgb16"])
def test_image_formats_become_rgb_uint8(tmp_path, kind):
    """Grayscale, 16-bit and RGBA frames are read as 8-bit RGB (what OpenCV's IMREAD_COLOR would give)."""
    from avsprep.crops import read_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    image = {"gray": rgb[..., 0], "gray16": rgb[..., 0].astype(np.uint16) * 257,
             "rgba": np.dstack([rgb[..., ::-1], np.full((12, 10), 7, np.uint8)]),
             "rgb16": rgb[..., ::-1].astype(np.uint16) * 257}[kind]
    path = tmp_path / f"{kind}.png"
    cv2.imwrite(str(path), image)
    expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_image(path), expected)
    assert read_image(path).dtype == np.uint8 and read_image(path).shape == (12, 10, 3)


def test_a_frame_without_mask_box_or_other_mask_is_zero_in_a_reused_row(dataset, tmp_path):
    # A worker builds every shard into the same arrays: a row that held an earlier shard's clip must come out
    # zero where the new clip has nothing (clip005 is row 1 of the third shard; clip003 filled that row before).
    other_masks = tmp_path / "other_masks"
    other_masks.mkdir()
    for mask in dataset["masks"].iterdir():
        (other_masks / mask.name).write_bytes(mask.read_bytes())
    for folder in (dataset["masks"], other_masks):
        (folder / "clip005_2.png").unlink()
    (dataset["labels"] / "clip005_2.xml").unlink()
    out = tmp_path / "shards"
    result = run(crops_args(dataset, out) + ["--other-masks", str(other_masks)])
    assert result.exit_code == 0, result.output
    _, arrays = read_all(out)
    assert not arrays["mask_valid"][5, 1] and not arrays["crop_valid"][5, 1]
    for key in ("masks", "crops", "other_masks"):
        assert not arrays[key][5, 1].any(), key
        assert arrays[key][3, 1].any() and arrays[key][5, 0].any(), key  # what was there, and the clip's others
