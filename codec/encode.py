"""Encoding from storage arrays: everything :func:`codec.save` does that needs no torch.

A model is given as :class:`Arrays`, a mapping of names to numpy arrays in
storage form (:mod:`codec.dtypes`: bfloat16 as uint16 bit patterns, ...)
whose shapes and dtype names are known before any tensor is read. A
``.safetensors`` file or a model folder of safetensors shards
(:func:`codec.io_formats.open_source`) is read as such a mapping, so
``jwt encode`` on it, with or without a rate target, never imports torch.

torch comes in only where a torch object does: a state_dict, checkpoint dict
or ``nn.Module`` passed to :func:`save` is turned into :class:`Arrays` by
:func:`codec.api.tensor_arrays` (which also finds the tensors sharing
storage), and calibration, repair and ``calibrate`` callbacks run in
:mod:`codec.api`. The bytes written do not depend on the path taken.
"""

from __future__ import annotations

import dataclasses
import io
import math
import numbers
import os
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import numpy as np

from .dtypes import DType, get_dtype, to_float64
from .errors import EncodeError
from .format import HEADER_SIZE, INDEX_ZSTD_SAVING, Attachment, BlobRef, Index, TensorEntry, pack_index
from .limits import DEFAULT_LIMITS, Limits
from .parallel import AHEAD_BYTES, INLINE, Pending, bound_heap, make_executor, release_memory, resolve_jobs
from .rd.pruned import (MASK, ORIG, computed_state, computing, pruned_as_computed, pruned_hint, pruned_hooks,
                         pruned_note, pruned_weights)
from .tensorcodec import (ZERO_ERROR, Encoded, EncodeOptions, Overrides, given_options, ignored_options,
                          decode_encoded, lossless_codec, option_conflicts, start_encode)
from .writer import Writer, encode_attachment

__all__ = ["Arrays", "save", "progress_total", "as_base", "encoder_versions", "size_problem", "is_module",
           "float64_values"]

ProgressFn = Callable[[str, int], None]

#: Without a rate target, attachments up to this many bytes in all are compressed on threads of their own while the
#: tensors are coded (zstd level 19: about 1 CPU second for all-MiniLM-L6-v2's tokenizer and vocabulary), their
#: blobs held until written; more are compressed one at a time as they are written. A rate search needs every
#: attachment's size first, so it compresses them all before it starts, on the same threads.
PACK_AHEAD_BYTES = 64 << 20


class Arrays(Mapping[str, np.ndarray]):
    """A read-only ``name -> storage array`` mapping that reads a tensor each time it is accessed.

    ``info`` maps each name, in order, to ``(shape, dtype name)`` (e.g.
    ``"bfloat16"``), so sizes are known and checked before anything is read;
    ``read(name)`` returns the array in storage form; ``locate(name)``, when
    given, says where the raw little-endian data lies in a file
    (:meth:`location`), so a Ray worker can read it itself.
    """

    def __init__(self, info: Mapping[str, tuple[tuple[int, ...], str]], read: Callable[[str], np.ndarray],
                 locate: Callable[[str], tuple[str, int] | None] | None = None):
        self._info = {name: (tuple(shape), dtype_name) for name, (shape, dtype_name) in info.items()}
        self._read = read
        self._locate = locate

    def __getitem__(self, name: str) -> np.ndarray:
        return self.array(name)

    def array(self, name: str) -> np.ndarray:
        """Read tensor ``name`` in storage form (KeyError if there is none of that name; EncodeError naming it
        when ``read`` gives another shape or element type than ``info`` says)."""
        if name not in self._info:
            raise KeyError(name)
        array = self._read(name)
        shape, dtype_name = self._info[name]
        storage = get_dtype(dtype_name).storage
        if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != storage:
            found = (f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray)
                     else f"a {type(array).__name__}")
            raise EncodeError(f"tensor {name!r}: read as {found}, not the {dtype_name} {list(shape)} announced "
                              f"(numpy storage dtype {storage})")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name``, without reading it."""
        return self._info[name][0]

    def dtype_name(self, name: str) -> str:
        """The format dtype name of ``name`` (e.g. ``"bfloat16"``), without reading it."""
        return self._info[name][1]

    def location(self, name: str) -> tuple[str, int] | None:
        """``(file, byte offset)`` of ``name``'s raw little-endian data (:func:`codec.rawfile.read_array`), or None
        when the tensor is not stored raw in a file."""
        return None if self._locate is None else self._locate(name)

    def replaced(self, arrays: Mapping[str, np.ndarray]) -> Arrays:
        """The same tensors with those in ``arrays`` (storage form, same shapes and dtypes) replaced; no file
        locations, as the replaced values are not the file's."""
        return Arrays(self._info, lambda name: arrays[name] if name in arrays else self.array(name))


