"""Rate-distortion allocation: spend bits where accuracy needs them.

Every tensor that may be coded lossily gets a menu of candidate settings
(:func:`candidates`: lossless; ``quant`` at 2..8 bits and ``jpeg`` with the
flat table at a ladder of qualities, each on 64x64 and 8x64 tiles; and, for
image-like rows, rows mode with the ramp and flat tables). Each candidate is
encoded and decoded once to measure its exact rate (bytes, including the
index entry) and distortion. The allocator then picks one point per tensor:

- for a **bit budget**, by equal-slope (Lagrangian) allocation over the
  lower convex hull of each tensor's points, then intermediate qualities
  for the JPEG choices whose next step is worth most, then a greedy pass
  that spends what is left on the best remaining upgrades;
- for a **maximum error**, the cheapest point within the bound.

Distortion is data-free by default: the normalized squared error
``NMSE = ||W' - W||^2 / ||W||^2``, which for a linear layer with white
inputs is the relative perturbation of its output energy; perturbations of
successive layers add to first order, so the total is ``sum_t w_t *
NMSE_t`` with every ``w_t = 1``. Each layer matters as much as any other,
whatever its size, which protects small output layers that a per-weight
measure would starve.

Rows that are images -- the rows of ``row_shape``, or, data-free, those of
the model's first matrix when they are square (``C = k*k``, ``k >= 8``, not
a power of two: a first layer over image inputs) -- are measured under a
natural-image prior instead: each row's error, seen as an image, is
weighted in the 2-D Fourier domain by the power spectrum
``1 / (f^2 + 1/(h*w))``, so error where inputs carry little energy (high
frequencies) costs little. On the seed MLP this ranks candidates like the
true input covariance does, where plain NMSE prefers the flat table that
loses more accuracy.

A calibration hook (:func:`sensitivities`) replaces the weights by measured
score drops per unit distortion when the caller can score a model.

Pure numpy; knows nothing about torch or files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..dtypes import DType, to_float64
from ..errors import EncodeError
from ..format import TensorEntry
from ..parallel import make_executor
from ..tensorcodec import Encoded, EncodeOptions, decode_tensor, encode_tensor, lossless_reason

__all__ = ["RDPoint", "candidates", "measure", "distortion", "image_side", "row_images", "lower_hull",
           "allocate_budget", "fill_budget", "allocate_max_error", "sensitivities", "plan_options",
           "JPEG_QUALITIES", "QUANT_BITS", "ROW_TABLES", "TILES"]

#: JPEG qualities on each tensor's menu.
JPEG_QUALITIES = (5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95, 98)
#: quant pixel bits on each tensor's menu.
QUANT_BITS = (2, 3, 4, 5, 6, 8)
#: JPEG tables tried for image-like rows: the prior-matched ramps and flat
#: (grid tiles use flat). Annex K is left out: the 1/f^2 prior ranks it
#: best at 1.2-1.5 bits/weight on the seed MLP, yet it loses 0.5-0.8 points
#: more accuracy there than ramp2 at the same size (it drops all high
#: frequencies, which Fashion-MNIST's edges do use).
ROW_TABLES = ("ramp1", "ramp2", "flat")
#: Grid tile shapes on each tensor's menu: square tiles, and short wide
#: ones whose own offset/scale follow outlier rows (measured on MiniLM:
#: at equal rate, 8x64 tiles cut the error of 64x64 ones by about 10 %).
TILES = ((64, 64), (8, 64))
#: Rate searches of :func:`plan_options`.
SEARCHES = ("fast", "exhaustive")


@dataclass
class RDPoint:
    """One measured candidate of one tensor."""

    options: EncodeOptions
    label: str
    nbytes: int  # blobs plus the tensor's index entry
    nmse: float  # the allocation's distortion measure (image-prior weighted for image rows)
    rel_error: float = 0.0  # plain relative RMS error ||W' - W|| / ||W||


def candidates(array: np.ndarray, dtype: DType, base: EncodeOptions,
               rows: tuple[int, int] | None = None) -> list[tuple[str, EncodeOptions]]:
    """The labelled settings worth measuring for one tensor (``rows``: its row image shape, if any)."""
    menu = [("lossless", base.with_(codec="lossless"))]
    if lossless_reason(array, dtype, "quant") is not None:
        return menu
    menu += [(f"quant b{b} {h}x{w}", base.with_(codec="quant", bits=b, row_shape=None, tile=(h, w)))
             for h, w in TILES for b in QUANT_BITS]
    if lossless_reason(array, dtype, "jpeg") is None:
        cols = math.prod(array.shape[1:])
        menu += [(f"jpeg q{q} flat {h}x{w}", base.with_(codec="jpeg", quality=q, table="flat", row_shape=None,
                                                        tile=(h, w)))
                 for h, w in TILES for q in JPEG_QUALITIES]
        if rows is not None and rows[0] * rows[1] == cols:
            for table in ROW_TABLES:
                menu += [(f"jpeg q{q} {table} rows{rows[0]}x{rows[1]}",
                          base.with_(codec="jpeg", quality=q, table=table, row_shape=rows))
                         for q in JPEG_QUALITIES]
    return menu


def entry_bytes(name: str, dtype: DType, shape: tuple[int, ...], encoded: Encoded, offset_digits: int) -> int:
    """Bytes the tensor's index entry takes (offsets counted at ``offset_digits`` digits)."""
    entry = TensorEntry(name, dtype, shape, encoded.codec, encoded.tiling)
    doc = entry.to_json()
    doc["blobs"] = [[10 ** (offset_digits - 1), len(b), 0xFFFFFFFF] for b in encoded.blobs]
    return len(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()) + 1


