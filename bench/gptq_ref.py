"""A reference GPTQ (Frantar et al., 2022) for the bench: the data-aware peer jwt's calibrated path is compared to.

This is NOT gptqmodel or llmcompressor. Both were tried (``pip install --dry-run`` on 2026-12-02): gptqmodel
7.7.0 pulls a CUDA torch 2.14.1 and ~3 GB of nvidia wheels, llmcompressor 0.14.0.1 downgrades transformers to
5.17.0; neither installs next to torch==2.13.0+cpu. So this file re-implements the published algorithm, following
the authors' ``fasterquant`` (https://github.com/IST-DASLab/gptq, gptq.py):

* layers are quantized one by one in forward order; each layer's Hessian ``H = 2/n sum x x^T`` is collected on
  the calibration inputs with the layers before it already quantized (sequential, as in the paper);
* columns are quantized left to right in blocks of 128 with lazy batch updates, each column's rounding error fed
  into the not-yet-quantized columns through the Cholesky factor of ``H^-1`` (1 % dampening);
* asymmetric min-max quantization to ``bits`` bits, one fp16 scale and one ``bits``-bit zero point per row and
  per group of ``group_size`` input columns (``group_size=None``: one per row); no act-order.

``Linear`` and ``Conv2d`` weights get GPTQ (a convolution as its im2col matrix [out, in*kh*kw]); the other large
2-D tensors (embeddings) get plain round-to-nearest at the same bits and groups, as GPTQ leaves them; tensors
below :data:`bench.baselines.MIN_LOSSY_ELEMENTS` or with ``ndim < 2`` stay lossless like every bench baseline.
The calibration inputs are the same as jwt's (the bench passes one iterable to both).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bench.baselines import MIN_LOSSY_ELEMENTS, Result, _header_nbytes, _lossless

BLOCK = 128
PERCDAMP = 0.01


def run_model(model: nn.Module, batch) -> object:
    """Run ``model`` on one batch: ``model(**batch)`` for a mapping (tokenizer output), else ``model(batch)``."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


class GroupQuantizer:
    """Asymmetric min-max quantization of the rows of a column slice, the range always including 0 (as GPTQ)."""

    def __init__(self, bits: int) -> None:
        """``bits``: 2..8."""
        self.maxq = 2**bits - 1

    def fit(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row (fp16-rounded scale, integer zero) for the columns ``x`` [rows, cols]."""
        lo = torch.clamp(x.min(dim=1).values, max=0)
        hi = torch.clamp(x.max(dim=1).values, min=0)
        scale = ((hi - lo) / self.maxq).half().float()
        scale[scale == 0] = 1.0
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return scale, zero

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Round ``x`` [rows] or [rows, cols] with per-row ``scale``/``zero`` and return the dequantized values."""
        if x.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        q = torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)
        return scale * (q - zero)


def gptq_matrix(weight: Tensor, hessian: Tensor, bits: int, group_size: int | None) -> Tensor:
    """GPTQ one weight matrix [rows, cols] given ``H`` [cols, cols]; returns the dequantized matrix."""
    W = weight.clone().double()
    H = hessian.clone().double()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += PERCDAMP * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    quant = GroupQuantizer(bits)
    block = BLOCK if group_size is None or BLOCK % group_size == 0 else group_size
    scale, zero = quant.fit(W) if group_size is None else (None, None)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if group_size is not None and (i1 + i) % group_size == 0:
                scale, zero = quant.fit(W1[:, i:i + group_size])  # groups never straddle a block
            q = quant.quantize(W1[:, i], scale, zero)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.to(weight.dtype)


def rtn_matrix(weight: Tensor, bits: int, group_size: int | None) -> Tensor:
    """Round-to-nearest with GPTQ's quantizer (per row, per group of columns): for tensors GPTQ does not cover."""
    quant = GroupQuantizer(bits)
    step = weight.shape[1] if group_size is None else group_size
    out = torch.empty_like(weight)
    for c in range(0, weight.shape[1], step):
        cols = weight[:, c:c + step]
        out[:, c:c + step] = quant.quantize(cols, *quant.fit(cols))
    return out


def coded_nbytes(shape: tuple[int, ...], bits: int, group_size: int | None) -> int:
    """Bytes a GPTQ checkpoint stores for one tensor: packed codes, fp16 scales, packed zero points."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    groups = rows * (1 if group_size is None else math.ceil(cols / group_size))
    return math.ceil(rows * cols * bits / 8) + 2 * groups + math.ceil(groups * bits / 8)


def _layer_input(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows of the matrix its weight multiplies: [n, in] (im2col columns for a Conv2d)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # [batch, in*kh*kw, positions]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _hessian(model: nn.Module, module: nn.Module, batches: Iterable) -> Tensor:
    """``2/n sum x x^T`` over every input row ``module`` sees while ``model`` runs on ``batches``."""
    cols = module.weight[0].numel()
    state = {"H": torch.zeros(cols, cols, dtype=torch.float64), "n": 0}

    def hook(_module, inputs, _output):
        x = _layer_input(module, inputs[0].detach()).double()
        state["H"] += x.T @ x
        state["n"] += x.shape[0]

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                run_model(model, batch)
    finally:
        handle.remove()
    return 2 * state["H"] / max(state["n"], 1)


def gptq(model: nn.Module, batches: Iterable, bits: int, group_size: int | None = 128,
         keys: Collection[str] | None = None, progress: Callable[[str], None] | None = None) -> Result:
    """GPTQ every Linear / Conv2d of a copy of ``model`` in forward order; RTN the other large 2-D tensors.

    ``batches`` is re-iterated once per layer (a list, not a generator). Returns the bytes a GPTQ checkpoint of
    the state_dict (only ``keys`` of it when given) would hold and the decoded tensors as float32 numpy arrays
    (``bench.baselines.Result``).
    """
    batches = list(batches)
    model = copy.deepcopy(model).eval()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o, name=name: order.append(name) if name not in order else None)
             for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        run_model(model, batches[0])  # forward order of the layers that run
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    done: set[str] = set()
    for name in order:
        module = modules[name]
        if module.weight.numel() < MIN_LOSSY_ELEMENTS:
            continue
        H = _hessian(model, module, batches)
        W = module.weight.detach().reshape(module.weight.shape[0], -1)
        with torch.no_grad():
            module.weight.copy_(gptq_matrix(W, H, bits, group_size).reshape(module.weight.shape))
        done.add(f"{name}.weight")
        if progress:
            progress(f"gptq {bits}b g{group_size}: {name}")
    total, out = 0, {}
    for key, value in model.state_dict().items():
        if keys is not None and key not in keys:
            continue
        x = original[key].float().numpy()
        if x.ndim >= 2 and x.size >= MIN_LOSSY_ELEMENTS:
            rec = value if key in done else rtn_matrix(original[key].reshape(x.shape[0], -1).float(), bits, group_size)
            n, recon = coded_nbytes(x.shape, bits, group_size), rec.detach().float().reshape(x.shape).numpy()
        else:
            n, recon = _lossless(np.ascontiguousarray(x, dtype=np.float32))
        out[key] = np.array(recon, dtype=np.float32)
        total += n + _header_nbytes(key, x.shape)
    return Result(total, out)
