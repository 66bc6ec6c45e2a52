"""codec.train.InputMask: the largest linear layer's weight columns whose input is (nearly) always zero, held at zero
in a training loop; the file they make is smaller at the same setting and decodes to what the loop saw."""

from __future__ import annotations

import io

import pytest
import torch

import codec
from codec.train import Budget, InputMask, coded_weights, finetune

LOSS = torch.nn.functional.cross_entropy
RULES = [("0.weight", "jpeg,q20,table=flat"), ("2.weight", "b4")]
#: Inputs 48..63 are zero in every sample but one in 20 (5 %): quiet inputs, as a Fashion-MNIST image's border.
QUIET = slice(48, 64)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def _data(n: int = 4):
    torch.manual_seed(1)
    batches = []
    for _ in range(n):
        x = torch.randn(60, 64)
        x[:, QUIET] = 0
        x[::20, QUIET] = torch.randn(3, 16)  # 3 of 60 samples: 5 %
        batches.append((x, torch.randint(0, 10, (60,))))
    return batches


def test_the_quiet_inputs_columns_are_found_and_held_at_zero_over_training():
    model, data = _tiny(), _data()
    before = model[0].weight.detach().clone()
    mask = InputMask(model, data, below=0.1)  # the largest linear layer by default: "0"
    assert list(mask.columns) == ["0"] and mask.columns["0"].tolist() == list(range(48, 64))
    assert torch.allclose(mask.activity["0"][QUIET], torch.tensor(0.05))
    assert torch.all(mask.activity["0"][:48] == 1)
    assert torch.all(model[0].weight[:, QUIET] == 0)  # zeroed at once
    assert torch.equal(model[0].weight[:, :48], before[:, :48])
    assert repr(mask) == "InputMask(0: 16 of 64 columns)"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    optimizer.register_step_post_hook(mask)
    finetune(model, data, LOSS, overrides=RULES, steps=8, refresh=2, optimizer=optimizer, validation=False)
    assert torch.all(model[0].weight[:, QUIET] == 0)  # trained with gradients on them, held
    assert not torch.equal(model[0].weight[:, :48], before[:, :48])  # the rest trained
    # below 0.05 of the samples: none of them (5 % is not fewer than 5 %); a named layer; the second layer's inputs
    assert len(InputMask(_tiny(), data, below=0.05).columns["0"]) == 0
    relu = InputMask(_tiny(), data, below=0.5, layers="2")  # ReLU outputs: each unit zero in about half the samples
    assert list(relu.columns) == ["2"] and 0 < len(relu.columns["2"]) < 256


def test_a_masked_loop_makes_a_smaller_file_that_decodes_to_what_the_loop_saw():
    """At one setting the masked model's file is smaller (the zero columns cost less) and decodes to the weights
    the last forward pass saw; with a budget the loop's file is within it."""
    sizes = {}
    for masked in (False, True):
        model, data = _tiny(), _data()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if masked:
            optimizer.register_step_post_hook(InputMask(model, data, below=0.1))
        seen = []
        model[0].register_forward_pre_hook(lambda m, _: seen.append(m.weight.detach().clone()))
        finetune(model, data, LOSS, overrides=RULES, steps=8, refresh=4, vector_bits=4, optimizer=optimizer,
                 validation=False)
        buf = io.BytesIO()
        codec.save(model, buf, overrides=RULES)
        sizes[masked] = len(buf.getvalue())
        decoded = codec.load(buf.getvalue())
        assert torch.equal(decoded["0.weight"], seen[-1])
        if masked:  # the quiet columns decode to near zero (JPEG's rounding of a zero block, not the weights')
            rest = decoded["0.weight"][:, :48].abs().mean()
            assert decoded["0.weight"][:, QUIET].abs().mean() < 0.1 * rest
    assert sizes[True] < 0.9 * sizes[False], sizes
    model, data = _tiny(), _data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.register_step_post_hook(InputMask(model, data, below=0.1))
    budget = Budget(2.0)
    finetune(model, data, LOSS, overrides=RULES, steps=8, refresh=4, vector_bits=4, optimizer=optimizer,
             budget=budget, validation=False)
    buf = io.BytesIO()
    budget.save(model, buf)
    n = sum(t.numel() for t in model.state_dict().values())
    assert 8 * len(buf.getvalue()) / n <= 2.0
    coded = coded_weights(model, overrides=budget.overrides, vector_bits=4)
    assert torch.equal(codec.load(buf.getvalue())["0.weight"], coded["0.weight"])


