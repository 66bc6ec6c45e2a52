"""Big models: the fast rate search, lossless speed paths, sharded folders (Ray: test_ray.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import codec
from codec.api import to_numpy
from codec.dtypes import get_dtype
from codec.rd import fast
from codec.rd.allocate import measure, plan_options, row_images
from codec.tensorcodec import EncodeOptions


def _model() -> dict[str, torch.Tensor]:
    """Matrices large enough to be sampled (one with outlier columns, one smooth), plus small tensors."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=g) * 0.02
    a[:, :4] *= 20  # outlier channels
    b = torch.cumsum(torch.randn(384, 640, generator=g), dim=1) / 30
    return {"a.weight": a, "a.bias": torch.randn(512, generator=g), "b.weight": b,
            "head.weight": torch.randn(10, 384, generator=g), "norm.weight": torch.ones(384)}


def _tensors(sd):
    arrays = [(n, array, get_dtype(dtype)) for n, (array, dtype) in ((n, to_numpy(t)) for n, t in sd.items())]
    return lambda names=None: iter(arrays), sum(a.size for _, a, _ in arrays)


def _chosen_distortion(tensors, chosen) -> tuple[float, int]:
    """(sum of the allocator's distortion, bytes) of the chosen options, measured in full."""
    total, nbytes, seen = 0.0, 0, False
    for name, array, dtype in tensors():
        rows = row_images(array.shape, EncodeOptions(), input_layer=not seen) if array.ndim >= 2 else None
        seen |= array.ndim >= 2
        point = measure(name, array, dtype, "x", chosen[name], rows)[0]
        total, nbytes = total + point.nmse, nbytes + point.nbytes
    return total, nbytes


def test_sample_is_fixed_whole_tiles_of_the_tensor():
    """The sample is the same on every call, made of aligned 64-row blocks of the matrix; small tensors have none."""
    m = np.arange(1024 * 768, dtype=np.float32).reshape(1024, 768)
    s = fast.sample_matrix("w", m, full_rows=False)
    assert s is not None and np.array_equal(s, fast.sample_matrix("w", m, full_rows=False))
    assert s.shape[1] == fast.BLOCK_W and s.shape[0] % fast.BLOCK_H == 0 and s.size >= fast.SAMPLE_WEIGHTS
    for k in range(0, s.shape[0], fast.BLOCK_H):  # each block is a block of m at a multiple of its size
        r, c = divmod(int(s[k, 0]), 768)
        assert r % fast.BLOCK_H == 0 and c % fast.BLOCK_W == 0
        assert np.array_equal(s[k : k + fast.BLOCK_H], m[r : r + fast.BLOCK_H, c : c + fast.BLOCK_W])
    assert fast.sample_matrix("w", m, full_rows=True).shape[1] == 768
    assert fast.sample_matrix("w", m[:128, :256], full_rows=False) is None


def test_fast_search_meets_the_budget_close_to_exhaustive():
    """Fast and exhaustive searches both fit the budget; fast's distortion is within 5 % of exhaustive's.

    (Measured: +0 % at 1 bit, +3.5 % at 3 bits on this small model whose
    sample is a quarter of a tensor; bench/fast_search.py measures the
    bench models.)
    """
    tensors, total = _tensors(_model())
    bpw = 3.0
    budget = int(bpw * total / 8)
    stats: dict = {}
    quick = fast.plan_fast(tensors, EncodeOptions(), lambda n: None, bits_per_weight=bpw, total_weights=total,
                           stats=stats)
    full = plan_options(tensors, EncodeOptions(), lambda n: None, bits_per_weight=bpw, total_weights=total,
                        search="exhaustive")
    (d_fast, b_fast), (d_full, b_full) = _chosen_distortion(tensors, quick), _chosen_distortion(tensors, full)
    assert b_fast <= budget and b_full <= budget
    assert d_fast <= 1.05 * d_full
    assert stats["exact"] < 3 * len(quick)  # only a few full measurements per tensor


def test_fast_is_the_default_and_files_meet_the_budget(tmp_path, monkeypatch):
    """codec.save(bits_per_weight=) runs the fast search by default; the whole file lands at or under B."""
    called = []
    real = fast.plan_fast
    monkeypatch.setattr(fast, "plan_fast", lambda *a, **k: called.append(1) or real(*a, **k))
    sd = _model()
    codec.save(sd, tmp_path / "m.jwt", bits_per_weight=2.0)
    assert called
    weights = sum(t.numel() for t in sd.values())
    assert 0.95 * 2.0 <= 8 * os.path.getsize(tmp_path / "m.jwt") / weights <= 2.0
    with pytest.raises(ValueError, match="search"):
        codec.save(sd, tmp_path / "x.jwt", bits_per_weight=2.0, search="quick")


