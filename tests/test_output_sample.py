"""A wide model output (a language model's logits) compared on a fixed, seeded sample of its last axis
(codec.rd.output_sample), in calibration's sensitivity pass and repair's held-out output error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec
import codec.rd.output_sample as O
from codec.rd import prefix
from codec.rd.calibrate import calibrate, call
from codec.rd.output_sample import OutputSample
from codec.rd.repair import loop as repair_loop
from codec.rd.repair import output_error
from codec.rd.repair.losses import _flat, _outputs


class TinyLM(nn.Module):
    """Token ids -> embedding -> two mixing layers -> a Linear head over the vocabulary. ``post``: "scaled" returns
    the logits times 2, "bias" plus a buffer of one bias per word (BART's ``final_logits_bias``), "capped" through
    ``tanh(logits / 3) * 3`` (tensors made from the head's output position by position), "softmax" their
    log-softmax (made from every position); ``labels`` given: the loss from the logits as a second output (the
    model reads its head's output itself)."""

    def __init__(self, vocab: int = 300, dim: int = 16, post: str | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, 32)
        self.out = nn.Linear(32, dim)
        self.head = nn.Linear(dim, vocab)
        self.post = post
        if post == "bias":
            self.register_buffer("word_bias", torch.linspace(-1, 1, vocab).unsqueeze(0))

    def forward(self, ids, labels=None):
        h = self.emb(ids)
        h = h + self.out(torch.tanh(self.mix(h)))
        logits = self.head(h)
        if self.post == "scaled":
            logits = logits * 2
        elif self.post == "bias":
            logits = logits + self.word_bias.to(logits.device)
        elif self.post == "capped":
            logits = torch.tanh(logits / 3) * 3
        elif self.post == "softmax":
            logits = F.log_softmax(logits, -1)
        if labels is not None:
            return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return logits


def _model(post=None, vocab=300) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab, post=post).eval()


def _ids(n=6, tokens=5, vocab=300, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, tokens), generator=torch.Generator().manual_seed(seed))


def test_the_columns_are_a_seeded_sorted_sample_and_an_output_no_wider_stays_whole():
    s = OutputSample(seed=3, limit=16)
    c = s.columns(300)
    assert c.shape == (16,) and bool((c[1:] > c[:-1]).all()) and 0 <= int(c[0]) and int(c[-1]) < 300
    assert torch.equal(OutputSample(seed=3, limit=16).columns(300), c)  # the same for the same seed and width
    assert not torch.equal(OutputSample(seed=4, limit=16).columns(300), c)
    assert s.columns(16) is None and s.columns(5) is None
    narrow = torch.randn(2, 5, 16)
    assert s.take(narrow) is narrow  # compared whole, not a copy
    wide = torch.randn(2, 5, 300)
    assert torch.equal(s.take(wide), wide[..., c])
    assert s.take(torch.tensor(1.5)).shape == ()
    with pytest.raises(ValueError, match="at least 1"):
        OutputSample(limit=0)


def test_a_linear_heads_output_is_narrowed_to_the_sampled_rows_and_its_forward_restored():
    model, ids = _model(), _ids()
    s = OutputSample(seed=0, limit=16)
    with torch.no_grad():
        with s.watch(model):
            full = model(ids)
        s.adopt([full])
        assert s.heads == ["head"]
        (ref,) = s.reference(model, ids, call, lambda t: [t], [full])
        assert ref.shape == (6, 5, 16)
        torch.testing.assert_close(ref, full[..., s.columns(300)], rtol=1e-6, atol=1e-6)
        with s.narrowed(model):
            assert model(ids).shape == (6, 5, 16)
        with s.narrowed(model, keep=model.head):  # the perturbed head itself runs whole
            assert model(ids).shape == (6, 5, 300)
        assert "forward" not in vars(model.head) and torch.equal(model(ids), full)


@pytest.mark.parametrize("post", ["scaled", "bias", "capped"])
def test_an_output_made_from_the_heads_position_by_position_is_narrowed_with_its_other_operands(post):
    """The head's output passed on through arithmetic with a scalar or a per-word tensor, or tanh: the narrowed run
    makes only the sampled columns, of the head and of the sums (the per-word tensor's sampled positions taken), the
    same values as the whole output's; the head's forward and the modes are gone afterwards."""
    model, ids = _model(post), _ids()
    s = OutputSample(seed=0, limit=16)
    widths = []
    handle = model.head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
    with torch.no_grad():
        with s.watch(model):
            full = model(ids)
        s.adopt([full])
        assert s.heads == s.followed == ["head"]
        (ref,) = s.reference(model, ids, call, lambda t: [t], [full])
        assert s.heads == ["head"]  # (the check passed)
        handle.remove()
        assert ref.shape == (6, 5, 16) and widths == [300, 16]
        assert torch.allclose(ref, full[..., s.columns(300)], rtol=1e-5, atol=1e-6)
        assert torch.equal(model(ids), full) and "forward" not in vars(model.head)
        assert not torch.overrides._is_torch_function_mode_enabled()


def test_an_output_made_from_every_position_of_the_heads_is_sampled_but_the_head_runs_whole():
    model, ids = _model("softmax"), _ids()
    s = OutputSample(seed=0, limit=16)
    with torch.no_grad():
        with s.watch(model):
            full = model(ids)
        s.adopt([full])
        assert s.heads == s.followed == []
        (ref,) = s.reference(model, ids, call, lambda t: [t], [full])
    assert torch.equal(ref, full[..., s.columns(300)])


def test_calibration_of_a_head_with_a_per_word_bias_after_it_runs_it_narrowed_to_the_same_sensitivities(monkeypatch):
    """BART's ``lm_head(h) + final_logits_bias``: the sensitivities with the narrowed head and sum are those of the
    whole output sampled (followed columnwise functions emptied: the head is then no head and runs whole)."""
    model = _model("bias")
    batches = [_ids(8, 6, seed=k) for k in range(3)]
    widths = []
    handle = model.head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
    try:
        narrowed = _sensitivities(model, batches, monkeypatch, 64)
        assert widths.count(64) > widths.count(300)
        widths.clear()
        monkeypatch.setattr(O, "COLUMNWISE", frozenset())
        whole = _sensitivities(model, batches, monkeypatch, 64)
        assert widths.count(64) == 0
    finally:
        handle.remove()
    assert narrowed.keys() == whole.keys()
    for name in whole:
        assert narrowed[name] == pytest.approx(whole[name], rel=1e-5), name


def test_a_model_that_reads_its_heads_output_itself_is_run_whole():
    """A loss computed inside the model from its logits and labels beyond the sample fails narrowed: the check
    drops the heads and the reference is the whole output sampled."""
    model, ids = _model(), _ids()
    batch = {"ids": ids, "labels": _ids(seed=2)}
    s = OutputSample(seed=0, limit=16)
    with torch.no_grad():
        with s.watch(model):
            full = call(model, batch)
        s.adopt([full[0]])
        assert s.heads == ["head"]
        (ref,) = s.reference(model, batch, call, lambda out: [out[0]], [full[0]])
    assert s.heads == [] and torch.equal(ref, full[0][..., s.columns(300)])
    assert "forward" not in vars(model.head)


def _sensitivities(model, batches, monkeypatch, limit) -> dict[str, float]:
    monkeypatch.setattr(O, "WIDE_OUTPUT", limit)
    return {n: s.sensitivity for n, s in calibrate(model, batches).layers.items()}


def test_calibration_compares_an_output_whole_up_to_the_limit_and_sampled_beyond(monkeypatch):
    """The same sensitivities to the bit while the vocabulary is no wider than the limit; beyond it, the same for
    the same seed, within 10 % of the whole output's (this model), and the head runs narrowed in the perturbed
    passes of every other layer."""
    model = _model()
    batches = [_ids(8, 6, seed=k) for k in range(4)]
    whole = _sensitivities(model, batches, monkeypatch, 10 ** 9)
    assert _sensitivities(model, batches, monkeypatch, 300) == whole  # 300 wide: not wider than the limit
    widths = []
    handle = model.head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
    try:  # every pass whole (no module given back, codec.rd.prefix): the counts below are the narrowing's alone (the
        with monkeypatch.context() as patch:  # prefix runs each shortened pass of the first batch whole too, to check)
            patch.setattr(prefix.Prefix, "before", lambda self, layer: [])
            sampled = _sensitivities(model, batches, monkeypatch, 64)
    finally:
        handle.remove()
    assert _sensitivities(model, batches, monkeypatch, 64) == sampled  # (with the prefix: the same figures)
    assert sampled != whole
    for name in whole:
        assert sampled[name] == pytest.approx(whole[name], rel=0.1), name
    # per batch: the clean run and the head's own perturbed run whole, the reference and the other layers' narrowed
    others = len(whole) - 1
    assert widths.count(300) == 2 * len(batches) and widths.count(64) == len(batches) * (1 + others)


def _refs(model, batches, sample):
    with torch.no_grad():
        refs = [_outputs(model, b, sample if i == 0 else None) for i, b in enumerate(batches)]
        return [sample.reference(model, b, call, _flat, r) for b, r in zip(batches, refs)], refs


def test_repairs_output_error_on_a_sample_equals_the_whole_one_up_to_the_limit():
    model, coded = _model(), _model()
    with torch.no_grad():
        coded.mix.weight.add_(0.05 * torch.randn(coded.mix.weight.shape, generator=torch.Generator().manual_seed(5)))
    batches = [_ids(8, 6, seed=k) for k in range(3)]
    sampled_refs, refs = _refs(model, batches, OutputSample(limit=300))
    whole = output_error(coded, batches, refs)
    assert output_error(coded, batches, sampled_refs, OutputSample(limit=300)) == whole
    sample = OutputSample(limit=64)
    sampled_refs, _ = _refs(model, batches, sample)
    assert sample.heads == ["head"]
    first = output_error(coded, batches, sampled_refs, sample)
    assert first == output_error(coded, batches, sampled_refs, sample) != whole
    assert first == pytest.approx(whole, rel=0.1)


def test_a_calibrated_save_of_a_wide_head_runs_it_narrowed_and_codes_as_well(monkeypatch, tmp_path):
    """codec.save with calibration and repair: the head makes its whole output far less often with a sample, and
    the coded model's output error on other inputs is within 10 % of the one without it."""
    vocab = 400
    model = _model(vocab=vocab)
    ids = _ids(64, 6, vocab=vocab, seed=7)
    held = _ids(32, 6, vocab=vocab, seed=8)
    results = {}
    monkeypatch.setattr(repair_loop, "RESPEND_FROM", float("inf"))  # the runs of one coding are counted, no second
    for limit in (10 ** 9, 64):
        monkeypatch.setattr(O, "WIDE_OUTPUT", limit)
        widths = []
        handle = model.head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
        try:
            path = tmp_path / f"m{limit}.jwt"
            codec.save(model, path, bits_per_weight=5, calibration=ids.split(8))
        finally:
            handle.remove()
        coded = _model(vocab=vocab)
        coded.load_state_dict(codec.load(path))
        with torch.no_grad():
            ref, out = model(held), coded(held)
        results[limit] = (widths.count(vocab), widths.count(64), float(((out - ref) ** 2).mean() / (ref ** 2).mean()))
    (full_whole, _, err_whole), (full_sampled, narrowed, err_sampled) = results[10 ** 9], results[64]
    # whole still: calibration's clean runs and the head's own perturbed ones, repair's references, its forward
    # order, its final output error and its check that a coded embedding's looked-up rows give the same outputs.
    # (Repair's collect passes end at their layer, codec.rd.repair._Inputs: the head no longer runs in the passes
    # of the layers before it, sampled or not: 87 whole runs without the sample, 57 whole and 41 narrowed with it;
    # 103 / 57 / 57 when every pass ran whole.)
    assert narrowed > full_whole / 3 and full_sampled < 0.7 * full_whole
    assert err_sampled < 1.1 * err_whole
    assert np.isfinite(err_sampled)
