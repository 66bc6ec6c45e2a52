"""The .jwt container layout: fixed header, JSON index, blob entries.

Normative description: spec/format.md. This module turns the header and
index into Python objects and back, validating everything a decoder trusts
in the fixed order the spec gives; it reads and writes no files itself.

::

    offset  size  field
    0       8     magic  89 4A 57 54 0D 0A 1A 0A  ("\\x89JWT\\r\\n\\x1a\\n")
    8       2     major version (u16 LE) = 1
    10      2     minor version (u16 LE): 0, 1 (update, exponent_first), 2 (zstd_planes), 3 (index_zstd) or 4
                  (params_zstd)
    12      4     flags (u32 LE): bit 0 "update" (1.1), bit 1 "index_zstd" (1.3), bit 2 "params_zstd" (1.4), the
                  others reserved
    16      8     index length in bytes (u64 LE), as stored
    24      4     CRC-32 of the index bytes as stored (u32 LE)
    28      4     CRC-32 of header bytes 0..27 (u32 LE)
    32      n     index: UTF-8 JSON (with "index_zstd": one zstd frame of it)
    32+n    ...   data section: blobs, contiguous, in index order, to EOF
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from .blobcodecs import BlobCodec, get_codec
from .blobcodecs.zstd import frame_length
from .dtypes import DType, get_dtype
from .errors import ChecksumError, EncodeError, FormatError, LimitError, VersionError
from .limits import Limits
from .mapping import PARAM_TYPES, params_length
from .tiling import MAX_BLOB_SIDE, Tiling

__all__ = [
    "MAGIC",
    "MAJOR",
    "MINOR",
    "HEADER_SIZE",
    "BlobRef",
    "TensorEntry",
    "Attachment",
    "Index",
    "pack_header",
    "unpack_header",
    "parse_index",
    "crc32",
    "attachment_name_error",
    "BaseRef",
    "BaseId",
    "FLAG_UPDATE",
    "FLAG_INDEX_ZSTD",
    "FLAG_PARAMS_ZSTD",
    "pack_index",
    "compress_index",
    "unpack_index",
]

MAGIC = b"\x89JWT\r\n\x1a\n"
MAJOR = 1
#: The minor version this reader implements (1.1: updates, zstd exponent_first; 1.2: the zstd_planes codec;
#: 1.3: a zstd-compressed index; 1.4: zstd-compressed tile parameters). Writers write the smallest minor version
#: whose features the file uses.
MINOR = 4
HEADER_SIZE = 32
#: Header flag bit 0 (format 1.1): the file is an update, decoded against a base (spec section 12).
FLAG_UPDATE = 1
#: Header flag bit 1 (format 1.3): the index is stored as one zstd frame (spec section 4).
FLAG_INDEX_ZSTD = 2
#: Header flag bit 2 (format 1.4): a lossy tensor's parameter blob shorter than its plain length is one zstd frame
#: of its byte planes (spec section 7).
FLAG_PARAMS_ZSTD = 4
#: flag bit -> (name, minor version that defines it). A reader refuses a set flag it does not implement.
FLAGS = {FLAG_UPDATE: ("update", 1), FLAG_INDEX_ZSTD: ("index_zstd", 3), FLAG_PARAMS_ZSTD: ("params_zstd", 4)}
#: A writer compresses the index when that saves at least this share of the whole file (spec section 8.6): a
#: small model's index is a large part of it (21 % of a 53k-weight ResNet-like network's 19.7 KB at 3 bits/weight,
#: 2.4 % of the Fashion-MNIST MLP at 0.4), a large model's is not worth a file that 1.2 readers refuse.
INDEX_ZSTD_SAVING = 0.01
#: zstd level of a compressed index (a few KB to a few MB of JSON: level 19 costs milliseconds to a second).
INDEX_ZSTD_LEVEL = 19
#: Hex digits of a SHA-256 digest as the index writes it (lowercase).
_HEX64 = frozenset("0123456789abcdef")
_HEADER = struct.Struct("<8sHHIQI")


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as zlib and PNG) of ``data``: libdeflate's through imagecodecs for large data where it is
    built in (the same values, 5-6x zlib's 0.9 GB/s: the check of a lossless file's blobs cost as much as decoding
    them), zlib's otherwise."""
    if _fast_crc32 is not None and len(data) >= _FAST_CRC_MIN:
        return _fast_crc32(data) & 0xFFFFFFFF
    return zlib.crc32(data) & 0xFFFFFFFF


