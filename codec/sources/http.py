"""Reading a .jwt over HTTP(S) with Range requests (standard library only).

:class:`HttpSource` is a reader source (see :mod:`codec.sources`): its first
request asks for the first :data:`PREFETCH` bytes, which hold the header
and, for most files, the whole index, so ``codec.open(url)`` costs one
round trip; ``get(name)`` then costs one Range request for that tensor's
blobs; ``codec.load(url)`` streams the data section in one response while
the decoding threads work on the tensors already received.

A server that ignores ``Range`` answers the first request with the whole
file (status 200): the source then reads that response front to back,
skipping what it is not asked for, so everything decodes in file order
(``codec.load``, ``jwt decode``) from that one response; asking for bytes
behind the position starts the download again (a new GET) and skips
forward, so ``get(name)`` works in any order (each step back costs a
download up to that tensor). The ``Content-Length`` of the answer is the
file size, so a truncated file is refused when opened, as a local one is.
When the server sends a strong ``ETag``, later requests carry it in
``If-Range``, so a file replaced on the server mid-read is an error, never
a mix of two files (the CRCs would catch most mixes anyway).

Network failures raise :class:`RemoteError` (an ``OSError``) naming the
URL; ``timeout`` bounds every connection attempt and every wait for more
bytes.
"""

from __future__ import annotations

import re
import socket
import threading
from typing import Any

__all__ = ["DEFAULT_TIMEOUT", "PREFETCH", "HttpSource", "RemoteError", "is_url"]

#: Seconds to wait for a connection or for more bytes.
DEFAULT_TIMEOUT = 30.0
#: Bytes asked for by the first request: the header and, usually, the index.
PREFETCH = 1 << 16
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")


class RemoteError(OSError):
    """An HTTP or network failure while reading a URL (the message names the URL)."""


def is_url(source: Any) -> bool:
    """True for ``http://`` and ``https://`` strings."""
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


