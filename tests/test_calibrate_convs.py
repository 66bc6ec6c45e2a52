"""Calibration of nn.Conv1d, nn.Conv3d and the transposed convolutions (ConvTranspose1d / 2d / 3d): their input rows
against a brute-force output error, the weighting of a transposed convolution's matrix view, the calibrated kinds and
notes of a save, and repair's rows for Conv1d / Conv3d."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec
from codec.rd.allocate import Distortion, Weighting
from codec.rd.calibrate import (CONV_KINDS, TRANSPOSED, calibrate, conv_rows, layer_kind, transposed_matrix,
                                transposed_rows)
from codec.rd.fast import weighable
from codec.rd.repair.fit import _has_rows, _layer_rows

_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_SPATIAL = {1: (11,), 2: (9, 7), 3: (6, 7, 5)}


def _energy(rows, matrix: torch.Tensor) -> float:
    """``tr(M H M^T)`` with ``H`` the sum of ``rows^T rows`` over the chunks."""
    h = sum(r.T @ r for r in rows)
    return float(torch.einsum("ij,jk,ik->", matrix, h, matrix))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel, stride, padding, dilation, mode", [
    (3, 1, 1, 1, "zeros"), (3, 2, 0, 1, "zeros"), (2, 2, 1, 2, "zeros"), (3, 1, "same", 2, "reflect"),
    (4, 3, 2, 1, "replicate"), (1, 1, 0, 1, "circular")])
def test_conv_rows_give_the_output_error_of_any_weight_error(dims, kernel, stride, padding, dilation, mode):
    """``sum |rows @ dW^T|^2`` over conv_rows' chunks (a few samples each) is the squared change of the layer's output
    for a random ``dW``, for Conv1d / 2d / 3d with any padding mode, string padding, stride and dilation."""
    torch.manual_seed(0)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](4, 6, kernel, stride=stride, padding=padding,
                                                       dilation=dilation, padding_mode=mode).double()
    x = torch.randn(3, 4, *_SPATIAL[dims], dtype=torch.float64)
    dw = torch.randn_like(conv.weight)
    want = float(conv._conv_forward(x, dw, None).pow(2).sum())
    got = _energy(conv_rows(conv, x, 2000), dw.reshape(len(dw), -1))
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("dims", [1, 3])
def test_grouped_conv_rows_are_each_groups_columns(dims):
    """Groups: each group's columns are rows of their own, as for Conv2d: the H is the sum of each group's, got from
    an ungrouped layer over that group's channels."""
    torch.manual_seed(0)
    make = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = make(4, 6, 3, stride=2, padding=1, groups=2).double()
    x = torch.randn(2, 4, *_SPATIAL[dims], dtype=torch.float64)
    h = sum(r.T @ r for r in conv_rows(conv, x, 10 ** 9))
    part = make(2, 3, 3, stride=2, padding=1).double()
    want = sum(r.T @ r for g in range(2) for r in conv_rows(part, x[:, 2 * g:2 * g + 2], 10 ** 9))
    assert torch.allclose(h, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kernel, stride, padding, dilation, extra, groups", [
    (3, 1, 1, 1, 0, 1), (3, 2, 0, 1, 1, 1), (2, 2, 1, 2, 1, 1), (4, 2, 1, 1, 0, 1), (3, 3, 4, 1, 2, 1),
    (3, 2, 1, 1, 0, 2)])
