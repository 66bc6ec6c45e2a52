"""Output-weighted pruning of JPEG coefficients: spend a layer's bytes on the rows and inputs its output needs.

Encoder side only: the file holds an ordinary JPEG mosaic, decoded as always.

A JPEG quality quantizes every 8x8 block of a mosaic alike, but the rows of
a layer's weight (its output units) do not matter alike: an error ``dW_j``
in row ``j`` moves the model's output by about ``g_j dW_j H dW_j^T``, where
``g_j = E[sum_k (d out_k / d y_j)^2]`` is the unit's sensitivity (a hidden
unit that rarely fires or that the next layer barely reads has a small one)
and ``H = E[x x^T]`` the second moment of the layer's inputs (an input pixel
that never varies has a small diagonal). On the bench MLP's first layer the
256 least important of the 512 units carry 2 % of ``sum_j g_j Var(y_j)``.

Repair (:mod:`codec.rd.repair`) codes such a weight at *higher* qualities
than planned, and :func:`prune_coefficients` zeroes the quantized DCT coefficients whose weighted distortion increase
is below ``lam`` times their (estimated) bits: with the diagonal of ``H``, a
coefficient's weight is ``sum_p w_p basis_uv(p)^2`` over its block's pixels
``p``, ``w_p = g_row * scale_tile^2 * H_pp`` (the tile's scale maps pixels
to weight values). The zeroed coefficients are subtracted from the pixels,
which are mapped back to weight values, so the encoder's own DCT finds them
near zero (each tile's minimum and maximum element keep their values, so
every tile keeps its offset and scale). :func:`fit_pruned` bisects ``lam``
until the coding fits a byte budget.
Measured on the bench MLP's first layer (``rows`` mode, bench/README.md,
sixth pass): at equal bytes the weighted output error is 35-40 % lower than
the planned quality's, and the model's accuracy at ``-b 0.4`` 0.6-0.7 points
higher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import mapping, tiling
from ..blobcodecs.jpeg import quant_table
from ..dtypes import DType, from_float64, to_float64
from ..tensorcodec import EncodeOptions, lossless_reason, shape_lossless_reason

__all__ = ["unit_sensitivity", "prune_coefficients", "fit_pruned", "applies"]


def _dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II matrix: JPEG's 2-D transform of a block ``B`` is ``D B D^T``."""
    u, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    d = np.sqrt(2 / 8) * np.cos((2 * x + 1) * u * np.pi / 16)
    d[0] /= np.sqrt(2)
    return d


_D = _dct_matrix()

#: Bisection steps on ``lam`` (log scale) in :func:`fit_pruned`.
STEPS = 12
#: The range of ``lam`` searched, relative to the mean pixel weight.
LAM_RANGE = (1e-3, 1e6)


def applies(opts: EncodeOptions, shape: tuple[int, ...], dtype: DType) -> bool:
    """Whether coefficient pruning applies to a weight of ``shape`` and ``dtype`` coded with ``opts``: JPEG in
    ``rows`` mode (one tile per output unit, the rows of image-like receptive fields), not stored losslessly."""
    return (opts.codec == "jpeg" and opts.quality is not None and opts.row_shape is not None
            and shape_lossless_reason(shape, dtype, "jpeg") is None
            and opts.row_shape[0] * opts.row_shape[1] == math.prod(shape[1:]))


