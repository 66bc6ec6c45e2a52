"""Coding within a byte budget (``RepairSettings.keep_size``): one lossy tensor coded within its plan and the credit
the tensors before it left (:func:`_code_within`, :func:`_fit_size`: blending back, cheaper and dearer options,
the JPEG ladder's fine steps, pruned codings at higher qualities), the spare's receiver and the reserve held for
GPTQ's growth (:func:`_receiver`, :func:`_held`), the moved lossless vectors (:func:`_fit_vector`), and what the
plan keeps for repair (:func:`constant_growth`, :func:`moved_growth`, :func:`fitted_share`).

Builds on :mod:`.settings`, :mod:`.slots`, :mod:`.inputs` and :mod:`.fit` (a layer's targets); :mod:`.loop`
calls it for each tensor in turn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ...api import to_numpy, to_torch
from ...dtypes import SIGNIFICAND, from_float64, round_significand, to_float64
from ...tensorcodec import Encoded, EncodeOptions, encode_tensor
from .. import ladder
from ..gptq import _BAND, _diagonal
from ..gptq import difference_error as weighted_error
from ..rdo import applies, fit_pruned
from .fit import FITTED, _is_layer_weight, _layer_of, _LayerFit
from .inputs import _check_inputs, forward_order
from .settings import RepairSettings
from .slots import _Slot, _code, _same_bytes


#: Of the bytes the plan leaves (``spare``), this fraction of the planned bytes of each ``quant`` tensor coded after
#: the largest one is kept back for it, from the largest and from the step-ups of the tensors before it
#: (:func:`_held`): GPTQ's rounding can code larger than plain rounding (measured: 2.4-4.5 %, the bench BatchNorm
#: CNN's conv2 and the MLP's fc2; 7-13 % at 2 bits, 1-3 % at 3 on a transformers ViT), and ``quant`` has no cheaper
#: step to pay for it.
RESERVE = 0.1

#: A tensor that fits its plan tries dearer options only with credit left of at least this fraction of its bytes
#: (JPEG; a fine ladder step costs more) or of a ``quant`` bit's share of them, so that small credits cost no codings.
STEP_UP_FROM = 0.02


#: Ratio of successive table scales keep-size bisects between two qualities (:func:`_finest`; the rate search's
#: ladder, :data:`codec.rd.ladder.FINE_RATIO`, is 1.03): at 1.03 one step of the bench CNN's compensated fc1 near
#: q5.3 cost about 550 B, more than its credit left, and 1.7 % of the file's budget went to fc2's eighth bit or
#: unspent; at 1.01 a step is a third of that, for a coding or two more per bisection.
FINE_STEP = 1.01


def constant_growth(model: nn.Module, stored: Iterable[str], settings: RepairSettings | None = None) -> int:
    """Bytes a repaired file may need beyond its plan for the stored vectors that hold one value now and that
    repair gives values of their own: their raw sizes.

    A zero-initialised bias (or a fresh BatchNorm's running mean) codes losslessly in a few bytes; repair's
    least-squares bias (or the shift it puts in a running mean) makes it an ordinary vector that codes at about
    its raw size. The plan priced it as it was: an untrained BERT's repaired file at ``-b 3`` ended 0.9 % over
    its budget, a small net's 3.8 %. These are the vectors the repair with ``settings`` can change: every
    Linear / ConvNd bias and BatchNorm running mean (``bias_correction``), or, with distillation steps, every
    floating parameter. ``stored``: the names that will be stored (aliases left out). Trained models' vectors
    seldom hold one value: for them this is 0."""
    settings = RepairSettings() if settings is None else settings
    names = set(stored)
    changeable: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = mod_name + "." if mod_name else ""
        if settings.steps or settings.final_steps:
            changeable.update((prefix + a, p) for a, p in module.named_parameters(recurse=False))
        elif settings.bias_correction:
            if isinstance(module, _biased()) and module.bias is not None:
                changeable[prefix + "bias"] = module.bias
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                changeable[prefix + "running_mean"] = module.running_mean
    total = 0
    for name, tensor in changeable.items():
        if name in names and tensor.is_floating_point() and tensor.numel() > 1:
            flat = tensor.detach().reshape(-1)
            if bool((flat == flat[0]).all()):
                total += flat.numel() * flat.element_size()
    return total


def _biased() -> tuple[type, ...]:
    """The layer kinds whose bias repair's least-squares bias moves (a weight_norm / spectral_norm one too: its
    class is a subclass of the layer's)."""
    from . import fit

    return FITTED + fit.TRANSPOSED_FITS if fit.TRANSPOSED_BIAS else FITTED


def fitted_share(model: nn.Module) -> float:
    """The fraction of ``model``'s state (parameters and buffers, in elements) in the weights repair fits to the
    layers after them, a Linear or ConvNd's (refit, GPTQ, JPEG compensation): the share of a calibrated budget
    its step-ups are worth (:data:`codec.encode.REPAIR_SHARE`). A GRU's matrices are coded by plain rounding: a
    calibrated GRU at ``-b 3`` had output error 0.027 with the whole budget planned, 0.083 with 6 % left to
    repair's step-ups."""
    state = model.state_dict(keep_vars=True)
    total = sum(t.numel() for t in state.values())
    fitted = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, FITTED) and isinstance(m.weight, torch.Tensor))
    return min(1.0, fitted / total) if total else 0.0


