"""The independent reader spec/reader/jwtread.py (written from spec/format.md alone) against the test vectors and
against codec.load on files the encoder writes today: the spec's promise that someone else can write a compatible
reader from it, checked. Every valid vector decodes within section 10's tolerance and as codec.load decodes it; every
invalid vector raises the manifest's error kind; updates decode against their base or raise BaseError."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import codec

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "fixtures" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
_spec = importlib.util.spec_from_file_location("jwtread", REPO / "spec" / "reader" / "jwtread.py")
jwtread = sys.modules.setdefault("jwtread", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(jwtread)


def storage(t: torch.Tensor) -> np.ndarray:
    """A torch tensor in the reader's storage form (bfloat16 and float8 as their bit patterns)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8).numpy()
    return t.numpy()


def mismatch(got: np.ndarray, exp: np.ndarray, dtype: str, tolerance: int, scale: np.ndarray | None) -> str | None:
    """Section 10: bit for bit at tolerance 0, else |got - exp| <= tolerance * scale + ulp(max(|got|, |exp|))."""
    if got.dtype != exp.dtype or got.shape != exp.shape:
        return f"{got.dtype}{list(got.shape)} where {exp.dtype}{list(exp.shape)} was expected"
    if tolerance == 0 or scale is None:
        return None if got.tobytes() == exp.tobytes() else "not bit for bit"
    g, e = jwtread._widen(got, dtype), jwtread._widen(exp, dtype)
    big = np.maximum(np.abs(g), np.abs(e))
    ulp = (np.spacing(big.astype(np.float32)).astype(np.float64) * 65536 if dtype == "bfloat16"
           else np.spacing(big.astype(jwtread.DTYPES[dtype])).astype(np.float64))
    worst = float(np.max(np.abs(g - e) - tolerance * np.abs(scale) - ulp, initial=-1.0))
    return None if worst <= 0 else f"off by {worst:.3g} beyond {tolerance} step(s) + 1 ulp"


def check_vector(v: dict, reference: dict[str, np.ndarray] | None = None) -> list[str]:
    """Every problem of the reader on one valid vector (empty when it decodes right): against the expected arrays,
    or against `reference` (another decoder's arrays) within the same tolerance."""
    tensors, attachments, index = jwtread.read_all(VECTORS / v["file"])
    expected = np.load(VECTORS / v["expected"])
    entries = {e.name: e for e in index.tensors}
    problems = [] if reference is None or list(reference) == list(tensors) else ["other tensor names or order"]
    for item in v["tensors"]:
        e = entries[item["name"]]
        if item["tolerance"] and "scale" not in item:
            problems.append(f"{item['name']}: a lossy tensor without scales in the manifest")
            continue
        scale = (expected[item["scale"]].astype(np.float64)[jwtread.element_tiles(e.tiling, e.shape)]
                 if "scale" in item else None)
        want = expected[item["expected"]] if reference is None else reference[item["name"]]
        bad = mismatch(tensors[item["name"]], want, item["dtype"], item["tolerance"], scale)
        if bad:
            problems.append(f"{item['name']}: {bad}")
    for item in v.get("attachments", []):
        if attachments[item["name"]] != expected[item["expected"]].tobytes():
            problems.append(f"attachment {item['name']}: other bytes")
    return problems


@pytest.mark.parametrize("v", MANIFEST["valid"], ids=lambda v: Path(v["file"]).stem)
def test_valid_vector_decodes_within_tolerance_and_as_codec_load_does(v):
    assert check_vector(v) == []
    # codec.load uses the same libraries; libjxl may still differ by a level between runs (spec 5.3): same tolerance
    reference = {name: storage(t) for name, t in codec.load(VECTORS / v["file"]).items()}
    assert check_vector(v, reference) == []


@pytest.mark.parametrize("v", MANIFEST["invalid"], ids=lambda v: Path(v["file"]).stem)
def test_invalid_vector_is_refused_with_the_manifest_kind(v):
    kind = getattr(jwtread, v["error"])
    with pytest.raises(jwtread.JwtError) as info:
        jwtread.read_all(VECTORS / v["file"])
    assert type(info.value) is kind, f"{v['file']}: {type(info.value).__name__} ({info.value}), want {v['error']}"


