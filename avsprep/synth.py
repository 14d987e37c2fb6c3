"""Synthetic audio-visual segmentation benchmark (`avsprep synth`, docs/design.md §9).

Every scene shows two or more objects of different classes; only the sounding one is the target, so a model that
ignores the audio cannot beat about 0.5 mIoU. Each class has a look (shape, colour; a texture in hard mode) and a
sound (a band-limited harmonic complex or a band of noise, each in its own mel region, amplitude-modulated at a class
rate), so the class is plain from a 0.96 s log-mel while nothing in the picture says which object sounds:

* every object's size, position, motion and rotation come from the same distributions;
* the classes shown are a random ordered draw, and the list order is the drawing order (back to front), so either
  object may occlude the other;
* the sounding object(s) are picked uniformly *after* the geometry is final, so no placement or visibility rule
  can correlate with being the target.

``difficulty="hard"`` adds object textures, more frequent partial occlusion, one more visible object and an
off-screen class's sound mixed in about 10 dB below the target. ``sources=2`` gives MS3-style scenes: two sounding
objects, their sounds mixed, plus a visible silent one.

Data unlike the default (each option off by default, so the default set's bytes are unchanged):

* ``style=N`` (N >= 1): the classes of a seeded style family (`avsprep.synth_styles`): outlines, two-colour
  patterns, colours and sound types (chirps, noise bursts, clicks, vowels, harmonic tones) the default never draws;
  the scene distributions, and with them the no-visual-cue guarantees above, are the same for every style.
* ``image_format="jpg"`` (frames as JPEG, quality 90; masks stay PNG), ``width``/``height`` (non-square frames;
  object sizes and motion are fractions of the shorter side), ``sample_rate``/``channels`` (the WAV's format: the
  16 kHz mix resampled, the same signal in every channel).
* ``sounds=DIR``: one folder of recordings per class (`avsprep.synth_recordings`); the class set becomes those
  folders and every clip's sound an excerpt of its class's recordings from the part of each recording reserved for
  the clip's split (first 70 % train, next 15 % val, last 15 % test), mixed as the synthetic sounds are.

Output (``out/``, AVSBench S4 layout plus labelImg annotations)::

    meta.csv                                           name,category,split,other_category,sounding_categories
    scenes.csv                                         name,split,visible_categories,distractor_category
                                                       (+ audio_excerpts "<class>/<file>.wav@<start>;..." with sounds)
    info.json                                          generator config and class specs (deterministic)
    visual_frames/<split>/<category>/<name>/<name>_<k>.png   k = 1..T (.jpg with image_format="jpg")
    gt_masks/<split>/<category>/<name>/<name>_<k>.png        0/255, visible pixels of the sounding object(s)
    other_masks/<split>/<category>/<name>/<name>_<k>.png     0/255, visible pixels of the silent object `other_category`
    audio_wav/<split>/<category>/<name>.wav                  PCM_16, T + 0.05 s (default 16 kHz mono)
    labels/<split>/<category>/<name>/<name>_<k>.xml          labelImg VOC, one <object> per sounding object
    yolo/<split>/<category>/<name>/<name>_<k>.txt, yolo/classes.txt   (yolo=True only)

Determinism: clip i draws everything from ``np.random.default_rng([seed, 1, i])``, so the bytes of every file depend on
the seed and the configuration only (not on ``workers`` nor on where ``out`` is). Each file is written to a hidden
temporary name and renamed, so an interrupted run never leaves a truncated file under its final name. ``info.json`` is
written first and ``meta.csv`` last: a folder with ``meta.csv`` is complete. Re-running into a folder whose
``info.json`` matches rewrites every file with identical bytes (finishing an interrupted run); any other non-empty
folder is refused rather than mixed with foreign files.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
from lxml import etree

from avsprep.errors import InputError
from avsprep.synth_recordings import RecordingSet, resample, scan_recordings
from avsprep.synth_styles import StyledClassSpec, background_tint, style_classes

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SPLITS = ("train", "val", "test")
MAX_CLASSES = 12
#: Frame formats and the encoder settings they are written with (JPEG quality 90, a common camera/export setting).
IMAGE_FORMATS = {"png": [], "jpg": [cv2.IMWRITE_JPEG_QUALITY, 90]}
#: Audio is written this much longer than T seconds, so a reader framing T whole seconds never runs short.
AUDIO_TAIL_S = 0.05
#: RMS of a written clip and of `render_class_audio` output (about -20 dBFS: headroom for PCM_16).
SOURCE_RMS = 0.1

# Seed streams: clip i uses [seed, _CLIP_STREAM, i]; the split permutation uses [seed, _SPLIT_STREAM].
_SPLIT_STREAM = 0
_CLIP_STREAM = 1

# Class looks, most distinct first: the default five classes take the first five colours and shapes.
_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)), ("blue", (40, 90, 230)), ("yellow", (235, 215, 40)), ("green", (40, 170, 60)),
    ("magenta", (215, 50, 215)), ("cyan", (40, 210, 225)), ("orange", (245, 135, 30)), ("purple", (120, 60, 190)),
    ("pink", (250, 150, 190)), ("brown", (130, 75, 30)), ("lime", (165, 235, 60)), ("navy", (25, 35, 120)),
)
_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "arrow", "bar")
_TEXTURES = ("stripes", "checker", "dots", "waves")

#: Object size: side of the square with the object's area, as a fraction of the frame side. Bounding boxes then span
#: about 20-45 % of the frame, big enough to segment after resizing to 64-96 px.
_SIZE_RANGE = (0.20, 0.32)
#: Displacement over the whole clip (fraction of the frame side) and rotation (degrees).
_MOVE_RANGE = (0.02, 0.10)
_TILT_RANGE = 20.0
_SPIN_RANGE = 15.0
#: Objects keep this many pixels away from the frame edge, so a tight box never touches it (no labelImg clamping).
_EDGE_MARGIN_PX = 2
_MAX_PLACEMENT_TRIES = 500


@dataclass(frozen=True)
class _Difficulty:
    extra_objects: int              # visible silent objects beyond the one every scene has
    min_visible: float              # each object keeps this fraction of its pixels visible in every frame
    near_probability: float         # chance that an object is placed overlapping an earlier one (occlusion)
    textured: bool                  # textured objects and a busier background
    distractor_db: float | None     # level of an off-screen class's sound relative to the target
    snr_db: tuple[float, float]     # target-to-background-noise ratio range
    pixel_noise: tuple[float, float]  # per-frame Gaussian pixel noise sigma range (0-255 scale)


_DIFFICULTY = {
    "easy": _Difficulty(0, 0.75, 0.0, False, None, (20.0, 30.0), (2.0, 6.0)),
    "hard": _Difficulty(1, 0.45, 0.6, True, -10.0, (12.0, 20.0), (5.0, 12.0)),
}


# ----------------------------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassSpec:
    """What a class looks and sounds like. `index` is the position of `name` in sorted order."""

    index: int
    name: str
    shape: str
    colour_rgb: tuple[int, int, int]
    texture: str                    # used in hard mode only
    sound: str                      # "harmonic" (band-limited harmonic complex) or "noise" (band of noise)
    band_hz: tuple[float, float]    # all of the class's sound energy lies in this band
    pitch_hz: float                 # harmonic: fundamental; partials are its multiples inside the band
    partials: tuple[int, ...]       # harmonic: partial numbers; empty for noise
    am_hz: float                    # amplitude-modulation rate


def _hz_to_mel(hz: float) -> float:
    """HTK mel scale, the one VGGish's log-mel uses."""
    return 1127.0 * math.log1p(hz / 700.0)


