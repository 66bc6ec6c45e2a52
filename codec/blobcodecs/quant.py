"""``quant``: per-tile uniform quantization, pixels stored losslessly with zstd.

The mosaic's pixels (``bits`` of them, 1..16, after the per-tile affine
map) are stored as one zstd frame: one byte a pixel for ``bits <= 8``,
otherwise two bytes little-endian grouped by significance (all low bytes,
then all high bytes). No transform: the error is the mapping's rounding,
at most half a step. It is the codec for tensors an image codec does not
suit (a 10x512 output layer) and a rate-distortion option for the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import FormatError
from .abc import BlobCodec, check_params
from .zstd import Zstd

__all__ = ["Quant"]


class Quant(BlobCodec):
    """Uniform ``bits``-bit pixels, zstd-compressed."""

    codec_id = "quant"
    lossy = True

    def __init__(self, bits: int = 8, level: int = 9):
        self.bits = check_params(self.codec_id, "bits", bits, int, 1, 16)
        self.level = check_params(self.codec_id, "level", level, int, -7, 22)
        self._zstd = Zstd(level=self.level, shuffle=True)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "bits": self.bits, "level": self.level}

    @property
    def pixel_dtype(self) -> np.dtype:
        """uint8 up to 8 bits, little-endian uint16 above."""
        return np.dtype(np.uint8 if self.bits <= 8 else "<u2")

    def encode(self, array: np.ndarray) -> bytes:
        return self._zstd.encode(np.ascontiguousarray(array, self.pixel_dtype))

    def decode(self, blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        try:
            pixels = self._zstd.decode(blob, shape, self.pixel_dtype)
        except FormatError as exc:
            raise FormatError(f"quant: {exc}") from None
        if self.bits not in (8, 16) and pixels.size and int(pixels.max()) >> self.bits:
            raise FormatError(f"quant: pixel value {int(pixels.max())} exceeds {self.bits} bits")
        return pixels