@pytest.mark.parametrize("case", MANIFEST["updates"]["cases"], ids=lambda c: Path(c["file"]).stem)
def test_update_vector_decodes_against_its_base_or_is_refused(case):
    base = VECTORS / case["base"] if case["base"] else None
    if "error" in case:
        with pytest.raises(jwtread.BaseError):
            jwtread.read(VECTORS / case["file"], base=base)
        return
    tensors = jwtread.read(VECTORS / case["file"], base=base)
    expected = np.load(VECTORS / case["expected"])
    for item in case["tensors"]:
        assert tensors[item["name"]].tobytes() == expected[item["expected"]].tobytes(), item["name"]
        assert tensors[item["name"]].shape == expected[item["expected"]].shape, item["name"]
    assert list(tensors) == list(codec.load(VECTORS / case["file"], base=VECTORS / case["base"]))


def test_a_1_0_reader_refuses_updates_with_a_version_error(monkeypatch):
    """Section 10: a reader without the flag update refuses every update on its header."""
    monkeypatch.setattr(jwtread, "KNOWN_FLAGS", jwtread.FLAG_INDEX_ZSTD | jwtread.FLAG_PARAMS_ZSTD)
    with pytest.raises(jwtread.VersionError, match="0x00000001"):
        jwtread.read(VECTORS / "updates" / "update_all_kinds.jwt", base=VECTORS / "updates" / "base.jwt")


@pytest.mark.parametrize("broken", ["pixels flipped", "tiles transposed", "bfloat16 truncated", "planes unrotated",
                                    "float16 by way of binary32", "bfloat16 rounded once"])
def test_a_broken_reader_fails_the_vectors(monkeypatch, broken):
    """The checks above have teeth: a reader with one plausible mistake fails at least one valid vector."""
    if broken == "pixels flipped":
        real = jwtread._decode_pixels
        monkeypatch.setattr(jwtread, "_decode_pixels", lambda *a: real(*a)[::-1])
    elif broken == "tiles transposed":
        real = jwtread._decode_pixels  # each image read column-major
        monkeypatch.setattr(jwtread, "_decode_pixels", lambda c, b, w, h, wd: real(c, b, w, h, wd).T.reshape(h, wd))
    elif broken == "bfloat16 truncated":
        real = jwtread.to_dtype
        monkeypatch.setattr(jwtread, "to_dtype", lambda v, d: (v.astype("<f4").view("<u4") >> 16).astype("<u2")
                            if d == "bfloat16" else real(v, d))
    elif broken == "float16 by way of binary32":  # rounds twice (section 7): caught by quant_rounding only
        real = jwtread.to_dtype
        monkeypatch.setattr(jwtread, "to_dtype", lambda v, d: v.astype("<f4").astype("<f2") if d == "float16"
                            else real(v, d))
    elif broken == "bfloat16 rounded once":  # from binary64 directly; section 7 defines it through binary32
        real = jwtread.to_dtype
        monkeypatch.setattr(jwtread, "to_dtype", lambda v, d: _bfloat16_once(v) if d == "bfloat16" else real(v, d))
    else:
        real = jwtread._unplane
        monkeypatch.setattr(jwtread, "_unplane", lambda c, k, n: real(c, k, n) if k == 1 else
                            np.frombuffer(c, np.uint8).reshape(n, k).copy())
    failures = []
    for v in MANIFEST["valid"]:
        try:
            failures += check_vector(v)
        except jwtread.JwtError as e:
            failures.append(str(e))
    assert failures


