"""A differentiable estimate of the bits jwt spends on weights under one setting.

``rate(model_or_tensors, setting)`` follows what the encoder does (codec.tensorcodec.start_encode) in torch:

* tensors the setting does not code lossily (too small, thin, not floating; see
  :func:`codec.tensorcodec.not_applied`) are coded for real, losslessly, and count as a constant;
* the others are cut into the encoder's tiles (:func:`codec.tiling.plan_tiling`), each tile mapped to pixels
  ``(w - min) / step`` with ``step = (max - min) / (2**bits - 1)`` (:mod:`codec.mapping`; 8 bits for JPEG), plus
  the per-tile offset/scale bytes (the blob the encoder writes, compressed where it compresses it);
* ``quant``: the pixels' order-0 entropy (what zstd's Huffman stage gets close to, :mod:`codec.blobcodecs.quant`);
* ``jpeg``: the pixels less 128 in 8x8 blocks, their orthonormal DCT (JPEG's) over the quantization table of the
  quality (:func:`codec.blobcodecs.jpeg.quant_table`), the order-0 entropy of each of the 64 frequencies (the DC
  term as differences between consecutive blocks, as JPEG codes it), plus the header bytes of one real JPEG per
  blob.

The entropy is that of the histogram of the rounded values (the value is the hard histogram's, so it tracks the
real size); its gradient is that of a soft histogram where each value splits between its two neighbouring integers
in proportion to its distance (the rounding relaxed, in the spirit of Balle et al.'s additive noise). For JPEG the
tiles are laid out in their blob images as the encoder lays them out (:func:`codec.tiling.blob_mosaic`). Measured
against real files by ``python -m bench.train_rate`` (bench/results/train_rate.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .. import mapping, tiling
from ..dtypes import get_dtype
from ..tensorcodec import EncodeOptions, encode_tensor, not_applied, parse_spec

__all__ = ["as_setting", "lossy_tensors", "rate", "tensor_rate"]

LN2 = math.log(2.0)
#: Real size over the order-0 entropy of the pixels (``quant``) or coefficients (``jpeg``), fitted on the bench
#: MLP and CNN (bench/results/train_rate.md): zstd adapts its Huffman tables block by block and codes a little
#: below one histogram's entropy; JPEG's run/size Huffman symbols and extra bits cost a little more.
BODY_FACTOR = {"quant": 0.93, "jpeg": 1.06}


def as_setting(setting: EncodeOptions | str | Mapping | None) -> EncodeOptions:
    """The :class:`EncodeOptions` of ``setting``: None (jwt's default, 8-bit quant), EncodeOptions, a per-tensor
    setting string (``"b4"``, ``"q50"``, ``"jpeg,q20,table=flat"``) or a mapping of EncodeOptions fields."""
    if setting is None:
        return EncodeOptions()
    if isinstance(setting, EncodeOptions):
        opts = setting
    elif isinstance(setting, str):
        opts = parse_spec(setting, EncodeOptions())
    elif isinstance(setting, Mapping):
        unknown = sorted(set(setting) - set(EncodeOptions.__dataclass_fields__))
        if unknown:
            raise ValueError(f"setting: unknown option(s) {', '.join(unknown)}")
        opts = EncodeOptions(**setting)
    else:
        raise TypeError(f"setting must be an EncodeOptions, a setting string or a mapping, "
                        f"not {type(setting).__name__}")
    if opts.codec not in ("quant", "jpeg", "lossless"):
        raise ValueError(f"setting: codec {opts.codec!r} has no rate model (quant, jpeg and lossless do)")
    return opts


def lossy_tensors(model_or_tensors) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from an nn.Module (its named parameters and buffers, as its state_dict names them),
    a mapping of names to tensors, or an iterable of tensors (named by position)."""
    if isinstance(model_or_tensors, torch.nn.Module):
        named = dict(model_or_tensors.named_buffers())
        named.update(model_or_tensors.named_parameters())
        return named
    if isinstance(model_or_tensors, torch.Tensor):
        return {"0": model_or_tensors}
    if isinstance(model_or_tensors, Mapping):
        items = dict(model_or_tensors)
    elif isinstance(model_or_tensors, Iterable) and not isinstance(model_or_tensors, (str, bytes)):
        items = {str(i): t for i, t in enumerate(model_or_tensors)}
    else:
        raise TypeError(f"rate: expected an nn.Module, a tensor, a mapping or a list of tensors, "
                        f"not {type(model_or_tensors).__name__}")
    for name, t in items.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rate: {name!r} is a {type(t).__name__}, not a tensor")
    return items


def rate(model_or_tensors, setting: EncodeOptions | str | Mapping | None = None) -> torch.Tensor:
    """Estimated bits of the stored blobs of ``model_or_tensors`` under ``setting`` (see :func:`as_setting`), as a
    float32 torch scalar with gradients to the floating tensors that are coded lossily.

    One line in a training loop: ``loss = task_loss + lam * codec.train.rate(model) / n_weights``.
    """
    opts = as_setting(setting)
    tensors = lossy_tensors(model_or_tensors)
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors.values():
        total = total + tensor_rate(t, opts)
    return total


def tensor_rate(t: torch.Tensor, opts: EncodeOptions) -> torch.Tensor:
    """Estimated bits of one tensor's blobs under ``opts`` (a constant where it is stored losslessly)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor_rate: t must be a torch.Tensor, not {type(t).__name__}")
    if not isinstance(opts, EncodeOptions):
        raise TypeError(f"tensor_rate: opts must be an EncodeOptions (codec.train.as_setting('jpeg,q8') makes one), "
                        f"not {type(opts).__name__}")
    dtype = get_dtype(_dtype_name(t))
    shape = tuple(t.shape)
    lossless = opts.codec == "lossless" or (not_applied(shape, dtype, opts) or "").startswith("stored losslessly")
    if lossless:
        return torch.tensor(8.0 * _lossless_bytes(t, opts), dtype=torch.float32)
    if opts.codec == "jpeg" and (not_applied(shape, dtype, opts) or "").startswith("coded as 8-bit quant"):
        opts = opts.with_(codec="quant", bits=8)
    rows, cols = shape[0], math.prod(shape[1:])
    t_plan = tiling.plan_tiling(rows, cols, opts.tile, opts.row_shape, opts.params)
    tiles = _tiles(t.reshape(rows, cols).float(), t_plan)  # [n, th, tw]
    bits = opts.bits if opts.codec == "quant" else 8
    flat = tiles.reshape(len(tiles), -1)
    lo, hi = flat.amin(1), flat.amax(1)
    if not bool(torch.isfinite(lo.detach()).all() and torch.isfinite(hi.detach()).all()):  # stored losslessly
        return torch.tensor(8.0 * _lossless_bytes(t, opts), dtype=torch.float32)
    # The gradient holds each tile's range fixed: it moves values within their tile's steps, and does not reward
    # widening a range so that the rest rounds to one level (cheaper too: no gradient through min/max).
    lo, hi = lo.detach(), hi.detach()
    step = ((hi - lo) / float((1 << bits) - 1)).clamp_min(1e-30)
    pixels = (tiles - lo[:, None, None]) / step[:, None, None]
    if opts.codec == "quant":
        body = entropy_bits(pixels.reshape(-1), 0, (1 << bits) - 1)
        header = 8.0 * _zstd_frame_bytes() * t_plan.n_blobs
    else:
        body = _jpeg_bits(pixels, opts, t_plan)
        header = 8.0 * _jpeg_header_bytes(opts.quality or 90, _table(opts, t_plan.mode)) * t_plan.n_blobs
    images = BODY_FACTOR[opts.codec] * body + header
    return images + _param_bits(lo, hi, bits, t_plan.params, float(images.detach()) / 8, opts.compress_params)


def _param_bits(lo: torch.Tensor, hi: torch.Tensor, bits: int, kind: str, image_bytes: float, compress: bool) -> float:
    """Bits of the tile parameter blob the encoder writes for tiles ranging ``lo..hi`` (a constant): its real
    size, compressed where the writer compresses it (:func:`codec.mapping.stored_params`, format 1.4; the
    Fashion-MNIST MLP's 512 rows, 2,048 -> 1,228 bytes), the images' estimated bytes standing for the real ones."""
    offset, scale = mapping.params_from_range(lo.double().numpy(), hi.double().numpy(), bits, kind)
    return 8.0 * len(mapping.stored_params(offset, scale, kind, round(image_bytes), compress))


def entropy_bits(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Bits of an order-0 code of ``round(values)`` (clipped to ``low..high``) in each row of ``values`` ([k, n] or
    [n]): the hard histogram's entropy as the value, a soft (two-neighbour) histogram's gradient."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"entropy_bits: values must be a torch.Tensor, not {type(values).__name__}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise ValueError(f"entropy_bits: low and high must be integers with low <= high, not {low!r}, {high!r}")
    return _Entropy.apply(values, low, high)


class _Entropy(torch.autograd.Function):
    """Order-0 entropy bits of rounded values; backward: the derivative of the soft histogram's code length.

    A value ``v`` between integers ``j`` and ``j + 1`` counts ``j + 1 - v`` toward bin ``j`` and ``v - j`` toward
    ``j + 1``; the code length ``-sum c_k log2 p_k`` then changes by ``log2(p_j / p_{j+1})`` per unit of ``v``
    (empty bins count half a value, so moving toward them costs).
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, low: int, high: int) -> torch.Tensor:
        v = values.detach().reshape(-1, values.shape[-1]) if values.dim() > 1 else values.detach().reshape(1, -1)
        k, n = v.shape
        width = high - low + 1
        v = v.clamp(low, high) - low
        base = torch.arange(k).unsqueeze(1) * width
        hard = torch.zeros(k * width, dtype=torch.float64)
        hard.index_add_(0, (base + torch.round(v).long()).reshape(-1), torch.ones(k * n, dtype=torch.float64))
        hard = hard.reshape(k, width)
        p = hard / n
        bits = -(hard * torch.log2(torch.where(hard > 0, p, torch.ones_like(p)))).sum()
        ctx.save_for_backward(v, hard)
        ctx.shape, ctx.width = values.shape, width
        return bits.to(values.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, hard = ctx.saved_tensors
        width = ctx.width
        cost = -torch.log2(hard.clamp_min(0.5) / v.shape[1]).float()  # code length of one more value in each bin
        cost = torch.cat([cost, cost[:, -1:]], dim=1)  # (a value at the top edge has no upper neighbour)
        below = torch.floor(v).long().clamp(max=max(width - 2, 0))
        slope = torch.gather(cost, 1, below + 1) - torch.gather(cost, 1, below)
        inside = (v > 0) & (v < width - 1)  # clipped values do not move the histogram
        return (grad * slope * inside).reshape(ctx.shape), None, None


def _jpeg_bits(pixels: torch.Tensor, opts: EncodeOptions, t: tiling.Tiling) -> torch.Tensor:
    """Entropy bits of the quantized 8x8-block DCT coefficients of the blob images that tiles of 8-bit pixels
    ``[n, th, tw]`` make (:func:`codec.tiling.blob_mosaic`; empty cells and the edges as the encoders fill them)."""
    blocks = []
    for k in range(t.n_blobs):
        idx = t.blob_tiles(k)
        part = pixels[idx.start : idx.stop] - 128.0
        height, width = t.blob_shape(k)
        cell_rows = height // t.tile_h
        spare = cell_rows * t.columns - len(part)
        if spare:  # empty cells hold the middle pixel value: 0 after the level shift
            part = torch.cat([part, part.new_zeros((spare, t.tile_h, t.tile_w))])
        image = part.reshape(cell_rows, t.columns, t.tile_h, t.tile_w).permute(0, 2, 1, 3).reshape(height, width)
        ph, pw = -(-height // 8) * 8, -(-width // 8) * 8
        if (ph, pw) != (height, width):  # libjpeg pads the last blocks by replicating the edge
            image = torch.nn.functional.pad(image[None, None], (0, pw - width, 0, ph - height), mode="replicate")[0, 0]
        blocks.append(image.reshape(ph // 8, 8, pw // 8, 8).permute(0, 2, 1, 3).reshape(-1, 8, 8))
    blocks = torch.cat(blocks)
    d = _dct_matrix()
    coeffs = d @ blocks @ d.T
    q = torch.tensor(_qtable(opts.quality or 90, _table(opts, t.mode), opts.scale), dtype=torch.float32).reshape(8, 8)
    scaled = (coeffs / q).reshape(-1, 64)
    dc = scaled[:, 0]
    dc = torch.cat([dc[:1], dc[1:] - dc[:-1]])  # coded as differences from the previous block
    ac = scaled[:, 1:].T.contiguous()  # [63, blocks]
    limit = int(torch.ceil(ac.detach().abs().max()).item()) + 1
    dlimit = int(torch.ceil(dc.detach().abs().max()).item()) + 1
    return entropy_bits(ac, -limit, limit) + entropy_bits(dc, -dlimit, dlimit)


def _table(opts: EncodeOptions, mode: str) -> str:
    return opts.table if opts.table != "auto" else ("jpeg" if mode == "rows" else "flat")


@functools.cache
def _qtable(quality: int, table: str, scale: int | None = None) -> tuple[int, ...]:
    """The table JPEG codes with (``scale``: :attr:`EncodeOptions.scale`, a step between two qualities)."""
    from ..blobcodecs.jpeg import quant_table, scaled_table

    return tuple(quant_table(quality, table) if scale is None else scaled_table(table, scale))


@functools.cache
def _dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II (JPEG's FDCT is ``D @ block @ D.T``)."""
    k = np.arange(8)
    d = np.sqrt(2 / 8) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 16)
    d[0] /= np.sqrt(2)
    return torch.tensor(d, dtype=torch.float32)


@functools.cache
def _jpeg_header_bytes(quality: int, table: str) -> int:
    """Bytes of a real JPEG of a constant 64x64 image at this setting: its headers and tables (and a few bytes
    of body)."""
    from ..blobcodecs import Jpeg

    return len(Jpeg(quality=quality, table=table).encode(np.full((64, 64), 128, np.uint8)))


@functools.cache
def _zstd_frame_bytes() -> int:
    from ..blobcodecs import Zstd

    return len(Zstd(level=9, shuffle=True).encode(np.zeros(1, np.uint8)))


def _lossless_bytes(t: torch.Tensor, opts: EncodeOptions) -> int:
    from ..api import to_numpy

    array, name = to_numpy(t.detach())
    encoded = encode_tensor(array, get_dtype(name), opts.with_(codec="lossless"))
    return sum(len(b) for b in encoded.blobs)


def _dtype_name(t: torch.Tensor) -> str:
    from ..api import TORCH_DTYPES

    name = TORCH_DTYPES.get(t.dtype)
    if name is None:
        raise TypeError(f"rate: unsupported dtype {t.dtype}")
    return name


def _tiles(matrix: torch.Tensor, t: tiling.Tiling) -> torch.Tensor:
    """:func:`codec.tiling.extract_tiles` in torch (edge tiles padded by replication)."""
    if t.mode == "rows":
        return matrix.reshape(t.rows, t.tile_h, t.tile_w)
    gr, gc = t.grid
    ph, pw = gr * t.tile_h - t.rows, gc * t.tile_w - t.cols
    if ph or pw:
        matrix = torch.nn.functional.pad(matrix[None, None], (0, pw, 0, ph), mode="replicate")[0, 0]
    return matrix.reshape(gr, t.tile_h, gc, t.tile_w).permute(0, 2, 1, 3).reshape(-1, t.tile_h, t.tile_w)
