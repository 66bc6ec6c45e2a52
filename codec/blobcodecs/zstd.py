"""``zstd``: lossless; the array's little-endian bytes in one zstd frame.

With ``shuffle`` the bytes of multi-byte elements are grouped by
significance before compression (all first bytes, then all second bytes,
...), which lets zstd find the redundancy of float exponents.

With ``exponent_first`` (spec/format.md 5.1.1) each element, read as an
unsigned integer, is first rotated left by one bit, so that the sign moves
to bit 0 and a float's exponent fills the most significant byte (8 of
bfloat16's and float32's 8 exponent bits, 8 of float64's 11), and the byte
planes are stored from the most significant down: the exponent plane comes
first, whole, and the near-random mantissa planes after it. On
all-MiniLM-L6-v2 this gains 0.6 % (float32) and 1.3 % (bfloat16) over the
significance shuffle at zstd level 1 (``bench/lossless.py``).

``zstd_planes`` (format 1.2, spec/format.md 5.1.2) generalizes the rotation:
elements are rotated left by ``rotate`` bits, then split into byte planes,
most significant first (``rotate=1`` is the ``exponent_first`` content). A
rotation of 3 moves a weight's two nearly constant top exponent bits (0 and
1 for magnitudes between 2**-63 and 2) to the last plane and two mantissa
bits into the first, so that every plane has a skew for zstd's Huffman stage
to use. Its encoder also keeps zstd's match finder nearly idle (a 64-entry
hash table, 7-byte matches): weights have few repeats, so zstd then mostly
Huffman-codes each 128 KB block, faster and smaller than level 1. The
reference encoder uses 3 for float32 and 1 for bfloat16, whose mantissa and
sign byte zstd then stores raw, decoded at memcpy speed
(:data:`_ROTATION`).

Every shuffled layout's encoder ends a zstd block at each plane's end
(:func:`_compress_planes`), so that no block mixes two planes' bytes under
one Huffman table; the frame is an ordinary one and the decoder is the same.
For bfloat16 and float64 the reference encoder writes frames of literals
only, without a match search (:data:`_LITERALS`, :func:`_literal_frame`).
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import zstandard

from ..errors import FormatError
from .abc import BlobCodec, check_params

try:  # a one-call zstd decompressor into a given buffer (imagecodecs is a dependency; its zstd may be left out)
    import imagecodecs

    _zstd_decode = imagecodecs.zstd_decode if getattr(imagecodecs, "ZSTD", None) and imagecodecs.ZSTD.available \
        else None
    _ZSTD_ERRORS: tuple[type[Exception], ...] = (zstandard.ZstdError, imagecodecs.ZstdError)
except (ImportError, AttributeError):
    _zstd_decode, _ZSTD_ERRORS = None, (zstandard.ZstdError,)

__all__ = ["Zstd", "ZstdPlanes", "planes_codec", "planes_rotation", "release_scratch", "use_compiled"]


class Zstd(BlobCodec):
    """Lossless zstd of the raw bytes, optionally byte-shuffled."""

    codec_id = "zstd"
    lossy = False

    optional = ("exponent_first",)

    def __init__(self, level: int = 9, shuffle: bool = True, exponent_first: bool = False):
        self.level = check_params(self.codec_id, "level", level, int, -7, 22)
        self.shuffle = check_params(self.codec_id, "shuffle", shuffle, bool, 0, 1)
        self.exponent_first = check_params(self.codec_id, "exponent_first", exponent_first, bool, 0, 1)
        if self.exponent_first and not self.shuffle:
            raise FormatError("zstd: exponent_first needs shuffle")

    @property
    def minor(self) -> int:
        """1 with ``exponent_first`` (format 1.1, spec 5.1.1), else 0."""
        return 1 if self.exponent_first else 0

    def get_config(self) -> dict[str, Any]:
        config = {"id": self.codec_id, "level": self.level, "shuffle": self.shuffle}
        if self.exponent_first:  # absent when false: files written before the parameter existed are unchanged
            config["exponent_first"] = True
        return config

    @property
    def rotation(self) -> int | None:
        """Bits each element is rotated left by before its byte planes are stored most significant first
        (``exponent_first``: 1); None for the little-endian plane order of ``shuffle`` (or no shuffle)."""
        return 1 if self.exponent_first else None

    def _params(self) -> zstandard.ZstdCompressionParameters:
        """zstd's parameters for this codec's frames (encoder side only: any frame decodes the same)."""
        return zstandard.ZstdCompressionParameters.from_level(self.level, write_content_size=True, write_checksum=False)

    def encode(self, array: np.ndarray) -> bytes:
        data = np.ascontiguousarray(array)
        raw = data.view(np.uint8).reshape(-1, data.itemsize) if data.size else data.view(np.uint8)
        if self.rotation is not None and data.size:
            raw = _rotated_planes(data, self.rotation, self.codec_id)
        elif self.shuffle and data.itemsize > 1 and data.size:
            raw = np.ascontiguousarray(raw.T)
        else:
            return self._compressor().compress(np.ascontiguousarray(raw).data)
        return _compress_planes(self._compressor(), raw.reshape(-1), data.itemsize)

    def _compressor(self) -> zstandard.ZstdCompressor:
        """A compressor with :meth:`_params`: the calling thread's own for levels up to :data:`_REUSE_MAX_LEVEL`
        (creating a zstd context costs about 40 us, more than coding a small tensor; a reused context writes the
        same bytes), a new one for higher levels, whose contexts take megabytes."""
        if self.level > _REUSE_MAX_LEVEL:
            return zstandard.ZstdCompressor(compression_params=self._params())
        compressors = getattr(_scratch_buffers, "compressors", None)
        if compressors is None:
            compressors = _scratch_buffers.compressors = {}
        key = (self.codec_id, self.level)
        if key not in compressors:
            compressors[key] = zstandard.ZstdCompressor(compression_params=self._params())
        return compressors[key]

    def decode(self, blob: bytes, shape: tuple[int, ...], dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
        """Decode into ``out`` (a C-contiguous array of ``shape`` and ``dtype``) or a new array.

        Shuffled content is decompressed in one call into the thread's plane buffer (:func:`_scratch`), then
        interleaved into the output (:func:`_from_planes`); other content straight into the output.
        """
        count = math.prod(map(int, shape))
        expected = count * dtype.itemsize
        try:
            claimed = zstandard.frame_content_size(blob)
        except zstandard.ZstdError as exc:
            raise FormatError(f"zstd: not a zstd frame ({exc})") from None
        if claimed != expected:
            raise FormatError(f"zstd: frame holds {claimed} bytes, expected {expected}")
        length = frame_length(blob)
        if length != len(blob):
            why = "it is cut short" if length > len(blob) else "nothing may follow it"
            raise FormatError(f"zstd: blob of {len(blob)} bytes holds a frame of {length} bytes ({why})")
        if out is None:
            out = np.empty(shape, dtype)
        elif out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {dtype}{tuple(shape)} array")
        raw = out.reshape(-1).view(np.uint8)
        rotation = self.rotation
        if rotation is not None:
            _check_rotation(self.codec_id, rotation, dtype.itemsize, FormatError)
        shuffled = self.shuffle and dtype.itemsize > 1 and count
        content = _scratch(expected) if shuffled else raw
        _decompress_into(blob, content)
        if shuffled:
            _from_planes(content, raw, dtype.itemsize, rotation)
        if dtype == np.bool_ and np.any(raw > 1):
            raise FormatError("zstd: bool tensor holds bytes other than 0 and 1")
        return out


class ZstdPlanes(Zstd):
    """Lossless zstd of byte planes of rotated elements (format 1.2, spec/format.md 5.1.2).

    ``literals`` (the encoder's choice, not stored: the frames decode the same) writes frames of literals only
    (:func:`_literal_frame`): every plane Huffman-coded or stored raw block by block, no match searched.
    """

    codec_id = "zstd_planes"
    optional = ()

    def __init__(self, rotate: int = 3, literals: bool = False):
        self.rotate = check_params(self.codec_id, "rotate", rotate, int, 0, 63)
        self.literals = bool(literals)
        super().__init__(level=1, shuffle=True)

    def encode(self, array: np.ndarray) -> bytes:
        data = np.ascontiguousarray(array)
        if self.literals and data.size and data.itemsize in _UINT and _literal_lib() is not None:
            planes = _rotated_planes(data, self.rotate, self.codec_id)
            frame = _literal_frame(planes, data.itemsize)
            if planes.size <= zstandard.BLOCKSIZE_MAX:  # one block at most: a frame with matches may be shorter
                other = _compress_planes(self._compressor(), planes, data.itemsize)
                if len(other) < len(frame):
                    return other
            return frame
        return super().encode(data)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ZstdPlanes":
        """The codec of a stored config: ``rotate`` only (``literals`` is not a parameter of the format, a key of
        that name is ignored as any unknown one)."""
        return super().from_config({**config, "literals": False})

    @property
    def rotation(self) -> int:
        return self.rotate

    @property
    def minor(self) -> int:
        """2: the codec is defined by format 1.2."""
        return 2

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "rotate": self.rotate}

    def _params(self) -> zstandard.ZstdCompressionParameters:
        """zstd's fast strategy with its match finder nearly idle (a 64-entry hash table, 7-byte matches,
        128 KB window): on weights' byte planes mostly one Huffman table per 128 KB block
        (bench/lossless.py: smaller and faster than level 1)."""
        return zstandard.ZstdCompressionParameters(
            strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, min_match=7, write_content_size=True,
            write_checksum=False)


#: Bits the reference encoder rotates each floating dtype's elements by in ``zstd_planes`` (bench/lossless.py on
#: all-MiniLM-L6-v2): float32 gains most from 3, float64 made from float32 from 5; bfloat16 takes 1 (its exponent
#: byte, then its 7 mantissa bits and sign, which zstd stores raw): 3 is 0.6 % smaller but Huffman-codes both of
#: its planes and halves zstd's decode speed, below the 1 GB/s per core lossless target (2 likewise), while
#: float32's 3 keeps two of its four planes raw; float16 keeps ``exponent_first``'s 1, whose top byte already holds
#: its 5 exponent bits.
_ROTATION = {"bfloat16": 1, "float32": 3, "float64": 5}

#: Dtypes whose ``zstd_planes`` frames the reference encoder writes as literals only (:func:`_literal_frame`), by
#: what measured smaller on all-MiniLM-L6-v2 (bench/JOURNAL.md, "The bf16 lossless ratio (fifteenth pass, issue
#: 12)"): bfloat16's exponent plane (8 bits of about 2.6 bits of entropy) repeats 7-byte runs by chance, and each
#: match zstd's fast parser takes costs more in its sequence codes than its bytes would in Huffman literals
#: (-24 KB, 0.08 %); float64 made from float32 -1.9 %; float32 rotated 3 keeps the match finder, whose matches
#: pay on its embeddings (+80 KB, 0.1 %, literals only).
_LITERALS = frozenset({"bfloat16", "float64"})


def planes_rotation(dtype_name: str) -> int | None:
    """The ``zstd_planes`` rotation the reference encoder uses for a floating dtype, or None (use ``zstd``)."""
    return _ROTATION.get(dtype_name)


def planes_codec(dtype_name: str) -> "ZstdPlanes | None":
    """The reference encoder's ``zstd_planes`` codec for a floating dtype (:data:`_ROTATION`, :data:`_LITERALS`),
    or None (use ``zstd``)."""
    rotation = _ROTATION.get(dtype_name)
    return None if rotation is None else ZstdPlanes(rotation, literals=dtype_name in _LITERALS)


#: Unsigned integer type of each element size.
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
#: Elements per step of the plane layouts (a few hundred KB: stays in cache).
_STEP = 1 << 16


#: Highest zstd level whose compressor a thread keeps between calls (a level-1 context takes about 1 MB).
_REUSE_MAX_LEVEL = 3

#: Largest plane buffer a thread keeps between calls (MiniLM's biggest float32 tensor is 47 MB).
_SCRATCH_MAX = 64 << 20
_scratch_buffers = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """A buffer of ``nbytes`` for one call's byte planes, reused by the thread's next call up to
    :data:`_SCRATCH_MAX` bytes: memory the process has not touched yet costs a page fault per page, which
    measured as much as the planes' transposition itself (bench/lossless.py)."""
    if nbytes > _SCRATCH_MAX:
        return np.empty(nbytes, np.uint8)
    buf = getattr(_scratch_buffers, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _scratch_buffers.buf = np.empty(max(nbytes, 1 << 20), np.uint8)
    return buf[:nbytes]


def release_scratch() -> None:
    """Drop the calling thread's plane buffer (:func:`_scratch`), for a caller that codes a tensor losslessly
    among other work: the rate search measures each tensor's lossless candidate once, and all-MiniLM-L6-v2's
    calibrated search kept a 47 MB buffer (its embedding's) on each of its two coding threads to its end."""
    _scratch_buffers.buf = None


def _check_rotation(codec_id: str, rotation: int, itemsize: int, error: type[Exception]) -> None:
    """Raise ``error`` unless ``rotation`` bits can rotate elements of ``itemsize`` bytes (2, 4 or 8)."""
    if itemsize not in _UINT:
        raise error(f"{codec_id}: rotated byte planes need 2, 4 or 8-byte elements, found {itemsize}")
    if rotation >= 8 * itemsize:
        raise error(f"{codec_id}: rotate={rotation} needs elements of more than {rotation} bits, found {8 * itemsize}")


def _rotated_planes(data: np.ndarray, rotation: int, codec_id: str = "zstd") -> np.ndarray:
    """The byte planes of ``data``'s elements rotated left ``rotation`` bits, most significant plane first.

    By the compiled loop where :func:`_compiled_loops` gives one (one pass); else chunk by chunk: rotate into a
    scratch buffer (three ufuncs, no temporaries), then one strided gather per chunk writes every plane's slice
    (reading across, writing along: numpy's fast direction).
    """
    k = data.itemsize
    _check_rotation(codec_id, rotation, k, ValueError)
    u = data.reshape(-1).view(_UINT[k])
    n, t = u.size, u.dtype.type
    out = _scratch(k * n).reshape(k, n)
    loops = _compiled_loops(k * n)
    if loops is not None:
        loops.split[k](u, rotation, out.reshape(-1))
        return out.reshape(-1)
    rotated, spill = np.empty(min(n, _STEP), u.dtype), np.empty(min(n, _STEP), u.dtype)
    for i in range(0, n, _STEP):
        part = u[i : i + _STEP]
        a, b = rotated[: part.size], spill[: part.size]
        if rotation:
            np.left_shift(part, t(rotation), out=a)
            np.right_shift(part, t(8 * k - rotation), out=b)
            np.bitwise_or(a, b, out=a)
        else:
            a[:] = part
        out[:, i : i + part.size] = a.view(np.uint8).reshape(-1, k)[:, ::-1].T
    return out.reshape(-1)


def _from_planes(planes: np.ndarray, raw: np.ndarray, k: int, rotation: int | None) -> None:
    """Inverse of the encoders' layouts: fill ``raw`` (the output's bytes) from byte planes of its ``k``-byte
    elements, most significant first rotated left ``rotation`` bits, or least significant first for ``None``
    (``shuffle``).

    Rotated planes by the compiled loop where :func:`_compiled_loops` gives one (one pass); else chunk by chunk:
    each plane's slice is written to its byte of the elements (one strided copy per plane, which numpy does fast,
    unlike a 2-D transposed copy), then the chunk is rotated back in place.
    """
    n = raw.size // k
    loops = _compiled_loops(raw.size) if rotation is not None else None
    if loops is not None:
        loops.join[k](planes, rotation, raw.view(_UINT[k]))
        return
    grid, elements = planes.reshape(k, n), raw.reshape(n, k)
    order = range(k) if rotation is None else range(k - 1, -1, -1)  # the byte plane j holds
    words = raw.view(_UINT[k]) if rotation else None
    t = words.dtype.type if rotation else None
    spill = np.empty(min(n, _STEP), words.dtype) if rotation else None
    for i in range(0, n, _STEP):
        part = elements[i : i + _STEP]
        for j, byte in enumerate(order):
            part[:, byte] = grid[j, i : i + part.shape[0]]
        if rotation:
            w, b = words[i : i + _STEP], spill[: part.shape[0]]
            np.left_shift(w, t(8 * k - rotation), out=b)
            np.right_shift(w, t(rotation), out=w)
            np.bitwise_or(w, b, out=w)


#: Bytes of rotated byte planes a process joins or splits with numpy before :func:`_compiled_loops` loads the
#: compiled loops (codec/blobcodecs/_compiled.py), in the default mode: loading them costs about 1 CPU second in a
#: new process (importing numba and starting its compiler; the compiled code is cached on disk), which the one-pass
#: loops pay back only after 2.5-4 GB (they save 0.3-0.5 CPU s per GB over numpy's 1.4-2.2 GB/s). Switching once numpy
#: has spent about what loading costs bounds the loss on any workload to about twice the better choice's.
_COMPILE_AFTER = 2 << 30

#: ``mode``: :func:`use_compiled`'s; ``loops``: None (not loaded yet), the loaded module, or False (no numba, or it
#: failed); ``numpy_bytes``: bytes of planes moved by numpy so far in the default mode.
_compiled_state: dict[str, Any] = {"mode": None, "loops": None, "numpy_bytes": 0}
_compiled_lock = threading.Lock()


def use_compiled(mode: bool | None = None) -> bool:
    """Choose how lossless byte planes are joined and split (the results are the same bytes).

    ``True``: by the compiled loops (numba, ``pip install 'jwt-weights[fast]'``) from now on, loading them now
    (about 1 CPU second in a new process); ``False``: by numpy only; ``None`` (the default): by numpy until the
    process has moved :data:`_COMPILE_AFTER` bytes of planes, then by the compiled loops where numba is installed.
    Returns whether the compiled loops are loaded.
    """
    if mode not in (True, False, None):
        raise TypeError(f"use_compiled: mode must be True, False or None, found {mode!r}")
    _compiled_state["mode"] = mode
    if mode:
        _load_loops(block=True)
    return bool(_compiled_state["loops"])


def _compiled_loops(nbytes: int) -> ModuleType | None:
    """The compiled loops for a call that moves ``nbytes`` of planes, or None for numpy's (see :func:`use_compiled`)."""
    loops, mode = _compiled_state["loops"], _compiled_state["mode"]
    if mode is False or loops is False:
        return None
    if loops is not None:
        return loops
    if mode is None and _compiled_state["numpy_bytes"] < _COMPILE_AFTER:
        _compiled_state["numpy_bytes"] += nbytes
        return None
    return _load_loops(block=False)


def _load_loops(block: bool) -> ModuleType | None:
    """Import and warm the compiled loops once (``loops`` False when numba is missing or fails: numpy then does
    all, after one RuntimeWarning for a failure); a thread that finds another loading them gets None (numpy) unless
    ``block``."""
    if not _compiled_lock.acquire(blocking=block):
        return None
    try:
        if _compiled_state["loops"] is None:
            try:
                from . import _compiled as module  # numba, and its disk cache (a RuntimeError where it has none)

                for k, t in _UINT.items():  # compile or load from numba's cache now, not inside a caller's timing
                    words, planes = np.zeros(1, t), np.zeros(k, np.uint8)
                    module.split[k](words, 1, planes)
                    module.join[k](planes, 1, words)
            except ImportError:  # no numba (the ``fast`` extra is not installed)
                _compiled_state["loops"] = False
                return None
            except Exception as exc:  # noqa: BLE001 - a broken numba must not break decoding: numpy does it all
                warnings.warn(f"jwt: numba's compiled byte-plane loops failed ({type(exc).__name__}: {exc}); "
                              "numpy does their work", RuntimeWarning, stacklevel=3)
                _compiled_state["loops"] = False
                return None
            _compiled_state["loops"] = module
        return _compiled_state["loops"] or None
    finally:
        _compiled_lock.release()


def _compress_planes(compressor: zstandard.ZstdCompressor, planes: np.ndarray, k: int) -> bytes | bytearray:
    """One zstd frame of ``planes`` (``k`` byte planes of equal length, one after the other) whose blocks end at
    each plane's end: bytes, or a bytearray where it was streamed (copying that into bytes would hold it twice).

    zstd cuts a frame into blocks of up to 128 KiB from its start, each with its own Huffman table for its literals
    (or none: a block stored raw). A block that straddles two planes codes an exponent plane's bytes and a
    near-random mantissa plane's under one table, or Huffman-codes bytes that a block of their own would store raw
    (decoded at memcpy speed); a tensor smaller than a block has all its planes under one table. So the planes are
    fed to zstd's streaming API with a block flush after each but the last (on all-MiniLM-L6-v2 0.33 % smaller
    frames for bfloat16, 0.2 % for float32 and float16, 9-14 % for its tensors of one block; zstd then costs
    about 20 % more CPU to encode; bench/JOURNAL.md, "Lossless planes in their own blocks (fourteenth pass,
    issue 12)"). Where planes are whole blocks a one-call frame already has their blocks (and no empty last
    block, which the stream ends with there). A frame of at most one block is also made in one call and the
    shorter kept: a plane of a few bytes costs a 3-byte block header and gains nothing. Each is an ordinary
    frame; the decoder does not change.
    """
    n = planes.size // k
    if n % zstandard.BLOCKSIZE_MAX == 0:
        return compressor.compress(planes.data)
    stream = compressor.compressobj(size=planes.size)
    frame = bytearray()  # grown in place as the stream's chunks come: a list of them joined would hold the frame
    for j in range(k):   # twice (all-MiniLM-L6-v2's calibrated -b 3.5: +33 MB in the rate search's lossless points)
        frame += stream.compress(planes[j * n : (j + 1) * n].data)
        frame += stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK if j < k - 1 else zstandard.COMPRESSOBJ_FLUSH_FINISH)
    if planes.size <= zstandard.BLOCKSIZE_MAX:
        whole = compressor.compress(planes.data)
        if len(whole) <= len(frame):
            return whole
    return frame


