"""Issues 9 and 10 as a new user checks them: calibrated saves and codec-in-the-loop training on models that are
not in this repository, each built and trained here (minutes, one core; nothing cached in the repository).

* ``mobilenet``: a MobileNet-like CNN (BatchNorm, depthwise-separable convolutions) on Fashion-MNIST:
  ``codec.save(model, path, bits_per_weight=B)`` data-free against ``calibration=`` 1,000 training images (the
  evaluation is the 10,000 test images); then ``codec.train.finetune(model, batches, F.cross_entropy, setting,
  steps)`` with ``penalty=codec.train.rate``, its printed accuracy (the coded weights, ``coded_weights``) against
  the saved file's through ``codec.load``.
* ``rnn``: a GRU + LSTM classifier of Fashion-MNIST rows (calibration measures its Linear layers; it notes the
  GRU and LSTM tensors as coded by the data-free weighting).
* ``autoencoder``: a small convolutional autoencoder with a linear bottleneck and transposed convolutions: mean
  cosine between the decoded model's reconstructions and the float model's on the test images.
* ``gpt2``: a small GPT-2 (``transformers.GPT2LMHeadModel``, 2 layers, 64 wide, tied ``wte`` / ``lm_head``) trained
  a few hundred steps on the repository's sentences (calibration and rare sets; the everyday set is held out):
  next-token agreement with the float model and cosine of the logits on the held-out sentences, data-free against
  calibrated on the calibration sentences (tokenizer dicts); then ``finetune`` on tokenizer dicts with
  ``loss_fn=None`` (distilling the ModelOutput's logits) and the file's agreement against the loop's.
* ``minilm``: all-MiniLM-L6-v2 through the command line, ``jwt encode FOLDER -b B [--calibration
  bench/sentences/calibration.txt]``, cosine on the everyday and rare sentence sets (``bench.minilm``).

``python -m bench.newuser --models mobilenet,rnn`` runs some; the table goes to ``bench/results/newuser.md``
(``--out``). Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import codec
import codec.train
from bench.models import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "newuser.md"
MODELS = ("mobilenet", "rnn", "autoencoder", "gpt2", "minilm")
TRAIN_IMAGES = 20_000  # the first ones train; calibration takes the last CALIB_IMAGES of the training split
CALIB_IMAGES = 1_000


def _images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_fashion_mnist(split)
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(y)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, epochs: int, seed: int, lr: float = 2e-3,
           loss_of=None, batch: int = 128) -> float:
    """Adam on ``(x, y)`` (``y`` None: ``loss_of(model, xb)``), deterministic given ``seed``; CPU seconds taken."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.process_time()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            loss = loss_of(model, x[idx]) if y is None else F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    return time.process_time() - start


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return 100.0 * correct / len(x)


def _save(model: nn.Module, bits: float | None, calibration=None,
          overrides=None) -> tuple[nn.Module, float, list, float]:
    """``(decoded model, bits/weight of the file, notes, seconds)``: codec.save to a file, codec.load back."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.jwt"
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            notes = codec.save(model, path, bits_per_weight=bits, calibration=calibration, overrides=overrides)
        seconds = time.perf_counter() - start
        notes = [str(w.message) for w in caught] + list(notes)
        weights = sum(t.numel() for n, t in _stored(model).items())
        bpw = 8 * path.stat().st_size / weights
        back = copy.deepcopy(model)
        back.load_state_dict(codec.load(path))
    return back.eval(), bpw, notes, seconds


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict less tied second names (what the file counts as weights)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _note_lines(notes: list) -> list[str]:
    return [n for n in map(str, notes) if n.startswith("calibration:") or "Conv1D" in n]


# --- the models ---

class MobileNetLike(nn.Module):
    """A stem conv, three depthwise-separable blocks (depthwise 3x3 + BatchNorm + ReLU, pointwise 1x1 + BatchNorm +
    ReLU; two of stride 2), global average pooling and a linear classifier."""

    def __init__(self):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                    nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                      *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1))
        self.classifier = nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class RowsRNN(nn.Module):
    """Fashion-MNIST rows as a sequence: a linear input projection, a GRU, an LSTM and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(28, 64)
        self.gru = nn.GRU(64, 96, batch_first=True)
        self.lstm = nn.LSTM(96, 96, batch_first=True)
        self.head = nn.Linear(96, 10)

    def forward(self, x):
        h, _ = self.gru(torch.relu(self.proj(x.reshape(-1, 28, 28))))
        h, _ = self.lstm(h)
        return self.head(h[:, -1])


