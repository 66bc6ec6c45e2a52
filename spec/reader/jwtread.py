"""An independent reader of the .jwt format, written from spec/format.md alone (clean room: no code of codec/).

It is the executable companion of the specification: every rule below cites the section it implements, so the two
can be read side by side. Dependencies: the standard library, numpy, zstandard and imagecodecs (libjpeg-turbo and
libjxl decode the image blobs). Format versions 1.0 to 1.4, updates (section 12) included.

    tensors = read("model.jwt")                       # dict name -> numpy array
    tensors, attachments, index = read_all("update.jwt", base="base.jwt")

Arrays come in storage form: `bfloat16` as `uint16` bit patterns, `float8_e4m3fn` / `float8_e5m2` as `uint8` bit
patterns (numpy has no such types); every other dtype is its numpy type. An alias is the same array object as its
target. Errors are the kinds of section 9.1, all subclasses of `JwtError` (a `ValueError`).
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import imagecodecs
import numpy as np
import zstandard


class JwtError(ValueError):
    """Every refusal of this reader."""


class FormatError(JwtError):
    """The bytes break a rule of the specification."""


class VersionError(FormatError):
    """A major version or a header flag this reader does not implement."""


class ChecksumError(FormatError):
    """A CRC-32 (header, index or blob) does not match."""


class UnknownCodecError(FormatError):
    """A codec identifier this reader does not know."""


class LimitError(JwtError):
    """A decoder limit (section 9.2) is exceeded: the file may be valid for a reader with higher limits."""


class BaseError(JwtError):
    """An update's base is missing or is not the base it was made against (section 12.4)."""


@dataclass
class Limits:
    """Decoder limits of section 9.2, with the reference defaults."""

    index_bytes: int = 64 << 20
    entries: int = 1 << 20
    dims: int = 32
    string_bytes: int = 65536
    tensor_bytes: int = 16 << 30
    total_bytes: int = 256 << 30
    pixels: int = 1 << 26
    blobs: int = 1 << 20
    depth: int = 64


MAGIC = b"\x89JWT\r\n\x1a\n"
FLAG_UPDATE, FLAG_INDEX_ZSTD, FLAG_PARAMS_ZSTD = 1, 2, 4
KNOWN_FLAGS = FLAG_UPDATE | FLAG_INDEX_ZSTD | FLAG_PARAMS_ZSTD
# section 4.2: dtype -> (numpy storage type, size); bfloat16 and float8 are kept as their bit patterns
DTYPES = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float8_e4m3fn": "u1",
          "float8_e5m2": "u1", "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint64": "<u8",
          "uint32": "<u4", "uint16": "<u2", "uint8": "u1", "bool": "?"}
FLOATING = {"float64", "float32", "float16", "bfloat16"}
LOSSLESS, LOSSY = {"zstd", "zstd_planes"}, {"jpeg", "jpegxl", "quant"}
JPEG_TABLES = {"jpeg", "flat", "ramp1", "ramp2", "ramp4"}
HEX64 = re.compile(r"[0-9a-f]{64}")


def _size(dtype: str) -> int:
    return np.dtype(DTYPES[dtype]).itemsize


# ---------------------------------------------------------------- JSON (section 4: numbers, duplicates, depth)

class _JsonFloat(str):
    """A JSON number with a fraction or exponent, kept as its text: integer fields refuse it (section 4)."""


def _pairs(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"index: duplicate key {k!r}")
        out[k] = v
    return out


def _integer(text: str) -> int:
    """An integer read exactly; one too long for Python's int() (4,300 digits) is beyond every range and limit."""
    return int(text) if len(text) < 4000 else (-1 if text[0] == "-" else 1) << 14000


def _bad_constant(name: str) -> None:
    raise FormatError(f"index: non-standard JSON constant {name}")


def _check_strings(node: Any) -> None:
    """Every string (keys too) must be Unicode scalar values: no escaped lone surrogate (section 4.1)."""
    stack = [node]
    while stack:
        x = stack.pop()
        items = list(x.items()) if isinstance(x, dict) else x if isinstance(x, list) else [x]
        for item in items:
            for s in item if isinstance(x, dict) else (item,):
                if isinstance(s, str) and not isinstance(s, _JsonFloat):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise FormatError(f"index: string {s!r} holds a lone surrogate") from None
                elif isinstance(s, (dict, list)):
                    stack.append(s)