def image_side(shape: tuple[int, ...]) -> int | None:
    """``k`` if a tensor's rows could be ``k x k`` images, else None.

    ``C = k*k`` with ``k >= 8`` and ``C`` not a power of two (hidden sizes
    such as 256 or 1024 are squares too, but powers of two; image sides such
    as MNIST's 28 are not).
    """
    if len(shape) < 2:
        return None
    cols = math.prod(shape[1:])
    k = math.isqrt(cols)
    return k if k >= 8 and k * k == cols and cols & (cols - 1) else None


def row_images(shape: tuple[int, ...], base: EncodeOptions, input_layer: bool) -> tuple[int, int] | None:
    """The image shape of a tensor's rows, for the image prior and rows-mode candidates, or None.

    The user's ``row_shape`` where it fits the rows; otherwise, data-free,
    only the model's input layer (its first matrix) whose rows are square
    (:func:`image_side`): a deeper layer's rows are feature maps or hidden
    units, not images, even when their count happens to be a square (a CNN's
    64 x 7 x 7 = 56^2 flattened features).
    """
    cols = math.prod(shape[1:]) if len(shape) >= 2 else 0
    if base.row_shape is not None and base.row_shape[0] * base.row_shape[1] == cols:
        return base.row_shape
    k = image_side(shape) if input_layer else None
    return (k, k) if k is not None else None


def _prior_energy(matrix: np.ndarray, rows: tuple[int, int]) -> float:
    """Energy of row images of shape ``rows`` weighted by the natural-image spectrum prior."""
    h, w = rows
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    weight = 1.0 / (fy**2 + fx**2 + 1.0 / (h * w))
    spectrum = np.fft.fft2(matrix.reshape(-1, h, w))
    return float(np.sum(weight * (spectrum.real**2 + spectrum.imag**2)))


def distortion(reference: np.ndarray, decoded: np.ndarray,
               rows: tuple[int, int] | None = None) -> tuple[float, float]:
    """``(allocation distortion, plain NMSE)`` of ``decoded`` against ``reference`` (float64).

    The allocation distortion is the image-prior weighted NMSE when the rows
    are images of shape ``rows``, else the plain NMSE.
    """
    diff = decoded - reference
    err, energy = float(np.sum(diff * diff)), float(np.sum(reference * reference))
    plain = err / energy if energy > 0 else (0.0 if err == 0 else math.inf)
    if rows is None:
        return plain, plain
    err, energy = _prior_energy(diff, rows), _prior_energy(reference, rows)
    return (err / energy if energy > 0 else (0.0 if err == 0 else math.inf)), plain


