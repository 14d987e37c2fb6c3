"""Tests of the synthetic AVS benchmark generator (avsprep/synth.py)."""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
from lxml import etree

from avsprep.errors import InputError
from avsprep.synth import (
    SAMPLE_RATE,
    SynthConfig,
    assign_splits,
    class_names,
    class_specs,
    generate,
    labelimg_xml,
    render_class_audio,
    sample_scene,
)

T = 5
META_COLUMNS = ["name", "category", "split", "other_category", "sounding_categories"]
LABELIMG_REFERENCE = Path(__file__).resolve().parent / "data" / "reference" / "labelimg"
SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def _generate(out: Path, **options) -> Path:
    defaults = {"clips": 16, "size": 64, "seed": 0, "yolo": True}
    generate(SynthConfig(out=out, **{**defaults, **options}))
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _meta(root: Path) -> list[dict[str, str]]:
    with open(root / "meta.csv", newline="") as f:
        return list(csv.DictReader(f))


def _band_energy(wav: Path, band: tuple[float, float]) -> float:
    audio, rate = sf.read(wav)
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1.0 / rate)
    return float(power[(freqs >= band[0]) & (freqs <= band[1])].sum())


def _frame_paths(root: Path, row: dict[str, str], kind: str, ext: str = "png") -> list[Path]:
    folder = root / kind / row["split"] / row["category"] / row["name"]
    return [folder / f"{row['name']}_{k}.{ext}" for k in range(1, T + 1)]


