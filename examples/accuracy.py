"""Compare a decoded Fashion-MNIST MLP with the original: size and test accuracy.

Usage: python examples/accuracy.py ORIGINAL.pt DECODED.pt MODEL.jwt

Accuracy is measured on the bundled labelled test subset
(fixtures/fmnist_test_subset.npz, 2000 images) and, when the Debian package
dataset-fashion-mnist is installed, on the full 10,000-image test set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.models import evaluate_state_dict, load_fashion_mnist  # noqa: E402


def main(original: str, decoded: str, jwt_file: str) -> None:
    """Print sizes, bits per weight and accuracy before and after."""
    before = torch.load(original, weights_only=True)
    after = torch.load(decoded, weights_only=True)
    weights = sum(t.numel() for t in before.values())
    size = Path(jwt_file).stat().st_size
    fc1 = before["fc1.weight"]
    sets = {"bundled subset (2000)": tuple(np.load(REPO / "fixtures" / "fmnist_test_subset.npz").values())}
    try:
        sets["full test set (10000)"] = load_fashion_mnist("test")
    except FileNotFoundError:
        pass
    print(f"original : {Path(original).stat().st_size:>9,} bytes ({weights:,} weights)")
    print(f"jwt      : {size:>9,} bytes, {8 * size / weights:.3f} bits/weight, "
          f"{4 * weights / size:.1f}x smaller than fp32")
    print(f"fc1 error: relative RMS {float((after['fc1.weight'] - fc1).norm() / fc1.norm()):.3f}")
    for label, (images, labels) in sets.items():
        a = evaluate_state_dict("mlp", before, images, labels)
        b = evaluate_state_dict("mlp", after, images, labels)
        print(f"accuracy on {label}: {a:.2f} % -> {b:.2f} % ({b - a:+.2f} points)")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
