"""all-MiniLM-L6-v2 with the codec in the loop: does distillation on unlabelled sentences beat post-training coding?

1. The post-training path: ``codec.save(state, bits_per_weight=B)`` (the data-free fast search), scored by the
   mean cosine of the decoded model's sentence embeddings to the original's on the everyday and the rare-word
   sentence sets (:func:`bench.minilm.cosine_quality`).
2. The same per-tensor settings, read back from that file, held fixed while :func:`codec.train.finetune`
   distils the original model's pooled, normalised embeddings (no labels) on the calibration sentences
   (``bench.sentences.CALIBRATION``, disjoint from both evaluation sets), with every weight passed through its real
   encode/decode in the forward pass; then saved with those settings and scored the same way.

The student and the teacher both start from the original float weights (:func:`original_bert`). With
``--calibrated`` the post-training path is the one with data (issue 9): ``codec.save(model, bits_per_weight=B,
calibration=bench.sentences.calibration_batches())``, calibration + rate search + repair, on the same calibration
sentences distillation trains on; distillation takes that file's per-tensor settings, and with ``--start file`` its
student starts from the file's decoded values (repair's error-compensated weights, refitted biases and norms as
coded) while the teacher stays the original model (``finetune(teacher=...)``). With ``--text generated``
distillation trains on 4,000 more sentences made offline from the calibration sentences and the vocabulary
(:mod:`bench.distil_text`) and ends on its best step by held-out text, whose cosine every row then shows. Prints one
table row per path and rate: bits/weight, cosine everyday / rare, CPU seconds (worker processes included); peak RSS::

    python -m bench.train_minilm --bits 4.5 --bits 4.75 --steps 40 --refresh 10 --lr 1e-5
    python -m bench.train_minilm --calibrated --start file --bits 4.5
    python -m bench.train_minilm --calibrated --text generated --start file --steps 400 --bits 4.375
"""

from __future__ import annotations

import argparse
import copy
import io
import itertools
import os
import resource
import time

import torch
import torch.nn.functional as F

import codec
import codec.train
from codec.rd.repair import RepairSettings
from bench import minilm
from bench import distil_text
from bench.sentences import CALIBRATION, EVERYDAY, RARE, calibration_batches


def setting_of(entry) -> str:
    """The per-tensor setting string (``codec.train.as_setting``'s form) a file's index entry was coded with."""
    config, tiling = entry.codec.get_config(), entry.tiling
    if not entry.codec.lossy:
        return "lossless"
    size = f"{tiling.tile_h}x{tiling.tile_w}"
    shape = f",rows={size}" if tiling.mode == "rows" else f",tile={size}"
    if config["id"] == "jpeg" and isinstance(config["table"], list):  # a table between two qualities (scale)
        return _scaled_jpeg(entry.name, config, tiling.mode, shape)
    if config["id"] == "jpeg":
        return f"jpeg,q{config['quality']},table={config['table']}{shape}"
    if config["id"] == "quant":
        return f"b{config['bits']}{shape}"
    raise ValueError(f"{entry.name}: no setting string for codec {config['id']!r}")


def _scaled_jpeg(name: str, config: dict, mode: str, shape: str) -> str:
    """The setting string (``jpeg,qX.Y,table=KIND``) of a JPEG entry whose table is stored as its 64 entries (a
    scale between two qualities: codec.rd.ladder): the named base table and scale that give those entries, written
    as the fractional quality :func:`codec.tensorcodec.parse_spec` reads back to the same codec (checked)."""
    from codec.blobcodecs.jpeg import quality_scale, scaled_table
    from codec.tensorcodec import EncodeOptions, parse_spec

    for kind in ("flat", "jpeg"):
        for scale in range(1, quality_scale(1) + 1):
            if scaled_table(kind, scale) != config["table"]:
                continue
            q = 5000 / scale if scale > 100 else (200 - scale) / 2
            spec = f"jpeg,q{q!r},table={kind}{shape}"
            if parse_spec(spec, EncodeOptions()).image_codec(mode).get_config() == config:
                return spec
    raise ValueError(f"{name}: no setting string gives its JPEG table {config['table']}")


