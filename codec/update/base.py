"""The base of an update: its tensors as the receiver decodes them, their hashes, and the base check.

A base is a mapping of names to arrays in storage form (:mod:`codec.dtypes`),
however the receiver got it: decoded from a .jwt, read from a .pt, or a
state_dict in memory. Its identity is content only (spec 12.2):

- a tensor's hash is the SHA-256 of its storage bytes, row-major, little-endian;
- the base digest is the SHA-256 of, for every tensor sorted by the UTF-8
  bytes of its name: ``u32 len(name) | name | u8 len(dtype) | dtype |
  u32 ndim | u64 dims... | 32-byte tensor hash`` (integers little-endian).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..dtypes import DType
from ..errors import BaseError, JwtError
from ..format import Index

__all__ = ["Base", "tensor_sha256", "base_digest", "check_base"]


def tensor_sha256(array: np.ndarray) -> str:
    """Hex SHA-256 of an array's storage bytes (row-major, little-endian)."""
    data = np.ascontiguousarray(array)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return hashlib.sha256(memoryview(data.reshape(-1)).cast("B")).hexdigest()


def base_digest(items: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    """Hex digest of a whole base from ``(name, dtype name, shape, tensor sha256)`` items, in any order."""
    h = hashlib.sha256()
    for name, dtype, shape, sha in sorted(items, key=lambda item: item[0].encode("utf-8")):
        raw = name.encode("utf-8")
        h.update(struct.pack("<I", len(raw)) + raw + struct.pack("<B", len(dtype)) + dtype.encode("ascii"))
        h.update(struct.pack(f"<I{len(shape)}Q", len(shape), *shape) + bytes.fromhex(sha))
    return h.hexdigest()


class Base:
    """A base model as the receiver holds it: ``name -> (storage array, DType)``; hashes computed once.

    ``name`` says where it came from (a file name), for error messages.
    """

    def __init__(self, tensors: Mapping[str, tuple[np.ndarray, DType]], name: str = "base"):
        self.tensors = dict(tensors)
        self.name = name
        self._sha: dict[str, str] = {}
        self._digest: str | None = None

    @classmethod
    def from_reader(cls, reader: Any) -> "Base":
        """Decode every tensor of an open :class:`codec.Reader` (a model, not an update) into a base."""
        if reader.index.base is not None:
            raise BaseError(f"{reader.name}: is itself an update; decode it with its own base first and give "
                            "the decoded model as the base")
        arrays: dict[str, tuple[np.ndarray, DType]] = {}
        for entry, array in reader.iter_arrays():
            arrays[entry.name] = arrays[entry.alias] if entry.alias is not None else (array, entry.dtype)
        return cls(arrays, reader.name)

    @classmethod
    def open(cls, source: Any, **reader_args: Any) -> "Base":
        """Decode the .jwt at ``source`` (path, URL, bytes or file object) into a base."""
        from ..reader import Reader

        with Reader(source, **reader_args) as reader:
            return cls.from_reader(reader)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def array(self, name: str) -> np.ndarray:
        """The storage array of base tensor ``name``."""
        return self.tensors[name][0]

    def dtype(self, name: str) -> DType:
        return self.tensors[name][1]

    def sha256(self, name: str) -> str:
        """Hex SHA-256 of base tensor ``name`` (computed on first use)."""
        if name not in self._sha:
            self._sha[name] = tensor_sha256(self.array(name))
        return self._sha[name]

    def digest(self) -> str:
        """Hex digest of the whole base (module docstring)."""
        if self._digest is None:
            self._digest = base_digest((n, dt.name, tuple(a.shape), self.sha256(n))
                                       for n, (a, dt) in self.tensors.items())
        return self._digest

    def by_hash(self) -> dict[tuple[str, str, tuple[int, ...]], str]:
        """``(sha256, dtype, shape) -> name`` of the base tensors (the first name of equal ones, in base order)."""
        out: dict[tuple[str, str, tuple[int, ...]], str] = {}
        for n, (a, dt) in self.tensors.items():
            out.setdefault((self.sha256(n), dt.name, tuple(a.shape)), n)
        return out


def check_base(index: Index, base: Base | None, file: str) -> None:
    """Refuse (BaseError) a base that is not the one the update ``index`` was made against.

    Checks, in index order, every base tensor the update uses (present,
    same dtype and shape, same SHA-256), naming the first that differs;
    then the number of base tensors and the digest of the whole base.
    Nothing is decoded from the update before this passes.
    """
    if not isinstance(index, Index):
        raise TypeError(f"check_base: index must be a codec.format.Index (a Reader's .index), "
                        f"not {type(index).__name__}")
    if base is not None and not isinstance(base, Base):
        raise TypeError(f"check_base: base must be a codec.update.Base or None, not {type(base).__name__}")
    if index.base is None:
        return
    need = f"(it needs the base whose digest is sha256:{index.base.sha256})"
    if base is None:
        raise BaseError(f"{file}: is an update and no base was given {need}")
    where = f"{file}: base {base.name}"
    for entry in index.entries:
        ref = entry.base
        if ref is None:
            continue
        if ref.name not in base:
            raise BaseError(f"{where}: has no tensor {ref.name!r}, which update tensor {entry.name!r} is coded from")
        array, dtype = base.tensors[ref.name]
        if (dtype.name, tuple(array.shape)) != (entry.dtype.name, entry.shape):
            raise BaseError(f"{where}: tensor {ref.name!r} is {dtype.name}{list(array.shape)}, the update needs "
                            f"{entry.dtype.name}{list(entry.shape)}")
        got = base.sha256(ref.name)
        if got != ref.sha256:
            raise BaseError(f"{where}: tensor {ref.name!r} differs from the update's base (sha256 {got}, "
                            f"expected {ref.sha256})")
    if len(base) != index.base.tensors:
        raise BaseError(f"{where}: has {len(base)} tensors, the update's base had {index.base.tensors} {need}")
    if base.digest() != index.base.sha256:
        used = {e.base.name for e in index.entries if e.base is not None}
        others = [n for n in base.tensors if n not in used]
        listed = ", ".join(repr(n) for n in others[:3]) + (", ..." if len(others) > 3 else "")
        raise BaseError(f"{where}: differs from the update's base in a tensor the update does not use "
                        f"({listed}) {need}")


def as_base(value: Any, what: str = "base") -> Base:
    """``value`` as a :class:`Base`: a Base, or a path/bytes of a .jwt model (TypeError otherwise)."""
    if isinstance(value, Base):
        return value
    try:
        return Base.open(value)
    except JwtError:
        raise
    except TypeError:
        raise TypeError(f"{what} must be a codec.update.Base or a .jwt file, not {type(value).__name__}") from None
