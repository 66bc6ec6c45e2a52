"""The numpy core: pixel mapping, tiling, blob codecs and tensor coding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from codec import mapping, tiling
from codec.blobcodecs import REGISTRY, BlobCodec, Jpeg, JpegXL, Quant, Zstd, get_codec
from codec.blobcodecs.jpeg import ANNEX_K_LUMINANCE, quant_table
from codec.dtypes import DTYPES, from_float64, get_dtype, to_float64
from codec.errors import FormatError, UnknownCodecError
from codec.tensorcodec import EncodeOptions, encode_tensor, jxl_distance

RNG = np.random.default_rng(0)


def test_registry_holds_every_codec_class():
    """Every BlobCodec subclass (and theirs: ZstdPlanes) is registered under its own id."""
    classes = BlobCodec.__subclasses__()
    classes += [sub for cls in classes for sub in cls.__subclasses__()]
    assert set(REGISTRY) == {cls.codec_id for cls in classes} and len(REGISTRY) == len(classes)
    assert all(REGISTRY[cls.codec_id] is cls for cls in classes)


@pytest.mark.parametrize("codec", [Zstd(), Zstd(level=3, shuffle=False), Jpeg(20, "jpeg"), Jpeg(90, "flat"),
                                   Jpeg(50, list(range(1, 65))), JpegXL(1.0, 3), Quant(4), Quant(12, 3)])
def test_codec_config_round_trips_through_json(codec):
    """get_config is flat JSON and from_config rebuilds an equal codec."""
    config = json.loads(json.dumps(codec.get_config()))
    assert config["id"] == codec.codec_id
    assert get_codec(config) == codec
    assert hash(get_codec(config)) == hash(codec)  # a JPEG table is a list: hashable all the same
    assert len({codec, get_codec(config)}) == 1
    assert repr(codec).startswith(type(codec).__name__)


def test_a_codec_describes_itself_in_a_few_words():
    """Notes and `jwt show` name a codec's parameters; an explicit JPEG table is summed up, not 64 numbers."""
    assert Jpeg(3, [212] * 64).describe() == "jpeg quality=3 table=64 x 212"
    assert Jpeg(50, list(range(1, 65))).describe(sep=", ") == "jpeg quality=50, table=[1, 2, 3, ..., 64] (64 values)"
    assert Jpeg(20, "flat").describe() == "jpeg quality=20 table=flat"
    assert Quant(4, 3).describe(skip=("level",)) == "quant bits=4"


@pytest.mark.parametrize("config, error", [
    ({"id": "webp"}, UnknownCodecError),
    ({"id": "jpeg", "quality": 0, "table": "flat"}, FormatError),
    ({"id": "jpeg", "quality": 20, "table": "perceptual"}, FormatError),
    ({"id": "jpeg", "quality": 20, "table": [0] * 64}, FormatError),
    ({"id": "jpeg", "quality": True, "table": "flat"}, FormatError),
    ({"id": "zstd", "level": 3, "shuffle": 1}, FormatError),
    ({"id": "zstd", "level": 3}, FormatError),  # every listed parameter is required (spec section 5)
    ({"id": "jpegxl", "distance": -1.0, "effort": 3}, FormatError),
    ({"id": "quant", "bits": 17, "level": 3}, FormatError),
    ([], FormatError),
])
def test_bad_codec_configs_are_rejected(config, error):
    """Unknown ids and out-of-range or mistyped parameters raise the right error."""
    with pytest.raises(error):
        get_codec(config)


def test_unknown_codec_parameters_are_ignored():
    """A parameter a codec does not define is ignored, as unknown index fields are (spec section 5)."""
    assert get_codec({"id": "zstd", "level": 3, "shuffle": True, "extra": 1}).get_config() == {
        "id": "zstd", "level": 3, "shuffle": True}


def test_quant_tables_follow_libjpeg_scaling():
    """Quality 50 gives the Annex K table itself; flat tables are constant; entries stay in 1..255."""
    assert quant_table(50, "jpeg") == list(ANNEX_K_LUMINANCE)
    assert quant_table(20, "flat") == [40] * 64
    assert quant_table(100, "jpeg") == [1] * 64
    assert max(quant_table(1, "jpeg")) == 255


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shuffle", [True, False])
def test_zstd_is_bit_exact_for_every_dtype(name, shuffle):
    """The lossless blob codec returns the same bytes for every dtype and shape."""
    dtype = DTYPES[name]
    raw = RNG.integers(0, 256, size=(7, 5, dtype.itemsize), dtype=np.uint8)
    if name == "bool":
        raw &= 1
    array = raw.view(dtype.storage).reshape(7, 5)
    codec = Zstd(shuffle=shuffle)
    out = codec.decode(codec.encode(array), (7, 5), dtype.storage)
    assert out.dtype == dtype.storage and out.tobytes() == array.tobytes()
    assert out.flags.writeable


