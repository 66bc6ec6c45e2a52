"""Coding with data (issue 9, codec side): calibration statistics, output-space distortion, what the
state_dict reveals (BatchNorm / LayerNorm), the damage guard, codec.save(model, calibration=), the CLI, and the
repair contract."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec
from codec.rd import allocate as A
from codec.rd.calibrate import calibrate


class TwoBranch(nn.Module):
    """``b(relu(a(x))) + side(x)`` where the side branch is 20x quieter: its errors barely reach the output,
    yet its weights' NMSE counts as much as any other's."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.side = nn.Linear(128, 128), nn.Linear(128, 64), nn.Linear(128, 64)
        with torch.no_grad():
            self.side.weight *= 0.05

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + self.side(x)


def _two_branch() -> tuple[TwoBranch, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return TwoBranch(), torch.randn(256, 128, generator=g), torch.randn(256, 128, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- calibrate()

def test_second_moments_match_the_definition():
    """H = E[x x^T] (conv: im2col columns in weight.reshape(out, -1) order), E[x] and counts, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))
    x = torch.randn(40, 3, 6, 6)
    cal = calibrate(model, [x[:16], x[16:].numpy()])  # tensors and numpy arrays both work
    cols = F.unfold(x, 3, padding=1, stride=2).permute(0, 2, 1).reshape(-1, 27).double()
    conv = cal.layers["0.weight"]
    assert conv.kind == "conv2d" and conv.samples == len(cols)
    np.testing.assert_allclose(conv.h, (cols.T @ cols / len(cols)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conv.mean, cols.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    hidden = torch.relu(model[0](x)).flatten(1).double().detach()
    np.testing.assert_allclose(cal.layers["3.weight"].h, (hidden.T @ hidden / 40).numpy(), rtol=1e-4, atol=1e-6)
    assert cal.samples == 40 and cal.batches == 2
    # the error a weight change causes in the layer's output is tr(dW H dW^T)
    dw = torch.randn(8, 27, dtype=torch.float64)
    direct = float(((cols @ dw.T) ** 2).sum() / len(cols))
    assert A.Weighting(h=conv.h).energy(dw.numpy()) == pytest.approx(direct, rel=1e-4)


def test_diagonal_above_the_limit_and_embedding_counts(monkeypatch):
    """Wide layers keep diag(H); an embedding's H is how often each row was looked up."""
    import codec.rd.calibrate as C

    monkeypatch.setattr(C, "FULL_H_MAX", 16)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 8))
    ids = torch.tensor([[1, 2, 2, 7], [7, 7, 0, 1]])
    cal = calibrate(model, [ids])
    emb = cal.layers["0.weight"]
    assert emb.kind == "embedding" and emb.h[[0, 1, 2, 7]].tolist() == [1, 2, 2, 3] and emb.h.sum() == 8
    lin = cal.layers["1.weight"]
    assert lin.diagonal and lin.h.shape == (32,)
    rows = model[0](ids).reshape(-1, 32).double()
    np.testing.assert_allclose(lin.h, (rows**2).mean(0).detach().numpy(), rtol=1e-5)
    # unseen embedding rows still count (half the weight is uniform)
    w = emb.weighting()
    assert w.rows[3] > 0 and w.rows[7] > w.rows[3]


def test_a_3x3_convolution_over_512_channels_keeps_its_full_h():
    """ResNet's and VGG's last convolutions (4,608 im2col columns) are measured by their full H by default, and
    repair fits them (bench/wide_layers.py: at -b 1, 99.5 % agreement with the float model against 84.7 % with the
    diagonal); a wider layer keeps the diagonal."""
    from codec.rd.calibrate import FULL_H_MAX
    from codec.rd.repair import RepairSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(512, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    cal = calibrate(model, [torch.randn(2, 512, 3, 3)])
    conv = cal.layers["0.weight"]
    assert not conv.diagonal and conv.h.shape == (4608, 4608)
    assert RepairSettings().max_columns >= 4608 and FULL_H_MAX >= 4608
    assert FULL_H_MAX < 25088  # a VGG head (25,088 inputs: 5 GB of H) keeps the diagonal


def test_attention_mask_leaves_padding_out():
    """Token inputs: positions the batch's attention_mask marks as padding add nothing to H."""

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = nn.Embedding(10, 4), nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask):
            return self.proj(self.emb(input_ids))

    model = Tok()
    ids, mask = torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    cal = calibrate(model, [{"input_ids": ids, "attention_mask": mask}])
    assert cal.layers["emb.weight"].h[0] == 0 and cal.layers["emb.weight"].h.sum() == 3
    assert cal.layers["proj.weight"].samples == 3


def test_sensitivity_is_deterministic_and_sees_quiet_branches():
    """The quiet side branch moves the output far less per unit relative error; same seed, same numbers."""
    model, x, _ = _two_branch()
    one, two = calibrate(model, x, seed=3), calibrate(model, x, seed=3)
    sens = {n: s.sensitivity for n, s in one.layers.items()}
    assert sens == {n: s.sensitivity for n, s in two.layers.items()}
    assert sens["side.weight"] < 0.1 * sens["b.weight"]
    assert 0.2 < sens["b.weight"] < 5
    assert calibrate(model, x, seed=4).layers["b.weight"].sensitivity != sens["b.weight"]


def test_progress_and_max_batches():
    """progress gets each batch's inputs; max_batches stops early; the model's training mode is restored."""
    model, x, _ = _two_branch()
    model.train()
    seen = []
    cal = calibrate(model, [x[:100], x[100:200], x[200:]], max_batches=2, progress=lambda s, n: seen.append((s, n)))
    assert seen == [("calibration", 100), ("calibration", 100)] and cal.samples == 200
    assert model.training


def test_labelled_batches_calibrate_on_their_inputs(tmp_path):
    """A DataLoader over a labelled dataset yields ``(inputs, targets)``: the inputs are used, the labels are not
    needed; statistics, a repaired file and one-shot iterators are the same as with the inputs alone."""
    from torch.utils.data import DataLoader, TensorDataset

    model, x, _ = _two_branch()
    labels = torch.arange(len(x)) % 10
    plain = calibrate(model, list(x.split(64)))
    loader = DataLoader(TensorDataset(x, labels), batch_size=64)
    for source in (loader, iter(loader), [[b, y] for b, y in loader]):
        labelled = calibrate(model, source)
        assert labelled.samples == plain.samples == len(x)
        for name, stats in plain.layers.items():
            np.testing.assert_array_equal(labelled.layers[name].h, stats.h)
    codec.save(model, tmp_path / "x.jwt", bits_per_weight=3.0, calibration=list(x.split(64)))
    codec.save(model, tmp_path / "xy.jwt", bits_per_weight=3.0, calibration=loader)  # repair lists its batches
    assert (tmp_path / "x.jwt").read_bytes() == (tmp_path / "xy.jwt").read_bytes()


