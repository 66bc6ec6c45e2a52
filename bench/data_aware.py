"""Coding with data (issue 9), side by side in one run: jwt data-free, jwt calibrated, jwt calibrated + repair, peers.

    python -m bench.data_aware [--models mlp,cnn,bncnn,minilm] [--quick] [--bits B ...] [--out bench/results/data_aware]

For each model, every method is measured in the same run on the same weights:

* ``jwt -b``: ``codec.save(state_dict, path, bits_per_weight=B)``, the data-free allocator;
* ``jwt -b calibrated``: ``codec.save(model, path, bits_per_weight=B, calibration=batches, repair=False)``
  (calibration-aware allocation and coding, no repair);
* ``jwt -b calibrated+repair``: the same with ``repair=True`` (codec.save's default);
* ``jwt -b calibrated+repair+finetune`` (with ``--finetune STEPS``): the same with
  ``repair=RepairSettings(finetune_steps=STEPS)``, codec-in-the-loop fine-tuning after repair (``jwt encode
  --finetune STEPS``);
* ``nncodec`` (MPEG NNR / DeepCABAC, data-free) over quantization parameters, ``hqq`` (data-free) over bits
  and group sizes (:mod:`bench.peers`), and ``gptq`` (:mod:`bench.gptq_ref`, a reference GPTQ fed the same
  calibration batches as jwt) over bits and group sizes;
* the fp32 model as given (the reference line).

The two calibrated jwt methods need ``codec.save(..., calibration=)``. Until the codec has it (detected with
``inspect.signature``), each of their points is listed as "skipped: codec.save has no calibration= yet" and the
rest of the run goes on; once it lands, the same command measures them.

Data: the Fashion-MNIST models (the MLP, the CNN and the BatchNorm CNN of :mod:`bench.models`) calibrate on the
first ``CALIBRATION_IMAGES`` *training* images (no labels: the model's own outputs are the target) and are scored
by top-1 accuracy on the full 10,000-image test set. all-MiniLM-L6-v2 calibrates on
:data:`bench.sentences.CALIBRATION` and is scored by the mean embedding cosine to the original on both
evaluation sets (:data:`bench.sentences.EVERYDAY`, :data:`bench.sentences.RARE`), which share no sentence with
the calibration set.

Measured per point: bits/weight (the whole file or the peer's whole payload x 8 over every element of the
state_dict), quality, encode / decode seconds (peers encode and decode in one call), and the peak resident memory
of the encode + decode above the process's resident memory before it (``peak MB``: Linux ``VmHWM`` after resetting
it through ``/proc/self/clear_refs``). Writes ``<out>/<name>.md`` (table, skipped points, targets) and
``<out>/<name>.png`` (quality against bits/weight, log x, one line per method, the target region shaded; made by
:mod:`bench.run`'s helpers) for ``mlp``, ``cnn``, ``bncnn``, ``minilm_everyday`` and ``minilm_rare``, plus
``<out>/summary.md``; the tables and plots are rewritten after every point (marked partial until the model is
done), so an interrupted run keeps what it measured. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import codec
from bench import gptq_ref, minilm, peers, sentences
from bench.models import evaluate_state_dict, load_fashion_mnist, model_class, preprocess
from bench.prepare import REPO_ROOT, get_model
from bench.run import (CALIBRATION_IMAGES, MAX_ACCURACY_LOSS, MIN_COSINE, Benchmark, Point, describe, log, plot,
                       record, tree_version, write_markdown, write_summary)

MODELS = ("mlp", "cnn", "bncnn", "minilm")
CALIBRATION_BATCH = 250
FREE = "jwt -b"
CALIBRATED = "jwt -b calibrated"
REPAIRED = "jwt -b calibrated+repair"
FINETUNED = "jwt -b calibrated+repair+finetune"
JWT = (FREE, CALIBRATED, REPAIRED, FINETUNED)
ORDER = (*JWT, "nncodec", "hqq", "gptq")
#: Issue 9's targets: at most this many bits/weight (whole file) ...
BUDGET = {"mlp": 0.4, "cnn": 0.6, "bncnn": 0.6, "minilm": 3.5}
#: jwt -b budgets per model (the target's budget always among them): full run, --quick.
BITS = {"mlp": ((0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2), (0.4, 0.6, 1.0)),
        "cnn": ((0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2, 3), (0.6, 1.0, 1.5)),
        "bncnn": ((0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2, 3), (0.6, 1.0, 1.5)),
        "minilm": ((3, 3.5, 4, 4.5, 5, 6), (3.5, 4.5))}
#: Peer sweeps with --quick (the full sweeps are peers.PEERS' and peers.GPTQ_SETTINGS).
QUICK_SWEEPS = {"nncodec": [{"qp": qp} for qp in (-16, -24, -32)],
                "hqq": [{"nbits": 2, "group_size": 64}, {"nbits": 3, "group_size": 64},
                        {"nbits": 4, "group_size": 128}, {"nbits": 8, "group_size": 128}],
                "gptq": [{"bits": 3, "group_size": 128}, {"bits": 4, "group_size": 128}]}
#: MiniLM (22.7 M weights, every point is slow): the 2-bit corner of HQQ is far below cosine 0.99 and is left out.
MINILM_SWEEPS = {"nncodec": [{"qp": qp} for qp in (-24, -28, -32, -36)],
                 "hqq": [{"nbits": b, "group_size": g} for b in (3, 4, 8) for g in (64, 128)],
                 "gptq": [{"bits": 3, "group_size": 128}, {"bits": 4, "group_size": 128},
                          {"bits": 4, "group_size": 64}, {"bits": 8, "group_size": 128}]}
MINILM_QUICK_SWEEPS = {"nncodec": [{"qp": -28}, {"qp": -34}],
                       "hqq": [{"nbits": 4, "group_size": 128}, {"nbits": 8, "group_size": 128}],
                       "gptq": [{"bits": 4, "group_size": 128}]}
NO_CALIBRATION = "skipped: codec.save has no calibration= yet"
NO_REPAIR = "skipped: codec.save has no repair= yet"


@dataclass
class Case:
    """One model: its state_dict, a module to calibrate, calibration batches, and one Benchmark per quality."""

    name: str
    state_dict: dict[str, Tensor]
    module: Callable[[], nn.Module]  # a fresh module holding the original weights
    batches: list
    benches: list[Benchmark]
    sweeps: dict[str, list[dict]]
    bits: Sequence[float]
    finetune: int | None = None  # steps of the calibrated+repair+finetune method (None: not measured)
    save: Callable[[], None] = lambda: None  # writes the tables and plots so far (after every point)


def calibration_support() -> tuple[bool, bool]:
    """Whether ``codec.save`` takes ``calibration=``, and ``repair=`` (named parameters, not ``**options``)."""
    params = inspect.signature(codec.save).parameters
    return "calibration" in params, "repair" in params


def rss_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process in MB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak() -> None:
    """Reset the process's peak resident memory (Linux >= 4.0); best effort elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measured(run: Callable[[], tuple[dict, int, float | None]]) -> tuple[dict, int, float | None, float, float]:
    """Run ``run`` (-> decoded state_dict, bytes, encode seconds or None) and time it and its peak memory.

    Returns ``(decoded, nbytes, encode_s, total_s, peak MB above the resident memory before)``.
    """
    gc.collect()
    before = rss_mb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    decoded, nbytes, encode_s = run()
    total = time.perf_counter() - start
    return decoded, nbytes, encode_s, total, max(rss_mb("VmHWM") - before, 0.0)


