"""Folding a BatchNorm's per-channel scale into the layer before it (codec.rd.fold)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from codec.rd.fold import fold_batchnorm


class Net(nn.Module):
    """conv (no bias) -> BN2d -> ReLU -> linear (bias) -> BN1d -> ReLU -> linear, BatchNorm scales spread widely."""

    def __init__(self, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 32)
        self.bn2 = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        z = self.conv(x)
        h = self.bn1(z) + (z if self.residual else 0)
        return self.head(torch.relu(self.bn2(self.fc(torch.relu(h).flatten(1)))))


def net(residual: bool = False) -> Net:
    torch.manual_seed(0)
    model = Net(residual)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            n = bn.num_features
            bn.weight.copy_(torch.exp(torch.randn(n, generator=g) * 1.5) * torch.sign(torch.randn(n, generator=g)))
            bn.bias.copy_(torch.randn(n, generator=g) * 0.1)
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            bn.running_var.copy_(torch.exp(torch.randn(n, generator=g)))
    return model.eval()


def inputs(n: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = model(x), reference(x)
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_fold_keeps_the_function_and_rescales_each_channel():
    model, x = net(), inputs()
    folded = copy.deepcopy(model).train()
    assert fold_batchnorm(folded, x[:16]) == ["conv", "fc"]
    assert folded.training  # its mode is given back
    folded.eval()
    assert relative_error(folded, model, inputs(seed=5)) < 1e-10  # held-out inputs: the same function
    for layer, bn in (("conv", "bn1"), ("fc", "bn2")):
        w, w0 = getattr(folded, layer).weight, getattr(model, layer).weight
        g = (w.flatten(1) / w0.flatten(1)).mean(1)
        expected = getattr(model, bn).weight.abs() / (getattr(model, bn).running_var + 1e-5).sqrt()
        torch.testing.assert_close(g, expected.detach(), rtol=1e-4, atol=0)
        assert torch.all(getattr(folded, bn).running_var > 0)
        assert torch.equal(getattr(folded, bn).weight, getattr(model, bn).weight)  # gamma, beta untouched
    torch.testing.assert_close(folded.fc.bias, model.fc.bias * g.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(folded.head.weight, model.head.weight)  # not followed by a BatchNorm


def test_fold_refuses_and_restores_when_a_layer_output_is_used_elsewhere():
    model = net(residual=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="moved by .* nothing was folded"):
        fold_batchnorm(model, inputs())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold_batchnorm("model", inputs())


def test_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    before = copy.deepcopy(model.state_dict())
    assert fold_batchnorm(model, torch.randn(3, 4)) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
