"""The shard schema is written down once (`avsprep.shards.SHARD_SCHEMA`): the README's table must say the same."""
from __future__ import annotations

import re
from pathlib import Path

from avsprep.embedding import EMBEDDING_DIM
from avsprep.shards import SCHEMA_VERSION, SHARD_SCHEMA, expected_shapes

README = Path(__file__).resolve().parents[1] / "README.md"
README_DTYPES = {"UTF-8 string": "str"}  # how the README spells a dtype the table names otherwise


def readme_schema() -> tuple[int, str, list[dict]]:
    """(schema_version in the heading, the prose above the table, the table's rows) of the README's section."""
    text = README.read_text(encoding="utf-8")
    heading = re.search(r"^### Shard schema \(schema_version (\d+)\)$", text, re.MULTILINE)
    assert heading, "README has no '### Shard schema (schema_version N)' section"
    section = text[heading.end():].split("\n### ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            name, shape, dtype, meaning = cells
            dims = tuple(int(d) if d.isdigit() else d for d in shape.strip("[]").split(","))
            rows.append({"name": name.strip("`"), "shape": dims, "dtype": README_DTYPES.get(dtype, dtype),
                         "meaning": meaning})
    return int(heading[1]), section.split("\n|", 1)[0], rows


def test_readme_schema_table_matches_the_code():
    version, prose, rows = readme_schema()
    assert version == SCHEMA_VERSION
    assert [row["name"] for row in rows] == [field.name for field in SHARD_SCHEMA]
    for row, field in zip(rows, SHARD_SCHEMA):
        assert (row["shape"], row["dtype"]) == (field.shape, field.dtype), field.name
        # A dataset only some shards have says so in the README.
        assert ("only with" in row["meaning"]) == (field.only_if is not None), field.name
    assert re.search(rf"\bE = {EMBEDDING_DIM}\b", prose), "the README gives E, the audio embedding size"


def test_expected_shapes_follow_the_table():
    manifest = {"frames_per_clip": 5, "image_size": 64, "crop_size": 32, "max_boxes": 4, "classes": ["a", "b", "c"],
                "audio_dim": EMBEDDING_DIM, "has_other_masks": False}
    shapes = expected_shapes(manifest, 7)
    assert "other_masks" not in shapes and "other_label" not in shapes
    assert shapes["frames"] == ((7, 5, 64, 64, 3), "uint8") and shapes["crops"] == ((7, 5, 32, 32, 3), "uint8")
    assert shapes["boxes"] == ((7, 5, 4, 4), "float32") and shapes["audio"] == ((7, 5, EMBEDDING_DIM), "float32")
    assert shapes["sounding"] == ((7, 3), "bool") and shapes["name"] == ((7,), "object")
    with_other = expected_shapes({**manifest, "has_other_masks": True, "has_frame_valid": True, "has_subset": True}, 7)
    assert with_other["other_masks"] == ((7, 5, 64, 64), "uint8") and with_other["other_label"] == ((7,), "int16")
    assert list(with_other) == [field.name for field in SHARD_SCHEMA]
    assert with_other["subset"] == ((7,), "object") and "subset" not in shapes
