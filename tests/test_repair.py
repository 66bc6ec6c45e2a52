"""Coding with repair (codec.rd.repair) and GPTQ rounding (codec.rd.gptq) on tiny models."""

from __future__ import annotations

import copy
import math
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from codec.api import to_numpy, to_torch
from codec.dtypes import get_dtype
from codec.format import TensorEntry
from codec.rd.gptq import gptq_target, jpeg_target, output_error
from codec.rd import ladder
from codec.rd.repair import RepairSettings, code_with_repair, forward_order, repair
from codec.rd.repair import output_error as model_error
from codec.rd.repair.budget import _code_within, _coded_target, _fit_size
from codec.rd.repair.fit import _HeldOut, _LayerFit
from codec.rd.repair.slots import _slots
from codec.tensorcodec import EncodeOptions, decode_tensor, encode_tensor

F32 = get_dtype("float32")
FAST = RepairSettings(steps=3, final_steps=5, lr=1e-3)


class Tiny(nn.Module):
    """conv 4->16 (3x3) -> linear 1024->32 -> linear 32->48, declared out of forward order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 48)
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 32)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(h)))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().eval()


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n * 32, 4, 4, 4, generator=g)
    x = nn.functional.interpolate(base, size=(8, 8), mode="bilinear")  # smooth, correlated inputs
    return list((x + 0.3).split(32))


def quant_options(model: nn.Module, bits: int = 2) -> dict[str, EncodeOptions]:
    lossy = EncodeOptions(codec="quant", bits=bits, tile=(8, 64))
    return {n: lossy if t.dim() > 1 else EncodeOptions(codec="lossless") for n, t in model.state_dict().items()}


def code_file(state_dict: dict, options: dict, targets: dict) -> dict[str, torch.Tensor]:
    """What a reader decodes when ``targets`` (else the original values) are encoded with ``options``."""
    out = {}
    for name, tensor in state_dict.items():
        array, dtype_name = to_numpy(tensor)
        array = targets.get(name, array)
        dtype = get_dtype(dtype_name)
        encoded = encode_tensor(array, dtype, options[name])
        entry = TensorEntry(name, dtype, tuple(array.shape), encoded.codec, encoded.tiling)
        out[name] = to_torch(decode_tensor(entry, encoded.blobs), dtype_name)
    return out


def decoded_model(model, options, targets):
    coded = copy.deepcopy(model)
    coded.load_state_dict(code_file(model.state_dict(), options, targets))
    return coded


def test_targets_reencode_to_the_repaired_model_and_lower_the_error():
    model, data = tiny_model(), batches()
    options = quant_options(model)
    result = repair(model, data, options, settings=FAST)
    assert {"conv.weight", "fc.weight", "head.weight", "fc.bias"} <= set(result.targets)
    decoded = code_file(model.state_dict(), options, result.targets)
    for name, value in result.model.state_dict().items():
        assert torch.equal(decoded[name], value), name  # bit-exact: what the repair assumed is what is decoded
    with torch.no_grad():
        refs = [[model(b)] for b in data]
    plain = model_error(decoded_model(model, options, {}), data, refs)
    repaired = model_error(decoded_model(model, options, result.targets), data, refs)
    assert repaired < 0.5 * plain
    assert result.notes and all("\n" not in n for n in result.notes)


def test_each_technique_alone_lowers_the_error():
    model, data = tiny_model(2), batches()
    options = quant_options(model, bits=3)
    with torch.no_grad():
        refs = [[model(b)] for b in data]
    plain = model_error(decoded_model(model, options, {}), data, refs)
    alone = {
        "gptq": RepairSettings(steps=0, final_steps=0, refit=False, bias_correction=False),
        "bias": RepairSettings(steps=0, final_steps=0, refit=False, gptq=False),
        "refit": RepairSettings(steps=0, final_steps=0, gptq=False, bias_correction=False),
        "distill": RepairSettings(steps=10, final_steps=10, lr=1e-3, refit=False, gptq=False, bias_correction=False),
    }
    for label, settings in alone.items():
        targets, _, _ = code_with_repair(model, data, options, settings=settings)
        assert model_error(decoded_model(model, options, targets), data, refs) < plain, label


def test_jpeg_compensation_alone_lowers_the_error_within_the_planned_size():
    """Repair with JPEG compensation only: exact re-encode, lower model error, no tensor larger than planned."""
    model, data = tiny_model(3), batches()
    jpeg = EncodeOptions(codec="jpeg", quality=50, tile=(16, 64))
    options = {n: jpeg if t.dim() > 1 and t.numel() >= 16384 else EncodeOptions(codec="lossless")
               for n, t in model.state_dict().items()}
    assert options["fc.weight"] == jpeg
    with torch.no_grad():
        refs = [[model(b)] for b in data]
    errors, sizes = {}, {}
    for on in (False, True):
        settings = RepairSettings(refit=False, gptq=False, bias_correction=False, compensate=on)
        result = repair(model, data, options, settings=settings)
        used = {**options, **result.options}  # the planned quality, or a cheaper one where that codes better
        decoded = code_file(model.state_dict(), used, result.targets)
        assert all(torch.equal(decoded[k], v) for k, v in result.model.state_dict().items())
        errors[on] = model_error(result.model, data, refs)
        array = result.targets.get("fc.weight", to_numpy(model.fc.weight)[0])
        sizes[on] = sum(len(b) for b in encode_tensor(array, F32, used["fc.weight"]).blobs)
    assert errors[True] < 0.8 * errors[False]
    assert sizes[True] <= sizes[False]


@pytest.mark.parametrize("sensitivity", [False, True])
def test_scoring_a_jpeg_coding_holds_one_float64_copy_of_the_weight(monkeypatch, sensitivity):
    """Repair scores each JPEG coding of a layer by ``tr(dW H dW^T)``: when the sum is taken, the difference is the
    only float64 array of the weight's size alive (the reference is widened a band of rows at a time into it, not
    as a whole copy beside it), with and without unit sensitivities weighting the rows."""
    import tracemalloc

    model, data = tiny_model(3), batches()
    jpeg = EncodeOptions(codec="jpeg", quality=50, tile=(16, 64))
    options = {n: jpeg if n == "fc.weight" else EncodeOptions(codec="lossless") for n in model.state_dict()}
    settings = RepairSettings(refit=False, gptq=False, bias_correction=False, steps=0, final_steps=0,
                              prune=sensitivity, prune_grid=sensitivity)  # unit sensitivities for grid tiles too
    from codec.rd import gptq

    size = model.fc.weight.numel() * 8
    scored, seen = gptq.quadratic_error, []

    def counted(diff, *args, **kwargs):  # the score, from H's triangle (gptq.HeldInFactor.quadratic_error)
        if diff.size * 8 == size:
            traces = tracemalloc.take_snapshot().traces
            seen.append(sum(t.size == size for t in traces))
        return scored(diff, *args, **kwargs)

    monkeypatch.setattr(gptq, "quadratic_error", counted)
    tracemalloc.start()
    try:
        repair(model, data, options, settings=settings)
    finally:
        tracemalloc.stop()
    assert seen and max(seen) == 1, seen


def test_stepping_down_a_jpeg_layer_keeps_no_earlier_step(monkeypatch):
    """Keep-size steps a compensated JPEG layer down to cheaper qualities when its planned coding does not fit (a
    negative credit: no blending) and bisects the table scales between: while a step is coded, no earlier step that
    did not fit is alive, nor the plan's compensated target or the original's decoded values (float32 arrays of
    the weight's size: at most the best step so far, its target and decoded values, besides the one made)."""
    import tracemalloc

    from codec.rd.repair import budget as budget_module

    model, data = tiny_model(5), batches()
    jpeg = EncodeOptions(codec="jpeg", quality=40, table="ramp2", tile=(16, 64))
    options = {n: jpeg if n == "fc.weight" else EncodeOptions(codec="lossless") for n in model.state_dict()}
    settings = RepairSettings(refit=False, gptq=False, bias_correction=False, steps=0, final_steps=0, prune=False)
    size = model.fc.weight.numel() * 4
    coded_target, fit_size, counts = budget_module._coded_target, budget_module._fit_size, []

    def counted(slot, *args, **kwargs):
        if slot.name == "fc.weight":
            counts[-1].append(sum(t.size == size for t in tracemalloc.take_snapshot().traces))
        return coded_target(slot, *args, **kwargs)

    def in_debt(slot, layer, opts, settings, executor, credit, blend=True, **kwargs):  # after a tensor that overran
        counts.append([])
        return fit_size(slot, layer, opts, settings, executor, min(credit, -1), blend, **kwargs)

    monkeypatch.setattr(budget_module, "_coded_target", counted)
    monkeypatch.setattr(budget_module, "_fit_size", in_debt)
    tracemalloc.start()
    try:
        result = repair(model, data, options, settings=settings)
    finally:
        tracemalloc.stop()
    assert "fc.weight" in result.options and max(map(len, counts)) >= 3, counts  # stepped down, then bisected
    assert all(max(steps) - steps[0] <= 2 for steps in counts if steps), counts


@pytest.mark.parametrize("quality,row_shape", [(3, (32, 32)), (5, (16, 64)), (30, None)])
def test_jpeg_repair_never_codes_a_tensor_over_its_plan(quality, row_shape):
    """Whichever of its codings repair keeps for a jpeg layer (compensated, cheaper, plain), none outgrows the plan
    when the plain coding fits: low qualities are where compensated values code much larger."""
    model, data = tiny_model(5), batches()
    jpeg = EncodeOptions(codec="jpeg", quality=quality, table="ramp2", tile=(16, 64), row_shape=row_shape)
    options = {n: jpeg if n == "fc.weight" else EncodeOptions(codec="lossless") for n in model.state_dict()}
    settings = RepairSettings(refit=False, gptq=False, bias_correction=False)
    result = repair(model, data, options, settings=settings)
    used = result.options.get("fc.weight", jpeg)
    array = result.targets.get("fc.weight", to_numpy(model.fc.weight)[0])
    planned = sum(len(b) for b in encode_tensor(to_numpy(model.fc.weight)[0], F32, jpeg).blobs)
    assert sum(len(b) for b in encode_tensor(array, F32, used).blobs) <= planned


def test_original_model_untouched_and_deterministic():
    model, data = tiny_model(), batches()
    model.train()
    before = copy.deepcopy(model.state_dict())
    options = quant_options(model)
    first, _, _ = code_with_repair(model, data, options, settings=FAST)
    second, _, _ = code_with_repair(model, iter(data), options, settings=FAST)  # a one-shot iterator works too
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_forward_order_follows_calls_not_declaration():
    model = tiny_model()
    assert [m for m in forward_order(model, batches(1)[0]) if not isinstance(m, Tiny)] == \
        [model.conv, model.fc, model.head]


def test_dict_batches_as_keyword_arguments():
    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.proj = nn.Linear(32, 64)

        def forward(self, input_ids, scale):
            return {"last_hidden_state": self.proj(self.emb(input_ids)) * scale, "ids": input_ids}

    torch.manual_seed(0)
    model = Keyed()
    data = [{"input_ids": torch.randint(0, 64, (8, 5)), "scale": torch.tensor(2.0)} for _ in range(3)]
    options = quant_options(model, bits=3)
    result = repair(model, data, options, settings=FAST)
    decoded = code_file(model.state_dict(), options, result.targets)
    assert all(torch.equal(decoded[k], v) for k, v in result.model.state_dict().items())


@pytest.mark.parametrize("bits,tile,act_order", [(2, (8, 64), False), (3, (64, 64), True), (4, (16, 32), False)])
def test_gptq_lowers_output_error_and_reencodes_exactly(bits, tile, act_order):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((40, 96)) * 0.05).astype(np.float32)
    x = rng.standard_normal((2000, 96)) @ rng.standard_normal((96, 96)) + 0.5
    h = x.T @ x / len(x)
    opts = EncodeOptions(codec="quant", bits=bits, tile=tile)

    def code(array):
        encoded = encode_tensor(array, F32, opts)
        return decode_tensor(TensorEntry("w", F32, array.shape, encoded.codec, encoded.tiling), encoded.blobs)

    target, assumed = gptq_target(w, F32, opts, h, act_order=act_order)
    again = code(target).astype(np.float64)
    assert np.array_equal(again, assumed)  # the encoder keeps the tiles' parameters and the chosen pixels
    ref = w.astype(np.float64)
    assert output_error(ref, again, h) < 0.8 * output_error(ref, code(w).astype(np.float64), h)


