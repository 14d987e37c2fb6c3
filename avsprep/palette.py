"""The AVSBench-semantic colour palette: class index ↔ RGB colour of the colour masks (docs/design.md §14).

It is the PASCAL-VOC bit-interleaved palette: for class j the bits of j are taken three at a time, bit 0 of each
triple into R, bit 1 into G, bit 2 into B, filling each channel from its most significant bit down. Class 0 is black
(background), 1 is (128, 0, 0), 2 is (0, 128, 0), 3 is (128, 128, 0), 8 is (64, 0, 0).
"""
from __future__ import annotations

import numpy as np

AVSS_CLASSES = 71  # background + 70 sounding-object classes


def palette(num_classes: int = 256) -> np.ndarray:
    """[num_classes, 3] uint8 RGB colours of class indices 0..num_classes-1."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for j in range(num_classes):
        code, rgb = j, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        colours[j] = rgb
    return colours


def _packed(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colours_to_classes(rgb: np.ndarray, num_classes: int = AVSS_CLASSES) -> tuple[np.ndarray, int]:
    """Colour mask [H,W,3] uint8 RGB → (class indices [H,W] uint8, number of off-palette pixels).

    A pixel's class is the palette index of its exact colour; colours not among the first `num_classes` palette
    colours are background (0), as the reference reads them, and are counted so the caller can report them.
    """
    lookup = {int(code): index for index, code in enumerate(_packed(palette(num_classes)))}
    codes, inverse = np.unique(_packed(rgb).ravel(), return_inverse=True)
    known = np.array([int(code) in lookup for code in codes])
    classes_of_codes = np.array([lookup.get(int(code), 0) for code in codes], dtype=np.uint8)
    off_palette = int(np.bincount(inverse.ravel(), minlength=len(codes))[~known].sum())
    return classes_of_codes[inverse.ravel()].reshape(rgb.shape[:2]), off_palette


def classes_to_colours(classes: np.ndarray) -> np.ndarray:
    """Class indices [H,W] (any integer dtype, < 256) → colour mask [H,W,3] uint8 RGB with exact palette colours."""
    return palette(256)[classes.astype(np.intp)]


def nearest_palette_classes(rgb: np.ndarray, num_classes: int = AVSS_CLASSES) -> np.ndarray:
    """Colour mask [H,W,3] → class indices [H,W] uint8 by the nearest palette colour (squared RGB distance).

    For scoring other methods' saved PNGs, whose resizing (the reference saves with PIL's default filter) blends
    edge colours that are in no palette entry.
    """
    colours = palette(num_classes).astype(np.int32)  # [K, 3]
    codes, inverse = np.unique(_packed(rgb).ravel(), return_inverse=True)
    unique_rgb = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=1)  # [U, 3]
    distance = ((unique_rgb[:, None, :] - colours[None, :, :]) ** 2).sum(-1)  # [U, K]
    return distance.argmin(1).astype(np.uint8)[inverse.ravel()].reshape(rgb.shape[:2])
