"""Mixture-of-experts folders through ``jwt encode --calibration`` (issue 9, bench/JOURNAL.md, moe, twenty-second pass).

Builds random-init Hugging Face folders (2 layers, hidden 64, 8 experts, top 2, tied embeddings, all-MiniLM-L6-v2's
tokenizer files beside): Mixtral (``mixtral``) and Qwen2-MoE with a shared expert (``qwen2_moe``). Each is encoded
by the command line at each ``--bits`` in three ways:

- ``data-free``: ``jwt encode FOLDER -b B``;
- ``experts data-free``: ``--calibration`` with the experts and routers unmeasured (what ``codec.save`` did before
  this pass: they were "a layer kind calibration does not measure"): the command runs with
  ``codec.rd.calibrate.moe_modules`` patched to find none;
- ``per expert``: ``--calibration`` as it is now.

(``--unreached N`` adds two runs where no calibration token is routed to expert 0 of each layer (the routers'
logits for it set to -inf during calibration only), with :data:`codec.rd.calibrate.UNREACHED` "mean" and
"data-free"; ``--api`` two runs of ``codec.save(model, path, bits_per_weight=B, calibration=...)``, the model's own
3D tensors, no attachments, with the experts and routers unmeasured and measured.)

Calibration: ``bench/sentences/calibration.txt``. Scored on the 144 evaluation sentences of
:mod:`bench.sentences` (everyday and rare): the folder ``jwt decode -o DIR/`` writes is loaded with
``from_pretrained`` and compared with the float model: the logits' relative error (over the real tokens), the
top-1 agreement of next-token predictions (and that without each sentence's first position, one [CLS] context
repeated 144 times), and the share of (token, layer) routes whose top-k set of experts changed. The encode runs as
a child process: its CPU seconds (user + system) and peak RSS (its ``VmHWM``) are its own. The models are
untrained: the figures say that the path works and how the weightings compare, not what a trained MoE keeps.
``--router-noise R ...`` only gives the routers' weights Gaussian noise of relative RMS R (routes and logits).

    OMP_NUM_THREADS=1 python -m bench.moe --work /tmp/moe/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "bench" / "sentences" / "calibration.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MODES = ("data-free", "experts data-free", "per expert")
#: ``--api``: the same through ``codec.save(model, ...)`` (the model's 3D tensors, no tokenizer attachments)
API_MODES = ("api experts data-free", "api per expert")

# patches run in the encoding child before the command line's main()
_NO_MOE = "import codec.rd.calibrate as c; c.moe_modules = lambda model: ({}, {})\n"
_UNREACHED = """
import torch, codec.rd.calibrate as c
from codec.rd.experts import moe_modules
c.UNREACHED = {how!r}
_calibrate = c.calibrate
def _hook(module, args, output):
    logits, _, index = output
    logits = logits.clone()
    logits[:, 0] = float("-inf")
    top = torch.softmax(logits.float(), dim=-1).topk(index.shape[-1], dim=-1)
    return output[0], top.values / top.values.sum(-1, keepdim=True), top.indices
def calibrate(model, *a, **k):
    handles = [r.register_forward_hook(_hook) for r in moe_modules(model)[1].values()]
    try:
        return _calibrate(model, *a, **k)
    finally:
        for h in handles: h.remove()
c.calibrate = calibrate
"""


def make_folder(family: str, folder: Path) -> Path:
    """A random-init ``family`` folder (seed 0) with all-MiniLM-L6-v2's tokenizer files."""
    import transformers as T

    from bench.minilm import model_dir

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = T.MixtralConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                              tie_word_embeddings=True)
        model = T.MixtralForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(vocab_size=30522, hidden_size=64, moe_intermediate_size=64,
                               shared_expert_intermediate_size=128, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                               tie_word_embeddings=True, decoder_sparse_step=1, mlp_only_layers=[])
        model = T.Qwen2MoeForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown family {family!r}")
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (model_dir() / name).is_file():
            shutil.copy(model_dir() / name, folder / name)
    return folder


def encode(folder: Path, out: Path, bits: float, mode: str, unreached: str | None = None) -> dict:
    """Run ``jwt encode`` in a child; its bits/weight, CPU seconds, peak RSS and wall time."""
    args = [str(folder), "-b", str(bits), "-o", str(out)]
    if mode != "data-free":
        args += ["--calibration", str(CALIBRATION)]
    patch = _NO_MOE if mode.endswith("experts data-free") else ""
    if unreached is not None:
        patch = _UNREACHED.format(how=unreached)
    run = f"from jwt_cli.main import main\nsys.argv = ['jwt', 'encode', *{args!r}]\nmain()\n"
    if mode.startswith("api"):  # codec.save(model, ...) of the model's own (merged) tensors: no attachments
        run = (f"import codec, transformers as T\nfrom jwt_cli.calibration import TextBatches, read_lines\n"
               f"from pathlib import Path\nfolder = Path({str(folder)!r})\n"
               f"model = T.AutoModelForCausalLM.from_pretrained(folder)\n"
               f"texts = TextBatches(T.AutoTokenizer.from_pretrained(folder), read_lines(Path({str(CALIBRATION)!r})))\n"
               f"for n in codec.save(model, {str(out)!r}, bits_per_weight={bits}, calibration=texts): print(n)\n")
    hwm = out.with_suffix(".hwm")  # the child's own peak RSS: ru_maxrss carries the parent's over fork and exec
    code = (f"import sys, atexit\n"
            f"atexit.register(lambda: open({str(hwm)!r}, 'w').write(next(ln for ln in open('/proc/self/status') "
            f"if ln.startswith('VmHWM'))))\n"
            f"{patch}{run}")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"jwt encode {folder} ({mode}) failed:\n{output}")
    weights = _weights(folder)
    return {"bits": 8 * out.stat().st_size / weights, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_mb": int(hwm.read_text().split()[1]) / 1024, "wall_s": wall,
            "notes": [ln for ln in output.splitlines() if ln]}


