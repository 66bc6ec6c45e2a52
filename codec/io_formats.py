"""Model files in and out: ``.pt``/``.pth``, ``.safetensors`` and Hugging Face model folders.

Inputs (:func:`open_source`, :func:`encode_model`):

* ``.pt``/``.pth``/``.bin``: ``torch.load(weights_only=True)``, memory-mapped
  when the file is in torch's zip format; a checkpoint dict's tensors under
  dotted names, its nesting and plain values in ``jwt.tree``
  (:func:`codec.api.flatten_checkpoint`);
* ``.safetensors``: the header is read and checked, then each tensor is read
  with plain reads only when :func:`codec.save` asks for it (nothing is
  memory-mapped), so the encoder never holds, nor maps, the whole model;
* a model folder: the weights (``model.safetensors``, or the shards listed by
  ``model.safetensors.index.json``; else ``pytorch_model.bin`` or its shards)
  become tensors, and every other file (config, tokenizer, pooling config,
  README, sub-module folders) travels losslessly as an *attachment*
  (spec/format.md section 4.4). Copies of the same weights in other formats
  (``pytorch_model*.bin`` next to safetensors, ``tf_model*.h5``,
  ``flax_model*.msgpack``, ``rust_model.ot``, ``*.onnx``, ``onnx/``,
  ``openvino/``) and ``.git``/``.cache`` folders are left out, with a note,
  and so is a symbolic link leading out of the folder (spec section 4.4).

Outputs (:func:`decode_model`), chosen by the output path:

* ``x.pt``/``x.pth``/``x.bin``: ``torch.save`` of the state_dict (of the
  checkpoint object, rebuilt from ``jwt.tree``); tensors that shared
  storage share it again;
* ``x.safetensors``: written tensor by tensor (one tensor in memory at a
  time). safetensors cannot hold shared tensors, so an alias is written as a
  copy of its target (``aliases="clone"``, the default: every name loads with
  ``strict=True``) or left out (``aliases="drop"``, for consumers such as
  ``transformers`` that re-tie weights themselves);
* a folder (a path ending in ``/``, an existing empty folder, or a path
  without a suffix): ``model.safetensors`` plus every attachment restored
  under its relative path, so ``transformers`` / ``sentence_transformers``
  load it as they loaded the original; with ``max_shard_size``, shards
  ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``
  instead (:func:`write_shards`), written tensor by tensor.

Every output is written to a temporary file (or folder) beside the target
and renamed onto it; a failure leaves nothing behind. float16 and bfloat16
keep their dtype.

torch is imported only for what needs it: a ``.pt``/``.bin`` input or
output, a tensor asked for as a torch tensor (``LazyTensors[name]``), and
:func:`load_into`. Reading a safetensors file or folder for
:func:`codec.encode.save` (``LazyTensors`` is :class:`codec.encode.Arrays`)
and decoding to a ``.safetensors`` file or a folder do not.

Reserved metadata keys written here (spec/format.md section 4):
``jwt.source_format`` (``pt``, ``safetensors`` or ``folder``),
``jwt.safetensors_metadata`` (the input's safetensors ``__metadata__`` as a
JSON object, restored in safetensors outputs) and, by :mod:`codec.api`,
``jwt.tree`` (a checkpoint's structure, section 4.5).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .dtypes import get_dtype
from .encode import Arrays, as_base
from .errors import EncodeError, FormatError, UsageError, first_line
from .format import MAGIC, attachment_name_error
from .limits import DEFAULT_LIMITS, Limits
from .rawfile import read_array
from .reader import Reader
from .sources import is_url
from .update import check_base
from .writer import atomic_output, current_umask, output_error

if TYPE_CHECKING:
    import torch

__all__ = [
    "SOURCE_FORMAT_KEY",
    "SAFETENSORS_METADATA_KEY",
    "WEIGHTS_FILE",
    "LazyTensors",
    "Source",
    "detect_format",
    "open_source",
    "read_tensors",
    "encode_model",
    "encode_output",
    "output_format",
    "default_output",
    "decode_model",
    "write_safetensors",
    "write_shards",
    "shard_plan",
    "parse_size",
    "SHARD_INDEX",
    "load_into",
]

SOURCE_FORMAT_KEY = "jwt.source_format"
SAFETENSORS_METADATA_KEY = "jwt.safetensors_metadata"
#: Reserved metadata key holding a checkpoint's structure (spec/format.md section 4.5), written and read by
#: :func:`codec.api.flatten_checkpoint` / :func:`codec.api.unflatten_checkpoint`; long trees continue in
#: ``jwt.tree.1``, ``jwt.tree.2``, ...
TREE_KEY = "jwt.tree"
#: The weights file of a decoded folder.
WEIGHTS_FILE = "model.safetensors"

#: format dtype name <-> safetensors dtype name.
ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
_FROM_ST = {v: k for k, v in ST_DTYPES.items()}
#: safetensors' data order: by dtype in this order (its enum, descending: every tensor stays aligned), then name.
_ST_ORDER = {name: rank for rank, name in enumerate(
    ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}

#: Folder entries that are other copies of the weights (top level only).
_OTHER_WEIGHTS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "tf_model*.h5", "tf_model*.h5.index.json",
                  "flax_model*.msgpack", "flax_model*.msgpack.index.json", "model*.safetensors",
                  "model*.safetensors.index.json", "rust_model.ot", "*.onnx")
_SKIPPED_DIRS = (".git", ".cache", ".huggingface", "onnx", "openvino")


# -- inputs -------------------------------------------------------------------


class LazyTensors(Arrays):
    """A read-only ``name -> torch tensor`` mapping that loads a tensor each time it is accessed.

    Shapes and dtypes are known without loading (:meth:`shape`,
    :meth:`dtype_name`), so sizes can be reported before anything is read.
    It is :class:`codec.encode.Arrays` too: :meth:`array` reads a tensor in
    storage form, which is what :func:`codec.encode.save` reads, so encoding
    it needs torch only when ``load`` is what reads the tensors.

    Give ``read`` (``name -> storage array``: torch is imported only when a
    tensor is asked for as a torch tensor) or ``load`` (``name -> torch
    tensor``).
    """

    def __init__(self, info: dict[str, tuple[tuple[int, ...], str]],
                 load: Callable[[str], torch.Tensor] | None = None,
                 locate: Callable[[str], tuple[str, int]] | None = None, *,
                 read: Callable[[str], np.ndarray] | None = None):
        if (load is None) == (read is None):
            raise TypeError("LazyTensors: give exactly one of load (tensors) and read (storage arrays)")
        super().__init__(info, read or self._from_load, locate)
        self._load = load or self._from_read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        return self._load(name)

    def _from_load(self, name: str) -> np.ndarray:
        from .api import to_numpy

        return to_numpy(self._load(name))[0]

    def _from_read(self, name: str) -> torch.Tensor:
        from .api import to_torch

        return to_torch(self._read(name), self.dtype_name(name))


class Source:
    """An opened model input: lazy ``tensors``, ``attachments`` and reserved metadata.

    Use as a context manager (closes memory maps). ``notes`` says what was
    left out of a folder and why.
    """

    def __init__(self, path: Path, format: str, tensors: Mapping[str, torch.Tensor],  # noqa: A002
                 attachments: dict[str, Path] | None = None, metadata: dict[str, str] | None = None,
                 notes: list[str] | None = None, closers: list[Callable[[], None]] | None = None):
        self.path = path
        self.format = format
        self.tensors = tensors
        #: relative POSIX path -> file to read.
        self.attachments = attachments or {}
        #: reserved ``jwt.*`` keys for the index.
        self.metadata = metadata or {}
        self.notes = notes or []
        self._closers = closers or []

    def _facts(self, name: str) -> tuple[int, int]:
        """(elements, bytes per element) of one tensor, without loading a lazy one."""
        if isinstance(self.tensors, LazyTensors):
            return math.prod(self.tensors.shape(name)), get_dtype(self.tensors.dtype_name(name)).itemsize
        t = self.tensors[name]
        return t.numel(), t.element_size()

    @property
    def numel(self) -> int:
        """Number of weights (every tensor, aliases included)."""
        return sum(self._facts(n)[0] for n in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors as stored in memory."""
        return sum(n * size for n, size in map(self._facts, self.tensors))

    @property
    def attachment_bytes(self) -> int:
        """Bytes of the attachment files."""
        return sum(p.stat().st_size for p in self.attachments.values())

    def close(self) -> None:
        """Release memory maps and file handles."""
        for close in self._closers:
            close()
        self._closers = []

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"folder"``, ``"jwt"``, ``"safetensors"`` or ``"pt"``, from the content, else the suffix."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(MAGIC):
        return "jwt"
    if len(head) > 9 and head[8:9] == b"{" and 8 + struct.unpack_from("<Q", head)[0] <= p.stat().st_size:
        return "safetensors"  # u64 header length, then a JSON object
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pt"  # torch.save's zip format, or a legacy pickle
    by_suffix = {".jwt": "jwt", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt"}
    if p.suffix.lower() in by_suffix:
        return by_suffix[p.suffix.lower()]
    raise EncodeError(f"{p}: not a .pt, .safetensors or .jwt file, nor a model folder")



def _open_safetensors(files: list[Path], closers: list[Callable[[], None]]) -> tuple[LazyTensors, dict[str, str]]:
    """A lazy mapping over the tensors of one or more safetensors files, and the first file's metadata."""
    info: dict[str, tuple[tuple[int, ...], str]] = {}
    where: dict[str, tuple[Path, int]] = {}
    metadata: dict[str, str] = {}
    for k, file in enumerate(files):
        file_metadata, entries = _read_safetensors_header(file)
        if not k:
            metadata = file_metadata
        for name, shape, dtype_name, start in entries:
            if name in info:
                raise EncodeError(f"{file}: tensor {name!r} is also in {where[name][0]}")
            info[name] = (shape, dtype_name)
            where[name] = (file, start)

    def read(name: str) -> np.ndarray:
        """Read one tensor with plain reads: memory (and address space) holds this tensor only."""
        file, start = where[name]
        shape, dtype_name = info[name]
        return read_array(str(file), start, shape, dtype_name, name)

    return LazyTensors(info, locate=lambda name: (str(where[name][0]), where[name][1]), read=read), metadata


#: safetensors' own limit on the header's size.
_ST_MAX_HEADER = 100_000_000


def _read_safetensors_header(file: Path) -> tuple[dict[str, str], list[tuple[str, tuple[int, ...], str, int]]]:
    """The metadata and ``(name, shape, dtype name, file offset)`` of each tensor of a safetensors file, in file order.

    Reads and checks the header as the safetensors library does (the data offsets tile the data exactly, each
    tensor's byte count matches its shape and dtype) without mapping the file: ``safe_open`` maps all of it,
    which a 5 GB shard cannot do under ``ulimit -v`` however little of it is needed at once.
    """
    def bad(reason: str) -> EncodeError:
        return EncodeError(f"{file}: not a safetensors file ({reason})")

    with open(file, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (size,) = struct.unpack("<Q", head)
        if size > min(_ST_MAX_HEADER, total - 8):
            raise bad(f"header length {size} exceeds the file or {_ST_MAX_HEADER} bytes")
        try:
            header = json.loads(f.read(size).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"header is not JSON: {first_line(exc)}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not an object of strings")
    entries, spans = [], []
    for name, v in header.items():
        ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"])
              and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in v["data_offsets"]))
        if not ok:
            raise bad(f"tensor {name!r}: needs a dtype, a shape and two data_offsets")
        begin, end = v["data_offsets"]
        spans.append((begin, end, name))
        if v["dtype"] not in _FROM_ST:
            raise EncodeError(f"{file}: tensor {name!r}: unsupported safetensors dtype {v['dtype']}")
        dtype_name, shape = _FROM_ST[v["dtype"]], tuple(v["shape"])
        if end - begin != math.prod(shape) * get_dtype(dtype_name).storage.itemsize:
            raise bad(f"tensor {name!r}: data_offsets {begin}..{end} do not hold a {v['dtype']} {list(shape)}")
        entries.append((begin, (name, shape, dtype_name, 8 + size + begin)))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise bad(f"tensor {name!r}: data starts at {begin}, expected {pos} (a gap or an overlap)")
        pos = end
    if pos != total - 8 - size:
        raise bad(f"the tensors hold {pos} bytes of data, the file {total - 8 - size}")
    return metadata, [entry for _, entry in sorted(entries, key=lambda e: e[0])]


