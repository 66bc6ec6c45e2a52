"""Calibrated coding of a layer wider than calibration's full-``H`` limit, against the same layer with its full ``H``.

Calibration keeps a layer's full input second moment ``H`` only up to :data:`codec.rd.calibrate.FULL_H_MAX` input
columns (a diagonal above), and repair refits, GPTQ-rounds and compensates a layer only up to
``RepairSettings.max_columns`` (the bias alone above). A 3 x 3 convolution over 512 channels, as in ResNet-18 / 50's
last stage and VGG, has 4,608 im2col columns. This script trains a small Fashion-MNIST CNN whose last convolution is
such a layer (``Conv2d(512, 64, 3)``, 295 k of its 609 k weights; one epoch, cached in ``bench/.cache/``) and saves it
with calibration (1,000 training images, the last ones) under each limit given, then scores the decoded file on the
10,000 test images: accuracy, agreement with the float model, CPU seconds and peak RSS of the save.

    python -m bench.wide_layers [--bits 1 --bits 0.6] [--limits 4096,8192] [--out bench/results/wide_layers.md]

Run it with ``OMP_NUM_THREADS=1``; each limit runs in a process of its own (the peak RSS is the process's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.models import load_fashion_mnist, preprocess
from bench.prepare import DEFAULT_CACHE_DIR

CACHE = DEFAULT_CACHE_DIR / "wide_fmnist_seed0_e1.pt"


class WideCNN(nn.Module):
    """Two small convolutions, a 64 -> 512 one and a 512 -> 64 one (4,608 im2col columns), pooled, a Linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 512, 3, padding=1), nn.ReLU(),
            nn.Conv2d(512, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def trained() -> WideCNN:
    """The model, trained for one epoch (Adam 1e-3, batches of 128, seed 0) on first use and cached."""
    torch.manual_seed(0)
    model = WideCNN()
    if not CACHE.is_file():
        images, labels = load_fashion_mnist("train")
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        order = np.random.default_rng(0).permutation(len(images))
        for i in range(0, len(images), 128):
            batch = order[i:i + 128]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(preprocess(images[batch])), torch.as_tensor(labels[batch]).long())
            loss.backward()
            opt.step()
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(CACHE)
    model.load_state_dict(torch.load(CACHE, weights_only=True))
    return model.eval()


def _predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(preprocess(images[i:i + 500])).argmax(1) for i in range(0, len(images), 500)]).numpy()


def one(bits: float, limit: int) -> dict:
    """Save at ``bits`` with calibration's and repair's column limits at ``limit``; the decoded file's scores."""
    import codec
    import codec.rd.calibrate as calibrate
    from codec.rd.repair import RepairSettings

    model = trained()
    train_images, _ = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    reference = _predict(model, test_images)
    calibration = [preprocess(train_images[-1000:][i:i + 100]) for i in range(0, 1000, 100)]
    calibrate.FULL_H_MAX = limit  # read when calibrate() runs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wide.jwt"
        codec.save(model, path, bits_per_weight=bits, calibration=calibration,
                   repair=RepairSettings(max_columns=limit))
        cpu = time.process_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        decoded = WideCNN()
        decoded.load_state_dict({k: torch.as_tensor(v) for k, v in codec.load(path).items()})
        size = path.stat().st_size
    predicted = _predict(decoded.eval(), test_images)
    weights = sum(p.numel() for p in model.parameters())
    return {"bits": bits, "limit": limit, "bpw": 8 * size / weights,
            "float": 100 * float((reference == test_labels).mean()),
            "accuracy": 100 * float((predicted == test_labels).mean()),
            "agreement": 100 * float((predicted == reference).mean()),
            "cpu": cpu, "peak_mb": (peak - before) / 1024}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=float, action="append", help="bits per weight (repeatable; default 1 and 0.6)")
    parser.add_argument("--limits", default="4096,8192", help="column limits to compare (comma-separated)")
    parser.add_argument("--out", default="bench/results/wide_layers.md")
    parser.add_argument("--one", nargs=2, metavar=("BITS", "LIMIT"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(float(args.one[0]), int(args.one[1]))))
        return
    trained()  # trained once, before the children
    rows = []
    for bits in args.bits or [1.0, 0.6]:
        for limit in (int(x) for x in args.limits.split(",")):
            out = subprocess.run([sys.executable, "-m", "bench.wide_layers", "--one", str(bits), str(limit)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"-b {bits} limit {limit}: {row['bpw']:.3f} bits/weight, {row['accuracy']:.2f} % "
                  f"(float {row['float']:.2f} %), agreement {row['agreement']:.2f} %, {row['cpu']:.0f} CPU s, "
                  f"peak +{row['peak_mb']:.0f} MB", flush=True)
    lines = ["# A layer wider than the full-H limit (`python -m bench.wide_layers`)", "",
             f"WideCNN (Conv2d(512, 64, 3): 4,608 im2col columns), one epoch, float {rows[0]['float']:.2f} %; "
             f"1,000 calibration images; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.", "",
             "| -b | limit (FULL_H_MAX, max_columns) | bits/weight | accuracy | agreement with float | CPU s | "
             "peak RSS above the model |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['limit']} | {r['bpw']:.3f} | {r['accuracy']:.2f} % | {r['agreement']:.2f} % | "
              f"{r['cpu']:.0f} | {r['peak_mb']:.0f} MB |" for r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
