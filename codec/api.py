"""The torch edge: state_dicts in, state_dicts out.

This is the only module that imports torch. It converts tensors to numpy
arrays in storage form (:mod:`codec.dtypes`), detects tensors that share
storage, and drives :mod:`codec.tensorcodec` and the container.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch

from .dtypes import get_dtype
from .errors import EncodeError
from .limits import DEFAULT_LIMITS, Limits
from .parallel import AHEAD_BYTES, INLINE, make_executor, resolve_jobs
from .reader import Reader
from .tensorcodec import EncodeOptions, Overrides, start_encode
from .writer import Writer

__all__ = ["save", "load", "open", "JwtFile", "read_state_dict", "encoder_versions", "TORCH_DTYPES"]

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
    if t.dim() > DEFAULT_LIMITS.max_ndim:
        return f"{t.dim()} dimensions, over the {DEFAULT_LIMITS.max_ndim} that readers accept"
    nbytes = t.numel() * t.element_size()
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
    calibration: Any = None,
    model: torch.nn.Module | None = None,
    repair: bool | None = None,
    calibration_progress: Callable[[str, int], None] | None = None,
    **options: Any,
) -> list[str]:
    """Encode ``state_dict`` (or an ``nn.Module``'s) to a .jwt file at ``path`` (atomically).

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
    allocation instead of the data-free estimate.

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
    and aliased. ``state_dict`` may load tensors lazily on access (e.g.
    :func:`codec.io_formats.open_source`). ``attachments`` maps relative
    POSIX paths to bytes or to files to read: non-tensor files (config,
    tokenizer) carried losslessly after the tensors. Returns warnings (e.g.
    tensors kept lossless for NaN/Inf).

    ``jobs`` worker threads code blobs in parallel (None: one per core, 1:
    none); the file is byte for byte the same whatever ``jobs`` is. Tensors
    are taken one at a time, at most ``jobs`` of them (and
    :data:`codec.parallel.AHEAD_BYTES` of input beyond the newest) in
    flight, so a lazy ``state_dict`` is never held whole.
    """
    jobs = resolve_jobs(jobs)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model= must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(state_dict, torch.nn.Module):
        model, state_dict = model or state_dict, state_dict.state_dict()
    elif not isinstance(state_dict, Mapping):
        raise TypeError(f"save() needs a state_dict (a mapping of tensors) or an nn.Module, "
                        f"not {type(state_dict).__name__}")
    if calibration is not None:
        if model is None:
            raise TypeError("calibration= needs the model itself: pass the nn.Module, not its state_dict "
                            "(or the module as model=)")
        if bits_per_weight is None and max_error is None:
            raise ValueError("calibration= needs a rate target: give bits_per_weight or max_error")
    elif repair:
        raise ValueError("repair=True needs calibration inputs (calibration=)")
    base = EncodeOptions(**options)
    rules = Overrides(overrides)
    rules.check(base)
    meta, encoder = dict(metadata or {}), encoder_versions()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise EncodeError(f"tensor {name!r}: not a tensor but {type(tensor).__name__}")
        problem = _unstorable(tensor)
        if problem:
            raise EncodeError(f"tensor {name!r}: {problem}")
    tensor = None  # a lazy state_dict's tensors are fetched one at a time: hold none of them
    aliases = _aliases(state_dict)
    notes: list[str] = []
    repaired = False
    if bits_per_weight is not None or max_error is not None:
        from .rd.allocate import WARNINGS_KEY, Distortion, norm_weightings

        weightings = norm_weightings({n: _shape(state_dict, n) for n in state_dict},
                                     lambda n: state_dict[n].detach().to("cpu", torch.float64).numpy())
        inputs, calib = _calibration(model, calibration, repair, calibration_progress, meta)
        if calib is not None:
            weightings.update(calib.weightings())
        damaged: list[str] = []
        chosen = _plan(state_dict, aliases, base, rules, meta, encoder, bits_per_weight, max_error, calibrate,
                       progress, attachments or {}, jobs, measure_by=Distortion(weightings), notes=damaged)
        if damaged:
            meta[WARNINGS_KEY] = "; ".join(damaged)
            notes += damaged
        repaired = inputs is not None
        if repaired:
            state_dict = _repaired(model, state_dict, aliases, inputs, chosen, calib, calibration_progress, jobs,
                                   notes)
        options_for: Callable[[str], EncodeOptions] = chosen.__getitem__
    else:
        options_for = lambda name: rules.options_for(name, base) or base  # noqa: E731
    with Writer(path, metadata=meta, encoder=encoder) as writer:
        for name, target, dtype, shape, encoded in _encode_in_order(state_dict, aliases, options_for, jobs):
            if target is not None:
                writer.add_alias(name, target)
                continue
            if encoded.fallback:
                notes.append(f"tensor {name!r}: stored losslessly ({encoded.fallback})")
            writer.add(name, dtype, shape, encoded)
            if progress:
                progress(name, math.prod(shape))
        for name, data in (attachments or {}).items():
            writer.add_attachment(name, data)
    if repaired and bits_per_weight is not None and isinstance(path, (str, os.PathLike)):
        # repair changes values after the plan: their coded size can differ from the planned one
        weights = sum(math.prod(_shape(state_dict, n)) for n in state_dict if n not in aliases)
        got = 8 * os.path.getsize(path) / max(weights, 1)
        if got > bits_per_weight:
            notes.append(f"repair: the file is {got:.3f} bits/weight, over the {bits_per_weight} asked for "
                         f"(the repaired values code larger than planned)")
    return notes


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
    coding those with the same options gives exactly what repair assumed.
    """
    from .rd.repair import code_with_repair

    counted = (lambda name, n: progress("repair", n)) if progress else None  # repair counts per tensor coded
    targets, repair_notes = code_with_repair(model, inputs, dict(chosen), calib, progress=counted, jobs=jobs)
    notes += list(repair_notes)
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
                     options_for: Callable[[str], EncodeOptions], jobs: int):
    """Yield ``(name, alias target, dtype, shape, Encoded)`` in ``state_dict`` order (alias: no dtype/Encoded).

    Each tensor is fetched from ``state_dict`` once, when its turn comes,
    and its blobs are coded by ``jobs`` threads while the following tensors
    are fetched and submitted; results are handed out in order.
    """
    executor = make_executor(jobs)
    window = max(1, jobs - 1)  # with the tensor being fetched: ``jobs`` tensors in flight, one per worker
    pending: deque = deque()
    ahead = 0
    try:
        for name in state_dict:
            if name in aliases:
                pending.append((name, aliases[name], None, (), None, 0))
            else:
                array, dtype_name = to_numpy(state_dict[name])
                dtype = get_dtype(dtype_name)
                job = start_encode(array, dtype, options_for(name), executor)
                pending.append((name, None, dtype, tuple(array.shape), job, array.nbytes))
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
    name, target, dtype, shape, job, _ = pending.popleft()
    return name, target, dtype, shape, None if job is None else job.result()


