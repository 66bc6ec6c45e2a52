"""The torch edge: state_dicts in, state_dicts out.

This is the only module that imports torch. It converts tensors to numpy
arrays in storage form (:mod:`codec.dtypes`), detects tensors that share
storage, and drives :mod:`codec.tensorcodec` and the container.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import os
import re
import warnings
import weakref
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch

from .dtypes import get_dtype
from .errors import EncodeError, FormatError, UsageError
from .limits import DEFAULT_LIMITS, Limits
from .parallel import AHEAD_BYTES, INLINE, Pending, make_executor, release_memory, resolve_jobs
from .reader import Reader
from .stats import Totals, file_totals
from .tensorcodec import (ZERO_ERROR, Encoded, EncodeOptions, Overrides, given_options, ignored_options,
                          option_conflicts, start_encode)
from .writer import Writer, encode_attachment

__all__ = ["save", "load", "open", "JwtFile", "read_state_dict", "read_checkpoint", "flatten_checkpoint",
           "unflatten_checkpoint", "dropped_note", "encoder_versions", "TORCH_DTYPES", "TREE_KEY", "progress_total"]

#: torch dtype -> format dtype name.
TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint64: "uint64",
    torch.uint32: "uint32",
    torch.uint16: "uint16",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_BY_NAME = {v: k for k, v in TORCH_DTYPES.items()}
#: Dtypes numpy cannot hold, moved through numpy as same-width integers.
_BITS_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}

ProgressFn = Callable[[str, int], None]


def encoder_versions() -> dict[str, str]:
    """Versions of the libraries that produce the bytes (stored in the index)."""
    import imagecodecs
    import PIL
    import zstandard

    from . import __version__

    return {
        "jwt": __version__,
        "imagecodecs": imagecodecs.__version__,
        "libjpeg-turbo": imagecodecs.jpeg8_version(),
        "libjxl": imagecodecs.jpegxl_version(),
        "pillow": PIL.__version__,
        "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
    }


def to_numpy(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """Return ``(storage array, dtype name)`` for a CPU copy of ``tensor``."""
    name = TORCH_DTYPES.get(tensor.dtype)
    if name is None:
        raise EncodeError(f"unsupported dtype {tensor.dtype}")
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype in _BITS_VIEW:
        t = t.view(_BITS_VIEW[t.dtype])
    array = t.numpy()
    return (array.view(np.uint16) if tensor.dtype == torch.bfloat16 else array), name


def to_torch(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """Inverse of :func:`to_numpy` (shares memory with ``array`` when it can)."""
    dtype = _BY_NAME[dtype_name]
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = array.copy()  # (np.ascontiguousarray would turn 0-d into 1-d)
    if dtype in _BITS_VIEW:
        return torch.from_numpy(array.view(np.int16) if dtype == torch.bfloat16 else array).view(dtype)
    return torch.from_numpy(array)


def _unstorable(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be stored, found without touching its data (or None).

    A few-KB .pt can hold a sparse or meta tensor, or a 0-stride view claiming
    terabytes; sizes over the default reader limits would also give a file
    that default readers refuse.
    """
    if t.layout != torch.strided:
        return f"layout {t.layout} is not supported (convert it to a dense tensor)"
    if t.is_meta:
        return "a meta tensor holds no data"
    if t.dtype not in TORCH_DTYPES:
        return f"unsupported dtype {t.dtype}"
    return _size_problem(tuple(t.shape), t.element_size())


