"""Plan review by measured output error: move bytes to a layer the allocation under-values, paid by others.

Encoder side only. The calibrated allocation scores a tensor's coding by a
linear distortion, its output sensitivity times the squared relative error
``e`` of its layer's output. That holds up to ``e`` ~ 0.2 and is 2-8x too
low above it (bench/README, seventh pass: the BatchNorm CNN's fc1 at JPEG
quality 5, ``e`` = 0.76, changes the logits 8.5x more than the model says),
and not as a function of ``e`` alone (``quant`` at ``e`` = 0.38: right). So
where a planned coding has ``e`` above :data:`REVIEW_ERROR`, the neighbouring
plans are measured instead of modelled: that tensor one step up (JPEG
quality + 1, ``quant`` one bit more), paid by the steps down elsewhere that
raise the measured error least per byte they save, each plan scored by the
model's output error (relative MSE to the original's outputs on the
calibration inputs, every reviewed tensor at its plain coding). A plan is
taken only when its error is lower at no more bytes than the plan it
replaces, and the review goes on from it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..api import to_numpy, to_torch
from ..dtypes import DType, get_dtype
from ..tensorcodec import EncodeOptions, decode_encoded, encode_tensor

__all__ = ["REVIEW_ERROR", "review_plan"]

#: Relative output error of a layer's planned coding above which the plan around it is measured.
REVIEW_ERROR = 0.3
#: Most steps up the review takes in all.
MAX_STEPS = 4
#: Lowest ``quant`` bit depth a step down reaches (1 bit destroys a layer for a few bytes).
MIN_BITS = 2


def _step(opts: EncodeOptions, direction: int) -> EncodeOptions | None:
    """``opts`` one step up (``direction`` 1) or down (-1): JPEG quality +- 1, ``quant`` one bit more or less; None
    past the ends or for other codecs."""
    if opts.codec == "jpeg" and opts.quality is not None and 1 <= opts.quality + direction <= 100:
        return replace(opts, quality=opts.quality + direction)
    if opts.codec == "quant" and opts.bits is not None and MIN_BITS <= opts.bits + direction <= 16:
        return replace(opts, bits=opts.bits + direction)
    return None


def _layer_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output of the Linear / Conv2d ``module`` for inputs ``x`` with ``weight`` and no bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)


class _Review:
    """The reviewed tensors' plain codings (cached by options) and plans scored by a forward pass."""

    def __init__(self, model: nn.Module, batches: list, refs: list, names: list[str], executor):
        self.source, self.batches, self.refs, self.executor = model, batches, refs, executor
        tensors = dict(model.named_parameters())
        self.modules = dict(model.named_modules())
        self.originals = {name: tensors[name].detach() for name in names}
        self.codings: dict[tuple[str, EncodeOptions], tuple[torch.Tensor, int]] = {}
        self.scores: dict[tuple, float] = {}
        self._copy: tuple[nn.Module, dict[str, torch.Tensor]] | None = None

    def _working(self) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A copy of the model to score plans on (made when first needed) and its reviewed tensors."""
        if self._copy is None:
            work = copy.deepcopy(self.source).eval()
            tensors = dict(work.named_parameters())
            self._copy = (work, {name: tensors[name] for name in self.originals})
        return self._copy

    def coding(self, name: str, opts: EncodeOptions) -> tuple[torch.Tensor, int]:
        """``(decoded, bytes)`` of tensor ``name``'s original value coded with ``opts``."""
        key = (name, opts)
        if key not in self.codings:
            array, dtype_name = to_numpy(self.originals[name])
            dtype: DType = get_dtype(dtype_name)
            encoded = encode_tensor(array, dtype, opts, executor=self.executor)
            decoded = decode_encoded(encoded, dtype, array.shape, name, executor=self.executor)
            self.codings[key] = (to_torch(decoded, dtype_name), sum(len(b) for b in encoded.blobs))
        return self.codings[key]

    def nbytes(self, plan: Mapping[str, EncodeOptions]) -> int:
        return sum(self.coding(name, opts)[1] for name, opts in plan.items())

    def error(self, plan: Mapping[str, EncodeOptions]) -> float:
        """The model's output error (mean relative MSE over the batches) with every tensor of ``plan`` coded."""
        key = tuple(sorted(plan.items(), key=lambda item: item[0]))
        if key not in self.scores:
            from .repair import output_error

            work, tensors = self._working()
            with torch.no_grad():
                for name, opts in plan.items():
                    tensors[name].data = self.coding(name, opts)[0]
                self.scores[key] = output_error(work, self.batches, self.refs)
                for name, tensor in tensors.items():
                    tensor.data = self.originals[name]
        return self.scores[key]

    def layer_errors(self, plan: Mapping[str, EncodeOptions]) -> dict[str, float]:
        """Each tensor's relative output error ``e`` of its own layer, coded alone with its options in ``plan``,
        on the inputs of the original model."""
        sums = {name: [0.0, 0.0] for name in plan}

        def hook(name):
            def measure(module, args):
                x = args[0]
                dw = self.coding(name, plan[name])[0] - self.originals[name]
                sums[name][0] += float(_layer_output(module, x, dw).double().pow(2).sum())
                sums[name][1] += float(_layer_output(module, x, self.originals[name]).double().pow(2).sum())
            return measure

        handles = [self.modules[name.rpartition(".")[0]].register_forward_pre_hook(hook(name)) for name in plan]
        try:
            from .repair import _run

            with torch.no_grad():
                for batch in self.batches:
                    _run(self.source, batch)
        finally:
            for handle in handles:
                handle.remove()
        return {name: float(np.sqrt(err / ref)) if ref > 0 else 0.0 for name, (err, ref) in sums.items()}

    def paid(self, plan: dict[str, EncodeOptions], need: int, keep: str) -> dict[str, EncodeOptions] | None:
        """``plan`` with steps down on tensors other than ``keep`` saving at least ``need`` bytes, each the step
        that raises the output error least per byte saved (None: the steps down cannot save that much)."""
        plan, saved = dict(plan), 0
        while saved < need:
            base, best = self.error(plan), None
            for name, opts in plan.items():
                down = _step(opts, -1) if name != keep else None
                gain = 0 if down is None else self.coding(name, opts)[1] - self.coding(name, down)[1]
                if gain > 0:
                    cost = (self.error({**plan, name: down}) - base) / gain
                    if best is None or cost < best[0]:
                        best = (cost, name, down, gain)
            if best is None:
                return None
            plan[best[1]] = best[2]
            saved += best[3]
        return plan