def is_module(obj: object) -> bool:
    """True if ``obj`` is a ``torch.nn.Module``, found without importing torch (no module exists before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def compiled_original(module: object) -> object:
    """The module ``torch.compile`` wrapped (``_orig_mod``), else ``module``: its state_dict has the plain
    model's names (``fc1.weight``, not ``_orig_mod.fc1.weight``), and calibration runs it eagerly, its hooks and
    all, instead of recompiling for each batch shape."""
    inner = getattr(module, "_orig_mod", None)
    return inner if is_module(module) and is_module(inner) else module


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


def size_problem(shape: tuple[int, ...], itemsize: int) -> str | None:
    """Why a tensor of ``shape`` and ``itemsize``-byte elements would give a file default readers refuse."""
    if len(shape) > DEFAULT_LIMITS.max_ndim:
        return f"{len(shape)} dimensions, over the {DEFAULT_LIMITS.max_ndim} that readers accept"
    nbytes = math.prod(shape) * itemsize
    if nbytes > DEFAULT_LIMITS.max_tensor_bytes:
        return f"{nbytes} bytes, over the {DEFAULT_LIMITS.max_tensor_bytes} that readers accept (codec.Limits)"
    return None


def _check_arrays(arrays: Arrays) -> None:
    """EncodeError for a tensor too large to store, found from shapes and dtypes (nothing is read)."""
    for name in arrays:
        problem = size_problem(tuple(arrays.shape(name)), get_dtype(arrays.dtype_name(name)).storage.itemsize)
        if problem:
            raise EncodeError(f"tensor {name!r}: {problem}")


def _float8_table(exponent_bits: int) -> np.ndarray:
    """The float64 value of each of the 256 codes of an 8-bit float with ``exponent_bits`` (4: float8_e4m3fn,
    whose only non-finite codes are NaN; 5: float8_e5m2, IEEE-like with infinities)."""
    mantissa_bits = 7 - exponent_bits
    codes = np.arange(256)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exponent, mantissa = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1), codes & ((1 << mantissa_bits) - 1)
    bias = (1 << (exponent_bits - 1)) - 1
    values = np.where(exponent > 0, (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias),
                      mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias))
    top = exponent == (1 << exponent_bits) - 1
    if exponent_bits == 5:
        values = np.where(top, np.where(mantissa == 0, np.inf, np.nan), values)
    else:
        values = np.where(top & (mantissa == (1 << mantissa_bits) - 1), np.nan, values)
    return sign * values


_FLOAT8 = {"float8_e4m3fn": 4, "float8_e5m2": 5}


def float64_values(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """The values of a storage-form ``array`` of dtype ``dtype_name`` as float64 (exact for every dtype,
    as torch's ``.to(torch.float64)``)."""
    dtype = get_dtype(dtype_name)
    if dtype.floating:
        return to_float64(array, dtype)
    if dtype_name in _FLOAT8:
        return _float8_table(_FLOAT8[dtype_name])[array]
    return array.astype(np.float64)


class Note(str):
    """A remark :func:`save` returns beside its warnings: how the file was made (e.g. what repair did), not a problem.

    It is a ``str``; the command line prints it as ``jwt: note:`` where a
    plain string (a warning) is ``jwt: warning:``.
    """

    __slots__ = ()


def save(
    state_dict: Any,
    path: str | os.PathLike[str] | BinaryIO,
    *,
    metadata: Mapping[str, str] | None = None,
    overrides: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
    bits_per_weight: float | None = None,
    max_error: float | None = None,
    calibrate: Callable[[dict], float] | None = None,
    progress: ProgressFn | None = None,
    attachments: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    jobs: int | None = None,
    base: Any = None,
    calibration: Any = None,
    model: Any = None,
    model_names: Mapping[str, str] | None = None,
    repair: Any = None,
    calibration_progress: Callable[[str, int], None] | None = None,
    search: str = "fast",
    ray: str | None = None,
    measure_errors: bool = True,
    **options: Any,
) -> list[str]:
    """Encode ``state_dict`` (or an ``nn.Module``'s) to a .jwt file at ``path`` (atomically).

    ``state_dict`` is a mapping of names to tensors, an ``nn.Module`` (its
    ``state_dict()``; a ``torch.compile``'d module's original, under the plain
    model's names) or a checkpoint dict (nested dicts, lists, plain values: see
    :func:`codec.api.flatten_checkpoint`); anything else is a TypeError, and a
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
    allocation instead of the data-free estimate, first at about 1 % error,
    then at the errors the plan lands on (:mod:`codec.rd.probe`); with ``bits_per_weight``
    the file is that plan's or the data-free plan's, whichever ``calibrate``
    scores higher as decoded (a note says which). ``search``: ``"fast"``
    predicts a budget search from samples of each tensor and measures in
    full only what it picks (:mod:`codec.rd.fast`); ``"exhaustive"``
    measures every candidate. ``ray`` (``"auto"``, ``"local"`` or a
    cluster address) codes the tensors on Ray workers, and runs the fast
    search's measurements there too (:mod:`codec.distributed.ray`, the
    optional extra ``[ray]``); the file is the same bytes.

    ``calibration`` (with a rate target and an ``nn.Module``): the user's
    inputs, unlabelled -- a tensor or array of samples along its first
    axis, or an iterable of batches (tensors, mappings passed as
    ``model(**batch)``, or ``(inputs, *targets)`` tuples as a DataLoader
    over a labelled dataset gives them: the targets are not used) -- or a
    :class:`codec.rd.calibrate.Calibration`
    already made by :func:`codec.calibrate`. The allocator then scores each
    calibrated layer by the error it causes in its output, ``tr(dW H dW^T)``
    weighted by the layer's sensitivity (:mod:`codec.rd.calibrate`). A
    calibrated encode fixes glibc's mmap threshold at 1 MB for the rest of
    the process (:func:`codec.parallel.bound_heap`: freed blocks of
    megabytes go back to the system instead of staying resident).
    ``model``: the module to run when ``state_dict`` holds its tensors
    rather than being the module itself (a checkpoint's tensors, under the
    module's state_dict names; tensors it does not have are coded data-free).
    ``model_names`` maps a tensor's name in ``state_dict`` to the model's
    name of it where the two differ (transformers 5 loads a ViT's
    ``attention.attention.query.weight`` as ``attention.q_proj.weight``):
    calibration and repair run under the model's names, the file keeps
    ``state_dict``'s.
    ``repair`` (default: on when calibration inputs are given) then codes
    the layers in forward order, compensating errors and repairing
    not-yet-coded parameters on the inputs (:mod:`codec.rd.repair`); the
    file is read by the same decoder as any other. A
    :class:`codec.rd.repair.RepairSettings` turns repair on with those
    settings (e.g. ``RepairSettings(finetune_steps=200)`` for
    codec-in-the-loop fine-tuning after it).
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
    tensors kept lossless for NaN/Inf) and :class:`Note` s (what repair did:
    remarks, not problems).

    ``jobs`` worker threads code blobs in parallel (None: one per core, 1:
    none); the file is byte for byte the same whatever ``jobs`` is. Tensors
    are taken one at a time, at most ``jobs`` of them (and
    :data:`codec.parallel.AHEAD_BYTES` of input beyond the newest) in
    flight, so a lazy ``state_dict`` is never held whole.

    ``measure_errors=False`` leaves out the relative error of each lossy tensor (a JPEG blob decoded again and
    compared), and so the warning that names a tensor coded no better than storing zeros; the bytes are the same.
    For a caller that needs the file's size only (:class:`codec.train.Budget`'s measurements in a training loop:
    a third of the bench MLP's save).

    ``base`` makes the file an **update** (spec section 12) against a model
    the receiver already holds: a path (.jwt, .pt/.pth, .safetensors or a
    model folder), a state_dict, or a :class:`codec.update.Base`. A .jwt
    base is decoded first, so differences are taken against what the
    receiver decodes. Each tensor is stored as unchanged (bit-identical to a
    base tensor), as a difference from the base tensor of its name, or in
    full (new, reshaped, other dtype); with a rate target the search chooses
    among full, difference and unchanged, measuring the error on the
    reconstructed weights.

    An :class:`Arrays` ``state_dict`` (e.g. ``open_source(...).tensors`` of
    a .safetensors file or a folder of safetensors shards) is encoded
    without importing torch; torch tensors are converted as they are coded
    (:func:`codec.api.tensor_arrays`). The file is the same bytes either way.
    """
    given = dict(locals())  # (first: save's own arguments, for the call below)
    layers = model if is_module(model) else state_dict if is_module(state_dict) else None
    rated = bits_per_weight is not None or max_error is not None  # (a save without a rate target stores as given)
    if layers is not None and rated and base is None and not computing(layers) and pruned_hooks(layers):
        # torch.nn.utils.prune layers: every part of the save reads weight_orig as the weight it computes
        with pruned_as_computed(layers):
            options = given.pop("options")
            return save(**given, **options)
    jobs = resolve_jobs(jobs)
    _check_destination(path)
    bits_per_weight = _rate_target("bits_per_weight", bits_per_weight, 64.0)
    max_error = _rate_target("max_error", max_error, 1.0)
    if search not in ("fast", "exhaustive"):
        raise ValueError(f"search={search!r}: use 'fast' or 'exhaustive'")
    cluster = None  # the fast search's tasks run there too
    if ray is not None:
        from .distributed.ray import RayExecutor, connect

        cluster = RayExecutor(connect(ray))  # fail early: Ray missing or the cluster unreachable
    if model is not None and not is_module(model):
        raise TypeError(f"model= must be a torch.nn.Module, not {type(model).__name__}")
    if calibrate is not None and not callable(calibrate):
        raise TypeError(f"calibrate= must be a function of a state_dict returning a score (higher is better), "
                        f"not {type(calibrate).__name__}")
    renames = _model_names(model_names, model)
    if is_module(state_dict):
        state_dict = compiled_original(state_dict)
        model, state_dict = compiled_original(model) or state_dict, state_dict.state_dict()
    if base is None and rated:
        state_dict = computed_state(state_dict)  # a pruned layer's weight_orig: the weight it computes
    if repair is not None and not isinstance(repair, bool):
        from .rd.repair import RepairSettings  # imports torch: only for a caller who passed settings

        if not isinstance(repair, RepairSettings):
            raise TypeError(f"repair= must be True, False, None or a codec.rd.repair.RepairSettings, "
                            f"not {type(repair).__name__}")
    if calibration is not None:
        if model is None:
            raise TypeError("calibration= needs the model itself: pass the nn.Module, not its state_dict "
                            "(or the module as model=)")
        if bits_per_weight is None and max_error is None:
            raise ValueError("calibration= needs a rate target: give bits_per_weight or max_error")
    elif repair:
        raise ValueError("repair=True needs calibration inputs (calibration=)")
    try:
        opts = EncodeOptions(**options)
    except TypeError as exc:  # an unknown keyword: say save's, not the dataclass's
        word = str(exc).rpartition(" ")[2]
        raise TypeError(f"codec.save() got an unexpected keyword argument {word} (its keywords: help(codec.save); "
                        "per-tensor options: the fields of codec.EncodeOptions)") from None
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
    if isinstance(state_dict, Arrays):  # read on access and checked from shapes and dtypes: nothing is read here
        arrays, aliases, overlaps = state_dict, {}, []
        _check_arrays(arrays)
    else:  # torch tensors, or a checkpoint dict of them
        from .api import tensor_arrays

        arrays, aliases, overlaps, tree, tree_notes = tensor_arrays(state_dict)
        meta.update(tree)
        notes += tree_notes
    if not len(arrays):
        raise EncodeError("nothing to encode: the state_dict holds no tensors")
    if overlaps:  # views that share part of their memory: kept exact, so they stay equal where they overlap
        notes.append(f"tensors {', '.join(map(repr, overlaps[:10]))}{', ...' if len(overlaps) > 10 else ''} "
                     "share part of their memory (overlapping views): stored losslessly so they stay equal there")
    empty = {n for n in arrays if n not in aliases and math.prod(arrays.shape(n)) == 0}
    if not rated and any(n.endswith(ORIG) for n in arrays):  # a pruned layer's 0/1 mask, stored as it is (the
        # default options decoded its ones as 1 +- 6e-5; a rated save's menu codes it exactly: allocate._two_valued)
        empty |= {c + MASK for c in pruned_weights({n: arrays.shape(n) for n in arrays if n not in aliases},
                                                   lambda n: float64_values(arrays.array(n), arrays.dtype_name(n)))}
    if overlaps or empty:  # empty tensors (shape (0, 5)): nothing to search or tile, stored as they are
        lossless = dataclasses.replace(opts, codec="lossless")
        rules = _Forced(rules, set(overlaps) | empty, lossless)
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
    index: dict = {}  # "compress": the budget counted on a compressed index (_plan)
    if bits_per_weight is not None or max_error is not None:
        from .rd.allocate import (REFUSAL_HINT, WARNINGS_KEY, Distortion, Reparam, computed_shapes, computed_values,
                                  merge_weightings, norm_weightings, packed_weightings, reparametrized,
                                  stored_weightings)

        packing = _pack(attachments, jobs)  # sized before the search, compressed meanwhile on threads (calibration)
        values = lambda n: float64_values(arrays.array(n), arrays.dtype_name(n))  # noqa: E731
        shapes = {n: arrays.shape(n) for n in arrays}
        # weight_norm / spectral_norm layers: weighed as the weight they compute, then moved to what is stored
        reparams = reparametrized({n: s for n, s in shapes.items() if n not in aliases}, values)
        # torch.nn.utils.prune layers: weight_orig holds the weight (computed_state), weighed as it
        pruned = {c: o for c, o in pruned_weights({n: s for n, s in shapes.items() if n not in aliases},
                                                  values).items() if c not in reparams}
        reparams.update({c: Reparam(o, matrix=len(shapes[o]) == 2) for c, o in pruned.items()})
        REFUSAL_HINT.set(pruned_hint(pruned) if pruned else "")
        if pruned:
            notes.append(Note(pruned_note(pruned)))
        weightings = norm_weightings(computed_shapes(shapes, reparams), values)
        inputs = calib = None
        growth = 0  # bytes the plan keeps for constant vectors that repair makes ordinary (constant_growth)
        if model is not None and calibration is None:  # (calibration's own note names parametrized layers)
            from .api import parametrized_notes

            notes += parametrized_notes(model, reparams)
        if calibration is not None:
            from .api import calibrated, calibration_notes, repair_growth

            if bits_per_weight is not None and matcher is None:  # a budget below the smallest: say so before
                growth = repair_growth(model, calibration, repair,
                                       [renames.get(n, n) for n in arrays if n not in aliases])
                _refuse_early(arrays, aliases, opts, rules, meta, encoder, bits_per_weight, packing,  # calibrating
                              growth)
            bound_heap()  # freed blocks of megabytes go back to the system at once, not kept as holes
            inputs, calib = calibrated(model, calibration, repair, calibration_progress, meta)
            notes += calibration_notes(model, calib, arrays, aliases, repairing=inputs is not None, renames=renames)
            weightings = merge_weightings(weightings, {n: w for n, w in calib.weightings(renames).items()
                                                       if n in arrays or n in reparams},  # by stored name (an
                                                       # expert's: its slice's; a parametrized layer's: computed)
                                          lambda n: computed_values(n, reparams, values))
            weightings = stored_weightings(weightings, reparams)  # (before packing: a column factor's D H D)
            if calib is not calibration:  # made here: the search holds its H matrices packed, the whole ones go,
                calib = None  # each as it is packed (MiniLM: 74 MB -> 37)
                weightings = packed_weightings(weightings, in_place=True)
            release_memory()
        else:
            weightings = stored_weightings(weightings, reparams)
        weights = sum(math.prod(arrays.shape(n)) for n in arrays if n not in aliases)
        if inputs is not None and bits_per_weight is not None:
            # repair spends up to the size of the plan's file: its index is counted and stored compressed. Left to
            # the writer (compressed where that saves 1 % of the file), the plan's could be counted compressed and
            # the grown file's stored plain (a 4096-unit Linear at -b 2.5: 602 bytes more, the file 408 over)
            index["compress"] = True
        share = 0  # repair's share of a small model's budget (REPAIR_SHARE), kept out of its plan
        if inputs is not None and bits_per_weight is not None and weights <= REPLAN_WEIGHTS:
            from .rd.repair import fitted_share

            share = math.ceil(REPAIR_SHARE * fitted_share(model) * bits_per_weight * weights / 8)
        # The attachments' sizes are needed once the search has predicted every tensor (its budget's fixed part):
        # the search starts while they are compressed.
        measure_by = Distortion(weightings)
        memo: dict = {}  # the user's score per set of replaced values: each plan probes the same candidates
        prices = None  # a small model's repaired plan is priced at what repair codes (codec.rd.price)
        if inputs is not None and bits_per_weight is not None and weights <= REPLAN_WEIGHTS:
            from .rd.price import RepairPrices

            try:
                from .rd.repair import RepairSettings
            except ImportError:  # a repair module of another make (a test's stand-in): its plan as it was
                RepairSettings = None
            if RepairSettings is not None:
                prices = RepairPrices.of(repair if isinstance(repair, RepairSettings) else RepairSettings())
        # by plan (its dict's id): what repair's codings cost beyond its file, and the JPEG tensors priced at their
        # uncompensated point (RepairSettings.plain_jpeg)
        priced: dict[int, tuple[int, set[str]]] = {}

        def warn(damaged: list[str]) -> None:  # the file's metadata names the damaged tensors (jwt info)
            meta.pop(WARNINGS_KEY, None)
            if damaged:
                meta[WARNINGS_KEY] = "; ".join(damaged)

        def plan(reserve: int, damaged: list[str], coded: dict, progress, calibrate=calibrate
                 ) -> dict[str, EncodeOptions]:
            nonlocal share
            meta.pop(WARNINGS_KEY, None)
            while True:
                surcharge: dict[str, int] = {}
                plain: set[str] = set()
                try:
                    chosen = _plan(arrays, aliases, opts, rules, meta, encoder, bits_per_weight, max_error,
                                   calibrate, progress, packing, jobs, matcher, measure_by=measure_by, notes=damaged,
                                   search=search, coded=coded, index=index, executor=cluster,
                                   reserve=reserve + share, memo=memo, price=prices, surcharge=surcharge,
                                   plain=plain)
                    priced[id(chosen)] = sum(surcharge.values()), plain
                    break
                except EncodeError:  # too small a budget to leave repair its share: none, so that the refusal's
                    if not share:  # smallest budget (_refuse_early) still gets a file
                        raise
                    share = 0
                    damaged.clear()
                    coded.clear()
            warn(damaged)
            return chosen

        def moved(chosen: dict[str, EncodeOptions]) -> int:  # repair_growth of the vectors this plan makes move
            from .api import repair_growth

            return repair_growth(model, calibration, repair, [renames.get(n, n) for n in arrays if n not in aliases],
                                 inputs, {renames.get(n, n): o for n, o in chosen.items()})

        def size(chosen: dict[str, EncodeOptions], coded: dict) -> int:  # the search's codings are not redone
            # (with what repair's codings cost beyond the plan's file, as the plan priced them)
            return _planned_size(arrays, aliases, chosen.__getitem__, meta, encoder, index, attachments, packing, jobs,
                                 done=dict(coded)) + priced.get(id(chosen), (0, set()))[0]

        def decoded(chosen: dict[str, EncodeOptions], coded: dict) -> dict:  # the values the plan's file holds
            values: dict = {}
            _planned_size(arrays, aliases, chosen.__getitem__, meta, encoder, index, attachments, packing, jobs,
                          done=dict(coded), decoded=values)
            return values

        def settle(growth: int, calibrate, progress) -> tuple:
            """The plan (replanned where the file's measured size asks for it): ``(chosen, damaged, coded, planned,
            growth)``, ``planned`` the size of its file where measured."""
            damaged: list[str] = []
            coded: dict = {}
            chosen = plan(growth, damaged, coded, progress, calibrate)
            first_reserve = growth  # what the first plan kept out
            if growth and inputs is not None:  # only the constant vectors repair will move under this plan
                growth = min(growth, moved(chosen))
            budget = 0 if bits_per_weight is None else int(bits_per_weight * weights / 8) - growth - share
            entries = REPLAN_ENTRY_BYTES * sum(n not in aliases for n in arrays)  # the index's share, guessed
            planned = None  # the size of the chosen plan's file, where measured
            if budget and matcher is None and weights <= REPLAN_WEIGHTS \
                    and (entries > REPLAN_UNDER * budget or first_reserve - growth > REPLAN_UNDER * budget):
                first = planned = size(chosen, coded)
                fits = [] if planned > budget else [(planned, chosen, damaged, coded)]  # the plans within budget
                rate, kept = 1.0, 0
                for _ in range(REPLANS):  # the index compressed by more (or less) than the plan counted on
                    if planned <= budget and budget - planned <= REPLAN_UNDER * budget:
                        break
                    if planned > budget:  # keep the excess (and REPLAN_OVER of the budget) out of the next plan
                        kept += planned - budget + math.ceil(REPLAN_OVER * budget)
                        given = -kept
                    else:
                        given = int(0.97 * (budget - first) / rate)  # the file grows about ``rate`` bytes a byte given
                    again_damaged: list[str] = []
                    again_coded: dict = {}
                    again = plan(first_reserve - given, again_damaged, again_coded, None, calibrate)
                    got = size(again, again_coded)
                    if given > 0 and got > first:
                        rate = max(rate, (got - first) / given)
                    if got <= budget:
                        fits.append((got, again, again_damaged, again_coded))
                    if planned > budget or planned < got <= budget:
                        chosen, damaged, coded, planned = again, again_damaged, again_coded, got
                if calibrate is not None and calibration is None and len(fits) > 1:  # the score path: by the score
                    from .api import calibrate_score

                    planned, chosen, damaged, coded = _best_scored(fits, calibrate_score(arrays, aliases, calibrate,
                                                                                         memo), decoded)
                warn(damaged)
                if first_reserve > growth:  # the plan kept may code other layers lossily: their vectors move too
                    growth = max(growth, moved(chosen))
            return chosen, damaged, coded, planned, growth

        chosen, damaged, coded, planned, growth = settle(growth, calibrate, progress)
        if calibrate is not None and bits_per_weight is not None and matcher is None and calibration is None:
            # a user who gives a score expects a file at least as good by it as the data-free plan's
            try:
                other = settle(growth, None, None)[:4]
            except EncodeError:  # no data-free plan at this budget: the calibrated one stands
                other = None
            if other is not None:
                chosen, damaged, coded, planned = _better_by_score(
                    arrays, aliases, calibrate, (chosen, damaged, coded, planned), other,
                    int(bits_per_weight * weights / 8), warn, meta, encoder, index, attachments, packing, jobs, notes,
                    memo)
            warn(damaged)
        measure_by = None  # its weightings hold calibration's H matrices (MiniLM: 100 MB): not through repair
        notes += damaged
        if bits_per_weight is not None:
            notes += _attachments_note(packing, bits_per_weight, weights)
        repaired = inputs is not None
        if repaired or matcher is not None:  # repair changes the values; an update codes differences
            coded.clear()
        if repaired:
            from .api import repaired_arrays

            weightings = calib = None  # calibration's H matrices served the plan (MiniLM: 150 MB); repair has its own
            release_memory()
            spare = 0
            if bits_per_weight is not None:  # what the plan leaves under the budget: repair spends it
                spare = spare_bytes(int(bits_per_weight * weights / 8) - growth,
                                    planned - priced.get(id(chosen), (0, set()))[0] if planned is not None else
                                    _planned_size(arrays, aliases, chosen.__getitem__, meta, encoder, index,
                                                  attachments, packing, jobs))
            settings = None if isinstance(repair, bool) else repair
            plain = priced.get(id(chosen), (0, set()))[1]
            if plain:  # (filled only by a priced plan: RepairSettings is repair's own)
                from .rd.repair import RepairSettings

                settings = settings if isinstance(settings, RepairSettings) else RepairSettings()
                settings = dataclasses.replace(settings, plain_jpeg=frozenset(settings.plain_jpeg) | {
                    renames.get(n, n) for n in plain})
            arrays = repaired_arrays(model, arrays, aliases, inputs, chosen, calib, calibration_progress, jobs, notes,
                                     settings, coded=coded, spare=spare,
                                     index_zstd=bool(index.get("compress")), renames=renames)
            release_memory()
        options_for: Callable[[str], EncodeOptions] = chosen.__getitem__
    else:
        options_for = lambda name: rules.options_for(name, opts) or opts  # noqa: E731
        coded = {}
        small = sum(map(_nbytes, (attachments or {}).values())) <= PACK_AHEAD_BYTES
        packing = _pack(attachments, jobs) if small else {}  # compressed while the tensors are coded
    stored: list[tuple[str, tuple[int, ...], Any]] = []
    with Writer(path, metadata=meta, encoder=encoder, base=None if matcher is None else base_id,
                compress_index=index.get("compress")) as writer:
        if ray is not None:
            from .distributed.ray import encode_in_order

            coded = ((*item, None) for item in encode_in_order(arrays, aliases, options_for, ray, done=coded,
                                                                 parts=writer.parts_folder))
        else:
            coded = _encode_in_order(arrays, aliases, options_for, jobs, matcher, done=coded, check=measure_errors)
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
            ready = packing.get(name)
            writer.add_attachment(name, data, None if ready is None else ready.result())
    if repaired and bits_per_weight is not None:  # a path or a file object (the size the writer wrote)
        # repair changes values after the plan: their coded size can differ from the planned one
        weights = sum(math.prod(arrays.shape(n)) for n in arrays if n not in aliases)
        got = 8 * writer.nbytes / max(weights, 1)
        if got > bits_per_weight:
            notes.append(f"repair: the file is {got:.3f} bits/weight, over the {bits_per_weight} asked for "
                         f"(the repaired values code larger than planned)")
    return ignored_options(stored, opts, rules) + notes


def _model_names(model_names: Any, model: Any) -> dict[str, str]:
    """:func:`save`'s ``model_names`` checked: a dict of names (str to str, one model name per tensor), only with a
    model."""
    if model_names is None:
        return {}
    if not isinstance(model_names, Mapping):
        raise TypeError(f"model_names= must be a mapping of the state_dict's names to the model's, not "
                        f"{type(model_names).__name__}")
    if model_names and model is None:
        raise TypeError("model_names= needs the model (model=) whose names it gives")
    for name, model_name in model_names.items():
        if not (isinstance(name, str) and isinstance(model_name, str)):
            raise TypeError(f"model_names= maps names to names, not {name!r} to {model_name!r}")
    if len(set(model_names.values())) < len(model_names):
        raise ValueError("model_names= gives two tensors the same model name")
    return dict(model_names)


def _check_destination(path: Any) -> None:
    """A TypeError naming ``path`` unless it is a path or a writable binary file object."""
    if not isinstance(path, (str, os.PathLike)) and not callable(getattr(path, "write", None)):
        raise TypeError(f"codec.save: path must be a file path or a binary file object open for writing, "
                        f"not {type(path).__name__}")


def _rate_target(name: str, value: Any, most: float) -> float | None:
    """``bits_per_weight`` / ``max_error`` as a float in (0, most] (the CLI's ranges); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__} ({value!r})")
    if not 0 < float(value) <= most:  # NaN fails too
        raise ValueError(f"{name}={value!r}: must be above 0 and at most {most:g}")
    return value


class _Count(io.RawIOBase):
    """A binary sink that only counts what is written to it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)


