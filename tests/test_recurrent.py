"""Calibration of nn.RNN / nn.GRU / nn.LSTM (codec/rd/recurrent.py): each matrix's input moments, checked against
a step-by-step recurrence written here with torch's cells; sensitivities; a calibrated save; hostile input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import codec
from codec.rd.calibrate import calibrate

CELLS = {nn.GRU: nn.GRUCell, nn.LSTM: nn.LSTMCell, nn.RNN: nn.RNNCell}


def _hand_moments(rnn: nn.RNNBase, x: torch.Tensor, lengths: list[int], h0=None) -> dict[str, np.ndarray]:
    """E[x x^T] of every matrix's inputs, by running each layer and direction one step at a time with a cell that
    holds its weights. ``x``: (N, T, F) batch first; sequence ``i`` has ``lengths[i]`` valid steps."""
    dirs = 2 if rnn.bidirectional else 1
    lstm = isinstance(rnn, nn.LSTM)
    n, hid = x.shape[0], rnn.hidden_size
    rows: dict[str, list[torch.Tensor]] = {}
    seq = [x[i, :lengths[i]] for i in range(n)]
    for k in range(rnn.num_layers):
        outs = [[None] * dirs for _ in range(n)]
        for d in range(dirs):
            sfx = "_reverse" if d else ""
            cell = CELLS[type(rnn)](seq[0].shape[1], hid, bias=rnn.bias)
            if isinstance(rnn, nn.RNN):
                cell.nonlinearity = rnn.nonlinearity
            cell.weight_ih.data = getattr(rnn, f"weight_ih_l{k}{sfx}").data
            cell.weight_hh.data = getattr(rnn, f"weight_hh_l{k}{sfx}").data
            if rnn.bias:
                cell.bias_ih.data = getattr(rnn, f"bias_ih_l{k}{sfx}").data
                cell.bias_hh.data = getattr(rnn, f"bias_hh_l{k}{sfx}").data
            for i in range(n):
                h = torch.zeros(1, hid) if h0 is None else h0[0][k * dirs + d, i][None] if lstm \
                    else h0[k * dirs + d, i][None]
                c = torch.zeros(1, hid) if h0 is None or not lstm else h0[1][k * dirs + d, i][None]
                order = range(lengths[i]) if d == 0 else reversed(range(lengths[i]))
                out = [None] * lengths[i]
                for t in order:
                    xt = seq[i][t][None]
                    rows.setdefault(f"weight_ih_l{k}{sfx}", []).append(xt)
                    rows.setdefault(f"weight_hh_l{k}{sfx}", []).append(h)
                    if lstm:
                        h, c = cell(xt, (h, c))
                    else:
                        h = cell(xt, h)
                    out[t] = h[0]
                outs[i][d] = torch.stack(out)
        seq = [torch.cat(outs[i], dim=1) for i in range(n)]
    out = {}
    for name, parts in rows.items():
        a = torch.cat(parts).double()
        out[name] = (a.T @ a / len(a)).numpy()
    return out


class _Net(nn.Module):
    def __init__(self, cls, batch_first: bool, bidirectional: bool, layers: int, hidden: int = 6):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(5, hidden, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(out.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first, bidirectional, layers", [(True, False, 1), (False, False, 2),
                                                               (True, True, 2), (False, True, 1)])
def test_moments_equal_the_hand_computed_recurrence(cls, batch_first, bidirectional, layers):
    """weight_ih_l{k}[_reverse] gets E[x x^T] of its layer's input over every step (layer k > 0: layer k - 1's
    output, both directions), weight_hh_l{k}[_reverse] E[h h^T] of the state each step reads (h0 = 0 first)."""
    torch.manual_seed(0)
    model = _Net(cls, batch_first, bidirectional, layers).eval()
    x = torch.randn(24, 7, 5)
    calib = calibrate(model, x, sensitivity_samples=8)
    with torch.no_grad():
        hand = _hand_moments(model.rnn, x, [7] * 24)
    assert set(hand) | {"head.weight"} == {n.removeprefix("rnn.") for n in calib.layers}
    for name, h in hand.items():
        stats = calib.layers[f"rnn.{name}"]
        assert stats.kind == "linear" and not stats.diagonal
        assert stats.samples == 24 * 7
        np.testing.assert_allclose(stats.h, h, rtol=2e-4, atol=1e-6, err_msg=name)
        assert 0 < stats.sensitivity < 100


def test_moments_with_h0_given_and_a_packed_sequence():
    """An LSTM called with (h0, c0) and a PackedSequence of unequal, unsorted lengths: each step's state starts
    from the given h0 / c0, and the padding positions are not counted."""
    torch.manual_seed(1)
    lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(6, 8, 5)
    lengths = [3, 8, 5, 1, 8, 2]
    h0 = (torch.randn(4, 6, 4), torch.randn(4, 6, 4))

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
            _, (h, _) = self.lstm(packed, h0)
            return h.transpose(0, 1).reshape(len(x), -1)

    calib = calibrate(Packed().eval(), [x], sensitivity_samples=0)
    with torch.no_grad():
        hand = _hand_moments(lstm, x, lengths, h0)
    assert len(hand) == 8
    for name, h in hand.items():
        stats = calib.layers[f"lstm.{name}"]
        assert stats.samples == sum(lengths)
        np.testing.assert_allclose(stats.h, h, rtol=2e-4, atol=1e-6, err_msg=name)


def test_unbatched_input_and_a_plain_rnn():
    """A 2-D (unbatched) sequence through an nn.RNN (relu) with h0 given: the same moments as its batch of one."""
    torch.manual_seed(2)
    rnn = nn.RNN(5, 4, nonlinearity="relu")
    h0 = torch.randn(1, 4)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x[0], h0)[0]

    x = torch.randn(1, 9, 5)
    calib = calibrate(One().eval(), [x], sensitivity_samples=0)
    with torch.no_grad():
        hand = _hand_moments(rnn, x, [9], h0[:, None])
    for name, h in hand.items():
        np.testing.assert_allclose(calib.layers[f"rnn.{name}"].h, h, rtol=2e-4, atol=1e-6, err_msg=name)


def test_the_sensitivity_pass_leaves_every_parameter_as_it_was_and_measures_what_matters():
    """The noise put into a recurrent matrix for its sensitivity is taken out again (bitwise), and a matrix the
    output does not depend on gets the floor: the reverse direction's weight_hh, when the head reads only the last
    step (where the reverse direction has read nothing but h0 = 0)."""
    torch.manual_seed(3)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(5, 6, bidirectional=True, batch_first=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    model = Last().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibrate(model, torch.randn(32, 6, 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert calib.layers["gru.weight_hh_l0_reverse"].sensitivity == pytest.approx(1e-6)
    assert calib.layers["gru.weight_hh_l0"].sensitivity > 1e-3
    assert calib.layers["gru.weight_ih_l0_reverse"].sensitivity > 1e-3


def test_an_lstm_projection_is_named_as_not_measured(tmp_path):
    """proj_size > 0: weight_hr's input (the cell's output) is not returned by the module: its tensors keep the
    data-free weighting and the note says why; the LSTM's other matrices are measured."""
    torch.manual_seed(4)

    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 8, proj_size=3, batch_first=True)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    notes = codec.save(Proj(), tmp_path / "p.jwt", bits_per_weight=48, calibration=torch.randn(16, 4, 5),
                       repair=False)
    note = next(str(n) for n in notes if str(n).startswith("calibration:"))
    assert "'lstm.weight_hr_l0' (LSTM projection: its input, the cell's output, is not returned by the module)" \
        in note, note
    assert "weight_ih" not in note and "weight_hh" not in note and "\n" not in note


