"""Annotation previews: boxes and class names drawn over the frames, one contact sheet per clip.

    avsprep preview --voc labels/ --images frames/ --out previews/

For checking labelImg annotations before training. Frames are found and grouped into clips exactly as
`avsprep crops` does it (`avsprep.clips.discover`), so what the sheet shows is what the shards will hold: the boxes
as parsed (labelImg pixel edges, rounded), clipped to the image where they stick out (drawn, and marked
"clipped"), frames without an annotation file marked as such. Clips that `crops` would reject are listed with the
reason instead of drawn.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from avsprep.annotations import Box, clip_box, parse_yolo
from avsprep.clips import ClipSource, SourceOptions, discover
from avsprep.crops import read_image
from avsprep.errors import InputError

log = logging.getLogger(__name__)

# matplotlib's tab10, as RGB 0..255: the same class colours as the t-SNE legend.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
GAP = 4
HEADER = 22
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class PreviewSettings:
    """How the sheets are drawn (which clips and how they are grouped is `SourceOptions`)."""

    height: int = 180  # each frame is drawn at this height (aspect kept)
    max_clips: int = 0  # 0: every clip


@dataclass
class PreviewResult:
    written: list[Path] = field(default_factory=list)
    boxes: int = 0
    frames_without_annotation: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # clip -> why it was not drawn


def _text(image: np.ndarray, text: str, origin: tuple[int, int], color: tuple[int, int, int],
          background: tuple[int, int, int] | None = None, scale: float = 0.45) -> None:
    (w, h), base = cv2.getTextSize(text, FONT, scale, 1)
    x, y = origin
    if background is not None:
        cv2.rectangle(image, (x, y - h - 3), (x + w + 4, y + base), background, -1)
    cv2.putText(image, text, (x + 2, y - 1), FONT, scale, color, 1, cv2.LINE_AA)


def _frame_boxes(frame, classes: list[str], width: int, height: int) -> tuple[list[Box] | None, list[bool]]:
    """The frame's boxes clipped to the image, and which were clipped; None when the frame has no annotation."""
    if frame.annotation is not None:
        boxes, source = frame.annotation.boxes, frame.annotation.source
    elif frame.yolo_file is not None:
        annotation = parse_yolo(frame.yolo_file, classes, frame.image.name, width, height)
        boxes, source = annotation.boxes, annotation.source
    else:
        return None, []
    drawn, clipped = [], []
    for box in boxes:
        box_in_image, was_clipped = clip_box(box, width, height, source)
        drawn.append(box_in_image)
        clipped.append(was_clipped)
    return drawn, clipped


def draw_frame(image: np.ndarray, boxes: list[Box] | None, clipped: list[bool], classes: list[str],
               height: int, title: str) -> tuple[np.ndarray, int]:
    """One frame (RGB [H,W,3]) scaled to `height` with its boxes and a title strip; returns (picture, boxes)."""
    scale = height / image.shape[0]
    width = max(1, round(image.shape[1] * scale))
    picture = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    picture = np.ascontiguousarray(picture)
    for box, was_clipped in zip(boxes or [], clipped):
        color = PALETTE[classes.index(box.name) % len(PALETTE)] if box.name in classes else (255, 255, 255)
        p0 = (round(box.xmin * scale), round(box.ymin * scale))
        p1 = (round(box.xmax * scale) - 1, round(box.ymax * scale) - 1)
        cv2.rectangle(picture, p0, p1, color, 2)
        label = box.name + (" (clipped)" if was_clipped else "") + (" (difficult)" if box.difficult else "")
        label_width = cv2.getTextSize(label, FONT, 0.45, 1)[0][0] + 4
        # Keep the label inside the picture: boxes at the right edge would cut it off.
        _text(picture, label, (max(0, min(p0[0], width - label_width)), max(p0[1], 14)), (255, 255, 255), color)
    if boxes is None:
        _text(picture, "no annotation", (2, height - 4), (255, 255, 255), (200, 0, 0))
    strip = np.full((HEADER, width, 3), 255, np.uint8)
    _text(strip, title, (2, HEADER - 6), (0, 0, 0))
    return np.concatenate([strip, picture]), len(boxes or [])


def contact_sheet(clip: ClipSource, classes: list[str], height: int) -> tuple[np.ndarray, int, int]:
    """The clip's frames side by side with their boxes: (RGB sheet, boxes drawn, frames without annotation)."""
    pictures, boxes, unannotated = [], 0, 0
    for frame in clip.frames:
        image = read_image(frame.image)
        frame_boxes, clipped = _frame_boxes(frame, classes, image.shape[1], image.shape[0])
        picture, drawn = draw_frame(image, frame_boxes, clipped, classes, height, f"{frame.index}: {frame.image.name}")
        pictures.append(picture)
        boxes += drawn
        unannotated += frame_boxes is None
    gap = np.full((pictures[0].shape[0], GAP, 3), 255, np.uint8)
    row = np.concatenate([part for picture in pictures for part in (picture, gap)][:-1], axis=1)
    header = np.full((HEADER + 4, row.shape[1], 3), 235, np.uint8)
    details = clip.category or ""  # the split is not shown: without --meta it is only a placeholder
    _text(header, f"{clip.name}" + (f"  ({details})" if details else ""), (4, HEADER), (0, 0, 0), scale=0.55)
    return np.concatenate([header, row]), boxes, unannotated


def write_previews(options: SourceOptions, out: str | Path, settings: PreviewSettings | None = None,
                   progress: Callable[[int, int], None] | None = None) -> PreviewResult:
    """One `<out>/<clip>.png` contact sheet per clip found under `options` (as `avsprep crops` groups them).

    `progress(newly_done, total)` after each clip (as `avsprep crops` reports). A clip whose inputs are bad (a malformed XML, a missing frame) is
    not drawn but listed in `problems`, as is one whose frame cannot be read.
    """
    settings = settings or PreviewSettings()
    out = Path(out)
    discovery = discover(options)
    result = PreviewResult(problems={name: str(error) for name, error in discovery.problems.items()})
    clips = discovery.clips[:settings.max_clips] if settings.max_clips else discovery.clips
    if not clips and not result.problems:
        raise InputError(options.voc or options.yolo or options.createml or options.coco or options.images,
                         "no annotated clips found")
    out.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        try:
            sheet, boxes, unannotated = contact_sheet(clip, discovery.classes, settings.height)
        except InputError as error:
            result.problems[clip.name] = str(error)
        else:
            path = out / f"{clip.name}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
                raise InputError(path, "cannot write the preview image")
            result.written.append(path)
            result.boxes += boxes
            result.frames_without_annotation += unannotated
        if progress:
            progress(1, len(clips))
    log.info("wrote %d previews to %s (%d boxes); %d clips with problems", len(result.written), out, result.boxes,
             len(result.problems))
    return result


__all__ = ["PreviewResult", "PreviewSettings", "contact_sheet", "draw_frame", "write_previews"]
