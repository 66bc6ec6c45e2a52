"""Parallel coding: the same bytes and values whatever the job count, exact decoding fast paths."""

from __future__ import annotations

import numpy as np
import pytest

from codec import mapping, tensorcodec
from codec.blobcodecs import Zstd
from codec.dtypes import from_float64, get_dtype
from codec.format import TensorEntry
from codec.parallel import INLINE, make_executor, resolve_jobs
from codec.tensorcodec import EncodeOptions, decode_tensor, encode_tensor

RNG = np.random.default_rng(7)

#: (shape, options): grid bands, rows mode, grids whose mosaic is narrower
#: than the matrix, tiny tiles (no lookup table), 16-bit pixels, lossless.
CASES = [
    ((300, 200), {}),
    ((130, 100), {"quality": 30, "tile": (48, 40)}),
    ((512, 784), {"row_shape": (28, 28), "quality": 20}),
    ((10, 40000), {"tile": (8, 64)}),
    ((37, 36), {"row_shape": (6, 6)}),
    ((70, 90), {"tile": (4, 3)}),
    ((120, 130), {"codec": "jpegxl", "quality": 80, "effort": 1}),
    ((64, 300), {"codec": "quant", "bits": 5}),
    ((64, 300), {"codec": "quant", "bits": 11, "params": "float32"}),
    ((50, 60), {"codec": "lossless"}),
]


