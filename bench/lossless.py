"""Lossless coding of all-MiniLM-L6-v2 (float32 and bfloat16): ratio and speed per core, against ZipNN.

Each tensor is coded as ``jwt encode --codec lossless`` codes it (one zstd
frame per tensor) by one thread; speeds are the input bytes over the CPU
seconds of the process, the least of ``--repeat`` runs (so they are per
core, and less sensitive to other jobs on the machine than wall time).
Every decode allocates its output, as a reader does. Every layout is
checked bit-exact; each dtype's reference layout (``planes_codec``: the
rotation, and literals-only frames for bfloat16) is marked. ZipNN
(``pip install zipnn``) compresses the concatenated tensor bytes with one
thread; its round trip is checked and reported. ZipNN 0.5.4's output grows
from call to call within a process (its first call is its smallest), so
its ratio is the best of its calls, and the range is printed beside it. ``--profile`` splits jwt's time into the byte-plane transposes
and zstd itself. The "file" rows time ``codec.save(codec="lossless")`` and
``codec.load`` of a .jwt file in /tmp with one thread (container, CRC-32
checks and torch tensors included; the file is in the page cache).

The byte planes are joined and split by numba's compiled loops (the
``fast`` extra) with ``--compiled on`` (the default where numba is
installed: loaded before any timing), by numpy with ``--compiled off``.
``--cold`` also times, in new processes, what loading the compiled loops
costs once: numba's first compilation (an empty cache) and a load from its
cache, beside a whole ``codec.load`` of the file with and without them.

    python -m bench.lossless [--repeat 3] [--profile] [--compiled on|off] [--cold]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

from bench.minilm import load_state_dict  # noqa: E402
from codec.api import to_numpy  # noqa: E402
from codec.blobcodecs import Zstd, ZstdPlanes  # noqa: E402
from codec.blobcodecs import zstd as zstd_module  # noqa: E402

LAYOUTS = {
    "zstd 9 shuffle (format 1.0)": Zstd(9, True),
    "zstd 1 exponent_first (format 1.1, before)": Zstd(1, True, exponent_first=True),
    "zstd_planes rotate 1": ZstdPlanes(1),
    "zstd_planes rotate 2": ZstdPlanes(2),
    "zstd_planes rotate 3": ZstdPlanes(3),
}


def cpu_seconds(fn: Callable[[], object], repeat: int) -> tuple[object, float, float]:
    """``(result, least CPU seconds, wall seconds of that run)`` of ``repeat`` calls of ``fn``."""
    best = (None, float("inf"), 0.0)
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        cpu, wall = time.process_time() - c, time.perf_counter() - w
        if cpu < best[1]:
            best = (result, cpu, wall)
    return best


def run_jwt(arrays: list[np.ndarray], codec: Zstd, repeat: int) -> dict:
    """Ratio, encode and decode CPU seconds and MB/s per core, wall seconds, bit-exactness."""
    raw = sum(a.nbytes for a in arrays)
    blobs, enc_cpu, enc_wall = cpu_seconds(lambda: [codec.encode(a) for a in arrays], repeat)
    decoded, dec_cpu, dec_wall = cpu_seconds(
        lambda: [codec.decode(b, a.shape, a.dtype) for a, b in zip(arrays, blobs)], repeat)
    exact = all(a.tobytes() == d.tobytes() for a, d in zip(arrays, decoded))
    return dict(ratio=raw / sum(map(len, blobs)), enc_cpu=enc_cpu, dec_cpu=dec_cpu, enc_wall=enc_wall,
                dec_wall=dec_wall, exact="yes" if exact else "NO", raw=raw)


def run_zipnn(arrays: list[np.ndarray], dtype: str, repeat: int) -> dict | None:
    """ZipNN on the concatenated bytes: the same figures, or None when it is not installed."""
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    data = b"".join(a.tobytes() for a in arrays)
    z = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1)
    sizes: list[int] = []

    def compress() -> bytes:
        packed = z.compress(data)
        sizes.append(len(packed))
        return packed

    _, enc_cpu, enc_wall = cpu_seconds(compress, repeat)
    packed = z.compress(data)  # for the decode: ZipNN's output grows from call to call in one process (0.5.4's
    sizes.append(len(packed))  # zipnn_core keeps state), so its ratio is the best of its calls, the range reported
    back, dec_cpu, dec_wall = cpu_seconds(lambda: bytes(z.decompress(packed)), repeat)
    exact = "yes"
    if back != data:
        k = arrays[0].itemsize
        want, got = np.frombuffer(data, f"<u{k}"), np.frombuffer(back[: len(data)], f"<u{k}")
        bad = np.flatnonzero(want != got) if len(back) == len(data) else np.arange(1)
        exact = (f"NO: {bad.size:,} of {want.size:,} elements differ, first "
                 f"0x{int(want[bad[0]]):0{2 * k}x} -> 0x{int(got[bad[0]]):0{2 * k}x}")
    return dict(ratio=len(data) / min(sizes), enc_cpu=enc_cpu, dec_cpu=dec_cpu, enc_wall=enc_wall,
                dec_wall=dec_wall, exact=exact, raw=len(data),
                note=f"ratio of its {len(sizes)} calls {len(data) / max(sizes):.4f}-{len(data) / min(sizes):.4f}")


def run_file(state_dict: dict[str, torch.Tensor], repeat: int) -> dict:
    """codec.save(codec="lossless") / codec.load of a file, one thread: the same figures as :func:`run_jwt`."""

    import codec

    raw = sum(t.numel() * t.element_size() for t in state_dict.values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.jwt"
        _, enc_cpu, enc_wall = cpu_seconds(lambda: codec.save(state_dict, path, codec="lossless", jobs=1), repeat)
        back, dec_cpu, dec_wall = cpu_seconds(lambda: codec.load(path, jobs=1), repeat)
        size = path.stat().st_size
    exact = all(back[k].reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8))
                for k, t in state_dict.items())
    return dict(ratio=raw / size, enc_cpu=enc_cpu, dec_cpu=dec_cpu, enc_wall=enc_wall, dec_wall=dec_wall,
                exact="yes" if exact else "NO", raw=raw)


def profile(arrays: list[np.ndarray], codec: ZstdPlanes, repeat: int) -> str:
    """Where zstd_planes' CPU goes: byte-plane transposes (with rotation) and zstd, each in MB/s of input."""
    raw = sum(a.nbytes for a in arrays)
    k = arrays[0].itemsize
    planes = [zstd_module._rotated_planes(a, codec.rotate).copy() for a in arrays]
    compressor = zstandard.ZstdCompressor(compression_params=codec._params())

    def compress(p: np.ndarray) -> bytes | bytearray:
        return zstd_module._literal_frame(p, k) if codec.literals else zstd_module._compress_planes(compressor, p, k)

    blobs = [compress(p) for p in planes]
    outs = [np.empty(a.nbytes, np.uint8) for a in arrays]
    buffers = [np.empty(a.nbytes, np.uint8) for a in arrays]

    def decompress() -> None:
        for b, buf in zip(blobs, buffers):
            zstd_module._decompress_into(b, buf)

    parts = {
        "rotate + transpose": lambda: [zstd_module._rotated_planes(a, codec.rotate) for a in arrays],
        "zstd compress": lambda: [compress(p) for p in planes],
        "zstd decompress": decompress,
        "transpose back + rotate": lambda: [zstd_module._from_planes(p, o, k, codec.rotate)
                                            for p, o in zip(planes, outs)],
    }
    return ", ".join(f"{name} {raw / cpu_seconds(fn, repeat)[1] / 1e6:.0f} MB/s" for name, fn in parts.items())


