"""The jwt benchmark in one command: jwt's modes against the baselines.

    python -m bench.run [--models mlp,cnn,minilm] [--quick] [--out bench/results]

Prepares the benchmark models (the bundled Fashion-MNIST MLP, the small CNN
trained and cached by :mod:`bench.prepare`, all-MiniLM-L6-v2 from
:mod:`bench.minilm`), then encodes and decodes each one with

* ``jwt -b B``: ``codec.save(sd, path, bits_per_weight=B)`` (data-free allocator),
* ``jwt -b B calibrated``: the same with ``calibrate=`` the negative mean
  cross-entropy on the first ``CALIBRATION_IMAGES`` Fashion-MNIST *training*
  images (MLP and CNN only),
* ``jwt default`` (``codec.save(sd, path)``) and ``jwt quality`` (fixed JPEG
  qualities),
* every method of :data:`bench.baselines.METHODS` over its sweep,

and measures for each point the honest total bits per weight (the whole file,
or the baseline's whole ``nbytes``, over the model's element count), the
quality (top-1 accuracy on the full 10,000-image Fashion-MNIST test set, or
MiniLM's embedding cosine), and the encode and decode seconds.

Writes ``<out>/<model>.md`` (table and targets), ``<out>/<model>.png``
(quality against bits/weight, one curve per method) and ``<out>/summary.md``
(every ``<model>.md`` in ``<out>``). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import codec  # noqa: E402
from bench import baselines, minilm  # noqa: E402
from bench.models import evaluate_state_dict, load_fashion_mnist, model_class, preprocess  # noqa: E402
from bench.prepare import REPO_ROOT, get_model  # noqa: E402

MODELS = ("mlp", "cnn", "minilm")
QUICK_MODELS = ("mlp", "cnn")
CALIBRATION_IMAGES = 2000
#: Points allowed to be lost (accuracy) for the Fashion-MNIST targets.
MAX_ACCURACY_LOSS = 0.5
MIN_COSINE = 0.995
#: The level-19 zstd sweep is 20-40 s a point on MiniLM: two points only.
MINILM_SWEEPS = {"uniform_zstd": [{"bits": 4}, {"bits": 6}]}
JWT_METHODS = ("jwt -b", "jwt -b calibrated", "jwt default", "jwt quality")
MARKERS = "os^DvP*Xh<>pd8"
STARTED = time.perf_counter()

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class Point:
    """One measured setting of one method."""

    method: str
    setting: str
    bpw: float
    quality: float
    encode_s: float | None  # None for baselines (one function encodes and decodes)
    decode_s: float | None
    total_s: float
    peak_mb: float | None = None  # peak resident memory during encode and decode above the RSS before (MB)


@dataclass
class Benchmark:
    """A model, how to score it, what to sweep and its target."""

    name: str
    title: str
    metric: str  # column / axis label of the quality
    metric_note: str  # what the quality is, in words
    state_dict: dict[str, Tensor]
    quality: Callable[[StateDict], float]
    reference: float  # quality of the original fp32 weights
    bits: Sequence[float]  # jwt -b sweep
    fixed: dict[str, dict]  # jwt quality: setting label -> codec.save options
    budget: float  # target: at most this many bits/weight ...
    threshold: float  # ... with quality at least this
    target: str  # the target in words
    digits: int  # decimals the quality is printed with
    calibrate: Callable[[StateDict], float] | None = None
    sweeps: dict[str, list[dict]] = field(default_factory=dict)  # baseline sweeps replacing METHODS'
    order: tuple[str, ...] = (*JWT_METHODS, *baselines.METHODS)  # methods in table / legend order
    jwt_methods: tuple[str, ...] = JWT_METHODS  # the methods that are jwt (the rest are compared against)
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def fmt(self, quality: float, sign: str = "") -> str:
        """A quality (or, with ``sign="+"``, a signed difference) at this benchmark's precision."""
        return f"{quality:{sign}.{self.digits}f}"

    @property
    def weights(self) -> int:
        """Total element count of the model."""
        return sum(t.numel() for t in self.state_dict.values())


