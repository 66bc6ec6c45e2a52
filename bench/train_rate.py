"""Check codec.train.rate (the differentiable size estimate) against real files.

For each model and setting, every tensor is written with ``codec.save(..., overrides={"*": setting})`` and its
blob bytes read back (``codec.open(...).reader.entry(name).stored_bytes``); the estimate is
``codec.train.rate({name: tensor}, setting)``. Prints and writes bench/results/train_rate.md: per lossy tensor
and per model (all tensors, biases included) the estimate, the real size, their ratio, and whether the settings
rank the same way (Spearman's rho of the model totals)::

    python -m bench.train_rate
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

import codec
from codec.train import rate

SETTINGS = ("b8", "b6", "b4", "b3", "b2", "q95", "q90", "q75", "q50", "q30", "q20", "q10",
            "jpeg,q50,rows=28x28", "jpeg,q20,rows=28x28")
MODELS = {"mlp": Path("fixtures/mlp_fmnist.pt"), "cnn": Path("bench/.cache/cnn_fmnist_seed0_e3.pt")}
OUT = Path("bench/results/train_rate.md")
#: ``--heldout``: models and settings the body factors (codec.train.rate.BODY_FACTOR) were not fitted on: the
#: BatchNorm CNN, the first transformer layer of all-MiniLM-L6-v2, and qualities/bit depths off the fitted list.
HELDOUT_SETTINGS = ("b7", "b5", "q85", "q60", "q40", "q15", "q5", "jpeg,q30,table=jpeg")
HELDOUT_OUT = Path("bench/results/train_rate_heldout.md")


def heldout_models() -> dict[str, dict]:
    """``{name: state_dict}`` of the held-out models (MiniLM's first layer, if the model is installed)."""
    models = {"bncnn": torch.load("bench/.cache/bncnn_fmnist_seed0_e2.pt", weights_only=True)}
    try:
        from bench.minilm import load_state_dict

        full = load_state_dict()
        models["minilm layer 0"] = {n: t for n, t in full.items() if ".layer.0." in n}
    except Exception as exc:  # noqa: BLE001 (reported, the rest still measured)
        print(f"MiniLM not measured: {exc}")
    return models


def real_bytes(state_dict: dict, setting: str) -> dict[str, int]:
    """Blob bytes of each tensor in a real file of ``state_dict`` coded with ``setting``."""
    buf = io.BytesIO()
    codec.save(state_dict, buf, overrides={"*": setting})
    with codec.open(buf.getvalue()) as f:
        return {name: f.reader.entry(name).stored_bytes for name in state_dict}


def rank(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--heldout", action="store_true", help="models and settings the factors were not fitted on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.heldout:
        models, settings, out = heldout_models(), HELDOUT_SETTINGS, args.out or HELDOUT_OUT
    else:
        models = {m: torch.load(p, weights_only=True) for m, p in MODELS.items()}
        settings, out = SETTINGS, args.out or OUT
    lines = ["# codec.train.rate against real files" + (" (held out)" if args.heldout else ""), "",
             ("Estimate (codec.train.rate) and real blob bytes (codec.save, stored_bytes) per setting. "
              f"`python -m bench.train_rate{' --heldout' if args.heldout else ''}`."), ""]
    worst = 0.0
    for model, state_dict in models.items():
        big = [n for n, t in state_dict.items() if t.dim() >= 2 and t.numel() >= 1024]
        lines += [f"## {model}", "", "| setting | " + " | ".join(f"{n} est/real KB" for n in big)
                  + " | model est KB | model real KB | est/real |", "|---" * (len(big) + 4) + "|"]
        totals_est, totals_real = [], []
        for setting in settings:
            real = real_bytes(state_dict, setting)
            est = {n: float(rate({n: t}, setting).detach()) / 8 for n, t in state_dict.items()}
            cells = [f"{est[n] / 1e3:.1f} / {real[n] / 1e3:.1f} ({est[n] / real[n]:.2f})" for n in big]
            e, r = sum(est.values()), sum(real.values())
            worst = max(worst, *(abs(est[n] / real[n] - 1) for n in big))
            totals_est.append(e)
            totals_real.append(r)
            lines.append(f"| {setting} | " + " | ".join(cells) + f" | {e / 1e3:.1f} | {r / 1e3:.1f} | {e / r:.3f} |")
            print(lines[-1], flush=True)
        rho = np.corrcoef(rank(totals_est), rank(totals_real))[0, 1]
        lines += ["", f"Spearman rank correlation of the model totals over the settings: {rho:.3f}", ""]
        print(lines[-2])
    lines.append(f"Largest deviation of one lossy tensor: {100 * worst:.1f} %")
    print(lines[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
