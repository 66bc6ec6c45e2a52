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
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import numpy as np

from . import mapping, tiling
from .blobcodecs import BlobCodec, Jpeg, JpegXL, Quant, Zstd
from .dtypes import DType, from_float64
from .errors import EncodeError, FormatError
from .format import TensorEntry
from .parallel import INLINE, Pending

__all__ = ["EncodeOptions", "Encoded", "encode_tensor", "start_encode", "decode_tensor", "start_decode", "jxl_distance",
           "parse_spec", "Overrides"]

#: Tensors with fewer elements are not coded as images: an image codec's
#: headers and per-tile parameters would eat what it saves.
MIN_IMAGE_ELEMENTS = 16384
#: A lossy matrix needs at least this many rows and columns (thinner ones
#: are vectors: a per-tile offset/scale would cost more than it saves).
MIN_SIDE = 8
#: Tensors with fewer elements are not worth quantizing (they save under 3 KB).
MIN_QUANT_ELEMENTS = 1024
CODEC_CHOICES = ("jpeg", "jpegxl", "quant", "lossless")
TABLE_CHOICES = ("auto", "jpeg", "flat", "ramp1", "ramp2", "ramp4")


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


#: zstd level of floating tensors stored losslessly (exponent first): on all-MiniLM-L6-v2 level 1 compresses
#: better than 9 (1.207 vs 1.194 for float32, 1.464 vs 1.424 for bfloat16) and 8-9x faster (bench/lossless.py).
LOSSLESS_FLOAT_LEVEL = 1


def lossless_codec(dtype: DType, level: int) -> Zstd:
    """The codec of a tensor stored losslessly: 16/32/64-bit floats exponent first at
    :data:`LOSSLESS_FLOAT_LEVEL`; anything else byte-shuffled at ``level``."""
    if dtype.floating and dtype.itemsize > 1:
        return Zstd(level=LOSSLESS_FLOAT_LEVEL, shuffle=True, exponent_first=True)
    return Zstd(level=level, shuffle=True)


def lossless_reason(array: np.ndarray, dtype: DType, codec: str = "jpeg") -> str | None:
    """Return why ``array`` cannot be coded with lossy ``codec``, or None if it can."""
    if not dtype.floating:
        return f"dtype {dtype.name} is not floating"
    if array.ndim < 2 or array.size == 0:
        return f"shape {list(array.shape)} has no matrix view"
    rows, cols = array.shape[0], math.prod(array.shape[1:])
    if rows < MIN_SIDE or cols < MIN_SIDE:
        return f"matrix {rows}x{cols} is thinner than {MIN_SIDE}, a vector rather than a matrix"
    least = MIN_QUANT_ELEMENTS if codec == "quant" else MIN_IMAGE_ELEMENTS
    if array.size < least:
        return f"{array.size} elements < {least}"
    return None


def encode_tensor(array: np.ndarray, dtype: DType, opts: EncodeOptions, *, executor: Executor | None = None) -> Encoded:
    """Encode one tensor (storage form) according to ``opts``.

    With an ``executor`` the image blobs are coded in parallel; the result
    is the same bytes whatever the executor.
    """
    return start_encode(array, dtype, opts, executor).result()


def start_encode(array: np.ndarray, dtype: DType, opts: EncodeOptions, executor: Executor | None = None) -> Pending:
    """Submit the coding of one tensor's blobs to ``executor``; ``.result()`` gives the :class:`Encoded`.

    Each image blob is one task that converts only its own tiles to float64
    (a band of the matrix), so memory holds the input tensor plus a few
    blob-sized buffers per worker, never a float64 copy of the tensor.
    """
    ex = executor or INLINE
    lossless = lossless_codec(dtype, opts.zstd_level)
    if opts.codec in ("jpeg", "jpegxl") and lossless_reason(array, dtype, opts.codec) is not None:
        # Too small or thin for an image codec: 8-bit quant if it is a matrix worth quantizing.
        opts = opts.with_(codec="quant", bits=8)
    if opts.codec == "lossless" or lossless_reason(array, dtype, opts.codec) is not None:
        return Pending([ex.submit(lossless.encode, array)], lambda parts: Encoded(lossless, None, parts))
    rows, cols = array.shape[0], math.prod(array.shape[1:])
    t = tiling.plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
    image = opts.image_codec(t.mode)
    matrix = array.reshape(rows, cols)

    def assemble(parts: list) -> Encoded:
        if any(p is None for p in parts):  # a tile holds NaN or Inf
            return Encoded(lossless, None, [lossless.encode(array)], fallback="holds NaN or Inf")
        offset = np.concatenate([p[0] for p in parts])
        scale = np.concatenate([p[1] for p in parts])
        return Encoded(image, t, [mapping.pack_params(offset, scale, t.params)] + [p[2] for p in parts])

    return Pending([ex.submit(_encode_blob, matrix, dtype, t, image, k) for k in range(t.n_blobs)], assemble)