def review_plan(model: nn.Module, batches: list, refs: list, options: Mapping[str, EncodeOptions],
                names: list[str], executor=None) -> tuple[dict[str, EncodeOptions], str | None]:
    """``(options changed, note)``: the plan of the Linear / Conv2d weights ``names`` (stored lossily, in
    ``model``, the original) reviewed by measured output error (see the module's docstring); a note for the user
    when it changed, else None. ``refs`` are the original model's outputs on ``batches``."""
    names = [name for name in names if _step(options[name], 1) is not None or _step(options[name], -1) is not None]
    if not names:
        return {}, None
    review = _Review(model, batches, refs, names, executor)
    plan = {name: options[name] for name in names}
    start = error = review.error(plan)
    budget = review.nbytes(plan)
    for _ in range(MAX_STEPS):
        errors = review.layer_errors(plan)
        taken = None
        for name in sorted((n for n in plan if errors[n] > REVIEW_ERROR), key=lambda n: -errors[n]):
            up = _step(plan[name], 1)
            if up is None:
                continue
            need = review.nbytes({**plan, name: up}) - budget
            candidate = review.paid({**plan, name: up}, need, name)
            if candidate is not None and review.error(candidate) < error:
                taken = candidate
                break
        if taken is None:
            break
        plan, error = taken, review.error(taken)
    changed = {name: opts for name, opts in plan.items() if opts != options[name]}
    if not changed:
        return {}, None
    note = ("repair: plan reviewed by measured output error before repair (" + ", ".join(
        f"{name} {_label(options[name])} -> {_label(opts)}" for name, opts in sorted(changed.items()))
        + f"): {start:.4g} -> {error:.4g} on the calibration inputs, {budget} -> {review.nbytes(plan)} bytes")
    return changed, note


def _label(opts: EncodeOptions) -> str:
    return f"q{opts.quality}" if opts.codec == "jpeg" else f"{opts.bits} bits"
