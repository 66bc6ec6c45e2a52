"""One Linear / ConvNd layer's least-squares fit: its input statistics in the original and the partly coded model
(:class:`_LayerFit`, collected through :mod:`.inputs`' hooks, with the held-out rows of :class:`_HeldOut`), the
refit, the GPTQ / JPEG-compensated targets (:mod:`codec.rd.gptq`) and the least-squares bias.

Builds on :mod:`.settings`, :mod:`.slots` and :mod:`.inputs`; :mod:`.budget` codes the targets it gives, and
:mod:`.loop` collects and settles a layer before coding it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ...api import to_numpy
from ...dtypes import from_float64, to_float64
from ...tensorcodec import EncodeOptions
from ..calibrate import (UNFOLD_BYTES, _computed_weight, _weight_error, bilinear_rows, conv_rows,
                         hook_weight_norm, transposed_matrix)
from ..gptq import HeldInFactor
from ..pruned import MASK, ORIG, pruned_weight
from .inputs import _Inputs, _Stop
from .settings import RepairSettings, held_out
from .slots import _Slot, _kept_weight


#: The layers repair fits (refit, GPTQ, JPEG compensation, the least-squares bias; "ConvNd" in the docstrings, not the
#: transposed ones): their weight is a matrix ``weight.reshape(out, -1)`` over their input rows (im2col columns for
#: the convolutions, the outer products of its two inputs for an ``nn.Bilinear``: :func:`_layer_rows`).
FITTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)


def _has_rows(module: nn.Module) -> bool:
    """Whether :func:`_layer_rows` can give ``module``'s inputs as rows (a Linear, or a zero-padded ungrouped
    Conv1d / Conv2d / Conv3d)."""
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return True
    return (isinstance(module, FITTED) and module.groups == 1 and isinstance(module.padding, tuple)
            and module.padding_mode == "zeros")


def _layer_rows(module: nn.Module, x: torch.Tensor):
    """A Linear / ConvNd layer's inputs as float32 rows ``[n, cols]`` matching its weight's matrix view, in chunks
    (:func:`_has_rows` says whether it applies). A Linear's come whole; a convolution's im2col rows come a few samples
    at a time (:func:`codec.rd.calibrate.conv_rows`, at most ``UNFOLD_BYTES``; the whole batch in one chunk when it
    fits), so a batch of large
    images never has its whole im2col matrix in memory: 250 images of 24 channels at 28 x 28 under a 3 x 3 kernel
    are 169 MB of rows, at 224 x 224 they would be 11 GB."""
    if isinstance(module, nn.Linear):
        yield x.reshape(-1, x.shape[-1]).float()
        return
    if isinstance(module, nn.Bilinear):  # (x: its two inputs, :func:`_layer_input`)
        for rows in bilinear_rows(x[0].float(), x[1].float(), UNFOLD_BYTES):
            yield rows
        return
    for cols in conv_rows(module, x, UNFOLD_BYTES):
        yield cols.float()


def _layer_input(module: nn.Module, args: tuple):
    """What :func:`_layer_rows` takes of a call's positional ``args``: the first, detached, or an ``nn.Bilinear``'s
    two as a tuple (None: not tensors)."""
    count = 2 if isinstance(module, nn.Bilinear) else 1
    if len(args) < count or not all(isinstance(a, torch.Tensor) for a in args[:count]):
        return None
    return args[0].detach() if count == 1 else (args[0].detach(), args[1].detach())


def _shape(x) -> tuple:
    """The shape of :func:`_layer_input`'s value (of both inputs of an ``nn.Bilinear``)."""
    return tuple(t.shape for t in x) if isinstance(x, tuple) else tuple(x.shape)


#: The transposed convolutions repair gives the least-squares bias (:meth:`_LayerFit.collect_means`): their input
#: rows are not the stored weight's matrix view (:func:`codec.rd.calibrate.transposed_matrix` permutes it), and a
#: ``quant`` / JPEG tile of the stored tensor mixes that view's rows, so GPTQ and compensation (row by row over the
#: stored tensor's rows) and the refit do not apply to them as they stand.
TRANSPOSED_FITS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _is_layer_weight(slot: _Slot) -> bool:
    return slot.attr == "weight" and slot.is_param and isinstance(slot.module, FITTED)


