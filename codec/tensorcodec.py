"""Coding one tensor: choose lossy or lossless, tile, map, and code blobs.

Works on numpy arrays in storage form (see :mod:`codec.dtypes`); the
container (:mod:`codec.writer`, :mod:`codec.reader`) stores what this module
produces. The encoder's rules (which tensors are coded lossily, the default
tiling) are documented in spec/format.md, "Encoder behaviour".
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from . import mapping, tiling
from .blobcodecs import BlobCodec, Jpeg, JpegXL, Quant, Zstd
from .dtypes import DType, from_float64, to_float64
from .errors import EncodeError, FormatError
from .format import TensorEntry

__all__ = ["EncodeOptions", "Encoded", "encode_tensor", "decode_tensor", "jxl_distance", "parse_spec", "Overrides"]

#: Tensors with fewer elements are not coded as images: an image codec's
#: headers and per-tile parameters would eat what it saves.
MIN_IMAGE_ELEMENTS = 16384
#: An image-coded matrix needs at least this many rows and columns.
MIN_IMAGE_SIDE = 8
#: Tensors with fewer elements are not worth quantizing (they save under 3 KB).
MIN_QUANT_ELEMENTS = 1024
CODEC_CHOICES = ("jpeg", "jpegxl", "quant", "lossless")
TABLE_CHOICES = ("auto", "jpeg", "flat")


def jxl_distance(quality: int) -> float:
    """libjxl's quality -> Butteraugli distance map (JxlEncoderDistanceFromQuality)."""
    if quality >= 100:
        return 0.0
    if quality >= 30:
        return 0.1 + (100 - quality) * 0.09
    return 53.0 / 3000.0 * quality * quality - 23.0 / 20.0 * quality + 25.0


@dataclass(frozen=True)
class EncodeOptions:
    """How to encode one tensor (the CLI's and codec.save's options)."""

    #: "auto": jpegxl when ``distance`` is given, jpeg when ``quality``,
    #: ``row_shape`` or a table is given, else quant 8-bit (the default,
    #: which loses no measurable accuracy on the benchmarks).
    codec: str = "auto"
    #: 1..100; None means 90 (JPEG) and lets "auto" choose quant.
    quality: int | None = None
    #: JPEG quantization table: "auto" = "jpeg" for rows mode (image-like
    #: receptive fields), "flat" for grid tiles.
    table: str = "auto"
    #: JPEG XL distance; None derives it from ``quality``.
    distance: float | None = None
    #: Pixel bits of the ``quant`` codec (uniform per-tile quantization + zstd).
    bits: int = 8
    effort: int = 3
    tile: tuple[int, int] = (64, 64)
    row_shape: tuple[int, int] | None = None
    zstd_level: int = 9
    #: Element type of the per-tile offset/scale: "bfloat16" or "float32".
    params: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.codec == "auto":
            explicit_jpeg = self.quality is not None or self.row_shape is not None or self.table != "auto"
            codec = "jpegxl" if self.distance is not None else "jpeg" if explicit_jpeg else "quant"
            object.__setattr__(self, "codec", codec)
        if self.quality is None:
            object.__setattr__(self, "quality", 90)
        if self.codec not in CODEC_CHOICES:
            raise EncodeError(f"codec {self.codec!r} is not one of {', '.join(CODEC_CHOICES)}")
        if not 1 <= self.bits <= 16:
            raise EncodeError(f"bits {self.bits} is not in 1..16")
        if not 1 <= self.quality <= 100:
            raise EncodeError(f"quality {self.quality} is not in 1..100")
        if self.params not in mapping.PARAM_TYPES:
            raise EncodeError(f"params {self.params!r} is not one of {', '.join(mapping.PARAM_TYPES)}")
        if self.table not in TABLE_CHOICES:
            raise EncodeError(f"table {self.table!r} is not one of {', '.join(TABLE_CHOICES)}")
        for what, shape in (("tile", self.tile), ("row shape", self.row_shape)):
            if shape is not None and not (len(shape) == 2 and all(1 <= int(v) <= 4096 for v in shape)):
                raise EncodeError(f"{what} {shape!r} must be two sizes in 1..4096")

    def with_(self, **changes) -> "EncodeOptions":
        """Return a copy with some fields changed."""
        return replace(self, **changes)

    def image_codec(self, mode: str) -> BlobCodec:
        """The blob codec for the mosaics of a tensor tiled in ``mode``."""
        if self.codec == "quant":
            return Quant(bits=self.bits, level=self.zstd_level)
        if self.codec == "jpegxl":
            distance = jxl_distance(self.quality) if self.distance is None else self.distance
            return JpegXL(distance=float(distance), effort=self.effort)
        table = self.table if self.table != "auto" else ("jpeg" if mode == "rows" else "flat")
        return Jpeg(quality=self.quality, table=table)


@dataclass
class Encoded:
    """What encoding one tensor produced."""

    codec: BlobCodec
    tiling: tiling.Tiling | None
    blobs: list[bytes]
    #: Why a tensor asked to be lossy was stored losslessly (None otherwise).
    fallback: str | None = None


def lossless_reason(array: np.ndarray, dtype: DType, codec: str = "jpeg") -> str | None:
    """Return why ``array`` cannot be coded with lossy ``codec``, or None if it can."""
    if not dtype.floating:
        return f"dtype {dtype.name} is not floating"
    if array.ndim < 2 or array.size == 0:
        return f"shape {list(array.shape)} has no matrix view"
    if codec == "quant":
        return f"{array.size} elements < {MIN_QUANT_ELEMENTS}" if array.size < MIN_QUANT_ELEMENTS else None
    rows, cols = array.shape[0], math.prod(array.shape[1:])
    if array.size < MIN_IMAGE_ELEMENTS:
        return f"{array.size} elements < {MIN_IMAGE_ELEMENTS}"
    if rows < MIN_IMAGE_SIDE or cols < MIN_IMAGE_SIDE:
        return f"matrix {rows}x{cols} is thinner than {MIN_IMAGE_SIDE}"
    return None


