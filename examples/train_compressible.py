"""Train the Fashion-MNIST MLP plainly and for the codec, then compare them coded at several rates.

Both runs use the same schedule (Adam, lr 1e-3, batch 128, same seed and order); the codec run adds the
differentiable size estimate to the loss, ``loss = task + lam * codec.train.rate(model, setting) / n_weights``
(every ``--rate-every`` steps, to keep its cost low). Each model is then saved with
``codec.save(model, path, bits_per_weight=B)`` for every ``--bits`` B, decoded with ``codec.load`` and scored on
the 10,000 test images; ``--finetune N`` also fine-tunes the codec model for N steps with the codec in the loop
(:func:`codec.train.finetune`, distillation, no labels) at ``--setting`` and scores that file. Prints a table and
writes it with a plot of accuracy against bits/weight::

    python examples/train_compressible.py --epochs 2 --lam 0.5
    # -> bench/results/train.md, bench/results/train.png
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import codec
import codec.train
from bench.models import accuracy, load_fashion_mnist, make_model, model_class, preprocess


def train(kind: str, images, labels, epochs: int, seed: int, lam: float, setting: str, every: int,
          label: str) -> tuple[torch.nn.Module, float]:
    """Train a fresh model (``lam`` 0: plainly); return it and the seconds taken."""
    model = make_model(kind, seed)
    n_weights = sum(p.numel() for p in model.parameters())
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = preprocess(images), torch.as_tensor(labels, dtype=torch.int64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    steps = epochs * -(-len(inputs) // 128)
    with tqdm(total=steps, desc=label, unit="step") as bar:
        for _ in range(epochs):
            for i, batch in enumerate(torch.randperm(len(inputs), generator=generator).split(128)):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(inputs[batch]), targets[batch])
                if lam and i % every == 0:
                    bits = codec.train.rate(model, setting) / n_weights
                    loss = loss + lam * bits
                    bar.set_postfix(bits_per_weight=f"{bits.item():.3f}")
                loss.backward()
                optimizer.step()
                bar.update(1)
    model.eval()
    return model, time.perf_counter() - start


def coded(model: torch.nn.Module, **save_args) -> tuple[dict, float]:
    """The state_dict a file of ``model`` decodes to, and the file's bits per weight."""
    buf = io.BytesIO()
    codec.save(model, buf, **save_args)
    n_weights = sum(t.numel() for t in model.state_dict().values())
    return codec.load(buf.getvalue()), 8 * len(buf.getvalue()) / n_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lam", type=float, action="append", help="penalty strength(s) (default 0.5)")
    parser.add_argument("--setting", default="b4", help="the setting the rate is estimated for (default b4)")
    parser.add_argument("--rate-every", type=int, default=8, help="add the rate penalty every N steps")
    parser.add_argument("--bits", type=float, action="append", help="bits/weight budgets (default 0.1..1)")
    parser.add_argument("--finetune", type=int, default=0, help="codec-in-the-loop steps at --setting")
    parser.add_argument("--train-size", type=int, default=60000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train")
    args = parser.parse_args()
    lams, budgets = args.lam or [0.5], args.bits or [0.1, 0.15, 0.2, 0.3, 0.5, 1.0]
    codec.train.as_setting(args.setting)  # a bad setting fails here, not after training
    torch.set_num_threads(2)
    images, labels = load_fashion_mnist("train")
    images, labels = images[: args.train_size], labels[: args.train_size]
    test_images, test_labels = load_fashion_mnist("test")
    runs = {"plain": train(args.model, images, labels, args.epochs, args.seed, 0.0, args.setting, 1, "plain")}
    for lam in lams:
        runs[f"lam={lam:g}"] = train(args.model, images, labels, args.epochs, args.seed, lam, args.setting,
                                     args.rate_every, f"lam={lam:g}")
    cls = model_class(args.model)
    rows, curves = [], {}
    plain_seconds = runs["plain"][1]
    for name, (model, seconds) in runs.items():
        float_acc = accuracy(model, test_images, test_labels)
        n_weights = sum(p.numel() for p in model.parameters())
        est = codec.train.rate(model, args.setting).item() / n_weights
        curve = []
        for b in tqdm(budgets, desc=f"coding {name}", unit="file"):
            try:
                state, bpw = coded(model, bits_per_weight=b)
            except codec.EncodeError as exc:  # below the smallest encoding the search has for this model
                rows.append((name, f"budget {b:g}: {exc}", np.nan, np.nan, float_acc, seconds / plain_seconds, est))
                continue
            acc = accuracy((cls, state), test_images, test_labels)
            curve.append((bpw, acc))
            rows.append((name, f"budget {b:g}", bpw, acc, float_acc, seconds / plain_seconds, est))
        curves[name] = curve
        state, bpw = coded(model, overrides={"*": args.setting})
        rows.append((name, args.setting, bpw, accuracy((cls, state), test_images, test_labels), float_acc,
                     seconds / plain_seconds, est))
        if args.finetune and name != "plain":
            data = [preprocess(images[i : i + 256]) for i in range(0, min(len(images), 256 * 32), 256)]
            tuned = cls()
            tuned.load_state_dict(model.state_dict())
            start = time.perf_counter()
            codec.train.finetune(tuned, data, setting=args.setting, steps=args.finetune, lr=1e-4, progress=True)
            extra = time.perf_counter() - start
            tuned.eval()
            state, bpw = coded(tuned, overrides={"*": args.setting})
            rows.append((f"{name} + finetune {args.finetune}", args.setting, bpw,
                         accuracy((cls, state), test_images, test_labels), accuracy(tuned, test_images, test_labels),
                         (seconds + extra) / plain_seconds, np.nan))
    command = (f"`python examples/train_compressible.py --epochs {args.epochs} --train-size {len(images)} "
               + " ".join(f"--lam {lam:g}" for lam in lams)
               + f" --setting {args.setting} --rate-every {args.rate_every}"
               + "".join(f" --bits {b:g}" for b in budgets) + (f" --finetune {args.finetune}" if args.finetune else "")
               + "`")
    header = ("| model | coded with | bits/weight (file) | test accuracy % | float accuracy % | training time vs plain "
              f"| rate estimate at {args.setting} (bits/weight) |")
    lines = [(f"# Training for the codec: {args.model}, {args.epochs} epochs, {len(images)} images, penalty at "
              f"{args.setting} every {args.rate_every} steps"), "",
             command, "", header, "|---" * 7 + "|"]
    for name, how, bpw, acc, float_acc, cost, est in rows:
        lines.append(f"| {name} | {how} | {bpw:.3f} | {acc:.2f} | {float_acc:.2f} | {cost:.2f}x | {est:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(*zip(*curve), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("bits/weight (whole file)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.model}: plain vs trained for the codec")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