class _Layer:
    """The layer repair fits for a lossy stored tensor (:func:`_layer_of`): ``name`` and ``module`` (the working
    model's), ``computed`` where the tensor is a weight_norm / spectral_norm original the layer computes its weight
    from (``conv.parametrizations.weight.original1``: the layer is ``conv``), ``rows`` where GPTQ and JPEG
    compensation over the stored tensor's rows act on the layer's output error (a plain Linear / ConvNd weight;
    weight_norm's ``v`` with ``dim=0``, whose rows are the weight's each times ``g / ||v||``, or ``dim=None`` and
    spectral_norm's original, a uniform factor), and ``transposed`` (a transposed convolution: the least-squares bias
    only, :data:`TRANSPOSED_FITS`)."""

    def __init__(self, name: str, module: nn.Module, computed: bool, rows: bool, transposed: bool):
        self.name, self.module, self.computed, self.rows, self.transposed = name, module, computed, rows, transposed

    #: A ``torch.nn.utils.prune`` layer's 0/1 mask (the ``[out, cols]`` view; :mod:`codec.rd.pruned`): the stored
    #: ``weight_orig`` is the weight where it is 1 and reaches nothing where it is 0. GPTQ and JPEG compensation
    #: spread only the error of the entries it keeps. None: no mask.
    mask: np.ndarray | None = None
    #: Whether the layer is pruned (``torch.nn.utils.prune``): its least-squares bias is judged on the held-out
    #: batches against none (:func:`codec.rd.repair.loop._bias_judged`), as a transposed convolution's is.
    pruned: bool = False

    def weight(self) -> torch.Tensor:
        """The layer's weight from its tensors as they are now (:func:`_computed`)."""
        return _computed(self.module)

    def matrix(self, weight: torch.Tensor | np.ndarray) -> np.ndarray:
        """A weight of the layer (its own shape) as the float64 ``[out, cols]`` matrix its output rows take."""
        weight = torch.as_tensor(weight).detach()
        if self.transposed:
            return transposed_matrix(weight, self.module.groups).double().numpy()
        return weight.reshape(weight.shape[0], -1).double().numpy()


def _computed(module: nn.Module) -> torch.Tensor:
    """``module.weight``, computed from the tensors as they are now: weight_norm's hook form
    (``torch.nn.utils.weight_norm``) sets it as an attribute only when the module's forward starts, so after its
    ``weight_v`` is coded the attribute is the old weight until the next call."""
    hook = hook_weight_norm(module)
    if hook is not None:
        return hook.compute_weight(module)
    pruned = pruned_weight(module)  # (torch.nn.utils.prune's hook sets the attribute as weight_norm's does)
    return module.weight if pruned is None else pruned


#: Repair acts on weight_norm / spectral_norm layers through the weight they compute (:class:`_Layer`); False: their
#: stored tensors are coded as planned, with no repair of their layer (before the twenty-ninth pass).
COMPUTED_LAYERS = True
#: Repair gives transposed convolutions the least-squares bias (:meth:`_LayerFit.collect_means`); False: coded as
#: planned, with no repair (before the twenty-ninth pass).
TRANSPOSED_BIAS = True


