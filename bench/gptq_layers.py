"""GPTQ rounding (codec.rd.gptq) against plain rounding, layer by layer, at equal size.

For every quant-able weight of the Fashion-MNIST MLP and CNN, ``H = E[x x^T]``
of the layer's inputs in the original model is measured on TRAINING images;
each weight is then coded with ``quant`` at 2..5 bits (64x64 and 8x64 tiles),
once from the original values (plain rounding) and once from the GPTQ target.
The output error is ``tr(dW H dW^T) / tr(W H W^T)`` with ``H`` measured on
held-out TEST images (``--in-sample``: the calibration ``H`` GPTQ used,
which flatters GPTQ where it has more input dimensions than the data
constrains); "plain@size" is plain
rounding's error at GPTQ's size, interpolated (log error, linear in bytes)
between the plain points of the same tile shape::

    python -m bench.gptq_layers --calib 2048
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from codec.dtypes import get_dtype
from codec.format import TensorEntry
from codec.rd.gptq import gptq_target, output_error
from codec.rd.repair.fit import _layer_rows
from codec.tensorcodec import EncodeOptions, decode_tensor, encode_tensor, lossless_reason

from .models import load_fashion_mnist, model_class, preprocess
from .prepare import get_model

F32 = get_dtype("float32")
BITS = (2, 3, 4, 5)
TILES = ((64, 64), (8, 64))


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """``H`` of each Linear / Conv2d layer's input rows (im2col for convolutions)."""
    stats: dict[str, np.ndarray] = {}

    def hook(name):
        def grab(mod, args):
            rows = _layer_rows(mod, args[0]).double()
            stats[name] = stats.get(name, 0) + (rows.T @ rows).numpy() / rows.shape[0]
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for batch in x.split(256):
            model(batch)
    for h in handles:
        h.remove()
    n = len(x.split(256))
    return {k: v / n for k, v in stats.items()}


def code(array: np.ndarray, opts: EncodeOptions) -> tuple[np.ndarray, int]:
    encoded = encode_tensor(array, F32, opts)
    entry = TensorEntry("w", F32, array.shape, encoded.codec, encoded.tiling)
    return decode_tensor(entry, encoded.blobs).astype(np.float64), sum(map(len, encoded.blobs))


def at_size(points: list[tuple[int, float]], size: int) -> float:
    """Plain rounding's error at ``size`` bytes (log-linear interpolation; nan outside the measured range)."""
    pts = sorted(points)
    sizes = np.array([p[0] for p in pts], float)
    if not sizes[0] <= size <= sizes[-1]:
        return float("nan")
    return float(np.exp(np.interp(size, sizes, np.log([p[1] for p in pts]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=2048, help="training images for H")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--skip", default="", help="comma-separated layers to leave out (e.g. cnn.fc1, slow)")
    parser.add_argument("--in-sample", action="store_true", help="score with the calibration H")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train_x, _ = load_fashion_mnist("train")
    pick = np.sort(np.random.default_rng(0).choice(len(train_x), args.calib, replace=False))
    x = preprocess(train_x[pick])
    test_x, _ = load_fashion_mnist("test")
    x_eval = preprocess(test_x[: args.calib])
    print(f"{'layer':>16} {'tile':>5} {'bits':>4} {'plain B':>8} {'plain err':>9} {'gptq B':>8} {'gptq err':>9} "
          f"{'act B':>8} {'act err':>9} {'plain@size':>10} {'s':>5}")
    for kind in args.models.split(","):
        model = model_class(kind)()
        model.load_state_dict(get_model(kind))
        model.eval()
        hs = layer_inputs(model, x)
        h_eval = hs if args.in_sample else layer_inputs(model, x_eval)
        for name, module in model.named_modules():
            if name not in hs or f"{kind}.{name}" in args.skip.split(","):
                continue
            w = module.weight.detach().numpy()
            if lossless_reason(w, F32, "quant") is not None:
                continue
            h, ref = hs[name], w.astype(np.float64)
            score = h_eval[name]
            energy = output_error(np.zeros_like(ref), ref, score)
            for tile in TILES:
                plain_pts = []
                rows = []
                for bits in BITS:
                    opts = EncodeOptions(codec="quant", bits=bits, tile=tile)
                    plain, nb = code(w, opts)
                    plain_pts.append((nb, output_error(ref, plain, score) / energy))
                    start = time.perf_counter()
                    target, _ = gptq_target(w, F32, opts, h)
                    seconds = time.perf_counter() - start
                    g, gb = code(target, opts)
                    target, _ = gptq_target(w, F32, opts, h, act_order=True)
                    a, ab = code(target, opts)
                    rows.append((bits, nb, plain_pts[-1][1], gb, output_error(ref, g, score) / energy, ab,
                                 output_error(ref, a, score) / energy, seconds))
                for bits, nb, pe, gb, ge, ab, ae, seconds in rows:
                    print(f"{kind + '.' + name:>16} {tile[0]:>2}x{tile[1]:<2} {bits:4d} {nb:8d} {pe:9.2e} {gb:8d} "
                          f"{ge:9.2e} {ab:8d} {ae:9.2e} {at_size(plain_pts, gb):10.2e} {seconds:5.1f}", flush=True)


if __name__ == "__main__":
    main()
