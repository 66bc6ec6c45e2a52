"""all-MiniLM-L6-v2 with the codec in the loop: does distillation on unlabelled sentences beat post-training coding?

1. The post-training path: ``codec.save(state, bits_per_weight=B)`` (the data-free fast search), scored by the
   mean cosine of the decoded model's sentence embeddings to the original's on the everyday and the rare-word
   sentence sets (:func:`bench.minilm.cosine_quality`).
2. The same per-tensor settings, read back from that file, held fixed while :func:`codec.train.finetune`
   distils the original model's pooled, normalised embeddings (no labels) on the calibration sentences
   (``bench.sentences.CALIBRATION``, disjoint from both evaluation sets), with every weight passed through its real
   encode/decode in the forward pass; then saved with those settings and scored the same way.

Prints one table row per path: bits/weight, cosine everyday / rare, CPU seconds, peak RSS::

    python -m bench.train_minilm --bits 4 --steps 40 --refresh 10 --lr 2e-5
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import resource
import time

import torch
import torch.nn.functional as F

import codec
import codec.train
from bench import minilm
from bench.sentences import CALIBRATION, EVERYDAY, RARE


def setting_of(entry) -> str:
    """The per-tensor setting string (``codec.train.as_setting``'s form) a file's index entry was coded with."""
    config, tiling = entry.codec.get_config(), entry.tiling
    if not entry.codec.lossy:
        return "lossless"
    size = f"{tiling.tile_h}x{tiling.tile_w}"
    shape = f",rows={size}" if tiling.mode == "rows" else f",tile={size}"
    if config["id"] == "jpeg":
        return f"jpeg,q{config['quality']},table={config['table']}{shape}"
    if config["id"] == "quant":
        return f"b{config['bits']}{shape}"
    raise ValueError(f"{entry.name}: no setting string for codec {config['id']!r}")


class Embed(torch.nn.Module):
    """The sentence-transformers pipeline as one module: BERT, mean pooling over the mask, L2 normalisation."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


def original_bert() -> torch.nn.Module:
    """A float32 copy of the model's BERT holding the original weights, in eval mode.

    Loaded explicitly: :func:`bench.minilm.cosine_quality` leaves the weights it last scored in the shared model,
    so a copy of that model taken after scoring the post-training file held the *coded* weights, and the teacher
    finetune copies from it was the coded model: distillation then had nothing to learn (no gain last pass)."""
    bert = copy.deepcopy(minilm._model()[0].auto_model).float().eval()
    bert.load_state_dict(minilm.load_state_dict(), strict=False)  # the position_ids buffer is not in the file
    return bert


def _score(blob: bytes, weights: int) -> dict[str, float]:
    decoded = codec.load(blob)
    return {"bpw": 8 * len(blob) / weights, "everyday": minilm.cosine_quality(decoded, EVERYDAY),
            "rare": minilm.cosine_quality(decoded, RARE)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=float, default=4.0, help="bits/weight of the post-training search")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps with the codec in the loop")
    parser.add_argument("--refresh", type=int, default=10, help="code the weights every REFRESH steps")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=16, help="sentences per step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    state = minilm.load_state_dict()
    weights = sum(t.numel() for t in state.values())
    started = time.process_time()
    buf = io.BytesIO()
    codec.save(state, buf, bits_per_weight=args.bits)
    post = buf.getvalue()
    post_cpu = time.process_time() - started
    with codec.open(post) as f:
        overrides = {name: setting_of(f.reader.entry(name)) for name in state}
    rows = [("post-training", _score(post, weights), post_cpu)]

    bert = original_bert()
    sentences = list(CALIBRATION)
    tokenizer = minilm._model().tokenizer
    batches = [dict(tokenizer(sentences[i:i + args.batch], padding=True, truncation=True, max_length=64,
                                 return_tensors="pt")) for i in range(0, len(sentences), args.batch)]
    started = time.process_time()
    codec.train.finetune(Embed(bert), batches, None, steps=args.steps, lr=args.lr, refresh=args.refresh,
                         overrides={f"bert.{k}": v for k, v in overrides.items()}, progress=True)
    buf = io.BytesIO()
    codec.save({k: v for k, v in bert.state_dict().items() if k in state}, buf, overrides=overrides)
    rows.append((f"codec in the loop, {args.steps} steps (refresh {args.refresh}, lr {args.lr:g})",
                 _score(buf.getvalue(), weights), time.process_time() - started))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nall-MiniLM-L6-v2 at -b {args.bits:g}; load average {os.getloadavg()[0]:.1f}; peak RSS {peak:.0f} MB\n")
    print("| path | bits/weight | cosine everyday | cosine rare | CPU s |")
    print("|---|---|---|---|---|")
    for label, score, cpu in rows:
        print(f"| {label} | {score['bpw']:.3f} | {score['everyday']:.4f} | {score['rare']:.4f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