def _aliases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """name -> earlier name, for tensors with the same storage, offset, shape, strides and dtype.

    A storage address only identifies a tensor while it is alive: a lazy
    mapping (:class:`codec.io_formats.LazyTensors`) makes a new tensor on
    every access and frees it after, and the next one may reuse the
    address. So a match counts only while the earlier tensor still exists.
    """
    seen: dict[tuple, tuple[str, weakref.ref]] = {}
    aliases = {}
    for name in state_dict:
        tensor = state_dict[name]
        key = _storage_key(tensor)
        earlier = seen.get(key)
        if tensor.numel() and earlier is not None and earlier[1]() is not None:
            aliases[name] = earlier[0]
        elif earlier is None or earlier[1]() is None:
            seen[key] = (name, weakref.ref(tensor))
        del tensor
    return aliases


def _shape(state_dict: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape, without loading it when the mapping can tell (a lazy .safetensors)."""
    shape = getattr(state_dict, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(state_dict[name].shape)


def _plan(state_dict, aliases, base, rules, meta, encoder, bits_per_weight, max_error, calibrate, progress,
          attachments, jobs, measure_by=None, notes=None):
    """Run the rate-distortion allocator over the stored tensors; options per name.

    The budget's fixed part counts the header, the index without tensor
    entries (metadata, aliases, attachment entries) and the attachments' blobs.
    """
    from .rd.allocate import plan_options
    from .format import HEADER_SIZE, BlobRef, Index, TensorEntry
    from .writer import encode_attachment

    stored = [n for n in state_dict if n not in aliases]

    def tensors():
        for name in stored:
            array, dtype_name = to_numpy(state_dict[name])
            yield name, array, get_dtype(dtype_name)

    attached, attached_bytes = [], 0
    for name, data in attachments.items():
        att, blob = encode_attachment(name, data)
        att.blobs = [BlobRef(10**12, len(blob), 0xFFFFFFFF)]  # generous digits for the offset
        attached.append(att)
        attached_bytes += len(blob)
    skeleton = Index([TensorEntry(n, get_dtype(TORCH_DTYPES[state_dict[n].dtype]), tuple(state_dict[n].shape),
                                  alias=a) for n, a in aliases.items()], meta, encoder, attachments=attached).to_bytes()
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
                        measure_by=measure_by, notes=notes)


class JwtFile:
    """A lazily decoded .jwt file: ``keys()``, ``metadata``, ``get(name)``.

    Only the header and index are read on opening; ``get`` reads and
    decodes one tensor. Use as a context manager to close the file.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO | bytes, limits: Limits = DEFAULT_LIMITS,
                 jobs: int | None = None, timeout: float | None = None):
        self.reader = Reader(source, limits=limits, jobs=jobs, timeout=timeout)

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

    def get(self, name: str) -> torch.Tensor:
        """Decode and return one tensor."""
        return to_torch(self.reader.read(name), self.reader.entry(name).dtype.name)

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
         jobs: int | None = None, timeout: float | None = None) -> JwtFile:
    """Open a .jwt file lazily (see :class:`JwtFile`).

    ``source`` is a path, an ``http(s)://`` URL (read with Range requests:
    the index first, then one request per tensor asked for), a binary file
    object (a pipe works, in file order) or bytes. ``jobs`` decoding
    threads (None: one per core); ``timeout``: HTTP timeout in seconds.
    """
    return JwtFile(source, limits=limits, jobs=jobs, timeout=timeout)