def _planned_size(arrays: Arrays, aliases: dict[str, str], options_for: Callable[[str], EncodeOptions],
                  meta: dict[str, str], encoder: dict[str, str], index: dict, attachments, packing, jobs: int,
                  done: dict | None = None, decoded: dict | None = None) -> int:
    """The size of the file the plan's options give the values as they are: the writer's, run into a counter.
    ``done``: tensors already coded with their options (taken from it, as :func:`_encode_in_order` does);
    ``decoded`` (a dict) receives the decoded values, in storage form, of each lossy tensor and of each lossless one
    asked with rounded significands (:attr:`codec.tensorcodec.EncodeOptions.significand_bits`: what the file holds,
    not the values given)."""
    sink = _Count()
    with Writer(sink, metadata=meta, encoder=encoder, compress_index=index.get("compress")) as writer:
        for name, target, dtype, shape, encoded, _ in _encode_in_order(arrays, aliases, options_for, jobs,
                                                                       done=done, check=False):  # (sizes only)
            if target is not None:
                writer.add_alias(name, target)
            else:
                writer.add(name, dtype, shape, encoded)
                if decoded is not None and (encoded.codec.lossy or options_for(name).significand_bits is not None):
                    decoded[name] = decode_encoded(encoded, dtype, shape, name)
        for name, data in (attachments or {}).items():
            ready = packing.get(name)
            writer.add_attachment(name, data, None if ready is None else ready.result())
    return sink.n


