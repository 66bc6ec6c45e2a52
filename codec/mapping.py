"""The per-tile affine map between float weights and integer pixels.

Normative for decoders (spec/format.md, "Pixel mapping"): a tile stores two
numbers, ``offset`` and ``scale`` (binary32, or bfloat16 widened exactly to
binary32), and a pixel ``p`` decodes to::

    value = float64(offset) + float64(scale) * p      # exact product, one rounding

which is then rounded to the tensor's dtype (round half to even). A constant
tile has ``scale == 0`` and decodes to ``offset`` everywhere.

Informative (the encoder's choice, which a decoder never needs): ``offset``
is the tile minimum rounded down to the parameter type and ``scale`` the
range over ``2**bits - 1`` levels rounded up, so the stored parameters
cover the whole tile; pixels are ``clip(rint((x - offset) / scale))``
computed with the stored parameters, an error of at most half a step.
bfloat16 parameters (4 bytes a tile instead of 8) widen the step by at
most 0.8 %.

Format 1.4 (header flag ``params_zstd``, spec section 7): a parameter blob
shorter than its plain length ``T * 2 * size`` is one zstd frame of its byte
planes, the content the ``zstd`` codec with ``shuffle`` gives for the ``2T``
values (:func:`stored_params` writes it where that saves at least
:data:`PARAMS_ZSTD_SAVING` of the tensor's bytes, :func:`unpack_params`
reads either form).
"""

from __future__ import annotations

import numpy as np

from .blobcodecs.zstd import Zstd
from .dtypes import DType, from_float64
from .errors import FormatError

__all__ = ["PARAM_TYPES", "tile_params", "params_from_range", "pack_params", "unpack_params", "stored_params",
           "compress_params", "params_length", "to_pixels", "pixels_in_place", "pixels_float32", "reciprocals",
           "float32_exact", "from_pixels", "lookup_table"]

#: Parameter element types and their size in bytes (offset and scale each).
PARAM_TYPES = {"float32": 4, "bfloat16": 2}
#: The writer stores a tensor's parameter blob as a zstd frame (format 1.4, flag ``params_zstd``) where that saves
#: at least this share of the tensor's blob bytes (spec 8.3): the Fashion-MNIST MLP's 512 rows of 28x28 at 0.4
#: bits/weight, 2,048 -> 1,228 bytes (4 % of the file); a 64x64 grid of a large matrix saves ~0.05 %, not worth a
#: file that 1.3 readers refuse.
PARAMS_ZSTD_SAVING = 0.01
#: The frame's codec: byte planes (``shuffle``), zstd level 19 (2 KB in about 0.15 ms). Measured on the bench
#: models' parameter blobs (bench/JOURNAL.md, "Compressed tile parameters"): planes 5,412 bytes of 8,652, plain
#: zstd 6,820; a prediction of the offset from the scale, planes per field, rotations or delta coding gave no more.
_PARAMS_ZSTD = Zstd(level=19, shuffle=True)


def _to_param(values: np.ndarray, kind: str, up: bool) -> np.ndarray:
    """Round float64 ``values`` to the parameter type, up or down, returned as float32."""
    f32 = values.astype(np.float32)
    wrong = f32.astype(np.float64) < values if up else f32.astype(np.float64) > values
    f32 = np.where(wrong, np.nextafter(f32, np.float32(np.inf if up else -np.inf)), f32)
    if kind == "float32":
        return f32
    bits = f32.view(np.uint32)
    truncated = bits & np.uint32(0xFFFF0000)
    # Truncating the low 16 bits moves toward zero: right when rounding up a
    # negative or down a positive, otherwise step one bfloat16 away from zero.
    keep = (truncated == bits) | ((f32 < 0) == up)
    return np.where(keep, truncated, truncated + np.uint32(0x10000)).view(np.float32)


def tile_params(tiles: np.ndarray, bits: int, kind: str = "bfloat16") -> tuple[np.ndarray, np.ndarray]:
    """Return per-tile ``(offset, scale)`` (float32 values of type ``kind``) for tiles ``[n, h, w]``."""
    flat = tiles.reshape(tiles.shape[0], -1)
    return params_from_range(flat.min(axis=1), flat.max(axis=1), bits, kind)


def params_from_range(lo: np.ndarray, hi: np.ndarray, bits: int,
                      kind: str = "bfloat16") -> tuple[np.ndarray, np.ndarray]:
    """Per-tile ``(offset, scale)`` from each tile's float64 minimum and maximum."""
    offset = _to_param(np.asarray(lo, np.float64), kind, up=False)
    span = (np.asarray(hi, np.float64) - offset.astype(np.float64)) / float((1 << bits) - 1)
    scale = _to_param(span, kind, up=True)
    return offset, scale


