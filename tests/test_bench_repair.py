"""bench.repair's validation set (``--validation``): held-out training images, never the calibration ones."""

from __future__ import annotations

import numpy as np
import pytest

from bench.repair import held_out


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
