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

The nineteenth pass's (``--models new``):

* ``resnet``: a ResNet-like CNN (residual blocks, BatchNorm) trained 1 epoch; the same weights as a float16 and a
  bfloat16 model and behind input buffers (one not persistent), calibrated on float32 images; then issue 10 in the
  user's loop: an epoch with ``codec.train.rate`` in the loss, ``finetune(..., None, setting, budget=Budget(B))``
  distilling on unlabelled images, the loop's coded accuracy against the file's from ``budget.save`` /
  ``codec.load``.
* ``grouped``: grouped (4, 8) and depthwise convolutions, no BatchNorm.
* ``conv1d``: ``nn.Conv1d`` layers over the rows; and its twin of ``1 x k`` Conv2d (what measuring Conv1d gains).
* ``transformer``: ``nn.MultiheadAttention`` + ``nn.TransformerEncoder`` over the rows; and its twin with the
  attention as nn.Linear q, k, v, out (what measuring in_proj / out_proj gains).
* ``bert``: ``BertForSequenceClassification`` from a config (random weights) through ``jwt encode FOLDER
  [--calibration calibration.txt]`` and ``codec.save``; ``t5``: ``T5ForConditionalGeneration`` the same way (the
  command line gives its decoder the sentence shifted right).

The twentieth pass's (``--models images``), through ``jwt encode --calibration FOLDER`` with a folder of PNGs written
from the last 1,000 Fashion-MNIST *training* images (accuracy on the 10,000 *test* images, disjoint):

* ``hfresnet``: ``transformers.ResNetForImageClassification`` from a ``ResNetConfig`` (random weights, one grey
  channel, basic blocks 32 / 64 / 128) trained 2 epochs on 20,000 images resized to 32 x 32 and normalized by a
  ``ViTImageProcessor``; ``save_pretrained`` of both into a folder, ``jwt encode FOLDER -b B [--calibration
  PNGS/]`` (the folder's image processor reads the PNGs).
* ``pngcnn``: the ResNet-like state_dict (``ResNetLike``, 1 epoch) through ``jwt encode cnn.pt -b B [--calibration
  PNGS/ --model bench.newuser:ResNetLike]`` (the PNGs as float32 in [0, 1], what it was trained on).

* ``hfvit``: ``transformers.ViTForImageClassification`` from a ``ViTConfig`` (4 layers of width 64, 4 x 4 patches),
  trained and encoded as ``hfresnet``: transformers 5 loads it under other names than its file holds, the case
  ``jwt encode`` once refused.

All three: accuracy, agreement with the float model's predictions, bits/weight of the file and the encode's wall time
(a fresh process: start-up and imports included), data-free against calibrated.

``python -m bench.newuser --models mobilenet,rnn`` runs some; the table goes to ``bench/results/newuser.md``
(``--out``). Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
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
MODELS = ("mobilenet", "rnn", "autoencoder", "gpt2", "minilm", "resnet", "grouped", "conv1d", "transformer", "bert",
          "t5", "hfresnet", "pngcnn", "hfvit")
NEW = ("resnet", "grouped", "conv1d", "transformer", "bert", "t5")  # the nineteenth pass's (``--models new``)
IMAGES = ("hfresnet", "pngcnn", "hfvit")  # the twentieth pass's (``--models images``): jwt encode --calibration FOLDER
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


class ResBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution + BatchNorm when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.short(x))


class ResNetLike(nn.Module):
    """A stem conv + BatchNorm, three residual blocks (16, 32, 64 channels; two of stride 2), average pooling, a
    linear classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(ResBlock(16, 16, 1), ResBlock(16, 32, 2), ResBlock(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class GroupedCNN(nn.Module):
    """Grouped convolutions (4 and 8 groups) around a depthwise one, no BatchNorm, a linear classifier."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1, groups=4), nn.ReLU(),
                               nn.Conv2d(64, 64, 3, 1, 1, groups=64), nn.ReLU(),
                               nn.Conv2d(64, 128, 3, 2, 1, groups=8), nn.ReLU())
        self.fc = nn.Linear(128 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.f(x).flatten(1))


