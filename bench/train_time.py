"""The training loop's time against the plain schedule's, in alternating pairs (issue 10's <= 1.5x bound).

One process (``--child``) trains the plain MLP schedule (:class:`bench.train.Schedule`, 2 epochs, the learning rate
decayed over the last) and then, from the same snapshot, the budget loop as ``examples/train_compressible.py --budget
0.2`` runs it (the whole schedule with the codec in the loop, coded every 4 steps, biases at 4 significand bits,
label smoothing 0.1, the file measured every ``--budget-every`` steps) once for each ``--below`` in the order given
(``--inputs-below``: :class:`codec.train.InputMask`; 0: no mask), for each ``--tile-clip`` (:class:`codec.train.
TileClip`, k standard deviations; 0, the default: none) with each, and for each ``--order-units`` (the loop's
fractions at which fc1's units are reordered, :func:`codec.train.order_units`; 0, the default: never) with those.
Each loop's ratio is its CPU seconds over the same process's plain schedule (``time.process_time``, one thread), as
``bench.train``'s "training time vs plain" column.
Without ``--child`` the script runs ``--pairs`` such processes, alternating which loop runs first (a loop's place in
the process moves its time by a few percent), and prints each loop's ratios, their mean and the paired difference::

    OMP_NUM_THREADS=1 python -m bench.train_time --pairs 8 --below 0.1 0
    OMP_NUM_THREADS=1 python -m bench.train_time --pairs 8 --below 0.1 --tile-clip 4 0
    OMP_NUM_THREADS=1 python -m bench.train_time --pairs 8 --below 0.1 --tile-clip 4 --order-units 0.1,0.2,0.3,0.4,0.5 0

CPU seconds inflate with the machine's load (two cores shared by several runs): compare ratios taken in the same
minutes, and say the load (printed with each process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence

import torch

from bench.train import order_arg, quality_arg


def child(args) -> None:
    """One process: the plain schedule, then each loop (:func:`loops`) from its snapshot; one line each."""
    import bench.train as bt
    from bench.models import load_fashion_mnist

    torch.set_num_threads(1)
    images, labels = load_fashion_mnist("train")
    images, labels = images[: args.train_size], labels[: args.train_size]
    schedule = bt.Schedule("mlp", images, labels, 2, args.seed, "last", 1)
    _, plain, snapshot = schedule.run(snapshot_at=0)
    print(f"plain {plain:.3f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    point = bt.ladder_point("mlp", args.quality, args.table)
    for label, below, clip, order in args.runs:
        _, seconds = schedule.codec_epochs(snapshot, point, refresh=4, vector_bits=4, budget=args.budget,
                                           budget_every=args.budget_every, label_smoothing=0.1,
                                           inputs_below=below, tile_clip=clip, order_at=order)
        budget = schedule.budget
        print(f"{label}: {seconds:.3f} s, ratio {seconds / plain:.4f}, {budget.quality}, "
              f"{budget.bits:.4f} bits/weight, load {os.getloadavg()[0]:.1f}", flush=True)


def loops(below: Sequence[float], clip: Sequence[float],
          order: Sequence[tuple[float, ...]] = ((),)) -> list[tuple[str, float, float, tuple[float, ...]]]:
    """``(label, inputs_below, tile_clip, order_at)`` of each loop a process runs: every ``below`` with every
    ``clip`` with every ``order``, in that order ("below 0.1", "below 0.1 clip 4" with a clip, "below 0.1 clip 4
    order 0.1,0.5" with reorders)."""
    return [(f"below {b:g}{f' clip {k:g}' if k else ''}{f' order {_fractions(o)}' if o else ''}", b, k, o)
            for b in below for k in clip for o in order]


def _fractions(order: Sequence[float]) -> str:
    return ",".join(f"{f:g}" for f in order)


def pairs(args, shared: Sequence[str]) -> None:
    """``--pairs`` child processes, the loops' order rotated from one to the next; the ratios' table."""
    runs = loops(args.below, args.tile_clip, args.order_units)
    ratios: dict[str, list[float]] = {label: [] for label, *_ in runs}
    for i in range(args.pairs):
        order = [*runs[i % len(runs):], *runs[: i % len(runs)]]
        command = [sys.executable, "-m", "bench.train_time", "--child", *shared, "--order",
                   *(f"{below:g}/{clip:g}/{_fractions(reorder) or 0}" for _, below, clip, reorder in order)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        print(f"process {i + 1}: order {', '.join(label for label, *_ in order)}", out.strip().replace("\n", "; "),
              flush=True)
        for line in out.splitlines():
            if line.startswith("below "):
                ratios[line.split(":")[0]].append(float(line.split("ratio ")[1].split(",")[0]))
    print("\n| loop | ratios | mean [min, max] | at or under 1.5x |\n|---|---|---|---|")
    for label, values in ratios.items():
        print(f"| inputs {label} | {', '.join(f'{r:.3f}' for r in values)} | {statistics.mean(values):.3f}x "
              f"[{min(values):.3f}, {max(values):.3f}] | {sum(r <= 1.5 for r in values)} of {len(values)} |")
    if len(runs) == 2 and args.pairs > 1:
        a, b = ratios.values()
        diff = [x - y for x, y in zip(a, b)]
        print(f"\npaired ({runs[0][0]} - {runs[1][0]}): {statistics.mean(diff):+.3f}x, standard error "
              f"{statistics.stdev(diff) / len(diff) ** 0.5:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--below", type=float, nargs="+", default=[0.1, 0.0], help="--inputs-below of each loop "
                        "(0: no mask; default 0.1 and 0)")
    parser.add_argument("--tile-clip", type=float, nargs="+", default=[0.0], help="--tile-clip of each loop, "
                        "with each --below (0: none; default 0)")
    parser.add_argument("--order-units", type=order_arg, nargs="+", default=[()], help="--order-units of each "
                        "loop (comma-separated fractions of the loop), with each --below and --tile-clip (0: never; "
                        "default 0)")
    parser.add_argument("--order", nargs="+", help=argparse.SUPPRESS)  # a child's loops, "below/clip/order" each
    parser.add_argument("--budget", type=float, default=0.2, help="bits/weight of the loop's budget")
    parser.add_argument("--budget-every", type=int, default=32, help="measure the file every N steps (0: the "
                        "Budget's default, an interval from the timed costs)")
    parser.add_argument("--quality", type=quality_arg, default=6.82, help="fc1's starting JPEG quality")
    parser.add_argument("--table", default="ramp1")
    parser.add_argument("--train-size", type=int, default=60000)
    parser.add_argument("--pairs", type=int, default=8, help="processes to run (without --child)")
    parser.add_argument("--child", action="store_true", help="run one process's schedules here")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if any(not 0 <= b <= 1 for b in args.below):
        parser.error("--below must be between 0 and 1")
    if any(k < 0 for k in args.tile_clip):
        parser.error("--tile-clip must not be negative (0: none)")
    try:
        args.runs = (loops(args.below, args.tile_clip, args.order_units) if not args.order else
                     [run for below, clip, reorder in (item.split("/") for item in args.order)
                      for run in loops([float(below)], [float(clip)], [order_arg(reorder)])])
    except (ValueError, argparse.ArgumentTypeError):
        parser.error(f"--order: expected below/clip/order triples, not {' '.join(args.order)}")
    if args.pairs < 1 or args.train_size < 128 or args.budget_every < 0:
        parser.error("--pairs must be positive, --train-size at least 128 and --budget-every not negative")
    args.budget_every = args.budget_every or None
    if args.child:
        child(args)
        return
    shared = ["--seed", str(args.seed), "--budget", str(args.budget), "--budget-every", str(args.budget_every or 0),
              "--quality", str(args.quality), "--table", args.table, "--train-size", str(args.train_size)]
    pairs(args, shared)


if __name__ == "__main__":
    main()