def test_inputs_as_a_tensor_an_array_or_batches_of_token_sequences():
    x = torch.randn(40, 64)
    x[:, :8] = 0
    assert InputMask(_tiny(), x).columns["0"].tolist() == list(range(8))
    assert InputMask(_tiny(), x.numpy()).columns["0"].tolist() == list(range(8))

    class Tokens(torch.nn.Module):  # a linear layer on (batch, tokens, features): a sample is a token
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 32)

        def forward(self, x):
            return self.proj(x).mean(1)

    seq = torch.randn(4, 10, 16)
    seq[:, :9, 3] = 0  # feature 3 nonzero in 1 of 10 tokens
    mask = InputMask(Tokens(), [seq[:2], seq[2:]], below=0.2)
    assert mask.columns["proj"].tolist() == [3] and mask.activity["proj"][3].item() == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"below": 1.5}, ValueError, "below must be a fraction from 0 to 1, not 1.5"),
    ({"below": True}, TypeError, "below must be a number (a fraction from 0 to 1), not True"),
    ({"below": "0.1"}, TypeError, "not '0.1'"),
    ({"layers": "1"}, ValueError, "layer '1' is ReLU; it takes torch.nn.Linear layers (0, 2)"),
    ({"layers": ["fc9"]}, ValueError, "layer 'fc9' is not in the model"),
])
def test_bad_arguments_are_one_line_errors_naming_the_value(kwargs, error, words):
    with pytest.raises(error) as info:
        InputMask(_tiny(), _data(1), **kwargs)
    assert words in str(info.value)


def test_a_model_without_linear_layers_or_inputs_is_told_so():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, not dict"):
        InputMask({"w": torch.zeros(3)}, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no torch.nn.Linear layer"):
        InputMask(torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="data held no samples that reach '0'"):
        InputMask(_tiny(), [])
    with pytest.raises(TypeError, match="data must be a tensor"):
        InputMask(_tiny(), 3)
    quiet = InputMask(_tiny(), torch.zeros(1, 64), below=0)  # below 0: nothing held
    assert len(quiet.columns["0"]) == 0 and torch.all(quiet.activity["0"] == 0)


def test_the_activity_pass_stops_each_forward_once_the_masked_layers_have_their_input():
    model, data = _tiny(), _data()
    later = []
    model[2].register_forward_pre_hook(lambda m, args: later.append(args[0].shape))
    mask = InputMask(model, data, below=0.1)
    assert later == []  # the layer after the masked one never ran
    assert mask.columns["0"].tolist() == list(range(48, 64))
    activity = torch.cat([x for x, _ in data]).ne(0).float().mean(0)
    torch.testing.assert_close(mask.activity["0"], activity)
    # naming the later layer too: both see every batch, and the forward runs to it
    both = InputMask(model, data, below=0.1, layers=["0", "2"])
    assert len(later) == len(data) and set(both.columns) == {"0", "2"}


def test_the_hook_zeroes_the_columns_as_index_fill_would_also_after_the_model_is_cast():
    """After each step the quiet columns are multiplied by zero (one pass over the weight, cheaper than a strided
    index_fill_): the weights equal those index_fill_ leaves (a column's zero may be -0, equal to 0), the other
    columns bit for bit; a model cast to float64 after the mask was made is held in its new dtype."""
    model, data = _tiny(), _data()
    mask = InputMask(model, data, below=0.1)
    with torch.no_grad():
        model[0].weight.normal_()
    expected = model[0].weight.detach().clone().index_fill_(1, mask.columns["0"], 0)
    mask()
    assert torch.equal(model[0].weight, expected)
    assert torch.equal(model[0].weight[:, :48].view(torch.int32), expected[:, :48].view(torch.int32))
    model.double()
    with torch.no_grad():
        model[0].weight.normal_()
    mask()
    assert model[0].weight.dtype == torch.float64 and torch.all(model[0].weight[:, QUIET] == 0)
    assert torch.all(model[0].weight[:, :48] != 0)