def log(message: str) -> None:
    """Print a progress line to stderr with the seconds since the module was imported."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def calibration_score(kind: str) -> Callable[[StateDict], float]:
    """Score for ``calibrate=``: negative mean cross-entropy on training images (never test images)."""
    images, labels = load_fashion_mnist("train")
    inputs = preprocess(images[:CALIBRATION_IMAGES])
    targets = torch.as_tensor(labels[:CALIBRATION_IMAGES])
    model = model_class(kind)().eval()

    def score(state_dict: StateDict) -> float:
        model.load_state_dict(state_dict)
        with torch.no_grad():
            return -float(F.cross_entropy(model(inputs), targets))

    return score


def fmnist_benchmark(kind: str, quick: bool) -> Benchmark:
    """The Fashion-MNIST MLP or CNN, scored by accuracy on the full test set."""
    state_dict = get_model(kind)
    images, labels = load_fashion_mnist("test")

    def quality(sd: StateDict) -> float:
        return evaluate_state_dict(kind, sd, images, labels)

    reference = quality(state_dict)
    if kind == "mlp":
        title, budget = "Fashion-MNIST MLP (784-512-10)", 1.0
        bits = (0.8, 1.0, 1.5) if quick else (0.6, 0.8, 1.0, 1.2, 1.5, 2, 3)
        fixed = {f"q{q} rows 28x28": {"quality": q, "row_shape": (28, 28)} for q in (20, 50, 90)}
    else:
        title, budget = "Fashion-MNIST CNN (2 conv + 3136-128-10)", 1.2
        bits = (1.0, 1.2, 2) if quick else (0.6, 0.8, 1.0, 1.2, 1.5, 2, 3)
        fixed = {f"q{q}": {"quality": q} for q in (20, 50, 90)}
    return Benchmark(kind, title, "accuracy %", "top-1 accuracy on the full 10,000-image test set",
                     state_dict, quality, reference, bits=bits, fixed=fixed, budget=budget,
                     threshold=reference - MAX_ACCURACY_LOSS,
                     target=f"<= {budget} bits/weight at <= {MAX_ACCURACY_LOSS} points of accuracy lost",
                     digits=2, calibrate=calibration_score(kind))


def minilm_benchmark(quick: bool) -> Benchmark:
    """all-MiniLM-L6-v2, scored by the mean embedding cosine to the original."""
    state_dict = minilm.load_state_dict()
    return Benchmark("minilm", "all-MiniLM-L6-v2 (sentence-transformers)", "cosine",
                     f"mean cosine to the original embeddings of {len(minilm.SENTENCES)} sentences",
                     state_dict, minilm.cosine_quality, minilm.cosine_quality(state_dict),
                     bits=(3, 4, 5) if quick else (2, 3, 4, 5, 6),
                     fixed={f"q{q}": {"quality": q} for q in (50, 75, 90)}, budget=4.0, threshold=MIN_COSINE,
                     target=f"cosine >= {MIN_COSINE} at <= 4.0 bits/weight", digits=4, sweeps=MINILM_SWEEPS)


def describe(params: Mapping[str, object]) -> str:
    """A sweep setting as text (``bits=4``), or ``-`` for none."""
    return " ".join(f"{k}={v}" for k, v in params.items()) or "-"


def record(bench: Benchmark, point: Point) -> None:
    """Keep a measured point and print it."""
    bench.points.append(point)
    times = (f"enc {point.encode_s:.2f} s, dec {point.decode_s:.2f} s" if point.encode_s is not None
             else f"enc+dec {point.total_s:.2f} s")
    log(f"{bench.name}: {point.method} [{point.setting}] {point.bpw:.3f} bpw, "
        f"{bench.metric} {bench.fmt(point.quality)}, {times}")


def run_jwt(bench: Benchmark, method: str, setting: str, path: Path, **options) -> None:
    """Encode with ``codec.save(**options)``, decode with ``codec.load``, and record the point."""
    try:
        start = time.perf_counter()
        codec.save(bench.state_dict, path, **options)
        encoded = time.perf_counter()
        decoded = codec.load(path)
        done = time.perf_counter()
    except codec.EncodeError as exc:
        bench.skipped.append(f"{method} [{setting}]: {exc}")
        log(f"{bench.name}: {method} [{setting}] skipped: {exc}")
        return
    bpw = 8 * path.stat().st_size / bench.weights
    record(bench, Point(method, setting, bpw, bench.quality(decoded), encoded - start, done - encoded,
                        done - start))


def run_baseline(bench: Benchmark, method: str, params: dict) -> None:
    """Run one baseline setting (encode and decode in one call) and record the point."""
    function, _ = baselines.METHODS[method]
    arrays = {k: t.numpy() for k, t in bench.state_dict.items()}
    start = time.perf_counter()
    result = function(arrays, **params)
    elapsed = time.perf_counter() - start
    decoded = {k: torch.from_numpy(a) for k, a in result.arrays.items()}
    record(bench, Point(method, describe(params), baselines.bits_per_weight(result, arrays),
                        bench.quality(decoded), None, None, elapsed))


def run(bench: Benchmark, quick: bool) -> None:
    """Measure every jwt mode and every baseline setting on one model."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{bench.name}.jwt"
        for b in bench.bits:
            run_jwt(bench, "jwt -b", f"-b {b}", path, bits_per_weight=b)
            if bench.calibrate is not None:
                run_jwt(bench, "jwt -b calibrated", f"-b {b}", path, bits_per_weight=b, calibrate=bench.calibrate)
        run_jwt(bench, "jwt default", "codec.save defaults", path)
        for setting, options in bench.fixed.items():
            run_jwt(bench, "jwt quality", setting, path, **options)
    for method, (_, settings) in baselines.METHODS.items():
        settings = bench.sweeps.get(method, settings)
        for params in settings[::3] if quick else settings:
            run_baseline(bench, method, params)