#: Bytes from which :func:`crc32` calls libdeflate (below, zlib's call is cheaper: 0.4 us against 0.9 us).
_FAST_CRC_MIN = 1 << 12
try:
    import imagecodecs

    _fast_crc32 = imagecodecs.deflate_crc32 if getattr(imagecodecs, "DEFLATE", None) and imagecodecs.DEFLATE.available \
        else None
except (ImportError, AttributeError):
    _fast_crc32 = None


@dataclass(frozen=True)
class BlobRef:
    """Where one blob lies in the data section, and its checksum."""

    offset: int  # relative to the start of the data section
    length: int
    crc32: int


@dataclass(frozen=True)
class BaseRef:
    """Where an update entry's value comes from: a base tensor and the SHA-256 of its storage bytes (1.1)."""

    name: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256}


@dataclass(frozen=True)
class BaseId:
    """The base an update was made against: the digest of its whole tensor set and its tensor count (1.1)."""

    sha256: str
    tensors: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "tensors": self.tensors}


@dataclass
class TensorEntry:
    """One index entry: a stored tensor, or an alias of an earlier one."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    codec: BlobCodec | None = None
    tiling: Tiling | None = None
    blobs: list[BlobRef] = field(default_factory=list)
    alias: str | None = None
    #: Update entries (1.1): the base tensor this one is coded from. With a codec the
    #: blobs hold the difference (a delta entry); without one the value is the base's.
    base: BaseRef | None = None

    @property
    def unchanged(self) -> bool:
        """True for an update entry whose value is its base tensor's, bit for bit."""
        return self.base is not None and self.codec is None

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes."""
        return self.numel * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        """Bytes this entry's blobs take in the data section."""
        return sum(b.length for b in self.blobs)

    @property
    def params_zstd(self) -> bool:
        """True for a lossy entry whose parameter blob is the zstd frame of format 1.4 (shorter than plain)."""
        return self.tiling is not None and bool(self.blobs) and \
            self.blobs[0].length != params_length(self.tiling.n_tiles, self.tiling.params)

    @property
    def matrix(self) -> tuple[int, int]:
        """The ``[d0, d1*d2*...]`` matrix view of the shape."""
        return self.shape[0], math.prod(self.shape[1:])

    def to_json(self) -> dict[str, Any]:
        """The index form of this entry."""
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}
        if self.alias is not None:
            out["alias"] = self.alias
            return out
        if self.base is not None:
            out["base"] = self.base.to_json()
            if self.codec is None:
                return out
        assert self.codec is not None
        out["codec"] = self.codec.get_config()
        if self.tiling is not None:
            out["tiling"] = self.tiling.to_json()
        out["blobs"] = [[b.offset, b.length, b.crc32] for b in self.blobs]
        return out


@dataclass
class Attachment:
    """A non-tensor file carried losslessly (config, tokenizer, ...), spec section 4.4.

    ``name`` is a relative POSIX path, checked by :func:`attachment_name_error`;
    ``size`` is the decoded size in bytes; the blob follows every tensor blob.
    """

    name: str
    size: int
    codec: BlobCodec
    blobs: list[BlobRef] = field(default_factory=list)

    @property
    def stored_bytes(self) -> int:
        """Bytes this attachment's blobs take in the data section."""
        return sum(b.length for b in self.blobs)

    def to_json(self) -> dict[str, Any]:
        """The index form of this attachment."""
        return {"name": self.name, "size": self.size, "codec": self.codec.get_config(),
                "blobs": [[b.offset, b.length, b.crc32] for b in self.blobs]}


