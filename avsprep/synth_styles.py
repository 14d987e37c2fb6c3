"""Style families of `avsprep synth --style N` (N >= 1): classes whose looks and sounds the default set never draws.

Style N is a seeded family: everything about its classes comes from ``np.random.default_rng([_STYLE_SEED, N])``
(independent of ``--seed``, so sets generated with different seeds share their classes).

* Looks: radial-profile outlines (smooth *lobed* blobs or straight-edged *pointed* stars with 2-7 lobes; each class
  its own lobe count and kind), hues spread round the colour wheel from a seeded offset with seeded saturation and
  value, a second *accent* colour mixed in by a two-colour pattern (grid, rings, diamonds, speckle, zigzag,
  gradient), and a faint colour tint of the style's backgrounds. The default draws flat or shaded polygons of eight
  fixed shapes in twelve named colours.
* Sounds: chirps (stacked exponential sweeps), noise bursts, clicks (knocks), formant-shaped vowels with a pitch
  contour and harmonic tones with vibrato, each with its own event rate. Every class's energy lies in its own band:
  disjoint bands of seeded widths between 150 Hz and 6 kHz (equal widths in mel before the seeded scaling), with
  guard gaps and a seeded order, so classes stay distinguishable by log-mel statistics even when mixed (hard mode's
  distractor, two sources). The default's sounds are steady harmonic complexes and noise bands with a slow AM.

Only the class *properties* differ between styles: sizes, placement, motion, drawing order and which object sounds
come from the generator's shared distributions, so no visual cue tells which object sounds in any style.
This module is a leaf (numpy only); `avsprep.synth` draws and renders the scenes.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_STYLE_SEED = 0x57A1E
SOUND_KINDS = ("chirp", "burst", "click", "vowel", "tone")
PATTERNS = ("grid", "rings", "diamonds", "speckle", "zigzag", "gradient")
#: Outline vertices: enough for smooth lobes at 320 px.
_VERTICES = 144
#: Style bands span this range (Hz), inside the log-mel's 125-7500 Hz.
_BAND_RANGE_HZ = (150.0, 6000.0)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class StyledClassSpec:
    """A class of style `style`: what it looks and sounds like. `index` is the position of `name` in sorted order.

    The attribute names shared with `avsprep.synth.ClassSpec` (index, name, shape, colour_rgb, texture, sound,
    band_hz, pitch_hz, partials) mean the same; `texture` names one of PATTERNS and is painted in every difficulty.
    """

    index: int
    name: str
    style: int
    shape: str                                    # "lobed-<k>" or "pointed-<k>", k lobes
    lobes: tuple[tuple[int, float, float], ...]   # radial profile terms (harmonic, amplitude, phase); first: primary
    colour_rgb: tuple[int, int, int]
    accent_rgb: tuple[int, int, int]              # second colour of the pattern
    texture: str                                  # one of PATTERNS
    contrast: float                               # how much accent the pattern mixes in, 0..1
    sound: str                                    # one of SOUND_KINDS
    band_hz: tuple[float, float]                  # all of the class's sound energy lies in this band
    pitch_hz: float                               # vowel/tone: fundamental; else 0
    partials: tuple[int, ...]                     # tone: partial numbers inside the band; else empty
    formants_hz: tuple[float, ...]                # vowel: formant centres inside the band; else empty
    rate_hz: float                                # events per second (chirps, bursts, clicks, syllables); tone: vibrato
    duty: float                                   # fraction of each event period that sounds (chirp, burst, vowel)
    sweep: int                                    # chirp: +1 up, -1 down; else 0
    vibrato: float                                # tone: relative pitch deviation; else 0

    def outline(self) -> np.ndarray:
        """[_VERTICES, 2] float64 polygon (x, y) of unit area around the origin."""
        return _radial_outline(self.lobes, self.shape.startswith("pointed"))

    def pattern(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Accent weight in [0, 1] at object coordinates u, v (in pattern periods), same shape as u."""
        return _pattern(self.texture, u, v)

    def wave(self, samples: int, rate: int, rng: np.random.Generator) -> np.ndarray:
        """One instance of the class's sound, [samples] float64 at `rate` Hz, band-limited to `band_hz` and not
        normalised; timing, pitch, phases and noise vary per call."""
        t = np.arange(samples) / rate
        render = {"chirp": _chirp, "burst": _burst, "click": _clicks, "vowel": _vowel, "tone": _tone}[self.sound]
        return _band_limit(render(self, t, rate, rng), rate, self.band_hz)


# ----------------------------------------------------------------------------------------------- the family