def add_point(case: Case, method: str, setting: str, run: Callable[[], tuple[dict, int, float | None]]) -> None:
    """Measure one setting and record it in every Benchmark of the case (one encode, each quality)."""
    decoded, nbytes, encode_s, total, peak = measured(run)
    decoded = {k: v if isinstance(v, Tensor) else torch.from_numpy(np.asarray(v)) for k, v in decoded.items()}
    bpw = 8 * nbytes / case.benches[0].weights
    for bench in case.benches:
        record(bench, Point(method, setting, bpw, bench.quality(decoded), encode_s,
                            None if encode_s is None else total - encode_s, total, peak))
    case.save()


def skip(case: Case, method: str, setting: str, why: str) -> None:
    """List a point that was not measured, in every Benchmark of the case."""
    for bench in case.benches:
        bench.skipped.append(f"{method} [{setting}]: {why}")
    log(f"{case.name}: {method} [{setting}] {why}")


def jwt_points(case: Case, path: Path) -> None:
    """jwt data-free, calibrated (no repair) and calibrated + repair at every budget of the case.

    The module handed to a calibrated ``codec.save`` is built before the measurement starts: a user has the
    model in memory already, so its time and memory are not the codec's.
    """
    has_calibration, has_repair = calibration_support()
    keys = set(case.state_dict)

    def save(target, **options) -> Callable[[], tuple[dict, int, float]]:
        def run():
            start = time.perf_counter()
            codec.save(target, path, **options)
            encoded = time.perf_counter() - start
            decoded = codec.load(path)
            return {k: v for k, v in decoded.items() if k in keys}, path.stat().st_size, encoded
        return run

    for b in case.bits:
        setting = f"-b {b}"
        add_point(case, FREE, setting, save(case.state_dict, bits_per_weight=b))
        for method, repair in ((CALIBRATED, False), (REPAIRED, True)):
            if not has_calibration:
                skip(case, method, setting, NO_CALIBRATION)
                continue
            if not has_repair and repair:
                skip(case, method, setting, NO_REPAIR)
                continue
            options = {"repair": repair} if has_repair else {}
            try:
                add_point(case, method, setting, save(case.module(), bits_per_weight=b, calibration=case.batches,
                                                      **options))
            except (codec.EncodeError, TypeError, ValueError) as exc:
                skip(case, method, setting, f"skipped: {type(exc).__name__}: {exc}")
        if case.finetune and has_repair:
            from codec.rd.repair import RepairSettings

            add_point(case, FINETUNED, f"{setting} --finetune {case.finetune}",
                      save(case.module(), bits_per_weight=b, calibration=case.batches,
                           repair=RepairSettings(finetune_steps=case.finetune)))