@pytest.mark.parametrize("inputs, message", [
    ([], "empty"),
    ([torch.full((2, 128), float("nan"))], "batch 0: holds NaN"),
    ([torch.randn(2, 128), torch.randn(2, 127)], "batch 1: the model does not accept it"),
    ([torch.randn(0, 128)], "batch 0: empty"),
    ([torch.randn(2, 64)], "batch 0: the model does not accept it"),
    (["text"], "batch 0: not a tensor but str"),
])
def test_bad_inputs_are_one_line_value_errors(inputs, message):
    """Empty, NaN, wrong shapes: a one-line ValueError naming the batch, no traceback text."""
    model, _, _ = _two_branch()
    with pytest.raises(ValueError, match=message) as info:
        calibrate(model, inputs)
    assert "\n" not in str(info.value)


def test_bad_arguments_are_type_errors():
    """A non-module or non-iterable input is a TypeError."""
    with pytest.raises(TypeError, match="nn.Module"):
        calibrate({"w": torch.zeros(2)}, [torch.zeros(1)])
    with pytest.raises(TypeError, match="iterable of batches"):
        calibrate(nn.Linear(2, 2), 3)


# ---------------------------------------------------------------- output-space distortion

def test_weighting_energy_forms_agree():
    """Full, diagonal and row-weighted energies are the traces they claim."""
    rng = np.random.default_rng(0)
    m, x = rng.normal(size=(6, 5)), rng.normal(size=(100, 5))
    h = x.T @ x / 100
    assert A.Weighting(h=h).energy(m) == pytest.approx(np.trace(m @ h @ m.T), rel=1e-5)
    assert A.Weighting(h=np.diag(h)).energy(m) == pytest.approx(np.sum(m * m * np.diag(h)), rel=1e-12)
    r = rng.uniform(size=6)
    assert A.Weighting(rows=r).energy(m) == pytest.approx(np.sum(r[:, None] * m * m), rel=1e-12)
    assert not A.Weighting(h=h).fits((6, 4)) and A.Weighting(h=h).fits((6, 5)) and not A.Weighting(h=h).fits((5,))


