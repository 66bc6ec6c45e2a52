"""Local byte sources: a file path, a seekable file object, a non-seekable stream."""

from __future__ import annotations

import os
import threading
from typing import BinaryIO

__all__ = ["FileObjectSource", "FileSource", "StreamSource"]


class FileSource:
    """A local file, read with ``os.pread``: random access without a shared file position."""

    random_access = True
    sequential_hint = False

    def __init__(self, path: str | os.PathLike[str]):
        self.name = str(path)
        self._file = open(path, "rb")
        self.size: int | None = os.fstat(self._file.fileno()).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the file)."""
        chunks, fd = [], self._file.fileno()
        while length > 0:
            chunk = os.pread(fd, min(length, 1 << 30), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class FileObjectSource:
    """A seekable binary file object positioned at its start; a lock keeps seek-and-read atomic."""

    random_access = True
    sequential_hint = False

    def __init__(self, file: BinaryIO, name: str):
        self.name = name
        self._file = file
        self._lock = threading.Lock()
        self.size: int | None = file.seek(0, os.SEEK_END)

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the file)."""
        with self._lock:
            self._file.seek(offset)
            chunks = []
            while length > 0:
                chunk = self._file.read(length)
                if not chunk:
                    break
                chunks.append(chunk)
                length -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Nothing to do: the caller owns the file object."""


class StreamSource:
    """A non-seekable binary stream (a pipe, stdin, a socket), read front to back."""

    random_access = False
    sequential_hint = False
    size: int | None = None

    def __init__(self, file: BinaryIO, name: str):
        self.name = name
        self._file = file

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; empty at the end of the stream."""
        return self._file.read(n)

    def close(self) -> None:
        """Nothing to do: the caller owns the stream."""
