"""GPTQ rounding for the ``quant`` codec: choose pixels so the layer's output error is small, not each weight's.

Encoder side only: the file holds ordinary ``quant`` pixels with ordinary
per-tile offset/scale, decoded as always.

A linear layer ``y = W x`` (a convolution viewed through im2col) with
inputs of second moment ``H = E[x x^T]`` has output error
``tr(dW H dW^T)`` for a weight error ``dW``. Rounding each weight to its
nearest level minimises ``||dW||^2`` instead; GPTQ (Frantar et al., 2022,
after OBQ) rounds the matrix column by column and, after each column, moves
the columns not yet rounded to compensate its error through ``H^-1``
(Cholesky form, lazy block updates of 128 columns, damping of 1 % of the
mean diagonal).

The ``quant`` encoder derives each tile's ``offset``/``scale`` from the
tile's minimum and maximum (:func:`codec.mapping.params_from_range`). So
the parameters the pixels are chosen for are the ones re-encoding gives
back, GPTQ here works with the parameters of the input tile and keeps them:
each tile's minimum and maximum element keep their original values (their
pixel is the encoder's; their error is compensated like any other), and
every other element takes a level whose decoded value lies within
``[offset, maximum]``. The returned target holds those decoded values, so
``encode_tensor(target)`` reproduces the chosen pixels exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..dtypes import DType, from_float64, to_float64
from ..mapping import params_from_range
from ..tensorcodec import EncodeOptions, decode_encoded, encode_tensor, lossless_reason
from ..tiling import Tiling, plan_tiling

__all__ = ["BLOCK", "HeldInFactor", "jpeg_target", "gptq_target", "output_error", "difference_error",
           "quadratic_error", "tile_index", "tile_range"]

#: Columns per lazy-update block (GPTQ's default).
BLOCK = 128


def output_error(reference: np.ndarray, decoded: np.ndarray, h: np.ndarray, *, overwrite: bool = False) -> float:
    """``tr(dW H dW^T)`` for float64 matrices ``[rows, cols]`` and ``H`` ``[cols, cols]``; ``overwrite``: the
    difference is made in ``decoded``'s own array (a float64 copy the caller made for this: no other)."""
    return difference_error(np.subtract(decoded, reference, out=decoded if overwrite else None), h)


def difference_error(diff: np.ndarray, h: np.ndarray | HeldInFactor) -> float:
    """``tr(dW H dW^T)`` for the float64 difference ``dW`` (``[rows, ...]``, viewed as ``[rows, cols]``); ``h`` held
    in a :class:`HeldInFactor`: :meth:`HeldInFactor.quadratic_error` (in bands, from its triangle)."""
    if isinstance(h, HeldInFactor):
        return h.quadratic_error(diff)
    diff = diff.reshape(diff.shape[0], -1)
    return float(np.einsum("ij,jk,ik->", diff, h, diff))


#: Rows of ``H``'s triangle per band in :func:`quadratic_error`.
ERROR_BAND = 128


def quadratic_error(diff: np.ndarray, lower: np.ndarray, diagonal: np.ndarray, band: int = ERROR_BAND) -> float:
    """``tr(dW H dW^T)`` for the float64 difference ``dW`` (``[rows, ...]``, viewed as ``[rows, cols]``) and the
    symmetric ``H`` given by the strict lower triangle of ``lower`` (``[cols, cols]``; its diagonal and upper
    triangle are not read) and its diagonal ``diagonal``: ``sum_i H_ii |dW_i|^2 + 2 sum_{i>j} H_ij dW_i . dW_j``
    (``dW_i`` its column ``i``), ``band`` rows of the triangle at a time: the band's rows left of its diagonal block
    (a view) and that block's strict lower triangle (a ``band^2`` copy), each times ``dW``'s columns: products of
    ``rows x band``, no ``cols^2`` temporary, and BLAS instead of ``einsum``'s loops (about 20x faster on
    all-MiniLM-L6-v2's FFN output). Not bit for bit the ``einsum`` form's sum (about 1e-15 relative)."""
    diff = diff.reshape(diff.shape[0], -1)
    cols = diff.shape[1]
    if lower.shape != (cols, cols) or diagonal.shape != (cols,):
        raise ValueError(f"H is {lower.shape}, expected ({cols}, {cols}) for a difference of shape {diff.shape}")
    total = float(np.einsum("ij,ij->j", diff, diff) @ diagonal)
    off = 0.0
    for a in range(0, cols, band):
        b = min(a + band, cols)
        part = diff[:, a:b]
        if a:
            off += float(np.einsum("ij,ij->", diff[:, :a] @ lower[a:b, :a].T, part))
        off += float(np.einsum("ij,ij->", part @ np.tril(lower[a:b, a:b], -1).T, part))
    return total + 2.0 * off


