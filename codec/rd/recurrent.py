"""Calibration of recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``): each matrix's own input moments.

A recurrent layer is not an ``nn.Linear``, but each of its matrices is used as
one: at every time step ``t`` of layer ``k`` (and direction),
``weight_ih_l{k}`` multiplies the layer's input ``x_t`` and ``weight_hh_l{k}``
the hidden state the step reads, ``h_{t-1}`` (``h0`` at the first step; the
reverse direction reads ``h_{t+1}``). All the gates' rows of one matrix see the
same input, so each matrix gets one ``H = E[x x^T]`` over its columns, as a
Linear does, and the rate search, the calibrated allocation and the sensitivity
pass treat it as one (``kind="linear"``).

The inputs of each layer are not visible from outside the module (a
multi-layer ``nn.GRU`` returns only the last layer's outputs), so they are
obtained here by running single-layer modules of the same kind whose
parameters *are* the module's layer ``k`` parameters (shared, not copied),
layer by layer: layer 0 reads the module's input, layer ``k > 0`` the
sequence layer ``k - 1`` gave (both directions concatenated when
bidirectional). torch computes the recurrence; nothing of it is written here.
The hidden states a step reads are that layer's output sequence shifted by one
step, plus ``h0`` (zeros when the caller gives none).

Handled: ``batch_first`` or not, unbatched (2-D) inputs, bidirectional, ``h0``
(and an LSTM's ``c0``) given or not, a ``PackedSequence`` input (the padding
positions are left out of the moments: each sequence counts its own length).
Not measured: an LSTM's ``weight_hr_l{k}`` (``proj_size > 0``), whose input is
the cell's output before projection, which the module never returns; it keeps
the data-free weighting and :func:`codec.rd.calibrate.uncalibrated` names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .experts import ModuleCollector, _Moments

__all__ = ["recurrent_modules", "RecurrentCollector", "RecurrentTarget", "recurrent_targets",
           "recurrent_matrices", "recurrent_matrix", "recurrent_unmeasured"]

_KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}


def recurrent_modules(model: nn.Module) -> dict[str, nn.RNNBase]:
    """Module name -> ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (or a subclass) whose weights are in the state_dict."""
    keys = set(model.state_dict().keys())
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase) and module.mode in _KINDS:
            prefix = f"{name}." if name else ""
            if f"{prefix}weight_ih_l0" in keys:
                out[name] = module
    return out


def _width(module: nn.RNNBase) -> int:
    """The width of the hidden state a layer returns (and its next step reads): the projection's, if any."""
    return getattr(module, "proj_size", 0) or module.hidden_size


