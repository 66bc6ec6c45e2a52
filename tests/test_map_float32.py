"""The float32 pixel mapping (twentieth pass): the same offsets, scales and pixels as the binary64 one, on tiles
built to hit its edges (values on half steps, zeros of both signs, constant tiles, subnormal and huge values, NaN),
and the buffers reused by round_trip and the training loop."""

import numpy as np
import pytest

import codec.tensorcodec as tc
from codec import mapping, tiling
from codec.dtypes import get_dtype

F32 = get_dtype("float32")


def _both(matrix, tile=(64, 64), row_shape=None, bits=8, params="bfloat16"):
    """Every blob of ``matrix`` mapped by the float32 path (no cache) and by the binary64 one (a cache dict makes
    _map_blob widen the values), compared item by item; returns how many blobs took the float32 path."""
    t = tiling.plan_tiling(matrix.shape[0], matrix.shape[1], tile, row_shape, params)
    fast = 0
    for k in range(t.n_blobs):
        fast += tc._map_float32(matrix, t, bits, k) not in (None, NotImplemented)
        got, want = tc._map_blob(matrix, F32, t, bits, k), tc._map_blob(matrix, F32, t, bits, k, cache={})
        if want is None:
            assert got is None
            continue
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return fast


@pytest.mark.parametrize("tile,row_shape", [((64, 64), None), ((8, 16), None), ((7, 5), None), ((64, 64), (4, 10))])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_the_same_pixels_as_binary64_on_random_matrices(tile, row_shape, bits):
    rng = np.random.default_rng(bits)
    fast = 0
    for _ in range(6):
        rows = int(rng.integers(1, 150))
        scale = 10.0 ** rng.uniform(-30, 30)
        matrix = (rng.standard_normal((rows, 40)) * scale).astype(np.float32)
        for params in ("bfloat16", "float32"):
            fast += _both(matrix, tile, row_shape, bits, params)
    assert fast  # the float32 path ran (it is not the binary64 one compared with itself)


def test_values_on_half_steps_are_recomputed_in_binary64(monkeypatch):
    """Values placed at the middle of two pixel levels of their tile: the float32 quotient cannot tell which way
    they round, so each is recomputed (counted here) and rounds as binary64 does (half to even)."""
    rng = np.random.default_rng(0)
    near = []
    real = np.flatnonzero
    monkeypatch.setattr(mapping.np, "flatnonzero", lambda x: near.append(real(x).size) or real(x))
    for _ in range(20):
        lo, hi = -rng.uniform(0.01, 1), rng.uniform(0.01, 1)
        offset, scale = mapping.params_from_range(np.array([lo]), np.array([hi]), 8, "bfloat16")
        steps = rng.integers(0, 255, (64, 64)) + 0.5
        matrix = (np.float64(offset[0]) + steps * np.float64(scale[0])).astype(np.float32)
        matrix[0, 0], matrix[-1, -1] = lo, hi
        assert _both(np.clip(matrix, np.float32(lo), np.float32(hi)))
    assert sum(near) > 0.9 * 20 * 64 * 64


def test_zeros_constant_tiles_subnormals_nan_and_several_blobs():
    rng = np.random.default_rng(1)
    zeros = rng.choice(np.array([0.0, -0.0, 1.0, 2.0, -1.0], np.float32), (70, 90))
    zeros[:8] = 0.25  # constant tiles
    zeros[8:16, :16] = -0.0
    _both(zeros, (8, 16))
    _both((rng.standard_normal((50, 60)) * 1e-40).astype(np.float32), (8, 8))  # subnormal values and steps
    huge = rng.standard_normal((50, 60)).astype(np.float32)
    huge[3, 4] = 3e38
    _both(huge, (8, 8))
    for bad in (np.nan, np.inf, -np.inf):
        m = rng.standard_normal((50, 60)).astype(np.float32)
        m[10, 10] = bad
        _both(m, (8, 8))
        _both(m, row_shape=(6, 10))
    wide = (rng.standard_normal((1100, 1000)) * 0.05).astype(np.float32)  # several blobs, a ragged last row
    t = tiling.plan_tiling(1100, 1000, (64, 64), None)
    assert t.n_blobs > 1
    assert _both(wide) == t.n_blobs
    assert _both(wide, row_shape=(25, 40)) > 1