def _widen(src: np.ndarray, dtype: DType, out: np.ndarray) -> None:
    """Write the float64 values of ``src`` (storage form) into ``out``."""
    if dtype.name == "bfloat16":
        bits = src.astype(np.uint32)
        bits <<= 16
        src = bits.view(np.float32)
    np.copyto(out, src, casting="unsafe")


def _band_f64(matrix: np.ndarray, dtype: DType, t: tiling.Tiling, g0: int, g1: int) -> np.ndarray:
    """Tile rows ``g0..g1-1`` of a grid-tiled matrix as float64 ``[(g1-g0)*th, GC*tw]``, edge-padded."""
    th, tw = t.tile_h, t.tile_w
    gc = t.grid[1]
    r0 = g0 * th
    h, w = min((g1 - g0) * th, t.rows - r0), t.cols
    band = np.empty(((g1 - g0) * th, gc * tw), np.float64)
    _widen(matrix[r0 : r0 + h], dtype, band[:h, :w])
    if w < band.shape[1]:
        band[:h, w:] = band[:h, w - 1 : w]
    if h < band.shape[0]:
        band[h:] = band[h - 1 : h]
    return band


def _encode_blob(matrix: np.ndarray, dtype: DType, t: tiling.Tiling, image: BlobCodec, k: int):
    """Code image blob ``k``: ``(offset, scale, blob bytes)`` of its tiles, or None if a value is not finite."""
    idx = t.blob_tiles(k)
    th, tw = t.tile_h, t.tile_w
    pixel_type = np.uint8 if image.bits <= 8 else np.uint16
    gc = t.grid[1]
    if t.mode == "grid" and t.columns == gc:
        # Mosaic rows are tile rows: the blob's image is a band of the matrix itself.
        cell_rows = len(idx) // gc
        g0 = idx.start // gc
        band = _band_f64(matrix, dtype, t, g0, g0 + cell_rows)
        cells = band.reshape(cell_rows, th, gc, tw)
        lo, hi = cells.min(axis=(1, 3)).reshape(-1), cells.max(axis=(1, 3)).reshape(-1)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            return None
        offset, scale = mapping.params_from_range(lo, hi, image.bits, t.params)
        shape4 = (cell_rows, 1, gc, 1)
        mapping.pixels_in_place(cells, offset.reshape(shape4), scale.reshape(shape4), image.bits)
        return offset, scale, image.encode(band.astype(pixel_type))
    if t.mode == "rows":
        tiles = np.empty((len(idx), th, tw), np.float64)
        _widen(matrix[idx.start : idx.stop], dtype, tiles.reshape(len(idx), th * tw))
    else:
        g0, g1 = idx.start // gc, -(-idx.stop // gc)
        band = _band_f64(matrix, dtype, t, g0, g1)
        tiles = band.reshape(g1 - g0, th, gc, tw).transpose(0, 2, 1, 3).reshape(-1, th, tw)
        tiles = tiles[idx.start - g0 * gc : idx.stop - g0 * gc]
    lo, hi = tiles.min(axis=(1, 2)), tiles.max(axis=(1, 2))
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    offset, scale = mapping.params_from_range(lo, hi, image.bits, t.params)
    mapping.pixels_in_place(tiles, offset[:, None, None], scale[:, None, None], image.bits)
    mid = 1 << (image.bits - 1)
    return offset, scale, image.encode(tiling.blob_mosaic(tiles.astype(pixel_type), t, k, mid))


