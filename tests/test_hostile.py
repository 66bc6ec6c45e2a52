"""Hostile input: mutated .jwt files through the library and the CLI, and hostile checkpoints.

A .jwt arrives over a network from someone else, a .pt may be a malicious
pickle: every path must answer bad input with a clear error (a JwtError
from the library; exit status 1 and one line from the CLI) and lose
nothing (no partial output, no temporary file, no changed input, no file
outside the output: decoding to a .pt, a .safetensors or a model folder).

The property tests are bounded for CI (modest ``max_examples``); set
``HYPOTHESIS_PROFILE=fuzz`` for a long run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from codec.dtypes import get_dtype
from codec.format import HEADER_SIZE, pack_header
from codec.tensorcodec import EncodeOptions, encode_tensor
from codec.writer import Writer
from jwt_cli.main import cli
from conftest import Stream

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("fuzz", max_examples=3000, deadline=None, suppress_health_check=_QUIET)
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"


def examples(n: int) -> settings:
    """Settings for one property test: ``n`` examples (CI), or the long ``fuzz`` profile."""
    if FUZZ:
        return settings(settings.get_profile("fuzz"))
    return settings(max_examples=n, deadline=None, suppress_health_check=_QUIET)


#: A numpy warning raised as an error (python -W error) would escape as something else than a JwtError.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

#: Limits for mutants whose index was rewritten (CRCs recomputed): no allocation over a few MB.
SMALL = codec.Limits(max_tensor_bytes=1 << 22, max_total_bytes=1 << 24, max_blob_pixels=1 << 20)
#: Seconds one decode of a small mutant may take (a hang is a bug).
SLOW = 10.0
_HEADER = struct.Struct("<8sHHIQI")


# ------------------------------------------------------------------ the base file


def _smooth(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    return 0.05 * np.sin(x / 9 + rng.uniform(0, 6)) * np.cos(y / 7) + rng.normal(0, 1e-3, (rows, cols))


@dataclass(frozen=True)
class Base:
    """A small valid file holding every kind of blob, and where its parts lie."""

    data: bytes
    doc: dict  # the index document
    index_end: int
    blobs: tuple[tuple[int, int], ...]  # absolute [start, end) of every blob, in data order

    @property
    def data_start(self) -> int:
        return self.index_end

    def boundaries(self) -> list[int]:
        """Cut points at every structural boundary (and just inside each part)."""
        cuts = {0, 1, 7, 8, 10, 12, 16, 24, 28, 31, 32, 33, self.index_end - 1, self.index_end,
                (HEADER_SIZE + self.index_end) // 2}
        for start, end in self.blobs:
            cuts |= {start, start + 1, (start + end) // 2, end - 1}
        return sorted(c for c in cuts if 0 <= c < len(self.data))


ATTACHMENTS = {"config.json": b'{"hidden_size": 128}', "1_Pooling/config.json": b'{"mean": true}'}


@lru_cache(maxsize=1)
def base() -> Base:
    """JPEG (grid), JPEG XL, quant, zstd and zstd_planes (the float32 bias) tensors, a 0-d and a bool tensor, an
    alias and 2 attachments, ~10 KB."""
    jpeg = EncodeOptions(codec="jpeg", quality=50, tile=(64, 64))
    jxl = EncodeOptions(codec="jpegxl", quality=70)
    quant = EncodeOptions(codec="quant", bits=6, tile=(32, 64))
    buf = io.BytesIO()
    with Writer(buf, metadata={"source": "hostile base"}, compress_index=False) as w:  # edits parse its JSON
        for name, content in ATTACHMENTS.items():
            w.add_attachment(name, content)
        for name, dtype, array, opts in [
            ("embed.weight", "float32", _smooth(128, 128, 1).astype(np.float32), jpeg),
            ("attn.weight", "float16", _smooth(128, 128, 2).astype(np.float16), jxl),
            ("proj.weight", "float32", _smooth(128, 128, 3).astype(np.float32), jpeg),
            ("out.weight", "float32", _smooth(64, 128, 4).astype(np.float32), quant),
            ("bias", "float32", np.linspace(-1, 1, 16, dtype=np.float32), jpeg),
            ("steps", "int64", np.array(12345, np.int64), jpeg),
            ("mask", "bool", np.array([True, False, True, True, False]), jpeg),
        ]:
            enc = encode_tensor(array, get_dtype(dtype), opts)
            w.add(name, get_dtype(dtype), array.shape, enc)
        w.add_alias("lm_head.weight", "embed.weight")
    data = buf.getvalue()
    n = _HEADER.unpack_from(data)[4]
    doc = json.loads(data[HEADER_SIZE : HEADER_SIZE + n])
    start = HEADER_SIZE + n
    blobs = tuple((start + b[0], start + b[0] + b[1])
                  for t in doc["tensors"] + doc["attachments"] for b in t.get("blobs", []))
    ids = {"jpeg", "jpegxl", "quant", "zstd", "zstd_planes", None}
    assert {t.get("codec", {}).get("id") for t in doc["tensors"]} == ids
    return Base(data, doc, start, blobs)


def reseal(doc: dict, data_section: bytes) -> bytes:
    """A file of ``doc`` and ``data_section`` with header and index CRCs recomputed."""
    index = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    head = _HEADER.pack(b"\x89JWT\r\n\x1a\n", 1, 0, 0, len(index), zlib.crc32(index))
    return head + struct.pack("<I", zlib.crc32(head)) + index + data_section


def rebuild(doc: dict, blobs: list[bytes]) -> bytes:
    """Reseal ``doc`` with ``blobs`` (data order) as its blobs, offsets, lengths and CRCs recomputed."""
    doc = json.loads(json.dumps(doc))
    pos, k = 0, 0
    for t in doc["tensors"] + doc.get("attachments", []):
        for j in range(len(t.get("blobs", []))):
            t["blobs"][j] = [pos, len(blobs[k]), zlib.crc32(blobs[k])]
            pos += len(blobs[k])
            k += 1
    return reseal(doc, b"".join(blobs))


def blob_bytes(b: Base) -> list[bytes]:
    """The bytes of every blob of ``b``, in data order."""
    return [b.data[s:e] for s, e in b.blobs]


# ------------------------------------------------------------------ decoding checks


def _named(data: bytes) -> io.BytesIO:
    buf = io.BytesIO(data)
    buf.name = "mutant.jwt"
    return buf


def _decode_all(data: bytes, limits: codec.Limits) -> None:
    with codec.Reader(_named(data), limits=limits) as reader:
        for name in reader.keys():
            reader.read(name)
        for name in reader.attachments:
            reader.read_attachment(name)


def _load(data: bytes, limits: codec.Limits) -> None:
    codec.load(_named(data), limits=limits)
    with codec.open(_named(data), limits=limits) as f:
        for name in f.attachments:
            f.get_attachment(name)


def _stream(data: bytes, limits: codec.Limits) -> None:
    with codec.open(Stream(data, "mutant.jwt"), limits=limits) as f:
        for _ in f.items():
            pass
        for _ in f.reader.iter_attachments():
            pass


WAYS = {"Reader": _decode_all, "load": _load, "load(stream)": _stream}


def outcomes(data: bytes, limits: codec.Limits = codec.DEFAULT_LIMITS) -> dict[str, str]:
    """Decode ``data`` every way the library offers: way -> "ok" or the JwtError class name.

    Any other exception propagates (and fails the test); so does a decode
    slower than SLOW seconds or an error message that is not one line
    naming the source.
    """
    out = {}
    for way, fn in WAYS.items():
        start = time.monotonic()
        try:
            fn(data, limits)
            out[way] = "ok"
        except codec.JwtError as exc:
            assert isinstance(exc, ValueError)
            assert "\n" not in str(exc) and str(exc).startswith("mutant.jwt: "), str(exc)
            out[way] = type(exc).__name__
        assert time.monotonic() - start < SLOW, f"{way} took {time.monotonic() - start:.1f} s"
    return out


def assert_refused(data: bytes, *classes: str, limits: codec.Limits = codec.DEFAULT_LIMITS) -> None:
    """Every way of decoding raises a JwtError, of one of ``classes`` if given."""
    got = outcomes(data, limits)
    assert "ok" not in got.values(), got
    if classes:
        assert set(got.values()) <= set(classes), got


def test_base_file_decodes():
    """The unmutated base file decodes every way (so refusals below are about the mutation)."""
    assert set(outcomes(base().data).values()) == {"ok"}


# ------------------------------------------------------------------ structural mutations


@pytest.mark.parametrize("cut", base().boundaries())
def test_truncation_at_every_boundary_is_a_format_error(cut):
    """Cutting the file at any header field, index or blob boundary raises FormatError."""
    assert_refused(base().data[:cut], "FormatError")


@examples(100)
@given(st.data())
def test_truncation_anywhere_is_a_format_error(data):
    """Cutting the file at any byte raises FormatError, every way of reading."""
    b = base()
    cut = data.draw(st.one_of(st.sampled_from(b.boundaries()), st.integers(0, len(b.data) - 1)), label="cut")
    assert_refused(b.data[:cut], "FormatError")


@examples(100)
@given(st.data())
def test_byte_flips_are_detected(data):
    """Flipping 1-8 bytes anywhere raises ChecksumError (FormatError when the magic is hit)."""
    b = base()
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(b.data) - 1), st.integers(1, 255)),
                               min_size=1, max_size=8, unique_by=lambda f: f[0]), label="flips")
    mutant = bytearray(b.data)
    for pos, xor in flips:
        mutant[pos] ^= xor
    assert_refused(bytes(mutant), "FormatError" if min(p for p, _ in flips) < 8 else "ChecksumError")


@lru_cache(maxsize=1)
def compressed() -> bytes:
    """:func:`base` with its index stored as a zstd frame (flag index_zstd, format 1.3)."""
    b = base()
    index = b.data[HEADER_SIZE : b.index_end]
    packed = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(index)
    return pack_header(packed, 3, 2) + packed + b.data[b.index_end :]


@examples(60)
@given(st.data())
def test_compressed_index_truncated_or_flipped_is_refused(data):
    """A file whose index is a zstd frame: cut anywhere, FormatError; 1-4 bytes flipped from its header on,
    ChecksumError (FormatError when the magic is hit): the CRC of the stored index is checked before any byte
    of it reaches zstd."""
    good = compressed()
    assert_refused(good[: data.draw(st.integers(0, len(good) - 1), label="cut")], "FormatError")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)),
                               min_size=1, max_size=4, unique_by=lambda f: f[0]), label="flips")
    mutant = bytearray(good)
    for pos, xor in flips:
        mutant[pos] ^= xor
    assert_refused(bytes(mutant), "FormatError" if min(p for p, _ in flips) < 8 else "ChecksumError")


@examples(40)
@given(st.binary(min_size=1, max_size=64))
def test_appended_bytes_are_a_format_error(tail):
    """Any bytes after the last blob raise FormatError (seekable and streamed)."""
    assert_refused(base().data + tail, "FormatError")


@pytest.mark.parametrize("length, error", [
    (0, "ChecksumError"), (1, "ChecksumError"), (2**20, "FormatError"), (64 << 20, "FormatError"),
    ((64 << 20) + 1, "LimitError"), (2**63, "LimitError"), (2**64 - 1, "LimitError"),
])
def test_header_index_length_set_huge(length, error):
    """An index length rewritten (header CRC valid) fails on the CRC, the size or the limit."""
    b = base()
    head = bytearray(b.data[:HEADER_SIZE])
    struct.pack_into("<Q", head, 16, length)
    struct.pack_into("<I", head, 28, zlib.crc32(head[:28]))
    assert_refused(bytes(head) + b.data[HEADER_SIZE:], error)


@examples(40)
@given(st.integers(0, 2**64 - 1))
def test_header_index_length_any_value(length):
    """Any rewritten index length (header CRC valid) is refused without a large allocation."""
    b = base()
    head = bytearray(b.data[:HEADER_SIZE])
    struct.pack_into("<Q", head, 16, length)
    struct.pack_into("<I", head, 28, zlib.crc32(head[:28]))
    if length != b.index_end - HEADER_SIZE:
        assert_refused(bytes(head) + b.data[HEADER_SIZE:], "FormatError", "ChecksumError", "LimitError")


def _int_paths(node, path=()):
    """Paths to every integer in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _int_paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _int_paths(v, (*path, i))
    elif isinstance(node, int) and not isinstance(node, bool):
        yield path