def peer_points(case: Case) -> None:
    """nncodec and hqq over their sweeps, then the GPTQ reference on the case's calibration batches."""
    arrays = {k: t.numpy() for k, t in case.state_dict.items()}
    for method, (function, settings) in peers.PEERS.items():
        for params in case.sweeps.get(method, settings):
            def run(function=function, params=params):
                result = function(arrays, **params)
                return result.arrays, result.nbytes, None
            add_point(case, method, describe(params), run)
    for params in case.sweeps.get("gptq", peers.GPTQ_SETTINGS):
        def run_gptq(params=params, model=case.module()):
            result = gptq_ref.gptq(model, case.batches, keys=set(case.state_dict), **params)
            return result.arrays, result.nbytes, None
        add_point(case, "gptq", describe(params), run_gptq)


def fmnist_case(kind: str, quick: bool) -> Case:
    """The MLP, CNN or BatchNorm CNN: accuracy on the full test set, calibration on training images."""
    state_dict = get_model(kind)
    images, labels = load_fashion_mnist("test")
    train_images, _ = load_fashion_mnist("train")
    calibration = preprocess(train_images[:CALIBRATION_IMAGES])
    batches = list(calibration.split(CALIBRATION_BATCH))

    def module() -> nn.Module:
        model = model_class(kind)()
        model.load_state_dict(state_dict)
        return model.eval()

    def quality(sd) -> float:
        return evaluate_state_dict(kind, sd, images, labels)

    reference = quality(state_dict)
    budget = BUDGET[kind]
    title = {"mlp": "MLP 784-512-10", "cnn": "CNN 2 conv + 3136-128-10", "bncnn": "BatchNorm CNN"}[kind]
    bench = Benchmark(kind, f"{title}, with data", "accuracy %",
                      "top-1 accuracy on the full 10,000-image test set (calibration: the first "
                      f"{CALIBRATION_IMAGES} training images, no labels)",
                      state_dict, quality, reference, bits=(), fixed={}, budget=budget,
                      threshold=reference - MAX_ACCURACY_LOSS,
                      target=f"<= {budget} bits/weight at <= {MAX_ACCURACY_LOSS} points of accuracy lost",
                      digits=2, order=ORDER, jwt_methods=JWT)
    return Case(kind, state_dict, module, batches, [bench], QUICK_SWEEPS if quick else {}, BITS[kind][quick])