def test_round_trip_into_a_given_array():
    rng = np.random.default_rng(2)
    array = (rng.standard_normal((96, 80)) * 0.1).astype(np.float32)
    for spec in ("jpeg,q20", "b4", "lossless"):
        opts = tc.parse_spec(spec, tc.EncodeOptions())
        want = tc.round_trip(array, F32, opts)
        out = np.full_like(array, np.nan)
        assert tc.round_trip(array, F32, opts, out) is out
        assert np.array_equal(out, want)
        assert np.array_equal(want, tc.decode_encoded(tc.encode_tensor(array, F32, opts), F32, array.shape))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32\(96, 80\) array, not float64"):
        tc.round_trip(array, F32, opts, np.empty((96, 80)))
    with pytest.raises(ValueError, match="C-contiguous"):
        tc.round_trip(array, F32, opts, np.empty((80, 96), np.float32).T)


def test_the_heap_settings_hold_where_glibc_is():
    """steady_heap (training) and bound_heap (calibrated encodes) set glibc's thresholds, the same answer each call;
    elsewhere they do nothing and say so."""
    import ctypes
    import sys

    from codec.parallel import bound_heap, steady_heap

    first = steady_heap()
    assert isinstance(first, bool) and steady_heap() is first and bound_heap() is first
    if sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt"):
        assert first


def test_save_without_the_error_measurement_writes_the_same_bytes(tmp_path):
    """measure_errors=False (the Budget's measurements): the same file, without the JPEG blob decoded again, so
    without the warning about a tensor coded no better than storing zeros."""
    import torch

    import codec

    g = torch.Generator().manual_seed(3)
    sd = {"big.weight": torch.randn(128, 256, generator=g), "ok.weight": torch.randn(128, 256, generator=g)}
    for options in ({"quality": 1}, {"codec": "quant", "bits": 1}, {"row_shape": (16, 16), "quality": 1}):
        notes = codec.save(sd, tmp_path / "a.jwt", **options)
        assert any("no better than storing zeros" in n for n in notes)
        assert codec.save(sd, tmp_path / "b.jwt", measure_errors=False, **options) == []
        assert (tmp_path / "a.jwt").read_bytes() == (tmp_path / "b.jwt").read_bytes()


@pytest.mark.parametrize("shape,param", [((3, 4, 5), (3, 1, 5)), ((3, 4, 5), (1, 1, 5)), ((6, 7), (6, 1)),
                                         ((6, 7), (7,)), ((2, 3, 4), (4,))])
def test_gathered_parameters_are_the_broadcast_ones(shape, param):
    rng = np.random.default_rng(1)
    p = rng.standard_normal(param).astype(np.float32)
    where = np.unravel_index(rng.choice(int(np.prod(shape)), 9, replace=False), shape)
    assert np.array_equal(mapping._gather(p, where, shape), np.broadcast_to(p, shape)[where])


def test_the_reciprocal_keeps_the_quotient_within_the_margin():
    """(x - offset) * float32(1 / scale) in float32 against the binary64 quotient, at the extremes of the float32
    steps the path accepts and for quotients up to 255: within a third of HALF_MARGIN (three roundings of 2**-24
    at most 256: 4.6e-5 against 1.2e-4), so the values it leaves to the float32 rounding round as binary64's."""
    rng = np.random.default_rng(2)
    for exponent in (-100, -30, 0, 30, 100):
        scale = (rng.uniform(1, 2, 4096) * 2.0**exponent).astype(np.float32)
        offset = (rng.standard_normal(4096) * 2.0**exponent).astype(np.float32)
        x = (offset.astype(np.float64) + scale.astype(np.float64) * rng.uniform(0, 255, 4096)).astype(np.float32)
        x = np.maximum(x, offset)
        got = np.subtract(x, offset, dtype=np.float32) * mapping.reciprocals(scale)
        want = (x.astype(np.float64) - offset.astype(np.float64)) / scale.astype(np.float64)
        assert np.abs(got - want).max() < mapping.HALF_MARGIN / 2.6
    assert mapping.reciprocals(np.array([0.0, 2.0], np.float32)).tolist() == [1.0, 0.5]


def test_a_scaled_table_is_a_new_list_each_time():
    from codec.blobcodecs.jpeg import quality_scale, scaled_table

    first = scaled_table("ramp1", 731)
    first[0] = 999  # a caller's list: the next call is not changed by it
    assert scaled_table("ramp1", 731)[0] != 999 and scaled_table("ramp1", 731) == scaled_table("ramp1", 731)
    assert scaled_table("jpeg", quality_scale(50))[:3] == [16, 11, 10]
