"""Output-weighted pruning of JPEG coefficients (codec.rd.rdo) and its use by repair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from codec import mapping
from codec.blobcodecs.jpeg import quant_table
from codec.dtypes import get_dtype
from codec.format import TensorEntry
from codec.rd.gptq import output_error
from codec.rd.rdo import (_code_lengths, _Trellis, applies, estimated_bytes, fit_pruned, prune_coefficients,
                          unit_sensitivity)
from codec.rd.repair import RepairSettings, repair
from codec.rd.repair import output_error as model_error
from codec.rd.repair.losses import _flat, _run
from codec.tensorcodec import EncodeOptions, _map_blob, decode_tensor, encode_tensor
from codec.tiling import plan_tiling

F32 = get_dtype("float32")
ROWS = EncodeOptions(codec="jpeg", quality=10, table="ramp2", row_shape=(16, 16))
GRID = EncodeOptions(codec="jpeg", quality=10, table="flat", tile=(16, 64))


def code(array: np.ndarray, opts: EncodeOptions) -> tuple[np.ndarray, int, list[bytes]]:
    encoded = encode_tensor(array, F32, opts)
    entry = TensorEntry("w", F32, array.shape, encoded.codec, encoded.tiling)
    return decode_tensor(entry, encoded.blobs).astype(np.float64), sum(len(b) for b in encoded.blobs), encoded.blobs


def receptive_fields(rows: int = 96, seed: int = 0) -> np.ndarray:
    """Smooth 16x16 'receptive fields' with some noise, as a first layer over images has."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    fields = [np.sin(rng.uniform(1, 6) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 6) * yy)
              + 0.05 * rng.standard_normal((16, 16)) for _ in range(rows)]
    return (np.stack(fields).reshape(rows, 256) * rng.uniform(0.02, 0.2, (rows, 1))).astype(np.float32)


