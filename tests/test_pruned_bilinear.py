"""Two layers a new user brings (thirtieth pass, bench/JOURNAL.md "layers (thirtieth pass)"): a layer pruned with
``torch.nn.utils.prune`` (``weight_orig`` and the 0/1 ``weight_mask``, the weight computed by a forward pre-hook)
coded, calibrated and repaired as the weight it computes (:mod:`codec.rd.pruned`); ``nn.Bilinear`` calibrated over
the outer products of its two inputs and fitted by repair."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

import codec
from codec.rd.calibrate import calibrate, uncalibrated
from codec.rd.gptq import gptq_target
from codec.tensorcodec import EncodeOptions
from codec.dtypes import get_dtype


def _pruned_mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    prune.l1_unstructured(net[0], "weight", amount=0.6)
    prune.l1_unstructured(net[2], "weight", amount=0.5)
    return net.eval()


def _inputs(n: int = 256, width: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, width)


def test_a_pruned_layer_is_calibrated_as_the_weight_it_computes():
    """Calibration measures ``0.weight`` (the hook's ``weight_orig * weight_mask``): before, the pruned layers had
    no statistics and the note called ``weight_orig`` and ``weight_mask`` "not reached by the calibration inputs"."""
    net = _pruned_mlp()
    x = _inputs()
    calib = calibrate(net, [x[:128], x[128:]])
    assert {"0.weight", "2.weight", "4.weight"} <= set(calib.layers)
    h = calib.layers["0.weight"].h
    assert h.shape == (64, 64) and np.allclose(h, (x.T @ x).numpy() / len(x), rtol=1e-4, atol=1e-5)
    names = [n for n in net.state_dict() if net.state_dict()[n].dim() >= 2]
    assert uncalibrated(net, calib, names) is None


def test_a_pruned_save_codes_the_computed_weight_and_leaves_the_model_as_it_was(tmp_path):
    """A calibrated, repaired save codes ``weight_orig * weight_mask`` in ``weight_orig``'s place (the pruned entries,
    which the layer multiplies by 0, as zeros), names no pruned tensor as coded data-free, says what the masks cost
    and what ``prune.remove`` gains, and gives the model its own ``weight_orig`` back (every entry, the pruned ones
    too)."""
    net = _pruned_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _inputs()
    path = tmp_path / "pruned.jwt"
    notes = codec.save(net, path, bits_per_weight=3, calibration=[x[:64], x[64:128], x[128:192], x[192:]])
    assert not any("data-free weighting" in str(n) and "weight_" in str(n) for n in notes), notes
    assert any("prune.remove" in str(n) and "'0', '2'" in str(n) for n in notes), notes
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # (the pruned entries of weight_orig too)
    back = codec.load(path)
    mask = before["0.weight_mask"]
    assert torch.equal(back["0.weight_mask"], mask)
    pruned, kept = back["0.weight_orig"][mask == 0], before["0.weight_orig"][mask == 0]  # (zeros: a level near 0)
    assert float(pruned.std()) < 0.25 * float(kept.std())
    fresh = _pruned_mlp()
    codec.load_into(fresh, path)
    with torch.no_grad():
        ref, out = net(x), fresh(x)
    assert float(((out - ref) ** 2).sum() / (ref ** 2).sum()) < 0.01


def test_a_pruned_state_dict_is_coded_as_the_computed_weight(tmp_path):
    """``jwt encode pruned.pt`` (a state_dict alone): ``weight_orig`` is coded as ``weight_orig * weight_mask`` too,
    and the caller's tensors are not changed; a ``_orig`` beside a mask that is not 0/1 is left alone."""
    from codec.rd.pruned import computed_state, pruned_weights

    state = _pruned_mlp().state_dict()
    computed = computed_state(state)
    assert torch.equal(computed["0.weight_orig"], state["0.weight_orig"] * state["0.weight_mask"])
    assert computed["0.weight_orig"] is not state["0.weight_orig"]
    assert int((state["0.weight_orig"] == 0).sum()) == 0
    odd = {"a.weight_orig": torch.ones(3, 4), "a.weight_mask": torch.full((3, 4), 0.5)}
    assert computed_state(odd) is odd
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert pruned_weights(shapes, lambda n: state[n].numpy()) == {"0.weight": "0.weight_orig",
                                                                 "2.weight": "2.weight_orig"}
    codec.save(state, tmp_path / "s.jwt", bits_per_weight=4)
    back = codec.load(tmp_path / "s.jwt")
    assert torch.equal(back["0.weight_mask"], state["0.weight_mask"])