def moved_growth(model: nn.Module, inputs: Iterable, options: Mapping[str, EncodeOptions], stored: Iterable[str],
                 settings: RepairSettings | None = None) -> int:
    """:func:`constant_growth` of the vectors that repair with ``settings`` will move under the plan ``options``
    (model names): with the least-squares bias alone (no distillation steps), a vector moves only where a layer
    before it is coded lossily and repaired: the bias of a Linear / ConvNd whose weight the plan codes lossily, or
    the running mean of the BatchNorm that follows such a layer without bias (in forward order on the first batch
    of ``inputs``, as :func:`_repair` finds it). Otherwise :func:`constant_growth` itself. A random-weight
    MobileNetV2 (314 tensors, every running mean zero) at ``-b 3``: 28,211 bytes reserved for all of them, 14,300
    used by the repaired file (its 1 x 1 convolutions coded losslessly move nothing)."""
    settings = RepairSettings() if settings is None else settings
    names = set(stored)
    if settings.steps or settings.final_steps or not settings.bias_correction:
        return constant_growth(model, names, settings)
    order = forward_order(model, _check_inputs(inputs, model)[0])
    follower = {id(a): b for a, b in zip(order, order[1:])}
    named = {id(m): n for n, m in model.named_modules()}
    moved: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = mod_name + "." if mod_name else ""
        opts = next((options[prefix + n] for n in ("weight", "parametrizations.weight.original1",
                                                    "parametrizations.weight.original", "weight_v")
                     if prefix + n in options), None)
        if not isinstance(module, _biased()) or opts is None or opts.codec == "lossless":
            continue
        after = follower.get(id(module))
        if module.bias is not None:
            moved.add(prefix + "bias")
        elif isinstance(after, nn.modules.batchnorm._BatchNorm) and id(after) in named:
            moved.add((named[id(after)] + "." if named[id(after)] else "") + "running_mean")
    return constant_growth(model, names & moved, settings)


def _vector_bytes(slot: _Slot, array: np.ndarray, options: Mapping[str, EncodeOptions], executor) -> int:
    """Bytes of the blobs of a lossless ``slot``'s value ``array`` coded with its planned options."""
    return sum(len(b) for b in encode_tensor(array, slot.dtype, options[slot.name], executor=executor).blobs)


def _moving_vector(layer: _LayerFit | None, options: Mapping[str, EncodeOptions], settings: RepairSettings,
                   executor) -> tuple[_Slot, int] | None:
    """``(vector, planned bytes)`` for a layer whose least-squares bias will move a lossless vector (its bias, or
    the following BatchNorm's running mean) that does not hold one value (those the plan kept bytes for:
    :func:`constant_growth`), with ``settings.keep_size``; None otherwise (:func:`_fit_vector`)."""
    if layer is None or not settings.keep_size:
        return None
    vector = layer.bias if layer.bias is not None else layer.shift
    if vector is None or not vector.dtype.floating:
        return None
    flat = vector.original.reshape(-1)
    if flat.size < 2 or bool((flat == flat[0]).all()):
        return None
    return vector, _vector_bytes(vector, vector.original, options, executor)


