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
than planned, and :func:`prune_coefficients` drops, block by block, the
quantized DCT coefficients whose weighted distortion increase is not worth
``lam`` times the bits they cost. The distortion: with the diagonal of
``H``, a coefficient's weight is ``sum_p w_p basis_uv(p)^2`` over its
block's pixels ``p``, ``w_p = g_row * scale_tile^2 * H_pp`` (the tile's
scale maps pixels to weight values). The bits: what a baseline JPEG with
the image's own optimized Huffman tables pays (:class:`_Trellis`): a
nonzero AC coefficient costs the code of its ``(run, size)`` symbol plus
``size`` bits, so dropping one lengthens the next one's run, and a block
ends with an EOB unless its last coefficient is kept; a dynamic programme
per block finds the cheapest set to keep, and :func:`estimated_bytes`
predicts the encoder's sizes within 0.5 % (tests/test_rdo.py). The dropped
coefficients are subtracted from the pixels, which are mapped back to
weight values, so the encoder's own DCT finds them near zero (each tile's
minimum and maximum element keep their values, so every tile keeps its
offset and scale). :func:`fit_pruned` bisects ``lam`` until the coding fits
a byte budget. Tiles may be rows (``rows`` mode) or a grid.

Measured (bench/JOURNAL.md): on the bench MLP's first layer (``rows`` mode,
sixth pass, a per-coefficient guess of the bits) the weighted output error at
equal bytes is 35-40 % below the planned quality's and the accuracy at
``-b 0.4`` 0.6-0.7 points higher; the real JPEG cost (seventh pass) lowers the
output error of the layer alone by a further 5 % (no repair). In the bench
CNNs' grid tiles (fc1, 128 x 3136, quality 5) a pruned higher quality is no
better than the plan at equal bytes, and repair does not prune there unless
asked (``RepairSettings.prune_grid``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from .. import tiling
from ..blobcodecs.jpeg import quant_table
from ..dtypes import DType, from_float64, to_float64
from ..tensorcodec import EncodeOptions, _map_blob, shape_lossless_reason

__all__ = ["unit_sensitivity", "output_scale", "prune_coefficients", "fit_pruned", "applies"]


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
    """Whether coefficient pruning applies to a weight of ``shape`` and ``dtype`` coded with ``opts``: JPEG (in
    ``rows`` mode or grid tiles) that the encoder codes as JPEG, not as quant or losslessly."""
    return opts.codec == "jpeg" and opts.quality is not None and shape_lossless_reason(shape, dtype, "jpeg") is None


def output_scale(ref: torch.Tensor) -> torch.Tensor:
    """The RMS of an output of the original model (at least 1e-15), by which :func:`unit_sensitivity` divides it."""
    return ref.pow(2).mean().clamp_min(1e-30).sqrt()


def unit_sensitivity(model: torch.nn.Module, module: torch.nn.Module, batches: Sequence, refs: Sequence | None,
                     run: Callable, flat: Callable, probes: int = 4, seed: int = 0, *,
                     scales: Sequence | None = None) -> np.ndarray:
    """``g_j = E[sum_k (d out_k / d y_j)^2]`` for each output unit ``j`` of ``module`` (the last axis of a Linear's
    output, the channel axis of a convolution's), summed over positions, averaged over samples.

    ``out`` are the model's floating outputs, each divided by its RMS in ``refs`` (the original's outputs, as
    repair's relative MSE weighs them); the sum over ``k`` is estimated with ``probes`` Rademacher vectors per
    batch (Hutchinson), deterministic for ``seed``. ``run(model, batch)`` runs the model, ``flat(out)`` lists its
    floating output tensors. ``scales``: instead of ``refs``, each batch's :func:`output_scale` of each output
    (the same values, without the whole outputs held)."""
    grabbed: dict[str, torch.Tensor] = {}
    if scales is None:
        scales = [[output_scale(r) for r in ref] for ref in refs]

    def hook(mod, args, out):
        out = out.detach().requires_grad_(True)
        grabbed["y"] = out
        return out

    gen = torch.Generator().manual_seed(seed)
    total, count = None, 0
    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            for batch, scale in zip(batches, scales):
                for _ in range(probes):
                    outs = flat(run(model, batch))
                    y = grabbed["y"]
                    loss = sum((o * (torch.randint(0, 2, o.shape, generator=gen) * 2 - 1).to(o.dtype)).sum() / s
                               for o, s in zip(outs, scale))
                    (grad,) = torch.autograd.grad(loss, y)
                    sq = grad.double().pow(2)
                    last_axis = isinstance(module, (torch.nn.Linear, torch.nn.Bilinear))  # (units: the last axis)
                    per_unit = sq.reshape(-1, sq.shape[-1]).sum(0) if last_axis else \
                        sq.transpose(0, 1).reshape(sq.shape[1], -1).sum(1)
                    total = per_unit if total is None else total + per_unit
                count += y.shape[0]
    finally:
        handle.remove()
    return (total / (probes * max(count, 1))).numpy()


def _zigzag() -> np.ndarray:
    """Natural (row-major) index of each of an 8x8 block's coefficients, in JPEG's zigzag order."""
    cells = sorted(((u, v) for u in range(8) for v in range(8)),
                   key=lambda c: (c[0] + c[1], c[1] if (c[0] + c[1]) % 2 == 0 else c[0]))
    return np.array([u * 8 + v for u, v in cells])


_ZIGZAG = _zigzag()
#: AC Huffman symbols (T.81 F.1.2.2): ``run << 4 | size`` for a nonzero coefficient after ``run`` zeros, ZRL for
#: sixteen zeros, EOB for the end of a block's nonzero coefficients.
ZRL, EOB = 0xF0, 0x00
_AC_SYMBOLS = np.zeros(256, bool)
_AC_SYMBOLS[[run << 4 | size for run in range(16) for size in range(1, 11)] + [ZRL, EOB]] = True
#: Bytes of a baseline grayscale JPEG from Pillow besides its entropy-coded data and one byte per Huffman symbol
#: used: SOI 2, JFIF APP0 18, DQT 69, SOF0 13, two DHT segments' fixed 21 each, SOS 10, EOI 2.
HEADER_BYTES = 156
#: Entropy-coded bytes per byte of code: a 0xFF byte is followed by a stuffed 0x00 (T.81 F.1.2.3).
STUFFING = 257 / 256
#: Blocks x (nonzero coefficients + 1)^2 of one chunk of :class:`_Trellis` (bounds its memory, ~16 bytes each).
TRELLIS_CHUNK = 1 << 21


def _size(levels: np.ndarray) -> np.ndarray:
    """JPEG's magnitude category of quantized values (their bits: 0 for 0, 1 for +-1, 2 for +-2..3, ...)."""
    return np.frexp(np.abs(levels))[1].astype(np.int64)


def _code_lengths(counts: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Bits of each symbol under the Huffman code libjpeg's ``optimize_coding`` (which Pillow's ``optimize=True``
    asks for) builds from an image's own ``counts``: Huffman's code over the symbols used and a reserved one of
    count 1 (T.81 K.2: no code of all ones); a symbol not used costs one bit more than the reserved one (the price
    of adding it), or is impossible (infinite) outside ``valid``. The 16-bit limit is not applied (it binds only on
    symbols too rare to matter)."""
    used = np.flatnonzero(counts > 0)
    heap = [(float(counts[s]), i, [i]) for i, s in enumerate(used)] + [(1.0, len(used), [len(used)])]
    depth = np.zeros(len(heap), np.int64)
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        depth[a[2] + b[2]] += 1
        heapq.heappush(heap, (a[0] + b[0], a[1], a[2] + b[2]))
    lengths = np.full(len(counts), np.inf)
    if valid is not None:
        lengths[valid] = depth[-1] + 1.0
    lengths[used] = depth[:-1]
    return lengths


def _ac_counts(levels: np.ndarray) -> np.ndarray:
    """How often each AC symbol occurs in blocks of quantized ``levels`` ``[blocks, 64]`` (zigzag order)."""
    b, pos = np.nonzero(levels[:, 1:])
    pos = pos + 1
    prev = np.where(np.r_[True, b[1:] != b[:-1]], 0, np.r_[0, pos[:-1]])
    run = pos - prev - 1
    counts = np.bincount((run % 16) * 16 + _size(levels[b, pos]), minlength=256).astype(np.float64)
    counts[ZRL] += np.sum(run // 16)
    last = np.zeros(len(levels), np.int64)
    np.maximum.at(last, b, pos)
    counts[EOB] += np.sum(last < 63)
    return counts


def _block_coefficients(image: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(edge-padded float image, DCT coefficients [blocks, 8, 8] in raster order, quantized levels)`` of a pixel
    image as a baseline JPEG encoder sees it (padded to whole blocks by replication, level-shifted by 128)."""
    h, w = image.shape
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    padded = np.pad(np.asarray(image, np.float64), ((0, hp - h), (0, wp - w)), mode="edge")
    blocks = (padded - 128.0).reshape(hp // 8, 8, wp // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    coef = _D @ blocks @ _D.T
    return padded, coef, np.rint(coef / table)


def estimated_bytes(image: np.ndarray, table: Sequence[int]) -> float:
    """Estimated size of ``image`` (8-bit pixels) as a baseline JPEG with quantization ``table`` (64 entries,
    natural order) and optimized Huffman tables, as the ``jpeg`` blob codec writes it: every DC difference and
    AC symbol at its length in the Huffman code of the image's own statistics (:func:`_code_lengths`), the extra
    bits of its magnitude, with byte stuffing (:data:`STUFFING`), plus the headers (:data:`HEADER_BYTES` and a
    byte per symbol used). The pruning's rate model (tests/test_rdo.py holds it to the encoder's sizes)."""
    _, _, q = _block_coefficients(image, np.asarray(table, np.float64).reshape(8, 8))
    levels = q.reshape(-1, 64)[:, _ZIGZAG]
    ac = _ac_counts(levels)
    dc_size = _size(np.diff(levels[:, 0], prepend=0.0))
    dc = np.bincount(dc_size, minlength=12).astype(np.float64)
    bits = (np.sum(ac[ac > 0] * _code_lengths(ac, _AC_SYMBOLS)[ac > 0]) + np.sum(_size(levels[:, 1:]))
            + np.sum(dc[dc > 0] * _code_lengths(dc)[dc > 0]) + np.sum(dc_size))
    return bits / 8 * STUFFING + HEADER_BYTES + np.count_nonzero(ac) + np.count_nonzero(dc)


class _Trellis:
    """Which nonzero AC coefficients each block keeps, at a rate-distortion trade-off ``lam``, with the rate JPEG
    really pays: a kept coefficient costs the code length of its ``(run, size)`` symbol (and a ZRL per 16 zeros
    of its run) plus ``size`` extra bits, so dropping one lengthens the run of the next kept one, and the block's
    end costs an EOB unless its last coefficient is kept. A dynamic programme over each block's nonzero
    coefficients (state: the last one kept) minimizes ``sum of dropped gains + lam * bits`` exactly; blocks are
    grouped by their count of nonzeros, and what does not depend on ``lam`` is computed once.

    ``levels`` and ``gains`` are ``[blocks, 64]`` in zigzag order (the distortion each coefficient's coding
    removes); ``lengths`` the AC symbols' code lengths (:func:`_code_lengths` of the unpruned image: the tables
    the pruned image gets differ a little, which the bisection on real sizes absorbs)."""

    def __init__(self, levels: np.ndarray, gains: np.ndarray, lengths: np.ndarray):
        self.n_blocks = len(levels)
        nonzero = levels[:, 1:] != 0
        count = nonzero.sum(1)
        order = np.argsort(count, kind="stable")
        self.groups = []
        start = int(np.searchsorted(count[order], 0, side="right"))  # blocks without AC: nothing to choose
        for bound in (2, 4, 8, 16, 32, 63):
            stop = int(np.searchsorted(count[order], bound, side="right"))
            if stop > start:
                n = int(count[order[stop - 1]])
                members = order[start:stop]
                for chunk in np.array_split(members, -(-len(members) * (n + 1) ** 2 // TRELLIS_CHUNK)):
                    self.groups.append(self._prepare(chunk, levels[chunk], gains[chunk], n, lengths))
            start = stop

    @staticmethod
    def _prepare(chunk: np.ndarray, levels: np.ndarray, gains: np.ndarray, n: int, lengths: np.ndarray) -> tuple:
        """The blocks ``chunk`` (at most ``n`` nonzero AC coefficients each): for each pair ``i < j`` of their
        nonzero coefficients (0: the block's start), the gains dropped between them and the bits of ``j`` kept
        after ``i``; and the gains dropped after ``i`` and the EOB's bits if it ends the kept ones."""
        g = len(chunk)
        b, p = np.nonzero(levels[:, 1:])
        p = p + 1
        rank = np.arange(len(b)) - np.searchsorted(b, b) + 1  # 1.. within each block (0: the block's start)
        pos = np.full((g, n + 1), 64)
        pos[:, 0] = 0
        pos[b, rank] = p
        gain, size = np.zeros((g, n + 1)), np.zeros((g, n + 1), np.int64)
        gain[b, rank], size[b, rank] = gains[b, p], _size(levels[b, p])
        valid = pos < 64
        cum = np.cumsum(gain, 1)  # cum[:, i]: the gains of coefficients 1..i
        run = np.clip(pos[:, None, :] - pos[:, :, None] - 1, 0, None)  # [block, from i, to j]
        rate = (run // 16) * lengths[ZRL] + lengths[(run % 16) * 16 + size[:, None, :]] + size[:, None, :]
        step = valid[:, :, None] & valid[:, None, :] & np.triu(np.ones((n + 1, n + 1), bool), 1)
        dropped = np.concatenate([np.zeros((g, 1)), cum[:, :-1]], 1)[:, None, :] - cum[:, :, None]
        end_rate = np.where(valid, np.where(pos < 63, lengths[EOB], 0.0), np.inf)
        return (chunk, pos, valid, np.where(step, dropped, np.inf), np.where(step, rate, np.inf),
                cum[:, -1:] - cum, end_rate)

    def drop(self, lam: float) -> np.ndarray:
        """``[blocks, 64]`` (zigzag order): the coefficients to drop at ``lam`` (none at ``lam <= 0``)."""
        out = np.zeros((self.n_blocks, 64), bool)
        if lam <= 0:
            return out
        for chunk, pos, valid, dropped, rate, end_dropped, end_rate in self.groups:
            g, m = pos.shape
            rows = np.arange(g)
            best, parent = np.full((g, m), np.inf), np.zeros((g, m), np.int64)
            best[:, 0] = 0.0
            for j in range(1, m):
                cost = best[:, :j] + dropped[:, :j, j] + lam * rate[:, :j, j]
                parent[:, j] = cost.argmin(1)
                best[:, j] = cost[rows, parent[:, j]]
            cur = (best + end_dropped + lam * end_rate).argmin(1)
            keep = np.zeros((g, m), bool)
            for _ in range(m):
                keep[rows, cur] = True
                cur = parent[rows, cur]
            b, i = np.nonzero(valid & ~keep)
            out[chunk[b], pos[b, i]] = True
        return out


def prune_coefficients(weight: np.ndarray, dtype: DType, opts: EncodeOptions, row_weights: np.ndarray,
                       col_weights: np.ndarray, lam: float) -> np.ndarray:
    """``weight`` (storage form, a JPEG-coded weight, :func:`applies`) with the quantized DCT coefficients of its
    mosaic chosen by ``lam`` removed from its values: in each block, those whose weighted distortion increase is
    not worth ``lam`` times the bits they cost in the JPEG (:class:`_Trellis`; DC terms are kept).

    ``row_weights`` ``[rows]`` and ``col_weights`` ``[cols]`` weigh the element at row ``j``, column ``p`` by
    ``row_weights[j] * col_weights[p] * scale^2`` (``scale``: its tile's), normalized to a mean of 1. Each tile
    keeps its minimum and maximum element, and its other values stay between them, so every tile keeps its offset
    and scale; elements whose pixel does not change keep their value. The whole weight is returned unchanged where
    pruning does not apply (:func:`applies`: not coded as JPEG) or a value is not finite."""
    return _Pruning(weight, dtype, opts, row_weights, col_weights).at(lam)


def _blocks(image: np.ndarray, shape: tuple[int, int], fill) -> np.ndarray:
    """``image`` padded with ``fill`` to ``shape`` (whole blocks), as ``[blocks, 64]`` in raster order."""
    h, w = image.shape
    padded = np.pad(image, ((0, shape[0] - h), (0, shape[1] - w)), constant_values=fill)
    return padded.reshape(shape[0] // 8, 8, shape[1] // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 64)


def _coefficient_weights(pixels: np.ndarray, amps: np.ndarray, cols: int, row_weights: np.ndarray,
                         col_weights: np.ndarray) -> np.ndarray:
    """Each DCT coefficient's weight ``[blocks, 8, 8]``: the weighted error a unit of it causes,
    ``sum_p b_p^2 a_p^2 row_weights[row_p] col_weights[col_p]`` over its block's pixels (``b`` its basis image,
    ``a`` the pixel's tile scale; ``pixels`` ``[blocks, 64]`` each pixel's flat index in the matrix, -1 for
    padding, which weighs nothing)."""
    valid = pixels >= 0
    row, col = np.where(valid, pixels // cols, 0), np.where(valid, pixels % cols, 0)
    w = np.where(valid, amps ** 2 * row_weights[row] * col_weights[col], 0.0)
    return (w @ (np.einsum("ux,vy->uvxy", _D, _D).reshape(64, 64) ** 2).T).reshape(-1, 8, 8)


class _Pruning:
    """One weight's mosaics analysed for :func:`prune_coefficients`: what does not depend on ``lam`` (the DCT of
    every block, its quantization, each coefficient's weighted gain, the trellis), computed once for the many
    ``lam`` of :func:`fit_pruned`."""

    def __init__(self, weight: np.ndarray, dtype: DType, opts: EncodeOptions, row_weights: np.ndarray,
                 col_weights: np.ndarray):
        self.weight, self.dtype = weight, dtype
        self.blobs: list[tuple] = []
        if not applies(opts, weight.shape, dtype):
            return
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        matrix = weight.reshape(rows, cols)
        t = tiling.plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
        mapped = [_map_blob(matrix, dtype, t, 8, k) for k in range(t.n_blobs)]
        if any(m is None for m in mapped):  # a value is not finite
            return
        # each pixel's matrix row and column (-1: padding, never decoded) and its tile's scale, as blocks
        gr, gc = t.grid
        full = replace(t, rows=gr * t.tile_h, cols=gc * t.tile_w) if t.mode == "grid" else t
        index = np.full((full.rows, full.cols), -1, np.int64)
        index[:rows, :cols] = np.arange(rows * cols).reshape(rows, cols)
        index = tiling.extract_tiles(index, full)
        scale = np.concatenate([m[1] for m in mapped]).astype(np.float64)
        table = np.array(quant_table(opts.quality, opts.image_codec(t.mode).table), np.float64).reshape(8, 8)
        self.tiling, self.tiles = t, tiling.extract_tiles(to_float64(matrix, dtype), t)
        analysed = []
        for k, (offset, scale_k, image, lo, hi) in enumerate(mapped):
            idx = t.blob_tiles(k)
            padded, coef, q = _block_coefficients(image, table)
            pixel = _blocks(tiling.blob_mosaic(index[idx.start:idx.stop], t, k, -1), padded.shape, -1)
            amp = _blocks(tiling.blob_mosaic(np.broadcast_to(scale_k[:, None, None], (len(idx), t.tile_h, t.tile_w)),
                                             t, k, 0.0), padded.shape, 0.0)
            analysed.append((k, idx, image, padded, coef, q, pixel, amp, offset, scale_k, lo, hi))
        row_weights, col_weights = (np.asarray(v, np.float64) for v in (row_weights, col_weights))
        weights = [_coefficient_weights(a[6], a[7], cols, row_weights, col_weights) for a in analysed]
        norm = sum(float(w.sum()) for w in weights) / (rows * cols)  # a mean pixel weight of 1 (basis images: norm 1)
        for (k, idx, image, padded, coef, q, _, _, offset, scale_k, lo, hi), coef_w in zip(analysed, weights):
            gain = coef_w / max(norm, 1e-300) * (coef ** 2 - (coef - q * table) ** 2)
            levels = q.reshape(-1, 64)[:, _ZIGZAG]
            trellis = _Trellis(levels, gain.reshape(-1, 64)[:, _ZIGZAG], _code_lengths(_ac_counts(levels),
                                                                                       _AC_SYMBOLS))
            self.blobs.append((k, idx, image.shape, tiling.from_mosaic(image, t, k), padded, coef, trellis,
                               offset.astype(np.float64)[:, None, None], scale_k.astype(np.float64)[:, None, None],
                               lo[:, None, None], hi[:, None, None]))

    def at(self, lam: float) -> np.ndarray:
        """The weight with the coefficients :class:`_Trellis` drops at ``lam`` removed."""
        if not self.blobs:
            return self.weight
        t, tiles = self.tiling, self.tiles.copy()
        for k, idx, (h, w), pixels, padded, coef, trellis, offset, scale, lo, hi in self.blobs:
            drop = np.zeros((len(coef), 64), bool)
            drop[:, _ZIGZAG] = trellis.drop(lam)
            if not drop.any():
                continue
            hp, wp = padded.shape
            removed = (_D.T @ np.where(drop.reshape(-1, 8, 8), coef, 0.0) @ _D).reshape(hp // 8, wp // 8, 8, 8)
            pruned = np.clip(np.rint(padded - removed.transpose(0, 2, 1, 3).reshape(hp, wp)), 0, 255)
            new = tiling.from_mosaic(pruned[:h, :w], t, k)
            values = tiles[idx.start:idx.stop]
            free = (new != pixels) & (values != lo) & (values != hi)
            tiles[idx.start:idx.stop] = np.where(free, np.clip(offset + scale * new, lo, hi), values)
        out = tiling.assemble_tiles(tiles, t)
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