def unit_sensitivity(model: torch.nn.Module, module: torch.nn.Module, batches: Sequence, refs: Sequence,
                     run: Callable, flat: Callable, probes: int = 4, seed: int = 0) -> np.ndarray:
    """``g_j = E[sum_k (d out_k / d y_j)^2]`` for each output unit ``j`` of ``module`` (the last axis of a Linear's
    output, the channel axis of a convolution's), summed over positions, averaged over samples.

    ``out`` are the model's floating outputs, each divided by its RMS in ``refs`` (the original's outputs, as
    repair's relative MSE weighs them); the sum over ``k`` is estimated with ``probes`` Rademacher vectors per
    batch (Hutchinson), deterministic for ``seed``. ``run(model, batch)`` runs the model, ``flat(out)`` lists its
    floating output tensors."""
    grabbed: dict[str, torch.Tensor] = {}

    def hook(mod, args, out):
        out = out.detach().requires_grad_(True)
        grabbed["y"] = out
        return out

    gen = torch.Generator().manual_seed(seed)
    total, count = None, 0
    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            for batch, ref in zip(batches, refs):
                for _ in range(probes):
                    outs = flat(run(model, batch))
                    y = grabbed["y"]
                    loss = sum((o * (torch.randint(0, 2, o.shape, generator=gen) * 2 - 1).to(o.dtype)).sum()
                               / r.pow(2).mean().clamp_min(1e-30).sqrt() for o, r in zip(outs, ref))
                    (grad,) = torch.autograd.grad(loss, y)
                    sq = grad.double().pow(2)
                    per_unit = sq.reshape(-1, sq.shape[-1]).sum(0) if isinstance(module, torch.nn.Linear) else \
                        sq.transpose(0, 1).reshape(sq.shape[1], -1).sum(1)
                    total = per_unit if total is None else total + per_unit
                count += y.shape[0]
    finally:
        handle.remove()
    return (total / (probes * max(count, 1))).numpy()


def _bits(levels: np.ndarray) -> np.ndarray:
    """Estimated bits of quantized AC coefficients: about ``3 + 2 log2(1 + |k|)`` for ``k != 0``, none for 0."""
    return np.where(levels != 0, 3.0 + 2.0 * np.log2(1.0 + np.abs(levels)), 0.0)


def prune_coefficients(weight: np.ndarray, dtype: DType, opts: EncodeOptions, row_weights: np.ndarray,
                       col_weights: np.ndarray, lam: float) -> np.ndarray:
    """``weight`` (storage form, a ``rows``-mode JPEG weight, :func:`applies`) with the quantized DCT coefficients
    of its mosaic whose weighted distortion increase is below ``lam`` times their bits removed from its values.

    ``row_weights`` ``[rows]`` and ``col_weights`` ``[cols]`` weigh a pixel of row ``j``, column ``p`` by
    ``row_weights[j] * col_weights[p] * scale_j^2``, normalized to a mean of 1. A coefficient of quantized value
    ``k != 0`` (DC terms are kept) costs about ``3 + 2 log2(1 + |k|)`` bits (:func:`_bits`). Each row keeps its
    minimum and maximum element, and its other values stay within them, so every tile keeps its offset and scale;
    constant rows are returned unchanged, as is the whole weight where pruning does not apply (:func:`applies`),
    it is stored losslessly or it is not finite."""
    return _Pruning(weight, dtype, opts, row_weights, col_weights).at(lam)


