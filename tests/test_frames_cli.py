"""`avsprep frames` on real videos, then the extracted tree through `avsprep crops` (VOC written as labelImg writes it
beside the frames, CreateML, COCO with Label Studio's prefixes, or no annotation at all), `inspect --verify` and
`preview`; bad input on each command line is one line and exit code 2."""
from __future__ import annotations

import csv
import json
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner

from avsprep.cli import main as avsprep_main
from helpers import read_all, write_voc
from videos import encode_video

T, W, H = 3, 80, 48


def box_of(name: str, k: int) -> tuple:
    """The box the test 'annotates' on frame k of a clip: a different one per frame, one float edge."""
    shift = sum(map(ord, name)) % 7
    return ("dog", 4 + shift + k, 6, 40.5 + k, H if k == 2 else 30)  # frame 2's box touches the bottom border


def run(*args: str):
    return CliRunner().invoke(avsprep_main, [str(a) for a in args])


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("avsprep: error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Two videos (25 and 29.97 fps) extracted into clips of 3 s: (out folder, meta rows)."""
    root = tmp_path_factory.mktemp("framescli")
    (root / "videos").mkdir()
    encode_video(root / "videos" / "park.mp4", 7, 25)
    encode_video(root / "videos" / "hall.mkv", 6, Fraction(30000, 1001), codec="mpeg4", audio_rate=48000, channels=1)
    result = run("frames", "--videos", root / "videos", "--out", root / "out", "--clip-seconds", T,
                 "--val-fraction", 0.5)
    assert result.exit_code == 0, result.output
    assert "4 clips of 3 s from 2 videos" in result.output and "1 seconds after the last clips left out" in result.output
    with (root / "out" / "meta.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return root / "out", rows


def crops_args(out, shards, *annotation):
    return ["crops", *annotation, "--audio", out / "audio", "--meta", out / "meta.csv", "--frames-per-clip", T,
            "--size", 32, "--crop-size", 16, "--out", shards]


def expected_boxes(rows) -> np.ndarray:
    """[clips, T, 4] normalised xyxy, VOC's rounding (floats to the nearest integer, halves up)."""
    boxes = []
    for row in rows:
        per_frame = []
        for k in range(1, T + 1):
            _, x0, y0, x1, y1 = box_of(row["name"], k)
            per_frame.append([np.floor(x0 + 0.5) / W, np.floor(y0 + 0.5) / H, np.floor(x1 + 0.5) / W,
                              np.floor(y1 + 0.5) / H])
        boxes.append(per_frame)
    return np.array(boxes, np.float32)


def test_labelimg_voc_beside_the_frames_through_crops_and_verify(tree, tmp_path):
    out, rows = tree
    for row in rows:
        for k in range(1, T + 1):
            stem = f"{row['name']}_{k}"
            write_voc(out / "frames" / row["name"] / f"{stem}.xml", f"{stem}.png", W, H, [box_of(row["name"], k)])
    shards = tmp_path / "shards"
    result = run(*crops_args(out, shards, "--voc", out / "frames"))
    assert result.exit_code == 0, result.output
    assert "4 clips" in result.output
    manifest, arrays = read_all(shards)
    assert list(arrays["name"]) == sorted(row["name"] for row in rows)
    assert dict(manifest["splits"]) == {"train": 2, "val": 2}
    assert arrays["crop_valid"].all() and np.isfinite(arrays["audio"]).all()
    by_name = sorted(rows, key=lambda r: r["name"])
    assert np.array_equal(arrays["boxes"][:, :, 0], expected_boxes(by_name))
    result = run("inspect", shards, "--verify")
    assert result.exit_code == 0 and "verify: ok" in result.output, result.output


def test_createml_and_coco_give_the_shards_voc_gives(tree, tmp_path):
    out, rows = tree
    createml, images, annotations = tmp_path / "createml", [], []
    createml.mkdir()
    for row in rows:
        for k in range(1, T + 1):
            name, x0, y0, x1, y1 = box_of(row["name"], k)
            image = f"{row['name']}_{k}.png"
            coordinates = {"x": x0 + (x1 - x0) / 2, "y": y0 + (y1 - y0) / 2, "width": x1 - x0, "height": y1 - y0}
            (createml / f"{row['name']}_{k}.json").write_text(json.dumps(
                [{"image": image, "verified": False, "annotations": [{"label": name, "coordinates": coordinates}]}]))
            images.append({"id": len(images), "file_name": f"images/{len(images):08x}-{image}", "width": W, "height": H})
            annotations.append({"id": len(annotations), "image_id": len(images) - 1, "category_id": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": 1.0, "segmentation": [], "iscrowd": 0})
    coco = tmp_path / "result.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 0, "name": "dog"}], "info": {}}))
    boxes = {}
    for flag, source in (("--createml", createml), ("--coco", coco)):
        result = run(*crops_args(out, tmp_path / flag, flag, source, "--images", out / "frames"))
        assert result.exit_code == 0, result.output
        boxes[flag] = read_all(tmp_path / flag)[1]["boxes"][:, :, 0]
    assert "images_matched_without_prefix 12" in result.output  # Label Studio's prefixes, stripped and counted
    expected = expected_boxes(sorted(rows, key=lambda r: r["name"]))
    assert np.array_equal(boxes["--createml"], expected) and np.array_equal(boxes["--coco"], expected)


def test_frames_tree_without_annotations(tree, tmp_path):
    out, rows = tree
    result = run(*crops_args(out, tmp_path / "shards", "--images", out / "frames"))
    assert result.exit_code == 0, result.output
    _, arrays = read_all(tmp_path / "shards")
    assert len(arrays["name"]) == len(rows) and not arrays["crop_valid"].any()
    result = run("preview", "--images", out / "frames", "--frames-per-clip", T, "--out", tmp_path / "previews")
    assert result.exit_code == 0, result.output
    assert f"{len(rows) * T} frames without annotation" in result.output
    assert len(list((tmp_path / "previews").glob("*.png"))) == len(rows)


def test_bad_json_on_the_command_line(tree, tmp_path):
    out, rows = tree
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    one_line_error(run(*crops_args(out, tmp_path / "s", "--coco", bad, "--images", out / "frames")),
                   "bad.json: malformed JSON at line 1")
    one_line_error(run(*crops_args(out, tmp_path / "s", "--coco", bad, "--images", out / "frames",
                                   "--max-json-mb", 0.000001)), "--max-json-mb")
    # A box outside its image belongs to one clip: an error, or that clip skipped with --on-error skip.
    name = rows[0]["name"]
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": f"{name}_2.png", "width": W, "height": H}],
                                "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [90, 1, 5, 5]}],
                                "categories": [{"id": 3, "name": "dog"}]}))
    one_line_error(run(*crops_args(out, tmp_path / "s", "--coco", coco, "--images", out / "frames")),
                   "annotations[0] (id 9, image", "lies outside the 80x48 image")
    result = run(*crops_args(out, tmp_path / "s", "--coco", coco, "--images", out / "frames", "--on-error", "skip"))
    assert result.exit_code == 0, result.output
    assert f"skipped 1 clips for bad input:\n  {name}:" in result.output
    one_line_error(run("crops", "--audio", out / "audio", "--out", tmp_path / "s"), "or only --images DIR")


def test_frames_bad_video_and_skip(tmp_path):
    (tmp_path / "videos").mkdir()
    encode_video(tmp_path / "videos" / "good.mp4", 3, 25)
    encode_video(tmp_path / "videos" / "silent.mp4", 3, 25, audio_rate=None)
    args = ["frames", "--videos", tmp_path / "videos", "--out", tmp_path / "out", "--clip-seconds", 3]
    one_line_error(run(*args), "silent.mp4: no audio track")
    result = run(*args, "--on-error", "skip", "--workers", 2)
    assert result.exit_code == 0, result.output
    assert "1 clips of 3 s from 1 videos" in result.output
    assert "skipped 1 videos for bad input:\n  silent.mp4: " in result.output
