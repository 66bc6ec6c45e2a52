"""The entry points and the sequential loop: :func:`code_with_repair` and :func:`repair` (checks, the working copy,
a second coding with the unspent reserve), :func:`_repair` (every lossy tensor coded in forward order, the rest
repaired after each; its notes) and :func:`_refit_judged` (a layer's refit kept by the held-out output error).

The top of the package: builds on every other module; :mod:`codec.rd.repair` re-exports its public names.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ...api import to_numpy, to_torch
from ...dtypes import from_float64, to_float64
from ...parallel import make_executor, release_memory, sparse_zeros
from ...tensorcodec import Encoded, EncodeOptions
from ..calibrate import call as _run
from ..calibrate import hook_weight_norm
from ..calibrate import kept_buffers
from ..calibrate import floating_outputs as _flat
from ..output_sample import OutputSample
from ..rdo import output_scale, unit_sensitivity
from .budget import (STEP_UP_FROM, _code_within, _fit_vector, _held, _is_dearer, _moving_vector, _prunes, _receiver,
                     _text)
from .fit import _layer_of, _LayerFit
from .inputs import _Inputs, _check_inputs, _forward_calls
from .losses import TUNED_CODECS, _distill, _error_against, _finetune, _free, _outputs, _set_trainable, output_error
from .settings import HOLDOUT_EVERY, Repaired, RepairSettings, held_out
from .slots import _Slot, _code, _measure, _same_bytes, _shared_lossy, _slots, _take


#: Where the first coding in forward order ends with at least this fraction of the lossy tensors' planned bytes
#: unspent and the spare's receiver had a reserve held from it (:data:`RESERVE`), a model of at most
#: :data:`RESPEND_WEIGHTS` weights is coded again with the receiver given what was left, up to that reserve
#: (:func:`repair`): a later ``quant`` tensor whose GPTQ coding did not grow has no step fine enough to spend it
#: (a 784-256-128-10 MLP at ``-b 1``: 5.1 % of the budget unspent, fc2's next bit costing 3 KB).
RESPEND_FROM = 0.01
RESPEND_WEIGHTS = 1 << 22


def code_with_repair(model: nn.Module, inputs: Iterable, options: Mapping[str, EncodeOptions], calibration=None,
                     *, progress: Callable[[str, int], None] | None = None, jobs: int | None = None,
                     settings: RepairSettings | None = None, encoded: dict[str, Encoded] | None = None,
                     spare: int = 0, index_zstd: bool = False
                     ) -> tuple[dict[str, np.ndarray], list[str], dict[str, EncodeOptions]]:
    """Code ``model``'s stored tensors in forward order, repairing the rest after each; ``(targets, notes, options)``.

    ``inputs`` is an iterable of input batches (tensors, or dicts of tensors
    passed as ``model(**batch)``); ``options`` maps every stored state_dict
    name to the :class:`EncodeOptions` it will be encoded with. ``targets``
    maps names to arrays in storage form (as :func:`codec.api.to_numpy`
    gives) to encode instead of the original values, for every tensor the
    repair changed; ``notes`` are one-line remarks for the user; ``options``
    maps the names whose planned options had to change to the ones to encode
    them with instead (``settings.keep_size``: a tensor never codes larger
    than its plan).
    ``calibration`` is accepted for the caller's convenience and not needed:
    statistics are collected from the partly coded model, which is what the
    repair needs. ``model`` itself is not modified (a deep copy is worked on).
    ``progress(name, n_elements)`` is called as each lossy tensor is coded.

    Given a dict ``encoded``, it is filled with the encoding of every lossy
    tensor (:attr:`Repaired.encoded`: what to write, as it is), and
    ``targets`` holds only the tensors stored losslessly that repair
    changed: the lossy targets are then not kept in memory to the end
    (all-MiniLM-L6-v2: 90 MB).

    ``spare`` is what the file may take beyond its plan, in bytes (the
    budget less the size of the file the planned options give the original
    values; ``settings.keep_size``): repair spends it (:func:`repair`). ``index_zstd``: the file's index will be
    zstd-compressed (the writer's ``compress_index``), so a JPEG table between two qualities costs its bytes
    there compressed, not its JSON's (:func:`repair`).
    """
    result = repair(model, inputs, options, progress=progress, jobs=jobs, settings=settings,
                    keep_targets=encoded is None, spare=spare, index_zstd=index_zstd)
    if encoded is not None:
        encoded.update(result.encoded)
    return result.targets, result.notes, result.options


def repair(model: nn.Module, inputs: Iterable, options: Mapping[str, EncodeOptions], *,
           progress: Callable[[str, int], None] | None = None, jobs: int | None = None,
           settings: RepairSettings | None = None, keep_targets: bool = True, spare: int = 0,
           index_zstd: bool = False) -> Repaired:
    """:func:`code_with_repair`, also returning the repaired working model and every lossy tensor's encoding (see
    :class:`Repaired`). Without ``keep_targets``, ``targets`` leaves the lossy tensors out (their encodings are
    all that is kept of them as they are coded), and, with no training steps, the working model holds a coded
    ``nn.Embedding`` weight only at the rows the inputs look up, zeros elsewhere (:class:`_Lookups`).

    The working model is a deep copy of ``model`` except for the lossy tensors on the CPU when no distillation
    step trains them before they are coded (``settings.steps`` 0): those share ``model``'s storage until coded,
    and then take their decoded arrays as storage (never written into), so the working model costs what has been
    coded, not a whole second model next to it.

    ``spare`` (bytes the file may take beyond its plan, with ``settings.keep_size``) is given to the largest lossy
    tensor (most elements) as credit, less :data:`RESERVE` of the planned bytes of the ``quant`` tensors after it
    (whose GPTQ coding can outgrow its plan with no cheaper step to pay it), which they get when their turn comes.
    With a spare, every tensor that fits its plan with credit to spare is coded with dearer options while they
    fit (:func:`_fit_size`, ``settings.step_up``), so what one tensor's keep-size step frees is spent by the next.

    A coding at a JPEG table scale between two qualities stores its table's 64 entries in the index: counted as
    their JSON, or, with ``index_zstd`` (the writer will compress the index), as that JSON compressed
    (:func:`codec.rd.ladder.table_bytes`). Counted as JSON in a compressed index, each such table kept about 240
    bytes of the budget unspent: the bench BatchNorm CNN at ``-b 0.6`` ended 2 % under it."""
    settings = RepairSettings() if settings is None else settings
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(settings, RepairSettings):
        raise TypeError(f"settings must be a RepairSettings, not {type(settings).__name__}")
    if settings.finetune_loss not in ("mse", "kl"):
        raise ValueError(f"settings.finetune_loss must be 'mse' or 'kl', not {settings.finetune_loss!r}")
    names = settings.plain_jpeg
    if isinstance(names, (str, bytes)) or not isinstance(names, (set, frozenset, tuple, list)) \
            or not all(isinstance(n, str) for n in names):
        raise TypeError(f"settings.plain_jpeg must be a set of tensor names, not {names!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable, not {type(progress).__name__}")
    batches = _check_inputs(inputs, model)
    spare = spare if settings.keep_size else 0
    settings = replace(settings, step_up=settings.step_up and spare > 0)
    executor = make_executor(jobs)

    _leaf_hook_weights(model)

    def run(release: int, progress) -> tuple:  # a working model of its own: (work, slots, _repair's result)
        work = copy.deepcopy(model, _shared_lossy(model, options) if settings.steps == 0 else {}).eval()
        for p in work.parameters():
            p.requires_grad_(False)  # parameters not stored (nor named in options) stay as they are
        slots = _slots(work, options, model)
        for slot in slots.values():
            slot.index_zstd = bool(index_zstd)
        # (a buffer a forward updates, a QAT observer's range: each pass of either model gives it back)
        with torch.random.fork_rng(devices=[]), kept_buffers(model), kept_buffers(work):
            torch.manual_seed(settings.seed)
            return work, slots, _repair(model, work, batches, options, slots, settings, executor, progress,
                                        keep_targets, spare, release)

    try:
        work, slots, (targets, notes, changed, left, held_back) = run(0, progress)
        lossy = [s for s in slots.values() if s.lossy]
        if held_back and left >= RESPEND_FROM * sum(s.budget or 0 for s in lossy) \
                and sum(s.original.size for s in slots.values()) <= RESPEND_WEIGHTS:
            # the reserve held for GPTQ's growth came back unspent: the receiver is coded again with it; kept where
            # it spends more, within the budget, with no more GPTQ codings given way to rounding
            given = min(left, held_back)
            again = run(given, None)
            rounded = sum(s.rounded for s in lossy)
            if 0 <= again[2][3] < left and sum(s.rounded for s in again[1].values()) <= rounded:
                work, slots, (targets, notes, changed, _, _) = again
                notes.append(f"repair: coded twice, the second time with {given} bytes more for "
                             f"{max(lossy, key=lambda s: s.original.size).name}: the first held them for the later "
                             f"quant tensors' growth and left them unspent ({left} bytes)")
            del again
    finally:
        if hasattr(executor, "shutdown"):
            executor.shutdown(wait=True)
    for p in work.parameters():
        p.requires_grad_(False)
    return Repaired(targets, notes, work, changed, {s.name: s.encoded for s in slots.values() if s.lossy})


def _leaf_hook_weights(model: nn.Module) -> None:
    """Make each weight_norm hook form's computed ``weight`` attribute (``torch.nn.utils.weight_norm``) a leaf, its
    value recomputed without a graph: left by a forward with gradients it is not one, and ``copy.deepcopy`` of the
    model (the working copy) raises on it (pytorch/pytorch#103001). The hook sets the attribute again at the
    model's next call: nothing the model computes changes."""
    for module in model.modules():
        hook = hook_weight_norm(module)
        if hook is not None and isinstance(getattr(module, hook.name, None), torch.Tensor) \
                and not getattr(module, hook.name).is_leaf:
            with torch.no_grad():
                setattr(module, hook.name, hook.compute_weight(module))


class _Lookups:
    """The rows of each lossy ``nn.Embedding`` weight that the calibration inputs look up, recorded by hooks
    during one pass over them; once such a weight is coded, the working model can hold only those rows of its
    decoded values (:meth:`take`): all-MiniLM-L6-v2's 30,522 x 384 word embedding (47 MB, held from the first
    coded tensor to the end of repair) is read at the few thousand rows of the 125 calibration sentences."""

    def __init__(self, work: nn.Module, slots: dict[str, _Slot]):
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.unknown: set[int] = set()  # embeddings whose rows their call's arguments do not give: kept whole
        self.handles = []
        for slot in slots.values():
            if slot.lossy and slot.attr == "weight" and isinstance(slot.module, nn.Embedding):
                self.rows[id(slot.module)] = []
                self.handles.append(slot.module.register_forward_pre_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        if type(module).forward is not nn.Embedding.forward or not isinstance(ids, torch.Tensor) \
                or ids.is_floating_point() or ids.is_complex():
            # rows its class chooses (BART's learned positions, called with the token embeddings): not known here
            self.unknown.add(id(module))
            return
        self.rows[id(module)].append(ids.detach().reshape(-1).unique())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.rows = {key: torch.cat(ids).unique() if ids and key not in self.unknown else None
                     for key, ids in self.rows.items()}

    def take(self, work: nn.Module, slot: _Slot, decoded: np.ndarray, batches: list) -> None:
        """Replace a coded embedding's decoded values (just taken whole by :func:`_take`) by an array holding
        only the looked-up rows, its other rows zeros that no page of memory backs
        (:func:`codec.parallel.sparse_zeros`: mapped, not written, in small pages), when the model's outputs on
        every batch stay bit for bit what they are with the whole (a weight read otherwise too, such as one tied
        to an output layer, keeps it whole)."""
        rows = self.rows.get(id(slot.module))
        tensor = slot.tensor
        if rows is None or tensor.device.type != "cpu" or decoded.ndim != 2:
            return
        whole = tensor.data
        sparse = sparse_zeros(decoded.shape, decoded.dtype)  # (np.zeros: huge pages, 44 of 47 MB resident)
        index = rows.numpy()
        sparse[index] = decoded[index]
        sparse = to_torch(sparse, slot.dtype.name)
        for batch in batches:  # a batch at a time: one batch's outputs of each alive (a T5's logits: 47 MB each)
            tensor.data = whole
            want = _outputs(work, batch)
            tensor.data = sparse
            if not all(torch.equal(a, b) for a, b in zip(_outputs(work, batch), want)):
                tensor.data = whole
                return


def _repair(model: nn.Module, work: nn.Module, batches: list, options: Mapping[str, EncodeOptions],
            slots: dict[str, _Slot], settings: RepairSettings, executor, progress,
            keep_targets: bool = True, spare: int = 0, release: int = 0
            ) -> tuple[dict[str, np.ndarray], list[str], dict[str, EncodeOptions], int, int]:
    """The coding in forward order (:func:`repair`); ``(targets, notes, changed options, credit left unspent at the
    end, the reserve held from the spare's receiver before ``release``, or 0 where the receiver left credit of its
    own)``. ``release``: bytes of that reserve (:func:`_held`) the receiver gets all the same (at most the reserve)."""
    # Without targets kept or training, the working model only ever runs on the calibration inputs: a coded
    # embedding then needs only the rows they look up (_Lookups).
    lookups = _Lookups(work, slots) if not keep_targets and settings.steps == settings.final_steps == 0 \
        and settings.finetune_steps == 0 else None
    # A wide output (a language model's logits) is compared on a seeded sample of its last axis where a refit is
    # judged, and its head computes only those positions there and while a layer's inputs are collected
    # (OutputSample); the references for the judged batches are sampled the same way.
    sample = OutputSample(settings.seed)
    # The original's whole outputs on every batch are held only where training matches them (distillation,
    # fine-tuning). Otherwise each batch's are reduced as they are made to what repair reads of them: each output's
    # RMS (the pruning's unit sensitivities) and a held-out batch's sampled reference (a refit's judge); the final
    # note runs the original again (_error_against). A T5 with a 30,522-word vocabulary: 8 x 47 MB not held.
    trains = settings.steps > 0 or settings.final_steps > 0 or settings.finetune_steps > 0
    judged_batches = set(held_out(len(batches[: settings.stats_batches])) if settings.refit else ())
    refs: list | None = [] if trains else None
    scales, judge_refs = [], {}
    with torch.no_grad():
        for i, b in enumerate(batches):
            outs = _outputs(work, b, sample if i == 0 else None)
            if i == 0:  # a narrowed run checked once (or no narrowing)
                sample.reference(work, b, _run, _flat, outs)
            if i in judged_batches:
                judge_refs[i] = sample.reference(work, b, _run, _flat, outs)
            scales.append([output_scale(t) for t in outs])
            if refs is not None:
                refs.append(outs)
            del outs, b
    if lookups is not None:
        lookups.close()
    order, once, shares = _forward_calls(work, batches[0], [s.module for s in slots.values() if s.lossy])
    heads = set(shares.values())
    group, shared = None, None  # the group of layers given one tensor (_Inputs), and their inputs by batch
    follower = {id(a): b for a, b in zip(order, order[1:])}
    for rank, module in enumerate(order):
        for slot in slots.values():
            if slot.module is module and slot.order == math.inf:
                slot.order = rank
    queue = sorted((s for s in slots.values() if s.lossy), key=lambda s: (s.order, s.name))
    originals = dict(model.named_modules())
    _set_trainable(slots)
    step, mismatched, changed, credit, judged, wide, held_back, vectors = 0, 0, {}, 0, [], [], 0, []
    bias_only: list[str] = []
    biases: list[str] = []  # the choice of each transposed convolution's bias (_bias_judged)
    singular: list[str] = []  # layers whose H no damping made positive definite: coded as they stand
    receiver, later = _receiver(queue, options, spare, executor, settings.gptq, work)
    reserve = 0
    # a tensor before the last jpeg / jpegxl one can leave an overrun for it to pay by stepping down (_fit_size)
    last_image = max((i for i, s in enumerate(queue) if options[s.name].codec in ("jpeg", "jpegxl")), default=-1)
    for i, slot in enumerate(queue):
        later.pop(slot.name, None)  # what the quant tensors after this one may grow by: kept from its step-ups
        if slot is receiver:
            reserve = held_back = min(spare, _held(later))
            reserve -= min(release, reserve)
            credit += spare - reserve
        held = _held(later) if receiver is not None and receiver.coded else 0
        key = id(slot.module)
        if shares.get(key, key) != group:  # (a layer of the group before: its inputs; else passes of its own)
            group = key if key in heads else None
            shared = {} if group is not None else None
        evaluated = not any(m.training for m in work.modules())
        reader = _Inputs(stop=evaluated and key in once, held=shared if evaluated and settings.steps == 0 else None)
        fitted = _layer_of(work, slot)
        with sample.narrowed(work, model):  # (collect needs the layer's inputs, not the model's output)
            if fitted is None:
                layer = None
            elif fitted.transposed:
                # (its own reader: the inputs a group of layers given one tensor shares are the pre-hooks' tensors,
                # not the (input, output size) pairs its forward hooks keep)
                layer = _LayerFit.collect_means(model, originals[fitted.name], work, slot, slots, batches, settings,
                                                fitted, _Inputs(stop=reader.stop))
            else:
                layer = _LayerFit.collect(model, originals[fitted.name], work, slot, slots, batches, settings,
                                          follower.get(id(slot.module)), reader, fitted)
        del reader
        if layer is not None and layer.candidate is not None:
            judged.append(_refit_judged(work, layer, batches, judge_refs, settings, sample))
        if layer is not None and layer.bias_only:
            bias_only.append(slot.name)
        elif layer is not None and layer.h is None:
            wide.append(slot.name)
        elif layer is not None and settings.prune and settings.keep_size and _prunes(options[slot.name], slot,
                                                                                      settings):
            used = slice(settings.stats_batches)
            layer.sensitivity = unit_sensitivity(work, fitted.module, batches[used], None, _run, _flat,
                                                 seed=settings.seed, scales=scales[used])
        if layer is not None:
            layer.settle()
        vector = _moving_vector(layer, options, settings, executor)
        # (a JPEG weight whose plan chose its uncompensated point is coded as it was priced: settings.plain_jpeg)
        own = replace(settings, compensate=False) if slot.name in settings.plain_jpeg else settings
        target, assumed, decoded, opts, credit, slot.nbytes, slot.encoded = _code_within(
            slot, layer, options[slot.name], own, executor, credit, held, i < last_image,
            0 if receiver is None or receiver.coded or slot is receiver else spare)  # (the receiver's is in credit)
        if layer is not None and layer.singular:
            singular.append(slot.name)
        if slot is receiver:
            if credit >= STEP_UP_FROM * slot.nbytes:
                held_back = 0  # its credit did not limit it: more would go unspent too (no second coding)
            credit += reserve  # for the quant tensors after it
        if opts != options[slot.name]:
            changed[slot.name] = opts
        if assumed is not None and not np.array_equal(to_float64(decoded, slot.dtype), assumed):
            mismatched += 1
        _measure(slot.encoded, target, decoded, slot.dtype)
        slot.changed = not _same_bytes(target, slot.original)
        # fine-tuning starts the tensors it trains from their targets; otherwise a target is not kept
        trains = settings.finetune_steps > 0 and slot.is_param and opts.codec in TUNED_CODECS
        slot.target, slot.coded = target if keep_targets or trains else None, True
        del target, assumed
        with torch.no_grad():
            _take(slot, decoded)
            if lookups is not None:
                lookups.take(work, slot, decoded, batches)
            if layer is not None and layer._own is not None:
                biases.append(_bias_judged(work, layer, to_float64(decoded, slot.dtype), batches, judge_refs,
                                           settings, sample))
            elif layer is not None:
                layer.correct_bias(to_float64(decoded, slot.dtype))
                if settings.batchnorm_gain and layer.shift is not None:
                    _batchnorm_gain(model, originals[slot.module_name], work, slot, layer,
                                    follower.get(id(slot.module)), slots, batches, options, executor)
            if vector is not None:  # the moved vector within its planned bytes and the credit (a later quant tensor
                moved, planned = vector  # fits whenever the credit is not negative: _fit_size), the spare to come too
                room = credit + (0 if receiver is None or receiver.coded else spare)
                nbytes, rounded_to = _fit_vector(moved, planned, room, options, executor)
                credit += planned - nbytes
                if rounded_to is not None:
                    vectors.append(rounded_to)
        del decoded, layer
        release_memory()  # the layer's blocks under the mmap threshold, freed on two threads: not left as holes
        _set_trainable(slots)
        step = _distill(work, _free(slots, lossy=True), batches, refs, settings.steps, settings.lr, step)
        if progress:
            progress(slot.name, int(slot.original.size))
    before_final = output_error(work, batches, refs) if settings.final_steps > 0 else math.nan
    step = _distill(work, _free(slots, lossy=False), batches, refs, settings.final_steps, settings.lr, step)
    tuned = (_finetune(work, batches, refs, slots, {**options, **changed}, settings, executor)
             if settings.finetune_steps > 0 and queue else None)
    after = output_error(work, batches, refs) if refs is not None else _error_against(model, work, batches)
    targets = {}
    for slot in slots.values():
        value = (slot.target if keep_targets else None) if slot.lossy else to_numpy(slot.tensor)[0]
        if value is not None and (value.base is not None or not value.flags.c_contiguous):
            value = np.array(value, order="C")  # a copy (of a view of the working model); 0-d stays 0-d
        if value is not None and not _same_bytes(value, slot.original):  # bit-exact (0-d tensors too)
            targets[slot.name] = value
    n_changed = sum(s.changed if s.lossy else s.name in targets for s in slots.values())
    used = len(batches[: settings.stats_batches])
    unchecked = settings.refit and not held_out(used)  # no batch to hold out: no refit (_LayerFit.collect)
    done = [label for label, on in (("refit", settings.refit and not unchecked), ("GPTQ", settings.gptq),
                                    ("JPEG compensation", settings.compensate),
                                    ("least-squares bias", settings.bias_correction),
                                    (f"{settings.steps} distillation steps each", settings.steps > 0)) if on]
    final = (f", then {settings.final_steps} steps on the lossless ones ({before_final:.4g} before them)"
             if settings.final_steps > 0 else "")
    notes = [(f"repair: coded {len(queue)} lossy tensors in forward order ({', '.join(done) or 'no repair'}){final}; "
              f"output error on the calibration inputs (relative MSE) {after:.4g}; {n_changed} tensors changed")]
    if judged:
        kept, own = (sum(j[3] == c for j in judged) for c in ("refit", "own"))
        notes.append(f"repair: refit kept for {kept} of {len(judged)} layers, and the least-squares bias aimed at the "
                     f"layer's own coding error (not the original's outputs) for {own}, each where it lowers the "
                     f"model's output error on the {len(held_out(used))} held-out calibration batches")
    if singular:
        notes.append(f"repair: {len(singular)} layers coded as they stand, without GPTQ or compensation: their inputs "
                     "on the calibration data are all alike (no damping made H positive definite; an encoder-decoder's "
                     "decoder given only its start token, say): " + ", ".join(singular))
    if wide:
        notes.append(f"repair: {len(wide)} layers with over {settings.max_columns} input columns got the least-squares "
                     f"bias only (no refit, GPTQ or compensation: their inputs' second moment would take 8 x columns^2 "
                     f"bytes; codec.save(..., repair=RepairSettings(max_columns=N)) raises the limit): " + ", ".join(wide))
    if biases:
        counts = {c: biases.count(c) for c in ("original", "own", "none")}
        notes.append(f"repair: the least-squares bias of {len(biases)} transposed convolutions or pruned layers aimed "
                     f"at the original's outputs for {counts['original']}, at the layer's own coding error for "
                     f"{counts['own']}, left as "
                     f"it was for {counts['none']}, each as it lowers the model's output error on the held-out "
                     "calibration batches (all of them where none is held out)")
    if bias_only:
        notes.append(f"repair: {len(bias_only)} weights got the least-squares bias only (no refit, GPTQ or "
                     "compensation: a transposed convolution's input rows are not its stored tensor's rows, nor are "
                     "a weight_norm layer's whose g runs along its inputs): " + ", ".join(bias_only))
    uncompensated = [s.name for s in queue if s.name in settings.plain_jpeg and settings.compensate]
    if uncompensated:
        notes.append(f"repair: {len(uncompensated)} JPEG weights coded without compensation, as their plan priced them "
                     "(it chose their uncompensated point): " + ", ".join(uncompensated))
    if unchecked:
        notes.append(f"repair: no refit: {used} calibration batches, fewer than the {HOLDOUT_EVERY} it needs to hold "
                     "one out and check that a refit generalizes (more inputs, or smaller batches, allow it)")
    if tuned:
        notes.append(tuned)
    rounded = [s.name for s in queue if s.rounded]
    if rounded:
        notes.append(f"repair: {len(rounded)} quant tensors coded with plain rounding, not GPTQ, whose coding was "
                     f"larger than the budget had left and no later tensor could pay for it: " + ", ".join(rounded))
    if vectors:
        notes.append(f"repair: {len(vectors)} vectors the least-squares bias moved rounded to fewer significand bits "
                     "to stay within the budget (their moved values code larger than planned): " + ", ".join(vectors))
    if mismatched:
        notes.append(f"repair: {mismatched} GPTQ tensors did not re-encode to the pixels chosen (coded as decoded)")
    higher = sorted(n for n, o in changed.items() if slots[n].pruned)
    dearer = sorted(n for n, o in changed.items() if n not in higher and _is_dearer(o, options[n]))
    cheaper = sorted(n for n in changed if n not in higher and n not in dearer)
    if dearer:
        notes.append(f"repair: {len(dearer)} tensors coded with dearer options to spend what the plan and the "
                     f"tensors before them left (" + ", ".join(f"{n} {_text(options[n])} -> {_text(changed[n])}"
                                                               for n in dearer) + ")")
    if higher:
        notes.append(f"repair: {len(higher)} JPEG tensors coded at a higher quality with the coefficients that matter "
                     f"least to the output pruned, within their planned size ("
                     + ", ".join(f"{n} {_text(options[n])} -> {_text(changed[n])}" for n in higher) + ")")
    if cheaper:
        notes.append(f"repair: {len(cheaper)} tensors coded with cheaper options to stay within their planned size ("
                     + ", ".join(f"{n} {_text(options[n])} -> {_text(changed[n])}"
                                 if changed[n].codec == "jpeg" else n for n in cheaper) + ")")
    return targets, notes, changed, credit, held_back


def _batchnorm_gain(model: nn.Module, original: nn.Module, work: nn.Module, slot: _Slot, layer: _LayerFit,
                    norm: nn.Module, slots: dict[str, _Slot], batches: list, options: Mapping[str, EncodeOptions],
                    executor) -> None:
    """The BatchNorm ``norm`` after the coded layer of ``slot`` (no bias of its own; ``layer.shift`` its running
    mean) takes the per-channel least-squares gain ``a = cov(z, z_hat) / var(z_hat)`` of the original layer's
    outputs ``z`` (in the original model) on the coded one's ``z_hat`` (in the working model): its weight times
    ``a`` (rounded as its options code it) and its running mean ``(mu - E[z] + a E[z_hat]) / a``, so
    ``gamma' (z_hat - mu') = gamma (a z_hat + b - mu)`` (:attr:`RepairSettings.batchnorm_gain`)."""
    weight = getattr(norm, "weight", None)
    gain = next((s for s in slots.values() if isinstance(weight, torch.Tensor) and s.tensor is weight
                 and s.dtype.floating and not s.lossy and not s.coded), None)
    if gain is None:
        return
    sums: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module, args, output):
            seen[key] = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
        return hook

    with torch.no_grad():
        for b in batches:
            for key, net, layer_module in (("z", model, original), ("h", work, slot.module)):
                handle = layer_module.register_forward_hook(keep(key))
                try:
                    _run(net, b)
                finally:
                    handle.remove()
            z, h = seen["z"], seen["h"]
            for key, value in (("z", z.sum(1)), ("h", h.sum(1)), ("zh", (z * h).sum(1)), ("hh", (h * h).sum(1)),
                               ("n", torch.tensor(float(z.shape[1])))):
                sums[key] = sums[key] + value if key in sums else value
    n = float(sums["n"])
    mean_z, mean_h = (sums["z"] / n).numpy(), (sums["h"] / n).numpy()
    var_h = (sums["hh"] / n).numpy() - mean_h * mean_h
    cov = (sums["zh"] / n).numpy() - mean_z * mean_h
    a = np.where(var_h > 0, cov / np.maximum(var_h, 1e-300), 1.0)
    a = np.clip(a, 0.5, 2.0)
    gamma = to_float64(to_numpy(gain.tensor)[0], gain.dtype)
    coded, _, _ = _code(gain.name, from_float64(gamma * a, gain.dtype), gain.dtype, options[gain.name], executor)
    a = np.where(gamma != 0, to_float64(coded, gain.dtype) / np.where(gamma != 0, gamma, 1.0), a)
    with torch.no_grad():
        gain.tensor.copy_(torch.from_numpy(to_float64(coded, gain.dtype)).to(gain.tensor.dtype))
        mu = to_float64(layer.shift.original, layer.shift.dtype)
        running = layer.shift.tensor
        running.copy_(torch.from_numpy((mu - mean_z + a * mean_h) / a).to(running.dtype))


#: The choices :func:`_bias_judged` tries, in the order a tie keeps (the first).
BIAS_CHOICES = ("original", "own", "none")


def _bias_judged(work: nn.Module, layer: _LayerFit, decoded: np.ndarray, batches: list, refs: Mapping[int, list],
                 settings: RepairSettings, sample: OutputSample | None = None) -> str:
    """Set a coded transposed convolution's bias (:meth:`_LayerFit.bias_choices`) to the choice that gives the
    lowest model output error on the held-out batches (``refs``: their sampled references, :func:`output_error`);
    with none held out (no refit judged: too few batches, or ``settings.refit`` off), the least-squares bias aimed at
    the original's outputs, as :meth:`_LayerFit.correct_bias` gives. The choice, for the note.

    Why judged: the least-squares bias is the best bias for the layer's own outputs, not for the model's behind a
    nonlinearity. On a denoising autoencoder (two ConvTranspose2d) the bias aimed at the original's outputs lowered
    the output error 1.39x / 1.16x at -b 1.5 / 2.5; on a HiFi-GAN-shaped vocoder (LeakyReLU, residual blocks and a
    tanh after its two ConvTranspose1d) it raised it 1.10-1.14x at -b 1 / 2 / 3 (bench/JOURNAL.md, "vocoder
    (twenty-ninth pass)")."""
    held = [i for i in held_out(len(batches[: settings.stats_batches])) if i in refs] if settings.refit else []
    if not held:
        layer.correct_bias(decoded)
        return "original"
    choices = layer.bias_choices(decoded)
    bias = layer.bias.tensor
    errors = {}
    with torch.no_grad():
        for name in BIAS_CHOICES:
            bias.copy_(torch.from_numpy(choices[name]).to(bias.dtype))
            errors[name] = output_error(work, [batches[i] for i in held], [refs[i] for i in held], sample)
        best = min(BIAS_CHOICES, key=lambda c: errors[c])
        bias.copy_(torch.from_numpy(choices[best]).to(bias.dtype))
    return best


def _refit_judged(work: nn.Module, layer: _LayerFit, batches: list, refs: Mapping[int, list], settings: RepairSettings,
                  sample: OutputSample | None = None) -> tuple[str, float, float, str]:
    """Choose by the model's output error on the held-out batches how ``layer`` is repaired; ``(name, error with its
    refit, error of the better without it, the choice)``, the choice ``"refit"``, ``"original"`` or ``"own"``.
    ``refs[i]``: the original's outputs on held-out batch ``i``, sampled by ``sample`` (:func:`output_error`).

    Three ways are tried uncoded in the partly coded working model, and the model's relative output error against
    the original's on the held-out batches decides: the candidate refit (fitted on the other batches,
    :meth:`_LayerFit._rest_refit`) with its least-squares bias aimed at the original's outputs (kept: the refit of
    all rows, :meth:`_LayerFit.adopt_refit`); the weight with that bias (``"original"``: ``W E[x] - W_hat E[x_hat]``,
    which also moves the layer's output by the input's mean shift from the layers coded before); the weight and
    bias as they stand (``"own"``: the bias will make up for the layer's own coding error only, as without refit).
    The layer's own output error does not decide (it did before): on all-MiniLM-L6-v2 with 125 calibration
    sentences at 3.5 bits/weight, 22 refits lowered their layer's error on the held-out batches and together the
    model's cosine (0.9836 / 0.9790 with them, 0.9870 / 0.9830 without): LayerNorm, softmax attention and the
    residual paths stand between a layer's output and the model's."""
    held = held_out(len(batches[: settings.stats_batches]))
    slot = layer.slot
    tensor = slot.tensor
    before = tensor.data  # may share the caller's storage: replaced, never written into
    restore = [(s.tensor, s.tensor.detach().clone()) for s in (layer.bias, layer.shift) if s is not None]

    def error() -> float:
        return output_error(work, [batches[i] for i in held], [refs[i] for i in held], sample)

    def error_with(weight: np.ndarray) -> float:
        tensor.data = to_torch(weight, slot.dtype.name)
        layer.correct_bias(to_float64(weight, slot.dtype))
        return error()

    with torch.no_grad():
        try:
            own = error()
            original = error_with(layer._fitted)
            with_refit = error_with(layer.candidate)
        finally:
            tensor.data = before
            for t, value in restore:
                t.copy_(value)
    best = min(own, original, with_refit)
    if with_refit == best:
        layer.adopt_refit(settings)
        choice = "refit"
    else:
        layer.drop_candidate()
        choice = "own" if own == best and (layer.bias is not None or layer.shift is not None) else "original"
        if choice == "own":  # the reference is the layer as it stands, as without refit (_LayerFit.collect)
            layer.w_ref = before.detach().double().reshape(before.shape[0], -1).numpy()
            layer.mean = layer.mean_hat
            if layer.bias is not None:
                layer.b_ref = layer.bias.tensor.detach().double().numpy()
    return slot.name, with_refit, min(own, original), choice
