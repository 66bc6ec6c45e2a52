"""Reading a .jwt over a slow link: time to the first tensor, and decoding while downloading.

``python -m bench.http_stream`` encodes all-MiniLM-L6-v2 at default
settings, serves it from a local HTTP server on 127.0.0.1 throttled to
``--rate`` bytes per second (default 1 MB/s, and 20 MB/s where decoding
and transfer take comparable times), and prints a markdown table of:

* ``codec.open(url)``: the header and index, one request;
* ``open + get(name)``: one more Range request, for the first tensor in
  file order and for one attention matrix, against downloading everything;
* the first tensor out of ``codec.open(url).items()`` (streaming);
* ``codec.load(url)``: the data section streamed in one response while the
  workers decode tensor k as tensor k+1 arrives, against downloading the
  whole file first and then decoding it (``codec.load(bytes)``).

Loopback only; the whole run is bounded by ``--max-seconds`` (an alarm).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.http_server import serve  # noqa: E402

#: A tensor asked for by name in the time-to-tensor rows.
PROBE = "encoder.layer.3.attention.self.query.weight"


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _best_of(n: int, fn, bytes_sent):
    """The fastest of ``n`` runs of ``fn``: ``(seconds, bytes downloaded, result)``.

    ``fn`` may return ``(seconds, result)`` itself, to leave its clean-up out of the time.
    """
    runs = []
    for _ in range(n):
        before = bytes_sent()
        seconds, result = _timed(fn)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], float):
            seconds, result = result
        runs.append((seconds, bytes_sent() - before, result))
    return min(runs, key=lambda r: r[0])


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (loopback)
        return response.read()


def measure(path: Path, rate: float | None, jobs: int | None) -> list[tuple[str, float, int]]:
    """Rows ``(what, seconds, bytes downloaded)`` for one rate."""
    import codec

    rows = []
    with serve(path.parent, rate=rate) as server:
        url = server.url(path.name)

        def fresh() -> int:
            return server.bytes_sent()

        def keys():
            with codec.open(url, jobs=jobs) as f:
                return f.keys()

        seconds, sent, names = _best_of(3, keys, fresh)
        rows.append(("codec.open(url): header and index", seconds, sent))
        for name in (names[0], PROBE):

            def one(name=name):
                with codec.open(url, jobs=jobs) as g:
                    return g.get(name)

            seconds, sent, tensor = _best_of(3, one, fresh)
            rows.append((f"open + get({name!r}) ({tensor.numel():,} weights)", seconds, sent))

        def first_streamed():
            start = time.perf_counter()
            with codec.open(url, jobs=jobs) as g:
                items = g.items()
                item = next(items)
                seconds = time.perf_counter() - start
                items.close()
            return seconds, item

        seconds, sent, item = _best_of(3, first_streamed, fresh)
        rows.append((f"first tensor of codec.open(url).items() ({item[0]!r})", seconds, sent))
        time.sleep(0.5)  # let the server notice the streams closed early
        before = fresh()
        seconds, state_dict = _timed(lambda: codec.load(url, jobs=jobs))
        rows.append((f"codec.load(url): streamed, decoding while downloading ({len(state_dict)} tensors)",
                     seconds, fresh() - before))
        del state_dict
        before = fresh()
        download, data = _timed(lambda: _download(url))
        decode, state_dict = _timed(lambda: codec.load(data, jobs=jobs))
        rows.append((f"download whole file, then codec.load(bytes) ({download:.2f} s + {decode:.2f} s)",
                     download + decode, fresh() - before))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Encode MiniLM, serve it throttled, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, action="append",
                        help="bytes per second (repeatable; default: 1e6 and 2e7)")
    parser.add_argument("--jobs", type=int, default=None, help="decoding threads (default: one per core)")
    parser.add_argument("--max-seconds", type=int, default=300, help="abort the run after this long")
    args = parser.parse_args(argv)
    rates = args.rate or [1e6, 2e7]
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"bench.http_stream: over {args.max_seconds} s, aborted"))
    signal.alarm(args.max_seconds)

    import codec
    from bench.minilm import load_state_dict

    with tempfile.TemporaryDirectory(prefix="jwt-http-") as name:
        path = Path(name) / "minilm.jwt"
        sd = load_state_dict()
        codec.save(sd, path)
        size = path.stat().st_size
        local, _ = _timed(lambda: codec.load(path, jobs=args.jobs))
        local, _ = _timed(lambda: codec.load(path, jobs=args.jobs))
        print(f"all-MiniLM-L6-v2 at default settings: {size:,} bytes, {sum(t.numel() for t in sd.values()):,} "
              f"weights; codec.load of the local file: {local:.3f} s\n")
        print("| link | what | seconds | bytes downloaded |")
        print("|---|---|---:|---:|")
        for rate in rates:
            link = f"{rate / 1e6:g} MB/s"
            for what, seconds, sent in measure(path, rate, args.jobs):
                print(f"| {link} | {what} | {seconds:.3f} | {sent:,} |")
    signal.alarm(0)


if __name__ == "__main__":
    main()
