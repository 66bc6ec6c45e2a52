"""Sequential coding with repair: code the lossy tensors in forward order and let the rest make up for them.

Encoder side only; the decoder and the file format are unchanged. Given a
model, unlabelled calibration inputs and the options the allocator chose for
every stored tensor, :func:`code_with_repair` returns the values to encode
instead of the original ones:

1. The lossy tensors are coded one at a time in the order a forward pass
   first uses them (found with hooks). Coding one means encoding it with its
   planned options and decoding the result; from then on the working copy of
   the model holds the decoded values, exactly what a reader will get.
2. After each, what is not yet coded repairs the damage: the layer's own bias
   (when stored losslessly) takes the closed-form correction
   ``b += (W - W_hat) E[x]`` over the layer's inputs in the partly coded
   model, then a few Adam steps of distillation (MSE to the original model's
   outputs, no labels) train every parameter whose final value is still
   free: the weights not yet coded and everything stored losslessly (biases,
   norm layers).
3. A weight coded with ``quant`` is rounded by GPTQ (:mod:`codec.rd.gptq`)
   with the second moment ``H = E[x x^T]`` of its inputs in the partly coded
   model, so its rounding errors are fed forward through ``H^-1`` instead of
   left where they fall; a ``jpeg`` weight likewise, a group of columns (a
   column of tiles, or an 8x8 block of each row's image) at a time.
4. A final pass of distillation trains the losslessly stored parameters alone.

Every returned target is what was encoded when its tensor's turn came, and
the working model held that encoding's decoded values from then on, so
encoding ``targets[name]`` with ``options[name]`` (deterministic) gives
exactly the model the repair was computed for.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..api import TORCH_DTYPES, to_numpy, to_torch
from ..dtypes import SIGNIFICAND, DType, from_float64, get_dtype, round_significand, to_float64
from ..errors import first_line
from ..parallel import make_executor, release_memory, sparse_zeros
from ..tensorcodec import (Encoded, EncodeOptions, Overrides, _error_sums, decode_encoded, encode_tensor,
                           lossless_reason)
from . import ladder
from .calibrate import FULL_H_MAX, UNFOLD_BYTES, conv_rows
from .calibrate import call as _run
from .calibrate import floating_outputs as _flat  # the outputs matched: calibration compares the same ones
from .gptq import _BAND, HeldInFactor, _diagonal
from .gptq import difference_error as weighted_error
from .output_sample import OutputSample
from .rdo import applies, fit_pruned, output_scale, unit_sensitivity

__all__ = ["RepairSettings", "Repaired", "code_with_repair", "forward_order", "output_error", "repair"]

#: The refit holds out every this-many-th calibration batch to check that it generalizes (from this many batches).
HOLDOUT_EVERY = 4

#: Of the bytes the plan leaves (``spare``), this fraction of the planned bytes of each ``quant`` tensor coded after
#: the largest one is kept back for it, from the largest and from the step-ups of the tensors before it
#: (:func:`_held`): GPTQ's rounding can code larger than plain rounding (measured: 2.4-4.5 %, the bench BatchNorm
#: CNN's conv2 and the MLP's fc2; 7-13 % at 2 bits, 1-3 % at 3 on a transformers ViT), and ``quant`` has no cheaper
#: step to pay for it.
RESERVE = 0.1

#: A tensor that fits its plan tries dearer options only with credit left of at least this fraction of its bytes
#: (JPEG; a fine ladder step costs more) or of a ``quant`` bit's share of them, so that small credits cost no codings.
STEP_UP_FROM = 0.02

#: Where the first coding in forward order ends with at least this fraction of the lossy tensors' planned bytes
#: unspent and the spare's receiver had a reserve held from it (:data:`RESERVE`), a model of at most
#: :data:`RESPEND_WEIGHTS` weights is coded again with the receiver given what was left, up to that reserve
#: (:func:`repair`): a later ``quant`` tensor whose GPTQ coding did not grow has no step fine enough to spend it
#: (a 784-256-128-10 MLP at ``-b 1``: 5.1 % of the budget unspent, fc2's next bit costing 3 KB).
RESPEND_FROM = 0.01
RESPEND_WEIGHTS = 1 << 22

#: Ratio of successive table scales keep-size bisects between two qualities (:func:`_finest`; the rate search's
#: ladder, :data:`codec.rd.ladder.FINE_RATIO`, is 1.03): at 1.03 one step of the bench CNN's compensated fc1 near
#: q5.3 cost about 550 B, more than its credit left, and 1.7 % of the file's budget went to fc2's eighth bit or
#: unspent; at 1.01 a step is a third of that, for a coding or two more per bisection.
FINE_STEP = 1.01


def held_out(n: int) -> list[int]:
    """The indices of ``n`` batches held out to check a fit (every :data:`HOLDOUT_EVERY`-th, from that many batches;
    none below); repair's refit and fine-tuning and :func:`codec.train.finetune` use it."""
    return [i for i in range(n) if n >= HOLDOUT_EVERY and i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]


