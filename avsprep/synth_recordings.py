"""`avsprep synth --sounds DIR`: scenes paired with recorded sounds, split by time so that no test clip's audio was
heard in training.

DIR holds one folder per class (the folder name is the class name) of WAV files, found recursively (any sample rate,
channel count and bit depth soundfile reads; channels are averaged). Every recording is cut by time into three
parts (`SPLIT_PARTS`): its first 70 % serves train clips, the next 15 % val clips, the last 15 % test clips. A
clip's sound is an excerpt of the clip's length lying wholly inside its split's part of one recording of its class;
the recording is drawn with probability proportional to the excerpt positions its part offers, so every position
in a class's parts is equally likely, and a near-silent excerpt is drawn again. The excerpt is resampled to the
output rate.

Bad input (InputError: one line naming the folder or file, exit 2 on the command line): fewer than 3 class folders,
a class name with ';' (the separator of meta.csv's sounding_categories), a class folder without a WAV, an
unreadable WAV, a recording whose parts are too short to hold one clip.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from avsprep.errors import InputError

#: Fraction of each recording's duration (start, end) whose excerpts serve each split.
SPLIT_PARTS = {"train": (0.0, 0.70), "val": (0.70, 0.85), "test": (0.85, 1.0)}
MIN_CLASSES = 3
#: An excerpt with a lower RMS (-80 dBFS) is silence, not the class's sound: it is drawn again, up to _DRAWS times.
_QUIET_RMS = 1e-4
_DRAWS = 20


@dataclass(frozen=True)
class Recording:
    """One WAV of a class. `frames` counts samples per channel at `sample_rate`."""

    path: Path
    name: str           # "<class>/<file>.wav", relative to the --sounds folder (POSIX)
    sample_rate: int
    frames: int
    sha256: str

    def part(self, split: str) -> tuple[int, int]:
        """[start, end) sample range of the recording that serves clips of `split`."""
        start, end = SPLIT_PARTS[split]
        return round(start * self.frames), round(end * self.frames)

    def excerpt_frames(self, seconds: float) -> int:
        return math.ceil(seconds * self.sample_rate)


@dataclass(frozen=True)
class RecordingSet:
    """The class folders of a --sounds folder: `classes` sorted, `recordings[k]` those of class k sorted by name."""

    classes: tuple[str, ...]
    recordings: tuple[tuple[Recording, ...], ...]

    def excerpt(self, class_index: int, split: str, seconds: float, rate: int,
                rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """A seeded excerpt of class `class_index` from the `split` part of its recordings: [round(seconds * rate)]
        float64 mono at `rate` Hz, and where it came from ("<class>/<file>.wav@<start sample>")."""
        recordings = self.recordings[class_index]
        starts = np.array([_start_count(r, split, seconds) for r in recordings], dtype=np.float64)
        for _ in range(_DRAWS):
            recording = recordings[int(rng.choice(len(recordings), p=starts / starts.sum()))]
            first = recording.part(split)[0] + int(rng.integers(_start_count(recording, split, seconds)))
            wave = _read_excerpt(recording, first, seconds, rate)
            if np.sqrt(np.mean(wave ** 2)) >= _QUIET_RMS:
                return wave, f"{recording.name}@{first}"
        raise InputError(self.folder_of(class_index), f"{_DRAWS} excerpts of the {split} parts in a row were silent")

    def folder_of(self, class_index: int) -> Path:
        return self.recordings[class_index][0].path.parent

    def info(self) -> list[dict]:
        """What info.json records of the recordings: enough to tell a changed folder from the one used."""
        return [{"class": name, "recordings": [{"file": r.name, "sample_rate": r.sample_rate, "frames": r.frames,
                                                "sha256": r.sha256} for r in recordings]}
                for name, recordings in zip(self.classes, self.recordings)]


def scan_recordings(root: Path, clip_seconds: float) -> RecordingSet:
    """Read and check the class folders under `root`; every recording's parts must hold a `clip_seconds` excerpt.

    Raises InputError naming the folder or file at the first problem.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "--sounds must be a folder of class folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < MIN_CLASSES:
        raise InputError(root, f"--sounds needs at least {MIN_CLASSES} class folders of WAV files, found "
                               f"{len(folders)}")
    recordings = []
    for folder in folders:
        if ";" in folder.name:
            raise InputError(folder, "a class name may not contain ';'")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".wav" and p.is_file()
                       and not p.name.startswith("."))
        if not files:
            raise InputError(folder, "class folder holds no WAV recording")
        recordings.append(tuple(_check_recording(root, path, clip_seconds) for path in files))
    return RecordingSet(classes=tuple(f.name for f in folders), recordings=tuple(recordings))


def _check_recording(root: Path, path: Path, clip_seconds: float) -> Recording:
    try:
        data = path.read_bytes()
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as error:
        raise InputError(path, f"cannot read audio ({error})") from error
    recording = Recording(path=path.resolve(), name=path.relative_to(root).as_posix(), sample_rate=info.samplerate,
                          frames=info.frames, sha256=hashlib.sha256(data).hexdigest())
    for split, (start, end) in SPLIT_PARTS.items():
        if _start_count(recording, split, clip_seconds) < 1:
            seconds = recording.frames / recording.sample_rate
            shortest = min(end - start for start, end in SPLIT_PARTS.values())
            raise InputError(path, f"{seconds:.2f} s is too short: its {split} part ({100 * (end - start):.0f} % of "
                                   f"it) cannot hold one {clip_seconds:.2f} s clip; recordings need at least "
                                   f"{clip_seconds / shortest + 0.01:.2f} s (or use fewer --frames-per-clip)")
    return recording


def _start_count(recording: Recording, split: str, seconds: float) -> int:
    """How many excerpt start positions the `split` part of `recording` offers."""
    start, end = recording.part(split)
    return max(0, end - start - recording.excerpt_frames(seconds) + 1)


def _read_excerpt(recording: Recording, first: int, seconds: float, rate: int) -> np.ndarray:
    """[round(seconds * rate)] float64 mono samples from `first` on, resampled from the recording's rate."""
    try:
        data = sf.read(recording.path, start=first, frames=recording.excerpt_frames(seconds), dtype="float64",
                       always_2d=True)[0]
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as error:
        raise InputError(recording.path, f"cannot read audio ({error})") from error
    return resample(data.mean(axis=1), recording.sample_rate, rate, round(seconds * rate))


def resample(wave: np.ndarray, rate: int, to_rate: int, samples: int) -> np.ndarray:
    """[samples] float64: `wave` ([n] at `rate` Hz) resampled to `to_rate` (polyphase, scipy's default Kaiser
    filter), cut or zero-padded to exactly `samples`."""
    if rate != to_rate:
        from scipy.signal import resample_poly  # imported here: it costs a second at start-up

        common = math.gcd(rate, to_rate)
        wave = resample_poly(wave, to_rate // common, rate // common)
    return np.pad(wave[:samples], (0, max(0, samples - len(wave))))