class Conv1dNet(nn.Module):
    """Fashion-MNIST rows as a 1-D signal of 28 channels: three ``nn.Conv1d`` (one grouped), a linear classifier.
    ``as_2d=True`` builds the same network of ``nn.Conv2d`` with ``1 x k`` kernels (what calibrating Conv1d would
    measure: :func:`_conv1d_as_2d`)."""

    def __init__(self, as_2d: bool = False):
        super().__init__()
        conv = ((lambda i, o, k, s=1, p=0, g=1: nn.Conv2d(i, o, (1, k), (1, s), (0, p), groups=g)) if as_2d
                else (lambda i, o, k, s=1, p=0, g=1: nn.Conv1d(i, o, k, s, p, groups=g)))
        self.as_2d = as_2d
        self.f = nn.Sequential(conv(28, 64, 5, p=2), nn.ReLU(), conv(64, 96, 3, 2, 1), nn.ReLU(),
                               conv(96, 96, 3, 1, 1, 4), nn.ReLU())
        self.fc = nn.Linear(96 * 14, 10)

    def forward(self, x):
        x = x.reshape(-1, 28, 28)
        return self.fc(self.f(x.unsqueeze(2) if self.as_2d else x).flatten(1))


class RowTransformer(nn.Module):
    """Rows as 28 tokens: a linear embedding and a learned position table, an ``nn.MultiheadAttention`` with a
    residual, a 2-layer ``nn.TransformerEncoder`` (post-norm), mean pooling, a linear head."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.embed = nn.Linear(28, d)
        self.pos = nn.Parameter(torch.randn(1, 28, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x.reshape(-1, 28, 28)) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.enc(h + a).mean(1))


class _LinearAttention(nn.Module):
    """Self-attention with its projections as nn.Linear (``q``, ``k``, ``v``, ``out``): an
    ``nn.MultiheadAttention``'s computation, every weight of it a layer calibration measures."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = [p(x).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v)]
        return self.out(F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, t, d))


class _LinearEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post-norm, ReLU, no dropout) with :class:`_LinearAttention`."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.self_attn = _LinearAttention(d, heads)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(torch.relu(self.linear1(x))))


class LinearRowTransformer(nn.Module):
    """:class:`RowTransformer` with every attention as :class:`_LinearAttention` (:func:`_attention_as_linear`
    copies the weights: the same function, the in-projection split in three)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.embed = nn.Linear(28, d)
        self.pos = nn.Parameter(torch.zeros(1, 28, d))
        self.attn = _LinearAttention(d, 4)
        self.layers = nn.ModuleList(_LinearEncoderLayer(d, 4, 128) for _ in range(2))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x.reshape(-1, 28, 28)) + self.pos
        h = h + self.attn(h)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def _attention_as_linear(model: RowTransformer) -> LinearRowTransformer:
    """The same network as a :class:`LinearRowTransformer` (in_proj split into q, k, v; out_proj as ``out``)."""
    twin = LinearRowTransformer()
    state = {}
    for name, t in model.state_dict().items():
        name = name.replace("enc.layers.", "layers.")
        if "in_proj_" in name:
            prefix, kind = name.split("in_proj_")
            for part, chunk in zip("qkv", t.chunk(3)):
                state[f"{prefix}{part}.{kind}"] = chunk.clone()
        else:
            state[name.replace("out_proj.", "out.")] = t
    twin.load_state_dict(state)
    return twin.eval()


def _conv1d_as_2d(model: Conv1dNet) -> Conv1dNet:
    """The same network with ``1 x k`` nn.Conv2d layers (weights ``(out, in, 1, k)``)."""
    twin = Conv1dNet(as_2d=True)
    twin.load_state_dict({n: t.unsqueeze(2) if t.dim() == 3 else t for n, t in model.state_dict().items()})
    return twin.eval()


def _rows(label: str, model_name: str, bits: float, quality_free: float, bpw_free: float, quality_cal: float,
          bpw_cal: float, float_quality: float, unit: str, seconds: float) -> str:
    return (f"| {model_name} | {label} | {bits} | {float_quality:{unit}} | {quality_free:{unit}} ({bpw_free:.3f}) | "
            f"{quality_cal:{unit}} ({bpw_cal:.3f}) | {quality_cal - quality_free:+{unit}} | {seconds:.0f} |")


def _classifier(model: nn.Module, name: str, label: str, bits: list[float], seed: int, log, epochs: int = 2,
                twin=None) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train ``model`` on the first training images, then code it at each of ``bits`` data-free and calibrated on
    the last training images (disjoint); accuracy on the test images. The rows, and the train / test images."""
    x, y = _images("train")
    tx, ty = _images("test")
    took = _train(model, x[:TRAIN_IMAGES], y[:TRAIN_IMAGES], epochs=epochs, seed=seed)
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
        if twin is not None:  # the same network with the layers calibration does not measure as ones it does
            other = twin(model)
            same = _accuracy(other, tx, ty)
            cal2, bpw2, notes2, secs2 = _save(other, b, calibration=x[-CALIB_IMAGES:])
            a_twin = _accuracy(cal2, tx, ty)
            log(f"{name} -b {b}: its twin of measured layers ({type(other).__name__}, float {same:.2f} %) calibrated "
                f"{a_twin:.2f} % ({bpw2:.3f} b/w, {secs2:.0f} s); notes {_note_lines(notes2)}")
            rows.append(f"| {label} | calibrated, every layer measured (the twin {type(other).__name__}, float "
                        f"{same:.2f} %): {a_twin:.2f} % ({bpw2:.3f}) | {b} | | | | {a_twin - a_cal:+.2f} vs calibrated "
                        f"| {secs2:.0f} |")
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


