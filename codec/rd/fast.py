"""Fast rate search: predict each tensor's menu from a sample of its tiles, measure only what is chosen.

The exhaustive search (:func:`codec.rd.allocate.plan_options` with
``search="exhaustive"``) encodes and decodes every candidate of every
tensor in full: about 40 passes over the model. Rate and distortion of a
tile-coded tensor are sums over its tiles (each blob codes its own tiles;
only headers and the index entry are per tensor), so a fixed sample of
tiles predicts both:

1. **Predict.** Each large tensor gives a sample matrix: ``SAMPLE_WEIGHTS``
   weights in whole blocks of ``BLOCK_H`` rows (a multiple of every tile
   height on the menu, so tiles of the sample are tiles of the tensor) by
   ``BLOCK_W`` columns, the column chunks in turn (outlier channels get
   their share) and the row bands drawn by a generator seeded with the
   tensor's name (the same sample on every run), stacked into one matrix.
   Rows that are images keep their full width. Every candidate is coded and
   decoded on the sample with the real codecs; its bytes are scaled by the
   tensor/sample size ratio (plus the tensor's own index entry), its
   distortion is the sample's. Tensors smaller than twice the sample are
   measured in full. A budget of
   :data:`~codec.rd.allocate.HIGH_BITS_FROM` or more adds quant at
   :data:`~codec.rd.allocate.HIGH_QUANT_BITS` to every menu, as the
   exhaustive search does, predicted in the first pass (they used to send
   such budgets to the exhaustive search: MiniLM ``-b 6`` coded every JPEG
   quality of every tensor in full, 22 CPU s against 1.9 at ``-b 5``).
2. **Allocate.** Equal slopes on the lower hulls of the points
   (:func:`_equal_slopes`), then the slack that leaves is spent by a
   knapsack over every point (:func:`codec.rd.allocate.best_fill`), not greedily: the
   greedy fill took a cheap upgrade that left no room for a better one
   (bench CNN -b 4: 4 % of the budget unspent, +57 % distortion). A
   sampled tensor's first pass predicts few points (:func:`_first_pass`):
   lossless, quant at most of :data:`COARSE_BITS`, JPEG at its lowest
   quality; an allocation of those places it, and JPEG is predicted at the
   two qualities of :data:`COARSE_QUALITIES` around that place
   (:func:`_anchors`). Then the gaps of each family's ladder
   (:data:`LADDERS`) that reach into each tensor's window (from its
   equal-slope point up to the next hull point or the slack), and the open
   ends beyond a family's highest and lowest levels, are halved round by
   round (:func:`_in_between`), coarse levels first, so the levels between
   join the menu where they can matter. JPEG's are interpolated from their
   two neighbours (:func:`_interpolated`: rate linear in the log of the
   quantization step, distortion its square over a floor), not coded,
   where both neighbours are of quality :data:`INTERPOLATE_FROM` or more
   and no coarse quality lies between them; a chosen one is measured whole
   as any prediction (step 3). Where the budget cannot keep every tensor
   undamaged, the coarse levels between a family's damaging and safe ones
   are predicted first (:func:`_cheaper_safe`), as the exhaustive search
   would know them.
3. **Verify.** Every chosen point that is still a prediction is coded and
   decoded in full; the measured/predicted ratios of its bytes and
   distortion correct the other predictions of its family (same codec,
   table and tiling: a sample's bias is much the same across qualities),
   and the allocation runs again, until every chosen point is exact. A
   prediction must beat the measured points of its tensor by
   :data:`MARGIN`, so near ties do not flip back and forth. The file meets
   the budget exactly, as the exhaustive search's does, and the damage
   guard and its notes are the exhaustive search's
   (:data:`~codec.rd.allocate.DAMAGE`).

Distortion is the allocation's own measure: NMSE, the image prior for image
rows, or a :class:`~codec.rd.allocate.Weighting` with diagonal ``R`` and
``H`` (a state_dict's BatchNorm or LayerNorm, calibration's diagonal
moments), whose per-element weights are cut to the sample's blocks. A full
``H`` (it couples every column) and calibrated sensitivities (``score``,
which needs decoded tensors) stay exhaustive. There is no size rule: small
models take the same path (their tensors under twice the sample are
measured whole, which is the exhaustive search for them).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import numpy as np

from ..blobcodecs.jpeg import quality_scale, scaled_table
from ..dtypes import DType, to_float64
from ..errors import EncodeError
from ..parallel import AHEAD_BYTES, make_executor, make_process_executor, resolve_jobs
from ..tensorcodec import Encoded, EncodeOptions, decode_encoded, encode_tensor
from ..tiling import plan_tiling
from . import allocate
from .allocate import (
    DAMAGE,
    DATA_FREE,
    HIGH_BITS_FROM,
    HIGH_QUANT_BITS,
    JPEG_QUALITIES,
    QUANT_BITS,
    TILES,
    Distortion,
    RDPoint,
    TensorSource,
    Weighting,
    _damage_notes,
    _prior_energy,
    best_fill,
    distortion,
    entry_bytes,
    high_bit_candidates,
    lower_hull,
    with_row_images,
)

__all__ = ["BLOCK_H", "BLOCK_W", "COARSE_QUALITIES", "SAMPLE_WEIGHTS", "plan_fast", "predict", "sample_matrix", "weighable"]

#: Weights in each tensor's sample (at least MIN_IMAGE_ELEMENTS, so the sample is coded as the tensor is).
#: 32K cost half as much with the same choices on the bench models, but chose 8 % worse than the exhaustive
#: search on a 128 x 3136 matrix with dead input columns (2 bands of rows; tests/test_fast_search.py).
SAMPLE_WEIGHTS = 1 << 16
#: Sample block height: a multiple of every tile height on the menu (64 and 8).
BLOCK_H = 64
#: Sample block width: a multiple of every tile width on the menu.
BLOCK_W = 128


@dataclass
class Predicted(RDPoint):
    """A candidate's point: predicted from the sample (``pred_*``), corrected, or ``exact`` once measured whole."""

    exact: bool = False
    pred_nbytes: int = 0
    pred_nmse: float = 0.0
    pred_rel: float = 0.0
    pred_out: float | None = None


def _with(point: Predicted, **changes) -> Predicted:
    """``dataclasses.replace`` without ``__init__`` (the search copies points some 10^4 times a model)."""
    copy = object.__new__(Predicted)
    copy.__dict__ = {**point.__dict__, **changes}
    return copy


def _family(options: EncodeOptions) -> tuple:
    """Candidates that share a sample's bias: the same codec, table and tiling (they differ in quality or bits)."""
    return options.codec, options.table, options.tile, options.row_shape


def _correct(pts: list[Predicted]) -> None:
    """Rescale each predicted point by the measured/predicted ratios of the nearest exact point of its family.

    A sample's bias (it missed a few outlier rows, say) is much the same for
    every quality of one family, so one full measurement corrects them all.
    (Correcting other codecs by the same ratios, tried against the flips of
    near ties, chose worse where their biases differ: quant's distortion was
    over-predicted by 10-20 % where JPEG's was by 4 %; :data:`MARGIN`
    handles the ties.)
    """
    exact = [p for p in pts if p.exact and p.pred_nbytes]
    for i, p in enumerate(pts):
        if p.exact:
            continue
        near = [e for e in exact if _family(e.options) == _family(p.options)]
        if not near:
            continue
        e = min(near, key=lambda e: abs(math.log(e.pred_nbytes / p.pred_nbytes)))
        rd = e.nmse / e.pred_nmse if e.pred_nmse > 0 else 1.0
        pts[i] = _with(p, nbytes=math.ceil(p.pred_nbytes * e.nbytes / e.pred_nbytes), nmse=p.pred_nmse * rd,
                       rel_error=p.pred_rel * math.sqrt(rd),
                       out_error=None if p.pred_out is None else p.pred_out * math.sqrt(rd))


