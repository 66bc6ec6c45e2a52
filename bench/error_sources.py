"""Where MiniLM's coding error comes from: one tensor group decoded at a time, the rest float (issue 9).

    python -m bench.error_sources [--bits 3.5] [--file PLAN.jwt ...] [--out bench/results/error_sources.md]
    python -m bench.error_sources --compensation
    python -m bench.error_sources --file F.jwt --reverse --layers --allocator
    python -m bench.error_sources --file F.jwt --sensitivities

For each .jwt file of all-MiniLM-L6-v2 given (default: made here, data-free ``-b B`` with the fast search, and
calibrated ``-b B`` without repair), every tensor group -- the word-embedding matrix, the other embedding
tensors, and per layer the attention query / key / value / output matrices and the FFN in / out matrices (weights
and biases), plus each kind over all layers -- is put back at its decoded value with every other tensor at its
original value, and the mean embedding cosine to the original is measured on the everyday and the rare-word
sentences of :mod:`bench.sentences`. ``1 - cosine`` of each group is its share of the error (the shares add up
roughly: the errors are small and nearly independent). Also listed per group: its weights, its share of the
file's bytes and its bits/weight, so the allocation between the embedding matrix and the transformer matrices
can be read off.

``--reverse`` also measures the other way round: every tensor decoded except the group's (at its original value),
so ``1 - cos(all) - 1 - cos(all but the group)`` is what coding that group costs in the whole model. ``--layers``
adds each transformer layer as a whole. ``--allocator`` calibrates the model on the calibration sentences (as
``codec.save`` does) and lists, per group, the distortion the calibrated search assigns to its decoded values
(``sensitivity * tr(dW H dW^T) / tr(W H W^T)`` summed over its tensors, :class:`codec.rd.allocate.Weighting`) and its
share of the total, beside the group's share of the measured loss: where the two shares differ, the search's
per-tensor weights do not match what the tensor costs end to end. ``--sensitivities`` does that per tensor on the
*calibration* sentences (usable by an encoder): each calibrated tensor's loss alone per unit of its H-weighted
relative output error, against ``calibrate()``'s sensitivity estimate, normalised to agree on the total.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

import codec
from bench import minilm, sentences
from bench.prepare import REPO_ROOT

LAYER = re.compile(r"encoder\.layer\.(\d+)\.")
KINDS = (("q", "attention.self.query"), ("k", "attention.self.key"), ("v", "attention.self.value"),
         ("o", "attention.output.dense"), ("ffn in", "intermediate.dense"), ("ffn out", "output.dense"))


def group_of(name: str) -> tuple[str, str]:
    """``(group, kind)`` of a MiniLM state_dict name: ``("layer 3 q", "q")``, ``("word emb", "word emb")``..."""
    if name.startswith("embeddings.word_embeddings"):
        return "word emb", "word emb"
    if name.startswith("embeddings."):
        return "other emb", "other emb"
    m = LAYER.match(name)
    if m:
        rest = name[m.end():]
        for kind, prefix in KINDS:
            if rest.startswith(prefix + "."):
                return f"layer {m.group(1)} {kind}", kind
        return f"layer {m.group(1)} norm", "norm"
    return "other", "other"


def file_sizes(path: Path) -> dict[str, tuple[int, str]]:
    """name -> (stored bytes, codec description) from a file's index."""
    with codec.open(path) as f:
        out = {}
        for e in f.reader.index.entries:
            if e.alias or e.codec is None:
                continue
            cfg = {k: v for k, v in e.codec.get_config().items() if k != "id"}
            desc = e.codec.codec_id + "".join(f" {k}={v}" for k, v in cfg.items() if k in ("quality", "bits",
                                                                                           "distance", "table"))
            out[e.name] = (e.stored_bytes, desc)
        return out


def groups_of(names, layers: bool = False) -> dict[str, list[str]]:
    """Labels -> tensor names: each group, each kind over all layers, and with ``layers`` each layer whole."""
    groups: dict[str, list[str]] = {}
    kinds: dict[str, list[str]] = {}
    whole: dict[str, list[str]] = {}
    for name in names:
        g, k = group_of(name)
        groups.setdefault(g, []).append(name)
        kinds.setdefault(k, []).append(name)
        m = LAYER.match(name)
        if m:
            whole.setdefault(f"layer {m.group(1)}", []).append(name)
    out = dict(groups)
    out.update({f"all {k}": v for k, v in kinds.items() if len(v) > 1 and k not in groups})
    if layers:
        out.update(whole)
    return out


