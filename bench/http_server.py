"""A local HTTP file server for tests and benchmarks: Range requests, optional throttling.

``serve(folder, rate=None, ranges=True)`` starts a ``http.server`` based
server on 127.0.0.1 (an ephemeral port, loopback only) in a daemon thread
and yields it; ``server.url(name)`` is the URL of a file in ``folder`` and
``server.log`` lists ``(method, path, Range header, status, body length)``
per request, recorded before the body is sent; ``server.bytes_sent()``
counts the body bytes handed to the socket so far. ``rate`` (bytes per
second) throttles every response body; ``ranges=False`` makes it ignore
``Range`` like a plain static server.
``hold_after=n`` pauses every response after its first ``n`` body bytes
until ``server.release`` is set (a link that stalls, for tests).
The server honours ``If-Range`` against a strong ``ETag`` derived from the
file's size and modification time, as real servers do.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["serve", "LocalServer"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class LocalServer(ThreadingHTTPServer):
    """The server object ``serve`` yields."""

    daemon_threads = True

    def __init__(self, folder: Path, rate: float | None, ranges: bool, hold_after: int | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder, self.rate, self.ranges, self.hold_after = Path(folder), rate, ranges, hold_after
        self.release = threading.Event()
        self.log: list[tuple[str, str, str | None, int, int]] = []
        self.lock = threading.Lock()
        self._sent = 0

    def url(self, name: str) -> str:
        """The URL of file ``name`` in the served folder."""
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def bytes_sent(self) -> int:
        """Body bytes sent so far (including responses still being sent), all requests together."""
        with self.lock:
            return self._sent


class _Handler(BaseHTTPRequestHandler):
    server: LocalServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (quiet)
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.server.folder / self.path.lstrip("/").split("?")[0]
        if not path.is_file() or ".." in self.path:
            self._finish(404, "Not Found")
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        first, last, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        match = _RANGE.match(wanted or "") if self.server.ranges else None
        if match and (if_range is None or if_range == etag):
            first = int(match.group(1))
            last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if first >= size:
                self._finish(416, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", etag)
        if self.server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self._record(status, last - first + 1)
        self.end_headers()
        try:
            with open(path, "rb") as f:
                f.seek(first)
                self._send_body(f, last - first + 1)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client closed the connection early

    def _send_body(self, f, n: int) -> int:
        """Copy ``n`` bytes to the client, at most ``rate`` bytes a second; return the bytes sent."""
        rate = self.server.rate
        chunk = 1 << 16 if rate is None else max(1024, int(rate) // 50)
        start, sent = time.perf_counter(), 0
        hold = self.server.hold_after
        while sent < n:
            if hold is not None and sent >= hold:
                self.server.release.wait()
                hold = None
            data = f.read(min(chunk, n - sent, (hold - sent) if hold is not None else n))
            if not data:
                break
            with self.server.lock:  # counted before the client can have them
                self.server._sent += len(data)
            self.wfile.write(data)
            sent += len(data)
            if rate is not None:
                delay = start + sent / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        return sent

    def _finish(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status, reason)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self._record(status, 0)
        self.end_headers()

    def _record(self, status: int, length: int) -> None:
        with self.server.lock:
            self.server.log.append((self.command, self.path, self.headers.get("Range"), status, length))


@contextlib.contextmanager
def serve(folder: str | os.PathLike[str], *, rate: float | None = None, ranges: bool = True,
          hold_after: int | None = None) -> Iterator[LocalServer]:
    """Serve ``folder`` on 127.0.0.1 in a background thread for the duration of the block."""
    server = LocalServer(Path(folder), rate, ranges, hold_after)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