def _size_problem(shape: tuple[int, ...], itemsize: int) -> str | None:
    """Why a tensor of ``shape`` and ``itemsize``-byte elements would give a file default readers refuse."""
    if len(shape) > DEFAULT_LIMITS.max_ndim:
        return f"{len(shape)} dimensions, over the {DEFAULT_LIMITS.max_ndim} that readers accept"
    nbytes = math.prod(shape) * itemsize
    if nbytes > DEFAULT_LIMITS.max_tensor_bytes:
        return f"{nbytes} bytes, over the {DEFAULT_LIMITS.max_tensor_bytes} that readers accept (codec.Limits)"
    return None


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save(
    state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
    path: str | os.PathLike[str] | BinaryIO,
    *,
    metadata: Mapping[str, str] | None = None,
    overrides: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
    bits_per_weight: float | None = None,
    max_error: float | None = None,
    calibrate: Callable[[dict[str, torch.Tensor]], float] | None = None,
    progress: ProgressFn | None = None,
    attachments: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    jobs: int | None = None,
    base: Any = None,
    calibration: Any = None,
    model: torch.nn.Module | None = None,
    repair: bool | None = None,
    calibration_progress: Callable[[str, int], None] | None = None,
    search: str = "fast",
    ray: str | None = None,
    **options: Any,
) -> list[str]:
    """Encode ``state_dict`` (or an ``nn.Module``'s) to a .jwt file at ``path`` (atomically).

    ``state_dict`` is a mapping of names to tensors, an ``nn.Module`` (its
    ``state_dict()``) or a checkpoint dict (nested dicts, lists, plain values:
    see :func:`flatten_checkpoint`); anything else is a TypeError, and a
    mapping without tensors an EncodeError.

    ``options`` are :class:`~codec.tensorcodec.EncodeOptions` fields
    (``codec``, ``quality``, ``table``, ``tile``, ``row_shape``, ...).
    ``overrides`` maps glob patterns to per-tensor settings
    (``{"fc2.*": "lossless", "*.attention.*": "q90"}``; see
    :func:`~codec.tensorcodec.parse_spec`; the last match wins).

    Rate targets (at most one) turn on the rate-distortion allocator
    (:mod:`codec.rd.allocate`), which picks codec, table and quality per
    tensor: ``bits_per_weight`` bounds the whole file; ``max_error`` bounds
    each tensor's relative RMS error. ``calibrate(state_dict) -> score``
    (higher is better) measures each tensor's sensitivity for the budget
    allocation instead of the data-free estimate. ``search``: ``"fast"``
    predicts a budget search from samples of each tensor and measures in
    full only what it picks (:mod:`codec.rd.fast`); ``"exhaustive"``
    measures every candidate. ``ray`` (``"auto"``, ``"local"`` or a
    cluster address) codes the tensors on Ray workers
    (:mod:`codec.distributed.ray`, the optional extra ``[ray]``); the file
    is the same bytes.

    ``calibration`` (with a rate target and an ``nn.Module``): the user's
    inputs, unlabelled -- a tensor or array of samples along its first
    axis, or an iterable of batches (tensors, or mappings passed as
    ``model(**batch)``) -- or a :class:`codec.rd.calibrate.Calibration`
    already made by :func:`codec.calibrate`. The allocator then scores each
    calibrated layer by the error it causes in its output, ``tr(dW H dW^T)``
    weighted by the layer's sensitivity (:mod:`codec.rd.calibrate`).
    ``model``: the module to run when ``state_dict`` holds its tensors
    rather than being the module itself (a checkpoint's tensors, under the
    module's state_dict names; tensors it does not have are coded data-free).
    ``repair`` (default: on when calibration inputs are given) then codes
    the layers in forward order, compensating errors and repairing
    not-yet-coded parameters on the inputs (:mod:`codec.rd.repair`); the
    file is read by the same decoder as any other.
    ``calibration_progress(stage, n)`` follows calibration (inputs) and
    repair. Without data, a BatchNorm or LayerNorm after a layer weighs its
    output rows (:func:`codec.rd.allocate.norm_weightings`), and a budget
    that can only be met by leaving a tensor with a relative error above
    :data:`codec.rd.allocate.DAMAGE` is met, with a note naming the tensors
    and the smallest budget that avoids it (returned, and stored in the
    metadata under ``jwt.warnings`` for ``jwt info``).

    Tensors sharing storage (same data, shape and strides) are stored once
    and aliased; tensors whose memory overlaps otherwise (``b`` and ``b[:10]``)
    are stored losslessly, with a note. ``state_dict`` may load tensors lazily on access (e.g.
    :func:`codec.io_formats.open_source`). ``attachments`` maps relative
    POSIX paths to bytes or to files to read: non-tensor files (config,
    tokenizer) carried losslessly after the tensors. Returns warnings (e.g.
    tensors kept lossless for NaN/Inf).

    ``jobs`` worker threads code blobs in parallel (None: one per core, 1:
    none); the file is byte for byte the same whatever ``jobs`` is. Tensors
    are taken one at a time, at most ``jobs`` of them (and
    :data:`codec.parallel.AHEAD_BYTES` of input beyond the newest) in
    flight, so a lazy ``state_dict`` is never held whole.

    ``base`` makes the file an **update** (spec section 12) against a model
    the receiver already holds: a path (.jwt, .pt/.pth, .safetensors or a
    model folder), a state_dict, or a :class:`codec.update.Base`. A .jwt
    base is decoded first, so differences are taken against what the
    receiver decodes. Each tensor is stored as unchanged (bit-identical to a
    base tensor), as a difference from the base tensor of its name, or in
    full (new, reshaped, other dtype); with a rate target the search chooses
    among full, difference and unchanged, measuring the error on the
    reconstructed weights.
    """
    jobs = resolve_jobs(jobs)
    if search not in ("fast", "exhaustive"):
        raise ValueError(f"search={search!r}: use 'fast' or 'exhaustive'")
    if ray is not None:
        from .distributed.ray import connect

        connect(ray)  # fail early: Ray missing or the cluster unreachable
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model= must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(state_dict, torch.nn.Module):
        model, state_dict = model or state_dict, state_dict.state_dict()
    if calibration is not None:
        if model is None:
            raise TypeError("calibration= needs the model itself: pass the nn.Module, not its state_dict "
                            "(or the module as model=)")
        if bits_per_weight is None and max_error is None:
            raise ValueError("calibration= needs a rate target: give bits_per_weight or max_error")
    elif repair:
        raise ValueError("repair=True needs calibration inputs (calibration=)")
    opts = EncodeOptions(**options)
    problem = option_conflicts(given_options(options), searching=bits_per_weight is not None or max_error is not None)
    if problem:
        raise EncodeError(problem)
    rules = Overrides(overrides)
    rules.check(opts)
    meta, encoder = dict(metadata or {}), encoder_versions()
    notes: list[str] = []
    if not isinstance(state_dict, Mapping):
        path_given = isinstance(state_dict, (str, os.PathLike))
        hint = "; to encode a file or folder, use codec.encode_model" if path_given else ""
        raise TypeError(f"codec.save: expected a state_dict (a mapping of names to tensors), a checkpoint dict or an "
                        f"nn.Module, not {type(state_dict).__name__}{hint}")
    # A lazy mapping (codec.io_formats.LazyTensors: a .safetensors shard, a .jwt) reads a tensor on each access:
    # it is checked from shapes and dtypes, and its tensors share no storage, so nothing is read before coding.
    lazy = callable(getattr(state_dict, "shape", None)) and callable(getattr(state_dict, "dtype_name", None))
    if lazy:
        _check_lazy(state_dict)
    elif not _check_tensors(state_dict):  # a checkpoint dict: nested tensors under dotted names, the rest in the tree
        state_dict, tree, dropped = flatten_checkpoint(state_dict)
        meta.update(tree)
        if dropped:
            notes.append(dropped_note("checkpoint", dropped))
        _check_tensors(state_dict)
    if not len(state_dict):
        raise EncodeError("nothing to encode: the state_dict holds no tensors")
    aliases, overlaps = ({}, []) if lazy else _sharing(state_dict)
    if overlaps:  # views that share part of their memory: kept exact, so they stay equal where they overlap
        notes.append(f"tensors {', '.join(map(repr, overlaps[:10]))}{', ...' if len(overlaps) > 10 else ''} "
                     "share part of their memory (overlapping views): stored losslessly so they stay equal there")
        lossless = dataclasses.replace(opts, codec="lossless")
        rules = _Forced(rules, set(overlaps), lossless)
    matcher = None
    if base is not None:
        if ray is not None:
            raise EncodeError("ray= and base= together are not supported yet: encode the update locally")
        if repair:  # repair codes whole weights, not differences: its values would not be what the plan coded
            raise ValueError("repair=True and base= together are not supported: an update is calibrated without "
                             "repair (repair=False)")
        repair = False
        from .format import BaseId
        from .update.plan import Matcher

        update_base = as_base(base)
        matcher = Matcher(update_base)
        base_id = BaseId(update_base.digest(), len(update_base))
    repaired = False
    if bits_per_weight is not None or max_error is not None:
        from .rd.allocate import WARNINGS_KEY, Distortion, norm_weightings

        weightings = norm_weightings({n: _shape(state_dict, n) for n in state_dict},
                                     lambda n: state_dict[n].detach().to("cpu", torch.float64).numpy())
        inputs, calib = _calibration(model, calibration, repair, calibration_progress, meta)
        if calib is not None:
            weightings.update(calib.weightings())
            release_memory()
        damaged: list[str] = []
        packed = {n: encode_attachment(n, d) for n, d in (attachments or {}).items()}  # sized here, written below
        coded: dict = {}  # tensors the search coded with their chosen options: written as they are
        chosen = _plan(state_dict, aliases, opts, rules, meta, encoder, bits_per_weight, max_error, calibrate,
                       progress, packed, jobs, matcher, measure_by=Distortion(weightings), notes=damaged,
                       search=search, coded=coded)
        if damaged:
            meta[WARNINGS_KEY] = "; ".join(damaged)
            notes += damaged
        repaired = inputs is not None
        if repaired or matcher is not None:  # repair changes the values; an update codes differences
            coded.clear()
        if repaired:
            weightings = calib = None  # calibration's H matrices served the plan (MiniLM: 150 MB); repair has its own
            release_memory()
            state_dict = _repaired(model, state_dict, aliases, inputs, chosen, calib, calibration_progress, jobs,
                                   notes)
            release_memory()
        options_for: Callable[[str], EncodeOptions] = chosen.__getitem__
    else:
        options_for = lambda name: rules.options_for(name, opts) or opts  # noqa: E731
        coded, packed = {}, {}
    stored: list[tuple[str, tuple[int, ...], Any]] = []
    with Writer(path, metadata=meta, encoder=encoder, base=None if matcher is None else base_id) as writer:
        if ray is not None:
            from .distributed.ray import encode_in_order

            coded = ((*item, None) for item in encode_in_order(state_dict, aliases, options_for, ray))
        else:
            coded = _encode_in_order(state_dict, aliases, options_for, jobs, matcher, done=coded)
        for name, target, dtype, shape, encoded, ref in coded:
            if target is not None:
                writer.add_alias(name, target)
                continue
            if encoded is None:
                writer.add_unchanged(name, dtype, shape, ref)
                continue
            if encoded.fallback:
                notes.append(f"tensor {name!r}: stored losslessly ({encoded.fallback})")
            if ref is None and encoded.rel_error is not None and encoded.rel_error >= ZERO_ERROR:
                notes.append(f"tensor {name!r}: relative error {encoded.rel_error:.3g} with {_describe(encoded)}, "
                             "no better than storing zeros (error 1); choose more bits or a higher quality")
            writer.add(name, dtype, shape, encoded, base=ref)
            stored.append((name, shape, dtype))
            if progress:
                progress(name, math.prod(shape))
        for name, data in (attachments or {}).items():
            writer.add_attachment(name, data, packed.get(name))
    if repaired and bits_per_weight is not None and isinstance(path, (str, os.PathLike)):
        # repair changes values after the plan: their coded size can differ from the planned one
        weights = sum(math.prod(_shape(state_dict, n)) for n in state_dict if n not in aliases)
        got = 8 * os.path.getsize(path) / max(weights, 1)
        if got > bits_per_weight:
            notes.append(f"repair: the file is {got:.3f} bits/weight, over the {bits_per_weight} asked for "
                         f"(the repaired values code larger than planned)")
    return ignored_options(stored, opts, rules) + notes