def allocator_distortion(decoded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> dict[str, float]:
    """name -> the calibrated search's distortion of the decoded tensor: its Weighting's ``scale`` (the measured
    sensitivity) times the relative output error, with the statistics ``codec.save`` gathers from the calibration
    sentences."""
    import copy

    from codec.rd.calibrate import calibrate

    model = copy.deepcopy(minilm._model()[0].auto_model).eval()
    calib = calibrate(model, sentences.calibration_batches())
    out = {}
    for name, stats in calib.layers.items():
        w = stats.weighting()
        ref = original[name].double().numpy().reshape(original[name].shape[0], -1)
        diff = decoded[name].double().numpy().reshape(ref.shape) - ref
        out[name] = w.scale * w.energy(diff) / w.energy(ref)
    return out


def measure(path: Path, original: dict[str, torch.Tensor], *, reverse: bool = False, layers: bool = False,
            allocator: bool = False) -> list[tuple]:
    """Rows ``(group, weights, bytes, codecs, cos everyday, cos rare, all-but cos everyday, all-but cos rare,
    allocator distortion)``: all decoded, then each group alone (and all but it with ``reverse``; the allocator's
    distortion with ``allocator``, else None)."""
    decoded = {k: v.float() for k, v in codec.load(path).items() if k in original}
    sizes = file_sizes(path)
    predicted = allocator_distortion(decoded, original) if allocator else {}
    rows = []

    def cosines(sd: dict) -> list[float]:
        return [minilm.cosine_quality(sd, s) for s in sentences.EVALUATION.values()]

    def row(label: str, names: list[str]) -> None:
        sd = dict(original)
        sd.update({n: decoded[n] for n in names})
        weights = sum(original[n].numel() for n in names)
        nbytes = sum(sizes.get(n, (0, ""))[0] for n in names)
        codecs = sorted({sizes[n][1] for n in names if n in sizes and original[n].dim() >= 2})
        but = [None, None]
        if reverse:
            rest = dict(decoded)
            rest.update({n: original[n] for n in names})
            but = cosines(rest)
        pred = sum(predicted.get(n, 0.0) for n in names) if allocator else None
        rows.append((label, weights, nbytes, ", ".join(codecs) if len(codecs) <= 2 else f"{len(codecs)} settings",
                     *cosines(sd), *but, pred))

    row("all", list(original))
    for label, names in groups_of(original, layers).items():
        row(label, names)
    return rows


#: Matrices and the qualities the calibrated plan gave them at -b 3.5, for --compensation.
PROBES = (("encoder.layer.4.intermediate.dense.weight", 80), ("encoder.layer.4.output.dense.weight", 78),
          ("encoder.layer.5.attention.self.value.weight", 85))


def compensation_probe() -> list[str]:
    """Table rows: JPEG compensation (:func:`codec.rd.gptq.jpeg_target`) against plain coding on MiniLM matrices,
    H from the calibration sentences, the output error measured with H of the (held-out) evaluation sentences."""
    import copy

    from codec.dtypes import get_dtype
    from codec.rd.calibrate import calibrate
    from codec.rd.gptq import _coded, jpeg_target, output_error
    from codec.tensorcodec import EncodeOptions, encode_tensor

    f32 = get_dtype("float32")
    model = copy.deepcopy(minilm._model()[0].auto_model).eval()
    tok = sentences.tokenizer()
    held = [dict(tok(list(s), padding=True, truncation=True, return_tensors="pt"))
            for s in sentences.EVALUATION.values()]
    fit, check = (calibrate(model, b, sensitivity_samples=0) for b in (sentences.calibration_batches(), held))
    weights = model.state_dict()
    rows = ["| matrix (quality) | bytes plain -> compensated | tr(dW H dW^T), held-out H: plain -> compensated |",
            "|---|---|---|"]
    for name, quality in PROBES:
        w = weights[name].numpy()
        ref, h_check = w.astype(np.float64), check.layers[name].h
        opts = EncodeOptions(codec="jpeg", quality=quality, table="flat")
        target, decoded = jpeg_target(w, f32, opts, fit.layers[name].h)
        size = [sum(len(b) for b in encode_tensor(a, f32, opts).blobs) for a in (w, target)]
        err = [output_error(ref, d, h_check) for d in (_coded(w, f32, opts), decoded)]
        rows.append(f"| {name} (q{quality}) | {size[0]:,} -> {size[1]:,} ({size[1] / size[0] - 1:+.1%}) | "
                    f"{err[0]:.4g} -> {err[1]:.4g} ({err[0] / err[1]:.1f}x lower) |")
    return rows


def table(rows: list[tuple], path: Path, args) -> list[str]:
    """Markdown rows of :func:`measure`'s results. Shares of the loss and of the allocator's distortion are
    against the sum over the groups (not layers or kinds), which add up to about the whole."""
    size = path.stat().st_size
    leaves = [r for r in rows[1:] if not r[0].startswith("all ") and not re.fullmatch(r"layer \d+", r[0])]
    loss = [sum(1 - r[4 + i] for r in leaves) or 1.0 for i in range(2)]
    pred_total = sum(r[8] for r in leaves) if args.allocator else 0.0
    head = "| group | weights | share of bytes | bits/weight | codecs | 1-cos everyday | 1-cos rare |"
    rule = "|---|---:|---:|---:|---|---:|---:|"
    if args.reverse:
        head += " all but it: everyday | rare | its cost in the whole: everyday | rare |"
        rule += "---:|---:|---:|---:|"
    if args.allocator:
        head += " share of loss (alone): everyday / rare | allocator distortion | share |"
        rule += "---:|---:|---:|"
    out = [head, rule]
    for label, weights, nbytes, codecs, every, rare, but_every, but_rare, pred in rows:
        bpw = 8 * (size if label == "all" else nbytes) / weights
        share = 1.0 if label == "all" else nbytes / size
        line = f"| {label} | {weights:,} | {share:.1%} | {bpw:.2f} | {codecs} | {1 - every:.5f} | {1 - rare:.5f} |"
        if args.reverse:
            line += (f" {1 - but_every:.5f} | {1 - but_rare:.5f} | {but_every - rows[0][4]:.5f} | "
                     f"{but_rare - rows[0][5]:.5f} |")
        if args.allocator:
            line += (f" {(1 - every) / loss[0]:.1%} / {(1 - rare) / loss[1]:.1%} | {pred:.4g} | "
                     f"{pred / pred_total if pred_total else 0:.1%} |")
        out.append(line)
    return out


def sensitivity_rows(path: Path, original: dict[str, torch.Tensor]) -> list[str]:
    """Table rows: per calibrated tensor, the estimated sensitivity and the measured one (``1 - cos`` on the
    calibration sentences with only that tensor decoded, per unit of relative output error), normalised so that
    both give the same total over the tensors; above 1 the search under-weights the tensor."""
    import copy

    from codec.rd.calibrate import calibrate

    decoded = {k: v.float() for k, v in codec.load(path).items() if k in original}
    model = copy.deepcopy(minilm._model()[0].auto_model).eval()
    calib = calibrate(model, sentences.calibration_batches())
    found = []
    for name, stats in calib.layers.items():
        w = stats.weighting()
        ref = original[name].double().numpy().reshape(original[name].shape[0], -1)
        rel = w.energy(decoded[name].double().numpy().reshape(ref.shape) - ref) / w.energy(ref)
        if rel > 0:
            sd = dict(original)
            sd[name] = decoded[name]
            found.append((name, rel, stats.sensitivity, 1 - minilm.cosine_quality(sd, sentences.CALIBRATION)))
    norm = sum(rel * s for _, rel, s, _ in found) / max(sum(loss for *_, loss in found), 1e-12)
    rows = ["| tensor | relative output error | sensitivity (estimate) | 1-cos on calibration sentences, alone | "
            "measured / estimated |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {group_of(n)[0]} | {rel:.3g} | {s:.3g} | {loss:.3g} | {loss / rel / s * norm:.2f} |"
             for n, rel, s, loss in found]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.error_sources", description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.5)
    parser.add_argument("--file", type=Path, action="append", help="measure this .jwt file (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/error_sources"), help="where made files go")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "error_sources.md")
    parser.add_argument("--compensation", action="store_true",
                        help="instead: JPEG compensation against plain coding on three MiniLM matrices")
    parser.add_argument("--reverse", action="store_true", help="also every tensor decoded except the group's")
    parser.add_argument("--layers", action="store_true", help="also each transformer layer as a whole")
    parser.add_argument("--allocator", action="store_true",
                        help="also the calibrated search's distortion of each group and its share")
    parser.add_argument("--sensitivities", action="store_true",
                        help="instead: per tensor, measured (calibration sentences) against estimated sensitivity")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.compensation:
        print("\n".join(compensation_probe()))
        return
    original = minilm.load_state_dict()
    if args.sensitivities:
        for path in args.file or []:
            print("\n".join(sensitivity_rows(path, original)), flush=True)
        return
    files = args.file or []
    if not files:
        args.work.mkdir(parents=True, exist_ok=True)
        free = args.work / f"free_{args.bits}.jwt"
        if not free.exists():
            t = time.process_time()
            codec.save(original, free, bits_per_weight=args.bits)
            print(f"data-free -b {args.bits}: {time.process_time() - t:.0f} CPU s", flush=True)
        calibrated = args.work / f"calibrated_{args.bits}.jwt"
        if not calibrated.exists():
            import copy

            model = copy.deepcopy(minilm._model()[0].auto_model).eval()
            t = time.process_time()
            codec.save(model, calibrated, bits_per_weight=args.bits, calibration=sentences.calibration_batches(),
                       repair=False)
            print(f"calibrated -b {args.bits}: {time.process_time() - t:.0f} CPU s", flush=True)
        files = [free, calibrated]
    total = sum(v.numel() for v in original.values())
    lines = [f"# MiniLM error sources at -b {args.bits}", ""]
    for path in files:
        rows = measure(path, original, reverse=args.reverse, layers=args.layers, allocator=args.allocator)
        lines += [f"## {path.name}: {8 * path.stat().st_size / total:.3f} bits/weight", ""] + table(rows, path, args)
        lines.append("")
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
