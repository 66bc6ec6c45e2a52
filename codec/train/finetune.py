"""Codec-in-the-loop fine-tuning: the forward pass sees the weights exactly as the file will hold them.

Each step codes every floating tensor of the model with the real encoder of its setting and decodes it
(:func:`codec.tensorcodec.round_trip` on the storage form: the values the file ``codec.save`` writes decodes to,
bit for bit, without its entropy coding's optimisation, which does not change them), runs the model with those
values in its tensors and passes the gradient straight through to the float weights (exactly the coded values
forward and backward, the gradient at them added to ``w``'s, then ``w`` back in place for the optimizer). The float
weights keep the small updates that rounding would erase, and the model adapts to its file.

Two options lower the cost and the rate (measured in bench/results/train_mlp.md):

* ``refresh=k`` codes the weights every k-th step only; in between the forward pass sees ``w + r`` with the
  residual ``r = coded - w`` of the last coding (still straight through): on the bench MLP an epoch costs about
  1.25x a plain one at k=4 against 1.7x at k=1, and lost less accuracy. The last forward pass (the reported loss)
  codes again, so the file still holds what it saw.
* ``vector_bits=b`` rounds each significand of the tensors the file must store losslessly for their shape (biases,
  norms: the lossy codecs need a matrix, spec 6.1) to ``b`` bits in the forward pass, and writes the rounded values
  into the model at the end: the file stores them exactly and the zeroed low bits cost next to nothing (a 512-value
  float32 bias: about 1.9 KB lossless, about 0.75 KB at 4 bits). Encoder-side only: the decoder is the lossless one.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call

from ..api import _sharing
from ..errors import EncodeError
from ..parallel import steady_heap
from ..rd.calibrate import keywords as _keywords
from ..rd.repair.losses import _flat
from ..tensorcodec import EncodeOptions, Overrides, not_applied, round_trip
from .budget import Budget, as_budget
from .rate import as_setting

__all__ = ["NotKeptWarning", "as_overrides", "coded_weights", "finetune", "tile_bounds", "tile_keeper"]


class NotKeptWarning(UserWarning):
    """:func:`finetune` restored the starting weights: fine-tuning did not lower the check loss of the coded model
    (the message says on which batches, and both losses)."""


#: :func:`finetune` checks the coded model this many times in a run by default (``check_every``), keeping the best.
CHECKS = 5

#: Per-tensor settings as codec.save takes them: ``{glob: setting}`` or ``[(glob, setting), ...]``.
OverrideRules = Mapping[str, str] | Sequence[tuple[str, str]] | None


def coded_weights(model: torch.nn.Module, setting: EncodeOptions | str | Mapping | None = None,
                  names: Iterable[str] | None = None, overrides: Overrides | OverrideRules = None,
                  vector_bits: int | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the model's state_dict as ``codec.save(model, path, overrides=overrides, **fields of
    setting)`` stores it, decoded (no gradients): what :func:`codec.load` will give. ``overrides``: per-tensor
    settings by glob, as codec.save takes them (the last match wins). ``names`` limits it to some tensors.
    ``vector_bits``: the floating tensors stored losslessly for their shape with their significands rounded to
    that many bits (:func:`round_vector`: what the file holds once :func:`finetune` wrote them back)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"coded_weights: model must be a torch.nn.Module, not {type(model).__name__}")
    vector_bits = _check_vector_bits(vector_bits)
    opts, rules = as_setting(setting), as_overrides(overrides, setting)
    state = model.state_dict()
    return _code_planned(state, _coding_plan(state, opts, rules, vector_bits, names), vector_bits)


#: One entry of :func:`_coding_plan`: ``(name, the name whose coding it takes, its options, how it is coded)``.
Planned = tuple[str, str, EncodeOptions, str]


def _coding_plan(state: Mapping[str, torch.Tensor], opts: EncodeOptions, rules: Overrides,
                 vector_bits: int | None, names: Iterable[str] | None = None) -> list[Planned]:
    """How :func:`coded_weights` codes each of ``names`` (default: all) of ``state``: a tied name (lm_head.weight
    = embed.weight) takes its target's coding (stored once), each target its options under ``rules`` and one of
    ``"code"`` (the real encode/decode), ``"round"`` (a vector rounded to ``vector_bits``) or ``"copy"`` (stored
    losslessly). It depends on the names, shapes, dtypes and ties only, so a loop plans once per setting."""
    target = _sharing(state)[0]
    plan = []
    for name in state.keys() if names is None else names:
        first = target.get(name, name)
        o = rules.options_for(first, opts) or opts
        t = state[first]
        if not (o.codec == "lossless" or _lossless_for_shape(t, o)):
            how = "code"
        else:
            how = "round" if vector_bits and _rounds(t, o) else "copy"
        plan.append((name, first, o, how))
    return plan


def _code_planned(state: Mapping[str, torch.Tensor], plan: Sequence[Planned], vector_bits: int | None = None,
                  buffers: dict[int, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """``{name: decoded tensor}`` of ``state`` (a state_dict, or the model's own tensors) coded by ``plan``
    (:func:`_coding_plan`): what :func:`coded_weights` returns. ``buffers`` (a dict, optional): the coded tensors'
    values are written into arrays kept there per tensor, reused at the next call (a loop's codings: the tensors
    returned by one call are overwritten by the next)."""
    coded: dict[str, torch.Tensor] = {}
    for name, first, o, how in plan:
        if first not in coded:
            t = state[first]
            coded[first] = (_round_trip(t, o, buffers) if how == "code" else round_vector(t, vector_bits)
                            if how == "round" else t.detach().clone())
        coded[name] = coded[first]
    return {name: coded[name] for name, *_ in plan}


def round_vector(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` (a floating tensor) with each significand rounded to ``bits`` bits after the leading one, as the
    update encoder rounds a vector's difference (:func:`codec.dtypes.round_significand`): a value the
    lossless codec stores in few bytes. A copy, on ``t``'s device."""
    from ..api import to_numpy, to_torch
    from ..dtypes import get_dtype, round_significand

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"round_vector: t must be a torch.Tensor, not {type(t).__name__}")
    if _check_vector_bits(bits) is None:
        raise ValueError("round_vector: bits must be an integer from 1 to 22, not None")
    array, name = to_numpy(t.detach())
    return to_torch(round_significand(array, get_dtype(name), bits), name).to(t.device).clone()