def _describe(encoded) -> str:
    """A tensor's codec and its parameters in a few words, e.g. ``quant bits=1``."""
    params = " ".join(f"{k}={v}" for k, v in encoded.codec.get_config().items() if k not in ("id", "level"))
    return f"{encoded.codec.codec_id} {params}".strip()


def progress_total(state_dict: Mapping[str, torch.Tensor], *,
                   overrides: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
                   bits_per_weight: float | None = None, max_error: float | None = None, **options: Any) -> int:
    """The sum of the counts :func:`save` with the same arguments reports to ``progress`` (a bar's total).

    Each stored tensor reports its size when it is coded; with a rate target the search first reports it
    once per candidate setting it measures (:func:`codec.rd.allocate.search_units`), which is most of the
    work, so a bar over this total moves with the time spent. Read from shapes and dtypes alone.
    """
    lazy = callable(getattr(state_dict, "shape", None))  # a lazy .safetensors mapping: no shared storage
    if lazy:
        names = list(state_dict)
    else:  # what save refuses (not a tensor, sparse, ...) counts nothing here: save names it
        storable = {n: t for n, t in state_dict.items() if isinstance(t, torch.Tensor) and not _unstorable(t)}
        aliases = _sharing(storable)[0]
        names = [n for n in storable if n not in aliases]

    def dtype_of(name: str):
        return get_dtype(state_dict.dtype_name(name) if lazy else TORCH_DTYPES[state_dict[name].dtype])

    total = sum(math.prod(_shape(state_dict, n)) for n in names)
    if bits_per_weight is None and max_error is None:
        return total
    from .rd.allocate import search_units

    base, rules = EncodeOptions(**options), Overrides(overrides)
    return total + search_units(((n, _shape(state_dict, n), dtype_of(n)) for n in names), base,
                                lambda name: rules.options_for(name, base), bits_per_weight=bits_per_weight,
                                max_error=max_error)