def encode_tensor(array: np.ndarray, dtype: DType, opts: EncodeOptions) -> Encoded:
    """Encode one tensor (storage form) according to ``opts``."""
    lossless = Zstd(level=opts.zstd_level, shuffle=True)
    if opts.codec == "lossless" or lossless_reason(array, dtype, opts.codec) is not None:
        return Encoded(lossless, None, [lossless.encode(array)])
    values = to_float64(array, dtype)
    if not np.isfinite(values).all():
        return Encoded(lossless, None, [lossless.encode(array)], fallback="holds NaN or Inf")
    rows, cols = array.shape[0], math.prod(array.shape[1:])
    t = tiling.plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
    image = opts.image_codec(t.mode)
    tiles = tiling.extract_tiles(values.reshape(rows, cols), t)
    offset, scale = mapping.tile_params(tiles, image.bits, t.params)
    pixels = mapping.to_pixels(tiles, offset, scale, image.bits)
    mid = 1 << (image.bits - 1)
    blobs = [mapping.pack_params(offset, scale, t.params)]
    blobs += [image.encode(tiling.to_mosaic(pixels, t, k, mid)) for k in range(t.n_blobs)]
    return Encoded(image, t, blobs)


def decode_tensor(entry: TensorEntry, blobs: list[bytes]) -> np.ndarray:
    """Decode a stored (non-alias) entry's blobs to its array in storage form."""
    codec, t, dtype = entry.codec, entry.tiling, entry.dtype
    assert codec is not None
    if t is None:
        return codec.decode(blobs[0], entry.shape, dtype.storage)
    offset, scale = mapping.unpack_params(blobs[0], t.params)
    bad = np.flatnonzero(~(np.isfinite(offset) & np.isfinite(scale)))
    if bad.size:
        i = int(bad[0])
        raise FormatError(f"tile {i}: offset {offset[i]} / scale {scale[i]} are not finite")
    out = np.empty((t.n_tiles, t.tile_h, t.tile_w), dtype.storage)
    for k in range(t.n_blobs):
        idx = t.blob_tiles(k)
        try:
            pixels = tiling.from_mosaic(codec.decode(blobs[1 + k], t.blob_shape(k), np.dtype(np.uint8)), t, k)
        except FormatError as exc:
            raise type(exc)(f"blob {1 + k}: {exc}") from None
        values = mapping.from_pixels(pixels, offset[idx.start : idx.stop], scale[idx.start : idx.stop])
        out[idx.start : idx.stop] = from_float64(values, dtype)
    return np.ascontiguousarray(tiling.assemble_tiles(out, t)).reshape(entry.shape)


def parse_spec(spec: str, base: EncodeOptions) -> EncodeOptions:
    """Apply a per-tensor setting such as ``lossless``, ``q90``, ``b8`` or ``jpegxl,d1.5`` to ``base``.

    Comma-separated items: ``lossless``, ``jpeg``, ``jpegxl``, ``quant``
    (codec); ``qN`` (quality N); ``bN`` (``quant`` with N bits); ``dX``
    (JPEG XL distance X); ``table=auto|jpeg|flat``; ``tile=HxW``;
    ``rows=HxW`` (row shape). A quality or distance alone keeps the
    codec of ``base`` unless it is lossless/quant, then it selects jpeg
    (``qN``) or jpegxl (``dX``).
    """
    changes: dict[str, object] = {}
    for raw in spec.split(","):
        item = raw.strip().lower()
        key, _, value = item.partition("=")
        try:
            if item in CODEC_CHOICES:
                changes["codec"] = item
            elif item[:1] == "q" and item[1:].isdigit():
                changes["quality"] = int(item[1:])
                changes.setdefault("codec", base.codec if base.codec in ("jpeg", "jpegxl") else "jpeg")
            elif item[:1] == "b" and item[1:].isdigit():
                changes.update(codec="quant", bits=int(item[1:]))
            elif item[:1] == "d":
                changes.update(codec="jpegxl", distance=float(item[1:]))
            elif key == "table" and value:
                changes["table"] = value
            elif key in ("tile", "rows") and value:
                h, w = (int(v) for v in value.split("x"))
                changes["tile" if key == "tile" else "row_shape"] = (h, w)
            else:
                raise ValueError
        except ValueError:
            raise EncodeError(f"setting {spec!r}: cannot read {raw.strip()!r} (expected lossless, jpeg, jpegxl, "
                              "quant, qN, bN, dX, table=..., tile=HxW or rows=HxW)") from None
    return base.with_(**changes)


class Overrides:
    """Per-tensor settings by glob pattern (``fnmatch``); the last matching rule wins."""

    def __init__(self, rules: Sequence[tuple[str, str]] | Mapping[str, str] | None = None):
        items = rules.items() if isinstance(rules, Mapping) else (rules or [])
        self.rules = [(str(p), str(s)) for p, s in items]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(self, base: EncodeOptions) -> None:
        """Raise EncodeError for any setting that does not parse, matched or not."""
        for _, spec in self.rules:
            parse_spec(spec, base)

    def options_for(self, name: str, base: EncodeOptions) -> EncodeOptions | None:
        """The options forced for ``name``, or None if no rule matches."""
        spec = next((s for p, s in reversed(self.rules) if fnmatch.fnmatchcase(name, p)), None)
        return None if spec is None else parse_spec(spec, base)