def test_gptq_leaves_other_codecs_and_small_tensors_alone():
    w = np.ones((40, 96), np.float32)
    h = np.eye(96)
    for opts in (EncodeOptions(codec="jpeg"), EncodeOptions(codec="lossless")):
        target, assumed = gptq_target(w, F32, opts, h)
        assert target is w and assumed is None
    small = np.ones((4, 96), np.float32)
    assert gptq_target(small, F32, EncodeOptions(codec="quant"), h)[1] is None
    with pytest.raises(ValueError, match="H is"):
        gptq_target(w, F32, EncodeOptions(codec="quant"), np.eye(5))


def _correlated_layer(seed: int, rows: int = 96, cols: int = 192):
    """A weight and the second moment of correlated inputs (mixed Gaussian features, as a layer's activations)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3000, cols)) @ rng.standard_normal((cols, cols)) / np.sqrt(cols) + 0.3
    return w, x.T @ x / len(x)


@pytest.mark.parametrize("quality,tile,row_shape,factor", [(40, (16, 32), None, 0.8), (75, (64, 64), None, 0.8),
                                                           (85, (8, 16), None, 0.8), (70, (64, 64), (12, 16), 0.9)])
def test_jpeg_compensation_lowers_output_error_at_equal_size(quality, tile, row_shape, factor):
    """Grid tiles: columns of tiles compensate the ones after them; rows mode: 8x8 blocks of each row's image
    (fewer, and JPEG blocks straddle tiles in the mosaic, so less gain)."""
    w, h = _correlated_layer(quality)
    opts = EncodeOptions(codec="jpeg", quality=quality, tile=tile, row_shape=row_shape)

    def code(array):
        encoded = encode_tensor(array, F32, opts)
        entry = TensorEntry("w", F32, array.shape, encoded.codec, encoded.tiling)
        return decode_tensor(entry, encoded.blobs).astype(np.float64), sum(len(b) for b in encoded.blobs)

    target, assumed = jpeg_target(w, F32, opts, h)
    again, size = code(target)
    assert np.array_equal(again, assumed)  # what it says the target decodes to
    alone, none = jpeg_target(w, F32, opts, h, decoded=False)  # repair's way: its own coding decodes the target
    assert none is None and np.array_equal(alone.view(np.uint32), target.view(np.uint32))
    plain, plain_size = code(w)
    assert size <= 1.02 * plain_size
    ref = w.astype(np.float64)
    assert output_error(ref, again, h) < factor * output_error(ref, plain, h)


def test_jpeg_compensation_leaves_other_codecs_and_single_groups_alone():
    w, h = _correlated_layer(0)
    for opts in (EncodeOptions(codec="quant"), EncodeOptions(codec="jpegxl"), EncodeOptions(codec="lossless"),
                 EncodeOptions(codec="jpeg", tile=(64, 256))):  # one column of tiles: nothing after it to compensate
        target, assumed = jpeg_target(w, F32, opts, h)
        assert target is w and assumed is None
    with pytest.raises(ValueError, match="H is"):
        jpeg_target(w, F32, EncodeOptions(codec="jpeg"), np.eye(5))


def test_factor_shared_between_codings_of_one_layer():
    """The inverse Cholesky factor kept in ``factors`` serves later codings bit for bit: JPEG compensation at two
    qualities and GPTQ (the same natural column order in grid tiles: one factor for all three)."""
    w, h = _correlated_layer(3)
    factors = {}
    for opts in (EncodeOptions(codec="jpeg", quality=60, tile=(16, 32)), EncodeOptions(codec="jpeg", quality=40,
                                                                                      tile=(16, 32))):
        shared, alone = jpeg_target(w, F32, opts, h, factors=factors), jpeg_target(w, F32, opts, h)
        assert all(np.array_equal(a, b) for a, b in zip(shared, alone))
    quant = EncodeOptions(codec="quant", bits=3, tile=(8, 64))
    shared, alone = gptq_target(w, F32, quant, h, factors=factors), gptq_target(w, F32, quant, h)
    assert all(np.array_equal(a, b) for a, b in zip(shared, alone))
    assert len(factors) == 1
    rows = EncodeOptions(codec="jpeg", quality=60, tile=(64, 64), row_shape=(12, 16))  # another order: its own
    shared, alone = jpeg_target(w, F32, rows, h, factors=factors), jpeg_target(w, F32, rows, h)
    assert all(np.array_equal(a, b) for a, b in zip(shared, alone)) and len(factors) == 2


def _spd(cols: int, seed: int, dead: bool = False) -> np.ndarray:
    """A symmetric positive semi-definite ``H`` of correlated inputs (``dead``: an input that is always zero)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * cols + 5, cols)) @ rng.standard_normal((cols, cols)) / np.sqrt(cols) + 0.3
    if dead and cols > 2:
        x[:, 1] = 0.0
    return x.T @ x / len(x)


@pytest.mark.parametrize("cols", [1, 2, 127, 128, 130, 300])
@pytest.mark.parametrize("order", ["natural", "permuted"])
def test_held_in_factor_gives_h_back_exactly_and_the_factor_as_before(cols, order):
    """``HeldInFactor`` holds ``H`` and its inverse Cholesky factor ``U`` in one array (``U`` above, ``H``'s strict
    triangle below, ``H``'s diagonal a vector): ``U`` is the factor :func:`gptq._factor` makes from a dense ``H``
    bit for bit (dead inputs and damping included), ``H`` comes back bit for bit, and a factor for another order or
    damping, made from the held ``H``, is the dense one's too."""
    from codec.rd.gptq import HeldInFactor, _factor

    h = _spd(cols, cols, dead=True)
    rng = np.random.default_rng(cols)
    perm = np.arange(cols) if order == "natural" else rng.permutation(cols)
    held = HeldInFactor(h)
    assert not held.factored and held.dense().tobytes() == h.tobytes()
    upper = held.factor(0.01, perm)
    assert held.factored and upper.shape == h.shape
    assert np.triu(upper).tobytes() == _factor(h, 0.01, perm, None).tobytes()
    assert held.factor(0.01, perm) is upper  # made once
    assert held.dense().tobytes() == h.tobytes() and held.diagonal.tobytes() == np.diag(h).tobytes()
    other = rng.permutation(cols)
    assert np.triu(held.factor(0.01, other)).tobytes() == _factor(h, 0.01, other, None).tobytes()
    assert np.triu(held.factor(0.1, perm)).tobytes() == _factor(h, 0.1, perm, None).tobytes()
    assert held.factor(0.01, perm) is upper and held.dense().tobytes() == h.tobytes()
    owned = h.copy()
    taken = HeldInFactor(owned, own=True)  # the caller's own array: the factor is made in it
    assert taken.factor(0.01, perm) is owned or order == "permuted"
    assert np.triu(taken.factor(0.01, perm)).tobytes() == np.triu(upper).tobytes()


def test_held_in_factor_damps_a_singular_h_and_keeps_h_where_damping_fails():
    """A rank-deficient ``H`` takes extra damping as the dense path does (its array made whole again for each try);
    one no damping saves raises LinAlgError and keeps ``H`` whole, in its own order."""
    from codec.rd.gptq import HeldInFactor, _factor

    x = np.random.default_rng(1).standard_normal((16, 300))
    h = x.T @ x  # rank 16 of 300
    held = HeldInFactor(h)
    assert np.triu(held.factor(0.0)).tobytes() == _factor(h, 0.0, np.arange(300), None).tobytes()
    assert held.dense().tobytes() == h.tobytes()
    bad = np.eye(300)
    bad[200, 201] = bad[201, 200] = 5.0  # indefinite, with a positive diagonal (a dead input's is made 1)
    for perm in (np.arange(300), np.random.default_rng(2).permutation(300)):
        held = HeldInFactor(bad)
        with pytest.raises(np.linalg.LinAlgError, match="singular"):
            held.factor(0.01, perm)
        assert not held.factored and held.dense().tobytes() == bad.tobytes()


