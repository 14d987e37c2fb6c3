"""CreateML and COCO JSON (avsprep.formats) against the VOC path for the same boxes, and every bad-input case.

The files are written by each format's own rules: CreateML as labelImg's CreateMLWriter computes it (centre and
size from the corner points, floats kept), COCO as [x, y, w, h] from the top-left.
"""
import json
import re
import tracemalloc

import pytest

from avsprep.annotations import clip_box, parse_voc
from avsprep.errors import InputError
from avsprep.formats import match_image_names, read_coco, read_createml
from helpers import write_voc

W, H = 100, 80
# image -> boxes (name, xmin, ymin, xmax, ymax): integer boxes, boxes on the border, dyadic floats (exact halves
# round up in every format, as VOC rounds them), an image without objects, two objects.
IMAGES = {
    "clip_1.png": [("dog", 10, 12, 50, 60)],
    "clip_2.png": [("dog", 0, 0, W, H)],
    "clip_3.png": [("cat", 10.5, 12.25, 50.75, 60.5)],
    "clip_4.png": [],
    "clip_5.png": [("dog", 3.37, 4.62, 41.01, 79.99), ("cat", 60, 0, 100, 30.5)],
}
CATEGORIES = {"dog": 1, "cat": 2}


def createml_entry(image, boxes):
    """One CreateML image entry, as labelImg's CreateMLWriter.calculate_coordinates makes it."""
    annotations = []
    for name, xmin, ymin, xmax, ymax in boxes:
        width, height = xmax - xmin, ymax - ymin
        coordinates = {"x": xmin + width / 2, "y": ymin + height / 2, "width": width, "height": height}
        annotations.append({"label": name, "coordinates": coordinates})
    return {"image": image, "verified": False, "annotations": annotations}


def coco_document(images=IMAGES, prefix="", folder=""):
    """A COCO export of `images` (file names `folder + prefix + image`), CVAT-style extra fields included."""
    document = {"info": {"description": "test"}, "licenses": [],
                "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in CATEGORIES.items()],
                "images": [], "annotations": []}
    for image_id, (image, boxes) in enumerate(images.items(), start=1):
        document["images"].append({"id": image_id, "file_name": folder + prefix + image, "width": W, "height": H})
        for name, xmin, ymin, xmax, ymax in boxes:
            document["annotations"].append({
                "id": len(document["annotations"]) + 1, "image_id": image_id, "category_id": CATEGORIES[name],
                "bbox": [xmin, ymin, xmax - xmin, ymax - ymin], "area": (xmax - xmin) * (ymax - ymin),
                "segmentation": [], "iscrowd": 0, "attributes": {"occluded": False}})
    return document


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def voc_boxes(tmp_path):
    boxes = {}
    for image, objects in IMAGES.items():
        xml = tmp_path / "voc" / image.replace(".png", ".xml")
        write_voc(xml, image, W, H, objects)
        boxes[image] = parse_voc(xml).boxes
    return boxes


def test_createml_files_per_image_give_the_voc_boxes(tmp_path, voc_boxes):
    folder = tmp_path / "createml"
    (folder / "sub").mkdir(parents=True)
    for index, (image, boxes) in enumerate(IMAGES.items()):
        # labelImg writes <image stem>.json beside the image; any folder depth is read
        where = folder / "sub" if index % 2 else folder
        write_json(where / image.replace(".png", ".json"), [createml_entry(image, boxes)])
    found = read_createml(folder)
    assert not found.problems
    assert {name: a.boxes for name, a in found.frames.items()} == voc_boxes
    assert found.frames["clip_4.png"].boxes == [] and found.frames["clip_1.png"].width is None


def test_one_createml_file_for_all_images(tmp_path, voc_boxes):
    path = write_json(tmp_path / "all.json", [createml_entry(image, boxes) for image, boxes in IMAGES.items()])
    assert {name: a.boxes for name, a in read_createml(path).frames.items()} == voc_boxes