def test_zstd_refuses_wrong_sizes():
    """A frame whose content size differs from the expected size is refused before decoding."""
    blob = Zstd().encode(np.zeros(100, np.float32))
    with pytest.raises(FormatError, match="expected 800"):
        Zstd().decode(blob, (200,), np.dtype(np.float32))
    with pytest.raises(FormatError):
        Zstd().decode(b"not zstd", (1,), np.dtype(np.float32))


def test_jpeg_refuses_other_dimensions():
    """A JPEG whose frame header has other dimensions is refused before decoding."""
    blob = Jpeg(75, "flat").encode(np.zeros((16, 24), np.uint8))
    assert Jpeg().decode(blob, (16, 24), np.dtype(np.uint8)).shape == (16, 24)
    with pytest.raises(FormatError, match="expected"):
        Jpeg().decode(blob, (24, 16), np.dtype(np.uint8))


def test_jpegxl_size_header_is_parsed_for_many_shapes():
    """The JPEG XL SizeHeader parser agrees with libjxl for small, ratio and large sizes."""
    from codec.blobcodecs.jpegxl import jxl_size

    for shape in [(8, 8), (16, 24), (64, 128), (100, 130), (7, 3), (600, 450), (2000, 1)]:
        blob = JpegXL(1.0, 1).encode(np.zeros(shape, np.uint16))
        assert jxl_size(blob) == shape


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
def test_tile_params_cover_every_tile(kind):
    """Stored offset/scale are representable in their type and cover [min, max] of each tile."""
    tiles = RNG.standard_normal((50, 4, 4)) * 10.0 ** RNG.integers(-6, 3, (50, 1, 1))
    offset, scale = mapping.tile_params(tiles, 8, kind)
    lo, hi = tiles.min(axis=(1, 2)), tiles.max(axis=(1, 2))
    assert np.all(offset <= lo) and np.all(offset.astype(np.float64) + 255.0 * scale.astype(np.float64) >= hi)
    back = mapping.unpack_params(mapping.pack_params(offset, scale, kind), kind)
    assert np.array_equal(back[0], offset) and np.array_equal(back[1], scale)


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
def test_compressed_params_round_trip_bit_exact(kind):
    """The 1.4 parameter frame (spec 7) reads back to the plain blob's values bit for bit, signed zeros,
    subnormals and extremes included; the writer keeps the plain blob where the frame would save less than 1 % of
    the tensor's bytes, or when told not to compress."""
    tiles = RNG.standard_normal((300, 4, 4)) * 10.0 ** RNG.integers(-3, 1, (300, 1, 1))
    offset, scale = mapping.tile_params(tiles, 8, kind)
    offset[:4] = [0.0, -0.0, 1e-40, -3.0e38]
    scale[:4] = [0.0, 1e-45 if kind == "float32" else 9.2e-41, 3.0e38, 0.0]
    plain = mapping.pack_params(offset, scale, kind)
    packed = mapping.stored_params(offset, scale, kind, other_bytes=0)
    assert len(packed) < len(plain) == mapping.params_length(300, kind)
    assert packed == mapping.compress_params(plain, kind)
    back = mapping.unpack_params(packed, kind, 300)
    assert mapping.pack_params(*back, kind) == plain
    assert [a.view(np.uint32).tolist() for a in back] == \
        [a.view(np.uint32).tolist() for a in mapping.unpack_params(plain, kind)]
    assert mapping.unpack_params(plain, kind, 300)[1].tobytes() == back[1].tobytes()  # plain: read as it is
    saving = len(plain) - len(packed)
    assert mapping.stored_params(offset, scale, kind, other_bytes=100 * saving) == plain  # under 1 %
    assert mapping.stored_params(offset, scale, kind, other_bytes=50 * saving) == packed
    assert mapping.stored_params(offset, scale, kind, other_bytes=0, compress=False) == plain
    with pytest.raises(FormatError, match="tile parameters: zstd: frame holds"):
        mapping.unpack_params(packed, kind, 299)


@pytest.mark.parametrize("bits", [8, 16])
def test_mapping_error_is_at_most_half_a_step(bits):
    """to_pixels followed by from_pixels is within half a quantization step per tile."""
    tiles = RNG.standard_normal((20, 8, 8))
    offset, scale = mapping.tile_params(tiles, bits, "float32")
    back = mapping.from_pixels(mapping.to_pixels(tiles, offset, scale, bits), offset, scale)
    steps = np.abs(back - tiles) / scale[:, None, None]
    assert steps.max() <= 0.5 + 1e-6