@pytest.mark.parametrize("cols,band", [(1, 128), (2, 1), (127, 128), (128, 128), (129, 128), (300, 7), (300, 128),
                                       (300, 1000)])
def test_quadratic_error_from_the_triangle_matches_the_dense_formula(cols, band):
    """``tr(dW H dW^T)`` summed in bands of the triangle, ``H``'s diagonal apart, is the dense formula's within
    1e-12 relative, bands not dividing ``cols`` included; from a held factor (either order) too, and a convolution's
    weight shape is viewed as ``[rows, cols]``."""
    from codec.rd.gptq import HeldInFactor, difference_error, quadratic_error

    h = _spd(cols, 7 + cols)
    rng = np.random.default_rng(cols + band)
    diff = rng.standard_normal((5, cols)) * 0.01
    dense = float(np.einsum("ij,jk,ik->", diff, h, diff))
    lower = h + np.triu(rng.standard_normal((cols, cols)))  # what lies on and above the diagonal is not read
    assert quadratic_error(diff, lower, np.diag(h).copy(), band) == pytest.approx(dense, rel=1e-12)
    for perm in (None, rng.permutation(cols)):
        held = HeldInFactor(h)
        assert difference_error(diff, held) == pytest.approx(dense, rel=1e-12)  # H whole
        held.factor(0.01, perm)
        assert difference_error(diff, held) == pytest.approx(dense, rel=1e-12)  # below its factor
    if cols == 300:
        conv = diff.reshape(5, 3, 10, 10)
        assert difference_error(conv, HeldInFactor(h)) == pytest.approx(dense, rel=1e-12)
    with pytest.raises(ValueError, match="H is"):
        quadratic_error(diff, h[:-1, :-1], np.diag(h)[:-1].copy())


def test_held_in_factor_and_its_score_hold_no_second_cols2_array():
    """Making the factor in the held array takes half a ``cols^2`` beside it (``H``'s triangle, packed), not a whole
    damped copy; scoring from the triangle takes band-sized temporaries only (traced peaks)."""
    import tracemalloc

    from codec.rd.gptq import HeldInFactor, _factor

    cols = 512
    h = _spd(cols, 3)
    held = HeldInFactor(h)
    diff = np.random.default_rng(4).standard_normal((64, cols))

    def peak(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    dense = peak(lambda: _factor(h, 0.01, np.arange(cols), None))  # a damped copy and block temporaries
    assert peak(lambda: held.factor(0.01)) < dense - 0.4 * h.nbytes
    assert peak(lambda: held.quadratic_error(diff)) < 0.2 * h.nbytes


def test_calibrated_file_keeps_its_bytes_with_h_held_in_its_factor(monkeypatch, tmp_path):
    """A calibrated encode (rate search, repair) writes the same bytes with each layer's ``H`` held in its factor
    and scored from the triangle as with the dense ``H``, a factor per coding and the dense formula (the path before
    the eighteenth pass); so do repair's targets with GPTQ, JPEG compensation in grid and rows mode and pruning."""
    import codec

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 192), nn.ReLU(), nn.Linear(192, 128)).eval()
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(96, 96, generator=g) / 10
    data = [torch.randn(40, 96, generator=g) @ mix + 0.2 for _ in range(4)]  # correlated inputs
    options = {"0.weight": EncodeOptions(codec="quant", bits=3, tile=(8, 32)),
               "2.weight": EncodeOptions(codec="jpeg", quality=50, tile=(16, 64)),
               "4.weight": EncodeOptions(codec="jpeg", quality=60, tile=(16, 64), row_shape=(12, 16))}
    options.update({n: EncodeOptions(codec="lossless") for n in model.state_dict() if n not in options})
    settings = RepairSettings(steps=0, final_steps=0, prune=True)  # (unit sensitivities: rows mode)

    def coded(name):
        path = tmp_path / name
        codec.save(model, path, bits_per_weight=2.5, calibration=data)
        result = repair(model, data, options, settings=settings)
        return path.read_bytes(), {k: v.tobytes() for k, v in result.targets.items()}, result.options

    held = coded("held.jwt")
    assert {"0.weight", "2.weight", "4.weight"} <= held[1].keys()
    monkeypatch.setattr(_LayerFit, "_h", lambda self: self.h.dense())  # a plain array: the old path
    assert coded("dense.jwt") == held


@pytest.mark.parametrize("quality,credit", [(20, 0), (50, 0), (50, -100), (80, 0)])
def test_code_within_keeps_the_coding_of_every_candidate_compared(quality, credit):
    """``_code_within`` scores its candidates as they come, keeps the best only, shares one factor and one
    compensated coding between them and skips the coding without blending when the credit is negative (then the
    same as the first): the coding it returns is the one the three candidates, each coded on a layer of its own,
    compared at once give (the smallest output error within the size, else the most credit left). A smooth weight,
    whose compensated values code larger: blending wins at quality 20, a cheaper quality at 50 and 80 (a table
    scale between two qualities at 80)."""
    _, h = _correlated_layer(5)
    rng = np.random.default_rng(1)
    w = (np.linspace(-1, 1, 192)[None, :] * np.linspace(0.5, 1, 96)[:, None] * 0.1
         + 0.002 * rng.standard_normal((96, 192))).astype(np.float32)
    model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w))
    opts = EncodeOptions(codec="jpeg", quality=quality, tile=(16, 32))
    settings = RepairSettings()

    def layer():
        slot = _slots(model, {"0.weight": opts})["0.weight"]
        fit = _LayerFit(slot, None, w.astype(np.float64), None, 1, np.zeros(w.shape[1]), np.zeros(w.shape[1]))
        fit.h = h
        return slot, fit

    got = _code_within(*layer(), opts, settings, None, credit)
    candidates = [_fit_size(*layer(), opts, s, None, credit, blend=b)
                  for s, b in ((settings, True), (replace(settings, compensate=False), True), (settings, False))]
    fitting = [c for c in candidates if c[4] >= 0] or [max(candidates, key=lambda c: c[4])]
    ref = w.astype(np.float64)
    expected = min(fitting, key=lambda c: output_error(ref, c[2].astype(np.float64), h))
    assert got[3:6] == expected[3:6] and got[6].blobs == expected[6].blobs
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[2], expected[2])


@pytest.mark.parametrize("call,error,match", [
    (lambda m, d, o: code_with_repair("model", d, o), TypeError, "nn.Module"),
    (lambda m, d, o: code_with_repair(m, [], o), ValueError, "no batch"),
    (lambda m, d, o: code_with_repair(m, torch.zeros(3), o), TypeError, "iterable of batches"),
    (lambda m, d, o: code_with_repair(m, [d[0] * float("nan")], o), ValueError, "batch 0: holds NaN"),
    (lambda m, d, o: code_with_repair(m, ["text"], o), TypeError, "batch 0: not a tensor"),
    (lambda m, d, o: code_with_repair(m, d, {**o, "fc.weight": "q20"}), TypeError, "options\\['fc.weight'\\]"),
    (lambda m, d, o: code_with_repair(m, d, {**o, "nope.weight": EncodeOptions()}), ValueError, "'nope.weight'"),
    (lambda m, d, o: code_with_repair(m, d, list(o)), TypeError, "options must map"),
    (lambda m, d, o: code_with_repair(m, d, o, settings={"steps": 1}), TypeError, "RepairSettings"),
])
def test_bad_arguments_are_one_line_errors(call, error, match):
    model, data = tiny_model(), batches(1)
    with pytest.raises(error, match=match) as info:
        call(model, data, quant_options(model))
    assert "\n" not in str(info.value)


def test_repair_through_save_keeps_a_batchnorm_counter(tmp_path):
    """A BatchNorm's 0-d num_batches_tracked (int64) goes through repair and decodes unchanged."""
    import codec

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 13 * 13, 10))
    x = torch.randn(64, 1, 28, 28)
    net.train()
    net(x)
    net.eval()
    path = tmp_path / "bn.jwt"
    codec.save(net, path, bits_per_weight=6.0, calibration=x)
    back = codec.load(path)
    assert back["1.num_batches_tracked"].shape == () and int(back["1.num_batches_tracked"]) == 1
    assert set(back) == set(net.state_dict())


