"""Coding one tensor: choose lossy or lossless, tile, map, and code blobs.

Works on numpy arrays in storage form (see :mod:`codec.dtypes`); the
container (:mod:`codec.writer`, :mod:`codec.reader`) stores what this module
produces. The encoder's rules (which tensors are coded lossily, the default
tiling) are documented in spec/format.md, "Encoder behaviour".
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import numpy as np

from . import mapping, tiling
from .blobcodecs import BlobCodec, Jpeg, JpegXL, Quant, Zstd
from .blobcodecs.jpeg import quality_at_scale, quality_scale, scaled_table
from .blobcodecs.zstd import planes_codec
from .dtypes import SIGNIFICAND, DType, from_float64, round_significand, to_float64
from .errors import EncodeError, FormatError
from .format import TensorEntry
from .parallel import INLINE, Pending

__all__ = ["EncodeOptions", "Encoded", "encode_tensor", "start_encode", "decode_tensor", "start_decode",
           "decode_encoded", "decoded_bands", "jxl_distance", "parse_spec", "Overrides", "option_conflicts",
           "given_options", "ignored_options", "not_applied", "round_trip"]

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


#: JPEG quality when none is given.
DEFAULT_QUALITY = 90
#: JPEG XL distance when neither a distance nor a quality is given. Measured by ``python -m bench.jxl_vs_jpeg``
#: (bench/results/jxl_vs_jpeg.md, 64x64 grid tiles): at 0.2 JPEG XL lands where JPEG's default (quality 90,
#: flat table) does, 5.1-5.5 bits/weight, with 3.5-4.0 % relative error where JPEG has 4.1-4.3 % (at equal
#: size 0.89-0.98x JPEG's error on the MLP, CNN and MiniLM matrices). libjxl's own default, distance 1.0
#: (its map of quality 90), gave 17-20 % error at 2.6-3.2 bits/weight, a point JPEG reaches at quality 50.
JXL_DEFAULT_DISTANCE = 0.2


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
    #: 1..100; None means :data:`DEFAULT_QUALITY` for JPEG (and lets "auto" choose quant).
    quality: int | None = None
    #: JPEG quantization table: "auto" = "jpeg" for rows mode (image-like
    #: receptive fields), "flat" for grid tiles.
    table: str = "auto"
    #: JPEG: the table's scale in percent of its base (libjpeg's, spec 8.2), for a step between two qualities
    #: where one quality step changes a tensor's bytes 1.5-2.3x (qualities 4-10: scales 1250, 1000, 833, ...);
    #: the table is then stored as its 64 entries and ``quality`` is the next coarser one's (the largest with a
    #: larger scale). None: ``quality``'s own scale. Set by the rate search and repair (:mod:`codec.rd.ladder`).
    scale: int | None = None
    #: JPEG XL distance; None derives it from ``quality`` (libjxl's map), or, without a quality, is
    #: :data:`JXL_DEFAULT_DISTANCE`.
    distance: float | None = None
    #: Pixel bits of the ``quant`` codec (uniform per-tile quantization + zstd).
    bits: int = 8
    effort: int = 3
    tile: tuple[int, int] = (64, 64)
    row_shape: tuple[int, int] | None = None
    zstd_level: int = 9
    #: Element type of the per-tile offset/scale: "bfloat16" or "float32".
    params: str = "bfloat16"
    #: Store the tile parameters as one zstd frame where that saves at least 1 % of the tensor's bytes (format
    #: 1.4, header flag ``params_zstd``: :func:`codec.mapping.stored_params`); False keeps them plain (a 1.3 file).
    compress_params: bool = True
    #: Lossless codec, floating tensors: each value's significand rounded to this many bits before coding
    #: (:func:`codec.dtypes.round_significand`, at most ``2**-(bits + 1)`` relative error an element; the zeroed
    #: low bits cost next to nothing, the decoder is the lossless one). None: the values exactly. The rate search
    #: offers it for tensors too small or thin for the other codecs (:data:`codec.rd.allocate.VECTOR_BITS`).
    significand_bits: int | None = None

    def __post_init__(self) -> None:
        if self.codec == "auto":
            explicit_jpeg = self.quality is not None or self.row_shape is not None or self.table != "auto"
            codec = "jpegxl" if self.distance is not None else "jpeg" if explicit_jpeg else "quant"
            object.__setattr__(self, "codec", codec)
        if self.codec not in CODEC_CHOICES:
            raise EncodeError(f"codec {self.codec!r} is not one of {', '.join(CODEC_CHOICES)}")
        if not 1 <= self.bits <= 16:
            raise EncodeError(f"bits {self.bits} is not in 1..16")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise EncodeError(f"quality {self.quality} is not in 1..100")
        if self.significand_bits is not None and not 0 <= self.significand_bits <= 52:
            raise EncodeError(f"significand bits {self.significand_bits} is not in 0..52")
        if self.params not in mapping.PARAM_TYPES:
            raise EncodeError(f"params {self.params!r} is not one of {', '.join(mapping.PARAM_TYPES)}")
        if self.table not in TABLE_CHOICES:
            raise EncodeError(f"table {self.table!r} is not one of {', '.join(TABLE_CHOICES)}")
        if self.scale is not None:
            if not 1 <= self.scale <= quality_scale(1):
                raise EncodeError(f"JPEG table scale {self.scale} is not in 1..{quality_scale(1)}")
            if self.scale == quality_scale(DEFAULT_QUALITY if self.quality is None else self.quality):
                object.__setattr__(self, "scale", None)  # the quality's own table: stored by its name
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
            distance = self.distance if self.distance is not None else (
                JXL_DEFAULT_DISTANCE if self.quality is None else jxl_distance(self.quality))
            return JpegXL(distance=float(distance), effort=self.effort)
        table = self.table if self.table != "auto" else ("jpeg" if mode == "rows" else "flat")
        quality = DEFAULT_QUALITY if self.quality is None else self.quality
        return Jpeg(quality=quality, table=table if self.scale is None else scaled_table(table, self.scale))


@dataclass
class Encoded:
    """What encoding one tensor produced."""

    codec: BlobCodec
    tiling: tiling.Tiling | None
    blobs: list[bytes]
    #: Why a tensor asked to be lossy was stored losslessly (None otherwise).
    fallback: str | None = None
    #: ``||decoded - original|| / ||original||`` when :func:`start_encode` was asked to ``check`` it and it
    #: could be :data:`ZERO_ERROR` or more; None when not measured (lossless, or bounded well below).
    rel_error: float | None = None
    #: CRC-32 of each blob when already computed (by a Ray worker, so its coordinator does not); None: not yet.
    crcs: list[int] | None = None
    #: ``(file, offset, lengths)`` when a Ray worker on this machine wrote the blobs one after another into
    #: ``file`` (a part file of the :class:`codec.writer.Writer`, :meth:`~codec.writer.Writer.parts_folder`)
    #: instead of returning them: ``blobs`` is then empty and ``crcs`` is set.
    part: tuple[str, int, list[int]] | None = None


#: Relative RMS error of storing zeros instead of a tensor: a coding at or above it is worse than nothing.
ZERO_ERROR = 1.0


#: zstd level of float16 tensors stored losslessly (exponent first): on all-MiniLM-L6-v2 level 1 compresses
#: better than 9 (1.207 vs 1.194 for float32, 1.464 vs 1.424 for bfloat16) and 8-9x faster (bench/lossless.py).
LOSSLESS_FLOAT_LEVEL = 1


def lossless_codec(dtype: DType, level: int) -> Zstd:
    """The codec of a tensor stored losslessly: bfloat16, float32 and float64 as ``zstd_planes`` (format 1.2,
    rotated byte planes, :func:`~codec.blobcodecs.zstd.planes_codec`; ratio 1.224 / 1.505 on MiniLM float32 /
    bfloat16 against 1.21 / 1.46 exponent first),
    float16 exponent first at :data:`LOSSLESS_FLOAT_LEVEL`; anything else byte-shuffled at ``level``."""
    planes = planes_codec(dtype.name) if dtype.floating else None
    if planes is not None:
        return planes
    if dtype.floating and dtype.itemsize > 1:
        return Zstd(level=LOSSLESS_FLOAT_LEVEL, shuffle=True, exponent_first=True)
    return Zstd(level=level, shuffle=True)


def lossless_reason(array: np.ndarray, dtype: DType, codec: str = "jpeg") -> str | None:
    """Return why ``array`` cannot be coded with lossy ``codec``, or None if it can."""
    return shape_lossless_reason(tuple(array.shape), dtype, codec)


def shape_lossless_reason(shape: tuple[int, ...], dtype: DType, codec: str = "jpeg") -> str | None:
    """:func:`lossless_reason` from the shape alone (nothing of the data is needed)."""
    size = math.prod(shape)
    if not dtype.floating:
        return f"dtype {dtype.name} is not floating"
    if len(shape) < 2 or size == 0:
        return f"shape {list(shape)} has no matrix view"
    rows, cols = shape[0], math.prod(shape[1:])
    if rows < MIN_SIDE or cols < MIN_SIDE:
        return f"matrix {rows}x{cols} is thinner than {MIN_SIDE}, a vector rather than a matrix"
    least = MIN_QUANT_ELEMENTS if codec == "quant" else MIN_IMAGE_ELEMENTS
    if size < least:
        return f"{size} elements < {least}"
    return None


def not_applied(shape: tuple[int, ...], dtype: DType, opts: EncodeOptions) -> str | None:
    """Why ``opts`` will not be coded as asked for a tensor of ``shape`` (None: it will, or it asks for lossless).

    The encoder's fallbacks (:func:`start_encode`): too small or thin for an image codec gives 8-bit quant,
    not even a quant-worthy matrix gives lossless; a row shape that does not fit the rows gives grid tiles.
    """
    if opts.codec == "lossless":
        return None
    quant_reason = shape_lossless_reason(shape, dtype, "quant")
    if quant_reason is not None:
        return f"stored losslessly ({quant_reason})"
    if opts.codec in ("jpeg", "jpegxl"):
        reason = shape_lossless_reason(shape, dtype, opts.codec)
        if reason is not None:
            return f"coded as 8-bit quant, not {opts.codec} ({reason})"
    if opts.row_shape is not None:
        cols = math.prod(shape[1:])
        h, w = opts.row_shape
        if h * w != cols:
            return (f"row shape {h}x{w} ({h * w} values) does not fit its rows of {cols} values; "
                    f"coded in {opts.tile[0]}x{opts.tile[1]} grid tiles")
    return None


#: Default value of each EncodeOptions field that only some codecs use, and the codecs that use it.
_CODEC_FIELDS = {"bits": (8, ("quant",)), "quality": (None, ("jpeg", "jpegxl")), "distance": (None, ("jpegxl",)),
                 "table": ("auto", ("jpeg",)), "scale": (None, ("jpeg",)), "effort": (3, ("jpegxl",)),
                 "row_shape": (None, ("jpeg", "jpegxl", "quant")), "tile": ((64, 64), ("jpeg", "jpegxl", "quant"))}
#: Fields the rate search chooses per tensor itself, or does not use (its menu has no JPEG XL): a value
#: given for them would be ignored.
SEARCH_CHOOSES = ("codec", "bits", "quality", "distance", "table", "scale", "tile", "effort")


def option_conflicts(given: Mapping[str, object], *, searching: bool = False,
                     codec: str | None = None) -> str | None:
    """The first contradiction among options a user gave explicitly (EncodeOptions fields), or None.

    ``given`` holds only the options the user set (for ``codec.save``: the keyword arguments that differ
    from the defaults; for the CLI: the options on the command line). A field one codec alone uses, given
    with another codec (``bits=4`` with ``codec="jpeg"``), contradicts it; with ``searching`` (a rate
    target), a field the search picks per tensor is ignored, so it contradicts too. ``codec`` is the codec
    when ``given`` does not say (a per-tensor setting applied on top of the global options).
    """
    if searching:
        chosen = [k for k in SEARCH_CHOOSES if k in given and not (k == "codec" and given[k] == "auto")]
        if chosen:
            return (f"{', '.join(chosen)}: not used with a rate target (bits_per_weight / max_error), whose "
                    "search picks codec, bits, quality, table and tiles per tensor; force single tensors with "
                    "per-tensor settings instead")
        return None
    fields = {k: v for k, v in given.items() if k in EncodeOptions.__dataclass_fields__}
    try:
        resolved = EncodeOptions(**fields).codec if "codec" in given or codec is None else codec
    except EncodeError as exc:
        return str(exc)
    for key, (_, users) in _CODEC_FIELDS.items():
        if key in given and resolved not in users:
            how = "chosen" if given.get("codec", "auto") != "auto" else "selected by the other options"
            return (f"{key} {given[key]!r} applies to codec {' / '.join(users)} only, and the codec {how} is "
                    f"{resolved}")
    return None


def given_options(options: Mapping[str, object]) -> dict[str, object]:
    """The options of ``options`` that differ from the EncodeOptions defaults (what a caller set)."""
    fields = EncodeOptions.__dataclass_fields__
    out = {}
    for key, value in options.items():
        default = fields[key].default if key in fields else None
        if key in fields and (tuple(value) if isinstance(value, list) else value) != default:
            out[key] = value
    return out


def encode_tensor(array: np.ndarray, dtype: DType, opts: EncodeOptions, *, executor: Executor | None = None,
                  pixels: dict | None = None) -> Encoded:
    """Encode one tensor (storage form) according to ``opts``.

    With an ``executor`` the image blobs are coded in parallel; the result
    is the same bytes whatever the executor. ``pixels``: see :func:`start_encode`.
    """
    return start_encode(array, dtype, opts, executor, pixels=pixels).result()


def start_encode(array: np.ndarray, dtype: DType, opts: EncodeOptions, executor: Executor | None = None,
                 check: bool = False, pixels: dict | None = None) -> Pending:
    """Submit the coding of one tensor's blobs to ``executor``; ``.result()`` gives the :class:`Encoded`.

    Each image blob is one task that converts only its own tiles to float64
    (a band of the matrix), so memory holds the input tensor plus a few
    blob-sized buffers per worker, never a float64 copy of the tensor.

    With ``check``, a lossy result gets its relative error (``Encoded.rel_error``) where it could reach
    :data:`ZERO_ERROR`: ``quant`` is bounded from the tiles' ranges, which the coding computes anyway
    (:func:`quant_error_bound`; 8-bit quant, the default, never needs more), the image codecs are
    decoded once and compared.

    ``pixels`` (a dict, optional) keeps the tiles' float64 values and ranges and the pixel images of each tiling
    and pixel depth, for further codings of this same ``array`` (the rate search codes a sample with every JPEG
    quality and quant depth of its menu: one tiling's tiles are widened and ranged once, its 8-bit pixels, which
    every JPEG quality and 8-bit quant code, mapped once). The bytes are the same with it or without; the caller
    passes one dict per array, and the dict holds about ten times the array's size for each tiling.
    """
    ex = executor or INLINE
    lossless = lossless_codec(dtype, opts.zstd_level)
    opts, stored = _as_coded(array, dtype, opts)
    if stored is array:
        return Pending([ex.submit(lossless.encode, array)], lambda parts: Encoded(lossless, None, parts))
    if stored is not None:  # rounded significands: lossy after all

        def rounded_for(parts: list) -> Encoded:
            encoded = Encoded(lossless, None, parts)
            if check:
                encoded.rel_error = relative_error(array, dtype, encoded)
            return encoded

        return Pending([ex.submit(lossless.encode, stored)], rounded_for)
    rows, cols = array.shape[0], math.prod(array.shape[1:])
    t = tiling.plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
    image = opts.image_codec(t.mode)
    matrix = array.reshape(rows, cols)

    def assemble(parts: list) -> Encoded:
        if any(p is None for p in parts):  # a tile holds NaN or Inf
            return Encoded(lossless, None, [lossless.encode(array)], fallback="holds NaN or Inf")
        offset = np.concatenate([p[0] for p in parts])
        scale = np.concatenate([p[1] for p in parts])
        images = [p[2] for p in parts]
        params = mapping.stored_params(offset, scale, t.params, sum(map(len, images)), opts.compress_params)
        encoded = Encoded(image, t, [params] + images)
        if check and isinstance(image, Quant):
            bound = quant_error_bound(t, scale, np.concatenate([p[3] for p in parts]),
                                      np.concatenate([p[4] for p in parts]))
            if bound >= ZERO_ERROR / 2:
                encoded.rel_error = relative_error(array, dtype, encoded)
        elif check:
            sums = [p[5] for p in parts]
            if any(e is None for e in sums):
                encoded.rel_error = relative_error(array, dtype, encoded)
            else:
                err, ref = sum(e for e, _ in sums), sum(r for _, r in sums)
                encoded.rel_error = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)
        return encoded

    if pixels is not None and not check:
        return Pending([ex.submit(_encode_blob, matrix, dtype, t, image, k, pixels) for k in range(t.n_blobs)],
                       assemble)
    task = _encode_checked_blob if check and not isinstance(image, Quant) else _encode_blob
    return Pending([ex.submit(task, matrix, dtype, t, image, k) for k in range(t.n_blobs)], assemble)


def _as_coded(array: np.ndarray, dtype: DType, opts: EncodeOptions) -> tuple[EncodeOptions, np.ndarray | None]:
    """``(options, stored)``: the options ``array`` is coded with (an image codec on a matrix too small or thin for
    it falls back to 8-bit quant, if the matrix is worth quantizing) and, where the lossless codec stores it, the
    values it stores: ``array`` itself, or a new array with its significands rounded (``lossless`` asked with
    :attr:`EncodeOptions.significand_bits`); None where a lossy codec codes it."""
    if opts.codec in ("jpeg", "jpegxl") and lossless_reason(array, dtype, opts.codec) is not None:
        opts = opts.with_(codec="quant", bits=8)
    if opts.codec == "lossless":
        rounded = _rounded(array, dtype, opts.significand_bits)
        return opts, array if rounded is None else rounded
    return opts, array if lossless_reason(array, dtype, opts.codec) is not None else None


def _rounded(array: np.ndarray, dtype: DType, bits: int | None) -> np.ndarray | None:
    """``array`` with its significands rounded to ``bits`` (:attr:`EncodeOptions.significand_bits`), or None where
    that changes nothing or does not apply (no bits asked, as many as the dtype has or more, not floating, or a
    NaN or infinity among the values: those are kept exactly)."""
    if bits is None or bits >= SIGNIFICAND.get(dtype.name, 0) or not np.isfinite(to_float64(array, dtype)).all():
        return None
    return round_significand(array, dtype, bits)


def _encode_checked_blob(matrix: np.ndarray, dtype: DType, t: tiling.Tiling, image: BlobCodec, k: int):
    """:func:`_encode_blob`, then decode the blob at once (in the same worker) and add ``(||error||^2,
    ||values||^2)`` over its rows as a sixth item (None where the blob is not a run of whole rows)."""
    part = _encode_blob(matrix, dtype, t, image, k)
    if part is None:
        return None
    span = _blob_rows(t, k)
    if span is None:
        return (*part, None)
    r0, r1 = span
    idx = t.blob_tiles(k)
    offset, scale = (np.zeros(idx.stop, p.dtype) for p in part[:2])  # the decoder indexes tiles from 0
    offset[idx.start :], scale[idx.start :] = part[0], part[1]
    decoded = _decode_rows(image, t, dtype, k, part[2], offset, scale, r0, r1)
    return (*part, _error_sums(matrix[r0:r1], decoded, dtype))


def _blob_rows(t: tiling.Tiling, k: int) -> tuple[int, int] | None:
    """The rows ``(r0, r1)`` of the matrix that blob ``k`` holds whole, or None where it is not a run of whole rows
    (a grid whose blobs split the columns)."""
    idx = t.blob_tiles(k)
    gc = t.grid[1]
    if t.mode == "rows":
        return idx.start, idx.stop
    if t.columns == gc:
        r0 = (idx.start // gc) * t.tile_h
        return r0, min(r0 + (len(idx) // gc) * t.tile_h, t.rows)
    return None


def _decode_rows(codec: BlobCodec, t: tiling.Tiling, dtype: DType, k: int, blob: bytes, offset: np.ndarray,
                 scale: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Blob ``k`` decoded alone: the matrix rows ``r0..r1-1`` it holds (:func:`_blob_rows`)."""
    rows = np.empty((r1 - r0, t.cols), dtype.storage)
    _decode_blob(codec, t, dtype, k, blob, offset, scale, rows, first_row=r0)
    return rows