def measure(name: str, array: np.ndarray, dtype: DType, label: str, options: EncodeOptions,
            rows: tuple[int, int] | None = None, offset_digits: int = 10) -> tuple[RDPoint, np.ndarray]:
    """Encode and decode one candidate; return its point and the decoded array."""
    encoded = encode_tensor(array, dtype, options)
    entry = TensorEntry(name, dtype, tuple(array.shape), encoded.codec, encoded.tiling)
    decoded = decode_tensor(entry, encoded.blobs)
    as_float = to_float64 if dtype.floating else (lambda a, _: a.astype(np.float64))
    weighted, plain = distortion(as_float(array, dtype), as_float(decoded, dtype), rows)
    nbytes = sum(map(len, encoded.blobs)) + entry_bytes(name, dtype, tuple(array.shape), encoded, offset_digits)
    return RDPoint(options, label, nbytes, weighted, math.sqrt(plain)), decoded


def lower_hull(points: Sequence[RDPoint]) -> list[RDPoint]:
    """The points on the lower convex hull of (rate, distortion), by increasing rate."""
    pts = sorted(points, key=lambda p: (p.nbytes, p.nmse))
    front: list[RDPoint] = []
    for p in pts:  # Pareto front: strictly decreasing distortion
        if not front or p.nmse < front[-1].nmse:
            front.append(p)
    hull: list[RDPoint] = []
    for p in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the chord a-p: drop it
            if (b.nmse - a.nmse) * (p.nbytes - a.nbytes) >= (p.nmse - a.nmse) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _pick(hull: list[RDPoint], weight: float, lam: float) -> int:
    costs = [weight * p.nmse + lam * p.nbytes for p in hull]
    return int(np.argmin(costs))


