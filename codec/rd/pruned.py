"""Layers pruned with ``torch.nn.utils.prune``, coded for the weight they compute.

``prune.l1_unstructured(fc1, "weight", 0.6)`` (and every other method of
``torch.nn.utils.prune``) keeps the layer's weight as the parameter
``fc1.weight_orig`` (every entry, the pruned ones too) and the 0/1 buffer
``fc1.weight_mask``; a forward pre-hook computes ``fc1.weight = weight_orig *
weight_mask`` before each call. The state_dict holds the two, not the weight.

The entries of ``weight_orig`` where the mask is 0 never reach the model:
the hook multiplies them by 0, and their gradient is 0, so training does not
move them either; a later ``prune`` call on the same weight only prunes more
(``PruningContainer`` keeps what is pruned). Coding them is spending bytes on
values nothing uses, and measuring them is measuring error that costs the
model nothing. So the encoder codes ``weight_orig * weight_mask`` in their
place (:func:`computed_state`, :func:`pruned_as_computed`): the pruned
entries are zeros for the codecs to code (cheaply; their decoded values are
multiplied by the exact mask again), the file's ``weight_orig`` computes the
same weight as the model's, and calibration, the plan, GPTQ and repair treat
the stored tensor as the layer's weight (``fc1.weight``,
:func:`pruned_weights`). The mask itself is coded exactly
(:func:`codec.rd.allocate._two_valued`). The decoded ``weight_orig`` differs
from the model's at the pruned entries only, which the layer multiplies by 0.

What it gains, and what ``prune.remove`` before saving gains beyond it (the
file then holds no mask: about one bit per weight of the layer): bench/JOURNAL.md,
"layers (thirtieth pass)".
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping

import numpy as np

__all__ = ["ORIG", "MASK", "pruned_weights", "computed_state", "pruned_as_computed", "pruned_hooks", "pruned_weight",
           "computing", "pruned_note", "pruned_hint"]

#: The suffixes ``torch.nn.utils.prune`` gives the stored tensors of a pruned ``<layer>.<name>``.
ORIG, MASK = "_orig", "_mask"


def pruned_weights(shapes: Mapping[str, tuple[int, ...]], get: Callable[[str], np.ndarray]) -> dict[str, str]:
    """The computed weights of a state_dict's pruned layers: ``{"fc1.weight": "fc1.weight_orig"}`` for each
    ``<x>_orig`` beside a ``<x>_mask`` of its shape whose values are all 0 or 1 (``get(name)``: a tensor as an
    array). A ``<x>`` also stored, a mask of other values or another shape: not a pruned pair, left alone."""
    out = {}
    for name, shape in shapes.items():
        if not name.endswith(ORIG):
            continue
        computed = name[:-len(ORIG)]
        mask = computed + MASK
        if computed in shapes or shapes.get(mask) != shape or len(shape) < 1:
            continue
        values = get(mask)
        if values.size and np.all((values == 0) | (values == 1)):
            out[computed] = name
    return out


def pruned_note(pairs: Mapping[str, str]) -> str:
    """The note a budgeted save of pruned layers gives (``pairs``: :func:`pruned_weights`): how they are coded, what
    their masks cost, and ``prune.remove``, which measured better at the same file size on the two pruned models of
    bench/JOURNAL.md, "layers (thirtieth pass)" (an MLP and the bench CNN: the mask's bytes go to the weights; at
    the same bits/weight its file is about half the size, better on the MLP, a little worse on the CNN at -b 1)."""
    layers = [name.rpartition(".")[0] or name for name in pairs]
    shown = ", ".join(map(repr, layers[:4])) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    plural = len(layers) != 1
    return (f"{len(layers)} pruned layer{'s' * plural} (torch.nn.utils.prune: {shown}) coded as the weight "
            f"{'they compute' if plural else 'it computes'} (weight_orig * weight_mask; the pruned entries of "
            "weight_orig, which the layer multiplies by 0, as zeros) and the mask exactly, about 1 bit per element, "
            "which bits/weight counts as weights; prune.remove(layer, \"weight\") on each before saving stores the "
            "pruned weight alone, without its mask, and measured better at the same file size")


def pruned_hint(pairs: Mapping[str, str]) -> str:
    """What a refusal of too small a budget adds for a model of pruned layers (``pairs``: :func:`pruned_weights`):
    their masks, coded exactly, take about 1 bit per element whatever the budget."""
    layers = [name.rpartition(".")[0] or name for name in pairs]
    shown = ", ".join(map(repr, layers[:4])) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    return (f"; the weight_mask of each pruned layer ({shown}; torch.nn.utils.prune) is coded exactly, about 1 bit "
            "per element: prune.remove(layer, \"weight\") on each before saving stores the pruned weight alone")


def computed_state(state_dict: Mapping) -> Mapping:
    """``state_dict`` with each pruned layer's ``<x>_orig`` (:func:`pruned_weights`) replaced by the weight it
    computes, ``<x>_orig * <x>_mask`` (a new tensor; the caller's is not changed): the pruned entries coded as
    zeros. ``state_dict`` itself where it holds no pruned pair, or is not a mapping of torch tensors (without torch
    imported it holds none: a torch-free save, of a .safetensors say, does not import torch here)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(state_dict, Mapping) \
            or not any(isinstance(k, str) and k.endswith(ORIG) for k in state_dict):
        return state_dict
    tensors = {k: v for k, v in state_dict.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    pairs = pruned_weights(shapes, lambda n: tensors[n].detach().cpu().numpy())
    if not pairs:
        return state_dict
    out = dict(state_dict)
    for computed, orig in pairs.items():
        tensor = tensors[orig]
        if tensor.is_floating_point():
            out[orig] = (tensor.detach() * tensors[computed + MASK].to(tensor.dtype)).to(tensor.dtype)
    return out


def pruned_hooks(model) -> list[tuple[str, object, str]]:
    """``(module name, module, weight name)`` for each weight of ``model`` a ``torch.nn.utils.prune`` method
    computes (a forward pre-hook of the module's, with ``<name>_orig`` and ``<name>_mask`` on it)."""
    try:
        from torch.nn.utils.prune import BasePruningMethod
    except ImportError:  # (a torch without it: nothing pruned)
        return []
    out = []
    for mod_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            name = getattr(hook, "_tensor_name", None)
            if isinstance(hook, BasePruningMethod) and isinstance(name, str) \
                    and hasattr(module, name + ORIG) and hasattr(module, name + MASK):
                out.append((mod_name, module, name))
    return out


def pruned_weight(module, name: str = "weight"):
    """The weight a pruned ``module`` computes from its tensors as they are now (``<name>_orig * <name>_mask``),
    or None where ``module``'s ``name`` is not pruned: the attribute ``module.<name>`` is set by the hook when the
    module's forward starts, so after repair codes ``<name>_orig`` it is the old weight until the next call."""
    orig, mask = getattr(module, name + ORIG, None), getattr(module, name + MASK, None)
    if orig is None or mask is None or not any(getattr(h, "_tensor_name", None) == name
                                               for h in module._forward_pre_hooks.values()):
        return None
    return orig * mask.to(dtype=orig.dtype)


#: ids of the models :func:`pruned_as_computed` holds open (a save inside it does not open it again)
_OPEN: set[int] = set()


def computing(model) -> bool:
    """Whether :func:`pruned_as_computed` is open on ``model``."""
    return id(model) in _OPEN


@contextlib.contextmanager
def pruned_as_computed(model) -> Iterator[bool]:
    """While open, each pruned weight's ``<x>_orig`` of ``model`` holds ``<x>_orig * <x>_mask`` (its pruned
    entries zero), as new storage (the caller's tensor data is not written into); on leaving every one is given
    back its own storage, unchanged. The model computes the same function meanwhile (the hook multiplies by the
    mask again), and what a save reads of it (the state_dict, calibration's layers, repair's working copy) is the
    weight the layer computes. Yields whether anything was replaced."""
    import torch

    if model is None or id(model) in _OPEN:
        yield False
        return
    kept = []
    try:
        with torch.no_grad():
            for _, module, name in pruned_hooks(model):
                orig, mask = getattr(module, name + ORIG), getattr(module, name + MASK)
                if not (orig.is_floating_point() and orig.shape == mask.shape
                        and bool(((mask == 0) | (mask == 1)).all())):
                    continue
                kept.append((orig, orig.data))
                orig.data = orig.data * mask.to(orig.dtype)
        _OPEN.add(id(model))
        yield bool(kept)
    finally:
        _OPEN.discard(id(model))
        with torch.no_grad():
            for orig, data in kept:
                orig.data = data