class _Pruning:
    """One weight's mosaic analysed for :func:`prune_coefficients`: what does not depend on ``lam`` (the DCT of
    every block, its quantization and each coefficient's weighted gain), computed once for the many ``lam`` of
    :func:`fit_pruned`."""

    def __init__(self, weight: np.ndarray, dtype: DType, opts: EncodeOptions, row_weights: np.ndarray,
                 col_weights: np.ndarray):
        self.weight, self.dtype = weight, dtype
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        m = to_float64(weight, dtype).reshape(rows, cols)
        self.blobs: list[tuple] = []
        if not applies(opts, weight.shape, dtype) or lossless_reason(weight, dtype, "jpeg") is not None \
                or not np.isfinite(m).all():
            return
        t = tiling.plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
        lo, hi = m.min(1), m.max(1)
        offset, scale = (p.astype(np.float64) for p in mapping.params_from_range(lo, hi, 8, t.params))
        pixels = m.copy()
        mapping.pixels_in_place(pixels, offset[:, None], scale[:, None], 8)
        pinned = (m == lo[:, None]) | (m == hi[:, None]) | (scale == 0)[:, None]
        w = np.asarray(row_weights, np.float64)[:, None] * scale[:, None] ** 2 * np.asarray(col_weights, np.float64)
        w /= max(float(w.mean()), 1e-300)
        table = np.array(quant_table(opts.quality, opts.image_codec(t.mode).table), np.float64).reshape(8, 8)
        basis_sq = np.einsum("ux,vy->uvxy", _D, _D) ** 2  # [u, v, x, y]: each coefficient's basis image, squared
        self.m, self.tiling, self.cols = m, t, cols
        for k in range(t.n_blobs):
            idx = t.blob_tiles(k)
            image = tiling.blob_mosaic(pixels[idx.start:idx.stop].reshape(-1, t.tile_h, t.tile_w), t, k, 128.0)
            weights = tiling.blob_mosaic(w[idx.start:idx.stop].reshape(-1, t.tile_h, t.tile_w), t, k, 0.0)
            h, wd = image.shape
            hp, wp = -(-h // 8) * 8, -(-wd // 8) * 8
            padded = np.pad(image, ((0, hp - h), (0, wp - wd)), mode="edge")  # as libjpeg pads, by replication
            blocks = (padded - 128.0).reshape(hp // 8, 8, wp // 8, 8).transpose(0, 2, 1, 3)
            wblocks = np.pad(weights, ((0, hp - h), (0, wp - wd))).reshape(hp // 8, 8, wp // 8, 8).transpose(0, 2, 1, 3)
            coef = _D @ blocks @ _D.T
            q = np.rint(coef / table)
            coef_w = np.einsum("abxy,uvxy->abuv", wblocks, basis_sq)
            gain = coef_w * (coef ** 2 - (coef - q * table) ** 2)  # the distortion each coefficient's coding removes
            prunable = q != 0
            prunable[:, :, 0, 0] = False
            sl = slice(idx.start, idx.stop)
            self.blobs.append((k, sl, padded, (h, wd), coef, gain, _bits(q), prunable, offset[sl, None], scale[sl, None],
                               lo[sl, None], hi[sl, None], pinned[sl]))

    def at(self, lam: float) -> np.ndarray:
        """The weight with the coefficients whose gain is below ``lam`` times their bits removed."""
        if not self.blobs:
            return self.weight
        t, out = self.tiling, self.m.copy()
        for k, sl, padded, (h, wd), coef, gain, bits, prunable, offset, scale, lo, hi, pinned in self.blobs:
            drop = prunable & (gain < lam * bits)
            hp, wp = padded.shape
            pruned = padded - (_D.T @ np.where(drop, coef, 0.0) @ _D).transpose(0, 2, 1, 3).reshape(hp, wp)
            new = tiling.from_mosaic(np.clip(np.rint(pruned[:h, :wd]), 0, 255), t, k).reshape(-1, self.cols)
            out[sl] = np.where(pinned, self.m[sl], np.clip(offset + scale * new, lo, hi))
        return from_float64(out, self.dtype).reshape(self.weight.shape)


def fit_pruned(weight: np.ndarray, dtype: DType, opts: EncodeOptions, row_weights: np.ndarray,
               col_weights: np.ndarray, limit: int, code: Callable[[np.ndarray], tuple]) -> tuple | None:
    """``(pruned weight, *code(pruned weight))`` with the least pruning that codes within ``limit`` bytes (a bisection
    of ``lam`` on a log scale, :data:`STEPS` steps); None when even the most pruning does not fit.
    ``code(array)`` returns ``(decoded, bytes, ...)``."""
    pruning = _Pruning(weight, dtype, opts, row_weights, col_weights)

    def attempt(lam: float):
        value = pruning.at(lam)
        return (value, *code(value))

    lo, hi = math.log(LAM_RANGE[0]), math.log(LAM_RANGE[1])
    best = attempt(math.exp(hi))
    if best[2] > limit:
        return None
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        trial = attempt(math.exp(mid))
        if trial[2] <= limit:
            hi, best = mid, trial
        else:
            lo = mid
    return best
