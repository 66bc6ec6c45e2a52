"""Passes that start at a layer: the outputs of the modules a forward pass completes before it, given back.

Calibration's sensitivity passes (:func:`codec.rd.calibrate._sensitivity_pass`) run the whole model once per layer
and batch with noise in that layer's weight, though everything the pass computes before the layer starts is what
the batch's clean pass computed: a random BERT-base spends about half of those passes' ~190 CPU s on the
embeddings and the blocks before the perturbed one. :class:`Prefix` learns, from one clean pass per batch, when each
module is called (:meth:`Prefix.recording`); for a layer, the largest modules that a pass completes before the layer
starts (:meth:`Prefix.before`: a BERT's embeddings and the blocks before the layer's, and in its own block the
attention before its FFN) then return the output they returned the first time instead of running
(:meth:`Prefix.shortcut`), so the pass costs about what follows the layer.

Exact, not approximate: a module that completes before the perturbed layer starts computes the same values from the
same inputs in every pass of the batch (eval mode, no random numbers: the caller's checks). What is kept is checked:
a module called more than once in the clean pass, a kept output changed in place later in a pass (its tensors'
versions), a module whose ``forward`` is already replaced (a narrowed head) are never given back. The caller also
compares whole passes against shortened ones on its first batch and stops using this on any difference
(:meth:`Prefix.disable`); an output given other tensors after it was kept (a field of a ``ModelOutput``
reassigned) is never given back either. Memory: the kept outputs of one batch (BERT-base: one 16 x ~25 x 768
float32 tensor per block, ~1 MB each), dropped when the next batch's clean pass is recorded or when no later layer
will use them (:meth:`Prefix.keep_only`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["Prefix"]


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples, lists and mappings of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _changed(entry: tuple[object, list[tuple[torch.Tensor, int]]]) -> bool:
    """Whether a kept output (:attr:`Prefix.outputs`' entry) was changed since it was kept: a tensor of it changed in
    place, or the output itself given other tensors (a ``ModelOutput`` or dict whose field the caller reassigned:
    transformers 5's ``CLIPModel.get_image_features`` sets its vision model's ``pooler_output`` to the projected
    features, so given back, the output would hold those instead of the pooled ones)."""
    output, tensors = entry
    now = _tensors(output)
    return (len(now) != len(tensors) or any(a is not b for a, (b, _) in zip(now, tensors))
            or any(t._version != v for t, v in tensors))


class Prefix:
    """The call spans of ``model``'s modules in one clean pass, and the outputs kept of those a pass completes before a
    given layer (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = {id(m): m for m in model.modules()}
        #: id(module) -> (start, end): the order numbers of its one call's start and end in the clean pass
        self.spans: dict[int, tuple[int, int]] = {}
        #: id(module) -> (its output, [(tensor, version)] of the tensors in it when kept)
        self.outputs: dict[int, tuple[object, list[tuple[torch.Tensor, int]]]] = {}
        self.refused: set[int] = set()  # modules whose output was changed in place: never given back
        self.enabled = True
        #: Passes shortened and modules given back, for tests and notes
        self.shortened = self.given = 0

    def disable(self) -> None:
        """Stop giving outputs back (and drop those kept)."""
        self.enabled = False
        self.spans, self.outputs = {}, {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Around one clean pass of a new batch: each module's call span is recorded (a module called more than once
        gets none) and the outputs kept of the batch before are dropped."""
        self.outputs = {}
        if not self.enabled:
            yield
            return
        counter, starts, spans, twice = [0], {}, {}, set()

        def pre(module: nn.Module, args: tuple) -> None:
            key = id(module)
            if key in starts:
                twice.add(key)
            starts[key] = counter[0]
            counter[0] += 1

        def post(module: nn.Module, args: tuple, output: object) -> None:
            spans[id(module)] = (starts[id(module)], counter[0])
            counter[0] += 1

        handles = []
        try:
            for module in self.modules.values():
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.spans = {key: span for key, span in spans.items() if key not in twice and key in starts}

    def before(self, layer: nn.Module) -> list[int]:
        """The largest modules (ids) the clean pass completed before ``layer`` started, each called once: those a pass
        perturbing ``layer`` can skip (empty: ``layer`` called more than once, or not seen)."""
        start = self.spans.get(id(layer))
        if not self.enabled or start is None:
            return []
        done = sorted((span, key) for key, span in self.spans.items()
                      if span[1] < start[0] and key != id(self.model) and key not in self.refused
                      and "forward" not in vars(self.modules[key]))
        out, reach = [], -1
        for (first, last), key in done:  # spans nest or are disjoint: a module inside a kept one is left out
            if first > reach:
                out.append(key)
                reach = last
        return out

    def keep_only(self, keys: Iterable[int]) -> None:
        """Drop the kept outputs of modules not in ``keys`` (no later pass of the batch will skip them)."""
        wanted = set(keys)
        for key in [k for k in self.outputs if k not in wanted]:
            del self.outputs[key]

    @contextlib.contextmanager
    def shortcut(self, keys: list[int]) -> Iterator[None]:
        """Within: each module of ``keys`` (:meth:`before`) whose output is kept returns it without running; each
        other one runs and its output is kept. On leaving, a kept output whose tensors were changed in place is
        dropped and its module never given back."""
        patched, handles, kept = [], [], []

        def keeper(key: int):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                self.outputs[key] = (output, [(t, t._version) for t in _tensors(output)])
            return hook

        try:
            for key in keys:
                module = self.modules[key]
                if "forward" in vars(module):  # replaced by someone else meanwhile (a narrowed head): runs as it is
                    continue
                if key in self.outputs:
                    output = self.outputs[key][0]
                    module.forward = lambda *args, _output=output, **kwargs: _output
                    patched.append(module)
                    self.given += 1
                else:
                    handles.append(module.register_forward_hook(keeper(key)))
                kept.append(key)
            if patched:
                self.shortened += 1
            yield
        finally:
            for module in patched:
                del module.forward
            for handle in handles:
                handle.remove()
            for key in kept:
                entry = self.outputs.get(key)
                if entry is not None and _changed(entry):
                    del self.outputs[key]
                    self.refused.add(key)
