"""Updates of a real transformer fine-tune: all-MiniLM-L6-v2 after a short unsupervised fine-tune, sent as an update.

    python -m bench.updates_minilm [--steps 200] [--out bench/results] [--cache DIR] [--skip-nncodec]
                                   [--update-bits 0.05 0.2 1.0] [--full-bits B ...]

* **the fine-tune** (CPU, a few minutes): a contrastive sentence-pair task made from the 125
  unlabelled sentences of ``bench/sentences/calibration.txt``: each sentence is paired with a
  copy that kept 30 % of its words in shuffled order (drawn anew each time), and in each batch
  of 8 pairs every sentence must pick its partner among the batch (sentence-transformers'
  MultipleNegativesRankingLoss, both directions, scale 20, dropout on); AdamW (lr 5e-5, weight
  decay 0.01), ``--steps`` steps, seed 0. (Plain SimCSE, the same sentence twice with dropout,
  or a copy missing half of its words, give this already-trained model a loss of about 0:
  nothing to learn.) Every tensor changes (weight decay touches all).
* **what is sent**: the receiver holds the decoded default-setting .jwt of the original
  model; the fine-tuned model goes either in full (``codec.save`` default and ``-b``) or as
  an update against that base (``codec.save(new, base=base.jwt, ...)``, default and ``-b``),
  and, side by side, as NNCodec 2.1.3's differential update (``nnc.compress`` of the
  difference from the same decoded base with ``compress_differences=True``, the NNR
  parent-node signalling of an incremental update, at several ``qp``; the decoded
  difference is added to the base).
* **quality**, held out from the fine-tune: mean cosine between the embeddings of the
  decoded model and of the (uncompressed) fine-tuned model on the 64 everyday sentences
  (:data:`bench.sentences.EVERYDAY`) and the 80 rare-word ones (:data:`bench.sentences.RARE`),
  neither seen in training. For scale: the fine-tune itself moves the embeddings to the
  cosines given in the report's first lines.

Writes ``<out>/updates_minilm.md`` and ``<out>/updates_minilm.png``. The fine-tuned weights are cached in
``--cache`` (default: a temporary folder). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import codec  # noqa: E402
from bench import minilm, sentences  # noqa: E402

UPDATE_BITS = (0.05, 0.2, 1.0)
NNCODEC_QPS = (-36, -44, -52)
BATCH, LR, WEIGHT_DECAY, SCALE, MAX_LENGTH, DROP = 8, 5e-5, 0.01, 20.0, 48, 0.7
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def fine_tune(steps: int, cache: Path) -> dict[str, torch.Tensor]:
    """The sentence-pair fine-tune (module docstring); the float weights, cached by ``steps``."""
    path = cache / f"minilm_pairs_{steps}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    from transformers import AutoModel

    torch.manual_seed(0)
    tok = sentences.tokenizer()
    model = AutoModel.from_pretrained(str(minilm.model_dir())).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    texts = list(sentences.CALIBRATION)
    rng = np.random.default_rng(0)
    order: list[int] = []
    for step in range(steps):
        if len(order) < BATCH:
            order += list(rng.permutation(len(texts)))
        batch = [texts[i] for i in order[:BATCH]]
        del order[:BATCH]
        halves = []
        for text in batch:
            words = text.split()
            keep = rng.random(len(words)) >= DROP
            kept = [w for w, k in zip(words, keep) if k] or words[:1]
            halves.append(" ".join(kept[i] for i in rng.permutation(len(kept))))
        enc = tok(batch + halves, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        logits = SCALE * emb[:BATCH] @ emb[BATCH:].T
        target = torch.arange(BATCH)
        loss = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"fine-tune step {step + 1}/{steps}: loss {loss.item():.4f}")
    keys = set(minilm.load_state_dict())
    out = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    torch.save(out, path)
    return out


def cosines(state_dict, reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean cosine of ``state_dict``'s embeddings against ``reference`` embeddings, per evaluation set."""
    return {name: float(np.mean(np.sum(minilm.embed(state_dict, list(texts)) * reference[name], axis=1)))
            for name, texts in sentences.EVALUATION.items()}


def nncodec_update(diff: dict[str, np.ndarray], qp: int) -> tuple[int, dict[str, np.ndarray]]:
    """NNCodec's differential update of ``diff`` at ``qp``: (bitstream bytes, decoded difference). A tensor whose
    quantized difference is all zero gets no NNR unit (decoded: zero)."""
    from bench.peers import _import_nncodec

    nnc = _import_nncodec()

    def state() -> dict:  # the per-side state of an update sequence, as nncodec's federated client keeps it
        return {"parameters": {}, "put_node_depth": {}, "device_id": 0, "parameter_id": {}}

    params = {k: np.array(v, np.float32, order="C", ndmin=1) for k, v in diff.items()}
    bitstream = nnc.compress(params, bitstream_path=None, qp=qp, return_bitstream=True, verbose=False,
                             compress_differences=True, approx_param_base=state())
    decoded = nnc.decompress(bitstream, verbose=False, approx_param_base=state(), update_base_param=True)
    # a tensor whose difference quantizes to all zeros is skipped (its NNR unit says "unchanged"): zero difference
    return len(bitstream), {k: np.array(decoded[k], np.float32).reshape(np.shape(v)) if k in decoded
                            else np.zeros(np.shape(v), np.float32) for k, v in diff.items()}


