"""Calibration of nn.MultiheadAttention (codec.rd.attention): in_proj_weight / q,k,v_proj_weight and out_proj.weight
get their own inputs' moments and sensitivities (bench/JOURNAL.md, "mha (twenty-seventh pass)")."""

import numpy as np
import pytest
import torch
from torch import nn

import codec
from codec.rd import attention
from codec.rd.calibrate import calibrate, uncalibrated


@pytest.fixture
def measured(monkeypatch):
    """The projections weighed by their measured sensitivities (not the default: codec.rd.attention)."""
    monkeypatch.setattr(attention, "MEASURED_SENSITIVITY", True)


class Attend(nn.Module):
    """Self- or cross-attention (kdim / vdim given: q_proj_weight, ... separate), batch first or not."""

    def __init__(self, batch_first: bool, cross: bool, kdim: int | None = None):
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.mem = nn.Linear(6, kdim or 16)
        self.head = nn.Linear(16, 3)

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, m = x[..., :16], self.mem(x[..., 16:]) if self.cross else x[..., :16]
        return (q, m) if self.batch_first else (q.transpose(0, 1), m.transpose(0, 1))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        q, m = self.inputs(x)
        o, _ = self.att(q, m, m, key_padding_mask=pad)
        o = o if self.batch_first else o.transpose(0, 1)
        return self.head(o.mean(1))


def _second(rows: torch.Tensor) -> np.ndarray:
    rows = rows.double()
    return (rows.T @ rows / rows.shape[0]).numpy()


CASES = [(bf, cross, kdim) for bf in (True, False) for cross, kdim in ((False, None), (True, None), (True, 8))]


@pytest.mark.parametrize("batch_first, cross, kdim", CASES)
def test_moments_equal_the_hand_computed_projection_inputs(batch_first, cross, kdim, measured):
    torch.manual_seed(0)
    model = Attend(batch_first, cross, kdim).eval()
    x = torch.randn(40, 5, 22)
    calib = calibrate(model, x)
    with torch.no_grad():
        q, m = model.inputs(x)
        out, _ = model.att(q, m, m)
        # the attention output before out_proj, from the module's own output (out_proj.weight is invertible)
        w, b = model.att.out_proj.weight, model.att.out_proj.bias
        pre = torch.linalg.solve(w.double(), (out.reshape(-1, 16) - b).double().T).T
    q, m = q.reshape(-1, 16), m.reshape(-1, m.shape[-1])
    layers = calib.layers
    assert np.allclose(layers["att.out_proj.weight"].h, _second(pre), atol=1e-4)
    if kdim is None:
        assert layers["att.in_proj_weight"].h.shape == (16, 16)
        assert np.allclose(layers["att.in_proj_weight"].h, _second(torch.cat([q, m, m])), atol=1e-4)
        rows = layers["att.in_proj_weight"].rows
        assert rows.shape == (48,) and (rows > 0).all()
        assert len({float(r) for r in rows[:16]}) == 1  # one weight per block (query, key, value)
        assert "att.q_proj_weight" not in layers
    else:
        assert np.allclose(layers["att.q_proj_weight"].h, _second(q), atol=1e-4)
        assert np.allclose(layers["att.k_proj_weight"].h, _second(m), atol=1e-4)
        assert np.allclose(layers["att.v_proj_weight"].h, _second(m), atol=1e-4)
        assert "att.in_proj_weight" not in layers
    for name, stats in layers.items():
        assert stats.sensitivity > 1e-6 and stats.weighting().fits(model.state_dict()[name].shape), name
    assert not any("att" in n for n in calib.notes) and calib.unmoved == []
    assert uncalibrated(model, calib, [n for n, t in model.state_dict().items() if n.startswith("att.")
                                       and t.dim() >= 2]) is None


def test_in_proj_rows_weigh_each_block_by_its_own_sensitivity(measured):
    """The weighting of in_proj_weight is, per block, s_b tr(dW_b H dW_b^T) / tr(W_b H W_b^T)."""
    torch.manual_seed(1)
    model = Attend(True, False).eval()
    stats = calibrate(model, torch.randn(40, 5, 22)).layers["att.in_proj_weight"]
    weighting = stats.weighting()
    w = model.att.in_proj_weight.detach().double().numpy()
    per_block = [weighting.energy(np.where(np.arange(48)[:, None] // 16 == b, w, 0)) for b in range(3)]
    # each block's own relative energy times the scale is its sensitivity: the three add up to the scale
    total = weighting.energy(w)
    shares = [e / total * weighting.scale for e in per_block]
    assert sum(shares) == pytest.approx(weighting.scale)
    assert all(s > 0 for s in shares)
    assert len({round(s, 9) for s in shares}) == 3  # the query, key and value blocks matter differently


def test_the_sensitivity_pass_leaves_the_parameters_and_a_padding_mask_keeps_padded_keys_out(measured):
    torch.manual_seed(2)
    model = Attend(True, True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 5, 22)
    pad = torch.zeros(8, 5, dtype=torch.bool)
    pad[:, 3:] = True  # the last two keys of every sample are padding
    calib = calibrate(model, [{"x": x, "pad": pad}])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        q, m = model.inputs(x)
    rows = torch.cat([q.reshape(-1, 16), m[:, :3].reshape(-1, 16), m[:, :3].reshape(-1, 16)])
    assert np.allclose(calib.layers["att.in_proj_weight"].h, _second(rows), atol=1e-4)
    assert calib.layers["att.in_proj_weight"].samples == rows.shape[0]


@pytest.mark.parametrize("layer", [nn.TransformerEncoderLayer, nn.TransformerDecoderLayer])
def test_every_matrix_of_a_transformer_layer_is_calibrated(layer):
    torch.manual_seed(3)
    model = nn.Sequential(layer(16, 4, 32, batch_first=True)).eval()
    if layer is nn.TransformerDecoderLayer:
        class Dec(nn.Module):
            def __init__(self):
                super().__init__()
                self.dec = model[0]

            def forward(self, x):
                return self.dec(x, x[:, :3] * 2)

        model = Dec().eval()
    calib = calibrate(model, torch.randn(16, 6, 16))
    names = [n for n, t in model.state_dict().items() if t.dim() >= 2]
    assert all(n in calib.layers for n in names), sorted(set(names) - set(calib.layers))
    assert uncalibrated(model, calib, names) is None


def test_an_attention_the_inputs_never_reach_is_named_as_such(tmp_path):
    class Aside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)
            self.unused = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.fc(x)

    calib = calibrate(Aside(), torch.randn(16, 8))
    assert "attention 'unused': not used by the calibration inputs" in calib.notes
    note = uncalibrated(Aside(), calib, ["unused.in_proj_weight", "unused.out_proj.weight"])
    assert "'unused.in_proj_weight', 'unused.out_proj.weight' (not reached by the calibration inputs)" in note, note


def test_by_default_the_projections_keep_the_data_free_scale_over_their_measured_h():
    torch.manual_seed(4)
    model = Attend(False, True).eval()
    x = torch.randn(40, 5, 22)
    calib = calibrate(model, x)
    with torch.no_grad():
        q, m = model.inputs(x)
    q, m = q.reshape(-1, 16), m.reshape(-1, 16)
    stats = calib.layers["att.in_proj_weight"]
    assert np.allclose(stats.h, _second(torch.cat([q, m, m])), atol=1e-4)
    assert stats.rows is None and stats.sensitivity == 1.0 and calib.layers["att.out_proj.weight"].sensitivity == 1.0
    assert calib.layers["head.weight"].sensitivity != 1.0  # (the other layers' measured as before)