def _mel_to_hz(mel: float) -> float:
    return 700.0 * math.expm1(mel / 1127.0)


def _sound_bands(num_classes: int) -> list[tuple[float, float]]:
    """Disjoint bands, equally wide in mel between 200 Hz and 6 kHz (inside VGGish's 125-7500 Hz), with guard gaps
    so that two classes never share a mel bin: classes stay separable even when mixed (MS3, distractor)."""
    lo, hi = _hz_to_mel(200.0), _hz_to_mel(6000.0)
    width = (hi - lo) / num_classes
    guard = 0.2 * width
    return [
        (round(_mel_to_hz(lo + k * width + guard), 1), round(_mel_to_hz(lo + (k + 1) * width - guard), 1))
        for k in range(num_classes)
    ]


class SynthOptionError(InputError, ValueError):
    """A bad generator option: a ValueError to library callers, bad input (one line, exit 2) to the CLI."""

    def __init__(self, problem: str):
        super().__init__(None, problem)


def _check_num_classes(num_classes: int) -> None:
    if not 3 <= num_classes <= MAX_CLASSES:
        raise SynthOptionError(f"--num-classes must be between 3 and {MAX_CLASSES}, got {num_classes}")


def class_specs(num_classes: int, style: int = 0) -> list[ClassSpec | StyledClassSpec]:
    """The class list of a synthetic set with `num_classes` classes, in index order (= sorted by name, the order in
    which `avsprep crops` numbers classes, so YOLO ids and shard labels agree). Style 0 is the default family,
    style N >= 1 a seeded family of `avsprep.synth_styles`."""
    _check_num_classes(num_classes)
    if style:
        return style_classes(num_classes, style)
    looks = sorted((f"{_COLOURS[k][0]}_{_SHAPES[k % len(_SHAPES)]}", k) for k in range(num_classes))
    bands = _sound_bands(num_classes)
    specs = []
    for index, (name, k) in enumerate(looks):
        lo, hi = bands[index]
        harmonic = index % 2 == 0   # neighbouring bands alternate between tone and noise
        pitch = round((hi - lo) / 3.5, 1) if harmonic else 0.0
        partials = tuple(range(math.ceil(lo / pitch), math.floor(hi / pitch) + 1)) if harmonic else ()
        specs.append(ClassSpec(
            index=index, name=name, shape=_SHAPES[k % len(_SHAPES)], colour_rgb=_COLOURS[k][1],
            texture=_TEXTURES[k % len(_TEXTURES)], sound="harmonic" if harmonic else "noise",
            band_hz=(lo, hi), pitch_hz=pitch, partials=partials, am_hz=2.0 + 0.75 * index,
        ))
    return specs


def class_names(num_classes: int, style: int = 0) -> list[str]:
    """Class names in index order (sorted)."""
    return [spec.name for spec in class_specs(num_classes, style)]


def set_classes(config: SynthConfig, recordings: RecordingSet | None = None) -> list[ClassSpec | StyledClassSpec]:
    """The classes of a set: those of its style, named after the --sounds folders when it has recordings (whose
    excerpts then replace the classes' synthetic sounds)."""
    specs = class_specs(config.num_classes, config.style)
    if recordings is None:
        return specs
    return [dataclasses.replace(spec, name=name) for spec, name in zip(specs, recordings.classes)]


# ----------------------------------------------------------------------------------------------- config


