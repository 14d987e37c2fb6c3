"""The `avsprep frames` stage: raw videos -> one frame per second and 16 kHz audio per clip, ready to annotate.

Every video under the videos folder (recursively: mp4, mkv, webm, avi, mov) is cut into clips of `clip_seconds`.
Per clip, the frame shown at the middle of each second (by timestamp, `avsprep.video.frames_each_second`) and the
audio of the same span, 16 kHz mono PCM-16:

    <out>/frames/<clip>/<clip>_<k>.png     k = 1..T
    <out>/audio/<clip>.wav
    <out>/meta.csv                          name, source, start, seconds, split
    <out>/predefined_classes.txt            with `classes`: labelImg's class list, so annotation can start at once
    <out>/frames.json                       settings and per-video state, for re-runs

exactly what `avsprep crops --images <out>/frames --audio <out>/audio --meta <out>/meta.csv` reads. A clip is named
`<video>_<start second, 5 digits>`, where <video> is the video's path under the folder without its suffix and with
`__` for `/`: stable across runs and unique, and `<clip>_<k>` still splits at the last `_`.

Splits are drawn per source video (seeded), so clips of one recording never land in both train and test.

Resume: each clip is written under `<out>/.partial/` and moved into place when complete (frames folder first, WAV
last: a clip is complete when its WAV exists). A re-run keeps complete clips, and does not even decode a video
whose clips are all there and whose size and modification time are unchanged.
"""
from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import soundfile

from avsprep import video as video_io
from avsprep.annotations import read_classes_file
from avsprep.clips import assign_splits
from avsprep.errors import InputError

log = logging.getLogger(__name__)

# Audio may end a little before the video (encoders stop at a packet boundary): up to this much is filled with
# silence; seconds beyond it have no sound and are not extracted.
AUDIO_SLACK_S = 0.1
STATE_FILE = "frames.json"


@dataclass
class FramesConfig:
    """Everything `avsprep frames` needs."""

    videos: Path
    out: Path
    clip_seconds: int = 5
    size: int | None = None  # shorter side of the frames in pixels; None: the video's own size
    pad_short_clips: bool = False  # keep a final clip of fewer seconds (crops then needs --pad-short-clips too)
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0
    classes: Path | None = None
    workers: int = 1
    on_error: str = "error"  # "error": stop at the first bad video (exit 2); "skip": skip it and count it

    def settings(self) -> dict:
        """What the frames on disk depend on: a re-run into the same folder must use the same."""
        return {"clip_seconds": self.clip_seconds, "size": self.size, "pad_short_clips": self.pad_short_clips}


@dataclass
class Clip:
    name: str
    start: int  # second of the video where the clip starts
    seconds: int  # frames and seconds of audio: clip_seconds, fewer for a padded final clip


@dataclass
class VideoResult:
    source: str  # path under the videos folder, '/'-separated
    clips: list[Clip] = field(default_factory=list)
    written: int = 0  # clips written in this run
    kept: int = 0  # complete clips found from an earlier run
    dropped_seconds: int = 0  # whole seconds after the last clip
    error: str | None = None  # with on_error="skip"
    size: int = 0  # file size and modification time: an unchanged video need not be decoded again
    mtime_ns: int = 0


@dataclass
class FramesResult:
    videos: list[VideoResult]
    skipped: list[dict]  # {"video", "error"}

    @property
    def clips(self) -> int:
        return sum(len(v.clips) for v in self.videos)

    def report(self) -> dict:
        return {
            "videos": len(self.videos), "videos_skipped": len(self.skipped), "clips": self.clips,
            "clips_written": sum(v.written for v in self.videos), "clips_kept": sum(v.kept for v in self.videos),
            "dropped_seconds": sum(v.dropped_seconds for v in self.videos), "skipped": self.skipped,
        }


