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
   measured in full.
2. **Allocate.** Equal slopes on the lower hulls of the points
   (:func:`_equal_slopes`), then the slack that leaves is spent by a
   knapsack over every point (:func:`codec.rd.allocate.best_fill`), not greedily: the
   greedy fill took a cheap upgrade that left no room for a better one
   (bench CNN -b 4: 4 % of the budget unspent, +57 % distortion). Only
   every other JPEG quality of the ladder is predicted at first
   (:data:`COARSE_QUALITIES`); the gaps of the menu that reach into each
   tensor's window (from its equal-slope point up to the next hull point
   or the slack) are halved round by round (:func:`_in_between`), so the
   qualities between the ladder's steps join the menu where they can
   matter.
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

import itertools
import json
import math
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..dtypes import DType, to_float64
from ..errors import EncodeError
from ..format import TensorEntry
from ..parallel import make_executor
from ..tensorcodec import Encoded, EncodeOptions, decode_tensor, encode_tensor
from ..tiling import plan_tiling
from . import allocate
from .allocate import (
    DAMAGE,
    DATA_FREE,
    JPEG_QUALITIES,
    NOTE_BYTES_RESERVE,
    Distortion,
    RDPoint,
    TensorSource,
    Weighting,
    _damage_notes,
    best_fill,
    distortion,
    entry_bytes,
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


def _whole_weigh(w: Weighting) -> Weigh:
    """:data:`Weigh` of a whole matrix: ``R[r0:r1, None] * H[None, :]`` (either may be absent)."""
    rows = None if w.rows is None else w.rows.astype(np.float32)[:, None]
    cols = None if w.h is None else w.h.astype(np.float32)[None, :]
    one = np.ones((1, 1), np.float32)
    return lambda r0, r1: (one if rows is None else rows[r0:r1]) * (one if cols is None else cols)


def _sample_weigh(w: Weighting, blocks: list[tuple[int, int, int]]) -> Weigh:
    """:data:`Weigh` of the sample made of ``blocks``: each block's rows of ``R`` times its columns of ``H``."""
    whole = _whole_weigh(w)
    dense = np.concatenate([np.broadcast_to(whole(r, r + BLOCK_H)[:, c : c + bw] if w.h is not None
                                            else whole(r, r + BLOCK_H), (BLOCK_H, bw)) for r, c, bw in blocks])
    return lambda r0, r1: dense[r0:r1]


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
                weighting: tuple[Weigh, float] | None = None) -> tuple[float, float, float | None]:
    """``(allocation distortion, plain NMSE, output error or None)`` of storage-form arrays, as
    :class:`~codec.rd.allocate.Distortion` measures them: in output space with a ``weighting``
    (``(weigh, scale)``), else under the image prior for image ``rows``, else plain NMSE; streamed."""
    if weighting is None and rows is not None:
        return (*distortion(_as_float(reference, dtype), _as_float(decoded, dtype), rows), None)
    err, energy, w_err, w_energy = _sq_error(reference, decoded, dtype, weighting and weighting[0])
    plain = _ratio(err, energy)
    if weighting is None:
        return plain, plain, None
    rel = _ratio(w_err, w_energy)
    return weighting[1] * rel, plain, math.sqrt(rel)


def _measure(name: str, array: np.ndarray, dtype: DType, options: EncodeOptions, rows: tuple[int, int] | None,
             weighting: tuple[Weigh, float] | None = None) -> tuple[Encoded, int, float, float, float | None]:
    """Code and decode ``array``: ``(encoded, blob bytes, allocation distortion, plain NMSE, output error)``.

    As :func:`codec.rd.allocate.measure`, with the streamed :func:`_distortion`.
    """
    encoded = encode_tensor(array, dtype, options)
    entry = TensorEntry(name, dtype, tuple(array.shape), encoded.codec, encoded.tiling)
    decoded = decode_tensor(entry, encoded.blobs)
    return encoded, sum(map(len, encoded.blobs)), *_distortion(array, decoded, dtype, rows, weighting)


def _entry_bytes(name: str, dtype: DType, shape: tuple[int, ...], encoded: Encoded, cache: dict | None = None) -> int:
    """Index entry bytes of the whole tensor coded as ``encoded`` (a sample's) codes it.

    With a ``cache``, computed once per tensor, codec and tiling: the JSON of
    a large tensor's blob list costs as much as coding a small sample, and
    the settings of one codec differ by a digit or two (a quality).
    """
    t = encoded.tiling
    key = (name, encoded.codec.codec_id, None if t is None else (t.mode, t.tile_h, t.tile_w, t.params))
    if cache is not None and key in cache:
        return cache[key]
    if t is None:
        nbytes = entry_bytes(name, dtype, shape, encoded, 10)
    else:
        full = plan_tiling(shape[0], math.prod(shape[1:]), (t.tile_h, t.tile_w),
                           (t.tile_h, t.tile_w) if t.mode == "rows" else None, t.params)
        nbytes = entry_bytes(name, dtype, shape, Encoded(encoded.codec, full, [b""] * (full.n_blobs + 1)), 10)
    if cache is not None:
        cache[key] = nbytes
    return nbytes


