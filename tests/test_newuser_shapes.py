"""Models a new user brings that earlier passes had not tried (twenty-ninth pass, bench/JOURNAL.md "qa
(twenty-ninth pass)"): an ``nn.Embedding`` subclass whose forward looks up rows of its own choosing (BART's learned
positions: called with the token embeddings, "for the shape only"); a Hugging Face image or audio folder calibrated
from a ``.npy`` array of its inputs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import codec
from codec.rd.calibrate import calibrate


class _Positions(nn.Embedding):
    """As transformers' ``BartLearnedPositionalEmbedding``: called with the token embeddings for their shape, it
    looks up the positions (offset by 2) through ``nn.Embedding.forward``."""

    def __init__(self, positions: int, dim: int):
        super().__init__(positions + 2, dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        positions = torch.arange(embeds.shape[1]).expand(embeds.shape[0], -1)
        return super().forward(positions + 2)


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(1000, 32)
        self.positions = _Positions(12, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, ids):
        x = self.tokens(ids)
        return self.out(torch.tanh(x + self.positions(x)))


def _ids(batches: int = 3, length: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1000, (4, length), generator=g) for _ in range(batches)]


def test_an_embedding_that_looks_up_rows_of_its_own_choosing_is_counted_by_those_rows():
    torch.manual_seed(0)
    model = _Tagger()
    cal = calibrate(model, _ids())
    stats = cal.layers["positions.weight"]
    counts = np.asarray(stats.h)
    assert counts.shape == (14,)
    assert counts[:2].sum() == 0 and counts[10:].sum() == 0  # rows 2..9: the 8 positions, 12 times each
    assert np.all(counts[2:10] == 12)
    assert stats.sensitivity > 1e-5  # its noise moved the output (measured through the rows it looked up)


def test_a_calibrated_save_of_that_model_decodes(tmp_path):
    torch.manual_seed(0)
    model = _Tagger()
    path = tmp_path / "t.jwt"
    codec.save(model, path, bits_per_weight=4, calibration=_ids())
    fresh = _Tagger()
    codec.load_into(fresh, path)
    assert torch.allclose(fresh.positions.weight, model.positions.weight, atol=0.2)


def _run(*args):
    from click.testing import CliRunner

    from jwt_cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


def test_a_hugging_face_image_folder_takes_an_array_of_its_pixel_values(tmp_path):
    """A ViT folder with ``--calibration pixels.npy`` (the model's own inputs, already normalized): the array goes in
    as the model's ``pixel_values``, no tokenizer is looked for (before: "transformers cannot load the model or its
    tokenizer"), and the file decodes into a folder transformers loads."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=48, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=96, num_labels=4)
    folder = tmp_path / "vit"
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]) \
        .save_pretrained(folder)
    np.save(tmp_path / "pixels.npy", np.random.default_rng(0).uniform(-1, 1, (12, 1, 16, 16)).astype(np.float32))
    out = tmp_path / "vit.jwt"
    result = _run("encode", folder, "-b", "6", "--calibration", tmp_path / "pixels.npy", "-o", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "tokenizer" not in result.output
    assert "12 samples of pixels.npy as the model's pixel_values" in result.output
    with codec.open(out) as f:
        assert f.metadata["jwt.calibration"].startswith("12 inputs")
    assert _run("decode", out, "-o", f"{tmp_path / 'back'}/").exit_code == 0
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "back").eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = model(pixel_values=x).logits, back(pixel_values=x).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_an_encoder_decoder_folder_given_an_array_gets_its_decoders_start_token(tmp_path):
    """A Whisper-shaped folder (an encoder of audio features, a text decoder) with ``--calibration features.npy``:
    the decoder is given its start token (before: "You cannot specify both decoder_input_ids and
    decoder_inputs_embeds"), and a note says it reads only that."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(vocab_size=300, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
                                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1)
    folder = tmp_path / "whisper"
    torch.manual_seed(0)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(folder)
    np.save(tmp_path / "features.npy", np.random.default_rng(0).standard_normal((6, 8, 32)).astype(np.float32))
    result = _run("encode", folder, "-b", "8", "--calibration", tmp_path / "features.npy", "-o", tmp_path / "w.jwt")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "as the model's input_features" in result.output and "its start token" in result.output


def test_a_dual_encoder_given_one_kind_of_input_is_told_what_else_its_forward_takes():
    """A CLIP model calibrated on sentences alone (as ``jwt encode CLIP-FOLDER --calibration texts.txt`` gives it):
    the one-line error names the input its forward also takes and the dict batches that give both (before: "the
    model does not accept it ('NoneType' object has no attribute 'shape')")."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    ids = {"input_ids": torch.randint(0, 100, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    with pytest.raises(ValueError) as err:
        calibrate(model, [ids])
    message = str(err.value)
    assert "\n" not in message and message.startswith("calibration batch 0: the model does not accept it")
    assert "its forward also takes pixel_values" in message and "{'input_ids': ..., 'pixel_values': ...}" in message
    both = {**ids, "pixel_values": torch.rand(4, 3, 16, 16)}
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in calibrate(model, [both]).layers


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)

    def forward(self, x):
        return {"pooled": torch.tanh(self.body(x))}


class _Projected(nn.Module):
    """As CLIP's ``get_image_features`` in transformers 5: the tower's output dict has its field replaced by the
    projection of it."""

    def __init__(self):
        super().__init__()
        self.tower, self.proj, self.head = _Tower(), nn.Linear(16, 4), nn.Linear(4, 3)

    def forward(self, x):
        out = self.tower(x)
        out["pooled"] = self.proj(out["pooled"])
        return self.head(out["pooled"])


def test_a_kept_output_whose_field_the_model_reassigns_is_not_given_back():
    """The sensitivity passes that start at a layer give back the outputs of modules completed before it; an output
    whose field the model reassigns after it returns (the projected features in place of the pooled ones) would be
    given back changed (before: "mat1 and mat2 shapes cannot be multiplied" out of calibrate, a traceback)."""
    torch.manual_seed(0)
    model = _Projected()
    cal = calibrate(model, [torch.randn(8, 8) for _ in range(2)])
    assert {"tower.body.weight", "proj.weight", "head.weight"} <= set(cal.layers)


class _LongTagger(_Tagger):
    def __init__(self):
        super().__init__()
        self.tokens, self.positions, self.out = nn.Embedding(1000, 64), _Positions(300, 64), nn.Linear(64, 5)


def test_repair_keeps_whole_a_coded_embedding_that_chooses_its_rows():
    """Repair holds a coded embedding at the rows the calibration inputs look up; an embedding whose class chooses
    its rows (BART's learned positions) is kept whole instead (before: "arrays used as indices must be of integer
    (or boolean) type" out of repair, a traceback, after the whole calibration of a BART folder)."""
    import tempfile
    from pathlib import Path

    torch.manual_seed(0)
    model = _LongTagger()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jwt"
        codec.save(model, path, bits_per_weight=2, calibration=_ids(4), overrides={"positions.weight": "b3"})
        back = codec.load(path)
    error = (back["positions.weight"] - model.positions.weight.detach()).norm() / model.positions.weight.norm()
    assert error < 0.5  # (3-bit quant of a random table: about 0.3)


class _SlicedPositions(nn.Embedding):
    """As transformers' ``WhisperPositionalEmbedding``: called with the token ids, it reads its first rows by
    indexing its weight (no ``F.embedding`` call)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.weight[0:ids.shape[1]]


class _SlicedTagger(_Tagger):
    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(1000, 32), _SlicedPositions(10, 32)

    def forward(self, ids):
        return self.out(torch.tanh(self.tokens(ids) + self.positions(ids)))


def test_an_embedding_that_indexes_its_weight_is_counted_by_the_rows_it_reads():
    """Whisper's decoder positions, called with token ids of a larger vocabulary than its 10 rows (before: "index
    101 is out of bounds for dimension 0 with size 64" out of the sensitivity pass, a traceback)."""
    torch.manual_seed(0)
    model = _SlicedTagger()
    cal = calibrate(model, _ids())
    counts = np.asarray(cal.layers["positions.weight"].h)
    assert counts.shape == (10,) and np.all(counts[:8] == 3) and counts[8:].sum() == 0  # once a batch (a slice)
    assert cal.layers["positions.weight"].sensitivity > 1e-5


class _Observed(nn.Module):
    """As a QAT model's observers (torch.ao.quantization.prepare_qat): a buffer its forward updates, in eval mode
    too (the largest input seen), that scales what it computes."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 4)
        self.register_buffer("peak", torch.ones(()))

    def forward(self, x):
        self.peak.copy_(torch.maximum(self.peak, x.abs().max()))
        return self.fc2(torch.relu(self.fc1(x / self.peak)))


def test_a_calibrated_save_leaves_the_buffers_its_forward_updates_as_they_were(tmp_path):
    """Calibration and repair run the model: a buffer its forward updates (a QAT observer's range) is given back its
    value, and the file holds the model as it was given (before: the save changed the user's model and stored the
    range of the calibration inputs)."""
    torch.manual_seed(0)
    model = _Observed().eval()
    batches = [torch.randn(16, 64) * 5 for _ in range(4)]
    path = tmp_path / "o.jwt"
    codec.save(model, path, bits_per_weight=6, calibration=batches)
    assert float(model.peak) == 1.0
    assert float(codec.load(path)["peak"]) == 1.0


def test_a_layer_whose_h_no_damping_factors_is_coded_as_it_stands_with_a_note(tmp_path, monkeypatch):
    """A Whisper folder calibrated from an array gives its decoder only the start token: a layer's inputs are all
    alike and its centred H is rounding noise that no damping makes positive definite. Repair codes that layer as it
    stands and names it (before: the save ended with "H stays singular after damping", naming nothing)."""
    import codec.rd.gptq as gptq

    def singular(*args, **kwargs):
        raise np.linalg.LinAlgError("H stays singular after damping")

    monkeypatch.setattr(gptq, "gptq_target", singular)
    monkeypatch.setattr(gptq, "jpeg_target", singular)
    torch.manual_seed(0)
    model = _Observed().eval()
    path = tmp_path / "s.jwt"
    notes = codec.save(model, path, bits_per_weight=6, calibration=[torch.randn(16, 64) for _ in range(4)])
    said = [str(n) for n in notes if "coded as they stand" in str(n)]
    assert len(said) == 1 and "fc1.weight" in said[0]
    assert set(codec.load(path)) == set(model.state_dict())


def test_a_qat_prepared_models_observers_are_left_as_they_were(tmp_path):
    """torch's default QAT configuration fuses its observers (their buffers change in place without a tensor
    version): a calibrated save of a ``prepare_qat`` model leaves every buffer as it was, and the file holds them so
    (before: the activation observers' scales and ranges became the calibration inputs')."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
            self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 4)

        def forward(self, x):
            return self.dequant(self.fc2(torch.relu(self.fc1(self.quant(x)))))

    model = Net().train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    model = torch.ao.quantization.prepare_qat(model)
    with torch.no_grad():
        model(torch.randn(16, 64))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "q.jwt"
    codec.save(model, path, bits_per_weight=8, calibration=[torch.randn(16, 64) * 3 for _ in range(4)])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
    stored = codec.load(path)
    for k in before:  # (a one-value float may be stored with its significand rounded to 8 bits: the plan's choice)
        if k.endswith(("scale", "zero_point", "min_val", "max_val")) and before[k].numel():
            assert torch.allclose(stored[k].float(), before[k].float(), rtol=1e-2), k