def _calibration(model, calibration, repair, progress, meta):
    """``(inputs kept for repair or None, Calibration or None)`` for :func:`save`'s ``calibration``."""
    if calibration is None:
        return None, None
    from .rd.calibrate import Calibration, as_batches, calibrate

    if isinstance(calibration, Calibration):
        if repair:
            raise ValueError("repair=True needs the calibration inputs, not a Calibration; pass the inputs")
        calib, inputs = calibration, None
    else:
        if repair and not _repair_available():
            raise EncodeError("repair=True: coding with repair (codec.rd.repair) is not available in this build")
        use_repair = repair is not False and _repair_available()
        inputs = as_batches(calibration)
        if use_repair and iter(inputs) is inputs:  # a one-shot iterator: keep its batches for repair
            inputs = list(inputs)
        calib = calibrate(model, inputs, progress=progress)
        if not use_repair:
            inputs = None
    meta["jwt.calibration"] = f"{calib.samples} inputs in {calib.batches} batches, {len(calib.layers)} layers"
    return inputs, calib


def _repair_available() -> bool:
    try:
        from .rd.repair import code_with_repair  # noqa: F401
    except ImportError:
        return False
    return True


def _repaired(model, state_dict, aliases, inputs, chosen, calib, progress, jobs, notes):
    """``state_dict`` with the arrays :func:`codec.rd.repair.code_with_repair` changed, to be coded as planned.

    Repair codes the layers in forward order with the chosen options and
    returns, in storage form, only the tensors whose values it changed
    (error-compensated weights, repaired biases and later parameters);
    coding those with the options in ``chosen`` (updated in place where
    repair had to code a tensor cheaper to keep its planned size) gives
    exactly what repair assumed.
    """
    from .rd.repair import code_with_repair

    counted = (lambda name, n: progress("repair", n)) if progress else None  # repair counts per tensor coded
    targets, repair_notes, changed = code_with_repair(model, inputs, dict(chosen), calib, progress=counted,
                                                      jobs=jobs)
    notes += list(repair_notes)
    chosen.update(changed)  # options repair lowered to keep a tensor within its planned size
    out = dict(state_dict)
    for name, array in targets.items():
        if name not in out:
            raise EncodeError(f"repair returned tensor {name!r}, which is not in the state_dict")
        if name in aliases:  # stored as its target: the target's value decides
            continue
        array, want = np.asarray(array), out[name]
        if tuple(array.shape) != tuple(want.shape):
            raise EncodeError(f"repair returned tensor {name!r} with shape {tuple(array.shape)}, "
                              f"not {tuple(want.shape)}")
        storage = to_numpy(want.reshape(-1)[:1])[0].dtype
        out[name] = (to_torch(array, TORCH_DTYPES[want.dtype]) if array.dtype == storage  # storage form
                     else torch.from_numpy(array.copy()).to(want.dtype))  # a plain float array of another width
    return out


def _encode_in_order(state_dict: Mapping[str, torch.Tensor], aliases: dict[str, str],
                     options_for: Callable[[str], EncodeOptions], jobs: int, matcher: Any = None,
                     done: dict[str, Encoded] | None = None):
    """Yield ``(name, alias target, dtype, shape, Encoded, base ref)`` in ``state_dict`` order.

    An alias has no dtype or Encoded. With an update's ``matcher``
    (:class:`codec.update.plan.Matcher`) a tensor coded from a base tensor
    has its base ref: Encoded None for an unchanged one, else the coded
    difference.

    Each tensor is fetched from ``state_dict`` once, when its turn comes,
    and its blobs are coded by ``jobs`` threads while the following tensors
    are fetched and submitted; results are handed out in order. A tensor in
    ``done`` (already coded with its options, by the rate search) is handed
    out as it is, without being fetched.
    """
    executor = make_executor(jobs)
    window = max(1, jobs - 1)  # with the tensor being fetched: ``jobs`` tensors in flight, one per worker
    pending: deque = deque()
    ahead = 0
    try:
        for name in state_dict:
            if name in aliases:
                pending.append((name, aliases[name], None, (), None, 0, None))
            elif done and name in done:
                job = Pending([INLINE.submit(done.pop, name)], lambda parts: parts[0])
                pending.append((name, None, get_dtype(_dtype_name(state_dict, name)), _shape(state_dict, name), job,
                                0, None))
            else:
                array, dtype_name = to_numpy(state_dict[name])
                dtype = get_dtype(dtype_name)
                opts = options_for(name)
                mode, ref = ("full", None) if matcher is None else matcher.decide(name, array, dtype, opts)
                coded = matcher.delta_array(name, array, dtype, opts) if mode == "delta" else array
                job = None if mode == "unchanged" else start_encode(coded, dtype, opts, executor, check=True)
                pending.append((name, None, dtype, tuple(array.shape), job, array.nbytes, ref))
                ahead += array.nbytes
                del array
            while len(pending) > window or (len(pending) > 1 and ahead > AHEAD_BYTES):
                ahead -= pending[0][5]
                yield _finish_encode(pending)
        while pending:
            yield _finish_encode(pending)
    finally:
        for item in pending:
            if item[4] is not None:
                item[4].cancel()
        if executor is not INLINE:
            executor.shutdown(wait=True, cancel_futures=True)