def test_coco_gives_the_voc_boxes(tmp_path, voc_boxes):
    found = read_coco(write_json(tmp_path / "coco.json", coco_document(folder="task_1/")))
    assert not found.problems
    assert {name: a.boxes for name, a in found.frames.items()} == voc_boxes
    assert (found.frames["clip_1.png"].width, found.frames["clip_1.png"].height) == (W, H)


def test_label_studio_prefix_is_stripped_when_the_name_as_given_is_not_an_image(tmp_path, voc_boxes):
    document = coco_document(prefix="1a2b3c4d-", folder="images/")
    document["images"][0]["file_name"] = "images/clip_1.png"  # one image kept its name
    found = read_coco(write_json(tmp_path / "coco.json", document))
    matched = match_image_names(found, available=set(IMAGES) | {"0000beef-clip_9.png"})
    assert {name: a.boxes for name, a in matched.frames.items()} == voc_boxes
    assert matched.report["images_matched_as_given"] == 1
    assert matched.report["images_matched_without_prefix"] == len(IMAGES) - 1
    # A name that is an image as given is taken as given, even if it looks prefixed.
    as_given = match_image_names(found, available={"1a2b3c4d-clip_2.png", "clip_2.png"})
    assert "1a2b3c4d-clip_2.png" in as_given.frames and as_given.report["images_matched_as_given"] == 1


def test_partly_outside_box_is_kept_for_crops_to_clip(tmp_path):
    document = coco_document({"clip_1.png": [("dog", -5, 70, 30, 95)]})
    box = read_coco(write_json(tmp_path / "coco.json", document)).frames["clip_1.png"].boxes[0]
    assert clip_box(box, W, H, tmp_path)[1] is True  # clipped and counted, as VOC boxes are