def _better_by_score(arrays: Arrays, aliases: dict[str, str], calibrate: Callable[[dict], float], mine: tuple,
                     other: tuple, budget: int, warn: Callable[[list[str]], None], meta: dict[str, str],
                     encoder: dict[str, str], index: dict, attachments, packing, jobs: int, notes: list,
                     memo: dict | None = None) -> tuple:
    """Of the calibrated plan ``mine`` and the data-free plan ``other`` (each ``(chosen, damaged, coded, planned)``,
    as :func:`save`'s ``settle`` gives them), the one whose decoded model ``calibrate`` scores higher; the data-free
    plan only where its file fits ``budget``. The user's score judges the two files as written (two more calls of
    it, one more coding of the model; the calibrated plan's score is remembered from its rounds, ``memo``); a note
    says which plan was kept and both scores. (The calibrated plan's first sensitivities come from one probe per
    tensor at 1 % error, a file's errors are 10-90 %: the bench CNN's 1 % plan at -b 1.5 had 89.02 % against the
    data-free plan's 89.40, and 18.41 % at -b 0.6 with another 2,000 images; :mod:`codec.rd.probe`'s rounds at the
    plan's errors do not always close that gap.)"""
    from .api import calibrate_score

    score = calibrate_score(arrays, aliases, calibrate, memo)  # the plan's own whole score is remembered
    measured = []
    for chosen, damaged, coded, _ in (mine, other):
        warn(damaged)  # the warnings are in the file's metadata: its size counts them
        decoded: dict = {}
        nbytes = _planned_size(arrays, aliases, chosen.__getitem__, meta, encoder, index, attachments, packing, jobs,
                               done=dict(coded), decoded=decoded)
        measured.append((nbytes, score(decoded)))
        del decoded
    (mine_bytes, mine_score), (other_bytes, other_score) = measured
    if other_bytes <= budget and other_score > mine_score:
        notes.append(Note(f"calibrate: kept the data-free plan, scored {other_score:.6g} against the calibrated "
                          f"plan's {mine_score:.6g}"))
        return (*other[:3], other_bytes)
    notes.append(Note(f"calibrate: kept the calibrated plan, scored {mine_score:.6g} against the data-free plan's "
                      f"{other_score:.6g}"))
    return (*mine[:3], mine_bytes)