def _finish_encode(pending: deque) -> tuple:
    """Pop the oldest tensor of :func:`_encode_in_order` and wait for it, keeping no reference to its input."""
    name, target, dtype, shape, job, _, ref = pending.popleft()
    return name, target, dtype, shape, None if job is None else job.result(), ref


def _check_tensors(state_dict: Mapping) -> bool:
    """False if ``state_dict`` is not a plain state_dict (a key that is no string, a value that is no tensor);
    EncodeError for a tensor that cannot be stored."""
    for name, tensor in state_dict.items():
        if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
            return False
        problem = _unstorable(tensor)
        if problem:
            raise EncodeError(f"tensor {name!r}: {problem}")
    return True


def _check_lazy(tensors: Any) -> None:
    """:func:`_check_tensors` for a lazy mapping, from its shapes and dtypes (EncodeError for one too large)."""
    for name in tensors:
        problem = _size_problem(tuple(tensors.shape(name)), get_dtype(tensors.dtype_name(name)).storage.itemsize)
        if problem:
            raise EncodeError(f"tensor {name!r}: {problem}")


class _Forced:
    """Overrides with some tensors forced to fixed options (the last word, over every rule)."""

    def __init__(self, rules: Overrides, names: set[str], options: EncodeOptions):
        self.rules, self.names, self.options = rules, names, options

    def options_for(self, name: str, base: EncodeOptions) -> EncodeOptions | None:
        return self.options if name in self.names else self.rules.options_for(name, base)

    def __getattr__(self, attr: str) -> Any:  # the user's rules as they are (rule_for, unmatched, ...)
        return getattr(self.rules, attr)