def test_pruned_as_computed_gives_the_storage_back():
    from codec.rd.pruned import pruned_as_computed

    net = _pruned_mlp()
    orig = net[0].weight_orig
    data = orig.data_ptr()
    with pruned_as_computed(net) as replaced:
        assert replaced and bool((orig[net[0].weight_mask == 0] == 0).all())
        with pruned_as_computed(net) as again:  # (open already: nothing more)
            assert not again
    assert orig.data_ptr() == data and int((orig == 0).sum()) == 0


def test_gptq_with_a_mask_keeps_the_pruned_entries_and_spreads_only_the_kept_ones_error():
    """GPTQ over a pruned layer's ``weight_orig`` (:func:`codec.rd.gptq.gptq_target`, ``mask``): an entry the mask
    zeroes keeps its own value (zero, cheap to code) and its error is not spread over the later columns; all ones is
    the plain GPTQ."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    mask = (rng.random((32, 64)) > 0.5).astype(np.float32)
    w *= mask
    x = rng.standard_normal((400, 64)) + rng.standard_normal((400, 1))  # (correlated columns)
    h = x.T @ x / len(x)
    dtype, opts = get_dtype("float32"), EncodeOptions(codec="quant", bits=3)
    plain = gptq_target(w, dtype, opts, h)
    ones = gptq_target(w, dtype, opts, h, mask=np.ones_like(mask))
    assert np.array_equal(plain[0], ones[0])
    target, decoded = gptq_target(w, dtype, opts, h, mask=mask)
    rounded = gptq_target(w, dtype, opts, np.eye(64))[0]  # (a white H: no compensation, each value rounded)
    assert plain[1] is not None and np.array_equal(target[mask == 0], rounded[mask == 0])
    assert not np.array_equal(plain[0][mask == 0], rounded[mask == 0])

    def error(dec):
        d = (dec - w) * mask
        return float(np.einsum("ij,jk,ik->", d, h, d))
    assert error(decoded) < error(plain[1])


class _BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(20, 24), nn.Linear(20, 16)
        self.bil = nn.Bilinear(24, 16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bil(torch.tanh(self.a(x)), torch.tanh(self.b(x)))))


def test_bilinear_is_calibrated_over_the_outer_products_of_its_inputs():
    """``y = x1^T W x2 + b`` is a Linear over ``x1 (x) x2`` for the ``[out, in1 * in2]`` view of ``W``: its ``H`` is
    that product's second moment. Before, ``bil.weight`` had none (the note named it: "Bilinear: a layer kind
    calibration does not measure")."""
    torch.manual_seed(0)
    net = _BilinearNet().eval()
    x = _inputs(192, 20)
    calib = calibrate(net, [x[:96], x[96:]])
    stats = calib.layers["bil.weight"]
    with torch.no_grad():
        x1, x2 = torch.tanh(net.a(x)), torch.tanh(net.b(x))
    z = (x1[:, :, None] * x2[:, None, :]).reshape(len(x), -1).double()
    assert stats.h.shape == (384, 384) and np.allclose(stats.h, (z.T @ z).numpy() / len(x), rtol=1e-4, atol=1e-6)
    assert stats.sensitivity > 0 and stats.weighting().fits(tuple(net.bil.weight.shape))
    assert uncalibrated(net, calib, ["a.weight", "b.weight", "bil.weight", "head.weight"]) is None


