"""Recurrent layers calibrated: Fashion-MNIST read as 28 steps of 28 pixels by a GRU, an LSTM and a bidirectional GRU.

Each model is trained briefly on the training images (cached under
bench/.cache, never retrained once there), then written by ``codec.save`` at
each budget three ways, side by side in one run: data-free
(``codec.save(model, path, bits_per_weight=B)``), calibrated without repair
(``calibration=x, repair=False``) and calibrated with repair (``calibration=x``).
Calibration uses TRAINING images only (the first ``--calib`` of a fixed random
permutation, no labels); each decoded file is scored on the 10,000 TEST
images::

    OMP_NUM_THREADS=1 python -m bench.recurrent --before   # all three models, -b 1.5 2 2.5 3
    python -m bench.recurrent --model gru -b 2 --out /tmp/x

writes ``bench/results/recurrent.md`` (the table) and ``recurrent.png``
(accuracy against bits/weight).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor, nn

import codec

from .models import EVAL_BATCH_SIZE, load_fashion_mnist, preprocess, train

CACHE = Path(__file__).parent / ".cache"
RESULTS = Path(__file__).parent / "results"
STEPS = 28  # image rows, read one per step


class GRUNet(nn.Module):
    """One GRU layer of 128 over the 28 rows (``weight_hh_l0``: 384 x 128 = 49,152 elements, JPEG-eligible), a
    head on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(STEPS, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.rnn(x.reshape(-1, STEPS, STEPS))
        return self.head(h[-1])


class LSTMNet(nn.Module):
    """Two LSTM layers of 128, time-major (``batch_first=False``); ``weight_ih_l1`` and both ``weight_hh``: 512 x
    128 = 65,536 elements."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(STEPS, 128, num_layers=2)
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        _, (h, _) = self.rnn(x.reshape(-1, STEPS, STEPS).transpose(0, 1))
        return self.head(h[-1])


class BiGRUNet(nn.Module):
    """A bidirectional GRU of 128, the head on both directions' final states."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(STEPS, 128, batch_first=True, bidirectional=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.rnn(x.reshape(-1, STEPS, STEPS))
        return self.head(torch.cat([h[-2], h[-1]], dim=1))


MODELS = {"gru": GRUNet, "lstm": LSTMNet, "bigru": BiGRUNet}
EPOCHS = {"gru": 3, "lstm": 3, "bigru": 3}


def trained(kind: str, images: np.ndarray, labels: np.ndarray) -> nn.Module:
    """The trained model of ``kind`` from the cache, or trained now (seed 0, Adam 2e-3) and cached."""
    path = CACHE / f"rnn_{kind}_fmnist_seed0_e{EPOCHS[kind]}.pt"
    model = MODELS[kind]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.process_time()
    train(model, images, labels, EPOCHS[kind], seed=0, lr=2e-3, threads=1)
    print(f"# trained {kind}: {EPOCHS[kind]} epochs, {time.process_time() - start:.0f} CPU s", flush=True)
    CACHE.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def logits(model: nn.Module, images: Tensor) -> Tensor:
    """The model's logits on preprocessed ``images``, in batches, without gradients."""
    with torch.no_grad():
        return torch.cat([model.eval()(images[i:i + EVAL_BATCH_SIZE]) for i in range(0, len(images),
                                                                                    EVAL_BATCH_SIZE)])


def _recurrent_data_free():
    """Calibration as before codec/rd/recurrent.py: no recurrent module measured (their matrices data-free)."""
    from codec.rd import calibrate

    return mock.patch.object(calibrate, "recurrent_modules", lambda model: {})


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the encoder's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="models (repeatable; all)")
    parser.add_argument("-b", "--bits", type=float, action="append", help="budgets (repeatable; 1.5 2 2.5 3)")
    parser.add_argument("--calib", type=int, default=2000, help="training images calibrating")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of recurrent.md and recurrent.png")
    parser.add_argument("--before", action="store_true",
                        help="also the calibrated variants with the recurrent layers left to the data-free weighting "
                             "(as before codec/rd/recurrent.py)")
    args = parser.parse_args()
    kinds = args.model or list(MODELS)
    budgets = args.bits or [1.5, 2.0, 2.5, 3.0]
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    pick = np.random.default_rng(0).permutation(len(train_images))[:args.calib]
    calib = preprocess(train_images[pick])
    test = preprocess(test_images)
    labels = torch.as_tensor(test_labels)
    rows = ["| model | weights | float acc. % | -b | variant | bits/weight | accuracy % | agreement % | logits rel. "
            "error | CPU s |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="recurrent-"))
    for kind in kinds:
        model = trained(kind, train_images, train_labels)
        weights = sum(p.numel() for p in model.parameters())
        torch.set_num_threads(1)
        ref = logits(model, test)
        base = 100 * float((ref.argmax(1) == labels).double().mean())
        for bits in budgets:
            variants = [("data-free", {}), ("calibrated", {"calibration": calib, "repair": False}),
                        ("calibrated + repair", {"calibration": calib})]
            if args.before:
                variants[1:1] = [(f"{v}, recurrent data-free (before)", kw) for v, kw in variants[1:]]
            for number, (variant, kw) in enumerate(variants):
                path = work / f"{kind}-{bits}-{number}.jwt"
                start = _cpu()
                try:
                    with _recurrent_data_free() if "before" in variant else contextlib.nullcontext():
                        notes = codec.save(model, path, bits_per_weight=bits, **kw)
                except codec.EncodeError as exc:
                    rows.append(f"| {kind} | {weights:,} | {base:.2f} | {bits} | {variant} | refused: {exc} | | | | |")
                    print(rows[-1], flush=True)
                    continue
                cpu = _cpu() - start
                size = 8 * path.stat().st_size / weights
                decoded = MODELS[kind]()
                decoded.load_state_dict(codec.load(path))
                out = logits(decoded, test)
                acc = 100 * float((out.argmax(1) == labels).double().mean())
                agree = 100 * float((out.argmax(1) == ref.argmax(1)).double().mean())
                error = float((out - ref).pow(2).sum() / ref.pow(2).sum())
                curves.setdefault((kind, variant), []).append((size, acc))
                rows.append(f"| {kind} | {weights:,} | {base:.2f} | {bits} | {variant} | {size:.4f} | {acc:.2f} | "
                            f"{agree:.2f} | {error:.4f} | {cpu:.1f} |")
                print(rows[-1], flush=True)
                for note in notes:
                    if str(note).startswith("calibration:"):
                        print(f"#   note: {note}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recurrent.md").write_text(
        f"`python -m bench.recurrent` (calibration: {args.calib} training images; accuracy on the 10,000 test "
        f"images; peak RSS {peak:.0f} MB)\n\n" + "\n".join(rows) + "\n")
    _plot(curves, args.out / "recurrent.png")


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for k, _ in curves})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for (k, variant), points in curves.items():
            if k == kind:
                x, y = zip(*sorted(points))
                ax.plot(x, y, marker="o", label=variant)
        ax.set_title(kind)
        ax.set_xlabel("bits/weight")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
