"""Where the Ray workers wait: a task timeline of one encode on a local Ray cluster, and what it allows.

Runs ``encode_model(SRC, ray="auto", bits_per_weight=B)`` once on a local
cluster of ``--workers`` CPUs with hooks that change nothing the encode
does (bench-only, patched from here, nothing left in the codec's paths):

- every task body of the rate search (``codec.rd.fast._named``) and of the
  final coding (``codec.distributed.ray._code_file`` / ``_code``) is wrapped
  in a closure (Ray ships it by value) that appends, on the worker,
  ``{tensor, kind, start, end, pid}`` to a log file (one machine: one clock);
- every round of the search (each call of ``codec.rd.fast._bounded_map``, or
  of ``_as_completed`` where the search has it)
  records its start and end in the coordinator, and its kind: ``first pass``
  (the first call), ``predict`` or ``measure`` (by its tasks' function).

From the log it prints, per round kind: rounds, tasks, task seconds, wall
seconds of the rounds, the workers' idle core-seconds within them, the
coordinator's seconds between rounds; then the best makespan the same task
list allows on ``k`` workers under the rounds' barriers (each round: the
longest-processing-time schedule of its tasks, and the lower bound
``max(longest task, sum / k)``), plus the coordinator's gaps, against the
sum of all (one worker). Task seconds are load-dependent; their ratios
much less so.

    OMP_NUM_THREADS=1 python -m bench.ray_timeline --src /tmp/ray/big/model --bits 3 --workers 1 \\
        --log /tmp/ray/tl1.jsonl [--analyse-only] [--k 2]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import time
from collections import defaultdict
from pathlib import Path


def _logged(fn, kind: str, log: str, name_of):
    """``fn`` wrapped so that each call appends its span on the worker to ``log`` (a closure: shipped by value)."""

    def wrapped(*args, **kwargs):
        t0, c0 = time.time(), time.process_time()
        out = fn(*args, **kwargs)
        t1, c1 = time.time(), time.process_time()
        line = json.dumps({"tensor": name_of(args), "kind": kind(args) if callable(kind) else kind,
                           "start": t0, "end": t1, "cpu": c1 - c0, "pid": os.getpid()}) + "\n"
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return out

    wrapped.__name__ = getattr(fn, "__name__", "task")
    return wrapped


def record(src: Path, out: Path, bits: float | None, workers: int, log: Path) -> float:
    """One encode on a local cluster of ``workers`` CPUs, its timeline appended to ``log``; the wall seconds."""
    import ray

    import codec.distributed.ray as jray
    import codec.rd.fast as fast
    from codec.io_formats import encode_model

    log.unlink(missing_ok=True)
    spans: list[dict] = []
    real_map, real_named, real_file = fast._bounded_map, fast._named, jray._code_file
    real_done = getattr(fast, "_as_completed", None)  # (a branch's round runner, where it has one)
    calls = {"n": 0}

    def task_kind(args):
        return "measure" if getattr(args[1], "__name__", "") == fast._measure_task.__name__ else "predict"

    def bounded_map(executor, fn, items, window):
        calls["n"] += 1
        n, t0 = calls["n"], time.time()
        yield from real_map(executor, fn, items, window)
        spans.append({"round": n, "kind": "first pass" if n == 1 else None, "start": t0, "end": time.time()})

    def as_completed(executor, fn, items, window, *more):
        calls["n"] += 1
        n, t0 = calls["n"], time.time()
        yield from real_done(executor, fn, items, window, *more)
        spans.append({"round": n, "kind": None, "start": t0, "end": time.time()})

    fast._bounded_map = bounded_map
    if real_done is not None:
        fast._as_completed = as_completed
    fast._named = _logged(real_named, task_kind, str(log), lambda a: a[0])
    jray._code_file = _logged(jray._code_file, "final", str(log), lambda a: a[4])
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        ray.get([ray.remote(lambda: 0).remote() for _ in range(workers)])  # workers started before the clock
        t0 = time.time()
        encode_model(src, out, ray="auto", **({} if bits is None else {"bits_per_weight": bits}))
        t1 = time.time()
    finally:
        ray.shutdown()
        fast._bounded_map, fast._named, jray._code_file = real_map, real_named, real_file
        if real_done is not None:
            fast._as_completed = real_done
    with open(log, "a") as f:
        for s in spans:
            f.write(json.dumps({"round": s["round"], "kind": s["kind"], "start": s["start"], "end": s["end"]}) + "\n")
        f.write(json.dumps({"run": True, "start": t0, "end": t1, "workers": workers}) + "\n")
    return t1 - t0


def _lpt(durations: list[float], k: int) -> float:
    """Makespan of the longest-processing-time schedule of ``durations`` on ``k`` machines."""
    loads = [0.0] * k
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def _in_order(durations: list[float], k: int) -> float:
    """Makespan of ``durations`` handed out in the order given to the first free of ``k`` machines."""
    loads = [0.0] * k
    for d in durations:
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def _simulate(durations: list[float], k: int, window: int, in_order: bool, first_alone: bool) -> float:
    """Makespan of ``durations`` (in submission order) on ``k`` workers that take tasks in that order, under a
    round runner's rule: at most ``window`` tasks in flight, and a task submitted only once the one ``window``
    places before it has been handed out (``in_order``: results handed out in submission order, so a task
    waits for the oldest one) or once that many have finished (handed out as they finish); ``first_alone``:
    the second task waits for the first's result (:func:`codec.rd.fast._bounded_map`)."""
    free = [0.0] * k
    finish: list[float] = []
    handed = 0.0
    handed_at: list[float] = []
    for j, d in enumerate(durations):
        gate = 0.0
        if j >= window:
            gate = handed_at[j - window] if in_order else sorted(finish)[j - window]
        if first_alone and j >= 1:
            gate = max(gate, handed_at[0])
        start = max(heapq.heappop(free), gate)
        finish.append(start + d)
        heapq.heappush(free, start + d)
        handed = max(handed, start + d)
        handed_at.append(handed)
    return max(finish, default=0.0)