def _best_scored(fits: list[tuple], score: Callable[[dict], float], decoded: Callable[[dict, dict], dict]) -> tuple:
    """Of the plans ``fits`` (each ``(size, chosen, damaged, coded)``: :func:`save`'s ``settle``'s first plan and
    replans whose files fit the budget), the one the user's ``score`` rates highest, the larger file where two score
    the same (a NaN score ranks last). ``decoded(chosen, coded)``: the values the plan's file holds. Each plan of the
    score path was scored whole by its rounds (:func:`codec.rd.probe.replan_at_errors`), so ``score`` (with the
    save's memo) finds it without calling the user's score; a plan it does not know costs one call. (By size alone,
    the largest file, the bench CNN at -b 0.6 on its second draw kept a plan at 82.68 % test accuracy over a replan
    84 bytes smaller the score rated higher: bench/JOURNAL.md, "cost" and "settle".)"""
    def rated(fit: tuple) -> tuple[float, int]:
        value = score(decoded(fit[1], fit[3]))
        return (-math.inf if math.isnan(value) else value), fit[0]

    return max(fits, key=rated)


#: A budgeted model of at most this many weights, whose index may be a fair share of its file
#: (:data:`REPLAN_ENTRY_BYTES` a tensor against :data:`REPLAN_UNDER` of the budget), has its plan's file measured
#: (:func:`_planned_size`) and is planned again when it comes out more than :data:`REPLAN_UNDER` of the budget under
#: it, or over it. The plan counts the index by what compressing the smallest encoding's index saves
#: (:func:`_index_saving`); another plan's entries compress a little differently. (With the lean estimate before it,
#: a 140,000-weight ViT of 72 tensors at -b 3 came out at 2.654 bits/weight, 6 KB under, leaving 8 tensors
#: damaged.) Up to :data:`REPLANS` more plans get what the first left, each given what a line through the sizes so
#: far predicts will fit, less 3 % (or, over, have the excess kept out); each costs one more search and coding of
#: the model, small at this size. The largest file within the budget is kept (in the score path, the one the
#: user's score rates highest: :func:`_best_scored`). A save with repair counts the index
#: as written too, and aims its plan at the budget less :data:`REPAIR_SHARE` of it and the growth it keeps for repair
#: (also planned again when that growth shrinks by more than :data:`REPLAN_UNDER` of the budget,
#: :func:`codec.rd.repair.moved_growth`).
REPLAN_WEIGHTS = 1 << 22
REPLAN_UNDER = 0.01
REPLAN_ENTRY_BYTES = 256
REPLANS = 3
#: A plan whose file comes out over its budget is planned again with the excess and this fraction of the budget kept
#: out (its entries compressed by less than :data:`INDEX_MARGIN` allowed for).
REPLAN_OVER = 0.001