def test_distortion_falls_back_to_data_free_for_uncalibrated_tensors():
    """A tensor without a weighting (or whose shape does not fit it) keeps today's NMSE, with no output error."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(16, 9))
    dec = ref + 0.1 * rng.normal(size=ref.shape)
    measure = A.Distortion({"w": A.Weighting(h=np.eye(9), scale=2.0)})
    assert measure("other", ref, dec) == (A.distortion(ref, dec)[0], None)
    weighted, out = measure("w", ref, dec)
    assert out == pytest.approx(A.distortion(ref, dec)[1] ** 0.5) and weighted == pytest.approx(2 * out**2)
    assert measure("w", ref[:, :8], dec[:, :8])[1] is None  # H of 9 columns does not fit 8


def test_calibrated_allocation_moves_bits_to_the_layers_that_matter():
    """At the same size, scoring by output error (tr(dW H dW^T) x sensitivity) beats weight NMSE on outputs."""
    model, calib_x, test_x = _two_branch()
    ref = model(test_x).detach()
    results = {}
    bits = 2.7  # where one layer must go coarse (2.8 before a small model was planned again with what its first
    # plan left, 3.0 before the index was compressed, spec 8.6)
    for mode in ("data-free", "calibrated"):
        buf = io.BytesIO()
        if mode == "data-free":
            codec.save(model.state_dict(), buf, bits_per_weight=bits, search="exhaustive")  # like for like
        else:
            codec.save(model, buf, bits_per_weight=bits, calibration=calib_x, repair=False)
        back = TwoBranch()
        back.load_state_dict(codec.load(buf.getvalue()))
        results[mode] = (_rel(back(test_x).detach(), ref), len(buf.getvalue()))
    assert results["calibrated"][1] <= bits * sum(p.numel() for p in model.parameters()) / 8
    assert results["calibrated"][0] < 0.85 * results["data-free"][0], results


# ---------------------------------------------------------------- data-free: what the state_dict reveals

class BNNet(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> relu -> pool -> linear, as ``features.N`` and ``head``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _bn_net() -> tuple[BNNet, torch.Tensor]:
    """A BN net whose second conv has 24 of its 32 output channels 50x smaller, with their BN statistics scaled
    to match: the same function, but weight NMSE can no longer see that those channels matter as much."""
    torch.manual_seed(0)
    net = BNNet()
    x = torch.randn(64, 1, 14, 14)
    net.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics of these inputs
            net(x)
        conv, bn = net.features[3], net.features[4]
        small = torch.arange(32) >= 8
        conv.weight[small] *= 0.02
        conv.bias[small] *= 0.02
        bn.running_mean[small] *= 0.02
        bn.running_var[small] *= 0.02**2
    net.eval()
    return net, x


def test_norm_weightings_read_batchnorm_and_layernorm():
    """A BN right after a layer gives rows gamma^2/(var+eps); a LayerNorm under the same parent gives gamma^2;
    a norm of another parent (pre-norm) or a constant gain gives nothing."""
    net, _ = _bn_net()
    sd = net.state_dict()
    shapes = {n: tuple(t.shape) for n, t in sd.items()}
    found = A.norm_weightings(shapes, lambda n: sd[n].double().numpy())
    assert sorted(found) == ["features.0.weight", "features.3.weight"]
    bn = net.features[4]
    expect = (bn.weight**2 / (bn.running_var + 1e-5)).detach().double().numpy()
    np.testing.assert_allclose(found["features.3.weight"].rows, expect, rtol=1e-6)
    ln = {"block.dense.weight": (8, 4), "block.dense.bias": (8,), "block.LayerNorm.weight": (8,),
          "block.LayerNorm.bias": (8,), "next.proj.weight": (8, 8), "other.norm.weight": (8,)}
    gains = {"block.LayerNorm.weight": np.arange(1.0, 9.0), "other.norm.weight": np.arange(1.0, 9.0)}
    found = A.norm_weightings(ln, gains.__getitem__)
    assert list(found) == ["block.dense.weight"]
    np.testing.assert_allclose(found["block.dense.weight"].rows, np.arange(1.0, 9.0) ** 2)
    assert A.norm_weightings(ln, lambda n: np.ones(8)) == {}  # a constant gain tells nothing
    # names sorted as in a .safetensors file: conv2 still finds bn2 by its name, conv21 does not
    shapes = {"b.bn2.running_var": (8,), "b.bn2.weight": (8,), "b.conv2.weight": (8, 4, 3, 3),
              "b.conv21.weight": (8, 4, 3, 3), "b.fc.weight": (3, 8)}
    var = np.linspace(0.5, 2, 8)
    found = A.norm_weightings(shapes, lambda n: var if n.endswith("running_var") else np.ones(8))
    assert list(found) == ["b.conv2.weight"]
    np.testing.assert_allclose(found["b.conv2.weight"].rows, 1 / (var + 1e-5))


def test_batchnorm_fold_keeps_small_channels_alive(monkeypatch):
    """Data-free, folding the BN scale into the conv's distortion cuts the model's output error at the same
    budget; without it the search starves the channels BN blows up."""
    net, x = _bn_net()
    ref = net(x).detach()
    results = {}
    for mode in ("weights only", "BN folded"):
        if mode == "weights only":
            monkeypatch.setattr(A, "norm_weightings", lambda *args: {})
        else:
            monkeypatch.undo()
        buf = io.BytesIO()
        codec.save(net.state_dict(), buf, bits_per_weight=4.0)
        back = BNNet()
        back.load_state_dict(codec.load(buf.getvalue()))
        back.eval()
        results[mode] = _rel(back(x).detach(), ref)
    assert results["BN folded"] < 0.5 * results["weights only"], results


def test_merged_weighting_keeps_the_norm_rows_at_calibration_scale():
    """Calibration's H and sensitivity with a norm's rows (mean 1): for isotropic noise, the kind the sensitivity
    is measured with, the merged distortion is calibration's own; error in the most amplified row costs
    max(R) / mean(R) times more; tensors with only one of the two keep theirs."""
    rng = np.random.default_rng(2)
    w, x = rng.normal(size=(32, 24)), rng.normal(size=(400, 24))
    h, rows = x.T @ x / 400, rng.uniform(0.1, 4.0, size=32)
    calibrated = {"w": A.Weighting(h=h, scale=0.3), "c": A.Weighting(h=h)}
    norms = {"w": A.Weighting(rows=rows), "n": A.Weighting(rows=rows)}
    merged = A.merge_weightings(norms, calibrated, {"w": w}.__getitem__)
    assert merged["c"] is calibrated["c"] and merged["n"] is norms["n"]
    assert merged["w"].h is h and merged["w"].rows.mean() == pytest.approx(1.0)
    old, new = A.Distortion(calibrated), A.Distortion(merged)
    noisy = [w + 0.01 * rng.normal(size=w.shape) for _ in range(300)]
    assert np.mean([new("w", w, d)[0] for d in noisy]) == pytest.approx(np.mean([old("w", w, d)[0] for d in noisy]),
                                                                        rel=0.02)
    top = np.zeros_like(w)
    top[np.argmax(rows)] = 0.01 * rng.normal(size=w.shape[1])
    assert new("w", w, w + top)[0] == pytest.approx(old("w", w, w + top)[0] * rows.max() / rows.mean(), rel=1e-6)


def test_calibrated_save_keeps_what_a_batchnorm_amplifies(monkeypatch):
    """With calibration, the per-channel scale of the BatchNorm after a layer still weighs its rows: at the same
    budget the output error is lower than with calibration's weighting alone (measured before the BatchNorm)."""
    net, x = _bn_net()
    ref = net(x).detach()
    results = {}
    for mode in ("calibration alone", "merged"):
        if mode == "calibration alone":
            monkeypatch.setattr(A, "merge_weightings", lambda norms, calibrated, get: {**norms, **calibrated})
        else:
            monkeypatch.undo()
        buf = io.BytesIO()
        codec.save(net, buf, bits_per_weight=5.0, calibration=x, repair=False)
        back = BNNet()
        back.load_state_dict(codec.load(buf.getvalue()))
        back.eval()
        results[mode] = _rel(back(x).detach(), ref)
    assert results["merged"] < 0.75 * results["calibration alone"], results


def test_a_budget_that_destroys_a_tensor_says_so_and_names_the_budget_that_does_not(tmp_path, monkeypatch):
    """Over DAMAGE: a note per tensor in save's result and in the file's jwt.warnings (shown by jwt info);
    at the budget it names, no tensor is over the threshold and nothing is said; the file still fits. (This net is
    planned once, as a large model would be: planned again with what its first plan leaves, as a small model is
    (encode.REPLANS), the same budget damages nothing.)"""
    from click.testing import CliRunner

    from codec import encode
    from jwt_cli.main import cli

    net, x = _bn_net()
    n = sum(t.numel() for t in net.state_dict().values())
    path = tmp_path / "low.jwt"
    low = 2.7  # the smallest encoding with room for the warning (2.628; 2.83 before the index was counted as the
    # smallest encoding writes it, 2.98 before biases were rounded, 3.53 before the index was compressed)
    assert codec.save(net.state_dict(), tmp_path / "replanned.jwt", bits_per_weight=low) == []
    monkeypatch.setattr(encode, "REPLANS", 0)
    notes = codec.save(net.state_dict(), path, bits_per_weight=low)
    notes = [n for n in notes if "no better than storing zeros" not in n]  # the coder's own warning, tested elsewhere
    assert len(notes) == 1 and notes[0].startswith("tensor 'features.3.weight': relative error")
    assert path.stat().st_size <= low * n / 8
    need = float(notes[0].split("; ")[1].split()[0])
    assert low < need < 4
    with codec.open(path) as f:
        assert f.metadata[A.WARNINGS_KEY] == notes[0]
    shown = CliRunner().invoke(cli, ["info", str(path)])
    assert shown.exit_code == 0 and "features.3.weight" in shown.output and "jwt.warnings" in shown.output
    assert codec.save(net.state_dict(), tmp_path / "ok.jwt", bits_per_weight=need) == []
    with codec.open(tmp_path / "ok.jwt") as f:
        assert A.WARNINGS_KEY not in f.metadata
    back = BNNet()
    back.load_state_dict(codec.load(tmp_path / "ok.jwt"))
    back.eval()
    assert _rel(back(x).detach(), net(x).detach()) < 0.6


