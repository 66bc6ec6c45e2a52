"""Reading a .jwt container: validate first, then decode on demand.

A :class:`Reader` reads the 32-byte header and the index (two small reads),
validates them completely (spec/format.md, "Validation order"), and then
decodes tensors by name from a seekable file, or in file order from a
non-seekable stream as bytes arrive. Every blob's CRC-32 is verified
before its bytes reach a decoder. Errors name the file, the tensor and
the blob.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from .errors import ChecksumError, FormatError, JwtError
from .format import HEADER_SIZE, Attachment, Index, TensorEntry, check_index_crc, crc32, parse_index, unpack_header
from .limits import DEFAULT_LIMITS, Limits
from .tensorcodec import decode_tensor

__all__ = ["Reader"]


class Reader:
    """A validated .jwt file: its index, and its tensors as numpy arrays.

    ``source`` is a path, a binary file object (seekable or not) or bytes.
    Arrays come back in storage form (:mod:`codec.dtypes`).
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO | bytes, *, limits: Limits = DEFAULT_LIMITS,
                 name: str | None = None):
        self.limits = limits
        self._owns = isinstance(source, (str, os.PathLike))
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        self.name = name or (str(source) if self._owns else getattr(source, "name", "<stream>"))
        self._file: BinaryIO = open(source, "rb") if self._owns else source  # type: ignore[arg-type]
        self._lock = threading.Lock()
        try:
            with self._context():
                self.seekable = self._is_seekable()
                self._pos = 0
                header = self._read_exact(HEADER_SIZE, "header")
                minor, index_length = unpack_header(header, limits)
                index_bytes = self._read_exact(index_length, "index")
                check_index_crc(header, index_bytes)
                self.index: Index = parse_index(index_bytes, minor, limits)
                self.data_start = HEADER_SIZE + index_length
                self.size = self.data_start + self.index.data_length
                if self.seekable:
                    self._check_size()
        except BaseException:
            self.close()
            raise
        self.entries: dict[str, TensorEntry] = {e.name: e for e in self.index.entries}
        #: Names of stored tensors that some alias refers to.
        self.aliased: set[str] = {e.alias for e in self.index.entries if e.alias is not None}
        #: Non-tensor files carried in the container, by name, in file order.
        self.attachments: dict[str, Attachment] = {a.name: a for a in self.index.attachments}

    # -- plumbing ---------------------------------------------------------

    @contextlib.contextmanager
    def _context(self, tensor: str | None = None) -> Iterator[None]:
        """Prefix jwt errors raised inside with the file (and tensor) name."""
        try:
            yield
        except JwtError as exc:
            where = f"{self.name}: " + (f"tensor {tensor!r}: " if tensor is not None else "")
            raise type(exc)(where + str(exc)) from None

    def _is_seekable(self) -> bool:
        try:
            return bool(self._file.seekable()) and self._file.tell() == 0
        except (AttributeError, OSError, ValueError):
            return False

    def _check_size(self) -> None:
        actual = self._file.seek(0, os.SEEK_END)
        if actual < self.size:
            raise FormatError(f"truncated: {actual} bytes, the index accounts for {self.size}")
        if actual > self.size:
            raise FormatError(f"{actual - self.size} trailing bytes after the last blob (file is {actual}, index accounts for {self.size})")

    def _read_exact(self, n: int, what: str) -> bytes:
        """Read the next ``n`` bytes of a sequential read."""
        chunks, remaining = [], n
        while remaining:
            chunk = self._file.read(min(remaining, 1 << 24))
            if not chunk:
                raise FormatError(f"truncated in the {what}: needed {n} bytes at offset {self._pos}, got {n - remaining}")
            chunks.append(chunk)
            remaining -= len(chunk)
        self._pos += n
        return b"".join(chunks)

    def _read_blob(self, entry: TensorEntry | Attachment, k: int) -> bytes:
        ref = entry.blobs[k]
        start = self.data_start + ref.offset
        if self.seekable:
            if hasattr(self._file, "fileno") and self._owns:
                data = os.pread(self._file.fileno(), ref.length, start)
            else:
                with self._lock:
                    self._file.seek(start)
                    data = self._file.read(ref.length)
            if len(data) != ref.length:
                raise FormatError(f"blob {k}: truncated, {len(data)} of {ref.length} bytes at offset {start}")
        else:
            if start != self._pos:
                raise FormatError(f"stream is not seekable: blob at offset {start} requested at offset {self._pos}; read tensors in file order")
            data = self._read_exact(ref.length, f"blob {k}")
        computed = crc32(data)
        if computed != ref.crc32:
            raise ChecksumError(f"blob {k}: stored crc32 0x{ref.crc32:08x}, computed 0x{computed:08x}")
        return data

    # -- public API -------------------------------------------------------

    @property
    def metadata(self) -> dict[str, str]:
        """The free-form string metadata stored with the file."""
        return self.index.metadata

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def entry(self, name: str) -> TensorEntry:
        """The index entry of ``name``; KeyError naming the file if absent."""
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"{self.name}: no tensor named {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """Decode one tensor by name (aliases decode their target)."""
        entry = self.entry(name)
        if entry.alias is not None:
            entry = self.entries[entry.alias]
        with self._context(entry.name):
            blobs = [self._read_blob(entry, k) for k in range(len(entry.blobs))]
            return decode_tensor(entry, blobs)

    def iter_arrays(self) -> Iterator[tuple[TensorEntry, np.ndarray | None]]:
        """Decode every tensor in file order; works on non-seekable streams.

        An alias yields its entry with ``None``: the caller already has the
        target's array (its name is ``entry.alias``, listed in ``aliased``).
        """
        for entry in self.index.entries:
            yield entry, (None if entry.alias is not None else self.read(entry.name))
        if not self.seekable and not self.attachments:
            self._check_stream_end()

    def _check_stream_end(self) -> None:
        with self._context():
            if self._file.read(1):
                raise FormatError(f"trailing bytes after the last blob at offset {self._pos}")

    def read_attachment(self, name: str) -> bytes:
        """The bytes of the attachment ``name`` (CRC and size checked)."""
        att = self.attachments.get(name)
        if att is None:
            raise KeyError(f"{self.name}: no attachment named {name!r}")
        try:
            with self._context():
                data = self._read_blob(att, 0)
                return att.codec.decode(data, (att.size,), np.dtype(np.uint8)).tobytes()
        except JwtError as exc:  # name the attachment, not a tensor
            raise type(exc)(str(exc).replace(f"{self.name}: ", f"{self.name}: attachment {name!r}: ", 1)) from None

    def iter_attachments(self) -> Iterator[tuple[Attachment, bytes]]:
        """Every attachment with its bytes, in file order (after the tensors on a stream)."""
        for att in self.index.attachments:
            yield att, self.read_attachment(att.name)
        if not self.seekable and self.attachments:
            self._check_stream_end()

    def close(self) -> None:
        """Close the file if this reader opened it."""
        if self._owns and hasattr(self, "_file"):
            self._file.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
