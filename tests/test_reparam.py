"""weight_norm / spectral_norm layers coded for the weight they compute (codec.rd.allocate.reparametrized): v's
rows weighed by (g / ||v||)^2, as the weight's; a column factor for weight_norm over another dim; spectral_norm's
uniform factor left to the relative measure; a BatchNorm after a weight_norm conv; calibration measures the computed
weight and the search moves it to v; weight_norm's g no longer takes the input layer's image rows from v."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import codec
from codec.dtypes import get_dtype
from codec.rd.allocate import (Distortion, Weighting, computed_shapes, norm_weightings, reparametrized,
                               stored_weightings, with_row_images)
from codec.tensorcodec import EncodeOptions
from test_newuser_builds import _Normed  # weight_norm + spectral_norm + a plain Linear

F64 = get_dtype("float64")


def _state(module: nn.Module) -> dict[str, np.ndarray]:
    return {n: t.detach().double().numpy() for n, t in module.state_dict().items()}


def _weightings(state: dict[str, np.ndarray]) -> dict[str, Weighting]:
    shapes = {n: a.shape for n, a in state.items()}
    reparams = reparametrized(shapes, state.__getitem__)
    return stored_weightings(norm_weightings(computed_shapes(shapes, reparams), state.__getitem__), reparams)


def _spread_rows(layer: nn.Module, seed: int = 0) -> None:
    """v's rows (or columns) rescaled by 10**U(-1, 1): the same layer (W = g v / ||v||), other stored values."""
    v = layer.parametrizations.weight.original1
    g = layer.parametrizations.weight.original0
    axis = next(i for i, (a, b) in enumerate(zip(g.shape, v.shape)) if a == b and a > 1)
    shape = [1] * v.dim()
    shape[axis] = v.shape[axis]
    scale = 10 ** (torch.rand(v.shape[axis], generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    with torch.no_grad():
        v.mul_(scale.reshape(shape))


@pytest.mark.parametrize("make, dim", [(lambda: nn.Linear(48, 32), 0), (lambda: nn.Linear(48, 32), 1),
                                       (lambda: nn.Conv2d(6, 16, 3), 0), (lambda: nn.Conv1d(8, 16, 3), 0),
                                       (lambda: nn.Conv2d(6, 16, 3), 1)])
def test_vs_measure_is_the_computed_weights_relative_error_to_first_order(make, dim):
    """A small error dv in v, measured with the weighting moved to it, equals the relative error it causes in
    W = g v / ||v|| (up to the radial part, ~1/columns of it), whatever the scale of v's rows; v's own NMSE does not.
    Data-free (nothing measured, no norm after the layer) only a Linear's v is weighted so."""
    torch.manual_seed(0)
    layer = parametrizations.weight_norm(make().double(), dim=dim)
    _spread_rows(layer)
    state = _state(layer)
    name = "parametrizations.weight.original1"
    assert set(_weightings(state)) == ({name} if layer.weight.dim() == 2 else set())  # data-free: a Linear's only
    reparams = reparametrized({n: a.shape for n, a in state.items()}, state.__getitem__)
    weighting = stored_weightings({"weight": Weighting()}, reparams)  # as a measured weight's (calibration's) moves
    w = weighting[name]
    assert (w.rows is not None) == (dim == 0) and (w.h is not None) == (dim != 0) and w.scale == 1.0
    v = layer.parametrizations.weight.original1
    dv = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=v.dtype)
    dv *= 1e-4 * v.detach().abs().mean()
    reference = layer.weight.detach().double()
    with torch.no_grad():
        v.add_(dv)
    moved = layer.weight.detach().double()
    truth = float((moved - reference).pow(2).sum() / reference.pow(2).sum())
    measured, plain, _ = Distortion(weighting).measure(name, state[name], state[name] + dv.double().numpy(), F64)
    assert measured == pytest.approx(truth, rel=0.15)
    assert not plain == pytest.approx(truth, rel=0.5)  # v's own NMSE is far off once its rows' scales spread


def test_a_uniform_factor_is_left_to_the_relative_measure_and_a_batchnorm_after_a_weight_norm_conv_multiplies():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8),
                          parametrizations.spectral_norm(nn.Linear(16, 16)),
                          parametrizations.weight_norm(nn.Linear(16, 4), dim=None))
    with torch.no_grad():
        model[1].running_var.copy_(torch.linspace(0.1, 4, 8))
        model[1].weight.copy_(torch.linspace(0.5, 2, 8))
    state = _state(model)
    shapes = {n: a.shape for n, a in state.items()}
    reparams = reparametrized(shapes, state.__getitem__)
    assert set(reparams) == {"0.weight", "2.weight", "3.weight"}
    assert reparams["2.weight"].rows is None and reparams["2.weight"].cols is None  # spectral_norm: W = original / s
    assert reparams["3.weight"].rows is None and reparams["3.weight"].cols is None  # dim=None: one g
    out = _weightings(state)
    assert set(out) == {"0.parametrizations.weight.original1"}  # the others keep their own (relative) measure
    g = state["0.parametrizations.weight.original0"].reshape(-1)
    v = state["0.parametrizations.weight.original1"].reshape(8, -1)
    bn = state["1.weight"] ** 2 / (state["1.running_var"] + 1e-5)
    np.testing.assert_allclose(out["0.parametrizations.weight.original1"].rows,
                               bn * (g / np.linalg.norm(v, axis=1)) ** 2, rtol=1e-9)
    assert not out["0.parametrizations.weight.original1"].prior  # a BatchNorm's weighting replaces the prior as before


def test_another_parametrization_is_left_alone():
    class Symmetric(nn.Module):
        def forward(self, x):
            return x.triu() + x.triu(1).transpose(0, 1)

    layer = nn.Linear(8, 8)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    state = _state(layer)
    assert reparametrized({n: a.shape for n, a in state.items()}, state.__getitem__) == {}


def test_weight_norms_g_does_not_take_the_input_layers_image_rows_from_v():
    """g ([256, 1]) is stored before v: it was the first matrix, so v ([256, 784]) lost the image prior and the
    row-image candidates (a weight_norm MLP at -b 0.5: 71.94 % against 75.04 % with them)."""
    f32 = get_dtype("float32")
    tensors = [("fc1.bias", np.zeros(256, np.float32), f32), ("fc1.g", np.ones((256, 1), np.float32), f32),
               ("fc1.v", np.ones((256, 784), np.float32), f32), ("fc2.w", np.ones((10, 784), np.float32), f32)]
    rows = {n: r for n, _, _, r in with_row_images(tensors, EncodeOptions())}
    assert rows == {"fc1.bias": None, "fc1.g": None, "fc1.v": (28, 28), "fc2.w": None}


def test_calibration_measures_the_computed_weights_and_the_file_loads_strictly(tmp_path):
    from codec.rd.calibrate import calibrate

    model = _Normed().eval()
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    assert {"a.weight", "b.weight", "c.weight"} <= set(calibrate(model, x).layers)
    notes = codec.save(model, tmp_path / "p.jwt", bits_per_weight=3, calibration=x, repair=False)
    assert not [n for n in notes if "data-free weighting" in n or "parametrize" in n]
    fresh = _Normed()
    codec.load_into(fresh, tmp_path / "p.jwt")
    with torch.no_grad():
        error = float((fresh.eval()(x) - model(x)).pow(2).sum() / model(x).pow(2).sum())
    assert error < 0.2  # (random weights and inputs: no structure to code)