def decode_tensor(entry: TensorEntry, blobs: Sequence[bytes], *, executor: Executor | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Decode a stored (non-alias) entry's blobs to its array in storage form.

    Image blobs are decoded in parallel with an ``executor``, each straight
    into its part of the output array (``out``, or a new array).
    """
    return start_decode(entry, blobs, executor, out).result()


def start_decode(entry: TensorEntry, blobs: Sequence[bytes], executor: Executor | None = None,
                 out: np.ndarray | None = None) -> Pending:
    """Submit the decoding of one entry's (CRC-checked) blobs; ``.result()`` gives the array."""
    codec, t, dtype = entry.codec, entry.tiling, entry.dtype
    assert codec is not None
    ex = executor or INLINE
    if out is None:
        out = np.empty(entry.shape, dtype.storage)
    elif out.shape != tuple(entry.shape) or out.dtype != dtype.storage or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype.storage}{tuple(entry.shape)} array")
    if t is None:
        return Pending([ex.submit(_decode_whole, codec, blobs[0], entry.shape, dtype.storage, out)], lambda _: out)
    offset, scale = mapping.unpack_params(blobs[0], t.params)
    bad = np.flatnonzero(~(np.isfinite(offset) & np.isfinite(scale)))
    if bad.size:
        i = int(bad[0])
        raise FormatError(f"tile {i}: offset {offset[i]} / scale {scale[i]} are not finite")
    matrix = out.reshape(t.rows, t.cols)
    futures = [ex.submit(_decode_blob, codec, t, dtype, k, blobs[1 + k], offset, scale, matrix)
               for k in range(t.n_blobs)]
    return Pending(futures, lambda _: out)


def _decode_whole(codec: BlobCodec, blob: bytes, shape: tuple[int, ...], storage: np.dtype, out: np.ndarray) -> None:
    """Decode a lossless blob into ``out``."""
    if isinstance(codec, Zstd):
        codec.decode(blob, shape, storage, out=out)
    else:
        out[...] = codec.decode(blob, shape, storage)


#: Use per-tile lookup tables when tiles have at least this many pixels (a
#: table costs 256 evaluations of the formula; a pixel costs a lookup).
LUT_MIN_TILE_PIXELS = 128
#: Decode float32 tensors with bfloat16 parameters by float32 arithmetic where exact (see _exact_in_float32).
FLOAT32_ARITHMETIC = True
#: Elements mapped per step, so temporaries stay in the CPU caches.
_CHUNK = 1 << 16