class HeldInFactor:
    """A layer's input moment ``H`` (``[n, n]``, symmetric) and the inverse Cholesky factor made from it, in one
    ``n x n`` float64 array and two ``n`` vectors.

    Until :meth:`factor` is first asked, the array is ``H`` itself. Then ``U`` (``H_p^-1 = U^T U`` for ``H_p =
    H[perm][:, perm]`` damped, :func:`_factor`'s factor bit for bit) is made in that same array and ``H_p``'s strict
    lower triangle put back into ``U``'s zero lower triangle; ``H``'s diagonal is kept as a vector
    (:attr:`diagonal`, in ``H``'s own order). So ``H`` and ``U`` take one ``n^2`` array, not two (all-MiniLM-L6-v2's
    FFN output layers: 18.9 MB less while the layer is coded); while ``U`` is made, ``H``'s strict triangle is held
    packed (half of ``n^2``) beside it instead of a whole damped copy. Readers of :meth:`factor`'s array read its
    upper triangle only (:func:`gptq_target`, :func:`jpeg_target`). A factor for another damping or column order
    is made from the held ``H`` in an array of its own and kept beside it. :meth:`quadratic_error` scores
    ``tr(dW H dW^T)`` from the triangle (:func:`quadratic_error`); :meth:`dense` gives ``H`` back whole.
    """

    def __init__(self, h: np.ndarray, *, own: bool = False):
        """``own``: ``h`` (float64, C-contiguous, writable) becomes the held array and is overwritten by the factor
        (the caller keeps no other use of it); otherwise a float64 copy is held."""
        h = np.asarray(h)
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"H must be a square matrix, not of shape {h.shape}")
        takes = own and h.dtype == np.float64 and h.flags.c_contiguous and h.flags.writeable
        self._array = h if takes else np.array(h, np.float64, order="C", copy=True)
        #: ``H``'s diagonal, in its own column order (float64)
        self.diagonal = np.diag(self._array).copy()
        self._key: tuple | None = None  # (damping, order) of the factor held in the array; None: the array is H
        self._perm: np.ndarray | None = None
        self._others: dict = {}  # factors of other keys, plain U

    @property
    def shape(self) -> tuple[int, int]:
        return self._array.shape

    @property
    def factored(self) -> bool:
        """Whether the array holds ``U`` (with ``H``'s triangle below it) rather than ``H`` whole."""
        return self._key is not None

    def factor(self, damp: float, perm: np.ndarray | None = None) -> np.ndarray:
        """The upper Cholesky factor ``U`` of ``H^-1``, ``H`` damped with ``damp`` (:func:`_damped`), columns in order
        ``perm`` (default: the natural order): read its upper triangle only (the first factor asked holds ``H``'s
        triangle below it). Made once per (damping, order)."""
        n = self.shape[0]
        perm = np.arange(n) if perm is None else np.asarray(perm)
        key = (float(damp), perm.tobytes())
        if key == self._key:
            return self._array
        if key in self._others:
            return self._others[key]
        if self._key is not None:
            upper = _inverse_cholesky_upper(lambda: _damped(self._permuted(perm), damp, np.arange(n), copy=False))
            self._others[key] = upper
            return upper
        if not _identity(perm):  # H's columns in coding order (the one copy a factor in that order took before)
            self._array = np.asarray(self._array[np.ix_(perm, perm)], np.float64)
        a = self._array
        packed = _pack_lower(a)
        raw = self.diagonal[perm]
        tries = [0]

        def damped() -> np.ndarray:  # H_p damped, in the held array itself (made whole again after a failed try)
            if tries[0]:
                _unpack_lower(a, packed, symmetric=True)
                a[np.diag_indices(n)] = raw
            tries[0] += 1
            return _damped(a, damp, perm, copy=False)

        try:
            _inverse_cholesky_upper(damped)
        except np.linalg.LinAlgError:  # H back whole, in its own order
            _unpack_lower(a, packed, symmetric=True)
            a[np.diag_indices(n)] = raw
            if not _identity(perm):
                inverse = np.argsort(perm)
                self._array = np.asarray(a[np.ix_(inverse, inverse)], np.float64)
            raise
        _unpack_lower(a, packed)
        self._key, self._perm = key, perm
        return a

    def dense(self) -> np.ndarray:
        """``H`` whole (float64 ``[n, n]``): the held array itself while no factor is made (changes to it change
        what is held), else a new array made from the triangle."""
        if self._key is None:
            return self._array
        return self._permuted(np.arange(self.shape[0]))

    def _permuted(self, perm: np.ndarray) -> np.ndarray:
        """``H[perm][:, perm]`` in a new array, from the held triangle (factored only)."""
        held = self._array
        n = held.shape[0]
        out = np.empty_like(held)
        for i in range(1, n):
            out[i, :i] = held[i, :i]
            out[:i, i] = held[i, :i]
        out[np.diag_indices(n)] = self.diagonal[self._perm]
        order = np.argsort(self._perm)[perm]  # H[perm] = H_p[order]
        if not _identity(order):
            out = np.asarray(out[np.ix_(order, order)], np.float64)
        return out

    def quadratic_error(self, diff: np.ndarray) -> float:
        """``tr(dW H dW^T)`` for the float64 difference ``dW`` (``[rows, ...]``, viewed as ``[rows, cols]``), in bands
        from the held triangle (:func:`quadratic_error`; a held factor in another order: ``dW``'s columns taken in
        that order, a copy of ``dW``)."""
        diff = diff.reshape(diff.shape[0], -1)
        if self._key is None or _identity(self._perm):
            return quadratic_error(diff, self._array, self.diagonal)
        return quadratic_error(diff[:, self._perm], self._array, self.diagonal[self._perm])


