"""`avsprep avsbench` end to end on a miniature AVSBench download (S4 and MS3 conventions), real PNGs and WAVs."""
import csv
import json

import cv2
import numpy as np
import pytest
import soundfile
from click.testing import CliRunner
from PIL import Image

from avsprep import audio as audio_lib
from avsprep.cli import main
from helpers import read_all, tone, write_voc

T, W, H = 5, 48, 40  # AVSBench frames are square; these are not, so that box scaling is checked
SIZE, CROP = 32, 16


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _box(clip_index: int, k: int) -> tuple[int, int, int, int]:
    """A distinct (xmin, ymin, xmax, ymax) object rectangle per clip and frame, in pixel edges."""
    x0, y0 = 2 + 3 * clip_index + k, 1 + 2 * clip_index + k
    return x0, y0, x0 + 10 + k, y0 + 8 + clip_index


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)  # BGR, as cv2 writes it


# The clips of the miniature download: (name, split, category, mask frames, seconds of audio).
S4_CLIPS = [
    ("s4_train_a", "train", "dog", [1], 5.2),
    ("s4_train_b", "train", "cat", [], 5.0),  # its frame-1 mask is missing from the download
    ("s4_val_a", "val", "cat", [1, 2, 3, 4, 5], 5.0),
    ("s4_test_a", "test", "dog", [1, 2, 3, 4, 5], 3.2),  # short WAV: 3 whole examples, 2 repeated
]
MS3_CLIPS = [
    ("ms3_a", "train", None, [1, 2, 3, 4, 5], 5.0),
    ("ms3_b", "val", None, [1, 2, 3, 4, 5], 5.0),
    ("ms3_c", "test", None, [1, 2, 3, 4, 5], 4.0),
]
TWO_OBJECTS = ("ms3_c", 3)  # this frame shows two sounding objects
EMPTY = ("ms3_b", 2)  # this frame's mask is empty: valid, but no box


def _objects(name: str, index: int, k: int) -> list[tuple[int, int, int, int]]:
    if (name, k) == EMPTY:
        return []
    boxes = [_box(index, k)]
    if (name, k) == TWO_OBJECTS:
        boxes.append((36, 28, 46, 39))
    return boxes


def make_avsbench(top, subset: str) -> dict:
    """Write a miniature AVSBench subset under top/ as the download lays it out; returns what was written."""
    s4 = subset == "s4"
    home = top / ("Single-source" if s4 else "Multi-sources")
    data = home / f"{subset}_data"
    clips = S4_CLIPS if s4 else MS3_CLIPS
    truth = {}
    rows = []
    for index, (name, split, category, mask_frames, seconds) in enumerate(clips):
        frames, masks = [], []
        for k in range(1, T + 1):
            frame = _frame(1000 * index + k + (0 if s4 else 500))
            objects = _objects(name, index, k)
            mask = np.zeros((H, W), np.uint8)
            for n, (x0, y0, x1, y1) in enumerate(objects, start=1):
                mask[y0:y1, x0:x1] = n  # MS3 palette index per object
            if s4:
                frame_path = data / "visual_frames" / split / category / name / f"{name}_{k}.png"
                mask_path = data / "gt_masks" / split / category / name / f"{name}_{k}.png"
            else:
                frame_path = data / "visual_frames" / name / f"{name}.mp4_{k}.png"
                mask_path = data / "gt_masks" / split / name / f"{name}_{k}.png"
            frame_path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(frame_path), frame)
            if k in mask_frames:
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                if s4:
                    assert cv2.imwrite(str(mask_path), mask * 255)
                else:  # MS3 ground truth is a palette PNG
                    image = Image.fromarray(mask, mode="P")
                    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
                    image.save(mask_path)
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            masks.append((mask > 0).astype(np.uint8) if k in mask_frames else None)
        wav = data / "audio_wav" / split / (category or "") / f"{name}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        wave = tone(300 + 100 * index, seconds)
        wave *= np.linspace(0.1, 1.0, wave.size, dtype=np.float32)  # louder each second: no two seconds alike
        soundfile.write(wav, wave, 16000, subtype="PCM_16")
        truth[name] = {"split": split, "category": category, "frames": frames, "masks": masks, "wav": wav,
                       "index": index, "objects": {k: _objects(name, index, k) for k in range(1, T + 1)}}
        rows.append([name, "0", category, split] if s4 else [name, split])
    home.mkdir(parents=True, exist_ok=True)
    with (home / f"{subset}_meta_data.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        # S4 names its columns; this MS3 header names none but `split` (the reference reads the name positionally).
        writer.writerow(["name", "start_time", "category", "split"] if s4 else ["video_id", "split"])
        writer.writerows(rows)
    return truth


def _area(image, size):
    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_AREA)