COLD = """
import sys, time
c0 = time.process_time()
import numpy as np, torch
torch.set_num_threads(1)
import codec
from codec.blobcodecs import zstd
mode = {mode}
c1 = time.process_time()
if mode:
    zstd.use_compiled(True)
else:
    zstd.use_compiled(False)
c2 = time.process_time()
{load}
c3 = time.process_time()
print(c1 - c0, c2 - c1, c3 - c2)
"""


def cold(path: Path | None, cache_dir: str, mode: bool) -> tuple[float, float, float]:
    """CPU seconds of a new process: importing codec, ``use_compiled(mode)``, then ``codec.load`` of ``path``."""
    load = f"codec.load({str(path)!r}, jobs=1)" if path else "pass"
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", COLD.format(mode=mode, load=load)], env=env, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    return tuple(float(x) for x in out.split())


def cold_report(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> str:
    """Loading the compiled loops in a new process (empty numba cache, then cached) and a whole codec.load."""
    import codec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.jwt"
        codec.save({k: t.to(dtype).contiguous() for k, t in state_dict.items()}, path, codec="lossless", jobs=1)
        cache = str(Path(tmp) / "numba")
        first = cold(None, cache, True)[1]
        cached = min(cold(None, cache, True)[1] for _ in range(3))
        with_loops = min(cold(path, cache, True) for _ in range(3))
        without = min(cold(path, cache, False) for _ in range(3))
    return (f"use_compiled(True) in a new process: {first:.2f} CPU s with an empty numba cache, {cached:.2f} s "
            f"cached; codec.load of the file in a new process, CPU s (import + loops + load): with the compiled "
            f"loops {with_loops[0]:.2f} + {with_loops[1]:.2f} + {with_loops[2]:.3f}, "
            f"numpy {without[0]:.2f} + {without[1]:.2f} + {without[2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each step; the least CPU time counts")
    parser.add_argument("--profile", action="store_true", help="split zstd_planes' time into transposes and zstd")
    parser.add_argument("--compiled", choices=("on", "off"), default="on",
                        help="byte planes by numba's compiled loops (where installed) or by numpy")
    parser.add_argument("--cold", action="store_true", help="also time loading the compiled loops in new processes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    c = time.process_time()
    loaded = zstd_module.use_compiled(args.compiled == "on")
    if loaded:
        import numba

        print(f"byte planes by numba {numba.__version__}'s compiled loops (loaded in "
              f"{time.process_time() - c:.2f} CPU s)\n")
    else:
        print("byte planes by numpy\n")
    sd = load_state_dict()
    print("| dtype | layout | ratio | encode MB/s/core | decode MB/s/core | encode CPU s | decode CPU s "
          "| encode s (wall) | decode s (wall) | bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        arrays = [to_numpy(t.to(dt))[0] for t in sd.values()]
        reference = zstd_module.planes_codec(name)
        layouts = dict(LAYOUTS)
        if reference.literals:
            layouts[f"zstd_planes rotate {reference.rotate} literals only"] = reference
        rows = [(label + (" (reference)" if c is reference or (isinstance(c, ZstdPlanes) and not reference.literals
                                                               and c.rotate == reference.rotate) else ""),
                 run_jwt(arrays, c, args.repeat)) for label, c in layouts.items()]
        rows.append(("file: codec.save / codec.load (now)",
                     run_file({k: t.to(dt).contiguous() for k, t in sd.items()}, args.repeat)))
        rows.append(("ZipNN 0.5.4 (threads=1)", run_zipnn(arrays, name, args.repeat)))
        for label, r in rows:
            if r is None:
                print(f"| {name} | {label} | not installed |")
                continue
            print(f"| {name} | {label} | {r['ratio']:.4f} | {r['raw'] / r['enc_cpu'] / 1e6:.0f} "
                  f"| {r['raw'] / r['dec_cpu'] / 1e6:.0f} | {r['enc_cpu']:.3f} | {r['dec_cpu']:.3f} "
                  f"| {r['enc_wall']:.2f} | {r['dec_wall']:.2f} | {r['exact']}"
                  f"{'; ' + r['note'] if 'note' in r else ''} |", flush=True)
        if args.profile:
            print(f"\n{name} zstd_planes rotate {reference.rotate}{' literals only' * reference.literals} profile: "
                  f"{profile(arrays, reference, args.repeat)}\n",
                  flush=True)
        if args.cold:
            print(f"\n{name} cold start: {cold_report(sd, dt)}\n", flush=True)


if __name__ == "__main__":
    main()
