"""Calibration of mixture-of-experts layers: each expert's own statistics over the tokens routed to it.

transformers 5 holds an MoE layer's experts as one module of 3D parameters
(``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``, or
``up_proj`` without a gate; ``(E, in, out)`` when the module's
``is_transposed`` says so), run by a ``forward(hidden_states, top_k_index,
top_k_weights)``, and the router as a module whose 2D ``weight`` is used
through ``F.linear``. Neither is an ``nn.Linear``, so the ordinary hooks of
:mod:`codec.rd.calibrate` do not see them. They are recognised here by that
structure, not by class name (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...):

- an *experts module*: 3D ``down_proj`` and 3D ``gate_up_proj`` or
  ``up_proj``, whose ``forward`` takes ``top_k_index``;
- its *router*: a module beside it (same parent) whose only parameter is a 2D
  ``weight`` of ``(E, H)``.

Expert ``e`` of parameter ``P`` gets the statistics of the matrix ``P[e]``
under the name ``"P[e]"`` (:func:`expert_key`): ``H`` of the hidden states
of the tokens routed to it (for ``gate_up_proj`` / ``up_proj``) and ``H`` of
``act(gate) * up`` of those tokens, computed with the float weights (for
``down_proj``), over the matrix's in-features, and a sensitivity measured as
for any layer (noise on ``P[e]`` alone). A router's weight is an ordinary
``"linear"`` layer over its input.

A tensor of a file that holds ``P[e]`` (or rows of it) under a name of its
own is named to calibration by :func:`slice_name` (``"P[e, a:b]"``: rows ``a``
to ``b`` of ``P[e]``; ``"P[e, :, a:b].T"``: columns ``a`` to ``b`` of a
transposed ``P[e]``, transposed), which :func:`parse_slice` reads back.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ExpertsInfo", "experts_info", "moe_modules", "expert_key", "slice_name", "parse_slice"]


@dataclass(frozen=True)
class ExpertsInfo:
    """The structure of one experts module."""

    up: str  # "gate_up_proj" or "up_proj"
    count: int  # experts
    transposed: bool  # parameters (E, in, out)
    gated: bool  # up is gate_up_proj, act(gate) * up

    def params(self) -> tuple[str, str]:
        return self.up, "down_proj"


def _takes_routes(module: nn.Module) -> bool:
    try:
        return "top_k_index" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def experts_info(module: nn.Module) -> ExpertsInfo | None:
    """The :class:`ExpertsInfo` of a transformers-style experts module (see the module docstring), or None."""
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    up_name = "gate_up_proj" if "gate_up_proj" in params else "up_proj" if "up_proj" in params else None
    if down is None or up_name is None or down.dim() != 3 or params[up_name].dim() != 3:
        return None
    up = params[up_name]
    if up.shape[0] != down.shape[0] or not _takes_routes(module):
        return None
    transposed = bool(getattr(module, "is_transposed", False))
    gated = bool(getattr(module, "has_gate", up_name == "gate_up_proj"))
    return ExpertsInfo(up_name, int(up.shape[0]), transposed, gated)


def moe_modules(model: nn.Module) -> tuple[dict[str, tuple[nn.Module, ExpertsInfo]], dict[str, nn.Module]]:
    """``(experts, routers)``: the experts modules by module name with their structure, and their routers by weight
    name (``...gate.weight``)."""
    experts: dict[str, tuple[nn.Module, ExpertsInfo]] = {}
    routers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        info = experts_info(module)
        if info is None:
            continue
        experts[name] = (module, info)
        parent_name, _, _ = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name or name else model
        hidden = getattr(module, info.up).shape[1 if info.transposed else 2]
        for child_name, child in parent.named_children():
            if child is module or isinstance(child, (nn.Linear, nn.Embedding)):
                continue
            own = dict(child.named_parameters(recurse=False))
            weight = own.get("weight")
            if set(own) == {"weight"} and weight.dim() == 2 and tuple(weight.shape) == (info.count, hidden) \
                    and not any(True for _ in child.children()):
                prefix = f"{parent_name}." if parent_name else ""
                routers[f"{prefix}{child_name}.weight"] = child
    return experts, routers


def expert_key(param: str, expert: int) -> str:
    """Calibration's name of expert ``expert``'s matrix of the 3D parameter ``param``: ``"param[expert]"``."""
    return f"{param}[{expert}]"


def slice_name(param: str, expert: int, start: int, stop: int, transposed: bool) -> str:
    """The model name of a file tensor holding rows ``start:stop`` of ``param[expert]`` (``transposed``: columns of
    it, transposed)."""
    return f"{param}[{expert}, :, {start}:{stop}].T" if transposed else f"{param}[{expert}, {start}:{stop}]"


_SLICE = re.compile(r"^(?P<param>.+)\[(?P<e>\d+)(?:, (?P<cols>:, )?(?P<a>\d+):(?P<b>\d+))?\](?P<t>\.T)?$")


def parse_slice(name: str) -> tuple[str, int] | None:
    """``(param, expert)`` of a name made by :func:`slice_name` or :func:`expert_key`, else None."""
    m = _SLICE.match(name)
    if m is None or bool(m.group("cols")) != bool(m.group("t")):
        return None
    return m.group("param"), int(m.group("e"))


def _bound(module: nn.Module, args: tuple, kwargs: Mapping):
    """``(hidden_states, top_k_index, top_k_weights)`` of an experts module's call."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    values = list(bound.arguments.values())
    a = bound.arguments
    hidden = a.get("hidden_states", values[0] if values else None)
    index = a.get("top_k_index")
    weights = a.get("top_k_weights", values[2] if len(values) > 2 else None)
    return hidden, index, weights


