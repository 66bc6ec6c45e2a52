"""Lossless coding of all-MiniLM-L6-v2 (float32 and bfloat16): ratio and speed per core, against ZipNN.

Each tensor is coded as ``jwt encode --codec lossless`` codes it (one zstd
frame per tensor) by one thread; speeds are the input bytes over the CPU
seconds of the process (so they are per core, and less sensitive to other
jobs on the machine than wall time, which is printed too). Every layout is
checked bit-exact. ZipNN (``pip install zipnn``) compresses the
concatenated tensor bytes; its round trip is checked and reported.

    python -m bench.lossless
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.minilm import load_state_dict  # noqa: E402
from codec.api import to_numpy  # noqa: E402
from codec.blobcodecs import Zstd  # noqa: E402

LAYOUTS = {
    "zstd 9 shuffle (before)": Zstd(9, True),
    "zstd 1 shuffle": Zstd(1, True),
    "zstd 1 exponent_first (now)": Zstd(1, True, exponent_first=True),
    "zstd 3 exponent_first": Zstd(3, True, exponent_first=True),
}


def run_jwt(arrays: list[np.ndarray], codec: Zstd) -> tuple[float, float, float, float, float, bool]:
    """(ratio, encode MB/s CPU, decode MB/s CPU, encode s wall, decode s wall, bit-exact)."""
    raw = sum(a.nbytes for a in arrays)
    w0, c0 = time.perf_counter(), time.process_time()
    blobs = [codec.encode(a) for a in arrays]
    w1, c1 = time.perf_counter(), time.process_time()
    decoded = [codec.decode(b, a.shape, a.dtype) for a, b in zip(arrays, blobs)]
    w2, c2 = time.perf_counter(), time.process_time()
    exact = all(a.tobytes() == d.tobytes() for a, d in zip(arrays, decoded))
    return raw / sum(map(len, blobs)), raw / (c1 - c0) / 1e6, raw / (c2 - c1) / 1e6, w1 - w0, w2 - w1, exact


def run_zipnn(arrays: list[np.ndarray], dtype: str):
    """ZipNN on the concatenated bytes: the same tuple, or None when it is not installed."""
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    data = b"".join(a.tobytes() for a in arrays)
    z = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1)
    w0, c0 = time.perf_counter(), time.process_time()
    packed = z.compress(data)
    w1, c1 = time.perf_counter(), time.process_time()
    back = z.decompress(packed)
    w2, c2 = time.perf_counter(), time.process_time()
    return (len(data) / len(packed), len(data) / (c1 - c0) / 1e6, len(data) / (c2 - c1) / 1e6, w1 - w0, w2 - w1,
            bytes(back) == data)


def main() -> None:
    sd = load_state_dict()
    print("| dtype | layout | ratio | encode MB/s/core | decode MB/s/core | encode s (wall) | decode s (wall) "
          "| bit-exact |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        arrays = [to_numpy(t.to(dt))[0] for t in sd.values()]
        rows = [(label, run_jwt(arrays, c)) for label, c in LAYOUTS.items()]
        rows.append(("ZipNN 0.5.4 (threads=1)", run_zipnn(arrays, name)))
        for label, r in rows:
            if r is None:
                print(f"| {name} | {label} | not installed |")
                continue
            print(f"| {name} | {label} | {r[0]:.4f} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]} |",
                  flush=True)


if __name__ == "__main__":
    main()