def test_cli_search_option(tmp_path):
    """jwt encode --search exhaustive and the default both meet -b; an unknown search is a usage error."""
    from jwt_cli.main import cli

    torch.save(_model(), tmp_path / "m.pt")
    runner = CliRunner()
    weights = sum(t.numel() for t in _model().values())
    for search in ("fast", "exhaustive"):
        out = tmp_path / f"{search}.jwt"
        r = runner.invoke(cli, ["encode", str(tmp_path / "m.pt"), "-o", str(out), "-b", "1.5", "--search", search, "-q"])
        assert r.exit_code == 0, r.output
        assert 8 * out.stat().st_size <= 1.5 * weights
    bad = runner.invoke(cli, ["encode", str(tmp_path / "m.pt"), "-b", "1.5", "--search", "quick"])
    assert bad.exit_code == 2


# -- lossless: zstd exponent first ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_exponent_first_is_bit_exact_on_every_bit_pattern(dtype):
    """Random bit patterns (NaN payloads, infinities, subnormals, -0) decode bit for bit, across chunk steps."""
    from codec.blobcodecs import Zstd, get_codec

    storage = get_dtype(dtype).storage
    bits = np.random.default_rng(3).integers(0, 256, (3 << 16) * storage.itemsize + 8 * storage.itemsize,
                                              dtype=np.uint8)
    array = bits.view(storage).reshape(-1, 8)
    codec_ = get_codec(Zstd(1, True, exponent_first=True).get_config())
    blob = codec_.encode(array)
    assert codec_.decode(blob, array.shape, storage).tobytes() == array.tobytes()
    assert codec_.decode(blob, array.shape, storage).tobytes() != Zstd(1, True).decode(blob, array.shape, storage).tobytes()


def test_exponent_first_layout_and_parameter_checks():
    """The content is the rotated elements' byte planes, most significant first; bad combinations are refused."""
    import zstandard

    from codec.blobcodecs import Zstd, get_codec
    from codec.errors import FormatError

    x = np.array([1.0, -2.0], np.float32)  # 0x3F800000, 0xC0000000
    content = zstandard.ZstdDecompressor().decompress(Zstd(1, True, exponent_first=True).encode(x))
    # rotated left one bit: 0x7F000000, 0x80000001 -> planes (most significant first) 7F 80 | 00 00 | 00 00 | 00 01
    assert content == bytes([0x7F, 0x80, 0, 0, 0, 0, 0, 0x01])
    assert Zstd().get_config() == {"id": "zstd", "level": 9, "shuffle": True}  # old files' config unchanged
    with pytest.raises(FormatError):
        get_codec({"id": "zstd", "level": 1, "shuffle": False, "exponent_first": True})
    with pytest.raises(FormatError):
        get_codec({"id": "zstd", "level": 1, "shuffle": True, "exponent_first": 1})
    with pytest.raises(FormatError):
        Zstd(1, True, exponent_first=True).decode(Zstd(1, True).encode(np.zeros(4, np.uint8)), (4,), np.dtype(np.uint8))


def test_lossless_floats_are_stored_as_rotated_planes(tmp_path):
    """--codec lossless stores bfloat16 tensors as zstd_planes rotated 1 bit, float32 rotated 3 bits (a format 1.2
    file), float16 exponent first and ints shuffled; the round trip is bit-exact."""
    sd = {"w": torch.randn(64, 64).to(torch.bfloat16), "v": torch.randn(300), "h": torch.randn(50).half(),
          "i": torch.arange(10)}
    codec.save(sd, tmp_path / "m.jwt", codec="lossless")
    with codec.open(tmp_path / "m.jwt") as f:
        assert f.reader.entry("w").codec.get_config() == {"id": "zstd_planes", "rotate": 1}
        assert f.reader.entry("v").codec.get_config() == {"id": "zstd_planes", "rotate": 3}
        assert f.reader.entry("h").codec.get_config().get("exponent_first") is True
        assert "exponent_first" not in f.reader.entry("i").codec.get_config()
    head = (tmp_path / "m.jwt").read_bytes()
    assert head[8:12] == bytes([1, 0, 3 if head[12] & 2 else 2, 0])  # format 1.2 (1.3 with a compressed index)
    out = codec.load(tmp_path / "m.jwt")
    assert all(torch.equal(out[k], v) for k, v in sd.items())


