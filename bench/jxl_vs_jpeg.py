"""JPEG XL against JPEG at equal size, to choose the JPEG XL default (``python -m bench.jxl_vs_jpeg``).

For the bench MLP and CNN and the attention / feed-forward matrices of
all-MiniLM-L6-v2 (layers 0 and 3), every matrix an image codec takes is coded
on 64x64 grid tiles with JPEG (flat table, the grid default) at a ladder of
qualities and with JPEG XL (16-bit, effort 3) at a ladder of distances. Per
model and setting: bits per weight (blobs and per-tile parameters) and the
relative RMS error over those matrices. For each JPEG XL point the JPEG error
at the same bits/weight is interpolated (log error, linear in rate), so the
table says where JPEG XL wins. Writes ``bench/results/jxl_vs_jpeg.md``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch

from codec.api import to_numpy
from codec.dtypes import get_dtype
from codec.tensorcodec import EncodeOptions, encode_tensor, lossless_reason, relative_error

OUT = Path(__file__).resolve().parent / "results" / "jxl_vs_jpeg.md"
QUALITIES = (5, 10, 20, 30, 50, 70, 85, 90, 95, 98)
DISTANCES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def matrices() -> dict[str, list[tuple[np.ndarray, object]]]:
    """Model name -> the (storage array, dtype) of its image-codable matrices."""
    from bench import minilm

    root = Path(__file__).resolve().parent
    models = {"MLP": torch.load(root.parent / "fixtures" / "mlp_fmnist.pt", weights_only=True),
              "CNN": torch.load(root / ".cache" / "cnn_fmnist_seed0_e3.pt", weights_only=True),
              "MiniLM": {k: v for k, v in minilm.load_state_dict().items()
                         if k.startswith(("encoder.layer.0.", "encoder.layer.3."))}}
    out = {}
    for name, sd in models.items():
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        items = []
        for tensor in sd.values():
            array, dtype_name = to_numpy(tensor)
            dtype = get_dtype(dtype_name)
            if lossless_reason(array, dtype, "jpeg") is None:
                items.append((array, dtype))
        out[name] = items
    return out


def point(items, opts: EncodeOptions) -> tuple[float, float]:
    """(bits/weight, relative RMS error) of ``opts`` over ``items``."""
    nbytes = weights = 0
    err2 = ref2 = 0.0
    for array, dtype in items:
        enc = encode_tensor(array, dtype, opts)
        nbytes += sum(map(len, enc.blobs))
        weights += array.size
        ref = float(np.sum(np.square(array.astype(np.float64))))
        err2 += relative_error(array, dtype, enc) ** 2 * ref
        ref2 += ref
    return 8 * nbytes / weights, math.sqrt(err2 / ref2)


def interpolate(curve: list[tuple[float, float]], bits: float) -> float | None:
    """The error of ``curve`` (bits, error) at ``bits``: linear in bits, log in error; None outside it."""
    curve = sorted(curve)
    for (b0, e0), (b1, e1) in itertools.pairwise(curve):
        if b0 <= bits <= b1:
            f = (bits - b0) / (b1 - b0) if b1 > b0 else 0.0
            return math.exp(math.log(e0) + f * (math.log(e1) - math.log(e0)))
    return None


def main() -> None:
    lines = ["# JPEG XL against JPEG at equal size (64x64 grid tiles)", "",
             ("`python -m bench.jxl_vs_jpeg`: JPEG with the flat table, JPEG XL 16-bit at effort 3; relative RMS "
              "error over each model's image-codable matrices; 'JPEG at same size' interpolates the JPEG curve."), ""]
    for model, items in matrices().items():
        jpeg = [point(items, EncodeOptions(codec="jpeg", quality=q, table="flat")) for q in QUALITIES]
        lines += [f"## {model} ({sum(a.size for a, _ in items):,} weights in {len(items)} matrices)", "",
                  "| JPEG quality | bits/weight | rel. error |", "|---|---|---|"]
        lines += [f"| {q} | {b:.3f} | {e:.4f} |" for q, (b, e) in zip(QUALITIES, jpeg)]
        lines += ["", "| JPEG XL distance | bits/weight | rel. error | JPEG at same size | JPEG XL / JPEG |",
                  "|---|---|---|---|---|"]
        for d in DISTANCES:
            b, e = point(items, EncodeOptions(codec="jpegxl", distance=d))
            ref = interpolate(jpeg, b)
            lines.append(f"| {d} | {b:.3f} | {e:.4f} | {'-' if ref is None else f'{ref:.4f}'} | "
                         f"{'-' if ref is None else f'{e / ref:.2f}'} |")
        lines.append("")
        print("\n".join(lines[-len(DISTANCES) - 4:]), flush=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