@functools.cache
def _literal_lib() -> tuple[Any, Any] | None:
    """libzstd's API through zstandard's cffi binding (``zstandard.backend_cffi``: its ``ffi`` and ``lib``, the
    whole of zstd.h), or None where it is missing (no ``cffi`` package, or a binding without
    ``ZSTD_compressSequences``): :meth:`ZstdPlanes.encode` then writes its frames with matches."""
    try:
        from zstandard import backend_cffi

        ffi, lib = backend_cffi.ffi, backend_cffi.lib
        lib.ZSTD_compressSequences, lib.ZSTD_c_blockDelimiters, ffi.sizeof("ZSTD_Sequence")  # noqa: B018
    except Exception:  # noqa: BLE001 - ImportError, or an older binding without these names
        return None
    return ffi, lib


def _literal_frame(planes: np.ndarray, k: int) -> bytearray:
    """One zstd frame of ``planes`` (``k`` byte planes of equal length, one after the other) made of literals
    only: blocks of up to 128 KiB that end at each plane's end, each Huffman-coded (zstd's fast-strategy rule: when
    that saves at least 1/64 of it) or stored raw, without sequences (content size declared, no checksum).

    zstd's match finder cannot be switched off through python-zstandard, and on an exponent plane of low entropy
    its fast parser takes chance repeats of 7 bytes whose sequence codes cost more than their bytes would as
    Huffman literals; so the frame is made by ``ZSTD_compressSequences`` with one empty sequence per block (an
    explicit block delimiter that holds the block's literals), which zstd codes as it codes any block's literals.
    An ordinary frame: the decoder does not change.
    """
    ffi, lib = _literal_lib()
    cctx = getattr(_scratch_buffers, "literal_cctx", None)
    if cctx is None:
        cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
        for param, value in ((lib.ZSTD_c_strategy, 1), (lib.ZSTD_c_windowLog, 17), (lib.ZSTD_c_contentSizeFlag, 1),
                             (lib.ZSTD_c_checksumFlag, 0), (lib.ZSTD_c_blockDelimiters, 1)):
            _zstd_check(ffi, lib, lib.ZSTD_CCtx_setParameter(cctx, param, value))
        _scratch_buffers.literal_cctx = cctx
    n = planes.size // k
    whole, rest = divmod(n, zstandard.BLOCKSIZE_MAX)
    lengths = np.array(([zstandard.BLOCKSIZE_MAX] * whole + ([rest] if rest else [])) * k or [0], np.uint32)
    sequences = np.zeros((lengths.size, 4), np.uint32)  # ZSTD_Sequence: offset, litLength, matchLength, rep
    sequences[:, 1] = lengths
    frame = bytearray(lib.ZSTD_compressBound(planes.size))
    _zstd_check(ffi, lib, lib.ZSTD_CCtx_reset(cctx, lib.ZSTD_reset_session_only))
    size = lib.ZSTD_compressSequences(cctx, ffi.from_buffer(frame), len(frame),
                                      ffi.cast("ZSTD_Sequence *", ffi.from_buffer(sequences)), lengths.size,
                                      ffi.from_buffer(planes), planes.size)
    _zstd_check(ffi, lib, size)
    del frame[size:]
    return frame


