"""Colour-mask predictions of a semantic model and the scoring of any method's colour PNGs (AVSS, docs/design.md §14).

Predictions use the exact palette colours (`avsprep.palette`), resized nearest-neighbour. Two layouts:
- "dataset": `<label>/<uid>/labels_rgb/<i>.png`, i from 0, the real frames only: the download's own layout, `<label>`
  the clip's version folder (v1s, v1m, v2) as the shards' `subset` records it. Shards written before `subset`
  existed do not know it: their clips go under `<split>/` instead (with a warning);
- "reference": `<uid>/<uid>_<i>.png` for all ten frames at 360×240, as the reference's `save_color_mask` writes.
`score_semantic` reads either layout (and the reference's own output), maps colours to the nearest palette colour
(other methods' resized PNGs blend edge colours) and resizes each prediction to its ground truth (nearest).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from avsprep.errors import InputError
from avsprep.palette import AVSS_CLASSES, classes_to_colours, colours_to_classes, nearest_palette_classes
from avsprep.shards import HDF5_READ_ERRORS, open_shard
from avstrain.data import ShardDataset
from avstrain.metrics import SemanticMeter
from avstrain.runtime import eval_mode
from avstrain.semantic_eval import semantic_logits

log = logging.getLogger(__name__)

LAYOUTS = ("dataset", "reference")
REFERENCE_SIZE = (360, 240)  # width, height of the reference's saved masks


def _write_png(path: Path, classes: np.ndarray, size: tuple[int, int] | None) -> None:
    if size is not None:
        classes = cv2.resize(classes, size, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), classes_to_colours(classes)[..., ::-1])


def clip_folders(dataset: ShardDataset) -> dict[str, str]:
    """Clip name -> the folder above `<uid>/` in the dataset layout: the clip's AVSS version (`subset`), read from
    the small 1-D datasets of the split's shards; the split for shards without `subset` (older imports)."""
    if not dataset.manifest.get("has_subset"):
        log.warning("%s records no AVSS version per clip (imported before `subset` existed): writing <split>/<uid>/ "
                    "instead of <label>/<uid>/; re-import with `avsprep avsbench --subset avss` for the download's "
                    "layout", dataset.shards_dir)
        return {}
    folders = {}
    for file in sorted({file for file, _ in dataset.index}):
        entry = next(entry for entry in dataset.manifest["shards"] if entry["file"] == file)
        with open_shard(dataset.shards_dir, dataset.manifest, entry) as handle:
            try:
                names, subsets = handle["name"].asstr()[()], handle["subset"].asstr()[()]
            except HDF5_READ_ERRORS as error:
                raise InputError(dataset.shards_dir / file, f"cannot read shard ({error})") from None
        folders.update(zip(names.tolist(), subsets.tolist()))
    return folders


def write_semantic_predictions(model: torch.nn.Module, shards_dir: str | Path, out: str | Path, split: str = "test",
                               device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                               batch_size: int = 4, layout: str = "dataset",
                               progress: Callable[[int], None] | None = None) -> int:
    """Write the argmax class of every pixel as palette colours; returns the number of PNGs written."""
    if layout not in LAYOUTS:
        raise InputError(None, f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    out, written = Path(out), 0
    dataset = ShardDataset(shards_dir, split, shuffle=False)
    folders = clip_folders(dataset) if layout == "dataset" else {}
    with eval_mode(model.to(device)):
        for batch in DataLoader(dataset, batch_size=batch_size):
            classes = semantic_logits(model, batch, device, amp_dtype).argmax(2).numpy().astype(np.uint8)  # [B,T,S,S]
            for name, clip, valid in zip(batch["name"], classes, batch["frame_valid"].numpy()):
                folder = out / folders.get(name, split) / name / "labels_rgb" if layout == "dataset" else out / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, frame in enumerate(clip):
                    if layout == "dataset" and not valid[i]:
                        continue
                    path = folder / (f"{i}.png" if layout == "dataset" else f"{name}_{i}.png")
                    _write_png(path, frame, REFERENCE_SIZE if layout == "reference" else None)
                    written += 1
            if progress:
                progress(len(batch["name"]))
    return written


def _frame_key(path: Path) -> tuple[str, int] | None:
    """(uid, i) of a mask PNG in either layout: `<uid>/labels_rgb/<i>.png` or `<uid>/<uid>_<i>.png`."""
    if path.parent.name == "labels_rgb" and path.stem.isdigit():
        return path.parent.parent.name, int(path.stem)
    uid, _, index = path.stem.rpartition("_")
    return (uid, int(index)) if uid and index.isdigit() else None


def _index(root: Path) -> dict[tuple[str, int], Path]:
    found = {}
    for path in sorted(Path(root).rglob("*.png")):
        key = _frame_key(path)
        if key is not None and "other_labels_rgb" not in path.parts:
            found[key] = path
    return found


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(path, "cannot read colour mask")
    return image[..., ::-1]


def split_uids(gt: str | Path, split: str) -> set[str]:
    """The uids of one split of the download's `metadata.csv` (in `gt` or `gt/AVSBench-semantic`). InputError when
    there is none, or the split has no clip."""
    from avsprep.avss import VERSIONS, locate_avss, read_avss_rows

    home = locate_avss(Path(gt))
    uids = {row.uid for row in read_avss_rows(home / "metadata.csv", VERSIONS) if row.split == split}
    if not uids:
        raise InputError(home / "metadata.csv", f"no clip of split {split!r}")
    return uids


def score_semantic(pred: str | Path, gt: str | Path, num_classes: int = AVSS_CLASSES,
                   split: str | None = None) -> dict:
    """The official metric of predicted colour PNGs against ground-truth colour masks, matched by (uid, frame).
    Frames with a ground truth count; a missing prediction counts as all background (and is counted). `split`: only
    the clips of that split of the download's metadata.csv (the whole download holds every split's masks, so a
    prediction of the test split would otherwise be scored against train and val frames it never predicted)."""
    predictions, truths = _index(pred), _index(gt)
    if split is not None:
        uids = split_uids(gt, split)
        truths = {key: path for key, path in truths.items() if key[0] in uids}
    if not truths:
        raise InputError(gt, "no ground-truth colour masks (<uid>/labels_rgb/<i>.png) here")
    meter, missing, off_palette = SemanticMeter(num_classes), 0, 0
    for key, gt_path in truths.items():
        target, off = colours_to_classes(_read_rgb(gt_path), num_classes)
        off_palette += off
        if key in predictions:
            classes = nearest_palette_classes(_read_rgb(predictions[key]), num_classes)
            classes = cv2.resize(classes, target.shape[::-1], interpolation=cv2.INTER_NEAREST)
        else:
            missing += 1
            classes = np.zeros_like(target)
        meter.update(torch.from_numpy(classes)[None], torch.from_numpy(target)[None])
    iou, f = meter.per_class()
    return {**meter.compute(), "frames": len(truths), "missing_predictions": missing,
            "gt_off_palette_pixels": off_palette, "clips": len({uid for uid, _ in truths}),
            "per_class_iou": [float(v) for v in iou], "per_class_f": [float(v) for v in f]}