def test_transposed_rows_give_the_output_error_of_any_weight_error(dims, kernel, stride, padding, dilation, extra,
                                                                   groups):
    """A transposed convolution's output error for a random ``dW`` is ``tr(M H M^T)`` with ``M`` the matrix view
    ``[out, in/groups * prod(kernel)]`` of ``dW`` and ``H`` its rows' second moment (unnormalized), exactly: stride,
    padding (more than the kernel's reach too: a crop), dilation, output_padding. With groups, each group's rows
    give its own block's error."""
    torch.manual_seed(0)
    conv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1](
        4, 6, kernel, stride=stride, padding=padding, output_padding=extra, dilation=dilation, groups=groups).double()
    x = torch.randn(3, 4, *_SPATIAL[dims], dtype=torch.float64)
    dw = torch.randn_like(conv.weight)
    error = _TRANSPOSE[dims](x, dw, None, conv.stride, conv.padding, conv.output_padding, groups, conv.dilation)
    matrix = transposed_matrix(dw, groups)
    assert matrix.shape == (6, 4 // groups * kernel ** dims)
    pairs = list(transposed_rows(conv, x, None, 3000))  # (several chunks, a pair per phase)
    assert all(rows.shape[1] == len(columns) for columns, rows in pairs)
    if groups == 1:
        assert _energy([_widened(pairs, matrix.shape[1])], matrix) == pytest.approx(float(error.pow(2).sum()),
                                                                                   rel=1e-10)
    else:  # rows are (positions, groups) in order: group g's own against its block of outputs
        for g in range(groups):
            rows = _widened([(c, r.reshape(-1, groups, r.shape[1])[:, g]) for c, r in pairs], matrix.shape[1])
            assert _energy([rows], matrix[g * 3:(g + 1) * 3]) == pytest.approx(
                float(error[:, g * 3:(g + 1) * 3].pow(2).sum()), rel=1e-10)


def _widened(pairs, width: int) -> torch.Tensor:
    """transposed_rows' ``(columns, rows)`` pairs as whole rows (zeros outside their columns), stacked."""
    out = []
    for columns, rows in pairs:
        whole = rows.new_zeros((len(rows), width))
        whole[:, columns] = rows
        out.append(whole)
    return torch.cat(out)


def test_transposed_rows_take_each_phases_taps_only():
    """A stride-2, 4 x 4 ConvTranspose2d: each of the 4 phases' rows read 2 x 2 taps of each channel (a quarter of
    the columns), and they cover every output position once."""
    conv = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1)
    x = torch.randn(2, 8, 5, 5)
    pairs = list(transposed_rows(conv, x, None, 10 ** 9))
    assert len(pairs) == 4 and all(len(columns) == 8 * 4 for columns, _ in pairs)
    assert sum(len(rows) for _, rows in pairs) == 2 * 10 * 10


class _Convs(nn.Module):
    """Conv1d over a sequence, Conv3d over a clip, a ConvTranspose2d given output_size, a Linear head."""

    def __init__(self, keyword: bool = False):
        super().__init__()
        self.keyword = keyword  # output_size given by keyword (the hooks do not see it)
        self.seq = nn.Conv1d(3, 4, 3, padding=1)
        self.clip = nn.Conv3d(1, 2, 3, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * 16 * 16, 5)

    def forward(self, x):  # (N, 3, 32)
        n = x.shape[0]
        h = torch.relu(self.seq(x)).reshape(n, 1, 2, 8, 8)
        h = torch.relu(self.clip(h)).mean(2)  # (N, 2, 8, 8)
        # output_size (16, 16): output_padding 1 where 15 would be 0
        h = (self.up(h, output_size=(16, 16)) if self.keyword else self.up(h, (16, 16))).reshape(n, -1)
        return self.head(h)


@pytest.mark.parametrize("keyword", [False, True])
def test_the_convolutions_are_calibrated_kinds(keyword):
    """Each convolution has its kind and an H of its matrix view's columns; the transposed one's H is its rows' mean
    second moment, read with the output_size its forward was given (by position, or by keyword, which the hooks do
    not see: its output's size tells; before, a keyword output_size failed in the noise pass); every sensitivity
    measured."""
    torch.manual_seed(0)
    model = _Convs(keyword)
    x = torch.randn(40, 3, 32)
    calib = calibrate(model, x, sensitivity_samples=16)
    kinds = {name: stats.kind for name, stats in calib.layers.items()}
    assert kinds == {"seq.weight": "conv1d_nn", "clip.weight": "conv3d", "up.weight": TRANSPOSED,
                     "head.weight": "linear"}
    assert set(CONV_KINDS) >= {"conv1d_nn", "conv3d"} and layer_kind(model.up) == TRANSPOSED
    assert calib.layers["seq.weight"].h.shape == (9, 9) and calib.layers["clip.weight"].h.shape == (27, 27)
    assert calib.layers["up.weight"].h.shape == (18, 18) and calib.layers["up.weight"].groups == 1
    with torch.no_grad():
        n = x.shape[0]
        h = torch.relu(model.clip(torch.relu(model.seq(x)).reshape(n, 1, 2, 8, 8))).mean(2)
    rows = _widened(list(transposed_rows(model.up, h, (16, 16), 10 ** 9)), 18).double()
    assert rows.shape[0] == n * 256
    want = (rows.T @ rows / rows.shape[0]).numpy()
    assert np.allclose(calib.layers["up.weight"].h, want, rtol=1e-4, atol=1e-6)
    assert all(s.sensitivity > 0.001 and s.sensitivity != 1.0 for s in calib.layers.values())