class _Normalized(nn.Module):
    """A model behind an input normalisation held in buffers: ``mean`` persistent (in the state_dict and the file),
    ``std`` not (it stays the module's own), and a persistent ``lut`` table the forward pass does not use."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0), persistent=False)
        self.register_buffer("lut", torch.linspace(0, 1, 256))

    def forward(self, x):
        return self.inner((x - self.mean) / self.std)


def _accuracy_as(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> float:
    """Test accuracy with the images in ``dtype`` (a float16 / bfloat16 model)."""
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 1000].to(dtype)).float().argmax(1) == y[i:i + 1000]).sum())
                      for i in range(0, len(x), 1000))
    return 100.0 * correct / len(x)


def run_resnet(bits: list[float], seed: int, log) -> list[str]:
    """The ResNet-like net trained 1 epoch; then the same weights as float16 and bfloat16 models and behind
    buffers, data-free against calibrated (float32 images); then issue 10 in the user's own loop."""
    torch.manual_seed(seed)
    model = ResNetLike()
    rows, x, y, tx, ty = _classifier(model, "resnet", "ResNet-like (BatchNorm, residual)", bits, seed, log, epochs=1)
    for label, other, dtype in (("float16", copy.deepcopy(model).half(), torch.float16),  # at the last rate
                                ("bfloat16", copy.deepcopy(model).bfloat16(), torch.bfloat16),
                                ("float32 behind buffers (one not persistent)", _Normalized(copy.deepcopy(model)),
                                 torch.float32)):
        base = _accuracy_as(other, tx, ty, dtype)
        for b in bits[-1:]:
            free, bpw_free, _, _ = _save(other, b)
            cal, bpw_cal, notes, secs = _save(other, b, calibration=x[-CALIB_IMAGES:])
            a_free, a_cal = _accuracy_as(free, tx, ty, dtype), _accuracy_as(cal, tx, ty, dtype)
            kept = {str(t.dtype).removeprefix("torch.") for t in cal.state_dict().values() if t.is_floating_point()}
            log(f"resnet {label} -b {b}: data-free {a_free:.2f} % ({bpw_free:.3f}), calibrated {a_cal:.2f} % "
                f"({bpw_cal:.3f}, {secs:.0f} s), decoded dtypes {sorted(kept)}; notes {_note_lines(notes)}")
            rows.append(_rows("accuracy %", f"ResNet-like, {label}", b, a_free, bpw_free, a_cal, bpw_cal, base,
                              ".2f", secs))
    rows.append(_train_loop(model, x, y, tx, ty, seed, log))
    return rows