def _conv_batchnorm() -> tuple[nn.Module, list]:
    """conv (no bias) -> BatchNorm -> Linear, its BatchNorm statistics gathered on the calibration batches."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(4, 64, 5, padding=2, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64 * 8 * 8, 10))
    data = batches()
    net.train()
    for b in data:
        net(b)
    net.eval()
    return net, data


def _repaired_error(net: nn.Module, data: list, options: dict, **flags) -> tuple[dict, float]:
    """Repair ``net`` (no refit or GPTQ, size not kept, ``flags`` set), check its file decodes to the repaired model,
    and give ``(targets, output error of the decoded model on data)``."""
    with torch.no_grad():
        refs = [[net(b)] for b in data]
    result = repair(net, data, options, settings=RepairSettings(refit=False, gptq=False, keep_size=False, **flags))
    decoded = code_file(net.state_dict(), options, result.targets)
    assert all(torch.equal(decoded[k], v) for k, v in result.model.state_dict().items())
    return result.targets, model_error(decoded_model(net, options, result.targets), data, refs)


def test_batchnorm_running_mean_takes_the_mean_correction_of_a_layer_without_bias():
    """conv (no bias) -> BatchNorm: the coded conv's mean shift moves the BatchNorm's running mean, lowering the error."""
    net, data = _conv_batchnorm()
    options = quant_options(net, bits=2)
    errors = {}
    for on in (False, True):
        targets, errors[on] = _repaired_error(net, data, options, bias_correction=on)
        assert ("1.running_mean" in targets) == on
    assert errors[True] < 0.9 * errors[False]


def test_batchnorm_gain_scales_the_batchnorm_after_a_coded_layer_without_bias():
    """conv (no bias) -> BatchNorm, the conv coarsely rounded: with ``batchnorm_gain`` the BatchNorm's weight takes each
    channel's least-squares gain (its running mean moved with it), the file decodes to the repaired model and the
    output error on the calibration inputs is lower than with the mean correction alone."""
    net, data = _conv_batchnorm()
    options = {n: EncodeOptions(codec="lossless") for n in net.state_dict()}
    options["0.weight"] = EncodeOptions(codec="quant", bits=2, tile=(8, 64))
    errors = {}
    for on in (False, True):
        targets, errors[on] = _repaired_error(net, data, options, batchnorm_gain=on)
        assert ("1.weight" in targets) == on and "1.running_mean" in targets
    assert errors[True] < errors[False]


def test_keep_size_moves_a_grown_tensor_back_or_codes_it_cheaper():
    """A target coding larger than planned is blended towards the original (credit >= 0) or coded at lower JPEG
    quality (an overrun to pay back); savings before it let it keep its plan; quant keeps its bits."""
    model = tiny_model()
    with torch.no_grad():  # a smooth weight, cheap to code
        model.fc.weight.copy_(torch.linspace(-1, 1, 1024).repeat(32, 1) * torch.linspace(0.5, 1, 32)[:, None])
    jpeg = EncodeOptions(codec="jpeg", quality=60, tile=(32, 64))
    slot = _slots(model, {"fc.weight": jpeg})["fc.weight"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what repair could leave: the weight plus fine noise within its range, costlier to code
        slot.tensor.add_(0.02 * torch.randn(slot.tensor.shape, generator=g)).clamp_(-1, 1)
    grown = to_numpy(slot.tensor)[0].copy()

    def size(array, opts):
        return sum(len(b) for b in encode_tensor(array, F32, opts).blobs)

    planned = size(slot.original, jpeg)
    assert size(grown, jpeg) > planned  # the premise: the new values code larger
    def same(encoded, array, opts):  # the encoding handed back is the target's, as a writer would code it
        return encoded.blobs == encode_tensor(array, F32, opts).blobs

    target, _, _, opts, credit, nbytes, encoded = _code_within(slot, None, jpeg, RepairSettings(keep_size=False),
                                                               None, 0)
    assert opts == jpeg and np.array_equal(target, grown) and nbytes == size(grown, jpeg)
    assert same(encoded, target, opts)
    target, _, _, opts, credit, nbytes, encoded = _code_within(slot, None, jpeg, RepairSettings(), None, 0)
    assert opts == jpeg and size(target, jpeg) <= planned and credit == planned - size(target, jpeg) >= 0
    assert nbytes == size(target, jpeg) and same(encoded, target, opts)
    assert 0 < np.abs(target - slot.original).max() < np.abs(grown - slot.original).max()  # part of the way back
    target, _, _, opts, credit, nbytes, encoded = _code_within(slot, None, jpeg, RepairSettings(), None,
                                                               -planned // 10)
    assert opts.codec == "jpeg" and opts.quality < 60 and size(target, opts) <= planned - planned // 10
    assert nbytes == size(target, opts) and same(encoded, target, opts)
    target, _, _, opts, credit, nbytes, encoded = _code_within(slot, None, jpeg, RepairSettings(), None, 10 * planned)
    assert opts.codec == "jpeg" and opts.quality > 60 and opts.scale is None  # a credit is spent on dearer qualities
    assert nbytes == size(target, opts) <= 11 * planned and credit == 11 * planned - nbytes
    assert same(encoded, target, opts)
    up = opts.with_(quality=opts.quality + 1)  # no finer step between qualities this high: the dearest that fits
    assert size(_coded_target(slot, None, up, RepairSettings(), None)[0], up) > 11 * planned
    assert _code_within(slot, None, jpeg, RepairSettings(step_up=False), None, 10 * planned)[3] == jpeg
    quant = EncodeOptions(codec="quant", bits=2, tile=(8, 64))
    assert _code_within(slot, None, quant, RepairSettings(), None, -10 * planned)[3] == quant


def test_save_with_repair_stays_within_the_budget(tmp_path):
    """codec.save with calibration: the file is at most the bits/weight asked and decodes to the repaired model."""
    import codec

    model, data = tiny_model(4), batches()
    path = tmp_path / "m.jwt"
    weights = sum(t.numel() for t in model.state_dict().values())
    for bits in (2.5,):
        codec.save(model, path, bits_per_weight=bits, calibration=data)
        assert 8 * path.stat().st_size / weights <= bits
        back = codec.load(path)
        assert set(back) == set(model.state_dict())


@pytest.mark.parametrize("bits", [2.5, 3.0])
def test_save_with_repair_spends_its_budget(tmp_path, bits):
    """codec.save with calibration gives repair what the plan leaves under the budget (spare_bytes): the file lands
    within 2.5 % under the bits/weight asked, never over (before spare_bytes: 6.8 % / 4.3 % under; 0.5-1.1 % before
    the biases and the 8x1x3x3 convolution could be rounded, 1.1-1.9 % since, 2.1 % at 2.5 once the lossless
    planes took their own zstd blocks (93 bytes fewer, the same codings): the fine JPEG ladder's step at q12, about
    3 % of the largest tensor's bytes, does not fit the spare exactly)."""
    import codec

    model, data = tiny_model(4), batches()
    path = tmp_path / "m.jwt"
    weights = sum(t.numel() for t in model.state_dict().values())
    notes = codec.save(model, path, bits_per_weight=bits, calibration=data)
    assert 0.975 * bits <= 8 * path.stat().st_size / weights <= bits
    assert any("dearer options to spend" in n for n in notes)


@pytest.mark.parametrize("bits", [3.0, 3.3])
def test_calibrated_vit_of_quant_tensors_stays_within_its_budget(tmp_path, bits):
    """A small transformers ViT (random weights, 2 x 64: every weight ``quant``, the plan leaving repair its share,
    codec.encode.REPAIR_SHARE) saved with calibration ends within its budget and spends it: the step-ups after the
    largest tensor keep back what the ``quant`` tensors after them grow by under GPTQ (_held). Before: 3.020
    bits/weight at -b 3, over (the bench's 4 x 64 ViT: 3.049). At -b 3.3 a tensor steps up (at -b 3, with a 6 %
    share, none: the share less what is held is below a quant bit of any tensor)."""
    transformers = pytest.importorskip("transformers")
    import codec

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10)).eval()
    path = tmp_path / "vit.jwt"
    weights = sum(t.numel() for t in vit.state_dict().values())
    notes = codec.save(vit, path, bits_per_weight=bits, calibration=[{"pixel_values": x}
                                                                     for x in torch.randn(256, 1, 16, 16).split(32)])
    assert 0.975 * bits <= 8 * path.stat().st_size / weights <= bits
    assert any("dearer options to spend" in n for n in notes) or bits == 3.0
    assert not any("over the" in n for n in notes)