def _all_paths(node, path=()):
    """Paths to every node of a JSON document (the root excluded)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, k)
            yield from _all_paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*path, i)
            yield from _all_paths(v, (*path, i))


def _set(doc, path, value):
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


HUGE = st.sampled_from([-1, -(2**63), 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30,
                        10**400])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | HUGE | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.parametrize("tensor", range(3))
def test_blob_length_set_huge_is_refused(tensor):
    """A blob length rewritten to 2**63 (index CRC valid) is refused, not read or allocated."""
    b = base()
    doc = _set(b.doc, ("tensors", tensor, "blobs", 0, 1), 2**63)
    assert_refused(reseal(doc, b.data[b.data_start:]), "FormatError", "ChecksumError")


@examples(150)
@given(st.data())
def test_index_integers_set_to_extreme_values(data):
    """Any integer of the index (shape, offsets, lengths, tiling, params) set to an extreme value: JwtError or ok."""
    b = base()
    path = data.draw(st.sampled_from(sorted(_int_paths(b.doc), key=str)), label="path")
    value = data.draw(st.one_of(HUGE, st.integers(-3, 70000)), label="value")
    outcomes(reseal(_set(b.doc, path, value), b.data[b.data_start:]), SMALL)


@examples(150)
@given(st.data())
def test_index_nodes_replaced_by_arbitrary_json(data):
    """Any node of the index replaced by arbitrary JSON (CRCs valid): only JwtError comes out."""
    b = base()
    path = data.draw(st.sampled_from(sorted(_all_paths(b.doc), key=str)), label="path")
    outcomes(reseal(_set(b.doc, path, data.draw(JSON, label="value")), b.data[b.data_start:]), SMALL)


@examples(40)
@given(st.data())
def test_swapped_blobs_fail_their_checksum(data):
    """Two blobs swapped in the data section (index untouched) raise ChecksumError."""
    b = base()
    blobs = blob_bytes(b)
    i, j = data.draw(st.lists(st.integers(0, len(blobs) - 1), min_size=2, max_size=2, unique=True)
                     .filter(lambda ij: blobs[ij[0]] != blobs[ij[1]]), label="pair")
    blobs[i], blobs[j] = blobs[j], blobs[i]
    assert_refused(b.data[: b.data_start] + b"".join(blobs), "ChecksumError")


@examples(80)
@given(st.data())
def test_swapped_blobs_with_valid_crcs_reach_the_decoders_safely(data):
    """Two blobs swapped with the index rewritten to match (CRCs valid): decoders see foreign blobs; JwtError or ok."""
    b = base()
    blobs = blob_bytes(b)
    i, j = data.draw(st.lists(st.integers(0, len(blobs) - 1), min_size=2, max_size=2, unique=True), label="pair")
    blobs[i], blobs[j] = blobs[j], blobs[i]
    outcomes(rebuild(b.doc, blobs), SMALL)


@examples(200)
@given(st.data())
def test_corrupt_blobs_with_valid_crcs_reach_the_decoders_safely(data):
    """A blob flipped, cut, extended or replaced, its CRC recomputed: zstd/JPEG/JPEG XL fail cleanly or decode."""
    b = base()
    blobs = blob_bytes(b)
    k = data.draw(st.integers(0, len(blobs) - 1), label="blob")
    blob = bytearray(blobs[k])
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "replace", "zero-run"]), label="how")
    if how == "flip" and blob:
        for pos, xor in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)),
                                           min_size=1, max_size=6), label="flips"):
            blob[pos] ^= xor
    elif how == "cut":
        blob = blob[: data.draw(st.integers(0, max(len(blob) - 1, 0)), label="cut")]
    elif how == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=32), label="tail")
    elif how == "replace":
        blob = bytearray(data.draw(st.binary(max_size=64), label="bytes"))
    elif blob:
        start = data.draw(st.integers(0, len(blob) - 1), label="start")
        blob[start : start + 16] = bytes(len(blob[start : start + 16]))
    blobs[k] = bytes(blob)
    outcomes(rebuild(b.doc, blobs), SMALL)


# ------------------------------------------------------------------ the CLI


@st.composite
def mutants(draw) -> bytes:
    """A mutated base file: one of the mutations above."""
    b = base()
    kind = draw(st.sampled_from(["truncate", "flip", "append", "swap", "corrupt-blob", "json"]))
    if kind == "truncate":
        return b.data[: draw(st.one_of(st.sampled_from(b.boundaries()), st.integers(0, len(b.data) - 1)))]
    if kind == "flip":
        mutant = bytearray(b.data)
        mutant[draw(st.integers(0, len(b.data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(mutant)
    if kind == "append":
        return b.data + draw(st.binary(min_size=1, max_size=16))
    blobs = blob_bytes(b)
    if kind == "swap":
        i, j = draw(st.lists(st.integers(0, len(blobs) - 1), min_size=2, max_size=2, unique=True))
        blobs[i], blobs[j] = blobs[j], blobs[i]
        return rebuild(b.doc, blobs)
    if kind == "corrupt-blob":
        k = draw(st.integers(0, len(blobs) - 1))
        blob = bytearray(blobs[k])
        if blob:
            blob[draw(st.integers(0, len(blob) - 1))] ^= draw(st.integers(1, 255))
        blobs[k] = bytes(blob)
        return rebuild(b.doc, blobs)
    path = draw(st.sampled_from(sorted(_int_paths(b.doc), key=str)))
    return reseal(_set(b.doc, path, draw(HUGE)), b.data[b.data_start:])


def check_cli(data: bytes) -> None:
    """``jwt info`` and ``jwt decode`` (.pt, .safetensors, folder) on ``data``: exit 0, or exit 1 with one line.

    A failure leaves nothing behind; no run writes outside its output (the
    work folder is nested so that an escape would show in its parent).
    """
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as top:
        tmp = Path(top) / "work"
        tmp.mkdir()
        src = tmp / "in.jwt"
        src.write_bytes(data)
        outs = {"pt": tmp / "out.pt", "safetensors": tmp / "out.safetensors", "folder": tmp / "out"}
        runs = [["info", str(src)], ["info", "--json", str(src)]]
        runs += [["decode", "-q", str(src), "-o", str(out) + ("/" if kind == "folder" else "")]
                 for kind, out in outs.items()]
        for args in runs:
            result = runner.invoke(cli, args)
            assert result.exit_code in (0, 1), (args, result.exit_code, result.output)
            assert os.listdir(top) == ["work"], os.listdir(top)
            if result.exit_code == 1:
                assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
                lines = result.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.stderr)
                assert "Traceback" not in result.output
                assert sorted(os.listdir(tmp)) == ["in.jwt"], os.listdir(tmp)
            elif args[0] == "decode":
                out = Path(args[-1])
                names = list(codec.load(data))
                if out.suffix == ".pt":
                    assert list(torch.load(out, weights_only=True)) == names
                    out.unlink()
                else:
                    from safetensors.torch import load_file

                    weights = out / "model.safetensors" if out.is_dir() else out
                    assert sorted(load_file(weights)) == sorted(names)
                    if out.is_dir():
                        with codec.open(data) as f:
                            files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
                            assert files == {"model.safetensors", *f.attachments}
                        shutil.rmtree(out)
                    else:
                        out.unlink()
                assert sorted(os.listdir(tmp)) == ["in.jwt"], os.listdir(tmp)
        assert src.read_bytes() == data


@examples(60)
@given(mutants())
def test_cli_answers_mutants_with_one_line_and_leaves_nothing(data):
    """jwt info / decode on a mutated file: exit 1 with one 'Error:' line and no output or temp file (or success)."""
    check_cli(data)


PATH_PARTS = st.sampled_from(["a", "b.txt", "..", ".", "", "~", "CON", "é", "x" * 40, " ", "\\", ":", "\x00", "\x7f",
                               "model.safetensors"])
ATTACHMENT_NAMES = st.lists(PATH_PARTS, min_size=1, max_size=4).map("/".join) | st.text(max_size=16)


@examples(40)
@given(st.lists(ATTACHMENT_NAMES, min_size=2, max_size=2))
def test_attachment_names_never_escape_the_output_folder(names):
    """Attachments renamed to anything (CRCs valid): refused, or restored as files inside the output folder only."""
    b = base()
    doc = json.loads(json.dumps(b.doc))
    for att, name in zip(doc["attachments"], names):
        att["name"] = name
    data = reseal(doc, b.data[b.data_start:])
    outcomes(data, SMALL)
    check_cli(data)


@examples(25)
@given(st.lists(st.text(max_size=12) | st.sampled_from(["__metadata__", "", "a/../b", "/etc/passwd", "\x00"]),
                min_size=1, max_size=5, unique=True))
def test_any_tensor_names_decode_to_loadable_outputs(names):
    """Whatever the tensor names, jwt decode writes .pt/.safetensors/folder outputs that load with them, or fails in one line."""
    buf = io.BytesIO()
    lossless = EncodeOptions(codec="lossless")
    with Writer(buf) as w:
        for i, name in enumerate(names):
            array = np.full(2, i, np.float32)
            w.add(name, get_dtype("float32"), (2,), encode_tensor(array, get_dtype("float32"), lossless))
    check_cli(buf.getvalue())


def test_cli_decode_from_stdin_refuses_truncation(tmp_path):
    """jwt decode - with a truncated file on stdin exits 1 with one line and writes no output."""
    result = CliRunner().invoke(cli, ["decode", "-", "-o", str(tmp_path / "out.pt")], input=base().data[:-5])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert len(result.stderr.strip().splitlines()) == 1 and "truncated" in result.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ the encode side


class Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def run(*args: str, input: bytes | None = None):
    """Invoke the CLI; return the result."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_one_line_failure(result, *words: str) -> str:
    """Exit 1, no traceback, one stderr line starting 'Error:' holding ``words``."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_malicious_pickle_is_not_executed_by_encode(tmp_path, fmt):
    """jwt encode on a .pt whose pickle would run code refuses it (exit 1, one line) and runs nothing."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    obj = {"w": torch.zeros(4), "payload": Evil(marker)}
    if fmt == "torch.save":
        torch.save(obj, evil)
    else:
        evil.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(codec.EncodeError):
        codec.api.read_state_dict(evil)
    assert_one_line_failure(run("encode", evil, "-o", tmp_path / "out.jwt"), "evil.pt")
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.pt"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", bytes(range(256)) * 4, b"PK\x03\x04junk"])
def test_encode_refuses_files_that_are_not_checkpoints(tmp_path, content):
    """jwt encode on empty, text, random or broken-zip input exits 1 with one line and writes nothing."""
    src = tmp_path / "in.pt"
    src.write_bytes(content)
    assert_one_line_failure(run("encode", src, "-o", tmp_path / "out.jwt"), "in.pt")
    assert sorted(os.listdir(tmp_path)) == ["in.pt"] and src.read_bytes() == content