def load(source: str | os.PathLike[str] | BinaryIO | bytes, *, limits: Limits = DEFAULT_LIMITS,
         progress: ProgressFn | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, jobs: int | None = None,
         timeout: float | None = None) -> dict[str, torch.Tensor]:
    """Decode a whole .jwt file into a state_dict (shared tensors stay shared).

    ``source`` as for :func:`open`; from a URL the data section is streamed
    in one response and decoded as it arrives. ``jobs`` decoding threads
    (None: one per core, 1: none); the values do not depend on ``jobs``.

    ``device`` moves every tensor there; ``dtype`` (a floating torch dtype
    or its name, e.g. ``"bfloat16"``) casts the floating tensors only.
    """
    if isinstance(dtype, str):
        dtype = _BY_NAME.get(dtype, dtype)  # type: ignore[arg-type]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise EncodeError(f"dtype {dtype!r} is not a floating torch dtype")
    with JwtFile(source, limits=limits, jobs=jobs, timeout=timeout) as f:
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


def read_state_dict(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a .pt/.pth state_dict (or checkpoint holding one) without unpickling code.

    Uses ``torch.load(weights_only=True)``. A checkpoint dict holding the
    weights under ``state_dict`` or ``model`` is unwrapped. Entries that are
    not tensors are skipped with a warning naming them. ``mmap`` maps the
    tensors from the file instead of reading them (zip-format files only).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for foreign or malicious files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncodeError(f"{path}: not a weights-only PyTorch checkpoint ({first[:200]})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise EncodeError(f"{path}: holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    out: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            out[key] = value
        else:
            skipped.append(repr(key))
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} non-tensor entries: {', '.join(skipped[:10])}", stacklevel=2)
    if not out:
        raise EncodeError(f"{path}: holds no tensors")
    return out