@dataclass(frozen=True)
class RepairSettings:
    """How much repair to do.

    The defaults are the closed-form steps alone (refit, GPTQ, least-squares
    bias), which measured best for their time on the bench MLP and CNN
    (``python -m bench.repair``): distillation on top (``steps``,
    ``final_steps``) moved test accuracy by at most 0.2 points there, at 3-5
    times the time.
    """

    #: Adam steps of distillation after each lossy tensor is coded, on everything still free (0: none).
    steps: int = 0
    #: Adam steps on the losslessly stored parameters once everything is coded (0: none).
    final_steps: int = 0
    #: Adam learning rate.
    lr: float = 1e-3
    #: Least-squares bias of each coded Linear / Conv2d layer, when its bias is stored losslessly.
    bias_correction: bool = True
    #: Before coding a Linear / Conv2d weight, refit it by ridge regression so the layer maps its inputs in the
    #: partly coded model to the original layer's outputs (needs a pass of the original model per layer); kept only
    #: where, fitted on the other batches, it lowers the model's output error on the held-out ones
    #: (:func:`_refit_judged`; from :data:`HOLDOUT_EVERY` batches, none below).
    refit: bool = True
    #: GPTQ rounding for ``quant`` weights of Linear / Conv2d layers.
    gptq: bool = True
    #: The same for ``jpeg`` weights, a group of columns at a time (:func:`codec.rd.gptq.jpeg_target`). Measured
    #: on all-MiniLM-L6-v2's FFN and attention matrices: 2-2.5x less output error on held-out sentences at +0.1-0.3 %
    #: of the tensor's bytes.
    compensate: bool = True
    #: A ``jpeg`` weight in ``rows`` mode (a tile per output unit) is also coded at higher qualities with the DCT
    #: coefficients that matter least to the output pruned to fit its size (:mod:`codec.rd.rdo`: each unit's
    #: output sensitivity times the tile's scale and the inputs' energy), and each candidate coding is scored by the
    #: output error weighted by the units' sensitivities. Needs ``keep_size``.
    prune: bool = True
    #: ``prune`` in grid tiles too (any JPEG weight). Measured on the bench CNN and BatchNorm CNN at ``-b 0.6``
    #: (fc1 in 64 x 64 tiles at quality 5, conv2 / conv3): no pruned coding won, the same files as without, for
    #: up to 1.2x the repair's CPU time.
    prune_grid: bool = False
    #: Damping of GPTQ, JPEG compensation and the refit, a fraction of the mean diagonal of ``H``.
    damp: float = 0.01
    #: The same for a layer with no more calibration rows than input columns, whose ``H`` is rank-deficient: the
    #: compensation and the refit then fit the calibration inputs' own subspace. Measured on the bench BatchNorm CNN
    #: at ``-b 0.6`` (fc1: 3,136 inputs, 2,000 calibration images; bench/JOURNAL.md, "Lead's checks after the merges
    #: (eleventh pass)"): with 0.01 repair kept fc1's compensated coding at q3.15 over the plan's q6 by the
    #: calibration inputs' error, and the held-out KL rose by a third.
    damp_few_rows: float = 0.1
    #: A Linear / Conv2d layer with more input columns than this gets no ``H`` (8 x columns^2 bytes, factored in
    #: columns^3 time): its weight is coded as it stands and only its bias is corrected, from the inputs' means (a
    #: note names it). The default is calibration's own limit (:data:`codec.rd.calibrate.FULL_H_MAX`, above which it
    #: keeps H's diagonal: 8192). Measured on a grouped CNN whose head is ``Linear(6272, 10)`` (81 % of its weights),
    #: ``-b 2`` with 1,000 images (bench/JOURNAL.md, nineteenth pass): 82.49 % in 36.5 CPU s and +428 MB with the
    #: head's full ``H``, 81.45 % in 4.2 CPU s and no memory above the model's without (``max_columns=4096``); a
    #: VGG-like head (25,088 columns) would need 5 GB.
    max_columns: int = FULL_H_MAX
    #: Seed of torch's generator during repair (the caller's generator state is restored after).
    seed: int = 0
    #: Calibration batches used to collect a layer's input statistics (None: all).
    stats_batches: int | None = None
    #: Keep every lossy tensor within the bytes its planned options give the original values: refit and GPTQ
    #: values can code larger (measured: the bench CNN's file grew from 0.60 to 0.65 bits/weight at ``-b 0.6``),
    #: so a tensor that would grow past its plan plus what the tensors before it saved is coded with the next
    #: cheaper options (JPEG quality - 1, JPEG XL distance x 1.1) until it fits.
    keep_size: bool = True
    #: A tensor that fits its plan with credit to spare is coded with dearer options while they fit
    #: (:func:`_stepped_up`). Only when repair is given a ``spare`` (:func:`repair`): without one, the plan is within
    #: :data:`codec.encode.SPARE_MARGIN` of the budget and the savings keep-size leaves are that margin (measured:
    #: all-MiniLM-L6-v2 at ``-b 3.5`` spent them and ended at 3.5001 bits/weight, over, at 4x repair's CPU time).
    step_up: bool = True
    #: Codec-in-the-loop fine-tuning once everything is coded (:func:`codec.train.finetune`, see :func:`_finetune`):
    #: this many Adam steps on the floating parameters stored losslessly and the weights coded with ``quant``, each
    #: lossy tensor passed through its real encode/decode (straight-through gradients to float shadows that start at
    #: the repaired targets), matching the original model's outputs on the calibration inputs but every
    #: :data:`HOLDOUT_EVERY`-th batch; kept only when it lowers the output error on those held-out batches, the
    #: re-coded tensors within their planned bytes (0: none).
    finetune_steps: int = 0
    #: Adam learning rate of the fine-tuning.
    finetune_lr: float = 1e-4
    #: Code the weights every this many fine-tuning steps (the residual of the last coding passed in between).
    finetune_refresh: int = 4
    #: Fine-tuning loss: "mse" (relative MSE of every floating output, as repair) or "kl" (KL divergence of the
    #: softmax of the outputs' last axis at temperature 2: for classifiers, whose outputs are logits).
    finetune_loss: str = "mse"


@dataclass
class _Slot:
    """One stored tensor of the working model."""

    name: str
    module_name: str
    module: nn.Module
    attr: str
    is_param: bool
    dtype: DType
    original: np.ndarray
    lossy: bool
    order: float = math.inf
    coded: bool = False
    target: np.ndarray | None = None
    #: Bytes of the original value coded with the planned options (``keep_size``; None until coded).
    budget: int | None = None
    #: Bytes of the blobs of the coding repair chose, and of a table scale's list table in the index beyond the
    #: plan's (:func:`_finest`; None until coded).
    nbytes: int | None = None
    #: The coding repair chose: ``target`` encoded with its options (None until coded).
    encoded: Encoded | None = None
    #: Whether ``target`` differs from ``original`` (set when coded; the target itself may not be kept).
    changed: bool = False
    #: Whether the coding repair chose is a pruned one at a higher quality (:func:`_pruned`).
    pruned: bool = False
    #: Whether GPTQ's coding gave way to plain rounding to stay within the budget (:func:`_fit_size`).
    rounded: bool = False
    #: Whether the file's index will be zstd-compressed (format 1.3): a list table is then counted at what it adds
    #: compressed (:func:`_cost`).
    index_zstd: bool = False

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


@dataclass
class Repaired:
    """What :func:`repair` produced."""

    #: name -> array in storage form to encode instead of the original (the tensors the repair changed).
    targets: dict[str, np.ndarray]
    #: One-line remarks for the user.
    notes: list[str]
    #: The working copy holding exactly the values a reader decodes from ``targets`` and the options.
    model: nn.Module
    #: name -> the options to encode with, where repair had to change the planned ones (``keep_size``).
    options: dict[str, EncodeOptions]
    #: name -> every lossy tensor's encoding: its target coded with its options (``Encoded.rel_error`` measured),
    #: what a writer stores for it without coding it again.
    encoded: dict[str, Encoded]


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
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable, not {type(progress).__name__}")
    batches = _check_inputs(inputs, model)
    spare = spare if settings.keep_size else 0
    settings = replace(settings, step_up=settings.step_up and spare > 0)
    executor = make_executor(jobs)

    def run(release: int, progress) -> tuple:  # a working model of its own: (work, slots, _repair's result)
        work = copy.deepcopy(model, _shared_lossy(model, options) if settings.steps == 0 else {}).eval()
        for p in work.parameters():
            p.requires_grad_(False)  # parameters not stored (nor named in options) stay as they are
        slots = _slots(work, options, model)
        for slot in slots.values():
            slot.index_zstd = bool(index_zstd)
        with torch.random.fork_rng(devices=[]):
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


