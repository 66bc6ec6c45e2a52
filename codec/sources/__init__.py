"""Where a reader's bytes come from: one room for every byte source.

A *source* has a small interface: ``name``, ``size`` (total bytes, ``None``
if unknown), ``random_access``, ``read_at(offset, length)`` (random-access
sources, thread-safe), ``read(n)`` (sequential sources) and ``close()``; a
random-access source may also offer ``stream_from(offset)`` (an object with
``read(n)`` and ``close()``) and set ``sequential_hint`` when reading the
whole data section in one go is much cheaper than a request per tensor
(HTTP). :func:`open_source` picks the source for a path, URL, bytes or file
object; the container parsing (:mod:`codec.reader`) knows nothing else.

- :mod:`codec.sources.local`: files (``os.pread``), seekable file objects,
  non-seekable streams (pipes, stdin, sockets);
- :mod:`codec.sources.http`: HTTP(S) with Range requests.
"""

from __future__ import annotations

import io
import os
from typing import Any

from .http import HttpSource, RemoteError, is_url
from .local import FileObjectSource, FileSource, StreamSource

__all__ = ["FileObjectSource", "FileSource", "HttpSource", "RemoteError", "StreamSource", "is_url", "open_source"]


def open_source(source: Any, timeout: float | None = None) -> Any:
    """The source object for a path, URL, bytes or binary file object (see the module docstring)."""
    if is_url(source):
        return HttpSource(source, timeout=timeout)
    if isinstance(source, (str, os.PathLike)):
        return FileSource(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return FileObjectSource(io.BytesIO(bytes(source)), "<bytes>")
    if not callable(getattr(source, "read", None)):
        raise TypeError(f"a .jwt source is a path, an http(s):// URL, bytes or a binary file object open for "
                        f"reading, not {type(source).__name__}")
    name = str(getattr(source, "name", "<stream>"))
    try:
        seekable = bool(source.seekable()) and source.tell() == 0
    except (AttributeError, OSError, ValueError):
        seekable = False
    return FileObjectSource(source, name) if seekable else StreamSource(source, name)