def style_classes(num_classes: int, style: int) -> list[StyledClassSpec]:
    """The `num_classes` classes of style `style` (>= 1), in index order (sorted by name)."""
    if style < 1:
        raise ValueError(f"style families start at 1, got {style}")
    rng = np.random.default_rng([_STYLE_SEED, style])
    names = _pseudo_words(rng, num_classes)
    outlines = _outline_terms(rng, num_classes)
    colours = _colours(rng, num_classes)
    patterns = [PATTERNS[int(k)] for k in rng.permutation(np.arange(num_classes) % len(PATTERNS))]
    kinds = [SOUND_KINDS[int(k)] for k in rng.permutation(np.arange(num_classes) % len(SOUND_KINDS))]
    in_frequency_order = _bands(rng, num_classes)
    bands = [in_frequency_order[int(k)] for k in rng.permutation(num_classes)]
    draft = []
    for k in range(num_classes):
        (pointed, lobes), (colour, accent) = outlines[k], colours[k]
        draft.append(dict(
            name=names[k], style=style, shape=f"{'pointed' if pointed else 'lobed'}-{lobes[0][0]}", lobes=lobes,
            colour_rgb=colour, accent_rgb=accent, texture=patterns[k], contrast=round(rng.uniform(0.35, 0.65), 3),
            **_sound_params(rng, kinds[k], bands[k])))
    draft.sort(key=lambda d: d["name"])
    return [StyledClassSpec(index=index, **d) for index, d in enumerate(draft)]


def background_tint(style: int) -> np.ndarray:
    """[3] float32 RGB offset added to every background of the style: a faint colour cast (|tint| < ~25)."""
    rng = np.random.default_rng([_STYLE_SEED, style, 1])
    return rng.normal(0.0, 10.0, size=3).clip(-25.0, 25.0).astype(np.float32)


def _pseudo_words(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct pronounceable names of 2-3 syllables ("tolu", "makize"): nothing like the default's colour_shape."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(_CONSONANTS[int(rng.integers(len(_CONSONANTS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
                       for _ in range(int(rng.integers(2, 4))))
        if word not in words:
            words.append(word)
    return words


def _outline_terms(rng: np.random.Generator, count: int) -> list[tuple[bool, tuple[tuple[int, float, float], ...]]]:
    """Per class (pointed?, radial terms): distinct (kind, lobe count) pairs while they last (12 of them)."""
    combos = [(pointed, k) for pointed in (False, True) for k in range(2, 8)]
    order = rng.permutation(len(combos))
    terms = []
    for c in range(count):
        pointed, k = combos[int(order[c % len(combos)])]
        primary = (k, round(rng.uniform(0.25, 0.42), 3), round(rng.uniform(0.0, 2 * math.pi), 3))
        extra_k = int(rng.choice([j for j in range(2, 9) if j != k]))
        secondary = (extra_k, round(rng.uniform(0.0, 0.1), 3), round(rng.uniform(0.0, 2 * math.pi), 3))
        terms.append((pointed, (primary, secondary)))
    return terms


