"""The test vectors of fixtures/vectors (spec/format.md, section 10).

Valid files must decode to their expected arrays within their tolerance;
invalid files must raise exactly the error class the manifest names;
updates (1.1) decode against their base bit for bit, or raise the
manifest's error for a wrong, modified or missing base, and a reader that
implements only 1.0 refuses every update with a VersionError.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import codec
from codec import errors, tiling
from codec.dtypes import get_dtype, to_float64
from codec.tensorcodec import EncodeOptions, encode_tensor
from codec.writer import Writer
from conftest import Stream

VECTORS = Path(__file__).resolve().parent.parent / "fixtures" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
VALID = {Path(v["file"]).stem: v for v in MANIFEST["valid"]}
INVALID = {Path(v["file"]).stem: v for v in MANIFEST["invalid"]}
UPDATES = {Path(v["file"]).stem: v for v in MANIFEST["updates"]["cases"]}


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` at the float64 ``values`` (its unit in the last place)."""
    if dtype == "bfloat16":
        return np.spacing(np.abs(values).astype(np.float32)).astype(np.float64) * 65536
    storage = get_dtype(dtype).storage
    return np.spacing(np.abs(values).astype(storage)).astype(np.float64)


def assert_matches(got: np.ndarray, expected: np.ndarray, item: dict, step: np.ndarray | None) -> None:
    """``got`` equals ``expected`` bit for bit (tolerance 0) or within tolerance * step + 1 ulp."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, item["name"]
    if item["tolerance"] == 0:
        assert got.tobytes() == expected.tobytes(), f"{item['name']}: not bit-exact"
        return
    assert step is not None
    dtype = get_dtype(item["dtype"])
    g, e = to_float64(got, dtype), to_float64(expected, dtype)
    allowed = item["tolerance"] * step + ulp(np.maximum(np.abs(g), np.abs(e)), item["dtype"])
    worst = np.max(np.abs(g - e) - allowed)
    assert worst <= 0, f"{item['name']}: off by {worst} beyond {item['tolerance']} steps"


def steps(reader: codec.Reader, item: dict, arrays) -> np.ndarray | None:
    """Per-element quantization step (its tile's scale) of a lossy tensor, else None."""
    if "scale" not in item:
        return None
    t = reader.entry(item["name"]).tiling
    scale = arrays[item["scale"]].astype(np.float64)
    tiles = np.broadcast_to(scale[:, None, None], (t.n_tiles, t.tile_h, t.tile_w))
    return tiling.assemble_tiles(tiles, t).reshape(item["shape"])


def test_manifest_lists_exactly_the_files_on_disk():
    """Every file in valid/ and invalid/ is in the manifest, and every manifest file exists."""
    listed = {v["file"] for v in MANIFEST["valid"]} | {v["expected"] for v in MANIFEST["valid"]}
    listed |= {v["file"] for v in MANIFEST["invalid"]}
    listed |= {v["file"] for v in MANIFEST["updates"]["bases"] + MANIFEST["updates"]["cases"]}
    listed |= {v["expected"] for v in MANIFEST["updates"]["cases"] if "expected" in v}
    on_disk = {f"{d}/{p.name}" for d in ("valid", "invalid", "updates") for p in (VECTORS / d).iterdir()}
    assert on_disk - listed == set(), "files missing from the manifest"
    assert listed - on_disk == set(), "manifest files missing on disk"
    assert len(VALID) == len(MANIFEST["valid"]) and len(INVALID) == len(MANIFEST["invalid"])


def test_vector_files_match_their_checksums():
    """Each vector's bytes have the SHA-256 the manifest records (no newline or LFS mangling)."""
    for v in MANIFEST["valid"] + MANIFEST["invalid"] + MANIFEST["updates"]["bases"] + MANIFEST["updates"]["cases"]:
        assert hashlib.sha256((VECTORS / v["file"]).read_bytes()).hexdigest() == v["sha256"], v["file"]
        if "expected" in v:
            assert hashlib.sha256((VECTORS / v["expected"]).read_bytes()).hexdigest() == v["expected_sha256"]


def test_vectors_are_small_and_cover_every_error_class():
    """Vectors stay small (< 300 KB together) and every error class has a case."""
    total = sum(p.stat().st_size for d in ("valid", "invalid", "updates") for p in (VECTORS / d).iterdir())
    assert total < 300_000
    assert {v["error"] for v in MANIFEST["invalid"]} == {
        "FormatError", "VersionError", "ChecksumError", "LimitError", "UnknownCodecError"}
    assert {v.get("error") for v in UPDATES.values()} == {None, "BaseError"}


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_vector_decodes_with_reader(case):
    """codec.Reader gives the manifest's names, dtypes, shapes, metadata and expected arrays."""
    item = VALID[case]
    arrays = np.load(VECTORS / item["expected"])
    with codec.Reader(VECTORS / item["file"]) as reader:
        assert reader.keys() == [t["name"] for t in item["tensors"]]
        assert reader.metadata == item["metadata"]
        for t in item["tensors"]:
            entry = reader.entry(t["name"])
            assert (entry.dtype.name, list(entry.shape)) == (t["dtype"], t["shape"])
            assert entry.alias == t.get("alias")
            got = reader.read(t["name"])
            assert_matches(got, arrays[t["expected"]], t, steps(reader, t, arrays))
        expected = {a["name"]: arrays[a["expected"]].tobytes() for a in item.get("attachments", [])}
        assert list(reader.attachments) == list(expected)
        for name, content in expected.items():
            assert reader.attachments[name].size == len(content)
            assert reader.read_attachment(name) == content, name


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_vector_decodes_from_a_stream(case):
    """Decoding in file order from a non-seekable stream gives the same arrays."""
    item = VALID[case]
    arrays = np.load(VECTORS / item["expected"])
    data = (VECTORS / item["file"]).read_bytes()
    with codec.Reader(Stream(data, case)) as reader:
        assert not reader.seekable
        by_name = {t["name"]: t for t in item["tensors"]}
        decoded = {}
        for entry, array in reader.iter_arrays():
            t = by_name[entry.name]
            decoded[entry.name] = array if entry.alias is None else decoded[entry.alias]
        assert list(decoded) == list(by_name)
        attached = {att.name: content for att, content in reader.iter_attachments()}
        assert attached == {a["name"]: arrays[a["expected"]].tobytes() for a in item.get("attachments", [])}
    with codec.Reader(data) as seekable:
        for name, t in by_name.items():
            assert_matches(decoded[name], arrays[t["expected"]], t, steps(seekable, t, arrays))


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_vector_loads_with_codec_load(case):
    """codec.load gives torch tensors of the right dtype/shape/values; aliases share their target."""
    from codec.api import TORCH_DTYPES, to_numpy

    item = VALID[case]
    arrays = np.load(VECTORS / item["expected"])
    state_dict = codec.load(VECTORS / item["file"])
    assert list(state_dict) == [t["name"] for t in item["tensors"]]
    with codec.Reader(VECTORS / item["file"]) as reader:
        for t in item["tensors"]:
            tensor = state_dict[t["name"]]
            assert TORCH_DTYPES[tensor.dtype] == t["dtype"] and list(tensor.shape) == t["shape"]
            if "alias" in t:
                assert tensor is state_dict[t["alias"]]
            got, _ = to_numpy(tensor)
            assert_matches(got, arrays[t["expected"]], t, steps(reader, t, arrays))
    with codec.open(VECTORS / item["file"]) as f:
        assert f.attachments == [a["name"] for a in item.get("attachments", [])]
        for a in item.get("attachments", []):
            assert f.get_attachment(a["name"]) == arrays[a["expected"]].tobytes()


def decode_all(source) -> None:
    """Open ``source``, decode every tensor and read every attachment (the latest point an invalid file must fail)."""
    with codec.Reader(source) as reader:
        for name in reader.keys():
            reader.read(name)
        for name in reader.attachments:
            reader.read_attachment(name)


def load_all(source) -> None:
    """codec.load, then every attachment through codec.open (what restoring a model folder reads)."""
    codec.load(source)
    with codec.open(source) as f:
        for name in f.attachments:
            f.get_attachment(name)


def load_stream(stream) -> None:
    """Every tensor, then every attachment, in file order from a non-seekable stream."""
    with codec.open(stream) as f:
        for _ in f.items():
            pass
        for _ in f.reader.iter_attachments():
            pass


def check_error(exc: BaseException, item: dict, name: str) -> None:
    """The error is exactly the manifest's class, a JwtError and a ValueError, naming the file."""
    assert type(exc).__name__ == item["error"], f"{name}: {type(exc).__name__}: {exc}"
    assert type(exc) is getattr(errors, item["error"])
    assert isinstance(exc, codec.JwtError) and isinstance(exc, ValueError)
    assert name in str(exc), str(exc)
    assert "\n" not in str(exc)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_vector_raises_its_error(case):
    """codec.Reader (open, then decode every tensor) raises exactly the manifest's error class."""
    path = VECTORS / INVALID[case]["file"]
    with pytest.raises(codec.JwtError) as info:
        decode_all(path)
    check_error(info.value, INVALID[case], path.name)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_vector_raises_its_error_via_load(case):
    """codec.load (then the attachments) raises exactly the manifest's error class, naming the file."""
    path = VECTORS / INVALID[case]["file"]
    with pytest.raises(codec.JwtError) as info:
        load_all(path)
    check_error(info.value, INVALID[case], path.name)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_vector_raises_its_error_from_a_stream(case):
    """Read from a non-seekable stream, in file order, an invalid file raises the same error class."""
    path = VECTORS / INVALID[case]["file"]
    with pytest.raises(codec.JwtError) as info:
        load_stream(Stream(path.read_bytes(), path.name))
    check_error(info.value, INVALID[case], path.name)


# ------------------------------------------------------------------ updates (1.1)


def update_base(item: dict):
    """The manifest's base of an update case, decoded (None where the case gives no base)."""
    from codec.update import Base

    return None if item["base"] is None else Base.open(VECTORS / item["base"])


@pytest.mark.parametrize("case", sorted(c for c, v in UPDATES.items() if "error" not in v))
def test_update_vector_decodes_against_its_base(case):
    """A valid update decodes against its base, bit for bit, by name and from a stream; kinds match the index."""
    item = UPDATES[case]
    arrays = np.load(VECTORS / item["expected"])
    base = update_base(item)
    data = (VECTORS / item["file"]).read_bytes()
    with codec.Reader(data, base=base) as reader:
        assert reader.is_update and reader.keys() == [t["name"] for t in item["tensors"]]
        for t in item["tensors"]:
            entry = reader.entry(t["name"])
            kind = "alias" if entry.alias else "full" if entry.base is None else (
                "unchanged" if entry.unchanged else "difference")
            assert kind == t["kind"]
            assert reader.read(t["name"]).tobytes() == arrays[t["expected"]].tobytes(), t["name"]
    with codec.Reader(Stream(data, case), base=base) as reader:
        got = {e.name: a for e, a in reader.iter_arrays() if e.alias is None}
    for t in item["tensors"]:
        if t["kind"] != "alias":
            assert got[t["name"]].tobytes() == arrays[t["expected"]].tobytes(), t["name"]


@pytest.mark.parametrize("case", sorted(c for c, v in UPDATES.items() if "error" in v))
def test_update_vector_refuses_its_base(case):
    """A wrong, modified or missing base (or a hash that does not match) raises the manifest's error, naming it."""
    item = UPDATES[case]
    path = VECTORS / item["file"]
    with pytest.raises(codec.JwtError) as info:
        decode_all_with(path, update_base(item))
    check_error(info.value, item, path.name)


def decode_all_with(source, base) -> None:
    with codec.Reader(source, base=base) as reader:
        for name in reader.keys():
            reader.read(name)


@pytest.mark.parametrize("case", sorted(UPDATES))
def test_update_read_by_a_1_0_reader_is_a_version_error(case, monkeypatch):
    """A reader that implements only format 1.0 refuses every update on its header, with a VersionError."""
    import codec.format

    monkeypatch.setattr(codec.format, "MINOR", 0)
    path = VECTORS / UPDATES[case]["file"]
    with pytest.raises(codec.JwtError) as info:
        codec.Reader(path)
    check_error(info.value, {"error": MANIFEST["updates"]["error_1_0"]}, path.name)
    assert "update" in str(info.value) and "1.0" in str(info.value)


def test_every_1_0_vector_is_still_written_as_1_0():
    """Files without a base or a 1.1 codec parameter are 1.0 files: minor version 0 and no flags in the header;
    those with zstd's exponent_first (spec 5.1.1) are 1.1 files and those with zstd_planes (5.1.2) 1.2 files,
    without flags; the one with a compressed index is a 1.3 file with the flag index_zstd (bit 1) alone, those with
    compressed tile parameters 1.4 files with the flag params_zstd (bit 2) alone."""
    for v in MANIFEST["valid"] + MANIFEST["updates"]["bases"]:
        data = (VECTORS / v["file"]).read_bytes()
        if "future_minor" not in v["file"]:
            minor = 2 if "zstd_planes" in v["file"] else 1 if "exponent_first" in v["file"] else 0
            minor, flags = (3, 2) if "index_zstd" in v["file"] else (minor, 0)
            minor, flags = (4, 4) if "params_zstd" in v["file"] else (minor, flags)
            assert data[8:16] == bytes([1, 0, minor, 0, flags, 0, 0, 0]), v["file"]


def test_compressed_index_read_by_a_1_2_reader_is_a_version_error(monkeypatch):
    """A 1.2 reader refuses a file whose index is a zstd frame on its header, naming the flag: it could not
    parse the index, and must not try."""
    import codec.format

    monkeypatch.setattr(codec.format, "MINOR", 2)
    with pytest.raises(codec.VersionError, match="index_zstd.*1.3"):
        codec.Reader(VECTORS / "valid/index_zstd.jwt")


@pytest.mark.parametrize("case", sorted(c for c in VALID if c.startswith("params_zstd")))
def test_compressed_params_read_by_a_1_3_reader_is_a_version_error(case, monkeypatch):
    """A 1.3 reader refuses a file with compressed tile parameters on its header, naming the flag (it would take
    the frame for a parameter blob of the wrong size); a 1.4 reader decodes it (test_valid_vector_*)."""
    import codec.format

    monkeypatch.setattr(codec.format, "MINOR", 3)
    with pytest.raises(codec.VersionError, match="params_zstd.*1.4.*newer reader"):
        codec.Reader(VECTORS / VALID[case]["file"])


def test_writer_compresses_tile_parameters_where_they_save_a_percent_of_the_tensor(tmp_path):
    """A rows-mode JPEG layer whose 512 parameter pairs are 1 KB+ of a small file: written as a zstd frame (format
    1.4, flag params_zstd) and decoded to the same values as the plain form; with compress_params=False, or a
    large grid-tiled matrix where the frame saves under 1 % of the tensor, the file keeps its 1.2 header."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:16, 0:16]
    rows = [np.exp(-((y - rng.uniform(2, 14)) ** 2 + (x - rng.uniform(2, 14)) ** 2) / rng.uniform(8, 40)).ravel()
            * rng.uniform(-0.1, 0.1) + rng.normal(0, 1e-3, 256) for _ in range(512)]
    layer = {"fc.weight": np.asarray(rows, np.float32)}
    big = {"w": rng.standard_normal((512, 1024)).astype(np.float32)}
    opts = EncodeOptions(codec="jpeg", quality=20, row_shape=(16, 16))

    def write(tensors, opts, name):
        path = tmp_path / name
        with Writer(path, compress_index=False) as w:
            for key, array in tensors.items():
                w.add(key, get_dtype("float32"), array.shape, encode_tensor(array, get_dtype("float32"), opts))
        return path, path.read_bytes()

    path, data = write(layer, opts, "c.jwt")
    plain_path, plain = write(layer, opts.with_(compress_params=False), "p.jwt")
    assert data[10:16] == bytes([4, 0, 4, 0, 0, 0]) and plain[10:16] == bytes([0, 0, 0, 0, 0, 0])
    with codec.Reader(path) as r, codec.Reader(plain_path) as p:
        entry, plain_entry = r.entry("fc.weight"), p.entry("fc.weight")
        assert entry.params_zstd and not plain_entry.params_zstd
        saved = plain_entry.blobs[0].length - entry.blobs[0].length
        assert saved >= 0.01 * entry.stored_bytes and len(plain) - len(data) >= saved - 2  # (offsets' digits)
        assert [(b.length, b.crc32) for b in entry.blobs[1:]] == [(b.length, b.crc32) for b in plain_entry.blobs[1:]]
        assert r.read("fc.weight").tobytes() == p.read("fc.weight").tobytes()
    assert write(big, EncodeOptions(codec="jpeg", quality=50), "b.jwt")[1][10:16] == bytes([0, 0, 0, 0, 0, 0])


def _written(tmp_path, tensors: dict, **kwargs):
    path = tmp_path / "w.jwt"
    with Writer(path, metadata={"source": "test"}, **kwargs) as w:
        for name, array in tensors.items():
            w.add(name, get_dtype("float32"), array.shape,
                  encode_tensor(array, get_dtype("float32"), EncodeOptions(codec="lossless")))
    return path, path.read_bytes()


def _read(path) -> dict[str, np.ndarray]:
    with codec.Reader(path) as reader:
        return {name: reader.read(name) for name in reader.keys()}


def test_writer_compresses_the_index_where_it_saves_a_percent_of_the_file(tmp_path):
    """Many small tensors: the index is most of the file and is stored as a zstd frame (format 1.3, flag
    index_zstd), read back to the same tensors; one large tensor: the index stays JSON (1.2), readable by a 1.2
    reader; compress_index=False / True force either."""
    rng = np.random.default_rng(0)
    small = {f"layer{i}.norm.weight": rng.standard_normal(8).astype(np.float32) for i in range(40)}
    big = {"w": rng.standard_normal((256, 256)).astype(np.float32)}
    path, data = _written(tmp_path, small)
    assert data[10:16] == bytes([3, 0, 2, 0, 0, 0])  # minor 3, flags index_zstd
    n = int.from_bytes(data[16:24], "little")
    plain = _written(tmp_path, small, compress_index=False)[1]
    assert int.from_bytes(plain[16:24], "little") > 3 * n and plain[10:16] == bytes([2, 0, 0, 0, 0, 0])
    loaded = _read(path)
    assert set(loaded) == set(small) and all(np.array_equal(loaded[k], v) for k, v in small.items())
    assert _written(tmp_path, big)[1][10:16] == bytes([2, 0, 0, 0, 0, 0])
    path, data = _written(tmp_path, big, compress_index=True)
    assert data[10:16] == bytes([3, 0, 2, 0, 0, 0]) and np.array_equal(_read(path)["w"], big["w"])