def find_videos(root: Path) -> dict[str, Path]:
    """Video base name (path under root without suffix, `__` for `/`) -> file, for every video under root, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "videos directory does not exist")
    found: dict[str, Path] = {}
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for filename in sorted(filenames):
            if os.path.splitext(filename)[1].lower() in video_io.VIDEO_SUFFIXES:
                path = Path(directory, filename)
                base = "__".join(path.relative_to(root).with_suffix("").parts)
                if base in found:
                    raise InputError(path, f"gives the same clip names as {found[base]} (rename one of them)")
                found[base] = path
    return found


def clip_name(base: str, start: int) -> str:
    return f"{base}_{start:05d}"


def _resize_shorter_side(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or min(image.shape[:2]) == size:
        return image
    height, width = image.shape[:2]
    scale = size / min(height, width)
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def is_complete(out: Path, clip: Clip) -> bool:
    """A clip is complete when its WAV is in place (moved last) and its frames folder holds every frame."""
    frames = out / "frames" / clip.name
    return (out / "audio" / f"{clip.name}.wav").is_file() and all(
        (frames / f"{clip.name}_{k}.png").is_file() for k in range(1, clip.seconds + 1))


def write_clip(out: Path, clip: Clip, images: list[np.ndarray], audio: np.ndarray) -> None:
    """Write one clip's frames (RGB [H,W,3] each) and audio (float32 [N] at 16 kHz) under temporary names, then
    move them into place: a crash leaves either a complete clip or none that `avsprep crops` would read."""
    partial = out / ".partial" / clip.name
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "frames").mkdir(parents=True)
    for k, image in enumerate(images, start=1):
        target = partial / "frames" / f"{clip.name}_{k}.png"
        if not cv2.imwrite(str(target), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise InputError(target, "cannot write frame")
    soundfile.write(partial / f"{clip.name}.wav", np.clip(audio, -1.0, 1.0), video_io.AUDIO_RATE, subtype="PCM_16")
    frames_dir = out / "frames" / clip.name
    shutil.rmtree(frames_dir, ignore_errors=True)  # an incomplete clip of an interrupted run
    os.replace(partial / "frames", frames_dir)
    os.replace(partial / f"{clip.name}.wav", out / "audio" / f"{clip.name}.wav")
    partial.rmdir()


def _clip_audio(audio: np.ndarray, clip: Clip) -> np.ndarray:
    start, stop = clip.start * video_io.AUDIO_RATE, (clip.start + clip.seconds) * video_io.AUDIO_RATE
    samples = audio[start:stop]
    return np.pad(samples, (0, stop - start - samples.size))  # at most AUDIO_SLACK_S of silence


def extract_video(path: Path, base: str, source: str, out: Path, config: FramesConfig, threads: int = 0) -> VideoResult:
    """Cut one video into clips under `out`, keeping clips that are already complete. InputError on a bad video."""
    stat = path.stat()
    result = VideoResult(source=source, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    audio = video_io.read_audio(path)  # first: a video without sound fails before any decoding of pictures
    audio_seconds = int(audio.size / video_io.AUDIO_RATE + AUDIO_SLACK_S)
    T = config.clip_seconds
    images: list[np.ndarray] = []
    seconds = 0

    def finish(clip_images: list[np.ndarray], start: int) -> None:
        clip = Clip(clip_name(base, start), start, len(clip_images))
        result.clips.append(clip)
        if is_complete(out, clip):
            result.kept += 1
        else:
            write_clip(out, clip, clip_images, _clip_audio(audio, clip))
            result.written += 1

    for image in video_io.frames_each_second(path, threads):
        if seconds >= audio_seconds:
            continue  # decoded to the end all the same: that is where a truncated file shows
        images.append(_resize_shorter_side(image, config.size))
        seconds += 1
        if len(images) == T:
            finish(images, seconds - T)
            images = []
    if images and config.pad_short_clips:
        finish(images, seconds - len(images))
    else:
        result.dropped_seconds = len(images)
    if not result.clips:
        raise InputError(path, f"shorter than one clip: {seconds} whole second(s) with sound, --clip-seconds {T}"
                               + ("" if config.pad_short_clips else " (--pad-short-clips keeps a shorter clip)"))
    log.info("%s: %d clips (%d written, %d kept)", source, len(result.clips), result.written, result.kept)
    return result


_worker: dict = {}


def _init_worker(out: Path, config: FramesConfig, threads: int) -> None:
    cv2.setNumThreads(1)  # the processes are the parallelism
    _worker.update(out=out, config=config, threads=threads)


def _extract_task(task: tuple[Path, str, str]) -> VideoResult:
    path, base, source = task
    try:
        return extract_video(path, base, source, _worker["out"], _worker["config"], _worker["threads"])
    except InputError as error:
        if _worker["config"].on_error != "skip":
            raise
        return VideoResult(source=source, error=str(error))


def _read_state(out: Path, config: FramesConfig) -> dict:
    """The state of an earlier run into `out`; InputError if it used other settings (its frames would not fit)."""
    path = out / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(path, f"unreadable state of an earlier run ({error}); delete it to start over") from None
    if state.get("settings") != config.settings():
        raise InputError(path, f"{out} was made with {state.get('settings')}, not {config.settings()}: "
                               "use another --out or delete it")
    return state.get("videos", {})


def _unchanged(entry: dict | None, path: Path, out: Path) -> VideoResult | None:
    """The earlier result of a video that has not changed since and whose clips are all complete."""
    if not entry:
        return None
    stat = path.stat()
    clips = [Clip(**clip) for clip in entry["clips"]]
    if (entry["size"], entry["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns) or not all(is_complete(out, c) for c in clips):
        return None
    return VideoResult(source=entry["source"], clips=clips, kept=len(clips), dropped_seconds=entry["dropped_seconds"],
                       size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _write_outputs(out: Path, config: FramesConfig, results: dict[str, VideoResult], classes: list[str] | None) -> None:
    """meta.csv (splits seeded per video), the state file and predefined_classes.txt."""
    usable = {base: r for base, r in sorted(results.items()) if r.error is None}
    splits = assign_splits(list(usable), config.val_fraction, config.test_fraction, config.seed)
    with (out / ".meta.csv.partial").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "source", "start", "seconds", "split"])
        for base, result in usable.items():
            writer.writerows([clip.name, result.source, clip.start, clip.seconds, splits[base]] for clip in result.clips)
    os.replace(out / ".meta.csv.partial", out / "meta.csv")
    videos = {base: {"source": r.source, "size": r.size, "mtime_ns": r.mtime_ns, "dropped_seconds": r.dropped_seconds,
                     "clips": [asdict(clip) for clip in r.clips]} for base, r in usable.items()}
    _write_atomically(out / STATE_FILE, json.dumps({"settings": config.settings(), "videos": videos}, indent=1))
    if classes is not None:
        _write_atomically(out / "predefined_classes.txt", "".join(f"{name}\n" for name in classes))


def _check(config: FramesConfig) -> list[str] | None:
    if config.on_error not in ("error", "skip"):
        raise InputError(None, f"--on-error must be 'error' or 'skip', not {config.on_error!r}")
    if config.clip_seconds < 1:
        raise InputError(None, "--clip-seconds must be at least 1")
    if config.size is not None and config.size < 1:
        raise InputError(None, "--size must be at least 1")
    assign_splits([], config.val_fraction, config.test_fraction, config.seed)  # checks the fractions
    return read_classes_file(config.classes) if config.classes is not None else None


def extract_clips(config: FramesConfig, progress: Callable[[int, int], None] | None = None) -> FramesResult:
    """Extract every video under `config.videos` into `config.out` (see the module docstring for the layout).

    With on_error="error" the first bad video raises InputError (clips completed so far stay; a re-run resumes);
    with "skip" bad videos are left out and listed in the result. `progress(newly_done, total)` counts videos.
    """
    classes = _check(config)
    videos = find_videos(config.videos)
    if not videos:
        raise InputError(config.videos, f"no videos ({', '.join(video_io.VIDEO_SUFFIXES)}) found")
    out = Path(config.out)
    earlier = _read_state(out, config)
    for folder in ("frames", "audio"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".partial", ignore_errors=True)  # clips an interrupted run did not finish
    report = (lambda n: progress(n, len(videos))) if progress else (lambda n: None)

    results: dict[str, VideoResult] = {}
    tasks = []
    for base, path in videos.items():
        kept = _unchanged(earlier.get(base), path, out)
        if kept is not None:
            results[base] = kept
        else:
            tasks.append((path, base, path.relative_to(config.videos).as_posix()))
    report(len(results))
    try:
        for base, result in zip((task[1] for task in tasks), _run_tasks(tasks, out, config)):
            results[base] = result
            report(1)
    finally:  # also after an error: what was done is recorded, and the next run need not decode it again
        _write_outputs(out, config, results, classes)
        shutil.rmtree(out / ".partial", ignore_errors=True)  # the workers have stopped: nothing in it is complete
    skipped = [{"video": r.source, "error": r.error} for r in results.values() if r.error is not None]
    return FramesResult(videos=[r for r in results.values() if r.error is None], skipped=skipped)


def _run_tasks(tasks: list[tuple[Path, str, str]], out: Path, config: FramesConfig):
    """The results of the tasks in their order, from `config.workers` processes (or this one)."""
    if config.workers <= 1 or len(tasks) <= 1:
        _init_worker(out, config, threads=0)
        yield from map(_extract_task, tasks)
        return
    # spawn, not fork: a forked child of a process whose OpenCV thread pool has run can hang (as in crops).
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(config.workers, len(tasks)), initializer=_init_worker, initargs=(out, config, 1)) as pool:
        yield from pool.imap(_extract_task, tasks)