def _layer_of(work: nn.Module, slot: _Slot) -> _Layer | None:
    """The layer repair fits for ``slot`` (None: none). A plain Linear / ConvNd weight, a transposed convolution's
    weight, or a weight_norm / spectral_norm original of one (its layer then computes the weight from it; either form
    of weight_norm, the hook form's ``weight_v`` too). weight_norm's ``g`` has no layer: it is coded as planned,
    before ``v``, and the layer's fit then sees it coded."""
    if slot.attr == "weight" and slot.is_param and isinstance(slot.module, FITTED):
        return _Layer(slot.module_name, slot.module, False, True, False)
    if slot.attr == "weight" and slot.is_param and isinstance(slot.module, TRANSPOSED_FITS):
        return _Layer(slot.module_name, slot.module, False, False, True) if TRANSPOSED_BIAS else None
    if not COMPUTED_LAYERS or not slot.is_param:
        return None
    if slot.attr.endswith(ORIG) and isinstance(slot.module, FITTED) \
            and pruned_weight(slot.module, slot.attr[:-len(ORIG)]) is not None:
        if slot.attr != "weight" + ORIG:  # (another pruned tensor of the layer, its bias: coded as planned)
            return None
        layer = _Layer(slot.module_name, slot.module, True, True, False)  # rows: the weight's, factor 1
        layer.pruned = True
        mask = getattr(slot.module, "weight" + MASK).detach()
        layer.mask = mask.reshape(mask.shape[0], -1).double().numpy()
        return layer
    if slot.attr == "weight_v":  # weight_norm's hook form: the layer is the module itself
        hook = hook_weight_norm(slot.module)
        if hook is None or isinstance(slot.module, TRANSPOSED_FITS) and not TRANSPOSED_BIAS:
            return None
        if isinstance(slot.module, TRANSPOSED_FITS):
            return _Layer(slot.module_name, slot.module, True, False, True)
        if not isinstance(slot.module, FITTED):
            return None
        return _Layer(slot.module_name, slot.module, True, hook.dim in (0, -1), False)  # (-1: dim=None)
    if slot.attr not in ("original", "original1"):
        return None
    known, computed = _computed_weight(work, slot.name)
    name, _, param = computed.rpartition(".")
    if not known or param != "weight":
        return None
    module = work.get_submodule(name) if name else work
    chain = module.parametrizations.weight
    weight_norm = type(chain[0]).__name__ == "_WeightNorm"
    if getattr(chain, "original1" if weight_norm else "original", None) is not slot.tensor:
        return None  # (weight_norm's g)
    if isinstance(module, TRANSPOSED_FITS):
        return _Layer(name, module, True, False, True) if TRANSPOSED_BIAS else None
    if not isinstance(module, FITTED):
        return None
    dim = getattr(chain[0], "dim", None)
    rows = slot.attr == "original" or dim in (0, None, -slot.original.ndim)  # a factor per row, or one
    return _Layer(name, module, True, rows, False)


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
    """A Linear / ConvNd layer about to be coded: its input statistics in the original and the partly coded model.

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
        #: The layer fitted (:func:`_layer_of`; None: ``slot``'s module, a plain Linear / ConvNd)
        self.layer: _Layer | None = None
        #: A transposed convolution's ``(W E[x_hat], b)`` as it stood before coding (:meth:`bias_choices`)
        self._own: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def bias_only(self) -> bool:
        """Whether the layer gets the least-squares bias only for what it is (a transposed convolution, a
        weight_norm layer whose ``g`` runs along another axis than the output's), not for its width."""
        return self.layer is not None and not self.layer.rows

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
                reader: _Inputs | None = None, layer: _Layer | None = None) -> _LayerFit | None:
        """Run both models over the calibration batches and gather the layer's statistics (None: not applicable).

        ``follower`` is the module a forward pass calls right after the
        layer: a BatchNorm there (the layer without a bias of its own) takes
        the mean correction in its running mean. ``reader``: how the passes
        run (:class:`_Inputs`; default: whole passes). ``layer``: the layer
        (:func:`_layer_of`; default ``slot``'s module); ``original`` is then
        the original model's layer of that name. A layer that computes its
        weight from ``slot`` (weight_norm's ``v``) gets no refit (a refit
        of the weight is not a value of ``v``: the layer would normalise it
        again), its least-squares bias aimed at its own coding error, read
        through the weight it computes once ``v`` is coded; GPTQ and JPEG
        compensation act on ``v``'s rows where they are the weight's times
        a factor each (``layer.rows``), else it gets the bias only.
        """
        reader = _Inputs() if reader is None else reader
        layer = _Layer(slot.module_name, slot.module, False, True, False) if layer is None else layer
        module = layer.module
        if layer.computed and not layer.pruned:  # (a pruned layer's refit is fitted on its kept entries: _masked)
            settings = replace(settings, refit=False)
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
        wide = math.prod(slot.original.shape[1:]) > settings.max_columns or not layer.rows
        checked = set(held_out(len(used))) if settings.refit and not wide else set()
        refit = bool(checked)
        held_rows = _HeldOut(original.weight.detach().reshape(original.weight.shape[0], -1).float()) if refit else None

        def grab(key):
            def hook(mod, args):  # the inputs as they come; their rows are made a chunk at a time below
                x = _layer_input(mod, args) if _has_rows(mod) else None
                if x is not None:  # a module called twice: two sets
                    seen.setdefault(key, []).append(x)
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
                if both and [_shape(x) for x in xs] != [_shape(xh) for xh in seen["h"]]:
                    return False
                for i, inputs in enumerate(seen["h"]):
                    chunks = zip(_layer_rows(original, xs[i]), _layer_rows(module, inputs)) \
                        if both else ((None, xh) for xh in _layer_rows(module, inputs))
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

        handles = [original.register_forward_pre_hook(grab("x")), module.register_forward_pre_hook(grab("h"))]
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
            handles[:] = [module.register_forward_pre_hook(grab("h"))]
            try:
                with torch.no_grad():
                    sums((key,), False, rest=key == "rest_hh")
            finally:
                for h in handles:
                    h.remove()

        if acc["n"] == 0:
            return None
        n = acc["n"]
        bias = getattr(module, "bias", None)
        bias_slot = _bias_slot(bias, slots, settings)
        mean_hat = (acc["sum_h"] / n).numpy()
        if refit:
            ref_w, ref_b = original.weight, original.bias
            mean = (acc["sum_x"] / n).numpy()
        else:  # the layer as it stands is the reference
            ref_w, ref_b = _computed(module), bias  # (a computed weight: from the working model's tensors as they are)
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
        fit.layer = layer
        if layer.pruned and fit.bias is not None:  # (its bias judged against none: _Layer.pruned)
            fit._own = (_times(layer.matrix(layer.weight()), mean_hat),
                        fit.bias.tensor.detach().double().numpy().copy())
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

    @classmethod
    def collect_means(cls, model: nn.Module, original: nn.Module, work: nn.Module, slot: _Slot,
                      slots: dict[str, _Slot], batches: list, settings: RepairSettings, layer: _Layer,
                      reader: _Inputs | None = None) -> _LayerFit | None:
        """A transposed convolution's least-squares bias (``layer.transposed``; None: no bias to move): ``b = E[W_ref
        x] - E[W_hat x_hat] + b_ref`` per output channel, the mean of the original layer's outputs on the original
        model's inputs less the coded layer's on the working model's (the mean shift of the layers coded before it
        too, as :func:`_refit_judged`'s ``"original"``). Each output position reads other taps of the input (its phase
        modulo the stride, the edges), so the mean input row differs by position: what is kept is, for each weight
        element, the mean over the output positions of the input it multiplies, ``d E[y] / dW`` (one backward pass
        of the layer's linear map a batch, exact for any stride, padding, dilation, groups and output size), in the
        matrix view :func:`codec.rd.calibrate.transposed_matrix` (``mean`` ``[out, cols]``, :func:`_times`). No
        ``H``: no refit, GPTQ or compensation (:data:`TRANSPOSED_FITS`)."""
        reader = _Inputs() if reader is None else reader
        module = layer.module
        bias = getattr(module, "bias", None)
        bias_slot = _bias_slot(bias, slots, settings)
        if bias_slot is None:
            return None
        seen: dict[str, list] = {}
        d = len(module.kernel_size)

        def grab(key):
            def hook(mod, args, out):  # the input and the output's spatial size (an output_size given by keyword)
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    seen.setdefault(key, []).append((args[0].detach(), tuple(out.shape[-d:])))
                if reader.stop:
                    raise _Stop
            return hook

        sums: dict[str, torch.Tensor] = {}
        counts = {"x": 0, "h": 0}
        shape = tuple(layer.weight().shape)
        handles = [original.register_forward_hook(grab("x")), module.register_forward_hook(grab("h"))]
        training = model.training
        model.eval()
        try:
            for k, batch in enumerate(batches[: settings.stats_batches]):
                seen.clear()
                with torch.no_grad():
                    reader.run(work, batch, "h", k, seen)
                    reader.run(model, batch, "x", k, seen)
                for key in ("x", "h"):
                    for x, size in seen.get(key, []):
                        x = x.double().unsqueeze(0) if x.dim() == d + 1 else x.double()
                        w = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
                        with torch.enable_grad():
                            y = _weight_error(module, x, w, size)
                            y.sum().backward()
                        sums[key] = w.grad if key not in sums else sums[key] + w.grad
                        counts[key] += y.numel() // y.shape[1]
                        del y, w
        finally:
            model.train(training)
            for h in handles:
                h.remove()
        if not counts["x"] or not counts["h"]:
            return None
        mean, mean_hat = (layer.matrix(sums[k] / counts[k]) for k in ("x", "h"))
        b_ref = None if original.bias is None else original.bias.detach().double().numpy()
        fit = cls(slot, bias_slot, layer.matrix(_computed(original)), b_ref, counts["h"], mean, mean_hat)
        fit.layer = layer
        # the layer as it stands, for the bias aimed at its own coding error (:meth:`bias_choices`)
        fit._own = (_times(layer.matrix(layer.weight()), mean_hat), bias.detach().double().numpy().copy())
        return fit

    def bias_choices(self, decoded: np.ndarray) -> dict[str, np.ndarray]:
        """The biases :func:`_bias_judged` chooses from for a transposed convolution (:meth:`collect_means`) coded as
        ``decoded``: ``"original"`` (:meth:`correct_bias`'s: the original layer's output mean on the original model's
        inputs), ``"own"`` (``b + E[(W - W_hat) x_hat]``: its own coding error's mean only, the layer as it stood
        before coding the reference) and ``"none"`` (the bias as it is)."""
        bias = self.bias.tensor
        kept = bias.detach().double().numpy().copy()
        self.correct_bias(decoded)
        original = bias.detach().double().numpy().copy()
        layer = self.layer
        w_hat = layer.matrix(layer.weight()) if layer.computed else layer.matrix(decoded)
        own_mean, own_bias = self._own
        return {"none": kept, "original": original, "own": own_mean - _times(w_hat, self.mean_hat) + own_bias}

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
        """``(array to encode, its decoded values as float64 or None)``: the refit, then GPTQ for ``quant``. An
        ``H`` no damping makes positive definite (inputs that are all alike: an encoder-decoder's decoder given only
        its start token, whose centred moments are rounding noise) leaves the layer coded as it stands, as a wide
        layer is, and :attr:`singular` says so (a note names it)."""
        try:
            return self._target(opts, settings)
        except np.linalg.LinAlgError:
            self.h, self.singular = None, True
            return self._target(opts, settings)

    #: Whether the layer's ``H`` could not be factored (:meth:`target`): coded without GPTQ or compensation.
    singular = False

    def _target(self, opts: EncodeOptions, settings: RepairSettings) -> tuple[np.ndarray, np.ndarray | None]:
        slot = self.slot
        current = self._fitted if self._fitted is not None else to_numpy(slot.tensor)[0]
        # (a wide layer has no H: its weight is coded as it stands, :meth:`collect`)
        if self.h is not None and settings.gptq and opts.codec == "quant":
            from ..gptq import gptq_target

            return gptq_target(current, slot.dtype, opts, self._h(), damp=self.damp(settings), mask=self._mask())
        if self.h is not None and settings.compensate and opts.codec == "jpeg":
            from ..gptq import jpeg_target

            key, kept = (opts, self.damp(settings)), self._compensated
            if kept and key in kept:
                return kept[key]
            # no float64 decoded values: the coding that follows (_coded_target) decodes the target itself
            found = jpeg_target(current, slot.dtype, opts, self._h(), damp=self.damp(settings), decoded=False,
                                mask=self._mask())
            if kept == {}:
                kept[key] = found
            return found
        # a refit is the layer's own array; the weight itself is a view of the working model, which is about to
        # take the decoded values: the target must not follow it (_kept_weight)
        return (current if self._fitted is not None else _kept_weight(slot)), None

    def _mask(self) -> np.ndarray | None:
        """The layer's prune mask (:attr:`_Layer.mask`), or None."""
        return None if self.layer is None else self.layer.mask

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
            if self._mask() is not None:
                return _masked_solve(h, rhs, self._mask())
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
        from ..gptq import _inverse_cholesky_upper

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
        if self._mask() is not None:
            return _masked_solve(damped(), rhs, self._mask())
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
            self._w_mean = _times(self.w_ref, self.mean)
        self.w_ref = None

    def correct_bias(self, decoded: np.ndarray) -> None:
        """Least-squares bias given the coded weight: ``b = E[W_ref x + b_ref] - W_hat E[x_hat]``.

        A layer without a bias followed by a BatchNorm moves the BatchNorm's
        running mean instead, by ``E[W_hat x_hat] - E[W_ref x]``, so the
        normalized output keeps its mean.
        """
        if self.bias is None and self.shift is None:
            return
        layer = self.layer
        if layer is not None and layer.computed:  # the weight the layer computes from its coded tensors
            w_hat = layer.matrix(layer.weight())
        elif layer is not None and layer.transposed:
            w_hat = layer.matrix(decoded)
        else:
            w_hat = decoded.reshape(decoded.shape[0], -1)
        w_mean = self._w_mean if self.w_ref is None else _times(self.w_ref, self.mean)
        b = w_mean - _times(w_hat, self.mean_hat) + (0.0 if self.b_ref is None else self.b_ref)
        if self.bias is not None:
            bias = self.bias.tensor
            bias.copy_(torch.from_numpy(b).to(bias.dtype))
        else:
            running = self.shift.tensor
            running.copy_(torch.from_numpy(to_float64(self.shift.original, self.shift.dtype) - b).to(running.dtype))


