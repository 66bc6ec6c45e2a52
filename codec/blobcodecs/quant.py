"""``quant``: per-tile uniform quantization, pixels stored losslessly with zstd.

The mosaic's pixels (``bits`` of them, 1..16, after the per-tile affine
map) are stored as one zstd frame. Up to 4 bits, ``8 // bits`` pixels
share a byte, the first in the lowest bits (zstd's Huffman stage then
codes pixel pairs: measured on Gaussian weights at 4 bits, 3.43 bits a
pixel against 3.83 with one pixel a byte, the order-0 entropy being 3.41).
From 5 to 8 bits one byte a pixel; above, two bytes little-endian grouped
by significance (all low bytes, then all high bytes). No transform: the
error is the mapping's rounding, at most half a step. It is the codec for
tensors an image codec does not suit (a 10x512 output layer) and a
rate-distortion option for the rest.

``level`` is the highest zstd level used. The pixels of Gaussian-like
weights have no repeats for zstd's match finder to use: level 9 gives
the same size as level 1 (within 0.5 %, sometimes larger) at a third to
a tenth of the speed, while smooth or sparse tensors gain 10-50 % from it.
So a blob larger than ``2 * SAMPLE_BYTES`` is coded at level 1 unless
its first ``SAMPLE_BYTES`` shrink by at least 3 % at ``level``
(measured in ``bench/JOURNAL.md``, "Big models"). The choice depends on the
pixels only, so the bytes are the same whatever the number of jobs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import FormatError
from .abc import BlobCodec, check_params
from .zstd import Zstd

__all__ = ["SAMPLE_BYTES", "Quant"]

#: Bytes of a blob's start compressed at both levels to choose one (see the module docstring).
SAMPLE_BYTES = 64 << 10
#: The level a blob whose sample does not gain from ``level`` is coded at.
FAST_LEVEL = 1
#: The sample must shrink to less than this fraction at ``level`` for ``level`` to be used (3 %: a sample of
#: Gaussian 12-bit pixels gains 1.1 % while the whole blob loses 2 %; smooth or sparse pixels gain 8-50 %).
GAIN = 0.97


class Quant(BlobCodec):
    """Uniform ``bits``-bit pixels, packed and zstd-compressed."""

    codec_id = "quant"
    lossy = True

    def __init__(self, bits: int = 8, level: int = 9):
        self.bits = check_params(self.codec_id, "bits", bits, int, 1, 16)
        self.level = check_params(self.codec_id, "level", level, int, -7, 22)
        self._zstd = Zstd(level=self.level, shuffle=True)
        self._fast = Zstd(level=min(self.level, FAST_LEVEL), shuffle=True)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "bits": self.bits, "level": self.level}

    @property
    def pixel_dtype(self) -> np.dtype:
        """uint8 up to 8 bits, little-endian uint16 above."""
        return np.dtype(np.uint8 if self.bits <= 8 else "<u2")

    @property
    def per_byte(self) -> int:
        """Pixels packed into one byte (1 above 4 bits)."""
        return 8 // self.bits if self.bits <= 4 else 1

    def encode(self, array: np.ndarray) -> bytes:
        pixels = np.ascontiguousarray(array, self.pixel_dtype).reshape(-1)
        k = self.per_byte
        if k > 1:
            padded = np.zeros(-(-pixels.size // k) * k, np.uint8)
            padded[: pixels.size] = pixels
            lanes = padded.reshape(-1, k)
            pixels = np.zeros(len(lanes), np.uint8)
            for i in range(k):
                pixels |= lanes[:, i] << np.uint8(self.bits * i)
        return self._coder(pixels).encode(pixels)

    def round_trip(self, array: np.ndarray) -> np.ndarray:
        """The pixels themselves (stored exactly: the packing and zstd are lossless)."""
        return np.ascontiguousarray(array, self.pixel_dtype)

    def _coder(self, stored: np.ndarray) -> Zstd:
        """The zstd coder for ``stored`` (the packed pixels): ``level`` only if a sample gains 3 % from it."""
        if self.level <= FAST_LEVEL or stored.nbytes <= 2 * SAMPLE_BYTES:
            return self._zstd
        sample = stored[: SAMPLE_BYTES // stored.itemsize]
        return self._zstd if len(self._zstd.encode(sample)) < GAIN * len(self._fast.encode(sample)) else self._fast

    def decode(self, blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count, k = int(np.prod(shape, dtype=np.int64)), self.per_byte
        try:
            stored = self._zstd.decode(blob, (-(-count // k),), self.pixel_dtype)
        except FormatError as exc:
            raise FormatError(f"quant: {exc}") from None
        if k == 1:
            if self.bits not in (8, 16) and stored.size and int(stored.max()) >> self.bits:
                raise FormatError(f"quant: pixel value {int(stored.max())} exceeds {self.bits} bits")
            return stored.reshape(shape)
        if self.bits * k < 8 and stored.size and int(stored.max()) >> (self.bits * k):
            raise FormatError(f"quant: unused high bits set in a byte of {k} {self.bits}-bit pixels")
        mask = np.uint8((1 << self.bits) - 1)
        pixels = np.empty((stored.size, k), np.uint8)
        for i in range(k):
            pixels[:, i] = (stored >> np.uint8(self.bits * i)) & mask
        flat = pixels.reshape(-1)
        if flat[count:].any():
            raise FormatError("quant: padding pixels after the last one are not zero")
        return flat[:count].reshape(shape)