def _train_loop(model: nn.Module, x, y, tx, ty, seed: int, log, setting: str = "jpeg,q12",
                budget_bits: float = 4.0, lam: float = 1.0) -> str:
    """Issue 10 as a user's loop: a second epoch with ``codec.train.rate`` in the loss, then
    ``codec.train.finetune(model, unlabelled batches, None, setting, budget=Budget(B))``, the coded model's accuracy
    (what the loop gives: ``coded_weights`` with the budget's overrides) against the file's from ``budget.save`` and
    ``codec.load``."""
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.process_time()
    model.train()
    for idx in torch.randperm(TRAIN_IMAGES, generator=gen).split(128):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx]) + lam * codec.train.rate(model, setting) / n
        loss.backward()
        opt.step()
    model.eval()
    took = time.process_time() - start
    coded = copy.deepcopy(model)
    coded.load_state_dict(codec.train.coded_weights(model, setting))
    a_float, a_coded = _accuracy(model, tx, ty), _accuracy(coded, tx, ty)
    budget = codec.train.Budget(budget_bits)
    unlabelled = [x[TRAIN_IMAGES + i:TRAIN_IMAGES + i + 128] for i in range(0, 128 * 40, 128)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.process_time()
        codec.train.finetune(model, unlabelled, None, setting, steps=60, lr=3e-4, budget=budget)
        took_ft = time.process_time() - start
    printed = copy.deepcopy(model)
    printed.load_state_dict(codec.train.coded_weights(model, setting, overrides=budget.overrides))
    a_printed = _accuracy(printed, tx, ty)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.jwt"
        try:
            budget.save(model, path)
        except ValueError as exc:
            log(f"resnet loop: budget.save refused: {exc}")
            return f"| ResNet-like | issue 10 loop: budget.save refused ({exc}) | | | | | | |"
        bpw = 8 * path.stat().st_size / sum(t.numel() for t in _stored(model).values())
        loaded = copy.deepcopy(model)
        loaded.load_state_dict(codec.load(path))
    a_loaded = _accuracy(loaded, tx, ty)
    log(f"resnet loop: epoch with lam {lam} * rate({setting!r}) / n in the loss ({took:.0f} CPU s): float "
        f"{a_float:.2f} %, coded at the setting {a_coded:.2f} %; finetune distilled (loss_fn=None) with "
        f"Budget({budget_bits}) 60 steps ({took_ft:.0f} CPU s): {budget!r}; printed (coded_weights with the budget's "
        f"overrides) {a_printed:.2f} %, file through budget.save + codec.load {a_loaded:.2f} % ({bpw:.3f} b/w); "
        f"warnings {[str(w.message)[:160] for w in caught]}")
    return (f"| ResNet-like | issue 10 loop: rate in the loss for an epoch (float {a_float:.2f} %, coded "
            f"{a_coded:.2f} %), finetune distilled with Budget({budget_bits}): printed {a_printed:.2f} %, file via "
            f"budget.save + codec.load {a_loaded:.2f} % ({bpw:.3f} b/w) | | | | | "
            f"{'equal' if a_loaded == a_printed else 'DIFFER'} | |")


def run_grouped(bits: list[float], seed: int, log) -> list[str]:
    torch.manual_seed(seed)
    return _classifier(GroupedCNN(), "grouped", "grouped / depthwise CNN", bits, seed, log, epochs=1)[0]


def run_conv1d(bits: list[float], seed: int, log) -> list[str]:
    torch.manual_seed(seed)
    return _classifier(Conv1dNet(), "conv1d", "nn.Conv1d rows", bits, seed, log, epochs=1, twin=_conv1d_as_2d)[0]


def run_transformer(bits: list[float], seed: int, log) -> list[str]:
    torch.manual_seed(seed)
    return _classifier(RowTransformer(), "transformer", "MultiheadAttention + TransformerEncoder", bits, seed, log,
                       epochs=1, twin=_attention_as_linear)[0]


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


def _small_tokenizer(folder: Path):
    """A BERT tokenizer whose vocabulary is the all-MiniLM-L6-v2 word pieces the repository's sentences use (and
    the special tokens): the same tokens for them, a vocabulary of about 2,000 (a 30,522-row table would make each
    calibrated T5 save minutes long on one core)."""
    import transformers

    from bench.sentences import CALIBRATION, EVERYDAY, RARE, tokenizer

    tok = tokenizer()
    used = {i for s in CALIBRATION + EVERYDAY + RARE for i in tok(s)["input_ids"]}
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [w for w in tok.convert_ids_to_tokens(sorted(used)) if w not in words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizerFast.from_pretrained(str(folder))  # (transformers 5 ignores vocab_file=)


def _hf_outputs(model, held: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, last hidden state)`` on the held-out sentences (the decoder's for a sequence-to-sequence model)."""
    with torch.no_grad():
        out = model(**held, output_hidden_states=True)
    states = out.decoder_hidden_states if getattr(out, "decoder_hidden_states", None) is not None \
        else out.hidden_states
    return out.logits, states[-1]


def _hf_quality(model, ref: tuple[torch.Tensor, torch.Tensor], held: dict, mask: torch.Tensor | None
                ) -> tuple[float, float, float]:
    """``(cosine, agreement %, hidden cosine)``: of the logits with the float model's on the held-out sentences,
    per sentence (a classifier) or per decoder position within ``mask`` (a sequence-to-sequence model); the mean
    cosine of the last hidden state at every real token (a random classifier's logits hardly depend on its input:
    they say little about the encoder)."""
    logits, hidden = _hf_outputs(model, held)
    a, b = (logits[mask], ref[0][mask]) if mask is not None else (logits, ref[0])
    real = held["attention_mask"].bool()
    return (float(F.cosine_similarity(a, b, dim=-1).mean()),
            100.0 * float((a.argmax(-1) == b.argmax(-1)).double().mean()),
            float(F.cosine_similarity(hidden[real], ref[1][real], dim=-1).mean()))


def _hf_run(name: str, label: str, model, tokenizer, bits: list[float], log, decoder: bool) -> list[str]:
    """``jwt encode FOLDER -b B [--calibration calibration.txt]`` on the model's ``save_pretrained`` folder, then
    ``codec.save(model, calibration=tokenizer dicts)``: cosine and argmax agreement of the logits on the held-out
    everyday sentences."""
    from bench.sentences import CALIBRATION, EVERYDAY, FOLDER

    def batch(lines):
        out = dict(tokenizer(list(lines), padding=True, return_tensors="pt"))
        if decoder:
            out["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=out["input_ids"])
            out["decoder_attention_mask"] = out["attention_mask"]
        return out

    held = batch(EVERYDAY)
    mask = held["attention_mask"].bool() if decoder else None
    ref = _hf_outputs(model, held)
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    weights = sum(t.numel() for t in _stored(model).values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for b in bits:
            got = {}
            for how, extra in (("data-free", []), ("calibrated", ["--calibration", str(FOLDER / "calibration.txt")])):
                out = Path(tmp) / f"{name}.jwt"
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "cli", "encode", str(folder), "-b", str(b), *extra,
                                       "-o", str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
                secs = time.perf_counter() - start
                if done.returncode:
                    log(f"{name} CLI -b {b} {how}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
                    got[how] = (float("nan"), float("nan"), float("nan"), float("nan"), secs)
                    continue
                back = copy.deepcopy(model)
                back.load_state_dict(codec.load(out), strict=False)
                bpw = 8 * out.stat().st_size / weights
                got[how] = (*_hf_quality(back.eval(), ref, held, mask), bpw, secs)
                log(f"{name} CLI -b {b} {how}: cosine {got[how][0]:.4f} agreement {got[how][1]:.2f} % hidden cosine "
                    f"{got[how][2]:.4f} ({bpw:.3f} b/w "
                    f"of the file with its attachments, {secs:.0f} s); stderr "
                    f"{[line[:200] for line in done.stderr.splitlines() if 'calibration' in line or 'error' in line]}")
            f, c = got["data-free"], got["calibrated"]
            rows.append(_rows("logits cosine", f"{label} (CLI, FOLDER)", b, f[0], f[3], c[0], c[3], 1.0, ".4f", c[4]))
            rows.append(_rows("last hidden state cosine", f"{label} (CLI, FOLDER)", b, f[2], f[3], c[2], c[3], 1.0,
                              ".4f", c[4]))
            free, bpw_free, _, _ = _save(model, b)
            cal, bpw_cal, notes, secs = _save(model, b, calibration=[batch(CALIBRATION[i:i + 16])
                                                                      for i in range(0, len(CALIBRATION), 16)])
            (c_free, g_free, h_free), (c_cal, g_cal, h_cal) = (_hf_quality(m, ref, held, mask) for m in (free, cal))
            log(f"{name} API -b {b}: data-free cosine {c_free:.4f} agreement {g_free:.2f} % hidden cosine "
                f"{h_free:.4f} ({bpw_free:.3f}), calibrated {c_cal:.4f} / {g_cal:.2f} % / {h_cal:.4f} ({bpw_cal:.3f}, "
                f"{secs:.0f} s); notes {_note_lines(notes)}")
            rows.append(_rows("logits cosine", f"{label} (API)", b, c_free, bpw_free, c_cal, bpw_cal, 1.0, ".4f", secs))
            rows.append(_rows("last hidden state cosine", f"{label} (API)", b, h_free, bpw_free, h_cal, bpw_cal, 1.0,
                              ".4f", secs))
            rows.append(_rows("argmax agreement %", f"{label} (API)", b, g_free, bpw_free, g_cal, bpw_cal, 100.0,
                              ".2f", secs))
    return rows


def run_bert(bits: list[float], seed: int, log) -> list[str]:
    """``BertForSequenceClassification`` from a config (2 x 128, 4 labels), random weights."""
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _small_tokenizer(Path(tmp))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=256, num_labels=4,
                                     max_position_embeddings=128)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config).eval()
    log(f"bert: BertForSequenceClassification, vocab {tokenizer.vocab_size}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, random weights")
    return _hf_run("bert", "BERT classifier 2x128, random", model, tokenizer, bits, log, decoder=False)


def run_t5(bits: list[float], seed: int, log) -> list[str]:
    """``T5ForConditionalGeneration`` from a config (2 + 2 layers, 64 wide, tied head), random weights; the decoder
    reads each sentence shifted right."""
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _small_tokenizer(Path(tmp))
    config = transformers.T5Config(vocab_size=tokenizer.vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config).eval()
    log(f"t5: T5ForConditionalGeneration, vocab {tokenizer.vocab_size}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, random weights")
    return _hf_run("t5", "T5 2+2 x 64, random", model, tokenizer, bits, log, decoder=True)


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


# --- the twentieth pass's: a folder of images through the command line ---

def _png_folder(folder: Path, images: np.ndarray) -> Path:
    """``images`` (uint8 N x 28 x 28) as grey PNGs ``00000.png``, ... in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a, "L").save(folder / f"{i:05d}.png")
    return folder


def _jwt_encode(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m cli encode ARGS`` in a fresh process (this tree's command line); its wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", "encode", *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True)
    return done, time.perf_counter() - start


def _predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])


def _cli_rows(name: str, label: str, model: nn.Module, load, weights: int, encode_args, bits: list[float],
              tx: torch.Tensor, ty: torch.Tensor, log) -> list[str]:
    """For each rate: ``jwt encode`` data-free and with ``encode_args(calibrated)``, the file decoded through
    ``codec.load`` into a copy of ``model`` (``load(copy, state_dict)``); accuracy on ``(tx, ty)``, agreement with
    ``model``'s predictions, bits/weight (the file's bytes over ``weights``), wall seconds."""
    reference = _predictions(model, tx)
    base = 100.0 * float((reference == ty).double().mean())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in bits:
            got = {}
            for how in ("data-free", "calibrated"):
                out = Path(tmp) / f"{name}.jwt"
                done, secs = _jwt_encode([*encode_args(how == "calibrated"), "-b", str(b), "-o", str(out)])
                if done.returncode:
                    log(f"{name} -b {b} {how}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
                    got[how] = (float("nan"),) * 3 + (secs,)
                    continue
                back = copy.deepcopy(model)
                load(back, codec.load(out))
                pred = _predictions(back, tx)
                acc, agree = (100.0 * float((pred == t).double().mean()) for t in (ty, reference))
                bpw = 8 * out.stat().st_size / weights
                got[how] = (acc, agree, bpw, secs)
                notes = [line[:160] for line in done.stderr.splitlines() if "calibration" in line or "error" in line]
                log(f"{name} -b {b} {how}: accuracy {acc:.2f} %, agreement with float {agree:.2f} % ({bpw:.3f} b/w, "
                    f"{secs:.1f} s wall); stderr {notes}")
                out.unlink()
            f, c = got["data-free"], got["calibrated"]
            rows.append(_rows("accuracy %", label, b, f[0], f[2], c[0], c[2], base, ".2f", c[3]))
            rows.append(_rows("agreement with float %", label, b, f[1], f[2], c[1], c[2], 100.0, ".2f", c[3]))
            rows.append(f"| {label} | encode wall s (fresh process) | {b} | | {f[3]:.1f} | {c[3]:.1f} | "
                        f"{c[3] - f[3]:+.1f} | {c[3]:.0f} |")
    return rows


class _Logits(nn.Module):
    """A transformers image classifier called on pixel tensors, returning its logits (for training and scoring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def _hf_image(name: str, label: str, build, bits: list[float], seed: int, log) -> list[str]:
    """A transformers image classifier (``build(transformers)``: random weights, one grey channel), trained 2
    epochs on images through a ``ViTImageProcessor`` (32 x 32, Fashion-MNIST's mean and std), saved with
    ``save_pretrained`` beside the processor; ``jwt encode FOLDER -b B [--calibration PNGS/]``."""
    import transformers
    from PIL import Image

    transformers.logging.set_verbosity_error()
    x, y = load_fashion_mnist("train")
    tx, ty = load_fashion_mnist("test")
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2860],
                                               image_std=[0.3530])

    def pixels(images: np.ndarray) -> torch.Tensor:
        return torch.cat([processor(images=[Image.fromarray(a, "L") for a in images[i:i + 2000]],
                                    return_tensors="pt")["pixel_values"] for i in range(0, len(images), 2000)])

    torch.manual_seed(seed)
    model = build(transformers)
    took = _train(_Logits(model), pixels(x[:TRAIN_IMAGES]), torch.from_numpy(y[:TRAIN_IMAGES]), epochs=2, seed=seed)
    model.eval()
    weights = sum(t.numel() for t in _stored(model).values())
    log(f"{name}: {type(model).__name__}, {weights:,} weights, trained 2 epochs ({took:.0f} CPU s), "
        f"{type(processor).__name__} 32 x 32")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        pngs = _png_folder(Path(tmp) / "pngs", x[-CALIB_IMAGES:])

        def args(calibrated: bool) -> list[str]:
            return [str(folder), *(["--calibration", str(pngs)] if calibrated else [])]

        def load(m: nn.Module, stored: dict) -> None:  # the decoded folder, as transformers reads it
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory() as back:
                shutil.copy(folder / "config.json", back)
                save_file({k: v.contiguous() for k, v in stored.items()}, Path(back) / "model.safetensors",
                          metadata={"format": "pt"})
                m.model.load_state_dict(type(model).from_pretrained(back).state_dict())

        return _cli_rows(name, label, _Logits(model), load, weights, args, bits, pixels(tx), torch.from_numpy(ty), log)


def run_hfresnet(bits: list[float], seed: int, log) -> list[str]:
    """A transformers ResNet from its config, 3 basic stages of 32 / 64 / 128 (:func:`_hf_image`)."""
    return _hf_image("hfresnet", "transformers ResNet, 3 stages 32-128 (CLI, FOLDER + PNGs)",
                     lambda t: t.ResNetForImageClassification(t.ResNetConfig(
                         num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                         layer_type="basic", num_labels=10)), bits, seed, log)


def run_hfvit(bits: list[float], seed: int, log) -> list[str]:
    """A transformers ViT from its config, 4 layers of width 64, patches 4 x 4 (:func:`_hf_image`): transformers 5
    loads it under other names than its file holds (``attention.attention.query`` -> ``attention.q_proj``)."""
    return _hf_image("hfvit", "transformers ViT, 4 x 64, patches 4 x 4 (CLI, FOLDER + PNGs)",
                     lambda t: t.ViTForImageClassification(t.ViTConfig(
                         image_size=32, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=128, num_labels=10)), bits, seed, log)


def run_pngcnn(bits: list[float], seed: int, log) -> list[str]:
    """The ResNet-like net (1 epoch, as ``resnet``) as a state_dict file: ``jwt encode cnn.pt -b B
    [--calibration PNGS/ --model bench.newuser:ResNetLike]``."""
    x, y = _images("train")
    tx, ty = _images("test")
    torch.manual_seed(seed)
    model = ResNetLike()
    took = _train(model, x[:TRAIN_IMAGES], y[:TRAIN_IMAGES], epochs=1, seed=seed)
    weights = sum(t.numel() for t in _stored(model).values())
    log(f"pngcnn: ResNetLike state_dict, {weights:,} weights, trained 1 epoch ({took:.0f} CPU s)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.pt"
        torch.save(model.state_dict(), path)
        raw, _ = load_fashion_mnist("train")
        pngs = _png_folder(Path(tmp) / "pngs", raw[-CALIB_IMAGES:])

        def args(calibrated: bool) -> list[str]:
            extra = ["--calibration", str(pngs), "--model", "bench.newuser:ResNetLike"] if calibrated else []
            return [str(path), *extra]

        return _cli_rows("pngcnn", "ResNet-like state_dict (CLI, --model + PNGs)", model,
                         lambda m, sd: m.load_state_dict(sd), weights, args, bits, tx, ty, log)


DEFAULT_BITS = {"mobilenet": [5.0, 4.0], "rnn": [2.0], "autoencoder": [2.0], "gpt2": [3.0], "minilm": [3.5],
                "resnet": [4.0, 2.0], "grouped": [4.0, 2.0], "conv1d": [2.0, 1.5], "transformer": [4.0, 3.0],
                "bert": [4.0, 3.0], "t5": [4.0, 3.0], "hfresnet": [2.0, 1.0], "pngcnn": [4.0, 2.0],
                "hfvit": [3.0, 2.8]}
RUNNERS = {"mobilenet": run_mobilenet, "rnn": run_rnn, "autoencoder": run_autoencoder, "gpt2": run_gpt2,
           "minilm": run_minilm, "resnet": run_resnet, "grouped": run_grouped, "conv1d": run_conv1d,
           "transformer": run_transformer, "bert": run_bert, "t5": run_t5, "hfresnet": run_hfresnet,
           "pngcnn": run_pngcnn, "hfvit": run_hfvit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.newuser", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}; new: {','.join(NEW)}; images: "
                             f"{','.join(IMAGES)} (default: all)")
    parser.add_argument("--bits", type=float, action="append",
                        help="bits per weight (repeatable; default per model: "
                             + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in DEFAULT_BITS.items()) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT, help=f"markdown table (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    groups = {"new": NEW, "images": IMAGES}
    models = [m for item in args.models.split(",") if item.strip() for m in groups.get(item.strip(), [item.strip()])]
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
        try:
            rows += RUNNERS[name](args.bits or DEFAULT_BITS[name], args.seed, log)
        except Exception as exc:  # a new user's failure is a finding: logged, and the other models still run
            log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            rows.append(f"| {name} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | | | | |")
    table = ["| model | measure | -b | float | data-free (bits/weight) | calibrated (bits/weight) "
             "| calibrated - data-free | calibrated save s |", "|---|---|---|---|---|---|---|---|", *rows]
    text = (f"# New-user check of issues 9 and 10 (`python -m bench.newuser --models {','.join(models)}`, seed "
            f"{args.seed})\n\nCalibration: 1,000 Fashion-MNIST training images (not trained on: the models train on "
            f"the first {TRAIN_IMAGES:,}; 2 epochs, the nineteenth pass's resnet, grouped, conv1d and transformer 1), "
            "evaluation on the 10,000 test images; GPT-2, BERT, T5: the calibration sentences, evaluation on "
            "the held-out everyday sentences (BERT and T5 random weights from a config, a tokenizer of the ~1,900 word "
            "pieces the repository's sentences use, through `jwt encode FOLDER` and `codec.save`); MiniLM: "
            "`--calibration bench/sentences/calibration.txt`, cosine on the everyday and rare sets. Calibrated saves "
            "with repair at its default (on). A \"twin\" row: the same network with the layers calibration does not "
            "measure (nn.Conv1d, nn.MultiheadAttention) rewritten as ones it does (1 x k nn.Conv2d; nn.Linear q, k, v, "
            "out), calibrated at the same rate: what measuring those kinds would gain.\n\n" + "\n".join(table)
            + "\n\nLog:\n\n" + "\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
