"""Models a new user builds and loads in ways not tried before (twenty-seventh pass, bench/JOURNAL.md "qa
(twenty-seventh pass)"): a model built on the meta device (``with torch.device("meta"):``, accelerate's
``init_empty_weights()``) loaded with ``codec.load_into``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import codec


class _Net(nn.Module):
    """Two layers tying one weight (not a head), a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.c.weight = self.b.weight
        self.register_buffer("scale", torch.full((32,), 2.0))
        self.register_buffer("steps", torch.arange(4), persistent=False)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))) * self.scale


def _saved(tmp_path):
    torch.manual_seed(0)
    model = _Net()
    path = tmp_path / "n.jwt"
    codec.save(model, path)
    return model, path


def test_load_into_a_model_on_the_meta_device_gives_it_the_files_weights(tmp_path):
    model, path = _saved(tmp_path)
    with torch.device("meta"):
        empty = _Net()
    with pytest.warns(UserWarning, match=r"meta device.*1 of its tensors.*'steps'.*init_empty_weights"):
        result = codec.load_into(empty, path)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(not p.is_meta for p in empty.parameters()) and not empty.scale.is_meta
    assert empty.c.weight is empty.b.weight  # the tie is one parameter again
    assert empty.a.weight.requires_grad
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.allclose(empty(x), _loaded(path)(x))


def _loaded(path):
    fresh = _Net()
    codec.load_into(fresh, path)
    return fresh


def test_load_into_a_meta_model_whose_buffers_are_real_warns_nothing(tmp_path):
    model, path = _saved(tmp_path)
    with torch.device("meta"):
        empty = _Net()
    empty.steps = torch.arange(4)  # as accelerate's init_empty_weights() leaves buffers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codec.load_into(empty, path)
    for name, tensor in model.state_dict().items():
        assert torch.allclose(empty.state_dict()[name], tensor, atol=0.05), name


def test_load_into_a_meta_model_with_a_key_the_file_lacks(tmp_path):
    _, path = _saved(tmp_path)

    class Wider(_Net):
        def __init__(self):
            super().__init__()
            self.d = nn.Linear(32, 4)

    with torch.device("meta"):
        empty = Wider()
    with pytest.raises(RuntimeError, match="Missing key.*d.weight"):
        codec.load_into(empty, path)
    with pytest.warns(UserWarning, match="'d.weight'"):
        result = codec.load_into(empty, path, strict=False)
    assert set(result.missing_keys) == {"d.weight", "d.bias"}
