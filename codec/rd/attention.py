"""Calibration of ``nn.MultiheadAttention``: its projections' own input moments and sensitivities.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` with its
parameters, so no Linear hook sees them: ``in_proj_weight`` (``3E x E``, the
query, key and value projections stacked) belongs to no Linear, and
``out_proj`` is a Linear the module never calls. Here a forward hook on the
module itself reads the call's ``query``, ``key`` and ``value`` (the inputs of
the three row blocks of ``in_proj_weight``, or of ``q_proj_weight`` /
``k_proj_weight`` / ``v_proj_weight`` when the key or value width differs) and
the attention output before ``out_proj`` (``out_proj.weight``'s input), which
torch computes in a copy of the module whose parameters are the module's own
(shared) but whose ``out_proj`` is the identity.

``in_proj_weight`` is one tensor of the file with three inputs: it gets one
``H``, the second moment of the query, key and value rows together (in
self-attention they are the same rows: ``H`` is exact), and per-row weights
``R`` that give each block its own measured sensitivity ``s_b`` per unit of its
own relative output error: ``R_b = s_b / tr(W_b H W_b^T)``, scale ``sum s_b``
(:class:`codec.rd.allocate.Weighting`), so that the weighting is
``sum_b s_b tr(dW_b H dW_b^T) / tr(W_b H W_b^T)``, a Linear's per block.

The sensitivities are measured (noise put into each projection, and each row
block) only with :data:`MEASURED_SENSITIVITY`; by default the projections keep
the data-free weighting's scale over their measured ``H`` (measured: the
small-noise sensitivities cost accuracy, see there).

Handled: ``batch_first`` or not, unbatched (2-D) inputs, self- and
cross-attention, ``key_padding_mask`` (padded keys and values are left out of
the key and value moments), any other argument the call gives (masks,
``is_causal``) passed on to the copy as given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .experts import ModuleCollector, _Moments

__all__ = ["ATTENTION_PROJECTIONS", "MEASURED_SENSITIVITY", "AttentionCollector", "AttentionTarget",
           "attention_modules", "attention_out_proj", "attention_stats", "attention_targets"]

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
         "is_causal")
_BLOCKS = ("q", "k", "v")
#: Whether the projections are weighed by their measured sensitivities (noise in each projection, or each row block
#: of ``in_proj_weight``, for one more forward pass per batch) or, False, by the data-free weighting's scale (1) over
#: their measured ``H``. False: measured (bench/JOURNAL.md, "mha (twenty-seventh pass)"), the small-noise
#: sensitivities (query and key blocks 10-25x under the value block's) moved bits from the attention to the other
#: layers and every calibrated, repaired save lost: qa's MHA model at -b 1 76.06 -> 73.01 %, logits relative MSE
#: 0.0290 -> 0.0778; a 2-layer nn.TransformerEncoder at -b 2.5 / 3 77.71 -> 77.05 % / 78.74 -> 78.38 %; with the
#: scale 1 the files are within noise of the unmeasured ones (76.06 %, 0.0290 at -b 1).
MEASURED_SENSITIVITY = False
#: The in-projection parameters of an ``nn.MultiheadAttention`` this measures (with its ``out_proj.weight``).
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def attention_modules(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """Module name -> ``nn.MultiheadAttention`` (or a subclass) whose projection weights are in the state_dict."""
    keys = set(model.state_dict().keys())
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            first = "in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight"
            if f"{prefix}{first}" in keys:
                out[name] = module
    return out


def attention_out_proj(model: nn.Module) -> set[str]:
    """The ``out_proj.weight`` names of the measured attention modules (:func:`attention_modules`): calibration's
    Linear hooks would never see them run, this module measures them."""
    return {f"{name}.out_proj.weight" if name else "out_proj.weight" for name in attention_modules(model)}


def _in_params(module: nn.MultiheadAttention) -> list[str]:
    return ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def _bound(args: tuple, kwargs: Mapping) -> dict:
    return {**dict(zip(_ARGS, args)), **kwargs}


def _inputs(module: nn.MultiheadAttention, args: tuple, kwargs: Mapping) -> dict[str, torch.Tensor] | None:
    """The rows each projection multiplies in the call: ``{"q": (L', E), "k": (S', kdim), "v": (S', vdim)}`` (padded
    keys and values of a boolean ``key_padding_mask`` left out); None for a call this cannot read."""
    given = _bound(args, kwargs)
    q, k, v = (given.get(n) for n in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) and t.dim() in (2, 3) for t in (q, k, v)):
        return None
    pad = given.get("key_padding_mask")
    keep = None
    if isinstance(pad, torch.Tensor) and pad.dtype == torch.bool and k.dim() == 3:
        keep = ~pad  # (N, S)
        if not module.batch_first:
            keep = keep.T  # (S, N), as the key is laid out
        if tuple(keep.shape) != tuple(k.shape[:2]):
            keep = None

    def rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return t[mask] if mask is not None else t.reshape(-1, t.shape[-1])

    return {"q": rows(q, None), "k": rows(k, keep), "v": rows(v, keep)}


def _copy(module: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` computing ``module``'s attention output before ``out_proj``: ``module``'s own
    parameters (shared), ``out_proj`` the identity with a zero bias."""
    e = module.embed_dim
    ref = module.out_proj.weight
    copy = nn.MultiheadAttention(e, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                                 add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn,
                                 kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first, device="meta",
                                 dtype=ref.dtype)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                 "bias_v"):
        setattr(copy, name, getattr(module, name))
    copy.out_proj = nn.Linear(e, e, bias=module.out_proj.bias is not None, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        copy.out_proj.weight.copy_(torch.eye(e, device=ref.device, dtype=ref.dtype))
        if copy.out_proj.bias is not None:
            copy.out_proj.bias.zero_()
    copy.eval()
    return copy


def _attended(copy: nn.MultiheadAttention, args: tuple, kwargs: Mapping) -> torch.Tensor:
    """The rows ``out_proj`` multiplies in the call: the attention output before it, ``(L', E)``."""
    given = _bound(args, kwargs)
    given["need_weights"] = False
    out, _ = copy(**given)
    return out.reshape(-1, out.shape[-1])


class AttentionCollector(ModuleCollector):
    """A forward hook (``with_kwargs``) on an ``nn.MultiheadAttention``: the input moments of its in-projection (one
    ``H`` over the query, key and value rows of ``in_proj_weight``, or each of ``q/k/v_proj_weight``'s own) and of
    ``out_proj.weight``, accumulated with :func:`codec.rd.calibrate.add_moments`."""

    def __init__(self, name: str, module: nn.MultiheadAttention, full_h: Callable[[int], bool]):
        """``full_h(columns)``: whether a matrix of that many in-features keeps a full H (else its diagonal)."""
        self.name, self.module = name, module
        self.copy = _copy(module)
        self.moments = {p: _Moments(full_h(int(getattr(module, p).shape[1]))) for p in _in_params(module)}
        self.moments["out_proj.weight"] = _Moments(full_h(module.embed_dim))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self.active:
            return
        rows = _inputs(self.module, args, kwargs)
        if rows is None:
            return
        if self.module._qkv_same_embed_dim:
            for b in _BLOCKS:
                self.moments["in_proj_weight"].add(rows[b])
        else:
            for b in _BLOCKS:
                self.moments[f"{b}_proj_weight"].add(rows[b])
        self.moments["out_proj.weight"].add(_attended(self.copy, args, kwargs))

    def stats(self) -> dict:
        """``{weight name: LayerStats}`` of every matrix the calibration inputs reached (sensitivities not set)."""
        out = {}
        for attr, moments in self.moments.items():
            stats = moments.stats()
            if stats is not None:
                out[self.param_name(attr)] = stats
        return out


@dataclass
class AttentionTarget:
    """One projection (or one row block ``q``/``k``/``v`` of ``in_proj_weight``) whose sensitivity is measured by
    noise put into the parameter itself (the interface of :class:`codec.rd.experts.Target`)."""

    module: nn.MultiheadAttention
    param: str  # "in_proj_weight", "q_proj_weight", ..., "out_proj.weight"
    block: int | None  # in_proj_weight's row block (0 query, 1 key, 2 value), else None
    copy: nn.MultiheadAttention

    def view(self) -> torch.Tensor:
        p = self.module.get_parameter(self.param).data
        if self.block is None:
            return p
        e = self.module.embed_dim
        return p[self.block * e:(self.block + 1) * e]

    def caused(self, args: tuple, kwargs: dict, weight: torch.Tensor, dw: torch.Tensor) -> tuple[float, float]:
        """``(||dW x||^2, ||W x||^2)`` over the rows the matrix multiplied in this call."""
        from .calibrate import _squared_sum

        if self.param == "out_proj.weight":
            x = _attended(self.copy, args, kwargs)
        else:
            rows = _inputs(self.module, args, kwargs)
            if rows is None:
                return 0.0, 0.0
            x = rows[_BLOCKS[self.block] if self.block is not None else self.param[0]]
        return _squared_sum(F.linear(x, dw)), _squared_sum(F.linear(x, weight))


def _target_key(name: str, block: int | None) -> str:
    return name if block is None else f"{name}[{_BLOCKS[block]}]"


def attention_targets(collectors: Mapping[str, AttentionCollector]) -> dict[str, AttentionTarget]:
    """Sensitivity key -> :class:`AttentionTarget` for every projection of the collectors' modules; the row blocks
    of ``in_proj_weight`` are keyed ``<name>.in_proj_weight[q]`` (``[k]``, ``[v]``): :func:`attention_stats` gives
    the weight its statistics from the three."""
    out = {}
    for c in collectors.values():
        for attr in [*_in_params(c.module), "out_proj.weight"]:
            blocks = (0, 1, 2) if attr == "in_proj_weight" else (None,)
            for b in blocks:
                out[_target_key(c.param_name(attr), b)] = AttentionTarget(c.module, attr, b, c.copy)
    return out


def attention_stats(c: AttentionCollector, sensitivity: Callable[[str], float]) -> dict:
    """``{weight name: LayerStats}`` of ``c``'s matrices with their sensitivities (``sensitivity(key)`` of each key
    of :func:`attention_targets`): ``in_proj_weight`` gets per-row weights ``s_b / tr(W_b H W_b^T)`` over its three
    blocks and the scale ``sum s_b`` (the module docstring). With :data:`MEASURED_SENSITIVITY` False, the scale 1
    and no row weights."""
    out = c.stats()
    if not MEASURED_SENSITIVITY:  # the data-free weighting's scale, over the measured H
        return out
    for name, stats in out.items():
        if not name.endswith("in_proj_weight"):
            stats.sensitivity = sensitivity(name)
            continue
        w = c.module.in_proj_weight.detach().double().cpu().numpy()
        e = c.module.embed_dim
        h = stats.h.astype(np.float64)
        s = [sensitivity(_target_key(name, b)) for b in range(3)]
        rows = np.empty(3 * e)
        for b in range(3):
            block = w[b * e:(b + 1) * e]
            energy = float(np.einsum("ij,ij->", block @ h, block) if h.ndim == 2 else ((block * block) @ h).sum())
            rows[b * e:(b + 1) * e] = s[b] / energy if energy > 0 else 0.0
        stats.rows = rows if rows.any() else None  # (a zero matrix: no block to weigh apart)
        stats.sensitivity = float(sum(s)) if rows.any() else float(np.mean(s))
    return out
