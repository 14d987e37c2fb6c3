"""`avsprep synth --semantic`: the synthetic scenes written as an AVSBench-semantic tree (docs/design.md §14).

    <out>/metadata.csv                     uid, label (v1s | v1m | v2), split, a_obj (the sounding classes)
    <out>/label2idx.json                   background + the synth classes, in class order
    <out>/<label>/<uid>/frames/<i>.jpg     i from 0
    <out>/<label>/<uid>/labels_rgb/<i>.png colour masks, palette colour c + 1 for synth class c
    <out>/<label>/<uid>/other_labels_rgb/<i>.png  the visible silent object (the swap test's target)
    <out>/<label>/<uid>/audio.wav

The versions are mixed as AVSS mixes them: v1s-like (5 frames, one sounding object), v1m-like (5 frames, two) and
v2-like (10 frames, one or two), by a seeded draw per clip. Scenes, frames and sounds are `avsprep.synth`'s, so the
same seed gives the same kind of scenes as the binary sets.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from avsprep.palette import classes_to_colours
from avsprep.synth import (SynthConfig, SynthSummary, _render_audio, _render_frames, _wav, _write_atomic,
                           assign_splits, class_names, clip_name, sample_scene)

log = logging.getLogger(__name__)

# (version, frames, sounding objects) and how often each is drawn
VARIANTS = (("v1s", 5, 1), ("v1m", 5, 2), ("v2", 10, 1), ("v2", 10, 2))
VARIANT_WEIGHTS = (0.4, 0.25, 0.2, 0.15)
_SEMANTIC_STREAM = 7  # the generator stream of the version draw, apart from synth's own streams


def _colour_mask(scene, objects: list[int], t: int) -> np.ndarray:
    """[H,W,3] RGB: palette colour (class + 1) on the visible pixels of each listed object, black elsewhere."""
    classes = np.zeros(scene.visible_masks.shape[-2:], np.uint8)
    for i in objects:
        classes[scene.visible_masks[i, t]] = scene.objects[i].class_index + 1
    return classes_to_colours(classes)


def _encode(image_rgb: np.ndarray, suffix: str) -> bytes:
    ok, data = cv2.imencode(suffix, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def write_semantic_clip(config: SynthConfig, index: int, split: str, variant: tuple[str, int, int]) -> list[str]:
    """Sample, render and write one clip; returns its metadata row [uid, label, split, a_obj]."""
    version, frames_per_clip, sources = variant
    clip_config = dataclasses.replace(config, frames_per_clip=frames_per_clip, sources=sources)
    rng = np.random.default_rng([config.seed, _SEMANTIC_STREAM, index])
    scene = sample_scene(rng, clip_config)
    frames = _render_frames(rng, scene, clip_config)
    pcm, _ = _render_audio(rng, scene, clip_config, split)
    uid = clip_name(index)
    folder = config.out / version / uid
    for sub in ("frames", "labels_rgb", "other_labels_rgb"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        _write_atomic(folder / "frames" / f"{t}.jpg", _encode(frame, ".jpg"))
        _write_atomic(folder / "labels_rgb" / f"{t}.png", _encode(_colour_mask(scene, list(scene.sounding), t), ".png"))
        _write_atomic(folder / "other_labels_rgb" / f"{t}.png", _encode(_colour_mask(scene, [scene.other], t), ".png"))
    _write_atomic(folder / "audio.wav", _wav(pcm, config.sample_rate))
    names = class_names(config.num_classes, config.style)
    sounding = ";".join(names[scene.objects[i].class_index] for i in scene.sounding)
    return [uid, version, split, sounding, names[scene.objects[scene.other].class_index]]


def generate_semantic(config: SynthConfig, progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Write the AVSBench-semantic-like tree of `config` (its clips, classes, size, seed); one process."""
    config.validate()
    started = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(config.clips, config.seed)
    draw = np.random.default_rng([config.seed, _SEMANTIC_STREAM]).choice(len(VARIANTS), size=config.clips,
                                                                         p=VARIANT_WEIGHTS)
    rows = []
    for index in range(config.clips):
        rows.append(write_semantic_clip(config, index, splits[index], VARIANTS[int(draw[index])]))
        if progress:
            progress(1)
    names = class_names(config.num_classes, config.style)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["uid", "label", "split", "a_obj", "other_obj"])
    writer.writerows(rows)
    _write_atomic(config.out / "metadata.csv", table.getvalue().encode())
    label2idx = {"background": 0, **{name: i + 1 for i, name in enumerate(names)}}
    _write_atomic(config.out / "label2idx.json", (json.dumps(label2idx, indent=1) + "\n").encode())
    per_split = dict(Counter(row[2] for row in rows))
    per_version = dict(Counter(row[1] for row in rows))
    seconds = time.perf_counter() - started
    log.info("synth --semantic: %d clips (%s; %s) written to %s in %.1f s", len(rows), per_split, per_version,
             config.out, seconds)
    per_class = {name: sum(name in row[3].split(";") for row in rows) for name in names}
    return SynthSummary(out=config.out, clips=len(rows), per_split=per_split, per_class=per_class,
                        per_split_class={}, meta_csv=config.out / "metadata.csv",
                        info_json=config.out / "label2idx.json", seconds=seconds)
