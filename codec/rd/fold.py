"""Move a BatchNorm's per-channel scale into the layer before it: the same model, other values to code.

A Linear / Conv2d layer whose output goes straight into a BatchNorm is,
in eval mode, followed by the per-channel affine map
``gamma (z - mean) / sqrt(var + eps) + beta``: an error in output channel
``c`` of the layer reaches the rest of the model multiplied by
``|gamma_c| / sqrt(var_c + eps)``. The codecs quantize every element of a
tile (JPEG, ``quant``) with the same step, so they spend as much precision
on a channel the BatchNorm shrinks as on one it amplifies (the idea behind
this module; see below for what was measured).

:func:`fold_batchnorm` scales each such layer's output channel ``c`` (its
weight's row and its bias) by ``g_c = |gamma_c| / sqrt(var_c + eps)`` and
the BatchNorm's running statistics to match (``mean' = g mean``,
``var' = g^2 (var + eps) - eps``): the model computes the same function
in eval mode (a symmetry: BatchNorm divides the scale out again;
in train mode the same up to ``eps``), while a uniform coding error in the
stored weight now costs about the same at the BatchNorm's output for every
channel. Encoder side only: the file holds the rescaled weights and
statistics, which decode like any others; the decoded state_dict is the
rescaled model's, not the original's (weights and running statistics differ
per channel by ``g``; ``gamma`` and ``beta`` do not change).

Opt-in: call it on the model before ``codec.save(model, ...)``. What it
does for the coding is measured, not derived: on the bench's BatchNorm CNN at
``-b 0.6`` with calibration and repair (``python -m bench.repair --model
bncnn -b 0.6 --calibrated-plan --calib 2000 --batch 250 --variants closed
--fold-batchnorm``) accuracy rose from 88.78 to 89.98 % (91.38 % as given),
mostly because the folded ``fc1`` codes about 20 % smaller at the same JPEG
quality and the allocator spends what that frees on ``conv3``; the same
per-tile coding of a folded tensor is not better by itself (on a synthetic
model whose BatchNorm scales spread 3-1000x it was worse at equal
settings). See bench/JOURNAL.md, "Accuracy at the data-aware targets (fifth
pass, issue 9)".
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["fold_batchnorm"]

#: The folded model's output on the check batch must match the original's within this relative RMS error.
TOLERANCE = 1e-4


def fold_batchnorm(model: nn.Module, batch) -> list[str]:
    """Rescale every Linear / Conv2d layer feeding a BatchNorm directly, in place; the names of the layers folded.

    ``batch`` is one input batch (a tensor, or a dict passed as keywords):
    one eval-mode forward pass finds the pairs (a BatchNorm whose input is
    the very tensor a layer returned, each called once) and checks the
    result: if the model's output on ``batch`` moved by more than
    :data:`TOLERANCE` (relative RMS; e.g. a layer's output was also used
    elsewhere), everything is put back and ValueError says so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id(output) -> (layer, output kept alive: no id reuse)
    calls: dict[int, int] = {}
    pairs: list[tuple[nn.Module, nn.modules.batchnorm._BatchNorm]] = []

    def layer_hook(module, args, output):
        calls[id(module)] = calls.get(id(module), 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (module, output)

    def norm_hook(module, args):
        calls[id(module)] = calls.get(id(module), 0) + 1
        source = produced.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source[1] is args[0]:
            pairs.append((source[0], module))

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(norm_hook))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = _output(model, batch)
            produced.clear()
            pairs = [(layer, norm) for layer, norm in pairs if calls[id(layer)] == 1 and calls[id(norm)] == 1
                     and norm.track_running_stats and norm.running_var is not None
                     and norm.num_features == layer.weight.shape[0]]
            saved = {id(t): t.detach().clone() for layer, norm in pairs
                     for t in (layer.weight, layer.bias, norm.running_mean, norm.running_var) if t is not None}
            for layer, norm in pairs:
                _fold(layer, norm)
            for h in handles:
                h.remove()
            handles = []
            after = _output(model, batch)
            error = float((after - before).pow(2).mean().sqrt() / before.pow(2).mean().sqrt().clamp_min(1e-30))
            if not error <= TOLERANCE:
                for layer, norm in pairs:
                    for t in (layer.weight, layer.bias, norm.running_mean, norm.running_var):
                        if t is not None:
                            t.copy_(saved[id(t)])
                raise ValueError(f"fold_batchnorm: the folded model's output moved by {error:.3g} (relative RMS) on "
                                 f"the check batch, over {TOLERANCE:g}; nothing was folded (is a layer's output also "
                                 f"used elsewhere than its BatchNorm?)")
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return [names.get(id(layer), "?") for layer, _ in pairs]


def _fold(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Scale ``layer``'s output channels by ``g`` and ``norm``'s running statistics to match (see the module)."""
    eps = float(norm.eps)
    var = norm.running_var.double()
    gamma = norm.weight.detach().double().abs() if norm.affine else torch.ones_like(var)
    g = gamma / (var + eps).sqrt()
    g = torch.maximum(g, (eps / (var + eps)).sqrt() * 1.001)  # keeps var' = g^2 (var + eps) - eps > 0
    g = torch.where(torch.isfinite(g), g, torch.ones_like(g))
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.copy_((layer.weight.double() * g.reshape(shape)).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((layer.bias.double() * g).to(layer.bias.dtype))
    norm.running_mean.copy_((norm.running_mean.double() * g).to(norm.running_mean.dtype))
    norm.running_var.copy_((g ** 2 * (var + eps) - eps).to(norm.running_var.dtype))


def _output(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    while not isinstance(out, torch.Tensor):
        if isinstance(out, Mapping):
            out = next(v for v in out.values() if isinstance(v, torch.Tensor))
        elif isinstance(out, (tuple, list)):
            out = next(v for v in out if isinstance(v, torch.Tensor))
        else:
            raise ValueError(f"fold_batchnorm: the model's output ({type(out).__name__}) holds no tensor")
    return out.detach().double()