#: Each round kind's rule (window per worker, least window, in order, first alone) before the fourteenth pass
#: (main at 4e94f6e) and after it.
POLICIES = {
    "before": {"first pass": (2, 2, True, True), "predict": (2, 2, True, True), "measure": (1, 1, True, True),
               "final coding": (2, 2, True, False)},
    "after": {"first pass": (2, 2, True, True), "predict": (4, 4, False, False), "measure": (2, 2, False, False),
              "final coding": (2, 8, True, False)},
}


def analyse(log: Path, ks: list[int]) -> None:
    """Print the timeline's figures (module docstring)."""
    lines = [json.loads(s) for s in log.read_text().splitlines() if s.strip()]
    run = next(x for x in lines if x.get("run"))
    rounds = sorted((x for x in lines if "round" in x), key=lambda x: x["start"])
    tasks = sorted((x for x in lines if "pid" in x), key=lambda x: x["start"])
    search_end = rounds[-1]["end"] if rounds else run["start"]
    groups: list[tuple[dict | None, list[dict]]] = []
    for r in rounds:
        inside = [t for t in tasks if t["start"] >= r["start"] - 1e-3 and t["end"] <= r["end"] + 1e-3
                  and t["kind"] != "final"]
        if r["kind"] is None:
            r["kind"] = inside[0]["kind"] if inside else "empty"
        groups.append((r, inside))
    final = [t for t in tasks if t["kind"] == "final"]
    workers = run["workers"]
    print(f"{log}: {workers} worker(s), wall {run['end'] - run['start']:.1f} s, search {search_end - run['start']:.1f} s, "
          f"{len(rounds)} rounds, {len(tasks)} tasks ({len(final)} final codings)")
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    gaps = 0.0
    prev_end = run["start"]
    for r, inside in groups:
        k = by_kind[r["kind"]]
        k["rounds"] += 1
        k["tasks"] += len(inside)
        busy = sum(t["end"] - t["start"] for t in inside)
        k["task s"] += busy
        k["wall s"] += r["end"] - r["start"]
        k["idle core-s"] += workers * (r["end"] - r["start"]) - busy
        k["longest task s"] = max(k["longest task s"], max((t["end"] - t["start"] for t in inside), default=0))
        gaps += max(0.0, r["start"] - prev_end)
        prev_end = r["end"]
    if final:
        k = by_kind["final coding"]
        k["rounds"], k["tasks"] = 1, len(final)
        k["task s"] = sum(t["end"] - t["start"] for t in final)
        k["wall s"] = run["end"] - prev_end
        k["idle core-s"] = workers * k["wall s"] - k["task s"]
        k["longest task s"] = max(t["end"] - t["start"] for t in final)
    print("| round kind | rounds | tasks | task s | wall s | idle core-s | longest task s |")
    print("|---|---|---|---|---|---|---|")
    for kind, k in by_kind.items():
        print(f"| {kind} | {k['rounds']:.0f} | {k['tasks']:.0f} | {k['task s']:.1f} | {k['wall s']:.1f} | "
              f"{k['idle core-s']:.1f} | {k['longest task s']:.1f} |")
    print(f"coordinator between rounds (no round running): {gaps:.1f} s; after the search: "
          f"{run['end'] - search_end:.1f} s (final coding and writing)")
    cpu = all("cpu" in t for t in tasks)
    span = (lambda t: t["cpu"]) if cpu else (lambda t: t["end"] - t["start"])
    print(f"worker CPU s of the tasks: {sum(t['cpu'] for t in tasks):.1f}" if cpu else "(no CPU times logged)")
    total = sum(map(span, tasks))
    print(f"all tasks {total:.1f} {'CPU' if cpu else 'wall'} s; one worker's makespan (tasks + gaps between rounds) "
          f"{total + gaps:.1f} s; best makespans of the same tasks under the rounds' barriers:")
    print("| workers | per round: LPT | per round: in submission order | per round: lower bound | "
          "ratio to 1 (LPT) | ratio to 1 (lower bound) |")
    print("|---|---|---|---|---|---|")
    for k in ks:
        lpt = order = bound = gaps
        for _, inside in groups:
            d = [span(t) for t in inside]
            if not d:
                continue
            lpt += _lpt(d, k)
            order += _in_order(d, k)
            bound += max(max(d), sum(d) / k)
        d = [span(t) for t in final]
        if d:
            lpt += _lpt(d, k)
            order += _in_order(d, k)
            bound += max(max(d), sum(d) / k)
        one = total + gaps
        print(f"| {k} | {lpt:.1f} | {order:.1f} | {bound:.1f} | {one / lpt:.2f}x | {one / bound:.2f}x |")
    # The round runners' rules on the same task list, durations as each task's CPU seconds (load-independent):
    print(f"round runners' rules simulated on this task list ({'CPU' if cpu else 'wall'} s of each task, tasks in "
          "the order the run submitted them, the coordinator's gaps between rounds added):")
    print("| rule | " + " | ".join(f"{k} worker(s) s" for k in [1, *ks]) + " | " +
          " | ".join(f"{k} vs 1" for k in ks) + " |")
    print("|---|" + "---|" * (2 * len(ks) + 1))
    for policy, rules in POLICIES.items():
        times = []
        for k in [1, *ks]:
            t = gaps
            for r, inside in [*groups, ({"kind": "final coding"}, final)]:
                window, least, in_order, alone = rules.get(r["kind"], (2, 2, True, False))
                t += _simulate([span(x) for x in inside], k, max(least, window * k), in_order, alone)
            times.append(t)
        print(f"| {policy} | " + " | ".join(f"{t:.1f}" for t in times) + " | " +
              " | ".join(f"{times[0] / t:.2f}x" for t in times[1:]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("/tmp/ray/big/model"))
    parser.add_argument("--out", type=Path, help="the .jwt written (default: next to the log)")
    parser.add_argument("--bits", type=float)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--k", default="2", help="worker counts to compute the makespan for, e.g. 2,4")
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args()
    if not args.analyse_only:
        out = args.out or args.log.with_suffix(".jwt")
        wall = record(args.src, out, args.bits, args.workers, args.log)
        print(f"wall {wall:.1f} s -> {out}")
    analyse(args.log, [int(k) for k in args.k.split(",")])


if __name__ == "__main__":
    main()