def decoded_bands(encoded: Encoded, dtype: DType, shape: tuple[int, ...], name: str = ""
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """What :func:`decode_encoded` gives, as ``(first row, rows)`` bands of its ``[rows, cols]`` matrix view, in
    order and covering it: one blob's rows at a time where blobs hold whole rows, so a caller that measures the
    decoded values band by band never holds the whole tensor (else the whole matrix at once)."""
    t = encoded.tiling
    if t is None or any(_blob_rows(t, k) is None for k in range(t.n_blobs)):
        whole = decode_encoded(encoded, dtype, shape, name)
        yield 0, whole.reshape(shape[0] if len(shape) else 1, -1)
        return
    offset, scale = mapping.unpack_params(encoded.blobs[0], t.params, t.n_tiles)
    for k in range(t.n_blobs):
        r0, r1 = _blob_rows(t, k)
        yield r0, _decode_rows(encoded.codec, t, dtype, k, encoded.blobs[1 + k], offset, scale, r0, r1)


def _error_sums(reference: np.ndarray, decoded: np.ndarray, dtype: DType) -> tuple[float, float]:
    """``(||decoded - reference||^2, ||reference||^2)`` of two ``[rows, cols]`` arrays in storage form, in
    float64, a band of rows at a time (two reused buffers)."""
    rows, cols = reference.shape
    step = max(1, min(rows, (1 << 16) // max(1, cols)))
    x, y = np.empty((step, cols), np.float64), np.empty((step, cols), np.float64)
    err = ref = 0.0
    for r in range(0, rows, step):
        n = min(step, rows - r)
        _widen(reference[r : r + n], dtype, x[:n])
        _widen(decoded[r : r + n], dtype, y[:n])
        ref += float(np.einsum("ij,ij->", x[:n], x[:n]))  # (BLAS dot: slow with busy threads)
        np.subtract(y[:n], x[:n], out=y[:n])
        err += float(np.einsum("ij,ij->", y[:n], y[:n]))
    return err, ref


def quant_error_bound(t: tiling.Tiling, scale: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """An upper bound of the relative RMS error of ``quant`` from each tile's step and range, without decoding.

    Each value is rounded to the nearest step, so ``||error||^2 <= sum n * (scale / 2)^2`` (``n`` values a
    tile). A tile whose values span ``[lo, hi]`` holds two values ``hi - lo`` apart and one at least
    ``d = dist(0, [lo, hi])`` from zero, so ``||W||^2 >= sum max((hi - lo)^2 / 2, d^2)``. At 8 bits on
    64x64 tiles the bound is about 0.18 whatever the data.
    """
    n = t.tile_h * t.tile_w
    error2 = n * float(np.sum(np.square(scale.astype(np.float64) / 2)))
    d = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    energy = float(np.sum(np.maximum(np.square(hi - lo) / 2, np.square(d))))
    return math.sqrt(error2 / energy) if energy > 0 else (0.0 if error2 == 0 else math.inf)


def relative_error(array: np.ndarray, dtype: DType, encoded: Encoded) -> float:
    """``||decoded - array|| / ||array||`` of an encoding (decoded once; compared a band of rows at a time)."""
    shape = tuple(array.shape)
    decoded = decode_encoded(encoded, dtype, shape)
    rows = shape[0] if shape else 1
    err, ref = _error_sums(array.reshape(rows, -1), decoded.reshape(rows, -1), dtype)
    return math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)


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


def _encode_blob(matrix: np.ndarray, dtype: DType, t: tiling.Tiling, image: BlobCodec, k: int,
                 cache: dict | None = None):
    """Code image blob ``k``: ``(offset, scale, blob bytes, lo, hi)`` of its tiles, or None if a value is not
    finite (``cache``: :func:`start_encode`'s ``pixels``)."""
    mapped = _map_blob(matrix, dtype, t, image.bits, k, cache)
    if mapped is None:
        return None
    offset, scale, pixels, lo, hi = mapped
    return offset, scale, image.encode(pixels), lo, hi


def _blob_values(matrix: np.ndarray, dtype: DType, t: tiling.Tiling, k: int):
    """The float64 values of blob ``k``'s tiles and each tile's minimum and maximum: ``(values, lo, hi)``; the
    values a band ``[cell rows * th, GC * tw]`` (edge-padded) when the blob is a band of the matrix, else tiles
    ``[n, th, tw]``."""
    idx = t.blob_tiles(k)
    th, tw = t.tile_h, t.tile_w
    gc = t.grid[1]
    if t.mode == "grid" and t.columns == gc:
        # Mosaic rows are tile rows: the blob's image is a band of the matrix itself.
        cell_rows = len(idx) // gc
        g0 = idx.start // gc
        band = _band_f64(matrix, dtype, t, g0, g0 + cell_rows)
        cells = band.reshape(cell_rows, th, gc, tw)
        # Each tile's extremes over its rows first, then its columns: the same values, twice as fast as both at once.
        return band, cells.min(axis=1).min(axis=-1).reshape(-1), cells.max(axis=1).max(axis=-1).reshape(-1)
    if t.mode == "rows":
        tiles = np.empty((len(idx), th, tw), np.float64)
        _widen(matrix[idx.start : idx.stop], dtype, tiles.reshape(len(idx), th * tw))
    else:
        g0, g1 = idx.start // gc, -(-idx.stop // gc)
        band = _band_f64(matrix, dtype, t, g0, g1)
        tiles = band.reshape(g1 - g0, th, gc, tw).transpose(0, 2, 1, 3).reshape(-1, th, tw)
        tiles = tiles[idx.start - g0 * gc : idx.stop - g0 * gc]
    return tiles, tiles.min(axis=(1, 2)), tiles.max(axis=(1, 2))


def _map_blob(matrix: np.ndarray, dtype: DType, t: tiling.Tiling, bits: int, k: int, cache: dict | None = None):
    """Blob ``k``'s tiles mapped to ``bits``-bit pixels: ``(offset, scale, pixel image, lo, hi)``, or None if a
    value is not finite. With ``cache`` (:func:`start_encode`'s ``pixels``) the float64 values and ranges of a
    tiling's blob, and its image at each depth, are computed once (the values copied before mapping)."""
    if cache is not None and (t, bits, k) in cache:
        return cache[t, bits, k]
    if cache is None and dtype.name == "float32" and bits <= 8:
        mapped = _map_float32(matrix, t, bits, k)
        if mapped is not NotImplemented:
            return mapped
    if cache is None:
        values, lo, hi = _blob_values(matrix, dtype, t, k)
    else:
        if (t, k) not in cache:
            cache[t, k] = _blob_values(matrix, dtype, t, k)
        values, lo, hi = cache[t, k]
        values = values.copy()
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        mapped = None
    else:
        idx = t.blob_tiles(k)
        pixel_type = np.uint8 if bits <= 8 else np.uint16
        offset, scale = mapping.params_from_range(lo, hi, bits, t.params)
        if values.ndim == 2:  # a band
            gc = t.grid[1]
            shape4 = (len(idx) // gc, 1, gc, 1)
            cells = values.reshape(len(idx) // gc, t.tile_h, gc, t.tile_w)
            mapping.pixels_in_place(cells, offset.reshape(shape4), scale.reshape(shape4), bits)
            image = values.astype(pixel_type)
        else:
            mapping.pixels_in_place(values, offset[:, None, None], scale[:, None, None], bits)
            image = tiling.blob_mosaic(values.astype(pixel_type), t, k, 1 << (bits - 1))
        mapped = offset, scale, image, lo, hi
    if cache is not None:
        cache[t, bits, k] = mapped
    return mapped


def _map_float32(matrix: np.ndarray, t: tiling.Tiling, bits: int, k: int):
    """:func:`_map_blob` of a float32 matrix at 8 bits or fewer without widening it: the same offsets, scales and
    pixels (:func:`mapping.pixels_float32`) at about half the arithmetic, a few cell rows at a time through
    buffers of that size reused within the call. NotImplemented where it does not apply (a grid whose blobs are not bands of
    the matrix, parameters :func:`mapping.float32_exact` refuses) or where the tiles' extremes could differ from
    binary64's (a tile whose minimum or maximum is zero: its sign is the one the binary64 reduction meets first);
    :func:`_map_blob`'s binary64 arithmetic then maps the blob."""
    idx = t.blob_tiles(k)
    th, tw = t.tile_h, t.tile_w
    gc = t.grid[1]
    if t.mode == "rows":
        src = matrix[idx.start : idx.stop].reshape(len(idx), th * tw)
        lo, hi = src.min(axis=1), src.max(axis=1)
    elif t.columns == gc:  # the blob's image is a band of the matrix, edge-padded (_blob_values)
        cell_rows, width = len(idx) // gc, gc * tw
        r0 = (idx.start // gc) * th
        h = min(cell_rows * th, t.rows - r0)
        src = matrix[r0 : r0 + h]
        # Each tile's extremes: over its rows, then over its columns (padding repeats the last row and column).
        whole = h // th
        ends = []
        for reduce in (np.minimum, np.maximum):
            per_row = np.empty((cell_rows, width), np.float32)
            reduce.reduce(src[: whole * th].reshape(whole, th, t.cols), axis=1, out=per_row[:whole, : t.cols])
            if whole < cell_rows:
                reduce.reduce(src[whole * th :], axis=0, out=per_row[whole, : t.cols])
            per_row[:, t.cols :] = per_row[:, t.cols - 1 : t.cols]
            ends.append(reduce.reduce(per_row.reshape(cell_rows, gc, tw), axis=-1).reshape(-1))
        lo, hi = ends
    else:
        return NotImplemented
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    if not (lo.all() and hi.all()):
        return NotImplemented
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)  # exactly binary64's extremes of the widened values
    offset, scale = mapping.params_from_range(lo, hi, bits, t.params)
    if not mapping.float32_exact(offset, scale, bits):
        return NotImplemented
    inverse = mapping.reciprocals(scale)
    if t.mode == "rows":
        per = max(1, _CHUNK // (th * tw))  # tiles a step
        pixels = np.empty((len(idx), th * tw), np.uint8)
        work, out = (np.empty((min(per, len(idx)), th * tw), np.float32) for _ in range(2))
        for j in range(0, len(idx), per):
            n = min(per, len(idx) - j)
            mapping.pixels_float32(src[j : j + n], offset[j : j + n, None], scale[j : j + n, None], bits,
                                   out[:n], work[:n], inverse[j : j + n, None])
            np.copyto(pixels[j : j + n], out[:n], casting="unsafe")
        image = tiling.blob_mosaic(pixels.reshape(len(idx), th, tw), t, k, 1 << (bits - 1))
        return offset, scale, image, lo, hi
    # Each tile's parameters repeated over its columns, so that a band's rows broadcast against them whole.
    o_cols, s_cols, i_cols = (np.repeat(v.reshape(cell_rows, gc), tw, axis=1)[:, None, :]
                              for v in (offset, scale, inverse))
    per = max(1, _CHUNK // (th * width))  # cell rows a step
    image = np.empty((cell_rows * th, width), np.uint8)
    band, work, out = (np.empty((min(per, cell_rows) * th, width), np.float32) for _ in range(3))
    for a in range(0, cell_rows, per):
        na = min(per, cell_rows - a)
        y, n = a * th, min(na * th, h - a * th)  # the band's rows, those of them in the matrix
        values = band[: na * th]
        values[:n, : t.cols] = src[y : y + n]
        values[:n, t.cols :] = values[:n, t.cols - 1 : t.cols]
        values[n:] = values[n - 1 : n]
        shape = (na, th, width)
        mapping.pixels_float32(values.reshape(shape), o_cols[a : a + na], s_cols[a : a + na], bits,
                               out[: na * th].reshape(shape), work[: na * th].reshape(shape), i_cols[a : a + na])
        np.copyto(image[y : y + na * th], out[: na * th], casting="unsafe")
    return offset, scale, image, lo, hi


def decode_tensor(entry: TensorEntry, blobs: Sequence[bytes], *, executor: Executor | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Decode a stored (non-alias) entry's blobs to its array in storage form.

    Image blobs are decoded in parallel with an ``executor``, each straight
    into its part of the output array (``out``, or a new array).
    """
    return start_decode(entry, blobs, executor, out).result()


def decode_encoded(encoded: Encoded, dtype: DType, shape: tuple[int, ...], name: str = "", *,
                   executor: Executor | None = None) -> np.ndarray:
    """What a reader decodes from ``encoded``, a tensor of ``dtype`` and ``shape`` just coded (storage form): the
    round trip the rate searches, repair and training measure (``name`` only for error messages)."""
    return decode_tensor(TensorEntry(name, dtype, tuple(shape), encoded.codec, encoded.tiling), encoded.blobs,
                         executor=executor)


def round_trip(array: np.ndarray, dtype: DType, opts: EncodeOptions, out: np.ndarray | None = None) -> np.ndarray:
    """What a reader decodes from ``array`` (storage form) coded with ``opts``, computed without the file: the
    tiles mapped to pixels as :func:`encode_tensor` maps them, each image through its codec's
    :meth:`~codec.blobcodecs.abc.BlobCodec.round_trip` (JPEG without optimised Huffman tables, quant's pixels as
    they are) and back to values as :func:`decode_tensor` maps them. The same array as ``decode_encoded(
    encode_tensor(array, dtype, opts), dtype, array.shape)`` at about half the cost: for the forward pass of
    codec-in-the-loop training (codec.train), which needs the values and not the bytes. ``out`` (optional): a
    C-contiguous array of ``array``'s shape and storage type to write them into (a loop that codes the same tensor
    again and again reuses one), returned; else a new array."""
    opts, stored = _as_coded(array, dtype, opts)
    if out is not None and (out.shape != array.shape or out.dtype != dtype.storage or not out.flags.c_contiguous):
        raise ValueError(f"round_trip: out must be a C-contiguous {np.dtype(dtype.storage)}{tuple(array.shape)} "
                         f"array, not {out.dtype}{tuple(out.shape)}")
    if stored is not None:
        if out is None:
            return array.copy() if stored is array else stored
        np.copyto(out, stored)
        return out
    rows, cols = array.shape[0], math.prod(array.shape[1:])
    t = tiling.plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
    image = opts.image_codec(t.mode)
    matrix = array.reshape(rows, cols)
    parts = [_map_blob(matrix, dtype, t, image.bits, k) for k in range(t.n_blobs)]
    if any(p is None for p in parts):  # a tile holds NaN or Inf: stored losslessly
        if out is None:
            return array.copy()
        np.copyto(out, array)
        return out
    offset, scale = mapping.unpack_params(mapping.pack_params(np.concatenate([p[0] for p in parts]),
                                                              np.concatenate([p[1] for p in parts]), t.params),
                                          t.params)  # as the reader gets them
    if out is None:
        out = np.empty(array.shape, dtype.storage)
    for k, part in enumerate(parts):
        _place_pixels(image.round_trip(part[2]), t, dtype, k, offset, scale, out.reshape(rows, cols))
    return out


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
    offset, scale = mapping.unpack_params(blobs[0], t.params, t.n_tiles)
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
                 scale: np.ndarray, matrix: np.ndarray, first_row: int = 0) -> None:
    """Decode image blob ``k`` and write its tiles' values into ``matrix`` (the output, viewed as ``[R, C]``; or,
    from ``first_row`` on, only its rows from that one on: those of a blob of whole rows, :func:`_blob_rows`).

    Three exact ways to map pixels, fastest first: float32 arithmetic where
    it gives the spec's values (:func:`_exact_in_float32`), per-tile lookup
    tables for 8-bit pixels, else the spec's binary64 formula.
    """
    try:
        pixels = codec.decode(blob, t.blob_shape(k), np.dtype(np.uint8))
    except FormatError as exc:
        raise type(exc)(f"blob {1 + k}: {exc}") from None
    _place_pixels(pixels, t, dtype, k, offset, scale, matrix, first_row)


def _place_pixels(pixels: np.ndarray, t: tiling.Tiling, dtype: DType, k: int, offset: np.ndarray,
                  scale: np.ndarray, matrix: np.ndarray, first_row: int = 0) -> None:
    """Write blob ``k``'s decoded ``pixels`` (its mosaic image) as values into ``matrix`` (:func:`_decode_blob`)."""
    idx = t.blob_tiles(k)
    th, tw = t.tile_h, t.tile_w
    o, s = offset[idx.start : idx.stop], scale[idx.start : idx.stop]
    gc = t.grid[1]
    band = t.mode == "grid" and t.columns == gc  # the image is a band of the matrix (plus padding)
    direct = _exact_in_float32(pixels, o, s, dtype, t) and (t.mode == "rows" or band)
    lut = None
    if not direct and pixels.dtype == np.uint8 and th * tw >= LUT_MIN_TILE_PIXELS:
        lut = mapping.lookup_table(o, s, dtype).reshape(-1)
    if band:
        _decode_band(pixels, matrix, t, dtype, idx.start // gc, o, s, direct, lut, first_row)
        return
    tiles = tiling.from_mosaic(pixels, t, k)
    if t.mode == "rows":
        dest_tiles = matrix[idx.start - first_row : idx.stop - first_row].reshape(len(idx), th, tw)
    elif first_row:
        raise ValueError(f"blob {k} does not hold whole rows")
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


def _decode_band(pixels: np.ndarray, matrix: np.ndarray, t: tiling.Tiling, dtype: DType, g0: int,
                 o: np.ndarray, s: np.ndarray, direct: bool, lut: np.ndarray | None, first_row: int = 0) -> None:
    """Write a band blob's pixels (its image is tile rows ``g0, g0+1, ...`` of the matrix, plus padding) into
    ``matrix`` (the matrix's rows from ``first_row`` on): several cell rows per numpy call, about :data:`_CHUNK`
    pixels each (one call a cell row cost more in Python than in arithmetic for thin tiles), by float32
    arithmetic (``direct``), a table lookup
    (``lut``: each tile's 256 entries in turn) or the spec's binary64 formula."""
    th, tw = t.tile_h, t.tile_w
    gc, cols = t.grid[1], t.cols
    r0 = g0 * th
    height = min(pixels.shape[0], t.rows - r0)
    whole = height // th  # cell rows of full height; a last, shorter one when the matrix ends inside it
    per = max(1, _CHUNK // (th * gc * tw))
    groups = [(a, min(a + per, whole), th) for a in range(0, whole, per)]
    if height > whole * th:
        groups.append((whole, whole + 1, height - whole * th))
    if lut is not None:
        # A pixel's entry is 256 * (its tile's place among the group's tiles) + pixel.
        tile_of_col = (np.arange(cols) // tw).astype(np.uint32)
    elif direct:  # each tile's parameters repeated over its matrix columns: whole rows in one call, no buffer
        o_cols, s_cols = (np.repeat(v.reshape(-1, gc), tw, axis=1)[:, None, :cols] for v in (o, s))
    for a0, a1, hh in groups:
        na, y = a1 - a0, a0 * th
        rows = na * hh
        dest = matrix[r0 - first_row + y : r0 - first_row + y + rows]
        if direct and dest.flags.c_contiguous:
            out = dest.reshape(na, hh, cols)
            np.multiply(pixels[y : y + rows, :cols].reshape(na, hh, cols), s_cols[a0:a1], out=out)
            np.add(out, o_cols[a0:a1], out=out)
            continue
        if lut is not None:
            base = (np.arange(na, dtype=np.uint32)[:, None] * gc + tile_of_col) * 256
            index = pixels[y : y + rows, :cols].reshape(na, hh, cols) + base[:, None, :]
            np.take(lut[a0 * gc * 256 : a1 * gc * 256], index, out=dest.reshape(na, hh, cols), mode="clip")
            continue
        cells = pixels[y : y + rows].reshape(na, hh, gc, tw)
        o4, s4 = o[a0 * gc : a1 * gc].reshape(na, 1, gc, 1), s[a0 * gc : a1 * gc].reshape(na, 1, gc, 1)
        if direct and cols == gc * tw:
            out = dest.reshape(na, hh, gc, tw)
            np.multiply(cells, s4, out=out)
            np.add(out, o4, out=out)
        elif direct:  # the last cell column is padded: whole cells into a buffer, its matrix columns copied
            out = np.multiply(cells, s4)
            np.add(out, o4, out=out)
            dest[...] = out.reshape(rows, gc * tw)[:, :cols]
        else:
            values = o4.astype(np.float64) + s4.astype(np.float64) * cells
            dest[...] = from_float64(values.reshape(rows, gc * tw)[:, :cols], dtype)


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


def _fractional_quality(q: float) -> dict[str, int | None]:
    """``quality`` and ``scale`` of a JPEG quality between two integers (``q6.5``): the table libjpeg's formula
    gives ``q`` (scale ``5000 / q`` percent below 50, ``200 - 2 q`` from 50; rounded to a whole percent, the
    step :mod:`codec.rd.ladder` labels ``q6.50``), with ``quality`` the next coarser integer's (information only;
    the file stores the table's 64 entries, spec 8.2). A whole ``q`` is that quality."""
    if not 1 <= q <= 100:
        raise ValueError
    scale = round(5000 / q) if q < 50 else round(200 - 2 * q)
    quality = quality_at_scale(scale)
    return {"quality": quality, "scale": None if quality_scale(quality) == scale else scale}


def parse_spec(spec: str, base: EncodeOptions) -> EncodeOptions:
    """Apply a per-tensor setting such as ``lossless``, ``q90``, ``b8`` or ``jpegxl,d1.5`` to ``base``.

    Comma-separated items: ``lossless``, ``jpeg``, ``jpegxl``, ``quant``
    (codec); ``qN`` (quality N); ``qX.Y`` (JPEG, a table between two
    qualities: :func:`_fractional_quality`); ``bN`` (``quant`` with N bits);
    ``dX`` (JPEG XL distance X); ``table=auto|jpeg|flat``; ``tile=HxW``;
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
                changes["quality"], changes["scale"] = int(item[1:]), None
                changes.setdefault("codec", base.codec if base.codec in ("jpeg", "jpegxl") else "jpeg")
            elif item[:1] == "q" and item[1:2].isdigit() and item[1:].replace(".", "", 1).isdigit():
                changes.update(_fractional_quality(float(item[1:])), codec="jpeg")
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
                              "quant, qN, qX.Y, bN, dX, table=..., tile=HxW or rows=HxW)") from None
    problem = option_conflicts(changes, codec=base.codec if "codec" not in changes else None)
    if problem:
        raise EncodeError(f"setting {spec!r}: {problem}")
    try:
        return base.with_(**changes)
    except EncodeError as exc:
        raise EncodeError(f"setting {spec!r}: {exc}") from None


class Overrides:
    """Per-tensor settings by glob pattern (``fnmatch``); the last matching rule wins."""

    def __init__(self, rules: Sequence[tuple[str, str]] | Mapping[str, str] | None = None):
        if isinstance(rules, (str, bytes)):  # one setting meant for every tensor (finetune's setting="b4")
            raise TypeError(f"overrides= takes {{glob: setting}} or (glob, setting) pairs, not a string: for one "
                            f"setting on every tensor, overrides={{'*': {rules!r}}}")
        items = rules.items() if isinstance(rules, Mapping) else (rules or [])
        try:
            self.rules = [(str(p), str(s)) for p, s in items]
        except (TypeError, ValueError):  # not iterable, or an item that is no (glob, setting) pair
            raise TypeError(f"overrides= takes {{glob: setting}} or (glob, setting) pairs, e.g. {{'fc2.*': 'b4'}}, "
                            f"not {rules!r:.80}") from None

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(self, base: EncodeOptions) -> None:
        """Raise EncodeError for any setting that does not parse, matched or not."""
        for _, spec in self.rules:
            parse_spec(spec, base)

    def rule_for(self, name: str) -> tuple[str, str] | None:
        """The ``(pattern, setting)`` that applies to ``name`` (the last match), or None."""
        return next(((p, s) for p, s in reversed(self.rules) if fnmatch.fnmatchcase(name, p)), None)

    def options_for(self, name: str, base: EncodeOptions) -> EncodeOptions | None:
        """The options forced for ``name``, or None if no rule matches."""
        rule = self.rule_for(name)
        return None if rule is None else parse_spec(rule[1], base)

    def unmatched(self, names: Sequence[str]) -> list[str]:
        """The patterns that match none of ``names``."""
        return [p for p, _ in self.rules if not any(fnmatch.fnmatchcase(n, p) for n in names)]


#: Tensors a rule is not applied to that are named one note each; more are one note for the rule.
_NAMED = 3


def ignored_options(tensors: Sequence[tuple[str, tuple[int, ...], DType]], base: EncodeOptions,
                    rules: Overrides) -> list[str]:
    """Notes naming the tensors where an option asked for is not applied, and why.

    ``tensors`` lists ``(name, shape, dtype)`` of the stored tensors. Reported: a per-tensor setting that
    the tensor's shape or dtype overrides (:func:`not_applied`), a pattern that matches no tensor, and a
    global ``row_shape`` that fits the rows of no lossy matrix.
    """
    notes = []
    fits_some = False
    refused: dict[tuple[str, str], list[tuple[str, str]]] = {}  # each rule's (tensor, reason) where not applied
    for name, shape, dtype in tensors:
        rule = rules.rule_for(name)
        reason = None if rule is None else not_applied(shape, dtype, parse_spec(rule[1], base))
        if reason is not None:
            refused.setdefault(rule, []).append((name, reason))
        if base.row_shape is not None and shape_lossless_reason(shape, dtype, "quant") is None:
            fits_some |= base.row_shape[0] * base.row_shape[1] == math.prod(shape[1:])
    for (pattern, spec), where in refused.items():
        if len(where) <= _NAMED:
            notes += [f"tensor {name!r}: setting {pattern}={spec} not applied: {reason}" for name, reason in where]
            continue
        # a broad glob ('*=b4') over a model's vectors: one line, not one per BatchNorm statistic
        kinds: dict[str, int] = {}
        for _, reason in where:
            kind = reason.partition(" (")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        rarest = sorted(where, key=lambda item: kinds[item[1].partition(" (")[0]])  # the odd ones out named first
        shown = ", ".join(f"{name!r} ({reason.partition(' (')[2].rstrip(')') or reason})"
                          for name, reason in rarest[:_NAMED])
        notes.append(f"setting {pattern}={spec} not applied to {len(where)} tensors ("
                     + ", ".join(f"{k}: {n}" for k, n in kinds.items())
                     + f"): {shown} and {len(where) - _NAMED} more")
    for pattern in rules.unmatched([n for n, _, _ in tensors]):
        notes.append(f"setting {pattern}={dict(rules.rules)[pattern]} matches no tensor name")
    if base.row_shape is not None and not fits_some and base.codec != "lossless":
        h, w = base.row_shape
        notes.append(f"row shape {h}x{w} ({h * w} values) fits the rows of no matrix; not applied "
                     f"({base.tile[0]}x{base.tile[1]} grid tiles instead)")
    return notes
