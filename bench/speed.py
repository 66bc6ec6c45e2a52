"""Speed and memory of jwt, side by side with torch.load and safetensors.

``python -m bench.speed`` prints markdown tables:

1. per model (all-MiniLM-L6-v2, 22.7 M weights; the bundled Fashion-MNIST
   MLP, 0.4 M) and per codec (the default, jpeg, jpegxl at effort 1 to 3,
   lossless): size, encode and decode throughput in M weights/s and MB/s
   (MB of the fp32 tensors: raw bytes in or out per second), peak RSS;
2. loading MiniLM (encoded at default settings) with ``codec.load``
   against ``torch.load`` of its fp32 ``.pt`` and
   ``safetensors.torch.load_file``, and the numpy-only reader;
3. the targets (load time, encode throughput, memory bounds), met or not.

Every measurement runs in its own subprocess, so its peak RSS
(``resource.getrusage``) is its own (the parent stays small: Linux keeps
a process's peak across fork and exec); "over imports" is the peak minus
the RSS after the imports (and, for encoding, after the input is in
memory).
Times are the best of a few repetitions (wall clock, file in the page
cache); "cpu" is the process's CPU time over wall time, which shows how
many cores were used (and, below the job count, contention from other
processes). ``--jobs`` is passed to codec.save/load (default: all cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20

#: Codec settings measured: name -> codec.save options.
CODECS: dict[str, dict] = {
    "default": {},
    "jpeg": {"codec": "jpeg"},
    "jpegxl e1": {"codec": "jpegxl", "effort": 1},
    "jpegxl e2": {"codec": "jpegxl", "effort": 2},
    "jpegxl e3": {"codec": "jpegxl", "effort": 3},
    "lossless": {"codec": "lossless"},
}
#: Targets (issue "Fast and lean").
LOAD_VS_TORCH = 2.0
ENCODE_MWPS = 20.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _best(fn, min_time: float, max_reps: int) -> tuple[float, float, int]:
    """Best wall time and its CPU/wall ratio over repetitions of ``fn`` (results dropped in between)."""
    best, ratio, reps, spent = float("inf"), 0.0, 0, 0.0
    while reps < max_reps and (reps == 0 or spent < min_time):
        gc.collect()
        cpu, start = time.process_time(), time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        del result
        spent += wall
        reps += 1
        if wall < best:
            best, ratio = wall, cpu / wall
    return best, ratio, reps


# -- workers (each in its own process) -----------------------------------------




class _AnonPeak:
    """Samples the process's anonymous resident memory (RssAnon: not file pages) every 2 ms."""

    def __init__(self):
        import threading

        self.base = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._now())

    def stop(self) -> float:
        """Stop sampling; the peak increase in MB."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._now()) - self.base


def work_encode(pt: str, options: dict, out: str, jobs: int | None, min_time: float, max_reps: int) -> dict:
    """Encode the state_dict of ``pt`` (read into memory first) with ``options`` to ``out``."""
    import torch

    import codec

    sd = torch.load(pt, weights_only=True)
    base = _peak_mb()
    best, ratio, reps = _best(lambda: codec.save(sd, out, jobs=jobs, **options), min_time, max_reps)
    return {"seconds": best, "cpu": ratio, "reps": reps, "peak_mb": _peak_mb(), "base_mb": base,
            "numel": sum(t.numel() for t in sd.values()), "raw": sum(t.numel() * t.element_size() for t in sd.values()),
            "size": os.path.getsize(out)}


def work_encode_file(path: str, out: str, jobs: int | None) -> dict:
    """Encode a .safetensors file (read tensor by tensor) at default settings.

    The file's pages, memory-mapped by safetensors, count in RSS once read
    (page cache, not allocations), so the anonymous memory is sampled too.
    """
    from safetensors import safe_open

    from codec import io_formats

    with safe_open(path, framework="pt") as f:
        largest = max(_nbytes(f.get_slice(k)) for k in f.keys())
    base = _peak_mb()
    anon = _AnonPeak()
    start = time.perf_counter()
    io_formats.encode_model(path, out, jobs=jobs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": _peak_mb(), "base_mb": base, "anon_mb": anon.stop(),
            "largest": largest, "input": os.path.getsize(path), "size": os.path.getsize(out)}


def _nbytes(piece) -> int:
    import math

    size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    return math.prod(piece.get_shape()) * size.get(piece.get_dtype(), 4)


def _warm_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def work_decode(path: str, jobs: int | None, min_time: float, max_reps: int) -> dict:
    """codec.load(path) into torch tensors."""
    import codec
    import codec.api  # noqa: F401 (torch)

    _warm_page_cache(path)
    base = _peak_mb()
    best, ratio, reps = _best(lambda: codec.load(path, jobs=jobs), min_time, max_reps)
    return {"seconds": best, "cpu": ratio, "reps": reps, "peak_mb": _peak_mb(), "base_mb": base}


def work_decode_numpy(path: str, jobs: int | None, min_time: float, max_reps: int) -> dict:
    """The numpy-only reader (no torch imported): every tensor as an array."""
    from codec.reader import Reader

    def run():
        with Reader(path, jobs=jobs) as r:
            return {e.name: a for e, a in r.iter_arrays()}

    _warm_page_cache(path)
    base = _peak_mb()
    best, ratio, reps = _best(run, min_time, max_reps)
    assert "torch" not in sys.modules
    return {"seconds": best, "cpu": ratio, "reps": reps, "peak_mb": _peak_mb(), "base_mb": base}


def work_torch_load(path: str, min_time: float, max_reps: int) -> dict:
    """torch.load(weights_only=True) of an fp32 .pt."""
    import torch

    _warm_page_cache(path)
    base = _peak_mb()
    best, ratio, reps = _best(lambda: torch.load(path, weights_only=True), min_time, max_reps)
    return {"seconds": best, "cpu": ratio, "reps": reps, "peak_mb": _peak_mb(), "base_mb": base}


def work_safetensors_load(path: str, min_time: float, max_reps: int) -> dict:
    """safetensors.torch.load_file (tensors backed by a memory map; pages are read when touched)."""
    import torch  # noqa: F401
    from safetensors.torch import load_file

    _warm_page_cache(path)
    base = _peak_mb()
    best, ratio, reps = _best(lambda: load_file(path), min_time, max_reps)
    return {"seconds": best, "cpu": ratio, "reps": reps, "peak_mb": _peak_mb(), "base_mb": base}


def work_prepare(folder: str) -> dict:
    """Write MiniLM's fp32 .pt; the inputs of every model."""
    import torch

    from bench.minilm import load_state_dict, model_dir

    torch.save(load_state_dict(), Path(folder) / "minilm.pt")
    return {
        "minilm": {"label": "all-MiniLM-L6-v2", "pt": str(Path(folder) / "minilm.pt"),
                   "safetensors": str(model_dir() / "model.safetensors")},
        "mlp": {"label": "MLP 784-512-10", "pt": str(REPO / "fixtures" / "mlp_fmnist.pt")},
    }