#: The fewest significand bits :func:`_fit_vector` rounds a moved vector to (at most 2**-7 relative error an
#: element; the plan's own rounding of a vector is :data:`codec.rd.allocate.VECTOR_BITS`, 8).
VECTOR_FLOOR = 6


def _fit_vector(vector: _Slot, planned: int, room: int, options: Mapping[str, EncodeOptions], executor
                ) -> tuple[int, str | None]:
    """``(bytes, what was rounded or None)`` of a lossless ``vector`` the least-squares bias moved (its value the
    working model's), coded with its planned options: as it is where that is within its ``planned`` bytes and
    ``room`` (the credit), else with its significand rounded to fewer bits (not
    below :data:`VECTOR_FLOOR`): the whole vector a bit at a time, then, of the last bit, the fewest elements (a
    prefix) that bring it within. The working model then holds the rounded value, what a reader decodes (a value
    rounded to fewer bits than its options' is left as it is when they round it).

    A moved vector's bytes were not counted before: a conv autoencoder's ``fd.bias`` (3,136 floats, rounded to 8
    significand bits by the plan) coded in 5,059 bytes against its planned 4,807 once moved, and the file at
    ``-b 1`` ended 72 bytes over its budget, its last tensor coded by ``quant``, which has no cheaper step to
    pay. The whole of it at 7 bits coded in 4,653 (400 bytes of the budget unspent)."""
    limit = planned + max(0, room)
    value = to_numpy(vector.tensor)[0]
    nbytes = _vector_bytes(vector, value, options, executor)
    if nbytes <= limit:
        return nbytes, None
    opts = options[vector.name]
    bits = SIGNIFICAND.get(vector.dtype.name, 0) if opts.significand_bits is None else opts.significand_bits
    finer = (value if opts.significand_bits is None else round_significand(value, vector.dtype, bits)).reshape(-1)
    count, first = value.size, bits

    def mixed(k: int) -> np.ndarray:  # the first k elements rounded to ``bits``, the others as before
        return np.concatenate([coarser[:k], finer[k:]]).reshape(value.shape)

    while bits > VECTOR_FLOOR and nbytes > limit:
        bits -= 1
        coarser = round_significand(value, vector.dtype, bits).reshape(-1)
        got = _vector_bytes(vector, coarser.reshape(value.shape), options, executor)
        count = value.size
        if got <= limit:
            lo, hi = 0, value.size
            while hi - lo > 1:
                mid = (lo + hi) // 2
                size = _vector_bytes(vector, mixed(mid), options, executor)
                if size <= limit:
                    hi, got = mid, size
                else:
                    lo = mid
            coarser, count = mixed(hi).reshape(-1), hi
        finer, nbytes = coarser, got
    if bits == first:  # (at the floor already)
        return nbytes, None
    with torch.no_grad():
        vector.tensor.copy_(to_torch(finer.reshape(value.shape), vector.dtype.name))
    return nbytes, f"{vector.name} {bits} bits ({count} of {value.size} elements)"


def _receiver(queue: list[_Slot], options: Mapping[str, EncodeOptions], spare: int, executor, gptq: bool = True,
              work: nn.Module | None = None) -> tuple[_Slot | None, dict[str, int]]:
    """``(slot, planned)``: the lossy tensor that gets ``spare`` (the one with most elements, the first of equals),
    and the planned bytes of the ``quant`` tensors coded after it that GPTQ codes (``gptq``: a Linear or ConvNd's
    weight, or given the working model ``work``, a weight_norm ``v`` GPTQ codes too: :func:`_layer_of`), by name:
    what they may grow by is kept back from it and from the step-ups before them (:func:`_held`).
    Another ``quant`` tensor (a GRU's, an embedding's) is coded by plain rounding and cannot grow: nothing is held
    for it (a calibrated GRU of quant tensors only: nothing held, where 10 % of the GRU's bytes were)."""
    if spare <= 0 or not queue:
        return None, {}
    receiver = max(queue, key=lambda s: s.original.size)  # the first of the largest
    return receiver, {s.name: _code(s.name, s.original, s.dtype, options[s.name], executor)[1]
                      for s in queue[queue.index(receiver) + 1:]
                      if options[s.name].codec == "quant" and gptq and _gptq_codes(work, s)}