def _safetensors_cases() -> dict[str, bytes]:
    from safetensors.torch import save as st_save

    good = st_save({"w": torch.randn(4, 4), "b": torch.zeros(3)})
    n = struct.unpack("<Q", good[:8])[0]
    head = json.loads(good[8 : 8 + n])

    def with_header(doc: dict) -> bytes:
        raw = json.dumps(doc).encode()
        return struct.pack("<Q", len(raw)) + raw + good[8 + n :]

    return {
        "truncated": good[:-10],
        "header-length-huge": struct.pack("<Q", 2**62) + good[8:],
        "header-not-json": struct.pack("<Q", 5) + b"{{{{{" + good[8 + n :],
        "shape-overflows": with_header({**head, "w": {**head["w"], "shape": [2**40, 2**40]}}),
        "offsets-past-end": with_header({**head, "w": {**head["w"], "data_offsets": [0, 10**9]}}),
    }


@pytest.mark.parametrize("case", sorted(_safetensors_cases()))
def test_encode_refuses_broken_safetensors(tmp_path, case):
    """jwt encode on a truncated or lying .safetensors exits 1 with one line and writes nothing."""
    src = tmp_path / "in.safetensors"
    src.write_bytes(_safetensors_cases()[case])
    assert_one_line_failure(run("encode", src, "-o", tmp_path / "out.jwt"), "in.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_encode_refuses_a_jwt_given_as_checkpoint(tmp_path):
    """jwt encode on a .jwt file (not a .pt) exits 1 with one line."""
    src = tmp_path / "model.jwt"
    src.write_bytes(base().data)
    assert_one_line_failure(run("encode", src, "-o", tmp_path / "again.jwt"))
    assert sorted(os.listdir(tmp_path)) == ["model.jwt"]


def test_checkpoint_entries_are_kept_and_what_cannot_be_is_named_in_a_warning(tmp_path):
    """A training checkpoint keeps nested tensors (dotted names) and plain values; a set is named in a warning."""
    weights = {"w": torch.randn(3, 4), "step": 7, 3: torch.zeros(2), "nested": {"a": torch.ones(1)}, "note": "x"}
    src = tmp_path / "ckpt.pt"
    torch.save({"model": weights, "optimizer": {"lr": 0.1}, "epoch": 3, "seen": {1, 2}}, src)
    result = run("encode", src, "-o", tmp_path / "ckpt.jwt", "-q")
    assert result.exit_code == 0, result.output
    assert "jwt: warning:" in result.stderr and "seen (set)" in result.stderr
    back = codec.load(tmp_path / "ckpt.jwt")
    assert list(back) == ["model.w", "model.3", "model.nested.a"] and torch.equal(back["model.w"], weights["w"])
    assert run("decode", tmp_path / "ckpt.jwt", "-o", tmp_path / "back.pt").exit_code == 0
    restored = torch.load(tmp_path / "back.pt", weights_only=True)
    assert restored["epoch"] == 3 and restored["optimizer"] == {"lr": 0.1} and "seen" not in restored
    assert restored["model"]["step"] == 7 and restored["model"]["note"] == "x"
    assert torch.equal(restored["model"][3], weights[3]) and torch.equal(restored["model"]["nested"]["a"], torch.ones(1))


@pytest.mark.parametrize("obj, words", [
    ([torch.zeros(2)], "list"),
    ({"step": 3, "lr": 0.1}, "no tensors"),
    ({"w": torch.zeros(2, dtype=torch.complex64)}, "complex64"),
    ({"w": torch.eye(3).to_sparse()}, "sparse"),
    ({"w": torch.zeros(1).expand(10**6, 10**6)}, "bytes"),
])
def test_encode_refuses_checkpoints_it_cannot_store(tmp_path, obj, words):
    """Lists, tensor-less dicts, complex, sparse and 4 TB zero-stride tensors: exit 1, one line, no output."""
    src = tmp_path / "in.pt"
    torch.save(obj, src)
    assert_one_line_failure(run("encode", src, "-o", tmp_path / "out.jwt"), words)
    assert sorted(os.listdir(tmp_path)) == ["in.pt"]


def _bits(t: torch.Tensor) -> bytes:
    return codec.api.to_numpy(t)[0].tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_weights_fall_back_to_bit_exact_lossless(tmp_path, dtype):
    """A weight matrix holding NaN (with payloads) and +-Inf is stored losslessly with a warning, bit for bit."""
    w = torch.randn(128, 128).to(dtype)
    w[0, 0], w[5, 7], w[100, 3] = float("nan"), float("inf"), float("-inf")
    bits = w.view(torch.int16 if dtype != torch.float32 else torch.int32)
    bits[9, 9] = -1  # a NaN with every payload bit set
    notes = codec.save({"w": w}, tmp_path / "api.jwt", codec="jpeg", quality=20)
    assert len(notes) == 1 and "'w'" in notes[0] and "NaN or Inf" in notes[0]
    assert _bits(codec.load(tmp_path / "api.jwt")["w"]) == _bits(w)
    torch.save({"w": w}, tmp_path / "in.pt")
    result = run("encode", tmp_path / "in.pt", "-o", tmp_path / "cli.jwt", "-q")
    assert result.exit_code == 0 and "jwt: warning: tensor 'w': stored losslessly" in result.stderr
    assert run("decode", tmp_path / "cli.jwt", "-o", tmp_path / "back.pt", "-q").exit_code == 0
    assert _bits(torch.load(tmp_path / "back.pt", weights_only=True)["w"]) == _bits(w)


@pytest.mark.parametrize("shape", [(1, 1_000_000), (1_000_000, 1)])
def test_skinny_matrices_round_trip(tmp_path, shape):
    """1x1000000 and 1000000x1 matrices (too thin for tiles) round trip bit-exactly."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    codec.save({"w": w}, tmp_path / "s.jwt", codec="jpeg")
    back = codec.load(tmp_path / "s.jwt")["w"]
    assert back.shape == w.shape and torch.equal(back, w)


def _odd_names(tmp_path: Path) -> list[str]:
    return ["层.权重 🙂", "x" * 10_000, "a/b/c", "../escape", "../../../../tmp/jwt-escape", "..", ".", "/",
            str(tmp_path / "absolute"), "con", "nul:", "back\\slash", "tab\there", "e\u0301", "\u00e9", ""]


def test_odd_names_round_trip_and_never_become_paths(tmp_path, monkeypatch):
    """Unicode, 10 KB, '/', '..' and absolute names round trip through API and CLI and create no files."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    names = _odd_names(tmp_path)
    sd = {n: torch.full((2,), float(i)) for i, n in enumerate(names)}
    codec.save(sd, "api.jwt")
    back = codec.load("api.jwt")
    assert list(back) == names and all(torch.equal(back[n], sd[n]) for n in names)
    torch.save(sd, "in.pt")
    assert run("encode", "in.pt", "-o", "cli.jwt", "-q").exit_code == 0
    assert run("info", "cli.jwt").exit_code == 0
    assert run("decode", "cli.jwt", "-o", "back.pt", "-q").exit_code == 0
    back = torch.load("back.pt", weights_only=True)
    assert list(back) == names and all(torch.equal(back[n], sd[n]) for n in names)
    assert sorted(os.listdir(work)) == ["api.jwt", "back.pt", "cli.jwt", "in.pt"]
    assert sorted(os.listdir(tmp_path)) == ["work"]
    assert not Path("/tmp/jwt-escape").exists()


@pytest.mark.parametrize("command", ["encode", "decode"])
@pytest.mark.parametrize("spelling", ["same", "dot-slash", "hardlink"])
def test_output_equal_to_input_is_refused(tmp_path, monkeypatch, command, spelling):
    """-o naming the input (directly, as ./name or through a hard link) is refused; the input is unchanged."""
    monkeypatch.chdir(tmp_path)
    src = Path("model.pt" if command == "encode" else "model.jwt")
    if command == "encode":
        torch.save({"w": torch.randn(4, 4)}, src)
    else:
        src.write_bytes(base().data)
    before = src.read_bytes()
    out = {"same": str(src), "dot-slash": f"./{src}", "hardlink": "link" + src.suffix}[spelling]
    if spelling == "hardlink":
        os.link(src, out)
    assert_one_line_failure(run(command, src, "-o", out), "refusing to overwrite the input")
    assert src.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def run_without_dac_override(*args: str) -> tuple[int, str]:
    """Run the CLI in a subprocess that, even as root, obeys file permissions (setpriv drops the capability)."""
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
           "from jwt_cli.main import main; main()", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("command", ["encode", "decode"])
@pytest.mark.parametrize("where", ["missing-dir", "parent-is-file", "read-only-dir"])
def test_unwritable_output_is_a_one_line_error(tmp_path, command, where):
    """An output in a missing, non-directory or read-only folder exits 1 with one line; nothing is left behind."""
    root = os.geteuid() == 0
    if where == "read-only-dir" and root and not shutil.which("setpriv"):
        pytest.skip("root writes into read-only folders, and setpriv is not there to drop that power")
    src = tmp_path / ("in.pt" if command == "encode" else "in.jwt")
    if command == "encode":
        torch.save({"w": torch.randn(4, 4)}, src)
    else:
        src.write_bytes(base().data)
    target = {"missing-dir": tmp_path / "missing" / "out",
              "parent-is-file": src / "out",
              "read-only-dir": tmp_path / "ro" / "out"}[where]
    if where == "read-only-dir":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    try:
        if where == "read-only-dir" and root:
            status, stderr = run_without_dac_override(command, "-q", src, "-o", target)
            if status != 1 and "setpriv" in stderr:
                pytest.skip(f"setpriv cannot drop capabilities here: {stderr.strip()}")
            lines = stderr.strip().splitlines()
            assert status == 1 and len(lines) == 1 and lines[0].startswith("Error: "), stderr
            assert "Permission denied" in lines[0]
        else:
            assert_one_line_failure(run(command, src, "-o", target))
    finally:
        if where == "read-only-dir":
            (tmp_path / "ro").chmod(0o755)
    assert not target.exists()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == sorted([src.name] + (["ro"] if where == "read-only-dir" else []))