def _shared_lossy(model: nn.Module, options: Mapping[str, EncodeOptions]) -> dict[int, torch.Tensor]:
    """A :func:`copy.deepcopy` memo giving the working model tensors that share ``model``'s storage, for the lossy
    tensors on the CPU (those :func:`_slots` finds lossy); :func:`_take` later replaces their storage, never writes
    into it."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    memo: dict[int, torch.Tensor] = {}
    for name, opts in (options.items() if isinstance(options, Mapping) else ()):  # (_slots names what is wrong)
        tensor = tensors.get(name)
        if (not isinstance(tensor, torch.Tensor) or not isinstance(opts, EncodeOptions) or tensor.device.type != "cpu"
                or id(tensor) in memo or tensor.dtype not in TORCH_DTYPES):
            continue
        array, dtype_name = to_numpy(tensor)
        if _lossy(array, get_dtype(dtype_name), opts):
            shared = tensor.detach()
            if isinstance(tensor, nn.Parameter):
                shared = nn.Parameter(shared, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = shared
    return memo


def _take(slot: _Slot, decoded: np.ndarray) -> None:
    """The working model's tensor of ``slot`` takes ``decoded`` (storage form): as its storage on the CPU (the tensor
    may share the caller's model's storage until now: it is replaced, not written into), else copied in."""
    value = to_torch(decoded, slot.dtype.name)
    tensor = slot.tensor
    if tensor.device.type == "cpu" and value.dtype == tensor.dtype and value.shape == tensor.shape:
        tensor.data = value
    else:
        tensor.copy_(value)


class _Lookups:
    """The rows of each lossy ``nn.Embedding`` weight that the calibration inputs look up, recorded by hooks
    during one pass over them; once such a weight is coded, the working model can hold only those rows of its
    decoded values (:meth:`take`): all-MiniLM-L6-v2's 30,522 x 384 word embedding (47 MB, held from the first
    coded tensor to the end of repair) is read at the few thousand rows of the 125 calibration sentences."""

    def __init__(self, work: nn.Module, slots: dict[str, _Slot]):
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for slot in slots.values():
            if slot.lossy and slot.attr == "weight" and isinstance(slot.module, nn.Embedding):
                self.rows[id(slot.module)] = []
                self.handles.append(slot.module.register_forward_pre_hook(self._hook))

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.rows[id(module)].append(args[0].detach().reshape(-1).unique())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.rows = {key: torch.cat(ids).unique() if ids else None for key, ids in self.rows.items()}

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


def _measure(encoded: Encoded, target: np.ndarray, decoded: np.ndarray, dtype: DType) -> None:
    """Set a lossy encoding's ``rel_error`` (``||decoded - target|| / ||target||``), as a writer's checked coding
    would have it (:func:`codec.tensorcodec.start_encode`), for its note on an error no better than zeros."""
    if encoded.tiling is None or encoded.fallback:
        return
    rows = target.shape[0] if target.ndim else 1
    err, ref = _error_sums(target.reshape(rows, -1), decoded.reshape(rows, -1), dtype)
    encoded.rel_error = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)


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
    receiver, later = _receiver(queue, options, spare, executor, settings.gptq)
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
        with sample.narrowed(work, model):  # (collect needs the layer's inputs, not the model's output)
            layer = _LayerFit.collect(model, originals[slot.module_name], work, slot, slots, batches, settings,
                                      follower.get(id(slot.module)), reader) if _is_layer_weight(slot) else None
        del reader
        if layer is not None and layer.candidate is not None:
            judged.append(_refit_judged(work, layer, batches, judge_refs, settings, sample))
        if layer is not None and layer.h is None:
            wide.append(slot.name)
        elif layer is not None and settings.prune and settings.keep_size and _prunes(options[slot.name], slot,
                                                                                      settings):
            used = slice(settings.stats_batches)
            layer.sensitivity = unit_sensitivity(work, slot.module, batches[used], None, _run, _flat,
                                                 seed=settings.seed, scales=scales[used])
        if layer is not None:
            layer.settle()
        vector = _moving_vector(layer, options, settings, executor)
        target, assumed, decoded, opts, credit, slot.nbytes, slot.encoded = _code_within(
            slot, layer, options[slot.name], settings, executor, credit, held, i < last_image,
            0 if receiver is None or receiver.coded or slot is receiver else spare)  # (the receiver's is in credit)
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
            if layer is not None:
                layer.correct_bias(to_float64(decoded, slot.dtype))
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
    if wide:
        notes.append(f"repair: {len(wide)} layers with over {settings.max_columns} input columns got the least-squares "
                     f"bias only (no refit, GPTQ or compensation: their inputs' second moment would take 8 x columns^2 "
                     f"bytes; codec.save(..., repair=RepairSettings(max_columns=N)) raises the limit): " + ", ".join(wide))
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


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """``a.tobytes() == b.tobytes()`` without the two copies (an embedding's 47 MB each, at repair's peak)."""
    if a.nbytes != b.nbytes:
        return False
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    if a.itemsize != b.itemsize or a.itemsize not in (1, 2, 4, 8):
        return a.tobytes() == b.tobytes()
    width = np.dtype(f"u{a.itemsize}")
    return bool(np.array_equal(a.view(width), b.view(width)))


def _check_inputs(inputs: Iterable, model: nn.Module | None = None) -> Sequence:
    """The calibration batches as a sequence; ValueError/TypeError on one line for what cannot be used. Given
    ``model``, floating inputs of another dtype are cast to its parameters' (float32 images for a float16 or
    bfloat16 model, as calibration does).

    A sequence other than a list or tuple (one that makes each batch when asked for it: the command line's image
    folder and text file, :class:`codec.rd.calibrate._InputsAt`) is not held: :class:`_Reread` reads a batch from it
    each time one is used, checking it then (1,000 RGB 224 x 224 images are 602 MB as float32). Anything else (a
    list, a DataLoader, a one-shot iterator) is read into a list once and checked now, as the user's memory or a
    source that may not give the same batches twice."""
    if isinstance(inputs, (torch.Tensor, Mapping)) or not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be an iterable of batches (tensors or dicts of tensors), "
                        f"not {type(inputs).__name__}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None) if model is not None else None
    if isinstance(inputs, Sequence) and not isinstance(inputs, (list, tuple, str, bytes)):
        if not len(inputs):
            raise ValueError("inputs hold no batch: repair needs calibration inputs")
        return _Reread(inputs, dtype, range(len(inputs)))
    batches = list(inputs)
    if not batches:
        raise ValueError("inputs hold no batch: repair needs calibration inputs")
    return [_checked(batch, i, dtype) for i, batch in enumerate(batches)]


def _checked(batch, index: int, dtype: torch.dtype | None):
    """Calibration batch ``index`` checked (tensors, or a mapping of them, with no NaN or Inf: a one-line
    TypeError / ValueError naming it), its floating tensors cast to ``dtype`` (None: as they are)."""
    items = batch.items() if isinstance(batch, Mapping) else [("", batch)]
    for key, value in items:
        where = f"batch {index}" + (f" [{key!r}]" if key else "")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: not a tensor but {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: holds NaN or Inf")
    if dtype is None:
        return batch

    def cast(value: torch.Tensor) -> torch.Tensor:
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value

    return {k: cast(v) for k, v in batch.items()} if isinstance(batch, Mapping) else cast(batch)


class _Reread(Sequence):
    """Batches ``indices`` of a sequence that makes each batch when asked (:func:`_check_inputs`), read from it
    again each time one is used (:func:`_checked`), never held: repair's passes over the batches (two or three per
    layer) decode a folder's images again each time, at the cost of that decoding (measured in bench/JOURNAL.md,
    "mem (twenty-first pass)")."""

    def __init__(self, source: Sequence, dtype: torch.dtype | None, indices: range):
        self.source, self.dtype, self.indices = source, dtype, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _Reread(self.source, self.dtype, self.indices[index])
        k = self.indices[index]
        try:
            batch = self.source[k]
        except IndexError as exc:  # (else a pass over the batches would end there, silently short)
            raise ValueError(f"calibration batch {k}: the inputs said they hold {len(self.source)} batches, but "
                             f"there is no batch {k} ({type(exc).__name__}: {first_line(exc)})") from None
        return _checked(batch, k, self.dtype)


def _slots(work: nn.Module, options: Mapping[str, EncodeOptions], model: nn.Module | None = None
           ) -> dict[str, _Slot]:
    """The stored tensors of ``work`` (names of ``options``), with where they live and whether coding loses.

    Given ``model`` (``work`` is its deep copy; repair leaves ``model`` unchanged), each slot's ``original`` is
    a view of ``model``'s own tensor: a copy of every tensor was a whole model more of peak memory. Without
    it, a copy of ``work``'s tensor."""
    modules = dict((work if model is None else model).named_modules(remove_duplicate=False))
    if not isinstance(options, Mapping):
        raise TypeError(f"options must map tensor names to EncodeOptions, not {type(options).__name__}")
    where: dict[str, tuple[str, nn.Module, str, bool]] = {}
    for mod_name, module in work.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        for attr, _ in module.named_parameters(recurse=False):
            where.setdefault(prefix + attr, (mod_name, module, attr, True))
        for attr, buf in module.named_buffers(recurse=False):
            if buf is not None:
                where.setdefault(prefix + attr, (mod_name, module, attr, False))
    slots, seen = {}, {}
    for name, opts in options.items():
        if not isinstance(opts, EncodeOptions):
            raise TypeError(f"options[{name!r}] is not an EncodeOptions but {type(opts).__name__}")
        if name not in where:
            raise ValueError(f"options name {name!r} is not a parameter or buffer of the model")
        mod_name, module, attr, is_param = where[name]
        tensor = getattr(module, attr)
        key = id(tensor)
        if key in seen:
            raise ValueError(f"options name {name!r} is the same tensor as {seen[key]!r} (store it once)")
        seen[key] = name
        array, dtype_name = to_numpy(getattr(modules[mod_name], attr))
        dtype = get_dtype(dtype_name)
        lossy = _lossy(array, dtype, opts)
        original = array if model is not None else array.copy()
        slots[name] = _Slot(name, mod_name, module, attr, is_param, dtype, original, lossy)
    return slots


