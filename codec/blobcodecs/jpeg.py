"""``jpeg``: 8-bit grayscale baseline JPEG (ITU-T T.81) of a mosaic image.

The blob is a complete JPEG file, so any JPEG decoder reads it. Encoding
goes through Pillow (libjpeg-turbo), which accepts custom quantization
tables; decoding through imagecodecs (libjpeg-turbo). The quantization
table is chosen by the parameters (spec/format.md, "Quantization tables"):

``table = "jpeg"``
    The luminance table of T.81 Annex K, scaled by ``quality`` as libjpeg
    does (``s = 5000/q`` below 50, else ``200 - 2q``; entry
    ``clip(floor((base*s + 50)/100), 1, 255)``). Tuned to human vision: it
    keeps low spatial frequencies, good for weights over image inputs.
``table = "flat"``
    Every entry is the scaled value of 16: all frequencies alike, the better
    choice for weights that do not look like images.
``table = "ramp1" | "ramp2" | "ramp4"``
    Steps growing linearly with spatial frequency, base entry
    ``round(16 * (1 + a * sqrt(u^2 + v^2)) / (1 + a))`` at DCT indices
    ``(u, v)``, slope ``a`` = 1, 2 or 4: the table matched to the natural-
    image prior (power ~ 1/f^2, so the error that minimizes prior-weighted
    distortion per bit grows with f). Between flat and Annex K; on the seed
    MLP it loses less accuracy than either at equal size.
``table = [64 ints]``
    A custom table in natural (row-major) order, each 1..255.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any

import imagecodecs
import numpy as np
from PIL import Image

from ..errors import FormatError
from .abc import BlobCodec, check_params, decode_image

__all__ = ["Jpeg", "quant_table", "quality_scale", "scaled_table", "ANNEX_K_LUMINANCE"]

#: T.81 Annex K, Table K.1, natural order.
ANNEX_K_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip

TABLE_KINDS = ("jpeg", "flat", "ramp1", "ramp2", "ramp4")


@functools.cache
def _base_table(kind: str) -> tuple[int, ...]:
    """The quality-50 table of a named kind, natural order (computed once per kind)."""
    if kind == "jpeg":
        return ANNEX_K_LUMINANCE
    if kind == "flat":
        return (16,) * 64
    a = int(kind[4:])
    return tuple(max(1, round(16 * (1 + a * math.hypot(u, v)) / (1 + a))) for u in range(8) for v in range(8))


def quality_scale(quality: int) -> int:
    """libjpeg's scale of the base table at ``quality``, in percent (spec 8.2): ``5000 // q`` below 50, else
    ``200 - 2q``."""
    return 5000 // quality if quality < 50 else 200 - 2 * quality


def quality_at_scale(scale: int) -> int:
    """The largest quality whose :func:`quality_scale` is at least ``scale``: the quality itself when ``scale`` is
    one's own, else the next coarser one."""
    return max(q for q in range(1, 101) if quality_scale(q) >= scale)


def scaled_table(kind: str, scale: int) -> list[int]:
    """The 64 entries (natural order) of the named table ``kind`` scaled by ``scale`` percent as libjpeg scales
    it: ``clip(floor((b * scale + 50) / 100), 1, 255)``. ``scaled_table(kind, quality_scale(q))`` is quality
    ``q``'s table; a scale between two qualities' gives a table between theirs (written as a list: spec 8.2).
    A new list each call (computed once per kind and scale: a training loop codes at the same table many times)."""
    return list(_scaled(kind, scale))


@functools.lru_cache(maxsize=1024)
def _scaled(kind: str, scale: int) -> tuple[int, ...]:
    return tuple(min(255, max(1, (b * scale + 50) // 100)) for b in _base_table(kind))


def quant_table(quality: int, table: str | list[int]) -> list[int]:
    """Return the 64-entry quantization table (natural order) for the parameters."""
    if not isinstance(table, str):
        return list(table)
    return scaled_table(table, quality_scale(quality))


class Jpeg(BlobCodec):
    """8-bit grayscale JPEG with a chosen quantization table."""

    codec_id = "jpeg"
    lossy = True
    bits = 8

    def __init__(self, quality: int = 75, table: str | list[int] = "flat"):
        self.quality = check_params(self.codec_id, "quality", quality, int, 1, 100)
        if isinstance(table, str):
            if table not in TABLE_KINDS:
                raise FormatError(f"codec 'jpeg': table {table!r} is not one of {TABLE_KINDS} or 64 integers")
        elif not (
            isinstance(table, list)
            and len(table) == 64
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in table)
        ):
            raise FormatError("codec 'jpeg': a custom table must be 64 integers in 1..255")
        self.table = table

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "quality": self.quality, "table": self.table}

    def encode(self, array: np.ndarray, optimize: bool = True) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array, np.uint8), mode="L").save(
            buf, "JPEG", qtables=[quant_table(self.quality, self.table)], optimize=optimize
        )
        return buf.getvalue()

    def round_trip(self, array: np.ndarray) -> np.ndarray:
        """Coded with libjpeg's standard Huffman tables instead of optimised ones (half the encoder's time): the
        quantized coefficients, so the decoded pixels, are the same; only the blob's size differs."""
        blob = self.encode(array, optimize=False)
        return decode_image(self.codec_id, imagecodecs.jpeg8_decode, blob, array.shape, np.dtype(np.uint8))

    def decode(self, blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        found = jpeg_frame(blob)
        if found != (8, shape[0], shape[1], 1):
            raise FormatError(f"jpeg: frame is (bits, height, width, components)={found}, expected {(8, *shape, 1)}")
        return decode_image(self.codec_id, imagecodecs.jpeg8_decode, blob, shape, np.dtype(np.uint8))


def jpeg_frame(blob: bytes) -> tuple[int, int, int, int]:
    """Return ``(precision, height, width, components)`` from the SOF0/1/2 header.

    Walks the marker segments after SOI (spec section 5.2): any number of
    ``FF`` fill bytes may precede a marker (T.81 B.1.1.2); a segment's
    length skips it; the scan (SOS) or the end (EOI) before a frame header
    means there is none.
    """
    if blob[:2] != b"\xff\xd8":
        raise FormatError("jpeg: missing SOI marker")
    pos = 2
    while pos + 4 <= len(blob):
        if blob[pos] != 0xFF:
            raise FormatError(f"jpeg: expected a marker at byte {pos}")
        while pos + 4 < len(blob) and blob[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = blob[pos + 1]
        length = int.from_bytes(blob[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2) and pos + 10 <= len(blob):
            p = blob[pos + 4]
            h = int.from_bytes(blob[pos + 5 : pos + 7], "big")
            w = int.from_bytes(blob[pos + 7 : pos + 9], "big")
            return p, h, w, blob[pos + 9]
        if marker in (0xDA, 0xD9) or length < 2:
            break
        pos += 2 + length
    raise FormatError("jpeg: no baseline/progressive frame header before the scan")
