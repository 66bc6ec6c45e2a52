"""Competing weight compressors that the jwt benchmark compares against.

Every method is a function ``(arrays, **params) -> Result`` taking a dict of
float32 numpy arrays.  Each one really encodes every tensor to bytes and
decodes those bytes again, so ``Result.nbytes`` is the size of everything a
decoder needs and ``Result.arrays`` is what that decoder would return.

Shared accounting rules:

* Tensors with ``ndim < 2`` or fewer than ``MIN_LOSSY_ELEMENTS`` elements are
  kept losslessly (fp32 bytes + zstd level 19) by every method.
* Every tensor also pays a header: its name (UTF-8, 2-byte length prefix), a
  1-byte rank, 4 bytes per dimension and a 1-byte method tag.
* Side information (scales, minima, ranges) is counted at its stored dtype.

``METHODS`` maps a method name to ``(function, list of parameter settings)``
for a sweep; run this module to self-check every setting on random data.

GGUF: gguf-py (the ``gguf`` package) implements numpy ``quantize`` only for
the legacy block types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0).  Its k-quants
(Q2_K..Q6_K) have ``dequantize`` only, so they are not offered here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import gguf
import imagecodecs
import numpy as np
import zstandard

MIN_LOSSY_ELEMENTS = 16384
ZSTD_LEVEL = 19
GROUP = 64

# The 16 NormalFloat4 levels of QLoRA, as in bitsandbytes' NF4 code book.
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
        0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)

# gguf block types whose quantize is implemented in gguf-py, best first.
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

# A per-tensor codec maps one float32 array to (nbytes, reconstruction), or
# to None when the method cannot code that tensor (lossless rule applies).
Codec = Callable[[np.ndarray], "tuple[int, np.ndarray] | None"]


@dataclass
class Result:
    """Compressed size in bytes and the decoded float32 arrays."""

    nbytes: int
    arrays: dict[str, np.ndarray]


def _zstd(buf: bytes) -> tuple[int, bytes]:
    """Compress buf with zstd level 19; return (compressed size, decompressed bytes)."""
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).compress(buf)
    return len(frame), zstandard.ZstdDecompressor().decompress(frame)


def _header_nbytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of the per-tensor header: name, rank, dimensions and method tag."""
    return 2 + len(name.encode()) + 1 + 4 * len(shape) + 1


def _lossless(x: np.ndarray) -> tuple[int, np.ndarray]:
    """Code a tensor as fp32 bytes + zstd level 19 (bit-exact)."""
    n, raw = _zstd(x.tobytes())
    return n, np.frombuffer(raw, np.float32).reshape(x.shape)


def _apply(arrays: dict[str, np.ndarray], codec: Codec) -> Result:
    """Run codec on every large tensor, the lossless rule on the rest, and add headers."""
    total, out = 0, {}
    for name, x in arrays.items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        coded = codec(x) if x.ndim >= 2 and x.size >= MIN_LOSSY_ELEMENTS else None
        n, recon = coded if coded is not None else _lossless(x)
        out[name] = np.require(recon, np.float32, "W")  # decoded buffers may be read-only
        total += n + _header_nbytes(name, x.shape)
    return Result(total, out)


def _groups(x2d: np.ndarray, size: int) -> np.ndarray:
    """Split each row into groups of `size`, edge-padding the last; shape [rows, n_groups, size]."""
    pad = -x2d.shape[1] % size
    padded = np.pad(x2d, ((0, 0), (0, pad)), mode="edge")
    return padded.reshape(x2d.shape[0], -1, size)


