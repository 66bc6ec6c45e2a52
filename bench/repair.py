"""Measure coding with repair (codec.rd.repair) and GPTQ rounding (codec.rd.gptq) on the Fashion-MNIST models.

For each bit budget the allocator's options are chosen once (data-free,
exactly as ``codec.save(..., bits_per_weight=B)`` chooses them); then the
model is written with those options three ways -- plain (the original
values), with GPTQ only, with the full repair -- through the ordinary
writer, decoded with the ordinary reader, and scored on the Fashion-MNIST
TEST set. Calibration uses TRAINING images only (no labels)::

    python -m bench.repair --model mlp -b 0.4 -b 0.5 --calib 4096

prints one table row per (budget, variant): file bits/weight, accuracy,
seconds.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

import codec
from codec.api import _plan, encoder_versions, to_numpy
from codec.dtypes import get_dtype
from codec.rd.repair import RepairSettings, code_with_repair
from codec.tensorcodec import EncodeOptions, Overrides, encode_tensor
from codec.writer import Writer

from .models import accuracy, load_fashion_mnist, model_class, preprocess
from .prepare import get_model


def plan(state_dict: dict, bits: float) -> dict[str, EncodeOptions]:
    """The options ``codec.save(state_dict, ..., bits_per_weight=bits)`` would choose."""
    return _plan(state_dict, {}, EncodeOptions(), Overrides(None), {}, encoder_versions(), bits, None, None, None,
                 {}, None)


def write(state_dict: dict, options: dict[str, EncodeOptions], targets: dict[str, np.ndarray]) -> bytes:
    """A .jwt file of ``state_dict`` (``targets`` replacing values) coded with ``options``."""
    buf = io.BytesIO()
    with Writer(buf, encoder=encoder_versions()) as writer:
        for name, tensor in state_dict.items():
            array, dtype_name = to_numpy(tensor)
            array = targets.get(name, array)
            writer.add(name, get_dtype(dtype_name), tuple(array.shape),
                       encode_tensor(array, get_dtype(dtype_name), options[name]))
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("-b", "--bits", type=float, action="append", help="bits/weight budgets (repeatable)")
    parser.add_argument("--calib", type=int, default=4096, help="training images used for calibration")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=RepairSettings.steps)
    parser.add_argument("--final-steps", type=int, default=RepairSettings.final_steps)
    parser.add_argument("--lr", type=float, default=RepairSettings.lr)
    parser.add_argument("--variants", default="plain,gptq,bias,refit,distill,all",
                        help="comma-separated: plain gptq bias refit distill closed closed-nogptq final all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    state_dict = get_model(args.model)
    model = model_class(args.model)()
    model.load_state_dict(state_dict)
    model.eval()
    train_x, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    pick = np.random.default_rng(0).choice(len(train_x), args.calib, replace=False)
    calib = preprocess(train_x[np.sort(pick)])
    batches = list(calib.split(args.batch))
    n_weights = sum(t.numel() for t in state_dict.values())
    print(f"{args.model}: {n_weights} weights, original accuracy {accuracy(model, test_x, test_y):.2f} %")
    print(f"{'budget':>6} {'variant':>8} {'bits/w':>7} {'acc %':>6} {'seconds':>7}")
    distill = {"steps": args.steps, "final_steps": args.final_steps, "lr": args.lr}
    variants = {  # each technique alone, and together
        "gptq": RepairSettings(steps=0, final_steps=0, bias_correction=False, refit=False),
        "bias": RepairSettings(steps=0, final_steps=0, gptq=False, refit=False),
        "refit": RepairSettings(steps=0, final_steps=0, gptq=False, bias_correction=False),
        "distill": RepairSettings(**distill, gptq=False, refit=False, bias_correction=False),
        "closed": RepairSettings(steps=0, final_steps=0),
        "closed-nogptq": RepairSettings(steps=0, final_steps=0, gptq=False),
        "final": RepairSettings(steps=0, final_steps=args.final_steps, lr=args.lr),
        "all": RepairSettings(**distill),
    }
    for bits in args.bits or [0.5]:
        options = plan(state_dict, bits)
        for variant in args.variants.split(","):
            start = time.perf_counter()
            if variant == "plain":
                targets, notes, changed = {}, [], {}
            else:
                targets, notes, changed = code_with_repair(model, batches, options, settings=variants[variant])
            seconds = time.perf_counter() - start
            blob = write(state_dict, {**options, **changed}, targets)
            decoded = codec.load(blob)
            acc = accuracy((model_class(args.model), decoded), test_x, test_y)
            print(f"{bits:6.2f} {variant:>8} {8 * len(blob) / n_weights:7.3f} {acc:6.2f} {seconds:7.1f}", flush=True)
            for note in notes:
                print("       ", note)


if __name__ == "__main__":
    main()
