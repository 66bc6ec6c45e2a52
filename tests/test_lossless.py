"""The lossless codecs: ``zstd_planes`` (format 1.2, spec/format.md 5.1.2) round trips and hostile blobs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zstandard

import codec
from codec.blobcodecs import REGISTRY, Zstd, ZstdPlanes, get_codec
from codec.blobcodecs import zstd as zstd_module
from codec.blobcodecs.zstd import _STEP, frame_length
from codec.dtypes import get_dtype
from codec.errors import FormatError, UnknownCodecError

RNG = np.random.default_rng(12)
#: (dtype, rotations): the reference encoder's choice and the edges of the range.
CASES = [("float32", (0, 3, 31)), ("bfloat16", (1, 3, 15)), ("float16", (0, 1, 15)), ("float64", (5, 63)),
         ("int32", (0, 7)), ("uint16", (9,)), ("int64", (1,))]
#: Element counts: empty, one, around the chunk step, odd.
SIZES = [0, 1, 7, _STEP - 1, _STEP + 3, 2 * _STEP + 1001]


def _bits(dtype: str, count: int) -> np.ndarray:
    """Random bit patterns of ``dtype`` in storage form (NaN payloads, infinities, subnormals, -0 included)."""
    storage = get_dtype(dtype).storage
    raw = RNG.integers(0, 256, count * storage.itemsize, dtype=np.uint8).view(storage)
    if count >= 8 and get_dtype(dtype).floating:
        k = storage.itemsize
        sign, top = 1 << (8 * k - 1), (1 << (8 * k)) - 1
        raw.view(f"<u{k}")[:6] = [0, sign, top, top ^ sign, sign + 1, 1]  # +-0, NaN patterns, subnormals
    return raw


@pytest.mark.parametrize("dtype,rotations", CASES)
def test_zstd_planes_round_trip_is_bit_exact(dtype, rotations):
    """Every rotation decodes every bit pattern back, with and without ``out``, at every size (chunk edges too)."""
    storage = get_dtype(dtype).storage
    for rotate in rotations:
        coder = get_codec(ZstdPlanes(rotate).get_config())
        for count in SIZES:
            array = _bits(dtype, count)
            literal = ZstdPlanes(rotate, literals=True).encode(array)
            assert coder.decode(literal, array.shape, storage).tobytes() == array.tobytes(), (rotate, count)
            blob = coder.encode(array)
            assert coder.decode(blob, array.shape, storage).tobytes() == array.tobytes(), (rotate, count)
            out = np.full(array.shape, 7, storage)
            assert coder.decode(blob, array.shape, storage, out=out) is out
            assert out.tobytes() == array.tobytes()


def test_zstd_planes_layout_is_the_rotated_planes_most_significant_first():
    """The frame's content is rotl(u, rotate)'s bytes, most significant plane first (spec 5.1.2)."""
    x = np.array([1.0, -2.0], np.float32)  # 0x3F800000, 0xC0000000
    content = zstandard.ZstdDecompressor().decompress(ZstdPlanes(3).encode(x))
    # rotated left 3 bits: 0xFC000001, 0x00000006 -> planes FC 00 | 00 00 | 00 00 | 01 06
    assert content == bytes([0xFC, 0x00, 0, 0, 0, 0, 0x01, 0x06])
    one = np.array([1.0, -2.0], np.float32)
    assert (zstandard.ZstdDecompressor().decompress(ZstdPlanes(1).encode(one))
            == zstandard.ZstdDecompressor().decompress(Zstd(1, True, exponent_first=True).encode(one)))
    assert ZstdPlanes(3).encode(x) == ZstdPlanes(3).encode(x.copy())  # deterministic (scratch buffers reused)


def _weights(dtype: str, count: int) -> np.ndarray:
    """Normal weights of ``dtype`` in storage form: a skewed exponent plane, near-random mantissa planes."""
    values = torch.from_numpy(RNG.standard_normal(count) * 0.05).to(getattr(torch, dtype))
    from codec.api import to_numpy

    return to_numpy(values)[0]


def _blocks(blob: bytes) -> list[tuple[int, int]]:
    """(type, stored bytes) of each block of a zstd frame (RFC 8878 3.1.1.2: 0 raw, 1 RLE, 2 compressed)."""
    pos, last, blocks = zstandard.frame_header_size(blob), 0, []
    while not last:
        header = int.from_bytes(blob[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        blocks.append((kind, size))
        pos += 3 + (1 if kind == 1 else size)
    return blocks


BLOCK = zstandard.BLOCKSIZE_MAX


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_lossless_planes_in_their_own_blocks_round_trip(dtype):
    """The reference lossless codec of each float dtype (and every zstd_planes rotation of bfloat16's and
    float32's) codes weights at sizes below, at and across zstd's 128 KiB block (planes of whole blocks, of a
    block and a byte, odd), empty and of one element, into one zstd frame declaring its content size, bit-exact."""
    from codec.tensorcodec import lossless_codec

    coders = [lossless_codec(get_dtype(dtype), 9)]
    if dtype in ("bfloat16", "float32"):
        coders += [ZstdPlanes(r, literals=literals) for r in (1, 2, 3) for literals in (False, True)]
    for count in (0, 1, 5, 384, 3001, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 2 * BLOCK + 777):
        array = _weights(dtype, count)
        for coder in coders:
            blob = coder.encode(array)
            assert frame_length(blob) == len(blob)
            assert zstandard.frame_content_size(blob) == array.nbytes
            assert coder.decode(blob, array.shape, array.dtype).tobytes() == array.tobytes(), (coder, count)
            assert coder.encode(array.copy()) == blob  # deterministic


@pytest.mark.parametrize("count", [3001, BLOCK - 5, BLOCK + 1, 5 * BLOCK // 2 + 3])
def test_a_near_random_plane_fills_its_own_raw_blocks(count):
    """bfloat16 with rotate 1: the exponent plane comes first, Huffman-coded, and the mantissa-and-sign plane
    (random here) is stored in raw blocks that end the frame and hold exactly its ``count`` bytes: no block
    straddles the two planes. float32 with rotate 3 below a block: each of its two random middle planes is one
    raw block of its own."""
    array = _weights("bfloat16", count)
    array.view(np.uint16)[:] = (array.view(np.uint16) & 0xFF80) | RNG.integers(0, 128, count, dtype=np.uint16)
    blocks = _blocks(ZstdPlanes(1).encode(array))
    assert blocks[0][0] == 2
    tail, suffix = 0, set()
    for kind, size in reversed(blocks):
        if kind != 0:
            break
        tail += size
        suffix.add(tail)
    assert count in suffix, blocks
    if count < BLOCK:
        wide = _weights("float32", count)
        wide.view(np.uint32)[:] ^= RNG.integers(0, 1 << 21, count, dtype=np.uint32)  # random low mantissa bits
        blocks = _blocks(ZstdPlanes(3).encode(wide))
        assert [b for b in blocks if b[0] == 0] == [(0, count), (0, count)] and len(blocks) == 4, blocks


def _block_contents(blob: bytes) -> list[tuple[int, int, int]]:
    """(type, literal bytes, sequences) of each block of a zstd frame (RFC 8878 3.1.1.2-3.1.1.3: a compressed
    block holds a literals section, then the count of its sequences); a raw or RLE block's bytes are literals."""
    pos, last, blocks = zstandard.frame_header_size(blob), 0, []
    while not last:
        header = int.from_bytes(blob[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        pos += 3
        if kind == 2:
            block = blob[pos : pos + size]
            lit_type, size_format = block[0] & 3, (block[0] >> 2) & 3
            if lit_type < 2:  # raw or RLE literals: 1, 2 or 3 header bytes, then the bytes or the one byte
                head = (1, 2, 1, 3)[size_format]
                literals = int.from_bytes(block[:head], "little") >> (3 if size_format in (0, 2) else 4)
                end = head + (literals if lit_type == 0 else 1)
            else:  # Huffman-coded: 3, 3, 4 or 5 header bytes holding the regenerated and the compressed size
                head, bits = ((3, 10), (3, 10), (4, 14), (5, 18))[size_format]
                sizes = int.from_bytes(block[:head], "little") >> 4
                literals, end = sizes & ((1 << bits) - 1), head + (sizes >> bits)
            first = block[end]
            count = first if first < 128 else (first - 128) * 256 + block[end + 1] if first < 255 else \
                int.from_bytes(block[end + 1 : end + 3], "little") + 0x7F00
            assert count or end + 1 == size, "a block without sequences ends after its literals"
            blocks.append((kind, literals, count))
        else:
            blocks.append((kind, size, 0))
        pos += 1 if kind == 1 else size
    return blocks


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_literal_frames_hold_no_sequences_and_end_blocks_at_the_planes(dtype):
    """``literals=True`` writes one frame of literals only (no sequence in any block, though the weights repeat),
    with the blocks of frames with matches: every plane in blocks of its own, a random plane stored raw; each
    decodes bit-exact, deterministic, at sizes below, at and across a block."""
    for count in (1, 5, 384, 3001, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 777):
        array = _weights(dtype, count)
        array[count // 2 :] = np.resize(array[:24], count - count // 2)  # short repeats: a match finder takes them
        for rotate in (1, 3):
            literal, matches = ZstdPlanes(rotate, literals=True), ZstdPlanes(rotate)
            blob = literal.encode(array)
            assert frame_length(blob) == len(blob) and zstandard.frame_content_size(blob) == array.nbytes
            assert literal.decode(blob, array.shape, array.dtype).tobytes() == array.tobytes(), (count, rotate)
            assert literal.encode(array.copy()) == blob
            if count > BLOCK // array.itemsize:  # a frame of one block may be the one with matches (shorter)
                blocks = _block_contents(blob)
                assert sum(b[2] for b in blocks) == 0 and sum(b[1] for b in blocks) == array.nbytes
                assert sum(b[2] for b in _block_contents(matches.encode(array))) > 0, (count, rotate)
                ends = set(np.cumsum([b[1] for b in blocks]).tolist())
                assert {j * count for j in range(1, array.itemsize + 1)} <= ends, (count, rotate)
    array = _weights("bfloat16", 3 * BLOCK)
    array.view(np.uint16)[:] = (array.view(np.uint16) & 0xFF80) | RNG.integers(0, 128, array.size, dtype=np.uint16)
    blocks = _blocks(ZstdPlanes(1, literals=True).encode(array))
    assert blocks[0][0] == 2 and [b for b in blocks if b[0] == 0] == [(0, BLOCK)] * 3, blocks


def test_literal_frames_are_smaller_on_bfloat16_weights_and_the_reference():
    """On normal bfloat16 weights the exponent plane's chance repeats cost more as matches than as literals; the
    reference encoder writes literals-only frames for bfloat16 and float64 and keeps matches for float32."""
    array = _weights("bfloat16", 4 * BLOCK + 123)
    literal, matches = ZstdPlanes(1, literals=True).encode(array), ZstdPlanes(1).encode(array)
    assert sum(b[2] for b in _block_contents(matches)) > 0 and sum(b[2] for b in _block_contents(literal)) == 0
    assert len(literal) < len(matches)
    assert [(c.rotate, c.literals) for c in map(zstd_module.planes_codec, ("bfloat16", "float32", "float64"))] == \
        [(1, True), (3, False), (5, True)]
    assert zstd_module.planes_codec("float16") is None
    assert zstd_module.planes_codec("bfloat16").get_config() == {"id": "zstd_planes", "rotate": 1}


def test_literal_frames_without_the_cffi_binding_fall_back_to_matches(monkeypatch):
    """Where zstandard's cffi binding is missing the encoder writes the frames with matches (valid, larger)."""
    array = _weights("bfloat16", 2 * BLOCK + 5)
    monkeypatch.setattr(zstd_module, "_literal_lib", lambda: None)
    assert ZstdPlanes(1, literals=True).encode(array) == ZstdPlanes(1).encode(array)


def test_literal_frames_from_threads_are_the_same_bytes():
    """Each thread keeps its own zstd context for literal frames: frames coded on two threads at once, and by a
    new context, are byte for byte those of one thread."""
    arrays = [_weights("bfloat16", n) for n in (5000, 17, 3 * BLOCK + 9, 384, 70_000)] * 3
    coder = ZstdPlanes(1, literals=True)
    alone = [bytes(coder.encode(a)) for a in arrays]
    with ThreadPoolExecutor(2) as pool:
        assert [bytes(b) for b in pool.map(coder.encode, arrays)] == alone
    zstd_module._scratch_buffers.literal_cctx = None
    assert [bytes(coder.encode(a)) for a in arrays] == alone


def test_a_frame_of_one_block_is_the_shorter_layout():
    """Up to one block the encoder keeps the one-call frame where block headers per plane would cost more (a few
    elements), and the per-plane blocks where they save (MiniLM's 384-element vectors), never longer than both."""
    for dtype, count in (("float32", 1), ("float32", 3), ("bfloat16", 384), ("float64", 100), ("float32", 2000)):
        array = _weights(dtype, count)
        coder = zstd_module.planes_codec(dtype)
        planes = zstd_module._rotated_planes(array, coder.rotate).copy()
        whole = len(coder._compressor().compress(planes.data))
        assert len(coder.encode(array)) <= whole, (dtype, count)
        assert len(coder.encode(array)) <= len(ZstdPlanes(coder.rotate).encode(array)), (dtype, count)
    array = _weights("bfloat16", 384)
    planes = zstd_module._rotated_planes(array, 1).copy()
    assert len(ZstdPlanes(1).encode(array)) < len(ZstdPlanes(1)._compressor().compress(planes.data))


@pytest.mark.parametrize("config", [{"id": "zstd_planes"}, {"id": "zstd_planes", "rotate": 64},
                                    {"id": "zstd_planes", "rotate": -1}, {"id": "zstd_planes", "rotate": True},
                                    {"id": "zstd_planes", "rotate": "3"}, {"id": "zstd_planes", "rotate": 3.0}])
def test_zstd_planes_parameters_are_checked(config):
    with pytest.raises(FormatError):
        get_codec(config)


def test_zstd_planes_hostile_blobs_are_format_errors():
    """Truncated, oversized, short or long frames, a rotation wider than the element and 1-byte elements:
    each one FormatError, never a crash or a partial array."""
    array = _bits("float32", 3000).reshape(30, 100)
    coder = ZstdPlanes(3)
    blob = coder.encode(array)
    shape, storage = array.shape, array.dtype
    bad = {
        "truncated": blob[: len(blob) // 2],
        "header only": blob[:6],
        "one plane short": coder.encode(array.reshape(-1)[:2250]),
        "one plane too many": ZstdPlanes(3).encode(_bits("float32", 3750)),
        "oversized (more data after the frame)": blob + blob,
        "not zstd": b"\x00" * 64,
        "empty": b"",
    }
    for what, data in bad.items():
        with pytest.raises(FormatError):
            coder.decode(data, shape, storage)
            pytest.fail(what)
    with pytest.raises(FormatError, match="rotate=16"):
        ZstdPlanes(16).decode(ZstdPlanes(15).encode(np.ones(8, np.float16)), (8,), np.dtype(np.float16))
    with pytest.raises(FormatError, match="2, 4 or 8-byte"):
        ZstdPlanes(0).decode(Zstd(1, False).encode(np.ones(8, np.uint8)), (8,), np.dtype(np.uint8))
    with pytest.raises(ValueError):
        ZstdPlanes(40).encode(np.ones(8, np.float32))
    corrupt = bytearray(blob)  # a flipped byte inside the compressed data: an error or other values, no crash
    corrupt[len(corrupt) // 2] ^= 0xFF
    try:
        coder.decode(bytes(corrupt), shape, storage)
    except FormatError:
        pass


def test_zstd_planes_decodes_in_parallel_threads():
    """Each thread has its own scratch buffer: concurrent encodes and decodes stay bit-exact."""
    arrays = [_bits(d, n) for d in ("float32", "bfloat16", "float64") for n in (_STEP + 5, 3 * _STEP, 17)]
    coder = ZstdPlanes(3)
    with ThreadPoolExecutor(4) as ex:
        blobs = list(ex.map(coder.encode, arrays * 3))
        back = list(ex.map(lambda ab: coder.decode(ab[1], ab[0].shape, ab[0].dtype), zip(arrays * 3, blobs)))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(arrays * 3, back))
    assert blobs[: len(arrays)] == [coder.encode(a) for a in arrays]


def test_lossless_save_load_is_bit_exact_for_every_dtype(tmp_path):
    """codec.save(codec='lossless') round trips fp32/bf16/fp16/fp64/int tensors bit for bit: empty, one element,
    odd sizes, NaN and infinity payloads."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38, -1.0])
    payload = torch.from_numpy(np.array([0x7FC00001, 0xFFFFFFFF, 0x7F800001], np.uint32).view(np.float32))
    sd = {"f32": torch.cat([torch.randn(999), special, payload]), "bf16": torch.randn(33, 65).to(torch.bfloat16),
          "bf16_nan": torch.from_numpy(np.array([0x7FC1, 0xFFA5, 1], np.uint16).view(np.int16)).view(torch.bfloat16),
          "f16": torch.randn(5, 7, 3).half(), "f64": torch.randn(101, dtype=torch.float64),
          "empty": torch.zeros(0, 4), "one": torch.tensor([2.5]), "scalar": torch.tensor(-3.0, dtype=torch.bfloat16),
          "i64": torch.arange(-5, 1000), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8)}
    codec.save(sd, tmp_path / "m.jwt", codec="lossless")
    out = codec.load(tmp_path / "m.jwt")
    for name, tensor in sd.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        assert out[name].view(-1).view(torch.uint8).numpy().tobytes() == \
            tensor.reshape(-1).view(torch.uint8).numpy().tobytes(), name


def test_a_1_1_reader_refuses_zstd_planes(tmp_path, monkeypatch):
    """A reader without the 1.2 codec refuses the file with UnknownCodecError instead of misdecoding it."""
    codec.save({"w": torch.randn(64, 64)}, tmp_path / "m.jwt", codec="lossless")
    monkeypatch.delitem(REGISTRY, "zstd_planes")
    with pytest.raises(UnknownCodecError, match="zstd_planes"):
        codec.load(tmp_path / "m.jwt")


@pytest.mark.parametrize("mode", ["wb", "ab", "memory"])
def test_writer_copies_its_spool_to_any_output(tmp_path, mode):
    """The spool is copied behind the index in the kernel for a plain file, and through a buffer where the kernel
    copy is refused (a file opened for appending) or impossible (BytesIO): the same bytes each way."""
    import io

    sd = {"w": torch.randn(300, 70), "b": torch.randn(70).to(torch.bfloat16), "i": torch.arange(9)}
    reference = tmp_path / "ref.jwt"
    codec.save(sd, reference, codec="lossless")
    if mode == "memory":
        out = io.BytesIO()
        codec.save(sd, out, codec="lossless")
        data = out.getvalue()
    else:
        path = tmp_path / "out.jwt"
        with open(path, mode) as f:
            codec.save(sd, f, codec="lossless")
        data = path.read_bytes()
    assert data == reference.read_bytes()
    assert all(torch.equal(codec.load(data)[k], v) for k, v in sd.items())


def _writer_bytes(dest, items, parts_for=()) -> None:
    """Write ``items`` (name, array, Encoded) with a Writer to ``dest``; those named in ``parts_for`` as a Ray
    worker hands them over: blobs appended to a part file of the writer's parts folder, ``Encoded.part`` set."""
    import dataclasses
    import os

    from codec.format import crc32
    from codec.writer import Writer

    with Writer(dest) as writer:
        for name, array, encoded in items:
            if name in parts_for:
                path = os.path.join(writer.parts_folder(), f"{len(name) % 2}.part")  # two part files
                with open(path, "ab") as f:
                    offset = f.seek(0, 2)
                    f.write(b"garbage of a lost attempt")  # bytes no entry points to
                    offset += len(b"garbage of a lost attempt")
                    for blob in encoded.blobs:
                        f.write(blob)
                encoded = dataclasses.replace(encoded, blobs=[], crcs=[crc32(b) for b in encoded.blobs],
                                              part=(path, offset, [len(b) for b in encoded.blobs]))
            writer.add(name, get_dtype("float32"), array.shape, encoded)
        folder = writer.parts_folder()
    assert not os.path.exists(folder)


@pytest.mark.parametrize("dest", ["path", "memory"])
def test_writer_assembles_part_files_and_its_spool_in_order(tmp_path, monkeypatch, dest):
    """Tensors whose blobs a Ray worker wrote to part files (Encoded.part) and tensors whose blobs the writer
    spools itself, interleaved: the output is the bytes of a writer that spooled them all, through a path (in
    the kernel, the disk writeback kicked as it copies) or a file object; the parts folder is removed; blobs
    outside the writer's parts folder are refused."""
    import io
    import os

    import codec.writer as writer_module
    from codec.tensorcodec import EncodeOptions, encode_tensor

    rng = np.random.default_rng(3)
    arrays = {f"t{i}": rng.standard_normal((64 + 16 * i, 48)).astype(np.float32) for i in range(6)}
    items = [(n, a, encode_tensor(a, get_dtype("float32"), EncodeOptions(quality=50 + 5 * i)))
             for i, (n, a) in enumerate(arrays.items())]
    _writer_bytes(tmp_path / "ref.jwt", items)
    reference = (tmp_path / "ref.jwt").read_bytes()
    kicks = []
    monkeypatch.setattr(writer_module, "COPY_CHUNK", 4096)
    real_kick = writer_module._Writeback.kick
    monkeypatch.setattr(writer_module._Writeback, "kick", lambda self: (kicks.append(1), real_kick(self)))
    for parts_for in ({"t1", "t2", "t4"}, {"t0", "t5"}, set(arrays)):
        if dest == "path":
            _writer_bytes(tmp_path / "out.jwt", items, parts_for)
            data = (tmp_path / "out.jwt").read_bytes()
        else:
            out = io.BytesIO()
            _writer_bytes(out, items, parts_for)
            data = out.getvalue()
        assert data == reference, parts_for
    assert (len(kicks) > 3) == (dest == "path")
    assert sorted(os.listdir(tmp_path)) == (["out.jwt", "ref.jwt"] if dest == "path" else ["ref.jwt"])
    import dataclasses

    from codec.writer import Writer

    name, array, encoded = items[0]
    foreign = dataclasses.replace(encoded, blobs=[], crcs=[0], part=(str(tmp_path / "ref.jwt"), 0, [10]))
    with pytest.raises(codec.EncodeError, match="not in this writer's parts folder"):
        with Writer(tmp_path / "x.jwt") as w:
            w.parts_folder()
            w.add(name, get_dtype("float32"), array.shape, foreign)
    assert not (tmp_path / "x.jwt").exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".parts")]


@pytest.fixture(params=["one call", "stream", "no imagecodecs"])
def decompress_path(request, monkeypatch):
    """Each way a frame reaches the plane buffer: imagecodecs in one call (every size), the thread's zstandard
    stream (every size), and a reader where imagecodecs has no zstd."""
    from codec.blobcodecs import zstd

    if request.param == "one call":
        monkeypatch.setattr(zstd, "_ONE_CALL_MIN", 0)
    elif request.param == "stream":
        monkeypatch.setattr(zstd, "_ONE_CALL_MIN", 1 << 62)
    else:
        monkeypatch.setattr(zstd, "_zstd_decode", None)
    return request.param


@pytest.mark.parametrize("config", [ZstdPlanes(3).get_config(), ZstdPlanes(0).get_config(),
                                    Zstd(1, True, exponent_first=True).get_config(), Zstd(9, True).get_config(),
                                    Zstd(3, False).get_config()])
def test_every_decompress_path_is_bit_exact_and_refuses_hostile_blobs(decompress_path, config):
    """The same values whichever way a frame is decompressed, for every element size, layout (rotated planes, the
    little-endian shuffle of format 1.0, none), odd and empty sizes and non-contiguous inputs; a truncated frame or
    one holding fewer bytes than the shape is a one-line FormatError on each path."""
    coder = get_codec(config)
    for dtype in ("float32", "bfloat16", "float16", "float64", "int64", "int8", "uint16"):
        storage = get_dtype(dtype).storage
        for count in (0, 1, 3, _STEP + 7):
            array = _bits(dtype, count)
            if coder.rotation is not None and storage.itemsize == 1:
                continue  # rotated planes need 2, 4 or 8-byte elements (tested above)
            blob = coder.encode(array)
            assert coder.decode(blob, array.shape, storage).tobytes() == array.tobytes(), (dtype, count)
        strided = _bits(dtype, 2 * 999)[::2]  # a non-contiguous input codes its values
        if coder.rotation is None or storage.itemsize > 1:
            blob = coder.encode(strided)
            assert coder.decode(blob, strided.shape, storage).tobytes() == strided.tobytes()
    array = _bits("float32", 3001)
    blob = coder.encode(array)
    size = array.nbytes  # a frame that declares the right size but whose one raw block holds 4 bytes fewer
    short = (b"\x28\xb5\x2f\xfd\xa0" + size.to_bytes(4, "little") + ((size - 4) << 3 | 1).to_bytes(3, "little")
             + bytes(size - 4))
    for data in (blob[: len(blob) // 2], blob[:-1], coder.encode(array[:3000]), short):
        with pytest.raises(FormatError) as info:
            coder.decode(data, array.shape, array.dtype)
        assert "\n" not in str(info.value)
        # the thread's zstd context decodes the next frame as before
        assert coder.decode(blob, array.shape, array.dtype).tobytes() == array.tobytes()


def test_reused_compressors_write_the_bytes_of_fresh_ones():
    """The thread keeps its cheap zstd contexts between calls: each frame is byte for byte what a new context
    writes, whatever was coded before it."""
    arrays = [_bits("float32", n) for n in (5000, 17, 70_000, 0, 5000)] + [np.zeros(4096, np.float32)]
    for coder in (ZstdPlanes(3), Zstd(1, True, exponent_first=True), Zstd(1, True), Zstd(-5, False)):
        for array in arrays:
            raw = coder.encode(array)
            fresh = zstandard.ZstdCompressor(compression_params=coder._params())
            content = zstandard.ZstdDecompressor().decompress(raw) if array.size else b""
            planes = np.frombuffer(content, np.uint8)
            again = zstd_module._compress_planes(fresh, planes, array.itemsize) if coder.shuffle and array.size \
                else fresh.compress(content)
            assert raw == again, coder.get_config()


def test_crc32_is_zlibs_on_every_path(monkeypatch):
    """codec.format.crc32 gives zlib's CRC-32 below and above the size where it hands over to libdeflate, and
    without imagecodecs."""
    import zlib

    from codec import format as fmt

    data = RNG.integers(0, 256, 3 * fmt._FAST_CRC_MIN, dtype=np.uint8).tobytes()
    sizes = [0, 1, fmt._FAST_CRC_MIN - 1, fmt._FAST_CRC_MIN, len(data)]
    for fast in (fmt._fast_crc32, None):
        monkeypatch.setattr(fmt, "_fast_crc32", fast)
        assert fmt.crc32(b"123456789") == 0xCBF43926
        for n in sizes:
            assert fmt.crc32(data[:n]) == zlib.crc32(data[:n]) == fmt.crc32(memoryview(data)[:n])
