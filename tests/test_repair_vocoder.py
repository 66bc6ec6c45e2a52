"""Repair of a vocoder's layers: the least-squares bias of a transposed convolution (its output's mean kept, for any
stride, padding, groups and output size), and weight_norm / spectral_norm layers repaired through the weight they
compute (the bias read through it; GPTQ on weight_norm's ``v`` row by row)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from codec.rd.repair import RepairSettings, repair
from codec.rd.repair import fit as fit_module
from codec.tensorcodec import EncodeOptions


def _options(model: nn.Module, bits: int = 2) -> dict[str, EncodeOptions]:
    """``quant`` at ``bits`` for every tensor of 64 elements or more, lossless for the rest (biases, weight_norm's
    ``g``)."""
    lossy = EncodeOptions(codec="quant", bits=bits, tile=(8, 64))
    return {n: lossy if t.dim() > 1 and t.numel() >= 64 else EncodeOptions(codec="lossless")
            for n, t in model.state_dict().items()}


def _batches(channels: int, spatial: tuple[int, ...], n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list((torch.randn(n * 8, channels, *spatial, generator=g) + 0.5).split(8))


def _channel_means(model: nn.Module, batches: list) -> torch.Tensor:
    with torch.no_grad():
        out = torch.cat([model(b) for b in batches])
    return out.transpose(0, 1).reshape(out.shape[1], -1).mean(1)


class _Sized(nn.Module):
    """A transposed convolution given ``output_size`` by keyword (its hooks do not see it)."""

    def __init__(self, up: nn.Module, size: list[int]):
        super().__init__()
        self.up, self.size = up, size

    def forward(self, x):
        return self.up(x, output_size=self.size)


@pytest.mark.parametrize("dims, stride, padding, groups, size", [
    (1, 4, 2, 1, None), (1, 3, 0, 2, None), (2, 2, 1, 1, None), (1, 2, 1, 1, [22]), (3, 2, 0, 2, None)])
def test_a_transposed_convolution_keeps_its_output_mean(dims, stride, padding, groups, size):
    """Repair moves a transposed convolution's bias so that its output's mean per channel over the calibration
    inputs is the original's (the least-squares bias, exact through any stride, padding, groups and an output size
    given by keyword); before the twenty-ninth pass it was coded as planned and its mean moved with its error."""
    torch.manual_seed(0)
    kind = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    up = kind(16, 16 * groups, 5 if dims == 1 else 3, stride=stride, padding=padding, groups=groups)
    with torch.no_grad():
        up.weight.add_(0.05)  # a mean the 2-bit coding moves
    model = _Sized(up, size) if size else nn.Sequential(up)
    batches = _batches(16, {1: (10,), 2: (5, 4), 3: (3, 4, 3)}[dims])
    done = repair(model.eval(), batches, _options(model), settings=RepairSettings(gptq=False))
    bias = "up.bias" if size else "0.bias"
    assert bias in done.targets  # moved
    want, got = _channel_means(model, batches), _channel_means(done.model, batches)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the coding itself moved the mean: the bias had something to make up for
    done.model.get_submodule(bias.rpartition(".")[0]).bias.data = up.bias.data.clone()
    assert (_channel_means(done.model, batches) - want).abs().max() > 1e-3
    assert any("least-squares bias only" in n and "weight" in n for n in done.notes)


def test_transposed_bias_switch_off_leaves_it_as_planned(monkeypatch):
    """``fit.TRANSPOSED_BIAS`` False: the transposed convolution is coded as planned, its bias unmoved (the
    previous behaviour)."""
    monkeypatch.setattr(fit_module, "TRANSPOSED_BIAS", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(16, 16, 4, stride=2)).eval()
    done = repair(model, _batches(16, (10,)), _options(model), settings=RepairSettings(gptq=False))
    assert "0.bias" not in done.targets


def _wn_model(norm) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(norm(nn.Conv1d(16, 32, 3, padding=1)), nn.ReLU(), norm(nn.Conv1d(32, 16, 3, padding=1)),
                          nn.ReLU(), norm(nn.ConvTranspose1d(16, 8, 8, stride=2, padding=3)))
    with torch.no_grad():
        for m in model:
            if hasattr(m, "bias"):
                m.bias.add_(0.1)
    return model.eval()


@pytest.mark.parametrize("norm", [parametrizations.weight_norm, parametrizations.spectral_norm])
def test_a_weight_norm_layer_is_repaired_through_the_weight_it_computes(norm):
    """weight_norm's ``v`` (spectral_norm's ``original``) is repaired as the layer's weight: GPTQ codes it against
    the layer's inputs (its target differs from the original), each layer's bias is moved through the weight the
    layer computes from its coded tensors, and the output error is lower than with them coded as planned (before
    the twenty-ninth pass; ``fit.COMPUTED_LAYERS`` False)."""
    model = _wn_model(norm)
    batches = _batches(16, (12,))
    options = _options(model)
    lossy = [n for n, o in options.items() if o.codec == "quant"]
    assert len(lossy) == 3 and all("parametrizations.weight.original" in n for n in lossy)
    settings = RepairSettings(keep_size=False)  # (GPTQ's coding is not held to the plan's bytes here)
    done = repair(model, batches, options, settings=settings)
    assert all(n in done.targets for n in lossy[:2])  # GPTQ's targets for the two Conv1d layers' v
    assert all(f"{i}.bias" in done.targets for i in (0, 2, 4))
    with torch.no_grad():
        want = torch.cat([model(b) for b in batches])

    def error(work: nn.Module) -> float:
        with torch.no_grad():
            got = torch.cat([work(b) for b in batches])
        return float((got - want).pow(2).sum() / want.pow(2).sum())

    before = pytest.MonkeyPatch()
    try:
        before.setattr(fit_module, "COMPUTED_LAYERS", False)
        before.setattr(fit_module, "TRANSPOSED_BIAS", False)
        planned = repair(model, batches, options, settings=settings)
    finally:
        before.undo()
    assert not any(n in planned.targets for n in lossy)
    assert error(done.model) < 0.8 * error(planned.model), (error(done.model), error(planned.model))


def test_a_weight_norm_transposed_convolution_keeps_its_measured_weighting():
    """The measured weighting of a weight_norm ConvTranspose1d, moved to its ``v``, stays in the matrix view
    (``transposed``) with ``g / ||v||`` per input channel folded into ``H``'s columns; before, it was made in the
    stored view, fitted no tensor and was dropped (the layer weighed data-free)."""
    import numpy as np

    from codec.rd.allocate import reparametrized, stored_weightings
    from codec.rd.calibrate import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.ConvTranspose1d(16, 8, 4, stride=2))).eval()
    with torch.no_grad():
        model[0].parametrizations.weight.original1.mul_(torch.linspace(0.5, 2, 16).view(-1, 1, 1))
    calib = calibrate(model, torch.cat(_batches(16, (10,))), transposed=True)
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    reparams = reparametrized({k: v.shape for k, v in state.items()}, lambda n: state[n])
    name = "0.parametrizations.weight.original1"
    measured = calib.weightings({})["0.weight"]
    moved = stored_weightings({"0.weight": measured}, reparams)[name]
    assert moved.transposed == 1 and moved.fits(state[name].shape)
    v, g = state[name], state["0.parametrizations.weight.original0"].reshape(-1)
    d = np.repeat(g / np.sqrt((v * v).sum((1, 2))), 4)
    assert np.allclose(moved.h, measured.h * d[:, None] * d[None, :])


def test_a_weight_norm_transposed_convolution_set_aside_is_named_so(tmp_path):
    """A repaired save sets a weight_norm transposed convolution aside (TRANSPOSED_UNDER_REPAIR off) under its
    computed name; the note names its stored tensors as set aside, not as 'not reached by the calibration inputs'
    (before: 'calibration: 0 transposed convolution weights ()' and the originals as unreached)."""
    import codec

    model = _wn_model(parametrizations.weight_norm)
    notes = [str(n) for n in codec.save(model, tmp_path / "w.jwt", bits_per_weight=8,
                                        calibration=torch.cat(_batches(16, (12,))))]
    assert not any("not reached" in n for n in notes), notes
    aside = [n for n in notes if "transposed convolution weight" in n and "data-free" in n]
    assert len(aside) == 1 and "'4.parametrizations.weight.original1'" in aside[0], notes


def test_weight_norm_hook_form_is_calibrated_and_repaired(tmp_path):
    """``torch.nn.utils.weight_norm`` (the hook form most published vocoders use: ``weight_g`` / ``weight_v``) is
    calibrated as the weight it computes (before: calibration raised 'the model has no ... layer') and repaired as
    the parametrized form is: GPTQ's targets for the Conv1d layers' ``weight_v``, their biases moved through the
    weight computed from the coded tensors (not the attribute the hook left at the last forward)."""
    import warnings

    import codec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch deprecates the hook form)
        model = _wn_model(torch.nn.utils.weight_norm)
    batches = _batches(16, (12,))
    options = _options(model)
    lossy = [n for n, o in options.items() if o.codec == "quant"]
    assert lossy == ["0.weight_v", "2.weight_v", "4.weight_v"]
    done = repair(model, batches, options, settings=RepairSettings(keep_size=False))
    assert all(n in done.targets for n in lossy[:2]) and all(f"{i}.bias" in done.targets for i in (0, 2))
    layer = done.model[0]
    with torch.no_grad():
        layer(batches[0])  # the hook computes the weight from the coded tensors
    assert torch.equal(layer.weight, torch._weight_norm(layer.weight_v, layer.weight_g, 0))
    notes = [str(n) for n in codec.save(model, tmp_path / "h.jwt", bits_per_weight=8, calibration=torch.cat(batches))]
    assert not any("not reached" in n or "does not measure" in n for n in notes), notes