class ConvAutoencoder(nn.Module):
    """Two strided convolutions, a linear bottleneck of 64, two transposed convolutions."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.down, self.up = nn.Linear(32 * 7 * 7, 64), nn.Linear(64, 32 * 7 * 7)
        self.dec = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(16, 1, 4, 2, 1))

    def forward(self, x):
        z = self.down(self.enc(x).flatten(1))
        return torch.sigmoid(self.dec(torch.relu(self.up(torch.relu(z))).reshape(-1, 32, 7, 7)))


def _rows(label: str, model_name: str, bits: float, quality_free: float, bpw_free: float, quality_cal: float,
          bpw_cal: float, float_quality: float, unit: str, seconds: float) -> str:
    return (f"| {model_name} | {label} | {bits} | {float_quality:{unit}} | {quality_free:{unit}} ({bpw_free:.3f}) | "
            f"{quality_cal:{unit}} ({bpw_cal:.3f}) | {quality_cal - quality_free:+{unit}} | {seconds:.0f} |")


def _classifier(model: nn.Module, name: str, label: str, bits: list[float], seed: int, log
                ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train ``model`` on the first training images, then code it at each of ``bits`` data-free and calibrated on
    the last training images (disjoint); accuracy on the test images. The rows, and the train / test images."""
    x, y = _images("train")
    tx, ty = _images("test")
    took = _train(model, x[:TRAIN_IMAGES], y[:TRAIN_IMAGES], epochs=2, seed=seed)
    base = _accuracy(model, tx, ty)
    log(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, trained {took:.0f} CPU s, float "
        f"accuracy {base:.2f} %")
    rows = []
    for b in bits:
        free, bpw_free, _, _ = _save(model, b)
        cal, bpw_cal, notes, secs = _save(model, b, calibration=x[-CALIB_IMAGES:])
        a_free, a_cal = _accuracy(free, tx, ty), _accuracy(cal, tx, ty)
        log(f"{name} -b {b}: data-free {a_free:.2f} % ({bpw_free:.3f} b/w), calibrated {a_cal:.2f} % "
            f"({bpw_cal:.3f} b/w, {secs:.0f} s); notes {_note_lines(notes)}")
        rows.append(_rows("accuracy %", label, b, a_free, bpw_free, a_cal, bpw_cal, base, ".2f", secs))
    return rows, x, y, tx, ty


def run_mobilenet(bits: list[float], seed: int, log) -> list[str]:
    torch.manual_seed(seed)
    model = MobileNetLike()
    rows, x, y, tx, ty = _classifier(model, "mobilenet", "MobileNet-like", bits, seed, log)
    # issue 10 in a new user's loop: finetune with the codec in the loop and a rate penalty, then save and load
    setting = "b3"
    n = sum(p.numel() for p in model.parameters())
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 128 * 80, 128)]
    before = copy.deepcopy(model)
    before.load_state_dict(codec.train.coded_weights(model, setting))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codec.train.finetune(model, batches, F.cross_entropy, setting, steps=60, lr=3e-4,
                             penalty=lambda m: 1e-2 * codec.train.rate(m, setting) / n)
    printed = copy.deepcopy(model)
    printed.load_state_dict(codec.train.coded_weights(model, setting))
    a_before, a_printed = _accuracy(before, tx, ty), _accuracy(printed, tx, ty)
    loaded, bpw, _, _ = _save(model, None, overrides={"*": setting})
    a_loaded = _accuracy(loaded, tx, ty)
    log(f"mobilenet finetune {setting}: coded as trained {a_before:.2f} % -> after finetune (printed) "
        f"{a_printed:.2f} %, file through codec.load {a_loaded:.2f} % ({bpw:.3f} b/w); "
        f"warnings {[str(w.message)[:80] for w in caught]}")
    rows.append(f"| MobileNet-like | finetune `{setting}` 60 steps + rate penalty: coded before {a_before:.2f} %, "
                f"printed {a_printed:.2f} %, file via codec.load {a_loaded:.2f} % ({bpw:.3f} b/w) | | | | | "
                f"{'equal' if a_loaded == a_printed else 'DIFFER'} | |")
    return rows


def run_rnn(bits: list[float], seed: int, log) -> list[str]:
    torch.manual_seed(seed)
    return _classifier(RowsRNN(), "rnn", "GRU+LSTM", bits, seed, log)[0]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