def test_constant_tile_decodes_exactly():
    """A constant tile has scale 0 and decodes to its offset everywhere."""
    tiles = np.full((1, 4, 4), 0.25)
    offset, scale = mapping.tile_params(tiles, 8, "bfloat16")
    assert scale[0] == 0 and offset[0] == 0.25
    assert np.all(mapping.from_pixels(mapping.to_pixels(tiles, offset, scale, 8), offset, scale) == 0.25)


@pytest.mark.parametrize("rows, cols, tile, row_shape", [
    (100, 130, (64, 64), None), (512, 784, (64, 64), (28, 28)), (9, 8, (4, 3), None), (1000, 16, (64, 64), None),
    (8, 100000, (64, 64), None), (37, 36, (64, 64), (6, 6)),
])
def test_tiling_round_trips(rows, cols, tile, row_shape):
    """extract -> mosaic -> unmosaic -> assemble gives the matrix back, in every mode."""
    matrix = RNG.standard_normal((rows, cols))
    t = tiling.plan_tiling(rows, cols, tile, row_shape)
    tiles = tiling.extract_tiles(matrix, t)
    assert tiles.shape == (t.n_tiles, t.tile_h, t.tile_w)
    parts = []
    for k in range(t.n_blobs):
        image = tiling.to_mosaic(tiles, t, k, fill=0)
        assert image.shape == t.blob_shape(k) and image.shape[1] <= tiling.MAX_MOSAIC_WIDTH
        parts.append(tiling.from_mosaic(image, t, k))
    assert np.array_equal(tiling.assemble_tiles(np.concatenate(parts), t), matrix)


def test_rows_mode_tile_is_the_receptive_field():
    """In rows mode tile i is row i reshaped to HxW, and the seed layer packs 16 tiles a row."""
    matrix = np.arange(512 * 784, dtype=np.float64).reshape(512, 784)
    t = tiling.plan_tiling(512, 784, (64, 64), (28, 28))
    assert (t.mode, t.columns, t.n_blobs) == ("rows", 16, 1)
    tiles = tiling.extract_tiles(matrix, t)
    assert np.array_equal(tiles[5], matrix[5].reshape(28, 28))


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float64"])
def test_float_rounding_to_dtype(name):
    """from_float64 rounds half to even and to_float64 widens exactly."""
    dtype = get_dtype(name)
    values = RNG.standard_normal(1000)
    stored = from_float64(values, dtype)
    widened = to_float64(stored, dtype)
    if name == "bfloat16":
        import torch

        expected = torch.tensor(values.astype(np.float32)).bfloat16().float().numpy().astype(np.float64)
    else:
        expected = values.astype(dtype.storage).astype(np.float64)
    assert np.array_equal(widened, expected)


def _steps(original: np.ndarray, decoded: np.ndarray, enc) -> np.ndarray:
    """Per-element error in units of its tile's quantization step."""
    t = enc.tiling
    offset, scale = mapping.unpack_params(enc.blobs[0], t.params)
    err = tiling.extract_tiles(np.abs(decoded - original).reshape(t.rows, t.cols), t)
    return err / np.maximum(scale, 1e-30)[:, None, None]


@pytest.mark.parametrize("codec, quality, max_rms_steps", [("jpeg", 95, 1.0), ("jpeg", 20, 12.0), ("jpegxl", 100, 0.3),
                                                           ("jpegxl", 80, 1500.0), ("quant", 0, 0.5)])
def test_lossy_tensor_error_in_quantization_steps(codec, quality, max_rms_steps):
    """A lossy round trip stays within a quality-dependent RMS error measured in tile steps."""
    from codec.format import TensorEntry
    from codec.tensorcodec import decode_tensor

    array = np.cumsum(RNG.standard_normal((200, 300)), axis=1).astype(np.float32)
    opts = EncodeOptions(codec=codec, quality=quality) if quality else EncodeOptions(codec=codec, bits=5)
    enc = encode_tensor(array, get_dtype("float32"), opts)
    entry = TensorEntry("w", get_dtype("float32"), array.shape, enc.codec, enc.tiling)
    decoded = decode_tensor(entry, enc.blobs)
    assert decoded.dtype == np.float32 and decoded.shape == array.shape
    rms = np.sqrt(np.mean(_steps(array.astype(np.float64), decoded.astype(np.float64), enc) ** 2))
    assert rms <= max_rms_steps