def test_calibrated_model_of_many_small_tensors_spends_its_budget():
    """A random-weight CNN of 152 tensors (8 blocks of a 3 x 3 convolution and a 32 -> 2 -> 32 pair of 1 x 1 ones,
    each followed by a fresh BatchNorm, running means zero) saved with calibration and repair spends its budget,
    never over: here 2.75 % under at -b 4, main 4.7 % (37,276 of 39,105 bytes). Main's plan counted the index by a
    lean estimate (its file 6,218 bytes under, left to repair's step-ups), and kept the raw size of every zero
    running mean (2,240 bytes) for repair's shifts, while only those after a layer coded lossily move
    (codec.rd.repair.moved_growth: 1,024; the 1 x 1 convolutions are coded losslessly). What is left is a quant
    step of a whole 3 x 3 convolution (1,152 bytes a bit), too coarse for the 538 bytes. A random MobileNetV2 (314
    tensors) at -b 3: 2.741 bits/weight on main."""
    import codec

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    for _ in range(8):
        layers += [nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                   nn.Conv2d(32, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                   nn.Conv2d(2, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    weights = sum(t.numel() for t in model.state_dict().values())
    out = io.BytesIO()
    notes = codec.save(model, out, bits_per_weight=4.0, calibration=torch.randn(256, 3, 8, 8).split(32))
    assert 0.965 * int(4.0 * weights / 8) <= len(out.getvalue()) <= int(4.0 * weights / 8)
    assert not any("over the" in n for n in notes)


class _Gru(nn.Module):
    """A token classifier of quant-coded matrices repair does not fit: an embedding, a 2-layer GRU, a Linear head."""

    def __init__(self):
        super().__init__()
        self.emb, self.gru, self.head = nn.Embedding(50, 32), nn.GRU(32, 64, batch_first=True, num_layers=2), \
            nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.gru(self.emb(x))[0][:, -1])


def test_repair_holds_nothing_back_for_quant_tensors_gptq_does_not_code():
    """Repair keeps back 10 % of the later ``quant`` tensors' bytes from its step-ups for GPTQ's growth; a GRU's
    matrices and an embedding are coded by plain rounding (no layer fit) and cannot grow, so nothing is held for
    them: of a 1,000-byte spare, the GRU's weight_ih_l0 (768 bytes a bit) steps up. Before: 10 % of the later GRU
    matrices' bytes held, and nothing stepped up (the plan's 17,032 bytes coded)."""
    torch.manual_seed(0)
    model = _Gru().eval()
    options = quant_options(model, bits=3)
    result = repair(model, torch.randint(0, 50, (256, 20)).split(64), options, spare=1000)
    planned = sum(len(b) for n in result.encoded
                  for b in encode_tensor(to_numpy(model.state_dict()[n])[0], F32, options[n]).blobs)
    coded = sum(len(b) for e in result.encoded.values() for b in e.blobs)
    assert planned + 600 <= coded <= planned + 1000
    assert any("gru.weight_ih_l0 quant 3 bits -> quant 4 bits" in n for n in result.notes)


def test_calibrated_gru_of_quant_tensors_spends_its_budget():
    """A GRU's matrices are ``quant`` and coded by plain rounding (no layer fit, no GPTQ), so the plan leaves repair
    no share of the budget for its step-ups (codec.rd.repair.fitted_share: only the Linear head's weights are
    fitted). The file ends within 1.5 % under its calibrated budget, never over; before: 5.4 % under at -b 3 (the
    lean index estimate's bytes left to repair, 10 % of the later GRU matrices' bytes held from its step-ups and
    never spent; the lead's trained GRU: 2.343 of -b 2.5)."""
    import codec

    torch.manual_seed(0)
    model = _Gru().eval()
    budget = int(3.0 * sum(t.numel() for t in model.state_dict().values()) / 8)
    out = io.BytesIO()
    notes = codec.save(model, out, bits_per_weight=3.0, calibration=torch.randint(0, 50, (256, 20)).split(64))
    assert 0.985 * budget <= len(out.getvalue()) <= budget
    assert not any("over the" in n for n in notes)


def test_calibrated_mlp_spends_the_reserve_its_later_quant_tensors_left(monkeypatch):
    """A 784-128-64-10 MLP's calibrated + repaired save at -b 2.5: the spare goes to the first layer (JPEG), less
    RESERVE of the later quant layers' bytes held for GPTQ's growth; their GPTQ codings do not grow and a bit more
    of either costs more than is left, so the reserve came back unspent (1.9 % of the budget). Repair codes the
    model again with the first layer given it: the file ends within 1 % under its budget, never over (main:
    0.9815 of it, as with the second coding switched off here)."""
    import codec
    import codec.rd.repair.loop as loop_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    budget = int(2.5 * sum(t.numel() for t in model.state_dict().values()) / 8)
    data = torch.rand(512, 784).split(64)
    sizes = {}
    for respend in (math.inf, loop_module.RESPEND_FROM):
        monkeypatch.setattr(loop_module, "RESPEND_FROM", respend)
        out = io.BytesIO()
        notes = codec.save(model, out, bits_per_weight=2.5, calibration=data)
        sizes[respend] = len(out.getvalue())
        assert sizes[respend] <= budget
        assert not any("over the" in n for n in notes)
        assert any("coded twice" in n and "0.weight" in n for n in notes) == (respend != math.inf)
    assert sizes[math.inf] < 0.99 * budget <= sizes[loop_module.RESPEND_FROM]


def test_calibrated_save_leaves_repair_its_share(monkeypatch):
    """A calibrated + repaired save's plan counts the index as written and leaves repair REPAIR_SHARE of the budget
    (of the fitted layers' share of the model, here all but the biases), which repair's step-ups spend in forward
    order; with no share the plan spends it all. Before, repair got what the lean index estimate happened to leave
    (9.7 % of this model's budget at -b 3.5, 0 % at -b 2.8, where the lean count could not meet the budget)."""
    import codec
    import codec.encode as encode
    from codec.rd.repair import fitted_share

    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(64, 64), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10)).eval()
    weights = sum(t.numel() for t in model.state_dict().values())
    assert 0.98 < fitted_share(model) < 1
    data = torch.randn(256, 64).split(64)
    given = []
    spare_bytes = encode.spare_bytes
    monkeypatch.setattr(encode, "spare_bytes", lambda budget, planned: given.append(spare_bytes(budget, planned))
                        or given[-1])
    for share in (0.0, 0.05):
        monkeypatch.setattr(encode, "REPAIR_SHARE", share)
        out = io.BytesIO()
        notes = codec.save(model, out, bits_per_weight=3.5, calibration=data)
        budget = int(3.5 * weights / 8)
        assert share - 0.015 <= given[-1] / budget <= share + 0.035  # (the plan's steps: 3.4 % a layer's bit)
        assert 0.97 * budget <= len(out.getvalue()) <= budget  # (a quant bit of a layer: 512 bytes, 3.4 %)
        assert not any("over the" in n for n in notes)


@pytest.mark.parametrize("seed", [1, 3])
def test_repair_without_a_later_jpeg_keeps_quant_growth_within_the_plan(seed):
    """Every lossy tensor ``quant`` and no spare: nothing after a tensor can step down to pay for GPTQ's growth, so a
    GPTQ coding over what the plan left gives way to plain rounding (blended back towards the original if need be)
    and the lossy tensors end within their planned bytes, with a note. Before: 7 / 9 bytes over at seeds 1 / 3."""
    model, data = tiny_model(seed), batches()
    options = quant_options(model, bits=2)
    result = repair(model, data, options)
    planned = sum(len(b) for n in result.encoded
                  for b in encode_tensor(to_numpy(model.state_dict()[n])[0], F32, options[n]).blobs)
    assert sum(len(b) for e in result.encoded.values() for b in e.blobs) <= planned
    assert any("plain rounding, not GPTQ" in n for n in result.notes)
    decoded = code_file(model.state_dict(), {**options, **result.options}, {**result.targets})
    assert all(torch.isfinite(t).all() for t in decoded.values())


def test_repair_steps_up_only_with_a_spare(monkeypatch):
    """Without a spare (a plan within the margin of its budget) no tensor is coded dearer than planned: keep-size's
    savings are the margin; with one, the largest tensor takes it."""
    import codec.rd.repair.loop as module

    model, data = tiny_model(4), batches()
    options = quant_options(model, bits=3)
    options["fc.weight"] = EncodeOptions(codec="jpeg", quality=8, tile=(32, 64))
    seen, inner = [], module._repair
    monkeypatch.setattr(module, "_repair", lambda *a, **k: seen.append(a[5].step_up) or inner(*a, **k))
    plain = repair(model, data, options)
    assert all(ladder.scale_of(o) >= ladder.scale_of(options[n]) if o.codec == "jpeg" else o.bits <= options[n].bits
               for n, o in plain.options.items())
    spent = repair(model, data, options, spare=4000)
    assert seen in ([False, True], [False, True, True])  # (coded again where the GPTQ reserve came back: RESPEND_FROM)
    assert ladder.scale_of(spent.options["fc.weight"]) < ladder.scale_of(options["fc.weight"])
    planned = sum(len(b) for n in ("fc.weight", "head.weight", "conv.weight")
                  for b in encode_tensor(to_numpy(model.state_dict()[n])[0], F32, options[n]).blobs)
    assert planned < sum(len(b) for e in spent.encoded.values() for b in e.blobs) <= planned + 4000


class _Reads(nn.Module):
    """A layer's two output units, of which the model's output reads one (``unit``)."""

    def __init__(self, unit: int):
        super().__init__()
        self.unit = unit

    def forward(self, y):
        return y[:, self.unit:self.unit + 1]


def _judged_refit(unit: int):
    """``(judgement, layer error with the candidate, without)`` of the refit of ``b`` in ``a -> b -> reads(unit)``,
    ``a`` 'coded' so that ``b``'s unit 0 sees its inputs at half their scale (an error a refit undoes) and unit 1
    sees them with a little noise that is not a function of them (fitted on the 30 rows of 3 batches, fewer than the
    32 inputs, the refit follows it and does worse on the held-out batch)."""
    from codec.rd.repair import held_out
    from codec.rd.repair.loop import _refit_judged

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 2), _Reads(unit)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, :16] = torch.randn(16)
        model[1].weight[1, 16:] = torch.randn(16)
    options = {n: EncodeOptions(codec="lossless") for n in model.state_dict()}
    options["1.weight"] = EncodeOptions(codec="quant", bits=4)
    work = copy.deepcopy(model)
    with torch.no_grad():
        work[0].weight[:16] *= 0.5
        work[0].weight[16:] += 0.003 * torch.randn(16, 64)
    data = [torch.randn(10, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    slots = _slots(work, options, model)
    fit = _LayerFit.collect(model, model[1], work, slots["1.weight"], slots, data, RepairSettings())
    held = held_out(len(data))
    with torch.no_grad():  # the original's outputs, and the layer's output error on the held-out batches, each weight with its least-squares bias
        refs = [[model(b)] for b in data]
        x_hat = torch.cat([work[0](data[i]) for i in held]).double().numpy()
        y = torch.cat([model[1](model[0](data[i])) for i in held]).double().numpy()
    layer_error = [float(((x_hat @ w.T + fit.w_ref @ fit.mean - w @ fit.mean_hat + fit.b_ref - y) ** 2).sum())
                   for w in (fit.candidate.astype(np.float64), fit._fitted.astype(np.float64))]
    before = [t.detach().clone() for t in work.parameters()]
    name, with_refit, without, choice = _refit_judged(work, fit, data, refs, RepairSettings())
    assert name == "1.weight" and all(torch.equal(a, b) for a, b in zip(before, work.parameters()))
    assert (choice == "refit") is (with_refit < without)
    return fit, with_refit, without, layer_error


@pytest.mark.parametrize("unit", [0, 1])
def test_refit_is_kept_only_where_it_lowers_the_models_output_error_on_held_out_batches(unit):
    """The same refit lowers its layer's output error on the held-out batch either way (unit 0's scale error undone,
    unit 1 fitted to noise of few rows); it is kept where the model's output reads unit 0 (both errors lower), not
    where it reads unit 1 (the layer's error lower, the model's higher)."""
    fit, with_refit, without, (layer_with, layer_without) = _judged_refit(unit)
    assert layer_with < 0.8 * layer_without
    if unit == 0:
        assert with_refit < 0.8 * without
        assert fit.candidate is None and not np.array_equal(fit._fitted, to_numpy(fit.slot.tensor)[0])
    else:
        assert with_refit > 1.5 * without
        assert fit.candidate is None and np.array_equal(fit._fitted, to_numpy(fit.slot.tensor)[0])


def test_refit_on_the_other_rows_makes_no_moment_of_its_own():
    """The refit on all but the held-out rows (the candidate a model's output judges) is the ridge of those rows, and
    besides the accumulated sums it makes no ``cols^2`` float64 matrix (the other rows' ``H``, summed over their own
    batches, is solved in its own array, then freed), only a few ``out x cols`` ones: no moment of the held-out rows
    but their ``W C``, no solver's copy. All rows' cross moment is reduced to ``W C`` (freed), which the ridge of all
    rows then finds made; all rows' ``H`` is left as it was."""
    import tracemalloc

    cols, out = 1024, 16
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1500, cols)).astype(np.float32)
    x_hat = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    w = rng.standard_normal((out, cols))
    held = _HeldOut(torch.from_numpy(w.astype(np.float32)))
    for part in (slice(0, 120), slice(120, 300)):
        held.add(torch.from_numpy(x[part]), torch.from_numpy(x_hat[part]))
    acc = {"hh": torch.from_numpy(x_hat.T.astype(np.float64) @ x_hat), "cross": torch.from_numpy(
        x.T.astype(np.float64) @ x_hat), "n": len(x), "held_n": 300,
        "rest_hh": torch.from_numpy(x_hat[300:].T.astype(np.float64) @ x_hat[300:])}
    all_h = acc["hh"].clone()
    for key, rows in (("sum_x", x), ("sum_h", x_hat)):
        acc[key] = torch.from_numpy(rows.sum(0, dtype=np.float64))
        acc["held_" + key] = torch.from_numpy(rows[:300].sum(0, dtype=np.float64))
    fit = _LayerFit(None, None, w, None, acc["n"], None, None)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fitted = fit._rest_refit(acc, held, RepairSettings())
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    matrix = 8 * cols * cols
    assert peak < 0.5 * matrix, f"{peak / matrix:.2f} matrices"  # (the factorization's blocks: 0.27)
    assert "cross" not in acc and "rest_hh" not in acc and acc["w_cross"].shape == (out, cols) == fitted.shape
    assert torch.equal(acc["hh"], all_h) and not held.rows  # all rows' H untouched; the held-out rows have served
    assert fit._weighted_cross(acc) is acc["w_cross"]
    rest, rest_hat = x[300:].astype(np.float64), x_hat[300:].astype(np.float64)
    h = rest_hat.T @ rest_hat / len(rest)
    lam = 0.01 * np.mean(np.diag(h)) + 1e-12
    expected = np.linalg.solve(h + lam * np.eye(cols), (w @ (rest.T @ rest_hat / len(rest)) + lam * w).T).T
    # within float32 rounding: the held-out rows' moments are float32 products (a decision, not a coding, uses them)
    assert np.abs(fitted - expected).max() < 1e-5 * np.abs(expected).max()


