"""``zstd``: lossless; the array's little-endian bytes in one zstd frame.

With ``shuffle`` the bytes of multi-byte elements are grouped by
significance before compression (all first bytes, then all second bytes,
...), which lets zstd find the redundancy of float exponents.

With ``exponent_first`` (spec/format.md 5.1.1) each element, read as an
unsigned integer, is first rotated left by one bit, so that the sign moves
to bit 0 and a float's exponent fills the most significant byte (8 of
bfloat16's and float32's 8 exponent bits, 8 of float64's 11), and the byte
planes are stored from the most significant down: the exponent plane comes
first, whole, and the near-random mantissa planes after it. On
all-MiniLM-L6-v2 this gains 0.6 % (float32) and 1.3 % (bfloat16) over the
significance shuffle at zstd level 1 (``bench/lossless.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zstandard

from ..errors import FormatError
from .abc import BlobCodec, check_params

__all__ = ["Zstd"]


class Zstd(BlobCodec):
    """Lossless zstd of the raw bytes, optionally byte-shuffled."""

    codec_id = "zstd"
    lossy = False

    optional = ("exponent_first",)

    def __init__(self, level: int = 9, shuffle: bool = True, exponent_first: bool = False):
        self.level = check_params(self.codec_id, "level", level, int, -7, 22)
        self.shuffle = check_params(self.codec_id, "shuffle", shuffle, bool, 0, 1)
        self.exponent_first = check_params(self.codec_id, "exponent_first", exponent_first, bool, 0, 1)
        if self.exponent_first and not self.shuffle:
            raise FormatError("zstd: exponent_first needs shuffle")

    @property
    def minor(self) -> int:
        """1 with ``exponent_first`` (format 1.1, spec 5.1.1), else 0."""
        return 1 if self.exponent_first else 0

    def get_config(self) -> dict[str, Any]:
        config = {"id": self.codec_id, "level": self.level, "shuffle": self.shuffle}
        if self.exponent_first:  # absent when false: files written before the parameter existed are unchanged
            config["exponent_first"] = True
        return config

    def encode(self, array: np.ndarray) -> bytes:
        data = np.ascontiguousarray(array)
        raw = data.view(np.uint8).reshape(-1, data.itemsize) if data.size else data.view(np.uint8)
        if self.exponent_first and data.itemsize > 1 and data.size:
            raw = _exponent_planes(data)
        elif self.shuffle and data.itemsize > 1 and data.size:
            raw = np.ascontiguousarray(raw.T)
        params = zstandard.ZstdCompressionParameters.from_level(self.level, write_content_size=True, write_checksum=False)
        return zstandard.ZstdCompressor(compression_params=params).compress(np.ascontiguousarray(raw).data)

    def decode(self, blob: bytes, shape: tuple[int, ...], dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
        """Decode into ``out`` (a C-contiguous array of ``shape`` and ``dtype``) or a new array.

        Shuffled content is un-shuffled through a small buffer, so the only
        large allocation is the output itself.
        """
        count = int(np.prod(shape, dtype=np.int64))
        expected = count * dtype.itemsize
        try:
            claimed = zstandard.frame_content_size(blob)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd: not a zstd frame ({exc})") from None
        if claimed != expected:
            raise FormatError(f"zstd: frame holds {claimed} bytes, expected {expected}")
        length = frame_length(blob)
        if length != len(blob):
            raise FormatError(f"zstd: blob of {len(blob)} bytes holds a frame of {length} bytes (nothing may follow it)")
        if out is None:
            out = np.empty(shape, dtype)
        elif out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {dtype}{tuple(shape)} array")
        raw = out.reshape(-1).view(np.uint8)
        if self.exponent_first and dtype.itemsize not in _UINT:
            raise FormatError(f"zstd: exponent_first needs 2, 4 or 8-byte elements, found {dtype.itemsize}")
        shuffled = self.shuffle and dtype.itemsize > 1 and count
        planes = np.empty(expected, np.uint8) if shuffled and self.exponent_first else None
        try:
            with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
                if planes is not None:
                    filled = _read_into(reader, planes)
                elif shuffled:
                    filled = _unshuffle_into(reader, raw, dtype.itemsize)
                else:
                    filled = _read_into(reader, raw)
                extra = reader.read(1)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd: corrupt frame ({exc})") from None
        if filled != expected or extra:
            raise FormatError(f"zstd: frame decoded to {filled}{'+' if extra else ''} bytes, expected {expected}")
        if planes is not None:
            _from_exponent_planes(planes, raw.view(_UINT[dtype.itemsize]))
        if dtype == np.bool_ and np.any(raw > 1):
            raise FormatError("zstd: bool tensor holds bytes other than 0 and 1")
        return out


#: Unsigned integer type of each element size.
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
#: Elements per step of the exponent-first layout (a few hundred KB: stays in cache).
_STEP = 1 << 16


def _exponent_planes(data: np.ndarray) -> np.ndarray:
    """The exponent-first content of ``data``: elements rotated left one bit, byte planes most significant first."""
    k = data.itemsize
    if k not in _UINT:
        raise ValueError(f"zstd: exponent_first needs 2, 4 or 8-byte elements, found {k}")
    u = data.reshape(-1).view(_UINT[k])
    n, shift = u.size, u.dtype.type(8 * k - 1)
    out = np.empty((k, n), np.uint8)
    for i in range(0, n, _STEP):
        part = u[i : i + _STEP]
        rotated = (part << u.dtype.type(1)) | (part >> shift)
        out[:, i : i + part.size] = rotated.view(np.uint8).reshape(-1, k)[:, ::-1].T
    return out.reshape(-1)


def _from_exponent_planes(planes: np.ndarray, out: np.ndarray) -> None:
    """Inverse of :func:`_exponent_planes`: fill ``out`` (unsigned elements) from the planes."""
    k, n = out.dtype.itemsize, out.size
    grid, shift, one = planes.reshape(k, n), out.dtype.type(8 * k - 1), out.dtype.type(1)
    for i in range(0, n, _STEP):
        part = out[i : i + _STEP]
        part_bytes = part.view(np.uint8).reshape(-1, k)
        for j in range(k):  # plane j is byte k-1-j of each rotated element
            part_bytes[:, k - 1 - j] = grid[j, i : i + part.size]
        part[:] = (part >> one) | (part << shift)


#: Bytes decompressed per step when un-shuffling.
_CHUNK = 1 << 20


def _read_into(reader, raw: np.ndarray) -> int:
    """Fill ``raw`` from a zstd stream reader; return the bytes read."""
    view, filled = memoryview(raw), 0
    while filled < len(raw):
        n = reader.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def _unshuffle_into(reader, raw: np.ndarray, itemsize: int) -> int:
    """Fill ``raw`` (the output's bytes) from shuffled content: byte ``j*N + i`` is byte ``j`` of element ``i``."""
    count = len(raw) // itemsize
    planes = raw.reshape(count, itemsize)
    buf = np.empty(min(len(raw), _CHUNK), np.uint8)
    view, filled = memoryview(buf), 0
    while filled < len(raw):
        n = reader.readinto(view[: min(len(buf), len(raw) - filled)])
        if not n:
            break
        pos = 0
        while pos < n:  # a chunk may end one byte plane and start the next
            j, i = divmod(filled + pos, count)
            m = min(n - pos, count - i)
            planes[i : i + m, j] = buf[pos : pos + m]
            pos += m
        filled += n
    return filled


def frame_length(blob: bytes) -> int:
    """Bytes of the Zstandard frame that starts ``blob``, from its block headers (RFC 8878, 3.1.1)."""
    if blob[:4] != b"\x28\xb5\x2f\xfd":
        raise FormatError(f"zstd: not a Zstandard frame (magic {bytes(blob[:4]).hex()})")
    try:
        pos = zstandard.frame_header_size(blob)
    except zstandard.ZstdError as exc:
        raise FormatError(f"zstd: not a zstd frame ({exc})") from None
    checksum = 4 if blob[4] & 0x04 else 0
    last = 0
    while not last:
        if pos + 3 > len(blob):
            raise FormatError("zstd: frame is truncated")
        header = int.from_bytes(blob[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores its one byte
    return pos + checksum