def run(steps: int, work: Path, cache: Path, with_nncodec: bool, full_bits: tuple[float, ...] = (),
        update_bits: tuple[float, ...] = UPDATE_BITS) -> dict:
    torch.set_num_threads(2)
    old = minilm.load_state_dict()
    t = time.process_time()
    new = fine_tune(steps, cache)
    tune_cpu = time.process_time() - t
    n = sum(v.numel() for v in new.values())
    change = {k: float((new[k] - old[k]).norm() / old[k].norm().clamp_min(1e-30)) for k in old}
    reference = {name: minilm.embed(new, list(texts)) for name, texts in sentences.EVALUATION.items()}
    moved = cosines(old, reference)
    log(f"fine-tuned ({tune_cpu:.0f} CPU s): cosine of the original to it {moved}")
    base_path = work / "base.jwt"
    codec.save(old, base_path)
    base = codec.load(base_path)
    rows = []

    def point(method: str, size: int, seconds: float, state_dict) -> None:
        row = {"method": method, "bytes": size, "bpw": 8 * size / n, "seconds": seconds,
               **cosines(state_dict, reference)}
        rows.append(row)
        log(f"{method}: {size:,} bytes, {row['bpw']:.4f} bits/weight, cosine everyday {row['everyday']:.5f}, "
            f"rare {row['rare']:.5f}, {seconds:.1f} CPU s")
        saved(len(rows))

    def saved(row_count: int) -> None:  # what is measured so far, for --report-only after an interrupted run
        (cache / "result_minilm.json").write_text(json.dumps(
            {"steps": steps, "weights": n, "tune_cpu": tune_cpu, "moved": moved, "rows": rows[:row_count],
             "change": change, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "minutes": (time.perf_counter() - STARTED) / 60}))

    point("base as the receiver holds it (no update)", 0, 0.0, base)
    for label, opts in [("full default", {})] + [(f"full -b {b}", {"bits_per_weight": b}) for b in full_bits]:
        path = work / "full.jwt"
        t = time.process_time()
        codec.save(new, path, **opts)
        point(label, path.stat().st_size, time.process_time() - t, codec.load(path))
    for label, opts in [("update default", {})] + [(f"update -b {b}", {"bits_per_weight": b}) for b in update_bits]:
        path = work / "update.jwt"
        t = time.process_time()
        codec.save(new, path, base=base_path, **opts)
        point(label, path.stat().st_size, time.process_time() - t, codec.load(path, base=base_path))
    if with_nncodec:
        diff = {k: (new[k] - base[k]).numpy() for k in new}
        for qp in NNCODEC_QPS:
            t = time.process_time()
            size, decoded = nncodec_update(diff, qp)
            point(f"nncodec update qp {qp}", size, time.process_time() - t,
                  {k: base[k] + torch.from_numpy(decoded[k]) for k in new})
    saved(len(rows))
    return json.loads((cache / "result_minilm.json").read_text())


def nncodec_rows(steps: int, cache: Path) -> list[dict]:
    """NNCodec's differential updates of the cached fine-tune against the decoded default .jwt of the original."""
    torch.set_num_threads(2)
    new = fine_tune(steps, cache)
    n = sum(v.numel() for v in new.values())
    reference = {name: minilm.embed(new, list(texts)) for name, texts in sentences.EVALUATION.items()}
    with tempfile.TemporaryDirectory() as tmp:
        codec.save(minilm.load_state_dict(), Path(tmp) / "base.jwt")
        base = codec.load(Path(tmp) / "base.jwt")
    diff = {k: (new[k] - base[k]).numpy() for k in new}
    rows = []
    for qp in NNCODEC_QPS:
        t = time.process_time()
        size, decoded = nncodec_update(diff, qp)
        seconds = time.process_time() - t
        rows.append({"method": f"nncodec update qp {qp}", "bytes": size, "bpw": 8 * size / n, "seconds": seconds,
                     **cosines({k: base[k] + torch.from_numpy(decoded[k]) for k in new}, reference)})
        log(f"nncodec qp {qp}: {size:,} bytes, {rows[-1]}")
    return rows


