"""Decoding image files from many hands: a pixel cap checked on the header, and truncated JPEGs refused.

A PNG of a few kB can declare 30000 x 30000 pixels: OpenCV allocates the whole 2.7 GB image before it decodes a
row, and that is below its own limit (2^30 pixels; above it, it raises `cv2.error`). So the header's size is read
here first (PNG, JPEG, BMP, WebP; other formats fall back on OpenCV's limit) and anything above
`MAX_IMAGE_PIXELS` is refused before decoding. libjpeg decodes a cut-off JPEG without an error (it warns on stderr
and fills the missing rows with grey), so a JPEG whose last scan is not followed by its end-of-image marker is
refused too; a cut-off PNG already fails in libpng.
"""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from avsprep.errors import InputError

MAX_IMAGE_PIXELS = 100_000_000  # 12 times an 8K frame; 300 MB decoded as 8-bit RGB

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}  # RSTn, TEM, SOI: no length field


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that a PNG, JPEG, BMP or WebP file's header declares, without decoding; None otherwise."""
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26 and struct.unpack("<I", data[14:18])[0] >= 40:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)  # a negative height means top-down rows
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        return None
    if data[:2] == b"\xff\xd8":
        position = 2
        while position + 9 <= len(data) and data[position] == 0xFF:
            marker = data[position + 1]
            if marker == 0xFF or marker in _JPEG_STANDALONE:
                position += 1 if marker == 0xFF else 2
                continue
            if marker in _JPEG_SOF:
                height, width = struct.unpack(">HH", data[position + 5:position + 9])
                return width, height
            position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG's segments and scans run up to an end-of-image marker (bytes after it are allowed: some
    cameras append a video). Walks the markers; inside a scan, 0xFF00 (stuffing) and RSTn do not end it."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF or marker in _JPEG_STANDALONE:
            position += 1 if marker == 0xFF else 2
            continue
        position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker == 0xDA:  # entropy-coded data follows: find the next real marker
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position + 1 >= len(data):
                    return False
                following = data[position + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    position += 1 if following == 0xFF else 2
                    continue
                break
    return position + 1 < len(data) and data[position:position + 2] == b"\xff\xd9"


def decode_image(path: Path, flags: int, what: str = "image") -> np.ndarray:
    """`cv2.imdecode` of a file (flags as for cv2.imread), after the pixel cap and the JPEG completeness check.
    Raises InputError naming the file for anything unreadable."""
    path = path if isinstance(path, Path) else Path(path)  # Path(a Path) parses it again: 0.1 ms a frame
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(path, f"cannot read {what} ({error.strerror or error})") from None
    if not data:
        raise InputError(path, f"{what} file is empty")
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise InputError(path, f"{what} declares {size[0]}x{size[1]} pixels, above the cap of {MAX_IMAGE_PIXELS}")
    # Nearly every JPEG ends with its end-of-image marker: walk the markers only when it does not.
    if data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9") and not jpeg_is_complete(data):
        raise InputError(path, f"{what} is a truncated JPEG (no end-of-image marker after its data)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:  # OpenCV's own size limit, for formats whose header we do not read
        raise InputError(path, f"cannot decode {what} ({str(error).strip().splitlines()[-1]})") from None
    if image is None:
        raise InputError(path, f"cannot read {what} (empty, truncated or not an image)")
    return image
