"""A new user's model as it comes out of their own code (twenty-fourth pass, bench/JOURNAL.md "qa (twenty-fourth
pass)"): a forward that reads a dict itself, a forward of several positional inputs, a TorchScript module, a
``torch.compile``'d module, handed to a calibrated ``codec.save``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g), torch.randn(n, 16, generator=g)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Linear(32, 256)
        self.h = nn.Linear(256, 32)

    def forward(self, x):
        return self.h(F.relu(self.f(x)))


class _ReadsDict(_Plain):
    """``forward(self, batch)`` reading ``batch["pixels"]`` itself, as a model fed by a dict-yielding loader is."""

    def forward(self, batch):
        return super().forward(batch["pixels"])


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 256)
        self.b = nn.Linear(16, 256)
        self.h = nn.Linear(512, 32)

    def forward(self, top, bottom):
        return self.h(torch.cat([F.relu(self.a(top)), F.relu(self.b(bottom))], 1))


def _relative_error(model: nn.Module, path, inputs) -> float:
    import copy

    decoded = copy.deepcopy(model)
    codec.load_into(decoded, path)
    with torch.no_grad():
        ref, out = model(inputs), decoded(inputs)
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


def test_a_forward_that_reads_its_dict_itself_is_calibrated_and_repaired(tmp_path):
    """Before: calibration called model(**batch) -> 'forward() got an unexpected keyword argument pixels'."""
    model = _ReadsDict().eval()
    x, _ = _data()
    batches = [{"pixels": x[i:i + 64]} for i in range(0, 256, 64)]
    path = tmp_path / "m.jwt"
    notes = codec.save(model, path, bits_per_weight=3, calibration=batches)
    assert any(n.startswith("repair:") for n in notes)  # repair ran its passes on the dicts too
    assert codec.open(path).totals().bits_per_weight <= 3
    assert _relative_error(model, path, {"pixels": x}) < 0.02
    # one dict as all the inputs is one batch, as for a tokenizer's output
    codec.save(model, tmp_path / "one.jwt", bits_per_weight=3, calibration={"pixels": x}, repair=False)


def test_a_forward_of_several_inputs_given_tuples_is_told_to_pass_dicts(tmp_path):
    model = _TwoInputs().eval()
    x, y = _data()
    with pytest.raises(ValueError, match=r"calibration batch 0: the model does not accept it .*missing 1 required "
                                         r"positional argument: 'bottom'.*\(inputs, \*targets\).*dict of its "
                                         r"arguments by name"):
        codec.save(model, tmp_path / "m.jwt", bits_per_weight=3, calibration=[(x, y)])
    assert not (tmp_path / "m.jwt").exists()
    # what the message says works
    path = tmp_path / "ok.jwt"
    codec.save(model, path, bits_per_weight=3, calibration=[{"top": x[i:i + 64], "bottom": y[i:i + 64]}
                                                            for i in range(0, 256, 64)])
    import copy

    decoded = copy.deepcopy(model)
    codec.load_into(decoded, path)
    with torch.no_grad():
        ref, out = model(x, y), decoded(x, y)
    assert float((out - ref).pow(2).sum() / ref.pow(2).sum()) < 0.02


def test_a_torchscript_module_is_refused_for_calibration_in_one_line_and_saved_without_it(tmp_path):
    """Before: 'the model has no Linear, Conv2d, ... layer with a weight to calibrate', of a model made of Linears."""
    model = _Plain().eval()
    x, _ = _data()
    scripted = torch.jit.script(model)
    with pytest.raises(TypeError, match=r"TorchScript module .* pass the nn\.Module it was made from"):
        codec.save(scripted, tmp_path / "m.jwt", bits_per_weight=3, calibration=x)
    with pytest.raises(TypeError, match="TorchScript"):
        codec.calibrate(torch.jit.trace(model, x[:4]), x)
    codec.save(scripted, tmp_path / "free.jwt", bits_per_weight=3)  # data-free: its state_dict, as before
    assert sorted(codec.load(tmp_path / "free.jwt")) == sorted(model.state_dict())


def test_a_compiled_module_is_saved_under_the_plain_names_and_loads_both_ways(tmp_path):
    """Before: the file held '_orig_mod.f.weight', ... and load_into(the plain model) raised on every key;
    calibration ran the compiled module (a recompile per batch shape). torch.compile wraps lazily: nothing here
    compiles, as no compiled forward is called."""
    model = _Plain().eval()
    compiled = torch.compile(model)
    x, _ = _data()
    path = tmp_path / "m.jwt"
    codec.save(compiled, path, bits_per_weight=3, calibration=x)
    assert sorted(codec.load(path)) == sorted(model.state_dict())
    plain = _Plain()
    nn.init.zeros_(plain.f.weight)
    codec.load_into(plain, path)
    assert _relative_error(model, path, x) < 0.02
    assert torch.equal(plain.f.weight, codec.load(path)["f.weight"])
    again = torch.compile(_Plain())
    codec.load_into(again, path)  # the compiled model loads the plain names
    assert torch.equal(again._orig_mod.h.weight, codec.load(path)["h.weight"])
    # a file of a compiled model's own state_dict (its '_orig_mod.' names) loads into the plain model too
    codec.save(compiled.state_dict(), tmp_path / "prefixed.jwt")
    assert all(k.startswith("_orig_mod.") for k in codec.load(tmp_path / "prefixed.jwt"))
    codec.load_into(_Plain(), tmp_path / "prefixed.jwt")


class _WithNorms(nn.Module):
    """Three matrices, seven vectors and a counter: a '*' rule reaches every vector (BatchNorm statistics, biases)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(32, 128), nn.BatchNorm1d(128), nn.Linear(128, 128), nn.Linear(128, 8))