def _lossless_for_shape(t: torch.Tensor, opts: EncodeOptions) -> bool:
    """True if the file stores ``t`` losslessly whatever ``opts`` asks (a vector, a small matrix, not floating)."""
    from ..api import TORCH_DTYPES
    from ..dtypes import get_dtype

    reason = not_applied(tuple(t.shape), get_dtype(TORCH_DTYPES[t.dtype]), opts) if t.dtype in TORCH_DTYPES else None
    return (reason or "").startswith("stored losslessly")


def _coded_as(t: torch.Tensor, opts: EncodeOptions) -> str:
    """The codec the file really codes ``t`` with under ``opts``: ``"lossless"`` for what it stores exactly,
    ``"quant"`` for a matrix too small for an image codec (8-bit quant, :func:`codec.tensorcodec.not_applied`),
    else ``opts.codec``."""
    from ..api import TORCH_DTYPES
    from ..dtypes import get_dtype

    if opts.codec == "lossless" or t.dtype not in TORCH_DTYPES:
        return "lossless"
    reason = not_applied(tuple(t.shape), get_dtype(TORCH_DTYPES[t.dtype]), opts) or ""
    return "lossless" if reason.startswith("stored losslessly") else \
        "quant" if reason.startswith("coded as 8-bit quant") else opts.codec


def _rounds(t: torch.Tensor, opts: EncodeOptions) -> bool:
    """True if ``vector_bits`` applies to ``t``: floating, stored losslessly for its shape, not asked lossless."""
    return t.is_floating_point() and opts.codec != "lossless" and _lossless_for_shape(t, opts)