def method_order(bench: Benchmark) -> list[str]:
    """Methods that have points: jwt modes first, then baselines in registry order."""
    present = {p.method for p in bench.points}
    return [m for m in bench.order if m in present]


def seconds(value: float | None) -> str:
    """Seconds for the table, or a dash."""
    return "-" if value is None else f"{value:.2f}"


def results_table(bench: Benchmark) -> list[str]:
    """The markdown table of every point, sorted by method then bits/weight."""
    delta = "Δ points" if bench.metric == "accuracy %" else "Δ"
    memory = any(p.peak_mb is not None for p in bench.points)  # the column only when something was measured
    lines = [f"| method | setting | bits/weight | {bench.metric} | {delta} | encode s | decode s | enc+dec s |"
             + (" peak MB |" if memory else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if memory else ""),
             f"| fp32 (reference) | original | 32.000 | {bench.fmt(bench.reference)} | 0 | - | - | - |"
             + (" - |" if memory else "")]
    for method in method_order(bench):
        for p in sorted((p for p in bench.points if p.method == method), key=lambda p: p.bpw):
            change = bench.fmt(p.quality - bench.reference, "+")
            peak = ("-" if p.peak_mb is None else f"{p.peak_mb:.0f}") if memory else None
            lines.append(f"| {p.method} | {p.setting} | {p.bpw:.3f} | {bench.fmt(p.quality)} | {change} | "
                         f"{seconds(p.encode_s)} | {seconds(p.decode_s)} | {p.total_s:.2f} |"
                         + (f" {peak} |" if memory else ""))
    return lines


def best_within_budget(bench: Benchmark, points: Sequence[Point]) -> Point | None:
    """The point of highest quality at or under the target's bits/weight."""
    return max((p for p in points if p.bpw <= bench.budget), key=lambda p: p.quality, default=None)


def cheapest_above(bench: Benchmark, points: Sequence[Point]) -> Point | None:
    """The point of fewest bits/weight with quality at least the target's threshold."""
    return min((p for p in points if p.quality >= bench.threshold), key=lambda p: p.bpw, default=None)


def verdict(bench: Benchmark, points: Sequence[Point]) -> str:
    """Whether ``points`` meet the target, or by how much the nearest ones miss it."""
    best, cheapest = best_within_budget(bench, points), cheapest_above(bench, points)
    if best is not None and best.quality >= bench.threshold:
        return f"**met**: {best.method} [{best.setting}] reaches {bench.fmt(best.quality)} at {best.bpw:.3f} bpw"
    if best is None:
        quality = f"no point at <= {bench.budget} bpw"
    else:
        quality = (f"at <= {bench.budget} bpw the best is {bench.fmt(best.quality)} ({best.method} "
                   f"[{best.setting}], {bench.fmt(bench.threshold - best.quality)} short)")
    if cheapest is None:
        rate = f"no point reaches {bench.fmt(bench.threshold)}"
    else:
        rate = (f"reaching {bench.fmt(bench.threshold)} takes {cheapest.bpw:.3f} bpw ({cheapest.method} "
                f"[{cheapest.setting}], {cheapest.bpw - bench.budget:.3f} bpw over)")
    return f"**missed**: {quality}; {rate}"


def targets_section(bench: Benchmark) -> list[str]:
    """Verdicts for jwt and the baselines, then per method the two target measures."""
    jwt = [p for p in bench.points if p.method in bench.jwt_methods]
    others = [p for p in bench.points if p.method not in bench.jwt_methods]
    lines = [f"Target: {bench.target} ({bench.metric} >= {bench.fmt(bench.threshold)}).", "",
             f"- jwt (any mode): {verdict(bench, jwt)}",
             f"- baselines (any): {verdict(bench, others)}", "",
             f"| method | best {bench.metric} at <= {bench.budget} bpw | "
             f"fewest bpw with {bench.metric} >= {bench.fmt(bench.threshold)} | target |",
             "|---|---|---|---|"]
    for method in method_order(bench):
        points = [p for p in bench.points if p.method == method]
        best, cheapest = best_within_budget(bench, points), cheapest_above(bench, points)
        met = cheapest is not None and cheapest.bpw <= bench.budget
        lines.append(f"| {method} | {f'{bench.fmt(best.quality)} at {best.bpw:.3f}' if best else '-'} | "
                     f"{f'{cheapest.bpw:.3f} ({bench.fmt(cheapest.quality)})' if cheapest else '-'} | "
                     f"{'met' if met else 'missed'} |")
    return lines