def _colours(rng: np.random.Generator, count: int) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Per class (colour, accent): hues evenly spread from a seeded offset (shuffled), saturated enough to stand out
    from the near-grey backgrounds; the accent is a far hue at a shifted value."""
    offset = rng.uniform(0.0, 1.0)
    hues = [(offset + (k + rng.uniform(-0.2, 0.2)) / count) % 1.0 for k in rng.permutation(count)]
    pairs = []
    for hue in hues:
        saturation, value = rng.uniform(0.5, 0.95), rng.uniform(0.55, 0.95)
        accent_value = value * 0.5 if rng.random() < 0.5 else min(1.0, value + 0.35)
        accent_hue = (hue + rng.uniform(0.3, 0.7)) % 1.0
        pairs.append((_rgb(hue, saturation, value), _rgb(accent_hue, saturation * 0.7, accent_value)))
    return pairs


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))  # type: ignore[return-value]


def _bands(rng: np.random.Generator, count: int) -> list[tuple[float, float]]:
    """Disjoint bands in frequency order: the mel range cut into `count` pieces of seeded widths (0.6-1.4 x equal),
    15 % of each piece kept free on both sides as a guard."""
    lo, hi = (_hz_to_mel(f) for f in _BAND_RANGE_HZ)
    widths = rng.uniform(0.6, 1.4, size=count)
    edges = lo + (hi - lo) * np.concatenate([[0.0], np.cumsum(widths) / widths.sum()])
    bands = []
    for a, b in zip(edges[:-1], edges[1:]):
        guard = 0.15 * (b - a)
        bands.append((round(_mel_to_hz(a + guard), 1), round(_mel_to_hz(b - guard), 1)))
    return bands


def _sound_params(rng: np.random.Generator, kind: str, band: tuple[float, float]) -> dict:
    """The sound fields of a class of `kind` in `band` (the StyledClassSpec fields from `sound` on)."""
    lo, hi = band
    params = dict(sound=kind, band_hz=band, pitch_hz=0.0, partials=(), formants_hz=(), rate_hz=0.0, duty=0.0,
                  sweep=0, vibrato=0.0)
    if kind == "chirp":
        params.update(rate_hz=rng.uniform(3.0, 8.0), duty=rng.uniform(0.75, 0.95), sweep=int(rng.choice([-1, 1])))
    elif kind == "burst":
        params.update(rate_hz=rng.uniform(2.0, 6.0), duty=rng.uniform(0.2, 0.5))
    elif kind == "click":
        params.update(rate_hz=rng.uniform(5.0, 18.0))
    elif kind == "vowel":
        formants = tuple(round(float(lo + c * (hi - lo)), 1) for c in np.sort(rng.uniform(0.2, 0.8, size=2)))
        params.update(pitch_hz=(hi - lo) / rng.uniform(4.0, 7.0), rate_hz=rng.uniform(1.5, 4.0),
                      duty=rng.uniform(0.5, 0.8), formants_hz=formants)
    else:   # tone: a few partials of a fundamental below or inside the band, with vibrato
        pitch = (hi - lo) / rng.uniform(2.2, 3.2)
        first = math.ceil(lo * 1.03 / pitch)
        partials = tuple(p for p in range(first, first + 4) if p * pitch <= hi / 1.03)
        params.update(pitch_hz=pitch, partials=partials, rate_hz=rng.uniform(4.0, 7.0),
                      vibrato=rng.uniform(0.004, 0.012))
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in params.items()}


def _hz_to_mel(hz: float) -> float:
    """HTK mel scale, the one the log-mel front end uses."""
    return 1127.0 * math.log1p(hz / 700.0)


def _mel_to_hz(mel: float) -> float:
    return 700.0 * math.expm1(mel / 1127.0)


# ----------------------------------------------------------------------------------------------- looks


@lru_cache(maxsize=256)
def _radial_outline(lobes: tuple[tuple[int, float, float], ...], pointed: bool) -> np.ndarray:
    """Polygon r(theta) = 1 + sum of the terms (the primary one a triangle wave when pointed: straight-edged
    points), scaled to unit area. The amplitudes keep r >= 0.4, so the shape is star-convex and in one piece."""
    theta = np.linspace(0.0, 2 * math.pi, _VERTICES, endpoint=False)
    radius = np.ones_like(theta)
    for position, (k, amplitude, phase) in enumerate(lobes):
        angle = k * theta + phase
        wave = (2 / math.pi) * np.arcsin(np.cos(angle)) if pointed and position == 0 else np.cos(angle)
        radius += amplitude * wave
    x, y = radius * np.cos(theta), radius * np.sin(theta)
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    outline = np.stack([x, y], axis=1) / math.sqrt(area)
    outline.setflags(write=False)   # shared cached value
    return outline


def _pattern(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Two-colour pattern weight in [0, 1] (float32) at u, v measured in pattern periods."""
    fu, fv = u % 1.0, v % 1.0
    if kind == "grid":
        weight = (fu < 0.22) | (fv < 0.22)
    elif kind == "rings":
        weight = np.sin(2 * np.pi * np.hypot(u, v)) > 0
    elif kind == "diamonds":
        weight = np.abs(fu - 0.5) + np.abs(fv - 0.5) < 0.3
    elif kind == "speckle":
        # A fixed hash of the half-period cell: the same speckles move with the object from frame to frame.
        cell = np.sin(np.floor(2 * u) * 12.9898 + np.floor(2 * v) * 78.233) * 43758.5453
        weight = cell % 1.0 > 0.55
    elif kind == "zigzag":
        weight = (u + np.abs(2 * fv - 1) * 0.5) % 1.0 < 0.5
    elif kind == "gradient":
        return (0.5 + 0.5 * np.tanh(0.8 * u)).astype(np.float32)
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return weight.astype(np.float32)


# ----------------------------------------------------------------------------------------------- sounds