# ---------------------------------------------------------------- codec.save entry point and the repair contract

def test_save_argument_errors():
    """A state_dict with calibration= is a TypeError telling to pass the module; no rate target is a ValueError."""
    model, x, _ = _two_branch()
    with pytest.raises(TypeError, match="pass the nn.Module"):
        codec.save(model.state_dict(), io.BytesIO(), bits_per_weight=4, calibration=x)
    with pytest.raises(ValueError, match="rate target"):
        codec.save(model, io.BytesIO(), calibration=x)
    with pytest.raises(TypeError, match="nn.Module"):
        codec.save([1, 2], io.BytesIO())
    with pytest.raises(ValueError, match="sample 0 holds NaN"):
        codec.save(model, io.BytesIO(), bits_per_weight=4, calibration=torch.full((4, 128), float("nan")))


@pytest.mark.parametrize("as_numpy", [False, True])
def test_a_nan_deep_in_an_input_array_is_refused_before_the_model_runs(as_numpy):
    """An array of samples with a NaN far down (sample 300 of 320, the 5th batch) is refused with the sample's
    index before calibration runs the model (found at its batch, it cost a user 38-101 s of work first)."""
    model, x, _ = _two_branch()
    x = torch.randn(320, 128)
    x[300, 7] = float("inf")
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match="calibration inputs: sample 300 holds NaN or Inf") as info:
        codec.save(model, io.BytesIO(), bits_per_weight=4, calibration=x.numpy() if as_numpy else x)
    assert not calls and "\n" not in str(info.value)
    from codec.rd.calibrate import first_nonfinite

    assert first_nonfinite(x, chunk=128 * 7) == 300 and first_nonfinite(x[:300]) is None
    assert first_nonfinite(torch.zeros(5, 3, dtype=torch.int64)) is None


def test_a_state_dict_under_other_names_calibrates_through_model_names(tmp_path):
    """``model_names`` (stored name -> the model's): calibration and repair run under the model's names and the
    file keeps the state_dict's; with a per-tensor target (no index size in the plan) the values are those of the
    same save under the model's own names. Wrong arguments are one-line errors."""
    model, x, _ = _two_branch()
    renames = {"first.weight": "a.weight", "first.bias": "a.bias", "quiet.weight": "side.weight"}
    stored_as = {v: k for k, v in renames.items()}
    state = {stored_as.get(n, n): t for n, t in model.state_dict().items()}
    notes = codec.save(state, tmp_path / "r.jwt", model=model, model_names=renames, max_error=0.05, calibration=x)
    codec.save(model, tmp_path / "m.jwt", max_error=0.05, calibration=x)
    renamed, plain = codec.load(tmp_path / "r.jwt"), codec.load(tmp_path / "m.jwt")
    assert set(renamed) == set(state)
    for name, tensor in renamed.items():
        assert torch.equal(tensor, plain[renames.get(name, name)]), name
    assert any("repair: coded" in n for n in notes), notes
    with pytest.raises(TypeError, match="model_names= must be a mapping"):
        codec.save(state, io.BytesIO(), model=model, model_names=["a.weight"], max_error=0.05, calibration=x)
    with pytest.raises(TypeError, match="needs the model"):
        codec.save(state, io.BytesIO(), model_names=renames, max_error=0.05)
    with pytest.raises(ValueError, match="the same model name"):
        codec.save(state, io.BytesIO(), model=model, max_error=0.05, calibration=x,
                   model_names={"first.weight": "a.weight", "quiet.weight": "a.weight"})