def tree_version() -> str:
    """The git commit the run used, marked when the working tree had uncommitted changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty=+uncommitted"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_markdown(bench: Benchmark, path: Path, header: str, seconds_taken: float) -> None:
    """Write the model's table, skipped points and targets."""
    lines = [f"## {bench.title}", "", f"{header}; this model took {seconds_taken:.0f} s.",
             f"{bench.weights:,} weights; {bench.metric}: {bench.metric_note}; bits/weight: whole file (or "
             "baseline nbytes) * 8 / weights.",
             "encode/decode s: `codec.save` / `codec.load`; baselines encode and decode in one function, "
             "so only their enc+dec s is given.", "", *results_table(bench), ""]
    if bench.skipped:
        lines += ["Skipped (not run, or refused by the codec):", "", *(f"- {s}" for s in bench.skipped), ""]
    lines += ["### Targets", "", *targets_section(bench), ""]
    path.write_text("\n".join(lines))


def plot(bench: Benchmark, path: Path) -> None:
    """Quality against bits/weight (log x), one line per method, the fp32 reference and the target box.

    Left: every point; right: zoomed on the target region.
    """
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    methods = method_order(bench)
    tab20 = plt.get_cmap("tab20")
    colors = [tab20(k) for k in (*range(0, 20, 2), *range(1, 20, 2))]  # the 10 dark hues, then the light ones
    span = bench.reference - bench.threshold
    zoom = (bench.threshold - 8 * span, bench.reference + 2 * span)
    for ax, zoomed in zip(axes, (False, True)):
        for i, method in enumerate(methods):
            pts = sorted((p for p in bench.points if p.method == method), key=lambda p: p.bpw)
            jwt = method in bench.jwt_methods
            ax.plot([p.bpw for p in pts], [p.quality for p in pts], marker=MARKERS[i % len(MARKERS)],
                    color=colors[i % len(colors)],
                    linestyle="-" if jwt else "--", linewidth=2.4 if jwt else 1.2,
                    markersize=7 if jwt else 5, label=method)
        ax.axhline(bench.reference, color="black", linewidth=1, label=f"fp32 reference ({bench.reference:.4g})")
        ax.set_xscale("log")
        ax.set_xlim(0.25, 40)
        if zoomed:
            ax.set_ylim(*zoom)
        top = ax.get_ylim()[1]
        ax.fill_between([0.25, bench.budget], bench.threshold, top, color="green", alpha=0.12,
                        label=f"target: {bench.target}")
        ax.set_ylim(top=top)
        ax.set_xticks([0.25, 0.5, 1, 2, 4, 8, 16, 32], ["0.25", "0.5", "1", "2", "4", "8", "16", "32"])
        ax.set_xlabel("total bits per weight (log scale)")
        ax.set_ylabel(bench.metric)
        ax.set_title(f"{bench.title}: {'zoom on the target' if zoomed else 'all points'}")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(out: Path, last_run: str, names: Sequence[str] = MODELS,
                  title: str = "jwt benchmark summary") -> None:
    """Collect the markdown of each of ``names`` in ``out`` into ``summary.md``, after a line about the last run."""
    parts = [(out / f"{name}.md").read_text() for name in names if (out / f"{name}.md").is_file()]
    (out / "summary.md").write_text(f"# {title}\n\nLast run: {last_run}.\n\n" + "\n".join(parts))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} "
                        f"(default: all; with --quick: {','.join(QUICK_MODELS)})")
    parser.add_argument("--quick", action="store_true", help="fewer sweep points (about 3 minutes)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="output folder")
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else MODELS)
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    args.models = models
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark on the chosen models and write the tables and plots."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    header = (f"`python -m bench.run{' --quick' if args.quick else ''}` on {time.strftime('%Y-%m-%d')}, "
              f"jwt {codec.__version__} at {tree_version()}, {os.cpu_count()} CPU cores, torch "
              f"{torch.__version__}")
    for name in args.models:
        model_start = time.perf_counter()
        log(f"{name}: preparing")
        bench = minilm_benchmark(args.quick) if name == "minilm" else fmnist_benchmark(name, args.quick)
        log(f"{name}: {bench.weights:,} weights, fp32 {bench.metric} {bench.fmt(bench.reference)}")
        run(bench, args.quick)
        write_markdown(bench, args.out / f"{name}.md", header, time.perf_counter() - model_start)
        plot(bench, args.out / f"{name}.png")
        log(f"{name}: wrote {args.out / name}.md and .png")
    total = time.perf_counter() - started
    write_summary(args.out, f"{header}; models {', '.join(args.models)} in {total:.0f} s")
    log(f"done in {total:.0f} s; summary in {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