def pack_params(offset: np.ndarray, scale: np.ndarray, kind: str) -> bytes:
    """Serialize parameters as little-endian ``(offset, scale)`` pairs."""
    pairs = np.stack([offset, scale], axis=1).astype("<f4")
    if kind == "bfloat16":
        return (pairs.view("<u4") >> 16).astype("<u2").tobytes()
    return pairs.tobytes()


def params_length(n_tiles: int, kind: str) -> int:
    """Bytes of the plain parameter blob of ``n_tiles`` tiles: ``T * 2 * size``."""
    return n_tiles * 2 * PARAM_TYPES[kind]


def stored_params(offset: np.ndarray, scale: np.ndarray, kind: str, other_bytes: int, compress: bool = True) -> bytes:
    """The parameter blob a writer stores for a tensor whose other blobs take ``other_bytes``: the plain
    :func:`pack_params` bytes, or (``compress``, format 1.4) their zstd frame where that saves at least
    :data:`PARAMS_ZSTD_SAVING` of the tensor's bytes."""
    plain = pack_params(offset, scale, kind)
    if not compress or len(plain) < PARAMS_ZSTD_SAVING * other_bytes:  # it cannot save enough
        return plain
    packed = compress_params(plain, kind)
    return packed if len(plain) - len(packed) >= PARAMS_ZSTD_SAVING * (len(packed) + other_bytes) else plain


def compress_params(plain: bytes, kind: str) -> bytes:
    """The 1.4 form of a plain parameter blob: one zstd frame (content size declared) of its byte planes, as the
    ``zstd`` codec with ``shuffle`` codes ``2T`` unsigned integers of the parameter size (spec section 7)."""
    return _PARAMS_ZSTD.encode(np.frombuffer(plain, f"<u{PARAM_TYPES[kind]}"))