def _expected_audio(wav):
    examples, padded = audio_lib.clip_examples(wav, T)
    return audio_lib.LogMelStatsEmbedder().embed(examples), padded


def check_shards(out, truth, subset, boxes_from):
    """Every field of every clip against what was written to disk. boxes_from: 'masks', 'voc' or None."""
    manifest, arrays = read_all(out)
    names = sorted(truth)
    assert list(arrays["name"]) == names
    assert list(arrays["split"]) == [truth[n]["split"] for n in names]
    classes = ["cat", "dog"] if subset == "s4" else []
    if boxes_from == "voc":
        classes = sorted(set(classes) | {"drum"})
    assert manifest["classes"] == classes
    assert manifest["box_source"] == ("masks" if boxes_from == "masks" else "annotations")
    assert arrays["frames"].shape == (len(names), T, SIZE, SIZE, 3)
    assert arrays["crops"].shape == (len(names), T, CROP, CROP, 3)
    assert arrays["sounding"].shape == (len(names), len(classes))
    report = {"audio_padded_clips": 0, "audio_padded_seconds": 0, "masks_missing": 0, "mask_boxes": 0}
    for row, name in enumerate(names):
        clip = truth[name]
        label = classes.index(clip["category"]) if clip["category"] else -1  # the CSV category, whatever the boxes
        assert arrays["label"][row] == label, name
        expected_sounding = np.zeros(len(classes), bool)
        if label >= 0:
            expected_sounding[label] = True
        if boxes_from == "voc" and name == VOC_CLIP:
            expected_sounding[classes.index("drum")] = True
        np.testing.assert_array_equal(arrays["sounding"][row], expected_sounding)
        audio, padded = _expected_audio(clip["wav"])
        np.testing.assert_array_equal(arrays["audio"][row], audio)
        report["audio_padded_clips"] += padded > 0
        report["audio_padded_seconds"] += padded
        for t in range(T):
            k = t + 1
            np.testing.assert_array_equal(arrays["frames"][row, t], _area(clip["frames"][t], SIZE))
            mask = clip["masks"][t]
            expected_mask_frame = not (subset == "s4" and clip["split"] == "train" and k > 1)
            report["masks_missing"] += mask is None and expected_mask_frame
            assert arrays["mask_valid"][row, t] == (mask is not None), (name, k)
            if mask is None:
                assert not arrays["masks"][row, t].any()
            else:
                np.testing.assert_array_equal(
                    arrays["masks"][row, t], cv2.resize(mask, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST))
            boxes = []
            if boxes_from == "masks" and mask is not None and clip["objects"][k]:
                objects = clip["objects"][k]  # one box around all of the frame's objects
                boxes = [(min(b[0] for b in objects), min(b[1] for b in objects),
                          max(b[2] for b in objects), max(b[3] for b in objects))]
                report["mask_boxes"] += 1
            elif boxes_from == "voc" and (name, k) in VOC_BOXES:
                boxes = [box[1:] for box in VOC_BOXES[(name, k)]]
            assert arrays["crop_valid"][row, t] == bool(boxes), (name, k)
            expected_boxes = np.full((4, 4), np.nan, np.float32)
            for j, (x0, y0, x1, y1) in enumerate(boxes):
                expected_boxes[j] = (x0 / W, y0 / H, x1 / W, y1 / H)
            np.testing.assert_array_equal(arrays["boxes"][row, t], expected_boxes)
            if boxes:
                x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
                x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
                np.testing.assert_array_equal(arrays["crops"][row, t], _area(clip["frames"][t][y0:y1, x0:x1], CROP))
            else:
                assert not arrays["crops"][row, t].any()
    assert {k: manifest["report"].get(k, 0) for k in report} == report
    assert manifest["skipped"] == []
    return manifest, arrays