def minilm_case(quick: bool) -> Case:
    """all-MiniLM-L6-v2: mean cosine on the everyday and the rare-word sets, calibration on a third set."""
    fractions = sentences.check()
    log("minilm: rare-token fractions (ids > 10,000): "
        + ", ".join(f"{name} {fraction:.1%}" for name, fraction in fractions.items()))
    state_dict = minilm.load_state_dict()
    budget = BUDGET["minilm"]

    def module() -> nn.Module:
        model = copy.deepcopy(minilm._model()[0].auto_model)
        model.load_state_dict(state_dict, strict=False)  # the bench's float weights; buffers stay as shipped
        return model.eval()

    benches = []
    for set_name, evaluation in sentences.EVALUATION.items():
        def quality(sd, evaluation=evaluation) -> float:
            return minilm.cosine_quality(sd, evaluation)

        benches.append(Benchmark(
            f"minilm_{set_name}", f"all-MiniLM-L6-v2, {set_name} sentences", "cosine",
            f"mean cosine to the original embeddings of the {len(evaluation)} {set_name} sentences "
            f"({fractions[set_name]:.0%} of their tokens have ids above 10,000; calibration: "
            f"{len(sentences.CALIBRATION)} other sentences)",
            state_dict, quality, quality(state_dict), bits=(), fixed={}, budget=budget, threshold=MIN_COSINE,
            target=f"cosine >= {MIN_COSINE} at <= {budget} bits/weight", digits=4, order=ORDER, jwt_methods=JWT))
    return Case("minilm", state_dict, module, sentences.calibration_batches(), benches,
                MINILM_QUICK_SWEEPS if quick else MINILM_SWEEPS,
                BITS["minilm"][quick])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.data_aware", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer budgets and peer settings")
    parser.add_argument("--bits", type=float, action="append",
                        help="jwt -b budget (repeatable; default: the model's list, fewer with --quick)")
    parser.add_argument("--finetune", type=int, metavar="STEPS",
                        help="also measure calibrated+repair with STEPS of codec-in-the-loop fine-tuning")
    parser.add_argument("--no-peers", action="store_true", help="jwt's methods only (the peers' rows are left out)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "data_aware",
                        help="output folder (default: bench/results/data_aware)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown or not args.models:
        parser.error(f"unknown models {', '.join(sorted(unknown)) or '(none)'}; choose from {', '.join(MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run every method on the chosen models and write the tables and plots."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    has_calibration, has_repair = calibration_support()
    command = " ".join(["python -m bench.data_aware", *(sys.argv[1:] if argv is None else argv)])
    header = (f"`{command}` on {time.strftime('%Y-%m-%d')}, "
              f"jwt {codec.__version__} at {tree_version()} (codec.save calibration= "
              f"{'yes' if has_calibration else 'no'}, repair= {'yes' if has_repair else 'no'}), "
              f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    for name in args.models:
        model_start = time.perf_counter()
        log(f"{name}: preparing")
        case = minilm_case(args.quick) if name == "minilm" else fmnist_case(name, args.quick)
        if args.bits:
            case.bits = args.bits
        case.finetune = args.finetune
        for bench in case.benches:
            log(f"{bench.name}: {bench.weights:,} weights, fp32 {bench.metric} {bench.fmt(bench.reference)}")

        def save(case=case, model_start=model_start, final=False) -> None:
            """Write every table and plot of the case; before the last point, say the run is still going."""
            for bench in case.benches:
                note = "" if final else " (partial: the run was still going when this was written)"
                write_markdown(bench, args.out / f"{bench.name}.md", header + note,
                               time.perf_counter() - model_start)
                plot(bench, args.out / f"{bench.name}.png")

        case.save = save
        with tempfile.TemporaryDirectory() as tmp:
            jwt_points(case, Path(tmp) / f"{name}.jwt")
        if not args.no_peers:
            peer_points(case)
        save(final=True)
        for bench in case.benches:
            log(f"{bench.name}: wrote {args.out / bench.name}.md and .png")
    total = time.perf_counter() - started
    everything = ("mlp", "cnn", "bncnn", "minilm_everyday", "minilm_rare")
    write_summary(args.out, f"{header}; models {', '.join(args.models)} in {total:.0f} s", everything,
                  "jwt coding with data: summary")
    log(f"done in {total:.0f} s; summary in {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
