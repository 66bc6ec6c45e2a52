"""Output-weighted pruning of JPEG coefficients (codec.rd.rdo) and its use by repair."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from codec.dtypes import get_dtype
from codec.format import TensorEntry
from codec.rd.gptq import output_error
from codec.rd.rdo import applies, fit_pruned, prune_coefficients, unit_sensitivity
from codec.rd.repair import RepairSettings, _flat, _run, repair
from codec.rd.repair import output_error as model_error
from codec.tensorcodec import EncodeOptions, decode_tensor, encode_tensor

F32 = get_dtype("float32")
ROWS = EncodeOptions(codec="jpeg", quality=10, table="ramp2", row_shape=(16, 16))


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


def test_applies_to_rows_mode_jpeg_only():
    assert applies(ROWS, (96, 256), F32) and applies(ROWS, (96, 1, 16, 16), F32)
    assert not applies(ROWS, (96, 255), F32)  # the rows are not 16x16 images: grid mode
    assert not applies(ROWS, (16, 256), F32)  # too small for JPEG: stored as quant
    assert not applies(ROWS, (96, 256), get_dtype("int32"))
    assert not applies(EncodeOptions(codec="jpeg", quality=10, tile=(16, 64)), (96, 256), F32)
    assert not applies(EncodeOptions(codec="quant", row_shape=(16, 16)), (96, 256), F32)


def test_no_pruning_codes_the_same_pixels_and_pruning_keeps_every_tile_range():
    w = receptive_fields()
    rows, cols = weights()
    plain = code(w, ROWS)
    same = code(prune_coefficients(w, F32, ROWS, rows, cols, 0.0), ROWS)
    assert same[2] == plain[2]  # bit-identical blobs: offsets/scales and image
    sizes = []
    for lam in (10.0, 100.0, 1000.0):
        pruned = prune_coefficients(w, F32, ROWS, rows, cols, lam)
        assert pruned.dtype == w.dtype and pruned.shape == w.shape
        assert np.array_equal(pruned.min(1), w.min(1)) and np.array_equal(pruned.max(1), w.max(1))
        coded = code(pruned, ROWS)
        assert coded[2][0] == plain[2][0]  # the per-tile offset/scale blob
        sizes.append(coded[1])
    assert sizes[0] < plain[1] and sizes[2] < sizes[0]


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
    for opts in (EncodeOptions(codec="quant", row_shape=(16, 16)), EncodeOptions(codec="jpeg", quality=10)):
        assert prune_coefficients(w, F32, opts, rows, cols, 10.0) is w


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


def test_repair_with_pruning_lowers_the_error_within_the_plan_and_reencodes_exactly():
    model, data = two_layer(1)
    options = {n: ROWS if n == "fc1.weight" else EncodeOptions(codec="lossless") for n in model.state_dict()}
    with torch.no_grad():
        refs = [[model(b)] for b in data]
    planned = code(model.fc1.weight.detach().numpy(), ROWS)[1]
    errors = {}
    for on in (False, True):
        result = repair(model, data, options, settings=RepairSettings(prune=on))
        used = result.options.get("fc1.weight", ROWS)
        target = result.targets["fc1.weight"]
        decoded, size, _ = code(target, used)
        assert size <= planned
        assert np.array_equal(decoded, result.model.fc1.weight.detach().double().numpy())
        errors[on] = model_error(result.model, data, refs)
    assert used.quality > ROWS.quality  # the pruned coding at a higher quality won
    assert errors[True] < 0.9 * errors[False]


def test_repair_without_a_rows_mode_jpeg_weight_is_the_same_with_pruning_on():
    """Grid tiles (the CNNs, MiniLM): pruning does not apply, and repair gives the very same targets and options."""
    model, data = two_layer(2)
    grid = EncodeOptions(codec="jpeg", quality=10, tile=(32, 64))
    options = {n: grid if n == "fc1.weight" else EncodeOptions(codec="lossless") for n in model.state_dict()}
    on, off = (repair(model, data, options, settings=RepairSettings(prune=p)) for p in (True, False))
    assert on.options == off.options and on.targets.keys() == off.targets.keys()
    assert all(np.array_equal(on.targets[k], off.targets[k]) for k in on.targets)