def _zstd_check(ffi: Any, lib: Any, code: int) -> None:
    """Raise RuntimeError where a libzstd call returned an error code."""
    if lib.ZSTD_isError(code):
        raise RuntimeError(f"zstd: {ffi.string(lib.ZSTD_getErrorName(code)).decode()}")


def _decompress_into(blob: bytes, content: np.ndarray) -> None:
    """Decompress ``blob``, one zstd frame whose content size is ``content``'s (checked by the caller), into
    ``content``: a large frame in one call by imagecodecs' zstd where it has one (no stream, no copy), others by the
    thread's zstandard decompressor (creating a zstd context costs about 40 us: more than decoding a small tensor)."""
    try:
        if _zstd_decode is not None and content.size >= _ONE_CALL_MIN:
            filled = len(_zstd_decode(blob, out=content))
        else:
            with _decompressor().stream_reader(blob) as reader:
                filled = _read_into(reader, content)
    except _ZSTD_ERRORS as exc:
        raise FormatError(f"zstd: corrupt frame ({exc})") from None
    if filled != content.size:
        raise FormatError(f"zstd: frame decoded to {filled} bytes, expected {content.size}")


#: Frames of at least this many content bytes are decompressed by imagecodecs in one call (10-15 % faster than a
#: zstandard stream on all-MiniLM-L6-v2's matrices), smaller ones by the thread's zstandard decompressor.
_ONE_CALL_MIN = 1 << 18


