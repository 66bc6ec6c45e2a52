"""codec.train.order_units: a hidden layer's units reordered so that neighbouring weight rows are alike (smoother
JPEG blocks down the columns), the next layer's inputs and the optimizer's state moved alike, the function kept."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import codec
import codec.train


def _grouped_mlp(seed: int = 0) -> torch.nn.Sequential:
    """An MLP whose 128 hidden units are 8 smooth templates plus a little noise, listed in a shuffled order (as a
    trained layer's units are: alike in groups, in the random order of their initialisation)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.linspace(0, 1, 256)
    templates = torch.stack([torch.sin(2 * torch.pi * (f + 1) * x + f) for f in range(8)]) * 0.1
    rows = templates.repeat_interleave(16, 0) + 0.01 * torch.randn(128, 256, generator=g)
    with torch.no_grad():
        model[0].weight.copy_(rows[torch.randperm(128, generator=g)])
    return model


def _neighbour_cosine(weight: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(weight[1:], weight[:-1]).mean().detach())


def test_the_units_are_ordered_alike_and_the_network_computes_the_same_function():
    model = _grouped_mlp()
    x = torch.randn(32, 256)
    before, weight = model(x), model[0].weight.detach().clone()
    assert _neighbour_cosine(weight) < 0.3
    order = codec.train.order_units(model, "0", "2")
    assert sorted(order) == list(range(128))
    assert _neighbour_cosine(model[0].weight) > 0.8  # 15 of 16 neighbours share a template
    assert torch.equal(model[0].weight, weight[order])
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_the_ordered_layer_codes_smaller_at_one_quality():
    model = _grouped_mlp(1)
    setting = [("0.weight", "jpeg,q20,table=ramp1"), ("2.weight", "b8")]

    def size() -> int:
        buf = io.BytesIO()
        codec.save(model, buf, overrides=setting)
        return len(buf.getvalue())

    unordered = size()
    codec.train.order_units(model, "0", ["2"])
    assert size() < 0.8 * unordered


def test_adams_moments_move_with_their_units_so_the_next_step_is_the_same():
    torch.manual_seed(0)
    model, x, y = _grouped_mlp(2), torch.randn(16, 256), torch.randint(0, 10, (16,))
    twin = copy.deepcopy(model)
    opt, opt_twin = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(twin.parameters(), lr=1e-2)
    for m, o in ((model, opt), (twin, opt_twin)):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    order = codec.train.order_units(model, "0", "2", optimizer=opt)
    for m, o in ((model, opt), (twin, opt_twin)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    torch.testing.assert_close(model[0].weight, twin[0].weight[order], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model[0].bias, twin[0].bias[order], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model[2].weight, twin[2].weight[:, order], rtol=1e-5, atol=1e-7)


def test_a_given_order_is_applied_and_bad_arguments_are_one_line_errors():
    model = _grouped_mlp()
    weight = model[0].weight.detach().clone()
    order = list(range(127, -1, -1))
    assert codec.train.order_units(model, "0", "2", order=order) == order
    assert torch.equal(model[0].weight, weight.flip(0))
    with pytest.raises(ValueError, match="layer 'fc9' is not in the model"):
        codec.train.order_units(model, "fc9", "2")
    with pytest.raises(ValueError, match="layer '1' is a ReLU"):
        codec.train.order_units(model, "0", "1")
    with pytest.raises(ValueError, match="a permutation of '0'"):
        codec.train.order_units(model, "0", "2", order=[0] * 128)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, not dict"):
        codec.train.order_units({}, "0", "2")
    with pytest.raises(TypeError, match="following must be a layer name or names, not 2"):
        codec.train.order_units(model, "0", 2)
    other = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    with pytest.raises(ValueError, match="'2' reads 5 inputs, but '0' has 6 units"):
        codec.train.order_units(other, "0", "2")