def _kept_weight(slot: _Slot) -> np.ndarray:
    """The working model's value of ``slot`` before it is coded, as an array that does not follow it once coded:
    ``slot.original`` itself where the working model still shares the caller's storage (:func:`_shared_lossy`;
    :func:`_take` gives the working model new storage, never writes into that one, and nothing writes into a
    target), else a copy. All-MiniLM-L6-v2's FFN output: 2.4 MB less while it is collected and coded."""
    current = to_numpy(slot.tensor)[0]
    original = slot.original
    if (current.shape == original.shape and current.dtype == original.dtype and current.flags.c_contiguous
            and original.flags.c_contiguous and current.ctypes.data == original.ctypes.data):
        return original
    return current.copy()


def _lossy(array: np.ndarray, dtype: DType, opts: EncodeOptions) -> bool:
    """Whether coding ``array`` with ``opts`` loses (a slot repair codes in forward order)."""
    return dtype.floating and opts.codec != "lossless" and lossless_reason(array, dtype, "quant") is None


def constant_growth(model: nn.Module, stored: Iterable[str], settings: RepairSettings | None = None) -> int:
    """Bytes a repaired file may need beyond its plan for the stored vectors that hold one value now and that
    repair gives values of their own: their raw sizes.

    A zero-initialised bias (or a fresh BatchNorm's running mean) codes losslessly in a few bytes; repair's
    least-squares bias (or the shift it puts in a running mean) makes it an ordinary vector that codes at about
    its raw size. The plan priced it as it was: an untrained BERT's repaired file at ``-b 3`` ended 0.9 % over
    its budget, a small net's 3.8 %. These are the vectors the repair with ``settings`` can change: every
    Linear / Conv2d bias and BatchNorm running mean (``bias_correction``), or, with distillation steps, every
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
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
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


def fitted_share(model: nn.Module) -> float:
    """The fraction of ``model``'s state (parameters and buffers, in elements) in the weights repair fits to the
    layers after them, a Linear or Conv2d's (refit, GPTQ, JPEG compensation): the share of a calibrated budget
    its step-ups are worth (:data:`codec.encode.REPAIR_SHARE`). A GRU's matrices are coded by plain rounding: a
    calibrated GRU at ``-b 3`` had output error 0.027 with the whole budget planned, 0.083 with 6 % left to
    repair's step-ups."""
    state = model.state_dict(keep_vars=True)
    total = sum(t.numel() for t in state.values())
    fitted = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(m.weight, torch.Tensor))
    return min(1.0, fitted / total) if total else 0.0


def moved_growth(model: nn.Module, inputs: Iterable, options: Mapping[str, EncodeOptions], stored: Iterable[str],
                 settings: RepairSettings | None = None) -> int:
    """:func:`constant_growth` of the vectors that repair with ``settings`` will move under the plan ``options``
    (model names): with the least-squares bias alone (no distillation steps), a vector moves only where a layer
    before it is coded lossily and repaired: the bias of a Linear / Conv2d whose weight the plan codes lossily, or
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
        opts = options.get(prefix + "weight")
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or opts is None or opts.codec == "lossless":
            continue
        after = follower.get(id(module))
        if module.bias is not None:
            moved.add(prefix + "bias")
        elif isinstance(after, nn.modules.batchnorm._BatchNorm) and id(after) in named:
            moved.add((named[id(after)] + "." if named[id(after)] else "") + "running_mean")
    return constant_growth(model, names & moved, settings)


def forward_order(model: nn.Module, batch) -> list[nn.Module]:
    """The modules of ``model`` in the order one forward pass on ``batch`` first calls them."""
    return _forward_calls(model, batch)[0]


def _forward_calls(model: nn.Module, batch, watched: Iterable[nn.Module] = ()
                   ) -> tuple[list[nn.Module], set[int], dict[int, int]]:
    """One forward pass of ``model`` on ``batch``: ``(order, once, shares)``. ``order`` as :func:`forward_order`;
    ``once``: the ids of the ``watched`` modules called exactly once, with a first argument that nothing changed in
    place later in the pass (its ``_version`` at the end of the pass is the one it had at the call): what the pass
    does after their call cannot change the inputs they were given (:class:`_Inputs`). ``shares``: for such a
    module whose first argument is the very tensor (same object, same version) an earlier one of ``once`` was given,
    its id -> that earlier module's id (the query, key and value projections of one attention). The watched modules'
    inputs are held until the pass ends (to read their versions then): one batch's, a few MB a layer."""
    order: list[nn.Module] = []
    seen: set[int] = set()
    watch = {id(m) for m in watched}
    calls: dict[int, int] = {}
    given: dict[int, tuple[torch.Tensor, int]] = {}
    shares: dict[int, int] = {}

    def hook(module, args):
        key = id(module)
        if key not in seen:
            seen.add(key)
            order.append(module)
        if key in watch:
            calls[key] = calls.get(key, 0) + 1
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and calls[key] == 1:
                first = next((k for k, (t, v) in given.items() if t is x and v == x._version), None)
                if first is not None:
                    shares[key] = first
                given[key] = (x, x._version)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    once = {k for k, n in calls.items() if n == 1 and k in given and given[k][0]._version == given[k][1]}
    shares = {k: v for k, v in shares.items() if k in once and v in once}
    return order, once, shares


class _Stop(BaseException):
    """Raised by a hook of :class:`_Inputs` to end a forward pass once the layer's inputs are seen (a BaseException:
    a model's own ``except Exception`` does not take it)."""