#: Of the budget of a calibrated + repaired save of at most :data:`REPLAN_WEIGHTS` weights, the fraction its plan
#: leaves to repair, whose step-ups spend it in forward order (:func:`spare_bytes`) where a layer's error costs the
#: most, downstream of it (bench/JOURNAL.md, twenty-third pass). A budget too small to leave it gets no share (the
#: refusal's smallest budget still writes a file). A larger model (all-MiniLM-L6-v2) gets none: not measured there.
REPAIR_SHARE = 0.06

#: Of a repaired file's budget, the fraction repair is not given to spend (:func:`spare_bytes`): the lossless tensors'
#: repaired values, the index's blob lengths and its compression can take a few bytes more than planned.
SPARE_MARGIN = 0.003


def spare_bytes(budget: int, planned: int) -> int:
    """The bytes repair may spend beyond its plan (``spare`` of :func:`codec.rd.repair.code_with_repair`): the
    budget less the size of the file the plan gives the original values, less :data:`SPARE_MARGIN` of the budget
    (0 if that is negative)."""
    return max(0, budget - planned - math.ceil(SPARE_MARGIN * budget))


def _index_saving(skeleton: Index, tensors: list[tuple[str, DType, tuple[int, ...]]], least: float,
                  floor: Callable[[], Iterator[tuple[str, DType, tuple[int, ...], Encoded]]] | None = None) -> int:
    """Bytes that compressing the index (:func:`codec.format.pack_index`) saves on what the search counts (each
    tensor's entry as JSON with 10-digit offsets, :func:`codec.rd.allocate.entry_bytes`), if ``least`` or more, else
    0. Measured on the index of the smallest encoding as it will be written: ``floor()`` yields each tensor coded
    at its cheapest floor setting (:func:`codec.rd.allocate.floor_encodings`), their entries with real offsets,
    lengths and CRCs compressed, less :data:`INDEX_MARGIN` of that compressed index (another plan's entries
    compress a little differently: the bench models' written indexes vary by up to 10 % between budgets, their
    JSON by under 1 %; a random MobileNetV2's calibrated plan, with five JPEG tables, 16 % above its floor's).
    Nothing is coded, and nothing compressed, when the index's JSON, counted with a lean entry per tensor (its
    name, dtype and shape, one blob), is too small to save ``least`` (a large model's). Without ``floor`` (an
    update's plan), 80 % of what compressing that lean index saves."""
    entries, offset = list(skeleton.entries), 0
    for name, dtype, shape in tensors:
        length = 1 + zlib.crc32(name.encode()) % 99_991
        entries.append(TensorEntry(name, dtype, shape, codec=lossless_codec(dtype, 9),
                                   blobs=[BlobRef(offset, length, zlib.crc32(name.encode(), 7))]))
        offset += length
    lean = Index(entries, skeleton.metadata, skeleton.encoder, attachments=skeleton.attachments, base=skeleton.base)
    raw = lean.to_bytes()
    if len(raw) < least:
        return 0
    if floor is None:  # an update's entries (differences, unchanged tensors): 80 % of the lean index's saving
        saving = int(0.8 * (len(raw) - len(pack_index(lean, True)[0])))
        return saving if saving >= least else 0
    from .rd.allocate import entry_bytes

    entries, offset, counted = list(skeleton.entries), 0, len(skeleton.to_bytes())
    for name, dtype, shape, encoded in floor():
        refs = []
        for blob in encoded.blobs:
            refs.append(BlobRef(offset, len(blob), zlib.crc32(blob)))
            offset += len(blob)
        entries.append(TensorEntry(name, dtype, shape, encoded.codec, encoded.tiling, refs))
        counted += entry_bytes(name, dtype, shape, encoded, 10)
    written = Index(entries, skeleton.metadata, skeleton.encoder, attachments=skeleton.attachments,
                    base=skeleton.base)
    saving = counted - math.ceil((1 + INDEX_MARGIN) * len(pack_index(written, True)[0]))
    return saving if saving >= least else 0