def _sharing(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """``(aliases, overlapping)`` of the tensors that share memory.

    ``aliases`` maps a name to an earlier name with the same storage,
    offset, shape, strides and dtype (stored once). ``overlapping`` names
    the other tensors whose bytes overlap another's (views such as ``b`` and
    ``b[:10]``), in order.

    A storage address only identifies a tensor while it is alive: a lazy
    mapping (:class:`codec.io_formats.LazyTensors`) makes a new tensor on
    every access and frees it after, and the next one may reuse the
    address. So a match counts only while the earlier tensor still exists,
    and overlaps are looked for among the tensors still alive at the end.
    """
    seen: dict[tuple, tuple[str, weakref.ref]] = {}
    aliases = {}
    spans: list[tuple[str, int, int, int, str, weakref.ref]] = []
    for order, name in enumerate(state_dict):
        tensor = state_dict[name]
        key = _storage_key(tensor)
        earlier = seen.get(key)
        if tensor.numel() and earlier is not None and earlier[1]() is not None:
            aliases[name] = earlier[0]
        else:
            if earlier is None or earlier[1]() is None:
                seen[key] = (name, weakref.ref(tensor))
            if tensor.numel():
                extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
                low = tensor.data_ptr() + tensor.element_size() * sum(
                    (n - 1) * s for n, s in zip(tensor.shape, tensor.stride()) if s < 0)
                spans.append((str(tensor.device), low, low + extent * tensor.element_size(), order, name,
                              weakref.ref(tensor)))
        del tensor
    overlapping: dict[int, str] = {}
    reach, holder, where = -1, None, None
    for device, low, high, order, name, _ in sorted(s for s in spans if s[5]() is not None):
        if device != where:  # addresses on different devices are different memories
            reach, where = -1, device
        if low < reach:
            overlapping[order] = name
            overlapping[holder[0]] = holder[1]
        if high > reach:
            reach, holder = high, (order, name)
    return aliases, [overlapping[k] for k in sorted(overlapping)]


def _shape(state_dict: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape, without loading it when the mapping can tell (a lazy .safetensors)."""
    shape = getattr(state_dict, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(state_dict[name].shape)


def _dtype_name(state_dict: Mapping[str, torch.Tensor], name: str) -> str:
    """A tensor's dtype name, without loading it when the mapping can tell (a lazy .safetensors)."""
    dtype_name = getattr(state_dict, "dtype_name", None)
    return dtype_name(name) if callable(dtype_name) else TORCH_DTYPES[state_dict[name].dtype]


def _plan(state_dict, aliases, base, rules, meta, encoder, bits_per_weight, max_error, calibrate, progress,
          attachments, jobs, matcher=None, measure_by=None, notes=None, search="fast", coded=None):
    """Run the rate-distortion allocator over the stored tensors; options per name.

    The budget's fixed part counts the header, the index without tensor
    entries (metadata, aliases, attachment entries) and the attachments' blobs
    (``attachments``: name to :func:`codec.writer.encode_attachment`'s result).
    The fast search puts tensors it coded with their chosen options in ``coded``.
    """
    from .rd.allocate import plan_options
    from .format import HEADER_SIZE, Attachment, BlobRef, Index, TensorEntry

    stored = [n for n in state_dict if n not in aliases]

    def tensors(names: set[str] | None = None):
        """The stored tensors, or those named in ``names`` (the others are not read)."""
        for name in stored:
            if names is None or name in names:
                array, dtype_name = to_numpy(state_dict[name])
                yield name, array, get_dtype(dtype_name)

    attached, attached_bytes = [], 0
    for name, (packed, blob) in attachments.items():
        att = Attachment(name, packed.size, packed.codec, [BlobRef(10**12, len(blob), 0xFFFFFFFF)])  # wide offset
        attached.append(att)
        attached_bytes += len(blob)
    base_id = None
    menu = None
    if matcher is not None:
        from .format import BaseId
        from .update.plan import UpdateMenu

        base_id, menu = BaseId(matcher.base.digest(), len(matcher.base)), UpdateMenu(matcher)
    skeleton = Index([TensorEntry(n, get_dtype(TORCH_DTYPES[state_dict[n].dtype]), tuple(state_dict[n].shape),
                                  alias=a) for n, a in aliases.items()], meta, encoder, attachments=attached,
                     base=base_id).to_bytes()
    score = None
    if calibrate is not None:
        dtypes = {n: TORCH_DTYPES[t.dtype] for n, t in state_dict.items()}

        def score(replaced: dict[str, np.ndarray]) -> float:
            trial = dict(state_dict)
            trial.update({n: to_torch(a, dtypes[n]) for n, a in replaced.items()})
            for alias, target in aliases.items():
                trial[alias] = trial[target]
            return float(calibrate(trial))

    return plan_options(tensors, base, lambda name: rules.options_for(name, base),
                        bits_per_weight=bits_per_weight, max_error=max_error,
                        overhead_bytes=HEADER_SIZE + len(skeleton) + attached_bytes, score=score, progress=progress,
                        jobs=jobs, total_weights=sum(math.prod(_shape(state_dict, n)) for n in stored),
                        menu=menu, measure_by=measure_by, notes=notes, search=search, coded=coded)


class JwtFile:
    """A lazily decoded .jwt file: ``keys()``, ``metadata``, ``get(name)``.

    Only the header and index are read on opening; ``get`` reads and
    decodes one tensor. Use as a context manager to close the file.
    An update (``is_update``) decodes against ``base`` (see :func:`as_base`),
    checked on opening; without one only its index can be read.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO | bytes, limits: Limits = DEFAULT_LIMITS,
                 jobs: int | None = None, timeout: float | None = None, base: Any = None):
        self.reader = Reader(source, limits=limits, jobs=jobs, timeout=timeout,
                             base=None if base is None else as_base(base, limits))

    @property
    def is_update(self) -> bool:
        """True for an update (format 1.1): its tensors are decoded against a base."""
        return self.reader.is_update

    @property
    def metadata(self) -> dict[str, str]:
        """Free-form string metadata stored with the file."""
        return self.reader.metadata

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return self.reader.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.reader.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.reader.entries)

    def get(self, name: str, *, device: str | torch.device | None = None,
            dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """Decode and return one tensor (KeyError naming it if the file has none of that name).

        ``device`` moves it there; ``dtype`` (a floating dtype) casts it if it is floating, as :func:`load` does.
        """
        cast = _float_dtype(dtype)
        tensor = to_torch(self.reader.read(name), self.reader.entry(name).dtype.name)
        if device is not None or cast is not None:
            tensor = tensor.to(device=device, dtype=cast if tensor.is_floating_point() else None)
        return tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        """``f[name]``: :meth:`get` with no cast."""
        return self.get(name)

    def totals(self) -> "Totals":
        """Size figures from the index (:mod:`codec.stats`): ``.weights``, ``.bits_per_weight``, ``.ratio``."""
        return file_totals(self.reader.index, self.reader.size)

    def check_base(self) -> None:
        """BaseError unless the file is a model, or an update opened with its base."""
        from .update import check_base

        check_base(self.reader.index, self.reader.base, self.reader.name)

    @property
    def attachments(self) -> list[str]:
        """Names (relative POSIX paths) of the non-tensor files carried in the file."""
        return list(self.reader.attachments)

    def get_attachment(self, name: str) -> bytes:
        """The bytes of one attachment (e.g. ``"config.json"``)."""
        return self.reader.read_attachment(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Decode every tensor in file order (works on non-seekable streams);
        aliases come back as the same tensor object as their target."""
        made: dict[str, torch.Tensor] = {}
        for entry, array in self.reader.iter_arrays():
            if entry.alias is not None:
                yield entry.name, made[entry.alias]
                continue
            tensor = to_torch(array, entry.dtype.name)
            if entry.name in self.reader.aliased:
                made[entry.name] = tensor
            yield entry.name, tensor

    def close(self) -> None:
        """Close the underlying file."""
        self.reader.close()

    def __enter__(self) -> "JwtFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(source: str | os.PathLike[str] | BinaryIO | bytes, *, limits: Limits = DEFAULT_LIMITS,  # noqa: A001
         jobs: int | None = None, timeout: float | None = None, base: Any = None) -> JwtFile:
    """Open a .jwt file lazily (see :class:`JwtFile`).

    ``source`` is a path, an ``http(s)://`` URL (read with Range requests:
    the index first, then one request per tensor asked for), a binary file
    object (a pipe works, in file order) or bytes. ``jobs`` decoding
    threads (None: one per core); ``timeout``: HTTP timeout in seconds.
    ``base``: the model an update is decoded against (a path, a state_dict
    or a :class:`codec.update.Base`); a wrong base is refused here.
    """
    return JwtFile(source, limits=limits, jobs=jobs, timeout=timeout, base=base)


def _float_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The floating torch dtype ``dtype`` names (None stays None): a TypeError or UsageError for anything else."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = _BY_NAME.get(dtype.removeprefix("torch."), dtype)  # type: ignore[arg-type]
    floats = "torch.float16, torch.bfloat16, torch.float32 or torch.float64"
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r}: expected a floating torch dtype ({floats}) or its name")
    if not dtype.is_floating_point:
        raise UsageError(f"dtype={dtype}: only floating tensors are cast, to a floating dtype ({floats}); "
                         "integer and bool tensors keep their dtype")
    return dtype