def weights(rows: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit sensitivities spread over three decades, a quarter of them dead (zero), and input energies low at the
    image's border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    border = np.minimum(np.minimum(yy, 15 - yy), np.minimum(xx, 15 - xx))
    return 10.0 ** rng.uniform(-3, 0, rows) * (rng.uniform(size=rows) > 0.25), (0.05 + border / 8.0).reshape(-1)


def test_applies_to_jpeg_in_rows_mode_and_grid_tiles():
    assert applies(ROWS, (96, 256), F32) and applies(ROWS, (96, 1, 16, 16), F32)
    assert applies(ROWS, (96, 255), F32)  # the rows are not 16x16 images: grid tiles
    assert applies(GRID, (96, 256), F32)
    assert not applies(ROWS, (16, 256), F32)  # too small for JPEG: stored as quant
    assert not applies(ROWS, (96, 256), get_dtype("int32"))
    assert not applies(EncodeOptions(codec="quant", row_shape=(16, 16)), (96, 256), F32)


def params(blob: bytes, opts: EncodeOptions) -> bytes:
    """The plain form of a parameter blob (the writer may store it as a zstd frame, format 1.4)."""
    n_tiles = plan_tiling(96, 256, opts.tile, opts.row_shape, opts.params).n_tiles
    return mapping.pack_params(*mapping.unpack_params(blob, opts.params, n_tiles), opts.params)


@pytest.mark.parametrize("opts", [ROWS, GRID], ids=["rows", "grid"])
def test_no_pruning_codes_the_same_pixels_and_pruning_keeps_every_tile_range(opts):
    w = receptive_fields()
    rows, cols = weights()
    plain = code(w, opts)
    same = code(prune_coefficients(w, F32, opts, rows, cols, 0.0), opts)
    assert same[2] == plain[2]  # bit-identical blobs: offsets/scales and image
    tiles = lambda a: a.reshape(6, 16, 4, 64).transpose(0, 2, 1, 3).reshape(24, -1)  # noqa: E731 (GRID's 16x64)
    sizes = []
    for lam in (10.0, 100.0, 1000.0):
        pruned = prune_coefficients(w, F32, opts, rows, cols, lam)
        assert pruned.dtype == w.dtype and pruned.shape == w.shape
        split = (lambda a: a) if opts is ROWS else tiles
        assert np.array_equal(split(pruned).min(1), split(w).min(1))
        assert np.array_equal(split(pruned).max(1), split(w).max(1))
        coded = code(pruned, opts)
        assert params(coded[2][0], opts) == params(plain[2][0], opts)  # the per-tile offset/scale
        sizes.append(coded[1])
    assert sizes[0] < plain[1] and sizes[2] < sizes[0]


@pytest.mark.parametrize("opts", [ROWS.with_(quality=q) for q in (5, 20, 60)]
                         + [GRID.with_(quality=q) for q in (5, 30)],
                         ids=["rows q5", "rows q20", "rows q60", "grid q5", "grid q30"])
def test_the_rate_model_follows_real_jpeg_sizes(opts):
    """:func:`estimated_bytes` (the pruning's rate model: each symbol at its length in the image's own Huffman code)
    against the blobs the encoder writes, plain and pruned: within 1.5 %."""
    w = receptive_fields(192)
    rows, cols = weights(192)
    t = plan_tiling(192, 256, opts.tile, opts.row_shape, opts.params)
    table = quant_table(opts.quality, opts.image_codec(t.mode).table)
    for lam in (0.0, 30.0, 3000.0):
        value = prune_coefficients(w, F32, opts, rows, cols, lam)
        real = sum(map(len, code(value, opts)[2][1:]))  # the image blobs, less the offset/scale blob
        estimate = sum(estimated_bytes(_map_blob(value, F32, t, 8, k)[2], table) for k in range(t.n_blobs))
        assert abs(estimate / real - 1) < 0.015, (lam, estimate, real)


def test_the_trellis_keeps_the_cheapest_set_of_coefficients():
    """Against every subset of a block's nonzero AC coefficients: ``dropped gains + lam * bits``, a kept
    coefficient costing its ``(run, size)`` code (plus a ZRL a 16 zeros) and ``size`` bits, and the block an EOB
    unless its last coefficient is kept."""
    rng = np.random.default_rng(0)
    levels = np.zeros((40, 64))
    for b in range(40):
        pos = rng.choice(np.arange(1, 64), rng.integers(0, 7), replace=False)
        levels[b, pos] = rng.choice([-5, -2, -1, 1, 1, 3, 9], len(pos))
    levels[0, 63] = 1  # a block ending on its last coefficient: no EOB
    levels[1, [1, 40]] = [1, 2]  # a run of 38 zeros: two ZRLs
    gains = rng.exponential(20.0, (40, 64))
    lengths = _code_lengths(rng.integers(0, 50, 256).astype(float))

    def cost(b: int, keep: list[int], lam: float) -> float:
        bits, prev = 0.0, 0
        for p in keep:
            run, size = p - prev - 1, int(np.abs(levels[b, p])).bit_length()
            bits += run // 16 * lengths[0xF0] + lengths[(run % 16) * 16 + size] + size
            prev = p
        bits += lengths[0x00] if prev < 63 else 0.0
        return sum(gains[b, p] for p in np.flatnonzero(levels[b]) if p not in keep) + lam * bits

    for lam in (0.5, 3.0, 20.0):
        drop = _Trellis(levels, gains, lengths).drop(lam)
        for b in range(40):
            nonzero = [int(p) for p in np.flatnonzero(levels[b])]
            assert not drop[b][levels[b] == 0].any()
            kept = [p for p in nonzero if not drop[b, p]]
            best = min(cost(b, [p for i, p in enumerate(nonzero) if m >> i & 1], lam) for m in range(1 << len(nonzero)))
            assert cost(b, kept, lam) == pytest.approx(best)
    assert not _Trellis(levels, gains, lengths).drop(0.0).any()


def test_pruning_at_a_higher_quality_beats_the_plain_quality_at_equal_size():
    """The property the repair relies on: under the weighted error, a higher quality pruned to the plain
    quality's bytes codes the layer better than the plain quality does."""
    w = receptive_fields()
    rows, cols = weights()
    h = np.diag(cols)
    ref = w.astype(np.float64) * np.sqrt(rows)[:, None]
    plain_decoded, plain_size, _ = code(w, ROWS)
    higher = ROWS.with_(quality=20)
    found = fit_pruned(w, F32, higher, rows, cols, plain_size, lambda a: code(a, higher)[:2])
    assert found is not None
    value, decoded, size = found
    assert size <= plain_size
    assert np.array_equal(code(value, higher)[0], decoded)
    weighted = output_error(ref, decoded * np.sqrt(rows)[:, None], h)
    assert weighted < 0.8 * output_error(ref, plain_decoded * np.sqrt(rows)[:, None], h)


def test_fit_pruned_gives_none_when_nothing_fits_and_leaves_other_codecs_alone():
    w = receptive_fields()
    rows, cols = weights()
    assert fit_pruned(w, F32, ROWS, rows, cols, 100, lambda a: code(a, ROWS)[:2]) is None
    for opts in (EncodeOptions(codec="quant", row_shape=(16, 16)), EncodeOptions(codec="lossless")):
        assert prune_coefficients(w, F32, opts, rows, cols, 10.0) is w
    small = w[:4]  # too small for JPEG: coded as quant
    assert prune_coefficients(small, F32, ROWS, rows[:4], cols, 10.0) is small


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 96)
        self.fc2 = nn.Linear(96, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def two_layer(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = TwoLayer().eval()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.from_numpy(receptive_fields(seed=seed)))
        model.fc2.weight.mul_(torch.from_numpy(np.sqrt(weights(seed=seed)[0])).float())  # units matter unequally
    g = torch.Generator().manual_seed(seed + 1)
    x = nn.functional.interpolate(torch.randn(256, 1, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    return model, list(x.split(64))


def test_unit_sensitivity_matches_the_jacobian():
    """A ReLU layer's unit j moves the logits by fc2[:, j] where it fires: g_j = P(a_j > 0) ||fc2[:, j]||^2 / RMS^2."""
    model, data = two_layer()
    with torch.no_grad():
        refs = [[model(b)] for b in data]
        x = torch.cat(data).flatten(1)
        fires = (model.fc1(x) > 0).double()
        col = model.fc2.weight.double().pow(2).sum(0)
        rms2 = torch.stack([r[0].double().pow(2).mean() for r in refs])
        exact = sum((fires[i * 64:(i + 1) * 64].sum(0) * col / rms2[i]) for i in range(len(data))) / len(x)
    g = unit_sensitivity(model, model.fc1, data, refs, _run, _flat, probes=32)
    assert g.shape == (96,)
    assert np.allclose(g, exact.numpy(), rtol=0.15, atol=1e-3 * float(exact.max()))
    assert np.array_equal(g, unit_sensitivity(model, model.fc1, data, refs, _run, _flat, probes=32))
    assert not model.fc1._forward_hooks


@pytest.mark.parametrize("opts, factor", [(ROWS, 0.9), (GRID, 1.0)], ids=["rows", "grid"])
def test_repair_with_pruning_lowers_the_error_within_the_plan_and_reencodes_exactly(opts, factor):
    model, data = two_layer(1)
    options = {n: opts if n == "fc1.weight" else EncodeOptions(codec="lossless") for n in model.state_dict()}
    with torch.no_grad():
        refs = [[model(b)] for b in data]
    planned = code(model.fc1.weight.detach().numpy(), opts)[1]
    errors = {}
    for on in (False, True):
        result = repair(model, data, options, settings=RepairSettings(prune=on, prune_grid=True))
        used = result.options.get("fc1.weight", opts)
        target = result.targets.get("fc1.weight", model.fc1.weight.detach().numpy())  # absent: the original
        decoded, size, _ = code(target, used)
        assert size <= planned
        assert np.array_equal(decoded, result.model.fc1.weight.detach().double().numpy())
        errors[on] = model_error(result.model, data, refs)
    assert used.quality > opts.quality  # the pruned coding at a higher quality won
    assert errors[True] < factor * errors[False]


@pytest.mark.parametrize("opts", [EncodeOptions(codec="quant", bits=3), GRID], ids=["quant", "grid"])
def test_repair_is_the_same_with_pruning_on_where_it_does_not_prune(opts):
    """``quant`` weights, and JPEG in grid tiles without ``prune_grid`` (the default): repair gives the very same
    targets and options with pruning on and off."""
    model, data = two_layer(2)
    options = {n: opts if n == "fc1.weight" else EncodeOptions(codec="lossless") for n in model.state_dict()}
    on, off = (repair(model, data, options, settings=RepairSettings(prune=p)) for p in (True, False))
    assert on.options == off.options and on.targets.keys() == off.targets.keys()
    assert all(np.array_equal(on.targets[k], off.targets[k]) for k in on.targets)
