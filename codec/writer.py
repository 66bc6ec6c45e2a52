"""Writing a .jwt container, one tensor at a time, atomically.

Blobs are spooled to an anonymous temporary file while tensors are added,
so memory holds one tensor's blobs at a time; :meth:`Writer.close` then
writes header and index, copies the spool behind them, and renames the
temporary output onto the destination. A failure or interruption leaves
the destination untouched and removes the temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .blobcodecs import Zstd
from .dtypes import DType
from .errors import EncodeError
from .format import (Attachment, BaseId, BaseRef, BlobRef, Index, TensorEntry, attachment_name_error, crc32,
                     pack_header, pack_index)
from .limits import DEFAULT_LIMITS
from .tensorcodec import Encoded

__all__ = ["Writer", "atomic_output", "output_error", "temporary_file", "encode_attachment"]


def _text_error(value: object) -> str | None:
    """Why ``value`` cannot be a name or metadata string that readers accept, or None."""
    if not isinstance(value, str):
        return f"must be a string, found {type(value).__name__}"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "holds a lone UTF-16 surrogate (not Unicode text)"
    if size > DEFAULT_LIMITS.max_name_bytes:
        return f"is {size} UTF-8 bytes, over the {DEFAULT_LIMITS.max_name_bytes} readers accept"
    return None


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_error(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """``exc`` (raised on a temporary file beside ``path``) restated for ``path``, the output the user asked for."""
    folder = Path(path).absolute().parent
    if isinstance(exc, FileNotFoundError) and not folder.is_dir():
        reason = f"the folder {Path(path).parent} does not exist"
    elif isinstance(exc, IsADirectoryError) or os.path.isdir(path):
        reason = "it is a folder"
    else:
        reason = exc.strerror or str(exc)
    return type(exc)(exc.errno, f"cannot write here ({reason})", os.fspath(path))


def temporary_file(path: str | os.PathLike[str]) -> BinaryIO:
    """An anonymous temporary file in the folder of the output ``path`` (errors name ``path``)."""
    try:
        return tempfile.TemporaryFile(dir=Path(path).absolute().parent)
    except OSError as exc:
        raise output_error(exc, path) from None


class atomic_output:
    """Context manager: a temp file beside ``path``, renamed onto it on success.

    Errors creating or renaming the temporary file name ``path``, never the temporary name.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __enter__(self) -> BinaryIO:
        if self.path.is_dir():
            raise IsADirectoryError(21, "cannot write here (it is a folder)", str(self.path))
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                            dir=self.path.absolute().parent)
        except OSError as exc:
            raise output_error(exc, self.path) from None
        os.chmod(self.tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would stay on the output
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                try:
                    os.replace(self.tmp, self.path)
                except OSError as error:
                    raise output_error(error, self.path) from None
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


#: Bytes :func:`_copy_file` copies between two kicks of the disk writeback (:class:`_Writeback`).
COPY_CHUNK = 64 << 20


class _Writeback:
    """Writes a file's dirty pages to disk behind the process that fills it: every :data:`COPY_CHUNK` bytes
    copied (:meth:`advance`, counted over every copy into the file, part files and spools alike) ask for one
    ``fdatasync`` on a thread (several asks while one runs make one more), so the disk writes the copied part
    while the rest is copied, and the output's final ``fsync`` (:class:`atomic_output`) finds little left. On the
    4 GB bench.big checkpoint (1.78 GB coded) the final copy and fsync were the serial end of every encode, Ray
    or local (bench/JOURNAL.md, sixteenth pass). Errors are left to that final ``fsync`` to report."""

    def __init__(self, fd: int):
        self._fd = fd
        self._cond = threading.Condition()
        self._wanted = self._stopped = False
        self._copied = 0  # bytes copied since the last ask
        self._thread = threading.Thread(target=self._run, name="jwt-writeback", daemon=True)
        self._thread.start()

    def advance(self, n: int) -> None:
        """``n`` more bytes were copied into the file."""
        self._copied += n
        if self._copied >= COPY_CHUNK:
            self._copied = 0
            self.kick()

    def kick(self) -> None:
        with self._cond:
            self._wanted = True
            self._cond.notify()

    def _run(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)
        while True:
            with self._cond:
                while not (self._wanted or self._stopped):
                    self._cond.wait()
                if not self._wanted:
                    return
                self._wanted = False
            try:
                sync(self._fd)
            except OSError:  # the final fsync says it
                return

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()


def _copy_file(src: BinaryIO, out: BinaryIO, writeback: _Writeback | None = None) -> None:
    """Copy ``src`` (a real file) from its position to its end onto ``out`` (:func:`_copy_range`)."""
    start = src.tell()
    _copy_range(src, start, os.fstat(src.fileno()).st_size - start, out, writeback)


def _copy_range(src: BinaryIO, start: int, length: int, out: BinaryIO, writeback: _Writeback | None) -> None:
    """Copy ``length`` bytes from ``start`` in ``src`` (a real file) onto ``out`` at its position: in the kernel
    (``os.copy_file_range``) when ``out`` is a real file too, which spares the process reading and writing every
    coded byte again (0.4 of the 2.1 CPU s of a Ray coordinator on 1.2 GB, bench/JOURNAL.md), else (BytesIO, a
    file opened for appending) through a 1 MiB buffer. ``writeback``: told of every byte copied in the kernel."""
    src.seek(start)
    src_fd = src.fileno()
    try:
        out_fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        out_fd = None
    pos, end = start, start + length
    if out_fd is not None and hasattr(os, "copy_file_range"):
        out.flush()
        try:
            while pos < end:
                n = os.copy_file_range(src_fd, out_fd, min(end - pos, COPY_CHUNK), pos)
                if not n:
                    break
                pos += n
                if writeback is not None:
                    writeback.advance(n)
        except OSError:
            if pos != start:
                raise
        if pos != start:
            out.seek(0, os.SEEK_END)  # the buffered object learns where the kernel left the file
            src.seek(pos)
    while pos < end:
        data = src.read(min(end - pos, 1 << 20))
        if not data:
            raise EncodeError(f"a part file of the output is {pos} bytes, not {end}: {getattr(src, 'name', src)}")
        out.write(data)
        pos += len(data)


def _remove_folder(folder: str) -> None:
    """Remove a parts folder; again if a worker still running created a file in it meanwhile (then it fails to
    write, its folder being gone)."""
    for _ in range(3):
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.exists(folder):
            return


def encode_attachment(name: str, data: bytes | str | os.PathLike[str]) -> tuple[Attachment, bytes]:
    """Compress one attachment (``data``: its bytes or a path to read); its blob ref is left empty."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        with open(data, "rb") as f:
            data = f.read()
    # Level 19 for the small text files models carry; 9 keeps large ones fast.
    codec = Zstd(level=19 if len(data) <= 16 << 20 else 9, shuffle=False)
    blob = codec.encode(np.frombuffer(data, np.uint8))
    return Attachment(name, len(data), codec), blob


class Writer:
    """Collects tensors and writes a .jwt file when closed.

    ``dest`` is a path (written atomically) or a binary file object (written
    in order, e.g. stdout). Use as a context manager; an exception inside
    the block discards everything. With ``base`` the file is an update
    (format 1.1, spec section 12): entries may then be coded from base
    tensors (``add(..., base=)``, :meth:`add_unchanged`); without it the
    file is a 1.0 file, byte for byte as before updates existed.
    ``compress_index``: store the index zstd-compressed (format 1.3) or not;
    None (the default) compresses it where that saves at least 1 % of the
    file (:func:`codec.format.pack_index`).
    """

    def __init__(self, dest: str | os.PathLike[str] | BinaryIO, metadata: dict[str, str] | None = None,
                 encoder: dict[str, str] | None = None, base: BaseId | None = None,
                 compress_index: bool | None = None):
        for what, strings in (("metadata", metadata), ("encoder", encoder)):
            for key, value in (strings or {}).items():
                for part, text in (("key", key), ("value", value)):
                    problem = _text_error(text)
                    if problem:
                        raise EncodeError(f"{what} {part} {text!r:.60}: {problem}")
        self.dest = dest
        self.compress_index = compress_index
        self.index = Index([], dict(metadata or {}), dict(encoder or {}), base=base)
        self._entries: dict[str, TensorEntry] = {}
        self._spool = self._new_spool()
        self._offset = 0
        #: The data section as runs ``(part file or None for the spool, offset there, length)``, once a tensor's
        #: blobs came in a part file (:meth:`parts_folder`); None while every blob is in the spool.
        self._runs: list[list] | None = None
        self._spool_offset = 0
        self._parts: str | None = None
        self.closed = False
        #: Attachment blobs go to their own spool: they follow every tensor blob.
        self._attach_spool: BinaryIO | None = None
        self._attach_offset = 0
        self._attach_names: set[str] = set()
        self._attach_folders: set[str] = set()

    def _new_spool(self) -> BinaryIO:
        """A temporary file for blobs: beside a path destination (errors name it), else in the temp folder."""
        if isinstance(self.dest, (str, os.PathLike)):
            return temporary_file(self.dest)
        return tempfile.TemporaryFile()

    def _check_name(self, name: str) -> None:
        problem = _text_error(name)
        if problem:
            raise EncodeError(f"tensor name {name!r:.60}: {problem}")
        if name in self._entries:
            raise EncodeError(f"tensor {name!r} is added twice")

    def _check_base_ref(self, name: str, dtype: DType, base: BaseRef | None) -> None:
        if base is not None and self.index.base is None:
            raise EncodeError(f"tensor {name!r}: coded from a base tensor, but the writer has no base (not an update)")
        problem = None if base is None else _text_error(base.name)
        if problem:
            raise EncodeError(f"tensor {name!r}: base tensor name {base.name!r:.60}: {problem}")

    def add(self, name: str, dtype: DType, shape: tuple[int, ...], encoded: Encoded,
            base: BaseRef | None = None) -> TensorEntry:
        """Append a coded tensor; its blobs go to the spool.

        With ``base`` (an update) the blobs hold the difference from that base
        tensor, which has this dtype and shape.
        """
        self._check_name(name)
        self._check_base_ref(name, dtype, base)
        if base is not None and not dtype.floating:
            raise EncodeError(f"tensor {name!r}: a difference needs a floating dtype, not {dtype.name}")
        refs = []
        if encoded.part is not None:  # already written, by a Ray worker, in a part file
            file, start, lengths = encoded.part
            if self._parts is None or os.path.dirname(file) != self._parts or encoded.crcs is None:
                raise EncodeError(f"tensor {name!r}: its blobs are not in this writer's parts folder")
            for length, crc in zip(lengths, encoded.crcs):
                refs.append(BlobRef(self._offset, length, crc))
                self._offset += length
            self._run(file, start, sum(lengths))
        for i, blob in enumerate(encoded.blobs):
            self._spool.write(blob)
            refs.append(BlobRef(self._offset, len(blob), crc32(blob) if encoded.crcs is None else encoded.crcs[i]))
            self._offset += len(blob)
            self._run(None, self._spool_offset, len(blob))
            self._spool_offset += len(blob)
        return self._append(TensorEntry(name, dtype, tuple(shape), encoded.codec, encoded.tiling, refs, base=base))

    def _run(self, file: str | None, start: int, length: int) -> None:
        """Note that the data section goes on with ``length`` bytes from ``start`` in ``file`` (None: the spool)."""
        if file is None and self._runs is None:  # all in the spool so far: its order is the data's
            return
        if self._runs is None:
            self._runs = [[None, 0, self._spool_offset]] if self._spool_offset else []
        last = self._runs[-1] if self._runs else None
        if last is not None and last[0] == file and last[1] + last[2] == start:
            last[2] += length
        elif length:
            self._runs.append([file, start, length])

    def parts_folder(self) -> str:
        """A new empty folder beside the output (for a file object: in the temporary folder) where Ray workers
        on this machine write coded blobs themselves, one part file each (:func:`codec.distributed.ray._code_file`),
        so that no coded byte passes through the coordinating process before :meth:`close` copies it into the
        output (in the kernel); the folder is removed when the writer closes or aborts."""
        if self._parts is None:
            where = (Path(self.dest).absolute().parent if isinstance(self.dest, (str, os.PathLike))
                     else Path(tempfile.gettempdir()))
            name = Path(self.dest).name if isinstance(self.dest, (str, os.PathLike)) else "jwt"
            try:
                self._parts = tempfile.mkdtemp(prefix=f".{name}.", suffix=".parts", dir=where)
            except OSError as exc:
                raise output_error(exc, self.dest if isinstance(self.dest, (str, os.PathLike)) else where) from None
        return self._parts

    def add_unchanged(self, name: str, dtype: DType, shape: tuple[int, ...], base: BaseRef) -> TensorEntry:
        """Append ``name`` as equal to base tensor ``base`` (same dtype and shape): no blobs, a few index bytes."""
        self._check_name(name)
        self._check_base_ref(name, dtype, base)
        return self._append(TensorEntry(name, dtype, tuple(shape), base=base))

    def add_alias(self, name: str, target: str) -> TensorEntry:
        """Append ``name`` as another name for the stored tensor ``target``."""
        self._check_name(name)
        stored = self._entries.get(target)
        if stored is None or stored.alias is not None:
            raise EncodeError(f"alias {name!r}: {target!r} is not a stored tensor")
        return self._append(TensorEntry(name, stored.dtype, stored.shape, alias=target))

    def add_attachment(self, name: str, data: bytes | str | os.PathLike[str],
                       encoded: tuple[Attachment, bytes] | None = None) -> Attachment:
        """Append a file carried losslessly (zstd): ``data`` is its bytes or a path to read.

        ``name`` must be a safe relative POSIX path (spec section 4.4); the
        attachment's blob is placed after every tensor blob whenever it is added.
        ``encoded``: what :func:`encode_attachment` gave for it already (the
        rate search sized it), so it is not compressed twice.
        """
        problem = _text_error(name) or attachment_name_error(name)
        if problem:
            raise EncodeError(f"attachment {name!r:.80}: name {problem}")
        parents = {name[:k] for k in range(len(name)) if name[k] == "/"}
        if name in self._attach_names:
            raise EncodeError(f"attachment {name!r} is added twice")
        if name in self._attach_folders or not parents.isdisjoint(self._attach_names):
            raise EncodeError(f"attachment {name!r} is both a file and a folder of the attachments")
        att, blob = encoded or encode_attachment(name, data)
        att = Attachment(att.name, att.size, att.codec)
        if self._attach_spool is None:
            self._attach_spool = self._new_spool()
        self._attach_spool.write(blob)
        att.blobs = [BlobRef(self._attach_offset, len(blob), crc32(blob))]
        self._attach_offset += len(blob)
        self._attach_names.add(name)
        self._attach_folders.update(parents)
        self.index.attachments.append(att)
        return att

    def _append(self, entry: TensorEntry) -> TensorEntry:
        self._entries[entry.name] = entry
        self.index.entries.append(entry)
        return entry

    def close(self) -> None:
        """Write header, index and data to the destination."""
        if self.closed:
            return
        self.closed = True
        for att in self.index.attachments:  # rebase: attachment blobs follow the tensor blobs
            att.blobs = [BlobRef(self._offset + b.offset, b.length, b.crc32) for b in att.blobs]
        index_bytes, minor, flags = pack_index(self.index, self.compress_index)
        head = pack_header(index_bytes, minor, flags) + index_bytes
        #: The bytes of the whole file (set by close), for a path or a file object alike.
        self.nbytes = len(head) + self._offset + self._attach_offset
        closing = None
        try:
            self._spool.seek(0)
            if isinstance(self.dest, (str, os.PathLike)):
                large = self.nbytes > COPY_CHUNK  # a small file has no writeback to overlap, no spool worth a thread
                with atomic_output(self.dest) as out:
                    writeback = _Writeback(out.fileno()) if large else None
                    try:
                        self._emit(out, head, writeback)
                    finally:
                        if writeback is not None:
                            writeback.close()
                    if large:  # the spools (as large as the file) are freed while the output's last pages go to disk
                        closing = threading.Thread(target=self._close_spools, name="jwt-spool-close")
                        closing.start()
            else:
                self._emit(self.dest, head)
        finally:
            if closing is not None:
                closing.join()
            self._close_spools()

    def _close_spools(self) -> None:
        self._spool.close()
        if self._attach_spool is not None:
            self._attach_spool.close()
        if self._parts is not None:
            _remove_folder(self._parts)

    def _emit(self, out: BinaryIO, head: bytes, writeback: _Writeback | None = None) -> None:
        out.write(head)
        if self._runs is None:
            _copy_file(self._spool, out, writeback)
        else:
            self._spool.flush()
            files: dict[str, BinaryIO] = {}
            try:
                for file, start, length in self._runs:
                    if file is None:
                        src = self._spool
                    elif file not in files:
                        try:
                            src = files[file] = open(file, "rb")
                        except OSError as exc:
                            raise EncodeError(f"a part file of the output is gone ({exc.strerror}): {file}") from None
                    else:
                        src = files[file]
                    _copy_range(src, start, length, out, writeback)
            finally:
                for f in files.values():
                    f.close()
        if self._attach_spool is not None:
            self._attach_spool.seek(0)
            _copy_file(self._attach_spool, out, writeback)

    def abort(self) -> None:
        """Discard everything; the destination is not touched."""
        self.closed = True
        self._close_spools()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