def test_a_transposed_convolutions_weighting_scores_its_matrix_view():
    """Weighting(transposed=groups): the relative output error of a decoded weight is that of the matrix view under H,
    measured whole (the allocator's bands of stored rows would split the view's rows); the fast search is not used
    for it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2, 2))  # in 4, out 3 * groups 2, kernel 2 x 2
    dec = w + 0.1 * rng.standard_normal(w.shape)
    rows = rng.standard_normal((50, 2 * 4))
    h = rows.T @ rows / 50
    weighting = Weighting(h=h, transposed=2)
    assert weighting.fits(w.shape) and not weighting.fits((4, 3, 3, 2)) and not Weighting(h=h).fits(w.shape)

    def view(a):
        return transposed_matrix(torch.from_numpy(a), 2).numpy()

    want = np.trace(view(dec - w) @ h @ view(dec - w).T) / np.trace(view(w) @ h @ view(w).T)
    distortion = Distortion({"up.weight": weighting})
    weighted, out = distortion("up.weight", w, dec)
    assert weighted == pytest.approx(want, rel=1e-5) and out == pytest.approx(want ** 0.5, rel=1e-5)
    assert not weighable(distortion) and weighable(Distortion({"x": Weighting(h=np.ones(8))}))


def test_a_calibrated_save_names_no_convolution_as_unmeasured(tmp_path, monkeypatch):
    """A model of Conv1d, Conv3d and ConvTranspose2d layers: none named as 'a layer kind calibration does not
    measure' (before: all three). With repair (the default) the transposed weight keeps the data-free weighting
    (TRANSPOSED_UNDER_REPAIR) and a note says why; without repair, or with the switch on, it is weighed as measured
    (the switch: repair's note names it as coded without GPTQ or refit). Each file decodes close to the model."""
    from codec.rd import calibrate as calibrate_module

    torch.manual_seed(0)
    model = _Convs()
    x = torch.randn(64, 3, 32)
    runs = {}
    for key, under, repair in (("default", False, True), ("switch", True, True), ("no repair", False, False)):
        monkeypatch.setattr(calibrate_module, "TRANSPOSED_UNDER_REPAIR", under)
        notes = [str(n) for n in codec.save(model, tmp_path / "c.jwt", bits_per_weight=20, calibration=x,
                                            repair=repair)]
        assert not any("does not measure" in n or "not reached" in n for n in notes), notes
        runs[key] = [n for n in notes if "'up.weight'" in n]
        fresh = _Convs()
        codec.load_into(fresh, tmp_path / "c.jwt")
        with torch.no_grad():
            ref, got = model(x), fresh(x)
        assert float((got - ref).pow(2).sum() / ref.pow(2).sum()) < 0.01
    assert len(runs["default"]) == 1 and runs["default"][0].startswith(
        "calibration: 1 transposed convolution weight ('up.weight') coded by the data-free weighting: repair gives "
        "them a judged least-squares bias only"), runs
    assert len(runs["switch"]) == 1 and "transposed convolution weight ('up.weight') coded with the calibrated " \
        "weighting, without GPTQ or refit" in runs["switch"][0], runs
    assert runs["no repair"] == [], runs


@pytest.mark.parametrize("make, shape", [(nn.Conv1d, (2, 3, 10)), (nn.Conv3d, (2, 3, 4, 5, 6))])
def test_repair_takes_conv1d_and_conv3d_as_rows(make, shape):
    """Repair's rows of a Conv1d / Conv3d (zero padding, stride, dilation) times its weight's matrix view give the
    layer's output: refit, GPTQ and the least-squares bias fit them as they fit a Conv2d."""
    torch.manual_seed(0)
    conv = make(3, 4, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(shape)
    assert _has_rows(conv)
    rows = torch.cat(list(_layer_rows(conv, x)))
    with torch.no_grad():
        y = conv(x)
        got = rows @ conv.weight.reshape(4, -1).T + conv.bias
    want = y.movedim(1, -1).reshape(-1, 4)
    assert torch.allclose(got, want, atol=1e-5)
    assert not _has_rows(make(3, 4, 3, padding="same"))