def _gptq_codes(work: nn.Module | None, slot: _Slot) -> bool:
    """Whether GPTQ codes ``slot`` (a ``quant`` tensor): a Linear / ConvNd weight, or (given the working model) a
    weight_norm / spectral_norm original whose layer's rows are its rows (:func:`_layer_of`)."""
    if work is None:
        return _is_layer_weight(slot)
    layer = _layer_of(work, slot)
    return layer is not None and layer.rows


def _held(later: Mapping[str, int]) -> int:
    """Bytes kept out of the step-ups (and from the spare's receiver) for the ``quant`` tensors still to code
    (``later``: their planned bytes), which have no cheaper step to pay for GPTQ's growth: :data:`RESERVE` of them."""
    return math.ceil(RESERVE * sum(later.values()))


def _text(opts: EncodeOptions) -> str:
    """A setting for a note: ``q5.27`` (JPEG), ``quant 5 bits``, or the codec's name."""
    if opts.codec == "jpeg":
        return ladder.text(opts)
    return f"quant {opts.bits} bits" if opts.codec == "quant" else opts.codec


def _is_dearer(opts: EncodeOptions, plan: EncodeOptions) -> bool:
    """Whether ``opts`` is a dearer setting of ``plan``'s codec (a finer JPEG table, more ``quant`` bits, a smaller
    JPEG XL distance)."""
    if opts.codec != plan.codec:
        return False
    if opts.codec == "jpeg":
        return ladder.scale_of(opts) < ladder.scale_of(plan)
    if opts.codec == "quant":
        return opts.bits > plan.bits
    return opts.codec == "jpegxl" and None not in (opts.distance, plan.distance) and opts.distance < plan.distance


def _dearer(opts: EncodeOptions) -> EncodeOptions | None:
    """The next dearer options of the same codec, :func:`_cheaper`'s inverse: JPEG quality + 1 (from a table scale,
    the next quality finer than it), ``quant`` one bit more (2 up to 8: 1-bit quant is a two-valued tensor's exact
    setting, :func:`codec.rd.allocate.candidates`, which a second bit would make inexact), JPEG XL distance / 1.1
    (None: no such step). :func:`_fit_size` then bisects the finer JPEG steps between."""
    if opts.codec == "jpeg" and opts.quality is not None and opts.quality < 100:
        return replace(opts, quality=opts.quality + 1, scale=None)
    if opts.codec == "quant" and 1 < opts.bits < 8:
        return replace(opts, bits=opts.bits + 1)
    if opts.codec == "jpegxl" and opts.distance is not None and opts.distance > 0.1:
        return replace(opts, distance=max(0.1, opts.distance / 1.1))
    return None


def _cheaper(opts: EncodeOptions) -> EncodeOptions | None:
    """The next cheaper options of the same codec: JPEG quality - 1 (from a table scale between two qualities, the
    coarser quality's own), JPEG XL distance x 1.1 (None: no such step). :func:`_fit_size` then bisects the finer
    JPEG steps between (:func:`codec.rd.ladder.between`).

    ``quant`` has none: one bit less is a coarse step (2 -> 1 bit destroys a
    small last layer for a few bytes); its growth is paid by the others.
    """
    if opts.codec == "jpeg" and opts.scale is not None:
        return replace(opts, scale=None)
    if opts.codec == "jpeg" and opts.quality is not None and opts.quality > 1:
        return replace(opts, quality=opts.quality - 1)
    if opts.codec == "jpegxl" and opts.distance is not None and opts.distance < 25.0:
        return replace(opts, distance=min(25.0, opts.distance * 1.1))
    return None


