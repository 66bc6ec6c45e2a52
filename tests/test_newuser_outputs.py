"""What a new user's model returns and how their data comes (twenty-fifth pass, bench/JOURNAL.md "qa (twenty-fifth
pass)"): a model returning ``(features, logits)`` or a dict whose first item is not the output that matters, batches
that are a labelled dataset's dicts, per-sample records."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec


def _data(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


class _FeaturesFirst(nn.Module):
    """Returns ``(features, logits)``: the features come from ``f`` alone, ``g`` and ``h`` make only the logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f, self.g, self.h = nn.Linear(32, 128), nn.Linear(128, 128), nn.Linear(128, 16)

    def forward(self, x):
        features = F.relu(self.f(x))
        return features, self.h(F.relu(self.g(features)))


class _FeaturesFirstDict(_FeaturesFirst):
    def forward(self, x):
        features, logits = super().forward(x)
        return {"hidden": features, "logits": logits}


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f, self.h = nn.Linear(32, 256), nn.Linear(256, 32)

    def forward(self, x):
        return self.h(F.relu(self.f(x)))


class _Unused(_FeaturesFirst):
    """Also computes ``u`` and drops it: a weight no output uses."""

    def __init__(self):
        super().__init__()
        self.u = nn.Linear(32, 8)

    def forward(self, x):
        self.u(x)
        return super().forward(x)


class _Single(_FeaturesFirst):
    """One of the two outputs, by ``which``, in a tuple of one."""

    def __init__(self, which: int):
        super().__init__()
        self.which = which

    def forward(self, x):
        return (super().forward(x)[self.which],)


class _PlainInATuple(_Plain):
    def forward(self, x):
        return (super().forward(x),)


@pytest.mark.parametrize("cls, compared", [(_FeaturesFirst, "its 2 floating tensors of its tuple output of 2"),
                                           (_FeaturesFirstDict, "'hidden' and 'logits' of its dict output of 2")])
def test_every_floating_output_is_compared(tmp_path, cls, compared):
    """Before: calibration compared only the first tensor of the output and gave the layers behind the second one the
    least weight (a note said so; at 0.5 bits/weight without repair such a model lost 7 points against data-free).
    Now each output's relative change is summed, as repair's objective sums them: no layer at the floor, no note."""
    from codec.rd.calibrate import SENSITIVITY_FLOOR, calibrate

    model = cls().eval()
    calib = calibrate(model, _data())
    assert calib.output == compared and not calib.unmoved
    assert min(s.sensitivity for s in calib.layers.values()) > 100 * SENSITIVITY_FLOOR
    notes = codec.save(model, tmp_path / "m.jwt", bits_per_weight=3, calibration=_data(), repair=False)
    assert not [n for n in notes if "did not move" in n], notes


def test_the_sensitivity_to_several_outputs_is_the_sum_of_each_ones():
    """The relative changes of the outputs are summed: on one batch, a layer's sensitivity to ``(features, logits)``
    is its sensitivity to the features alone plus that to the logits alone; a model of one output in a tuple of one
    gets what it got before (the same arithmetic)."""
    from codec.rd.calibrate import calibrate

    x = _data(64)
    both = calibrate(_FeaturesFirst().eval(), x)
    alone = [calibrate(_Single(i).eval(), x) for i in (0, 1)]
    for name, stats in both.layers.items():
        assert stats.sensitivity == pytest.approx(sum(0.0 if name in a.unmoved else a.layers[name].sensitivity
                                                      for a in alone), rel=1e-6)
    assert alone[0].unmoved == ["g.weight", "h.weight"] and alone[0].output == "item 0 of its tuple output of 1"
    a, b = calibrate(_Plain().eval(), _data()), calibrate(_PlainInATuple().eval(), _data())
    assert {n: s.sensitivity for n, s in a.layers.items()} == {n: s.sensitivity for n, s in b.layers.items()}


def test_a_weight_no_output_uses_is_named_in_a_note(tmp_path):
    model = _Unused().eval()
    notes = codec.save(model, tmp_path / "m.jwt", bits_per_weight=3, calibration=_data(), repair=False)
    found = [n for n in notes if "did not move" in n]
    assert len(found) == 1, notes
    assert "1 weight ('u.weight')" in found[0] and "its 2 floating tensors of its tuple output of 2" in found[0]
    assert "calibrate a module whose forward returns it" in found[0]


def test_a_model_whose_every_weight_moves_its_output_gets_no_such_note(tmp_path):
    notes = codec.save(_Plain().eval(), tmp_path / "m.jwt", bits_per_weight=3, calibration=_data(), repair=False)
    assert not [n for n in notes if "did not move" in n]