#: Of the compressed index of the smallest encoding, the fraction :func:`_index_saving` keeps as a margin (a plan
#: whose file still comes out over is planned again: :data:`REPLAN_OVER`).
INDEX_MARGIN = 0.25


def _nbytes(data: bytes | str | os.PathLike[str]) -> int:
    """The size of an attachment given as bytes or as a file to read."""
    return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.path.getsize(data)


def _pack(attachments: Mapping[str, bytes | str | os.PathLike[str]] | None, jobs: int) -> dict[str, Future]:
    """Start compressing ``attachments`` (:func:`codec.writer.encode_attachment`) on up to ``jobs`` threads of their
    own (zstd releases the GIL); name -> future. With one job they are compressed here, one after another."""
    if not attachments:
        return {}
    pool = ThreadPoolExecutor(min(jobs, len(attachments)), thread_name_prefix="jwt-attach") if jobs > 1 else INLINE
    futures = {name: pool.submit(encode_attachment, name, data) for name, data in attachments.items()}
    if pool is not INLINE:
        pool.shutdown(wait=False)  # the threads end when their last attachment is compressed
    return futures


#: A rate target's note names the attachments' share of the file when they take at least this fraction of it.
ATTACHMENT_NOTE_SHARE = 0.005


def _attachments_note(packing: dict[str, Future], bits_per_weight: float, weights: int) -> list[Note]:
    """A note when the attachments (a model folder's tokenizer, config...) take a visible share of a whole-file
    budget: the weights get what is left (all-MiniLM-L6-v2's 12 files, 269 KB compressed, take 0.095 of -b 3.5:
    cosine 0.9830 / 0.9761 against 0.9873 / 0.9836 without them; bench/JOURNAL.md, eighteenth pass)."""
    stored = sum(len(future.result()[1]) for future in packing.values())
    if not weights or stored < ATTACHMENT_NOTE_SHARE * bits_per_weight * weights / 8:
        return []
    share = 8 * stored / weights
    what = "the attachment takes" if len(packing) == 1 else f"the {len(packing)} attachments take"
    return [Note(f"budget: {what} {stored:,} bytes "
                 f"compressed, {share:.3f} of the {bits_per_weight:g} bits/weight asked for the whole file: the "
                 f"weights are coded at about {bits_per_weight - share:.3f} (ask -b {bits_per_weight + share:.3f} "
                 f"to give them {bits_per_weight:g})")]


def _describe(encoded) -> str:
    """A tensor's codec and its parameters in a few words, e.g. ``quant bits=1``."""
    return encoded.codec.describe(skip=("level",))


def progress_total(state_dict: Any, *, overrides: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
                   bits_per_weight: float | None = None, max_error: float | None = None, **options: Any) -> int:
    """The sum of the counts :func:`save` with the same arguments reports to ``progress`` (a bar's total).

    Each stored tensor reports its size when it is coded; with a rate target the search first reports it
    once per candidate setting it measures (:func:`codec.rd.allocate.search_units`), which is most of the
    work, so a bar over this total moves with the time spent. Read from shapes and dtypes alone.
    """
    if isinstance(state_dict, Arrays):  # read lazily: no shared storage
        arrays, names = state_dict, list(state_dict)
    else:  # what save refuses (not a tensor, sparse, ...) counts nothing here: save names it
        from .api import storable_arrays

        arrays, names = storable_arrays(state_dict)
    total = sum(math.prod(arrays.shape(n)) for n in names)
    if bits_per_weight is None and max_error is None:
        return total
    from .rd.allocate import search_units

    base, rules = EncodeOptions(**options), Overrides(overrides)
    return total + search_units(((n, arrays.shape(n), get_dtype(arrays.dtype_name(n))) for n in names), base,
                                lambda name: rules.options_for(name, base), bits_per_weight=bits_per_weight,
                                max_error=max_error)


def as_base(base: Any, limits: Limits = DEFAULT_LIMITS) -> Any:
    """An update's base as a :class:`codec.update.Base`: from a Base, a state_dict, or a model file or folder.

    A .jwt is decoded (a base that is itself an update is refused: decode it
    first); a .pt/.pth, .safetensors or folder is read; a mapping holds torch
    tensors (or is :class:`Arrays`). The one-line errors name the file. Only
    a .pt/.pth base or torch tensors import torch.
    """
    from .update import Base

    if isinstance(base, Base):
        return base
    if isinstance(base, Mapping):
        return _base_of(base, "<state_dict>", copy=False)
    if not isinstance(base, (str, os.PathLike)):
        raise TypeError(f"base must be a path, a state_dict or a codec.update.Base, not {type(base).__name__}")
    from . import io_formats

    if not os.path.exists(base):
        raise FileNotFoundError(2, "no such file", str(base))
    if io_formats.detect_format(base) == "jwt":
        return Base.open(base, limits=limits)
    with io_formats.open_source(base) as source:  # copied: memory maps close with the source
        return _base_of(source.tensors, str(base), copy=True)


def _base_of(tensors: Mapping, name: str, copy: bool) -> Any:
    """A :class:`codec.update.Base` of :class:`Arrays` or torch tensors (storage-form views, or copies)."""
    from .update import Base

    if not isinstance(tensors, Arrays):
        from .api import tensor_base

        return tensor_base(tensors, name, copy)
    return Base({key: (tensors.array(key), get_dtype(tensors.dtype_name(key))) for key in tensors}, name)


def _encode_in_order(arrays: Arrays, aliases: dict[str, str], options_for: Callable[[str], EncodeOptions], jobs: int,
                     matcher: Any = None, done: dict[str, Encoded] | None = None, check: bool = True):
    """Yield ``(name, alias target, dtype, shape, Encoded, base ref)`` in ``arrays`` order.

    An alias has no dtype or Encoded. With an update's ``matcher``
    (:class:`codec.update.plan.Matcher`) a tensor coded from a base tensor
    has its base ref: Encoded None for an unchanged one, else the coded
    difference.

    Each tensor is read from ``arrays`` once, when its turn comes, and its
    blobs are coded by ``jobs`` threads while the following tensors are
    read and submitted; results are handed out in order. A tensor in
    ``done`` (already coded with its options, by the rate search) is handed
    out as it is, without being read. ``check``: each lossy Encoded gets its relative error where it could
    reach :data:`codec.tensorcodec.ZERO_ERROR` (:func:`codec.tensorcodec.start_encode`).
    """
    executor = make_executor(jobs)
    window = max(1, jobs - 1)  # with the tensor being read: ``jobs`` tensors in flight, one per worker
    pending: deque = deque()
    ahead = 0
    try:
        for name in arrays:
            if name in aliases:
                pending.append((name, aliases[name], None, (), None, 0, None))
            elif done and name in done:
                job = Pending([INLINE.submit(done.pop, name)], lambda parts: parts[0])
                pending.append((name, None, get_dtype(arrays.dtype_name(name)), tuple(arrays.shape(name)), job, 0,
                                None))
            else:
                array, dtype = arrays.array(name), get_dtype(arrays.dtype_name(name))
                opts = options_for(name)
                mode, ref = ("full", None) if matcher is None else matcher.decide(name, array, dtype, opts)
                coded = matcher.delta_array(name, array, dtype, opts) if mode == "delta" else array
                job = None if mode == "unchanged" else start_encode(coded, dtype, opts, executor, check=check)
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