def test_calibrated_file_decodes_with_the_same_reader(tmp_path):
    """The format does not change: a calibrated file is read by the plain reader and by `jwt decode`, and
    decodes near the original."""
    from click.testing import CliRunner

    from jwt_cli.main import cli

    model, x, _ = _two_branch()
    path = tmp_path / "c.jwt"
    codec.save(model, path, bits_per_weight=3.0, calibration=x, repair=False)
    with codec.Reader(str(path)) as reader:
        assert sorted(reader.keys()) == sorted(model.state_dict().keys())
        assert reader.metadata["jwt.calibration"].startswith("256 inputs")
        arrays = {name: reader.read(name) for name in list(reader.keys())}
    result = CliRunner().invoke(cli, ["decode", str(path), "-o", str(tmp_path / "c.pt")])
    assert result.exit_code == 0, result.output
    decoded = torch.load(tmp_path / "c.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(arrays[name], decoded[name].numpy())
        assert _rel(decoded[name], tensor) < 0.5


def test_a_budget_below_the_smallest_is_refused_before_the_model_runs(tmp_path):
    """A calibrated encode refuses a budget below the whole model's smallest encoding before calibration runs the
    model over the inputs (a user waited 32 s for the "no"), naming the figure a calibrated encode then meets."""
    import re

    model, x, _ = _two_branch()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(codec.EncodeError, match=r"below the smallest encoding \((\d+\.\d+) bits/weight\)") as info:
        codec.save(model, tmp_path / "c.jwt", bits_per_weight=0.01, calibration=x, repair=False)
    assert not calls and not (tmp_path / "c.jwt").exists()
    smallest = float(re.search(r"\((\d+\.\d+) bits", str(info.value)).group(1))
    codec.save(model, tmp_path / "c.jwt", bits_per_weight=smallest + 0.002, calibration=x, repair=False)
    assert calls
    weights = sum(t.numel() for t in model.state_dict().values())
    assert 8 * (tmp_path / "c.jwt").stat().st_size / weights <= smallest + 0.002


def _fake_repair(calls):
    """A stand-in for codec.rd.repair that follows the contract: code_with_repair returns new values for the
    tensors it changed (a bias shifted by 1, a weight negated) and notes; constant_growth prices nothing;
    fitted_share says the whole model is fitted."""
    import types

    def code_with_repair(model, inputs, options, calibration, *, progress=None, jobs=None, settings=None,
                         encoded=None, spare=0, index_zstd=False):
        assert isinstance(spare, int) and spare >= 0  # the bytes the plan leaves under the budget
        assert isinstance(index_zstd, bool)  # whether the writer will compress the index
        calls.append((model, [b.shape for b in inputs], dict(options), calibration))
        if progress:
            progress("repair", 1)
        sd = model.state_dict()
        return ({"b.bias": (sd["b.bias"] + 1).numpy(), "side.weight": (-sd["side.weight"]).numpy()},
                ["repair: 2 tensors changed"], {})

    def constant_growth(model, stored, settings=None):  # bytes the plan keeps for vectors repair will grow
        assert set(stored) == set(model.state_dict())
        return 0

    def fitted_share(model):  # the fraction of the model repair fits: the plan leaves repair its share of that
        assert isinstance(model, torch.nn.Module)
        return 1.0

    return types.SimpleNamespace(code_with_repair=code_with_repair, constant_growth=constant_growth,
                                 fitted_share=fitted_share)


def test_repair_contract(monkeypatch, tmp_path):
    """With calibration inputs repair runs after the allocation with the chosen options (not the Calibration:
    its H matrices are released after the plan, and repair gathers its own statistics); save codes the arrays it
    returns instead of the originals; repair=False leaves it out."""
    import sys

    model, x, _ = _two_branch()
    calls = []
    monkeypatch.setitem(sys.modules, "codec.rd.repair", _fake_repair(calls))
    stages = []
    buf = io.BytesIO()
    notes = codec.save(model, buf, bits_per_weight=3.0, calibration=x,
                       calibration_progress=lambda stage, n: stages.append(stage))
    assert notes == ["repair: 2 tensors changed"] and "repair" in stages and "calibration" in stages
    assert isinstance(notes[0], codec.Note)  # a remark on what repair did, not a warning
    (got_model, shapes, options, calib), = calls
    assert got_model is model and sum(s[0] for s in shapes) == 256 and calib is None
    assert set(options) == set(model.state_dict())
    assert all(isinstance(o, codec.EncodeOptions) for o in options.values())
    back = codec.load(buf.getvalue())
    sd = model.state_dict()
    path = tmp_path / "r.jwt"  # to a path: a file over the budget after repair is reported
    notes = codec.save(model, path, bits_per_weight=3.0, calibration=x)
    assert (8 * path.stat().st_size > 3.0 * sum(t.numel() for t in sd.values())) == any("over the 3.0" in n
                                                                                      for n in notes)
    # biases are coded losslessly, their significands rounded at most to VECTOR_BITS: what repair returned
    rounding = 2.0 ** -(A.VECTOR_BITS + 1)
    assert torch.allclose(back["b.bias"], sd["b.bias"] + 1, rtol=rounding, atol=0)
    assert _rel(back["side.weight"], -sd["side.weight"]) < 0.5
    assert _rel(back["side.weight"], sd["side.weight"]) > 1.5
    assert torch.allclose(back["a.bias"], sd["a.bias"], rtol=rounding, atol=0)
    calls.clear()
    codec.save(model, io.BytesIO(), bits_per_weight=3.0, calibration=x, repair=False)
    assert calls == []


def test_repair_flag_without_the_module(monkeypatch):
    """Until codec.rd.repair exists, the default quietly codes without it and repair=True says it is missing."""
    import sys

    model, x, _ = _two_branch()
    monkeypatch.setitem(sys.modules, "codec.rd.repair", None)  # import fails
    assert codec.save(model, io.BytesIO(), bits_per_weight=3.0, calibration=x) == []
    with pytest.raises(codec.EncodeError, match="repair"):
        codec.save(model, io.BytesIO(), bits_per_weight=3.0, calibration=x, repair=True)


# ---------------------------------------------------------------- jwt encode --calibration

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(3, 3)


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 80), nn.Linear(80, 16)


