"""``jpegxl``: 16-bit grayscale JPEG XL (ISO/IEC 18181) of a mosaic image.

The blob is a bare JPEG XL codestream (signature ``FF 0A``, no ISOBMFF
container). ``distance`` is libjxl's Butteraugli distance (0 = lossless,
1 = visually lossless, larger = smaller files; 0 codes with libjxl's
lossless mode); ``effort`` (1..9) trades
encoder speed for size and does not affect decoding.
"""

from __future__ import annotations

from typing import Any

import imagecodecs
import numpy as np

from ..errors import FormatError
from .abc import BlobCodec, check_params, decode_image

__all__ = ["JpegXL", "jxl_size", "jxl_header"]


class JpegXL(BlobCodec):
    """16-bit grayscale JPEG XL."""

    codec_id = "jpegxl"
    lossy = True
    bits = 16

    def __init__(self, distance: float = 1.0, effort: int = 3):
        self.distance = check_params(self.codec_id, "distance", distance, float, 0.0, 25.0)
        self.effort = check_params(self.codec_id, "effort", effort, int, 1, 10)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "distance": self.distance, "effort": self.effort}

    def encode(self, array: np.ndarray) -> bytes:
        data = np.ascontiguousarray(array, np.uint16)
        lossless = self.distance == 0
        return bare_codestream(imagecodecs.jpegxl_encode(data, distance=self.distance, effort=self.effort,
                                                         lossless=lossless))

    def decode(self, blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        found = jxl_size(blob)
        if found != tuple(shape):
            raise FormatError(f"jpegxl: codestream is {found[0]}x{found[1]}, expected {shape[0]}x{shape[1]}")
        head = jxl_header(blob)
        expected = {"bits": 16, "exponent_bits": 0, "extra_channels": 0, "orientation": 1, "colour": "grey"}
        for key, want in expected.items():
            if head.get(key) != want:
                raise FormatError(f"jpegxl: image header {key}={head.get(key)}, expected {want} "
                                  "(16-bit integer grayscale, no extra channel, orientation 1)")
        return decode_image(self.codec_id, imagecodecs.jpegxl_decode, blob, shape, np.dtype(np.uint16))


def bare_codestream(buf: bytes) -> bytes:
    """Return the codestream of a JPEG XL file, unwrapping the ISOBMFF container.

    libjxl wraps 16-bit lossless output in a container (for its level box);
    the format stores bare codestreams, so ``jxlc`` (or the ``jxlp`` parts)
    are taken out and the other boxes dropped.
    """
    buf = bytes(buf)
    if buf[:2] == b"\xff\x0a":
        return buf
    parts, pos = [], 0
    while pos + 8 <= len(buf):
        size, kind = int.from_bytes(buf[pos : pos + 4], "big"), buf[pos + 4 : pos + 8]
        head = 8
        if size == 1:
            size, head = int.from_bytes(buf[pos + 8 : pos + 16], "big"), 16
        elif size == 0:
            size = len(buf) - pos
        if kind == b"jxlc":
            parts.append(buf[pos + head : pos + size])
        elif kind == b"jxlp":
            parts.append(buf[pos + head + 4 : pos + size])  # 4-byte part index first
        pos += size
    return b"".join(parts)


_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
_COLOUR_SPACES = {0: "RGB", 1: "grey", 2: "XYB", 3: "unknown"}


class _Bits:
    """A codestream's header bits, least significant first (18181-1, B.2)."""

    def __init__(self, data: bytes):
        self.value, self.pos, self.size = int.from_bytes(data, "little"), 0, 8 * len(data)

    def u(self, n: int) -> int:
        if self.pos + n > self.size:
            raise FormatError("jpegxl: codestream ends inside its header")
        value = (self.value >> self.pos) & ((1 << n) - 1)
        self.pos += n
        return value

    def u32(self, *dist: int | tuple[int, int]) -> int:
        """U32(d0, d1, d2, d3): a 2-bit selector, then a constant or ``u(bits) + offset``."""
        d = dist[self.u(2)]
        return d if isinstance(d, int) else self.u(d[0]) + d[1]

    def size_header(self) -> tuple[int, int]:
        small = self.u(1)

        def dim() -> int:
            return (self.u(5) + 1) * 8 if small else 1 + self.u((9, 13, 18, 30)[self.u(2)])

        height = dim()
        ratio = self.u(3)
        if ratio == 0:
            return height, dim()
        num, den = _RATIOS[ratio]
        return height, height * num // den


def jxl_header(blob: bytes) -> dict:
    """The fields of a codestream's ImageMetadata (18181-1, A.6) that the format constrains.

    ``bits``, ``exponent_bits`` (0: integer samples), ``extra_channels``,
    ``orientation`` and ``colour`` (``"grey"``, ``"RGB"``, ``"XYB"``,
    ``"unknown"`` or ``"icc"``); ``"preview"`` or ``"animation"`` when the
    stream has one (the fields after it are then not read).
    """
    if blob[:2] != b"\xff\x0a":
        raise FormatError("jpegxl: not a bare JPEG XL codestream (signature FF 0A)")
    b = _Bits(bytes(blob[2:66]))
    b.size_header()
    if b.u(1):  # all_default: 8-bit sRGB
        return {"bits": 8, "exponent_bits": 0, "extra_channels": 0, "orientation": 1, "colour": "RGB"}
    out: dict = {"orientation": 1}
    if b.u(1):  # extra_fields
        out["orientation"] = 1 + b.u(3)
        if b.u(1):  # intrinsic size
            b.size_header()
        if b.u(1):
            return {**out, "preview": True}
        if b.u(1):
            return {**out, "animation": True}
    if b.u(1):  # floating-point samples
        out["bits"], out["exponent_bits"] = b.u32(32, 16, 24, (6, 1)), 1 + b.u(4)
    else:
        out["bits"], out["exponent_bits"] = b.u32(8, 10, 12, (6, 1)), 0
    b.u(1)  # modular_16bit_buffers
    out["extra_channels"] = b.u32(0, 1, (4, 2), (12, 1))
    if out["extra_channels"]:
        return out
    b.u(1)  # xyb_encoded
    if b.u(1):  # colour encoding all_default: sRGB
        out["colour"] = "RGB"
    elif b.u(1):  # want_icc: the colour space is in the ICC profile
        out["colour"] = "icc"
    else:
        out["colour"] = _COLOUR_SPACES.get(b.u32(0, 1, 2, (6, 18)), "unknown")
    return out


def jxl_size(blob: bytes) -> tuple[int, int]:
    """Return ``(height, width)`` from a codestream's SizeHeader (18181-1, D.2)."""
    if blob[:2] != b"\xff\x0a" or len(blob) < 12:
        raise FormatError("jpegxl: not a bare JPEG XL codestream (signature FF 0A)")
    bits = int.from_bytes(blob[2:12], "little")
    pos = 0

    def u(n: int) -> int:
        nonlocal pos
        value = (bits >> pos) & ((1 << n) - 1)
        pos += n
        return value

    def dim(small: bool) -> int:
        if small:
            return (u(5) + 1) * 8
        return 1 + u((9, 13, 18, 30)[u(2)])

    small = bool(u(1))
    height = dim(small)
    ratio = u(3)
    if ratio == 0:
        width = dim(small)
    else:
        num, den = _RATIOS[ratio]
        width = height * num // den
    return height, width