def test_dict_batches_with_a_label_the_forward_does_not_take_give_the_file_of_the_inputs_alone(tmp_path):
    """Before: ``{"x": ..., "label": ...}`` batches (a labelled dataset through a DataLoader) went whole to
    ``forward(self, x)`` -> "the model does not accept it ('dict' object has no attribute ...)". Now the keys the forward
    takes go in, the label is left out as a tuple's targets are: the same file as the inputs alone."""
    model = _Plain().eval()
    x = _data()
    labels = torch.arange(256) % 10
    dicts = [{"x": x[i:i + 64], "label": labels[i:i + 64]} for i in range(0, 256, 64)]
    plain = [x[i:i + 64] for i in range(0, 256, 64)]
    codec.save(model, tmp_path / "dicts.jwt", bits_per_weight=3, calibration=dicts)
    codec.save(model, tmp_path / "plain.jwt", bits_per_weight=3, calibration=plain)
    assert (tmp_path / "dicts.jwt").read_bytes() == (tmp_path / "plain.jwt").read_bytes()
    decoded = copy.deepcopy(model)
    codec.load_into(decoded, tmp_path / "dicts.jwt")
    with torch.no_grad():
        ref, out = model(x), decoded(x)
    assert float((out - ref).pow(2).sum() / ref.pow(2).sum()) < 0.02


def test_finetune_runs_dict_batches_with_a_label_the_forward_does_not_take():
    from codec.train import finetune

    model = _Plain()
    x = _data()
    dicts = [{"x": x[i:i + 64], "label": torch.zeros(64, dtype=torch.long)} for i in range(0, 256, 64)]
    before = copy.deepcopy(model)
    finetune(model, dicts, None, "b4", steps=2, lr=1e-3, validation=False)  # distils: no labels needed
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_per_sample_records_are_told_to_go_through_a_dataloader(tmp_path):
    model = _Plain().eval()
    x = _data(8)
    records = [{"x": x[i], "label": i % 2} for i in range(8)]  # a `datasets` Dataset's rows
    with pytest.raises(ValueError, match=r"calibration batch 0 'label': not a tensor but int; each item is a batch, "
                                         r"samples on the first axis: .*DataLoader\(records, batch_size=64\)"):
        codec.save(model, tmp_path / "m.jwt", bits_per_weight=3, calibration=records)
    assert not (tmp_path / "m.jwt").exists()
    # what the message says works
    loader = torch.utils.data.DataLoader(records, batch_size=4)
    codec.save(model, tmp_path / "ok.jwt", bits_per_weight=3, calibration=loader)
    assert codec.open(tmp_path / "ok.jwt").totals().bits_per_weight <= 3


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's lm_head.weight and transformer.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


@pytest.mark.parametrize("kept", ["embed.weight", "head.weight"])
def test_load_into_a_tied_model_takes_the_tied_tensor_under_either_name(tmp_path, kept):
    """Before: a file from a model folder (GPT-2's holds ``transformer.wte.weight`` once, no ``lm_head.weight``) ->
    ``codec.load_into(GPT2LMHeadModel(config), path)``: RuntimeError "Missing key(s) in state_dict: lm_head.weight"."""
    model = _TiedHead()
    dropped = "head.weight" if kept == "embed.weight" else "embed.weight"
    stored = {k: v.clone() + 1 for k, v in model.state_dict().items() if k != dropped}
    codec.save(stored, tmp_path / "m.jwt")
    fresh = _TiedHead()
    result = codec.load_into(fresh, tmp_path / "m.jwt")
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.head.weight.data_ptr() == fresh.embed.weight.data_ptr()  # still tied
    decoded = codec.load(tmp_path / "m.jwt")
    assert list(decoded) == [k for k in model.state_dict() if k != dropped]
    assert torch.equal(fresh.embed.weight, decoded[kept]) and torch.equal(fresh.mid.weight, decoded["mid.weight"])
    # a key missing that is tied to nothing is still refused, as torch does
    del stored["mid.bias"]
    codec.save(stored, tmp_path / "short.jwt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*mid\.bias"):
        codec.load_into(_TiedHead(), tmp_path / "short.jwt")
    assert codec.load_into(_TiedHead(), tmp_path / "short.jwt", strict=False).missing_keys == ["mid.bias"]


def test_a_pooler_the_first_output_skips_is_named_and_a_random_models_attention_is_not(tmp_path):
    """The note is for weights whose noise left the compared output exactly as it was: a random BERT's query and key
    move ``last_hidden_state`` by less than the sensitivity floor (its softmax is nearly flat) but do move it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 512, (32, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones(8, 16, dtype=torch.long)}
               for i in range(0, 32, 8)]
    notes = codec.save(model, tmp_path / "m.jwt", bits_per_weight=4, calibration=batches, repair=False)
    found = [n for n in notes if "did not move" in n]
    assert len(found) == 1, notes
    assert "1 weight ('pooler.dense.weight')" in found[0] and "'last_hidden_state' of its" in found[0]
