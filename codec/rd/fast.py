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
2. **Allocate and verify.** The allocator runs on the predicted points
   (equal slopes on the hulls, then the greedy fill over every point); the
   JPEG qualities between the menu's steps around each JPEG choice are
   predicted once and join the menu. Every chosen point that is still a
   prediction is then coded and decoded in full; the measured/predicted
   ratios of its bytes and distortion correct the other predictions of its
   family (same codec, table and tiling: a sample's bias is much the same
   across qualities), and the allocation runs again, until every chosen
   point is exact. The file meets the budget exactly, as the exhaustive
   search's does.

Calibrated weights (``score``) need decoded tensors and the caller's
score: those searches stay exhaustive.
"""

from __future__ import annotations

import math
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
    JPEG_QUALITIES,
    RDPoint,
    TensorSource,
    allocate_budget,
    distortion,
    entry_bytes,
    fill_budget,
    lower_hull,
    with_row_images,
)

__all__ = ["SAMPLE_WEIGHTS", "BLOCK_H", "BLOCK_W", "sample_matrix", "predict", "plan_fast"]

#: Weights in each tensor's sample (at least MIN_IMAGE_ELEMENTS, so the sample is coded as the tensor is).
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


def _family(options: EncodeOptions) -> tuple:
    """Candidates that share a sample's bias: the same codec, table and tiling (they differ in quality or bits)."""
    return options.codec, options.table, options.tile, options.row_shape