#: Characters an attachment name may not hold: the Windows separator and drive
#: colon, and control characters (C0 and DEL).
_BAD_NAME_CHARS = frozenset("\\:" + "".join(map(chr, range(32))) + "\x7f")


def attachment_name_error(name: str) -> str | None:
    """Why ``name`` is not a safe relative POSIX path for an attachment, or None.

    A safe name is one or more ``/``-separated parts, none empty, ``.`` or
    ``..``, and no backslash, colon or control character anywhere (so no
    absolute path, drive letter or escape from the output folder).
    """
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    bad = sorted(_BAD_NAME_CHARS.intersection(name))
    if bad:
        return f"holds the forbidden character {bad[0]!r}"
    parts = name.split("/")
    if "" in parts:
        return "is absolute or has an empty part" if name.startswith("/") else "has an empty part"
    if "." in parts or ".." in parts:
        return "has a '.' or '..' part"
    return None


@dataclass
class Index:
    """The parsed index: entries in file order plus string metadata."""

    entries: list[TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    encoder: dict[str, str] = field(default_factory=dict)
    minor: int = MINOR
    #: Non-tensor files; their blobs follow every tensor blob.
    attachments: list[Attachment] = field(default_factory=list)
    #: The base of an update (header flag "update", format 1.1); None for a model file.
    base: BaseId | None = None

    @property
    def flags(self) -> int:
        """The header flags this index needs (``params_zstd`` where a parameter blob is compressed)."""
        flags = FLAG_UPDATE if self.base is not None else 0
        return flags | (FLAG_PARAMS_ZSTD if any(e.params_zstd for e in self.entries) else 0)

    @property
    def file_minor(self) -> int:
        """The minor version a writer puts in the header: the smallest that defines every feature used."""
        codecs = [e.codec for e in self.entries if e.codec is not None] + [a.codec for a in self.attachments]
        return max([0] + [FLAGS[bit][1] for bit in FLAGS if self.flags & bit] + [c.minor for c in codecs])

    @property
    def data_length(self) -> int:
        """Bytes of the data section the entries and attachments account for."""
        return sum(e.stored_bytes for e in self.entries) + sum(a.stored_bytes for a in self.attachments)

    def to_bytes(self) -> bytes:
        """Serialize deterministically (fixed key order, no whitespace)."""
        doc: dict[str, Any] = {} if self.base is None else {"base": self.base.to_json()}
        doc["tensors"] = [e.to_json() for e in self.entries]
        if self.attachments:
            doc["attachments"] = [a.to_json() for a in self.attachments]
        doc.update(metadata=self.metadata, encoder=self.encoder)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def compress_index(raw: bytes) -> bytes:
    """The stored form of a JSON index with ``index_zstd`` (format 1.3): one zstd frame at
    :data:`INDEX_ZSTD_LEVEL`, its content size declared."""
    return zstandard.ZstdCompressor(level=INDEX_ZSTD_LEVEL, write_content_size=True).compress(raw)


def pack_index(index: Index, compress: bool | None = None) -> tuple[bytes, int, int]:
    """``(stored index bytes, minor, flags)`` for a writer's header: the JSON index, zstd-compressed (flag
    ``index_zstd``, format 1.3) when ``compress`` says so, or by default when that saves at least
    :data:`INDEX_ZSTD_SAVING` of the file."""
    raw = index.to_bytes()
    least = INDEX_ZSTD_SAVING * (HEADER_SIZE + len(raw) + index.data_length)
    if compress or (compress is None and len(raw) >= least):  # else it cannot save enough: nothing to compress
        packed = compress_index(raw)
        if compress or len(raw) - len(packed) >= least:
            return packed, max(index.file_minor, FLAGS[FLAG_INDEX_ZSTD][1]), index.flags | FLAG_INDEX_ZSTD
    return raw, index.file_minor, index.flags


def unpack_index(stored: bytes, flags: int, limits: Limits) -> bytes:
    """The JSON index from its stored bytes (after their CRC is checked): with ``index_zstd``, the one zstd
    frame's content, whose declared size is checked against the index limit before anything is decompressed."""
    if not flags & FLAG_INDEX_ZSTD:
        return stored
    try:
        size = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise FormatError(f"index: flag 'index_zstd' but not a zstd frame ({exc})") from None
    if size < 0:
        raise FormatError("index: its zstd frame does not declare its content size")
    if size > limits.max_index_bytes:
        raise LimitError(f"index of {size} bytes (decompressed) exceeds the limit of {limits.max_index_bytes}")
    if frame_length(stored) != len(stored):
        raise FormatError(f"index: {len(stored)} bytes hold more than one zstd frame")
    try:
        data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=max(size, 1))
    except zstandard.ZstdError as exc:
        raise FormatError(f"index: corrupt zstd frame ({exc})") from None
    if len(data) != size:
        raise FormatError(f"index: zstd frame decoded to {len(data)} bytes, it declares {size}")
    return data