def significand_bits(t: torch.Tensor) -> int | None:
    """The significand bits a float32 tensor's values use (after the leading one): a file's lossless vector that
    the rate search rounded (``EncodeOptions.significand_bits``) holds zeros below them; None: all 23 (not rounded,
    or not float32)."""
    if t.dtype != torch.float32:
        return None
    mantissa = t.contiguous().view(torch.int32) & 0x7FFFFF
    mantissa = mantissa[mantissa != 0]
    if mantissa.numel() == 0:
        return 1
    low = int((mantissa & -mantissa).min())  # the lowest set bit over all values
    bits = 23 - (low.bit_length() - 1)
    return None if bits >= 23 else bits


class Embed(torch.nn.Module):
    """The sentence-transformers pipeline as one module: BERT, mean pooling over the mask, L2 normalisation."""

    def __init__(self, bert: torch.nn.Module, tokens: bool = False):
        super().__init__()
        self.bert = bert
        self.tokens = tokens

    def forward(self, batch: dict) -> torch.Tensor:
        """The pooled, normalised embeddings; with ``tokens``, the last hidden state of every token instead (padding
        zeroed): a distillation target of a value per token rather than per sentence."""
        out = self.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        if self.tokens:
            return out * mask
        return F.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


def original_bert() -> torch.nn.Module:
    """A float32 copy of the model's BERT holding the original weights, in eval mode.

    Loaded explicitly: :func:`bench.minilm.cosine_quality` leaves the weights it last scored in the shared model,
    so a copy of that model taken after scoring the post-training file held the *coded* weights, and the teacher
    finetune copies from it was the coded model: distillation then had nothing to learn (no gain last pass)."""
    bert = copy.deepcopy(minilm._model()[0].auto_model).float().eval()
    bert.load_state_dict(minilm.load_state_dict(), strict=False)  # the position_ids buffer is not in the file
    return bert


def _score(blob: bytes, weights: int, held: list[str] | None = None) -> dict[str, float]:
    """bits/weight and the cosines on both evaluation sets; with ``held``, also on that held-out text."""
    decoded = codec.load(blob)
    score = {"bpw": 8 * len(blob) / weights, "everyday": minilm.cosine_quality(decoded, EVERYDAY),
             "rare": minilm.cosine_quality(decoded, RARE)}
    if held:
        score["held"] = minilm.cosine_quality(decoded, held)
    return score


