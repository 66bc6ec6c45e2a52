"""Attachments: non-tensor files carried in the container after the tensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import codec
from codec.errors import ChecksumError, EncodeError, FormatError
from codec.format import HEADER_SIZE, pack_header
from codec.writer import Writer


def rewrite_index(path: Path, edit) -> None:
    """Apply edit(doc) to the index of a .jwt file and rewrite header and index (data unchanged)."""
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw, 16)[0]
    doc = json.loads(raw[HEADER_SIZE:HEADER_SIZE + n])
    edit(doc)
    index = json.dumps(doc, separators=(",", ":")).encode()
    path.write_bytes(pack_header(index) + index + raw[HEADER_SIZE + n:])


def test_attachments_follow_the_tensors_and_are_counted_in_the_file_size(tmp_path):
    """Attachment blobs come after every tensor blob; truncation and trailing bytes are refused."""
    with Writer(tmp_path / "m.jwt") as w:
        w.add_attachment("b/config.json", b'{"a": 1}')
        from codec.tensorcodec import EncodeOptions, encode_tensor
        from codec.dtypes import get_dtype

        array = np.arange(20, dtype=np.float32)
        w.add("x", get_dtype("float32"), (20,), encode_tensor(array, get_dtype("float32"), EncodeOptions()))
        w.add_attachment("empty.txt", b"")
    with codec.open(tmp_path / "m.jwt") as f:
        entries, atts = f.reader.index.entries, f.reader.index.attachments
        assert atts[0].blobs[0].offset == entries[0].stored_bytes
        assert f.attachments == ["b/config.json", "empty.txt"]
        assert f.get_attachment("b/config.json") == b'{"a": 1}' and f.get_attachment("empty.txt") == b""
        assert np.array_equal(f.get("x").numpy(), array)
    raw = (tmp_path / "m.jwt").read_bytes()
    with pytest.raises(FormatError, match="truncated"):
        codec.open(raw[:-1])
    with pytest.raises(FormatError, match="trailing"):
        codec.open(raw + b"\0")
    bad = bytearray(raw)
    bad[-12] ^= 1
    with codec.open(bytes(bad)) as f, pytest.raises(ChecksumError, match="attachment 'b/config.json'"):
        f.get_attachment("b/config.json")


@pytest.mark.parametrize("name", ["/etc/passwd", "../evil", "a/../../evil", "a\\..\\evil", "a//b", "a/", "",
                                  ".", "C:evil", "a/./b", "new\nline"])
def test_unsafe_attachment_names_are_refused_by_writer_and_reader(tmp_path, name):
    """Absolute paths, '..', backslashes, empty parts and control characters never become attachments."""
    with pytest.raises(EncodeError, match="attachment"), Writer(tmp_path / "w.jwt") as w:
        w.add_attachment(name, b"x")
    with Writer(tmp_path / "m.jwt") as w:
        w.add_attachment("placeholder", b"pwned")
    rewrite_index(tmp_path / "m.jwt", lambda doc: doc["attachments"][0].update(name=name))
    with pytest.raises(FormatError, match="attachment"):
        codec.open(tmp_path / "m.jwt")


def test_clashing_attachment_names_are_refused(tmp_path):
    """Two attachments with one name, or one being a folder of the other, are refused."""
    with pytest.raises(EncodeError, match="both a file and a folder"), Writer(tmp_path / "w.jwt") as w:
        w.add_attachment("a", b"1")
        w.add_attachment("a/b", b"2")
    with Writer(tmp_path / "m.jwt") as w:
        w.add_attachment("a/b", b"1")
        w.add_attachment("c", b"2")
    rewrite_index(tmp_path / "m.jwt", lambda doc: doc["attachments"][1].update(name="a"))
    with pytest.raises(FormatError, match="both a file and a folder"):
        codec.open(tmp_path / "m.jwt")
    rewrite_index(tmp_path / "m.jwt", lambda doc: doc["attachments"][1].update(name="a/b"))
    with pytest.raises(FormatError, match="duplicate attachment"):
        codec.open(tmp_path / "m.jwt")