def pack_header(index_bytes: bytes, minor: int = 0, flags: int = 0) -> bytes:
    """Return the 32-byte header for ``index_bytes`` (a 1.0 file unless told otherwise)."""
    head = _HEADER.pack(MAGIC, MAJOR, minor, flags, len(index_bytes), crc32(index_bytes))
    return head + struct.pack("<I", crc32(head))


def unpack_header(header: bytes, limits: Limits, implements: int | None = None) -> tuple[int, int, int]:
    """Validate a header; return ``(minor, flags, index_length)``.

    ``implements`` is the minor version of the reader (default :data:`MINOR`):
    a flag defined by a later minor version, or by none, is a VersionError.
    """
    if len(header) < HEADER_SIZE:
        if MAGIC.startswith(header[:8]) and header:
            raise FormatError(f"truncated: {len(header)} bytes, a .jwt header needs {HEADER_SIZE}")
        raise FormatError("not a .jwt file (file is shorter than the 32-byte header)")
    magic, major, minor, flags, index_length, _ = _HEADER.unpack_from(header)
    if magic != MAGIC:
        raise FormatError(f"not a .jwt file (magic {magic!r}, expected {MAGIC!r})")
    stored, computed = struct.unpack_from("<I", header, 28)[0], crc32(header[:28])
    if stored != computed:
        raise ChecksumError(f"header: stored crc32 0x{stored:08x}, computed 0x{computed:08x}")
    if major != MAJOR:
        raise VersionError(f"format version {major}.{minor} is not supported (this reader implements {MAJOR}.x)")
    implements = MINOR if implements is None else implements
    for bit in range(32):
        name, defined = FLAGS.get(1 << bit, (None, None))
        if flags & (1 << bit) and (defined is None or defined > implements):
            what = (f"flag {name!r} (format 1.{defined})" if name
                    else f"flag bit {bit} (defined by no version up to 1.{implements})")
            raise VersionError(f"format {major}.{minor} file with the header {what}, which this reader "
                               f"({MAJOR}.{implements}) does not implement; a newer reader is needed")
    if index_length > limits.max_index_bytes:
        raise LimitError(f"index of {index_length} bytes exceeds the limit of {limits.max_index_bytes}")
    return minor, flags, index_length


def check_index_crc(header: bytes, index_bytes: bytes) -> None:
    """Raise ChecksumError unless the index matches the header's CRC."""
    stored, computed = struct.unpack_from("<I", header, 24)[0], crc32(index_bytes)
    if stored != computed:
        raise ChecksumError(f"index: stored crc32 0x{stored:08x}, computed 0x{computed:08x}")