class HttpSource:
    """A .jwt file behind an HTTP(S) URL, read with Range requests."""

    sequential_hint = True
    random_access = True

    def __init__(self, url: str, *, timeout: float | None = None, prefetch: int = PREFETCH,
                 headers: dict[str, str] | None = None):
        self.url = self.name = url
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self._headers = dict(headers or {})
        self._etag: str | None = None
        self._head = b""
        #: Without Range support: the open 200 response, the offset of its next byte, and a lock (read_at is
        #: called from several threads).
        self.ranges = True
        self._stream: _Body | None = None
        self._stream_pos = 0
        self._lock = threading.Lock()
        self._length: str | None = None
        self.size: int | None = None
        response = self._request(0, max(prefetch, 32) - 1)
        if response is None:  # 416: the file is empty
            self.size = 0
            return
        if response.status == 206:
            first, last, total = self._content_range(response)
            if first != 0 or total is None:
                response.close()
                raise RemoteError(f"{url}: the server answered bytes {first}-{last}/{total} to a request from 0")
            self.size = total
            self._head = self._read_body(response, last + 1)
            etag = response.headers.get("ETag")
            self._etag = etag if etag and not etag.startswith("W/") else None
        else:  # 200: the whole file follows; read it front to back
            self.ranges = False
            self._length = response.headers.get("Content-Length")
            self.size = int(self._length) if self._length and self._length.isdigit() else None
            etag = response.headers.get("ETag")
            self._etag = etag if etag and not etag.startswith("W/") else None
            self._stream = _Body(response, url, self.timeout)

    # -- requests ---------------------------------------------------------

    def _request(self, first: int, last: int | None) -> Any:
        """Send a GET for bytes ``first..last`` (to the end if None); the open response (None: 416 from 0)."""
        import urllib.error  # here: urllib.request and its ssl/certifi cost every jwt run start-up, URL or not
        import urllib.request

        request = urllib.request.Request(self.url, headers={
            **self._headers, "Range": f"bytes={first}-{'' if last is None else last}", "Accept-Encoding": "identity"})
        if self._etag:
            request.add_header("If-Range", self._etag)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and first == 0:
                return None
            raise RemoteError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise RemoteError(f"{self.url}: no answer within {self.timeout:g} s") from None
            raise RemoteError(f"{self.url}: {reason}") from None
        except TimeoutError:
            raise RemoteError(f"{self.url}: no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise RemoteError(f"{self.url}: {exc}") from None

    def _ranged(self, first: int, last: int | None) -> Any:
        """The open 206 response for bytes ``first..last`` (to the end if None), checked against the file size."""
        wanted = f"{first}-{'' if last is None else last}"
        response = self._request(first, last)
        if response is None or response.status != 206:
            if response is not None:
                response.close()
            raise RemoteError(f"{self.url}: the server answered a Range request for bytes {wanted} with the whole "
                              "file (it ignores ranges, or the file changed)")
        got_first, got_last, total = self._content_range(response)
        if got_first != first or (last is not None and got_last != last) or total != self.size:
            response.close()
            raise RemoteError(f"{self.url}: asked for bytes {wanted}/{self.size}, "
                              f"got {got_first}-{got_last}/{total} (the file changed?)")
        return response

    def _content_range(self, response: Any) -> tuple[int, int, int | None]:
        value = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.match(value.strip())
        if not match:
            response.close()
            raise RemoteError(f"{self.url}: bad Content-Range {value[:80]!r} in a 206 response")
        first, last, total = match.groups()
        return int(first), int(last), None if total == "*" else int(total)

    def _read_body(self, response: Any, n: int) -> bytes:
        """Exactly ``n`` bytes of a response body, then close it."""
        try:
            with response:
                data = _read_exactly(response, n, self.url, self.timeout)
        except TimeoutError:
            raise RemoteError(f"{self.url}: no data for {self.timeout:g} s") from None
        return data

    # -- the reader-source interface --------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the file): from the prefetched start, else one
        Range request."""
        end = offset + length if self.size is None else min(offset + length, self.size)
        if end <= offset:
            return b""
        length = end - offset
        if end <= len(self._head):
            return self._head[offset:end]
        if not self.ranges:
            return self._read_from(offset, length, read=_read_upto)
        return self._read_body(self._ranged(offset, end - 1), length)

    def stream_from(self, offset: int) -> _Body | _Shared:
        """The bytes from ``offset`` to the end, as one streamed response (without Range support: a view of
        the open whole-file response, so what follows, e.g. the attachments, is read on from it)."""
        if not self.ranges:
            return _Shared(self, offset)
        return _Body(self._ranged(offset, None), self.url, self.timeout)

    def _read_from(self, offset: int, n: int, read: Any = None) -> bytes:
        """Without Range support: up to ``n`` bytes at ``offset`` from the whole-file response, by one
        ``stream.read(n)`` or by ``read(stream, n)`` (e.g. :func:`_read_upto`: all ``n`` unless the file ends)."""
        with self._lock:
            stream = self._stream = self._whole_from(offset)
            try:
                data = stream.read(n) if read is None else read(stream, n)
            except BaseException:
                stream.close()
                self._stream = None
                raise
            self._stream_pos = offset + len(data)
            return data

    def _whole_from(self, offset: int) -> _Body:
        """Without Range support: the whole-file response positioned at ``offset``: the open one if it has
        not passed ``offset``, else a new GET; the bytes before ``offset`` are read and dropped."""
        stream, pos = self._stream, self._stream_pos
        if stream is None or pos > offset:
            if stream is not None:
                stream.close()
            self._stream = None
            stream, pos = self._restart(), 0
            self._stream, self._stream_pos = stream, 0
        while pos < offset:
            skipped = len(stream.read(min(offset - pos, 1 << 20)))
            if not skipped:
                stream.close()
                self._stream = None
                raise RemoteError(f"{self.url}: the download ended at byte {pos}, before byte {offset}")
            pos += skipped
        return stream

    def _restart(self) -> _Body:
        """A new GET of the whole file (a server without Range support), checked to be the same file."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url, headers={**self._headers, "Accept-Encoding": "identity"})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise RemoteError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteError(f"{self.url}: {getattr(exc, 'reason', exc)}") from None
        etag = response.headers.get("ETag")
        if response.headers.get("Content-Length") != self._length or (self._etag and etag != self._etag):
            response.close()
            raise RemoteError(f"{self.url}: the file changed on the server while it was read")
        return _Body(response, self.url, self.timeout)

    def close(self) -> None:
        """Close the open response, if any."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class _Shared:
    """A stream over the source's whole-file response from an offset on (a server without Range support);
    closing it leaves the response open for the reads that follow."""

    def __init__(self, source: HttpSource, offset: int):
        self._source, self._pos = source, offset

    def read(self, n: int) -> bytes:
        data = self._source._read_from(self._pos, n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        """Nothing to close: the source owns the response."""


class _Body:
    """A streamed response body with network errors that name the URL."""

    def __init__(self, response: Any, url: str, timeout: float):
        self._response, self.url, self.timeout = response, url, timeout

    def read(self, n: int) -> bytes:
        try:
            return self._response.read(n)
        except TimeoutError:
            raise RemoteError(f"{self.url}: no data for {self.timeout:g} s") from None
        except OSError as exc:
            raise RemoteError(f"{self.url}: {exc}") from None

    def close(self) -> None:
        """Close the response; a read blocked in another thread returns at once (the socket is shut down)."""
        sock = getattr(getattr(getattr(self._response, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._response.close()


def _read_upto(stream: Any, n: int) -> bytes:
    """``n`` bytes of ``stream``, fewer only where it ends."""
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_exactly(response: Any, n: int, url: str, timeout: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = response.read(n - got)
        if not chunk:
            raise RemoteError(f"{url}: the connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
