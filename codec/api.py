"""The torch edge: state_dicts in, state_dicts out.

This module imports torch (as do the data-aware :mod:`codec.rd.calibrate`
and :mod:`codec.rd.repair`). It converts tensors to numpy arrays in storage
form (:mod:`codec.dtypes`) and back, detects tensors that share storage,
reads ``.pt`` checkpoints and decodes .jwt files into tensors. Encoding
itself works on storage arrays in :mod:`codec.encode`, which needs no
torch; :func:`save` is :func:`codec.encode.save`, which comes here only for
what a torch object brings (:func:`tensor_arrays`, calibration, repair).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import re
import warnings
import weakref
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch

from .dtypes import get_dtype
from .encode import Arrays, Note, as_base, encoder_versions, progress_total, save, size_problem
from .encode import _plan as _plan_arrays
from .errors import EncodeError, FormatError, UsageError
from .io_formats import TREE_KEY
from .limits import DEFAULT_LIMITS, Limits
from .reader import Reader
from .stats import Totals, file_totals

__all__ = ["save", "load", "open", "JwtFile", "read_state_dict", "read_checkpoint", "flatten_checkpoint",
           "unflatten_checkpoint", "dropped_note", "encoder_versions", "TORCH_DTYPES", "TREE_KEY", "progress_total",
           "as_base", "TensorArrays", "tensor_arrays"]

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
    return size_problem(tuple(t.shape), t.element_size())


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def calibrated(model, calibration, repair, progress, meta):
    """``(inputs kept for repair or None, Calibration)`` for :func:`save`'s ``calibration`` (not None)."""
    from .rd import calibrate as calibrate_module
    from .rd.calibrate import Calibration, as_batches, calibrate

    if isinstance(calibration, Calibration):
        if repair:
            raise ValueError("repair=True needs the calibration inputs, not a Calibration; pass the inputs")
        calib, inputs = calibration, None
    else:
        if repair and not _repair_available():
            raise EncodeError("repair=True: coding with repair (codec.rd.repair) is not available in this build")
        use_repair = repairs(calibration, repair)
        inputs = as_batches(calibration)
        if use_repair and iter(inputs) is inputs:  # a one-shot iterator: keep its batches for repair
            inputs = list(inputs)
        # (a repaired save's transposed convolutions: set aside, not measured; their note: calibration_notes)
        calib = calibrate(model, inputs, progress=progress,
                          transposed=not use_repair or calibrate_module.TRANSPOSED_UNDER_REPAIR)
        if not use_repair:
            inputs = None
    meta["jwt.calibration"] = f"{calib.samples} inputs in {calib.batches} batches, {len(calib.layers)} layers"
    return inputs, calib


def calibration_notes(model, calib, arrays: Arrays, aliases: Mapping[str, str], repairing: bool,
                      renames: Mapping[str, str] | None = None) -> list[Note]:
    """:func:`save`'s notes on what calibration ``calib`` does not weigh: the stored floating tensors of two or more
    axes it has no statistics for (a layer kind it does not measure, or not reached by its inputs), coded by the
    data-free weighting (:func:`codec.rd.calibrate.uncalibrated`); and, when repair runs, the transformers Conv1D
    weights and transposed convolutions it codes without GPTQ or refit (repair's are for nn.Linear and
    nn.Conv1d / 2d / 3d); the transposed convolutions a repaired save set aside (``calib.set_aside``:
    :data:`codec.rd.calibrate.TRANSPOSED_UNDER_REPAIR` off) are named in a note of their own. ``renames``: the
    model's name of a stored tensor where it differs (:func:`codec.encode.save`'s ``model_names``); notes use the
    model's."""
    from .rd.allocate import PARAMETRIZED
    from .rd.calibrate import TRANSPOSED, _computed_weight, uncalibrated
    from .rd.recurrent import recurrent_matrix

    renames = renames or {}
    names = [renames.get(n, n) for n in arrays if n not in aliases and len(arrays.shape(n)) >= 2
             and math.prod(arrays.shape(n)) and get_dtype(arrays.dtype_name(n)).floating]
    notes = []
    aside = set(calib.set_aside)
    if aside:  # a weight_norm / spectral_norm transposed convolution: its originals, by the weight it computes
        aside |= {n for n in names if PARAMETRIZED in "." + n and _computed_weight(model, n)[1] in calib.set_aside
                  or n.rpartition(".")[2] in ("weight_g", "weight_v") and n[:-2] in calib.set_aside}
    note = uncalibrated(model, calib, [n for n in names if n not in aside])
    if note:
        notes.append(Note(note))
    if aside:
        listed = [n for n in names if n in aside]
        notes.append(Note(f"calibration: {len(listed)} transposed convolution weight{'s' * (len(listed) != 1)} "
                          f"({_listed(listed)}) coded by the data-free weighting: repair gives them a judged "
                          "least-squares bias only (no refit or GPTQ), and "
                          "weighed by their measured output error they lost to it with repair "
                          "(codec.rd.calibrate.TRANSPOSED_UNDER_REPAIR; repair=False weighs them as measured)"))
    unmoved = set(calib.unmoved)
    still = [n for n in names if n in unmoved]
    if still:  # weights no floating output uses: the search spends (almost) nothing on them
        whose = "its" if len(still) == 1 else "their"
        notes.append(Note(f"calibration: {len(still)} weight{'s' * (len(still) != 1)} ({_listed(still)}) did not move "
                          f"what calibration compares, {calib.output}: coded as if {whose} error did not matter; if "
                          "something else the model makes matters, calibrate a module whose forward returns it"))
    if repairing:  # weights calibrated as layers that repair does not fit
        conv1d = [n for n in names if n in calib.layers and calib.layers[n].kind == "conv1d"]
        recurrent = [n for n in names if n in calib.layers and recurrent_matrix(model, n)]
        transposed = [n for n in names if n in calib.layers and calib.layers[n].kind == TRANSPOSED]
        for listed, what in ((conv1d, ("transformers Conv1D weight", "transformers Conv1D weights")),
                             (recurrent, ("recurrent matrix", "recurrent matrices")),
                             (transposed, ("transposed convolution weight", "transposed convolution weights"))):
            if listed:
                notes.append(Note(f"repair: {len(listed)} {what[len(listed) != 1]} ({_listed(listed)}) coded with "
                                  "the calibrated weighting, without GPTQ or refit (repair's are for nn.Linear and "
                                  "nn.Conv1d / 2d / 3d)"))
    return notes