def test_a_rule_on_every_tensor_is_one_note_naming_the_odd_ones_first(tmp_path):
    """overrides={'*': 'b4'} after finetune(..., 'b4'): before, one note per vector (39 on a small MobileNet,
    each BatchNorm statistic its own line); now one note for the rule, the rarest reasons named first."""
    model = _WithNorms()
    notes = codec.save(model, tmp_path / "m.jwt", overrides={"*": "q20"})
    assert len(notes) == 1, notes
    note = notes[0]
    assert note == ("setting *=q20 not applied to 10 tensors (coded as 8-bit quant, not jpeg: 2, stored losslessly: "
                    "8): 'layers.0.weight' (4096 elements < 16384), 'layers.3.weight' (1024 elements < 16384), "
                    "'layers.0.bias' (shape [128] has no matrix view) and 7 more")
    # a rule not applied to three tensors or fewer keeps a note for each
    notes = codec.save(model, tmp_path / "m.jwt", overrides={"layers.[02].bias": "b4", "layers.3.weight": "q20"})
    assert sorted(n.split(":")[0] for n in notes) == ["tensor 'layers.0.bias'", "tensor 'layers.2.bias'",
                                                      "tensor 'layers.3.weight'"]


@pytest.mark.parametrize("overrides, message", [
    ("b4", r"not a string: for one setting on every tensor, overrides=\{'\*': 'b4'\}"),
    (["*=b4"], r"\(glob, setting\) pairs, e\.g\. \{'fc2\.\*': 'b4'\}, not \['\*=b4'\]"),
    (3, r"pairs, e\.g\. .* not 3"),
])
def test_overrides_of_the_wrong_form_are_a_type_error_saying_the_form(tmp_path, overrides, message):
    """Before: overrides='b4' (finetune's setting passed on as the README's `overrides=setting`) ended in
    'ValueError: not enough values to unpack (expected 2, got 1)'."""
    with pytest.raises(TypeError, match=message):
        codec.save(_WithNorms(), tmp_path / "m.jwt", overrides=overrides)
    assert not (tmp_path / "m.jwt").exists()


class _Projected(nn.Module):
    """A fixed projection held as buffers, one of the model itself, one of a container block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("proj", torch.randn(32, 32) / 6)
        self.block = nn.Module()
        self.block.register_buffer("mix", torch.randn(32, 32) / 6)
        self.f = nn.Linear(32, 256)
        self.h = nn.Linear(256, 32)

    def forward(self, x):
        return self.h(F.relu(self.f(x @ self.proj @ self.block.mix)))


def test_the_data_free_note_calls_a_buffer_a_buffer(tmp_path):
    """Before: "'proj' (a parameter of _Projected itself, ...)" and "'block.mix' (Module: a layer kind calibration
    does not measure)" for buffers the model multiplies by itself."""
    model = _Projected().eval()
    x, _ = _data()
    notes = codec.save(model, tmp_path / "m.jwt", bits_per_weight=4, calibration=x, repair=False)
    note = next(n for n in notes if n.startswith("calibration:"))
    assert ("'proj' (a buffer of _Projected itself: used outside any layer calibration measures); 'block.mix' (a "
            "buffer of Module: used outside any layer calibration measures)") in note, note
