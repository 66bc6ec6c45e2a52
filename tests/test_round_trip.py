"""tensorcodec.round_trip: the values a file decodes to, computed without the file (codec-in-the-loop training)."""

from __future__ import annotations

import numpy as np
import pytest

from codec import tensorcodec
from codec.blobcodecs.jpeg import Jpeg
from codec.blobcodecs.quant import Quant
from codec.dtypes import get_dtype
from codec.tensorcodec import EncodeOptions, decode_encoded, encode_tensor, parse_spec, round_trip

SETTINGS = ["jpeg,q6,table=ramp1", "q6.5,table=flat", "q90", "q40,table=jpeg", "q30,rows=8x8", "q75,tile=16x128",
            "b2", "b3", "b8", "b12", "b4,tile=32x32", "b5,rows=4x16", "jpegxl,d1.5", "lossless"]
SHAPES = [(512, 784), (130, 70), (10, 512), (32, 3, 3, 3), (1, 5000), (203, 190)]


def _storage(values: np.ndarray, dtype_name: str) -> np.ndarray:
    f32 = values.astype(np.float32)
    if dtype_name == "bfloat16":
        return (f32.view(np.uint32) >> 16).astype(np.uint16)
    return f32.astype(get_dtype(dtype_name).storage)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16", "float64"])
def test_round_trip_is_what_the_file_decodes_to(dtype_name):
    """Bit for bit the decode of the real encoding, for every codec, tiling, pixel depth and fallback (a tile with
    NaN, tensors too small for JPEG or for any lossy codec), padded edge tiles included."""
    rng = np.random.default_rng(7)
    dtype = get_dtype(dtype_name)
    for shape in SHAPES:
        values = rng.standard_normal(shape) * rng.choice([1e-3, 0.05, 3.0])
        if shape == (130, 70):
            values[5, 7] = np.nan
        array = _storage(values, dtype_name)
        for spec in SETTINGS:
            opts = parse_spec(spec, EncodeOptions())
            expected = decode_encoded(encode_tensor(array, dtype, opts), dtype, array.shape)
            got = round_trip(array, dtype, opts)
            assert got.dtype == expected.dtype and got.shape == expected.shape, (shape, spec)
            assert got.tobytes() == expected.tobytes(), (dtype_name, shape, spec)
            assert not np.shares_memory(got, array)


def test_jpeg_round_trip_leaves_out_only_the_huffman_optimisation():
    """Jpeg.round_trip codes without optimised Huffman tables (a larger blob) and decodes the same pixels."""
    rng = np.random.default_rng(3)
    pixels = np.clip(rng.normal(128, 40, (256, 320)), 0, 255).astype(np.uint8)
    for codec in (Jpeg(quality=6, table="ramp1"), Jpeg(quality=85, table="jpeg"), Jpeg(quality=30, table=[7] * 64)):
        assert len(codec.encode(pixels, optimize=False)) > len(codec.encode(pixels))
        decoded = codec.decode(codec.encode(pixels), pixels.shape, np.dtype(np.uint8))
        assert np.array_equal(codec.round_trip(pixels), decoded)
    quant = Quant(bits=3)
    levels = rng.integers(0, 8, (64, 100)).astype(np.uint8)
    assert np.array_equal(quant.round_trip(levels), quant.decode(quant.encode(levels), levels.shape, levels.dtype))


def test_padded_bands_decode_by_float32_arithmetic_exactly(monkeypatch):
    """A float32 band whose last tile column is padded (784 columns, 64-wide tiles) decodes by float32
    arithmetic to the formula's bits."""
    rng = np.random.default_rng(11)
    dtype = get_dtype("float32")
    array = (rng.standard_normal((512, 784)) * 0.05).astype(np.float32)
    encoded = encode_tensor(array, dtype, parse_spec("q6,table=ramp1", EncodeOptions()))
    t = encoded.tiling
    assert t.mode == "grid" and t.columns == t.grid[1] and t.cols % t.tile_w
    fast = decode_encoded(encoded, dtype, array.shape)
    monkeypatch.setattr(tensorcodec, "FLOAT32_ARITHMETIC", False)
    monkeypatch.setattr(tensorcodec, "LUT_MIN_TILE_PIXELS", 1 << 30)
    assert decode_encoded(encoded, dtype, array.shape).tobytes() == fast.tobytes()


def test_round_trip_of_rounded_significands_is_what_the_file_decodes():
    """``lossless`` with significand_bits: round_trip gives the rounded values the file holds, not the input."""
    dt = get_dtype("float32")
    array = np.random.default_rng(5).standard_normal(300).astype(np.float32)
    opts = EncodeOptions(codec="lossless", significand_bits=5)
    decoded = decode_encoded(encode_tensor(array, dt, opts), dt, array.shape)
    got = round_trip(array, dt, opts)
    assert np.array_equal(got, decoded) and not np.array_equal(got, array)
    assert np.array_equal(round_trip(array, dt, EncodeOptions(codec="lossless")), array)