def _code_within(slot: _Slot, layer: _LayerFit | None, opts: EncodeOptions, settings: RepairSettings, executor,
                 credit: int, held: int = 0, paid_later: bool = True, pending: int = 0
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, EncodeOptions, int, int, Encoded]:
    """Choose and code one lossy tensor's target; ``(target, GPTQ's decoded or None, decoded, options, credit,
    bytes, the encoding)``.

    A ``jpeg`` layer weight is coded three ways within its size: with
    compensation blended back towards the weight, with full compensation
    at the next cheaper qualities, and without compensation (compensated
    values can code so much larger at a low quality that neither pays: the
    bench MLP's first layer at quality 8); the one with the smallest output
    error ``tr(dW H dW^T)`` on the layer's inputs is kept. Measured on the
    bench CNN at ``-b 0.6``: blending alone 88.81 %, a cheaper quality alone
    88.99 % (and 5 % under budget). Where the layer has unit sensitivities
    (``settings.prune``, ``rows`` mode), codings at higher qualities with
    pruned coefficients (:func:`_pruned`) are candidates too, and the error
    is weighted by the sensitivities, ``sum_j g_j dW_j H dW_j^T``. ``held``: bytes of ``credit`` kept for the
    tensors after this one, not spent on dearer options; ``paid_later``: whether a tensor after this one can step
    down to pay for an overrun, ``pending``: the spare not given yet (:func:`_fit_size`).
    """
    best = _fit_size(slot, layer, opts, settings, executor, credit, held=held, paid_later=paid_later, pending=pending)
    if layer is None or layer.h is None or opts.codec != "jpeg" or not (settings.compensate
                                                                         or layer.sensitivity is not None):
        return best
    current = layer._fitted if layer._fitted is not None else to_numpy(slot.tensor)[0]
    h = layer._h()
    rows = 1.0 if layer.sensitivity is None else np.sqrt(layer.sensitivity).reshape(-1, *(1,) * (current.ndim - 1))

    def error(c) -> float:
        # the candidate's decoded values widened, weighted and differenced in one float64 array of their own; what
        # compensation aims at (the refit or the weight itself) widened and weighted a band of rows at a time into
        # it, not as a whole float64 copy (all-MiniLM-L6-v2's FFN output: 4.7 MB less at the layer's peak). Each
        # element goes through the same operations as with whole arrays: the same differences, bit for bit.
        decoded = to_float64(c[2], slot.dtype)
        step = max(1, _BAND // max(1, math.prod(decoded.shape[1:])))
        for i in range(0, len(decoded), step):
            band, reference = decoded[i:i + step], to_float64(current[i:i + step], slot.dtype)
            if layer.sensitivity is not None:
                reference *= rows[i:i + step]
                band *= rows[i:i + step]
            np.subtract(band, reference, out=band)
            del band, reference
        return weighted_error(decoded, h)

    # Only codings within the size (a credit left >= 0) compete, by output error (the first of equals wins);
    # compensated values can outgrow even the cheapest quality: with none within, the one with the most credit
    # left. Memory: candidates are scored as they come and only the best so far is kept (each holds its target,
    # decoded values and GPTQ's decoded float64).
    best_error = error(best) if best[4] >= 0 else None
    slot.pruned = False

    def offer(c, pruned: bool = False) -> None:
        nonlocal best, best_error
        if c[4] >= 0:
            e = error(c)
            if best_error is None or e < best_error:
                best, best_error = c, e
                slot.pruned = pruned
        elif best_error is None and c[4] > best[4]:
            best = c
            slot.pruned = pruned

    if settings.compensate:
        offer(_fit_size(slot, layer, opts, replace(settings, compensate=False), executor, credit, held=held))
        # with a negative credit the first coding could not blend: the one without blending is that same coding
        if settings.keep_size and credit >= 0:
            offer(_fit_size(slot, layer, opts, settings, executor, credit, blend=False, held=held))
    if layer.sensitivity is not None:
        for c in _pruned(slot, layer, opts, settings, executor, credit):
            offer(c, pruned=True)
    return best


#: Qualities above the plan at which :func:`_pruned` codes a weight, in steps of :data:`PRUNE_STEP`.
PRUNE_SPAN = 10
PRUNE_STEP = 2
#: A pruned coding at the span's top that leaves at least this fraction of its limit unspent is followed by one at
#: :data:`PRUNE_SPAN` qualities above, and so on while they leave it (up to 100): a LoRA MLP's first layer, half
#: its units never active on the calibration inputs, coded at q40 in 40 % of its planned bytes, and the file at
#: ``-b 2`` ended 7.5 % under its budget, every later ``quant`` tensor at 8 bits.
PRUNE_UNDER = 0.02


def _pruned(slot: _Slot, layer: _LayerFit, opts: EncodeOptions, settings: RepairSettings, executor, credit: int
            ) -> Iterator[tuple[np.ndarray, None, np.ndarray, EncodeOptions, int, int, Encoded]]:
    """Candidate codings of a ``rows``-mode JPEG weight (as :func:`_code_within`'s): at qualities above the plan,
    its target without compensation (the refit or the weight: compensation adds high-frequency content that
    pruning would remove again; measured on the bench MLP, 0.097 against 0.065 weighted error) with the
    coefficients that matter least pruned to fit the plan's bytes plus ``credit`` (:func:`codec.rd.rdo.fit_pruned`;
    the slot's budget is set by a :func:`_fit_size` before). Where the span's top leaves :data:`PRUNE_UNDER` of that
    unspent, a span higher, and so on; where such a jump does not fit, the steps below it."""
    limit = slot.budget + credit
    inputs = np.clip(_diagonal(layer._h()), 0.0, None)
    quality, last = opts.quality + PRUNE_STEP, min(100, opts.quality + PRUNE_SPAN)
    fitted, jumped, back = None, False, False
    while quality <= last:
        higher = replace(opts, quality=quality, scale=None)
        target, _ = layer.target(higher, replace(settings, compensate=False))
        fit = fit_pruned(target, slot.dtype, higher, layer.sensitivity, inputs, limit,
                         lambda value: _code(slot.name, value, slot.dtype, higher, executor))
        if fit is not None:
            value, decoded, nbytes, encoded = fit
            fit = None
            yield value, None, decoded, higher, credit + slot.budget - nbytes, nbytes, encoded
            del value, decoded, encoded
            fitted = quality
            if quality == last < 100 and not back and nbytes < (1 - PRUNE_UNDER) * limit:
                last = quality = min(100, last + PRUNE_SPAN)  # far within at the span's top: a span above
                jumped = True
                continue
        elif jumped and not back and quality - fitted > PRUNE_STEP:  # the span above did not fit: the steps between
            back, last, quality = True, quality - PRUNE_STEP, fitted + PRUNE_STEP
            continue
        quality += PRUNE_STEP


def _fit_size(slot: _Slot, layer: _LayerFit | None, opts: EncodeOptions, settings: RepairSettings, executor,
              credit: int, blend: bool = True, held: int = 0, paid_later: bool = True, pending: int = 0
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, EncodeOptions, int, int, Encoded]:
    """Code one lossy tensor's target within its planned size (``settings.keep_size``); as :func:`_code_within`.

    ``credit`` is what the tensors coded before saved against their plan
    (negative: what they overran). With ``settings.keep_size``, a target
    that codes larger than the original value does with ``opts`` (what the
    allocator planned) plus the credit is first moved back towards the
    original (``original + a (target - original)``, the largest ``a`` of a
    short bisection that fits; not for GPTQ's pixels, which a blend would
    not keep), and when even the original does not fit,
    coded with :func:`_cheaper` options until it does. Returns the new credit. ``held``: bytes of the credit kept
    for the tensors coded after this one (GPTQ's growth of the ``quant`` tensors, :data:`RESERVE`): a step up
    (:func:`_stepped_up`) spends only what is beyond them. ``paid_later`` False: no tensor after this one can step
    down to pay for an overrun (none is ``jpeg`` or ``jpegxl``), so a GPTQ coding that does not fit the credit and
    ``pending`` (bytes of repair's spare not given yet, :func:`_receiver`), which has no cheaper step, gives way to
    the plain rounding of the layer's target, moved back towards the original until it fits (the original fits
    whenever the credit is not negative): the file stays within its budget.
    """
    budget = original = above = None
    while True:
        # a step that did not fit is dropped before the next is coded (all-MiniLM-L6-v2's FFN output at a cheaper
        # quality: its target and decoded values, 4.7 MB, besides the next step's compensation)
        target = assumed = decoded = encoded = None
        target, assumed, decoded, nbytes, encoded = _coded_target(slot, layer, opts, settings, executor)
        if not settings.keep_size:
            return target, assumed, decoded, opts, credit, nbytes, encoded
        if budget is None:  # the original value coded with the planned options: (options, decoded, bytes, encoding)
            original = (opts, *((decoded, nbytes, encoded) if _same_bytes(target, slot.original)
                                else _code(slot.name, slot.original, slot.dtype, opts, executor)))
            budget = slot.budget = original[2]
        if nbytes <= budget + credit:
            # stepped down: the finest step between that fits; else dearer steps while they fit (a list table's
            # index bytes counted against the plan's)
            planned = ladder.table_bytes(original[3].codec, slot.index_zstd)
            fits = (target, assumed, decoded, opts, nbytes, encoded)
            if above is not None:
                target, assumed, decoded, opts, nbytes, encoded = _finest(
                    slot, layer, settings, executor, above, fits, budget + credit, planned)
            elif settings.step_up and budget + credit - held - nbytes >= STEP_UP_FROM * nbytes:
                target, assumed, decoded, opts, nbytes, encoded = _stepped_up(
                    slot, layer, settings, executor, fits, budget + credit - held, planned)
            return target, assumed, decoded, opts, credit + budget - nbytes, nbytes, encoded
        if blend and (assumed is None or opts.codec == "jpeg") and credit >= 0:  # the original fits: move back
            coded = original[1:] if original[0] == opts else None
            assumed = decoded = encoded = original = None  # (the target's coding does not serve the blend)
            target, decoded, nbytes, encoded = _blend(slot, target, opts, executor, budget + credit, coded)
            return target, None, decoded, opts, credit + budget - nbytes, nbytes, encoded
        if not paid_later and assumed is not None and opts.codec == "quant" and credit + pending >= 0 \
                and nbytes > budget + credit + pending:
            target = assumed = decoded = encoded = None  # GPTQ's pixels do not blend: its rounding gives way
            slot.rounded = True
            fit = _fit_size(slot, layer, opts, replace(settings, gptq=False), executor, credit + pending, blend,
                            held + pending)
            return (*fit[:4], fit[4] - pending, *fit[5:])
        cheaper = _cheaper(opts)
        if cheaper is None:
            return target, assumed, decoded, opts, credit + budget - nbytes, nbytes, encoded
        above, opts = opts, cheaper
        # Cheaper steps follow: what only the planned options' coding served goes before they are coded. The
        # original's decoded values serve a blend, which cannot follow (the same test failed); the plan's
        # compensated target (_LayerFit.target) is asked again only by _code_within's coding without blending,
        # made with a credit >= 0, with which its first coding blends instead of stepping down (were it asked, it
        # would be made again, the same bits). All-MiniLM-L6-v2's FFN output: 4.7 MB while the steps are coded.
        if not (blend and credit >= 0):
            original = (original[0], None, *original[2:])
        if layer is not None:
            layer.forget_compensated()


def _coded_target(slot: _Slot, layer: _LayerFit | None, opts: EncodeOptions, settings: RepairSettings, executor
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int, Encoded]:
    """``(target, GPTQ's decoded or None, decoded, bytes, encoding)``: the slot's target for ``opts`` (the layer's,
    else the working model's tensor), coded with them."""
    # a view: the working model's tensor takes its decoded values as new storage (_take), not written into
    target, assumed = to_numpy(slot.tensor)[0], None
    if layer is not None:
        target, assumed = layer.target(opts, settings)
    return target, assumed, *_code(slot.name, target, slot.dtype, opts, executor)


def _finest(slot: _Slot, layer: _LayerFit | None, settings: RepairSettings, executor, above: EncodeOptions,
            fits: tuple, limit: int, planned: int = 0) -> tuple:
    """Keep-size's step down made fine: ``fits`` (``(target, assumed, decoded, options, bytes, encoding)``) is
    coded one step of :func:`_cheaper` below ``above``, which did not fit ``limit`` bytes; the JPEG steps of
    :func:`codec.rd.ladder.between` them are bisected for the dearest that fits (a 127-byte overrun then costs
    the BatchNorm CNN's fc1 a fraction of a quality, not q5 -> q4). Returns the same tuple, its bytes with what a
    step's list table adds to the index beyond the plan's (:func:`_cost`)."""
    steps = ladder.between(fits[3], above, FINE_STEP) if above.codec == "jpeg" else []
    fits = (*fits[:4], _cost(fits[4], fits[5], planned, slot.index_zstd), fits[5])
    lo, hi = -1, len(steps)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        target = assumed = decoded = encoded = None  # a step that did not fit: dropped before the next is coded
        target, assumed, decoded, nbytes, encoded = _coded_target(slot, layer, steps[mid], settings, executor)
        nbytes = _cost(nbytes, encoded, planned, slot.index_zstd)
        if nbytes <= limit:
            lo, fits = mid, (target, assumed, decoded, steps[mid], nbytes, encoded)
        else:
            hi = mid
    return fits


def _cost(nbytes: int, encoded: Encoded, planned: int, compressed: bool = False) -> int:
    """A coding's bytes against its plan's: its blobs and the index bytes of its list table
    (:func:`codec.rd.ladder.table_bytes`) beyond those of the plan's (``planned``). A coding without one is not
    credited with the plan's: in a compressed index (format 1.3) a list table takes a few bytes, not the 250 of
    its JSON, so that credit could put the file over its budget. ``compressed``: the index will be compressed, the
    table counted (and ``planned`` given) as :func:`codec.rd.ladder.table_bytes` counts it there."""
    return nbytes + max(0, ladder.table_bytes(encoded.codec, compressed) - planned)


def _stepped_up(slot: _Slot, layer: _LayerFit | None, settings: RepairSettings, executor, fits: tuple,
                limit: int, planned: int = 0) -> tuple:
    """Keep-size's step up: ``fits`` (``(target, assumed, decoded, options, bytes, encoding)``) fits ``limit`` bytes
    with credit to spare; the slot is coded with :func:`_dearer` options while they fit (its target for each:
    refit, GPTQ or compensation are redone for them), and between the dearest that fits and the first that does
    not, the JPEG ladder's steps are bisected (:func:`_finest`). Returns the same tuple, its bytes as
    :func:`_cost` counts them."""
    up = _dearer(fits[3])
    while up is not None and limit - _cost(fits[4], fits[5], planned, slot.index_zstd) >= STEP_UP_FROM * fits[4]:
        target, assumed, decoded, nbytes, encoded = _coded_target(slot, layer, up, settings, executor)
        if _cost(nbytes, encoded, planned, slot.index_zstd) > limit:
            return _finest(slot, layer, settings, executor, up, fits, limit, planned)
        fits, up = (target, assumed, decoded, up, nbytes, encoded), _dearer(up)
    return (*fits[:4], _cost(fits[4], fits[5], planned, slot.index_zstd), fits[5])


def _blend(slot: _Slot, target: np.ndarray, opts: EncodeOptions, executor, limit: int,
           coded: tuple[np.ndarray, int, Encoded] | None = None, steps: int = 5
           ) -> tuple[np.ndarray, np.ndarray, int, Encoded]:
    """``(value, decoded, bytes, encoding)``: the point nearest ``target`` between the original and it that codes in
    ``limit`` (``coded``: the original already coded with ``opts``, as :func:`_code` gives).

    Each point is made a band of rows at a time from the original and ``target`` in storage form (widened, blended
    and rounded back elementwise: the same bits as whole float64 arrays), so no float64 copy of the weight is held:
    all-MiniLM-L6-v2's FFN output, 4.7 MB each, three at a time (the original, the way to ``target``, a point)."""
    best = (slot.original, *(coded or _code(slot.name, slot.original, slot.dtype, opts, executor)))
    rows = slot.original.reshape(len(slot.original), -1) if slot.original.ndim else slot.original.reshape(1, 1)
    towards = target.reshape(rows.shape)
    step = max(1, _BAND // max(1, rows.shape[1]))

    def point(mid: float) -> np.ndarray:  # from_float64(original + mid * (target - original)), a band at a time
        value = np.empty(rows.shape, slot.original.dtype)
        for i in range(0, len(rows), step):
            original = to_float64(rows[i:i + step], slot.dtype)
            toward = to_float64(towards[i:i + step], slot.dtype) - original
            value[i:i + step] = from_float64(original + mid * toward, slot.dtype)
        return value.reshape(slot.original.shape)

    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        value = decoded = encoded = None  # a point that did not fit: dropped before the next is made
        value = point(mid)
        decoded, nbytes, encoded = _code(slot.name, value, slot.dtype, opts, executor)
        if nbytes <= limit:
            lo, best = mid, (value, decoded, nbytes, encoded)
        else:
            hi = mid
    return best


def _prunes(opts: EncodeOptions, slot: _Slot, settings: RepairSettings) -> bool:
    """Whether repair prunes the coding of ``slot`` (:func:`codec.rd.rdo.applies`): in ``rows`` mode, or in grid
    tiles with ``settings.prune_grid``."""
    rows = opts.row_shape is not None and math.prod(opts.row_shape) == math.prod(slot.original.shape[1:])
    return applies(opts, slot.original.shape, slot.dtype) and (rows or settings.prune_grid)