def _masked_solve(h: np.ndarray, rhs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ridge refit of a pruned layer (:attr:`_Layer.mask`): row ``r`` solves ``W'_r[K] h[K, K] = rhs_r[K]`` over
    its kept columns ``K`` only and is 0 elsewhere (``h`` damped and symmetric), so the refit weight is one the mask
    keeps (a dense refit would move entries the layer multiplies by 0). Rows of one mask share one solve."""
    out = np.zeros_like(rhs)
    keys: dict[bytes, list[int]] = {}
    kept = mask > 0
    for r in range(len(rhs)):
        keys.setdefault(np.packbits(kept[r]).tobytes(), []).append(r)
    for rows in keys.values():
        k = np.flatnonzero(kept[rows[0]])
        if len(k):
            out[np.ix_(rows, k)] = np.linalg.solve(h[np.ix_(k, k)], rhs[np.ix_(rows, k)].T).T
    return out


def _times(w: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``E[W x]`` per output row: ``W @ mean`` for one mean input row, or ``(W * mean).sum(1)`` where ``mean`` holds
    one per output row (``[out, cols]``: a transposed convolution's, :meth:`_LayerFit.collect_means`)."""
    return w @ mean if mean.ndim == 1 else np.einsum("ij,ij->i", w, mean)


def _bias_slot(bias, slots: dict[str, _Slot], settings: RepairSettings) -> _Slot | None:
    """The lossless, not yet coded stored tensor that is a layer's ``bias`` (None: none, or no bias correction)."""
    found = next((s for s in slots.values() if isinstance(bias, torch.Tensor) and s.tensor is bias), None)
    if found is not None and (found.lossy or found.coded or not settings.bias_correction):
        return None
    return found