class Rec(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gru, self.b = nn.Linear(8, 64), nn.GRU(64, 64, batch_first=True), nn.Linear(64, 16)

    def forward(self, x):
        return self.b(self.gru(self.a(x))[0][:, -1])


NOT_A_CLASS = 3
'''


def _encode(*args):
    from click.testing import CliRunner

    from jwt_cli.main import cli

    return CliRunner().invoke(cli, ["encode", *map(str, args)])


def _decode(*args):
    from click.testing import CliRunner

    from jwt_cli.main import cli

    return CliRunner().invoke(cli, ["decode", *map(str, args)])


@pytest.fixture
def net_files(tmp_path, monkeypatch):
    """A module ``calib_test_nets`` beside the user (the working folder), its weights and inputs."""
    (tmp_path / "calib_test_nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    nets = importlib.import_module("calib_test_nets")
    torch.manual_seed(0)
    torch.save(nets.Net().state_dict(), tmp_path / "net.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32))
    return tmp_path


def test_cli_model_and_array_inputs(net_files):
    """--calibration inputs.npy --model package.module:Class encodes; the file decodes like any other."""
    out = net_files / "net.jwt"
    result = _encode(net_files / "net.pt", "-b", "6", "--calibration", net_files / "x.npy",
                     "--model", "calib_test_nets:Net", "--no-repair", "-o", out)
    assert result.exit_code == 0, result.output
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("100 inputs")
    assert set(codec.load(out)) == {"a.weight", "a.bias", "b.weight", "b.bias"}


@pytest.mark.parametrize("prefix", ["model.", "_orig_mod.", "module."])
def test_cli_model_from_a_checkpoint_or_a_compiled_models_state_dict(net_files, prefix):
    """--model on a training checkpoint ({"model": sd, "optimizer": ..., "epoch": 3}) or on the state_dict of a
    torch.compile'd (``_orig_mod.``) or DataParallel (``module.``) model: the class loads the weights under the
    prefix and calibration measures them under its own names; the file keeps the checkpoint's names and decodes to
    the same object. Before: 'does not accept the state_dict (the class has no model.a.weight, ...)'."""
    sd = torch.load(net_files / "net.pt", weights_only=True)
    if prefix == "model.":
        ckpt = {"model": sd, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
                "epoch": 3}
    else:
        ckpt = {prefix + k: v for k, v in sd.items()}
    torch.save(ckpt, net_files / "ckpt.pt")
    out = net_files / "ckpt.jwt"
    result = _encode(net_files / "ckpt.pt", "-b", "6", "--calibration", net_files / "x.npy",
                     "--model", "calib_test_nets:Net", "-o", out)
    assert result.exit_code == 0, result.output
    assert "data-free weighting" not in result.output  # every weight measured, under the model's names
    assert "jwt: note: repair: coded 2 lossy tensors" in result.output
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("100 inputs")
        assert {prefix + k for k in sd} <= set(f.keys())
    decoded = net_files / "ckpt_decoded.pt"
    assert _decode(out, "-o", decoded).exit_code == 0
    back = torch.load(decoded, weights_only=True)
    if prefix == "model.":
        assert back["epoch"] == 3 and back["optimizer"]["param_groups"] == [{"lr": 0.1}]
        back = back["model"]
    else:
        back = {k[len(prefix):]: v for k, v in back.items()}
    x = torch.from_numpy(np.load(net_files / "x.npy"))
    import calib_test_nets

    def error(weights) -> float:
        ref, got = calib_test_nets.Net(), calib_test_nets.Net()
        ref.load_state_dict(sd)
        got.load_state_dict(weights)
        with torch.no_grad():
            return float((got(x) - ref(x)).pow(2).sum() / ref(x).pow(2).sum())

    plain = net_files / "plain.jwt"  # the bare state_dict, calibrated the same way: the same output error
    assert _encode(net_files / "net.pt", "-b", "6", "--calibration", net_files / "x.npy",
                   "--model", "calib_test_nets:Net", "-o", plain).exit_code == 0
    assert error(back) <= 1.25 * error(codec.load(plain)) < 0.01


def test_cli_finetune_after_repair(net_files):
    """--finetune STEPS: repair then codec-in-the-loop fine-tuning, said on stderr as notes (what repair did is
    not a warning); within the budget; decodes."""
    out = net_files / "net.jwt"
    result = _encode(net_files / "net.pt", "-b", "6", "--calibration", net_files / "x.npy",
                     "--model", "calib_test_nets:Net", "--finetune", "8", "-q", "-o", out)
    assert result.exit_code == 0, result.output
    assert "codec-in-the-loop fine-tuning (8 steps" in result.output
    assert "jwt: note: repair: coded 2 lossy tensors" in result.output
    assert "jwt: warning: repair" not in result.output
    weights = sum(t.numel() for t in torch.load(net_files / "net.pt", weights_only=True).values())
    assert 8 * out.stat().st_size / weights <= 6
    assert set(codec.load(out)) == {"a.weight", "a.bias", "b.weight", "b.bias"}


@pytest.mark.parametrize("args, code, message", [
    (["--calibration", "x.npy"], 2, "rate target"),
    (["-b", "4", "--model", "calib_test_nets:Net"], 2, "--model needs --calibration"),
    (["-b", "4", "--calibration", "x.npy"], 2, "--model package.module:ClassName"),
    (["-b", "4", "--calibration", "x.npy", "--model", "no_such_mod:Net"], 1, "cannot import no_such_mod"),
    (["-b", "4", "--calibration", "x.npy", "--model", "calib_test_nets:Nope"], 1, "has no Nope"),
    (["-b", "4", "--calibration", "x.npy", "--model", "calib_test_nets:NOT_A_CLASS"], 1, "not a torch.nn.Module"),
    (["-b", "4", "--calibration", "x.npy", "--model", "calib_test_nets:Other"], 1,
     "does not accept the state_dict (the class has no a.weight, a.bias, b.weight and 1 more; the file lacks "
     "c.weight, c.bias)"),
    (["-b", "4", "--calibration", "x.npy", "--model", "calib_test_nets:Wide"], 1,
     "does not accept the state_dict (shapes differ: a.weight (64, 64) vs (80, 64), a.bias (64,) vs (80,), "
     "b.weight (16, 64) vs (16, 80))"),
    (["-b", "4", "--calibration", "x.npy", "--model", "nocolon"], 2, "package.module:ClassName"),
    (["-b", "4", "--calibration", "two.npz", "--model", "calib_test_nets:Net"], 1, "exactly one array"),
    (["-b", "4", "--calibration", "nan.npy", "--model", "calib_test_nets:Net"], 1, "nan.npy: sample 0 holds NaN"),
    (["-b", "4", "--calibration", "late_nan.npy", "--model", "calib_test_nets:Net"], 1,
     "late_nan.npy: sample 97 holds NaN or Inf"),
    (["-b", "4", "--calibration", "bad.npy", "--model", "calib_test_nets:Net"], 1, "does not accept it"),
    (["-b", "4", "--finetune", "10"], 2, "--finetune needs --calibration"),
    (["-b", "4", "--calibration", "x.npy", "--model", "calib_test_nets:Net", "--no-repair", "--finetune", "10"], 2,
     "not with --no-repair"),
    (["-b", "4", "--calibration", "x.npy", "--model", "calib_test_nets:Net", "--finetune", "0"], 2, "--finetune"),
])
def test_cli_calibration_errors(net_files, args, code, message):
    """Usage errors exit 2; bad models and inputs exit 1 with one line naming the problem; no output file."""
    np.savez(net_files / "two.npz", a=np.zeros((2, 64)), b=np.zeros((2, 64)))
    np.save(net_files / "nan.npy", np.full((4, 64), np.nan, dtype=np.float32))
    late = np.zeros((100, 64), dtype=np.float32)
    late[97, 3] = np.nan
    np.save(net_files / "late_nan.npy", late)
    np.save(net_files / "bad.npy", np.zeros((4, 63), dtype=np.float32))
    result = _encode("net.pt", *args)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (net_files / "net.jwt").exists()


def test_cli_hugging_face_folder_with_sentences(tmp_path):
    """FOLDER --calibration texts.txt: model class and tokenizer from the folder; attachments still travel."""
    transformers = pytest.importorskip("transformers")
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "home", "in", "park"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))  # transformers 5 ignores vocab_file=
    assert tokenizer.vocab_size == len(words) + 5
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\n\na dog ran far away\nthe dog sat in the park\n")
    out = tmp_path / "tiny.jwt"
    result = _encode(folder, "-b", "12", "--calibration", tmp_path / "texts.txt", "--no-repair", "-o", out)
    assert result.exit_code == 0, result.output
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("3 inputs")
        assert "config.json" in f.attachments
    back = transformers.BertModel(config)
    back.load_state_dict(codec.load(out), strict=False)
    assert _encode(folder, "-b", "12", "--calibration", tmp_path / "missing.txt").exit_code == 1


def test_real_repair_through_save_keeps_the_budget():
    """With codec.rd.repair present (after the merge), save(model, calibration=x) codes with repair by default:
    the repaired values, coded with the planned options, keep the file within 2 % of the budget, and the
    model still works (its accuracy against repair=False is the bench's business, not a test's)."""
    pytest.importorskip("codec.rd.repair")
    model, calib_x, test_x = _two_branch()
    buf = io.BytesIO()
    notes = codec.save(model, buf, bits_per_weight=3.0, calibration=calib_x)
    assert any("repair" in note for note in notes)
    assert len(buf.getvalue()) <= 3.0 * sum(p.numel() for p in model.parameters()) / 8 * 1.02
    back = TwoBranch()
    back.load_state_dict(codec.load(buf.getvalue()))
    assert _rel(back(test_x).detach(), model(test_x).detach()) < 0.8


class _ZeroBiasNet(nn.Module):
    """A user's fresh net: zero-initialised biases and a LayerNorm at its initial values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.n, self.b = nn.Linear(64, 256), nn.LayerNorm(256), nn.Linear(256, 32)
        with torch.no_grad():
            self.a.bias.zero_()
            self.b.bias.zero_()

    def forward(self, x):
        return self.b(self.n(torch.relu(self.a(x))))


@pytest.mark.parametrize("bits", [2.5, 3.0, 4.0])
def test_a_repaired_file_of_a_net_with_constant_vectors_keeps_its_budget(bits):
    """Repair's least-squares bias turns a zero bias (a few bytes coded) into an ordinary vector that codes at
    about its raw size. The plan prices such vectors at their raw size (codec.rd.repair.constant_growth), so the
    file stays within the budget; it was 3.1-11 % over it on this net (2.77 bits/weight at -b 2.5)."""
    model = _ZeroBiasNet()
    x = torch.randn(512, 64)
    weights = sum(t.numel() for t in model.state_dict().values())
    buf = io.BytesIO()
    notes = codec.save(model, buf, bits_per_weight=bits, calibration=x)
    got = 8 * len(buf.getvalue()) / weights
    assert 0.8 * bits < got <= bits, notes
    assert not [n for n in notes if "asked for" in n]
    back = codec.load(buf.getvalue())
    assert back["a.bias"].abs().max() > 0  # repaired: the bias is no longer the zeros the plan saw


def test_constant_growth_counts_the_vectors_repair_changes():
    """Biases of Linear / Conv2d layers and BatchNorm running means that hold one value, at their raw size; the
    rest (a LayerNorm's constant gain, non-constant vectors, tensors not stored) are not counted; with
    distillation steps every constant floating parameter is."""
    from codec.rd.repair import RepairSettings, constant_growth

    model = _ZeroBiasNet()
    stored = list(model.state_dict())
    assert constant_growth(model, stored) == (256 + 32) * 4
    assert constant_growth(model, [n for n in stored if n != "b.bias"]) == 256 * 4
    with torch.no_grad():
        model.a.bias.normal_()
    assert constant_growth(model, stored) == 32 * 4
    assert constant_growth(model, stored, RepairSettings(steps=1)) == (32 + 256 + 256) * 4  # b.bias, n.weight, n.bias
    assert constant_growth(model, stored, RepairSettings(bias_correction=False)) == 0
    bn = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    assert constant_growth(bn, list(bn.state_dict())) == 8 * 4  # the running mean; its running_var is not changed


def test_a_repaired_file_over_its_budget_says_so_to_a_file_object_too(tmp_path, monkeypatch):
    """When a repaired file ends over its budget, the notes say so with the file's own figure, whether codec.save
    wrote to a path or to a file object (it was said for a path only: to a BytesIO a file was 3.14 bits/weight at
    -b 3, silently). The overrun is made here by pricing the constant vectors as the plan did before it counted
    their growth (codec.rd.repair.constant_growth)."""
    from codec.rd import repair
    from codec.rd.repair import budget

    monkeypatch.setattr(repair, "constant_growth", lambda *args: 0)  # (codec.api.repair_growth's call)
    monkeypatch.setattr(budget, "constant_growth", lambda *args: 0)  # (moved_growth's)
    model = _ZeroBiasNet()
    x = torch.randn(512, 64)
    weights = sum(t.numel() for t in model.state_dict().values())
    buf = io.BytesIO()
    notes = codec.save(model, buf, bits_per_weight=3.0, calibration=x)
    path_notes = codec.save(model, tmp_path / "r.jwt", bits_per_weight=3.0, calibration=x)
    assert buf.getvalue() == (tmp_path / "r.jwt").read_bytes()
    got = 8 * len(buf.getvalue()) / weights
    assert got > 3.0
    over = [n for n in notes if "over the 3.0 asked for" in n]
    assert over == [n for n in path_notes if "over the 3.0 asked for" in n]
    assert over == [f"repair: the file is {got:.3f} bits/weight, over the 3.0 asked for (the repaired values "
                    "code larger than planned)"]


# --- eighteenth pass: layers a new user's models have (transformers Conv1D, a tied head, kinds not measured) ---

def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_transformers_conv1d_is_measured_on_its_rows():
    """GPT-2's Conv1D (weight (in, out), y = x W + b): calibrated, with the diagonal of its inputs' second moment as
    per-row weights of the stored (in, out) matrix, so a row (one input feature) with loud inputs weighs more."""
    model = _tiny_gpt2()
    ids = torch.randint(0, 1000, (4, 16))
    seen = {}
    layer = model.transformer.h[0].mlp.c_proj  # 256 inputs, 64 outputs

    def keep(module, args, output):
        seen.setdefault("x", args[0].detach().reshape(-1, 256))

    handle = layer.register_forward_hook(keep)
    calib = calibrate(model, {"input_ids": ids})
    handle.remove()
    stats = calib.layers["transformer.h.0.mlp.c_proj.weight"]
    assert stats.kind == "conv1d" and stats.h.shape == (256,) and stats.sensitivity > 0
    x = seen["x"].double()
    np.testing.assert_allclose(stats.h, (x * x).mean(0).numpy(), rtol=1e-5)
    w = stats.weighting()
    assert w.h is None and w.fits(tuple(layer.weight.shape))
    # the measure is the layer's output error: x dW for an error on one row (input feature) i
    dw = np.zeros((256, 64))
    loud, quiet = int(np.argmax(stats.h)), int(np.argmin(stats.h))
    for i in (loud, quiet):
        dw[:] = 0
        dw[i] = 1.0
        out = (x @ torch.from_numpy(dw)).pow(2).sum(1).mean().item()
        assert w.energy(dw) == pytest.approx(out, rel=1e-5)
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert {k for k, v in calib.layers.items() if v.kind == "conv1d"} == {
        f"transformer.h.{b}.{p}.weight" for b in (0, 1) for p in parts}


def test_a_tied_embedding_is_weighed_as_the_output_head_and_stored_once(tmp_path):
    """GPT-2's wte = lm_head.weight: the embedding's weighting is the head's (H over its 64 inputs), not lookup
    counts; the calibrated file holds it once (an alias) and decodes with codec.load, tied."""
    model = _tiny_gpt2()
    ids = torch.randint(0, 1000, (8, 16))
    calib = calibrate(model, {"input_ids": ids})
    wte, head = calib.layers["transformer.wte.weight"], calib.layers["lm_head.weight"]
    assert wte.kind == "linear" and wte.h.shape == (64, 64) and wte is head
    assert calib.weightings()["transformer.wte.weight"].fits((1000, 64))
    out = tmp_path / "g.jwt"
    notes = codec.save(model, out, bits_per_weight=4, calibration=[{"input_ids": ids[:4]}, {"input_ids": ids[4:]}])
    assert any("Conv1D" in n and "without GPTQ" in n for n in notes), notes
    with codec.open(out) as f:
        assert f.reader.entry("lm_head.weight").alias == "transformer.wte.weight"
    back = codec.load(out)
    assert back["lm_head.weight"] is back["transformer.wte.weight"]
    model.load_state_dict(back)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


class _Mixer(nn.Module):
    """A layer of the user's own: a matrix its forward multiplies by (a kind calibration does not measure; nn.Bilinear
    was the example before the thirtieth pass measured it)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return x @ self.weight


class _Unmeasured(nn.Module):
    """A GRU (measured), a layer of a kind calibration does not measure and a layer the inputs never reach beside
    measured Linear layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.gru = nn.GRU(64, 64, batch_first=True)
        self.up = _Mixer()
        self.head = nn.Linear(64, 10)
        self.aux = nn.Linear(64, 64)

    def forward(self, x):
        h, _ = self.gru(self.embed(x))
        return self.head(h[:, -1])


def test_a_calibrated_save_names_the_tensors_it_codes_data_free(tmp_path):
    """Layer kinds calibration does not measure (a module of the user's own) and layers the inputs never reach: one note
    naming them and saying they are coded by the data-free weighting; the measured ones (the GRU's too) are not
    named."""
    torch.manual_seed(0)
    model = _Unmeasured()
    notes = codec.save(model, tmp_path / "u.jwt", bits_per_weight=6, calibration=torch.randn(64, 5, 8), repair=False)
    said = [n for n in notes if n.startswith("calibration:")]
    assert len(said) == 1 and "\n" not in said[0], notes
    note = said[0]
    assert isinstance(note, codec.Note) and "data-free weighting" in note
    for name in ("up.weight", "aux.weight"):
        assert repr(name) in note
    assert "_Mixer" in note and "not reached" in note
    assert "'embed.weight'" not in note and "'head.weight'" not in note and "gru" not in note.lower()
    model.load_state_dict(codec.load(tmp_path / "u.jwt"))
    # a model calibration measures whole: no such note
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64))
    notes = codec.save(plain, tmp_path / "p.jwt", bits_per_weight=6, calibration=torch.randn(64, 8), repair=False)
    assert not any(n.startswith("calibration:") for n in notes), notes


def test_cli_calibrates_a_gru(net_files):
    """A GRU in the model: jwt encode --calibration measures its matrices (no note on tensors the data-free
    weighting codes; before: both GRU matrices named); no traceback; the file decodes."""
    import calib_test_nets

    torch.manual_seed(0)
    torch.save(calib_test_nets.Rec().state_dict(), net_files / "rec.pt")
    np.save(net_files / "seq.npy", np.random.default_rng(0).normal(size=(64, 5, 8)).astype(np.float32))
    out = net_files / "rec.jwt"
    result = _encode(net_files / "rec.pt", "-b", "6", "--calibration", net_files / "seq.npy",
                     "--model", "calib_test_nets:Rec", "--no-repair", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "data-free weighting" not in result.output, result.output
    with codec.open(out) as f:  # the three Linear-like layers and the GRU's two matrices
        assert f.metadata["jwt.calibration"] == "64 inputs in 1 batches, 4 layers"
    calib_test_nets.Rec().load_state_dict(codec.load(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_squared_sums_in_chunks_match_the_whole_and_leave_their_inputs(dtype):
    """The sensitivity pass's sums of squares, taken a chunk at a time in float32 (a language model's logits would
    otherwise be copied whole in float64), equal the whole tensor's float64 sum within float32's pairwise rounding
    (float64 inputs: float64's), and never write into the model's outputs."""
    from codec.rd.calibrate import _squared_sum

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 101, generator=gen).to(dtype)
    b = torch.randn(3, 7, 101, generator=gen).to(dtype)
    a0, b0 = a.clone(), b.clone()
    whole = float(((a.double() - b.double()) ** 2).sum())
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    for chunk in (1, 64, 1000, a.numel(), 1 << 22):
        assert _squared_sum(a, b, chunk=chunk) == pytest.approx(whole, rel=rel)
        assert _squared_sum(a, chunk=chunk) == pytest.approx(float((a.double() ** 2).sum()), rel=rel)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert _squared_sum(a[:0]) == 0.0


@pytest.mark.parametrize("values", ["large", "tiny", "mixed", "huge and tiny", "zeros", "nan", "inf"])
def test_float32_squared_sums_keep_float64s_accuracy_on_hostile_values(values):
    """Values whose float32 squares overflow (beyond 1.8e19) or underflow (below 1e-19), of mixed signs and
    magnitudes, in chunks of their own or together: the float32 sum falls back to float64 for such a chunk, so the
    result is the float64 sum within 1e-6 (NaN and Inf as float64 gives them)."""
    from codec.rd.calibrate import _squared_sum

    rng = np.random.default_rng(1)
    n = 3000
    signs = rng.choice([-1.0, 1.0], n)
    x = {"large": signs * rng.uniform(1e19, 1e37, n),
         "tiny": signs * 10.0 ** rng.uniform(-35, -22, n),
         "mixed": signs * 10.0 ** rng.uniform(-30, 30, n),
         "huge and tiny": np.concatenate([signs[:1500] * 3e20, signs[1500:] * 1e-25]),
         "zeros": np.zeros(n),
         "nan": np.where(np.arange(n) == 7, np.nan, signs),
         "inf": np.where(np.arange(n) == 7, np.inf, signs)}[values]
    a = torch.from_numpy(x.astype(np.float32))
    b = torch.from_numpy((x[::-1] * 0.5).astype(np.float32))
    for chunk in (1000, 1 << 20):
        for got, want in ((_squared_sum(a, chunk=chunk), float((a.double() ** 2).sum())),
                          (_squared_sum(a, b, chunk=chunk), float(((a.double() - b.double()) ** 2).sum()))):
            if math.isnan(want):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(want, rel=1e-6, abs=0.0), (values, chunk)
                assert want == 0 or got > 0
