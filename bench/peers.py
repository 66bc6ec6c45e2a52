"""Real peer codecs installed from PyPI, in :mod:`bench.baselines`' ``(arrays, **params) -> Result`` form.

* ``nncodec``: Fraunhofer HHI's implementation of the MPEG NNR standard (ISO/IEC 15938-17; DeepCABAC inside),
  its data-free path: ``nncodec.nnc.compress(state_dict, qp=...)`` (uniform/dependent quantization with the
  default ``qp_density=2``, DeepCABAC), then ``nncodec.nnc.decompress``. Every tensor, biases and BatchNorm
  statistics included, is in the one bitstream (non-weights at nncodec's default ``nonweight_qp=-75``); the size
  is the bitstream's length. Integer tensors travel as int32, which NNR supports.
* ``hqq``: Half-Quadratic Quantization (Mobius Labs), data-free: ``hqq.core.quantize.Quantizer.quantize`` with
  the zero/scale optimisation on, groups of ``group_size`` along the input axis (``axis=1``), bit-packed. The
  size is the packed codes plus one fp16 scale and one fp16 zero per group (HQQ's stored form with an fp16
  compute dtype; the scales are rounded to fp16 before dequantizing, so the decoded weights match what is
  counted). Tensors follow the baselines' rules (small and 1-D ones lossless, per-tensor headers).

The GPTQ peer needs the model and calibration data, so it lives in :mod:`bench.gptq_ref`.

nncodec imports torchvision and cv2 for its dataset helpers only; :func:`_import_nncodec` imports it with the
stand-ins of ``bench/_standins`` on ``sys.path`` and removes them afterwards.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch

from bench.baselines import Result, _apply

STANDINS = Path(__file__).resolve().parent / "_standins"
NNCODEC_QPS = (-8, -12, -16, -20, -24, -28, -32, -38)
HQQ_SETTINGS = [{"nbits": b, "group_size": g} for b in (2, 3, 4, 8) for g in (32, 64, 128)]


@functools.lru_cache(maxsize=1)
def _import_nncodec():
    """``nncodec.nnc``, imported with the torchvision/cv2 stand-ins visible only while it imports."""
    sys.path.insert(0, str(STANDINS))
    try:
        from nncodec import nnc
    finally:
        sys.path.remove(str(STANDINS))
        for name in [m for m in sys.modules if m == "cv2" or m.split(".")[0] == "torchvision"]:
            if str(STANDINS) in (getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
    return nnc


def nncodec(arrays: dict[str, np.ndarray], qp: int = -38) -> Result:
    """NNR / DeepCABAC via nncodec at quantization parameter ``qp`` (lower: finer); the whole bitstream is the size."""
    nnc = _import_nncodec()
    params = {}  # copies: the caller's arrays may share memory with the model being benchmarked
    for name, x in arrays.items():
        x = np.asarray(x)
        dtype = np.float32 if np.issubdtype(x.dtype, np.floating) else np.int32
        params[name] = np.array(x, dtype, order="C", ndmin=1)  # NNR has no 0-d tensors (num_batches_tracked)
    bitstream = nnc.compress(params, bitstream_path=None, qp=qp, return_bitstream=True, verbose=False)
    decoded = nnc.decompress(bitstream, verbose=False)
    out = {name: np.array(decoded[name], dtype=np.float32).reshape(np.shape(x)) for name, x in arrays.items()}
    return Result(len(bitstream), out)


def hqq(arrays: dict[str, np.ndarray], nbits: int = 4, group_size: int = 64) -> Result:
    """HQQ (data-free, optimised zero/scale), ``nbits`` bits in groups of ``group_size``; tensors whose size
    ``group_size`` does not divide stay lossless (HQQ reshapes the tensor to [-1, group_size])."""
    from hqq.core.quantize import Quantizer

    def codec(x: np.ndarray):
        if x.size % group_size:
            return None
        W = torch.from_numpy(x.reshape(x.shape[0], -1))
        W_q, meta = Quantizer.quantize(W, nbits=nbits, group_size=group_size, optimize=True, axis=1,
                                       bitpack=True, compute_dtype=torch.float16, device="cpu")
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        decoded = Quantizer.dequantize(W_q, meta).float().reshape(x.shape).numpy()
        return W_q.numel() * W_q.element_size() + 2 * (meta["scale"].numel() + meta["zero"].numel()), decoded

    return _apply(arrays, codec)


#: Data-free peers: name -> (function, sweep), as bench.baselines.METHODS.
PEERS = {
    "nncodec": (nncodec, [{"qp": qp} for qp in NNCODEC_QPS]),
    "hqq": (hqq, HQQ_SETTINGS),
}
#: The GPTQ reference's sweep: bits and group size.
GPTQ_SETTINGS = [{"bits": 2, "group_size": 64}, {"bits": 3, "group_size": 128}, {"bits": 3, "group_size": 64},
                 {"bits": 4, "group_size": 128}, {"bits": 8, "group_size": 128}]