def _suffixes(module: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if module.bidirectional else ("",)


def recurrent_matrices(module: nn.Module | None) -> list[str]:
    """The matrices of a recurrent module calibration measures, by attribute: ``weight_ih_l{k}[_reverse]``,
    ``weight_hh_l{k}[_reverse]``; [] for any other module (or None)."""
    if not isinstance(module, nn.RNNBase) or module.mode not in _KINDS:
        return []
    return [f"weight_{kind}_l{k}{sfx}" for k in range(module.num_layers) for sfx in _suffixes(module)
            for kind in ("ih", "hh")]


def recurrent_matrix(model: nn.Module, name: str) -> bool:
    """Whether the weight ``name`` of ``model`` is a matrix of a recurrent module calibration measures."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return attr in recurrent_matrices(module)


def recurrent_unmeasured(module: nn.Module | None) -> list[str]:
    """The matrices of a recurrent module calibration does not measure (an LSTM's projections
    ``weight_hr_l{k}[_reverse]``); [] for any other module."""
    if not isinstance(module, nn.RNNBase) or not getattr(module, "proj_size", 0):
        return []
    return [f"weight_hr_l{k}{sfx}" for k in range(module.num_layers) for sfx in _suffixes(module)]


def _layer_copies(module: nn.RNNBase) -> list[nn.RNNBase]:
    """Single-layer modules of ``module``'s kind, batch first, whose parameters are ``module``'s layer ``k``
    parameters themselves (made on the meta device, then given the module's own tensors)."""
    cls = _KINDS[module.mode]
    dirs = len(_suffixes(module))
    width = _width(module)
    copies = []
    for k in range(module.num_layers):
        kwargs = dict(input_size=module.input_size if k == 0 else width * dirs, hidden_size=module.hidden_size,
                      num_layers=1, bias=module.bias, batch_first=True, bidirectional=module.bidirectional,
                      device="meta", dtype=module.weight_ih_l0.dtype)
        if cls is nn.LSTM:
            kwargs["proj_size"] = module.proj_size
        if cls is nn.RNN:
            kwargs["nonlinearity"] = "tanh" if module.mode == "RNN_TANH" else "relu"
        layer = cls(**kwargs)
        for own in layer._flat_weights_names:
            theirs = own.replace("_l0", f"_l{k}", 1)
            setattr(layer, own, getattr(module, theirs))
        layer.eval()
        copies.append(layer)
    return copies


@dataclass
class _Step:
    """One layer's sequences in a call: its input ``x`` ``(N, T, F)``, its output ``out`` ``(N, T, D * P)``, its
    ``h0`` ``(D, N, P)`` and ``valid`` ``(N, T)`` (the positions each sequence really has)."""

    layer: int
    x: torch.Tensor
    out: torch.Tensor
    h0: torch.Tensor
    valid: torch.Tensor


def _call_args(args: tuple, kwargs: Mapping) -> tuple[object, object]:
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def _steps(module: nn.RNNBase, copies: list[nn.RNNBase], args: tuple, kwargs: Mapping, last: int | None = None
           ) -> Iterator[_Step]:
    """Each layer's sequences (:class:`_Step`) in the call ``module(*args, **kwargs)``, up to layer ``last``; none
    for a call this cannot read (not a tensor or PackedSequence input)."""
    x, hx = _call_args(args, kwargs)
    lengths = None
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x, batch_first=True)
    elif not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        return
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
    elif lengths is None and not module.batch_first:
        x = x.transpose(0, 1)
    n, t = x.shape[:2]
    dirs = len(_suffixes(module))
    width = _width(module)
    lstm = module.mode == "LSTM"
    h0 = c0 = None
    if hx is not None:
        h0, c0 = hx if lstm else (hx, None)
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = None if c0 is None else c0.unsqueeze(1)
    if h0 is None:
        h0 = x.new_zeros(module.num_layers * dirs, n, width)
    if lstm and c0 is None:
        c0 = x.new_zeros(module.num_layers * dirs, n, module.hidden_size)
    positions = torch.arange(t, device=x.device)[None, :]
    valid = positions < lengths.to(x.device)[:, None] if lengths is not None else torch.ones(n, t, dtype=torch.bool,
                                                                                               device=x.device)
    for k, layer in enumerate(copies):
        if last is not None and k > last:
            return
        part = slice(k * dirs, (k + 1) * dirs)
        state = (h0[part], c0[part]) if lstm else h0[part]
        inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = layer(inp, state)
        if lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        yield _Step(k, x, out, h0[part], valid)
        x = out


def _rows(step: _Step, width: int, kind: str, direction: int) -> torch.Tensor:
    """The rows matrix ``weight_{kind}_l{k}`` of ``direction`` (0 forward, 1 reverse) multiplies in ``step``."""
    if kind == "ih":
        return step.x[step.valid]
    out = step.out[..., direction * width:(direction + 1) * width]
    # forward: step t reads h_{t-1} (out at t - 1 for t >= 1); reverse: step t reads h_{t+1} (out at t + 1)
    read = out[:, :-1][step.valid[:, 1:]] if direction == 0 else out[:, 1:][step.valid[:, 1:]]
    return torch.cat([step.h0[direction], read])


class RecurrentCollector(ModuleCollector):
    """A forward hook (``with_kwargs``) on a recurrent module: each measured matrix's input moments
    (:func:`recurrent_matrices`), accumulated with :func:`codec.rd.calibrate.add_moments`; both directions of a layer
    share ``weight_ih``'s (one input)."""

    def __init__(self, name: str, module: nn.RNNBase, full_h: Callable[[int], bool]):
        """``full_h(columns)``: whether a matrix of that many in-features keeps a full H (else its diagonal)."""
        self.name, self.module = name, module
        self.copies = _layer_copies(module)
        self.width = _width(module)
        self.moments = {m: _Moments(full_h(int(getattr(module, m).shape[1]))) for m in recurrent_matrices(module)
                        if not (m.startswith("weight_ih") and m.endswith("_reverse"))}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self.active:
            return
        for step in _steps(module, self.copies, args, kwargs):
            k = step.layer
            self.moments[f"weight_ih_l{k}"].add(_rows(step, self.width, "ih", 0))
            for d, sfx in enumerate(_suffixes(module)):
                self.moments[f"weight_hh_l{k}{sfx}"].add(_rows(step, self.width, "hh", d))

    def stats(self) -> dict:
        """``{weight name: LayerStats}`` of every matrix the calibration inputs reached (each its own object: the
        sensitivities differ)."""
        from .calibrate import LayerStats

        out = {}
        for attr, moments in self.moments.items():
            stats = moments.stats()
            if stats is None:
                continue
            out[self.param_name(attr)] = stats
            if attr.startswith("weight_ih") and self.module.bidirectional:
                out[self.param_name(f"{attr}_reverse")] = LayerStats(stats.kind, stats.h.copy(), stats.mean.copy(),
                                                                     stats.samples)
        return out


@dataclass
class RecurrentTarget:
    """One recurrent matrix whose sensitivity is measured by noise put into the parameter itself (the interface of
    :class:`codec.rd.experts.Target`): :meth:`caused` gives ``(||dW x||^2, ||W x||^2)`` over the rows the matrix
    multiplied in the call (computed by the layer copies, which share the perturbed parameter)."""

    module: nn.RNNBase
    param: str
    copies: list[nn.RNNBase]

    def view(self) -> torch.Tensor:
        return getattr(self.module, self.param).data

    def caused(self, args: tuple, kwargs: dict, weight: torch.Tensor, dw: torch.Tensor) -> tuple[float, float]:
        from .calibrate import _squared_sum

        kind, layer = self.param.split("_")[1], self.param.split("_l")[1]
        reverse = layer.endswith("_reverse")
        k = int(layer.removesuffix("_reverse"))
        width = _width(self.module)
        a = b = 0.0
        for step in _steps(self.module, self.copies, args, kwargs, last=k):
            if step.layer == k:
                x = _rows(step, width, kind, int(reverse))
                a, b = _squared_sum(F.linear(x, dw)), _squared_sum(F.linear(x, weight))
        return a, b


def recurrent_targets(collectors: Mapping[str, RecurrentCollector]) -> dict[str, RecurrentTarget]:
    """Calibration's name -> :class:`RecurrentTarget` for every measured matrix of the collectors' modules."""
    return {c.param_name(attr): RecurrentTarget(c.module, attr, c.copies)
            for c in collectors.values() for attr in recurrent_matrices(c.module)}