def test_small_and_integer_tensors_stay_lossless():
    """1-d, integer, thinner-than-8 and tiny tensors are coded with zstd, whatever codec is asked for."""
    for codec in ("jpeg", "quant"):
        opts = EncodeOptions(codec=codec)
        for array, dtype in [(np.zeros((30, 30), np.float32), "float32"), (np.zeros(100000, np.float32), "float32"),
                             (np.zeros((300, 300), np.int32), "int32"), (np.zeros((4, 100000), np.float32), "float32"),
                             (np.zeros((1_000_000, 1), np.float32), "float32")]:
            lossless_id = "zstd" if dtype == "int32" else "zstd_planes"
            assert encode_tensor(array, get_dtype(dtype), opts).codec.codec_id == lossless_id


def test_matrices_too_small_for_jpeg_get_8_bit_quant():
    """A matrix too small for an image codec (a 10x512 output layer) is quantized to 8 bits instead."""
    array = RNG.standard_normal((10, 512)).astype(np.float32)
    enc = encode_tensor(array, get_dtype("float32"), EncodeOptions(codec="jpeg", quality=20))
    assert enc.codec == Quant(bits=8)
    assert sum(map(len, enc.blobs)) < array.nbytes / 3


def test_tall_matrices_keep_blob_images_within_the_format():
    """A 200000x8 matrix is split so that no blob image is over 65535 pixels high."""
    t = tiling.plan_tiling(200_000, 8, (64, 64), None)
    assert max(t.blob_shape(k)[0] for k in range(t.n_blobs)) <= 65535


def test_non_finite_tensor_falls_back_to_lossless():
    """A tensor with NaN/Inf is stored bit-exactly with a reason, never mapped to pixels."""
    array = RNG.standard_normal((200, 200)).astype(np.float32)
    array[3, 4] = np.nan
    enc = encode_tensor(array, get_dtype("float32"), EncodeOptions())
    assert enc.codec.codec_id == "zstd_planes" and "NaN" in enc.fallback


def test_jxl_distance_matches_libjxl_rule():
    """quality -> distance follows JxlEncoderDistanceFromQuality at its breakpoints."""
    assert jxl_distance(100) == 0.0
    assert jxl_distance(90) == pytest.approx(1.0)
    assert jxl_distance(30) == pytest.approx(6.4)
    assert jxl_distance(10) == pytest.approx(53 / 30 - 11.5 + 25)


def test_quant_rejects_pixels_beyond_its_bits():
    """A quant blob holding a value over 2**bits - 1, or set unused bits when packed, is refused."""
    blob = Quant(bits=6).encode(np.full((4, 4), 40, np.uint8))
    with pytest.raises(FormatError, match="exceeds 5 bits"):
        Quant(bits=5).decode(blob, (4, 4), np.dtype(np.uint8))
    packed3 = Zstd(shuffle=False).encode(np.full(8, 0b1100_0000, np.uint8))  # two 3-bit pixels use 6 bits
    with pytest.raises(FormatError, match="unused high bits"):
        Quant(bits=3).decode(packed3, (4, 4), np.dtype(np.uint8))
    tail = Zstd(shuffle=False).encode(np.full(8, 0xFF, np.uint8))  # 15 4-bit pixels + a non-zero pad
    with pytest.raises(FormatError, match="padding"):
        Quant(bits=4).decode(tail, (3, 5), np.dtype(np.uint8))


@pytest.mark.parametrize("bits", range(1, 17))
def test_quant_packs_and_unpacks_every_width(bits):
    """Pixels of every width round-trip exactly, packed 8//bits a byte up to 4 bits."""
    pixels = RNG.integers(0, 1 << bits, size=(7, 9)).astype(np.uint8 if bits <= 8 else np.uint16)
    codec = Quant(bits=bits)
    assert np.array_equal(codec.decode(codec.encode(pixels), (7, 9), pixels.dtype), pixels)


def test_auto_codec_follows_the_options_given():
    """codec="auto" is quant 8-bit by default, jpeg with a quality/table/row shape, jpegxl with a distance."""
    assert (EncodeOptions().codec, EncodeOptions().bits) == ("quant", 8)
    assert EncodeOptions(quality=20).codec == "jpeg" and EncodeOptions(row_shape=(28, 28)).codec == "jpeg"
    assert EncodeOptions(table="flat").codec == "jpeg" and EncodeOptions(distance=1.0).codec == "jpegxl"
    assert EncodeOptions(codec="jpeg").image_codec("grid").quality == 90  # the default JPEG quality
