"""Unlabelled text for distilling all-MiniLM-L6-v2, made offline from the calibration sentences and the vocabulary.

Distillation needs no labels and no natural text: the student only has to match the original model's outputs, on
any input. The 125 calibration sentences are too little for it (bench/JOURNAL.md, "minilm (twenty-second pass)"):
the rare words' embedding rows get no gradient from them, and past 40 steps distillation fits them and loses on
the evaluation sets. :func:`generated` makes as many sentences as asked, from three recipes (:data:`MIX`):

* ``swap``: a source sentence with each word replaced, with probability :data:`SWAP`, by a random vocabulary word;
* ``splice``: the start of one source sentence joined to the end of another, then swapped at half that rate;
* ``vocab``: 6-18 random vocabulary words.

A random vocabulary word is a whole-word entry of the tokenizer's vocabulary (ASCII letters, id from 1000: not the
[unused] slots or single characters), drawn uniformly over those ids, so about two thirds of them are rare (id above
:data:`bench.sentences.RARE_ID`), and with probability :data:`PIECES` continued by one or two ``##`` pieces (a
long word of several word-pieces, as medicine and chemistry names are). Nothing here reads the evaluation sets
except :func:`near_copy`, which drops any generated sentence that shares a run of :data:`SHINGLE` words with an
evaluation sentence or half its words (none is then an evaluation sentence or a near copy of one). The source
sentences themselves are the calibration set's, disjoint from the evaluation sets (:func:`bench.sentences.check`);
one of them shares the five words "along the edge of the" with a rare-word sentence and is kept.

:func:`split` divides the calibration sentences into the training ones and a held-out fifth: :func:`training_text`
generates from the first only, :func:`held_out_text` from the second only (another seed), so a choice made on the
held-out text (steps, learning rate, what to keep) never sees the sentences distillation trains on, nor the
evaluation sets. ``python -m bench.distil_text`` prints a few generated sentences and the rare-token fractions.
"""

from __future__ import annotations

import functools
import random
import re

from bench.sentences import CALIBRATION, EVALUATION, RARE_ID, rare_fraction, tokenizer

#: Share of each recipe in :func:`generated` (``swap``, ``splice``, ``vocab``).
MIX = {"swap": 0.5, "splice": 0.2, "vocab": 0.3}
#: Probability that ``swap`` replaces a word.
SWAP = 0.3
#: Probability that a random vocabulary word is continued by ``##`` pieces.
PIECES = 0.3
#: A generated sentence sharing this many consecutive words with an evaluation sentence is dropped.
SHINGLE = 5
#: Every this-many-th calibration sentence is held out (:func:`split`).
HOLD_EVERY = 5

_WORD = re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']")


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(whole words, continuations)``: the vocabulary's ASCII-letter entries from id 1000 on, the second those
    written ``##piece`` (without the ``##``)."""
    vocab = tokenizer().get_vocab()
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    whole = tuple(t for t, i in by_id if i >= 1000 and t.isascii() and t.isalpha())
    pieces = tuple(t[2:] for t, i in by_id if i >= 1000 and t.startswith("##") and t[2:].isascii()
                   and t[2:].isalpha())
    return whole, pieces


def random_word(rng: random.Random) -> str:
    """A whole vocabulary word drawn uniformly, continued by one or two pieces with probability :data:`PIECES`."""
    whole, pieces = vocabulary()
    word = rng.choice(whole)
    if rng.random() < PIECES:
        word += "".join(rng.choice(pieces) for _ in range(rng.choice((1, 2))))
    return word


def _words(sentence: str) -> list[str]:
    return sentence.split()


def _swapped(sentence: str, rate: float, rng: random.Random) -> str:
    """``sentence`` with each word (its trailing punctuation kept) replaced by a random one with probability rate."""
    out = []
    for word in _words(sentence):
        if rng.random() < rate:
            tail = word[len(word.rstrip(".,;:!?")):]
            out.append(random_word(rng) + tail)
        else:
            out.append(word)
    return " ".join(out)