def avsbench_args(root, subset, out, *extra):
    return ["avsbench", "--root", str(root), "--subset", subset, "--out", str(out), "--size", str(SIZE),
            "--crop-size", str(CROP), "--clips-per-shard", "3", *extra]


@pytest.fixture()
def download(tmp_path):
    top = tmp_path / "AVSBench"
    return top, {"s4": make_avsbench(top, "s4"), "ms3": make_avsbench(top, "ms3")}


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_boxes_from_masks_every_field(download, tmp_path, subset):
    top, truth = download
    out = tmp_path / f"shards-{subset}"
    result = run(avsbench_args(top, subset, out, "--boxes-from-masks"))
    assert result.exit_code == 0, result.output
    manifest, arrays = check_shards(out, truth[subset], subset, "masks")
    expected = {"s4": {"test": 1, "train": 2, "val": 1}, "ms3": {"test": 1, "train": 1, "val": 1}}[subset]
    assert manifest["splits"] == expected
    if subset == "s4":
        assert manifest["report"]["masks_missing"] == 1  # s4_train_b, frame 1
        assert manifest["report"]["audio_padded_clips"] == 1 and manifest["report"]["audio_padded_seconds"] == 2
        assert "masks_missing 1" in result.output and "audio_padded_clips 1" in result.output
        short = list(arrays["name"]).index("s4_test_a")
        # The reference pads short audio by repeating the last example.
        assert (arrays["audio"][short, 2] == arrays["audio"][short, 3]).all()
        assert (arrays["audio"][short, 3] == arrays["audio"][short, 4]).all()
        assert not (arrays["audio"][short, 1] == arrays["audio"][short, 2]).all()
    else:
        row = list(arrays["name"]).index(TWO_OBJECTS[0])
        assert arrays["crop_valid"][row, TWO_OBJECTS[1] - 1]
        assert manifest["report"]["audio_padded_clips"] == 1  # ms3_c: 4 s
    assert run(["inspect", str(out), "--verify"]).exit_code == 0