def test_a_bilinear_model_is_repaired_and_its_calibrated_file_beats_the_data_free_one(tmp_path):
    """Repair fits ``nn.Bilinear`` as a Linear over its outer products (refit, GPTQ, least-squares bias); the
    calibrated file's output error is below the data-free file's at the same budget. Before, the calibrated file was
    the worse of the two on the qa pass's Bilinear model at -b 2 (rel MSE 0.01053 against 0.00854)."""
    torch.manual_seed(0)
    net = _BilinearNet().eval()
    x = _inputs(384, 20)
    batches = [x[i:i + 64] for i in range(0, 384, 64)]
    errors = {}
    for how in ("data-free", "calibrated"):
        path = tmp_path / f"{how}.jwt"
        notes = codec.save(net, path, bits_per_weight=4, **({"calibration": batches} if how == "calibrated" else {}))
        assert not any("Bilinear" in str(n) for n in notes), notes
        fresh = _BilinearNet()
        codec.load_into(fresh, path)
        with torch.no_grad():
            ref, out = net(x), fresh.eval()(x)
        errors[how] = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
    assert errors["calibrated"] < errors["data-free"], errors


def test_too_small_a_budget_for_a_pruned_model_says_what_its_masks_take(tmp_path):
    """The masks are coded exactly (about 1 bit per element, counted as weights): a budget below that is refused
    on one line that says so and names prune.remove; a plain model's refusal does not."""
    import pytest

    net = _pruned_mlp()
    with pytest.raises(codec.EncodeError) as err:
        codec.save(net, tmp_path / "p.jwt", bits_per_weight=0.3)
    said = str(err.value)
    assert "below the smallest encoding" in said and "weight_mask" in said and "prune.remove" in said
    assert "'0', '2'" in said and "\n" not in said
    torch.manual_seed(0)
    with pytest.raises(codec.EncodeError) as err:
        codec.save(nn.Sequential(nn.Linear(64, 48)), tmp_path / "q.jwt", bits_per_weight=0.01)
    assert "weight_mask" not in str(err.value)


def test_a_pruned_layers_refit_is_fitted_on_its_kept_entries():
    """Repair's ridge refit of a pruned layer (:func:`codec.rd.repair.fit._masked_solve`): each row solves over its
    kept columns only and is 0 where the mask is, so the refit is a weight the layer can compute (a dense refit moves
    entries the hook multiplies by 0: the MLP's -b 1 calibrated file had 3x main's output error without a refit)."""
    from codec.rd.repair.fit import _masked_solve

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12))
    h = x.T @ x / 300 + 0.01 * np.eye(12)
    rhs = rng.standard_normal((5, 12))
    mask = (rng.random((5, 12)) > 0.4).astype(np.float64)
    mask[3] = mask[1]  # (two rows of one mask share a solve)
    mask[4] = 0
    out = _masked_solve(h, rhs, mask)
    assert np.all(out[mask == 0] == 0)
    for r in range(4):
        k = np.flatnonzero(mask[r])
        assert np.allclose(out[r, k], np.linalg.solve(h[np.ix_(k, k)], rhs[r, k]))
    assert np.allclose(_masked_solve(h, rhs, np.ones_like(mask)), np.linalg.solve(h, rhs.T).T)


def test_a_pruned_model_saved_without_a_rate_target_keeps_weight_orig_exactly(tmp_path):
    """Only a save with a rate target codes ``weight_orig * weight_mask``: a lossless save gives the state_dict back
    bit for bit, the pruned entries of ``weight_orig`` too."""
    net = _pruned_mlp()
    codec.save(net, tmp_path / "l.jwt", codec="lossless")
    back = codec.load(tmp_path / "l.jwt")
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


def test_a_pruned_model_saved_with_the_default_options_keeps_its_masks_exact(tmp_path):
    """Without a rate target the default options code every tensor lossily: a mask's ones came back as 1 +- 6e-5
    (main too). A pruned layer's mask is now stored losslessly there, as a rated save's menu codes it exactly."""
    net = _pruned_mlp()
    codec.save(net, tmp_path / "d.jwt")
    back = codec.load(tmp_path / "d.jwt")
    for key in ("0.weight_mask", "2.weight_mask"):
        assert torch.equal(back[key], net.state_dict()[key]), key