def _spliced(a: str, b: str, rng: random.Random) -> str:
    """The first part of ``a`` (at least two words) and the last part of ``b``."""
    wa, wb = _words(a), _words(b)
    head = wa[:rng.randint(2, max(2, len(wa) - 1))]
    tail = wb[rng.randint(1, max(1, len(wb) - 2)):]
    return " ".join(head + tail)


def _vocab_sentence(rng: random.Random) -> str:
    words = [random_word(rng) for _ in range(rng.randint(6, 18))]
    if len(words) > 8 and rng.random() < 0.5:
        words[rng.randrange(2, len(words) - 2)] += ","
    return " ".join(words).capitalize() + "."


def _key(sentence: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(sentence) if w[0].isalnum()]


@functools.lru_cache(maxsize=1)
def _evaluation_index() -> tuple[frozenset, list[frozenset]]:
    """The evaluation sentences' word shingles (:data:`SHINGLE` words) and word sets."""
    shingles, sets = set(), []
    for sentences in EVALUATION.values():
        for s in sentences:
            words = _key(s)
            shingles.update(tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1))
            sets.append(frozenset(words))
    return frozenset(shingles), sets


def near_copy(sentence: str) -> bool:
    """True if ``sentence`` shares :data:`SHINGLE` consecutive words (case and punctuation ignored) with an
    evaluation sentence, or at least half the words of one (or of itself): an evaluation sentence or a near copy."""
    shingles, sets = _evaluation_index()
    words = _key(sentence)
    if any(tuple(words[i:i + SHINGLE]) in shingles for i in range(len(words) - SHINGLE + 1)):
        return True
    mine = frozenset(words)
    return any(len(mine & other) * 2 >= min(len(mine), len(other)) and len(mine & other) >= 3 for other in sets)


def split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(training, held out)`` calibration sentences: every :data:`HOLD_EVERY`-th is held out."""
    held = tuple(s for i, s in enumerate(CALIBRATION) if i % HOLD_EVERY == HOLD_EVERY - 1)
    return tuple(s for i, s in enumerate(CALIBRATION) if i % HOLD_EVERY != HOLD_EVERY - 1), held


def generated(n: int, sources: tuple[str, ...] | list[str], seed: int = 0) -> list[str]:
    """``n`` distinct sentences made from ``sources`` and the vocabulary by the recipes of :data:`MIX`, none a
    source sentence nor an evaluation sentence or a near copy of one (:func:`near_copy`); the same for the same
    arguments."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"generated: n must be a non-negative integer, not {n!r}")
    sources = list(sources)
    if not sources:
        raise ValueError("generated: no source sentences")
    rng = random.Random(seed)
    recipes, weights = zip(*MIX.items())
    seen, out = set(sources), []
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        recipe = rng.choices(recipes, weights)[0]
        if recipe == "swap":
            s = _swapped(rng.choice(sources), SWAP, rng)
        elif recipe == "splice":
            s = _swapped(_spliced(rng.choice(sources), rng.choice(sources), rng), SWAP / 2, rng)
        else:
            s = _vocab_sentence(rng)
        if s not in seen and not near_copy(s):
            seen.add(s)
            out.append(s)
    if len(out) < n:
        raise ValueError(f"generated: only {len(out)} distinct sentences of {n} from {len(sources)} sources")
    return out


def training_text(n: int, seed: int = 0) -> list[str]:
    """The training calibration sentences (:func:`split`) followed by ``n`` sentences generated from them."""
    train, _ = split()
    return list(train) + generated(n, train, seed)


def held_out_text(n: int = 100, seed: int = 1) -> list[str]:
    """The held-out calibration sentences (:func:`split`) followed by ``n`` sentences generated from them (another
    seed than :func:`training_text`'s): the text a choice is made on."""
    _, held = split()
    return list(held) + generated(n, held, seed)


if __name__ == "__main__":
    text, held = training_text(2000), held_out_text()
    print("\n".join(text[100:110]))
    for name, sentences in (("training", text), ("held out", held)):
        print(f"{name}: {len(sentences)} sentences, {rare_fraction(sentences):.1%} of tokens with ids above {RARE_ID}")