def test_held_out_moments_from_rows_equal_their_sums():
    """_HeldOut's ``W x^T x_hat`` made from the kept rows (a band of columns at a time) equals the float64 sum of the
    products, and rows past its limit are summed at once, to the same values within float32 rounding."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 48)).astype(np.float32)
    parts = [(rng.standard_normal((n, 48)).astype(np.float32), rng.standard_normal((n, 48)).astype(np.float32))
             for n in (100, 37, 250)]
    x = np.concatenate([p[0] for p in parts]).astype(np.float64)
    xh = np.concatenate([p[1] for p in parts]).astype(np.float64)
    expected = {"wcross": w.astype(np.float64) @ x.T @ xh}
    kept, summed = _HeldOut(torch.from_numpy(w)), _HeldOut(torch.from_numpy(w))
    kept.BAND_BYTES = 4 * 48 * 5  # bands of 5 columns
    kept.limit, summed.limit = 1 << 30, 4 * (48 + 8) * 250  # the third part passes the second's
    for held in (kept, summed):
        for a, b in parts:
            held.add(torch.from_numpy(a), torch.from_numpy(b))
    assert kept.sums is None and summed.sums is not None and not summed.rows
    for held in (kept, summed):
        got = held.wcross()
        assert got.dtype == np.float64 and np.allclose(got, expected["wcross"], rtol=1e-5, atol=1e-3)
        assert not held.rows and held.sums is None  # served once: dropped


def lossy_bytes(state_dict: dict, options: dict, targets: dict) -> int:
    """Bytes of the blobs of the tensors coded lossily when ``targets`` (else the original values) are encoded."""
    total = 0
    for name, tensor in state_dict.items():
        array = targets.get(name, to_numpy(tensor)[0])
        encoded = encode_tensor(array, F32, options[name])
        if encoded.codec.lossy:
            total += sum(len(b) for b in encoded.blobs)
    return total


@pytest.mark.parametrize("jpeg_fc", [False, True])
def test_finetune_lowers_the_error_at_equal_size_and_decodes_plainly(jpeg_fc):
    """Codec-in-the-loop fine-tuning after repair: lower output error on the calibration batches and on inputs it
    never saw, the lossy tensors within the plan's bytes (as plain repair), and the targets decode (plain decoder) to
    exactly the model repair returns; each quant tile keeps its range (so its offset and scale). A jpeg layer is not
    trained: it keeps repair's coding, and the model its decoded values."""
    from codec.rd.gptq import tile_index, tile_range
    from codec.tiling import plan_tiling

    model, data, unseen = tiny_model(), batches(8), batches(4, seed=7)
    with torch.no_grad():
        refs, unseen_refs = [[model(b)] for b in data], [[model(b)] for b in unseen]
    options = quant_options(model, 2)
    if jpeg_fc:
        options["fc.weight"] = EncodeOptions(codec="jpeg", quality=30, tile=(16, 64))
    plain = repair(model, data, options)
    tuned = repair(model, data, options, settings=RepairSettings(finetune_steps=60, finetune_lr=1e-4))
    assert any("fine-tuning" in n and "->" in n for n in tuned.notes), tuned.notes
    assert tuned.options == plain.options  # jpeg: repair may have coded it cheaper; fine-tuning keeps that
    options.update(tuned.options)
    decoded = code_file(model.state_dict(), options, tuned.targets)
    assert all(torch.equal(decoded[k], v) for k, v in tuned.model.state_dict().items())
    assert model_error(tuned.model, data, refs) < 0.95 * model_error(plain.model, data, refs)
    assert model_error(tuned.model, unseen, unseen_refs) < model_error(plain.model, unseen, unseen_refs)
    state = model.state_dict()
    planned = max(lossy_bytes(state, options, {}), lossy_bytes(state, options, plain.targets))  # the plan's bytes
    assert lossy_bytes(state, options, tuned.targets) <= planned
    if jpeg_fc:
        assert np.array_equal(plain.targets["fc.weight"], tuned.targets["fc.weight"])
    for name in ("head.weight",) if jpeg_fc else ("fc.weight", "head.weight"):
        before, after = plain.targets[name], tuned.targets[name]
        matrix = before.reshape(before.shape[0], -1)
        t = plan_tiling(*matrix.shape, options[name].tile, None)
        tiles = tile_index(t)
        assert not np.array_equal(before, after)
        for a, b in zip(tile_range(matrix, tiles, t.n_tiles), tile_range(after.reshape(matrix.shape), tiles,
                                                                           t.n_tiles)):
            assert np.array_equal(a, b)


def test_finetune_that_does_not_help_leaves_repair_as_it_was():
    """A fine-tuning that raises the held-out error (an absurd learning rate) is dropped: the targets and the model
    are exactly plain repair's, and the note says so."""
    model, data = tiny_model(), batches(8)
    options = quant_options(model, 2)
    plain = repair(model, data, options)
    wild = repair(model, data, options, settings=RepairSettings(finetune_steps=20, finetune_lr=1.0))
    assert any("fine-tuning" in n and "not kept" in n for n in wild.notes), wild.notes
    assert plain.targets.keys() == wild.targets.keys()
    assert all(np.array_equal(plain.targets[k], wild.targets[k]) for k in plain.targets)
    assert all(torch.equal(v, wild.model.state_dict()[k]) for k, v in plain.model.state_dict().items())


def test_save_with_finetune_settings_stays_within_the_budget(tmp_path):
    """codec.save(repair=RepairSettings(finetune_steps=...)): within the budget, decodes with codec.load; a wrong
    repair= is a one-line TypeError."""
    import codec

    model, data = tiny_model(4), batches(8)
    path = tmp_path / "m.jwt"
    weights = sum(t.numel() for t in model.state_dict().values())
    notes = codec.save(model, path, bits_per_weight=2.5, calibration=data,
                       repair=RepairSettings(finetune_steps=10, finetune_lr=1e-4))
    assert any("fine-tuning" in n for n in notes), notes
    assert 8 * path.stat().st_size / weights <= 2.5
    assert set(codec.load(path)) == set(model.state_dict())
    with pytest.raises(TypeError, match="repair= must be"):
        codec.save(model, tmp_path / "x.jwt", bits_per_weight=2.5, calibration=data, repair="finetune")


def test_finetune_with_kl_on_logits():
    """finetune_loss="kl" distils the softmax of the outputs: lower held-out KL than plain repair (kept), the
    targets decode to exactly the returned model; an unknown loss is a one-line ValueError."""
    from codec.rd.repair.losses import _kl

    model, data = tiny_model(), batches(8)
    with torch.no_grad():
        refs = [[model(b)] for b in data]
    options = quant_options(model, 2)
    plain = repair(model, data, options)
    tuned = repair(model, data, options, settings=RepairSettings(finetune_steps=40, finetune_loss="kl"))
    assert any("KL divergence on 2 held-out batches" in n and "->" in n for n in tuned.notes), tuned.notes
    decoded = code_file(model.state_dict(), options, tuned.targets)
    assert all(torch.equal(decoded[k], v) for k, v in tuned.model.state_dict().items())
    with torch.no_grad():
        held = [3, 7]
        kl = [np.mean([float(_kl(r.model(data[i]), refs[i])) for i in held]) for r in (plain, tuned)]
    assert kl[1] < kl[0]
    with pytest.raises(ValueError, match="finetune_loss"):
        repair(model, data, options, settings=RepairSettings(finetune_steps=1, finetune_loss="l1"))