def allocate_budget(hulls: dict[str, list[RDPoint]], weights: dict[str, float], budget: int,
                    fill: bool = True) -> dict[str, RDPoint]:
    """Choose one point per tensor minimizing sum(w * D) with total bytes <= ``budget``.

    Equal-slope search over lambda, then (``fill``) a greedy pass spending
    the slack. Raises EncodeError when even the smallest choice does not fit.
    """
    smallest = sum(h[0].nbytes for h in hulls.values())
    if smallest > budget:
        raise EncodeError(f"budget of {budget} bytes is below the smallest encoding ({smallest} bytes)")

    def choose(lam: float) -> dict[str, RDPoint]:
        return {n: h[_pick(h, weights.get(n, 1.0), lam)] for n, h in hulls.items()}

    def total(choice: dict[str, RDPoint]) -> int:
        return sum(p.nbytes for p in choice.values())

    lo, hi = 1e-30, 1e30  # lambda: total(lo) is largest, total(hi) smallest
    if total(choose(lo)) <= budget:
        return choose(lo)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if total(choose(mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    chosen = choose(hi)
    return fill_budget(hulls, weights, chosen, budget) if fill else chosen


def _upgrades(hull: list[RDPoint], current: RDPoint) -> list[RDPoint]:
    return [p for p in hull if p.nbytes > current.nbytes and p.nmse < current.nmse]


def fill_budget(hulls: dict[str, list[RDPoint]], weights: dict[str, float], chosen: dict[str, RDPoint],
                budget: int) -> dict[str, RDPoint]:
    """Greedily take the upgrade with the best weighted slope that still fits, until none does."""
    chosen = dict(chosen)
    spent = sum(p.nbytes for p in chosen.values())
    while True:
        best = None
        for n, cur in chosen.items():
            w = weights.get(n, 1.0)
            for p in _upgrades(hulls[n], cur):
                extra = p.nbytes - cur.nbytes
                if spent + extra <= budget:
                    slope = w * (cur.nmse - p.nmse) / extra
                    if best is None or slope > best[0]:
                        best = (slope, n, p, extra)
        if best is None:
            return chosen
        _, n, p, extra = best
        chosen[n] = p
        spent += extra


def allocate_max_error(points: dict[str, list[RDPoint]], max_error: float) -> dict[str, RDPoint]:
    """Per tensor, the cheapest point whose relative RMS error is at most ``max_error``."""
    out = {}
    for name, pts in points.items():
        ok = [p for p in pts if p.rel_error <= max_error]
        out[name] = min(ok, key=lambda p: p.nbytes)  # lossless (error 0) is always there
    return out


def sensitivities(points: dict[str, list[RDPoint]], decoded: dict[str, dict[str, np.ndarray]],
                  score: Callable[[dict[str, np.ndarray]], float]) -> dict[str, float]:
    """Calibrated weights: score drop per unit NMSE, one probe per tensor.

    ``decoded[name][label]`` holds decoded arrays of some candidates;
    ``score(replacements)`` scores the model with those tensors replaced
    (higher is better). Each tensor is probed alone with its candidate
    closest to 1 % relative error; the weight is the score drop divided by
    that candidate's NMSE (at least a small positive floor, so no tensor is
    treated as free).
    """
    base = score({})
    weights = {}
    for name, pts in points.items():
        probes = [p for p in pts if p.nmse > 0 and p.label in decoded.get(name, {})]
        if not probes:
            weights[name] = 1.0
            continue
        probe = min(probes, key=lambda p: abs(math.log(p.rel_error / 0.01)))
        drop = base - score({name: decoded[name][probe.label]})
        weights[name] = max(drop, 1e-6 * max(abs(base), 1.0)) / probe.nmse
    return weights


TensorSource = Callable[[], Iterator[tuple[str, np.ndarray, DType]]]


def plan_options(
    tensors: TensorSource,
    base: EncodeOptions,
    fixed: Callable[[str], EncodeOptions | None],
    *,
    bits_per_weight: float | None = None,
    max_error: float | None = None,
    overhead_bytes: int = 0,
    score: Callable[[dict[str, np.ndarray]], float] | None = None,
    progress: Callable[[str, int], None] | None = None,
    jobs: int | None = None,
    total_weights: int | None = None,
    search: str = "fast",
) -> dict[str, EncodeOptions]:
    """Measure every tensor's menu and choose its options for a rate target.

    ``tensors()`` yields ``(name, array, dtype)`` for each stored tensor (it
    is called once; arrays may be loaded lazily). ``fixed(name)`` returns the
    options a user forced for a tensor (measured for its bytes only), or
    None. With ``bits_per_weight`` the whole file, ``overhead_bytes``
    (header, index skeleton, aliases) included, lands at or under the
    budget; with ``max_error`` every free tensor gets the cheapest setting
    within that relative RMS error. ``score`` enables calibrated weights.
    ``jobs`` threads measure a tensor's candidates side by side. Given
    ``total_weights`` (the sum of the tensors' sizes), a budget that the
    tensors measured so far already cannot fit is refused at once.
    ``search="fast"`` (the default) predicts a budget search's points from
    samples of the tensors (:mod:`codec.rd.fast`); ``"exhaustive"`` measures
    every candidate in full (and so do max-error and calibrated searches).
    """
    if (bits_per_weight is None) == (max_error is None):
        raise EncodeError("give exactly one of bits_per_weight and max_error")
    if search not in SEARCHES:
        raise ValueError(f"search={search!r}: use one of {', '.join(map(repr, SEARCHES))}")
    if search == "fast" and bits_per_weight is not None and score is None:
        from .fast import plan_fast

        return plan_fast(tensors, base, fixed, bits_per_weight=bits_per_weight, overhead_bytes=overhead_bytes,
                         progress=progress, jobs=jobs, total_weights=total_weights)
    points: dict[str, list[RDPoint]] = {}
    forced: dict[str, EncodeOptions] = {}
    probes: dict[str, dict[str, np.ndarray]] = {}
    fixed_bytes, weights_total = overhead_bytes, 0
    images: dict[str, tuple[int, int] | None] = {}
    seen_matrix = False
    with make_executor(jobs) as executor:
        for name, array, dtype in tensors():
            weights_total += array.size
            is_matrix = array.ndim >= 2 and dtype.floating
            rows = images[name] = row_images(array.shape, base, input_layer=not seen_matrix) if is_matrix else None
            seen_matrix |= is_matrix
            opts = fixed(name)
            if opts is not None:
                forced[name] = opts
                fixed_bytes += measure(name, array, dtype, "fixed", opts)[0].nbytes
            else:
                pts, best_probe = [], None

                def trial(item: tuple[str, EncodeOptions]) -> tuple[RDPoint, np.ndarray | None]:
                    point, decoded = measure(name, array, dtype, item[0], item[1], rows)  # noqa: B023
                    return point, (decoded if score is not None else None)  # noqa: B023

                for point, decoded in executor.map(trial, candidates(array, dtype, base, rows)):
                    pts.append(point)
                    if decoded is not None and point.nmse > 0:
                        gap = abs(math.log(point.rel_error / 0.01))
                        if best_probe is None or gap < best_probe[0]:
                            best_probe = (gap, point.label, decoded)
                points[name] = pts
                if best_probe is not None:
                    probes[name] = {best_probe[1]: best_probe[2]}
            if progress:
                progress(name, array.size)
            if bits_per_weight is not None and total_weights:
                _check_feasible(bits_per_weight, total_weights, fixed_bytes, points)
    if max_error is not None:
        chosen = allocate_max_error(points, max_error)
    else:
        weights = sensitivities(points, probes, score) if score is not None else {}
        budget = int(bits_per_weight * weights_total / 8) - fixed_bytes  # type: ignore[operator]
        hulls = {n: lower_hull(p) for n, p in points.items()}
        _check_feasible(bits_per_weight, weights_total, fixed_bytes, points)  # type: ignore[arg-type]
        chosen = allocate_budget(hulls, weights, budget, fill=False)
        chosen = _refine(tensors, chosen, hulls, weights, budget, images)
        chosen = fill_budget(hulls, weights, chosen, budget)
    return {**forced, **{n: p.options for n, p in chosen.items()}}


def _check_feasible(bits_per_weight: float, total_weights: int, fixed_bytes: int,
                    points: dict[str, list[RDPoint]]) -> None:
    """EncodeError if the fixed bytes and the smallest points measured so far exceed the budget."""
    smallest = fixed_bytes + sum(min(p.nbytes for p in pts) for pts in points.values())
    if smallest > int(bits_per_weight * total_weights / 8):
        raise EncodeError(f"{bits_per_weight} bits/weight is below the smallest encoding "
                          f"(at least {8 * smallest / max(total_weights, 1):.3f} bits/weight)")


def _refine(tensors: TensorSource, chosen: dict[str, RDPoint], hulls: dict[str, list[RDPoint]],
            weights: dict[str, float], budget: int, images: dict[str, tuple[int, int] | None],
            top: int = 3) -> dict[str, RDPoint]:
    """Spend the slack the coarse quality ladder leaves: for the JPEG choices
    whose next step is worth most (weighted slope), try the qualities between."""
    chosen = dict(chosen)
    slack = budget - sum(p.nbytes for p in chosen.values())

    def next_slope(n: str) -> float:
        ups = _upgrades(hulls[n], chosen[n])
        return weights.get(n, 1.0) * (chosen[n].nmse - ups[0].nmse) / (ups[0].nbytes - chosen[n].nbytes)

    jpeg = [n for n in chosen if chosen[n].options.codec == "jpeg" and _upgrades(hulls[n], chosen[n])]
    names = sorted(jpeg, key=next_slope, reverse=True)[:top]
    if not names or slack <= 0:
        return chosen
    arrays = {name: (array, dtype) for name, array, dtype in tensors() if name in names}
    for name in names:
        (array, dtype), point = arrays.pop(name), chosen[name]
        q0 = point.options.quality
        higher = [q for q in JPEG_QUALITIES if q > q0]
        lo, hi = q0, (higher[0] if higher else 100)
        while hi - lo > 1:  # largest quality whose size still fits the slack
            mid = (lo + hi) // 2
            trial, _ = measure(name, array, dtype, f"{point.label} ~q{mid}", point.options.with_(quality=mid),
                               images[name])
            if trial.nbytes - point.nbytes <= slack:
                lo, best = mid, trial
            else:
                hi = mid
        if lo != q0:
            slack -= best.nbytes - point.nbytes
            chosen[name] = best
    return chosen
