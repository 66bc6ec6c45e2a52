"""Models a new user builds and loads in ways not tried before (twenty-seventh pass, bench/JOURNAL.md "qa
(twenty-seventh pass)"): a model built on the meta device (``with torch.device("meta"):``, accelerate's
``init_empty_weights()``) loaded with ``codec.load_into``; layers under ``torch.nn.utils.parametrize``
(weight_norm, spectral_norm) in a calibrated save."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

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


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = parametrizations.weight_norm(nn.Linear(64, 256))
        self.b = parametrizations.spectral_norm(nn.Linear(256, 256))
        self.c = nn.Linear(256, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _data_free_note(notes):
    return [n for n in notes if "coded by the data-free weighting" in n]


class _Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(0, 1)


def _custom():
    """_Normed with its spectral_norm layer under a parametrization the search does not know instead."""
    model = _Normed().eval()
    parametrize.remove_parametrizations(model.b, "weight")
    parametrize.register_parametrization(model.b, "weight", _Symmetric())
    return model


def test_a_parametrized_layers_originals_are_named_with_what_lets_calibration_measure_them(tmp_path):
    """Before: "'a.parametrizations.weight.original0', ... (ParametrizationList: a layer kind calibration does not
    measure)", although the layer is an nn.Linear, and nothing said what to do. Since the fold pass (twenty-eighth)
    weight_norm's and spectral_norm's computed weights are measured and their originals coded by that measure: only
    another parametrization is named."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    assert not _data_free_note(codec.save(_Normed().eval(), tmp_path / "n.jwt", bits_per_weight=3, calibration=x,
                                          repair=False))
    model = _custom()
    notes = codec.save(model, tmp_path / "p.jwt", bits_per_weight=3, calibration=x, repair=False)
    (note,) = _data_free_note(notes)
    assert "'b.parametrizations.weight.original'" in note and "'a.parametrizations" not in note
    assert "ParametrizationList" not in note and "layer kind" not in note and "other than weight_norm" in note
    assert 'parametrize.remove_parametrizations(layer, "weight")' in note
    parametrize.remove_parametrizations(model.b, "weight")  # what the note says to do: then every weight is measured
    notes = codec.save(model, tmp_path / "q.jwt", bits_per_weight=3, calibration=x, repair=False)
    assert not _data_free_note(notes)
    assert "b.weight" in set(codec.open(tmp_path / "q.jwt").keys())


def _encode_cli(*args):
    from click.testing import CliRunner

    from jwt_cli.main import cli

    return CliRunner().invoke(cli, ["encode", *map(str, args)])


def test_model_module_not_beside_the_user_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """`jwt encode models/net.pt --model qa27_nets:Net` run from the folder above the module's: before, only
    "cannot import qa27_nets (ModuleNotFoundError: No module named 'qa27_nets')"."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "qa27_nets.py").write_text("from torch import nn\nclass Net(nn.Linear):\n"
                                                       "    def __init__(self):\n        super().__init__(8, 4)\n")
    (tmp_path / "models" / "qa27_needs.py").write_text("import qa27_no_such_dependency\n")
    torch.save(nn.Linear(8, 4).state_dict(), tmp_path / "models" / "net.pt")
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((4, 8), np.float32))
    monkeypatch.chdir(tmp_path)
    result = _encode_cli("models/net.pt", "-b", "4", "--calibration", "x.npy", "--model", "qa27_nets:Net")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot import qa27_nets" in result.output
    assert f"looked in the current folder ({tmp_path})" in result.output
    assert "run jwt from the folder that holds qa27_nets.py" in result.output
    monkeypatch.syspath_prepend(str(tmp_path / "models"))  # found, but a module it imports is missing: no such advice
    result = _encode_cli("models/net.pt", "-b", "4", "--calibration", "x.npy", "--model", "qa27_needs:Net")
    assert result.exit_code == 1 and "No module named 'qa27_no_such_dependency'" in result.output
    assert "run jwt from" not in result.output


def test_a_data_free_search_names_the_parametrized_layers_once(tmp_path):
    """Before: nothing (a weight_norm MLP at -b 0.5 lost 6.2 points more than with its parametrizations removed,
    bench/JOURNAL.md "qa (twenty-seventh pass)"). weight_norm and spectral_norm are weighed as the weight they compute
    since the fold pass: no note; another parametrization is named."""
    assert not [n for n in codec.save(_Normed().eval(), tmp_path / "n.jwt", bits_per_weight=3) if "parametrize" in n]
    model = _custom()
    notes = codec.save(model, tmp_path / "p.jwt", bits_per_weight=3)
    said = [n for n in notes if "torch.nn.utils.parametrize" in n]
    assert len(said) == 1 and "1 layer ('b') computes its weight" in said[0] and "other than weight_norm" in said[0]
    assert "remove_parametrizations" in said[0] and "'b.weight'" in said[0]
    assert not [n for n in codec.save(model, tmp_path / "q.jwt") if "parametrize" in n]  # no rate search, no note
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    notes = codec.save(model, tmp_path / "r.jwt", bits_per_weight=3, calibration=x, repair=False)
    assert len([n for n in notes if "parametrize" in n]) == 1  # calibration's own, not both
    parametrize.remove_parametrizations(model.b, "weight")
    assert not [n for n in codec.save(model, tmp_path / "s.jwt", bits_per_weight=3) if "parametrize" in n]


def test_a_folder_without_its_tokenizer_files_is_refused_before_calibrating_on_unknown_tokens(tmp_path):
    """transformers 5 builds an empty tokenizer (5 special tokens) for a folder without vocab.txt / tokenizer.json:
    before, `jwt encode FOLDER --calibration texts.txt` calibrated on sentences of [UNK] alone, and said nothing."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    transformers.BertModel(config).save_pretrained(folder)
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat\na dog ran far away\n" * 8)
    result = _encode_cli(folder, "-b", "4", "--calibration", texts, "-o", tmp_path / "t.jwt")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "its tokenizer has 5 tokens for the model's 200 embedding rows" in result.output
    assert "tokenizer files" in result.output and not (tmp_path / "t.jwt").exists()