def run_autoencoder(bits: list[float], seed: int, log) -> list[str]:
    x, _ = _images("train")
    tx, _ = _images("test")
    torch.manual_seed(seed)
    model = ConvAutoencoder()
    took = _train(model, x[:TRAIN_IMAGES], None, epochs=3, seed=seed,
                  loss_of=lambda m, xb: F.binary_cross_entropy(m(xb), xb))
    with torch.no_grad():
        ref = model(tx)
    base = _cosine(ref, tx)
    log(f"autoencoder: {sum(p.numel() for p in model.parameters()):,} parameters, trained {took:.0f} CPU s, float "
        f"reconstruction cosine to the images {base:.4f}")
    rows = []
    for b in bits:
        free, bpw_free, _, _ = _save(model, b)
        cal, bpw_cal, notes, secs = _save(model, b, calibration=x[-CALIB_IMAGES:])
        with torch.no_grad():
            c_free, c_cal = _cosine(free(tx), ref), _cosine(cal(tx), ref)
        log(f"autoencoder -b {b}: cosine to the float reconstructions data-free {c_free:.4f} ({bpw_free:.3f}), "
            f"calibrated {c_cal:.4f} ({bpw_cal:.3f}, {secs:.0f} s); notes {_note_lines(notes)}")
        rows.append(_rows("cosine of reconstructions", "conv autoencoder", b, c_free, bpw_free, c_cal, bpw_cal, 1.0,
                          ".4f", secs))
    return rows


def _gpt2_data():
    """``(vocab size, token lists of the training, calibration and held-out sentences)``: the all-MiniLM-L6-v2
    (BERT) tokenizer's ids, renumbered to the ids the sentences use (0: padding)."""
    from bench.sentences import CALIBRATION, EVERYDAY, RARE, tokenizer

    tok = tokenizer()
    sets = [[tok(s)["input_ids"] for s in group] for group in (CALIBRATION + RARE, CALIBRATION, EVERYDAY)]
    ids = sorted({i for group in sets for s in group for i in s})
    remap = {old: new + 1 for new, old in enumerate(ids)}
    return len(ids) + 1, [[[remap[i] for i in s] for s in group] for group in sets]


def _pad(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask}


def _lm_quality(model, ref_logits, held) -> tuple[float, float]:
    """Next-token agreement (%) with the float model and mean cosine of the logits, on the held-out positions."""
    with torch.no_grad():
        logits = model(**held).logits
    mask = held["attention_mask"].bool()
    a, b = logits[mask], ref_logits[mask]
    agree = 100.0 * float((a.argmax(-1) == b.argmax(-1)).double().mean())
    return agree, float(F.cosine_similarity(a, b, dim=-1).mean())


def run_gpt2(bits: list[float], seed: int, log) -> list[str]:
    import transformers

    transformers.logging.set_verbosity_error()
    vocab, (train, calib, held_seqs) = _gpt2_data()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=vocab, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.process_time()
    model.train()
    for _ in range(400):
        batch = _pad([train[int(i)] for i in torch.randint(len(train), (16,), generator=gen)])
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        opt.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
    model.eval()
    held = _pad(held_seqs)
    with torch.no_grad():
        ref = model(**held).logits
    log(f"gpt2: vocab {vocab}, trained 400 steps in {time.process_time() - start:.0f} CPU s, "
        f"final loss {loss.item():.3f}")
    batches = [_pad(calib[i:i + 16]) for i in range(0, len(calib), 16)]
    rows = []
    for b in bits:
        free, bpw_free, _, _ = _save(model, b)
        cal, bpw_cal, notes, secs = _save(model, b, calibration=batches)
        (g_free, c_free), (g_cal, c_cal) = _lm_quality(free, ref, held), _lm_quality(cal, ref, held)
        log(f"gpt2 -b {b}: agreement data-free {g_free:.2f} % cosine {c_free:.4f} ({bpw_free:.3f}), calibrated "
            f"{g_cal:.2f} % cosine {c_cal:.4f} ({bpw_cal:.3f}, {secs:.0f} s); notes {_note_lines(notes)}")
        rows.append(_rows("next-token agreement %", "GPT-2 2x64", b, g_free, bpw_free, g_cal, bpw_cal, 100.0, ".2f",
                          secs))
        rows.append(_rows("cosine of logits", "GPT-2 2x64", b, c_free, bpw_free, c_cal, bpw_cal, 1.0, ".4f", secs))
        # as before the eighteenth pass, for comparison: the tied wte weighted as a lookup table only; and also
        # the Conv1D layers not measured (coded by the data-free weighting)
        from codec.rd import calibrate as calibration

        tie, conv1d = calibration._tie_heads, calibration._conv1d_type
        for label, no_conv1d in (("wte weighted as a lookup table", False),
                                 ("wte as a lookup table and Conv1D not measured (main before this pass)", True)):
            calibration._tie_heads = lambda layers, out: None
            if no_conv1d:
                calibration._conv1d_type = lambda: None
            try:
                table, bpw_table, _, _ = _save(model, b, calibration=batches)
            finally:
                calibration._tie_heads, calibration._conv1d_type = tie, conv1d
            g_table, c_table = _lm_quality(table, ref, held)
            log(f"gpt2 -b {b}: calibrated, {label}: agreement {g_table:.2f} % cosine {c_table:.4f} ({bpw_table:.3f})")
            rows.append(f"| GPT-2 2x64 | calibrated, {label}: agreement {g_table:.2f} %, cosine {c_table:.4f} "
                        f"({bpw_table:.3f}) | {b} | | | | | |")
    # issue 10: finetune on tokenizer dicts, distilling the ModelOutput (loss_fn=None), then save and load
    setting = "b3"
    before = copy.deepcopy(model)
    before.load_state_dict(codec.train.coded_weights(model, setting))
    tuned = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codec.train.finetune(tuned, batches, None, setting, steps=40, lr=1e-3)
    printed = copy.deepcopy(tuned)
    printed.load_state_dict(codec.train.coded_weights(tuned, setting))
    loaded, bpw, _, _ = _save(tuned, None, overrides={"*": setting})
    g_before, g_printed, g_loaded = (_lm_quality(m, ref, held)[0] for m in (before, printed, loaded))
    log(f"gpt2 finetune {setting} (distilled, dict batches): coded before {g_before:.2f} %, after (printed) "
        f"{g_printed:.2f} %, file via codec.load {g_loaded:.2f} % ({bpw:.3f} b/w); "
        f"warnings {[str(w.message)[:80] for w in caught]}")
    rows.append(f"| GPT-2 2x64 | finetune `{setting}` 40 steps, distilled on tokenizer dicts: agreement coded before "
                f"{g_before:.2f} %, printed {g_printed:.2f} %, file via codec.load {g_loaded:.2f} % ({bpw:.3f} b/w) "
                f"| | | | | {'equal' if g_loaded == g_printed else 'DIFFER'} | |")
    return rows


