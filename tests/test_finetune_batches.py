"""codec.train.finetune on a new user's batches: Hugging Face style (a tokenizer's dict, a ModelOutput), numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec
import codec.train


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=200, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", codec.train.NotKeptWarning)
        return fn(*args, **kwargs)


def test_dict_batches_are_keyword_inputs_and_a_model_output_is_distilled(tmp_path):
    """A list of tokenizer-style dicts trains as model(**batch); loss_fn=None distils the ModelOutput's logits;
    the saved file decodes (codec.load) to exactly the weights the last forward pass saw."""
    model = _tiny_gpt2()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    ids = torch.randint(0, 200, (8, 16))
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones(2, 16, dtype=torch.long)} for i in (0, 2, 4, 6)]
    _quiet(codec.train.finetune, model, batches, None, "b3", steps=3, lr=1e-3)
    assert ["attention_mask", "input_ids"] in seen
    out = tmp_path / "g.jwt"
    codec.save(model, out, overrides={"*": "b3"})
    coded = codec.train.coded_weights(model, "b3")
    back = codec.load(out)
    for name, value in coded.items():
        assert torch.equal(back[name], value), name
    # one dict alone is one batch, as calibration takes it (as data and as validation: no longer a TypeError)
    _quiet(codec.train.finetune, model, {"input_ids": ids[:2]}, None, "b3", steps=1, validation={"input_ids": ids[2:4]})


def test_the_distillation_target_is_the_outputs_floating_tensors():
    """A model returning a dict or a tuple with a float tensor beside integers / None: the float ones are
    distilled (the loss moves), not an AttributeError."""

    class Net(nn.Module):
        def __init__(self, as_dict):
            super().__init__()
            self.fc1, self.fc2, self.as_dict = nn.Linear(64, 128), nn.Linear(128, 64), as_dict

        def forward(self, x):
            y = self.fc2(torch.relu(self.fc1(x)))
            idx = y.argmax(-1)
            return {"loss": y.sum(), "logits": y, "ids": idx} if self.as_dict else (y, idx, None)

    x = torch.randn(64, 64)
    for as_dict in (True, False):
        torch.manual_seed(0)
        net = Net(as_dict)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        _quiet(codec.train.finetune, net, [x[:16], x[16:32], x[32:48], x[48:]], None, "b2", steps=4, lr=1e-3,
               validation=False)
        assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())

    class Nothing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return {"ids": self.fc(x).argmax(-1)}

    with pytest.raises(TypeError, match="holds no floating tensor to distil"):
        codec.train.finetune(Nothing(), x, None, "b2", steps=1, validation=False)


def test_labelled_dict_batches_with_a_loss_function():
    """(tokenizer dict, labels) batches with a loss_fn on the ModelOutput's logits; codec.train.rate in penalty."""
    model = _tiny_gpt2()
    ids = torch.randint(0, 200, (4, 16))
    batches = [({"input_ids": ids[i:i + 2]}, ids[i:i + 2]) for i in (0, 2)]

    def loss_fn(out, labels):
        return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    _quiet(codec.train.finetune, model, batches, loss_fn, "b3", steps=2, lr=1e-3,
           penalty=lambda m: 1e-3 * codec.train.rate(m, "b3"))


def test_numpy_data_is_a_batch_like_a_tensor():
    """A numpy array as data is one batch, as a tensor is; numpy batches and targets in a list are tensors."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    calls = []
    net.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    _quiet(codec.train.finetune, net, x, None, "b2", steps=2, validation=False)
    assert set(calls) == {(32, 64)}
    y = np.arange(32) % 10
    _quiet(codec.train.finetune, net, [(x[:16], y[:16]), (x[16:], y[16:])], F.cross_entropy, "b2", steps=2,
           validation=False)
    with pytest.raises(TypeError, match="mapping of them"):
        codec.train.finetune(net, "inputs.npy", None, "b2", steps=1)


def test_repair_fine_tuning_on_tokenizer_dicts(tmp_path):
    """Repair's fine-tuning stage (jwt encode --finetune) runs finetune on the calibration batches: dicts of a
    tokenizer stay keyword inputs through its wrapper of the model."""
    from codec.rd.repair import RepairSettings

    model = _tiny_gpt2().eval()
    ids = torch.randint(0, 200, (16, 12))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}
               for i in range(0, 16, 4)]
    notes = codec.save(model, tmp_path / "g.jwt", bits_per_weight=4, calibration=batches,
                       repair=RepairSettings(finetune_steps=4))
    assert any("fine-tuning" in n for n in notes), notes
    model.load_state_dict(codec.load(tmp_path / "g.jwt"))


def test_a_forward_that_reads_the_dict_itself_still_gets_it_whole():
    """forward(self, batch) reading batch["input_ids"] (bench/train_minilm.py's Embed) gets the dict as one argument,
    as before; a forward taking the keys by name gets them as keywords."""

    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, batch):
            return self.fc(batch["x"] * batch["scale"])

    class Named(Whole):
        def forward(self, x, scale):
            return self.fc(x * scale)

    batches = [{"x": torch.randn(8, 64), "scale": torch.full((8, 1), 2.0)} for _ in range(4)]
    for kind in (Whole, Named):
        torch.manual_seed(0)
        net = kind()
        before = net.fc.weight.detach().clone()
        _quiet(codec.train.finetune, net, batches, None, "b2", steps=2, lr=1e-3)
        assert not torch.equal(before, net.fc.weight.detach()), kind.__name__