# -- sharded folder output ----------------------------------------------------------------------------------------


def _load_sharded(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded folder, read as transformers reads it: the index's weight_map, then each shard."""
    import json

    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(folder / shard))
        assert all(index["weight_map"][n] == shard for n in tensors)
        out.update(tensors)
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def test_decode_to_shards_of_a_maximum_size(tmp_path):
    """Shards hold at most max_shard_size bytes of data (a bigger tensor alone), in order; everything round-trips."""
    from codec.io_formats import decode_model

    g = torch.Generator().manual_seed(0)
    sd = {f"layer{i}.weight": torch.randn(64, 100 + i, generator=g).to(torch.bfloat16) for i in range(6)}
    sd["big"] = torch.randn(300, 100, generator=g)  # 120 kB: over the shard size, alone in its shard
    sd["tied"] = sd["layer0.weight"]  # an alias, written as a copy
    codec.save(sd, tmp_path / "m.jwt", codec="lossless", attachments={"config.json": b"{}"})
    notes = decode_model(tmp_path / "m.jwt", tmp_path / "out/", max_shard_size="40kB")
    assert notes == []
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "config.json" in files and "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    from safetensors.torch import load_file

    for shard in shards:
        tensors = load_file(str(tmp_path / "out" / shard))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000 or list(tensors) == ["big"]
    back = _load_sharded(tmp_path / "out")
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_one_shard_is_a_plain_model_file_and_bad_sizes_are_refused(tmp_path):
    """A model that fits one shard gives model.safetensors; bad sizes and non-folder outputs are one-line errors."""
    from jwt_cli.main import cli

    sd = {"w": torch.randn(16, 16)}
    codec.save(sd, tmp_path / "m.jwt")
    runner = CliRunner()
    ok = runner.invoke(cli, ["decode", str(tmp_path / "m.jwt"), "-o", str(tmp_path / "one") + "/",
                             "--max-shard-size", "2GB", "-q"])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    bad = runner.invoke(cli, ["decode", str(tmp_path / "m.jwt"), "-o", str(tmp_path / "x") + "/",
                              "--max-shard-size", "2XB"])
    assert bad.exit_code == 2 and "2XB" in bad.output and "Traceback" not in bad.output
    pt = runner.invoke(cli, ["decode", str(tmp_path / "m.jwt"), "-o", str(tmp_path / "x.pt"), "--max-shard-size", "1GB"])
    assert pt.exit_code == 2 and "folder" in pt.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.pt").exists()


