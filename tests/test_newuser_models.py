"""Calibrated coding on the kinds of model a new user brings (nineteenth pass, bench/newuser.py): an encoder-decoder
transformers folder through the command line, a model that refuses a batch with its own ValueError, ..."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import codec
from codec.rd.calibrate import calibrate


def _encode(*args):
    from click.testing import CliRunner

    from jwt_cli.main import cli

    return CliRunner().invoke(cli, ["encode", *map(str, args)])


def _tiny_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "home", "in", "park"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


class _Picky(nn.Module):
    """A model whose forward refuses inputs with its own ValueError (as transformers models do)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError(f"expected 8 features, got {x.shape[-1]}")
        return self.fc(x)


def test_a_model_refusing_a_batch_with_its_own_value_error_is_named_as_that_batch():
    """The model's ValueError is the model refusing a batch, said as calibration's other refusals are (before: it
    came out bare, naming neither the batch nor calibration)."""
    with pytest.raises(ValueError, match=r"calibration batch 1: the model does not accept it \(expected 8 features, "
                                         r"got 7\)"):
        calibrate(_Picky(), [torch.randn(4, 8), torch.randn(4, 7)])