def predict(name: str, shape: tuple[int, ...], dtype: DType, sample: np.ndarray, label: str, options: EncodeOptions,
            rows: tuple[int, int] | None, weighting: tuple[Weigh, float] | None = None,
            entry_cache: dict | None = None) -> Predicted:
    """Code ``sample`` with ``options``; its bytes scaled to the whole tensor (of ``shape``), its distortion
    (``weighting``: the sample's :data:`Weigh` and the scale of the tensor's output-space measure;
    ``entry_cache``: see :func:`_entry_bytes`, for one tensor of each name)."""
    encoded, nbytes, weighted, plain, out = _measure(name, sample, dtype, options, rows, weighting)
    scaled = nbytes * math.prod(shape) / sample.size
    nbytes = math.ceil(scaled) + _entry_bytes(name, dtype, shape, encoded, entry_cache)
    return Predicted(options, label, nbytes, weighted, math.sqrt(plain), out, pred_nbytes=nbytes, pred_nmse=weighted,
                     pred_rel=math.sqrt(plain), pred_out=out)


def _exact(name: str, array: np.ndarray, dtype: DType, point: Predicted, rows: tuple[int, int] | None,
           weighting: tuple[Weigh, float] | None = None) -> tuple[str, Predicted, Predicted]:
    """``(name, point, point measured on the whole tensor)`` (its predictions kept, for :func:`_correct`)."""
    encoded, nbytes, weighted, plain, out = _measure(name, array, dtype, point.options, rows, weighting)
    nbytes += entry_bytes(name, dtype, tuple(array.shape), encoded, 10)
    return name, point, replace(point, nbytes=nbytes, nmse=weighted, rel_error=math.sqrt(plain), out_error=out,
                                exact=True)


#: JPEG qualities first predicted for a sampled tensor: every other step of the menu's ladder (and its ends).
#: The steps between, then the qualities between those, are predicted only around each tensor's choice
#: (:func:`_in_between`): on MiniLM that is 30 % fewer predictions for the same choices.
COARSE_QUALITIES = (5, 15, 30, 50, 70, 85, 95, 98)