def parametrized_notes(model, handled: Collection[str] = ()) -> list[Note]:
    """:func:`save`'s note, in a data-free search, on the layers of ``model`` whose weight
    ``torch.nn.utils.parametrize`` computes with a parametrization the search does not weigh as that weight:
    ``handled`` names the computed weights it does (``fc1.weight``: weight_norm's and spectral_norm's,
    :func:`codec.rd.allocate.reparametrized`). For the others the file holds the tensors the weight is computed from,
    which the search weighs by their own error, not the weight's (before weight_norm was weighed so, a weight_norm
    MLP at -b 0.5 lost 71.67 % against 77.91 % with the parametrizations removed before saving; bench/JOURNAL.md,
    "qa (twenty-seventh pass)" and "fold (twenty-eighth pass)")."""
    from torch.nn.utils import parametrize

    layers = [name for name, module in model.named_modules() if parametrize.is_parametrized(module)
              and any((f"{name}.{p}" if name else p) not in handled for p in module.parametrizations)]
    if not layers:
        return []
    plural = len(layers) != 1
    return [Note(f"{len(layers)} layer{'s' * plural} ({_listed(layers)}) compute{'' if plural else 's'} "
                 f"{'their' if plural else 'its'} weight with a torch.nn.utils.parametrize parametrization other "
                 "than weight_norm and spectral_norm: the file holds, and the search weighs by their own error, the "
                 "tensors each weight is computed from, not the weight; "
                 "parametrize.remove_parametrizations(layer, \"weight\") on each before saving codes the weights "
                 f"themselves (the file then holds '{layers[0]}.weight': load it into a model with the same "
                 "removal)")]


def _listed(names: list[str], most: int = 4) -> str:
    return ", ".join(map(repr, names[:most])) + (f" and {len(names) - most} more" if len(names) > most else "")


def repairs(calibration, repair) -> bool:
    """Whether :func:`save` with these ``calibration`` and ``repair`` arguments repairs after its plan (and
    :func:`calibrated` keeps the inputs for it): calibration inputs, not a :class:`Calibration`, and repair not
    turned off and available."""
    from .rd.calibrate import Calibration

    return repair is not False and not isinstance(calibration, Calibration) and _repair_available()


def repair_growth(model, calibration, repair, stored, inputs=None, options=None) -> int:
    """Bytes a budgeted file keeps out of its plan for the constant vectors repair will give values of their own
    (:func:`codec.rd.repair.constant_growth`), when :func:`save` repairs (:func:`repairs`); else 0. Given the
    ``inputs`` repair will run and the plan's ``options`` (model names), only the vectors repair will move under
    that plan (:func:`codec.rd.repair.moved_growth`)."""
    if not repairs(calibration, repair):
        return 0
    settings = None if isinstance(repair, bool) else repair
    if inputs is not None and options is not None:
        from .rd.repair import moved_growth

        return moved_growth(model, inputs, options, stored, settings)
    from .rd.repair import constant_growth

    return constant_growth(model, stored, settings)