def _weights(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def decode(path: Path, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    subprocess.run([sys.executable, "-m", "jwt_cli", "decode", str(path), "-o", f"{folder}/"], check=True,
                   stdout=subprocess.DEVNULL)
    return folder


class Runs:
    """The float model's logits and routes on the evaluation sentences, and scores of a decoded folder."""

    def __init__(self, folder: Path):
        import transformers as T

        from bench.sentences import EVERYDAY, RARE

        self.tokenizer = T.AutoTokenizer.from_pretrained(folder)
        self.batches = [self.tokenizer(list(s[i:i + 16]), return_tensors="pt", padding=True)
                        for s in (EVERYDAY, RARE) for i in range(0, len(s), 16)]
        self.reference = self.run(T.AutoModelForCausalLM.from_pretrained(folder))

    def run(self, model) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        from codec.rd.experts import moe_modules

        model.eval()
        out = []
        routes: list[torch.Tensor] = []
        hooks = [r.register_forward_hook(lambda m, a, o: routes.append(o[2].sort(-1).values))
                 for r in moe_modules(model)[1].values()]
        try:
            with torch.no_grad():
                for batch in self.batches:
                    routes.clear()
                    mask = batch["attention_mask"].bool()
                    logits = model(**batch).logits
                    later = mask.clone()
                    later[:, 0] = False  # the first position ([CLS] in every sentence: one context, 144 times)
                    out.append((logits[mask], [r[mask.reshape(-1)] for r in routes], logits[later].argmax(-1)))
        finally:
            for h in hooks:
                h.remove()
        return out

    def score(self, folder: Path, path: Path | None = None) -> dict:
        """Scores of the folder ``jwt decode`` wrote, or, with ``path``, of ``folder``'s model given the file's
        tensors (a file of the model's own names: the API's)."""
        import transformers as T

        import codec

        model = T.AutoModelForCausalLM.from_pretrained(folder)
        if path is not None:
            model.load_state_dict(codec.load(path), strict=True)
        got = self.run(model)
        num = den = agree = tokens = flips = routes = later = later_tokens = 0.0
        for (ref, ref_routes, ref_later), (new, new_routes, new_later) in zip(self.reference, got):
            later += float((ref_later == new_later).sum())
            later_tokens += len(ref_later)
            num += float((new - ref).double().pow(2).sum())
            den += float(ref.double().pow(2).sum())
            agree += float((new.argmax(-1) == ref.argmax(-1)).sum())
            tokens += ref.shape[0]
            for a, b in zip(ref_routes, new_routes):
                flips += float((a != b).any(-1).sum())
                routes += a.shape[0]
        return {"logits_rel_error": (num / den) ** 0.5, "top1_agreement": agree / tokens,
                "top1_after_first": later / later_tokens,
                "route_flips": flips / max(routes, 1)}


def router_noise(runs: Runs, folder: Path, levels: list[float]) -> list[dict]:
    """The routers' weights alone given Gaussian noise of each relative RMS in ``levels`` (seed 0): what a coding
    error of that size in the router does to the routes and the logits (everything else float)."""
    import transformers as T

    from codec.rd.experts import moe_modules

    rows = []
    for level in levels:
        model = T.AutoModelForCausalLM.from_pretrained(folder)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for router in moe_modules(model)[1].values():
                w = router.weight
                w += level * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g)
        got = runs.run(model)
        flips = sum(float((a != b).any(-1).sum()) for r, n in zip(runs.reference, got) for a, b in zip(r[1], n[1]))
        routes = sum(a.shape[0] for r in runs.reference for a in r[1])
        num = sum(float((n[0] - r[0]).double().pow(2).sum()) for r, n in zip(runs.reference, got))
        den = sum(float(r[0].double().pow(2).sum()) for r in runs.reference)
        rows.append({"router_noise": level, "route_flips": flips / routes, "logits_rel_error": (num / den) ** 0.5})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/jwt-bench-moe"))
    parser.add_argument("--families", nargs="+", default=["mixtral", "qwen2_moe"])
    parser.add_argument("--bits", nargs="+", type=float, default=[3.0, 2.5])
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--unreached", action="store_true", help="also the two runs with expert 0 unreached")
    parser.add_argument("--api", action="store_true", help="also codec.save(model, ...) with and without experts")
    parser.add_argument("--router-noise", nargs="*", type=float, default=None,
                        help="only: the routers given noise of these relative RMS values, nothing encoded")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families:
        folder = make_folder(family, args.work / family)
        runs = Runs(folder)
        if args.router_noise is not None:
            for row in router_noise(runs, folder, args.router_noise):
                print(json.dumps({"family": family, **{k: round(v, 4) for k, v in row.items()}}), flush=True)
            continue
        plans = [(bits, mode, None) for bits in args.bits for mode in args.modes]
        if args.api:
            plans += [(bits, mode, None) for bits in args.bits for mode in API_MODES]
        if args.unreached:
            plans += [(bits, f"expert 0 unreached, {how}", how) for bits in args.bits for how in ("mean", "data-free")]
        for bits, mode, how in plans:
            tag = f"{family}-{bits}-{mode.replace(' ', '_').replace(',', '')}"
            path = args.work / f"{tag}.jwt"
            row = {"family": family, "bits_asked": bits, "mode": mode,
                   **encode(folder, path, bits, "per expert" if how else mode, how)}
            if mode.startswith("api"):
                row.update(runs.score(folder, path))
            else:
                row.update(runs.score(decode(path, args.work / f"{tag}.dec")))
            results.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "notes"}), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
