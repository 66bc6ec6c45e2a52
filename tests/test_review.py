"""Plan review by measured output error (codec.rd.review) on a tiny model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from codec.api import to_numpy, to_torch
from codec.dtypes import get_dtype
from codec.rd.repair import _outputs, output_error
from codec.rd.review import REVIEW_ERROR, _Review, review_plan
from codec.tensorcodec import EncodeOptions, decode_encoded, encode_tensor

F32 = get_dtype("float32")


def model_and_data() -> tuple[nn.Module, list[torch.Tensor], list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(256, 32, generator=g)
    x = nn.functional.interpolate(base[:, None], size=256, mode="linear")[:, 0] + 0.3
    batches = list(x.split(64))
    with torch.no_grad():
        refs = [_outputs(model, b) for b in batches]
    return model, batches, refs


def coded_error(model: nn.Module, batches: list, refs: list, plan: dict[str, EncodeOptions]) -> tuple[float, int]:
    """The model's output error with each tensor of ``plan`` encoded and decoded, and the bytes of their blobs."""
    coded, total = copy.deepcopy(model), 0
    tensors = dict(coded.named_parameters())
    for name, opts in plan.items():
        array, dtype_name = to_numpy(tensors[name])
        encoded = encode_tensor(array, F32, opts)
        total += sum(len(b) for b in encoded.blobs)
        tensors[name].data = to_torch(decode_encoded(encoded, F32, array.shape), dtype_name)
    return output_error(coded, batches, refs), total


PLAN = {"0.weight": EncodeOptions(codec="jpeg", quality=3, tile=(16, 64)),
        "2.weight": EncodeOptions(codec="quant", bits=8, tile=(16, 64)),
        "4.weight": EncodeOptions(codec="quant", bits=8, tile=(16, 64))}


def test_review_moves_bytes_to_a_layer_with_a_large_error_at_no_more_bytes():
    """The first layer at JPEG quality 3 leaves its output a relative error above REVIEW_ERROR; the review codes it
    at a higher quality, paid by fewer bits in the 8-bit layers, and the coded model's output error falls at no
    more bytes."""
    model, batches, refs = model_and_data()
    names = list(PLAN)
    assert _Review(model, batches, refs, names, None).layer_errors(PLAN)["0.weight"] > REVIEW_ERROR
    changed, note = review_plan(model, batches, refs, PLAN, names)
    assert changed["0.weight"].quality > PLAN["0.weight"].quality
    assert all(changed[n].bits < PLAN[n].bits for n in changed if n != "0.weight")
    reviewed = {**PLAN, **changed}
    before, after = coded_error(model, batches, refs, PLAN), coded_error(model, batches, refs, reviewed)
    assert after[0] < before[0] and after[1] <= before[1]
    assert note.startswith("repair: plan reviewed") and "0.weight q3 -> q" in note


def test_review_leaves_a_plan_of_small_errors_alone():
    """No layer's relative output error above REVIEW_ERROR: the plan stays as allocated, with no note."""
    model, batches, refs = model_and_data()
    plan = {**PLAN, "0.weight": EncodeOptions(codec="jpeg", quality=90, tile=(16, 64))}
    errors = _Review(model, batches, refs, list(plan), None).layer_errors(plan)
    assert max(errors.values()) < REVIEW_ERROR
    assert review_plan(model, batches, refs, plan, list(plan)) == ({}, None)