class _Inputs:
    """How :meth:`_LayerFit.collect` gets a layer's inputs on a batch: a forward pass of the working model (and of
    the original) that ends at the layer when nothing after it could change them, and the inputs a layer given the
    same tensor took before it (its group: one attention's query, key and value projections) taken again instead
    of running the models once more.

    A pass ends at the layer (``stop``) where :func:`_forward_calls` found it called once per pass with an input
    nothing changes in place after its call, and only while the working model is in eval mode (in training mode
    dropout would draw fewer random numbers in an ended pass than in a whole one): the rest of the pass computes
    nothing the layer's inputs depend on. The inputs of a layer of a group (``held``, kept by batch index) are
    those of the group's first layer: the very tensor each pass gives them was made before the first of them ran,
    so coding the group's earlier layers does not change it (only without distillation steps between layers). The
    same inputs, the same sums, the same bits: all-MiniLM-L6-v2's calibrated file keeps its md5, and the repair of a
    BERT-base block its targets and blobs (bench/JOURNAL.md, big, twenty-third pass); one block of the base: 36 %
    less CPU."""

    def __init__(self, stop: bool = False, held: dict | None = None):
        self.stop = stop
        #: batch index -> {"x": original's inputs, "h": working model's}, for the layers of one group (None: none kept)
        self.held = held

    def run(self, model: nn.Module, batch, key: str, k: int, seen: dict) -> None:
        """Put the layer's inputs on batch ``k`` in ``seen[key]`` ("x" the original's, "h" the working model's)."""
        kept = None if self.held is None else self.held.get(k, {}).get(key)
        if kept is not None:
            seen[key] = list(kept)
            return
        try:
            _run(model, batch)
        except _Stop:
            pass
        if self.held is not None and key in seen:
            self.held.setdefault(k, {})[key] = list(seen[key])


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
    from ..train import finetune

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


def _code(name: str, array: np.ndarray, dtype: DType, opts: EncodeOptions, executor
          ) -> tuple[np.ndarray, int, Encoded]:
    """Encode ``array`` with ``opts``; ``(what a reader decodes, bytes of the blobs, the encoding)``."""
    encoded = encode_tensor(array, dtype, opts, executor=executor)
    decoded = decode_encoded(encoded, dtype, array.shape, name, executor=executor)
    return decoded, sum(len(b) for b in encoded.blobs), encoded


def _receiver(queue: list[_Slot], options: Mapping[str, EncodeOptions], spare: int, executor, gptq: bool = True
              ) -> tuple[_Slot | None, dict[str, int]]:
    """``(slot, planned)``: the lossy tensor that gets ``spare`` (the one with most elements, the first of equals),
    and the planned bytes of the ``quant`` tensors coded after it that GPTQ codes (``gptq``: a Linear or Conv2d's
    weight), by name: what they may grow by is kept back from it and from the step-ups before them (:func:`_held`).
    Another ``quant`` tensor (a GRU's, an embedding's) is coded by plain rounding and cannot grow: nothing is held
    for it (a calibrated GRU of quant tensors only: nothing held, where 10 % of the GRU's bytes were)."""
    if spare <= 0 or not queue:
        return None, {}
    receiver = max(queue, key=lambda s: s.original.size)  # the first of the largest
    return receiver, {s.name: _code(s.name, s.original, s.dtype, options[s.name], executor)[1]
                      for s in queue[queue.index(receiver) + 1:]
                      if options[s.name].codec == "quant" and gptq and _is_layer_weight(s)}


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
    the next quality finer than it), ``quant`` one bit more (up to 8), JPEG XL distance / 1.1 (None: no such
    step). :func:`_fit_size` then bisects the finer JPEG steps between."""
    if opts.codec == "jpeg" and opts.quality is not None and opts.quality < 100:
        return replace(opts, quality=opts.quality + 1, scale=None)
    if opts.codec == "quant" and opts.bits < 8:
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


def _has_rows(module: nn.Module) -> bool:
    """Whether :func:`_layer_rows` can give ``module``'s inputs as rows (a Linear, or a zero-padded ungrouped Conv2d)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and isinstance(module.padding, tuple)
            and module.padding_mode == "zeros")


def _layer_rows(module: nn.Module, x: torch.Tensor):
    """A Linear / Conv2d layer's inputs as float32 rows ``[n, cols]`` matching its weight's matrix view, in chunks
    (:func:`_has_rows` says whether it applies). A Linear's come whole; a convolution's im2col rows come a few samples
    at a time (:func:`codec.rd.calibrate.conv_rows`, at most ``UNFOLD_BYTES``; the whole batch in one chunk when it
    fits), so a batch of large
    images never has its whole im2col matrix in memory: 250 images of 24 channels at 28 x 28 under a 3 x 3 kernel
    are 169 MB of rows, at 224 x 224 they would be 11 GB."""
    if isinstance(module, nn.Linear):
        yield x.reshape(-1, x.shape[-1]).float()
        return
    for cols in conv_rows(module, x, UNFOLD_BYTES):
        yield cols.float()


def _prunes(opts: EncodeOptions, slot: _Slot, settings: RepairSettings) -> bool:
    """Whether repair prunes the coding of ``slot`` (:func:`codec.rd.rdo.applies`): in ``rows`` mode, or in grid
    tiles with ``settings.prune_grid``."""
    rows = opts.row_shape is not None and math.prod(opts.row_shape) == math.prod(slot.original.shape[1:])
    return applies(opts, slot.original.shape, slot.dtype) and (rows or settings.prune_grid)


def _is_layer_weight(slot: _Slot) -> bool:
    return slot.attr == "weight" and slot.is_param and isinstance(slot.module, (nn.Linear, nn.Conv2d))