def _in_between(pts: list[Predicted], hull: list[Predicted], lagrange: Predicted,
                slack: int) -> list[tuple[str, EncodeOptions]]:
    """The JPEG qualities to predict next for a tensor: the middle of each gap between two neighbouring
    qualities of one table and tiling on its menu whose sizes reach into the tensor's window.

    The ladder's steps are coarse: one step of a large tensor can be worth
    more than the whole slack (the bench CNN's fc1, 95 % of its weights:
    q70 to q80 is 17 % of a 4-bit budget). The equal-slope choice
    ``lagrange`` sits on a hull segment up to the next hull point; the
    slack (``budget`` less the equal-slope choice) lets a tensor grow by
    at most ``slack`` bytes. Between the two, ``[lagrange, min(next hull
    point, lagrange + slack)]`` in bytes, an in-between quality of any
    table and tiling may beat the hull, so every gap of the menu that
    reaches into that window, in a table and tiling with a point on the
    hull (the others are beaten there), is halved: the ladder's own steps first
    (:data:`COARSE_QUALITIES` leaves every other one out), then the
    integers (all of them once three or fewer are left). The next round's
    allocation narrows the window, so a gap of ten qualities costs about
    five predictions, not nine, in three rounds.
    """
    i = hull.index(lagrange)
    low, high = lagrange.nbytes, lagrange.nbytes + max(slack, 0)
    if i + 1 < len(hull):
        high = min(high, hull[i + 1].nbytes)
    on_hull = {_family(p.options) for p in hull if p.options.codec == "jpeg"}
    families: dict[tuple, list[Predicted]] = {}
    for p in pts:
        if _family(p.options) in on_hull:
            families.setdefault(_family(p.options), []).append(p)
    out = []
    for family in families.values():
        family.sort(key=lambda p: p.options.quality)
        for a, b in itertools.pairwise(family):
            qa, qb = a.options.quality, b.options.quality
            if qb - qa < 2 or min(a.nbytes, b.nbytes) >= high or max(a.nbytes, b.nbytes) <= low:
                continue
            inside = [q for q in JPEG_QUALITIES if qa < q < qb] or list(range(qa + 1, qb))
            for q in inside if len(inside) <= 3 else inside[len(inside) // 2 : len(inside) // 2 + 1]:
                out.append((re.sub(r"\bq\d+\b", f"q{q}", a.label, count=1), a.options.with_(quality=q)))
    return out


def _bounded_map(executor, fn: Callable, items, window: int):
    """``executor.map(fn, items)`` with at most ``window`` tasks (and their inputs) in flight."""
    pending: list = []
    for item in items:
        pending.append(executor.submit(fn, *item))
        while len(pending) >= window:
            yield pending.pop(0).result()
    for f in pending:
        yield f.result()


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


def weighable(measure_by: Distortion) -> bool:
    """Whether the fast search can predict ``measure_by`` from samples: its weightings, if any, have diagonal
    ``R`` and ``H`` (what a state_dict's norms give, or calibration's diagonal second moments); a full ``H``
    couples all columns, which a sample of column chunks does not see."""
    return all(w.h is None or w.h.ndim == 1 for w in measure_by.weightings.values())


def plan_fast(
    tensors: TensorSource,
    base: EncodeOptions,
    fixed: Callable[[str], EncodeOptions | None],
    *,
    bits_per_weight: float,
    overhead_bytes: int = 0,
    progress: Callable[[str, int], None] | None = None,
    jobs: int | None = None,
    total_weights: int | None = None,
    measure_by: Distortion | None = None,
    notes: list[str] | None = None,
    stats: dict | None = None,
) -> dict[str, EncodeOptions]:
    """:func:`codec.rd.allocate.plan_options` for a bit budget, by prediction from samples (module docstring).

    ``measure_by`` (default data-free) must be :func:`weighable`. As in the
    exhaustive search, no tensor is left with a relative error above
    :data:`DAMAGE` when the budget allows it, and otherwise a line per
    damaged tensor goes to ``notes`` (room for them kept in the budget).
    ``stats`` (a dict, optional) receives, for benchmarks, ``rounds``,
    ``predicted`` (settings coded on samples), ``exact`` (full measurements
    made), ``exact_weights`` (their weights) and the seconds spent
    predicting and verifying.
    """
    measure_by = measure_by or DATA_FREE
    if not weighable(measure_by):
        raise ValueError("the fast search predicts diagonal weightings only; use search='exhaustive'")
    started = time.perf_counter()
    points: dict[str, list[Predicted]] = {}
    samples: dict[str, tuple[np.ndarray, tuple[Weigh, float] | None]] = {}
    images: dict[str, tuple[int, int] | None] = {}
    weighted: dict[str, tuple[Weigh, float] | None] = {}
    shapes: dict[str, tuple[tuple[int, ...], DType]] = {}
    forced: dict[str, EncodeOptions] = {}
    fixed_bytes, weights_total = overhead_bytes, 0
    budget_bytes = int(bits_per_weight * total_weights / 8) if total_weights else None
    entry_cache: dict = {}
    count = {"predicted": 0, "exact": 0, "exact_weights": 0, "rounds": 0}
    with make_executor(jobs) as executor:
        window = 2 * getattr(executor, "_max_workers", 1)

        def _predict(name: str, label: str, options: EncodeOptions) -> Predicted:
            sample, weighting = samples[name]
            return predict(name, shapes[name][0], shapes[name][1], sample, label, options, images[name], weighting,
                           entry_cache)

        for name, array, dtype, rows in with_row_images(tensors(), base):
            weights_total += array.size
            images[name] = rows
            shapes[name] = (tuple(array.shape), dtype)
            w = measure_by.weighting(name, tuple(array.shape))
            weighted[name] = None if w is None else (_whole_weigh(w), w.scale)
            opts = fixed(name)
            if opts is not None:
                forced[name] = opts
                encoded = encode_tensor(array, dtype, opts, executor=executor)
                fixed_bytes += sum(map(len, encoded.blobs)) + entry_bytes(name, dtype, tuple(array.shape), encoded, 10)
                if progress:
                    progress(name, array.size)
            else:
                menu = allocate.candidates(array, dtype, base, rows)
                matrix = array.reshape(array.shape[0] if array.ndim else 1, -1)
                blocks = _blocks(name, matrix.shape, rows is not None) if len(menu) > 1 else None
                if blocks is None:  # small: measure the whole tensor, exactly

                    def trial(item, name=name, array=array, dtype=dtype, rows=rows) -> Predicted:
                        return _exact(name, array, dtype, Predicted(item[1], item[0], 0, 0.0), rows, weighted[name])[2]
                else:
                    sample = np.concatenate([matrix[r : r + BLOCK_H, c : c + bw] for r, c, bw in blocks])
                    samples[name] = (sample, None if w is None else (_sample_weigh(w, blocks), w.scale))
                    steps = len(menu)
                    menu = [m for m in menu if m[1].codec != "jpeg" or m[1].quality in COARSE_QUALITIES]
                    count["predicted"] += len(menu)

                    def trial(item, name=name) -> Predicted:
                        return _predict(name, item[0], item[1])

                points[name] = []
                for point in executor.map(trial, menu):
                    points[name].append(point)
                    if progress:  # one step a setting, as the exhaustive search (allocate.search_units)
                        progress(name, array.size)
                if progress and blocks is not None:
                    for _ in range(steps - len(menu)):  # the menu's settings left to refinement
                        progress(name, array.size)
            if budget_bytes is not None:  # refuse a budget that is clearly impossible (predictions: 10 % margin)
                smallest = fixed_bytes + sum(min(p.nbytes for p in pts) for pts in points.values())
                if smallest > 1.1 * budget_bytes:
                    raise EncodeError(f"{bits_per_weight} bits/weight is below the smallest encoding "
                                      f"(about {8 * smallest / max(total_weights, 1):.3f} bits/weight)")

        def settle(budget: int) -> tuple[dict[str, Predicted], int]:
            """Allocate, predict the in-between qualities, measure the chosen points, until every one is exact:
            ``(choice, bytes of the smallest choice without damage)``."""
            while True:
                count["rounds"] += 1
                safe_bytes = sum(min(p.nbytes for p in pts if p.damage <= DAMAGE) for pts in points.values())
                extra: dict[str, list[tuple[str, EncodeOptions]]] = {}
                try:
                    hulls, lagrange, chosen = _allocate(points, budget, safe_bytes <= budget)
                    todo = {n: [p] for n, p in chosen.items() if not p.exact}
                    slack = budget - sum(p.nbytes for p in lagrange.values())
                    extra = {n: e for n in points if (e := _in_between(points[n], hulls[n], lagrange[n], slack))}
                except EncodeError:  # the smallest points may be predictions: learn their real sizes first
                    hulls = {n: lower_hull(p) for n, p in points.items()}
                    todo = {n: [h[0]] for n, h in hulls.items() if not h[0].exact}
                    if not todo:
                        least = fixed_bytes + sum(h[0].nbytes for h in hulls.values())
                        raise EncodeError(f"{bits_per_weight} bits/weight is below the smallest encoding (at least "
                                          f"{8 * least / max(weights_total, 1):.3f} bits/weight)") from None
                guesses = [(n, *item) for n, items in extra.items() if n in samples for item in items]
                if guesses:  # in-between qualities of sampled tensors: predicted, then allocate again
                    count["predicted"] += len(guesses)
                    for (n, *_), point in zip(guesses, executor.map(lambda g: _predict(*g), guesses)):
                        points[n].append(point)
                    continue
                for n, items in extra.items():  # tensors measured whole: their in-between qualities too
                    todo.setdefault(n, []).extend(Predicted(o, label, 0, 0.0) for label, o in items)
                if not todo:
                    return chosen, safe_bytes
                work = ((name, array, dtype, point, images[name], weighted[name])
                        for name, array, dtype in tensors() if name in todo for point in todo[name])
                for name, point, measured in _bounded_map(executor, _exact, work, window):
                    pts = points[name]
                    if point.nbytes:  # a prediction, now measured
                        pts[pts.index(point)] = measured
                        count["exact"] += 1
                        count["exact_weights"] += math.prod(shapes[name][0])
                    else:
                        pts.append(measured)
                    _correct(pts)

        budget = int(bits_per_weight * weights_total / 8) - fixed_bytes
        predicted_at = time.perf_counter()
        chosen, safe_bytes = settle(budget)
        damaged = []
        if safe_bytes > budget:  # as the exhaustive search: name the damaged tensors, keeping room for the notes
            need = math.ceil(8000 * (fixed_bytes + safe_bytes) / weights_total) / 1000
            damaged = _damage_notes(chosen, need)
            if damaged:
                reserve = NOTE_BYTES_RESERVE + len(json.dumps("; ".join(damaged)))
                if budget - reserve < sum(min(p.nbytes for p in pts) for pts in points.values()):
                    raise EncodeError(f"{bits_per_weight} bits/weight leaves no room for the warning that tensors "
                                      f"would be destroyed; {need} bits/weight avoids it")
                chosen, _ = settle(budget - reserve)
                damaged = _damage_notes(chosen, need)
        if notes is not None:
            notes.extend(damaged)
    if stats is not None:
        stats.update(count, predict_s=predicted_at - started, verify_s=time.perf_counter() - predicted_at)
    return {**forced, **{n: p.options for n, p in chosen.items()}}