def run_minilm(bits: list[float], seed: int, log) -> list[str]:
    from bench.minilm import cosine_quality, model_dir
    from bench.sentences import EVERYDAY, FOLDER, RARE

    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for b in bits:
        got = {}
        for label, extra in (("data-free", []), ("calibrated", ["--calibration", str(FOLDER / "calibration.txt")])):
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "minilm.jwt"
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "cli", "encode", str(model_dir()), "-b", str(b), *extra,
                                       "-o", str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
                secs = time.perf_counter() - start
                if done.returncode:
                    raise SystemExit(f"jwt encode failed: {done.stderr.strip()}")
                weights = codec.load(out)
                total = sum(t.numel() for n, t in weights.items() if n != "embeddings.position_ids")
                bpw = 8 * out.stat().st_size / total
                got[label] = (cosine_quality(weights, EVERYDAY), cosine_quality(weights, RARE), bpw, secs)
                log(f"minilm -b {b} {label}: cosine everyday {got[label][0]:.4f} rare {got[label][1]:.4f} "
                    f"({bpw:.3f} b/w, {secs:.0f} s); stderr notes {[line[:160] for line in done.stderr.splitlines()]}")
        for k, name in ((0, "cosine, everyday"), (1, "cosine, rare")):
            rows.append(_rows(name, "all-MiniLM-L6-v2 (CLI)", b, got["data-free"][k], got["data-free"][2],
                              got["calibrated"][k], got["calibrated"][2], 1.0, ".4f", got["calibrated"][3]))
    return rows


DEFAULT_BITS = {"mobilenet": [5.0, 4.0], "rnn": [2.0], "autoencoder": [2.0], "gpt2": [3.0], "minilm": [3.5]}
RUNNERS = {"mobilenet": run_mobilenet, "rnn": run_rnn, "autoencoder": run_autoencoder, "gpt2": run_gpt2,
           "minilm": run_minilm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.newuser", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    parser.add_argument("--bits", type=float, action="append",
                        help="bits per weight (repeatable; default per model: "
                             + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in DEFAULT_BITS.items()) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT, help=f"markdown table (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in RUNNERS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(1)
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(f"- {text}")

    rows = []
    for name in models:
        rows += RUNNERS[name](args.bits or DEFAULT_BITS[name], args.seed, log)
    table = ["| model | measure | -b | float | data-free (bits/weight) | calibrated (bits/weight) "
             "| calibrated - data-free | calibrated save s |", "|---|---|---|---|---|---|---|---|", *rows]
    text = (f"# New-user check of issues 9 and 10 (`python -m bench.newuser --models {','.join(models)}`, seed "
            f"{args.seed})\n\nCalibration: 1,000 Fashion-MNIST training images (not trained on: the models train on "
            f"the first {TRAIN_IMAGES:,}), evaluation on the 10,000 test images; GPT-2: calibration sentences, evaluation on "
            "the held-out everyday sentences; MiniLM: `--calibration bench/sentences/calibration.txt`, cosine on the "
            "everyday and rare sets. Calibrated saves with repair at its default (on).\n\n" + "\n".join(table)
            + "\n\nLog:\n\n" + "\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
