"""Reading a .jwt container: validate first, then decode on demand.

A :class:`Reader` reads the 32-byte header and the index (two small reads),
validates them completely (spec/format.md, "Validation order"), and then
decodes tensors by name from a seekable file or an HTTP(S) URL (one Range
request a tensor, :mod:`codec.sources.http`), or in file order from a non-seekable
stream as bytes arrive. Every blob's CRC-32 is verified before its bytes
reach a decoder. Errors name the file, the tensor and the blob.

Decoding runs on a pool of ``jobs`` worker threads (:mod:`codec.parallel`):
the blobs of a tensor are decoded in parallel, each straight into the
output array, and :meth:`Reader.iter_arrays` reads tensor ``k+1`` (from the
disk, the pipe or the network) while tensor ``k`` is being decoded, with a
bounded number of decoded bytes waiting to be handed out.

The reader reaches its bytes through a *source* (:mod:`codec.sources`:
a file, a file object, a stream or an HTTP(S) URL).

An update (format 1.1, :mod:`codec.update`) decodes against a ``base``:
the reader checks the base when it opens the file, before anything is
decoded, then adds each entry's decoded difference to its base tensor.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any

import numpy as np

from .errors import BaseError, ChecksumError, FormatError, JwtError
from .format import (HEADER_SIZE, Attachment, Index, TensorEntry, check_index_crc, crc32, parse_index, unpack_header,
                     unpack_index)
from .limits import DEFAULT_LIMITS, Limits
from .parallel import AHEAD_BYTES, INLINE, Pending, make_executor, resolve_jobs
from .sources import open_source
from .tensorcodec import decode_tensor, start_decode
from .update import Base, add_difference, check_base

__all__ = ["Reader"]


class Reader:
    """A validated .jwt file: its index, and its tensors as numpy arrays.

    ``source`` is a path, an ``http://`` or ``https://`` URL, a binary file
    object (seekable or not), bytes, or a source object (module docstring).
    Arrays come back in storage form (:mod:`codec.dtypes`). ``jobs`` worker
    threads decode (None: one per core; 1: none). ``timeout`` is the HTTP
    timeout in seconds (None: :data:`codec.sources.http.DEFAULT_TIMEOUT`).

    ``base`` (a :class:`codec.update.Base`) is the model an update file is
    decoded against; it is checked on opening (BaseError naming the first
    tensor that differs). An update opened without a base can be inspected,
    but decoding one of its tensors raises BaseError.
    """

    def __init__(self, source: Any, *, limits: Limits = DEFAULT_LIMITS, name: str | None = None,
                 jobs: int | None = None, timeout: float | None = None, base: Base | None = None):
        self.limits = limits
        self.jobs = resolve_jobs(jobs)
        self._executor: Executor | None = None
        has_interface = hasattr(source, "random_access") and hasattr(source, "close")
        self._source = source if has_interface else open_source(source, timeout)
        self._owns = not has_interface
        self.name = name or self._source.name
        try:
            with self._context():
                self.seekable = bool(self._source.random_access)
                self._pos = 0
                header = self._read_exact(HEADER_SIZE, "header")
                minor, flags, index_length = unpack_header(header, limits)
                index_bytes = self._read_exact(index_length, "index")
                check_index_crc(header, index_bytes)
                self.index: Index = parse_index(unpack_index(index_bytes, flags, limits), minor, limits, flags)
                self.data_start = HEADER_SIZE + index_length
                self.size = self.data_start + self.index.data_length
                if self.seekable:
                    self._check_size()
            if base is not None and not isinstance(base, Base):
                raise TypeError(f"base must be a codec.update.Base, not {type(base).__name__}")
            self.base = base
            if base is not None:
                check_base(self.index, base, self.name)
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

    def _check_size(self) -> None:
        actual = self._source.size
        if actual is None:
            return
        if actual < self.size:
            raise FormatError(f"truncated: {actual} bytes, the index accounts for {self.size}")
        if actual > self.size:
            raise FormatError(f"{actual - self.size} trailing bytes after the last blob (file is {actual}, index accounts for {self.size})")

    def _read_exact(self, n: int, what: str, stream: Any = None) -> bytes:
        """Read the next ``n`` bytes of a sequential read (from ``stream``, else the source)."""
        if stream is None and self.seekable:
            data = self._source.read_at(self._pos, n)
            if len(data) != n:
                raise FormatError(f"truncated in the {what}: needed {n} bytes at offset {self._pos}, got {len(data)}")
            self._pos += n
            return data
        reader = stream if stream is not None else self._source
        chunks, remaining = [], n
        while remaining:
            chunk = reader.read(min(remaining, 1 << 24))
            if not chunk:
                raise FormatError(f"truncated in the {what}: needed {n} bytes at offset {self._pos}, got {n - remaining}")
            chunks.append(chunk)
            remaining -= len(chunk)
        self._pos += n
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_blob(self, entry: TensorEntry | Attachment, k: int) -> bytes:
        return self._read_blobs(entry, k, k + 1)[0]

    def _read_blobs(self, entry: TensorEntry | Attachment, first: int = 0, stop: int | None = None,
                    stream: Any = None) -> list[bytes | memoryview]:
        """Blobs ``first..stop-1`` of ``entry`` in one read, each CRC-checked (bytes-like: bytes or memoryview)."""
        refs = entry.blobs[first:stop]
        if not refs:
            return []
        start, total = self.data_start + refs[0].offset, sum(r.length for r in refs)
        if self.seekable and stream is None:
            data = self._source.read_at(start, total)
            if len(data) != total:
                raise FormatError(f"blob {first}: truncated, {len(data)} of {total} bytes at offset {start}")
        else:
            if start != self._pos:
                why = getattr(self._source, "not_seekable_reason", "stream is not seekable")
                raise FormatError(f"{why}: blob at offset {start} requested at offset {self._pos}; "
                                  "read tensors in file order")
            data = self._read_exact(total, f"blob {first}", stream)
        blobs, pos = [], 0
        view = memoryview(data) if len(refs) > 1 else data  # slices of one read, not copies
        for k, ref in enumerate(refs, first):
            blob = view[pos : pos + ref.length]
            pos += ref.length
            computed = crc32(blob)
            if computed != ref.crc32:
                raise ChecksumError(f"blob {k}: stored crc32 0x{ref.crc32:08x}, computed 0x{computed:08x}")
            blobs.append(blob)
        return blobs

    def _pool(self) -> Executor:
        """The decoding threads, started on first use."""
        if self._executor is None:
            self._executor = make_executor(self.jobs)
        return self._executor

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
            self._need_base(entry)
            diff = None if entry.unchanged else decode_tensor(entry, self._read_blobs(entry), executor=self._pool())
            return self._on_base(entry, diff)

    @property
    def is_update(self) -> bool:
        """True for an update file (format 1.1), decoded against a base."""
        return self.index.base is not None

    def _need_base(self, entry: TensorEntry) -> None:
        if entry.base is not None and self.base is None:
            raise BaseError(f"is coded from base tensor {entry.base.name!r}: this file is an update and decoding "
                            f"needs its base (sha256:{self.index.base.sha256})")

    def _on_base(self, entry: TensorEntry, diff: np.ndarray | None) -> np.ndarray | None:
        """An entry's value from its decoded blobs: the blobs' array, or the base tensor plus the difference."""
        if entry.base is None:
            return diff
        base = self.base.array(entry.base.name)
        return base.copy() if diff is None else add_difference(base, diff, entry.dtype)

    def iter_arrays(self) -> Iterator[tuple[TensorEntry, np.ndarray | None]]:
        """Decode every tensor in file order; works on non-seekable streams.

        With worker threads, a reading thread runs ahead of the decoding:
        while tensor ``k`` is decoded (and handed out as soon as it is
        ready), tensor ``k+1`` is read from the disk, the pipe or the
        network, at most ``2 * jobs`` tensors and, beyond the newest one,
        :data:`codec.parallel.AHEAD_BYTES` decoded bytes ahead of the
        consumer. On an HTTP source the data section comes in one streamed
        response instead of a request per tensor.

        An alias yields its entry with ``None``: the caller already has the
        target's array (its name is ``entry.alias``, listed in ``aliased``).
        """
        executor = self._pool()
        stream = None
        if self.seekable and getattr(self._source, "sequential_hint", False) and self.index.entries:
            stream = self._source.stream_from(self.data_start)
            self._pos = self.data_start
        try:
            if executor is INLINE:
                for entry in self.index.entries:
                    array = None
                    if entry.alias is None:
                        with self._context(entry.name):
                            self._need_base(entry)
                            if not entry.unchanged:
                                array = decode_tensor(entry, self._read_blobs(entry, stream=stream))
                            array = self._on_base(entry, array)
                    yield entry, array
            else:
                yield from self._iter_ahead(executor, stream)
        finally:
            if stream is not None:
                stream.close()
        if not self.seekable and not self.attachments:
            self._check_stream_end()

    def _iter_ahead(self, executor: Executor, stream: Any) -> Iterator[tuple[TensorEntry, np.ndarray | None]]:
        """:meth:`iter_arrays` with a reading thread that submits each tensor's decoding as its bytes arrive."""
        window = 2 * self.jobs
        cond = threading.Condition()
        ready: deque[tuple[TensorEntry | None, Pending | None, BaseException | None]] = deque()
        state = {"held": 0, "ahead": 0, "stop": False}

        def produce() -> None:
            for entry in self.index.entries:
                with cond:
                    cond.wait_for(lambda: state["stop"] or (state["held"] < window and (
                        state["held"] == 0 or state["ahead"] <= AHEAD_BYTES)))
                    if state["stop"]:
                        return
                job = None
                try:
                    if entry.alias is None:
                        with self._context(entry.name):
                            self._need_base(entry)
                            if not entry.unchanged:
                                job = start_decode(entry, self._read_blobs(entry, stream=stream), executor)
                except BaseException as exc:  # handed to the consumer, in file order
                    with cond:
                        ready.append((entry, None, exc))
                        cond.notify_all()
                    return
                with cond:
                    state["held"] += 1
                    state["ahead"] += 0 if job is None else entry.nbytes
                    ready.append((entry, job, None))
                    cond.notify_all()
            with cond:
                ready.append((None, None, None))
                cond.notify_all()

        reader = threading.Thread(target=produce, name="jwt-read", daemon=True)
        reader.start()
        try:
            while True:
                with cond:
                    cond.wait_for(lambda: ready)
                    entry, job, error = ready.popleft()
                if error is not None:
                    raise error
                if entry is None:
                    break
                array = self._finish(entry, job)
                with cond:
                    state["held"] -= 1
                    state["ahead"] -= 0 if job is None else entry.nbytes
                    cond.notify_all()
                yield entry, array
        finally:
            with cond:
                state["stop"] = True
                cond.notify_all()
                for _, job, _ in ready:
                    if job is not None:
                        job.cancel()
            # A local file's reading thread stops within one read; one blocked on a
            # pipe or the network stops after its read and is not waited for.
            if stream is None and self.seekable:
                reader.join()

    def _finish(self, entry: TensorEntry, job: Pending | None) -> np.ndarray | None:
        """Wait for one tensor of :meth:`iter_arrays` (None for an alias), naming it in errors."""
        if entry.alias is not None:
            return None
        with self._context(entry.name):
            return self._on_base(entry, None if job is None else job.result())

    def _check_stream_end(self) -> None:
        with self._context():
            if self._source.read(1):
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
        """Stop the decoding threads; close the file or connection if this reader opened it."""
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is not None and executor is not INLINE:
            executor.shutdown(wait=True, cancel_futures=True)
        if getattr(self, "_owns", False):
            self._source.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