def parse_index(raw: bytes, limits: Limits) -> dict:
    """Section 4 and section 9 step 3: UTF-8, nesting depth [Limit], then strict JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"index: invalid UTF-8 ({e})") from None
    depth = worst = 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):   # strings are skipped whole
        c = m.group()
        if c in "[{":
            depth += 1
            worst = max(worst, depth)
        elif c in "]}":
            depth -= 1
    if worst > limits.depth:
        raise LimitError(f"index: JSON nested {worst} levels deep, over the limit of {limits.depth}")
    try:
        index = json.loads(text, object_pairs_hook=_pairs, parse_float=_JsonFloat, parse_int=_integer,
                           parse_constant=_bad_constant)
    except json.JSONDecodeError as e:
        raise FormatError(f"index: not valid JSON ({e})") from None
    _check_strings(index)
    return index


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not a number with a fraction or exponent


def _int(v: Any, what: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if not _is_int(v):
        raise FormatError(f"{what}: expected an integer, got {v!r}")
    if not lo <= v <= hi:
        raise FormatError(f"{what}: {str(v)[:40]} out of range {lo}..{hi}")
    return v


def _number(v: int | _JsonFloat) -> float:
    """A JSON number as binary64; one too large for it (a 400-digit integer) is infinite, so out of range."""
    try:
        return float(v)
    except OverflowError:
        return float("inf")


def _string(v: Any, what: str, limits: Limits) -> str:
    if not isinstance(v, str) or isinstance(v, _JsonFloat):
        raise FormatError(f"{what}: expected a string, got {v!r}")
    if len(v.encode("utf-8")) > limits.string_bytes:
        raise LimitError(f"{what}: longer than {limits.string_bytes} UTF-8 bytes")
    return v


# ---------------------------------------------------------------- Zstandard frames (RFC 8878; sections 4, 5.1, 7)

def zstd_frame(blob: bytes, what: str, expected: int | None = None, limit: int | None = None) -> bytes:
    """Decode one frame that declares its content size, with nothing after it (section 5.1).

    The frame is walked block by block before anything is decompressed: python-zstandard alone would accept
    trailing bytes and, without a declared size, guess one."""
    if len(blob) < 6 or blob[:4] != b"\x28\xb5\x2f\xfd":
        raise FormatError(f"{what}: not a Zstandard frame")
    fhd = blob[4]
    fcs_code, single, checksum, dict_code = fhd >> 6, fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_code]
    if fcs_len == 0:
        raise FormatError(f"{what}: zstd frame without a declared content size")
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_code]
    if pos + fcs_len > len(blob):
        raise FormatError(f"{what}: zstd frame header cut short")
    declared = int.from_bytes(blob[pos:pos + fcs_len], "little") + (256 if fcs_len == 2 else 0)
    if expected is not None and declared != expected:
        raise FormatError(f"{what}: zstd frame declares {declared} bytes, expected {expected}")
    if limit is not None and declared > limit:
        raise LimitError(f"{what}: zstd frame declares {declared} bytes, over the limit of {limit}")
    pos += fcs_len
    while True:
        if pos + 3 > len(blob):
            raise FormatError(f"{what}: zstd frame cut short")
        head = int.from_bytes(blob[pos:pos + 3], "little")
        if head >> 1 & 3 == 3:
            raise FormatError(f"{what}: zstd block of the reserved type")
        pos += 3 + (1 if head >> 1 & 3 == 1 else head >> 3)
        if head & 1:
            break
    pos += 4 * checksum
    if pos != len(blob):
        raise FormatError(f"{what}: {len(blob) - pos} bytes after the zstd frame" if pos < len(blob)
                          else f"{what}: zstd frame cut short")
    try:
        out = zstandard.ZstdDecompressor().decompress(bytes(blob))
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd frame ({e})") from None
    if len(out) != declared:
        raise FormatError(f"{what}: zstd frame decoded to {len(out)} bytes, declared {declared}")
    return out


def _unplane(content: bytes, k: int, count: int) -> np.ndarray:
    """Byte planes (plane j = byte j of every element) back to elements of k bytes, as little-endian bytes."""
    return np.frombuffer(content, np.uint8).reshape(k, count).T.copy()


# ---------------------------------------------------------------- header and index validation (sections 3, 4, 9)

@dataclass
class Entry:
    """A validated tensor entry or attachment."""

    name: str
    dtype: str
    shape: tuple
    kind: str                 # "stored", "alias", "difference", "unchanged", "attachment"
    codec: dict | None = None
    tiling: dict | None = None
    blobs: list | None = None
    target: str | None = None  # alias target
    base: dict | None = None
    geometry: dict | None = None


@dataclass
class Index:
    """What the header and the validated index say about a file."""

    minor: int
    flags: int
    data_start: int
    json: dict
    tensors: list
    attachments: list


def _check_codec(codec: Any, what: str, dtype: str, lossless_only: bool = False) -> dict:
    """Section 5: id [UnknownCodec], then every listed parameter (ignoring unlisted ones)."""
    if not isinstance(codec, dict) or not isinstance(codec.get("id"), str) or isinstance(codec["id"], _JsonFloat):
        raise FormatError(f"{what}: codec must be an object with a string id")
    cid = codec["id"]
    if cid not in LOSSLESS | LOSSY:
        raise UnknownCodecError(f"{what}: unknown codec {cid!r}")

    def need(key: str) -> Any:
        if key not in codec:
            raise FormatError(f"{what}: codec {cid} lacks the parameter {key!r}")
        return codec[key]

    def boolean(key: str) -> bool:
        if not isinstance(need(key), bool):
            raise FormatError(f"{what}: codec parameter {key} must be a boolean")
        return codec[key]

    k = _size(dtype)
    if cid == "zstd":
        _int(need("level"), f"{what}: zstd level", -7, 22)
        boolean("shuffle")
        if "exponent_first" in codec and boolean("exponent_first") and (not codec["shuffle"] or k not in (2, 4, 8)):
            raise FormatError(f"{what}: exponent_first needs shuffle and 2, 4 or 8-byte elements")
    elif cid == "zstd_planes":
        rotate = _int(need("rotate"), f"{what}: zstd_planes rotate", 0, 63)
        if k not in (2, 4, 8) or rotate >= 8 * k:
            raise FormatError(f"{what}: zstd_planes rotate {rotate} on {k}-byte elements")
    elif lossless_only:
        raise FormatError(f"{what}: an attachment needs a lossless codec, not {cid}")
    elif cid == "jpeg":
        _int(need("quality"), f"{what}: jpeg quality", 1, 100)
        t = need("table")
        if not (isinstance(t, str) and t in JPEG_TABLES or isinstance(t, list) and len(t) == 64
                and all(_is_int(x) and 1 <= x <= 255 for x in t)):
            raise FormatError(f"{what}: bad jpeg table {t!r}")
    elif cid == "jpegxl":
        d = need("distance")
        if not (_is_int(d) or isinstance(d, _JsonFloat)) or not 0 <= _number(d) <= 25:
            raise FormatError(f"{what}: jpegxl distance {d!r} out of range 0..25")
        _int(need("effort"), f"{what}: jpegxl effort", 1, 10)
    else:
        _int(need("bits"), f"{what}: quant bits", 1, 16)
        _int(need("level"), f"{what}: quant level", -7, 22)
    return codec


def _check_tiling(tiling: Any, what: str, shape: tuple, limits: Limits) -> dict:
    """Sections 6 and 7: fields, mode rules, mosaic geometry, image sides [Format] and pixels [Limit]."""
    if not isinstance(tiling, dict):
        raise FormatError(f"{what}: tiling must be an object")
    for key in ("mode", "tile", "columns", "rows_per_blob", "params"):
        if key not in tiling:
            raise FormatError(f"{what}: tiling lacks {key!r}")
    mode, tile, params = tiling["mode"], tiling["tile"], tiling["params"]
    if mode not in ("grid", "rows"):
        raise FormatError(f"{what}: unknown tiling mode {mode!r}")
    if not isinstance(tile, list) or len(tile) != 2:
        raise FormatError(f"{what}: tile must be [th, tw]")
    th, tw = (_int(x, f"{what}: tile side", 1, 65528) for x in tile)
    columns = _int(tiling["columns"], f"{what}: columns", 1)
    rpb = _int(tiling["rows_per_blob"], f"{what}: rows_per_blob", 1)
    if params not in ("bfloat16", "float32"):
        raise FormatError(f"{what}: unknown tile parameter type {params!r}")
    R, C = shape[0], int(np.prod(shape[1:], dtype=object))
    if mode == "grid":
        if th > R or tw > C:
            raise FormatError(f"{what}: tile {th}x{tw} larger than the {R}x{C} matrix")
        T = -(-R // th) * -(-C // tw)
    else:
        if th * tw != C:
            raise FormatError(f"{what}: rows tile {th}x{tw} does not hold the {C} columns")
        T = R
    if columns > T:
        raise FormatError(f"{what}: columns {columns} over the {T} tiles")
    MR = -(-T // columns)
    if rpb > MR:
        raise FormatError(f"{what}: rows_per_blob {rpb} over the {MR} mosaic rows")
    height, width = rpb * th, columns * tw
    if height > 65535 or width > 65535:
        raise FormatError(f"{what}: image blob {height}x{width} has a side over 65535 pixels")
    if height * width > limits.pixels:
        raise LimitError(f"{what}: image blob of {height * width} pixels, over the limit of {limits.pixels}")
    return {"R": R, "C": C, "th": th, "tw": tw, "T": T, "columns": columns, "MR": MR, "rpb": rpb,
            "n_blobs": -(-MR // rpb), "P": T * 2 * (2 if params == "bfloat16" else 4), "params": params}


def _check_blobs(blobs: Any, what: str, pos: int, limits: Limits) -> tuple[list, int]:
    """Section 4.3: count [Limit], `[offset, length, crc32]` of non-negative integers, contiguous."""
    if not isinstance(blobs, list):
        raise FormatError(f"{what}: blobs must be an array")
    if len(blobs) > limits.blobs:
        raise LimitError(f"{what}: {len(blobs)} blobs, over the limit of {limits.blobs}")
    out = []
    for i, ref in enumerate(blobs):
        if not isinstance(ref, list) or len(ref) != 3:
            raise FormatError(f"{what}: blob {i} is not [offset, length, crc32]")
        off, length, crc = (_int(x, f"{what}: blob {i}") for x in ref)
        if off != pos:
            raise FormatError(f"{what}: blob {i} at offset {off}, expected {pos} (blobs are contiguous)")
        if crc >= 1 << 32:
            raise FormatError(f"{what}: blob {i} crc32 {crc} is not below 2^32")
        out.append((off, length, crc))
        pos += length
    return out, pos


def _check_attachment_name(name: str, what: str) -> None:
    """Section 4.4: a relative POSIX path that cannot leave its folder."""
    parts = name.split("/")
    if (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name or ":" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise FormatError(f"{what}: unsafe attachment name {name!r}")


def read_index(f: BinaryIO, file_size: int, limits: Limits) -> Index:
    """Section 9, steps 1 to 5."""
    head = f.read(32)
    if len(head) < 32:
        raise FormatError(f"file of {len(head)} bytes is shorter than the 32-byte header")
    if head[:8] != MAGIC:
        raise FormatError(f"bad magic {head[:8].hex()}: not a .jwt file (or mangled by a text-mode transfer)")
    if zlib.crc32(head[:28]) != struct.unpack_from("<I", head, 28)[0]:
        raise ChecksumError("header CRC-32 does not match")
    major, minor, flags, n, index_crc = struct.unpack_from("<HHIQI", head, 8)
    if major != 1:
        raise VersionError(f"major version {major}: this reader implements version 1 (1.0 to 1.4)")
    if flags & ~KNOWN_FLAGS:
        raise VersionError(f"header flags 0x{flags:08x}: bits 0x{flags & ~KNOWN_FLAGS:08x} are not implemented")
    if n > limits.index_bytes:
        raise LimitError(f"index of {n} bytes, over the limit of {limits.index_bytes}")
    raw = f.read(n)
    if len(raw) < n:
        raise FormatError(f"index of {n} bytes cut short at {len(raw)}")
    if zlib.crc32(raw) != index_crc:
        raise ChecksumError("index CRC-32 does not match")
    if flags & FLAG_INDEX_ZSTD:
        raw = zstd_frame(raw, "compressed index", limit=limits.index_bytes)
    doc = parse_index(raw, limits)
    update = bool(flags & FLAG_UPDATE)

    # step 3: top level
    if not isinstance(doc, dict) or not isinstance(doc.get("tensors"), list):
        raise FormatError("index: not an object with a 'tensors' array")
    if len(doc["tensors"]) > limits.entries:
        raise LimitError(f"index: {len(doc['tensors'])} tensors, over the limit of {limits.entries}")
    for key in ("metadata", "encoder"):
        if key in doc:
            if not isinstance(doc[key], dict):
                raise FormatError(f"index: {key} must be an object of strings")
            for k, v in doc[key].items():
                _string(k, f"{key} key", limits)
                _string(v, f"{key}[{k!r}]", limits)
    if update != ("base" in doc):
        raise FormatError("index: top-level 'base' must be present exactly when the header flag update is set")
    if update:
        b = doc["base"]
        if not isinstance(b, dict) or not isinstance(b.get("sha256"), str) or not HEX64.fullmatch(b["sha256"]):
            raise FormatError("index: base needs a 'sha256' of 64 lowercase hex digits")
        _int(b.get("tensors"), "index: base tensors")

    # step 4: tensor entries
    tensors, names, pos, total = [], {}, 0, 0
    for i, e in enumerate(doc["tensors"]):
        what = f"tensor {i}"
        if not isinstance(e, dict):
            raise FormatError(f"{what}: not an object")
        name = _string(e.get("name"), f"{what} name", limits)
        what = f"tensor {name!r}"
        if name in names:
            raise FormatError(f"{what}: duplicate name")
        if not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPES:
            raise FormatError(f"{what}: unknown dtype {e.get('dtype')!r}")
        dtype, shape = e["dtype"], e.get("shape")
        if not isinstance(shape, list):
            raise FormatError(f"{what}: shape must be an array")
        if len(shape) > limits.dims:
            raise LimitError(f"{what}: {len(shape)} dimensions, over the limit of {limits.dims}")
        for d in shape:
            if not _is_int(d) or d < 0:
                raise FormatError(f"{what}: shape {str(shape)[:80]} holds {str(d)[:40]}, not a non-negative integer")
        shape, k = tuple(shape), _size(dtype)
        size = int(np.prod(shape, dtype=object)) * k
        if size > limits.tensor_bytes or int(np.prod([d for d in shape if d], dtype=object)) * k > limits.tensor_bytes:
            raise LimitError(f"{what}: shape {str(list(shape))[:80]} over the per-tensor limit of "
                             f"{limits.tensor_bytes} bytes")
        if "base" in e and not update:
            raise FormatError(f"{what}: 'base' in a file that is not an update")
        if "alias" in e:
            target = e["alias"]
            t = names.get(target) if isinstance(target, str) else None
            if t is None or t.kind == "alias":
                raise FormatError(f"{what}: alias {target!r} names no earlier stored tensor")
            if t.dtype != dtype or t.shape != shape:
                raise FormatError(f"{what}: alias of {target!r} with another dtype or shape")
            if any(key in e for key in ("codec", "tiling", "blobs", "base")):
                raise FormatError(f"{what}: an alias has no codec, tiling, blobs or base")
            names[name] = Entry(name, dtype, shape, "alias", target=target)
            tensors.append(names[name])
            continue
        kind, base = "stored", None
        if "base" in e:
            base = e["base"]
            if (not isinstance(base, dict) or not isinstance(base.get("sha256"), str)
                    or not HEX64.fullmatch(base["sha256"])):
                raise FormatError(f"{what}: base needs a name and a 'sha256' of 64 lowercase hex digits")
            _string(base.get("name"), f"{what} base name", limits)
            kind = "difference" if "codec" in e else "unchanged"
            if kind == "unchanged" and ("tiling" in e or "blobs" in e):
                raise FormatError(f"{what}: an unchanged entry has no tiling or blobs")
            if kind == "difference" and dtype not in FLOATING:
                raise FormatError(f"{what}: a difference needs a floating dtype, not {dtype}")
        entry = Entry(name, dtype, shape, kind, base=base)
        if kind != "unchanged":
            if "codec" not in e:
                raise FormatError(f"{what}: no codec")
            entry.codec = _check_codec(e["codec"], what, dtype)
            if "blobs" not in e:
                raise FormatError(f"{what}: no blobs")
            entry.blobs, pos = _check_blobs(e["blobs"], what, pos, limits)
            lossy = entry.codec["id"] in LOSSY
            if lossy and (dtype not in FLOATING or len(shape) < 2 or size == 0):
                raise FormatError(f"{what}: a lossy codec needs a floating, non-empty matrix")
            if lossy != ("tiling" in e):
                raise FormatError(f"{what}: tiling must be present exactly for a lossy codec")
            if lossy:
                entry.tiling = e["tiling"]
                g = entry.geometry = _check_tiling(e["tiling"], what, shape, limits)
                if len(entry.blobs) != 1 + g["n_blobs"]:
                    raise FormatError(f"{what}: {len(entry.blobs)} blobs, expected {1 + g['n_blobs']}")
                plen = entry.blobs[0][1]
                if plen > g["P"] or plen < g["P"] and not flags & FLAG_PARAMS_ZSTD:
                    raise FormatError(f"{what}: parameter blob of {plen} bytes, expected {g['P']}")
            elif len(entry.blobs) != 1:
                raise FormatError(f"{what}: a lossless tensor has exactly one blob, not {len(entry.blobs)}")
        total += size
        if total > limits.total_bytes:
            raise LimitError(f"{what}: decoded total over the limit of {limits.total_bytes} bytes")
        names[name] = entry
        tensors.append(entry)

    # step 4, attachments (section 4.4)
    attachments, seen, folders = [], set(), set()
    atts = doc.get("attachments", [])
    if not isinstance(atts, list):
        raise FormatError("index: attachments must be an array")
    if len(tensors) + len(atts) > limits.entries:
        raise LimitError(f"index: {len(tensors) + len(atts)} entries, over the limit of {limits.entries}")
    for i, a in enumerate(atts):
        what = f"attachment {i}"
        if not isinstance(a, dict):
            raise FormatError(f"{what}: not an object")
        name = _string(a.get("name"), f"{what} name", limits)
        what = f"attachment {name!r}"
        _check_attachment_name(name, what)
        if name in seen:
            raise FormatError(f"{what}: duplicate name")
        parents = {name.rsplit("/", j)[0] for j in range(1, name.count("/") + 1)}
        if name in folders or parents & seen:
            raise FormatError(f"{what}: a name that is also another attachment's folder")
        seen.add(name)
        folders |= parents
        size = _int(a.get("size"), f"{what} size")
        if size > limits.tensor_bytes:
            raise LimitError(f"{what}: {size} bytes, over the per-entry limit of {limits.tensor_bytes}")
        codec = _check_codec(a.get("codec"), what, "uint8", lossless_only=True)
        blobs, pos = _check_blobs(a.get("blobs"), what, pos, limits)
        if len(blobs) != 1:
            raise FormatError(f"{what}: an attachment has exactly one blob, not {len(blobs)}")
        total += size
        if total > limits.total_bytes:
            raise LimitError(f"{what}: decoded total over the limit of {limits.total_bytes} bytes")
        attachments.append(Entry(name, "uint8", (size,), "attachment", codec=codec, blobs=blobs))

    # step 5: the file is entirely accounted for
    if file_size != 32 + n + pos:
        raise FormatError(f"file is {file_size} bytes, the index accounts for {32 + n + pos}")
    return Index(minor, flags, 32 + n, doc, tensors, attachments)


# ---------------------------------------------------------------- image headers (sections 5.2, 5.3)

def check_jpeg_header(blob: bytes, what: str, height: int, width: int) -> None:
    """Section 5.2: walk the marker segments from SOI to the first SOF0/1/2 and check it."""
    if blob[:2] != b"\xff\xd8":
        raise FormatError(f"{what}: JPEG blob does not start with SOI")
    pos = 2
    while True:
        if pos >= len(blob) or blob[pos] != 0xFF:
            raise FormatError(f"{what}: JPEG marker expected at byte {pos}")
        while pos < len(blob) and blob[pos] == 0xFF:   # fill bytes
            pos += 1
        if pos >= len(blob) or blob[pos] == 0x00:
            raise FormatError(f"{what}: JPEG ends before its frame header")
        code = blob[pos]
        pos += 1
        if code in (0xDA, 0xD9):
            raise FormatError(f"{what}: JPEG reaches {'SOS' if code == 0xDA else 'EOI'} before a frame header")
        if pos + 2 > len(blob):
            raise FormatError(f"{what}: JPEG ends before its frame header")
        length = int.from_bytes(blob[pos:pos + 2], "big")
        if length < 2:
            raise FormatError(f"{what}: JPEG segment length {length}")
        if code in (0xC0, 0xC1, 0xC2):
            if pos + 8 > len(blob) or length < 8:
                raise FormatError(f"{what}: JPEG frame header cut short")
            precision, h, w, comps = blob[pos + 2], *struct.unpack_from(">HH", blob, pos + 3), blob[pos + 7]
            if (precision, h, w, comps) != (8, height, width, 1):
                raise FormatError(f"{what}: JPEG frame is {h}x{w}, {comps} component(s) of {precision} bits; "
                                  f"expected {height}x{width}, 1 component of 8 bits")
            return
        pos += length


class _Bits:
    """LSB-first bit reader of JPEG XL headers (18181-1 section A)."""

    def __init__(self, data: bytes, what: str) -> None:
        self.value, self.n, self.pos, self.what = int.from_bytes(data, "little"), 8 * len(data), 0, what

    def u(self, n: int) -> int:
        if self.pos + n > self.n:
            raise FormatError(f"{self.what}: JPEG XL header cut short")
        x = self.value >> self.pos & ((1 << n) - 1)
        self.pos += n
        return x

    def u32(self, *dist: tuple[int, int]) -> int:
        offset, bits = dist[self.u(2)]
        return offset + (self.u(bits) if bits else 0)

    def size(self) -> tuple[int, int]:
        small = self.u(1)

        def side() -> int:
            return 8 * (1 + self.u(5)) if small else 1 + self.u((9, 13, 18, 30)[self.u(2)])
        height = side()
        ratio = self.u(3)
        if ratio == 0:
            return height, side()
        num, den = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))[ratio - 1]
        return height, height * num // den


def check_jxl_header(blob: bytes, what: str, height: int, width: int) -> None:
    """Section 5.3 steps 1 to 3: signature, SizeHeader, then the ImageMetadata fields that must hold."""
    if blob[:2] != b"\xff\x0a":
        raise FormatError(f"{what}: not a bare JPEG XL codestream (no FF 0A signature)")
    bits = _Bits(blob[2:64], what)
    h, w = bits.size()
    if (h, w) != (height, width):
        raise FormatError(f"{what}: JPEG XL image is {h}x{w}, expected {height}x{width}")
    if bits.u(1):
        raise FormatError(f"{what}: JPEG XL image metadata all_default (8-bit sRGB)")
    if bits.u(1):  # extra_fields
        if 1 + bits.u(3) != 1:
            raise FormatError(f"{what}: JPEG XL orientation is not 1")
        if bits.u(1):
            bits.size()
        if bits.u(1) or bits.u(1):
            raise FormatError(f"{what}: JPEG XL with a preview or an animation")
    if bits.u(1):
        raise FormatError(f"{what}: JPEG XL floating-point samples")
    depth = bits.u32((8, 0), (10, 0), (12, 0), (1, 6))
    if depth != 16:
        raise FormatError(f"{what}: JPEG XL samples of {depth} bits, expected 16")
    bits.u(1)  # modular_16bit_buffers
    if bits.u32((0, 0), (1, 0), (2, 4), (1, 12)) != 0:
        raise FormatError(f"{what}: JPEG XL with extra channels")
    bits.u(1)  # xyb_encoded
    if bits.u(1) or bits.u(1) or bits.u32((0, 0), (1, 0), (2, 4), (18, 6)) != 1:
        raise FormatError(f"{what}: JPEG XL colour encoding is not signalled grey")


# ---------------------------------------------------------------- decoding (sections 5, 6, 7)

def _decode_lossless(codec: dict, content_blob: bytes, what: str, dtype: str, count: int) -> np.ndarray:
    """Sections 5.1, 5.1.1, 5.1.2: one frame of the storage bytes, maybe as (rotated) byte planes."""
    k = _size(dtype)
    content = zstd_frame(content_blob, what, expected=count * k)
    rotate = codec["rotate"] if codec["id"] == "zstd_planes" else 1 if codec.get("exponent_first") is True else None
    if rotate is not None:   # planes of r from the most significant byte down, then rotate right
        r = _unplane(content, k, count)[:, ::-1].copy().view(f"<u{k}").ravel().astype(np.uint64)
        s, mask = np.uint64(rotate), np.uint64((1 << 8 * k) - 1)
        u = (r >> s | r << np.uint64(8 * k - rotate)) & mask if rotate else r   # uint64 shifts wrap mod 2^64
        data = u.astype(f"<u{k}").tobytes()
    elif codec.get("shuffle") is True and k > 1:
        data = _unplane(content, k, count).tobytes()
    else:
        data = content
    out = np.frombuffer(data, DTYPES[dtype]).copy() if dtype != "bool" else np.frombuffer(data, np.uint8)
    if dtype == "bool":
        if (out > 1).any():
            raise FormatError(f"{what}: bool byte {int(out.max())} is neither 0 nor 1")
        out = out.astype(bool)
    return out


def _tile_params(blob: bytes, what: str, g: dict) -> tuple[np.ndarray, np.ndarray]:
    """Section 7: offset and scale of each tile as binary32 (bfloat16 widened), plain or one zstd frame."""
    size = 2 if g["params"] == "bfloat16" else 4
    if len(blob) < g["P"]:
        blob = _unplane(zstd_frame(blob, f"{what} tile parameters", expected=g["P"]), size, 2 * g["T"]).tobytes()
    raw = np.frombuffer(blob, f"<u{size}").astype(np.uint32)
    values = (raw << 16 if size == 2 else raw).astype("<u4").view("<f4").reshape(g["T"], 2)
    if not np.isfinite(values).all():
        raise FormatError(f"{what}: non-finite tile parameter")
    return values[:, 0], values[:, 1]


def _decode_pixels(codec: dict, blob: bytes, what: str, h: int, w: int) -> np.ndarray:
    """One image blob to an h x w array of integer pixels (sections 5.2 to 5.4)."""
    cid = codec["id"]
    if cid == "quant":
        bits, n = codec["bits"], h * w
        if bits <= 4:
            k = 8 // bits
            raw = np.frombuffer(zstd_frame(blob, what, expected=-(-n // k)), np.uint8)
            if bits * k < 8 and (raw >> (bits * k)).any():
                raise FormatError(f"{what}: quant byte with unused high bits set")
            pix = np.stack([raw >> (bits * j) & ((1 << bits) - 1) for j in range(k)], axis=1).ravel()
            if pix[n:].any():
                raise FormatError(f"{what}: non-zero quant padding pixel")
            pix = pix[:n]
        elif bits <= 8:
            pix = np.frombuffer(zstd_frame(blob, what, expected=n), np.uint8)
        else:
            pix = _unplane(zstd_frame(blob, what, expected=2 * n), 2, n).view("<u2").ravel()
        if int(pix.max(initial=0)) >= 1 << bits:
            raise FormatError(f"{what}: quant pixel {int(pix.max())} above 2^{bits} - 1")
        return pix.reshape(h, w)
    if cid == "jpeg":
        check_jpeg_header(blob, what, h, w)
        decode, want = imagecodecs.jpeg8_decode, np.uint8
    else:
        check_jxl_header(blob, what, h, w)
        decode, want = imagecodecs.jpegxl_decode, np.uint16
    try:
        img = decode(bytes(blob))
    except Exception as e:  # the codec libraries raise their own error classes
        raise FormatError(f"{what}: {cid} decoding failed ({e})") from None
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.dtype != want or img.shape != (h, w):
        raise FormatError(f"{what}: decoded {img.dtype} image of shape {img.shape}, expected {h}x{w} {want.__name__}")
    return img


def to_dtype(v: np.ndarray, dtype: str) -> np.ndarray:
    """Section 7: a binary64 value rounded once to the tensor's dtype (bfloat16 by way of binary32)."""
    if dtype in ("float64", "float32", "float16"):
        with np.errstate(over="ignore"):
            return v.astype(DTYPES[dtype])
    with np.errstate(over="ignore"):
        b = v.astype("<f4").view("<u4").astype(np.uint64)
    return ((b + 0x7FFF + (b >> 16 & 1)) >> 16).astype("<u2")