def test_a_weight_repair_leaves_alone_keeps_its_original_value_as_target():
    """With nothing that changes a layer weight (no refit, GPTQ, compensation), its target is the weight itself.

    The target used to be a view of the working model, which then took the decoded values: the file coded the
    decoded values a second time, not the weight.
    """
    model, data = tiny_model(4), batches()
    options = quant_options(model, bits=2)
    settings = RepairSettings(steps=0, final_steps=0, refit=False, gptq=False, compensate=False,
                              bias_correction=False)
    targets, _, _ = code_with_repair(model, data, options, settings=settings)
    for name in ("conv.weight", "fc.weight", "head.weight"):
        assert name not in targets or np.array_equal(targets[name], to_numpy(model.state_dict()[name])[0]), name


def test_convolution_rows_are_collected_in_chunks_to_the_same_fit(monkeypatch):
    """A convolution's im2col rows are made a few samples at a time (a batch of large images never holds its whole
    im2col matrix): with chunks of one sample, collect() gives the moments and refit of the whole-batch pass, up to
    float rounding, and repair codes the same tensors."""
    from codec.rd.repair import fit as fit_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten()).eval()
    data = batches(n=2)
    options = quant_options(model, bits=3)
    # (keep_size off: the last layer's GPTQ coding would otherwise give way to plain rounding where it grows)
    quick = RepairSettings(steps=0, final_steps=0, keep_size=False)
    whole = repair(model, data, options, settings=quick)
    calls = []
    rows = fit_module._layer_rows

    def counted(module, x):
        for chunk in rows(module, x):
            calls.append((type(module).__name__, chunk.shape[0]))
            yield chunk
    monkeypatch.setattr(fit_module, "_layer_rows", counted)
    monkeypatch.setattr(fit_module, "UNFOLD_BYTES", 4 * 64 * 16 * 9)  # one 16-channel 8 x 8 sample's columns
    chunked = repair(model, data, options, settings=quick)
    conv_chunks = [n for kind, n in calls if kind == "Conv2d"]
    assert conv_chunks and set(conv_chunks) == {64}  # one sample (8 x 8 positions) at a time
    assert "2.weight" in whole.targets and set(chunked.targets) == set(whole.targets)
    for name, target in whole.targets.items():
        np.testing.assert_allclose(chunked.targets[name], target, rtol=1e-4, atol=1e-5, err_msg=name)


def test_refit_needs_batches_to_hold_out_and_says_so():
    """With fewer than HOLDOUT_EVERY calibration batches no batch can be held out to check a refit: it is not made
    (the result is refit=False's, bit for bit) and a note says why; with enough batches no such note."""
    from codec.rd.repair import HOLDOUT_EVERY, repair

    model = tiny_model(2)
    options = quant_options(model, bits=2)
    few = batches(n=HOLDOUT_EVERY - 2)
    got = repair(model, few, options)
    off = repair(model, few, options, settings=RepairSettings(refit=False))
    assert set(got.targets) == set(off.targets)
    assert all(np.array_equal(got.targets[n], off.targets[n]) for n in got.targets)
    assert any(n.startswith(f"repair: no refit: {HOLDOUT_EVERY - 2} calibration batches") for n in got.notes)
    assert "refit" not in got.notes[0].split("(")[1].split(")")[0]
    enough = repair(model, batches(n=HOLDOUT_EVERY), options)
    assert not any("no refit" in n for n in enough.notes) and "refit" in enough.notes[0]


def test_a_layer_with_fewer_calibration_rows_than_inputs_is_damped_more():
    """H of a layer seen on fewer rows than it has inputs is rank-deficient: compensation and the refit are damped
    with ``damp_few_rows`` there (the BatchNorm CNN's fc1, 3,136 inputs, 2,000 images), ``damp`` elsewhere."""
    from codec.rd.repair.fit import _LayerFit

    settings = RepairSettings()
    layer = _LayerFit.__new__(_LayerFit)
    layer.cols = 100  # input columns (its reference weight's: 4 x 100)
    for rows, expected in ((2000, settings.damp), (101, settings.damp), (100, settings.damp_few_rows),
                           (30, settings.damp_few_rows)):
        layer.n = rows
        assert layer.damp(settings) == expected
    assert layer.damp(RepairSettings(damp=0.5)) == 0.5  # never less than asked


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv"])
def test_layer_collected_in_passes_gives_the_same_bits_with_one_cols2_moment_at_a_time(kind, monkeypatch):
    """A layer whose moments are large is collected in passes (repair.SPLIT_MOMENT_BYTES: here every layer): the
    cross moment first, then the other rows' H over the batches not held out (the refit solved in it), then all
    rows' H. Its H, refit candidate and W C are those of the one pass bit for bit; no two of all rows' H, the
    other rows' H and the cross moment exist at once, and no held-out rows' H is made. A convolution's held-out
    rows, past their limit, are summed (the other path of _HeldOut.moment)."""
    from codec.rd.repair import fit as fit_module

    torch.manual_seed(3)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)).eval()
        data = [torch.randn(4, 3, 8, 8) for _ in range(8)]
    else:
        model = nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 40, bias=kind == "linear")).eval()
        data = [torch.randn(50, 24) for _ in range(8)]
    work = copy.deepcopy(model)
    with torch.no_grad():
        work[0].weight.add_(0.05 * torch.randn_like(work[0].weight))
    options = {n: EncodeOptions(codec="quant", bits=3) for n, p in model.named_parameters() if p.dim() > 1}
    options.update({n: EncodeOptions(codec="lossless") for n, p in model.named_parameters() if p.dim() == 1})
    slots = _slots(work, options, model)
    settings = RepairSettings()

    def collected():
        fit = _LayerFit.collect(model, model[2], work, slots["2.weight"], slots, data, settings)
        assert fit is not None and fit.candidate is not None
        return fit

    one = collected()
    keys, made = [], []
    batch_sum, wcross = fit_module._batch_sum, _HeldOut.wcross

    helds = []
    held_init = _HeldOut.__init__

    def made_held(self, weight):
        helds.append(self)
        held_init(self, weight)

    rows_at_h = []

    def watched(key, x, x_hat):
        keys.append(key)
        if key in ("hh", "rest_hh"):  # the held-out rows, kept for their W C only, have served before any H
            rows_at_h.append(sum(len(h.rows) for h in helds))
        return batch_sum(key, x, x_hat)

    def spied(self):
        made.append("wcross")
        return wcross(self)

    summed = 0
    add_sums = _HeldOut._add

    def summing(self, y, x_hat):
        nonlocal summed
        summed += 1
        return add_sums(self, y, x_hat)

    monkeypatch.setattr(fit_module, "SPLIT_MOMENT_BYTES", 0)
    monkeypatch.setattr(fit_module, "_batch_sum", watched)
    monkeypatch.setattr(_HeldOut, "wcross", spied)
    monkeypatch.setattr(_HeldOut, "_add", summing)
    monkeypatch.setattr(_HeldOut, "__init__", made_held)
    passes = collected()
    assert len(helds) == 1 and rows_at_h and not any(rows_at_h)
    # the reference weight is held as the original's own tensor (widened when read), not as a float64 copy
    assert passes._w_ref.untyped_storage().data_ptr() == model[2].weight.untyped_storage().data_ptr()
    assert np.array_equal(passes.w_ref, model[2].weight.detach().double().reshape(len(model[2].weight), -1).numpy())
    for a, b in [(one.h.dense(), passes.h.dense()), (one.candidate, passes.candidate), (one._w_cross, passes._w_cross),
                 (one.mean, passes.mean), (one.mean_hat, passes.mean_hat)]:
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    # every cross product is summed (and the sum reduced to W C) before the first H product, the other rows' H (6
    # of the 8 batches) before all rows'
    last_cross = max(i for i, k in enumerate(keys) if k == "cross")
    rest = [i for i, k in enumerate(keys) if k == "rest_hh"]
    assert last_cross < min(rest) and max(rest) < keys.index("hh")
    assert keys.count("hh") == keys.count("cross") == 8 * len(rest) // 6
    assert made == ["wcross"] and (summed > 0 or kind != "conv")  # convolution rows: summed, not banded
    monkeypatch.setattr(fit_module, "SPLIT_MOMENT_BYTES", 1 << 60)
    keys.clear()
    collected()
    assert keys.index("hh") < keys.index("cross") and keys.count("hh") == keys.count("cross")
    assert "rest_hh" not in keys  # (one pass: the product of hh also summed as the other rows')


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blend_makes_its_points_a_band_at_a_time_with_the_same_bits(dtype, monkeypatch):
    """Keep-size's blend towards the original (budget._blend) makes each point ``original + a (target - original)``
    a band of rows at a time from the weight and the target in storage form: the same bits as the whole float64
    arrays give (float32 and bfloat16), and no float64 copy of the weight is alive (the whole-array form held
    three: the original, the way to the target and a point), nor a point that did not fit while the next is made."""
    import tracemalloc

    from codec.dtypes import from_float64, to_float64
    from codec.rd.repair import budget as budget_module

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(640, 512, bias=False)).to(dtype)
    work = copy.deepcopy(model)
    slot = _slots(work, {"0.weight": EncodeOptions(codec="jpeg", quality=50)}, model)["0.weight"]
    original = to_float64(slot.original, slot.dtype)
    target = from_float64(original + 0.05 * np.random.default_rng(0).standard_normal(original.shape), slot.dtype)
    weight = 8 * original.size  # bytes of one float64 copy of the weight
    alive = []

    def code(name, value, dtype_, opts, executor):  # a stand-in coder: bytes grow with the distance moved
        alive.append(tracemalloc.get_traced_memory()[0])
        moved = np.abs(to_float64(value[:4], slot.dtype) - original[:4]).mean() / 0.04  # (about 1 at the target)
        return value.copy(), int(1000 * (1 + moved)), None

    monkeypatch.setattr(budget_module, "_code", code)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        value, decoded, nbytes, _ = budget_module._blend(slot, target, slot.original, None, 1400)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    # the whole-array form, the same bisection
    lo, hi, expected = 0.0, 1.0, slot.original
    for _ in range(5):
        mid = (lo + hi) / 2
        point = from_float64(original + mid * (to_float64(target, slot.dtype) - original), slot.dtype)
        if code(None, point, None, None, None)[1] <= 1400:
            lo, expected = mid, point
        else:
            hi = mid
    assert 0.2 < lo < 0.5 and value.dtype == slot.original.dtype and value.tobytes() == expected.tobytes()
    assert nbytes <= 1400 and np.array_equal(decoded, value)
    # alive: the best point and its decoded values, the point being made and its decoded values (storage form,
    # half a float64 copy each for float32), a band's float64 temporaries: 2.2 copies (bfloat16 1.75); the
    # whole-array form 5.5 (6.0), of which 4.0 (3.0) at each coding
    assert peak < 3 * weight, f"{peak / weight:.2f} float64 copies"
    assert max(alive) - start < 2 * weight, f"{(max(alive) - start) / weight:.2f} float64 copies at a coding"


