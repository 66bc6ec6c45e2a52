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


class _SharedTable(nn.Module):
    """One table under three modules: ``shared`` (never called, first in the state_dict: the stored name), the
    encoder's and the decoder's embeddings (T5's layout, without the tied head)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(20, 8)
        self.enc, self.dec = nn.Embedding(20, 8), nn.Embedding(20, 8)
        self.enc.weight = self.dec.weight = self.shared.weight
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.enc(ids).mean(1) + self.dec(ids[:, :2]).mean(1))


def test_a_table_shared_by_modules_that_ran_is_measured_under_its_stored_name(tmp_path):
    """The stored name of a shared table gets the lookups of every module that ran with it, summed (before: no
    statistics under ``shared.weight``, coded data-free with a note saying the inputs never reached it)."""
    torch.manual_seed(0)
    model = _SharedTable()
    ids = torch.randint(0, 20, (16, 5))
    calib = calibrate(model, [ids])
    counts = torch.bincount(ids.reshape(-1), minlength=20) + torch.bincount(ids[:, :2].reshape(-1), minlength=20)
    for name in ("shared.weight", "enc.weight", "dec.weight"):
        assert calib.layers[name].kind == "embedding"
        assert calib.layers[name].h.tolist() == counts.double().tolist()
        assert calib.layers[name].samples == ids.numel() + ids[:, :2].numel()
    notes = codec.save(model, tmp_path / "s.jwt", bits_per_weight=48, calibration=[ids], repair=False)
    assert not any(str(n).startswith("calibration:") for n in notes), notes


def test_t5s_shared_table_is_weighed_as_its_tied_head():
    """T5ForConditionalGeneration: ``shared``, the two ``embed_tokens`` and ``lm_head`` hold one tensor; it is
    weighed as the head (its inputs' H), stored as ``shared.weight``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(1, 40, (4, 6))
    calib = calibrate(model, [{"input_ids": ids, "decoder_input_ids": model._shift_right(ids)}])
    head = calib.layers["lm_head.weight"]
    assert head.kind == "linear" and head.h.shape == (16, 16)
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        assert calib.layers[name] is head
