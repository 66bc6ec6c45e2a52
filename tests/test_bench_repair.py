"""bench.repair's validation set (``--validation``): held-out training images, never the calibration ones."""

from __future__ import annotations

import numpy as np
import pytest

from bench.repair import held_out, plan, write


def test_held_out_is_disjoint_from_calibration_and_deterministic():
    chosen = np.sort(np.random.default_rng(0).choice(1000, 300, replace=False))
    val = held_out(1000, chosen, 500, seed=0)
    assert len(val) == len(set(val.tolist())) == 500 and np.all(np.diff(val) > 0)
    assert not set(val.tolist()) & set(chosen.tolist())
    assert np.array_equal(val, held_out(1000, chosen, 500, seed=0))
    assert not np.array_equal(val, held_out(1000, chosen, 500, seed=1))
    assert set(held_out(1000, chosen, 700, seed=3).tolist()) == set(range(1000)) - set(chosen.tolist())


@pytest.mark.parametrize("n", [0, 701])
def test_held_out_refuses_a_size_it_cannot_give(n):
    with pytest.raises(ValueError, match="validation needs 1 to 700"):
        held_out(1000, np.arange(300), n)


def test_plan_keeps_a_fixed_setting_and_plans_the_rest_within_the_budget():
    import torch

    gen = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(128, 256, generator=gen), "b.weight": torch.randn(64, 128, generator=gen),
          "b.bias": torch.randn(64, generator=gen)}
    weights = sum(t.numel() for t in sd.values())
    free = plan(sd, 2.0)
    fixed = plan(sd, 2.0, rules=[("b.weight", "b6")])
    assert (fixed["b.weight"].codec, fixed["b.weight"].bits) == ("quant", 6)
    assert free["b.weight"] != fixed["b.weight"]
    assert fixed["a.weight"].codec != "lossless"
    assert 8 * len(write(sd, fixed, {})) <= 2.0 * weights * 1.01
