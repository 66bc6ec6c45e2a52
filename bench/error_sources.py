"""Where MiniLM's coding error comes from: one tensor group decoded at a time, the rest float (issue 9).

    python -m bench.error_sources [--bits 3.5] [--file PLAN.jwt ...] [--out bench/results/error_sources.md]
    python -m bench.error_sources --compensation

For each .jwt file of all-MiniLM-L6-v2 given (default: made here, data-free ``-b B`` with the fast search, and
calibrated ``-b B`` without repair), every tensor group -- the word-embedding matrix, the other embedding
tensors, and per layer the attention query / key / value / output matrices and the FFN in / out matrices (weights
and biases), plus each kind over all layers -- is put back at its decoded value with every other tensor at its
original value, and the mean embedding cosine to the original is measured on the everyday and the rare-word
sentences of :mod:`bench.sentences`. ``1 - cosine`` of each group is its share of the error (the shares add up
roughly: the errors are small and nearly independent). Also listed per group: its weights, its share of the
file's bytes and its bits/weight, so the allocation between the embedding matrix and the transformer matrices
can be read off.
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


def measure(path: Path, original: dict[str, torch.Tensor]) -> list[tuple]:
    """Rows ``(group, weights, bytes, codecs, cos everyday, cos rare)``: all decoded, each group, each kind."""
    decoded = {k: v.float() for k, v in codec.load(path).items() if k in original}
    sizes = file_sizes(path)
    groups: dict[str, list[str]] = {}
    kinds: dict[str, list[str]] = {}
    for name in original:
        g, k = group_of(name)
        groups.setdefault(g, []).append(name)
        kinds.setdefault(k, []).append(name)
    rows = []

    def row(label: str, names: list[str]) -> None:
        sd = dict(original)
        sd.update({n: decoded[n] for n in names})
        weights = sum(original[n].numel() for n in names)
        nbytes = sum(sizes.get(n, (0, ""))[0] for n in names)
        codecs = sorted({sizes[n][1] for n in names if n in sizes and original[n].dim() >= 2})
        rows.append((label, weights, nbytes, ", ".join(codecs) if len(codecs) <= 2 else f"{len(codecs)} settings",
                     *(minilm.cosine_quality(sd, s) for s in sentences.EVALUATION.values())))

    row("all", list(original))
    for label, names in groups.items():
        row(label, names)
    for label, names in kinds.items():
        if len(names) > 1 and label not in groups:
            row(f"all {label}", names)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.error_sources", description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=float, default=3.5)
    parser.add_argument("--file", type=Path, action="append", help="measure this .jwt file (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/error_sources"), help="where made files go")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "error_sources.md")
    parser.add_argument("--compensation", action="store_true",
                        help="instead: JPEG compensation against plain coding on three MiniLM matrices")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.compensation:
        print("\n".join(compensation_probe()))
        return
    original = minilm.load_state_dict()
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
        rows = measure(path, original)
        size = path.stat().st_size
        lines += [f"## {path.name}: {8 * size / total:.3f} bits/weight", "",
                  "| group | weights | share of bytes | bits/weight | codecs | 1-cos everyday | 1-cos rare |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        for label, weights, nbytes, codecs, every, rare in rows:
            bpw = 8 * (size if label == "all" else nbytes) / weights
            share = 1.0 if label == "all" else nbytes / size
            lines.append(f"| {label} | {weights:,} | {share:.1%} | {bpw:.2f} | {codecs} | {1 - every:.5f} | "
                         f"{1 - rare:.5f} |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
