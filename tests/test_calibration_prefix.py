"""Calibration's sensitivity passes start at the layer they perturb (codec.rd.prefix.Prefix): the modules a pass
completes before that layer give back their clean outputs instead of running, with the same statistics bit for bit
as whole passes; what cannot be given back (a module called twice, an output changed in place, a module with state)
is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from codec.rd import calibrate as cal
from codec.rd import prefix as pf


def _calibrated(model: nn.Module, batches, monkeypatch, whole: bool = False):
    """``(Calibration, the Prefix it used)``; ``whole``: every pass whole (no module given back)."""
    made = []
    real = pf.Prefix.__init__

    def init(self, model):
        real(self, model)
        made.append(self)

    with monkeypatch.context() as patch:
        patch.setattr(pf.Prefix, "__init__", init)
        if whole:
            patch.setattr(pf.Prefix, "before", lambda self, layer: [])
        calib = cal.calibrate(model, batches)
    return calib, made[0]


def _same(a, b) -> None:
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        x, y = a.layers[name], b.layers[name]
        assert np.array_equal(x.h, y.h), name
        assert (x.mean is None and y.mean is None) or np.array_equal(x.mean, y.mean), name
        assert x.sensitivity == y.sensitivity and x.samples == y.samples, name


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """Blocks after an input layer; ``in_place``: the stack scales each block's output in place after it returns;
    ``again``: block 0 is called twice."""

    def __init__(self, width: int = 16, blocks: int = 4, in_place: bool = False, again: bool = False):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 3)
        self.in_place, self.again = in_place, again

    def forward(self, x):
        x = self.inp(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.again and i == 0:
                x = block(x)
            if self.in_place:
                x.mul_(0.5)
        return self.head(x)


def _batches(n: int = 3):
    torch.manual_seed(1)
    return [torch.randn(6, 8) for _ in range(n)]


def test_a_bert_is_calibrated_the_same_with_its_passes_started_at_the_layer(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    batches = []
    for _ in range(3):
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[0, 6:] = 0
        batches.append({"input_ids": torch.randint(0, 100, (4, 9)), "attention_mask": mask})
    short, prefix = _calibrated(model, batches, monkeypatch)
    whole, unused = _calibrated(model, batches, monkeypatch, whole=True)
    _same(short, whole)
    assert unused.given == 0
    # batches 1 and 2: every pass of a layer after the embeddings skips something (batch 0: checked, then whole)
    assert prefix.shortened >= 2 * (len(short.layers) - 3) and prefix.given > prefix.shortened
    assert prefix.outputs == {}  # nothing of the last batch kept after calibrating


def test_the_blocks_before_a_layer_are_given_back_and_later_ones_run(monkeypatch):
    model = Stack().eval()
    ran: dict[str, int] = {}
    for i, block in enumerate(model.blocks):
        block.fc1.register_forward_pre_hook(lambda m, a, i=i: ran.__setitem__(f"b{i}", ran.get(f"b{i}", 0) + 1))
    short, prefix = _calibrated(model, _batches(), monkeypatch)
    first = dict(ran)
    ran.clear()
    whole, _ = _calibrated(model, _batches(), monkeypatch, whole=True)
    _same(short, whole)
    # whole passes: every block in each of the 10 layers' passes and the clean pass, 3 batches
    assert all(ran[f"b{i}"] == 3 * (1 + len(whole.layers)) for i in range(4)), ran
    # given back (not run) in the passes of the layers after it, on batches 1 and 2: the first block most often
    # (batch 0 runs each shortened pass whole too, to check it)
    assert first["b0"] < ran["b0"] and first["b0"] < first["b1"] < first["b2"] < first["b3"], first
    model_keys = set(prefix.modules)
    assert prefix.refused <= model_keys and not prefix.refused


@pytest.mark.parametrize("case", ["in_place", "again"])
def test_an_output_changed_in_place_or_a_block_called_twice_is_not_given_back(case, monkeypatch):
    model = Stack(**{case: True}).eval()
    short, prefix = _calibrated(model, _batches(), monkeypatch)
    whole, _ = _calibrated(model, _batches(), monkeypatch, whole=True)
    _same(short, whole)
    blocks = {id(b) for b in model.blocks}
    if case == "in_place":  # every block's output is scaled in place after it returns: refused once seen
        assert blocks <= prefix.refused
    else:  # block 0 called twice: no span, never skipped; the input layer still is
        assert prefix.given > 0


def test_a_module_with_state_stops_the_shortcut_on_the_first_batch(monkeypatch):
    """A block whose output depends on how often it ran (state that a skipped call does not advance): the first
    batch's check finds a shortened pass different from the whole one, and no pass is shortened from then on."""

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * (1.0 + 0.01 * self.calls)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.count, self.mid, self.out = nn.Linear(8, 8), Counting(), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.mid(self.count(self.inp(x)))))

    torch.manual_seed(0)
    model = Model().eval()
    disabled = []
    real = pf.Prefix.disable
    monkeypatch.setattr(pf.Prefix, "disable", lambda self: disabled.append(self.shortened) or real(self))
    calib, prefix = _calibrated(model, _batches(), monkeypatch)
    assert len(disabled) == 2 and disabled[0] <= 1  # at batch 0's first shortened pass, and at the end
    assert prefix.shortened == disabled[0] and not prefix.enabled
    assert set(calib.layers) == {"inp.weight", "mid.weight", "out.weight"}