def _ungroup(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Invert _groups: drop the padding and restore the tensor's shape."""
    cols = int(np.prod(shape)) // g.shape[0]
    return g.reshape(g.shape[0], -1)[:, :cols].reshape(shape)


def _pack_nibbles(q: np.ndarray) -> bytes:
    """Pack 4-bit codes (uint8 < 16) two per byte, low nibble first."""
    flat = q.ravel()
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_nibbles(buf: bytes, n: int) -> np.ndarray:
    """Unpack n 4-bit codes from bytes made by _pack_nibbles."""
    b = np.frombuffer(buf, np.uint8)
    return np.stack([b & 0x0F, b >> 4], axis=1).ravel()[:n]


def _nibble_payload(q: np.ndarray, use_zstd: bool) -> tuple[int, np.ndarray]:
    """Store the real (unpadded) 4-bit codes packed, optionally zstd'd; return (size, decoded codes)."""
    packed = _pack_nibbles(q)
    n, packed = _zstd(packed) if use_zstd else (len(packed), packed)
    return n, _unpack_nibbles(packed, q.size).reshape(q.shape)


def fp16_zstd(arrays: dict[str, np.ndarray]) -> Result:
    """Cast to fp16, then zstd level 19."""

    def codec(x):
        n, raw = _zstd(x.astype(np.float16).tobytes())
        return n, np.frombuffer(raw, np.float16).astype(np.float32).reshape(x.shape)

    return _apply(arrays, codec)


def int8_channel(arrays: dict[str, np.ndarray]) -> Result:
    """Symmetric int8 per output channel (row of the [out, -1] view), fp32 scales, zstd on the int8 bytes."""

    def codec(x):
        rows = x.reshape(x.shape[0], -1)
        scale = np.abs(rows).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(rows / scale), -127, 127).astype(np.int8)
        n, raw = _zstd(q.tobytes())
        q = np.frombuffer(raw, np.int8).reshape(rows.shape)
        return n + scale.nbytes, (q * scale).astype(np.float32).reshape(x.shape)

    return _apply(arrays, codec)


def int4_g64(arrays: dict[str, np.ndarray], zstd: bool = False) -> Result:
    """Asymmetric 4-bit, groups of 64 along each row, fp16 scale + fp16 min per group, packed nibbles (+ zstd if asked)."""

    def codec(x):
        g = _groups(x.reshape(x.shape[0], -1), GROUP)
        lo = g.min(axis=2, keepdims=True).astype(np.float16).astype(np.float32)
        step = ((g.max(axis=2, keepdims=True) - lo) / 15).astype(np.float16).astype(np.float32)
        step[step == 0] = 1.0
        q = np.clip(np.rint((g - lo) / step), 0, 15).astype(np.uint8)
        n, q = _nibble_payload(_ungroup(q, x.shape), zstd)
        q = _groups(q.reshape(x.shape[0], -1), GROUP)
        return n + 2 * 2 * lo.size, _ungroup(q * step + lo, x.shape).astype(np.float32)

    return _apply(arrays, codec)


def nf4_g64(arrays: dict[str, np.ndarray]) -> Result:
    """QLoRA NF4: blocks of 64 over the flattened tensor, fp32 absmax per block, packed nibbles."""
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

    def codec(x):
        g = _groups(x.reshape(1, -1), GROUP)
        absmax = np.abs(g).max(axis=2, keepdims=True)
        absmax[absmax == 0] = 1.0
        q = np.searchsorted(midpoints, g / absmax).astype(np.uint8)
        n, q = _nibble_payload(_ungroup(q, x.shape), use_zstd=False)
        q = _groups(q.reshape(1, -1), GROUP)
        return n + absmax.nbytes, _ungroup(NF4_LEVELS[q] * absmax, x.shape)

    return _apply(arrays, codec)


def uniform_zstd(arrays: dict[str, np.ndarray], bits: int = 8) -> Result:
    """Per-tensor uniform quantization to 2**bits levels over [min, max]; uint8 indices + zstd level 19."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    top = 2**bits - 1

    def codec(x):
        lo, hi = float(x.min()), float(x.max())
        step = (hi - lo) / top or 1.0
        q = np.clip(np.rint((x - lo) / step), 0, top).astype(np.uint8)
        n, raw = _zstd(q.tobytes())
        q = np.frombuffer(raw, np.uint8).reshape(x.shape)
        # Side information: fp32 min, fp32 max, 1-byte bit width.
        return n + 9, (q * np.float32(step) + np.float32(lo)).astype(np.float32)

    return _apply(arrays, codec)


def sz3(arrays: dict[str, np.ndarray], rel_error: float = 1e-3) -> Result:
    """SZ3 (imagecodecs) with a point-wise error bound of rel_error times each tensor's value range."""

    def codec(x):
        frame = imagecodecs.sz3_encode(x, mode=imagecodecs.SZ3.MODE.REL, rel=rel_error)
        return len(frame), imagecodecs.sz3_decode(frame, shape=x.shape, dtype=np.float32)

    return _apply(arrays, codec)


def zfp(arrays: dict[str, np.ndarray], rel_error: float = 1e-3) -> Result:
    """ZFP fixed-accuracy mode (imagecodecs) with tolerance rel_error times each tensor's value range."""

    def codec(x):
        tolerance = rel_error * float(x.max() - x.min())
        frame = imagecodecs.zfp_encode(x, level=tolerance, mode=imagecodecs.ZFP.MODE.FIXED_ACCURACY)
        return len(frame), imagecodecs.zfp_decode(frame)

    return _apply(arrays, codec)