def _decompressor() -> zstandard.ZstdDecompressor:
    """The calling thread's zstd decompressor (a zstd context is not shared between threads)."""
    d = getattr(_scratch_buffers, "decompressor", None)
    if d is None:
        d = _scratch_buffers.decompressor = zstandard.ZstdDecompressor()
    return d


def _read_into(reader, raw: np.ndarray) -> int:
    """Fill ``raw`` from a zstd stream reader; return the bytes read."""
    view, filled = memoryview(raw), 0
    while filled < len(raw):
        n = reader.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


def frame_length(blob: bytes) -> int:
    """Bytes of the Zstandard frame that starts ``blob``, from its block headers (RFC 8878, 3.1.1)."""
    if blob[:4] != b"\x28\xb5\x2f\xfd":
        raise FormatError(f"zstd: not a Zstandard frame (magic {bytes(blob[:4]).hex()})")
    try:
        pos = zstandard.frame_header_size(blob)
    except zstandard.ZstdError as exc:
        raise FormatError(f"zstd: not a zstd frame ({exc})") from None
    checksum = 4 if blob[4] & 0x04 else 0
    last = 0
    while not last:
        if pos + 3 > len(blob):
            raise FormatError("zstd: frame is truncated")
        header = int.from_bytes(blob[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        pos += 3 + (1 if kind == 1 else size)  # an RLE block stores its one byte
    return pos + checksum