WORKERS = {f.__name__[5:]: f for f in (work_prepare, work_encode, work_encode_file, work_decode, work_decode_numpy,
                                       work_torch_load, work_safetensors_load)}


def _run(kind: str, **kwargs) -> dict:
    """Run one worker in a fresh interpreter; its JSON result."""
    proc = subprocess.run([sys.executable, "-m", "bench.speed", "--worker", kind, json.dumps(kwargs)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"worker {kind} {kwargs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the run -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run every measurement and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=None, help="codec jobs (default: one per core)")
    parser.add_argument("--quick", action="store_true", help="one repetition each, fewer codecs")
    parser.add_argument("--load-only", action="store_true", help="only the MiniLM loading table and its targets")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker[0]](**json.loads(args.worker[1]))
        print(json.dumps(result))
        return
    min_time, max_reps = (0.0, 1) if args.quick else (1.0, 5)
    jobs = args.jobs
    cores = len(os.sched_getaffinity(0))
    print(f"jobs={jobs or cores} on {cores} cores; load average before: "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    with tempfile.TemporaryDirectory(prefix="jwt-speed-") as name:
        tmp = Path(name)
        models = _run("prepare", folder=name)
        rows = []
        codecs = {k: v for k, v in CODECS.items() if not args.quick or k in ("default", "jpeg", "lossless")}
        if args.load_only:
            codecs, models = {"default": {}}, {"minilm": models["minilm"]}
        for model, info in models.items():
            for label, options in codecs.items():
                out = str(tmp / f"{model}-{label.replace(' ', '-')}.jwt")
                enc = _run("encode", pt=info["pt"], options=options, out=out, jobs=jobs, min_time=min_time,
                           max_reps=max_reps)
                dec = _run("decode", path=out, jobs=jobs, min_time=min_time, max_reps=max_reps)
                rows.append((info["label"], label, enc, dec))
        if not args.load_only:
            print(_codec_table(rows))
        minilm = models["minilm"]
        default_file = str(tmp / "minilm-default.jwt")
        loads = {
            "codec.load (.jwt, default settings)": _run("decode", path=default_file, jobs=jobs, min_time=min_time,
                                                        max_reps=max_reps),
            "codec.load, jobs=1": _run("decode", path=default_file, jobs=1, min_time=min_time, max_reps=max_reps),
            "codec.Reader to numpy (no torch)": _run("decode_numpy", path=default_file, jobs=jobs,
                                                     min_time=min_time, max_reps=max_reps),
            "torch.load (fp32 .pt)": _run("torch_load", path=minilm["pt"], min_time=min_time, max_reps=max_reps),
            "safetensors.torch.load_file (mmap)": _run("safetensors_load", path=minilm["safetensors"],
                                                      min_time=min_time, max_reps=max_reps),
        }
        enc_file = _run("encode_file", path=minilm["safetensors"], out=str(tmp / "from-st.jwt"), jobs=jobs)
        numel, raw = rows[0][2]["numel"], rows[0][2]["raw"]
        print(_load_table(loads, numel, raw))
        print(_targets(rows, loads, enc_file, raw))
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def _codec_table(rows) -> str:
    lines = ["| model | codec | bits/weight | encode M weights/s | encode MB/s | decode M weights/s | decode MB/s "
             "| encode peak RSS MB (over input) | decode peak RSS MB (over imports) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, label, enc, dec in rows:
        n, raw = enc["numel"], enc["raw"]
        lines.append(
            f"| {model} | {label} | {8 * enc['size'] / n:.2f} "
            f"| {n / enc['seconds'] / 1e6:.1f} | {raw / enc['seconds'] / MB:.0f} "
            f"| {n / dec['seconds'] / 1e6:.1f} | {raw / dec['seconds'] / MB:.0f} "
            f"| {enc['peak_mb']:.0f} (+{enc['peak_mb'] - enc['base_mb']:.0f}) "
            f"| {dec['peak_mb']:.0f} (+{dec['peak_mb'] - dec['base_mb']:.0f}) |")
    return "\n".join(lines) + "\n\nencode/decode: best wall time of up to 5 runs; MB/s of fp32 tensor bytes.\n"


def _load_table(loads: dict, numel: int, raw: int) -> str:
    torch_s = loads["torch.load (fp32 .pt)"]["seconds"]
    lines = ["| loading all-MiniLM-L6-v2 | seconds | x torch.load | M weights/s | MB/s | cpu/wall "
             "| peak RSS MB | over imports MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in loads.items():
        lines.append(f"| {label} | {r['seconds']:.3f} | {r['seconds'] / torch_s:.2f} "
                     f"| {numel / r['seconds'] / 1e6:.0f} | {raw / r['seconds'] / MB:.0f} | {r['cpu']:.2f} "
                     f"| {r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} |")
    return "\n".join(lines) + f"\n\ndecoded size {raw / MB:.1f} MB.\n"


def _targets(rows, loads: dict, enc_file: dict, raw: int) -> str:
    jwt_s = loads["codec.load (.jwt, default settings)"]
    torch_s = loads["torch.load (fp32 .pt)"]["seconds"]
    enc = next(e for m, label, e, _ in rows if label == "default")
    mwps = enc["numel"] / enc["seconds"] / 1e6
    bound = 1.25 * raw / MB + 150
    numpy_peak = loads["codec.Reader to numpy (no torch)"]["peak_mb"]
    over = jwt_s["peak_mb"] - jwt_s["base_mb"]

    def mark(ok: bool) -> str:
        return "met" if ok else "missed"

    items = [
        ("codec.load within 2 x torch.load", f"{jwt_s['seconds']:.3f} s vs {torch_s:.3f} s = "
         f"{jwt_s['seconds'] / torch_s:.2f} x", jwt_s["seconds"] <= LOAD_VS_TORCH * torch_s),
        ("encode at default settings >= 20 M weights/s", f"{mwps:.1f} M weights/s", mwps >= ENCODE_MWPS),
        (f"decode peak RSS <= 1.25 x decoded + 150 MB = {bound:.0f} MB (numpy reader, whole process)",
         f"{numpy_peak:.0f} MB", numpy_peak <= bound),
        (f"codec.load peak RSS over the torch imports <= {bound:.0f} MB", f"{over:.0f} MB (process peak "
         f"{jwt_s['peak_mb']:.0f} MB, torch.load's {loads['torch.load (fp32 .pt)']['peak_mb']:.0f} MB)",
         over <= bound),
        ("encode of the .safetensors reads it tensor by tensor: peak anonymous memory over imports below the "
         "model's size",
         f"{enc_file['anon_mb']:.0f} MB (largest tensor {enc_file['largest'] / MB:.0f} MB, file "
         f"{enc_file['input'] / MB:.0f} MB; peak RSS {enc_file['peak_mb']:.0f} MB, +"
         f"{enc_file['peak_mb'] - enc_file['base_mb']:.0f} MB with the mapped file's pages; "
         f"{enc_file['seconds']:.2f} s)", enc_file["anon_mb"] < enc_file["input"] / MB),
    ]
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {mark(ok)} |" for what, value, ok in items]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