def zstd_lossless(arrays: dict[str, np.ndarray]) -> Result:
    """fp32 bytes + zstd level 19 for every tensor (bit-exact)."""
    return _apply(arrays, _lossless)


def zipnn_like(arrays: dict[str, np.ndarray]) -> Result:
    """ZipNN-style byte grouping: the 4 bytes of each fp32 as 4 planes, zstd level 19 per plane (bit-exact)."""

    def codec(x):
        planes = x.view(np.uint8).reshape(-1, 4).T
        coded = [_zstd(p.tobytes()) for p in planes]
        restored = np.stack([np.frombuffer(raw, np.uint8) for _, raw in coded], axis=1)
        return sum(n for n, _ in coded), restored.view(np.float32).reshape(x.shape)

    return _apply(arrays, codec)


def gguf_quant(arrays: dict[str, np.ndarray], qtype: str = "Q8_0") -> Result:
    """llama.cpp GGUF block quantization via gguf-py (exact block bytes); rows not a multiple of the block stay lossless."""
    kind = gguf.GGMLQuantizationType[qtype]
    block, _ = gguf.GGML_QUANT_SIZES[kind]

    def codec(x):
        if x.shape[-1] % block:
            return None
        blocks = gguf.quants.quantize(x, kind)
        return blocks.nbytes, gguf.quants.dequantize(blocks, kind).reshape(x.shape)

    return _apply(arrays, codec)


METHODS: dict[str, tuple[Callable[..., Result], list[dict]]] = {
    "fp16_zstd": (fp16_zstd, [{}]),
    "int8_channel": (int8_channel, [{}]),
    "int4_g64": (int4_g64, [{"zstd": False}, {"zstd": True}]),
    "nf4_g64": (nf4_g64, [{}]),
    "uniform_zstd": (uniform_zstd, [{"bits": b} for b in range(2, 9)]),
    "sz3": (sz3, [{"rel_error": e} for e in (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)]),
    "zfp": (zfp, [{"rel_error": e} for e in (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)]),
    "gguf": (gguf_quant, [{"qtype": t} for t in GGUF_TYPES]),
    "zstd_lossless": (zstd_lossless, [{}]),
    "zipnn_like": (zipnn_like, [{}]),
}

LOSSLESS = ("zstd_lossless", "zipnn_like")


def bits_per_weight(result: Result, arrays: dict[str, np.ndarray]) -> float:
    """Bits per weight: 8 * nbytes over the total element count of the original arrays."""
    return 8 * result.nbytes / sum(a.size for a in arrays.values())


def relative_rms_error(result: Result, arrays: dict[str, np.ndarray]) -> float:
    """RMS of the reconstruction error over RMS of the weights, over all tensors."""
    err = sum(float(np.sum((result.arrays[k].astype(np.float64) - a) ** 2)) for k, a in arrays.items())
    return (err / sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values())) ** 0.5


def _self_check() -> None:
    """Run every method setting on random weights, check it, and print bpw / error / time."""
    rng = np.random.default_rng(0)
    arrays = {
        "fc1.weight": rng.normal(0, 0.05, (512, 784)),
        "fc1.bias": rng.normal(0, 0.01, 512),
        "fc2.weight": rng.normal(0, 0.03, (64, 784)),
        "ffn.intermediate.weight": rng.standard_t(5, (1536, 384)) * 0.02,
        "ffn.output.weight": rng.normal(0, 0.02, (384, 1536)),
        "head.weight": rng.normal(0, 0.1, (10, 64)),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    print(f"{'method':<28}{'bpw':>8}{'rel.RMS':>11}{'seconds':>9}")
    for name, (fn, settings) in METHODS.items():
        for params in settings:
            t0 = time.perf_counter()
            res = fn(arrays, **params)
            dt = time.perf_counter() - t0
            err = relative_rms_error(res, arrays)
            for k, a in arrays.items():
                assert res.arrays[k].shape == a.shape and res.arrays[k].dtype == np.float32, (name, k)
                if a.ndim < 2 or a.size < MIN_LOSSY_ELEMENTS or name in LOSSLESS:
                    assert np.array_equal(res.arrays[k], a), (name, k)
            assert np.isfinite(err), (name, params)
            label = name + "".join(f" {k}={v}" for k, v in params.items())
            print(f"{label:<28}{bits_per_weight(res, arrays):8.3f}{err:11.2e}{dt:9.2f}")


if __name__ == "__main__":
    _self_check()
