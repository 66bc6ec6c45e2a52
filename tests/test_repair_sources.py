"""What a calibrated save with repair holds of its inputs and of the original's outputs: a source that makes each
batch when asked (a sequence other than a list or tuple, as the command line's image folder and text file) is read
again by index rather than held; a list or a one-shot iterator is held as before; the original's whole outputs are
held only where training matches them (codec.rd.repair)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import pytest
import torch
from torch import nn

import codec
import codec.rd.output_sample as O
from codec.rd import repair as R
from codec.rd.repair import loop as repair_loop
from codec.rd.repair import losses as repair_losses
from codec.tensorcodec import EncodeOptions


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 128)
        self.b = nn.Linear(128, 128)
        self.c = nn.Linear(128, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


class Made(Sequence):
    """Batch ``i`` made anew each time it is asked for (the same values each time), every one made watched by a weak
    reference. ``broken``: ``__getitem__`` raises IndexError from that index on, whatever ``__len__`` says;
    ``nan``: that batch holds a NaN."""

    def __init__(self, n: int = 8, rows: int = 16, broken: int | None = None, nan: int | None = None):
        self.n, self.rows, self.broken, self.nan = n, rows, broken, nan
        self.reads = 0
        self.made: list[weakref.ref] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n or (self.broken is not None and i >= self.broken):
            raise IndexError(i)
        self.reads += 1
        x = torch.randn(self.rows, 16, generator=torch.Generator().manual_seed(i))
        if i == self.nan:
            x[0, 0] = float("nan")
        self.made.append(weakref.ref(x))
        return x

    def alive(self) -> int:
        return sum(r() is not None for r in self.made)


def _watch_alive(model: nn.Module, count) -> list[int]:
    """The value of ``count()`` at each forward call of ``model`` (and of its deep copies: the hook goes with them)."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(count()))
    return seen


def test_a_source_made_by_index_is_read_again_not_held(tmp_path):
    """Repair reads such a source's batches again for each pass (many more reads than batches) with at most a few
    alive at a time, and writes the same file as the same batches in a list (which it holds, as the user does)."""
    model, source = _net(), Made()
    alive = _watch_alive(model, source.alive)
    codec.save(model, tmp_path / "made.jwt", bits_per_weight=4, calibration=source)
    assert source.reads > 3 * len(source)
    assert alive and max(alive) <= 2, max(alive)  # the batch being run (and one being let go); all 8 when held
    listed = [source[i] for i in range(len(source))]
    codec.save(_net(), tmp_path / "list.jwt", bits_per_weight=4, calibration=listed)
    assert (tmp_path / "made.jwt").read_bytes() == (tmp_path / "list.jwt").read_bytes()


def test_a_one_shot_iterator_is_held_and_codes_as_the_list(tmp_path):
    """A generator cannot be read twice: its batches are held (as before) and give the list's file."""
    source = Made()
    codec.save(_net(), tmp_path / "gen.jwt", bits_per_weight=4, calibration=(source[i] for i in range(len(source))))
    codec.save(_net(), tmp_path / "list.jwt", bits_per_weight=4,
               calibration=[source[i] for i in range(len(source))])
    assert (tmp_path / "gen.jwt").read_bytes() == (tmp_path / "list.jwt").read_bytes()


def test_a_source_shorter_than_its_length_is_a_one_line_error(tmp_path):
    """A sequence whose ``__len__`` says 8 but has no batch 5: calibration's pass stops there (the sequence's own
    iteration), repair's read of batch 5 is a one-line ValueError naming it, never a silent shorter pass."""
    with pytest.raises(ValueError, match=r"^calibration batch 5: the inputs said they hold 8 batches, but there is "
                                         r"no batch 5 \(IndexError: 5\)$"):
        codec.save(_net(), tmp_path / "x.jwt", bits_per_weight=4, calibration=Made(broken=5))


@pytest.mark.parametrize("source, error, match", [
    (Made(n=0), ValueError, "inputs hold no batch"),
    (Made(nan=2), ValueError, r"^batch 2: holds NaN or Inf$"),
])
def test_hostile_sources_given_to_repair(source, error, match):
    model = _net()
    options = {name: EncodeOptions(codec="quant", bits=4) for name in ("a.weight", "b.weight", "c.weight")}
    with pytest.raises(error, match=match):
        R.repair(model, source, options)


class TinyLM(nn.Module):
    """Token ids -> embedding -> a mixing layer -> a Linear head over a wide vocabulary, its head's outputs watched."""

    def __init__(self, vocab: int = 400, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + torch.tanh(self.mix(h)))


def test_the_originals_whole_outputs_are_not_held_without_training(monkeypatch, tmp_path):
    """A wide output (sampled, WIDE_OUTPUT lowered to 64): repair holds no batch's whole logits beyond the two
    held-out batches' references and the run at hand (all 8 before, and 8 more while an embedding's rows were
    checked); the final note's output error is the one against the original's outputs, to every digit printed."""
    monkeypatch.setattr(O, "WIDE_OUTPUT", 64)
    torch.manual_seed(0)
    model = TinyLM().eval()
    batches = [torch.randint(0, 400, (8, 6), generator=torch.Generator().manual_seed(k)) for k in range(8)]
    whole: list[weakref.ref] = []  # every whole output repair's _outputs gives (what a reference holds)
    outputs = repair_losses._outputs

    def watched(*args, **kwargs):
        outs = outputs(*args, **kwargs)
        whole.extend(weakref.ref(t) for t in outs if t.shape[-1] == 400)
        return outs

    monkeypatch.setattr(repair_loop, "_outputs", watched)  # the references, an embedding's rows checked
    monkeypatch.setattr(repair_losses, "_outputs", watched)  # the final note's error against the original
    alive = _watch_alive(model, lambda: sum(r() is not None for r in whole))
    options = {"emb.weight": EncodeOptions(codec="quant", bits=3), "mix.weight": EncodeOptions(codec="quant", bits=3),
               "head.weight": EncodeOptions(codec="quant", bits=3)}
    result = R.repair(model, batches, options, keep_targets=False)
    assert max(alive) <= 3, max(alive)
    refs = [repair_losses._outputs(model, b) for b in batches]
    error = R.output_error(result.model, batches, refs)
    assert f"output error on the calibration inputs (relative MSE) {error:.4g};" in result.notes[0]


def test_training_keeps_the_whole_outputs_it_matches():
    """With distillation steps the references are held whole (the training matches them), as before."""
    model = _net()
    batches = [torch.randn(16, 16, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    options = {name: EncodeOptions(codec="quant", bits=4) for name in ("a.weight", "b.weight", "c.weight")}
    result = R.repair(model, batches, options, settings=R.RepairSettings(final_steps=2))
    assert "then 2 steps on the lossless ones" in result.notes[0]