def _decode_lossy(entry: Entry, blobs: list, what: str) -> np.ndarray:
    """Sections 6 and 7: tile parameters, mosaic images, pixel mapping, then tiles back into the matrix."""
    g = entry.geometry
    offset, scale = _tile_params(blobs[0], what, g)
    th, tw, cols, T = g["th"], g["tw"], g["columns"], g["T"]
    bands = []
    for b in range(g["n_blobs"]):
        rows = min(g["rpb"], g["MR"] - b * g["rpb"])
        bands.append(_decode_pixels(entry.codec, blobs[1 + b], f"{what} image blob {b}", rows * th, cols * tw))
    mosaic = np.concatenate(bands).reshape(g["MR"], th, cols, tw)
    tiles = mosaic.transpose(0, 2, 1, 3).reshape(g["MR"] * cols, th, tw)[:T]
    values = offset.astype(np.float64)[:, None, None] + scale.astype(np.float64)[:, None, None] * tiles
    if entry.tiling["mode"] == "rows":
        matrix = values.reshape(g["R"], g["C"])
    else:
        gr, gc = -(-g["R"] // th), -(-g["C"] // tw)
        matrix = values.reshape(gr, gc, th, tw).transpose(0, 2, 1, 3).reshape(gr * th, gc * tw)[:g["R"], :g["C"]]
    return to_dtype(matrix, entry.dtype)


def element_tiles(tiling: dict, shape: tuple) -> np.ndarray:
    """The tile index of every element (section 6.2), shaped as the tensor: section 10's tolerance needs it."""
    R, C = shape[0], int(np.prod(shape[1:]))
    th, tw = tiling["tile"]
    if tiling["mode"] == "rows":
        return np.repeat(np.arange(R), C).reshape(shape)
    r, c = np.arange(R)[:, None] // th, np.arange(C)[None, :] // tw
    return (r * -(-C // tw) + c).reshape(shape)


# ---------------------------------------------------------------- updates (section 12)

def tensor_hash(array: np.ndarray, dtype: str) -> bytes:
    """Section 12.2: SHA-256 of the storage bytes (little-endian, row-major)."""
    return hashlib.sha256(np.ascontiguousarray(array, DTYPES[dtype]).tobytes()).digest()


def base_digest(base: dict[str, tuple[str, np.ndarray]]) -> str:
    """Section 12.2: the digest of a whole base, tensors sorted by the bytes of their UTF-8 names."""
    h = hashlib.sha256()
    for name in sorted(base, key=lambda s: s.encode("utf-8")):
        dtype, a = base[name]
        h.update(struct.pack("<I", len(name.encode())) + name.encode() + bytes([len(dtype)]) + dtype.encode())
        h.update(struct.pack("<I", a.ndim) + b"".join(struct.pack("<Q", d) for d in a.shape) + tensor_hash(a, dtype))
    return h.hexdigest()


def check_base(index: Index, base: dict[str, tuple[str, np.ndarray]] | None) -> None:
    """Section 12.4: every entry's base tensor, then the tensor count, then the digest [Base]."""
    if base is None:
        raise BaseError("an update needs its base: none was given")
    for e in index.tensors:
        if e.base is None:
            continue
        name = e.base["name"]
        if name not in base:
            raise BaseError(f"tensor {e.name!r}: the base has no tensor {name!r}")
        dtype, a = base[name]
        if dtype != e.dtype or a.shape != e.shape:
            raise BaseError(f"tensor {e.name!r}: base tensor {name!r} is {dtype} {list(a.shape)}, "
                            f"expected {e.dtype} {list(e.shape)}")
        if tensor_hash(a, dtype).hex() != e.base["sha256"]:
            raise BaseError(f"tensor {e.name!r}: base tensor {name!r} is not the one the update was made against")
    if len(base) != index.json["base"]["tensors"]:
        raise BaseError(f"the base has {len(base)} tensors, the update was made against "
                        f"{index.json['base']['tensors']}")
    if base_digest(base) != index.json["base"]["sha256"]:
        raise BaseError("the base's digest differs from the one the update was made against")


def _widen(a: np.ndarray, dtype: str) -> np.ndarray:
    """Storage form to binary64 (exact for every floating dtype)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


# ---------------------------------------------------------------- the whole file (section 9)

def _typed_base(base: Any, limits: Limits) -> dict[str, tuple[str, np.ndarray]] | None:
    """A base given as a .jwt path, or as a dict name -> (dtype, storage-form array)."""
    if base is None or isinstance(base, dict):
        return base
    tensors, _, index = read_all(base, limits=limits, attachments=False)
    return {e.name: (e.dtype, tensors[e.name]) for e in index.tensors}


def read_all(path: str, base: Any = None, limits: Limits | None = None, attachments: bool = True) \
        -> tuple[dict[str, np.ndarray], dict[str, bytes], Index]:
    """Validate and decode every tensor and (unless `attachments` is false) every attachment: (tensors,
    attachments, index). An entry not decoded is not CRC-checked (section 4.3)."""
    limits = limits or Limits()
    with open(path, "rb") as f:
        f.seek(0, 2)
        file_size = f.tell()
        f.seek(0)
        index = read_index(f, file_size, limits)
        if index.flags & FLAG_UPDATE:                       # step 6
            base = _typed_base(base, limits)
            check_base(index, base)

        def blobs_of(e: Entry, what: str) -> list[bytes]:    # step 7: every CRC first
            out = []
            for i, (off, length, crc) in enumerate(e.blobs):
                f.seek(index.data_start + off)
                data = f.read(length)
                if zlib.crc32(data) != crc:
                    raise ChecksumError(f"{what}: blob {i} CRC-32 does not match")
                out.append(data)
            return out

        tensors: dict[str, np.ndarray] = {}
        for e in index.tensors:
            what = f"tensor {e.name!r}"
            if e.kind == "alias":
                tensors[e.name] = tensors[e.target]
                continue
            if e.kind == "unchanged":
                tensors[e.name] = np.array(base[e.base["name"]][1], copy=True)
                continue
            blobs = blobs_of(e, what)
            count = int(np.prod(e.shape, dtype=object))
            if e.codec["id"] in LOSSY:
                value = _decode_lossy(e, blobs, what)
            else:
                value = _decode_lossless(e.codec, blobs[0], what, e.dtype, count)
            value = value.reshape(e.shape)
            if e.kind == "difference":
                b = _widen(base[e.base["name"]][1], e.dtype)
                with np.errstate(invalid="ignore", over="ignore"):
                    value = to_dtype(b + _widen(value, e.dtype), e.dtype).reshape(e.shape)
            tensors[e.name] = value
        files = {}
        for a in index.attachments if attachments else ():
            what = f"attachment {a.name!r}"
            files[a.name] = _decode_lossless(a.codec, blobs_of(a, what)[0], what, "uint8", a.shape[0]).tobytes()
    return tensors, files, index


def read(path: str, base: Any = None, limits: Limits | None = None) -> dict[str, np.ndarray]:
    """Decode every tensor of a .jwt file (an update against `base`: a .jwt path or name -> (dtype, array))."""
    return read_all(path, base, limits, attachments=False)[0]


if __name__ == "__main__":  # python spec/reader/jwtread.py FILE [BASE]: validate, decode, list the tensors
    import sys

    for name, array in read(sys.argv[1], base=sys.argv[2] if len(sys.argv) > 2 else None).items():
        print(f"{name}\t{array.dtype}\t{list(array.shape)}\tsha256 {hashlib.sha256(array.tobytes()).hexdigest()[:16]}")
