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
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tmp_path))  # transformers 5 ignores vocab_file=
    assert tokenizer.vocab_size == 5 + len(words)
    return tokenizer


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


def test_cli_encoder_decoder_folder_with_sentences(tmp_path):
    """A T5 folder with --calibration texts.txt: the decoder reads each sentence shifted right (before: exit 1,
    "You must specify exactly one of input_ids or inputs_embeds" from the decoder); every weight, encoder and
    decoder, is measured (no data-free note); the file decodes into the model."""
    transformers = pytest.importorskip("transformers")
    tokenizer = _tiny_tokenizer(tmp_path)
    config = transformers.T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    torch.manual_seed(0)
    folder = tmp_path / "t5"
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\na dog ran far away\nthe dog sat in the park\n")
    out = tmp_path / "t5.jwt"
    result = _encode(folder, "-b", "14", "--calibration", tmp_path / "texts.txt", "--no-repair", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "jwt: note: calibration:" not in result.output, result.output  # the decoder's layers are reached too
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("3 inputs")
    back = transformers.T5ForConditionalGeneration(config)
    back.load_state_dict(codec.load(out), strict=False)
    for name, t in back.state_dict().items():
        assert torch.isfinite(t).all(), name


def test_text_batches_give_an_encoder_decoder_its_decoder_inputs(tmp_path):
    """decoder_inputs: the model's own shift for T5; a plain shift behind the start token for a model without
    prepare_decoder_input_ids_from_labels; None for an encoder-only model."""
    transformers = pytest.importorskip("transformers")
    from jwt_cli.calibration import TextBatches, decoder_inputs

    tokenizer = _tiny_tokenizer(tmp_path)
    t5 = transformers.T5Model(transformers.T5Config(vocab_size=20, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                    num_heads=2, decoder_start_token_id=7, pad_token_id=0))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    assert decoder_inputs(bert) is None
    shift = decoder_inputs(t5)
    ids = torch.tensor([[5, 6, 9], [8, 0, 0]])
    assert shift(ids).tolist() == [[7, 5, 6], [7, 8, 0]]
    batches = list(TextBatches(tokenizer, ["the cat", "a dog ran far"], decoder=shift))
    assert len(batches) == 1
    b = batches[0]
    assert b["decoder_input_ids"].shape == b["input_ids"].shape
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["input_ids"][:, :-1])
    assert torch.equal(b["decoder_attention_mask"], b["attention_mask"])
    with torch.no_grad():
        t5(**b)  # the model takes it
    # a sequence of batches (repair reads a batch again by its index): batch i made when asked for, the pass's own
    three = TextBatches(tokenizer, ["the cat", "a dog ran far", "a cat"], batch=2, decoder=shift)
    passed = list(three)
    assert len(three) == len(passed) == 2
    for i in (0, 1, -1):
        again = three[i]
        assert again.keys() == passed[i].keys() and all(torch.equal(again[k], passed[i][k]) for k in again)
    with pytest.raises(IndexError, match="batch 2 out of range"):
        three[2]


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_calibrates_and_repairs_on_float32_inputs(tmp_path, dtype):
    """float32 images for a float16 / bfloat16 model: calibration casts them to the model's dtype, and so does repair
    now (before: RuntimeError 'Input type (float) and bias type (c10::Half) should be the same' from repair's first
    forward pass, after calibration had accepted the same inputs). The file keeps the dtype and the model works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 10 * 10, 10)).eval()
    x = torch.randn(96, 1, 12, 12)
    with torch.no_grad():
        ref = model(x)
    model = model.to(dtype)
    notes = codec.save(model, tmp_path / "h.jwt", bits_per_weight=6, calibration=x)
    assert any(str(n).startswith("repair:") for n in notes), notes
    back = codec.load(tmp_path / "h.jwt")
    assert back["4.weight"].dtype == dtype
    model.load_state_dict(back)
    with torch.no_grad():
        out = model(x.to(dtype)).float()
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_the_note_names_a_parameter_of_the_model_itself_as_no_layer(tmp_path):
    """A position table held by the model itself is not 'a layer kind calibration does not measure' named after
    the model's class (before: "'pos' (Net: a layer kind calibration does not measure)")."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(6, 8))
            self.gru = nn.GRU(8, 8, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.gru(x + self.pos)[0][:, -1])

    torch.manual_seed(0)
    notes = codec.save(Net(), tmp_path / "n.jwt", bits_per_weight=48, calibration=torch.randn(32, 6, 8), repair=False)
    note = next(str(n) for n in notes if str(n).startswith("calibration:"))
    assert "'pos' (a parameter of Net itself, used outside any layer calibration measures)" in note, note
    assert "Net: a layer kind" not in note and "gru" not in note  # (the GRU is measured)


def test_a_calibrated_save_measures_multihead_attentions_in_proj_and_out_proj(tmp_path):
    """nn.MultiheadAttention calls its parameters as functions (``out_proj`` an nn.Linear it never runs), so no
    Linear hook sees them; codec.rd.attention measures them from the module's own call: a calibrated save no longer
    notes ``in_proj_weight`` / ``out_proj.weight`` as coded by the data-free weighting (bench/JOURNAL.md, nineteenth
    pass, qa; twenty-seventh pass, mha)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0][:, -1])

    torch.manual_seed(0)
    notes = codec.save(Net(), tmp_path / "a.jwt", bits_per_weight=48, calibration=torch.randn(32, 6, 8), repair=False)
    assert not any("attn" in str(n) for n in notes), [str(n) for n in notes]
    assert not any(str(n).startswith("calibration:") for n in notes), [str(n) for n in notes]