def test_a_layer_wider_than_max_columns_gets_the_bias_only_and_no_h():
    """Repair makes no H for a layer with more input columns than calibration keeps a full H for (a 6272 -> 10
    classifier head: 315 MB, a VGG head 5 GB): its weight is coded as it stands, its bias still corrected from the
    inputs' means, and a note names it. Here the limit is lowered to make Tiny's fc (1,024 columns: an 8 MB H) wide;
    the default is calibration's FULL_H_MAX."""
    import tracemalloc

    from codec.rd.calibrate import FULL_H_MAX

    assert RepairSettings().max_columns == FULL_H_MAX
    model, data = tiny_model(2), batches(n=8)
    options = quant_options(model, bits=2)
    tracemalloc.start()
    try:
        got = repair(model, data, options, settings=RepairSettings(max_columns=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024 // 2  # no 1,024^2 float64 H (8 MB) was made
    assert any(n.startswith("repair: 1 layers with over 1000 input columns got the least-squares bias only")
               and n.endswith("raises the limit): fc.weight") for n in got.notes), got.notes
    original = model.state_dict()["fc.weight"].numpy()
    assert np.array_equal(got.targets.get("fc.weight", original), original)  # no refit or GPTQ moved it
    assert "fc.bias" in got.targets and "head.weight" in got.targets  # bias corrected; the narrow head repaired
    with torch.no_grad():
        refs = [[model(b)] for b in data]
    plain = model_error(decoded_model(model, options, {}), data, refs)
    repaired = model_error(decoded_model(model, options, got.targets), data, refs)
    assert repaired < plain


def test_the_weight_to_code_is_the_callers_array_while_the_working_model_shares_it():
    """While the working model shares the caller's storage for a lossy weight (repair's deep copy,
    repair.slots._shared_lossy), the weight a layer codes (refit on: ``_fitted``; off: the target without GPTQ or
    compensation) is the caller's own array, not a copy of it (all-MiniLM-L6-v2's FFN output: 2.4 MB); a working
    model of its own gives a copy, which does not follow the working model when it takes its decoded values. The
    caller's weights are unchanged by a whole repair either way."""
    from codec.rd.repair.slots import _shared_lossy

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 40)).eval()
    data = [torch.randn(50, 24) for _ in range(8)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = {n: EncodeOptions(codec="quant", bits=3) for n, p in model.named_parameters() if p.dim() > 1}
    options.update({n: EncodeOptions(codec="lossless") for n, p in model.named_parameters() if p.dim() == 1})
    shared = copy.deepcopy(model, _shared_lossy(model, options))
    slots = _slots(shared, options, model)
    slot = slots["2.weight"]
    fit = _LayerFit.collect(model, model[2], shared, slot, slots, data, RepairSettings())
    assert fit is not None and fit._fitted is slot.original  # refit on, shared: the caller's array
    target, _ = fit.target(options["2.weight"], RepairSettings(gptq=False))
    assert target is slot.original
    few = _LayerFit.collect(model, model[2], shared, slot, slots, data[:2], RepairSettings())  # no refit: 2 batches
    assert few._fitted is None and few.target(options["2.weight"], RepairSettings(gptq=False))[0] is slot.original
    own = copy.deepcopy(model)  # a working model of its own (distillation steps): a copy
    own_slots = _slots(own, options, model)
    copied = _LayerFit.collect(model, model[2], own, own_slots["2.weight"], own_slots, data, RepairSettings())
    assert not np.shares_memory(copied._fitted, to_numpy(own[2].weight)[0])
    assert np.array_equal(copied._fitted, slot.original)
    repair(model, data, options, keep_targets=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def wide_bias_model(seed: int, inputs: int = 16) -> tuple[nn.Module, list[torch.Tensor]]:
    """A Linear to 4,096 units (a bias of 4,096 floats) and a 2-unit head, with inputs of mean 1 (the least-squares
    bias moves every unit's bias when the first layer is coded coarsely)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, 4096), nn.ReLU(), nn.Linear(4096, 2)).eval()
    g = torch.Generator().manual_seed(seed)
    return model, list((torch.randn(256, inputs, generator=g) + 1.0).split(64))


def test_repair_keeps_the_vector_its_bias_moves_within_the_budget(monkeypatch):
    """The least-squares bias moves a lossless vector the plan priced as it was (here 4,096 floats rounded to 8
    significand bits: 6 % larger once moved). Repair counts its bytes against the credit and, where the credit
    does not cover them, rounds a prefix of it to 7 bits: the coded tensors end within their plan and the spare,
    and the working model holds what a reader decodes. Without (main's behaviour) 163 bytes over."""
    import codec.rd.repair.loop as module

    model, data = wide_bias_model(0)
    options = {"0.weight": EncodeOptions(codec="jpeg", quality=10, tile=(64, 16)),
               "0.bias": EncodeOptions(codec="lossless", significand_bits=8),
               "2.weight": EncodeOptions(codec="lossless"), "2.bias": EncodeOptions(codec="lossless")}
    state = model.state_dict()

    def size(name, array):
        return sum(len(b) for b in encode_tensor(array, F32, options[name]).blobs)

    spare = 100
    planned = sum(size(n, to_numpy(t)[0]) for n, t in state.items()) + spare
    totals = {}
    for counted in (False, True):
        if not counted:
            monkeypatch.setattr(module, "_moving_vector", lambda *a: None)
        else:
            monkeypatch.undo()
        result = repair(model, data, options, spare=spare)
        assert "0.bias" not in result.options  # (the vector keeps its options: its values are rounded)
        totals[counted] = sum(sum(len(b) for b in result.encoded[n].blobs) if n in result.encoded else
                              size(n, result.targets.get(n, to_numpy(t)[0])) for n, t in state.items())
        notes = [n for n in result.notes if "significand bits" in n]
        assert len(notes) == counted and (not counted or "0.bias 7 bits" in notes[0])
    assert totals[False] > planned >= totals[True] >= planned - 20
    decoded = code_file(state, options, result.targets)
    assert torch.equal(decoded["0.bias"], result.model[0].bias)
    assert torch.equal(decoded["0.weight"], result.model[0].weight)
    assert (decoded["0.bias"] != state["0.bias"]).all()  # (moved)


def test_calibrated_save_counts_and_stores_its_index_compressed():
    """A calibrated + repaired save's index is compressed in the plan's count and in the file: left to the writer
    (compressed where that saves 1 % of the file), the plan's file was counted with it compressed and the repaired
    one, grown by repair's step-ups, stored it plain: 602 bytes more, 408 over the budget at -b 2.5."""
    import codec

    model, data = wide_bias_model(2, inputs=48)
    budget = int(2.5 * sum(t.numel() for t in model.state_dict().values()) / 8)
    out = io.BytesIO()
    notes = codec.save(model, out, bits_per_weight=2.5, calibration=data)
    assert 0.99 * budget <= len(out.getvalue()) <= budget
    assert not any("over the" in n for n in notes)
    assert out.getvalue()[12] & 2  # the header's flags: index_zstd


def test_repair_prunes_a_receiver_far_within_its_limit_at_higher_qualities(monkeypatch):
    """A first layer (rows-mode JPEG) with 7 of 8 units never active on the calibration inputs, then quant layers,
    and a spare of 3,000 bytes: the pruned codings at the span's top (q40) leave most of the receiver's limit
    unspent, so repair tries a span higher while they do (q90 here). Within the budget, and the output error on
    the calibration inputs under a tenth of main's (PRUNE_UNDER infinite: the receiver stepped up to q48 unpruned,
    3.7e-4 against 2.2e-5)."""
    import codec.rd.repair.budget as module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[0].bias[torch.arange(128) % 8 != 0] = -100.0
    g = torch.Generator().manual_seed(0)
    data = list(torch.rand(512, 256, generator=g).split(64))
    options = {"0.weight": EncodeOptions(codec="jpeg", quality=30, row_shape=(16, 16)),
               "2.weight": EncodeOptions(codec="quant", bits=8, tile=(8, 64)),
               "4.weight": EncodeOptions(codec="quant", bits=8, tile=(8, 64))}
    options.update({n: EncodeOptions(codec="lossless") for n in ("0.bias", "2.bias", "4.bias")})
    state = model.state_dict()

    def size(name, array, opts):
        return sum(len(b) for b in encode_tensor(array, F32, opts[name]).blobs)

    spare = 3000
    limit = sum(size(n, to_numpy(t)[0], options) for n, t in state.items()) + spare
    errors = {}
    for main in (True, False):
        if main:
            monkeypatch.setattr(module, "PRUNE_UNDER", math.inf)
        else:
            monkeypatch.undo()
        result = repair(model, data, options, spare=spare)
        opts = {**options, **result.options}
        total = sum(sum(len(b) for b in result.encoded[n].blobs) if n in result.encoded else
                    size(n, result.targets.get(n, to_numpy(t)[0]), opts) for n, t in state.items())
        assert total <= limit
        with torch.no_grad():
            errors[main] = model_error(result.model, data, [[model(x)] for x in data])
        assert (opts["0.weight"].quality >= 80) != main
    assert errors[False] < 0.1 * errors[True]