def write(result: dict, out: Path, minutes: float) -> None:
    rows = result["rows"]
    full = next((r for r in rows if r["method"] == "full default"), None)  # None: an interrupted run
    ch = sorted(result["change"].values())
    lines = ["# Updates: all-MiniLM-L6-v2 after a short fine-tune", "",
             f"Generated by `python -m bench.updates_minilm --steps {result['steps']}` ({minutes:.1f} min on this "
             f"machine, peak RSS {result['peak_rss_mb']:.0f} MB). Fine-tune: each of the 125 sentences of "
             "`bench/sentences/calibration.txt` paired with a shuffled copy keeping 30 % of its words, in-batch "
             f"contrastive loss (scale {SCALE:g}), {result['steps']} steps of {BATCH} pairs, AdamW lr {LR}, weight "
             f"decay {WEIGHT_DECAY} ({result['tune_cpu']:.0f} CPU s). Relative change of the tensors "
             f"(||new - old|| / ||old||): median {ch[len(ch) // 2]:.4f}, largest {ch[-1]:.4f}. "
             "Quality: mean cosine between the embeddings of the decoded model and of the fine-tuned model, on the "
             "64 everyday and the 80 rare-word sentences (both held out from the fine-tune). The original model "
             f"scores {result['moved']['everyday']:.4f} (everyday) and {result['moved']['rare']:.4f} (rare) "
             "against the fine-tuned one: what the update has to carry.", "",
             "The receiver holds the decoded default-setting .jwt of the original (the first row: the fine-tune "
             "not sent at all). Bits per weight count the whole file over the model's "
             f"{result['weights']:,} weights. Seconds are encode + decode CPU seconds for NNCodec, encode CPU "
             "seconds for jwt.", "",
             "| method | bytes | bits/weight | % of full default | cosine everyday | cosine rare | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * r['bytes'] / full['bytes']:.2f}" if full else "-"
        lines.append(f"| {r['method']} | {r['bytes']:,} | {r['bpw']:.4f} | {share} | "
                     f"{r['everyday']:.5f} | {r['rare']:.5f} | {r['seconds']:.1f} |")
    lines += ["", "NNCodec 2.1.3 has the NNR incremental mode: `nnc.compress(..., compress_differences=True)` "
              "signals the bitstream as a differential update of a parent model (and `tca=True` adds temporal "
              "context adaptation, which conditions the entropy coder on the previous update's quantized values: it "
              "needs a sequence of updates and is not used for this single one). It codes the difference it is "
              "given; adding the decoded difference to the base is the caller's job, as here. Its size is the "
              "whole bitstream.", ""]
    (out / "updates_minilm.md").write_text("\n".join(lines), encoding="utf-8")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, name in zip(axes, ("everyday", "rare")):
        for prefix, style in (("update", "o-"), ("full", "s--"), ("nncodec", "^-")):
            pts = sorted((r["bpw"], 1 - r[name]) for r in rows  # cosine 1.0 (rounded) has no place on a log axis
                         if r["method"].startswith(prefix) and 1 - r[name] > 0)
            if pts:
                ax.plot(*zip(*pts), style, label={"update": "jwt update", "full": "jwt full model",
                                                   "nncodec": "NNCodec differential update"}[prefix])
        ax.axhline(1 - rows[0][name], color="grey", ls=":", lw=0.8, label="base, no update")
        ax.set(xscale="log", yscale="log", xlabel="bits per weight (whole file)", ylabel="1 - cosine to fine-tuned",
               title=f"MiniLM fine-tune update: {name} sentences (held out)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "updates_minilm.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--cache", type=Path, default=None, help="folder for the fine-tuned weights")
    parser.add_argument("--skip-nncodec", action="store_true", help="leave NNCodec's differential update out")
    parser.add_argument("--full-bits", type=float, nargs="*", default=[], help="budgets of full files (-b)")
    parser.add_argument("--only-nncodec", action="store_true",
                        help="measure NNCodec's rows alone (the fine-tune cached in --cache), kept for the report")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from what --cache holds (e.g. after an interrupted run)")
    parser.add_argument("--update-bits", type=float, nargs="*", default=list(UPDATE_BITS), help="budgets of updates")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        if args.only_nncodec:
            (cache / "result_minilm_nncodec.json").write_text(json.dumps(nncodec_rows(args.steps, cache)))
        elif not args.report_only:
            run(args.steps, Path(tmp), cache, not args.skip_nncodec, tuple(args.full_bits),
                tuple(args.update_bits))
        result = json.loads((cache / "result_minilm.json").read_text())
        extra = cache / "result_minilm_nncodec.json"  # NNCodec's rows when measured by a separate --only-nncodec run
        if extra.exists() and not any(r["method"].startswith("nncodec") for r in result["rows"]):
            result["rows"] += json.loads(extra.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    write(result, args.out, result["minutes"])
    log(f"wrote {args.out / 'updates_minilm.md'} and {args.out / 'updates_minilm.png'}")


if __name__ == "__main__":
    main()