def load(source: str | os.PathLike[str] | BinaryIO | bytes, *, limits: Limits = DEFAULT_LIMITS,
         progress: ProgressFn | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, jobs: int | None = None,
         timeout: float | None = None, base: Any = None) -> dict[str, torch.Tensor]:
    """Decode a whole .jwt file into a state_dict (shared tensors stay shared).

    ``source`` as for :func:`open`; from a URL the data section is streamed
    in one response and decoded as it arrives. ``jobs`` decoding threads
    (None: one per core, 1: none); the values do not depend on ``jobs``.

    ``device`` moves every tensor there; ``dtype`` (a floating torch dtype
    or its name, e.g. ``"bfloat16"``) casts the floating tensors only.
    ``base``: for an update, the model it was made against (as for
    :func:`open`); an update without its base, or with another, raises
    :class:`codec.BaseError` before anything is decoded.
    """
    dtype = _float_dtype(dtype)
    with JwtFile(source, limits=limits, jobs=jobs, timeout=timeout, base=base) as f:
        f.check_base()
        out = {}
        moved: dict[str, torch.Tensor] = {}  # alias targets after the move, so aliases stay shared
        for name, tensor in f.items():
            if device is not None or dtype is not None:
                target = f.reader.entries[name].alias or name
                if target not in moved:
                    cast = dtype if dtype is not None and tensor.is_floating_point() else None
                    tensor = tensor.to(device=device, dtype=cast)
                    if target in f.reader.aliased:
                        moved[target] = tensor
                tensor = moved.get(target, tensor)
            out[name] = tensor
            if progress:
                progress(name, tensor.numel())
        return out


#: Reserved metadata key holding a checkpoint's structure (spec/format.md section 4.5); long trees continue in
#: ``jwt.tree.1``, ``jwt.tree.2``, ... (each value stays under the readers' string limit).
TREE_KEY = "jwt.tree"
_TREE_CHUNK = 60000
#: Nesting levels a checkpoint tree may have (deeper: refused, before Python's recursion limit is met).
_TREE_DEPTH = 100
_SAFE_TYPES = "tensors, None, bool, int, float, str, and lists, tuples and dicts of them"