#: A JSON string (with its escapes), to blank out before counting brackets.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays and objects in JSON text (brackets inside strings do not count)."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    step = np.zeros(len(bare), np.int64)
    step[(bare == ord("[")) | (bare == ord("{"))] = 1
    step[(bare == ord("]")) | (bare == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


#: Digits past which a JSON integer is not converted: 2^64 has 20, so such a number is beyond every integer field's
#: range and every size limit (spec section 4), and Python's int() refuses over 4,300 digits anyway.
_LONG_DIGITS = 40


class _LongInt(int):
    """A JSON integer of more than ``_LONG_DIGITS`` digits, held as +-10^40 (beyond every range and limit, so the
    checks refuse it as they would its value: out of range, or in ``shape`` over the size limits) and shown by its
    length, not its digits."""

    digits: int

    def __new__(cls, text: str) -> _LongInt:
        negative = text.startswith("-")
        self = super().__new__(cls, -(10 ** _LONG_DIGITS) if negative else 10 ** _LONG_DIGITS)
        self.digits = len(text) - negative
        return self

    def __repr__(self) -> str:
        return f"{'-' if self < 0 else ''}<{self.digits:,}-digit integer>"

    __str__ = __repr__


def _parse_int(text: str) -> int:
    return int(text) if len(text) <= _LONG_DIGITS else _LongInt(text)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    """Schema checks with messages that say where in the index they failed."""

    def __init__(self, limits: Limits):
        self.limits = limits
        #: Whether the file is an update (entries may name base tensors).
        self.update = False
        #: Whether the header sets ``params_zstd`` (parameter blobs may be zstd frames, format 1.4).
        self.params_zstd = False

    def sha256(self, obj: dict, where: str) -> str:
        """The ``sha256`` field of ``obj``: 64 lowercase hex digits."""
        value = self.get(obj, "sha256", where, str)
        if len(value) != 64 or not _HEX64.issuperset(value):
            raise self.fail(where, f"sha256 must be 64 lowercase hex digits, found {value!r:.80}")
        return value

    def fail(self, where: str, msg: str) -> FormatError:
        return FormatError(f"index: {where}: {msg}")

    def get(self, obj: dict, key: str, where: str, kind: type, optional: bool = False) -> Any:
        if key not in obj:
            if optional:
                return None
            raise self.fail(where, f"missing field {key!r}")
        value = obj[key]
        ok = _is_int(value) if kind is int else isinstance(value, kind)
        if not ok:
            raise self.fail(where, f"field {key!r} must be {kind.__name__}, found {type(value).__name__}")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, found {type(value).__name__}")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # a JSON escape such as \ud800: not Unicode text
            raise self.fail(where, "string holds a lone UTF-16 surrogate") from None
        if size > self.limits.max_name_bytes:
            raise LimitError(f"index: {where}: string of over {self.limits.max_name_bytes} bytes")
        return value

    def string_map(self, obj: dict, key: str) -> dict[str, str]:
        value = self.get(obj, key, "top level", dict, optional=True) or {}
        return {self.text(k, f"{key} key"): self.text(v, f"{key}[{k!r}]") for k, v in value.items()}


def parse_index(index_bytes: bytes, minor: int, limits: Limits, flags: int = 0) -> Index:
    """Parse and validate the index; blob offsets are checked to be contiguous.

    ``flags`` are the header's: with ``FLAG_UPDATE`` the index describes an
    update (a top-level ``base`` and entries coded from base tensors).
    """
    try:
        text = index_bytes.decode("utf-8")
    except ValueError as exc:
        raise FormatError(f"index is not valid UTF-8 JSON ({str(exc)[:200]})") from None
    depth = json_depth(index_bytes)
    if depth > limits.max_json_depth:
        raise LimitError(f"index: JSON nested {depth} levels deep, over the limit of {limits.max_json_depth}")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                         parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"index is not valid UTF-8 JSON ({str(exc)[:200]})") from None
    c = _Checker(limits)
    if not isinstance(doc, dict):
        raise c.fail("top level", "must be a JSON object")
    tensors = c.get(doc, "tensors", "top level", list)
    if len(tensors) > limits.max_tensors:
        raise LimitError(f"index: {len(tensors)} tensors exceed the limit of {limits.max_tensors}")
    index = Index([], c.string_map(doc, "metadata"), c.string_map(doc, "encoder"), minor)
    c.update = bool(flags & FLAG_UPDATE)
    c.params_zstd = bool(flags & FLAG_PARAMS_ZSTD)
    base_doc = c.get(doc, "base", "top level", dict, optional=True)
    if c.update:
        if base_doc is None:
            raise c.fail("top level", "an update (header flag 'update') needs a 'base' object")
        count = c.get(base_doc, "tensors", "base", int)
        if count < 0:
            raise c.fail("base", f"tensors must be non-negative, found {count}")
        index.base = BaseId(c.sha256(base_doc, "base"), count)
    elif base_doc is not None:
        raise c.fail("top level", "'base' belongs to updates, and the header flag 'update' is not set")
    by_name: dict[str, TensorEntry] = {}
    offset = total = 0
    for i, obj in enumerate(tensors):
        entry = _parse_entry(c, obj, i, by_name, offset)
        by_name[entry.name] = entry
        index.entries.append(entry)
        offset += entry.stored_bytes
        if entry.alias is None:
            total += entry.nbytes
            if total > limits.max_total_bytes:
                raise LimitError(f"index: tensors decode to over {limits.max_total_bytes} bytes (Limits.max_total_bytes)")
    attachments = c.get(doc, "attachments", "top level", list, optional=True) or []
    if len(tensors) + len(attachments) > limits.max_tensors:
        raise LimitError(f"index: {len(tensors)} tensors and {len(attachments)} attachments exceed the limit of "
                         f"{limits.max_tensors} entries")
    names: set[str] = set()
    folders: set[str] = set()
    for i, obj in enumerate(attachments):
        att = _parse_attachment(c, obj, i, names, folders, offset)
        index.attachments.append(att)
        offset += att.stored_bytes
        total += att.size
        if total > limits.max_total_bytes:
            raise LimitError(f"index: tensors and attachments decode to over {limits.max_total_bytes} bytes "
                             "(Limits.max_total_bytes)")
    return index


def _parse_attachment(c: _Checker, obj: Any, i: int, names: set[str], folders: set[str], offset: int) -> Attachment:
    where = f"attachments[{i}]"
    if not isinstance(obj, dict):
        raise c.fail(where, "must be an object")
    name = c.text(c.get(obj, "name", where, str), where + ".name")
    where = f"attachment {name!r}"
    problem = attachment_name_error(name)
    if problem:
        raise c.fail(where, f"name {problem} (attachment names are relative POSIX paths)")
    if name in names:
        raise c.fail(where, "duplicate attachment name")
    parents = {name[:k] for k in range(len(name)) if name[k] == "/"}
    if name in folders or not parents.isdisjoint(names):
        raise c.fail(where, "is both a file and a folder of the attachments")
    names.add(name)
    folders.update(parents)
    size = c.get(obj, "size", where, int)
    if size < 0:
        raise c.fail(where, f"size must be non-negative, found {size}")
    if size > c.limits.max_tensor_bytes:
        raise LimitError(f"index: {where}: {size} bytes, over the limit of {c.limits.max_tensor_bytes}")
    codec = get_codec(c.get(obj, "codec", where, dict))
    if codec.lossy or codec.bits:
        raise c.fail(where, f"codec {codec.codec_id!r} is not a lossless byte codec")
    blobs = _parse_blobs(c, c.get(obj, "blobs", where, list), where, offset)
    if len(blobs) != 1:
        raise c.fail(where, f"has {len(blobs)} blobs, expected 1")
    return Attachment(name, size, codec, blobs)


def _parse_entry(c: _Checker, obj: Any, i: int, by_name: dict[str, TensorEntry], offset: int) -> TensorEntry:
    where = f"tensors[{i}]"
    if not isinstance(obj, dict):
        raise c.fail(where, "must be an object")
    name = c.text(c.get(obj, "name", where, str), where + ".name")
    where = f"tensor {name!r}"
    if name in by_name:
        raise c.fail(where, "duplicate tensor name")
    dtype_name = c.get(obj, "dtype", where, str)
    try:
        dtype = get_dtype(dtype_name)
    except EncodeError:
        raise c.fail(where, f"unknown dtype {dtype_name!r:.40}") from None
    shape = c.get(obj, "shape", where, list)
    if len(shape) > c.limits.max_ndim:
        raise LimitError(f"index: {where}: {len(shape)} dimensions exceed the limit of {c.limits.max_ndim}")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise c.fail(where, f"shape must be non-negative integers, found {shape!r:.80}")
    if any(isinstance(d, _LongInt) for d in shape):
        raise LimitError(f"index: {where}: shape {shape!r:.80} has a dimension beyond every size limit")
    entry = TensorEntry(name, dtype, tuple(shape))
    if entry.nbytes > c.limits.max_tensor_bytes:
        raise LimitError(f"index: {where}: decodes to {entry.nbytes} bytes, over the limit of {c.limits.max_tensor_bytes}")
    # A zero dimension must not hide absurd others: no host array has shape [0, 2**62] of float32.
    if math.prod(d for d in shape if d) * dtype.itemsize > c.limits.max_tensor_bytes:
        raise LimitError(f"index: {where}: empty tensor of shape {shape!r:.80} whose other dimensions span over "
                         f"{c.limits.max_tensor_bytes} bytes")
    alias = c.get(obj, "alias", where, str, optional=True)
    if alias is not None:
        target = by_name.get(alias)
        if target is None or target.alias is not None:
            raise c.fail(where, f"alias {alias!r:.80} does not name an earlier stored tensor")
        if (target.dtype, target.shape) != (dtype, entry.shape):
            raise c.fail(where, f"alias of {alias!r} must have its dtype and shape")
        misplaced = [k for k in ("codec", "tiling", "blobs", "base") if k in obj]
        if misplaced:
            raise c.fail(where, f"an alias has no {', '.join(misplaced)}")
        entry.alias = alias
        return entry
    base_doc = c.get(obj, "base", where, dict, optional=True)
    if base_doc is not None:
        if not c.update:
            raise c.fail(where, "'base' belongs to updates, and the header flag 'update' is not set")
        entry.base = BaseRef(c.text(c.get(base_doc, "name", where + ".base", str), where + ".base.name"),
                             c.sha256(base_doc, where + ".base"))
        if "codec" not in obj:  # unchanged: the base tensor's value
            misplaced = [k for k in ("tiling", "blobs") if k in obj]
            if misplaced:
                raise c.fail(where, f"an unchanged entry (base without codec) has no {', '.join(misplaced)}")
            return entry
        if not dtype.floating:
            raise c.fail(where, f"a difference from the base needs a floating dtype, found {dtype.name}")
    entry.codec = get_codec(c.get(obj, "codec", where, dict))
    entry.blobs = _parse_blobs(c, c.get(obj, "blobs", where, list), where, offset)
    tiling_doc = c.get(obj, "tiling", where, dict, optional=True)
    if entry.codec.lossy:
        if tiling_doc is None:
            raise c.fail(where, f"codec {entry.codec.codec_id!r} needs a tiling")
        entry.tiling = _parse_tiling(c, tiling_doc, entry, where)
        expected = 1 + entry.tiling.n_blobs
    else:
        if tiling_doc is not None:
            raise c.fail(where, "a lossless tensor has no tiling")
        expected = 1
    if len(entry.blobs) != expected:
        raise c.fail(where, f"has {len(entry.blobs)} blobs, its codec and tiling need {expected}")
    if entry.tiling is not None:
        need, length = params_length(entry.tiling.n_tiles, entry.tiling.params), entry.blobs[0].length
        if length > need or (length < need and not c.params_zstd):
            more = " (or fewer, a zstd frame: header flag 'params_zstd')" if c.params_zstd else ""
            raise c.fail(where, f"tile parameter blob is {length} bytes, expected {need}{more}")
    return entry


def _parse_blobs(c: _Checker, blobs: list, where: str, offset: int) -> list[BlobRef]:
    if len(blobs) > c.limits.max_blobs_per_tensor:
        raise LimitError(f"index: {where}: {len(blobs)} blobs exceed the limit of {c.limits.max_blobs_per_tensor}")
    refs = []
    for k, b in enumerate(blobs):
        if not (isinstance(b, list) and len(b) == 3 and all(_is_int(v) and v >= 0 for v in b)):
            raise c.fail(where, f"blob {k} must be [offset, length, crc32] of non-negative integers")
        if b[0] != offset:
            raise c.fail(where, f"blob {k} starts at data offset {b[0]}, expected {offset} (blobs are contiguous)")
        if b[2] > 0xFFFFFFFF:
            raise c.fail(where, f"blob {k} crc32 {b[2]} is over 32 bits")
        refs.append(BlobRef(*b))
        offset += b[1]
    return refs


def _parse_tiling(c: _Checker, doc: dict, entry: TensorEntry, where: str) -> Tiling:
    where += ".tiling"
    if not entry.dtype.floating:
        raise c.fail(where, f"lossy codecs need a floating dtype, found {entry.dtype.name}")
    if len(entry.shape) < 2 or entry.numel == 0:
        raise c.fail(where, f"lossy codecs need a non-empty tensor of 2 or more dimensions, found {list(entry.shape)}")
    mode = c.get(doc, "mode", where, str)
    tile = c.get(doc, "tile", where, list)
    columns = c.get(doc, "columns", where, int)
    rows_per_blob = c.get(doc, "rows_per_blob", where, int)
    if not (len(tile) == 2 and all(_is_int(v) and 1 <= v <= 65528 for v in tile)):
        raise c.fail(where, f"tile must be two integers in 1..65528, found {tile!r:.60}")
    rows, cols = entry.matrix
    th, tw = tile
    if mode == "rows":
        if th * tw != cols:
            raise c.fail(where, f"rows mode needs tile {th}x{tw} to hold a row of {cols} values")
    elif mode == "grid":
        if th > rows or tw > cols:
            raise c.fail(where, f"tile {th}x{tw} exceeds the {rows}x{cols} matrix")
    else:
        raise c.fail(where, f"unknown mode {mode!r:.40}")
    params = c.get(doc, "params", where, str)
    if params not in PARAM_TYPES:
        raise c.fail(where, f"params {params!r:.40} is not one of {', '.join(PARAM_TYPES)}")
    t = Tiling(mode, rows, cols, th, tw, max(columns, 1), max(rows_per_blob, 1), params)
    if not 1 <= columns <= t.n_tiles or not 1 <= rows_per_blob <= t.mosaic_rows:
        raise c.fail(where, f"columns={columns} / rows_per_blob={rows_per_blob} do not fit {t.n_tiles} tiles")
    height, width = t.blob_shape(0)  # the first image blob is the largest
    if max(height, width) > MAX_BLOB_SIDE:
        raise c.fail(where, f"image blob of {height} x {width} pixels: a side over {MAX_BLOB_SIDE}")
    if height * width > c.limits.max_blob_pixels:
        raise LimitError(f"index: {where}: image blob of {height} x {width} pixels, over the limit of "
                         f"{c.limits.max_blob_pixels} pixels")
    return t