def tokenized(sentences: list[str], batch: int, shuffle: int | None = None) -> list[dict]:
    """``sentences`` tokenized in batches of ``batch`` (padded, at most 64 tokens); ``shuffle``: a seed to shuffle
    them with first (the generated text: each batch mixes its recipes), None: in order."""
    import random

    sentences = list(sentences)
    if shuffle is not None:
        random.Random(shuffle).shuffle(sentences)
    tokenizer = minilm._model().tokenizer
    return [dict(tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")) for i in range(0, len(sentences), batch)]


def mixed(batches: list[dict], fraction: float, vocab: int, seed: int = 0) -> list[dict]:
    """``batches`` followed by a copy of each in which every word-piece (not [CLS], [SEP] or padding) is replaced,
    with probability ``fraction``, by a random token of the vocabulary (ids from 999 up: the [unused] ids below
    are never seen): unlabelled "text" that reaches embedding rows the training sentences do not use."""
    generator = torch.Generator().manual_seed(seed)
    out = list(batches)
    for batch in batches:
        ids = batch["input_ids"].clone()
        inner = batch["attention_mask"].bool() & (ids != ids[:, :1]) & (ids != 102)  # 101 [CLS], 102 [SEP]
        swap = inner & (torch.rand(ids.shape, generator=generator) < fraction)
        ids[swap] = torch.randint(999, vocab, (int(swap.sum()),), generator=generator)
        out.append({**batch, "input_ids": ids})
    return out


def training_text(text: str, sentences: int = 4000, batch: int = 16, mix: float = 0.0
                  ) -> tuple[list[str], list[dict], list[dict] | None]:
    """``(sentences, batches, check batches)`` of ``--text``: ``"calibration"``, the 125 calibration sentences in
    order (with ``mix``, :func:`mixed` copies too) and no check; ``"generated"``, the training four fifths of them and
    ``sentences`` more made from those (:func:`bench.distil_text.training_text`), shuffled, and the held-out text
    (:func:`bench.distil_text.held_out_text`) as the check finetune keeps its best step by."""
    if text == "generated":
        made = distil_text.training_text(sentences)
        return made, tokenized(made, batch, shuffle=0), tokenized(distil_text.held_out_text(), batch)
    if text != "calibration":
        raise ValueError(f"--text: 'calibration' or 'generated', not {text!r}")
    batches = tokenized(list(CALIBRATION), batch)
    if mix:
        batches = mixed(batches, mix, minilm._model().tokenizer.vocab_size)
    return list(CALIBRATION), batches, None


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the rate search's worker processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def distilled(state: dict, overrides: dict, batches: list, args, lr: float, steps: int, start: dict | None = None,
              vector_bits: dict | None = None, tokens: bool = False, check: list | None = None) -> bytes:
    """The file of the original model distilled with the codec in the loop at ``overrides`` (every tensor's setting
    of the post-training file), saved with the same settings. ``start``: the student's starting weights (a decoded
    file's ``{name: tensor}``; None: the original ones); the teacher is the original model either way.
    ``vector_bits``: ``{name: bits}`` of the tensors the post-training file stores losslessly with their
    significands rounded (:func:`significand_bits`), rounded so in the distilled model before it is saved.
    ``tokens``: distil every token's last hidden state rather than the pooled embedding (:class:`Embed`).
    ``check``: held-out batches (``--text generated``): finetune checks the coded model on them ``args.checks``
    times and ends on the best weights it saw (the start's included); None: no check, the last weights."""
    bert = original_bert()
    teacher = None
    if start is not None:
        teacher = Embed(original_bert(), tokens)
        bert.load_state_dict({k: v.float() for k, v in start.items() if k in state}, strict=False)
    codec.train.finetune(Embed(bert, tokens), batches, None, steps=steps, lr=lr, refresh=args.refresh,
                         overrides={f"bert.{k}": v for k, v in overrides.items()}, progress=True,
                         train_mode=True if args.dropout else None, teacher=teacher,
                         validation=check if check else False,  # else compared with the post-training file only
                         check_every=max(1, steps // args.checks) if check and steps else None)
    with torch.no_grad():
        for name, bits in (vector_bits or {}).items():
            tensor = bert.get_parameter(name)
            tensor.copy_(codec.train.round_vector(tensor, bits))
    buf = io.BytesIO()
    codec.save({k: v for k, v in bert.state_dict().items() if k in state}, buf, overrides=overrides)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=float, action="append", help="bits/weight of the post-training search "
                        "(several: a post-training file and a distilled one at each; default 4)")
    parser.add_argument("--steps", type=int, action="append", help="distillation steps with the codec in the loop "
                        "(several: a distillation run for each; default 40)")
    parser.add_argument("--refresh", type=int, default=10, help="code the weights every REFRESH steps")
    parser.add_argument("--lr", type=float, action="append", help="Adam learning rate (several: a distillation "
                        "run for each; default 1e-5, the best of 5e-6 to 1e-4 at -b 4.5)")
    parser.add_argument("--batch", type=int, default=16, help="sentences per step")
    parser.add_argument("--mix", type=float, default=0.0, help="also train on a copy of each batch with this "
                        "fraction of its word-pieces replaced by random vocabulary tokens (0: none)")
    parser.add_argument("--calibrated", action="store_true", help="the post-training path with data: calibration "
                        "and repair on the calibration sentences (codec.save(..., calibration=...)), as "
                        "bench.calibrated_memory does; the default is the data-free search")
    parser.add_argument("--start", choices=("original", "file"), action="append", help="the student's "
                        "starting weights: the original ones (default), or the post-training file's decoded values "
                        "(with --calibrated: repair's); several: a distillation from each; the teacher is the "
                        "original model either way")
    parser.add_argument("--target", choices=("pooled", "tokens"), action="append", help="what distillation "
                        "matches: the pooled, normalised sentence embedding (default) or every token's last hidden "
                        "state (padding left out); several: a distillation run for each")
    parser.add_argument("--repair-steps", type=int, action="append", help="with --calibrated: also a file whose "
                        "repair ends with its own codec-in-the-loop distillation of this many steps "
                        "(RepairSettings.finetune_steps: from repair's values, the quant tensors and vectors trained, "
                        "kept only if the held-out calibration batches improve); several: a file for each")
    parser.add_argument("--repair-lr", type=float, default=1e-4, help="Adam lr of --repair-steps (repair's default)")
    parser.add_argument("--text", choices=("calibration", "generated"), action="append", help="what "
                        "distillation trains on: the 125 calibration sentences (default), or the training four fifths "
                        "of them and --sentences more made from those and the vocabulary (bench.distil_text), "
                        "checked on held-out text made from the other fifth (the best step kept); several: a "
                        "distillation run for each. With generated text every file's held-out cosine is printed")
    parser.add_argument("--sentences", type=int, default=4000, help="generated sentences with --text generated")
    parser.add_argument("--checks", type=int, default=5, help="held-out checks in a run with --text generated")
    parser.add_argument("--dropout", action="store_true", help="distil with dropout on (the model in training "
                        "mode; the default is eval mode, as the teacher): an ablation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    state = minilm.load_state_dict()
    weights = sum(t.numel() for t in state.values())
    texts = {text: training_text(text, args.sentences, args.batch, args.mix) for text in args.text or ["calibration"]}
    held = distil_text.held_out_text() if "generated" in texts else None
    rows = []
    for bits in args.bits or [4.0]:
        started = _cpu()
        buf = io.BytesIO()
        if args.calibrated:
            codec.save(original_bert(), buf, bits_per_weight=bits, calibration=calibration_batches())
        else:
            codec.save(state, buf, bits_per_weight=bits)
        post = buf.getvalue()
        rows.append((bits, "post-training" + (", calibrated + repair" if args.calibrated else ""),
                     _score(post, weights, held), _cpu() - started))
        print(_row(*rows[-1]), flush=True)
        for steps in args.repair_steps or [] if args.calibrated else []:
            started = _cpu()
            tuned = io.BytesIO()
            codec.save(original_bert(), tuned, bits_per_weight=bits, calibration=calibration_batches(),
                       repair=RepairSettings(finetune_steps=steps, finetune_lr=args.repair_lr))
            rows.append((bits, f"calibrated + repair + repair's codec-in-the-loop distillation, {steps} steps "
                         f"(lr {args.repair_lr:g})", _score(tuned.getvalue(), weights, held), _cpu() - started))
            print(_row(*rows[-1]), flush=True)
        decoded = codec.load(post)
        with codec.open(post) as f:
            overrides = {name: setting_of(f.reader.entry(name)) for name in state}
        rounded = {name: kept for name, setting in overrides.items() if setting == "lossless"
                   and (kept := significand_bits(torch.as_tensor(decoded[name]))) is not None}
        print(f"-b {bits:g}: {len(set(overrides.values()))} settings over {len(overrides)} tensors, "
              f"{len(rounded)} vectors rounded", flush=True)
        starts = [decoded if s == "file" else None for s in args.start or ["original"]]
        for text, lr, start, steps, target in itertools.product(texts, args.lr or [1e-5], starts, args.steps or [40],
                                                                args.target or ["pooled"]):
            sentences, batches, check = texts[text]
            torch.manual_seed(0)
            started = _cpu()
            tokens = target == "tokens"
            blob = distilled(state, overrides, batches, args, lr, steps, start, rounded, tokens, check)
            label = (f"codec in the loop, {steps} steps (refresh {args.refresh}, lr {lr:g}"
                     f"{', from the file' if start is not None else ''}{', token states' if tokens else ''}"
                     f"{', dropout on' if args.dropout else ''}{f', random tokens {args.mix:g}' if args.mix else ''}"
                     f"{f', {len(sentences)} sentences, best of {args.checks} held-out checks' if check else ''})")
            rows.append((bits, label, _score(blob, weights, held), _cpu() - started))
            print(_row(*rows[-1]), flush=True)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nall-MiniLM-L6-v2, training sentences: "
          f"{', '.join(f'{len(t[0])} ({name})' for name, t in texts.items())} in batches of {args.batch}; load average "
          f"{os.getloadavg()[0]:.1f}; peak RSS {peak:.0f} MB\n")
    print("| -b | path | bits/weight | cosine everyday | cosine rare | cosine held out | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(*row))


def _row(bits: float, label: str, score: dict, cpu: float) -> str:
    """One table row: -b, path, bits/weight, both cosines, CPU seconds, and the load average now."""
    held = f"{score['held']:.4f}" if "held" in score else "-"
    return (f"| {bits:g} | {label} | {score['bpw']:.4f} | {score['everyday']:.4f} | {score['rare']:.4f} | {held} | "
            f"{cpu:.1f} (load {os.getloadavg()[0]:.1f}) |")


if __name__ == "__main__":
    main()