def _bfloat16_once(v: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of binary64 values rounded once to nearest, ties to even (finite values only)."""
    hi = (v.astype("<f4").view("<u4") >> 16).astype(np.uint32)  # a candidate: one of the two neighbours
    out = np.empty(v.shape, "<u2")
    for i, (x, h) in enumerate(zip(v.ravel(), hi.ravel())):
        cands = [int(h) + d for d in (-1, 0, 1) if 0 <= int(h) + d < 1 << 16]
        vals = [float(np.uint32(c << 16).view(np.float32)) for c in cands]
        out.flat[i] = min(zip(cands, vals), key=lambda cv: (abs(cv[1] - x) if np.isfinite(cv[1]) else np.inf,
                                                               cv[0] & 1))[0]
    return out


def test_limits_are_the_callers():
    """Section 9.2: limits a decoder may lower and should let callers raise."""
    path = VECTORS / "valid" / "jpeg_rows_32x784.jwt"  # one image blob of 224 x 112 pixels
    with pytest.raises(jwtread.LimitError, match="pixels"):
        jwtread.read(path, limits=jwtread.Limits(pixels=224 * 112 - 1))
    assert jwtread.read(path, limits=jwtread.Limits(pixels=224 * 112))["fc1.weight"].shape == (32, 784)
    big = VECTORS / "invalid" / "tensor_bytes_over_limit.jwt"
    with pytest.raises(jwtread.FormatError):  # past the limit, the next fault: its blobs are not in the file
        jwtread.read(big, limits=jwtread.Limits(tensor_bytes=1 << 35, total_bytes=1 << 40))


def _with_index(tmp_path: Path, vector: str, edit) -> Path:
    """A copy of a valid vector whose plain index text went through `edit`, header and index CRCs made right."""
    import struct
    import zlib

    data = (VECTORS / "valid" / vector).read_bytes()
    n = struct.unpack_from("<Q", data, 16)[0]
    raw = edit(data[32:32 + n].decode()).encode()
    head = bytearray(data[:32])
    struct.pack_into("<QI", head, 16, len(raw), zlib.crc32(raw))
    struct.pack_into("<I", head, 28, zlib.crc32(bytes(head[:28])))
    path = tmp_path / vector
    path.write_bytes(bytes(head) + raw + data[32 + n:])
    return path


def test_integers_too_long_for_python_int_follow_the_spec(tmp_path):
    """Section 4: any non-negative integer is a valid dimension, and a too large one fails the size limits
    (LimitError), even one of 5,000 digits, which Python's int() refuses to read; elsewhere it is out of range."""
    huge = "9" * 5000
    path = _with_index(tmp_path, "lossless_int32.jwt", lambda s: s.replace('"shape":[4,8]', f'"shape":[{huge},8]'))
    with pytest.raises(jwtread.LimitError):
        jwtread.read(path)
    path = _with_index(tmp_path, "lossless_int32.jwt", lambda s: s.replace('"level":9', f'"level":{huge}'))
    with pytest.raises(jwtread.FormatError, match="out of range"):
        jwtread.read(path)


# ---------------------------------------------------------------- files the encoder writes today

def _agree(path: Path, base=None) -> None:
    """The reader decodes `path` to exactly what codec.load gives (same decoders, same bits)."""
    tensors = jwtread.read(path, base=base)
    reference = codec.load(path, base=base)
    assert list(tensors) == list(reference)
    for name, t in reference.items():
        assert tensors[name].tobytes() == storage(t).tobytes() and tensors[name].shape == tuple(t.shape), name


def _index(path: Path) -> jwtread.Index:
    with open(path, "rb") as f:
        return jwtread.read_index(f, path.stat().st_size, jwtread.Limits())


def test_the_cli_data_free_budget_file_of_the_mlp(tmp_path):
    """`jwt encode fixtures/mlp_fmnist.pt -b 1`: JPEG rows with a ramp table, quant, zstd_planes, params_zstd."""
    out = tmp_path / "mlp.jwt"
    subprocess.run([sys.executable, "-m", "jwt_cli", "encode", str(REPO / "fixtures" / "mlp_fmnist.pt"), "-b", "1",
                    "-o", str(out)], check=True, capture_output=True)
    _agree(out)
    assert {e.codec["id"] for e in _index(out).tensors} >= {"jpeg", "quant", "zstd_planes"}


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()


def test_a_calibrated_save_with_repair(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 96, generator=g) for _ in range(4)]
    path = tmp_path / "cal.jwt"
    codec.save(model, path, bits_per_weight=2.5, calibration=data)
    index = _index(path)
    assert index.flags & jwtread.FLAG_INDEX_ZSTD  # spec 8.6: a calibrated budget always compresses the index
    _agree(path)


def test_a_codec_train_budget_file(tmp_path):
    from codec.train import Budget, finetune

    model = _tiny(2)
    torch.manual_seed(3)
    data = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)]
    budget = Budget(2.0)
    rules = [("0.weight", "jpeg,q20,table=flat"), ("2.weight", "b4")]
    finetune(model, data, torch.nn.functional.cross_entropy, overrides=rules, steps=4, lr=1e-3, refresh=2,
             budget=budget, validation=False)
    buf = io.BytesIO()
    budget.save(model, buf)
    path = tmp_path / "budget.jwt"
    path.write_bytes(buf.getvalue())
    _agree(path)