def _decode_blob(codec: BlobCodec, t: tiling.Tiling, dtype: DType, k: int, blob: bytes, offset: np.ndarray,
                 scale: np.ndarray, matrix: np.ndarray) -> None:
    """Decode image blob ``k`` and write its tiles' values into ``matrix`` (the output, viewed as ``[R, C]``).

    Three exact ways to map pixels, fastest first: float32 arithmetic where
    it gives the spec's values (:func:`_exact_in_float32`), per-tile lookup
    tables for 8-bit pixels, else the spec's binary64 formula.
    """
    try:
        pixels = codec.decode(blob, t.blob_shape(k), np.dtype(np.uint8))
    except FormatError as exc:
        raise type(exc)(f"blob {1 + k}: {exc}") from None
    idx = t.blob_tiles(k)
    th, tw = t.tile_h, t.tile_w
    o, s = offset[idx.start : idx.stop], scale[idx.start : idx.stop]
    gc = t.grid[1]
    band = t.mode == "grid" and t.columns == gc  # the image is a band of the matrix (plus padding)
    direct = _exact_in_float32(pixels, o, s, dtype, t) and (t.mode == "rows" or (band and t.cols == gc * tw))
    lut = None
    if not direct and pixels.dtype == np.uint8 and th * tw >= LUT_MIN_TILE_PIXELS:
        lut = mapping.lookup_table(o, s, dtype).reshape(-1)
    if band:
        r0, cols = (idx.start // gc) * th, t.cols
        height = min(pixels.shape[0], t.rows - r0)
        if lut is not None:
            # One cell row at a time: its tiles' tables are a slice of ``lut``
            # and a pixel's entry is ``256 * (tile column) + pixel``, small
            # enough for a 16-bit index where the row has at most 256 tiles.
            col_base = ((np.arange(cols) // tw) * 256).astype(np.uint16 if gc <= 256 else np.uint32)
            step = max(1, _CHUNK // cols)
            for a in range(-(-height // th)):
                row_lut = lut[a * gc * 256 : (a + 1) * gc * 256]
                for y in range(a * th, min((a + 1) * th, height), step):
                    y1 = min(y + step, (a + 1) * th, height)
                    np.take(row_lut, pixels[y:y1, :cols] + col_base, out=matrix[r0 + y : r0 + y1], mode="clip")
            return
        for a in range(-(-height // th)):
            y, y1 = a * th, min((a + 1) * th, height)
            cells = pixels[y:y1].reshape(y1 - y, gc, tw)
            o_row, s_row = o[a * gc : (a + 1) * gc, None], s[a * gc : (a + 1) * gc, None]
            if direct:
                dest = matrix[r0 + y : r0 + y1].reshape(y1 - y, gc, tw)
                np.multiply(cells, s_row, out=dest)
                np.add(dest, o_row, out=dest)
            else:
                values = o_row.astype(np.float64) + s_row.astype(np.float64) * cells
                matrix[r0 + y : r0 + y1] = from_float64(values.reshape(y1 - y, gc * tw)[:, :cols], dtype)
        return
    tiles = tiling.from_mosaic(pixels, t, k)
    if t.mode == "rows":
        dest_tiles = matrix[idx.start : idx.stop].reshape(len(idx), th, tw)
    step = min(256, max(1, _CHUNK // (th * tw)))  # at most 256 tiles: a 16-bit table index
    tile_base = (np.arange(step, dtype=np.uint16) * 256)[:, None, None]
    for j in range(0, len(idx), step):
        j1 = min(j + step, len(idx))
        src = tiles[j:j1]
        if direct:  # rows mode
            np.multiply(src, s[j:j1, None, None], out=dest_tiles[j:j1])
            np.add(dest_tiles[j:j1], o[j:j1, None, None], out=dest_tiles[j:j1])
            continue
        if lut is not None:
            index = src + tile_base[: j1 - j]
            chunk_lut = lut[j * 256 : j1 * 256]
            if t.mode == "rows":
                np.take(chunk_lut, index, out=dest_tiles[j:j1], mode="clip")
                continue
            values = np.take(chunk_lut, index, mode="clip")
        else:
            values = from_float64(o[j:j1, None, None].astype(np.float64)
                                  + s[j:j1, None, None].astype(np.float64) * src, dtype)
        if t.mode == "rows":
            dest_tiles[j:j1] = values
        else:
            _place_tiles(matrix, t, idx.start + j, values)


def _exact_in_float32(pixels: np.ndarray, offset: np.ndarray, scale: np.ndarray, dtype: DType,
                      t: tiling.Tiling) -> bool:
    """True when float32 arithmetic gives exactly the spec's values: ``offset + scale * p`` in float32.

    With bfloat16 parameters (8 significant bits) and 8-bit pixels the
    product has at most 16 significant bits, so it is exact in float32;
    the sum of two float32 numbers rounded once to float32 equals the
    spec's binary64 sum rounded to float32, because binary64 has more than
    2 * 24 + 1 bits (double rounding is innocuous for addition; Figueroa,
    "When is double rounding innocuous?", 1995). The range check keeps
    every product and sum finite, as the binary64 ones are.
    """
    if not FLOAT32_ARITHMETIC or dtype.name != "float32" or t.params != "bfloat16" or pixels.dtype != np.uint8:
        return False
    if not len(scale):
        return False
    return float(np.abs(offset).max()) + 255.0 * float(np.abs(scale).max()) < 2.0**126


def _place_tiles(matrix: np.ndarray, t: tiling.Tiling, i0: int, values: np.ndarray) -> None:
    """Write decoded grid tiles ``i0, i0+1, ...`` (``values[n, th, tw]``) into the matrix, dropping padding."""
    th, tw = t.tile_h, t.tile_w
    gc = t.grid[1]
    i1 = i0 + len(values)
    for g in range(i0 // gc, -(-i1 // gc)):
        j0, j1 = max(i0, g * gc), min(i1, (g + 1) * gc)
        r0, c0 = g * th, (j0 - g * gc) * tw
        r1, c1 = min(r0 + th, t.rows), min((j1 - g * gc) * tw, t.cols)
        part = values[j0 - i0 : j1 - i0].transpose(1, 0, 2).reshape(th, -1)
        matrix[r0:r1, c0:c1] = part[: r1 - r0, : c1 - c0]


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
    try:
        return base.with_(**changes)
    except EncodeError as exc:
        raise EncodeError(f"setting {spec!r}: {exc}") from None


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