def test_a_recurrent_layer_the_inputs_never_reach_is_named_as_such(tmp_path):
    """A GRU the forward pass does not call: its matrices are "not reached by the calibration inputs", not a kind
    calibration does not measure."""

    class Aside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)
            self.gru = nn.GRU(8, 8)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(5)
    notes = codec.save(Aside(), tmp_path / "a.jwt", bits_per_weight=48, calibration=torch.randn(16, 8), repair=False)
    note = next(str(n) for n in notes if str(n).startswith("calibration:"))
    assert "'gru.weight_ih_l0', 'gru.weight_hh_l0' (not reached by the calibration inputs)" in note, note
    assert "does not measure" not in note


def test_nan_in_a_sequence_is_a_one_line_error():
    model = _Net(nn.GRU, True, False, 1).eval()
    x = torch.randn(8, 4, 5)
    x[5, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^calibration inputs: sample 5 holds NaN or Inf values$"):
        calibrate(model, x)
    with pytest.raises(ValueError, match=r"^calibration batch 1: holds NaN or Inf values$"):
        calibrate(model, [x[:4], x[4:]])


class _Classifier(nn.Module):
    """Rows of a 16 x 16 'image' read as 16 steps of 16 values, a 2-layer GRU of 48, a head."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(16, 48, num_layers=2, batch_first=True)
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def _trained_gru() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny GRU trained a few steps on inputs of unequal scales per feature (so the data-free weighting, which
    sees only the weights, misjudges which columns matter)."""
    torch.manual_seed(0)
    scale = torch.logspace(-1.5, 0.5, 16)
    x = torch.randn(320, 16, 16) * scale
    y = (x[:, -4:, :8].sum((1, 2)) > 0).long() + 2 * (x[:, :4, 8:].sum((1, 2)) > 0).long()
    model = _Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:256]), y[:256]).backward()
        opt.step()
    return model.eval(), x[:256], x[256:]


