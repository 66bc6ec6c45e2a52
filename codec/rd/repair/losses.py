"""What repair matches: the model's floating outputs (:func:`_outputs`), their relative MSE or KL divergence against
the original's (:func:`_loss`, :func:`_relative_mse`, :func:`_kl`, :func:`output_error`, :func:`_error_against`),
and the training that matches them: distillation after each coded tensor (:func:`_distill`) and the final
codec-in-the-loop fine-tuning (:func:`_finetune`, through :func:`codec.train.finetune`).

Builds on :mod:`.settings` and :mod:`.slots`; :mod:`.loop` uses it (the refit's judge, the notes' output error).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...api import to_numpy, to_torch
from ...tensorcodec import EncodeOptions, Overrides
from ..calibrate import call as _run
from ..calibrate import floating_outputs as _flat
from ..output_sample import OutputSample
from .settings import RepairSettings, held_out
from .slots import _Slot, _code, _measure, _same_bytes


def _outputs(model: nn.Module, batch, watch: OutputSample | None = None) -> list[torch.Tensor]:
    """The model's floating outputs on ``batch``, detached (``watch``: which wide Linear heads made them,
    :meth:`OutputSample.adopt`)."""
    with watch.watch(model) if watch is not None else contextlib.nullcontext():
        outs = _flat(_run(model, batch))
    if watch is not None:
        watch.adopt(outs)
    outs = [t.detach() for t in outs]
    if not outs:
        raise ValueError("the model's output holds no floating tensor to match")
    return outs


def _loss(model: nn.Module, batch, refs: list[torch.Tensor]) -> torch.Tensor:
    """Relative MSE of the model's outputs on ``batch`` against the original's ``refs``, summed over outputs."""
    return _relative_mse(_run(model, batch), refs)


def _kl(out, refs: list[torch.Tensor], temperature: float = 2.0) -> torch.Tensor:
    """KL divergence from the original's softmax to the model's along the last axis at ``temperature`` (times its
    square, as in distillation), summed over the output's floating tensors."""
    return sum(temperature ** 2 * F.kl_div(F.log_softmax(o.reshape(-1, o.shape[-1]) / temperature, -1),
                                           F.log_softmax(r.reshape(-1, r.shape[-1]) / temperature, -1),
                                           log_target=True, reduction="batchmean")
               for o, r in zip(_flat(out), refs))


def _relative_mse(out, refs: list[torch.Tensor]) -> torch.Tensor:
    """Relative MSE of a model output against the original's ``refs``, summed over its floating tensors."""
    return sum(F.mse_loss(o, r) / r.pow(2).mean().clamp_min(1e-30) for o, r in zip(_flat(out), refs))


def output_error(model: nn.Module, batches: list, refs: list[list[torch.Tensor]], sample: OutputSample | None = None
                 ) -> float:
    """Mean relative MSE of ``model``'s outputs against ``refs`` over ``batches``.

    With ``sample`` (:class:`codec.rd.output_sample.OutputSample`), an output wider than its limit on its last axis
    (a language model's logits) is compared on the sample's positions of it, the model run with its heads narrowed
    to them; ``refs`` are then the original's outputs sampled the same way (:meth:`OutputSample.reference`). An
    output no wider is compared whole, as without ``sample``."""
    with torch.no_grad():
        if sample is None:
            return float(np.mean([float(_loss(model, b, r)) for b, r in zip(batches, refs)]))
        errors = []
        for b, r in zip(batches, refs):
            with sample.narrowed(model):
                out = [sample.take(t) for t in _flat(_run(model, b))]
            errors.append(float(_relative_mse(out, r)))
        return float(np.mean(errors))


def _error_against(original: nn.Module, model: nn.Module, batches: Sequence) -> float:
    """:func:`output_error` of ``model`` against the ``original`` model's outputs, made again batch by batch (in
    eval mode, as repair made its references: the same values), one batch's outputs alive at a time."""
    training = original.training
    original.eval()
    try:
        with torch.no_grad():
            return float(np.mean([float(_loss(model, b, _outputs(original, b))) for b in batches]))
    finally:
        original.train(training)


def _set_trainable(slots: dict[str, _Slot]) -> None:
    """Only stored floating parameters not yet coded take gradients."""
    for slot in slots.values():
        if slot.is_param:
            slot.tensor.requires_grad_(slot.tensor.is_floating_point() and not slot.coded)


def _free(slots: dict[str, _Slot], lossy: bool) -> list[torch.Tensor]:
    """Parameters whose stored value is still free: not yet coded lossy ones (with ``lossy``) and lossless ones."""
    return [s.tensor for s in slots.values()
            if s.is_param and s.tensor.is_floating_point() and not s.coded and (lossy or not s.lossy)]


def _distill(work: nn.Module, params: list[torch.Tensor], batches: list, refs: list, steps: int, lr: float,
             step: int) -> int:
    """``steps`` Adam steps on ``params`` matching the original outputs, batches in turn from ``step``; new step."""
    if not params or steps <= 0:
        return step
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            i = step % len(batches)
            optimizer.zero_grad(set_to_none=True)
            _loss(work, batches[i], refs[i]).backward()
            optimizer.step()
            step += 1
    return step