def round_vectors(model: torch.nn.Module, bits: int, setting: EncodeOptions | str | Mapping | None = None,
                  overrides: Overrides | OverrideRules = None) -> list[str]:
    """Round, in place, each floating tensor of ``model``'s state_dict that the file stores losslessly for its shape
    under ``setting`` and ``overrides`` (biases, norms, small matrices; not those asked "lossless") to ``bits``
    significand bits (:func:`round_vector`), as :func:`finetune` does with ``vector_bits``; also usable after plain
    training (the loss is then not trained away). Returns their names."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"round_vectors: model must be a torch.nn.Module, not {type(model).__name__}")
    if _check_vector_bits(bits) is None:
        raise ValueError("round_vectors: bits must be an integer from 1 to 22, not None")
    opts, rules = as_setting(setting), as_overrides(overrides, setting)
    done = []
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if _rounds(t, rules.options_for(name, opts) or opts):
                t.copy_(round_vector(t, bits))
                done.append(name)
    return done


def tile_bounds(t: torch.Tensor, opts: EncodeOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, hi, pinned, start)`` per element of ``t``, a tensor ``opts`` codes lossily (``quant`` or ``jpeg``): its
    tile's minimum and maximum, whether it is one of them, and its value now (tensors of ``t``'s shape and device).

    The encoder derives each tile's offset and scale from the tile's range and rounds them to ``opts.params``
    (bfloat16: steps of 0.4 %), so a tiny move of a tile's extreme element shifts every value of the tile at once,
    which a straight-through gradient cannot see (measured on the repair tests' tiny model: fine-tuning at lr 1e-5
    raised the output error on its own training batches). Keeping the extremes and clamping the rest into the
    range (:func:`tile_keeper`) keeps the mapping fixed, as :func:`codec.rd.gptq.jpeg_target` does.
    """
    from ..api import to_numpy
    from ..dtypes import get_dtype, to_float64
    from ..rd.gptq import tile_index, tile_range
    from ..tiling import plan_tiling

    array, name = to_numpy(t.detach())
    w = to_float64(array, get_dtype(name))
    matrix = w.reshape(w.shape[0], -1)
    tiles = plan_tiling(matrix.shape[0], matrix.shape[1], opts.tile, opts.row_shape, opts.params)
    tile_of = tile_index(tiles)
    lo, hi = (v[tile_of].reshape(w.shape) for v in tile_range(matrix, tile_of, tiles.n_tiles))
    return (torch.from_numpy(lo).to(t.dtype).to(t.device), torch.from_numpy(hi).to(t.dtype).to(t.device),
            torch.from_numpy((w == lo) | (w == hi)).to(t.device), t.detach().clone())


def tile_keeper(tensors: Iterable[tuple[torch.Tensor, EncodeOptions]]) -> Callable[..., None]:
    """A function (an optimizer step hook: ``optimizer.register_step_post_hook(tile_keeper(...))``) that puts each
    ``(tensor, options)``'s tile extremes back where they are now and clamps its other values into their tile's
    range, in place, so that every tile keeps the offset and scale the encoder gives it now (:func:`tile_bounds`).
    Used by :func:`finetune` with ``keep_tiles=True`` and by repair's fine-tuning stage (codec.rd.repair)."""
    bounds = [(t, *tile_bounds(t, opts)) for t, opts in tensors]

    def hook(*_) -> None:
        with torch.no_grad():
            for t, lo, hi, pinned, start in bounds:
                t.copy_(torch.where(pinned, start, torch.minimum(torch.maximum(t, lo), hi)))

    return hook


def _check_vector_bits(bits) -> int | None:
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 22):
        raise ValueError(f"vector_bits must be None or an integer from 1 to 22, not {bits!r}")
    return bits


def as_overrides(overrides: Overrides | OverrideRules, setting=None) -> Overrides:
    """:class:`codec.tensorcodec.Overrides` of ``overrides`` (None, a mapping or a list of ``(glob, setting)``),
    every setting checked against ``setting`` (a bad one is a one-line ValueError here, not mid-training)."""
    if isinstance(overrides, Overrides):
        rules = overrides
    elif overrides is None or isinstance(overrides, Mapping) or (
            isinstance(overrides, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == 2
                                                          for r in overrides)):
        rules = Overrides(overrides)
    else:
        raise TypeError(f"overrides must be a mapping or a list of (glob, setting) pairs, "
                        f"not {type(overrides).__name__}")
    try:
        rules.check(as_setting(setting))
    except EncodeError as exc:
        raise ValueError(f"overrides: {exc}") from None
    return rules


def _round_trip(t: torch.Tensor, opts: EncodeOptions, buffers: dict[int, np.ndarray] | None = None) -> torch.Tensor:
    """The real encode/decode of ``t``, a tensor ``opts`` codes lossily: the values the file decodes to
    (:func:`codec.tensorcodec.round_trip`), a new tensor on ``t``'s device; with ``buffers``, a tensor sharing the
    array kept there for ``t`` (see :func:`_code_planned`)."""
    from ..api import to_numpy, to_torch
    from ..dtypes import get_dtype

    array, name = to_numpy(t.detach())
    out = None
    if buffers is not None:
        out = buffers.get(id(t))
        if out is None or out.shape != array.shape or out.dtype != array.dtype:
            out = buffers[id(t)] = np.empty_like(array)
    decoded = round_trip(array, get_dtype(name), opts, out)  # a new array (or out): the tensor made from it is its own
    return to_torch(decoded, name).to(t.device)