def test_coco_size_is_bounded_and_the_file_parsed_once(tmp_path):
    images = {f"c{i:05d}_{k}.png": [("dog", 1.5, 2.25, 30, 40), ("cat", 50, 10, 99.75, 79)]
              for i in range(1500) for k in range(1, 3)}
    path = write_json(tmp_path / "big.json", coco_document(images))
    size = path.stat().st_size
    tracemalloc.start()
    found = read_coco(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(found.frames) == 3000
    # The text once plus compact annotations (a parse into dicts alone takes 4-5x the file).
    assert peak < 3.6 * size, peak / size
    with pytest.raises(InputError, match=r"above the 0.1 MB cap \(--max-json-mb\)"):
        read_coco(path, max_mb=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the entry.


def _coco_with(change):
    document = coco_document()
    change(document)
    return document


FILE_ERRORS = {
    "unknown category": (lambda d: d["annotations"][1].update(category_id=7),
                         r"annotations\[1\] \(id 2\): unknown category id 7"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=99), r"annotations\[0\] \(id 1\): unknown image id 99"),
    "image id twice": (lambda d: d["images"][1].update(id=1), r"images\[1\]: image id 1 listed twice"),
    "no size": (lambda d: d["images"][2].pop("width"), r"images\[2\] \('clip_3.png'\): width and height"),
    "not coco": (lambda d: d.pop("categories"), "must be an object with 'images', 'annotations' and 'categories'"),
    "annotation without bbox": (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\]: expected"),
}


@pytest.mark.parametrize("case", FILE_ERRORS)
def test_coco_file_errors(tmp_path, case):
    change, message = FILE_ERRORS[case]
    path = write_json(tmp_path / "coco.json", _coco_with(change))
    with pytest.raises(InputError, match=message) as caught:
        read_coco(path)
    assert caught.value.path == path and "\n" not in str(caught.value)


IMAGE_ERRORS = {
    "outside": (lambda d: d["annotations"][0].update(bbox=[120, 10, 20, 20]),
                r"annotations\[0\] \(id 1, image 'clip_1.png'\): box \(120, 10, 140, 30\) lies outside the 100x80"),
    "negative width": (lambda d: d["annotations"][0].update(bbox=[50, 10, -20, 20]), "inverted box for 'dog'"),
    "empty": (lambda d: d["annotations"][0].update(bbox=[50, 10, 0.2, 20]), "zero-area box for 'dog'"),
    "not a number": (lambda d: d["annotations"][0].update(bbox=[50, "x", 3, 20]), "bbox is not a finite number: 'x'"),
    "three numbers": (lambda d: d["annotations"][0].update(bbox=[50, 10, 3]), r"bbox must be \[x, y, width, height\]"),
    "listed twice": (lambda d: d["images"][1].update(file_name="clip_1.png"), "'clip_1.png' is annotated twice"),
}


@pytest.mark.parametrize("case", IMAGE_ERRORS)
def test_coco_image_errors_belong_to_their_image(tmp_path, case):
    change, message = IMAGE_ERRORS[case]
    path = write_json(tmp_path / "coco.json", _coco_with(change))
    found = read_coco(path)
    assert list(found.problems) == ["clip_1.png"]
    assert "clip_1.png" not in found.frames and len(found.frames) == len(IMAGES) - 1 - (case == "listed twice")
    error = found.problems["clip_1.png"]
    assert error.path == path and re.search(message, str(error)), str(error)


@pytest.mark.parametrize("entry, message", [
    ({"image": "clip_1.png", "annotations": [{"label": "dog", "coordinates": {"x": "nan", "y": 1, "width": 2,
                                                                               "height": 2}}]},
     r"entry 0 \('clip_1.png'\), annotation 0: x is not a finite number"),
    ({"image": "clip_1.png", "annotations": [{"label": "dog", "coordinates": {"x": 10, "y": 10, "width": -4,
                                                                               "height": 2}}]},
     "inverted box for 'dog'"),
    ({"image": "clip_1.png", "annotations": [{"label": "", "coordinates": {}}]}, "expected {\"label\""),
    ({"image": "clip_1.png", "annotations": "none"}, "'annotations' is not a list"),
])
def test_createml_entry_errors_belong_to_their_image(tmp_path, entry, message):
    path = write_json(tmp_path / "a.json", [entry, createml_entry("clip_2.png", IMAGES["clip_2.png"])])
    found = read_createml(path)
    assert list(found.frames) == ["clip_2.png"]
    assert found.problems["clip_1.png"].path == path
    assert re.search(message, str(found.problems["clip_1.png"]))


def test_createml_image_in_two_files(tmp_path):
    write_json(tmp_path / "a.json", [createml_entry("clip_1.png", IMAGES["clip_1.png"])])
    write_json(tmp_path / "b.json", [createml_entry("clip_1.png", IMAGES["clip_1.png"])])
    found = read_createml(tmp_path)
    assert not found.frames and "annotated twice" in str(found.problems["clip_1.png"])


@pytest.mark.parametrize("reader", [read_coco, read_createml])
@pytest.mark.parametrize("text, message", [
    ('{"images": [', "malformed JSON at line 1 column 13"),
    ('[{"image": "a.png",, }]', "malformed JSON at line 1 column 20"),
    ("\xff\xfe", "not UTF-8"),
])
def test_malformed_json(tmp_path, reader, text, message):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=message) as caught:
        reader(path)
    assert caught.value.path == path


@pytest.mark.parametrize("reader, message", [(read_coco, "cannot read JSON file"),
                                             (read_createml, "CreateML file or directory does not exist")])
def test_missing_file(tmp_path, reader, message):
    with pytest.raises(InputError, match=message):
        reader(tmp_path / "missing.json")


def test_createml_not_a_list_and_entry_without_image(tmp_path):
    with pytest.raises(InputError, match="must be a list of image entries, not a dict"):
        read_createml(write_json(tmp_path / "a.json", {"image": "x"}))
    with pytest.raises(InputError, match=r"entry 1: expected \{\"image\""):
        read_createml(write_json(tmp_path / "a.json", [createml_entry("clip_1.png", []), {"annotations": []}]))