class _Forced:
    """Overrides with some tensors forced to fixed options (the last word, over every rule)."""

    def __init__(self, rules: Overrides, names: set[str], options: EncodeOptions):
        self.rules, self.names, self.options = rules, names, options

    def options_for(self, name: str, base: EncodeOptions) -> EncodeOptions | None:
        return self.options if name in self.names else self.rules.options_for(name, base)

    def __getattr__(self, attr: str) -> Any:  # the user's rules as they are (rule_for, unmatched, ...)
        return getattr(self.rules, attr)


def _refuse_early(arrays, aliases, base, rules, meta, encoder, bits_per_weight, attachments, reserve=0) -> None:
    """Raise the search's EncodeError for a budget below the whole model's smallest encoding
    (:func:`codec.rd.allocate.refuse_budget`) before calibration runs the model over the user's inputs (a small
    ResNet-like network on 2,000 images: 32 s before the "no"). Counts the file as :func:`_plan` would, with the
    calibration's metadata at its shortest, so a budget the calibrated search would meet is never refused here
    (the search itself still refuses one within those few bytes). Costs one coding of each tensor at each of its
    menu's cheapest settings (all-MiniLM-L6-v2: about 2 CPU s). ``reserve``: as :func:`_plan`'s."""
    from .rd.allocate import refuse_budget

    stored = [n for n in arrays if n not in aliases]
    meta = {**meta, "jwt.calibration": "0 inputs in 0 batches, 0 layers"}
    index: dict = {}
    overhead = _overhead(arrays, aliases, stored, meta, encoder, attachments, bits_per_weight, index, None, base,
                         rules) + reserve
    refuse_budget(bits_per_weight, _tensor_source(arrays, stored), base, lambda name: rules.options_for(name, base),
                  overhead, packed=bool(index.get("compress")))


def _tensor_source(arrays: Arrays, stored: list[str]):
    """The allocator's tensor source: ``tensors(names=None)`` yields ``(name, array, dtype)`` of the ``stored``
    tensors, or of those in ``names`` (the others are not read); ``tensors.location(name)`` is
    :meth:`Arrays.location` (a Ray worker on this machine reads such a tensor itself, :mod:`codec.rd.fast`)."""

    def tensors(names: set[str] | None = None):
        for name in stored:
            if names is None or name in names:
                yield name, arrays.array(name), get_dtype(arrays.dtype_name(name))

    tensors.location = arrays.location  # where a tensor lies in a file, for workers that read it themselves
    return tensors


def _overhead(arrays, aliases, stored, meta, encoder, attachments, bits_per_weight, index, base_id,
              options=None, rules=None) -> int:
    """Header, index skeleton and attachment blobs, in bytes (waits for the attachments' compression), less what
    compressing the index will save where that is worth it (``index``, a dict, then gets ``compress=True``, and
    ``saving``: measured once, on the index of the smallest encoding under ``options`` and ``rules``,
    :func:`_index_saving`)."""
    attached, attached_bytes = [], 0
    for name, item in attachments.items():
        packed, blob = item.result() if isinstance(item, Future) else item
        attached.append(Attachment(name, packed.size, packed.codec,
                                   [BlobRef(10**12, len(blob), 0xFFFFFFFF)]))  # wide offset
        attached_bytes += len(blob)
    skeleton = Index([TensorEntry(n, get_dtype(arrays.dtype_name(n)), tuple(arrays.shape(n)), alias=a)
                      for n, a in aliases.items()], meta, encoder, attachments=attached, base=base_id)
    fixed = HEADER_SIZE + len(skeleton.to_bytes()) + attached_bytes
    if index is None or bits_per_weight is None:
        return fixed
    budget = bits_per_weight * sum(math.prod(arrays.shape(n)) for n in stored) / 8
    if "saving" not in index:  # (the same for every plan of a save: the floor is coded once)
        from .rd.allocate import floor_encodings

        floor = None if base_id is not None else lambda: floor_encodings(  # noqa: E731
            _tensor_source(arrays, stored), options, lambda name: rules.options_for(name, options))
        index["saving"] = _index_saving(skeleton, [(n, get_dtype(arrays.dtype_name(n)), tuple(arrays.shape(n)))
                                                   for n in stored], INDEX_ZSTD_SAVING * budget, floor)
    if index["saving"]:
        index["compress"] = True  # the budget counts on it: the writer must compress
    return fixed - index["saving"]


def _plan(arrays, aliases, base, rules, meta, encoder, bits_per_weight, max_error, calibrate, progress,
          attachments, jobs, matcher=None, measure_by=None, notes=None, search="fast", coded=None, index=None,
          executor=None, reserve=0, memo=None, price=None, surcharge=None, plain=None):
    """Run the rate-distortion allocator over the stored tensors; options per name.

    The budget's fixed part counts the header, the index without tensor
    entries (metadata, aliases, attachment entries) and the attachments' blobs
    (``attachments``: name to :func:`codec.writer.encode_attachment`'s result, or a future of it: the search
    asks for the fixed part only when it needs it, :func:`codec.rd.fast.plan_fast` after its first pass),
    less what compressing the index will save where that is worth it (:func:`_index_saving`; ``index``, a
    dict, then gets ``compress=True`` for the writer). The search counts each tensor's index entry as JSON.
    The fast search puts tensors it coded with their chosen options in ``coded``, and runs its tasks on
    ``executor`` when one is given (:class:`codec.distributed.ray.RayExecutor`). ``reserve``: bytes of the budget
    kept out of the plan (counted in its fixed part), for what will grow after it
    (:func:`codec.rd.repair.constant_growth`). ``memo``: :func:`codec.api.calibrate_score`'s, one per save.
    ``price``: repair will code the plan (:class:`codec.rd.price.RepairPrices`: the search prices its plan again at
    what repair codes; ``surcharge``, a dict, gets what that costs beyond the plan's file, and ``plain``, a set, the
    JPEG tensors it priced at their uncompensated point: :func:`plan_options`).
    """
    from .rd.allocate import plan_options

    stored = [n for n in arrays if n not in aliases]
    tensors = _tensor_source(arrays, stored)
    base_id = None
    menu = None
    if matcher is not None:
        from .format import BaseId
        from .update.plan import UpdateMenu

        base_id, menu = BaseId(matcher.base.digest(), len(matcher.base)), UpdateMenu(matcher)

    def overhead() -> int:
        return _overhead(arrays, aliases, stored, meta, encoder, attachments, bits_per_weight, index, base_id, base,
                         rules) + reserve

    score = None
    if calibrate is not None:
        from .api import calibrate_score

        score = calibrate_score(arrays, aliases, calibrate, memo)
    return plan_options(tensors, base, lambda name: rules.options_for(name, base),
                        bits_per_weight=bits_per_weight, max_error=max_error,
                        overhead_bytes=overhead, score=score, progress=progress,
                        jobs=jobs, total_weights=sum(math.prod(arrays.shape(n)) for n in stored),
                        menu=menu, measure_by=measure_by, notes=notes, search=search, coded=coded,
                        executor=executor, packed=lambda: bool(index and index.get("compress")), price=price,
                        surcharge=surcharge, plain=plain)