def _pack_lower(a: np.ndarray) -> np.ndarray:
    """The strict lower triangle of the square ``a``, row by row, in a vector of ``n (n - 1) / 2``."""
    n = a.shape[0]
    packed = np.empty(n * (n - 1) // 2, a.dtype)
    for i in range(1, n):
        start = i * (i - 1) // 2
        packed[start:start + i] = a[i, :i]
    return packed


def _unpack_lower(a: np.ndarray, packed: np.ndarray, symmetric: bool = False) -> None:
    """Write :func:`_pack_lower`'s vector back into ``a``'s strict lower triangle (``symmetric``: and, transposed,
    into its strict upper one)."""
    for i in range(1, a.shape[0]):
        start = i * (i - 1) // 2
        a[i, :i] = packed[start:start + i]
        if symmetric:
            a[:i, i] = packed[start:start + i]


def _diagonal(h: np.ndarray | HeldInFactor) -> np.ndarray:
    """``H``'s diagonal as a float64 array of its own."""
    return h.diagonal.copy() if isinstance(h, HeldInFactor) else np.diag(h).astype(np.float64)


def _dec(values: np.ndarray, dtype: DType) -> np.ndarray:
    """What the decoder gives for float64 ``values`` (one rounding to ``dtype``), as float64."""
    return to_float64(from_float64(values, dtype), dtype)


def gptq_target(weight: np.ndarray, dtype: DType, opts: EncodeOptions, h: np.ndarray | HeldInFactor, *,
                damp: float = 0.01, act_order: bool = False, block: int = BLOCK, factors: dict | None = None,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(target, decoded)``: the array to encode with ``opts`` (storage form) and what it decodes to (float64).

    ``weight`` is the tensor in storage form, viewed as the matrix
    ``[rows, cols]``; ``h`` is ``E[x x^T]`` ``[cols, cols]`` of the inputs
    its columns multiply. For options that are not ``quant``, tensors the
    encoder stores losslessly, and tiles that are not finite, the weight is
    returned unchanged (with its plain ``decoded`` left to the caller: None).
    ``act_order`` rounds columns in order of decreasing ``H`` diagonal.
    ``factors`` (a dict kept by the caller for one ``h``): the inverse
    Cholesky factor is taken from it, or made and kept there (:func:`_factor`).
    ``mask`` (0/1, the ``[rows, cols]`` view): the layer multiplies the
    decoded tensor by it (a ``torch.nn.utils.prune`` layer's ``weight_orig``,
    :mod:`codec.rd.pruned`), so an element where it is 0 has no error to
    compensate: the later columns compensate the others' only.
    """
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    if h.shape != (cols, cols):
        raise ValueError(f"H is {h.shape}, expected ({cols}, {cols}) for a weight of shape {weight.shape}")
    mask = _mask(mask, rows, cols)
    if opts.codec != "quant" or lossless_reason(weight, dtype, "quant") is not None:
        return weight, None
    w = to_float64(weight, dtype).reshape(rows, cols)
    if not np.isfinite(w).all():
        return weight, None
    t = plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
    maxval = (1 << opts.bits) - 1
    tile_of = tile_index(t)
    lo, hi = tile_range(w, tile_of, t.n_tiles)
    offset, scale = params_from_range(lo, hi, opts.bits, t.params)
    o, s = offset.astype(np.float64), scale.astype(np.float64)
    # Pinned elements: each tile's minimum and maximum (all of a constant tile).
    pinned = (w == lo[tile_of]) | (w == hi[tile_of]) | (s == 0)[tile_of]
    # Reachable levels: from the pixel of the tile's minimum to that of its maximum (the scale is rounded up, so
    # at 8 bits the maximum may sit a level or two below the top); an element at either end takes the tile's
    # extreme value itself as its target, anything between its level's decoded value.
    safe = np.where(s > 0, s, 1.0)
    pbot = np.where(s > 0, np.clip(np.rint((lo - o) / safe), 0, maxval), 0.0)
    ptop = np.where(s > 0, np.clip(np.rint((hi - o) / safe), 0, maxval), 0.0)

    diag = _diagonal(h)
    diag[diag <= 0] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(cols)
    upper = _factor(h, damp, perm, factors)
    # Memory: the tiles' offset, scale and levels are gathered a column at a time (tile_of[:, c]), not held for
    # every element (five rows x cols float64 arrays and their permuted copies: all-MiniLM-L6-v2's FFN matrices,
    # 4.5 MB each); the same values, the same operations.
    work = w[:, perm]
    pix = np.zeros((rows, cols))
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = work[:, i1:i2]
        err1 = np.zeros((rows, i2 - i1))
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            c = perm[j]
            tc = tile_of[:, c]
            oj, sj, safej = o[tc], s[tc], safe[tc]
            col = w1[:, i]
            if mask is not None:  # a pruned entry keeps its own value (cheap to code), not the others' compensation
                col = np.where(mask[:, c] > 0, col, w[:, c])
            p = np.clip(np.rint((col - oj) / safej), pbot[tc], ptop[tc])
            pin = pinned[:, c]
            if pin.any():  # a pinned element keeps the encoder's own pixel of its original value
                fixed = np.where(sj > 0, np.clip(np.rint((w[:, c] - oj) / safej), 0, maxval), 0.0)
                p = np.where(pin, fixed, p)
            q = _dec(oj + sj * p, dtype)
            pix[:, j] = p
            err = (col - q) / u1[i, i]
            if mask is not None:  # (a pruned entry's error never reaches the output)
                err = err * mask[:, c]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        work[:, i2:] -= err1 @ upper[i1:i2, i2:]
    del work
    if not _identity(perm):
        pix = pix[:, np.argsort(perm)]
    # decoded values and target a band of rows at a time (elementwise: the same values as whole-matrix arithmetic)
    decoded = np.empty((rows, cols))
    target = np.empty((rows, cols), dtype.storage)
    step = max(1, _BAND // cols)
    for r0 in range(0, rows, step):
        r = slice(r0, r0 + step)
        tb, pb = tile_of[r], pix[r]
        dec = decoded[r] = _dec(o[tb] + s[tb] * pb, dtype)
        ends = np.where(pb == ptop[tb], hi[tb], np.where(pb == pbot[tb], lo[tb], dec))
        target[r] = from_float64(np.where(pinned[r], w[r], ends), dtype)
    return target.reshape(weight.shape), decoded.reshape(weight.shape)


def jpeg_target(weight: np.ndarray, dtype: DType, opts: EncodeOptions, h: np.ndarray | HeldInFactor, *,
                damp: float = 0.01, executor=None, factors: dict | None = None, decoded: bool = True,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(target, decoded)`` for a ``jpeg`` weight: its columns coded group by group, the later ones compensating.

    JPEG codes 8x8 blocks of pixels at once, so GPTQ's column-by-column
    rounding does not apply; its block form does (the OBS update for a group
    of columns ``F`` coded with error ``E``): the columns ``R`` not yet
    coded move by ``-E U_FF^-1 U_FR``, ``U`` the upper Cholesky factor of
    ``H^-1`` with the groups in coding order, which minimises
    ``tr(dW H dW^T)`` over them given ``E``. The groups are the tiling's
    columns of tiles (``grid`` mode) or the 8x8 blocks of each row's image
    (``rows`` mode). After each group the whole matrix is coded and the
    group's error read off; compensated values are kept within their tile's
    range and each tile's minimum and maximum stay where they are, so tiles
    keep their offset/scale and groups coded earlier keep their pixels.
    ``decoded`` is what the target decodes to (float64). Options other than
    ``jpeg``, tensors stored losslessly, a single group or non-finite
    weights: the weight is returned unchanged with ``decoded`` None.
    ``factors``: as :func:`gptq_target`'s. ``decoded=False``: ``decoded`` is None also for a compensated target
    (whoever codes the target gets those values from its own coding: repair does, and holds no float64 copy
    of them, nor codes the target once more here). ``mask``: as :func:`gptq_target`'s (a group's error where it is
    0 is not compensated).
    """
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    if h.shape != (cols, cols):
        raise ValueError(f"H is {h.shape}, expected ({cols}, {cols}) for a weight of shape {weight.shape}")
    mask = _mask(mask, rows, cols)
    if opts.codec != "jpeg" or lossless_reason(weight, dtype, "jpeg") is not None:
        return weight, None
    t = plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
    w = to_float64(weight, dtype).reshape(rows, cols)
    if t.mode == "rows":
        r, c = np.divmod(np.arange(cols), t.tile_w)
        group = (r // 8) * -(-t.tile_w // 8) + c // 8
    else:
        group = np.arange(cols) // t.tile_w
    if group.max() == 0 or not np.isfinite(w).all():
        return weight, None
    perm = np.argsort(group, kind="stable")
    ends = np.flatnonzero(np.diff(group[perm])) + 1
    upper = _factor(h, damp, perm, factors)
    if t.mode != "rows":  # grid: the natural order, a group a column of tiles
        work = _compensate_grid(w, t, ends, upper, dtype, opts, executor, mask)
        return _compensated(work, None, weight, dtype, opts, executor, decoded)
    tile_of = tile_index(t)
    lo, hi = tile_range(w, tile_of, t.n_tiles)
    # Memory (all-MiniLM-L6-v2's FFN output: 4.5 MB per rows x cols float64): the tiles' bounds per element in
    # coding order, in float32 where that holds them exactly (they are values of the weight: float32, float16 and
    # bfloat16 weights); a pinned element's original value is its tile's bound, so no copy of the weight is kept;
    # clipping and pinning in place.
    narrow = np.float32 if np.array_equal(lo.astype(np.float32), lo) and np.array_equal(hi.astype(np.float32), hi) \
        else np.float64
    lo_p, hi_p = (b.astype(narrow)[tile_of][:, perm] for b in (lo, hi))
    del tile_of
    work = w[:, perm]
    del w
    pin_lo, pin_hi = work == lo_p, work == hi_p
    inverse = np.argsort(perm)
    start = 0
    for end in ends:  # every group but the last: code, then compensate the columns after it
        coded = _decoded(from_float64(work[:, inverse], dtype), dtype, opts, executor)
        err = to_float64(from_float64(work[:, start:end], dtype), dtype) - to_float64(coded[:, perm[start:end]], dtype)
        if mask is not None:
            err *= mask[:, perm[start:end]]
        del coded  # (storage form: only the group's columns widened)
        # E U_FF^-1 (U_FF upper triangular; below it a held factor holds H's triangle: triu, a group's square)
        scaled = np.linalg.solve(np.triu(upper[start:end, start:end]).T, err.T).T
        work[:, end:] -= scaled @ upper[start:end, end:]
        rest = work[:, end:]
        np.clip(rest, lo_p[:, end:], hi_p[:, end:], out=rest)
        np.copyto(rest, lo_p[:, end:], where=pin_lo[:, end:])
        np.copyto(rest, hi_p[:, end:], where=pin_hi[:, end:])
        start = end
    del lo_p, hi_p, pin_lo, pin_hi
    return _compensated(work, inverse, weight, dtype, opts, executor, decoded)


def _compensated(work: np.ndarray, inverse: np.ndarray | None, weight: np.ndarray, dtype: DType, opts: EncodeOptions,
                 executor, decoded: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`jpeg_target`'s result from its compensated ``work`` (columns in coding order; ``inverse``: back to the
    natural order, None: already in it)."""
    rows = weight.shape[0]
    target = from_float64(work if inverse is None else work[:, inverse], dtype).reshape(weight.shape)
    del work
    if not decoded:
        return target, None
    return target, _coded(target.reshape(rows, -1), dtype, opts, executor).reshape(weight.shape)


def _compensate_grid(w: np.ndarray, t: Tiling, ends: np.ndarray, upper: np.ndarray, dtype: DType,
                     opts: EncodeOptions, executor, mask: np.ndarray | None = None) -> np.ndarray:
    """:func:`jpeg_target`'s compensation in ``grid`` mode, in ``w``'s own array (returned): a group is a column
    of tiles, coded in the natural order.

    Memory: the tiles' bounds are gathered a column of tiles (a band) at a time, as a bound per row of the band,
    and each band's pinned elements (each tile's minimum and maximum) kept as their positions: no tile index, no
    bounds per element and no masks of the matrix's size (before the eighteenth pass: an int64 tile index, two
    float32 bounds and two bool masks of ``rows x cols``; all-MiniLM-L6-v2's FFN output: 4.7 + 4.7 + 1.2 MB). The
    same minima and maxima (each tile's elements taken in the same order), the same clipping and pinning: the
    same bits."""
    rows, cols = w.shape
    band_of_row = np.arange(rows) // t.tile_h
    bands = []  # per column of tiles: (first column, end, lower bound per row, upper bound per row, pins)
    for c0 in range(0, cols, t.tile_w):
        c1 = min(c0 + t.tile_w, cols)
        part = w[:, c0:c1]
        lo, hi = tile_range(part, np.broadcast_to(band_of_row[:, None], part.shape), t.grid[0])  # its tiles'
        lo_r, hi_r = lo[band_of_row], hi[band_of_row]
        bands.append((c0, c1, lo_r, hi_r, np.nonzero(part == lo_r[:, None]), np.nonzero(part == hi_r[:, None])))
    start = 0
    for end in ends:  # every group but the last: code, then compensate the columns after it
        coded = _decoded(from_float64(w, dtype), dtype, opts, executor)
        err = to_float64(from_float64(w[:, start:end], dtype), dtype) - to_float64(coded[:, start:end], dtype)
        if mask is not None:
            err *= mask[:, start:end]
        del coded  # (storage form: only the group's columns widened)
        # E U_FF^-1 (U_FF upper triangular; below it a held factor holds H's triangle: triu, a group's square)
        scaled = np.linalg.solve(np.triu(upper[start:end, start:end]).T, err.T).T
        w[:, end:] -= scaled @ upper[start:end, end:]
        for c0, c1, lo_r, hi_r, (r_lo, c_lo), (r_hi, c_hi) in bands:
            if c0 < end:
                continue
            part = w[:, c0:c1]
            np.clip(part, lo_r[:, None], hi_r[:, None], out=part)
            part[r_lo, c_lo] = lo_r[r_lo]
            part[r_hi, c_hi] = hi_r[r_hi]
        start = end
    return w


def _mask(mask: np.ndarray | None, rows: int, cols: int) -> np.ndarray | None:
    """A 0/1 ``mask`` as float64 ``[rows, cols]`` (None: none, or all ones)."""
    if mask is None:
        return None
    mask = np.asarray(mask, np.float64).reshape(rows, cols)
    return None if bool(np.all(mask == 1)) else mask


def tile_index(t: Tiling) -> np.ndarray:
    """The tile of each element of the matrix ``t`` tiles, ``[rows, cols]``: row band and column band in ``grid``
    mode, the row in ``rows`` mode (one tile per row)."""
    if t.mode == "rows":
        return np.broadcast_to(np.arange(t.rows)[:, None], (t.rows, t.cols))
    return (np.arange(t.rows) // t.tile_h)[:, None] * t.grid[1] + (np.arange(t.cols) // t.tile_w)[None, :]


def tile_range(w: np.ndarray, tile_of: np.ndarray, n_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """``(minimum, maximum)`` of the matrix ``w`` in each tile (what the encoder's offset/scale come from)."""
    lo, hi = np.full(n_tiles, np.inf), np.full(n_tiles, -np.inf)
    np.minimum.at(lo, tile_of.reshape(-1), w.reshape(-1))
    np.maximum.at(hi, tile_of.reshape(-1), w.reshape(-1))
    return lo, hi


def _coded(matrix: np.ndarray, dtype: DType, opts: EncodeOptions, executor=None) -> np.ndarray:
    """What ``matrix`` (storage form) decodes to when encoded with ``opts``, as float64."""
    return to_float64(_decoded(matrix, dtype, opts, executor), dtype)


def _decoded(matrix: np.ndarray, dtype: DType, opts: EncodeOptions, executor=None) -> np.ndarray:
    """What ``matrix`` (storage form) decodes to when encoded with ``opts``, in storage form."""
    encoded = encode_tensor(matrix, dtype, opts, executor=executor)
    return decode_encoded(encoded, dtype, matrix.shape, executor=executor)


#: Elements per band of rows in :func:`gptq_target`'s final arithmetic.
_BAND = 1 << 16


def _factor(h: np.ndarray | HeldInFactor, damp: float, perm: np.ndarray, factors: dict | None) -> np.ndarray:
    """:func:`_inverse_cholesky_upper` of ``h`` damped with ``damp``, columns in order ``perm``; taken from and kept
    in ``factors`` (keyed by ``damp`` and ``perm``) when given. A layer's codings share it (:mod:`codec.rd.repair`:
    ``_code_within`` tries a JPEG weight at several qualities): made once, the ``cols^2`` intermediates come and go
    once per layer, not once per coding (all-MiniLM-L6-v2's FFN output: 18 MB each, with numpy's own buffers up to
    four at once), and the same factor, bit for bit, serves every coding. ``h`` a :class:`HeldInFactor`: its own
    :meth:`HeldInFactor.factor` (``factors`` unused; read the factor's upper triangle only)."""
    if isinstance(h, HeldInFactor):
        return h.factor(damp, perm)
    key = (float(damp), perm.tobytes())
    if factors is not None and key in factors:
        return factors[key]
    upper = _inverse_cholesky_upper(lambda: _damped(h, damp, perm))
    if factors is not None:
        factors[key] = upper
    return upper


def _damped(h: np.ndarray, damp: float, perm: np.ndarray, copy: bool = True) -> np.ndarray:
    """``H[perm][:, perm]`` (a float64 array of its own, the one cols^2 copy) with dead inputs given a unit diagonal
    and ``damp`` of the mean diagonal added; ``copy=False``: ``h`` itself, already in that order, damped in place."""
    if not copy:
        hm = h
    else:
        hm = np.array(h, np.float64, copy=True) if _identity(perm) else np.asarray(h[np.ix_(perm, perm)], np.float64)
    dead = np.diag(hm) <= 0
    hm[dead, dead] = 1.0
    hm[np.diag_indices(len(hm))] += damp * float(np.mean(np.diag(hm)))
    return hm


def _identity(perm: np.ndarray) -> bool:
    return bool(np.array_equal(perm, np.arange(len(perm))))


def _inverse_cholesky_upper(damped: Callable[[], np.ndarray]) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) for the damped ``H`` that ``damped()`` makes,
    adding damping until it is positive definite.

    Made in the array ``damped()`` returns, with no other ``cols^2`` array (all-MiniLM-L6-v2's FFN output: 19 MB
    each; up to four at once besides ``H`` before the tenth pass, numpy's ``inv`` holding its own LAPACK copies):
    with ``J`` the reversal of the columns' order, ``J H J = L L^T`` (``L`` lower, :func:`_cholesky_lower`) gives
    ``H = R R^T`` with ``R = J L J`` upper, so ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = J L^-1 J`` (the Cholesky
    factor is unique: ``U`` has a positive diagonal). Reversing both axes of a square array is reversing its
    elements in memory (:func:`_reverse`). The same factor as ``cholesky(inv(cholesky(H))^T inv(...))^T`` within
    rounding (about 1e-15 relative), not bit for bit; about four times less CPU."""
    extra, scale = 0.0, None
    for _ in range(8):
        a = damped()
        if scale is None:
            scale = float(np.mean(np.diag(a)))
        if extra:
            a[np.diag_indices(a.shape[0])] += extra
        try:
            _reverse(a)
            _cholesky_lower(a)
            _invert_lower(a)
            return _reverse(a)
        except np.linalg.LinAlgError:
            del a
            extra = max(extra * 10, 1e-6 * scale or 1e-6)
    raise np.linalg.LinAlgError("H stays singular after damping")


#: Columns per block of the in-place factorizations below (each block's temporaries: a few rows x 128 float64).
_FACTOR_BLOCK = 128


def _reverse(a: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """Reverse a C-contiguous array's elements in place (a square matrix: both axes), ``chunk`` elements at a
    time; returns ``a``."""
    flat = a.reshape(-1)
    n = flat.size
    for i in range(0, n // 2, chunk):
        c = min(chunk, n // 2 - i)
        front = flat[i:i + c].copy()
        flat[i:i + c] = flat[n - i - c:n - i][::-1]
        flat[n - i - c:n - i] = front[::-1]
    return a


def _cholesky_lower(a: np.ndarray, block: int = _FACTOR_BLOCK) -> None:
    """Overwrite the symmetric positive definite ``a`` with its lower Cholesky factor (upper triangle zeroed):
    left-looking, a block of columns at a time; :class:`numpy.linalg.LinAlgError` when a block is not positive
    definite (``a`` then half overwritten)."""
    n = len(a)
    for j in range(0, n, block):
        e = min(j + block, n)
        if j:
            a[j:, j:e] -= a[j:, :j] @ a[j:e, :j].T
        diagonal = np.linalg.cholesky(a[j:e, j:e])
        a[j:e, j:e] = diagonal
        a[j:e, e:] = 0.0
        if e < n:
            a[e:, j:e] = np.linalg.solve(diagonal, a[e:, j:e].T).T


def _invert_lower(a: np.ndarray, block: int = _FACTOR_BLOCK) -> None:
    """Overwrite the lower triangular ``a`` (upper triangle zero) with its inverse, a block of columns at a time
    from the last: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``."""
    n = len(a)
    for j in reversed(range(0, n, block)):
        e = min(j + block, n)
        inverse = np.tril(np.linalg.inv(a[j:e, j:e]))
        if e < n:
            a[e:, j:e] = -(a[e:, e:] @ a[e:, j:e]) @ inverse
        a[j:e, j:e] = inverse
