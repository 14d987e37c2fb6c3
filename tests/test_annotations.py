"""labelImg parsers against labelImg's own output (tests/data/reference/labelimg) and at their edges."""
import json
from pathlib import Path

import pytest

from avsprep.annotations import Box, clip_box, parse_voc, parse_yolo, read_classes_file
from avsprep.errors import InputError

LABELIMG = Path(__file__).resolve().parent / "data" / "reference" / "labelimg"
EXPECTED = json.loads((LABELIMG / "expected.json").read_text(encoding="utf-8"))


def expected_boxes(entry):
    return [
        Box(name, *xyxy, difficult=difficult)
        for name, xyxy, difficult in zip(entry["names"], entry["boxes_xyxy"], entry["difficult"])
    ]


@pytest.mark.parametrize("entry", EXPECTED, ids=[e["image"] for e in EXPECTED])
def test_voc_boxes_come_back_exactly(entry):
    annotation = parse_voc(LABELIMG / "voc" / (Path(entry["image"]).stem + ".xml"))
    assert annotation.filename == entry["image"]
    assert (annotation.height, annotation.width) == tuple(entry["size_hwc"][:2])
    assert annotation.boxes == expected_boxes(entry)
    assert annotation.xml_path.startswith("/home/annotator/")


@pytest.mark.parametrize("entry", EXPECTED, ids=[e["image"] for e in EXPECTED])
def test_yolo_boxes_within_labelimg_rounding(entry):
    classes = read_classes_file(LABELIMG / "yolo" / "classes.txt")
    height, width = entry["size_hwc"][:2]
    annotation = parse_yolo(LABELIMG / "yolo" / (Path(entry["image"]).stem + ".txt"), classes, entry["image"], width, height)
    assert [box.name for box in annotation.boxes] == entry["names"]
    for box, xyxy in zip(annotation.boxes, entry["boxes_xyxy"]):
        # labelImg writes 6 decimals: half a unit of the 6th decimal times the side, well under a pixel.
        assert max(abs(a - b) for a, b in zip((box.xmin, box.ymin, box.xmax, box.ymax), xyxy)) <= 1


VOC_TEMPLATE = """<annotation><folder>f</folder><filename>a_1.png</filename>
<size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult><bndbox>{box}</bndbox></object></annotation>"""


def write_voc(tmp_path, xmin, ymin, xmax, ymax):
    path = tmp_path / "a_1.xml"
    path.write_text(VOC_TEMPLATE.format(box=f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"))
    return path


def test_float_coordinates_round_to_nearest(tmp_path):
    box = parse_voc(write_voc(tmp_path, 10.4, 10.5, 50.6, 60.49)).boxes[0]
    assert (box.xmin, box.ymin, box.xmax, box.ymax) == (10, 11, 51, 60)


@pytest.mark.parametrize("coords, problem", [
    ((50, 10, 20, 60), "inverted"),
    (("nan", 10, 20, 60), "not finite"),
    (("inf", 10, 20, 60), "not finite"),
    (("ten", 10, 20, 60), "not a number"),
    ((20, 10, 20, 60), "zero-area"),
])
def test_bad_boxes_are_input_errors_naming_the_file(tmp_path, coords, problem):
    path = write_voc(tmp_path, *coords)
    with pytest.raises(InputError, match=problem) as raised:
        parse_voc(path)
    assert str(path) in str(raised.value)


def test_box_outside_image_is_clipped_or_rejected(tmp_path):
    source = tmp_path / "x.xml"
    clipped, was_clipped = clip_box(Box("dog", -5, 10, 120, 70), 100, 80, source)
    assert was_clipped and (clipped.xmin, clipped.xmax) == (0, 100)
    assert clip_box(Box("dog", 0, 0, 100, 80), 100, 80, source) == (Box("dog", 0, 0, 100, 80), False)
    with pytest.raises(InputError, match="outside"):
        clip_box(Box("dog", 110, 10, 150, 70), 100, 80, source)


@pytest.mark.parametrize("text, problem", [
    ("<annotation><filename>a.png</filename>", "malformed XML"),
    ("<annotation><filename>a.png</filename></annotation>", "missing <size>"),
    ("<annotation><filename>a.png</filename><size><width>9</width><height>9</height></size>"
     "<object><name>x</name></object></annotation>", "missing <bndbox>"),
    ("<voc/>", "expected <annotation>"),
])
def test_malformed_xml(tmp_path, text, problem):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(InputError, match=problem):
        parse_voc(path)


def test_external_entities_are_not_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    path = tmp_path / "xxe.xml"
    path.write_text(f"""<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>
<annotation><filename>a_1.png</filename><size><width>9</width><height>9</height></size>
<object><name>&x;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>""")
    try:
        annotation = parse_voc(path)
    except InputError:
        return  # refusing the file is as good
    assert all("TOPSECRET" not in box.name for box in annotation.boxes)


@pytest.mark.parametrize("line, problem", [
    ("0 0.5 0.5 0.2", "expected 5 fields"),
    ("0 0.5 0.5 1.2 0.2", r"\[0, 1\]"),
    ("7 0.5 0.5 0.2 0.2", "class index 7"),
    ("a b c d e", "not numbers"),
])
def test_bad_yolo_lines(tmp_path, line, problem):
    path = tmp_path / "a_1.txt"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=problem):
        parse_yolo(path, ["cat", "dog"], "a_1.png", 100, 100)


def test_oversized_annotation_is_refused_unread(tmp_path):
    from avsprep.annotations import MAX_ANNOTATION_BYTES

    path = tmp_path / "huge.xml"
    with path.open("wb") as handle:
        handle.truncate(MAX_ANNOTATION_BYTES + 1)  # sparse: nothing to read, only the size counts
    with pytest.raises(InputError, match="above the .* byte cap"):
        parse_voc(path)
