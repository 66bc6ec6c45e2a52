"""Obtain the reference models' fp32 state_dicts for benchmarks.

* ``"mlp"`` is loaded from the bundled fixture ``fixtures/mlp_fmnist.pt``
  (regenerate it with ``fixtures/make_fixtures.py``);
* ``"cnn"`` and ``"bncnn"`` are trained on first use (seed 0, ``EPOCHS[kind]``
  epochs on the 60,000 training images, a few minutes each on 2 CPU cores) and
  cached in ``bench/.cache/`` (git-ignored).

``python -m bench.prepare`` builds the cache and prints the models' accuracies.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.models import ModelKind, evaluate_state_dict, load_fashion_mnist, make_model, train

REPO_ROOT = Path(__file__).resolve().parent.parent
MLP_FIXTURE = REPO_ROOT / "fixtures" / "mlp_fmnist.pt"
SUBSET_FIXTURE = REPO_ROOT / "fixtures" / "fmnist_test_subset.npz"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CNN_SEED = 0
CNN_EPOCHS = 3
#: Training epochs of the models trained on first use (the BatchNorm CNN converges faster).
EPOCHS = {"cnn": CNN_EPOCHS, "bncnn": 2}


def get_model(kind: ModelKind, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> dict[str, Tensor]:
    """Return the fp32 state_dict of the ``"mlp"`` fixture or the (trained on demand, cached) ``"cnn"``/``"bncnn"``."""
    if kind == "mlp":
        return torch.load(MLP_FIXTURE, weights_only=True)
    if kind not in EPOCHS:
        raise ValueError(f"kind must be 'mlp', 'cnn' or 'bncnn', got {kind!r}")
    cache_path = Path(cache_dir) / f"{kind}_fmnist_seed{CNN_SEED}_e{EPOCHS[kind]}.pt"
    if not cache_path.is_file():
        images, labels = load_fashion_mnist("train")
        model = train(make_model(kind, CNN_SEED), images, labels, epochs=EPOCHS[kind], seed=CNN_SEED)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = cache_path.with_suffix(".tmp")
        torch.save(dict(model.state_dict()), tmp_path)
        tmp_path.replace(cache_path)
    return torch.load(cache_path, weights_only=True)


def main() -> None:
    """Prepare the models and print their accuracies on the test subset and full test set."""
    test_images, test_labels = load_fashion_mnist("test")
    with np.load(SUBSET_FIXTURE) as subset:
        subset_images, subset_labels = subset["images"], subset["labels"]
    for kind in ("mlp", "cnn", "bncnn"):
        start = time.perf_counter()
        state_dict = get_model(kind)
        elapsed = time.perf_counter() - start
        sub_acc = evaluate_state_dict(kind, state_dict, subset_images, subset_labels)
        full_acc = evaluate_state_dict(kind, state_dict, test_images, test_labels)
        print(f"{kind}: subset({len(subset_labels)}) {sub_acc:.2f}%, full test {full_acc:.2f}%, "
              f"obtained in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