def test_a_calibrated_save_of_a_gru_beats_the_data_free_one_at_equal_size(tmp_path):
    """At the same budget, the calibrated weighting of the GRU's matrices gives a smaller output error on held-out
    sequences than the data-free one (no repair: the weighting alone)."""
    model, calib_x, test_x = _trained_gru()
    with torch.no_grad():
        ref = model(test_x)

    def error(path) -> tuple[float, float]:
        decoded = _Classifier()
        decoded.load_state_dict(codec.load(path))
        with torch.no_grad():
            out = decoded.eval()(test_x)
        weights = sum(p.numel() for p in model.parameters())
        return float((out - ref).pow(2).sum() / ref.pow(2).sum()), 8 * path.stat().st_size / weights

    codec.save(model, tmp_path / "cal.jwt", bits_per_weight=3, calibration=calib_x, repair=False)
    cal, cal_bits = error(tmp_path / "cal.jwt")
    codec.save(model, tmp_path / "free.jwt", bits_per_weight=3.1)  # (at 3: 2.90 bits/weight, less than cal's)
    free, free_bits = error(tmp_path / "free.jwt")
    assert cal_bits <= 3 and free_bits >= cal_bits
    assert cal < 0.8 * free, (cal, free)


def test_a_repaired_save_codes_the_recurrent_matrices_as_planned_and_says_so(tmp_path):
    """Repair (GPTQ and refit for nn.Linear / nn.ConvNd) codes the GRU's matrices with the calibrated weighting
    alone, says so in one note, and the file stays within its budget and decodes close to the model."""
    model, calib_x, test_x = _trained_gru()
    notes = codec.save(model, tmp_path / "r.jwt", bits_per_weight=3, calibration=calib_x)
    said = [str(n) for n in notes if "recurrent" in str(n)]
    assert said == ["repair: 4 recurrent matrices ('gru.weight_ih_l0', 'gru.weight_hh_l0', 'gru.weight_ih_l1', "
                    "'gru.weight_hh_l1') coded with the calibrated weighting, without GPTQ or refit (repair's are for "
                    "nn.Linear and nn.Conv1d / 2d / 3d)"], notes
    assert not any(str(n).startswith("calibration:") for n in notes), notes
    weights = sum(p.numel() for p in model.parameters())
    assert 8 * (tmp_path / "r.jwt").stat().st_size / weights <= 3
    decoded = _Classifier()
    decoded.load_state_dict(codec.load(tmp_path / "r.jwt"))
    with torch.no_grad():
        ref, out = model(test_x), decoded.eval()(test_x)
    assert float((out - ref).pow(2).sum() / ref.pow(2).sum()) < 0.15