def _repair_available() -> bool:
    try:
        from .rd.repair import code_with_repair  # noqa: F401
    except ImportError:
        return False
    return True


class TensorArrays(Arrays):
    """A state_dict of torch tensors as :class:`codec.encode.Arrays`: each converted to its storage array
    (:func:`to_numpy`, a CPU view where it can) when it is read. ``tensors`` is the state_dict itself."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__({n: (tuple(t.shape), TORCH_DTYPES[t.dtype]) for n, t in tensors.items()},
                         lambda name: to_numpy(tensors[name])[0])
        self.tensors = tensors


def tensor_arrays(state_dict: Mapping) -> tuple[TensorArrays, dict[str, str], list[str], dict[str, str], list[str]]:
    """``(arrays, aliases, overlapping, tree metadata, notes)`` for :func:`save` given torch tensors.

    A plain state_dict is checked (EncodeError naming a tensor that cannot be
    stored); anything else is a checkpoint dict, flattened
    (:func:`flatten_checkpoint`: its structure goes to the tree metadata, and
    ``notes`` name the leaves it could not keep). ``aliases`` and
    ``overlapping`` are :func:`_sharing`'s.
    """
    tree: dict[str, str] = {}
    notes: list[str] = []
    if not _check_tensors(state_dict):  # a checkpoint dict: nested tensors under dotted names, the rest in the tree
        state_dict, tree, dropped = flatten_checkpoint(state_dict)
        if dropped:
            notes.append(dropped_note("checkpoint", dropped))
        _check_tensors(state_dict)
    aliases, overlapping = _sharing(state_dict)
    return TensorArrays(state_dict), aliases, overlapping, tree, notes


def storable_arrays(state_dict: Mapping) -> tuple[TensorArrays, list[str]]:
    """The tensors :func:`save` would store, as arrays, and their names less aliases (for
    :func:`codec.encode.progress_total`; what save refuses is left out here: save names it)."""
    storable = {n: t for n, t in state_dict.items() if isinstance(t, torch.Tensor) and not _unstorable(t)}
    aliases = _sharing(storable)[0]
    return TensorArrays(storable), [n for n in storable if n not in aliases]


def calibrate_score(arrays: Arrays, aliases: dict[str, str],
                    calibrate: Callable[[dict[str, torch.Tensor]], float],
                    memo: dict | None = None) -> Callable[[dict[str, np.ndarray]], float]:
    """The allocator's ``score(replaced)`` for :func:`save`'s ``calibrate``: the state_dict with the arrays in
    ``replaced`` (storage form) put in, aliases following their targets. Given a dict ``memo`` (one per save: the
    same ``arrays``), a ``replaced`` whose names and values were scored before is not scored again (a save plans
    several times, each plan probing the same candidates; the bench CNN's score costs ~0.9 CPU s a call); a value
    equal to the stored one is left out of the key, and ``memo[None]`` holds the stored values' digests."""
    tensors = arrays.tensors if isinstance(arrays, TensorArrays) else {
        n: to_torch(arrays.array(n), arrays.dtype_name(n)) for n in arrays}

    def digest(a: np.ndarray) -> tuple:
        return a.dtype.str, a.shape, hashlib.blake2b(np.ascontiguousarray(a).data).digest()

    def original(name: str) -> tuple:  # the stored values' digest, once per save (memo[None])
        known = memo.setdefault(None, {})  # type: ignore[union-attr]
        if name not in known:
            known[name] = digest(arrays.array(name))
        return known[name]

    def score(replaced: dict[str, np.ndarray]) -> float:
        if memo is None:
            return scored(replaced)
        # a value equal to the stored one replaces nothing: the check's whole file (every tensor, the lossless ones
        # too) is then the same key as the rounds' plan (its lossy tensors only)
        key = tuple(sorted((n, *d) for n, a in replaced.items() if (d := digest(a)) != original(n)))
        if key not in memo:
            memo[key] = scored(replaced)
        return memo[key]

    def scored(replaced: dict[str, np.ndarray]) -> float:
        trial = dict(tensors)
        trial.update({n: to_torch(a, arrays.dtype_name(n)) for n, a in replaced.items()})
        for alias, target in aliases.items():
            trial[alias] = trial[target]
        return float(calibrate(trial))

    return score


def repaired_arrays(model, arrays: Arrays, aliases, inputs, chosen, calib, progress, jobs, notes,
                    settings=None, coded: dict | None = None, spare: int = 0, index_zstd: bool = False,
                    renames: Mapping[str, str] | None = None) -> Arrays:
    """``arrays`` with those :func:`codec.rd.repair.code_with_repair` changed, to be coded as planned.

    Repair codes the layers in forward order with the chosen options (of the
    tensors the model holds: any other is coded as planned) and returns, in storage form, only the tensors whose values it changed
    (error-compensated weights, repaired biases and later parameters);
    coding those with the options in ``chosen`` (updated in place where
    repair had to code a tensor cheaper to keep its planned size) gives
    exactly what repair assumed. A plain float array of another width is
    rounded to the tensor's dtype by torch. ``settings``: a
    :class:`codec.rd.repair.RepairSettings`, or None for the defaults.
    Given a dict ``coded``, it receives the encoding of every lossy tensor as
    repair coded it (written as it is: :func:`codec.encode.save`'s ``coded``),
    and the arrays keep those tensors' original values, which are then not
    read: repair holds no float copy of them to the end, and nothing is coded
    twice. ``spare``: the bytes the plan leaves under the budget, for repair to spend
    (:func:`codec.encode.spare_bytes`); ``index_zstd``: the writer will compress the index (repair then counts a
    JPEG list table at its compressed bytes). ``renames``: the model's name of a stored tensor where it differs
    (:func:`codec.encode.save`'s ``model_names``): repair runs under the model's names, the result is keyed by the
    stored ones.
    """
    from .rd.repair import code_with_repair

    to_model = dict(renames or {})
    stored_as = {model_name: name for name, model_name in to_model.items()}

    counted = (lambda name, n: progress("repair", n)) if progress else None  # repair counts per tensor coded
    encoded = None if coded is None else {}
    held = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    held |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    # a stored tensor the model does not hold (a checkpoint's unused head) is coded as planned, beside repair
    options = {to_model.get(name, name): opts for name, opts in dict(chosen).items()
               if to_model.get(name, name) in held}
    targets, repair_notes, changed = code_with_repair(model, inputs, options, calib, progress=counted,
                                                      jobs=jobs, settings=settings, encoded=encoded, spare=spare,
                                                      index_zstd=bool(index_zstd))
    if stored_as:  # back to the stored names
        targets = {stored_as.get(n, n): v for n, v in targets.items()}
        changed = {stored_as.get(n, n): v for n, v in changed.items()}
        encoded = None if encoded is None else {stored_as.get(n, n): v for n, v in encoded.items()}
    notes += [Note(n) for n in repair_notes]  # remarks on what repair did, not warnings
    chosen.update(changed)  # options repair lowered to keep a tensor within its planned size
    out: dict[str, np.ndarray] = {}
    for name, array in targets.items():
        if name not in arrays:
            raise EncodeError(f"repair returned tensor {name!r}, which is not in the state_dict")
        if name in aliases:  # stored as its target: the target's value decides
            continue
        array, shape, dtype_name = np.asarray(array), tuple(arrays.shape(name)), arrays.dtype_name(name)
        if tuple(array.shape) != shape:
            raise EncodeError(f"repair returned tensor {name!r} with shape {tuple(array.shape)}, not {shape}")
        if array.dtype == get_dtype(dtype_name).storage:  # storage form
            out[name] = array if array.flags.c_contiguous else array.copy()
        else:
            out[name] = to_numpy(torch.from_numpy(array.copy()).to(_BY_NAME[dtype_name]))[0]
    for name, enc in (encoded or {}).items():
        if name not in arrays:
            raise EncodeError(f"repair returned tensor {name!r}, which is not in the state_dict")
        if name not in aliases and name not in out:
            coded[name] = enc
    return arrays.replaced(out)


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


def _plan(state_dict: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> dict:
    """:func:`codec.encode._plan` over a state_dict of torch tensors (as bench.repair calls it)."""
    return _plan_arrays(TensorArrays(state_dict), *args, **kwargs)


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


#: Characters of each metadata value holding a part of the checkpoint tree (:data:`TREE_KEY`): under the readers'
#: string limit.
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


def tensor_base(tensors: Mapping[str, torch.Tensor], name: str, copy: bool) -> Any:
    """A :class:`codec.update.Base` of torch tensors (storage-form numpy views, or copies), for
    :func:`codec.encode.as_base`; TypeError naming a value that is no tensor."""
    from .update import Base

    arrays = {}
    for key in tensors:
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"base tensor {key!r}: not a tensor but {type(tensor).__name__}")
        array, dtype_name = to_numpy(tensor)
        arrays[key] = (array.copy() if copy else array, get_dtype(dtype_name))
    return Base(arrays, name)
