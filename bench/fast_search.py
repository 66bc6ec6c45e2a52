"""Fast rate search against the exhaustive one: time, file size and the distortion it chose.

For each model and budget, ``codec.save(sd, path, bits_per_weight=B,
search=S)`` runs with ``S`` = ``fast`` and ``exhaustive``; the table gives
the wall and CPU (all threads and worker processes) time, weights per second, the file's bits/weight (the budget must
be met) and the chosen distortion: the allocator's own measure, the sum
over tensors of the (image-prior weighted, for image rows; output-row weighted
where a BatchNorm or LayerNorm follows, as codec.save measures it) NMSE,
computed from the decoded file. Optionally the MiniLM embedding cosine or
the Fashion-MNIST accuracy. Each row ends with the 1-minute load average
when it finished (the machine is shared: CPU seconds are the fairer figure).

    python -m bench.fast_search [--models minilm mlp cnn bncnn] [--bits 4 2 1 0.6] [--jobs 2] [--quality]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import codec  # noqa: E402
from codec.api import to_numpy  # noqa: E402
from codec.dtypes import get_dtype  # noqa: E402
from codec.rd.allocate import Distortion, norm_weightings, row_images  # noqa: E402
from codec.rd.fast import _as_float  # noqa: E402
from codec.tensorcodec import EncodeOptions  # noqa: E402


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished worker processes (the fast search's)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def load(model: str) -> dict:
    """The bench model's float state_dict."""
    if model == "minilm":
        from bench.minilm import load_state_dict

        return load_state_dict()
    from bench.prepare import get_model

    return get_model(model)


def chosen_distortion(original: dict, decoded: dict) -> float:
    """Sum over tensors of the allocator's distortion of ``decoded`` (rows rule and norm weightings as codec.save)."""
    measure_by = Distortion(norm_weightings({n: tuple(t.shape) for n, t in original.items()},
                                            lambda n: original[n].detach().double().numpy()))
    total, seen_matrix = 0.0, False
    for name, t in original.items():
        a, dt = to_numpy(t)
        b, _ = to_numpy(decoded[name])
        dtype = get_dtype(dt)
        is_matrix = a.ndim >= 2 and dtype.floating
        rows = row_images(a.shape, EncodeOptions(), input_layer=not seen_matrix) if is_matrix else None
        seen_matrix |= is_matrix
        total += measure_by(name, _as_float(a, dtype), _as_float(b, dtype), rows)[0]
    return total


def quality(model: str, decoded: dict) -> str:
    """MiniLM cosine or Fashion-MNIST test accuracy of the decoded weights."""
    if model == "minilm":
        from bench.minilm import cosine_quality

        return f"cos {cosine_quality(decoded):.5f}"
    from bench.models import evaluate_state_dict, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return f"acc {evaluate_state_dict(model, decoded, images, labels):.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "mlp", "cnn", "bncnn"])
    parser.add_argument("--bits", nargs="+", type=float, default=[4.0])
    parser.add_argument("--searches", nargs="+", default=["fast", "exhaustive"])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--quality", action="store_true", help="also the cosine / accuracy of the decoded weights")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the coding threads are jwt's own (--jobs); torch only loads and evaluates
    print("| model | -b | search | wall s | CPU s | M weights/s (wall) | bits/weight | distortion (sum NMSE) "
          "| vs exhaustive |"
          + (" quality |" if args.quality else "") + " load |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.quality else "") + "---|")
    for model in args.models:
        sd = load(model)
        n = sum(t.numel() for t in sd.values())
        for bits in args.bits:
            rows = []
            for search in args.searches:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "m.jwt"
                    t0, c0 = time.perf_counter(), cpu_seconds()
                    codec.save(sd, path, bits_per_weight=bits, search=search, jobs=args.jobs)
                    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                    size = os.path.getsize(path)
                    decoded = codec.load(path)
                rows.append((search, seconds, cpu, size, chosen_distortion(sd, decoded),
                             quality(model, decoded) if args.quality else None, os.getloadavg()[0]))
            ref = {r[0]: r[4] for r in rows}.get("exhaustive")
            for search, seconds, cpu, size, d, q, loadavg in rows:
                rel = f"{100 * (d / ref - 1):+.2f} %" if ref else ""
                line = (f"| {model} | {bits:g} | {search} | {seconds:.2f} | {cpu:.2f} | {n / seconds / 1e6:.2f} | "
                        f"{8 * size / n:.4f} | {d:.6g} | {rel} |")
                print(line + (f" {q} |" if q else "") + f" {loadavg:.1f} |", flush=True)

if __name__ == "__main__":
    main()