@dataclass
class SynthConfig:
    """Options of `avsprep synth`, one field per command-line option."""

    out: Path
    clips: int = 600
    num_classes: int | None = None  # None: 5, or with `sounds` the number of class folders
    size: int = 224                 # frame side, unless width/height say otherwise
    frames_per_clip: int = 5
    sources: int = 1                # 1: S4-style, 2: MS3-style (two sounding objects, mixed audio)
    difficulty: str = "easy"        # "easy" | "hard"
    seed: int = 0
    yolo: bool = False
    workers: int = 1
    style: int = 0                  # 0: the default classes; N >= 1: style family N (avsprep.synth_styles)
    image_format: str = "png"       # frames: "png" | "jpg" (masks are always PNG)
    width: int | None = None        # frame width (default: size)
    height: int | None = None       # frame height (default: size)
    sample_rate: int = SAMPLE_RATE  # of the written WAVs
    channels: int = 1               # of the written WAVs: the same signal in each
    sounds: Path | None = None      # one folder of WAV recordings per class (avsprep.synth_recordings)
    semantic: bool = False          # an AVSBench-semantic tree instead (avsprep.synth_semantic)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.sounds = None if self.sounds is None else Path(self.sounds)
        if self.num_classes is None and self.sounds is None:
            self.num_classes = 5

    @property
    def frame_width(self) -> int:
        return self.size if self.width is None else self.width

    @property
    def frame_height(self) -> int:
        return self.size if self.height is None else self.height

    @property
    def scale_px(self) -> int:
        """The side that object sizes, positions and motion are fractions of: the shorter one."""
        return min(self.frame_width, self.frame_height)

    @property
    def frame_suffix(self) -> str:
        return f".{self.image_format}"

    @property
    def visible_objects(self) -> int:
        """Objects in every scene: the sounding ones, one silent one, and one more silent one in hard mode."""
        return self.sources + 1 + _DIFFICULTY[self.difficulty].extra_objects

    def validate(self) -> None:
        """Raise SynthOptionError (a ValueError) naming the first bad option."""
        if self.difficulty not in _DIFFICULTY:
            raise SynthOptionError(f"--difficulty must be one of {sorted(_DIFFICULTY)}, got {self.difficulty!r}")
        if self.sources not in (1, 2):
            raise SynthOptionError(f"--sources must be 1 or 2, got {self.sources}")
        _check_num_classes(self.num_classes)
        # One class must always be off screen: the hard-mode distractor and the evaluation's off-screen audio need it.
        if self.num_classes < self.visible_objects + 1:
            raise SynthOptionError(
                f"--num-classes must be at least {self.visible_objects + 1} with --sources {self.sources} and "
                f"--difficulty {self.difficulty} (scenes show {self.visible_objects} classes and one more must be "
                f"off screen), got {self.num_classes}")
        for option, value, least in (("--clips", self.clips, 1), ("--size", self.size, 32),
                                     ("--width", self.frame_width, 32), ("--height", self.frame_height, 32),
                                     ("--frames-per-clip", self.frames_per_clip, 1), ("--workers", self.workers, 1),
                                     ("--style", self.style, 0), ("--sample-rate", self.sample_rate, 8000),
                                     ("--channels", self.channels, 1)):
            if value < least:
                raise SynthOptionError(f"{option} must be at least {least}, got {value}")
        if self.image_format not in IMAGE_FORMATS:
            raise SynthOptionError(f"--image-format must be one of {list(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.channels > 8 or self.sample_rate > 192_000:
            raise SynthOptionError(f"--channels must be at most 8 and --sample-rate at most 192000, got "
                                   f"{self.channels} and {self.sample_rate}")

    def with_recordings(self) -> tuple[SynthConfig, RecordingSet | None]:
        """This config with `num_classes` settled by the --sounds folders (read and checked here), and those
        recordings; (self, None) without `sounds`. Raises InputError for bad recordings or a contradicting
        --num-classes."""
        if self.sounds is None:
            return self, None
        recordings = scan_recordings(self.sounds, self.frames_per_clip + AUDIO_TAIL_S)
        found = len(recordings.classes)
        if self.num_classes not in (None, found):
            raise SynthOptionError(f"--num-classes {self.num_classes} contradicts the {found} class folders of "
                                   f"--sounds {self.sounds}; leave it out")
        return dataclasses.replace(self, num_classes=found), recordings


@dataclass
class SynthSummary:
    """What `generate` wrote."""

    out: Path
    clips: int
    per_split: dict[str, int]
    per_class: dict[str, int]                  # clips by category (the primary sounding class)
    per_split_class: dict[str, dict[str, int]]
    meta_csv: Path
    info_json: Path
    seconds: float


# ----------------------------------------------------------------------------------------------- scenes


def _unit_outline(shape: str) -> np.ndarray | None:
    """Polygon vertices (x, y; y down) of `shape` scaled to unit area; None for the round shapes."""
    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.cos(a), (1.0 if i % 2 == 0 else 0.45) * math.sin(a))
               for i, a in enumerate(np.radians(np.arange(10) * 36 - 90))]
    elif shape == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    elif shape == "arrow":
        pts = [(-1, -0.3), (0.2, -0.3), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3)]
    elif shape == "bar":
        pts = [(-1, -0.35), (1, -0.35), (1, 0.35), (-1, 0.35)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    poly = np.asarray(pts, dtype=np.float64)
    x, y = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return poly / math.sqrt(area)


_RING_INNER = 0.55   # inner radius of a ring as a fraction of the outer one
_OUTLINES = {shape: _unit_outline(shape) for shape in _SHAPES}
#: Unit-area radii of the round shapes (outer radius for the ring).
_ROUND_RADIUS = {"circle": 1 / math.sqrt(math.pi), "ring": 1 / math.sqrt(math.pi * (1 - _RING_INNER ** 2))}
#: Farthest point from the centre of each unit-area shape: keeps objects inside the frame under any rotation.
_EXTENT = {shape: (_ROUND_RADIUS[shape] if _OUTLINES[shape] is None
                   else float(np.hypot(_OUTLINES[shape][:, 0], _OUTLINES[shape][:, 1]).max()))
           for shape in _SHAPES}


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One object over the T frames of a clip; positions are fractions of the frame side."""

    class_index: int
    shape: str
    outline: np.ndarray | None  # [V, 2] unit-area polygon; None for the round shapes (circle, ring)
    extent: float               # farthest point of the unit-area shape from its centre
    size: float                 # side of the square with the object's area (fraction of the frame's shorter side)
    centres: np.ndarray         # [T, 2] x, y (fractions of the shorter side)
    angles: np.ndarray          # [T] rotation, degrees
    shade_rgb: np.ndarray       # [3] float, this object's version of its class colour
    texture_angle: float        # degrees, relative to the object
    texture_period: float       # texture period in units of `size`
    texture_phase: float        # in periods


@dataclass(frozen=True, eq=False)
class Scene:
    """A clip's content before rendering. `objects` is in drawing order (back to front)."""

    objects: tuple[SceneObject, ...]
    sounding: tuple[int, ...]           # indices into `objects`; sounding[0] is the clip's category
    other: int                          # index of the silent object reported as other_category
    distractor_class: int | None        # off-screen class whose sound is mixed in (hard mode)
    full_masks: np.ndarray              # [objects, T, H, W] bool: each object's whole shape
    visible_masks: np.ndarray           # same, minus what objects drawn later cover


def _shape_geometry(spec: ClassSpec | StyledClassSpec) -> tuple[np.ndarray | None, float]:
    """(unit-area outline or None for a round shape, extent) of a class's shape."""
    if isinstance(spec, StyledClassSpec):
        outline = spec.outline()
        return outline, float(np.hypot(outline[:, 0], outline[:, 1]).max())
    return _OUTLINES[spec.shape], _EXTENT[spec.shape]


def _rasterise(obj: SceneObject, width: int, height: int, size: int) -> np.ndarray:
    """[T, height, width] bool mask of the whole object in each frame; `size` is the frame's shorter side."""
    frames = np.zeros((len(obj.centres), height, width), dtype=np.uint8)
    scale = obj.size * size
    shift = 4   # sub-pixel vertex precision (1/16 px), so slow motion is smooth rather than stepping whole pixels
    one = 1 << shift
    outline = obj.outline
    for t, ((cx, cy), angle) in enumerate(zip(obj.centres * size, obj.angles)):
        mask = frames[t]
        if outline is None:
            centre = (round(cx * one), round(cy * one))
            radius = _ROUND_RADIUS[obj.shape] * scale
            cv2.circle(mask, centre, round(radius * one), 1, thickness=-1, lineType=cv2.LINE_8, shift=shift)
            if obj.shape == "ring":
                cv2.circle(mask, centre, round(radius * _RING_INNER * one), 0, thickness=-1,
                           lineType=cv2.LINE_8, shift=shift)
        else:
            a = math.radians(angle)
            rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            pts = outline @ rotation.T * scale + (cx, cy)
            cv2.fillPoly(mask, [np.round(pts * one).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
    return frames.astype(bool)


def _visible(full: np.ndarray) -> np.ndarray:
    """Visible part of each object given drawing order = axis 0 order (later objects cover earlier ones)."""
    visible = np.empty_like(full)
    covered = np.zeros_like(full[0])
    for i in range(len(full) - 1, -1, -1):
        visible[i] = full[i] & ~covered
        covered |= full[i]
    return visible


def _sample_object(rng: np.random.Generator, spec: ClassSpec | StyledClassSpec, placed: list[SceneObject],
                   difficulty: _Difficulty, config: SynthConfig) -> SceneObject:
    """One object with size, path and rotation drawn from the distributions every object shares."""
    outline, extent = _shape_geometry(spec)
    size, frames = config.scale_px, config.frames_per_clip
    obj_size = rng.uniform(*_SIZE_RANGE)
    reach = extent * obj_size + _EDGE_MARGIN_PX / size    # centre range that keeps it inside
    # The frame in units of its shorter side: (1, 1) when square, so square frames draw exactly what they always did.
    frame = np.array([config.frame_width, config.frame_height]) / size
    lo, hi = reach, frame - reach
    if placed and rng.random() < difficulty.near_probability:
        # Overlap an earlier object on purpose (hard mode): either may end up in front, as drawing order is random.
        anchor = placed[int(rng.integers(len(placed)))]
        anchor_reach = anchor.extent * anchor.size
        distance = (reach + anchor_reach) * rng.uniform(0.35, 0.75)
        heading = rng.uniform(0.0, 2 * math.pi)
        start = anchor.centres[0] + distance * np.array([math.cos(heading), math.sin(heading)])
    else:
        start = lo + (hi - lo) * rng.uniform(0.0, 1.0, size=2)
    start = np.clip(start, lo, hi)
    heading = rng.uniform(0.0, 2 * math.pi)
    end = np.clip(start + rng.uniform(*_MOVE_RANGE) * np.array([math.cos(heading), math.sin(heading)]), lo, hi)
    progress = np.linspace(0.0, 1.0, frames)
    tilt = rng.uniform(-_TILT_RANGE, _TILT_RANGE)
    spin = rng.uniform(-_SPIN_RANGE, _SPIN_RANGE)
    shade = np.clip(np.asarray(spec.colour_rgb, dtype=np.float64) * rng.uniform(0.85, 1.1)
                    + rng.normal(0.0, 6.0, size=3), 0.0, 255.0)
    return SceneObject(
        class_index=spec.index, shape=spec.shape, outline=outline, extent=extent, size=float(obj_size),
        centres=start + (end - start) * progress[:, None], angles=tilt + spin * progress, shade_rgb=shade,
        texture_angle=float(rng.uniform(0.0, 180.0)), texture_period=float(rng.uniform(0.25, 0.4)),
        texture_phase=float(rng.uniform(0.0, 1.0)),
    )


def sample_scene(rng: np.random.Generator, config: SynthConfig) -> Scene:
    """Draw one scene: objects of distinct random classes, placed until every object stays visible enough in every
    frame, then the sounding object(s) picked uniformly, independent of the geometry."""
    difficulty = _DIFFICULTY[config.difficulty]
    specs = class_specs(config.num_classes, config.style)
    n = config.visible_objects
    classes = [int(c) for c in rng.choice(config.num_classes, size=n, replace=False)]
    for _ in range(_MAX_PLACEMENT_TRIES):
        objects: list[SceneObject] = []
        for class_index in classes:
            objects.append(_sample_object(rng, specs[class_index], objects, difficulty, config))
        full = np.stack([_rasterise(obj, config.frame_width, config.frame_height, config.scale_px)
                         for obj in objects])
        visible = _visible(full)
        shown = visible.sum(axis=(2, 3))
        whole = full.sum(axis=(2, 3))
        # The same rule for every object, so rejection cannot favour the (not yet chosen) sounding one.
        if (shown > 0).all() and (shown >= difficulty.min_visible * whole).all():
            break
    else:
        raise RuntimeError(f"could not place {n} objects at {config.frame_width}x{config.frame_height} px in "
                           f"{_MAX_PLACEMENT_TRIES} tries")
    sounding = tuple(int(i) for i in rng.choice(n, size=config.sources, replace=False))
    silent = [i for i in range(n) if i not in sounding]
    other = int(silent[int(rng.integers(len(silent)))])
    distractor = None
    if difficulty.distractor_db is not None:
        offscreen = [c for c in range(config.num_classes) if c not in classes]
        distractor = int(offscreen[int(rng.integers(len(offscreen)))])
    return Scene(objects=tuple(objects), sounding=sounding, other=other, distractor_class=distractor,
                 full_masks=full, visible_masks=visible)


# ----------------------------------------------------------------------------------------------- pictures


def _background(rng: np.random.Generator, config: SynthConfig, busy: bool) -> np.ndarray:
    """[H, W, 3] float32 RGB: a grey level with soft, mostly colourless blobs, so that the saturated class
    colours stay the objects' own (a style adds its faint tint); hard mode adds fine grain and a grating."""
    width, height, size = config.frame_width, config.frame_height, config.scale_px
    cells = int(rng.integers(2, 7))
    blobs = rng.normal(0.0, 28.0, size=(cells, cells, 3)).astype(np.float32)
    blobs = 0.65 * blobs.mean(axis=2, keepdims=True) + 0.35 * blobs
    image = cv2.resize(blobs, (width, height), interpolation=cv2.INTER_CUBIC)
    image += np.float32(rng.uniform(70.0, 185.0)) + rng.normal(0.0, 10.0, size=3).astype(np.float32)
    if config.style:
        image += background_tint(config.style)
    if busy:
        grain_cells = int(rng.integers(12, 29))
        grain = rng.normal(0.0, 14.0, size=(grain_cells, grain_cells)).astype(np.float32)
        image += cv2.resize(grain, (width, height), interpolation=cv2.INTER_LINEAR)[:, :, None]
        angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(0.03, 0.10) * size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        grating = np.sin(2 * np.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
        image += (rng.uniform(0.0, 12.0) * grating).astype(np.float32)[:, :, None]
    return image


def _texture(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pattern in [0, 1] at object coordinates u, v measured in texture periods."""
    if kind == "stripes":
        return (np.sin(2 * np.pi * u) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    if kind == "dots":
        return (((u % 1.0) - 0.5) ** 2 + ((v % 1.0) - 0.5) ** 2 > 0.09).astype(np.float32)
    if kind == "waves":
        return (0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.3 * np.sin(2 * np.pi * v)))).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _paint(image: np.ndarray, mask: np.ndarray, obj: SceneObject, frame: int,
           spec: ClassSpec | StyledClassSpec, textured: bool, size: int) -> None:
    """Fill the object's pixels: flat or (hard mode) modulated by its class texture; a style's class mixes its
    accent colour in by its pattern in every difficulty. Textures and patterns move with the object."""
    if not textured and not isinstance(spec, StyledClassSpec):
        image[mask] = obj.shade_rgb
        return
    ys, xs = np.nonzero(mask)
    cx, cy = obj.centres[frame] * size
    a = math.radians(obj.angles[frame] + obj.texture_angle)
    period = obj.texture_period * obj.size * size
    u = ((xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)) / period + obj.texture_phase
    v = (-(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)) / period
    shade = obj.shade_rgb.astype(np.float32)
    if not isinstance(spec, StyledClassSpec):
        image[ys, xs] = shade * (0.6 + 0.4 * _texture(spec.texture, u, v))[:, None]
        return
    # The accent takes the object's brightness variation too: shade / colour is this object's lighting.
    lighting = float(obj.shade_rgb.mean()) / max(float(np.mean(spec.colour_rgb)), 1.0)
    accent = np.clip(np.asarray(spec.accent_rgb, dtype=np.float32) * lighting, 0.0, 255.0)
    weight = (spec.contrast * spec.pattern(u, v))[:, None].astype(np.float32)
    image[ys, xs] = shade * (1.0 - weight) + accent * weight


def _render_frames(rng: np.random.Generator, scene: Scene, config: SynthConfig) -> list[np.ndarray]:
    """T RGB uint8 frames [H, W, 3]: background, objects back to front, per-frame pixel noise."""
    difficulty = _DIFFICULTY[config.difficulty]
    specs = class_specs(config.num_classes, config.style)
    background = _background(rng, config, difficulty.textured)
    sigma = np.float32(rng.uniform(*difficulty.pixel_noise))
    frames = []
    for t in range(config.frames_per_clip):
        image = background.copy()
        for obj, masks in zip(scene.objects, scene.full_masks):
            _paint(image, masks[t], obj, t, specs[obj.class_index], difficulty.textured, config.scale_px)
        image += rng.standard_normal(image.shape, dtype=np.float32) * sigma
        frames.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return frames


# ----------------------------------------------------------------------------------------------- sounds


def _db(gain_db: float) -> float:
    return 10.0 ** (gain_db / 20.0)


def _unit_rms(signal: np.ndarray) -> np.ndarray:
    return signal / max(float(np.sqrt(np.mean(signal ** 2))), 1e-12)


def _class_sound(spec: ClassSpec | StyledClassSpec, samples: int, rng: np.random.Generator) -> np.ndarray:
    """One instance of a class's sound at 16 kHz and unit RMS (float64): pitch, phases and noise vary per call."""
    if isinstance(spec, StyledClassSpec):
        return _unit_rms(spec.wave(samples, SAMPLE_RATE, rng))
    t = np.arange(samples) / SAMPLE_RATE
    lo, hi = spec.band_hz
    if spec.sound == "harmonic":
        f0 = spec.pitch_hz * (1.0 + rng.uniform(-0.02, 0.02))
        phases = rng.uniform(0.0, 2 * np.pi, size=len(spec.partials))
        wave = sum(np.sin(2 * np.pi * p * f0 * t + phase) for p, phase in zip(spec.partials, phases))
    else:
        spectrum = np.fft.rfft(rng.standard_normal(samples))
        freqs = np.fft.rfftfreq(samples, 1.0 / SAMPLE_RATE)
        spectrum[(freqs < lo) | (freqs > hi)] = 0.0
        wave = np.fft.irfft(spectrum, samples)
    envelope = 0.75 + 0.25 * np.sin(2 * np.pi * spec.am_hz * t + rng.uniform(0.0, 2 * np.pi))
    return _unit_rms(wave * envelope)


def render_class_audio(class_index: int, seconds: float, rng: np.random.Generator,
                       num_classes: int = 5, style: int = 0) -> np.ndarray:
    """A clean instance of class `class_index`'s sound: float32, 16 kHz mono, RMS `SOURCE_RMS`.

    For evaluations that need a class's audio by itself (e.g. an off-screen class).
    """
    spec = class_specs(num_classes, style)[class_index]
    return (_class_sound(spec, round(seconds * SAMPLE_RATE), rng) * SOURCE_RMS).astype(np.float32)


def _pink_noise(rng: np.random.Generator, samples: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Unit-RMS noise with a 1/f power spectrum (flat below 50 Hz): a room-tone-like background."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.fft.rfftfreq(samples, 1.0 / rate)
    spectrum /= np.sqrt(np.maximum(freqs, 50.0))
    return _unit_rms(np.fft.irfft(spectrum, samples))


def _render_audio(rng: np.random.Generator, scene: Scene, config: SynthConfig, split: str,
                  recordings: RecordingSet | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """The clip's sound as int16 PCM at `config.sample_rate`, [samples] when mono, else [samples, channels] (the
    same signal in each): sounding classes (+ hard-mode distractor) + background noise. Synthetic sounds are mixed
    at 16 kHz and the mix resampled; recordings are mixed at the output rate. Also returns, with recordings, where
    each excerpt came from (sounding ones first, then the distractor)."""
    difficulty = _DIFFICULTY[config.difficulty]
    specs = class_specs(config.num_classes, config.style)
    seconds = config.frames_per_clip + AUDIO_TAIL_S
    rate = SAMPLE_RATE if recordings is None else config.sample_rate
    samples = round(seconds * rate)
    excerpts: list[str] = []

    def source(class_index: int) -> np.ndarray:
        if recordings is None:
            return _class_sound(specs[class_index], samples, rng)
        wave, where = recordings.excerpt(class_index, split, seconds, rate, rng)
        excerpts.append(where)
        return _unit_rms(wave)

    mix = np.zeros(samples)
    for i in scene.sounding:
        mix += source(scene.objects[i].class_index) * _db(rng.uniform(-1.5, 1.5))
    if scene.distractor_class is not None:
        gain = _db(difficulty.distractor_db + rng.uniform(-2.0, 2.0))
        mix += source(scene.distractor_class) * gain
    mix += _pink_noise(rng, samples, rate) * _db(-rng.uniform(*difficulty.snr_db))
    mix = resample(_unit_rms(mix) * SOURCE_RMS, rate, config.sample_rate, round(seconds * config.sample_rate))
    pcm = np.clip(np.rint(mix * 32767.0), -32768, 32767).astype(np.int16)
    return (pcm if config.channels == 1 else np.repeat(pcm[:, None], config.channels, axis=1)), tuple(excerpts)


# ----------------------------------------------------------------------------------------------- file formats


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of a non-empty mask in pixel-edge convention: max = last index + 1."""
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    y0, x0 = int(rows.argmax()), int(cols.argmax())
    y1, x1 = len(rows) - int(rows[::-1].argmax()), len(cols) - int(cols[::-1].argmax())
    return x0, y0, x1, y1


def labelimg_xml(folder: str, filename: str, path: str, width: int, height: int, depth: int,
                 objects: list[tuple[str, tuple[int, int, int, int]]]) -> bytes:
    """A Pascal VOC annotation byte for byte as labelImg writes it (element order, tabs, no XML declaration)."""
    root = etree.Element("annotation")
    etree.SubElement(root, "folder").text = folder
    etree.SubElement(root, "filename").text = filename
    etree.SubElement(root, "path").text = path
    source = etree.SubElement(root, "source")
    etree.SubElement(source, "database").text = "Unknown"
    size = etree.SubElement(root, "size")
    etree.SubElement(size, "width").text = str(width)
    etree.SubElement(size, "height").text = str(height)
    etree.SubElement(size, "depth").text = str(depth)
    etree.SubElement(root, "segmented").text = "0"
    for name, (xmin, ymin, xmax, ymax) in objects:
        obj = etree.SubElement(root, "object")
        etree.SubElement(obj, "name").text = name
        etree.SubElement(obj, "pose").text = "Unspecified"
        # labelImg's own rule: a box touching the far edge, or at its clamped minimum of 1, is "truncated".
        truncated = ymax == height or ymin == 1 or xmax == width or xmin == 1
        etree.SubElement(obj, "truncated").text = "1" if truncated else "0"
        etree.SubElement(obj, "difficult").text = "0"
        box = etree.SubElement(obj, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            etree.SubElement(box, tag).text = str(value)
    # labelImg pretty-prints with lxml and turns each two-space indent into a tab.
    return etree.tostring(root, pretty_print=True, encoding="utf-8").replace(b"  ", b"\t")


def yolo_lines(objects: list[tuple[int, tuple[int, int, int, int]]], width: int, height: int) -> bytes:
    """labelImg YOLO text: `class cx cy w h`, normalised, 6 decimals, one line per box."""
    lines = []
    for class_index, (xmin, ymin, xmax, ymax) in objects:
        cx, cy = (xmin + xmax) / 2 / width, (ymin + ymax) / 2 / height
        lines.append(f"{class_index:d} {cx:.6f} {cy:.6f} {(xmax - xmin) / width:.6f} {(ymax - ymin) / height:.6f}\n")
    return "".join(lines).encode()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name in the same folder, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png(image: np.ndarray, image_format: str = "png") -> bytes:
    """`image` (BGR or grey) encoded as PNG, or as another of IMAGE_FORMATS."""
    ok, encoded = cv2.imencode(f".{image_format}", image, IMAGE_FORMATS[image_format])
    if not ok:
        raise RuntimeError(f"{image_format} encoding failed")
    return encoded.tobytes()


def _wav(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, pcm, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class _ClipRecord:
    name: str
    split: str
    category: str
    other_category: str
    sounding_categories: tuple[str, ...]
    visible_categories: tuple[str, ...]     # drawing order
    distractor_category: str
    audio_excerpts: tuple[str, ...]         # with recordings: "<class>/<file>.wav@<start sample>" per mixed sound


def clip_name(index: int) -> str:
    return f"synth_{index:05d}"


def assign_splits(clips: int, seed: int) -> list[str]:
    """Seeded 70/15/15 split: val and test get round(15 %) each (halves up), train the remainder."""
    held_out = (clips * 15 + 50) // 100
    labels = ["train"] * (clips - 2 * held_out) + ["val"] * held_out + ["test"] * held_out
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(clips)
    splits = [""] * clips
    for position, clip in enumerate(order):
        splits[int(clip)] = labels[position]
    return splits


def _write_clip(config: SynthConfig, index: int, split: str, recordings: RecordingSet | None) -> _ClipRecord:
    """Sample, render and write clip `index`; everything it draws comes from its own generator."""
    rng = np.random.default_rng([config.seed, _CLIP_STREAM, index])
    scene = sample_scene(rng, config)
    frames = _render_frames(rng, scene, config)
    pcm, excerpts = _render_audio(rng, scene, config, split, recordings)

    names = [spec.name for spec in set_classes(config, recordings)]
    label = [names[obj.class_index] for obj in scene.objects]
    name = clip_name(index)
    category = label[scene.sounding[0]]
    _write_frames(config, f"{split}/{category}/{name}", name, scene, frames, label)
    audio_folder = config.out / "audio_wav" / split / category
    audio_folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(audio_folder / f"{name}.wav", _wav(pcm, config.sample_rate))

    distractor = "" if scene.distractor_class is None else names[scene.distractor_class]
    return _ClipRecord(name=name, split=split, category=category, other_category=label[scene.other],
                       sounding_categories=tuple(label[i] for i in scene.sounding),
                       visible_categories=tuple(label), distractor_category=distractor, audio_excerpts=excerpts)


def _write_frames(config: SynthConfig, rel: str, name: str, scene: Scene, frames: list[np.ndarray],
                  label: list[str]) -> None:
    """Each frame's picture, sounding and other masks, labelImg XML (and YOLO txt) under `<kind>/<rel>/`."""
    out = config.out
    folders = {kind: out / kind / rel for kind in ("visual_frames", "gt_masks", "other_masks", "labels")}
    if config.yolo:
        folders["yolo"] = out / "yolo" / rel
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    width, height, suffix = config.frame_width, config.frame_height, config.frame_suffix
    for t, frame in enumerate(frames):
        stem = f"{name}_{t + 1}"
        sounding_mask = np.logical_or.reduce([scene.visible_masks[i, t] for i in scene.sounding])
        _write_atomic(folders["visual_frames"] / f"{stem}{suffix}",
                      _png(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), config.image_format))
        _write_atomic(folders["gt_masks"] / f"{stem}.png", _png(sounding_mask.astype(np.uint8) * 255))
        _write_atomic(folders["other_masks"] / f"{stem}.png",
                      _png(scene.visible_masks[scene.other, t].astype(np.uint8) * 255))
        boxes = [(i, tight_box(scene.visible_masks[i, t])) for i in scene.sounding]
        xml = labelimg_xml(folder=name, filename=f"{stem}{suffix}", path=f"visual_frames/{rel}/{stem}{suffix}",
                           width=width, height=height, depth=3, objects=[(label[i], box) for i, box in boxes])
        _write_atomic(folders["labels"] / f"{stem}.xml", xml)
        if config.yolo:
            yolo = yolo_lines([(scene.objects[i].class_index, box) for i, box in boxes], width, height)
            _write_atomic(folders["yolo"] / f"{stem}.txt", yolo)


def _write_clip_job(job: tuple[SynthConfig, int, str, RecordingSet | None]) -> _ClipRecord:
    return _write_clip(*job)


def _worker_init() -> None:
    # One process per core already; OpenCV's own threads would only compete with the other workers.
    cv2.setNumThreads(1)


# ----------------------------------------------------------------------------------------------- driver


#: The options of format_version 1's first release. info.json names any later option only when it is set, so that
#: a default set's info.json is what earlier versions wrote (and a folder they wrote is still completed by a re-run).
_FIRST_OPTIONS = ("out", "clips", "num_classes", "size", "frames_per_clip", "sources", "difficulty", "seed", "yolo",
                  "workers")
#: Fields of a class that describe its synthetic sound: left out of info.json when recordings replace it.
_SOUND_FIELDS = {"sound", "band_hz", "pitch_hz", "partials", "am_hz", "formants_hz", "rate_hz", "duty", "sweep",
                 "vibrato"}


def _info_bytes(config: SynthConfig, recordings: RecordingSet | None = None) -> bytes:
    """info.json: everything that determines the files, and nothing that does not (no `out`, no `workers`, no
    location of the recordings: their names and checksums instead)."""
    defaults = {field.name: field.default for field in dataclasses.fields(SynthConfig)}
    settings = {key: value for key, value in asdict(config).items()
                if key not in ("out", "workers") and (key in _FIRST_OPTIONS or value != defaults[key])}
    settings.pop("sounds", None)
    classes = [asdict(spec) for spec in set_classes(config, recordings)]
    if recordings is not None:
        classes = [{**{k: v for k, v in spec.items() if k not in _SOUND_FIELDS}, "recordings": listed["recordings"]}
                   for spec, listed in zip(classes, recordings.info())]
    held_out = (config.clips * 15 + 50) // 100
    info = {
        "generator": "avsprep.synth",
        "format_version": 1,
        "config": settings,
        "sample_rate": config.sample_rate,
        "audio_seconds": config.frames_per_clip + AUDIO_TAIL_S,
        "visible_objects": config.visible_objects,
        "splits": {"train": config.clips - 2 * held_out, "val": held_out, "test": held_out},
        "classes": classes,
    }
    return (json.dumps(info, indent=2) + "\n").encode()


def _claim_output(out: Path, info: bytes) -> None:
    """Accept an empty or missing folder, or one holding (part of) this very set; refuse anything else.

    Re-running into a folder of the same set rewrites every file with the same bytes, so a run interrupted at any
    point is completed by running it again.
    """
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        info_path = out / "info.json"
        if not info_path.is_file() or info_path.read_bytes() != info:
            raise InputError(out, "is not empty and does not hold a synthetic set of this configuration "
                                  "(info.json missing or different); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.rglob(".*.tmp"):     # from a run killed while writing; the re-run rewrites the file itself
        leftover.unlink()
    _write_atomic(out / "info.json", info)


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def generate(config: SynthConfig, progress: Callable[[int], None] | None = None) -> SynthSummary:
    """Write a synthetic AVS set under `config.out`; `progress(n)` is called as clips complete.

    Raises SynthOptionError (an InputError and a ValueError) for a bad option, InputError when `out` holds
    something else or a --sounds recording is bad.
    """
    config, recordings = config.with_recordings()
    config.validate()
    started = time.perf_counter()
    out = config.out
    _claim_output(out, _info_bytes(config, recordings))
    splits = assign_splits(config.clips, config.seed)
    jobs = [(config, index, splits[index], recordings) for index in range(config.clips)]
    records = sorted(_write_clips(jobs, config.workers, progress), key=lambda r: r.name)
    names = [spec.name for spec in set_classes(config, recordings)]
    _write_tables(config, records, names, with_excerpts=recordings is not None)

    per_split = {split: sum(r.split == split for r in records) for split in SPLITS}
    per_class = {name: sum(r.category == name for r in records) for name in names}
    per_split_class = {split: {name: sum(r.split == split and r.category == name for r in records) for name in names}
                       for split in SPLITS}
    seconds = time.perf_counter() - started
    log.info("synth: %d clips (%s) written to %s in %.1f s", len(records),
             ", ".join(f"{k} {v}" for k, v in per_split.items()), out, seconds)
    return SynthSummary(out=out, clips=len(records), per_split=per_split, per_class=per_class,
                        per_split_class=per_split_class, meta_csv=out / "meta.csv", info_json=out / "info.json",
                        seconds=seconds)


def _write_clips(jobs: list, workers: int, progress: Callable[[int], None] | None) -> list[_ClipRecord]:
    """Run the clip jobs in this process or in `workers` processes, in any order."""
    records: list[_ClipRecord] = []
    if workers == 1:
        for job in jobs:
            records.append(_write_clip_job(job))
            if progress:
                progress(1)
        return records
    # "spawn", not fork: a child forked after OpenCV has started its thread pool in the parent can hang for ever.
    with get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        for record in pool.imap_unordered(_write_clip_job, jobs, chunksize=4):
            records.append(record)
            if progress:
                progress(1)
    return records


def _write_tables(config: SynthConfig, records: list[_ClipRecord], names: list[str], with_excerpts: bool) -> None:
    """classes.txt (YOLO), scenes.csv and, last, meta.csv: its presence marks a complete set."""
    out = config.out
    if config.yolo:
        _write_atomic(out / "yolo" / "classes.txt", "".join(f"{n}\n" for n in names).encode())
    header = ["name", "split", "visible_categories", "distractor_category"]
    rows = [[r.name, r.split, ";".join(r.visible_categories), r.distractor_category] for r in records]
    if with_excerpts:   # only then, so that a default set's scenes.csv keeps its bytes
        header.append("audio_excerpts")
        rows = [[*row, ";".join(r.audio_excerpts)] for row, r in zip(rows, records)]
    _write_atomic(out / "scenes.csv", _csv_bytes(header, rows))
    _write_atomic(out / "meta.csv", _csv_bytes(
        ["name", "category", "split", "other_category", "sounding_categories"],
        [[r.name, r.category, r.split, r.other_category, ";".join(r.sounding_categories)] for r in records]))