def _blocks(name: str, shape: tuple[int, int], full_rows: bool) -> list[tuple[int, int, int]] | None:
    """The sample's blocks of a ``rows x cols`` matrix as ``(first row, first column, width)``, in sample order,
    or None when the tensor is small enough to measure whole (:func:`sample_matrix`)."""
    rows, cols = shape
    bw = cols if full_rows or cols < 2 * BLOCK_W else BLOCK_W
    n_r, n_c = rows // BLOCK_H, cols // bw
    want = -(-SAMPLE_WEIGHTS // (BLOCK_H * bw))
    if 2 * want > n_r * n_c:
        return None
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    # Column chunks in turn (channels with outliers are columns: each chunk gets its share), random bands in each.
    first, bands = int(rng.integers(n_c)), [iter(rng.permutation(n_r)) for _ in range(n_c)]
    out = []
    for i in range(want):
        c = (first + i) % n_c
        out.append((int(next(bands[c])) * BLOCK_H, c * bw, bw))
    return out


def sample_matrix(name: str, matrix: np.ndarray, full_rows: bool) -> np.ndarray | None:
    """A fixed sample of whole tiles of ``matrix`` (2-D), stacked; None when the tensor is small enough to measure whole.

    Blocks of ``BLOCK_H`` rows by ``BLOCK_W`` columns (whole rows when
    ``full_rows``, for rows-mode candidates, or when the matrix is narrow)
    are drawn without replacement by a generator seeded with ``name``, the
    column chunks in turn.
    Partial blocks at the bottom and right edges are never drawn.
    """
    blocks = _blocks(name, matrix.shape, full_rows)
    if blocks is None:
        return None
    return np.concatenate([matrix[r : r + BLOCK_H, c : c + w] for r, c, w in blocks])


#: Per-element weights of a band of rows ``r0..r1-1`` of a matrix (broadcastable to the band), for the
#: output-space distortion of a :class:`~codec.rd.allocate.Weighting` with diagonal ``R`` and ``H``.
Weigh = Callable[[int, int], np.ndarray]


@dataclass
class _RowPrior:
    """:data:`Weigh` of a :attr:`Weighting.prior` weighting (rows alone): ``R[r0:r1, None]``, and for image rows
    the weights of the image prior's row energies (:func:`_distortion`), as :class:`Distortion` measures them."""

    rows: np.ndarray

    def __call__(self, r0: int, r1: int) -> np.ndarray:
        return self.rows[r0:r1, None]


def _whole_weigh(w: Weighting) -> Weigh:
    """:data:`Weigh` of a whole matrix: ``R[r0:r1, None] * H[None, :]`` (either may be absent)."""
    if w.prior and w.rows is not None and w.h is None:
        return _RowPrior(w.rows.astype(np.float64))
    rows = None if w.rows is None else w.rows.astype(np.float32)[:, None]
    cols = None if w.h is None else w.h.astype(np.float32)[None, :]
    one = np.ones((1, 1), np.float32)
    return lambda r0, r1: (one if rows is None else rows[r0:r1]) * (one if cols is None else cols)


def _sample_weights(w: Weighting, blocks: list[tuple[int, int, int]]) -> np.ndarray | _BlockH:
    """The weights of the sample made of ``blocks``, as an array (so it travels to a worker process with the
    sample): per element, each block's rows of ``R`` times its columns of a diagonal ``H``; with a full ``H``, a
    :class:`_BlockH`."""
    if w.h is not None and w.h.ndim == 2:
        rows = None if w.rows is None else np.concatenate([w.rows[r : r + BLOCK_H] for r, _, _ in blocks])
        return _BlockH(blocks, rows, {(c, bw): np.ascontiguousarray(w.h[c : c + bw, c : c + bw], np.float32)
                                      for _, c, bw in blocks})
    whole = _whole_weigh(w)
    if isinstance(whole, _RowPrior):  # (the sample's rows are whole rows where they are images)
        return _RowPrior(np.concatenate([np.broadcast_to(whole(r, r + BLOCK_H)[:, 0], (BLOCK_H,))
                                         for r, _, _ in blocks]))
    return np.concatenate([np.broadcast_to(whole(r, r + BLOCK_H)[:, c : c + bw] if w.h is not None
                                           else whole(r, r + BLOCK_H), (BLOCK_H, bw)) for r, c, bw in blocks])


@dataclass
class _BlockH:
    """A full ``H`` cut to a sample's blocks: each block (``BLOCK_H`` rows of one column chunk) weighted by its
    rows of ``R`` and by its chunk's own block of ``H``, ``tr(R_b M_b H_cc M_b^T)`` (whole rows: the whole
    ``H``). The couplings between chunks are not seen; the measured points correct the rest (:func:`_correct`).
    Has :meth:`Weighting.energy`'s signature, for :func:`_distortion`."""

    blocks: list[tuple[int, int, int]]
    rows: np.ndarray | None
    h: dict[tuple[int, int], np.ndarray]

    def energy(self, matrix: np.ndarray) -> float:
        """The weighted energy of a sample-shaped float64 matrix."""
        total = 0.0
        for i, (_, c, bw) in enumerate(self.blocks):
            m = matrix[i * BLOCK_H : (i + 1) * BLOCK_H].astype(np.float32)
            per_row = np.einsum("ij,ij->i", m @ self.h[(c, bw)], m).astype(np.float64)
            total += float(per_row @ self.rows[i * BLOCK_H : (i + 1) * BLOCK_H] if self.rows is not None
                           else per_row.sum())
        return total


def _sample_weigh(w: Weighting, blocks: list[tuple[int, int, int]]) -> Weigh:
    """:data:`Weigh` of the sample made of ``blocks`` (:func:`_sample_weights`)."""
    return _weigh_of(_sample_weights(w, blocks))


def _weigh_of(spec: Weighting | np.ndarray) -> Weigh:
    """:data:`Weigh` of a whole tensor's :class:`Weighting` or of a sample's dense weights."""
    if isinstance(spec, Weighting):
        return _whole_weigh(spec)
    if isinstance(spec, _RowPrior):
        return spec
    return lambda r0, r1: spec[r0:r1]


def _as_float(array: np.ndarray, dtype: DType) -> np.ndarray:
    return to_float64(array, dtype) if dtype.floating else array.astype(np.float64)


#: Elements per step of :func:`_sq_error` (float32 sums over a step, float64 across steps).
_STEP = 1 << 18


def _widened(part: np.ndarray, dtype: DType) -> np.ndarray:
    """A band in float32 (16/32-bit floats: the measure needs 3 digits, not 15) or float64 (anything else)."""
    if dtype.name == "bfloat16":
        return (part.astype(np.uint32) << 16).view(np.float32)
    if dtype.name in ("float32", "float16"):
        return part.astype(np.float32, copy=False)
    return _as_float(part, dtype)


def _sq_error(reference: np.ndarray, decoded: np.ndarray, dtype: DType,
              weigh: Weigh | None = None) -> tuple[float, float, float, float]:
    """``(||D - W||^2, ||W||^2)`` of ``decoded`` ``D`` against ``reference`` ``W``, then the same sums weighted
    by ``weigh`` (the plain ones again without it), streamed by bands of rows of about ``_STEP`` elements.

    :func:`distortion` widens both tensors to float64 whole, which costs
    more than coding them.
    """
    rows = reference.shape[0] if reference.ndim else 1
    ref, dec = reference.reshape(rows, -1), decoded.reshape(rows, -1)
    step = max(1, _STEP // max(1, ref.shape[1]))
    err = energy = w_err = w_energy = 0.0
    for i in range(0, rows, step):
        r, d = _widened(ref[i : i + step], dtype), _widened(dec[i : i + step], dtype)
        diff = d - r
        err += float(np.einsum("ij,ij->", diff, diff))
        energy += float(np.einsum("ij,ij->", r, r))
        if weigh is not None:
            k = weigh(i, i + len(r))
            w_err += float(np.einsum("ij,ij,ij->", diff, diff, np.broadcast_to(k, diff.shape)))
            w_energy += float(np.einsum("ij,ij,ij->", r, r, np.broadcast_to(k, r.shape)))
    return (err, energy, w_err, w_energy) if weigh is not None else (err, energy, err, energy)


def _ratio(err: float, energy: float) -> float:
    return err / energy if energy > 0 else (0.0 if err == 0 else math.inf)


def _distortion(reference: np.ndarray, decoded: np.ndarray, dtype: DType, rows: tuple[int, int] | None,
                weighting: tuple[Weigh | Weighting | _BlockH, float] | None = None
                ) -> tuple[float, float, float | None]:
    """``(allocation distortion, plain NMSE, output error or None)`` of storage-form arrays, as
    :class:`~codec.rd.allocate.Distortion` measures them: in output space with a ``weighting``
    (``(weigh, scale)``, streamed; or ``(Weighting or _BlockH, scale)`` for a full ``H``, in float64 as the
    exhaustive search measures it), else under the image prior for image ``rows``, else plain NMSE."""
    if weighting is None and rows is not None:
        return (*distortion(_as_float(reference, dtype), _as_float(decoded, dtype), rows), None)
    if weighting is not None and rows is not None and isinstance(weighting[0], _RowPrior):
        count = reference.shape[0] if reference.ndim else 1
        ref = _as_float(reference, dtype).reshape(count, -1)
        diff = _as_float(decoded, dtype).reshape(count, -1) - ref
        part = weighting[0](0, count)[:, 0]
        rel = _ratio(_prior_energy(diff, rows, part), _prior_energy(ref, rows, part))
        plain = _ratio(float(np.einsum("ij,ij->", diff, diff)), float(np.einsum("ij,ij->", ref, ref)))
        return weighting[1] * rel, plain, math.sqrt(rel)
    if weighting is not None and isinstance(weighting[0], (Weighting, _BlockH)):  # a full H, in float64
        rows_of = reference.shape[0] if reference.ndim else 1
        ref = _as_float(reference, dtype).reshape(rows_of, -1)
        diff = _as_float(decoded, dtype).reshape(rows_of, -1) - ref
        rel = _ratio(weighting[0].energy(diff), weighting[0].energy(ref))
        plain = _ratio(float(np.einsum("ij,ij->", diff, diff)), float(np.einsum("ij,ij->", ref, ref)))
        return weighting[1] * rel, plain, math.sqrt(rel)
    err, energy, w_err, w_energy = _sq_error(reference, decoded, dtype, weighting and weighting[0])
    plain = _ratio(err, energy)
    if weighting is None:
        return plain, plain, None
    rel = _ratio(w_err, w_energy)
    return weighting[1] * rel, plain, math.sqrt(rel)


def _measure(name: str, array: np.ndarray, dtype: DType, options: EncodeOptions, rows: tuple[int, int] | None,
             weighting: tuple[Weigh, float] | None = None,
             pixels: dict | None = None) -> tuple[Encoded, int, float, float, float | None]:
    """Code and decode ``array``: ``(encoded, blob bytes, allocation distortion, plain NMSE, output error)``.

    As :func:`codec.rd.allocate.measure`, with the streamed :func:`_distortion` (``pixels``: the cache of
    :func:`~codec.tensorcodec.start_encode`, for several codings of one sample).
    """
    encoded = encode_tensor(array, dtype, options, pixels=pixels)
    decoded = decode_encoded(encoded, dtype, array.shape, name)
    return encoded, sum(map(len, encoded.blobs)), *_distortion(array, decoded, dtype, rows, weighting)


@functools.lru_cache(maxsize=256)
def _full_tiling(rows: int, cols: int, tile_h: int, tile_w: int, mode: str, params: str):
    """The tiling of the whole ``rows x cols`` matrix for a sample's tile size and mode."""
    return plan_tiling(rows, cols, (tile_h, tile_w), (tile_h, tile_w) if mode == "rows" else None, params)


#: Bytes of one blob reference in an index entry's blob list, comma included (offsets at 10 digits, the
#: length of an empty blob, the largest CRC): ``[1000000000,0,4294967295],``.
_BLOB_REF_BYTES = len("[1000000000,0,4294967295],")


def _entry_bytes(name: str, dtype: DType, shape: tuple[int, ...], encoded: Encoded) -> int:
    """Index entry bytes of the whole tensor coded as ``encoded`` (a sample's) codes it: what
    :func:`~codec.rd.allocate.entry_bytes` gives for its blobs left empty, with the blob list counted rather
    than written out (its JSON, thousands of references for a large tensor, cost as much as coding a sample)."""
    t = encoded.tiling
    if t is None:
        return entry_bytes(name, dtype, shape, encoded, 10)
    full = _full_tiling(shape[0], math.prod(shape[1:]), t.tile_h, t.tile_w, t.mode, t.params)
    return (entry_bytes(name, dtype, shape, Encoded(encoded.codec, full, []), 10)
            + _BLOB_REF_BYTES * (full.n_blobs + 1) - 1)


def predict(name: str, shape: tuple[int, ...], dtype: DType, sample: np.ndarray, label: str, options: EncodeOptions,
            rows: tuple[int, int] | None, weighting: tuple[Weigh, float] | None = None,
            pixels: dict | None = None) -> Predicted:
    """Code ``sample`` with ``options``; its bytes scaled to the whole tensor (of ``shape``), its distortion
    (``weighting``: the sample's :data:`Weigh` and the scale of the tensor's output-space measure; ``pixels``: a
    cache of the sample's pixel images shared by its predictions, :func:`~codec.tensorcodec.start_encode`)."""
    encoded, nbytes, weighted, plain, out = _measure(name, sample, dtype, options, rows, weighting, pixels)
    scaled = nbytes * math.prod(shape) / sample.size
    nbytes = math.ceil(scaled) + _entry_bytes(name, dtype, shape, encoded)
    return Predicted(options, label, nbytes, weighted, math.sqrt(plain), out, pred_nbytes=nbytes, pred_nmse=weighted,
                     pred_rel=math.sqrt(plain), pred_out=out)


def _exact_coded(name: str, array: np.ndarray, dtype: DType, point: Predicted, rows: tuple[int, int] | None,
                 weighting: tuple[Weigh, float] | None = None) -> tuple[str, Predicted, Predicted, Encoded]:
    """``(name, point, point measured on the whole tensor, its Encoded)``: the predictions kept in the first point
    for :func:`_correct`; the whole tensor's :class:`Encoded` (with its relative error, as ``start_encode``'s
    check gives it), which the final pass writes as it is when the point is chosen."""
    encoded, nbytes, weighted, plain, out = _measure(name, array, dtype, point.options, rows, weighting)
    nbytes += entry_bytes(name, dtype, tuple(array.shape), encoded, 10)
    if encoded.codec.lossy:
        encoded.rel_error = math.sqrt(plain)
    return name, point, replace(point, nbytes=nbytes, nmse=weighted, rel_error=math.sqrt(plain), out_error=out,
                                exact=True), encoded


@dataclass(frozen=True)
class FileTensor:
    """Where a tensor's raw little-endian data lies in a checkpoint file (:meth:`codec.encode.Arrays.location`):
    what a measurement task on a worker of this machine gets instead of the array, to read it itself
    (:func:`_measure_task`), so that no whole tensor passes through the coordinator or the object store."""

    file: str
    start: int
    shape: tuple[int, ...]
    dtype_name: str
    name: str

    def load(self) -> np.ndarray:
        from ..rawfile import read_array

        return read_array(self.file, self.start, self.shape, self.dtype_name, self.name)


def _measure_task(name: str, array: np.ndarray | FileTensor, dtype: DType, points: list[Predicted],
                  rows: tuple[int, int] | None, weighting: tuple[Weighting, float] | None, keep: bool) -> list[tuple]:
    """One worker task: every point of ``points`` measured on the whole tensor ``array`` (read once for all; a
    :class:`FileTensor` is read here), as :func:`_exact_coded` gives them; the first point's :class:`Encoded`
    only with ``keep`` (else None: it would travel back from the worker for nothing)."""
    if isinstance(array, FileTensor):
        array = array.load()
    weigh = None
    if weighting is not None:
        full = weighting[0].h is not None and weighting[0].h.ndim == 2
        weigh = weighting if full else (_whole_weigh(weighting[0]), weighting[1])
    out = []
    for point in points:
        name, point, measured, encoded = _exact_coded(name, array, dtype, point, rows, weigh)
        out.append((point, measured, encoded if keep and not out else None))
    return out


def _predict_task(name: str, shape: tuple[int, ...], dtype: DType, sample: np.ndarray,
                  weighting: tuple[np.ndarray | _BlockH, float] | None, rows: tuple[int, int] | None,
                  items: list[tuple[str, EncodeOptions]]) -> list[Predicted]:
    """One worker task: :func:`predict` of every ``(label, options)`` of ``items`` on one tensor's sample
    (``weighting``: the sample's weights, :func:`_sample_weights`, and the tensor's scale). The settings of one
    tiling share its tiles' values and ranges, and those of one pixel depth (every JPEG quality) its pixels."""
    weigh = None
    if weighting is not None:
        weigh = weighting if isinstance(weighting[0], _BlockH) else (_weigh_of(weighting[0]), weighting[1])
    pixels: dict = {}
    return [predict(name, shape, dtype, sample, label, options, rows, weigh, pixels) for label, options in items]


#: JPEG qualities a sampled tensor's JPEG settings are predicted at before any quality between them (about every
#: third step of the menu's ladder, and its ends): the lowest in the first pass, two more around the tensor's
#: place (:func:`_anchors`), the others where its window reaches them (:func:`_in_between`). The steps between,
#: then the qualities between those, are predicted (mostly interpolated: :data:`INTERPOLATE`) only around each
#: tensor's choice. Every other step (5, 15, 30, 50, 70, 85, 95, 98), with interpolation, coded 1131-1266 samples
#: on MiniLM at -b 4, 2, 1, 0.6; these six, 975-1124, for the same distortion within 0.03 % (and the same
#: choices on the bench CNNs), when all of them were predicted in the first pass.
COARSE_QUALITIES = (5, 15, 30, 60, 90, 98)
#: Quant's coarse depths: a sampled tensor's first pass predicts them but the lowest (2 bits, about JPEG q5's
#: size or more, which the first pass predicts), the others (2, 3, 5) only where its window reaches them. With
#: (2, 4, 8) the first allocation placed MiniLM's tensors at 4 or 8 bits, too far from their choices (5-6 bits at
#: -b 4) for the JPEG anchors: 829 samples coded instead of 628 (now 513: no 2 bits, and q5 in one tiling, at first).
COARSE_BITS = (2, 4, 6, 8)


def _in_between(pts: list[Predicted], hull: list[Predicted], lagrange: Predicted,
                slack: int) -> list[tuple[str, EncodeOptions]]:
    """The settings to predict next for a tensor: the middle of each gap between two neighbouring levels (JPEG
    qualities, quant depths: :data:`LADDERS`) of one family on its menu whose sizes reach into the tensor's
    window, and the next coarse level above a family's highest (below its lowest) where the window reaches
    above (below) it.

    The ladders' steps are coarse: one step of a large tensor can be worth
    more than the whole slack (the bench CNN's fc1, 95 % of its weights:
    q70 to q80 is 17 % of a 4-bit budget). The equal-slope choice
    ``lagrange`` sits on a hull segment up to the next hull point; the
    slack (``budget`` less the equal-slope choice) lets a tensor grow by
    at most ``slack`` bytes. Between the two, ``[lagrange, min(next hull
    point, lagrange + slack)]`` in bytes, an in-between level of any family
    may beat the hull, so every gap of the menu that reaches into that
    window, in a family with a point on the hull (the others are beaten
    there) or whose every level known destroys the tensor (its safe levels
    are unknown, not beaten), is halved: the coarse levels first (the first pass predicts
    few: :func:`_anchors`), then the ladder's own steps, then (JPEG) the
    integers (all of them once three or fewer are left). The next round's
    allocation narrows the window, so a gap of ten qualities costs about
    five predictions, not nine, in three rounds.
    """
    i = hull.index(lagrange)
    low, high = lagrange.nbytes, lagrange.nbytes + max(slack, 0)
    if i + 1 < len(hull):
        high = min(high, hull[i + 1].nbytes)
    families: dict[tuple, list[Predicted]] = {}
    for p in pts:
        if p.options.codec in LADDERS:
            families.setdefault(_family(p.options), []).append(p)
    on_hull = {_family(p.options) for p in hull if p.options.codec in LADDERS}
    # A family whose every level known destroys the tensor is off the hull of safe points, not beaten there: its
    # safe levels are unknown (bench-shaped cnn_like -b 2: fc1 at q20 in 64x64 tiles, +12.5 % without them).
    on_hull |= {f for f, family in families.items() if all(p.damage > DAMAGE for p in family)}
    families = {f: family for f, family in families.items() if f in on_hull}
    out = []
    for family in families.values():
        family.sort(key=lambda p: _level(p.options))
        top, bottom = family[-1], family[0]
        coarse = LADDERS[top.options.codec][1]
        above = [v for v in coarse if v > _level(top.options)]
        below = [v for v in coarse if v < _level(bottom.options)]
        if top.nbytes < high and above:  # the window reaches above the family's highest level: the next coarse one
            out.append(_at_level(top, above[0]))
        if bottom.nbytes > low and below:  # or below its lowest (quant's first pass starts at 4 bits)
            out.append(_at_level(bottom, below[-1]))
        for a, b in itertools.pairwise(family):
            if min(a.nbytes, b.nbytes) < high and max(a.nbytes, b.nbytes) > low:
                out += _halve(a, b)
    return out


def _halve(a: Predicted, b: Predicted) -> list[tuple[str, EncodeOptions]]:
    """The settings next predicted in the gap between the levels of ``a`` and ``b`` (one family, ``a``'s level
    below ``b``'s): its coarse levels first, then its ladder's, then (JPEG) the integers; all of them when three
    or fewer, else the middle one."""
    ladder, coarse = LADDERS[a.options.codec]
    va, vb = _level(a.options), _level(b.options)
    inside = ([v for v in coarse if va < v < vb] or [v for v in ladder if va < v < vb]
              or (list(range(va + 1, vb)) if a.options.codec == "jpeg" else []))
    return [_at_level(a, v) for v in (inside if len(inside) <= 3 else [inside[len(inside) // 2]])]


def _cheaper_safe(pts: list[Predicted]) -> list[tuple[str, EncodeOptions]]:
    """The settings next predicted for a tensor whose cheapest point that destroys nothing (:data:`DAMAGE`) may lie
    between levels not yet predicted: in each family, every quant depth and coarse JPEG quality between its
    highest level that destroys the tensor and its lowest that does not, or the next one above the highest if
    every level predicted destroys it."""
    families: dict[tuple, list[Predicted]] = {}
    for p in pts:
        if p.options.codec in LADDERS:
            families.setdefault(_family(p.options), []).append(p)
    out = []
    for family in families.values():
        family.sort(key=lambda p: _level(p.options))
        levels = COARSE_QUALITIES if family[0].options.codec == "jpeg" else QUANT_BITS
        safe = next((k for k, p in enumerate(family) if p.damage <= DAMAGE), None)
        if safe == 0:  # the lowest level predicted is safe: the next one below it, if any
            out += [_at_level(family[0], v) for v in levels if v < _level(family[0].options)][-1:]
            continue
        a = family[-1 if safe is None else safe - 1]  # the highest level below the lowest safe one
        above = [v for v in levels if v > _level(a.options)]
        if safe is None:
            out += [_at_level(a, v) for v in above[:1]]
        else:
            out += [_at_level(a, v) for v in above if v < _level(family[safe].options)]
    return out


#: Per codec with a ladder of levels: its menu's levels and the coarse ones among them. A sampled tensor's first
#: pass predicts quant at the coarse depths and JPEG at its lowest quality, then JPEG at two coarse qualities
#: (:func:`_anchors`); the rest are predicted (JPEG: mostly interpolated) where they reach into its window.
LADDERS = {"jpeg": (JPEG_QUALITIES, COARSE_QUALITIES), "quant": (QUANT_BITS, COARSE_BITS)}


def _level(options: EncodeOptions) -> int:
    """A setting's place on its codec's ladder: JPEG's quality, quant's bits."""
    return options.quality if options.codec == "jpeg" else options.bits


def _at_level(point: Predicted, level: int) -> tuple[str, EncodeOptions]:
    """The label and options of ``point``'s setting at another ``level`` of its ladder."""
    if point.options.codec == "jpeg":
        return re.sub(r"\bq\d+\b", f"q{level}", point.label, count=1), point.options.with_(quality=level)
    return re.sub(r"\bb\d+\b", f"b{level}", point.label, count=1), point.options.with_(bits=level)


def _first_pass(options: EncodeOptions) -> bool:
    """Whether a sampled tensor's first pass predicts ``options``: lossless, quant at :data:`COARSE_BITS` but the
    lowest, JPEG at its lowest quality in the first tiling of :data:`~codec.rd.allocate.TILES` (the smallest
    size, for a budget that is clearly impossible). The rest of each family is predicted where the tensor's
    window reaches it (:func:`_anchors`, :func:`_in_between`). Quant in the second tiling at its middle depth
    only: 513 samples coded on MiniLM -b 4, as many as with all three (the first allocation placed tensors
    elsewhere, and JPEG took more). Quant above 8 bits (on the menu from
    :data:`~codec.rd.allocate.HIGH_BITS_FROM` bits/weight) at every depth: three cheap settings, no ladder between;
    1-bit quant (a two-valued tensor's menu, :func:`~codec.rd.allocate.candidates`) too."""
    if options.codec == "quant":
        # below QUANT_BITS: a two-valued tensor's exact 1-bit settings, its whole menu but lossless
        return options.bits in COARSE_BITS[1:] or options.bits in HIGH_QUANT_BITS or options.bits < QUANT_BITS[0]
    return options.codec != "jpeg" or (options.quality == COARSE_QUALITIES[0] and options.tile == TILES[0])


def _anchors(choice: Predicted | None) -> tuple[int, int]:
    """The two qualities of :data:`COARSE_QUALITIES` first predicted for a sampled tensor's JPEG settings, after
    its lossless and quant settings (and JPEG's lowest quality) have been allocated ``choice`` (None: the budget
    is below all of them): those whose flat-table steps (:func:`_step`) bracket the pixel step of ``choice``,
    ``2^(8 - bits)`` for ``bits``-bit quant (JPEG's DCT is orthonormal: equal steps give about equal error),
    JPEG's own for its lowest quality, 1 for lossless. The gaps and the open ends beyond them are predicted
    later where they reach into the tensor's window (:func:`_in_between`)."""
    if choice is None:
        return COARSE_QUALITIES[0], COARSE_QUALITIES[1]
    o = choice.options
    target = 2.0 ** (8 - o.bits) if o.codec == "quant" else _step(o.quality) if o.codec == "jpeg" else 1.0
    i = sum(_step(q) > target for q in COARSE_QUALITIES)  # the qualities are in order of decreasing step
    i = min(max(i, 1), len(COARSE_QUALITIES) - 1)
    return COARSE_QUALITIES[i - 1], COARSE_QUALITIES[i]


#: Whether in-between JPEG qualities of a sampled tensor are interpolated from their neighbours on its menu
#: (:func:`_interpolated`) instead of coded on its sample, where both neighbours are of at least
#: :data:`INTERPOLATE_FROM` (below it JPEG's rate is far from the model: -30 % bytes at quality 10 from 5 and 15).
INTERPOLATE = True
INTERPOLATE_FROM = 15


def _step(quality: int) -> float:
    """The flat table's step at ``quality`` (libjpeg's scaling of 16, rounded as the table is): the pixel step
    that :func:`_anchors` compares with quant's."""
    return float(scaled_table("flat", quality_scale(quality))[0])


@functools.lru_cache(maxsize=1024)
def _table_steps(quality: int, table: str) -> tuple[float, float]:
    """The scale that JPEG's rate and distortion follow at ``quality`` with the named ``table``, from its 64 scaled
    and rounded entries: their geometric mean (a uniform quantizer's rate is linear in the log of its step) and
    their root mean square (its noise is the step squared). One value for the flat table (:func:`_step`); the ramps
    round each entry on its own, so two qualities with the same flat step (63 and 64: 12) differ: with the flat
    step both ramp2 points were predicted the same and fc1's q64 (1,848 B more, 3 % less distortion) never
    measured (bench MLP -b 2: +4.37 % against the exhaustive search)."""
    entries = np.array(scaled_table(table, quality_scale(quality)), np.float64)
    return math.exp(float(np.log(entries).mean())), math.sqrt(float((entries * entries).mean()))


def _neighbours(pts: list[Predicted], options: EncodeOptions) -> tuple[Predicted, Predicted] | None:
    """The points of ``options``' family next below and above its quality, if both are of at least
    :data:`INTERPOLATE_FROM` (else None: code it)."""
    if options.codec != "jpeg":
        return None
    q = options.quality
    family = [p for p in pts if _family(p.options) == _family(options)]
    below = [p for p in family if INTERPOLATE_FROM <= p.options.quality < q]
    above = [p for p in family if p.options.quality > q]
    if not below or not above:
        return None
    a, b = max(below, key=lambda p: p.options.quality), min(above, key=lambda p: p.options.quality)
    return None if any(a.options.quality < c < b.options.quality for c in COARSE_QUALITIES) else (a, b)


def _interpolated(a: Predicted, b: Predicted, label: str, options: EncodeOptions) -> Predicted:
    """A JPEG quality between two points ``a`` and ``b`` of its family, from theirs: bytes linear in the log of the
    quantization step (the table's geometric mean entry, :func:`_table_steps`; a uniform quantizer's rate),
    distortions (squared errors) ``A + B step^2`` (the table's RMS entry: its noise, over a floor: the 8-bit
    mapping's), or log-linear where that fits no floor. On MiniLM's samples,
    against coding them (qualities 20-90 between the ladder's every other step): bytes within 0.2 % (median;
    1.4 % at most), distortion within 0.3-0.6 % (median; 7.9 % at most)."""
    (ga, sa), (gb, sb), (g, s) = (_table_steps(o.quality, o.table) for o in (a.options, b.options, options))
    t = 0.0 if ga == gb else (math.log(g) - math.log(ga)) / (math.log(gb) - math.log(ga))

    def rate(x: float, y: float) -> int:
        return math.ceil(x + t * (y - x))

    def squared(x: float | None, y: float | None) -> float | None:
        if x is None or y is None or sa == sb:
            return x
        slope = (x - y) / (sa * sa - sb * sb)
        floor = x - slope * sa * sa
        if slope > 0 and floor >= 0:
            return floor + slope * s * s
        return x + t * (y - x) if min(x, y) <= 0 else math.exp(math.log(x) + t * (math.log(y) - math.log(x)))

    def error(x: float | None, y: float | None) -> float | None:  # a relative RMS error: its square interpolated
        v = squared(None if x is None else x * x, None if y is None else y * y)
        return None if v is None else math.sqrt(v)

    return Predicted(options, label, rate(a.nbytes, b.nbytes), squared(a.nmse, b.nmse), error(a.rel_error, b.rel_error),
                     error(a.out_error, b.out_error), pred_nbytes=rate(a.pred_nbytes, b.pred_nbytes),
                     pred_nmse=squared(a.pred_nmse, b.pred_nmse), pred_rel=error(a.pred_rel, b.pred_rel),
                     pred_out=error(a.pred_out, b.pred_out))


def _named(name: str, fn: Callable, *args):
    """``(name, fn(*args))``: a worker task that says which tensor its result is for."""
    return name, fn(*args)


def _read(tensors: TensorSource, names: set[str]) -> Iterator[tuple[str, np.ndarray, DType]]:
    """The tensors of ``tensors`` named in ``names`` (a lazy source reads only those)."""
    for name, array, dtype in tensors(names):
        if name in names:
            yield name, array, dtype


def _bounded_map(executor, fn: Callable, items, window: int):
    """``executor.map(fn, items)`` with at most ``window`` tasks (and their inputs) in flight; the first result is
    handed out before the second item is taken (a budget the first tensor already overflows is refused before
    another tensor is read)."""
    pending: list = []
    limit = 1
    for item in items:
        pending.append(executor.submit(fn, *item))
        while len(pending) >= limit:
            yield pending.pop(0).result()
            limit = window
    for f in pending:
        yield f.result()


def _as_completed(executor, fn: Callable, items: Iterator[tuple], window: int,
                  more: Callable[[], bool] = lambda: True) -> Iterator[tuple]:
    """``(item, fn(*item))`` of each item on ``executor``, handed out as each finishes (not in order): at most ``window``
    in flight, a new item taken as soon as one finishes (and ``more()`` allows it, or none is running), so no
    worker waits for the oldest task of a window as :func:`_bounded_map`'s do. Items are taken lazily, in the
    order given (the largest first, for a round that ends balanced)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    running: dict = {}  # (a dict: in submission order)
    items = iter(items)
    exhausted = False
    while True:
        while not exhausted and len(running) < window and (not running or more()):
            item = next(items, None)
            if item is None:
                exhausted = True
            else:
                running[executor.submit(fn, *item)] = item
        if not running:
            return
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in [f for f in running if f in done]:  # in submission order among those finished
            yield running.pop(future), future.result()


def _equal_slopes(hulls: dict[str, list[Predicted]], budget: int) -> dict[str, Predicted]:
    """What :func:`allocate_budget` chooses without its fill (one point per tensor at equal slopes on the
    hulls, within ``budget``), found directly: every tensor starts at its hull's smallest point and the hulls'
    segments are taken by decreasing slope until the next one does not fit. The bisection over the slope
    re-evaluates every hull some 70 times; the fast search allocates once a round."""
    at = {n: 0 for n in hulls}
    spent = sum(h[0].nbytes for h in hulls.values())
    if spent > budget:
        raise EncodeError(f"budget of {budget} bytes is below the smallest encoding ({spent} bytes)")
    segments = sorted(((h[i].nmse - h[i - 1].nmse) / (h[i].nbytes - h[i - 1].nbytes), k, i)
                      for k, h in enumerate(hulls.values()) for i in range(1, len(h)))
    names = list(hulls)
    for _, k, i in segments:  # steepest first (the slopes are negative); a hull's own segments in order
        h = hulls[names[k]]
        spent += h[i].nbytes - h[i - 1].nbytes
        if spent > budget:
            break
        at[names[k]] = i
    return {n: hulls[n][i] for n, i in at.items()}


#: Relative distortion a predicted point must gain over the measured points of its tensor to be chosen instead.
#: Without it, near ties (6-bit quant against JPEG q90 on MiniLM) flipped with every correction of the
#: predictions, each flip a full measurement; with 1 %, MiniLM -b 4 made 55 instead of 62 (32K samples).
MARGIN = 0.01
#: Reads of a tensor to measure its chosen points, at most (besides the first pass's and the final coding's):
#: then only its measured points (its last read measures the chosen point's neighbours too) may be chosen.
#: Uncapped, MiniLM -b 4 and the bench MLP and CNNs read a tensor at most 4 times (the BatchNorm CNN -b 1: 7);
#: a cap of 3 left the MLP -b 2 at 1.916 bits/weight, 7.7 % more distortion than the exhaustive search.
MAX_READS = 4
#: Share of the model's weights from which a tensor dominates it: its prediction errors are the file's (they do not
#: average out over other tensors), so once the search has settled, its chosen point's neighbours on its hull are
#: measured too and the allocation runs again. The bench-shaped cnn_like -b 4 (fc1 95 % of the weights): quant b5
#: predicted 2.4 % too large, 12 % too lossy; +3.7 % against the exhaustive search without the measurement, 0 with
#: it. MiniLM's largest tensor (52 %) is under it: measuring there cost 30 % more CPU for the same file.
DOMINANT = 2 / 3
#: Bytes of coded tensors (chosen points measured whole) kept for the final pass to write without coding them
#: again; past it a tensor is coded again there (a checkpoint larger than memory).
KEEP_BYTES = 64 << 20


def _hull_neighbours(hull: list[Predicted], chosen: Predicted) -> list[Predicted]:
    """The points of ``hull`` around ``chosen``: it and its neighbours where it is on the hull; where the fill took
    a point off the hull, the hull points on either side of its size. (Only the first: the bench CNN at -b 6 took
    fc1 at JPEG q95 in 64x64 tiles, measured, off the hull; q90 in 8x64 tiles beside it, predicted 2.7 % too
    lossy, was never measured: +2.37 % against the exhaustive search, -0.22 % with it.)"""
    if chosen in hull:
        i = hull.index(chosen)
        return hull[max(i - 1, 0) : i + 2]
    return [p for p in hull if p.nbytes <= chosen.nbytes][-1:] + [p for p in hull if p.nbytes > chosen.nbytes][:1]


def _allocate(points: dict[str, list[Predicted]], budget: int, safe_only: bool):
    """``(hulls, equal-slope choice, final choice)`` on the current points; with ``safe_only`` a tensor may
    only take points whose :attr:`RDPoint.damage` is at most :data:`DAMAGE` (as the exhaustive search).
    A tensor's predictions count :data:`MARGIN` more distortion once one of its points is measured."""
    allowed = {n: [p for p in pts if p.damage <= DAMAGE] for n, pts in points.items()} if safe_only else points
    original: dict[int, Predicted] = {}
    seen: dict[str, list[Predicted]] = {}
    for n, pts in allowed.items():
        measured = any(p.exact and p.pred_nbytes for p in pts)
        seen[n] = [p if p.exact or not measured else _with(p, nmse=p.nmse * (1 + MARGIN)) for p in pts]
        original.update((id(c), p) for c, p in zip(seen[n], pts))
    hulls = {n: lower_hull(p) for n, p in seen.items()}
    lagrange = _equal_slopes(hulls, budget)
    chosen = best_fill(seen, {}, lagrange, budget)
    back = lambda d: {n: original[id(p)] for n, p in d.items()}
    return {n: [original[id(p)] for p in h] for n, h in hulls.items()}, back(lagrange), back(chosen)


#: Whether a full ``H`` (calibration's, for layers of at most :data:`codec.rd.calibrate.FULL_H_MAX` inputs) takes
#: the fast search: predicted on samples with each block's own block of ``H`` (:class:`_BlockH`), measured whole
#: with the full ``H``. Off: on the bench models, calibrated, it chose within 2 % of the exhaustive search in 8
#: of 9 runs (MLP, CNN, BatchNorm CNN at -b 2, 1, 0.6; several lower) but +3.8 % on the BatchNorm CNN at -b 2
#: (bench/JOURNAL.md, "Fast search (third pass)"); each block's diagonal alone was +725 % on the MLP at -b 2.
FULL_H_FAST = False


def weighable(measure_by: Distortion) -> bool:
    """Whether the fast search can predict ``measure_by`` from samples: its weightings, if any, have diagonal
    ``R`` and ``H`` (what a state_dict's norms give, or calibration's diagonal second moments), or a full ``H``
    with :data:`FULL_H_FAST` (it couples all columns, which a sample of column chunks sees only within each
    chunk: :class:`_BlockH`; the measured points correct the predictions of their family). A transposed
    convolution's weighting (scored in another view of the tensor, whole) is not: the exhaustive search runs."""
    return (all(w.transposed is None for w in measure_by.weightings.values())  # (scored whole: no samples)
            and (FULL_H_FAST or all(w.h is None or w.h.ndim == 1 for w in measure_by.weightings.values())))


def plan_fast(
    tensors: TensorSource,
    base: EncodeOptions,
    fixed: Callable[[str], EncodeOptions | None],
    *,
    bits_per_weight: float,
    overhead_bytes: int | Callable[[], int] = 0,
    progress: Callable[[str, int], None] | None = None,
    jobs: int | None = None,
    total_weights: int | None = None,
    measure_by: Distortion | None = None,
    notes: list[str] | None = None,
    stats: dict | None = None,
    coded: dict[str, Encoded] | None = None,
    executor: Executor | None = None,
    packed: Callable[[], bool] | None = None,
) -> dict[str, EncodeOptions]:
    """:func:`codec.rd.allocate.plan_options` for a bit budget, by prediction from samples (module docstring).

    ``measure_by`` (default data-free) must be :func:`weighable`. As in the
    exhaustive search, no tensor is left with a relative error above
    :data:`DAMAGE` when the budget allows it, and otherwise a line per
    damaged tensor goes to ``notes`` (room for them kept in the budget).
    ``stats`` (a dict, optional) receives, for benchmarks, ``rounds``,
    ``predicted`` (settings coded on samples), ``interpolated`` (in-between
    qualities not coded), ``exact`` (full measurements made),
    ``exact_weights`` (their weights) and the seconds spent predicting and
    verifying.

    Work: each tensor is read once for its sample (or its whole measurement,
    if small), then at most :data:`MAX_READS` times more to measure the
    points chosen for it (a read measures every point wanted of it); if the
    source takes names (``tensors(names)``, as :func:`codec.api.save`'s
    does), only the tensors measured are read. Samples are coded by
    ``jobs`` worker processes (:func:`codec.parallel.make_process_executor`),
    whatever runs them the same choices; whole tensors are measured by
    ``jobs`` threads. ``executor`` (e.g. :class:`codec.distributed.ray.RayExecutor`, with a ``workers`` count)
    runs both kinds of task instead, ``2 * workers`` in flight, the same choices again; it is shut down on the
    way out (what still runs when the search fails is cancelled). ``coded`` (a dict, optional)
    receives, for chosen points measured whole, the coded tensor itself
    (:class:`~codec.tensorcodec.Encoded`, the bytes a final pass would
    produce: it need not code them again), up to :data:`KEEP_BYTES`. ``packed``: as
    :func:`~codec.rd.allocate.plan_options`'.
    """
    measure_by = measure_by or DATA_FREE
    if not weighable(measure_by):
        raise ValueError("the fast search predicts diagonal weightings only; use search='exhaustive'")
    started = time.perf_counter()
    points: dict[str, list[Predicted]] = {}
    samples: dict[str, tuple[np.ndarray, tuple[np.ndarray, float] | None]] = {}
    images: dict[str, tuple[int, int] | None] = {}
    weighted: dict[str, tuple[Weighting, float] | None] = {}
    shapes: dict[str, tuple[tuple[int, ...], DType]] = {}
    forced: dict[str, EncodeOptions] = {}
    steps: dict[str, int] = {}
    ladders: dict[str, list[tuple[str, EncodeOptions]]] = {}  # a sampled tensor's JPEG settings at COARSE_QUALITIES
    reads: dict[str, int] = {}  # full reads of each tensor for measurements, after the first pass
    held: dict[str, tuple[Predicted, Encoded]] = {}  # the coded tensor of a chosen point, for the final pass
    # A function giving the fixed bytes (the attachments being compressed meanwhile) is called after the first pass.
    later = overhead_bytes if callable(overhead_bytes) else None
    overhead: int | None = None if later is not None else overhead_bytes  # known once ``later`` is called
    checked = False  # the whole model's smallest encoding was found to fit: predictions alone said otherwise
    fixed_bytes, weights_total = overhead or 0, 0
    budget_bytes = int(bits_per_weight * total_weights / 8) if total_weights else None
    count = {"predicted": 0, "interpolated": 0, "exact": 0, "exact_weights": 0, "rounds": 0}
    remote = executor is not None
    high = bits_per_weight >= HIGH_BITS_FROM  # the menu reaches quant above 8 bits (allocate.HIGH_QUANT_BITS)

    def index_packed() -> bool:  # asked once the fixed bytes are known (``later`` has been called)
        return bool(packed and packed())

    with make_executor(jobs) as threads, (executor if remote else make_process_executor(jobs)) as procs:
        width = executor.workers if remote else resolve_jobs(jobs)
        window = 2 * width
        wholes = procs if remote else threads  # whole tensors: local threads (see measure), or the cluster's
        share = getattr(executor, "share", None)  # a value put once for several tasks (a cluster's object store)
        # On a cluster that is this machine, the workers read tensors stored raw in files themselves.
        locate = getattr(tensors, "location", None) if remote and getattr(executor, "local_files", False) else None

        def first_pass() -> Iterator[tuple]:
            """Read each tensor once: code the forced ones, and give a task for the others (:func:`_named`): the
            sample's predictions, or every setting measured whole for a small tensor."""
            nonlocal fixed_bytes, weights_total
            for name, array, dtype, rows in with_row_images(tensors(), base):
                weights_total += array.size
                images[name] = rows
                shapes[name] = (tuple(array.shape), dtype)
                w = measure_by.weighting(name, tuple(array.shape))
                weighted[name] = None if w is None else (w, w.scale)
                opts = fixed(name)
                if opts is not None:
                    forced[name] = opts
                    encoded = encode_tensor(array, dtype, opts, executor=threads)
                    fixed_bytes += sum(map(len, encoded.blobs)) + entry_bytes(name, dtype, tuple(array.shape),
                                                                             encoded, 10)
                    if progress:
                        progress(name, array.size)
                    continue
                menu = allocate.candidates(array, dtype, base, rows)
                if high:  # quant above 8 bits, as the exhaustive search measures it at such a budget
                    menu += high_bit_candidates(array, dtype, base)
                steps[name] = len(menu)
                matrix = array.reshape(array.shape[0] if array.ndim else 1, -1)
                blocks = _blocks(name, matrix.shape, rows is not None) if len(menu) > 1 else None
                if blocks is None:  # small: measure the whole tensor, exactly
                    todo = [Predicted(o, label, 0, 0.0) for label, o in menu]
                    yield name, _measure_task, name, array, dtype, todo, rows, weighted[name], False
                else:
                    sample = np.concatenate([matrix[r : r + BLOCK_H, c : c + bw] for r, c, bw in blocks])
                    dense = None if w is None else (_sample_weights(w, blocks), w.scale)
                    samples[name] = (sample, dense)
                    ladder = [m for m in menu if m[1].codec == "jpeg" and m[1].quality in COARSE_QUALITIES]
                    if ladder:
                        ladders[name] = ladder
                    menu = [m for m in menu if _first_pass(m[1])]
                    count["predicted"] += len(menu)
                    yield name, _predict_task, name, shapes[name][0], dtype, sample, dense, rows, menu

        def impossible(budget_bytes: int | None) -> None:
            """Refuse a budget that is clearly impossible (predictions: 10 % margin) as soon as it shows, naming the
            whole model's smallest encoding (:func:`codec.rd.allocate.refuse_budget`)."""
            nonlocal overhead, checked
            if budget_bytes is not None and not checked:
                smallest = fixed_bytes + sum(min(p.nbytes for p in pts) for pts in points.values())
                if smallest > 1.1 * budget_bytes:
                    if overhead is None:
                        overhead = later()  # type: ignore[misc]
                    allocate.refuse_budget(bits_per_weight, tensors, base, fixed, overhead, packed=index_packed())
                    checked = True

        for name, result in _bounded_map(procs, _named, first_pass(), window):
            points[name] = result if name in samples else [measured for _, measured, _ in result]
            if progress:  # one step a setting, as the exhaustive search (allocate.search_units)
                for _ in range(steps[name]):
                    progress(name, math.prod(shapes[name][0]))
            impossible(budget_bytes)
        if later is not None:
            if overhead is None:
                overhead = later()
            fixed_bytes += overhead
            impossible(budget_bytes)
        budget = int(bits_per_weight * weights_total / 8) - fixed_bytes

        def predict_more(items: dict[str, list[tuple[str, EncodeOptions]]]) -> None:
            """Code ``items`` (settings of sampled tensors) on the tensors' samples, as predictions."""
            count["predicted"] += sum(map(len, items.values()))
            work = ((n, _predict_task, n, shapes[n][0], shapes[n][1], *samples[n], images[n], todo)
                    for n, todo in items.items() if todo)
            if remote:  # one task a tensor (its points' order kept): handed out as they finish, the longest first
                work = iter(sorted(work, key=lambda item: -len(item[-1])))
                for _, (n, predicted) in _as_completed(procs, _named, work, 2 * window):
                    points[n].extend(predicted)
                return
            for n, predicted in _bounded_map(procs, _named, work, window):
                points[n].extend(predicted)

        def safe_bytes_now() -> int:
            """The bytes of every tensor's cheapest point that destroys nothing (:data:`DAMAGE`), as known now."""
            return sum(min(p.nbytes for p in pts if p.damage <= DAMAGE) for pts in points.values())

        if ladders:  # the JPEG anchors of each sampled tensor, from where its quant settings put it
            try:
                where = _allocate(points, budget, safe_bytes_now() <= budget)[1]
            except EncodeError:  # below every quant setting: the budget lies among JPEG's lowest qualities
                where = {}
            predict_more({n: [m for m in ladder if m[1].quality in _anchors(where.get(n))]
                          for n, ladder in ladders.items()})

        def capped(n: str) -> bool:
            """Whether tensor ``n`` may be chosen only at measured points: read :data:`MAX_READS` times, with a
            measured point that destroys nothing (otherwise its predictions stay open, so the damage guard can
            still find a safe point)."""
            return reads.get(n, 0) >= MAX_READS and any(p.exact and p.damage <= DAMAGE for p in points[n])

        def allowed() -> dict[str, list[Predicted]]:
            """The points the allocation may choose (:func:`capped`)."""
            return {n: [p for p in pts if p.exact] if capped(n) else pts for n, pts in points.items()}

        def measure(todo: dict[str, list[Predicted]]) -> None:
            """Measure the points of ``todo`` on their tensors, each tensor read once; keep the coded tensor of
            each one's first point (the chosen one) while :data:`KEEP_BYTES` allows. Threads, one tensor each:
            a whole tensor would be copied twice on its way to a worker process, which costs more CPU than the
            codecs' released GIL leaves to gain (MiniLM: 1.85 against 1.03 CPU s). With an ``executor`` (a
            cluster), its workers (:func:`measure_remote`)."""
            if remote:
                measure_remote(todo)
                return
            kept = sum(sum(map(len, e.blobs)) for _, e in held.values())
            work = ((name, _measure_task, name, array, dtype, todo[name], images[name], weighted[name], True)
                    for name, array, dtype in _read(tensors, set(todo)))
            for name, results in _bounded_map(wholes, _named, work, width):
                kept = keep(name, *results[0][1:], kept)
                joined(name, [(point, measured) for point, measured, _ in results])

        def keep(name: str, measured: Predicted, encoded: Encoded | None, kept: int) -> int:
            """Hold ``encoded``, the coded tensor of ``measured`` (its chosen point), for the final pass, if
            :data:`KEEP_BYTES` allows beyond the ``kept`` bytes; the bytes kept then."""
            size = 0 if encoded is None else sum(map(len, encoded.blobs))
            if encoded is None or kept + size > KEEP_BYTES:
                return kept
            held[name] = (measured, encoded)
            return kept + size

        def joined(name: str, pairs: list[tuple[Predicted, Predicted]]) -> None:
            """One read of tensor ``name`` measured ``(point, measured)`` pairs: the measured points join its menu
            in their order (a prediction replaced, a setting new to a tensor measured whole added), the rest
            of its predictions corrected."""
            reads[name] = reads.get(name, 0) + 1
            pts = points[name]
            for point, measured in pairs:
                if point.nbytes:  # a prediction, now measured
                    pts[pts.index(point)] = measured
                    count["exact"] += 1
                    count["exact_weights"] += math.prod(shapes[name][0])
                else:
                    pts.append(measured)
            _correct(pts)

        def measure_remote(todo: dict[str, list[Predicted]]) -> None:
            """:func:`measure` on a cluster's workers: one task a point (a tensor's points measured side by side),
            the largest tensors' first, each handed out as it finishes, so a round ends balanced rather than on
            the oldest task of a window. On a cluster that is this machine, a tensor stored raw in a checkpoint
            file goes to its tasks as a :class:`FileTensor` (each reads it itself); any other is read here once and
            shared by its tasks (``executor.share``, one copy in the object store), at most ``4 * AHEAD_BYTES`` of
            them ahead. A tensor's points join its menu in their order once all are measured, as :func:`measure`
            does; which tensors' codings are kept (:data:`KEEP_BYTES`) follows the order they finish in, and a
            tensor not kept is coded again by the final pass, to the same bytes."""
            kept = sum(sum(map(len, e.blobs)) for _, e in held.values())
            located = {}
            if locate is not None:
                for n in todo:
                    where = locate(n)
                    if where is not None:
                        shape, dtype = shapes[n]
                        located[n] = FileTensor(where[0], where[1], shape, dtype.name, n)
            results: dict[str, list] = {n: [None] * len(pts) for n, pts in todo.items()}
            left = {n: len(pts) for n, pts in todo.items()}
            sizes: dict[str, int] = {}
            ahead = 0

            def tasks(name: str, source, dtype: DType) -> Iterator[tuple]:
                return ((name, _measure_task, name, source, dtype, [p], images[name], weighted[name], k == 0)
                        for k, p in enumerate(todo[name]))

            def work() -> Iterator[tuple]:
                nonlocal ahead
                for name in sorted(located, key=lambda n: -math.prod(shapes[n][0])):  # the largest first
                    yield from tasks(name, located[name], shapes[name][1])
                for name, array, dtype in _read(tensors, set(todo) - set(located)):
                    sizes[name] = array.nbytes
                    ahead += array.nbytes
                    yield from tasks(name, share(array) if share is not None else array, dtype)

            for item, (name, [(_, measured, encoded)]) in _as_completed(procs, _named, work(), window,
                                                                         lambda: ahead <= 4 * AHEAD_BYTES):
                k = next(i for i, p in enumerate(todo[name]) if p is item[5][0])
                if k == 0:
                    kept = keep(name, measured, encoded, kept)
                results[name][k] = measured
                left[name] -= 1
                if not left[name]:
                    ahead -= sizes.pop(name, 0)
                    joined(name, list(zip(todo[name], results.pop(name))))

        def settle(budget: int) -> tuple[dict[str, Predicted], int]:
            """Allocate, predict the in-between qualities, measure the chosen points, until every one is exact:
            ``(choice, bytes of the smallest choice without damage)``."""
            while True:
                count["rounds"] += 1
                safe_bytes = safe_bytes_now()
                if safe_bytes > budget:  # cheaper points that destroy nothing may lie between the levels predicted
                    cheaper = {n: c for n in samples if not capped(n) and (c := _cheaper_safe(points[n]))}
                    if cheaper:
                        predict_more(cheaper)
                        continue
                extra: dict[str, list[tuple[str, EncodeOptions]]] = {}
                view = allowed()
                try:
                    hulls, lagrange, chosen = _allocate(view, budget, safe_bytes <= budget)
                    todo = {n: [p] for n, p in chosen.items() if not p.exact}
                    slack = budget - sum(p.nbytes for p in lagrange.values())
                    extra = {n: e for n in view if not capped(n)
                             and (e := _in_between(view[n], hulls[n], lagrange[n], slack))}
                except EncodeError:  # the smallest points may be predictions: learn their real sizes first
                    hulls = {n: lower_hull(p) for n, p in view.items()}
                    chosen = {}
                    todo = {n: [h[0]] for n, h in hulls.items() if not h[0].exact}
                    if not todo:  # every cheapest point measured, and over the budget
                        allocate.refuse_budget(bits_per_weight, tensors, base, fixed, overhead or 0,
                                               packed=index_packed())
                        least = fixed_bytes + sum(h[0].nbytes for h in hulls.values())  # points it may not take
                        raise EncodeError(f"{bits_per_weight} bits/weight is below the smallest encoding (at least "
                                          f"{8 * least / max(weights_total, 1):.3f} bits/weight)") from None
                for n in [n for n, (p, _) in held.items() if chosen.get(n) is not p]:
                    del held[n]  # no longer chosen: its coded tensor will not be written
                guesses = [(n, *item) for n, items in extra.items() if n in samples for item in items]
                if INTERPOLATE:  # in-between qualities from their neighbours where the model holds; the rest coded
                    pairs = [(g, _neighbours(points[g[0]], g[2])) for g in guesses]
                    for (n, label, o), ab in pairs:
                        if ab is not None:
                            points[n].append(_interpolated(*ab, label, o))
                    count["interpolated"] += sum(ab is not None for _, ab in pairs)
                    guesses = [g for g, ab in pairs if ab is None]
                    if not guesses and pairs:
                        continue
                if guesses:  # in-between qualities of sampled tensors: predicted, then allocate again
                    by_tensor: dict[str, list] = {}
                    for n, *item in guesses:
                        by_tensor.setdefault(n, []).append(tuple(item))
                    predict_more(by_tensor)
                    continue
                for n, items in extra.items():  # tensors measured whole: their in-between qualities too
                    todo.setdefault(n, []).extend(Predicted(o, label, 0, 0.0) for label, o in items)
                if not todo:
                    return chosen, safe_bytes
                for n, pts in todo.items():  # a tensor's last read: its chosen point's neighbours on the hull too
                    if reads.get(n, 0) == MAX_READS - 1 and n in chosen and chosen[n] in hulls[n]:
                        i = hulls[n].index(chosen[n])
                        pts.extend(p for p in hulls[n][max(i - 1, 0) : i + 2] if not p.exact and p not in pts)
                measure(todo)

        predicted_at = time.perf_counter()
        chosen, safe_bytes = settle(budget)
        big = max(chosen, key=lambda n: math.prod(shapes[n][0]), default=None)
        if big in samples and math.prod(shapes[big][0]) >= DOMINANT * weights_total and reads.get(big, 0) < MAX_READS:
            # the model's dominant tensor: its prediction errors are the file's; its hull neighbours measured too
            hull = lower_hull([p for p in allowed()[big] if safe_bytes > budget or p.damage <= DAMAGE])
            near = [p for p in _hull_neighbours(hull, chosen[big]) if not p.exact]
            if near:
                measure({big: near})
                chosen, safe_bytes = settle(budget)
        damaged = []
        if safe_bytes > budget:  # as the exhaustive search: name the damaged tensors, keeping room for the notes
            need = math.ceil(8000 * (fixed_bytes + safe_bytes) / weights_total) / 1000
            damaged = _damage_notes(chosen, need)
            if damaged:
                reserve = allocate.notes_room(damaged, index_packed())
                if budget - reserve < sum(min(p.nbytes for p in pts) for pts in points.values()):
                    raise EncodeError(f"{bits_per_weight} bits/weight leaves no room for the warning that tensors "
                                      f"would be destroyed; {need} bits/weight avoids it")
                chosen, _ = settle(budget - reserve)
                damaged = _damage_notes(chosen, need)
        if notes is not None:
            notes.extend(damaged)
    if coded is not None:
        coded.update((n, e) for n, (p, e) in held.items() if chosen.get(n) is p)
    if stats is not None:
        stats.update(count, predict_s=predicted_at - started, verify_s=time.perf_counter() - predicted_at,
                     max_reads=max(reads.values(), default=0))
    return {**forced, **{n: p.options for n, p in chosen.items()}}
