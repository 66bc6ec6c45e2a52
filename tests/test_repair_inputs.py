"""How repair's collect gets a layer's inputs (codec.rd.repair._Inputs): passes that end at the layer, and one
attention's query, key and value projections taking the inputs their first one took; the same files as whole passes
for each layer, fewer module calls."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from codec.rd.repair import RepairSettings, repair
from codec.rd.repair import loop as repair_loop
from codec.rd.repair.inputs import _forward_calls
from codec.tensorcodec import EncodeOptions


class Block(nn.Module):
    """An attention-shaped block: q, k, v given one tensor, then o, an FFN; ``inplace``: the block's input is
    changed in place after q reads it (so q's inputs are not what a pass ended at q would see, nor k's q's)."""

    def __init__(self, width: int = 32, inplace: bool = False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 3 * width), nn.Linear(3 * width, width)
        self.inplace = inplace

    def forward(self, x):
        q = self.q(x)
        if self.inplace:
            x.mul_(1.5)
        k, v = self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / 6, dim=-1) @ v
        x = x + self.o(att)
        return x + self.down(torch.relu(self.up(x)))


class Model(nn.Module):
    """Two blocks and a head; ``twice``: the head is called twice per pass."""

    def __init__(self, inplace: bool = False, twice: bool = False):
        super().__init__()
        self.first, self.second = Block(), Block(inplace=inplace)
        self.head = nn.Linear(32, 40)
        self.twice = twice

    def forward(self, x):
        x = self.second(self.first(x))
        return self.head(x) + (self.head(x * 0.5) if self.twice else 0)


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return Model(**kw).eval()


def _batches(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 7, 32, generator=g) for _ in range(n)]


def _options(model: nn.Module) -> dict[str, EncodeOptions]:
    return {n: EncodeOptions(codec="quant", bits=3, tile=(4, 12)) if t.dim() > 1 else EncodeOptions(codec="lossless")
            for n, t in model.state_dict().items()}


def _repaired(model, monkeypatch, whole: bool):
    """repair's targets and blobs, and how many times each Linear ran; ``whole``: every pass whole, every layer's
    of its own (what repair did before _Inputs)."""
    calls: dict[str, int] = {}
    with monkeypatch.context() as m:
        if whole:
            found = repair_loop._forward_calls
            m.setattr(repair_loop, "_forward_calls", lambda *a: (found(*a)[0], set(), {}))
        counted = copy.deepcopy(model)
        for name, module in counted.named_modules():
            if isinstance(module, nn.Linear):
                module.register_forward_pre_hook(lambda mod, args, name=name: calls.__setitem__(
                    name, calls.get(name, 0) + 1))
        out = repair(counted, _batches(), _options(model), jobs=1, keep_targets=True)
    return out, calls


@pytest.mark.parametrize("kw", [{}, {"inplace": True}, {"twice": True}])
def test_inputs_taken_again_and_passes_ended_early_give_the_same_coding(kw, monkeypatch):
    model = _model(**kw)
    new, new_calls = _repaired(model, monkeypatch, whole=False)
    old, old_calls = _repaired(model, monkeypatch, whole=True)
    assert new.targets.keys() == old.targets.keys()
    for name in old.targets:
        a, b = new.targets[name], old.targets[name]
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert new.encoded.keys() == old.encoded.keys()
    assert all(new.encoded[n].blobs == old.encoded[n].blobs for n in old.encoded)
    assert new.notes == old.notes and "coded 13 lossy tensors" in new.notes[0]
    # the passes end at the layer: the head (last) runs less, and the first block's k and v take q's inputs
    assert new_calls["head"] < old_calls["head"]
    assert new_calls["first.k"] < old_calls["first.k"] and new_calls["first.q"] < old_calls["first.q"]


def test_forward_calls_finds_layers_called_once_and_given_one_tensor():
    for kw, shared in [({}, True), ({"inplace": True}, False)]:
        model = _model(**kw)
        watched = [m for m in model.modules() if isinstance(m, nn.Linear)]
        order, once, shares = _forward_calls(model, _batches(1)[0], watched)
        assert order[0] is model and len(order) == len(list(model.modules()))
        b = model.second
        assert id(model.first.k) in once and shares[id(model.first.k)] == id(model.first.q)
        assert shares[id(model.first.v)] == id(model.first.q) and id(model.first.o) not in shares
        # an input changed in place after the layer's call: neither ended there nor shared
        assert (id(b.q) in once) is shared and (id(b.k) in shares) is shared
    model = _model(twice=True)
    _, once, _ = _forward_calls(model, _batches(1)[0], [model.head, model.first.q])
    assert id(model.head) not in once and id(model.first.q) in once


def test_a_model_whose_own_code_catches_exceptions_still_ends_its_pass_at_the_layer(monkeypatch):
    """The stop is a BaseException: a model's ``except Exception`` around a layer does not swallow it."""

    class Guarded(Model):
        def forward(self, x):
            try:
                x = self.first(x)
            except Exception:  # noqa: BLE001 (what some model code does)
                raise AssertionError("the stop was caught as an Exception") from None
            return self.head(self.second(x))

    torch.manual_seed(0)
    model = Guarded().eval()
    new, _ = _repaired(model, monkeypatch, whole=False)
    old, _ = _repaired(model, monkeypatch, whole=True)
    assert all(np.array_equal(new.targets[n], old.targets[n]) for n in old.targets)