class _EvalMode(nn.Module):
    """``inner`` as :func:`codec.train.finetune` should train it here: always in eval mode (BatchNorm on its running
    statistics, no dropout, as the outputs it must match were made) and a mapping batch passed as keywords."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> _EvalMode:
        self.training = mode
        self.inner.eval()
        return self

    def forward(self, batch=None, **keywords):  # finetune passes a mapping batch as keywords
        return _run(self.inner, keywords if batch is None else batch)


class _Exact(Overrides):
    """Per-tensor overrides naming each tensor's options exactly (lossless, i.e. passed through as it is, for any
    other name), for finetune."""

    def __init__(self, options: Mapping[str, EncodeOptions]):
        super().__init__()
        self.exact = dict(options)

    def check(self, base: EncodeOptions) -> None:
        pass  # EncodeOptions already, nothing to parse

    def options_for(self, name: str, base: EncodeOptions) -> EncodeOptions:
        return self.exact.get(name, LOSSLESS)


LOSSLESS = EncodeOptions(codec="lossless")


#: Lossy codecs whose tensors codec-in-the-loop fine-tuning trains (the others keep repair's coding). ``jpeg`` is
#: left out: at the bench's rates one DCT step is a large jump a straight-through gradient cannot aim (the MLP's
#: first layer at quality 8, 200 steps at lr 1e-4: held-out output error 0.0042 -> 0.0082).
TUNED_CODECS = ("quant",)


def _finetune(work: nn.Module, batches: list, refs: list, slots: dict[str, _Slot], options: Mapping[str, EncodeOptions],
              settings: RepairSettings, executor) -> str:
    """Codec-in-the-loop fine-tuning of the repaired ``work`` (``settings.finetune_steps``); a note for the user.

    Trained: the floating parameters stored losslessly, and the lossy ones
    coded with a codec of :data:`TUNED_CODECS`, whose float shadows start at
    their targets (which code to what ``work`` holds) and stay within their
    tiles' ranges (finetune's ``keep_tiles``); :func:`codec.train.finetune`
    passes them through their real encode/decode with ``options``. The other lossy
    tensors hold their decoded values throughout (not coded again).
    Every :data:`HOLDOUT_EVERY`-th batch is held out (from that many batches;
    with fewer, all train and all are checked). The trained lossy tensors
    are coded once more; with ``keep_size``, while they take more bytes than
    the plan allows (the sum of the lossy tensors' budgets, or what repair's
    codings took if more), the one grown most goes back to repair's coding.
    The result is kept only if it lowers the loss (``settings.finetune_loss``)
    on the held-out batches; otherwise ``work`` and the targets stay as
    repair made them.
    """
    from ...train import finetune

    n = len(batches)
    held = held_out(n)
    fit = [i for i in range(n) if i not in held]
    check = held or fit
    loss = _kl if settings.finetune_loss == "kl" else _relative_mse

    def held_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(loss(_run(work, batches[i]), refs[i])) for i in check]))

    before = held_loss()
    saved = {name: s.tensor.detach().clone() for name, s in slots.items()}
    lossy = [s for s in slots.values() if s.lossy]
    trained = [s for s in lossy if s.is_param and options[s.name].codec in TUNED_CODECS]
    tuned = trained + [s for s in slots.values() if s.is_param and not s.lossy and s.tensor.is_floating_point()]
    with torch.no_grad():  # the others keep their decoded values, passed through as they are (not coded again)
        for s in trained:
            s.tensor.copy_(to_torch(np.array(s.target, order="C"), s.dtype.name))
    for p in work.parameters():
        p.requires_grad_(False)
    for s in tuned:
        s.tensor.requires_grad_(True)
    optimizer = torch.optim.Adam([s.tensor for s in tuned], lr=settings.finetune_lr)
    try:
        with torch.enable_grad():
            finetune(_EvalMode(work), [(batches[i], i) for i in fit], steps=settings.finetune_steps,
                     loss_fn=lambda out, i: loss(out, refs[i]), refresh=settings.finetune_refresh, keep_tiles=True,
                     optimizer=optimizer, overrides=_Exact({"inner." + s.name: options[s.name] for s in trained}),
                     validation=False)  # its own check below, after keep-size
    finally:
        for s in tuned:
            s.tensor.requires_grad_(False)
    coded = {}  # name -> [(value, decoded, bytes, encoding) trained, (...) as repair coded it]
    for s in trained:
        value = to_numpy(s.tensor)[0].copy()
        coded[s.name] = [(value, *_code(s.name, value, s.dtype, options[s.name], executor)),
                         (s.target, to_numpy(saved[s.name])[0], s.nbytes, s.encoded)]
    back = []
    if settings.keep_size and coded:
        frozen = sum(s.nbytes for s in lossy if s.name not in coded)
        limit = max(sum(s.budget or 0 for s in lossy), frozen + sum(c[1][2] for c in coded.values()))
        for name in sorted(coded, key=lambda name: coded[name][1][2] - coded[name][0][2]):  # grown most first
            if frozen + sum(c[0][2] for c in coded.values()) <= limit:
                break
            coded[name][0] = coded[name][1]
            back.append(name)
    with torch.no_grad():
        for s in trained:
            s.tensor.copy_(to_torch(coded[s.name][0][1], s.dtype.name))
    after = held_loss()
    kind = "KL divergence" if settings.finetune_loss == "kl" else "output error"
    where = f"{kind} on {len(held)} held-out batches" if held else f"{kind} on the calibration inputs"
    what = (f"{settings.finetune_steps} steps on {len(trained)} lossy and {len(tuned) - len(trained)} lossless "
            f"tensors" + (f", {len(back)} back to repair's coding to fit the plan" if back else ""))
    if not after < before:
        with torch.no_grad():
            for name, s in slots.items():
                s.tensor.copy_(saved[name])
        return f"repair: codec-in-the-loop fine-tuning ({what}) not kept: {where} {after:.4g}, {before:.4g} without it"
    for s in trained:
        s.target, _, _, s.encoded = coded[s.name][0]
        s.changed = not _same_bytes(s.target, s.original)
        _measure(s.encoded, s.target, coded[s.name][0][1], s.dtype)
    return f"repair: codec-in-the-loop fine-tuning ({what}): {where} {before:.4g} -> {after:.4g}"