def _batches(data, what: str = "data") -> Iterable:
    """Batches of ``data``: a tensor or numpy array (one batch), a mapping of them (one batch of keyword inputs: a
    tokenizer's output) or an iterable of batches (re-iterated for each pass)."""
    if isinstance(data, (torch.Tensor, np.ndarray, Mapping)):
        return [data]
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return data
    raise TypeError(f"finetune: {what} must be a tensor, an array, a mapping of them (a tokenizer's output) or an "
                    f"iterable of batches, not {type(data).__name__}")


def _quiet_postfix(bar) -> dict:
    """``{"refresh": False}`` for a bar whose ``set_postfix`` takes it (tqdm's), else ``{}``: the step's loss is then
    shown when the bar next redraws, where set_postfix would redraw the whole bar at every step (24 us of CPU a step
    into a file; ``update`` redraws every 0.1 s)."""
    try:
        return {"refresh": False} if "refresh" in inspect.signature(bar.set_postfix).parameters else {}
    except (AttributeError, TypeError, ValueError):  # no bar, no set_postfix, or no signature to read
        return {}


def _tensor(value):
    """A numpy array as a tensor (sharing its memory); anything else as it is."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _run(model, inputs, params=None):
    """``model``'s output on ``inputs``: ``model(**keywords)`` for a mapping (a tokenizer's output; the keys its
    forward takes, :func:`codec.rd.calibrate.keywords`), else ``model(inputs)``; with ``params``, through
    :func:`torch.func.functional_call`."""
    given = _keywords(model, inputs) if isinstance(inputs, Mapping) else None
    if params is None:
        return model(inputs) if given is None else model(**given)
    if given is not None:
        return functional_call(model, params, (), dict(given))
    return functional_call(model, params, (inputs,))


def _distillation(out, target: list[torch.Tensor]) -> torch.Tensor:
    """The distillation loss: the mean over the output's floating tensors (:func:`codec.rd.calibrate.floating_outputs`,
    repair's own: a ModelOutput's ``logits``, ``last_hidden_state``, ...; not its ``loss``) of the mean squared error
    against the teacher's (``target``, its floating tensors)."""
    got = _flat(out)
    if not got or len(got) != len(target):
        raise TypeError(f"finetune: the model's output ({type(out).__name__}) holds no floating tensor to distil"
                        if not got else f"finetune: the model's output holds {len(got)} floating tensors, the "
                        f"original's {len(target)}")
    return sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(got, target, strict=True)) / len(got)


def _check_batches(batches: Iterable, validation) -> tuple[Iterable, list | None, str]:
    """``(training batches, check batches or None, where)`` for ``validation`` (see :func:`finetune`): None holds
    out every 4th batch of ``batches`` (:func:`codec.rd.repair.held_out`; with fewer than 4 the check is on all of
    them, which then all train), False checks nothing, batches are the check's."""
    from ..rd.repair import HOLDOUT_EVERY, held_out

    if validation is False:
        return batches, None, ""
    if validation is None:
        batches = list(batches)
        held = set(held_out(len(batches)))
        if not held:
            return batches, batches, (f"the training batches (fewer than {HOLDOUT_EVERY}: none held out; "
                                      f"validation= takes batches of your own)")
        return ([b for i, b in enumerate(batches) if i not in held], [batches[i] for i in sorted(held)],
                f"{len(held)} held-out batches")
    if isinstance(validation, bool):
        raise TypeError("finetune: validation must be None, False, a tensor or an iterable of batches, not True")
    check = list(_batches(validation, "validation"))
    if not check:
        raise ValueError("finetune: validation holds no batches")
    return batches, check, f"{len(check)} validation batches"