def test_sharded_folder_reencodes_from_its_shards(tmp_path):
    """A decoded sharded folder is a valid input: encoding it again reads the shards through the index."""
    from codec.io_formats import decode_model, encode_model

    sd = {f"l{i}": torch.randn(32, 32) for i in range(4)}
    codec.save(sd, tmp_path / "m.jwt", codec="lossless")
    decode_model(tmp_path / "m.jwt", tmp_path / "f/", max_shard_size=5000)
    assert len(list((tmp_path / "f").glob("model-*.safetensors"))) == 4
    encode_model(tmp_path / "f", tmp_path / "again.jwt", codec="lossless")
    back = codec.load(tmp_path / "again.jwt")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_safetensors_shards_are_not_kept_mapped(tmp_path):
    """Encoding from shards reads tensors with plain reads: no shard stays mapped (address space = one tensor)."""
    from safetensors.torch import save_file

    from codec.io_formats import open_source

    save_file({"a": torch.randn(64, 64)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.randn(32, 8).to(torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with open_source(tmp_path) as src:
        a, b = src.tensors["a"], src.tensors["b"]
        maps = open("/proc/self/maps").read()
        assert "model-0000" not in maps
        assert b.dtype == torch.bfloat16 and b.shape == (32, 8) and a.shape == (64, 64)


def _safetensors_file(path, header: dict, data_bytes: int) -> None:
    """A safetensors file of ``header`` and ``data_bytes`` of (sparse, zero) data."""
    import json
    import struct

    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + data_bytes)


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.exists("/proc/self/status"), reason="needs RLIMIT_AS")
def test_a_shard_larger_than_the_address_space_limit_is_read_tensor_by_tensor(tmp_path):
    """A 4 GiB shard under an address-space limit of the process's size + 1 GiB (ulimit -v): its header is read
    without mapping the file, and a tensor of it loads (safe_open maps the whole shard and fails there)."""
    import subprocess
    import sys

    big = 1 << 31  # bf16 elements: 4 GiB, a sparse file
    _safetensors_file(tmp_path / "model.safetensors", {
        "__metadata__": {"format": "pt"},
        "small": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "big": {"dtype": "BF16", "shape": [big], "data_offsets": [16, 16 + 2 * big]}}, 16 + 2 * big)
    script = f"""
import resource, re
import codec.io_formats as io
vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
with io.open_source({str(tmp_path / "model.safetensors")!r}) as src:
    print(list(src.tensors), src.tensors["small"].tolist())
"""
    paths = os.pathsep.join([p for p in sys.path if p])
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ,
                       "PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "['small', 'big'] [[0.0, 0.0], [0.0, 0.0]]"


@pytest.mark.parametrize("header, data, problem", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1],
      "data_offsets": [12, 16]}}, 16, "data starts at 12, expected 8"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "do not hold a F32 [3]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "hold 8 bytes of data, the file 12"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "needs a dtype, a shape and two"),
    ({"__metadata__": {"k": 1}}, 0, "__metadata__ is not an object of strings"),
    ([1, 2], 0, "header is not a JSON object"),
])
def test_hostile_safetensors_headers_are_one_line_errors(tmp_path, header, data, problem):
    """Headers whose offsets leave gaps, overrun, miscount or are not what safetensors writes: a one-line
    EncodeError naming the file, as safetensors itself would refuse them."""
    from codec.io_formats import open_source

    _safetensors_file(tmp_path / "x.safetensors", header, data)
    with pytest.raises(codec.EncodeError, match="x.safetensors: not a safetensors file") as e:
        with open_source(tmp_path / "x.safetensors"):
            pass
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_a_lazy_checkpoint_is_read_once_by_a_default_encode(tmp_path):
    """codec.save of a lazy mapping (a safetensors shard) reads each tensor once: checks use shapes and dtypes
    (before, the tensor checks and the sharing scan read the whole checkpoint twice more); too large a tensor is
    still refused by name without being read."""
    from codec.io_formats import LazyTensors

    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(64, 96, generator=g), "b": torch.randn(32, generator=g).to(torch.bfloat16)}
    reads: list[str] = []

    def load(name):
        reads.append(name)
        return sd[name].clone()

    lazy = LazyTensors({n: (tuple(t.shape), to_numpy(t)[1]) for n, t in sd.items()}, load)
    codec.save(lazy, tmp_path / "m.jwt")
    assert sorted(reads) == ["a", "b"]
    back = codec.load(tmp_path / "m.jwt")
    assert torch.equal(back["b"], sd["b"]) and torch.allclose(back["a"], sd["a"], atol=0.02)
    huge = LazyTensors({"h": ((1 << 40,), "float32")}, load)
    with pytest.raises(codec.EncodeError, match="tensor 'h': 4398046511104 bytes, over the"):
        codec.save(huge, tmp_path / "h.jwt")
    assert "h" not in reads and not (tmp_path / "h.jwt").exists()


# -- quant's zstd level ---------------------------------------------------------------------------------------------


def test_quant_codes_gaussian_pixels_at_level_1_and_structured_ones_at_its_level():
    """A large blob of noise-like pixels is zstd level 1 (level 9 gains nothing there); smooth pixels keep level 9,
    which is smaller; both decode exactly."""
    from codec.blobcodecs.quant import SAMPLE_BYTES, Quant

    rng = np.random.default_rng(3)
    side = 1024  # 1 M pixels: well above 2 * SAMPLE_BYTES
    assert side * side > 2 * SAMPLE_BYTES
    gauss = rng.standard_normal((side, side))
    smooth = np.cumsum(rng.standard_normal((side, side)), axis=1) / 30
    for bits in (2, 6, 8, 12):
        q = Quant(bits=bits, level=9)
        for name, w in (("gauss", gauss), ("smooth", smooth)):
            pixels = np.rint((w - w.min()) / np.ptp(w) * ((1 << bits) - 1)).astype(q.pixel_dtype)
            blob = q.encode(pixels)
            assert np.array_equal(q.decode(blob, pixels.shape, pixels.dtype), pixels)
            fast = Quant(bits=bits, level=1).encode(pixels)
            if name == "gauss":
                assert blob == fast, bits
            elif bits <= 8:  # (smooth 12-bit pixels gain 1.3 % at level 9: level 1 is kept)
                assert len(blob) < 0.97 * len(fast), bits