def _events(spec: StyledClassSpec, t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Position inside the current event, x in [0, 1) where the event sounds (NaN elsewhere), and the event
    number, for a train of events at about `rate_hz` with a random start."""
    rate = spec.rate_hz * (1.0 + rng.uniform(-0.05, 0.05))
    periods = (t + rng.uniform(0.0, 1.0 / rate)) * rate
    x = (periods % 1.0) / spec.duty
    return np.where(x < 1.0, x, np.nan), np.floor(periods)


def _chirp(spec: StyledClassSpec, t: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Exponential sweeps, one per event, faded in and out over a tenth of it: three in parallel, each over a third
    of the band (in log frequency), so that every mel bin of the band sounds in every event. One sweep over the
    whole band would leave each bin quiet most of the time, and log-mel means punish that: a steady sound 10 dB
    down (hard mode's distractor) would then look the louder."""
    x, _ = _events(spec, t, rng)
    lo, hi = spec.band_hz[0] * 1.03, spec.band_hz[1] / 1.03
    third = (hi / lo) ** (1 / 3)
    duration = spec.duty / spec.rate_hz
    sweep = np.nan_to_num(x) if spec.sweep > 0 else 1.0 - np.nan_to_num(x)
    wave = np.zeros(len(t))
    for k in range(3):
        start = lo * third ** k
        # Phase of f(x) = start * third**x over an event of `duration` seconds: the integral of 2 pi f dt.
        phase = 2 * np.pi * start * duration / math.log(third) * np.power(third, sweep)
        wave += np.sin(phase * spec.sweep + rng.uniform(0, 2 * np.pi))
    fade = np.clip(np.minimum(x, 1.0 - x) / 0.1, 0.0, 1.0)
    return np.where(np.isnan(x), 0.0, wave * np.nan_to_num(fade))


def _burst(spec: StyledClassSpec, t: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Noise gated into bursts with a fast attack and a slower decay (band-limited by the caller)."""
    x, _ = _events(spec, t, rng)
    gate = np.where(np.isnan(x), 0.0, (1.0 - np.exp(-30.0 * np.nan_to_num(x))) * (1.0 - np.nan_to_num(x)) ** 1.5)
    return rng.standard_normal(len(t)) * gate


def _clicks(spec: StyledClassSpec, t: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A jittered train of knocks: short decaying noise (band-limited by the caller, so it fills the band), its
    decay set by the band's width."""
    period = 1.0 / (spec.rate_hz * (1.0 + rng.uniform(-0.05, 0.05)))
    times = np.arange(rng.uniform(0.0, period), t[-1], period)
    times = times + rng.normal(0.0, 0.08 * period, size=len(times))
    impulses = np.zeros(len(t))
    positions = np.clip(np.round(times * rate).astype(int), 0, len(t) - 1)
    np.add.at(impulses, positions, rng.uniform(0.6, 1.0, size=len(positions)))
    decay = float(np.clip(3.0 / (spec.band_hz[1] - spec.band_hz[0]), 0.002, 0.02))
    k = np.arange(int(6 * decay * rate)) / rate
    kernel = np.exp(-k / decay) * rng.standard_normal(len(k))
    return np.convolve(impulses, kernel)[: len(t)]


def _vowel(spec: StyledClassSpec, t: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Harmonics of a gliding fundamental, weighted by formant resonances, in syllables."""
    x, _ = _events(spec, t, rng)
    f0 = spec.pitch_hz * (1.0 + rng.uniform(-0.03, 0.03))
    contour = f0 * (1.0 + 0.04 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(contour) / rate
    lo, hi = spec.band_hz
    width = (hi - lo) / 6.0
    wave = np.zeros(len(t))
    for m in range(max(1, math.ceil(lo / f0)), math.floor(hi / f0) + 1):
        gain = sum(1.0 / (1.0 + ((m * f0 - f) / width) ** 2) for f in spec.formants_hz)
        wave += gain * np.sin(m * phase + rng.uniform(0, 2 * np.pi))
    return wave * np.where(np.isnan(x), 0.0, np.sin(np.pi * np.nan_to_num(x)))


def _tone(spec: StyledClassSpec, t: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A few partials with 1/n amplitudes and a common vibrato."""
    f0 = spec.pitch_hz * (1.0 + rng.uniform(-0.02, 0.02))
    frequency = f0 * (1.0 + spec.vibrato * np.sin(2 * np.pi * spec.rate_hz * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(frequency) / rate
    return sum(np.sin(p * phase + rng.uniform(0, 2 * np.pi)) / (n + 1) for n, p in enumerate(spec.partials))


def _band_limit(wave: np.ndarray, rate: int, band: tuple[float, float]) -> np.ndarray:
    """Zero every FFT bin outside `band`: the class's energy stays in its band, as the default's noise does."""
    spectrum = np.fft.rfft(wave)
    freqs = np.fft.rfftfreq(len(wave), 1.0 / rate)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0.0
    return np.fft.irfft(spectrum, len(wave))
