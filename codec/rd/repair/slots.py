"""The stored tensors repair works on: :class:`_Slot` (one tensor of the working model, where it lives and how it was
coded), :func:`_slots` (a model's slots for the planned options), the working model's storage shared with the
caller's until a tensor is coded (:func:`_shared_lossy`, :func:`_take`, :func:`_kept_weight`), and :func:`_code`
(encode a tensor and decode it, as a reader will).

Imports nothing of the package; :mod:`.losses`, :mod:`.fit`, :mod:`.budget` and :mod:`.loop` build on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...api import TORCH_DTYPES, to_numpy, to_torch
from ...dtypes import DType, get_dtype
from ...tensorcodec import Encoded, EncodeOptions, _error_sums, decode_encoded, encode_tensor, lossless_reason


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


def _measure(encoded: Encoded, target: np.ndarray, decoded: np.ndarray, dtype: DType) -> None:
    """Set a lossy encoding's ``rel_error`` (``||decoded - target|| / ||target||``), as a writer's checked coding
    would have it (:func:`codec.tensorcodec.start_encode`), for its note on an error no better than zeros."""
    if encoded.tiling is None or encoded.fallback:
        return
    rows = target.shape[0] if target.ndim else 1
    err, ref = _error_sums(target.reshape(rows, -1), decoded.reshape(rows, -1), dtype)
    encoded.rel_error = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """``a.tobytes() == b.tobytes()`` without the two copies (an embedding's 47 MB each, at repair's peak)."""
    if a.nbytes != b.nbytes:
        return False
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    if a.itemsize != b.itemsize or a.itemsize not in (1, 2, 4, 8):
        return a.tobytes() == b.tobytes()
    width = np.dtype(f"u{a.itemsize}")
    return bool(np.array_equal(a.view(width), b.view(width)))


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


def _code(name: str, array: np.ndarray, dtype: DType, opts: EncodeOptions, executor
          ) -> tuple[np.ndarray, int, Encoded]:
    """Encode ``array`` with ``opts``; ``(what a reader decodes, bytes of the blobs, the encoding)``."""
    encoded = encode_tensor(array, dtype, opts, executor=executor)
    decoded = decode_encoded(encoded, dtype, array.shape, name, executor=executor)
    return decoded, sum(len(b) for b in encoded.blobs), encoded