def _correct(pts: list[Predicted]) -> None:
    """Rescale each predicted point by the measured/predicted ratios of the nearest exact point of its family.

    A sample's bias (it missed a few outlier rows, say) is much the same for
    every quality of one family, so one full measurement corrects them all.
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
        pts[i] = replace(p, nbytes=math.ceil(p.pred_nbytes * e.nbytes / e.pred_nbytes), nmse=p.pred_nmse * rd,
                         rel_error=p.rel_error * math.sqrt(rd))


def sample_matrix(name: str, matrix: np.ndarray, full_rows: bool) -> np.ndarray | None:
    """A fixed sample of whole tiles of ``matrix`` (2-D), stacked; None when the tensor is small enough to measure whole.

    Blocks of ``BLOCK_H`` rows by ``BLOCK_W`` columns (whole rows when
    ``full_rows``, for rows-mode candidates, or when the matrix is narrow)
    are drawn without replacement by a generator seeded with ``name``, the
    column chunks in turn.
    Partial blocks at the bottom and right edges are never drawn.
    """
    rows, cols = matrix.shape
    bw = cols if full_rows or cols < 2 * BLOCK_W else BLOCK_W
    n_r, n_c = rows // BLOCK_H, cols // bw
    want = -(-SAMPLE_WEIGHTS // (BLOCK_H * bw))
    if 2 * want > n_r * n_c:
        return None
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    # Column chunks in turn (channels with outliers are columns: each chunk gets its share), random bands in each.
    first, bands = int(rng.integers(n_c)), [iter(rng.permutation(n_r)) for _ in range(n_c)]
    blocks = []
    for i in range(want):
        c = (first + i) % n_c
        r = int(next(bands[c]))
        blocks.append(matrix[r * BLOCK_H : (r + 1) * BLOCK_H, c * bw : (c + 1) * bw])
    return np.concatenate(blocks)


def _as_float(array: np.ndarray, dtype: DType) -> np.ndarray:
    return to_float64(array, dtype) if dtype.floating else array.astype(np.float64)


#: Elements per step of :func:`_sq_error` (float32 sums over a step, float64 across steps).
_STEP = 1 << 18


def _float32(part: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype.name == "bfloat16":
        return (part.astype(np.uint32) << 16).view(np.float32)
    return part.astype(np.float32, copy=False)


def _sq_error(reference: np.ndarray, decoded: np.ndarray, dtype: DType) -> tuple[float, float]:
    """``(||decoded - reference||^2, ||reference||^2)`` of 16/32-bit float tensors, in float32 steps.

    :func:`distortion` widens both tensors to float64 whole, which costs
    more than coding them; this streams ``_STEP`` elements at a time.
    """
    ref, dec = reference.reshape(-1), decoded.reshape(-1)
    err = energy = 0.0
    for i in range(0, ref.size, _STEP):
        r, d = _float32(ref[i : i + _STEP], dtype), _float32(dec[i : i + _STEP], dtype)
        diff = d - r
        err += float(np.dot(diff, diff))
        energy += float(np.dot(r, r))
    return err, energy


def _distortion(reference: np.ndarray, decoded: np.ndarray, dtype: DType,
                rows: tuple[int, int] | None) -> tuple[float, float]:
    """:func:`distortion` of storage-form arrays, streamed for plain NMSE of 16/32-bit floats."""
    if rows is not None or dtype.name not in ("float32", "bfloat16", "float16"):
        return distortion(_as_float(reference, dtype), _as_float(decoded, dtype), rows)
    err, energy = _sq_error(reference, decoded, dtype)
    plain = err / energy if energy > 0 else (0.0 if err == 0 else math.inf)
    return plain, plain


def _measure(name: str, array: np.ndarray, dtype: DType, options: EncodeOptions, rows: tuple[int, int] | None,
             executor=None) -> tuple[Encoded, int, float, float]:
    """Code and decode ``array``: ``(encoded, blob bytes, allocation distortion, plain NMSE)``.

    As :func:`codec.rd.allocate.measure`, with blobs coded by ``executor``
    and the streamed :func:`_distortion`.
    """
    encoded = encode_tensor(array, dtype, options, executor=executor)
    entry = TensorEntry(name, dtype, tuple(array.shape), encoded.codec, encoded.tiling)
    decoded = decode_tensor(entry, encoded.blobs, executor=executor)
    weighted, plain = _distortion(array, decoded, dtype, rows)
    return encoded, sum(map(len, encoded.blobs)), weighted, plain


def _entry_bytes(name: str, dtype: DType, shape: tuple[int, ...], encoded: Encoded) -> int:
    """Index entry bytes of the whole tensor coded as ``encoded`` (a sample's) codes it."""
    if encoded.tiling is None:
        return entry_bytes(name, dtype, shape, encoded, 10)
    t = encoded.tiling
    full = plan_tiling(shape[0], math.prod(shape[1:]), (t.tile_h, t.tile_w),
                       (t.tile_h, t.tile_w) if t.mode == "rows" else None, t.params)
    return entry_bytes(name, dtype, shape, Encoded(encoded.codec, full, [b""] * (full.n_blobs + 1)), 10)


def predict(name: str, shape: tuple[int, ...], dtype: DType, sample: np.ndarray, label: str, options: EncodeOptions,
            rows: tuple[int, int] | None) -> Predicted:
    """Code ``sample`` with ``options``; its bytes scaled to the whole tensor (of ``shape``), its distortion."""
    encoded, nbytes, weighted, plain = _measure(name, sample, dtype, options, rows)
    scaled = nbytes * math.prod(shape) / sample.size
    nbytes = math.ceil(scaled) + _entry_bytes(name, dtype, shape, encoded)
    return Predicted(options, label, nbytes, weighted, math.sqrt(plain), pred_nbytes=nbytes, pred_nmse=weighted)


def _exact(name: str, array: np.ndarray, dtype: DType, point: Predicted,
           rows: tuple[int, int] | None) -> tuple[str, Predicted, Predicted]:
    """``(name, point, point measured on the whole tensor)`` (its predictions kept, for :func:`_correct`)."""
    encoded, nbytes, weighted, plain = _measure(name, array, dtype, point.options, rows)
    nbytes += entry_bytes(name, dtype, tuple(array.shape), encoded, 10)
    return name, point, replace(point, nbytes=nbytes, nmse=weighted, rel_error=math.sqrt(plain), exact=True)


def _between(name: str, shape: tuple[int, ...], dtype: DType, sample: np.ndarray, pts: list[Predicted],
             point: Predicted, rows: tuple[int, int] | None, executor) -> list[Predicted]:
    """Predicted points of the JPEG qualities between ``point``'s ladder neighbours (same table and tiling).

    The ladder's steps are coarse: a step of a large tensor can be worth
    more than the whole slack, which the in-between qualities then spend.
    """
    q0, have = point.options.quality, {p.options.quality for p in pts if _family(p.options) == _family(point.options)}
    lower, higher = [q for q in JPEG_QUALITIES if q < q0], [q for q in JPEG_QUALITIES if q > q0]
    lo, hi = (lower[-1] if lower else 1), (higher[0] if higher else 100)
    qs = [q for q in range(lo + 1, hi) if q not in have]
    return list(executor.map(lambda q: predict(name, shape, dtype, sample, f"{point.label} ~q{q}",
                                               point.options.with_(quality=q), rows), qs))


def _bounded_map(executor, fn: Callable, items, window: int):
    """``executor.map(fn, items)`` with at most ``window`` tasks (and their inputs) in flight."""
    pending: list = []
    for item in items:
        pending.append(executor.submit(fn, *item))
        while len(pending) >= window:
            yield pending.pop(0).result()
    for f in pending:
        yield f.result()


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
    stats: dict | None = None,
) -> dict[str, EncodeOptions]:
    """:func:`codec.rd.allocate.plan_options` for a bit budget, by prediction from samples (module docstring).

    ``stats`` (a dict, optional) receives, for benchmarks, ``rounds``,
    ``exact`` (full measurements made), ``exact_weights`` (their weights) and
    the seconds spent predicting and verifying.
    """
    started = time.perf_counter()
    points: dict[str, list[Predicted]] = {}
    samples: dict[str, np.ndarray] = {}
    images: dict[str, tuple[int, int] | None] = {}
    shapes: dict[str, tuple[tuple[int, ...], DType]] = {}
    forced: dict[str, EncodeOptions] = {}
    fixed_bytes, weights_total = overhead_bytes, 0
    budget_bytes = int(bits_per_weight * total_weights / 8) if total_weights else None
    with make_executor(jobs) as executor:
        window = 2 * getattr(executor, "_max_workers", 1)
        for name, array, dtype, rows in with_row_images(tensors(), base):
            weights_total += array.size
            images[name] = rows
            opts = fixed(name)
            if opts is not None:
                forced[name] = opts
                encoded = encode_tensor(array, dtype, opts, executor=executor)
                fixed_bytes += sum(map(len, encoded.blobs)) + entry_bytes(name, dtype, tuple(array.shape), encoded, 10)
            else:
                menu = allocate.candidates(array, dtype, base, rows)
                sample = None
                if len(menu) > 1:
                    sample = sample_matrix(name, array.reshape(array.shape[0], -1), rows is not None)
                if sample is None:  # small: measure the whole tensor, exactly

                    def trial(item, name=name, array=array, dtype=dtype, rows=rows) -> Predicted:
                        return _exact(name, array, dtype, Predicted(item[1], item[0], 0, 0.0), rows)[2]
                else:
                    samples[name] = sample

                    def trial(item, name=name, array=array, dtype=dtype, rows=rows, sample=sample) -> Predicted:
                        return predict(name, tuple(array.shape), dtype, sample, item[0], item[1], rows)

                points[name] = []
                for point in executor.map(trial, menu):
                    points[name].append(point)
                    if progress:  # one step a setting, as the exhaustive search (allocate.search_units)
                        progress(name, array.size)
            if progress and opts is not None:
                progress(name, array.size)
            shapes[name] = (tuple(array.shape), dtype)
            if budget_bytes is not None:  # refuse a budget that is clearly impossible (predictions: 10 % margin)
                smallest = fixed_bytes + sum(min(p.nbytes for p in pts) for pts in points.values())
                if smallest > 1.1 * budget_bytes:
                    raise EncodeError(f"{bits_per_weight} bits/weight is below the smallest encoding "
                                      f"(about {8 * smallest / max(total_weights, 1):.3f} bits/weight)")
        budget = int(bits_per_weight * weights_total / 8) - fixed_bytes
        rounds = exact = exact_weights = 0
        predicted_at = time.perf_counter()
        refined = False
        while True:
            rounds += 1
            hulls = {n: lower_hull(p) for n, p in points.items()}
            try:
                # equal slopes on the hulls, then the slack on any point (in-between qualities are rarely on a hull)
                chosen = fill_budget(points, {}, allocate_budget(hulls, {}, budget, fill=False), budget)
                todo = {n: p for n, p in chosen.items() if not p.exact}
            except EncodeError:  # the smallest points may be predictions: learn their real sizes first
                todo = {n: h[0] for n, h in hulls.items() if not h[0].exact}
                if not todo:
                    raise EncodeError(f"{bits_per_weight} bits/weight is below the smallest encoding (at least "
                                      f"{8 * (fixed_bytes + sum(h[0].nbytes for h in hulls.values())) / max(weights_total, 1):.3f}"
                                      " bits/weight)") from None
            if not refined:  # once, first: the qualities between the ladder's steps around the choice, predicted
                refined = True
                more = [n for n, p in chosen.items() if p.options.codec == "jpeg" and n in samples]
                for n in more:
                    points[n] += _between(n, *shapes[n], samples[n], points[n], chosen[n], images[n], executor)
                if more:
                    continue
            if not todo:
                break
            work = ((name, array, dtype, todo[name], images[name]) for name, array, dtype in tensors() if name in todo)
            for name, point, measured in _bounded_map(executor, _exact, work, window):
                pts = points[name]
                pts[pts.index(point)] = measured
                _correct(pts)
                exact += 1
                exact_weights += math.prod(shapes[name][0])
    if stats is not None:
        stats.update(rounds=rounds, exact=exact, exact_weights=exact_weights, predict_s=predicted_at - started,
                     verify_s=time.perf_counter() - predicted_at)
    return {**forced, **{n: p.options for n, p in chosen.items()}}