def _split(batch) -> tuple[object, tuple]:
    """``(inputs, rest)``: a batch is the inputs, or a tuple/list whose first item is the inputs. Inputs that are a
    mapping (a tokenizer's output: ``input_ids``, ``attention_mask``, ...) are passed as ``model(**inputs)``; numpy
    arrays (the inputs, a mapping's values, the targets) become tensors."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("finetune: an empty batch")
        inputs, rest = batch[0], tuple(map(_tensor, batch[1:]))
    else:
        inputs, rest = batch, ()
    if isinstance(inputs, Mapping):
        if not inputs:
            raise ValueError("finetune: a batch that is an empty mapping")
        return {k: _tensor(v) for k, v in inputs.items()}, rest
    return _tensor(inputs), rest


def finetune(model: torch.nn.Module, data, loss_fn: Callable[..., torch.Tensor] | None = None,
             setting: EncodeOptions | str | Mapping | None = None, steps: int = 100,
             lr: float | Callable[[int], float] = 1e-4,
             progress=False, overrides: Overrides | OverrideRules = None, refresh: int = 1,
             vector_bits: int | None = None, optimizer: torch.optim.Optimizer | None = None,
             train_mode: bool | None = None, keep_tiles: bool = False, validation=None,
             check_every: int | None = None,
             penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None,
             budget: Budget | float | None = None, teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    """Fine-tune ``model`` in place, ``steps`` Adam steps at ``lr``, with every tensor coded as ``setting`` stores
    it (see :func:`codec.train.as_setting`; ``overrides``: per-tensor settings by glob, as codec.save takes them;
    save afterwards with the same options and overrides) in the forward pass.

    ``data``: a tensor (or numpy array) of inputs, one batch; a mapping of them (a tokenizer's output), one batch
    passed as ``model(**batch)`` (a ``forward(self, batch)`` that reads the mapping itself gets it whole); or an
    iterable of batches (cycled), each the inputs (a tensor, an array or such a mapping) or ``(inputs, *targets)``.
    ``loss_fn(outputs, *targets)``: the loss; None distils the original model's outputs (mean squared error of
    the outputs, no labels needed; of a Hugging Face ``ModelOutput``, a dict or a tuple: the mean of the MSEs of
    its floating tensors, such as ``logits`` or ``last_hidden_state``, not its ``loss``); the original model is
    ``teacher`` when given (a model of the same inputs, run in eval mode without gradients: distillation that
    starts from other weights than the teacher's, such as a calibrated file's repaired values), else a copy of
    ``model`` as it is at the start; the teacher's mode and the model's are the caller's again at the end, also when
    the loop raises or is interrupted. ``loss_fn`` runs while the model's tensors hold the coded values, so a term
    on the weights read from the model there (``codec.train.rate(model)``, a norm) would be the coded values' and
    pull on what the coding keeps (bench/JOURNAL.md, twelfth pass: 2-6 points on the CNN). Such a term belongs in
    ``penalty(model)``: called each step after the forward and backward passes, with the model holding its float
    weights again, its value (a scalar tensor) is added to the step's loss and its gradient to the weights'
    (``penalty=lambda m: lam * codec.train.rate(m)``); the check below leaves it out (it judges the coded model's
    loss alone). ``progress``: True for a progress bar of its own, or a tqdm bar to update
    once a step. ``refresh``: code the weights every ``refresh`` steps, in between the residual of the last
    coding straight through (1: every step). ``vector_bits``: round the tensors stored losslessly for their shape
    (biases) to that many significand bits, in the loop and in the model at the end (None: kept as they are).
    ``train_mode``: run the model in training mode (dropout on, BatchNorm on batch statistics) or in eval mode;
    None (default) trains in training mode with a ``loss_fn`` and in eval mode when distilling, where the student
    has to match the teacher's deterministic outputs (with dropout on, it chases dropout noise instead: on
    all-MiniLM-L6-v2 that erased the whole gain of distillation, bench/JOURNAL.md). The model's own mode is
    restored at the end. ``keep_tiles``: after every optimizer step, put each trained lossy tensor's tile extremes
    back where they were at the start and clamp its other values into their tile's range (:func:`tile_keeper`), so
    the tiles keep their offset/scale and the straight-through gradient sees the quantization grid the file uses.
    For short, small-step fine-tuning (repair's stage, codec.rd.repair); not for training: over an epoch at lr 1e-3
    the weights outgrow the ranges they started with, and with the ranges held the tiles fill them, so the same
    JPEG quality costs about twice the bits (bench/JOURNAL.md, "Training for the codec (fifth pass)").

    **The check** (``validation``): fine-tuning on few samples can fit them and make the file worse than coding the
    model as given (measured: a ResNet-like net distilled on 2,000 images, 60 steps at lr 3e-4, 86.27 % at 3 bits
    against 88.09 % as given; checked, 88.94 %: bench/JOURNAL.md, ninth pass).
    So finetune measures a check loss (``loss_fn``'s, or the distillation loss) of the model *as the file decodes
    it* (``coded_weights`` at this setting, ``vector_bits`` included, the model in eval mode) before the first step,
    every ``check_every`` steps and after the last, and ends on the weights that scored best: when
    no fine-tuned weights beat the starting ones it restores them (vectors rounded with ``vector_bits``) and warns
    with a :class:`NotKeptWarning` naming both losses (``warnings.catch_warnings(record=True)`` collects it, a
    ``"error"`` filter turns it into an exception). ``validation=None`` (default) holds out every 4th batch of
    ``data`` (``data`` is then read into a list once; with fewer than 4 batches nothing is held out and the check
    runs on the training batches, which catches a diverging run but not overfitting); ``validation=batches`` (the
    same form as ``data``) checks on those and trains on all of ``data``; ``validation=False`` checks nothing (a
    training loop that calls finetune each epoch with its own validation, as bench/train.py does).
    ``check_every=k``: check after every k-th step (None, default: :data:`CHECKS` times in the run; ``steps``: at
    the end only), so a run that first helps and then overfits ends on its best weights (early stopping; the
    optimizer's state is not rolled back).

    **A budget** (``budget``: a number of bits per weight, or a :class:`codec.train.Budget` for its options): the
    JPEG quality of one tensor (default: the largest one coded as JPEG) is chosen on the fine ladder in the loop so
    that the whole file (every blob and the container, as ``codec.save`` writes it; a tied tensor once) stays just
    within the budget: searched before the first step, moved by a bounded ladder step at a measurement (every
    ``Budget.every`` steps; by default at an interval chosen from the timed costs of a step and a measurement, so
    that measuring takes at most ``codec.train.budget.SHARE``, 10 %, of the loop's time), held over the last
    ``Budget.hold`` of the steps, and stepped down after the last step only if the file is then over the budget. A
    budget below the file the loop starts from (a fresh model) trains
    anyway: from the setting's quality (``Budget(start="setting")``, the default) or the coarsest
    (``start="coarsest"``), one step down per measurement while the file is over. Save with the Budget's
    ``overrides`` (``budget.save(model, path)``): that file decodes to the weights of the last forward pass; if the
    file is still over the budget at the end, ``budget.within`` is False and ``budget.save`` refuses, naming the
    size reached and the smallest budget that fits. The checks above judge each weights at the quality of their
    time.

    Returns the model, with its float weights (its rounded vectors with ``vector_bits``); the file saved from it
    with the same setting decodes to exactly the weights of the last forward pass (``coded_weights(model,
    setting)``), which is coded afresh after the last update (and the check) to report the final loss.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"finetune: model must be a torch.nn.Module, not {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"finetune: loss_fn must be callable or None, not {type(loss_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"finetune: steps must be a non-negative integer, not {steps!r}")
    if not callable(lr) and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"finetune: lr must be a positive number or a function of the step, not {lr!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"finetune: optimizer must be a torch.optim.Optimizer or None, not {type(optimizer).__name__}")
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(f"finetune: refresh must be a positive integer, not {refresh!r}")
    if train_mode is not None and not isinstance(train_mode, bool):
        raise TypeError(f"finetune: train_mode must be True, False or None, not {type(train_mode).__name__}")
    if not isinstance(keep_tiles, bool):
        raise TypeError(f"finetune: keep_tiles must be True or False, not {type(keep_tiles).__name__}")
    if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                    or check_every < 1):
        raise ValueError(f"finetune: check_every must be None or a positive integer, not {check_every!r}")
    if check_every is not None and validation is False:
        raise ValueError("finetune: check_every needs a check, and validation is False")
    if penalty is not None and not callable(penalty):
        raise TypeError(f"finetune: penalty must be callable or None, not {type(penalty).__name__}")
    if teacher is not None and not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"finetune: teacher must be a torch.nn.Module or None, not {type(teacher).__name__}")
    if teacher is not None and loss_fn is not None:
        raise ValueError("finetune: teacher is the model distilled when loss_fn is None; with a loss_fn it is not "
                         "used (pass one or the other)")
    if teacher is not None and teacher is model:
        raise ValueError("finetune: teacher must not be the model being fine-tuned (its weights change)")
    try:
        vector_bits = _check_vector_bits(vector_bits)
    except ValueError as exc:
        raise ValueError(f"finetune: {exc}") from None
    budget = as_budget(budget)
    steady_heap()  # no heap trimmed and faulted back at every step (codec.parallel.steady_heap)
    opts, rules = as_setting(setting), as_overrides(overrides, setting)
    if budget is not None:  # the quality that fits, searched before training (none fits: the start's quality)
        rules = budget.start(model, opts, rules, vector_bits)
        tracked_until = steps - round(budget.hold * steps)
    batches, check, where = _check_batches(_batches(data), validation)
    was_training = model.training  # the caller's modes, back at the end and when anything raises (Ctrl-C too)
    teacher_mode = teacher.training if loss_fn is None and teacher is not None else None
    own_bar, bar = False, None
    try:
        if loss_fn is None and teacher is not None:  # the caller's: evaluated without gradients, its mode restored
            teacher.eval()
        elif loss_fn is None:
            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if optimizer is None:
            optimizer = torch.optim.Adam(params.values(), lr=float(lr(0) if callable(lr) else lr))
        pinned = None
        if keep_tiles:
            lossy = [(p, o) for n, p in params.items()
                     if p.is_floating_point() and (o := rules.options_for(n, opts) or opts).codec != "lossless"
                     and not _lossless_for_shape(p, o)]
            pinned = optimizer.register_step_post_hook(tile_keeper(lossy)) if lossy else None
        stream = itertools.cycle(batches) if steps else iter(())
        own_bar = progress is True
        bar = progress if hasattr(progress, "update") else None  # the caller's bar: one update a step
        if own_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps + 1, desc="finetune", unit="step")
        postfix = _quiet_postfix(bar)

        residual: dict[str, torch.Tensor] = {}  # coded - float at the last coding (parameters); other tensors: coded
        moved: dict[str, torch.Tensor] = {}  # each parameter's float weights plus residual between codings (reused)
        tensors = model.state_dict(keep_vars=True)  # the model's own parameters and buffers
        own = {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
        copied = next((n for n, t in tensors.items() if isinstance(t, torch.Tensor) and id(t) not in own), None)
        if copied is not None:  # the values put into it would not reach the forward pass
            raise TypeError(f"finetune: state_dict entry {copied!r} is not one of the model's parameters or buffers "
                            "(a state_dict that returns copies): finetune trains the model's own tensors")
        tied = {n for n, t in tensors.items() if n not in params and any(t is p for p in params.values())}
        plans: dict[tuple, list[Planned]] = {}  # the coding plan of the rules in force (a budget moves them)
        decoded: dict[int, np.ndarray] = {}  # the coded values of each tensor, overwritten at each coding
        kept: dict[str, torch.Tensor] = {}  # each parameter's residual, overwritten at each coding

        def loss_at(batch, code: bool = True, backward: bool = False) -> torch.Tensor:
            """The loss of ``batch`` with the coded values in the model (the last coding's residual added to the
            float weights between codings), and with ``backward`` its gradient, straight through to the float weights:
            the model's tensors hold those values (``.data``) for the forward and backward passes, then their own
            again. So the model runs as it is (no functional_call, no arithmetic on the values to route the gradient)
            and the gradient of each weight, computed at the coded values, lands on it unchanged."""
            inputs, rest = _split(batch)
            if code:  # exactly the coded values forward (coded_weights, planned once per setting)
                setting = tuple(rules.rules)
                if setting not in plans:
                    plans.clear()
                    plans[setting] = _coding_plan(tensors, opts, rules, vector_bits)
                values = _code_planned(tensors, plans[setting], vector_bits, decoded)
                residual.update(values)
                for name, p in params.items():  # into the same tensors at every coding
                    if name not in kept:
                        kept[name] = torch.empty_like(p, requires_grad=False)
                    residual[name] = torch.sub(values[name], p.detach(), out=kept[name])
            else:  # between codings: the float weights plus the last coding's residual
                values = dict(residual)
                for name, p in params.items():
                    if name not in moved:
                        moved[name] = torch.empty_like(p, requires_grad=False)
                    values[name] = torch.add(p.detach(), residual[name], out=moved[name])
            held = []
            try:
                for name, value in values.items():
                    if name in tied:  # a parameter's second name: the first holds its values
                        continue
                    held.append((tensors[name], tensors[name].data))
                    tensors[name].data = value
                if teacher is None:
                    loss = loss_fn(_run(model, inputs), *rest)
                else:
                    with torch.no_grad():
                        target = _flat(_run(teacher, inputs))
                    loss = _distillation(_run(model, inputs), target)
                if backward:
                    loss.backward()
            finally:
                for tensor, data in reversed(held):
                    tensor.data = data
            if backward and penalty is not None:  # on the float weights, back in place
                extra = penalty(model)
                if not (isinstance(extra, torch.Tensor) and extra.numel() == 1):
                    raise TypeError(f"finetune: penalty(model) must return a scalar tensor, not "
                                    f"{list(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__}")
                if extra.requires_grad:
                    extra.backward()
                loss = loss.detach() + extra.detach().reshape(())
            return loss

        targets: list = []  # the teacher's outputs on the check batches (distillation), computed once

        def check_loss() -> float:
            """The mean check loss of the model as the file decodes it now, in eval mode."""
            coded = coded_weights(model, opts, overrides=rules, vector_bits=vector_bits)
            aliases = _sharing(model.state_dict())[0]  # functional_call refuses both names of a tie
            untied = {n: t for n, t in coded.items() if n not in aliases}
            mode = model.training
            model.eval()
            try:
                with torch.no_grad():
                    if teacher is not None and not targets:
                        targets.extend(_flat(_run(teacher, _split(b)[0])) for b in check)
                    losses = []
                    for i, batch in enumerate(check):
                        inputs, rest = _split(batch)
                        out = _run(model, inputs, untied)
                        losses.append(float(loss_fn(out, *rest) if teacher is None
                                            else _distillation(out, targets[i])))
            finally:
                model.train(mode)
            return sum(losses) / len(losses)

        checking = check is not None and steps > 0
        every = check_every or max(1, -(-steps // CHECKS))
        if checking:
            start = {k: v.detach().clone() for k, v in model.state_dict().items()}
            before = best = check_loss()
            best_step, best_params = 0, None  # None: the starting weights (``start``)
        model.train(loss_fn is not None if train_mode is None else train_mode)
        last = None
        try:
            for step in range(steps):
                last = next(stream)
                if callable(lr):
                    for group in optimizer.param_groups:
                        group["lr"] = float(lr(step))
                optimizer.zero_grad()
                if (budget is not None and 0 < step < tracked_until and step % refresh == 0
                        and budget.due(step, refresh, tracked_until)):
                    rules = budget.track(model, step)  # at a coding step (the quality moves where weights are coded)
                if budget is not None:
                    budget.step_began()
                loss = loss_at(last, code=step % refresh == 0, backward=True)
                optimizer.step()
                if checking and (step + 1 == steps or (step + 1) % every == 0):
                    now = check_loss()
                    if now < best:
                        best, best_step = now, step + 1
                        best_params = None if step + 1 == steps else {n: p.detach().clone() for n, p in params.items()}
                if budget is not None:
                    budget.step_ended()
                if bar is not None:
                    if hasattr(bar, "set_postfix"):  # before update, whose redraw (when due) shows it
                        bar.set_postfix(loss=f"{loss.item():.4g}", **postfix)
                    bar.update(1)
        finally:
            if pinned is not None:  # the caller's optimizer carries on without it
                pinned.remove()
        if checking and best_step < steps:  # end on the best weights seen
            with torch.no_grad():
                if best_step == 0:
                    model.load_state_dict(start)
                else:
                    for name, p in params.items():
                        p.copy_(best_params[name])
            if best_step == 0:
                kind = "loss" if teacher is None else "distillation loss (output MSE)"
                warnings.warn(f"finetune: not kept, the starting weights restored: {kind} of the coded model on "
                              f"{where} {now:.4g} after {steps} steps, {before:.4g} before",
                              NotKeptWarning, stacklevel=2)
        if bar is not None and checking and hasattr(bar, "set_postfix"):
            bar.set_postfix(check=f"{before:.4g} -> {best:.4g} (step {best_step})")
        if vector_bits:  # the model holds what the file will: its vectors rounded
            round_vectors(model, vector_bits, opts, overrides=rules)
        if budget is not None:  # the file at the held quality (a step down only if it is over the budget)
            rules = budget.finish(model, steps)
        if last is None:
            last = next(iter(batches), None)
        if last is not None:
            with torch.no_grad():
                final = loss_at(last)
            if own_bar:
                bar.update(1)
                bar.set_postfix(loss=f"{final.item():.4g}")
        return model
    finally:  # after the final pass, which runs in the loop's mode (its loss comparable); also when anything raises
        model.train(was_training)
        if teacher_mode is not None:
            teacher.train(teacher_mode)
        if own_bar and bar is not None:
            bar.close()