def flatten_checkpoint(obj: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Flatten a checkpoint dict into ``(tensors, metadata, dropped)``.

    Tensors at any depth are named by their keys joined with dots
    (``{"model": {"fc.weight": t}}`` -> ``model.fc.weight``; list items by
    their index); a name already taken gets ``#2``, ``#3``, ... The structure
    and every JSON-representable leaf (None, bool, int, float, str, lists,
    tuples and dicts of them, with such keys) go to the reserved metadata key
    :data:`TREE_KEY`, which references tensors by name, so keys holding dots
    stay unambiguous and :func:`unflatten_checkpoint` rebuilds the object.
    ``dropped`` names the leaves that cannot be kept (e.g. arbitrary objects),
    as ``path (type)``; they are marked in the tree too. A plain state_dict
    (string keys, tensor values) gives no metadata.
    """
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj), {}, []
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []

    def scalar_key(key: object) -> bool:
        return key is None or isinstance(key, (bool, int, float, str)) or (
            isinstance(key, tuple) and all(map(scalar_key, key)))

    def node(value: object, path: tuple) -> Any:
        if len(path) > _TREE_DEPTH:
            raise EncodeError(f"checkpoint nested over {_TREE_DEPTH} levels deep (at {'.'.join(map(str, path[:5]))}...)")
        if isinstance(value, torch.Tensor):
            base = name = ".".join(map(str, path))
            k = 2
            while name in tensors:
                name, k = f"{base}#{k}", k + 1
            tensors[name] = value
            return {"tensor": name}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, list):
            return [node(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"tuple": [node(v, (*path, i)) for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            pairs = []
            for key, v in value.items():
                if scalar_key(key):
                    pairs.append([node(key, (*path, "(key)")), node(v, (*path, key))])
                else:
                    dropped.append(f"{'.'.join(map(str, (*path, repr(key))))} (a key of type {type(key).__name__})")
            return {"dict": pairs}
        dropped.append(f"{'.'.join(map(str, path))} ({type(value).__name__})")
        return {"dropped": f"{type(value).__module__}.{type(value).__qualname__}"}

    try:
        text = json.dumps(node(obj, ()), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except RecursionError:  # a key nested that deep (values stop at _TREE_DEPTH)
        raise EncodeError(f"checkpoint nested over {_TREE_DEPTH} levels deep") from None
    chunks = [text[i:i + _TREE_CHUNK] for i in range(0, len(text), _TREE_CHUNK)]
    meta = {TREE_KEY if i == 0 else f"{TREE_KEY}.{i}": chunk for i, chunk in enumerate(chunks)}
    return tensors, meta, dropped


def unflatten_checkpoint(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[Any, list[str]]:
    """The object :func:`flatten_checkpoint` flattened, rebuilt from its tensors and metadata.

    Returns ``(object, dropped)``: ``tensors`` itself when the metadata holds
    no tree; leaves dropped at encoding are left out of dicts (``None`` in
    lists and tuples) and named in ``dropped``. A malformed tree is a
    :class:`~codec.errors.FormatError`.
    """
    text = metadata.get(TREE_KEY)
    if text is None:
        return tensors, []
    i = 1
    while f"{TREE_KEY}.{i}" in metadata:
        text += metadata[f"{TREE_KEY}.{i}"]
        i += 1
    dropped: list[str] = []

    def build(n: Any, path: tuple) -> Any:
        if len(path) > _TREE_DEPTH:
            raise ValueError(f"nested over {_TREE_DEPTH} levels deep")
        if isinstance(n, list):
            return [build(v, (*path, k)) for k, v in enumerate(n)]
        if not isinstance(n, dict):
            return n
        (tag, v), = n.items()
        if tag == "tensor":
            if v not in tensors:
                raise FormatError(f"metadata {TREE_KEY}: no tensor named {v!r}")
            return tensors[v]
        if tag == "tuple":
            return tuple(build(x, (*path, k)) for k, x in enumerate(v))
        if tag == "float":
            if v not in ("nan", "inf", "-inf"):
                raise ValueError(f"float {v!r}")
            return float(v)
        if tag == "dropped":
            dropped.append(f"{'.'.join(map(str, path))} ({v})")
            return None
        if tag == "dict":
            out = {}
            for key, x in v:
                key = build(key, (*path, "(key)"))
                value = build(x, (*path, key))
                if not (isinstance(x, dict) and "dropped" in x):
                    out[key] = value
            return out
        raise ValueError(f"unknown node {tag!r}")

    try:
        return build(json.loads(text), ()), dropped
    except FormatError:
        raise
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise FormatError(f"metadata {TREE_KEY}: not a checkpoint tree ({str(exc)[:100] or type(exc).__name__})") \
            from None


def _refusal(path: str | os.PathLike[str], exc: BaseException) -> str:
    """Our one-line message for a file ``torch.load(weights_only=True)`` refuses (never torch's advice)."""
    with builtins.open(path, "rb") as f:
        head = f.read(4)
    accepts = ("jwt reads a .pt/.pth state_dict or checkpoint dict of tensors, a .safetensors file, "
               "or a model folder")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return f"{path}: not a PyTorch file (neither torch.save's zip format nor a pickle); {accepts}"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"{path}: a truncated or damaged PyTorch file (its zip directory is missing); {accepts}"
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return (f"{path}: holds Python objects of type {found.group(1)}, which jwt does not unpickle "
                f"(it loads {_SAFE_TYPES} only); {accepts}")
    text = str(exc).strip()
    if "weights_only" in text or "Weights only" in text or not text:  # torch's advice: not ours to give
        return (f"{path}: not a PyTorch file jwt can read without running code (the safe loader stopped: "
                f"{type(exc).__name__}); {accepts}")
    text = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", text)  # c10's source location is not a reason
    reason = re.split(r"(?<=[.!?])\s", text.splitlines()[0])[0].rstrip(".")  # torch's first sentence, whole
    return f"{path}: not a PyTorch file jwt can read ({reason if len(reason) <= 160 else type(exc).__name__}); {accepts}"


def read_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Read a .pt/.pth state_dict or checkpoint dict without unpickling code: ``(tensors, metadata, dropped)``.

    Uses ``torch.load(weights_only=True)``, then :func:`flatten_checkpoint`.
    ``mmap`` maps the tensors from the file instead of reading them
    (zip-format files only). A file torch refuses, one that is not a dict
    or one without tensors is an :class:`~codec.errors.EncodeError` naming it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not the user's business
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for foreign or malicious files
        raise EncodeError(_refusal(path, exc)) from None
    if not isinstance(obj, Mapping):
        raise EncodeError(f"{path}: holds a {type(obj).__name__}, not a state_dict or checkpoint dict of tensors")
    try:
        tensors, meta, dropped = flatten_checkpoint(obj)
    except EncodeError as exc:
        raise EncodeError(f"{path}: {exc}") from None
    if not tensors:
        raise EncodeError(f"{path}: holds no tensors")
    return tensors, meta, dropped


def dropped_note(where: str, dropped: Sequence[str]) -> str:
    """The warning for checkpoint leaves :func:`flatten_checkpoint` could not keep."""
    return (f"{where}: cannot keep {len(dropped)} entries that are not {_SAFE_TYPES}: {', '.join(dropped[:10])}"
            f"{', ...' if len(dropped) > 10 else ''} (marked as dropped in the metadata key {TREE_KEY})")


def read_state_dict(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a .pt/.pth state_dict or checkpoint dict, by dotted name (see :func:`read_checkpoint`).

    Leaves that are neither tensors nor kept by the tree are named in a warning.
    """
    tensors, _, dropped = read_checkpoint(path, mmap=mmap)
    if dropped:
        warnings.warn(dropped_note(str(path), dropped), stacklevel=2)
    return tensors


def as_base(base: Any, limits: Limits = DEFAULT_LIMITS) -> Any:
    """An update's base as a :class:`codec.update.Base`: from a Base, a state_dict, or a model file or folder.

    A .jwt is decoded (a base that is itself an update is refused: decode it
    first); a .pt/.pth, .safetensors or folder is read; a mapping holds torch
    tensors. The one-line errors name the file.
    """
    from .update import Base

    if isinstance(base, Base):
        return base
    if isinstance(base, Mapping):
        return _base_of_tensors(base, "<state_dict>", copy=False)
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a path, a state_dict or a codec.update.Base, not {type(base).__name__}")
    from . import io_formats

    if not os.path.exists(base):
        raise FileNotFoundError(2, "no such file", str(base))
    if io_formats.detect_format(base) == "jwt":
        return Base.open(base, limits=limits)
    with io_formats.open_source(base) as source:  # copied: memory maps close with the source
        return _base_of_tensors(source.tensors, str(base), copy=True)


def _base_of_tensors(tensors: Mapping[str, torch.Tensor], name: str, copy: bool) -> Any:
    """A :class:`codec.update.Base` of torch tensors (storage-form numpy views, or copies)."""
    from .update import Base

    arrays = {}
    for key in tensors:
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"base tensor {key!r}: not a tensor but {type(tensor).__name__}")
        array, dtype_name = to_numpy(tensor)
        arrays[key] = (array.copy() if copy else array, get_dtype(dtype_name))
    return Base(arrays, name)
