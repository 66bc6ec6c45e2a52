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