def _storage(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` in the storage form of dtype ``name`` (bfloat16 by rounding float32 bits)."""
    dtype = get_dtype(name)
    if name == "bfloat16":
        return from_float64(values.astype(np.float32).astype(np.float64), dtype)
    return values.astype(dtype.storage)


@pytest.mark.parametrize("shape, options", CASES)
@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_blobs_and_values_do_not_depend_on_jobs(shape, options, name):
    """Encoding and decoding with 1, 2 or 3 workers gives the same blobs and the same decoded bits."""
    dtype = get_dtype(name)
    array = _storage(np.cumsum(RNG.standard_normal(shape), axis=-1) * 0.02, name)
    opts = EncodeOptions(**options)
    results = []
    for jobs in (1, 2, 3):
        executor = make_executor(jobs)
        encoded = encode_tensor(array, dtype, opts, executor=executor)
        entry = TensorEntry("w", dtype, shape, encoded.codec, encoded.tiling)
        decoded = decode_tensor(entry, encoded.blobs, executor=executor)
        assert decoded.dtype == dtype.storage and decoded.shape == shape and decoded.flags.c_contiguous
        results.append((encoded.blobs, decoded.tobytes()))
        if executor is not INLINE:
            executor.shutdown()
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("name", ["float64", "float32", "float16", "bfloat16"])
def test_lookup_table_is_the_spec_formula(name):
    """Each table entry is RN64(offset + scale * p) rounded to the dtype, including halfway cases."""
    dtype = get_dtype(name)
    offset = (RNG.standard_normal(40) * 10.0 ** RNG.integers(-8, 4, 40)).astype(np.float32)
    scale = np.abs(RNG.standard_normal(40) * 10.0 ** RNG.integers(-9, 1, 40)).astype(np.float32)
    offset[:3], scale[:3] = [1.0, -3.0, 0.5], [2.0**-24, 2.0**-10, 0.0]  # steps at and below the dtype's spacing
    table = mapping.lookup_table(offset, scale, dtype)
    pixels = np.broadcast_to(np.arange(256, dtype=np.uint8), (40, 256))
    exact = [from_float64(np.float64(o) + np.float64(s) * np.float64(p), dtype)
             for o, s, p in zip(offset.repeat(256), scale.repeat(256), pixels.reshape(-1))]
    assert table.dtype == dtype.storage
    assert table.reshape(-1).tobytes() == np.array(exact, dtype.storage).tobytes()
    assert table.tobytes() == from_float64(mapping.from_pixels(pixels[:, :, None], offset, scale), dtype).tobytes()


@pytest.mark.parametrize("shape, options", [c for c in CASES if c[1].get("codec") in (None, "quant")])
def test_table_and_arithmetic_decoding_agree(shape, options, monkeypatch):
    """Decoding through per-tile lookup tables gives the same bits as evaluating the formula per pixel."""
    dtype = get_dtype("bfloat16")
    array = _storage(RNG.standard_normal(shape), "bfloat16")
    encoded = encode_tensor(array, dtype, EncodeOptions(**options))
    entry = TensorEntry("w", dtype, shape, encoded.codec, encoded.tiling)
    monkeypatch.setattr(tensorcodec, "LUT_MIN_TILE_PIXELS", 1)
    by_table = decode_tensor(entry, encoded.blobs)
    monkeypatch.setattr(tensorcodec, "LUT_MIN_TILE_PIXELS", 1 << 30)
    assert decode_tensor(entry, encoded.blobs).tobytes() == by_table.tobytes()


def test_decode_writes_into_a_given_array():
    """decode_tensor fills a preallocated output and returns that very array."""
    dtype = get_dtype("float32")
    array = RNG.standard_normal((200, 300)).astype(np.float32)
    for opts in (EncodeOptions(), EncodeOptions(codec="lossless")):
        encoded = encode_tensor(array, dtype, opts)
        entry = TensorEntry("w", dtype, array.shape, encoded.codec, encoded.tiling)
        out = np.full(array.shape, np.nan, np.float32)
        assert decode_tensor(entry, encoded.blobs, out=out) is out
        assert np.isfinite(out).all()


@pytest.mark.parametrize("itemsize_dtype", ["<f4", "<f8", "<u2", "u1"])
def test_zstd_unshuffles_in_chunks(itemsize_dtype, monkeypatch):
    """Shuffled zstd content crossing several un-shuffle steps decodes exactly into ``out``."""
    from codec.blobcodecs import zstd

    monkeypatch.setattr(zstd, "_STEP", 1000)
    raw = RNG.integers(0, 256, 7777 * np.dtype(itemsize_dtype).itemsize, dtype=np.uint8)
    array = raw.view(itemsize_dtype).reshape(7777)
    blob = Zstd().encode(array)
    out = np.empty(7777, itemsize_dtype)
    assert Zstd().decode(blob, (7777,), np.dtype(itemsize_dtype), out=out) is out
    assert out.tobytes() == array.tobytes()


def test_a_non_finite_blob_falls_back_to_lossless_in_parallel():
    """An infinity in the last image blob makes the whole tensor lossless, whatever the job count."""
    array = RNG.standard_normal((3000, 400)).astype(np.float32)
    array[-1, -1] = np.inf
    executor = make_executor(2)
    try:
        encoded = encode_tensor(array, get_dtype("float32"), EncodeOptions(), executor=executor)
    finally:
        if executor is not INLINE:
            executor.shutdown()
    assert encoded.codec.codec_id == "zstd_planes" and "Inf" in encoded.fallback


def test_jobs_are_validated():
    """jobs: None or 0 means one per core, a positive count is kept, anything else is refused."""
    assert resolve_jobs(None) == resolve_jobs(0) >= 1
    assert resolve_jobs(3) == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="jobs"):
            resolve_jobs(bad)


def _model() -> dict:
    """A state_dict with lossy, lossless, bfloat16, integer and aliased tensors."""
    import torch

    gen = torch.Generator().manual_seed(3)
    sd = {f"block{i}.weight": torch.randn(192, 160, generator=gen) for i in range(5)}
    sd.update({f"block{i}.bias": torch.randn(192, generator=gen) for i in range(5)})
    sd["emb"] = torch.randn(700, 64, generator=gen).bfloat16()
    sd["steps"] = torch.tensor(12)
    sd["head"] = sd["emb"]
    return sd


@pytest.mark.parametrize("options", [{}, {"codec": "jpeg", "quality": 70}, {"codec": "lossless"}])
def test_saved_files_do_not_depend_on_jobs(tmp_path, options):
    """codec.save writes the same bytes with 1, 2 and 4 jobs; codec.load gives the same tensors with each."""
    import codec
    import torch

    sd = _model()
    files = []
    for jobs in (1, 2, 4):
        codec.save(sd, tmp_path / f"{jobs}.jwt", jobs=jobs, **options)
        files.append((tmp_path / f"{jobs}.jwt").read_bytes())
    assert files[0] == files[1] == files[2]
    loads = [codec.load(tmp_path / "1.jwt", jobs=jobs) for jobs in (1, 2, 4)]
    for out in loads[1:]:
        assert list(out) == list(loads[0]) and out["head"] is out["emb"]
        assert all(torch.equal(out[k], loads[0][k]) for k in out)


def test_streaming_reads_ahead_a_bounded_number_of_tensors(tmp_path, monkeypatch):
    """iter_arrays starts decoding at most 2 * jobs tensors ahead of what it has handed out, pipe or file."""
    import io

    import codec
    from codec import reader as reader_mod

    sd = _model()
    codec.save(sd, tmp_path / "m.jwt", codec="jpeg")
    events: list[str] = []
    real = reader_mod.start_decode
    monkeypatch.setattr(reader_mod, "start_decode", lambda e, *a: events.append("start") or real(e, *a))
    class Pipe(io.FileIO):
        def seekable(self):
            return False

    for source in (tmp_path / "m.jwt", io.BufferedReader(Pipe(tmp_path / "m.jwt"))):
        events.clear()
        with codec.Reader(source, jobs=2) as r:
            assert r.seekable == isinstance(source, type(tmp_path))
            for entry, array in r.iter_arrays():
                events.append("yield")
                assert (array is None) == (entry.alias is not None)
        ahead = [events[: i + 1].count("start") - events[: i + 1].count("yield") for i in range(len(events))]
        assert max(ahead) <= 4 + 1 and events.count("yield") == len(sd)


def test_cli_jobs_option_gives_the_same_file(tmp_path):
    """`jwt encode -j 1` and `-j 2` write the same bytes, and `jwt decode -j 2` reads them back."""
    import torch
    from click.testing import CliRunner

    from jwt_cli.main import cli

    torch.save(_model(), tmp_path / "m.pt")
    for jobs in ("1", "2"):
        result = CliRunner().invoke(cli, ["encode", str(tmp_path / "m.pt"), "-o", str(tmp_path / f"{jobs}.jwt"),
                                          "--jobs", jobs, "-q"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "1.jwt").read_bytes() == (tmp_path / "2.jwt").read_bytes()
    result = CliRunner().invoke(cli, ["decode", str(tmp_path / "2.jwt"), "-o", str(tmp_path / "back.pt"), "-j", "2"])
    assert result.exit_code == 0, result.output
    assert set(torch.load(tmp_path / "back.pt", weights_only=True)) == set(_model())


@pytest.mark.parametrize("shape, options", [c for c in CASES if c[1].get("codec") in (None, "quant")])
def test_float32_arithmetic_decoding_is_exact(shape, options, monkeypatch):
    """float32 tensors with bfloat16 parameters decode by float32 arithmetic to the formula's exact bits."""
    dtype = get_dtype("float32")
    array = (RNG.standard_normal(shape) * 10.0 ** RNG.integers(-30, 30)).astype(np.float32)
    encoded = encode_tensor(array, dtype, EncodeOptions(**options))
    entry = TensorEntry("w", dtype, shape, encoded.codec, encoded.tiling)
    fast = decode_tensor(entry, encoded.blobs)
    monkeypatch.setattr(tensorcodec, "FLOAT32_ARITHMETIC", False)
    monkeypatch.setattr(tensorcodec, "LUT_MIN_TILE_PIXELS", 1 << 30)
    assert decode_tensor(entry, encoded.blobs).tobytes() == fast.tobytes()


def test_float32_arithmetic_matches_the_formula_on_hard_cases():
    """float32 offset + scale * p equals RN32(RN64(offset + scale * p)) for bfloat16 parameters, halfway sums too."""
    bf16 = lambda v: (np.asarray(v, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # noqa: E731
    exponents = RNG.integers(-140, 120, 4000).astype(np.float64)
    offset = bf16(RNG.standard_normal(4000) * 2.0 ** exponents)
    scale = bf16(np.abs(RNG.standard_normal(4000)) * 2.0 ** (exponents - RNG.integers(0, 40, 4000)))
    scale[:1000] = bf16(np.abs(offset[:1000]) * 2.0**-24)  # sums land on float32 halfway points
    pixels = np.arange(256, dtype=np.uint8)
    fast = (pixels[None, :] * scale[:, None]) + offset[:, None]
    exact = mapping.lookup_table(offset, scale, get_dtype("float32"))
    assert fast.dtype == np.float32 and fast.tobytes() == exact.tobytes()