def _project(module: nn.Module, info: ExpertsInfo, x: torch.Tensor, expert: int, weight: torch.Tensor | None = None
             ) -> torch.Tensor:
    """The up (or gate-up) projection of expert ``expert`` on rows ``x`` (``weight``: in place of its own)."""
    w = getattr(module, info.up)[expert] if weight is None else weight
    y = x @ w if info.transposed else F.linear(x, w)
    bias = getattr(module, f"{info.up}_bias", None)
    return y + bias[expert] if getattr(module, "has_bias", False) and bias is not None else y


def activations(module: nn.Module, info: ExpertsInfo, x: torch.Tensor, expert: int) -> torch.Tensor:
    """``act(gate) * up`` (or ``act(up)``) of expert ``expert`` on rows ``x``: the down projection's inputs."""
    y = _project(module, info, x, expert)
    if info.gated:
        apply = getattr(module, "_apply_gate", None)
        if apply is not None:
            return apply(y)
        gate, up = y.chunk(2, dim=-1)
        return module.act_fn(gate) * up
    return module.act_fn(y)


def linear_out(info: ExpertsInfo, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` through one expert's matrix ``w`` (no bias)."""
    return x @ w if info.transposed else F.linear(x, w)


def routed(index: torch.Tensor, keep: torch.Tensor | None, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token rows, top-k positions)`` routed to ``expert`` (``keep``: a boolean per token, padding False)."""
    hit = index == expert
    if keep is not None:
        hit &= keep[:, None]
    return torch.where(hit)


def token_mask(mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The attention mask as one boolean per flattened token, when its size is the number of tokens."""
    if mask is None or mask.numel() != tokens:
        return None
    return mask.reshape(-1).bool()


def rank_one(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ``(u, v)`` with ``u v^T`` the best rank-one approximation of a non-negative ``matrix``."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return np.abs(u[:, 0]) * s[0], np.abs(vt[0])


class _Moments:
    """One matrix's input statistics, accumulated as :class:`codec.rd.calibrate._Collector` does: a full ``H`` in
    float32 (or its diagonal in float64), ``sum x`` in float64 and the rows seen."""

    def __init__(self, full: bool):
        self.full = full
        self.h: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0]:
            from .calibrate import add_moments

            add_moments(self, x)

    def stats(self):
        from .calibrate import LayerStats

        if self.h is None or self.rows == 0:
            return None
        h, self.h = self.h.div_(self.rows), None
        return LayerStats("linear", h.cpu().numpy(), (self.sum / self.rows).cpu().numpy(), self.rows)


class ModuleCollector:
    """What the hooks on a whole module (:class:`ExpertsCollector`, :class:`codec.rd.recurrent.RecurrentCollector`,
    :class:`codec.rd.attention.AttentionCollector`) share: the stored name of one of the module's parameters, and the
    two attributes calibrate sets on every collector (``mask``: the batch's token mask, where one is used; ``active``:
    whether the hook records)."""

    name: str
    mask: torch.Tensor | None = None
    active: bool = True

    def param_name(self, param: str) -> str:
        return f"{self.name}.{param}" if self.name else param


class ExpertsCollector(ModuleCollector):
    """A forward hook (``with_kwargs``) on an experts module: per expert, the moments of the hidden states of the
    tokens routed to it (its up or gate-up matrix's inputs) and of ``act(gate) * up`` of them (its down matrix's)."""

    def __init__(self, name: str, module: nn.Module, info: ExpertsInfo, full: Mapping[str, bool]):
        self.name, self.module, self.info = name, module, info
        self.moments = {p: [_Moments(full[p]) for _ in range(info.count)] for p in info.params()}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self.active:
            return
        hidden, index, _ = _bound(module, args, kwargs)
        if not isinstance(hidden, torch.Tensor) or not isinstance(index, torch.Tensor):
            return
        hidden = hidden.reshape(-1, hidden.shape[-1])
        keep = token_mask(self.mask, hidden.shape[0])
        up, down = self.info.params()
        for e in range(self.info.count):
            rows, _ = routed(index.reshape(hidden.shape[0], -1), keep, e)
            if rows.numel() == 0:
                continue
            x = hidden[rows]
            self.moments[up][e].add(x)
            self.moments[down][e].add(activations(module, self.info, x, e))

    def stats(self) -> dict:
        """``{expert_key(param name, e): LayerStats}`` of every expert reached; the unreached are left out."""
        out = {}
        for param, per_expert in self.moments.items():
            for e, m in enumerate(per_expert):
                stats = m.stats()
                if stats is not None:
                    out[expert_key(self.param_name(param), e)] = stats
        return out


class FlatCollector:
    """A router's input moments: its ``forward(hidden_states)`` takes the tokens flattened to ``(N, H)``, the
    attention mask's padding left out when its size is ``N``."""

    def __init__(self, module: nn.Module, full: bool):
        self.module = module
        self.moments = _Moments(full)
        self.mask: torch.Tensor | None = None
        self.active = True

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        x = args[0] if args else None
        if not self.active or not isinstance(x, torch.Tensor):
            return
        x = x.reshape(-1, x.shape[-1])
        keep = token_mask(self.mask, x.shape[0])
        self.moments.add(x if keep is None else x[keep])

    def stats(self):
        return self.moments.stats()


@dataclass
class Target:
    """One matrix whose sensitivity is measured by noise put into the parameter itself: a router's weight, or one
    expert's matrix ``param[expert]`` of an experts module."""

    module: nn.Module
    param: str  # attribute of module
    expert: int | None = None
    info: ExpertsInfo | None = None

    def view(self) -> torch.Tensor:
        p = getattr(self.module, self.param).data
        return p if self.expert is None else p[self.expert]

    def caused(self, args: tuple, kwargs: dict, weight: torch.Tensor, dw: torch.Tensor) -> tuple[float, float]:
        """``(||dW x||^2, ||W x||^2)`` over the matrix's inputs in this call (``weight``: its clean value)."""
        from .calibrate import _squared_sum

        if self.expert is None:
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.reshape(-1, x.shape[-1])
            return _squared_sum(F.linear(x, dw)), _squared_sum(F.linear(x, weight))
        hidden, index, _ = _bound(self.module, args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        rows, _ = routed(index.reshape(hidden.shape[0], -1), None, self.expert)
        if rows.numel() == 0:
            return 0.0, 0.0
        x = hidden[rows]
        if self.param == "down_proj":
            x = activations(self.module, self.info, x, self.expert)
        return _squared_sum(linear_out(self.info, x, dw)), _squared_sum(linear_out(self.info, x, weight))


def targets(experts: Mapping[str, tuple[nn.Module, ExpertsInfo]], routers: Mapping[str, nn.Module]
            ) -> dict[str, Target]:
    """Calibration's name -> :class:`Target` for every router weight and expert matrix."""
    out = {name: Target(module, "weight") for name, module in routers.items()}
    for name, (module, info) in experts.items():
        for param in info.params():
            full = f"{name}.{param}" if name else param
            for e in range(info.count):
                out[expert_key(full, e)] = Target(module, param, e, info)
    return out