def _read_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """A .pt state_dict or checkpoint dict, memory-mapped when the file is in torch's zip format:
    ``(tensors, tree metadata, notes)`` (see :func:`codec.api.read_checkpoint`)."""
    from .api import dropped_note, read_checkpoint

    tensors, tree, dropped = read_checkpoint(path, mmap=zipfile.is_zipfile(path))
    return tensors, tree, [dropped_note(str(path), dropped)] if dropped else []


def _shards(index_file: Path) -> list[Path]:
    """The shard files an ``*.index.json`` names, in order of first mention."""
    try:
        doc = json.loads(index_file.read_text("utf-8"))
        weight_map = doc["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EncodeError(f"{index_file}: not a shard index ({first_line(exc)})") from None
    for name in files:
        if not isinstance(name, str) or attachment_name_error(name) or "/" in name:
            raise EncodeError(f"{index_file}: shard {name!r} is not a file name in the folder")
    return [index_file.parent / name for name in files]


def _leaves_folder(root: Path, path: Path) -> Path | None:
    """Where ``path`` leads if it is a symbolic link (or under one) resolving outside ``root``, else None.

    Allowed: targets inside ``root``, and for a Hugging Face cache snapshot
    (``.../snapshots/REVISION/``, whose files are links) the cache's ``blobs`` folder.
    """
    top, target = root.resolve(), path.resolve()
    allowed = [top]
    if top.parent.name == "snapshots":
        allowed.append(top.parent.parent / "blobs")
    return None if any(a in target.parents for a in allowed) else target


def _folder_weights(root: Path) -> tuple[str, list[Path]]:
    """(kind, files) of the model weights at the top of a folder (links out of it are refused)."""
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("pt", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        for found in (root / single, root / index):
            if found.is_file():
                files = [found] if found.name == single else [found, *_shards(found)]
                for file in files:
                    target = _leaves_folder(root, file)
                    if target is not None:
                        raise EncodeError(f"{file}: a symbolic link out of the model folder (to {target}); "
                                          "not followed (copy the file into the folder)")
                return kind, files
    raise EncodeError(f"{root}: no model weights in the folder (model.safetensors, model.safetensors.index.json, "
                      "pytorch_model.bin or pytorch_model.bin.index.json)")


def _folder_attachments(root: Path, used: set[Path]) -> tuple[dict[str, Path], list[str]]:
    """Every other file of the folder by relative POSIX path, and notes on what was left out."""
    attachments: dict[str, Path] = {}
    notes: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel = here.relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirnames.sort()
        for d in list(dirnames):
            if (here / d).is_symlink():
                notes.append(f"{prefix}{d}/: a symbolic link to a folder, not followed")
                dirnames.remove(d)
            elif not prefix and d in _SKIPPED_DIRS:
                notes.append(f"{d}/: left out (not part of the model, or another export of its weights)")
                dirnames.remove(d)
        for fn in sorted(filenames):
            path, name = here / fn, prefix + fn
            if path in used:
                continue
            if not prefix and any(fnmatch.fnmatch(fn, pat) for pat in _OTHER_WEIGHTS):
                notes.append(f"{name}: left out (another copy of the weights)")
                continue
            if not path.is_file():
                notes.append(f"{name}: left out (not a regular file)")
                continue
            target = _leaves_folder(root, path) if path.is_symlink() else None
            if target is not None:
                notes.append(f"{name}: left out (a symbolic link out of the folder, to {target}; not followed)")
                continue
            problem = attachment_name_error(name)
            if problem:
                raise EncodeError(f"{path}: cannot be carried as an attachment: its name {problem}")
            attachments[name] = path
    return attachments, notes


def _jwt_source(path: Path | str, limits: Limits, base: Any) -> Source:
    """A .jwt file or URL as a Source: its tensors decoded one at a time (an update against ``base``)."""
    reader = Reader(path, limits=limits, base=None if base is None else as_base(base, limits))
    info = {e.name: (e.shape, e.dtype.name) for e in reader.index.entries}
    return Source(path, "jwt", LazyTensors(info, read=reader.read), closers=[reader.close])


def open_source(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS, base: Any = None) -> Source:
    """Open a model input (.pt/.pth, .safetensors, a model folder, a .jwt, or a .jwt's http(s):// URL) for
    lazy reading. ``base``: what a .jwt update is decoded against (:func:`codec.api.open`)."""
    if is_url(path):  # only .jwt files are read over HTTP; a URL is no Path ("http:/host")
        return _jwt_source(path, limits, base)  # type: ignore[arg-type]
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "no such file or folder", str(p))
    fmt = detect_format(p)
    closers: list[Callable[[], None]] = []
    if fmt == "pt":
        tensors, tree, notes = _read_pt(p)
        return Source(p, fmt, tensors, metadata={SOURCE_FORMAT_KEY: "pt", **tree}, notes=notes)
    if fmt == "safetensors":
        tensors, st_meta = _open_safetensors([p], closers)
        return Source(p, fmt, tensors, metadata=_source_meta(fmt, st_meta), closers=closers)
    if fmt == "jwt":
        return _jwt_source(p, limits, base)
    kind, files = _folder_weights(p)
    st_meta: dict[str, str] = {}
    notes: list[str] = []
    if kind == "safetensors":
        tensors, st_meta = _open_safetensors([f for f in files if f.suffix == ".safetensors"], closers)
    else:
        tensors = {}
        for file in files:
            if file.suffix != ".json":
                shard, tree, shard_notes = _read_pt(file)
                notes += shard_notes
                if tree:
                    notes.append(f"{file.name}: a checkpoint dict, not a state_dict: its tensors are kept under "
                                 "dotted names, its other entries and nesting are not (encode the file alone)")
                for name, t in shard.items():
                    if name in tensors:
                        raise EncodeError(f"{file}: tensor {name!r} is in two shards")
                    tensors[name] = t
    attachments, left_out = _folder_attachments(p, set(files))
    notes += left_out
    return Source(p, "folder", tensors, attachments, _source_meta("folder", st_meta), notes, closers)


def _source_meta(fmt: str, st_meta: dict[str, str]) -> dict[str, str]:
    meta = {SOURCE_FORMAT_KEY: fmt}
    if st_meta:
        meta[SAFETENSORS_METADATA_KEY] = json.dumps(st_meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return meta


def read_tensors(path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    """Every tensor of a .jwt, .pt, .safetensors file or model folder, as a state_dict."""
    if is_url(path) or detect_format(path) == "jwt":
        from .api import load

        return load(path, limits=limits)
    with open_source(path) as src:
        return dict(src.tensors.items())


def encode_output(source: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Where encoding ``source`` writes: ``output``, or inside it when it is a folder.

    The .jwt is named after the input (``mid.pt`` -> ``mid.jwt``, a folder
    ``bert/`` -> ``bert.jwt``). Without ``output`` it goes beside the input;
    an ``output`` that is an existing folder or ends in ``/`` gets it inside
    (the folder is created if missing).
    """
    src = Path(source)
    name = (src.resolve().name + ".jwt") if src.is_dir() else src.with_suffix(".jwt").name
    if output is None:
        return src.parent / name
    text = os.fspath(output)
    if text.endswith(("/", os.sep)) or os.path.isdir(text):
        os.makedirs(text, exist_ok=True)
        return Path(text) / name
    return Path(text)


def encode_model(source: str | os.PathLike[str], dest: str | os.PathLike[str] | BinaryIO, *,
                 metadata: Mapping[str, str] | None = None, **options: Any) -> list[str]:
    """Encode a .pt/.safetensors file or a model folder to a .jwt (attachments included).

    ``options`` are :func:`codec.save`'s. ``dest`` may be a folder (see
    :func:`encode_output`). Stores ``source`` (the input's name, unless
    ``metadata`` gives one) and the reserved ``jwt.*`` keys in the metadata.
    Returns notes (what was left out of a folder, tensors kept lossless).
    """
    from .encode import save

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"encode_model: source must be the path of a .pt / .safetensors file or a model folder, "
                        f"not {type(source).__name__} (codec.save takes a state_dict or a module)")
    if isinstance(dest, (str, os.PathLike)):
        dest = encode_output(source, dest)
    with open_source(source) as src:
        if src.format == "jwt":
            raise EncodeError(f"{source}: is already a .jwt file")
        meta = {**(metadata or {}), "source": (metadata or {}).get("source", Path(source).name), **src.metadata}
        notes = list(src.notes)
        notes += save(src.tensors, dest, metadata=meta, attachments=src.attachments, **options)
    return notes


# -- outputs ------------------------------------------------------------------


def output_format(path: str | os.PathLike[str]) -> str:
    """``"pt"``, ``"safetensors"`` or ``"folder"``, from the output path."""
    text, p = os.fspath(path), Path(path)
    if text.endswith(("/", os.sep)) or p.is_dir() or not p.suffix:
        return "folder"
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return "pt"
    if suffix == ".safetensors":
        return "safetensors"
    raise UsageError(f"{p}: unknown output type {suffix!r} (use .pt, .pth, .safetensors, or a folder ending in /)")


def default_output(jwt_path: str | os.PathLike[str], metadata: Mapping[str, str], *, fresh: bool = True) -> Path:
    """Where ``jwt decode`` writes without ``-o``: the kind of the original input, beside the .jwt.

    ``mid.jwt`` -> ``mid.pt`` (``mid.safetensors``, or the folder ``mid``);
    with ``fresh``, when that exists (typically the file the .jwt was made
    from), the first of ``mid.decoded.pt``, ``mid.decoded-2.pt``, ... that
    does not, so a default output never replaces a file or folder.
    """
    p = Path(jwt_path)
    kind = metadata.get(SOURCE_FORMAT_KEY)
    if kind == "folder":
        stem, suffix = (p.with_suffix("") if p.suffix else p.with_name(p.name + ".out")), ""
    else:
        stem, suffix = p.with_suffix(""), ".safetensors" if kind == "safetensors" else ".pt"
    candidate, n = stem.with_name(stem.name + suffix), 1
    while fresh and os.path.lexists(candidate):
        candidate = stem.with_name(f"{stem.name}.decoded{'' if n == 1 else f'-{n}'}{suffix}")
        n += 1
    return candidate


def _safetensors_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The ``__metadata__`` to write: the input's (if stored), with ``format: pt``."""
    out: dict[str, str] = {}
    stored = metadata.get(SAFETENSORS_METADATA_KEY)
    if stored:
        try:
            doc = json.loads(stored)
            if isinstance(doc, dict):
                out = {str(k): str(v) for k, v in doc.items()}
        except ValueError:
            pass
    out.setdefault("format", "pt")
    return out


def _stored_entries(reader: Reader, aliases: str) -> list:
    """The index entries a safetensors output holds (aliases as copies or left out), checked."""
    if aliases not in ("clone", "drop"):
        raise UsageError(f"aliases={aliases!r}: use 'clone' or 'drop'")
    entries = [e for e in reader.index.entries if aliases == "clone" or e.alias is None]
    if any(e.name == "__metadata__" for e in entries):  # the header's own key: the file would not load
        raise UsageError("a tensor named '__metadata__' cannot be stored in a safetensors file; decode to .pt")
    return entries


def _safetensors_header(entries: list, metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int], int]:
    """``(header bytes with the length prefix, data offset by name, data bytes)`` of a safetensors file of ``entries``.

    Tensors are laid out as ``safetensors.torch.save_file`` lays them out
    (largest elements first, so each is aligned; then by name).
    """
    header: dict[str, Any] = {"__metadata__": _safetensors_metadata(metadata)}
    offsets: dict[str, int] = {}
    position = 0
    for e in sorted(entries, key=lambda e: (_ST_ORDER[ST_DTYPES[e.dtype.name]], e.name)):
        header[e.name] = {"dtype": ST_DTYPES[e.dtype.name], "shape": list(e.shape),
                          "data_offsets": [position, position + e.nbytes]}
        offsets[e.name] = position
        position += e.nbytes
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head, offsets, position


def write_safetensors(reader: Reader, out: BinaryIO, *, aliases: str = "clone",
                      progress: Callable[[str, int], None] | None = None) -> list[str]:
    """Write the tensors of ``reader`` as a safetensors file to the seekable ``out``, one at a time.

    The header comes from the index alone; tensors are laid out as
    ``safetensors.torch.save_file`` lays them out (largest elements first,
    so each is aligned; then by name), and written as they are decoded, in
    file order (streams work). Aliases are written as copies (``"clone"``) or left out
    (``"drop"``). Returns notes.
    """
    entries = _stored_entries(reader, aliases)
    head, offsets, position = _safetensors_header(entries, reader.metadata)
    out.write(head)
    base = len(head)
    for entry, array in _arrays(reader, aliases):
        out.seek(base + offsets[entry.name])
        out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        if progress:
            progress(entry.name, entry.numel)
    _check_size(out, base + position)
    return _dropped_note(reader, aliases)


def _arrays(reader: Reader, aliases: str) -> Iterator[tuple[Any, np.ndarray]]:
    """``(entry, array)`` in file order; an alias gives its target's array (``"clone"``) or nothing (``"drop"``)."""
    kept: dict[str, np.ndarray] = {}
    for entry, array in reader.iter_arrays():
        if entry.alias is not None:
            if aliases == "drop":
                continue
            array = kept[entry.alias]
        elif entry.name in reader.aliased:
            kept[entry.name] = array
        assert array is not None
        yield entry, array


def _check_size(out: BinaryIO, expected: int) -> None:
    out.seek(0, os.SEEK_END)
    if out.tell() != expected:
        raise FormatError(f"safetensors output is {out.tell()} bytes, expected {expected}")


def _dropped_note(reader: Reader, aliases: str) -> list[str]:
    dropped = [e.name for e in reader.index.entries if e.alias is not None and aliases == "drop"]
    return [f"left out {len(dropped)} aliases (shared tensors): {', '.join(dropped[:10])}"] if dropped else []


#: The shard index a sharded folder output holds (the name transformers looks for).
SHARD_INDEX = "model.safetensors.index.json"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes of a size given as an integer or a string such as ``"2GB"``, ``"500MB"`` or ``"1.5GiB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        number, unit = (float(match[1]), match[2].upper()) if match else (-1.0, "?")
    else:
        raise TypeError(f"a size must be an int or a string such as '2GB', found {type(value).__name__}")
    if unit not in _SIZE_UNITS or not number > 0:
        raise ValueError(f"size {value!r} is not a positive size such as 2GB, 500MB or 1.5GiB")
    return int(number * _SIZE_UNITS[unit])


def shard_plan(entries: list, max_shard_size: int) -> list[list]:
    """Entries cut, in file order, into shards of at most ``max_shard_size`` data bytes (a larger tensor: alone)."""
    shards: list[list] = []
    size = 0
    for e in entries:
        if not shards or (size + e.nbytes > max_shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_shards(reader: Reader, folder: Path, max_shard_size: int, *, aliases: str = "clone",
                 progress: Callable[[str, int], None] | None = None) -> list[str]:
    """Write the tensors of ``reader`` into ``folder`` as safetensors shards of at most ``max_shard_size`` bytes.

    The layout ``transformers`` reads: ``model-0000k-of-0000n.safetensors``
    and ``model.safetensors.index.json`` (``weight_map`` and
    ``metadata.total_size``); a model that fits in one shard is written as
    ``model.safetensors`` alone. Shards are filled in file order and written
    tensor by tensor as they are decoded, one shard file open at a time, so
    memory holds one tensor (plus the targets of aliases) whatever the size.
    """
    entries = _stored_entries(reader, aliases)
    shards = shard_plan(entries, max_shard_size)
    if len(shards) <= 1:
        with open(folder / WEIGHTS_FILE, "wb") as out:
            return write_safetensors(reader, out, aliases=aliases, progress=progress)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    where = {e.name: k for k, shard in enumerate(shards) for e in shard}
    left = [len(shard) for shard in shards]
    layout: dict[int, tuple[BinaryIO, int, dict[str, int], int]] = {}
    try:
        for entry, array in _arrays(reader, aliases):
            k = where[entry.name]
            if k not in layout:
                head, offsets, position = _safetensors_header(shards[k], reader.metadata)
                out = open(folder / names[k], "wb")  # noqa: SIM115 (closed when its last tensor is written)
                out.write(head)
                layout[k] = (out, len(head), offsets, len(head) + position)
            out, base, offsets, expected = layout[k]
            out.seek(base + offsets[entry.name])
            out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            left[k] -= 1
            if not left[k]:
                _check_size(out, expected)
                out.flush()
                os.fsync(out.fileno())
                out.close()
            if progress:
                progress(entry.name, entry.numel)
    finally:
        for out, *_ in layout.values():
            out.close()
    if any(left):
        raise FormatError(f"{sum(left)} tensors of the index were not decoded")
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": {e.name: names[where[e.name]] for e in sorted(entries, key=lambda e: e.name)}}
    (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return _dropped_note(reader, aliases)


def _attachment_path(root: Path, name: str) -> Path:
    """Where attachment ``name`` goes under ``root``; FormatError for anything unsafe."""
    problem = attachment_name_error(name)
    if problem:
        raise FormatError(f"attachment {name!r}: name {problem}")
    path = root.joinpath(*name.split("/"))
    resolved, top = path.resolve(), root.resolve()
    if resolved == top or top not in resolved.parents:
        raise FormatError(f"attachment {name!r}: escapes the output folder")
    return path


def _write_folder(reader: Reader, output: Path, aliases: str, progress: Callable[[str, int], None] | None,
                  max_shard_size: int | None = None) -> list[str]:
    if output.exists():
        if not output.is_dir():
            raise UsageError(f"{output}: exists and is not a folder")
        if any(output.iterdir()):
            raise UsageError(f"{output}: folder exists and is not empty; refusing to overwrite it")
    parent = output.absolute().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:  # name the folder the user asked for, not the temporary one
        raise output_error(exc, output) from None
    try:
        if max_shard_size is not None:
            notes = write_shards(reader, tmp, max_shard_size, aliases=aliases, progress=progress)
        else:
            with open(tmp / WEIGHTS_FILE, "wb") as out:
                notes = write_safetensors(reader, out, aliases=aliases, progress=progress)
                out.flush()
                os.fsync(out.fileno())
        for att, data in reader.iter_attachments():
            path = _attachment_path(tmp, att.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except FileExistsError:
                raise FormatError(f"attachment {att.name!r}: collides with {path.relative_to(tmp).as_posix()} "
                                  "already written") from None
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            os.rename(tmp, output)
        except OSError as exc:
            raise output_error(exc, output) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return notes


def decode_model(source: str | os.PathLike[str] | BinaryIO | bytes, output: str | os.PathLike[str], *,
                 aliases: str = "clone", limits: Limits = DEFAULT_LIMITS, name: str | None = None,
                 progress: Callable[[str, int], None] | None = None, base: Any = None,
                 max_shard_size: int | str | None = None) -> list[str]:
    """Decode a .jwt to ``output``: a ``.pt``, a ``.safetensors`` or a folder (see :func:`output_format`).

    Written atomically; works from a non-seekable stream. ``aliases`` is
    how safetensors outputs hold shared tensors (``"clone"`` or ``"drop"``).
    Returns notes (e.g. attachments a .pt cannot hold). An update decodes
    against ``base`` (:func:`codec.api.as_base`), checked before anything is written.
    ``max_shard_size`` (bytes, or a string such as ``"2GB"``; folders only)
    writes the weights as shards with their index (:func:`write_shards`).
    """
    if not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"decode_model: output must be a path (.pt, .safetensors or a folder), "
                        f"not {type(output).__name__}")
    fmt = output_format(output)
    if max_shard_size is not None:
        max_shard_size = parse_size(max_shard_size)
        if fmt != "folder":
            raise UsageError(f"{output}: max_shard_size needs a folder output (a path ending in /)")
    out_path = Path(output)
    if fmt == "pt":  # torch.save of torch tensors
        from .api import open as open_jwt

        f = open_jwt(source, limits=limits, base=base)
        reader = f.reader
    else:  # arrays written as they are decoded: no torch
        reader = f = Reader(source, limits=limits, base=None if base is None else as_base(base, limits))
    with f:
        if name:
            reader.name = name
        check_base(reader.index, reader.base, reader.name)
        tree = [] if TREE_KEY not in reader.metadata else [
            f"the checkpoint's nesting and non-tensor entries are restored in a .pt output only; the tensors are "
            f"written under dotted names (e.g. {next(iter(reader.keys()), '')!r})"]
        if fmt == "folder":
            return tree + _write_folder(reader, out_path, aliases, progress, max_shard_size)
        if fmt == "safetensors":
            with atomic_output(out_path) as out:
                notes = tree + write_safetensors(reader, out, aliases=aliases, progress=progress)
        else:
            import torch

            from .api import unflatten_checkpoint

            state_dict = {}
            for key, tensor in f.items():
                state_dict[key] = tensor
                if progress:
                    progress(key, tensor.numel())
            checkpoint, dropped = unflatten_checkpoint(state_dict, reader.metadata)
            notes = [f"{len(dropped)} checkpoint entries were dropped at encoding and are not restored: "
                     f"{', '.join(dropped[:10])}{', ...' if len(dropped) > 10 else ''}"] if dropped else []
            with atomic_output(out_path) as out:
                torch.save(checkpoint, out)
        if reader.attachments:
            if not reader.seekable:
                for _ in reader.iter_attachments():  # verify them and the end of the stream
                    pass
            names = list(reader.attachments)
            notes.append(f"{len(names)} attachments ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) "
                         f"are not written to a .{fmt} file; decode to a folder to restore them")
        return notes


def load_into(model: torch.nn.Module, path: str | os.PathLike[str], *, strict: bool = True,
              limits: Limits = DEFAULT_LIMITS):
    """Load the weights of ``path`` (.jwt, .pt, .safetensors or a model folder) into ``model``.

    Uses ``model.load_state_dict(state_dict, strict=strict)`` and returns its
    result (from a checkpoint dict, the weights under ``state_dict``, ``model``, ``_orig_mod`` or ``module``
    when they hold every key of the model, :func:`weights_prefix`; a ``torch.compile``'d model loads into the module
    it wraps), a named tuple ``(missing_keys, unexpected_keys)``; with
    ``strict=True`` a mismatch raises ``RuntimeError`` as torch does. A tensor the model ties to another (one memory:
    GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) is loaded from whichever of the two names the file
    holds, as ``from_pretrained`` does (a model folder's file holds it once).
    Tensors are decoded onto the device of the model's first parameter. A model built on the meta device (``with
    torch.device("meta"):``, accelerate's ``init_empty_weights()``) gets its tensors decoded onto the CPU and
    assigned (``load_state_dict(..., assign=True)``: tied parameters stay one parameter); what no file holds and is
    still on the meta device afterwards (a non-persistent buffer such as BERT's ``position_ids``) is named in a
    ``UserWarning``.
    """
    from .encode import compiled_original, is_module

    if not is_module(model):
        hint = " (the model comes first: load_into(model, path))" if isinstance(model, (str, os.PathLike)) else ""
        raise TypeError(f"load_into: model must be a torch.nn.Module, not {type(model).__name__}{hint}")
    model = compiled_original(model)  # a torch.compile'd model loads the plain names codec.save writes for it
    first = next(iter(model.parameters()), None)
    first = first if first is not None else next(iter(model.buffers()), None)
    device = first.device if first is not None else None
    own = model.state_dict(keep_vars=True)
    meta = any(t.is_meta for t in own.values())
    if meta:  # decoded onto the meta device, the tensors would hold nothing and copying them in would do nothing
        device = None
    if detect_format(path) == "jwt":
        from .api import load

        state_dict = load(path, limits=limits, device=device)
    else:
        state_dict = read_tensors(path)
    from .api import _sharing

    if meta:  # every meta tensor is at address 0: a tie is the same parameter object
        firsts: dict[int, str] = {}
        ties = {name: firsts.setdefault(id(t), name) for name, t in own.items()}
        ties = {name: earlier for name, earlier in ties.items() if earlier != name}
    else:
        ties = _sharing(own)[0]  # a tied head (GPT-2's lm_head.weight = wte): {its name: the earlier one's}
    prefix = weights_prefix(state_dict, [k for k in own if k not in ties])
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if ties:  # a file from a folder holds a tied tensor once, under either name: the other one is the same memory
        state_dict = dict(state_dict)
        for name, earlier in ties.items():
            if name not in state_dict and earlier in state_dict:
                state_dict[name] = state_dict[earlier]
            elif earlier not in state_dict and name in state_dict:
                state_dict[earlier] = state_dict[name]
    if not meta:
        return model.load_state_dict(state_dict, strict=strict)
    return _assign_onto_meta(model, path, own, state_dict, strict)


def _assign_onto_meta(model: torch.nn.Module, path: str | os.PathLike[str], own: Mapping, state_dict: Mapping,
                      strict: bool):
    """``model.load_state_dict(state_dict, strict=strict, assign=True)`` for a model of meta tensors: one
    ``nn.Parameter`` per decoded tensor, so that parameters tied in ``model`` stay tied; a ``UserWarning`` names what
    is still on the meta device afterwards."""
    import warnings

    import torch

    from .api import _listed

    wrapped: dict[tuple[int, int], torch.nn.Parameter] = {}  # (decoded tensor, model's parameter): one for a tie
    state_dict = dict(state_dict)
    for name, tensor in state_dict.items():
        mine = own.get(name)
        if isinstance(mine, torch.nn.Parameter) and isinstance(tensor, torch.Tensor) and tensor.shape == mine.shape:
            key = (id(tensor), id(mine))
            if key not in wrapped:
                wrapped[key] = torch.nn.Parameter(tensor, requires_grad=mine.requires_grad)
            state_dict[name] = wrapped[key]
    result = model.load_state_dict(state_dict, strict=strict, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        warnings.warn(f"{os.fspath(path)}: the model was built on the meta device and {len(left)} of its tensors are "
                      f"still there after loading ({_listed(left)}): no file holds them (non-persistent buffers, or "
                      "keys missing from the file); build the model with its buffers on a real device (accelerate's "
                      "init_empty_weights(), include_buffers=False by default) or set them before running it",
                      UserWarning, stacklevel=3)
    return result


#: Where a checkpoint keeps a model's weights: a training checkpoint's ``{"state_dict": ...}`` or ``{"model": ...}``
#: (flattened to dotted names), a ``torch.compile``'d model's state_dict, a ``DataParallel`` / DDP one's.
WEIGHT_PREFIXES = ("state_dict.", "model.", "_orig_mod.", "module.")


def weights_prefix(tensors: Mapping, wanted: Iterable[str]) -> str:
    """The prefix of :data:`WEIGHT_PREFIXES` under which ``tensors`` hold every name of ``wanted`` (a model's
    state_dict keys), "" when they hold them as they are or under none."""
    wanted = set(wanted)
    if wanted <= set(tensors):
        return ""
    for prefix in WEIGHT_PREFIXES:
        if wanted <= {k[len(prefix):] for k in tensors if k.startswith(prefix)}:
            return prefix
    return ""