def test_an_update_against_a_jwt_base_and_bfloat16_tensors(tmp_path):
    """An update (section 12) made against a .jwt base: the reader decodes the base itself, checks it, adds."""
    old = {k: v for k, v in _tiny(4).state_dict().items()}
    old["emb"] = torch.randn(48, 32).to(torch.bfloat16)
    old["steps"] = torch.tensor(7)
    base = tmp_path / "base.jwt"
    codec.save(old, base)
    g = torch.Generator().manual_seed(5)
    new = {k: (v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v + 1
           for k, v in old.items()}
    new["2.bias"] = old["2.bias"].clone()  # unchanged
    path = tmp_path / "update.jwt"
    codec.save(new, path, base=base)
    kinds = {e.kind for e in _index(path).tensors}
    assert {"difference", "unchanged"} <= kinds
    _agree(base)
    _agree(path, base=base)
    with pytest.raises(jwtread.BaseError):
        jwtread.read(path)


# ---------------------------------------------------------------- the two readers on damaged files

def _mutants(rng, data: bytes):
    """A valid file with one index field deleted, retyped or nudged, or one data byte flipped, its CRCs made right
    (the index stays plain or compressed as it was): faults only a reader's rules, not a checksum, can catch."""
    import struct
    import zlib

    import zstandard

    n, flags = struct.unpack_from("<Q", data, 16)[0], struct.unpack_from("<I", data, 12)[0]
    raw = data[32:32 + n]
    index = json.loads(zstandard.ZstdDecompressor().decompress(raw) if flags & 2 else raw)
    body = bytearray(data[32 + n:])
    spots = []
    stack = [(index, ())]
    while stack:
        node, at = stack.pop()
        for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
            spots.append(at + (k,))
            if isinstance(v, (dict, list)):
                stack.append((v, at + (k,)))
    if body and rng.random() < 0.4:
        pos = rng.randrange(len(body))
        body[pos] ^= 1 << rng.randrange(8)
        for e in index["tensors"] + index.get("attachments", []):
            for ref in e.get("blobs", []):
                if ref[0] <= pos < ref[0] + ref[1]:
                    ref[2] = zlib.crc32(bytes(body[ref[0]:ref[0] + ref[1]]))
    else:
        at = rng.choice([s for s in spots if s[0] != "metadata"])
        parent = index
        for k in at[:-1]:
            parent = parent[k]
        value = parent[at[-1]]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[at[-1]]
        elif type(value) is int and rng.random() < 0.6:
            parent[at[-1]] = value + rng.choice([-2, -1, 1, 2, 8])
        else:
            parent[at[-1]] = rng.choice([-1, 0, 1, 3, 17, 65536, 2 ** 64, 1.5, "x", True, None, [], {}, "quant"])
    raw = json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode()
    if flags & 2:
        raw = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    head = bytearray(data[:32])
    struct.pack_into("<QI", head, 16, len(raw), zlib.crc32(raw))
    struct.pack_into("<I", head, 28, zlib.crc32(bytes(head[:28])))
    return bytes(head) + raw + bytes(body)


def test_the_two_readers_agree_on_damaged_files(tmp_path):
    """Four mutants of every valid vector: the reader and codec.load refuse each with the same class, or decode it to
    the same bits (a differential check of the spec's rules beyond the hand-made invalid vectors)."""
    import random

    rng, path, disagree = random.Random(29), tmp_path / "m.jwt", []
    for v in MANIFEST["valid"]:
        for _ in range(4):
            path.write_bytes(_mutants(rng, (VECTORS / v["file"]).read_bytes()))
            got = []
            for decode in (lambda: jwtread.read(path), lambda: {k: storage(t) for k, t in codec.load(path).items()}):
                try:
                    got.append({k: (a.shape, a.tobytes()) for k, a in decode().items()})
                except (jwtread.JwtError, codec.JwtError) as e:
                    got.append(type(e).__name__)
            if got[0] != got[1]:
                disagree.append((v["file"], [g if isinstance(g, str) else "decoded" for g in got]))
    assert disagree == []