class _HeldOut:
    """One layer's rows on the held-out batches, kept for the refit on the other rows (:meth:`_LayerFit._rest_refit`):
    the coded inputs ``x_hat`` and ``y = x W^T`` (the original layer's outputs less its bias), float32, from which
    their sum ``wcross`` (``y^T x_hat = W x^T x_hat``, ``out x cols``) is made when needed, in float64 from float32
    products of a band of columns at a time: a few hundred rows of all-MiniLM-L6-v2's FFN output (1,536 inputs, 384
    outputs) take less than that matrix, and no ``cols^2`` cross moment of them is made. Once the rows would take
    more bytes than the sum (a convolution: many rows of few columns), the sum is added instead. The refit is only
    judged by it (:func:`_refit_judged`), so it need not be the bits of the sums :meth:`_LayerFit.collect` adds over
    all rows. (The other rows' ``H`` is summed over their own batches, :meth:`_LayerFit.collect`: no held-out ``H``.)
    """

    #: Bytes of the float32 product of a band of columns (:meth:`wcross`).
    BAND_BYTES = 1 << 22

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # the original layer's weight as a float32 [out, cols] matrix
        out, cols = weight.shape
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sums: torch.Tensor | None = None  # ``wcross`` summed as the rows come, once they pass ``limit``
        self.limit = 8 * out * cols

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """One chunk's rows (float32): the original model's inputs ``x`` and the working model's ``x_hat``."""
        y = x @ self.weight.T
        if self.sums is None:
            self.rows.append((y, x_hat))
            if sum(a.nbytes + b.nbytes for a, b in self.rows) <= self.limit:
                return
            rows, self.rows = self.rows, []
            for pair in rows:
                self._add(*pair)
        else:
            self._add(y, x_hat)

    def _add(self, y: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.sums = _widen_into(self.sums, y.T @ x_hat)

    def wcross(self) -> np.ndarray:
        """The held-out rows' ``wcross`` sum, float64, in an array the caller may write (once: the rows or the sum
        are dropped once they have served)."""
        if self.sums is not None:
            total, self.sums = self.sums.numpy(), None
            return total
        out, cols = self.weight.shape
        total = np.zeros((out, cols))
        band = max(1, self.BAND_BYTES // (4 * len(total)))
        for y, x_hat in self.rows:
            for j in range(0, cols, band):
                total[:, j:j + band] += (y.T @ x_hat[:, j:j + band]).numpy()
        self.rows = []  # made once: the rows have served
        return total


def _widen_into(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``total + value`` in float64, in ``total``'s own array (``value`` widened as it is added, the same bits as
    ``total.add_(value)``, which widens a float32 ``value`` into a float64 copy first: all-MiniLM-L6-v2's FFN
    output, 19 MB per batch); ``total`` None: a float64 copy of ``value``."""
    if total is None:
        return value.to(torch.float64, copy=True)
    if (value.dtype == total.dtype or value.device.type != "cpu" or total.device.type != "cpu"
            or not value.is_contiguous() or not total.is_contiguous() or value.requires_grad):
        return total.add_(value)
    out = total.numpy()
    np.add(out, value.numpy(), out=out)
    return total


#: A layer whose ``cols^2`` float64 moment takes this many bytes or more is collected in passes (:meth:`_LayerFit.
#: collect`, with a refit to judge): all-MiniLM-L6-v2's FFN output layers (19 MB each) held all rows' ``H`` and cross
#: moment and a batch's float32 product at once, then all rows' ``H`` and the held-out rows' (57 MB above repair's
#: floor); in passes, one ``cols^2`` matrix and a product. Each pass more runs the working model once over the
#: calibration batches (the other rows' ``H``: over the batches not held out).
SPLIT_MOMENT_BYTES = 16 << 20

#: What :meth:`_LayerFit.collect` sums over a chunk of a layer's input rows, in this order (the last two: refit only;
#: with a refit, ``hh`` of the batches not held out is also summed as ``rest_hh``).
_BATCH_SUMS = ("n", "sum_h", "hh", "sum_x", "cross")


def _batch_sum(key: str, x: torch.Tensor | None, x_hat: torch.Tensor):
    """One of :data:`_BATCH_SUMS` (or ``rest_hh``, the product of ``hh``) for rows ``x`` (original model) and
    ``x_hat`` (working model): the row count, a column sum in float64, or a moment product in float32."""
    if key == "n":
        return x_hat.shape[0]
    if key in ("sum_h", "sum_x"):
        return (x_hat if key == "sum_h" else x).double().sum(0)
    return x_hat.T @ x_hat if key in ("hh", "rest_hh") else x.T @ x_hat


class _LayerFit:
    """A Linear / Conv2d layer about to be coded: its input statistics in the original and the partly coded model.

    ``x`` are the layer's input rows in the original model, ``x_hat`` in the
    working one (they differ once earlier layers are coded). The layer should
    map ``x_hat`` to what the original layer gives for ``x``.
    """

    def __init__(self, slot: _Slot, bias: _Slot | None, w_ref: np.ndarray | torch.Tensor, b_ref: np.ndarray | None,
                 n: int, mean: np.ndarray, mean_hat: np.ndarray, shift: _Slot | None = None):
        self.slot, self.bias, self.w_ref, self.b_ref, self.shift = slot, bias, w_ref, b_ref, shift
        self.n, self.mean, self.mean_hat = n, mean, mean_hat
        self.cols = w_ref.shape[1]
        self._w_mean: np.ndarray | None = None  # ``w_ref @ mean`` once settled (:meth:`settle`)
        #: ``E[x_hat x_hat^T]`` of the coded inputs, centred when a bias or running mean absorbs the mean (set by
        #: :meth:`collect`), held with the inverse Cholesky factor GPTQ and compensation make of it, in one array
        #: (:class:`codec.rd.gptq.HeldInFactor`; a plain array set here is taken as a copy by :meth:`_h`)
        self.h: HeldInFactor | np.ndarray | None = None
        self._fitted: np.ndarray | None = None  # the weight to code (refit on): the original, or the refit if kept
        #: The refit fitted on all but the held-out batches (storage form), for :func:`_refit_judged` to decide on
        #: (None: no refit to judge)
        self.candidate: np.ndarray | None = None
        self._w_cross: np.ndarray | None = None  # W C of all rows, for the refit of all rows if the candidate is kept
        #: jpeg_target's result for the first options asked, the plan's (asked again by _code_within's coding at
        #: cheaper qualities; no other options are asked twice): (options, damping) -> (target, decoded); None once
        #: forgotten (:meth:`forget_compensated`: nothing more is kept)
        self._compensated: dict | None = {}
        #: Each output unit's sensitivity ``g_j`` (:func:`codec.rd.rdo.unit_sensitivity`; set by repair when
        #: ``settings.prune`` applies, else None)
        self.sensitivity: np.ndarray | None = None

    @property
    def w_ref(self) -> np.ndarray | None:
        """The reference weight, a float64 ``[out, cols]`` matrix (None once settled, :meth:`settle`). Set as a tensor
        (the reference layer's own weight, reshaped), it is held as that tensor and widened each time it is read
        (the same values: widening is exact), so that no float64 copy is held while the layer's statistics are
        collected (all-MiniLM-L6-v2's FFN output: 4.7 MB, alive through the passes over the batches); a reader
        that uses it more than once takes it once."""
        ref = self._w_ref
        return ref.double().numpy() if isinstance(ref, torch.Tensor) else ref

    @w_ref.setter
    def w_ref(self, value: np.ndarray | torch.Tensor | None) -> None:
        self._w_ref = value

    @classmethod
    def collect(cls, model: nn.Module, original: nn.Module, work: nn.Module, slot: _Slot, slots: dict[str, _Slot],
                batches: list, settings: RepairSettings, follower: nn.Module | None = None,
                reader: _Inputs | None = None) -> _LayerFit | None:
        """Run both models over the calibration batches and gather the layer's statistics (None: not applicable).

        ``follower`` is the module a forward pass calls right after the
        layer: a BatchNorm there (the layer without a bias of its own) takes
        the mean correction in its running mean. ``reader``: how the passes
        run (:class:`_Inputs`; default: whole passes).
        """
        reader = _Inputs() if reader is None else reader
        seen: dict[str, torch.Tensor] = {}
        acc = {"n": 0, "held_n": 0, "ok": True}
        used = batches[: settings.stats_batches]
        # The refit is kept only where the held-out batches show that it lowers the model's output error
        # (_refit_judged). With too few batches to hold any out
        # it is not made, the layer gathered as without refit: fitted to a handful of inputs it overfits them
        # (all-MiniLM-L6-v2 at -b 4 with 30 sentences, 2 batches: cosine 0.9856 / 0.9691 on the everyday /
        # rare-word sets with it, 0.9928 / 0.9874 without; data-free 0.9865 / 0.9817).
        # A layer wider than settings.max_columns input columns (a 6272 -> 10 classifier head: a 315 MB H) gets no H
        # at all: the least-squares bias from the inputs' means only, no refit, GPTQ or compensation (fit.h None).
        wide = math.prod(slot.original.shape[1:]) > settings.max_columns
        checked = set(held_out(len(used))) if settings.refit and not wide else set()
        refit = bool(checked)
        held_rows = _HeldOut(original.weight.detach().reshape(original.weight.shape[0], -1).float()) if refit else None

        def grab(key):
            def hook(mod, args):  # the inputs as they come; their rows are made a chunk at a time below
                if _has_rows(mod):
                    seen.setdefault(key, []).append(args[0].detach())  # a module called twice gives two sets
                else:
                    acc["ok"] = False
                if reader.stop:
                    raise _Stop
            return hook

        def add(key, value):  # float64 sums, added in place (_widen_into: no widened copy of a float32 product)
            if not isinstance(value, torch.Tensor):
                acc[key] = acc.get(key, 0) + value
            else:
                acc[key] = _widen_into(acc.get(key), value)

        # A layer whose moments are large (all-MiniLM-L6-v2's FFN output: 19 MB each) sums its H in passes of its
        # own over the working model (SPLIT_MOMENT_BYTES): the cross moment first, reduced to W C and freed, then the
        # other rows' H over the batches not held out (the refit on them is solved in its array), then all rows' H.
        # The same sums in the same order as one pass (the working model is not changed meanwhile): the same bits.
        split = refit and 8 * math.prod(slot.original.shape[1:]) ** 2 >= SPLIT_MOMENT_BYTES

        def sums(keys: tuple[str, ...], both: bool, rest: bool = False, rest_hh: bool = False) -> bool:
            """One pass over the batches adding ``keys`` (``both``: with the original model, the held-out sums and
            rows too; ``rest``: over the batches not held out only); False where the layer's inputs do not give
            rows. ``rest_hh``: the ``hh`` product of a batch not held out is also added to ``rest_hh``."""
            for k, batch in enumerate(used):
                if rest and k in checked:
                    continue
                held = both and k in checked
                seen.clear()
                reader.run(work, batch, "h", k, seen)
                if both:
                    reader.run(model, batch, "x", k, seen)
                if not acc["ok"] or "h" not in seen:
                    return False
                xs = seen.get("x", [])
                if both and [x.shape for x in xs] != [xh.shape for xh in seen["h"]]:
                    return False
                for i, inputs in enumerate(seen["h"]):
                    chunks = zip(_layer_rows(original, xs[i]), _layer_rows(slot.module, inputs)) \
                        if both else ((None, xh) for xh in _layer_rows(slot.module, inputs))
                    for x, xh in chunks:
                        # products in float32, summed in float64 (add widens them as it adds), each made when
                        # its turn comes: one cols^2 float32 product alive at a time
                        for key in keys:
                            value = _batch_sum(key, x, xh)
                            add(key, value)
                            if held and key not in ("hh", "cross"):
                                add("held_" + key, value)
                            if key == "hh" and rest_hh and k not in checked:
                                add("rest_hh", value)  # (the same product: the bits of a pass of its own)
                            del value
                        if held:
                            held_rows.add(x, xh)
            return True

        handles = [original.register_forward_pre_hook(grab("x")), slot.module.register_forward_pre_hook(grab("h"))]
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                keys = tuple(k for k in _BATCH_SUMS if k != "hh") if split else \
                    _BATCH_SUMS if refit else _BATCH_SUMS[:2] if wide else _BATCH_SUMS[:3]
                if not sums(keys, refit, rest_hh=refit and not split):
                    return None
                if split and not 0 < acc["held_n"] < acc["n"]:  # no refit to judge: H as it comes
                    split = False
                    sums(("hh",), False)
        finally:
            model.train(training)
            for h in handles:
                h.remove()

        def again(key: str = "hh") -> None:  # all rows' H, or the other rows' (rest_hh), summed as one pass would
            handles[:] = [slot.module.register_forward_pre_hook(grab("h"))]
            try:
                with torch.no_grad():
                    sums((key,), False, rest=key == "rest_hh")
            finally:
                for h in handles:
                    h.remove()

        if acc["n"] == 0:
            return None
        n = acc["n"]
        bias = getattr(slot.module, "bias", None)
        bias_slot = next((s for s in slots.values() if isinstance(bias, torch.Tensor) and s.tensor is bias), None)
        if bias_slot is not None and (bias_slot.lossy or bias_slot.coded or not settings.bias_correction):
            bias_slot = None
        mean_hat = (acc["sum_h"] / n).numpy()
        if refit:
            ref_w, ref_b = original.weight, original.bias
            mean = (acc["sum_x"] / n).numpy()
        else:  # the layer as it stands is the reference
            ref_w, ref_b = slot.module.weight, bias
            mean = mean_hat
        w_ref = ref_w.detach().reshape(ref_w.shape[0], -1)  # (widened when read: _LayerFit.w_ref)
        b_ref = None if ref_b is None else ref_b.detach().double().numpy()
        shift = None
        if bias is None and settings.bias_correction and isinstance(follower, nn.modules.batchnorm._BatchNorm):
            running = follower.running_mean
            shift = next((s for s in slots.values() if isinstance(running, torch.Tensor) and s.tensor is running
                          and s.dtype.floating and not s.lossy and not s.coded
                          and s.original.shape == (w_ref.shape[0],)), None)
        fit = cls(slot, bias_slot, w_ref, b_ref, n, mean, mean_hat, shift)
        # Memory: each moment matrix is cols^2 float64 (all-MiniLM-L6-v2's FFN output: 19 MB); the held-out rows'
        # W C is made when needed (_HeldOut), all are divided and centred in place and freed as soon as they have
        # served (all rows' cross moment as soon as W C is made; the other rows' H is solved in its own array), so
        # at most three live at once in one pass, one in passes, and only the coded inputs' H stays with the layer
        # (same values, same order of operations as whole-array arithmetic).
        if wide:
            return fit
        candidate = None
        if refit and 0 < acc["held_n"] < n:
            try:
                candidate = fit._rest_refit(acc, held_rows, settings, again if split else None)
                candidate = from_float64(candidate.reshape(slot.original.shape), slot.dtype)  # (before H again)
            except np.linalg.LinAlgError:  # the other rows' H singular even damped: no refit to judge
                candidate = None
                fit._weighted_cross(acc)
        del held_rows
        acc.pop("rest_hh", None)
        if "hh" not in acc:  # (in passes: all rows' H once the refit on the other rows is made)
            again()
        h = acc.pop("hh").div_(n).numpy()
        fit._centre(h, mean_hat, mean_hat)
        fit.h = HeldInFactor(h, own=True)  # (its own array: the factor is made in it, H kept below the factor)
        if refit:
            fit._fitted = _kept_weight(slot)
            if candidate is not None:
                fit.candidate, candidate = candidate, None
                fit._w_cross = fit._weighted_cross(acc)
        return fit

    def adopt_refit(self, settings: RepairSettings) -> None:
        """Take the refit fitted on all rows as the weight to code (its candidate, fitted on the other rows, was
        kept by :func:`_refit_judged`)."""
        fitted = self._ridge(self._h().dense(), self._w_cross, settings)
        self._fitted = from_float64(fitted.reshape(self.slot.original.shape), self.slot.dtype)
        self.drop_candidate()

    def drop_candidate(self) -> None:
        self.candidate = self._w_cross = None

    def forget_compensated(self) -> None:
        """Drop the compensated target kept for the plan's options and keep no other (:meth:`target`; made again
        if asked)."""
        self._compensated = None

    def _h(self) -> HeldInFactor:
        """The second moment of the coded inputs (centred when a bias or running mean is free to absorb the mean),
        held with its factor: GPTQ and compensation share the factor, made once per layer (gptq._factor), and
        the scores read ``H`` from its triangle (:meth:`codec.rd.gptq.HeldInFactor.quadratic_error`)."""
        if not isinstance(self.h, HeldInFactor):
            self.h = HeldInFactor(self.h)
        return self.h

    def damp(self, settings: RepairSettings) -> float:
        """The damping for this layer: ``settings.damp``, or ``settings.damp_few_rows`` where the calibration gave
        no more rows than the layer has input columns."""
        return settings.damp if self.n > self.cols else max(settings.damp, settings.damp_few_rows)

    def target(self, opts: EncodeOptions, settings: RepairSettings) -> tuple[np.ndarray, np.ndarray | None]:
        """``(array to encode, its decoded values as float64 or None)``: the refit, then GPTQ for ``quant``."""
        slot = self.slot
        current = self._fitted if self._fitted is not None else to_numpy(slot.tensor)[0]
        # (a wide layer has no H: its weight is coded as it stands, :meth:`collect`)
        if self.h is not None and settings.gptq and opts.codec == "quant":
            from .gptq import gptq_target

            return gptq_target(current, slot.dtype, opts, self._h(), damp=self.damp(settings))
        if self.h is not None and settings.compensate and opts.codec == "jpeg":
            from .gptq import jpeg_target

            key, kept = (opts, self.damp(settings)), self._compensated
            if kept and key in kept:
                return kept[key]
            # no float64 decoded values: the coding that follows (_coded_target) decodes the target itself
            found = jpeg_target(current, slot.dtype, opts, self._h(), damp=self.damp(settings), decoded=False)
            if kept == {}:
                kept[key] = found
            return found
        # a refit is the layer's own array; the weight itself is a view of the working model, which is about to
        # take the decoded values: the target must not follow it (_kept_weight)
        return (current if self._fitted is not None else _kept_weight(slot)), None

    def _centre(self, moment: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
        """Centre a moment matrix in place (``moment -= outer(left, right)``, a band of rows at a time) when a bias
        or running mean absorbs the mean."""
        if self.bias is None and self.shift is None:
            return
        step = max(1, (1 << 16) // max(1, len(right)))
        for i in range(0, len(left), step):
            moment[i:i + step] -= np.outer(left[i:i + step], right)

    def _weighted_cross(self, acc: dict) -> np.ndarray:
        """``W C`` of all rows' cross moment ``C`` (``acc``'s sum, divided and centred in place), made once and kept
        in ``acc`` in its place: the ``cols^2`` moment is freed as soon as it served."""
        if "cross" in acc:
            cross = acc.pop("cross").div_(acc["n"]).numpy()
            self._centre(cross, self.mean, self.mean_hat)
            acc["w_cross"] = self.w_ref @ cross
        return acc["w_cross"]

    def _ridge(self, h: np.ndarray, w_cross: np.ndarray, settings: RepairSettings) -> np.ndarray:
        """The weight mapping the coded inputs to the original layer's outputs, by ridge towards the original:
        ``W' (H + lam I) = W (C + lam I)`` (``w_cross``: ``W C``). ``h`` (``H``, centred) is damped for the solve
        and given its diagonal back after it (no copy of it: all-MiniLM-L6-v2's FFN output, 19 MB)."""
        lam = self.damp(settings) * float(np.mean(np.diag(h))) + 1e-12
        diagonal = np.diag(h).copy()
        rhs = w_cross + lam * self.w_ref
        h[np.diag_indices(len(h))] += lam
        try:
            return np.linalg.solve(h.T, rhs.T).T
        finally:
            h[np.diag_indices(len(h))] = diagonal

    def _rest_refit(self, acc: dict, held: _HeldOut, settings: RepairSettings,
                    again: Callable[[str], None] | None = None) -> np.ndarray:
        """The refit fitted on all but every :data:`HOLDOUT_EVERY`-th batch (float64, ``[out, cols]``), for
        :func:`_refit_judged` to try on the held-out batches. ``acc`` holds the sums over all rows, the held-out
        rows' count and sums of ``x`` and ``x_hat`` (``held_*``) and the other rows' ``H`` (``rest_hh``, summed over
        their own batches); ``held`` the held-out rows (:class:`_HeldOut`).

        Memory: the other rows' ``W C`` is all rows' ``W C`` less the held-out rows' (made from their rows, ``out x
        cols``, which are then dropped), then all rows' cross moment is reduced to ``W C`` (:meth:`_weighted_cross`,
        kept for the refit of all rows) and freed, and the ridge is solved in the other rows' ``H``'s own array
        (:func:`codec.rd.gptq._inverse_cholesky_upper`), which is then freed. Given ``again`` (a layer
        :meth:`collect` sums in passes: ``acc`` has no ``H`` yet), ``again("rest_hh")`` sums the other rows' ``H``
        once the cross moment is freed: one ``cols^2`` matrix at a time, and no held-out row kept while it is
        summed. All rows' ``H`` is not read here."""
        from .gptq import _inverse_cholesky_upper

        n, n_held = acc["n"], acc["held_n"]
        m = n - n_held
        rest_x, rest_h = ((acc[k] - acc["held_" + k]).numpy() / m for k in ("sum_x", "sum_h"))
        centred = self.bias is not None or self.shift is not None
        w_ref = self.w_ref
        w_cross = w_ref @ acc["cross"].numpy()
        w_mean = w_ref @ rest_x if centred else None
        del w_ref  # (before the held-out rows' moment is made)
        w_cross -= held.wcross()
        w_cross /= m
        if centred:
            w_cross -= np.outer(w_mean, rest_h)
        self._weighted_cross(acc)
        if again is not None:
            again("rest_hh")
        h = acc.pop("rest_hh").numpy()
        lam = self.damp(settings) * float(np.mean(np.diagonal(h) / m - (rest_h * rest_h if centred else 0.0))) + 1e-12
        w_cross += lam * self.w_ref
        rhs, w_cross = w_cross, None
        given = [h]

        def damped() -> np.ndarray:  # the other rows' H, centred and damped, in its own array (once)
            if not given:
                raise np.linalg.LinAlgError("the other rows' H is singular")
            h = given.pop()
            h /= m
            self._centre(h, rest_h, rest_h)
            h[np.diag_indices(len(h))] += lam
            return h

        del h
        u = _inverse_cholesky_upper(damped)  # (H + lam I)^-1 = U^T U
        rhs = rhs @ u.T  # (the right-hand side freed as its product is made)
        return rhs @ u

    def settle(self) -> None:
        """Before the layer is coded (its refit decided): keep of the reference weight only ``W_ref E[x]``, all that
        :meth:`correct_bias` reads of it, made as it would make it (all-MiniLM-L6-v2's FFN output: a 4.7 MB float64
        matrix less while the layer is coded)."""
        if self.w_ref is None:
            return
        if self.bias is not None or self.shift is not None:
            self._w_mean = self.w_ref @ self.mean
        self.w_ref = None

    def correct_bias(self, decoded: np.ndarray) -> None:
        """Least-squares bias given the coded weight: ``b = E[W_ref x + b_ref] - W_hat E[x_hat]``.

        A layer without a bias followed by a BatchNorm moves the BatchNorm's
        running mean instead, by ``E[W_hat x_hat] - E[W_ref x]``, so the
        normalized output keeps its mean.
        """
        if self.bias is None and self.shift is None:
            return
        w_hat = decoded.reshape(decoded.shape[0], -1)
        w_mean = self._w_mean if self.w_ref is None else self.w_ref @ self.mean
        b = w_mean - w_hat @ self.mean_hat + (0.0 if self.b_ref is None else self.b_ref)
        if self.bias is not None:
            bias = self.bias.tensor
            bias.copy_(torch.from_numpy(b).to(bias.dtype))
        else:
            running = self.shift.tensor
            running.copy_(torch.from_numpy(to_float64(self.shift.original, self.shift.dtype) - b).to(running.dtype))
