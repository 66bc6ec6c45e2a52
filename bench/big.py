"""A checkpoint larger than memory: make a synthetic sharded bf16 model on disk, encode it, decode it to shards.

The model is Llama-shaped (hidden 2048, MLP 5632, vocabulary 32000; as many
layers as ``--gb`` asks for): per layer q/k/v/o and gate/up/down matrices
drawn Gaussian (std 0.02) with a few outlier input channels (x8 to x20),
two RMSNorm vectors near 1; token embeddings and an untied LM head. It is
written shard by shard (``--shard-gb``) in 16 M-element chunks, so making
it never holds more than a chunk; the folder has
``model.safetensors.index.json`` as transformers writes it.

Then ``jwt encode FOLDER -o model.jwt`` (default settings, or ``-b B``)
and ``jwt decode model.jwt -o OUT/ --max-shard-size SIZE`` run as
subprocesses under ``/usr/bin/time -v``: wall time, weights per second and
the peak resident memory of each.

    python -m bench.big --gb 2 --dir /tmp/jwt-big [--bits 4] [--keep] [--reuse] [--limit-mb 1536]
    python -m bench.big --gb 1.2 --dir /tmp/jwt-ray --ray-workers 1,2   # Ray scaling on one machine
    python -m bench.big --gb 1.2 --dir /tmp/jwt-ray --ray-workers 1,2 --bits 3   # the same with the search

CPU seconds (user + system) and the load average are printed next to each
wall time: on a shared machine they say more than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
HIDDEN, MLP, VOCAB = 2048, 5632, 32000
CHUNK = 1 << 24


def layer_tensors(i: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of decoder layer ``i``."""
    p = f"model.layers.{i}."
    return [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN)), (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP)), (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,))]