def test_root_may_be_any_level_of_the_download(download, tmp_path):
    top, _ = download
    reference = tmp_path / "from-top"
    assert run(avsbench_args(top, "ms3", reference)).exit_code == 0
    # The data folder itself, with the CSV moved inside it (as some copies have it).
    data = top / "Multi-sources" / "ms3_data"
    (top / "Multi-sources" / "ms3_meta_data.csv").rename(data / "ms3_meta_data.csv")
    out = tmp_path / "from-data"
    result = run(avsbench_args(data, "ms3", out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())


VOC_CLIP = "s4_val_a"
VOC_BOXES = {  # (clip, k) -> [(class, xmin, ymin, xmax, ymax)]; other frames have no annotation
    ("s4_val_a", 1): [("cat", 3, 4, 20, 30)],
    ("s4_val_a", 4): [("cat", 0, 0, 10, 10), ("drum", 30, 20, 48, 40)],
}


def test_voc_boxes_matched_by_file_name(download, tmp_path):
    top, truth = download
    labels = tmp_path / "labels"
    for (name, k), boxes in VOC_BOXES.items():
        # Anywhere under --voc: the XML's <filename> decides which frame it belongs to.
        write_voc(labels / f"batch{k}" / f"ann_{name}_{k}.xml", f"{name}_{k}.png", W, H, boxes)
    write_voc(labels / "stray.xml", "not_a_frame_9.png", W, H, [("cat", 1, 1, 5, 5)])
    out = tmp_path / "shards"
    result = run(avsbench_args(top, "s4", out, "--voc", str(labels)))
    assert result.exit_code == 0, result.output
    assert "1 label files name no frame" in result.output
    check_shards(out, truth["s4"], "s4", "voc")


def test_yolo_boxes_matched_by_stem(download, tmp_path):
    top, _ = download
    labels = tmp_path / "yolo"
    labels.mkdir()
    (labels / "classes.txt").write_text("cat\ndog\n")
    # A box of x 12..36, y 10..30 in the 48 x 40 frame 2 of ms3_a.
    (labels / "ms3_a.mp4_2.txt").write_text(f"1 {24 / W:.6f} {20 / H:.6f} {24 / W:.6f} {20 / H:.6f}\n")
    out = tmp_path / "shards"
    result = run(avsbench_args(top, "ms3", out, "--yolo", str(labels)))
    assert result.exit_code == 0, result.output
    manifest, arrays = read_all(out)
    assert manifest["classes"] == ["cat", "dog"]
    row = list(arrays["name"]).index("ms3_a")
    assert arrays["crop_valid"].sum() == 1 and arrays["crop_valid"][row, 1]
    np.testing.assert_allclose(arrays["boxes"][row, 1, 0], [12 / W, 10 / H, 36 / W, 30 / H], atol=1e-6)
    assert arrays["label"][row] == 1 and list(arrays["sounding"][row]) == [False, True]
    assert (arrays["label"] == -1).sum() == 2  # MS3 has no categories: clips without boxes have no class


def test_vggish_embedder_from_local_weights(download, tmp_path):
    torch = pytest.importorskip("torch")
    from avsprep.vggish import VGGish, VGGishEmbedder

    top, truth = download
    torch.manual_seed(0)
    weights = tmp_path / "vggish-random.pth"
    torch.save(VGGish().state_dict(), weights)
    out = tmp_path / "shards"
    result = run(avsbench_args(top, "ms3", out, "--embedder", "vggish", "--vggish-weights", str(weights)))
    assert result.exit_code == 0, result.output
    manifest, arrays = read_all(out)
    assert manifest["embedder"] == "vggish"
    embedder = VGGishEmbedder(weights)
    for row, name in enumerate(arrays["name"]):
        examples, _ = audio_lib.clip_examples(truth["ms3"][name]["wav"], T)
        np.testing.assert_allclose(arrays["audio"][row], embedder.embed(examples), rtol=0, atol=1e-5)


def test_resume_and_parts_agree(download, tmp_path):
    top, _ = download
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(avsbench_args(top, "s4", whole, "--boxes-from-masks")).exit_code == 0
    for i in range(2):
        result = run(avsbench_args(top, "s4", parts, "--boxes-from-masks", "--num-parts", "2", "--part-index", str(i)))
        assert result.exit_code == 0, result.output
    assert run(["merge", str(parts), "--out", str(parts)]).exit_code == 0
    assert json.loads((whole / "manifest.json").read_text()) == json.loads((parts / "manifest.json").read_text())
    again = run(avsbench_args(top, "s4", whole, "--boxes-from-masks"))
    assert "0 written, 2 already complete" in again.output
    # Another box source is another plan: the shards are rewritten.
    other = run(avsbench_args(top, "s4", whole))
    assert "2 written, 0 already complete" in other.output
    manifest, arrays = read_all(whole)
    assert manifest["box_source"] == "annotations" and not arrays["crop_valid"].any()


# Bad input: one line on stderr naming the file, exit code 2.

def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()  # a progress bar's label may come before the error
    errors = [line for line in lines if line.startswith("avsprep: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_missing_root(tmp_path):
    _one_line_error(run(avsbench_args(tmp_path / "nowhere", "s4", tmp_path / "out")), "nowhere",
                    "does not exist")


def test_missing_csv(tmp_path):
    (tmp_path / "AVSBench" / "Single-source" / "s4_data" / "visual_frames").mkdir(parents=True)
    _one_line_error(run(avsbench_args(tmp_path / "AVSBench", "s4", tmp_path / "out")), "s4_meta_data.csv")


def test_csv_without_split_column(download, tmp_path):
    top, _ = download
    (top / "Multi-sources" / "ms3_meta_data.csv").write_text("video_id,fold\nms3_a,train\n")
    _one_line_error(run(avsbench_args(top, "ms3", tmp_path / "out")), "ms3_meta_data.csv", "'split'")


def test_csv_with_unknown_split(download, tmp_path):
    top, _ = download
    (top / "Multi-sources" / "ms3_meta_data.csv").write_text("video_id,split\nms3_a,training\n")
    _one_line_error(run(avsbench_args(top, "ms3", tmp_path / "out")), "line 2", "'training'")


def test_missing_data_folder(download, tmp_path):
    top, _ = download
    (top / "Multi-sources" / "ms3_data" / "audio_wav").rename(top / "Multi-sources" / "ms3_data" / "audio")
    _one_line_error(run(avsbench_args(top, "ms3", tmp_path / "out")), "audio_wav", "does not exist")


def test_missing_frame_stops_or_is_skipped(download, tmp_path):
    top, _ = download
    missing = top / "Multi-sources" / "ms3_data" / "visual_frames" / "ms3_b" / "ms3_b.mp4_4.png"
    missing.unlink()
    _one_line_error(run(avsbench_args(top, "ms3", tmp_path / "out")), str(missing), "not found")
    out = tmp_path / "skipping"
    result = run(avsbench_args(top, "ms3", out, "--on-error", "skip"))
    assert result.exit_code == 0, result.output
    manifest, arrays = read_all(out)
    assert list(arrays["name"]) == ["ms3_a", "ms3_c"]
    assert [s["clip"] for s in manifest["skipped"]] == ["ms3_b"]
    assert "ms3_b.mp4_4.png" in manifest["skipped"][0]["error"]


def test_missing_wav_names_it(download, tmp_path):
    top, truth = download
    truth["s4"]["s4_val_a"]["wav"].unlink()
    _one_line_error(run(avsbench_args(top, "s4", tmp_path / "out")), "s4_val_a.wav")


def test_truncated_mask_png_names_it(download, tmp_path):
    top, _ = download
    mask = top / "Single-source" / "s4_data" / "gt_masks" / "val" / "cat" / "s4_val_a" / "s4_val_a_3.png"
    mask.write_bytes(mask.read_bytes()[:20])
    _one_line_error(run(avsbench_args(top, "s4", tmp_path / "out", "--boxes-from-masks")), "s4_val_a_3.png")


def test_labels_and_mask_boxes_exclude_each_other(download, tmp_path):
    top, _ = download
    labels = tmp_path / "labels"
    labels.mkdir()
    _one_line_error(run(avsbench_args(top, "s4", tmp_path / "out", "--voc", str(labels), "--boxes-from-masks")),
                    "at most one of")


def test_empty_csv_has_no_clips(download, tmp_path):
    top, _ = download
    (top / "Single-source" / "s4_meta_data.csv").write_text("name,start_time,category,split\n")
    _one_line_error(run(avsbench_args(top, "s4", tmp_path / "out")), "no usable clips")


def test_same_arrays_as_crops_on_the_synthetic_avsbench_layout(tmp_path):
    """`avsprep synth` writes the S4 layout and labelImg XML: importing it as AVSBench with --voc must give the
    arrays that `avsprep crops` gives from the same files."""
    synth = tmp_path / "synth"
    assert run(["synth", "--out", str(synth), "--clips", "6", "--size", "64", "--seed", "3"]).exit_code == 0
    with (synth / "meta.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    (synth / "s4_meta_data.csv").write_text((synth / "meta.csv").read_text())
    classes = tmp_path / "classes.txt"  # the same class map for both (crops also counts the other objects' classes)
    classes.write_text("\n".join(sorted({r["category"] for r in rows} | {r["other_category"] for r in rows})) + "\n")
    common = ["--classes", str(classes), "--size", "32", "--crop-size", "16", "--clips-per-shard", "4"]
    via_crops, via_avsbench = tmp_path / "crops", tmp_path / "avsbench"
    result = run(["crops", "--voc", str(synth / "labels"), "--images", str(synth / "visual_frames"),
                  "--masks", str(synth / "gt_masks"), "--audio", str(synth / "audio_wav"), "--meta",
                  str(synth / "s4_meta_data.csv"), "--out", str(via_crops), *common])
    assert result.exit_code == 0, result.output
    result = run(["avsbench", "--root", str(synth), "--subset", "s4", "--voc", str(synth / "labels"),
                  "--out", str(via_avsbench), *common])
    assert result.exit_code == 0, result.output
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (via_crops, via_avsbench))
    assert first["clips"] == second["clips"] == 6
    for a, b in zip(first["shards"], second["shards"]):
        assert a["checksums"] == b["checksums"]
    assert first["report"] == {k: v for k, v in second["report"].items() if k != "masks_missing"}
    assert second["report"]["masks_missing"] == 0