def unpack_params(blob: bytes, kind: str, n_tiles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_params` (and of :func:`stored_params`, given ``n_tiles``: a blob shorter than
    :func:`params_length` is the 1.4 zstd frame): ``(offset, scale)`` as float32 arrays."""
    if n_tiles is not None and len(blob) != params_length(n_tiles, kind):
        try:
            blob = _PARAMS_ZSTD.decode(blob, (2 * n_tiles,), np.dtype(f"<u{PARAM_TYPES[kind]}")).tobytes()
        except FormatError as exc:
            raise FormatError(f"tile parameters: {exc}") from None
    if kind == "bfloat16":
        pairs = (np.frombuffer(blob, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        pairs = np.frombuffer(blob, "<f4")
    pairs = pairs.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def to_pixels(tiles: np.ndarray, offset: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Map float64 tiles ``[n, h, w]`` to pixels (uint8 for 8 bits, else uint16)."""
    maxval = (1 << bits) - 1
    o = offset.astype(np.float64)[:, None, None]
    s = scale.astype(np.float64)[:, None, None]
    pixels = np.rint((tiles - o) / np.where(s > 0, s, 1.0))
    pixels = np.where(s > 0, pixels, 0.0)
    np.clip(pixels, 0, maxval, out=pixels)
    return pixels.astype(np.uint8 if bits <= 8 else np.uint16)


def pixels_in_place(values: np.ndarray, offset: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """:func:`to_pixels` without temporaries: overwrite float64 ``values`` with pixel values.

    ``offset`` and ``scale`` (float32) must broadcast against ``values``
    (one per tile); the result is the same numbers :func:`to_pixels` gives,
    still as float64 (the caller narrows them to its pixel type).
    """
    o = offset.astype(np.float64)
    s = scale.astype(np.float64)
    constant = s == 0
    values -= o
    values /= np.where(constant, 1.0, s)
    np.rint(values, out=values)
    if constant.any():
        np.copyto(values, 0.0, where=np.broadcast_to(constant, values.shape))
    np.clip(values, 0, (1 << bits) - 1, out=values)
    return values


#: :func:`pixels_float32` recomputes in binary64 every value whose float32 quotient lies within this distance of
#: a half step (the rounding could go either way there): its float32 quotient ``(x - offset) * (1 / scale)`` is
#: within 3 * 256 * 2**-24 (4.6e-5) of the binary64 one for pixels of 8 bits or fewer (three roundings of relative
#: error 2**-24 each: the difference, the reciprocal and the product; the quotient at most 256), 2.6 times less
#: than this margin.
HALF_MARGIN = 2.0**-13


def float32_exact(offset: np.ndarray, scale: np.ndarray, bits: int) -> bool:
    """Whether :func:`pixels_float32` gives :func:`pixels_in_place`'s pixels for tiles with these float32
    parameters: pixels of at most 8 bits, finite parameters, every nonzero step a normal float32 (not flushed
    where the CPU flushes subnormals) and every ``offset + (2**bits - 1) * scale`` far from float32's overflow."""
    if bits > 8 or not len(scale):
        return False
    with np.errstate(all="ignore"):
        if not (np.isfinite(offset).all() and np.isfinite(scale).all()):
            return False
        steps = scale[scale != 0]
        if steps.size and float(np.abs(steps).min()) < 2.0**-100:
            return False
        return float(np.abs(offset).max()) + 256.0 * float(np.abs(scale).max()) < 2.0**120


def reciprocals(scale: np.ndarray) -> np.ndarray:
    """``1 / scale`` rounded to float32 (1 where ``scale`` is 0): the ``inverse`` :func:`pixels_float32` takes."""
    s = scale.astype(np.float64)
    return np.divide(1.0, s, out=np.ones_like(s), where=s != 0).astype(np.float32)


def pixels_float32(values: np.ndarray, offset: np.ndarray, scale: np.ndarray, bits: int,
                   out: np.ndarray | None = None, work: np.ndarray | None = None,
                   inverse: np.ndarray | None = None) -> np.ndarray:
    """:func:`pixels_in_place`'s pixel values for float32 ``values``, computed in float32 (half the work of
    binary64), for parameters :func:`float32_exact` accepts: the same numbers, as float32, in ``out`` (a new array
    if None; ``work``, a float32 array of ``values``' shape, is used as scratch where given).

    ``offset`` and ``scale`` (float32) broadcast against ``values`` as for :func:`pixels_in_place`; ``inverse``
    (optional) is :func:`reciprocals` of ``scale``, of its shape (a caller mapping many chunks with the same
    parameters computes it once). The quotient ``(x - offset) * (1 / scale)`` in float32 differs from the binary64
    ``(x - offset) / scale`` by less than :data:`HALF_MARGIN` of a step, so both round to the same integer except
    where the float32 one lies within that margin of a half step; those few values (about 2 in 10,000) are
    recomputed with :func:`pixels_in_place`'s binary64 arithmetic.
    """
    constant = scale == 0
    any_constant = bool(constant.any())
    q = np.subtract(values, offset, out=work, dtype=np.float32)
    np.multiply(q, reciprocals(scale) if inverse is None else inverse, out=q)
    pixels = np.rint(q, out=out)
    np.subtract(q, pixels, out=q)
    np.abs(q, out=q)
    near = np.flatnonzero(q > 0.5 - HALF_MARGIN)
    if near.size:  # the binary64 arithmetic of pixels_in_place on these values
        where = np.unravel_index(near, values.shape)
        o, s = (_gather(v, where, values.shape).astype(np.float64) for v in (offset, scale))
        exact = values[where].astype(np.float64)
        exact -= o
        exact /= np.where(s == 0, 1.0, s)
        pixels[where] = np.rint(exact)
    if any_constant:
        np.copyto(pixels, 0.0, where=np.broadcast_to(constant, values.shape))
    np.clip(pixels, 0, (1 << bits) - 1, out=pixels)
    return pixels


def _gather(param: np.ndarray, where: tuple[np.ndarray, ...], shape: tuple[int, ...]) -> np.ndarray:
    """``np.broadcast_to(param, shape)[where]`` (``where``: index arrays into ``shape``), by indexing ``param``
    itself where it has as many axes (0 on its axes of length 1): no broadcast view made (numpy's broadcast_to
    costs 10 us of Python; the mapping calls this twice a chunk)."""
    if param.ndim != len(shape):
        return np.broadcast_to(param, shape)[where]
    return param[tuple(w if n != 1 else 0 for w, n in zip(where, param.shape, strict=True))]


def lookup_table(offset: np.ndarray, scale: np.ndarray, dtype: DType, levels: int = 256) -> np.ndarray:
    """Decoded values of every pixel level for each tile: ``[n_tiles, levels]`` in ``dtype``'s storage form.

    Entry ``[i, p]`` is exactly what :func:`from_pixels` and the dtype
    rounding give for pixel ``p`` of tile ``i`` (the spec's binary64 formula,
    then one rounding to the dtype), so decoding 8-bit pixels through the
    table is a lookup instead of arithmetic per pixel.
    """
    levels_f64 = np.arange(levels, dtype=np.float64)
    values = offset.astype(np.float64)[:, None] + scale.astype(np.float64)[:, None] * levels_f64
    return from_float64(values, dtype)


def from_pixels(pixels: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Decode pixels ``[n, h, w]`` with per-tile parameters to float64."""
    o = offset.astype(np.float64)[:, None, None]
    s = scale.astype(np.float64)[:, None, None]
    return o + s * pixels