def model_tensors(gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a model of about ``gb`` GB in bf16."""
    per_layer = sum(int(np.prod(s)) for _, s in layer_tensors(0)) * 2
    fixed = 2 * VOCAB * HIDDEN * 2 + HIDDEN * 2
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        out += layer_tensors(i)
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def chunks(name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """The tensor's bf16 bytes, ``CHUNK`` elements (whole rows) at a time."""
    if len(shape) == 1:  # a norm: near 1
        norm = torch.from_numpy(1 + 0.05 * rng.standard_normal(shape, np.float32))
        yield norm.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        return
    rows, cols = shape
    scale = np.full(cols, 0.02, np.float32)
    outliers = rng.choice(cols, size=max(1, cols // 512), replace=False)
    scale[outliers] *= rng.uniform(8, 20, outliers.size).astype(np.float32)  # a few outlier input channels
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - r), cols), np.float32) * scale
        yield torch.from_numpy(block).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def make(folder: Path, gb: float, shard_gb: float, seed: int = 0) -> tuple[int, int]:
    """Write the synthetic checkpoint; return (weights, bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(gb)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    rng = np.random.default_rng(seed)
    weight_map = {}
    for shard, fname in zip(shards, names):
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = fname
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for name, shape in shard:
                for part in chunks(name, shape, rng):
                    f.write(part)
    weights = sum(int(np.prod(s)) for _, s in tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * weights}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN,
                                                    "intermediate_size": MLP, "vocab_size": VOCAB}))
    return weights, 2 * weights


def timed(args: list[str], limit_mb: int | None = None) -> tuple[float, float, float, float, str]:
    """Run ``python -m jwt_cli ARGS`` under /usr/bin/time -v (and ``ulimit -v limit_mb`` MB if given).

    Returns (wall s, CPU s = user + system, peak RSS MB, load average over the run, stdout).
    """
    paths = [str(REPO / ".pp"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "jwt_cli", *args]
    if limit_mb:
        command = ["bash", "-c", f'ulimit -v {limit_mb * 1024} && exec "$@"', "-", *command]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"jwt {' '.join(args)} failed: {run.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1]) / 1024
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", run.stderr)[1]) for kind in ("User", "System"))
    return wall, cpu, rss, (load0 + os.getloadavg()[0]) / 2, run.stdout.strip()


def _tree_cpu(root) -> dict[str, float]:
    """CPU seconds (user + system) of ``root``'s descendants, by kind: Ray task workers, Ray's own services."""
    import psutil

    out = {"workers": 0.0, "ray services": 0.0}
    for proc in root.children(recursive=True):
        try:
            times, title = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        kind = "workers" if "default_worker.py" in title or title.startswith("ray::") else "ray services"
        out[kind] += times.user + times.system
    return out


def ray_scaling(src: Path, dest: Path, workers: list[int], bits: float | None = None) -> None:
    """Encode ``src`` (default settings, or ``-b bits``: the fast search's tasks on the workers too) on a local Ray
    cluster of each size in ``workers``, and locally with -j 1.

    Prints wall time, the coordinator's and the workers' CPU seconds and the load average of each run, and checks
    that every file is the bytes of the local one. Ray's processes run under this one, so psutil can sum them.
    """
    import psutil
    import ray

    from codec.io_formats import encode_model

    torch.set_num_threads(1)
    me = psutil.Process()
    weights = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    options = {} if bits is None else {"bits_per_weight": bits}
    print(f"{src}: {weights / 1e9:.3f} G weights; {os.cpu_count()} CPUs; "
          f"{'default settings' if bits is None else f'-b {bits:g}'}")
    print("| run | wall s | M weights/s | coordinator CPU s | worker CPU s | Ray services CPU s | "
          "M weights per worker CPU-s | load avg | same bytes as -j 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    encode_model(src, dest / "local.jwt", jobs=1, **options)  # warm the page cache, and the reference bytes
    reference = (dest / "local.jwt").read_bytes()
    for n in [0, *workers]:
        if n:
            ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
            ray.get([ray.remote(lambda: 0).remote() for _ in range(n)])  # start the workers before the clock
        before, tree0 = me.cpu_times(), _tree_cpu(me)
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        out = dest / f"ray{n}.jwt"
        encode_model(src, out, **({"ray": "auto"} if n else {"jobs": 1}), **options)
        wall = time.perf_counter() - t0
        after, tree1 = me.cpu_times(), _tree_cpu(me)
        coordinator = after.user + after.system - before.user - before.system
        work = tree1["workers"] - tree0["workers"] if n else coordinator
        services = tree1["ray services"] - tree0["ray services"]
        if n:
            ray.shutdown()
        label = f"Ray, {n} worker{'s' if n > 1 else ''}" if n else "local, -j 1 (no Ray)"
        print(f"| {label} | {wall:.1f} | {weights / wall / 1e6:.1f} | {coordinator:.1f} | {work:.1f} | "
              f"{services:.1f} | {weights / work / 1e6:.1f} | {(load0 + os.getloadavg()[0]) / 2:.1f} | "
              f"{out.read_bytes() == reference} |", flush=True)
        out.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=8.0, help="checkpoint size in GB of bf16 (the issue asks for 8)")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/jwt-big"))
    parser.add_argument("--bits", type=float, help="also encode with -b BITS (with --ray-workers: instead of the "
                        "default settings)")
    parser.add_argument("--max-shard-size", default="1GB")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--reuse", action="store_true", help="use the checkpoint already in DIR/model if it is there")
    parser.add_argument("--limit-mb", type=int, help="run each step under ulimit -v (address space, MB)")
    parser.add_argument("--skip-default", action="store_true", help="no default-setting encode (decode needs one)")
    parser.add_argument("--ray-workers", help="instead: encode on local Ray clusters of these sizes, e.g. 1,2")
    args = parser.parse_args()
    src, jwt, out = args.dir / "model", args.dir / "model.jwt", args.dir / "decoded"
    t0 = time.perf_counter()
    if args.reuse and (src / "model.safetensors.index.json").exists():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        nbytes = index["metadata"]["total_size"]
        weights = nbytes // 2
    else:
        shutil.rmtree(args.dir, ignore_errors=True)
        weights, nbytes = make(src, args.gb, args.shard_gb)
    if args.ray_workers:
        ray_scaling(src, args.dir, [int(n) for n in args.ray_workers.split(",")], args.bits)
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
        return
    print(f"{src}: {weights / 1e9:.3f} G weights, {nbytes / 1e9:.2f} GB bf16 in "
          f"{len(list(src.glob('*.safetensors')))} shards, {time.perf_counter() - t0:.0f} s; "
          f"{os.cpu_count()} CPUs, ulimit -v {args.limit_mb or 'none'} MB", flush=True)
    print("| step | wall s | M weights/s | CPU s | M weights per CPU-s | peak RSS MB | load avg | output |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [] if args.skip_default else [("encode (default)", ["encode", str(src), "-o", str(jwt), "-q"])]
    if args.bits:
        runs.append((f"encode -b {args.bits:g}", ["encode", str(src), "-o", str(args.dir / "b.jwt"), "-q",
                                                  "-b", str(args.bits)]))
    if not args.skip_default:
        runs.append((f"decode --max-shard-size {args.max_shard_size}",
                     ["decode", str(jwt), "-o", str(out) + "/", "--max-shard-size", args.max_shard_size, "-q"]))
    for label, cmd in runs:
        shutil.rmtree(out, ignore_errors=True)
        wall, cpu, rss, load, _ = timed(cmd, args.limit_mb)
        target = Path(cmd[3].rstrip("/"))
        size = sum(p.stat().st_size for p in target.rglob("*")) if target.is_dir() else target.stat().st_size
        print(f"| {label} | {wall:.1f} | {weights / wall / 1e6:.1f} | {cpu:.1f} | {weights / cpu / 1e6:.1f} | "
              f"{rss:.0f} | {load:.1f} | {size / 1e9:.3f} GB ({8 * size / weights:.2f} bits/weight) |", flush=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