def _xml_objects(path: Path) -> list[tuple[str, tuple[int, int, int, int]]]:
    root = etree.parse(str(path), SAFE_PARSER).getroot()
    return [(obj.findtext("name"), tuple(int(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
            for obj in root.findall("object")]


@pytest.fixture(scope="module")
def easy(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("easy") / "set")


@pytest.fixture(scope="module")
def hard(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("hard") / "set", clips=12, size=48, difficulty="hard")


@pytest.fixture(scope="module")
def ms3(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("ms3") / "set", clips=12, size=48, sources=2)


# ----------------------------------------------------------------------------------------------- layout


def test_layout_meta_and_files(easy):
    with open(easy / "meta.csv", newline="") as f:
        assert next(csv.reader(f)) == META_COLUMNS
    rows = _meta(easy)
    assert [r["name"] for r in rows] == [f"synth_{i:05d}" for i in range(16)]
    names = class_names(5)
    for row in rows:
        assert row["category"] in names and row["other_category"] in names
        assert row["other_category"] != row["category"]
        assert row["sounding_categories"] == row["category"]
        for kind in ("visual_frames", "gt_masks", "other_masks"):
            assert all(p.is_file() for p in _frame_paths(easy, row, kind)), (kind, row["name"])
        assert all(p.is_file() for p in _frame_paths(easy, row, "labels", "xml"))
        assert all(p.is_file() for p in _frame_paths(easy, row, "yolo", "txt"))
        assert (easy / "audio_wav" / row["split"] / row["category"] / f"{row['name']}.wav").is_file()
        frame = cv2.imread(str(_frame_paths(easy, row, "visual_frames")[0]), cv2.IMREAD_UNCHANGED)
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert (easy / "info.json").is_file()
    files = [p for p in easy.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".")], "temporary files left behind"
    # Per clip: 3 PNG kinds + XML + YOLO per frame, one WAV; plus meta.csv, scenes.csv, info.json, classes.txt.
    assert len(files) == 16 * (5 * T + 1) + 4


def test_splits_are_seeded_70_15_15(easy):
    for clips, held_out in ((16, 2), (20, 3), (600, 90), (7, 1), (1, 0)):
        splits = assign_splits(clips, seed=3)
        assert (splits.count("val"), splits.count("test")) == (held_out, held_out)
        assert splits.count("train") == clips - 2 * held_out
    assert assign_splits(200, 0) == assign_splits(200, 0)
    assert assign_splits(200, 0) != assign_splits(200, 1)
    assert [r["split"] for r in _meta(easy)] == assign_splits(16, 0)


# ----------------------------------------------------------------------------------------------- masks and labels


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("which", ["easy", "hard", "ms3"])
def test_masks_nonempty_disjoint_and_boxes_tight(which, request):
    root = request.getfixturevalue(which)
    for row in _meta(root):
        for frame, gt, other, xml in zip(*(_frame_paths(root, row, kind) for kind in
                                           ("visual_frames", "gt_masks", "other_masks")),
                                         _frame_paths(root, row, "labels", "xml")):
            gt_mask = cv2.imread(str(gt), cv2.IMREAD_UNCHANGED)
            other_mask = cv2.imread(str(other), cv2.IMREAD_UNCHANGED)
            assert gt_mask.ndim == 2 and set(np.unique(gt_mask)) == {0, 255}
            assert other_mask.ndim == 2 and set(np.unique(other_mask)) == {0, 255}
            assert not (gt_mask & other_mask).any(), f"{gt.name}: sounding and other masks overlap"
            objects = _xml_objects(xml)
            assert [name for name, _ in objects] == row["sounding_categories"].split(";")
            union = np.array(objects[0][1])
            for _, box in objects:
                union = np.r_[np.minimum(union[:2], box[:2]), np.maximum(union[2:], box[2:])]
            # Each box is the tight box of one object's visible pixels, so together they bound the gt mask exactly.
            assert tuple(union) == _tight_box(gt_mask > 0), xml.name
            if len(objects) == 1:
                assert objects[0][1] == _tight_box(gt_mask > 0)


def test_xml_has_labelimg_structure(easy):
    row = _meta(easy)[0]
    for k, (xml, frame) in enumerate(zip(_frame_paths(easy, row, "labels", "xml"),
                                         _frame_paths(easy, row, "visual_frames")), start=1):
        data = xml.read_bytes()
        assert data.startswith(b"<annotation>\n\t<folder>") and data.endswith(b"</annotation>\n")
        root = etree.fromstring(data, SAFE_PARSER)
        assert [c.tag for c in root] == ["folder", "filename", "path", "source", "size", "segmented", "object"]
        assert [c.tag for c in root.find("source")] == ["database"]
        assert [c.tag for c in root.find("size")] == ["width", "height", "depth"]
        obj = root.find("object")
        assert [c.tag for c in obj] == ["name", "pose", "truncated", "difficult", "bndbox"]
        assert [c.tag for c in obj.find("bndbox")] == ["xmin", "ymin", "xmax", "ymax"]
        assert root.findtext("folder") == row["name"]
        assert root.findtext("filename") == frame.name == f"{row['name']}_{k}.png"
        assert (easy / root.findtext("path")) == frame   # relative to the output folder
        assert [root.find("size").findtext(t) for t in ("width", "height", "depth")] == ["64", "64", "3"]
        assert (root.findtext("segmented"), obj.findtext("pose"), obj.findtext("difficult")) == ("0", "Unspecified", "0")
        assert obj.findtext("truncated") == "0"   # objects keep off the frame edges


@pytest.mark.parametrize("stem", ["-0uAFG4aAZQ_1", "-0uAFG4aAZQ_2", "gray_5", "고양이_1"])
def test_xml_writer_reproduces_labelimg_bytes(stem):
    reference = (LABELIMG_REFERENCE / "voc" / f"{stem}.xml").read_bytes()
    root = etree.fromstring(reference, SAFE_PARSER)
    size = [int(root.find("size").findtext(t)) for t in ("width", "height", "depth")]
    written = labelimg_xml(root.findtext("folder"), root.findtext("filename"), root.findtext("path"), *size,
                           objects=_xml_objects(LABELIMG_REFERENCE / "voc" / f"{stem}.xml"))
    assert written == reference


def test_yolo_matches_xml(easy):
    names = class_names(5)
    assert (easy / "yolo" / "classes.txt").read_text() == "".join(f"{n}\n" for n in names)
    line_format = re.compile(r"^\d+ \d\.\d{6} \d\.\d{6} \d\.\d{6} \d\.\d{6}$")
    for row in _meta(easy):
        for txt, xml in zip(_frame_paths(easy, row, "yolo", "txt"), _frame_paths(easy, row, "labels", "xml")):
            lines = txt.read_text().splitlines()
            objects = _xml_objects(xml)
            assert len(lines) == len(objects)
            for line, (name, (x0, y0, x1, y1)) in zip(lines, objects):
                assert line_format.match(line), line
                cls, cx, cy, w, h = line.split()
                assert names[int(cls)] == name
                expected = [(x0 + x1) / 128, (y0 + y1) / 128, (x1 - x0) / 64, (y1 - y0) / 64]
                assert np.allclose([float(cx), float(cy), float(w), float(h)], expected, atol=5e-7 + 1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------- audio


def test_wav_format_and_class_sounds(easy):
    specs = class_specs(5)
    index = {s.name: s.index for s in specs}
    for row in _meta(easy):
        wav = easy / "audio_wav" / row["split"] / row["category"] / f"{row['name']}.wav"
        info = sf.info(str(wav))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE, 1, "PCM_16", "WAV")
        assert info.frames >= T * SAMPLE_RATE
        # The sounding class's band holds most of the energy: the audio identifies the class.
        energies = [_band_energy(wav, s.band_hz) for s in specs]
        assert int(np.argmax(energies)) == index[row["category"]], row["name"]
        assert max(energies) > 20 * sorted(energies)[-2]


def test_render_class_audio_differs_between_classes():
    specs = class_specs(5)
    peaks = []
    for spec in specs:
        audio = render_class_audio(spec.index, 1.0, np.random.default_rng(0), num_classes=5)
        assert audio.dtype == np.float32 and audio.shape == (SAMPLE_RATE,)
        assert np.sqrt(np.mean(audio.astype(np.float64) ** 2)) == pytest.approx(0.1, rel=1e-3)
        spectrum = np.abs(np.fft.rfft(audio))
        peak = float(np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[spectrum.argmax()])
        assert spec.band_hz[0] * 0.97 <= peak <= spec.band_hz[1] * 1.03, spec.name
        peaks.append(peak)
    assert len(set(peaks)) == len(peaks)
    low, high = (s.band_hz for s in specs[:2])
    assert low[1] < high[0], "class bands must not overlap"


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_identical_bytes_anywhere_and_with_two_workers(easy, tmp_path):
    reference = _hashes(easy)
    assert _hashes(_generate(tmp_path / "elsewhere" / "copy")) == reference
    assert _hashes(_generate(tmp_path / "parallel", workers=2)) == reference


def test_different_seed_gives_different_data(easy, tmp_path):
    other = _hashes(_generate(tmp_path / "seed1", seed=1))
    reference = _hashes(easy)
    frames = [k for k in reference if k.startswith("visual_frames/")]
    assert other.keys() != reference.keys() or all(other[k] != reference[k] for k in frames)
    assert (tmp_path / "seed1" / "meta.csv").read_bytes() != (easy / "meta.csv").read_bytes()


def test_rerun_into_same_folder_is_safe_and_foreign_folders_are_refused(easy, tmp_path):
    before = _hashes(easy)
    # Leave the folder as a killed run might: no meta.csv, a missing frame, a half-written temporary file.
    (easy / "meta.csv").unlink()
    frame = next(easy.glob("visual_frames/*/*/*/*_3.png"))
    frame.unlink()
    (frame.parent / f".{frame.name}.12345.tmp").write_bytes(b"\x89PNG half")
    _generate(easy)                  # same configuration: rewrites identical bytes
    assert _hashes(easy) == before
    with pytest.raises(InputError):
        _generate(easy, clips=17)    # would mix two sets
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        _generate(foreign)


@pytest.mark.parametrize("options", [{"num_classes": 3, "difficulty": "hard"}, {"sources": 3},
                                     {"difficulty": "medium"}, {"num_classes": 13}, {"clips": 0}, {"size": 20}])
def test_bad_options_are_rejected(options, tmp_path):
    with pytest.raises(ValueError) as error:
        generate(SynthConfig(out=tmp_path / "x", **options))
    assert isinstance(error.value, InputError)   # the CLI reports it in one line with exit code 2
    assert not (tmp_path / "x").exists()


def test_class_names_sorted_unique_and_bands_disjoint():
    for n in (3, 5, 12):
        names = class_names(n)
        assert names == sorted(names) and len(set(names)) == n
        bands = [s.band_hz for s in class_specs(n)]
        assert all(a[1] < b[0] for a, b in zip(bands, bands[1:]))


# ----------------------------------------------------------------------------------------------- no visual cue


def _scenes(count: int, **options):
    config = SynthConfig(out=Path("unused"), size=48, **options)
    return [sample_scene(np.random.default_rng([7, i]), config) for i in range(count)]


def test_no_visual_cue_reveals_the_sounding_object():
    scenes = _scenes(1000)
    drawn_first = np.mean([s.sounding[0] == 0 for s in scenes])
    assert abs(drawn_first - 0.5) < 0.06
    # Visible area (what a vision-only model sees) of the sounding vs the other object, averaged over frames.
    sounding = np.array([s.visible_masks[s.sounding[0]].sum() / T for s in scenes], dtype=float)
    other = np.array([s.visible_masks[s.other].sum() / T for s in scenes], dtype=float)
    assert abs(sounding.mean() / other.mean() - 1) < 0.05
    diff = sounding - other
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(len(diff))
    # Motion: same distribution of displacement over the clip.
    moves = [[np.linalg.norm(s.objects[i].centres[-1] - s.objects[i].centres[0]) for s in scenes]
             for i in (0, 1)]
    sounding_move = np.mean([m[s.sounding[0]] for m, s in zip(zip(*moves), scenes)])
    other_move = np.mean([m[s.other] for m, s in zip(zip(*moves), scenes)])
    assert abs(sounding_move / other_move - 1) < 0.06
    # Class pairs: within a pair, the lower-numbered class sounds about half the time.
    lower_sounds = np.mean([s.objects[s.sounding[0]].class_index < s.objects[s.other].class_index for s in scenes])
    assert abs(lower_sounds - 0.5) < 0.06


def test_hard_scenes_have_a_third_object_more_occlusion_and_a_distractor(hard):
    hard_scenes, easy_scenes = _scenes(200, difficulty="hard"), _scenes(200)
    assert all(len(s.objects) == 3 for s in hard_scenes)
    assert all(s.distractor_class not in {o.class_index for o in s.objects} for s in hard_scenes)
    assert all(s.distractor_class is None for s in easy_scenes)

    def occluded(scenes):
        return np.mean([(s.visible_masks.sum() < s.full_masks.sum()) for s in scenes])

    assert occluded(hard_scenes) > occluded(easy_scenes) + 0.2
    # Which of the three objects sounds is uniform over drawing positions.
    position_counts = np.bincount([s.sounding[0] for s in hard_scenes], minlength=3)
    assert position_counts.min() > 40

    specs = {s.name: s for s in class_specs(5)}
    with open(hard / "scenes.csv", newline="") as f:
        scenes = {r["name"]: r for r in csv.DictReader(f)}
    for row in _meta(hard):
        scene = scenes[row["name"]]
        visible = scene["visible_categories"].split(";")
        assert len(visible) == len(set(visible)) == 3
        assert row["category"] in visible and row["other_category"] in visible
        distractor = scene["distractor_category"]
        assert distractor in specs and distractor not in visible
        wav = hard / "audio_wav" / row["split"] / row["category"] / f"{row['name']}.wav"
        target = _band_energy(wav, specs[row["category"]].band_hz)
        mixed_in = _band_energy(wav, specs[distractor].band_hz)
        silent = [_band_energy(wav, specs[c].band_hz) for c in specs if c not in (row["category"], distractor)]
        # The distractor is audible about 10 dB below the target, and well above the classes that are not playing.
        assert -16 < 10 * np.log10(mixed_in / target) < -4, row["name"]
        assert mixed_in > 5 * max(silent)


def test_ms3_has_two_sounding_classes(ms3):
    specs = {s.name: s for s in class_specs(5)}
    with open(ms3 / "scenes.csv", newline="") as f:
        scenes = {r["name"]: r for r in csv.DictReader(f)}
    for row in _meta(ms3):
        sounding = row["sounding_categories"].split(";")
        assert len(sounding) == len(set(sounding)) == 2 and sounding[0] == row["category"]
        assert row["other_category"] not in sounding
        assert set(scenes[row["name"]]["visible_categories"].split(";")) == {*sounding, row["other_category"]}
        wav = ms3 / "audio_wav" / row["split"] / row["category"] / f"{row['name']}.wav"
        energies = {name: _band_energy(wav, spec.band_hz) for name, spec in specs.items()}
        loudest_two = sorted(energies, key=energies.get)[-2:]
        assert set(loudest_two) == set(sounding), row["name"]
