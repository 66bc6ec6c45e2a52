"""Calibration inputs and forward hooks: the batches checked and cast (:func:`_check_inputs`, :func:`_checked`,
:class:`_Reread` for a source that makes each batch when asked), the order a forward pass calls the modules in
(:func:`forward_order`, :func:`_forward_calls`), and how a layer's inputs are read on a batch (:class:`_Inputs`,
a pass ended at the layer by :class:`_Stop`).

Imports nothing of the package; :mod:`.fit` (collecting a layer's statistics), :mod:`.budget`
(:func:`moved_growth`) and :mod:`.loop` use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ...errors import first_line
from ..calibrate import call as _run
from ..calibrate import pass_ended


def _check_inputs(inputs: Iterable, model: nn.Module | None = None) -> Sequence:
    """The calibration batches as a sequence; ValueError/TypeError on one line for what cannot be used. Given
    ``model``, floating inputs of another dtype are cast to its parameters' (float32 images for a float16 or
    bfloat16 model, as calibration does).

    A sequence other than a list or tuple (one that makes each batch when asked for it: the command line's image
    folder and text file, :class:`codec.rd.calibrate._InputsAt`) is not held: :class:`_Reread` reads a batch from it
    each time one is used, checking it then (1,000 RGB 224 x 224 images are 602 MB as float32). Anything else (a
    list, a DataLoader, a one-shot iterator) is read into a list once and checked now, as the user's memory or a
    source that may not give the same batches twice."""
    if isinstance(inputs, (torch.Tensor, Mapping)) or not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be an iterable of batches (tensors or dicts of tensors), "
                        f"not {type(inputs).__name__}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None) if model is not None else None
    if isinstance(inputs, Sequence) and not isinstance(inputs, (list, tuple, str, bytes)):
        if not len(inputs):
            raise ValueError("inputs hold no batch: repair needs calibration inputs")
        return _Reread(inputs, dtype, range(len(inputs)))
    batches = list(inputs)
    if not batches:
        raise ValueError("inputs hold no batch: repair needs calibration inputs")
    return [_checked(batch, i, dtype) for i, batch in enumerate(batches)]


def _checked(batch, index: int, dtype: torch.dtype | None):
    """Calibration batch ``index`` checked (tensors, or a mapping of them, with no NaN or Inf: a one-line
    TypeError / ValueError naming it), its floating tensors cast to ``dtype`` (None: as they are)."""
    items = batch.items() if isinstance(batch, Mapping) else [("", batch)]
    for key, value in items:
        where = f"batch {index}" + (f" [{key!r}]" if key else "")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: not a tensor but {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: holds NaN or Inf")
    if dtype is None:
        return batch

    def cast(value: torch.Tensor) -> torch.Tensor:
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value

    return {k: cast(v) for k, v in batch.items()} if isinstance(batch, Mapping) else cast(batch)


class _Reread(Sequence):
    """Batches ``indices`` of a sequence that makes each batch when asked (:func:`_check_inputs`), read from it
    again each time one is used (:func:`_checked`), never held: repair's passes over the batches (two or three per
    layer) decode a folder's images again each time, at the cost of that decoding (measured in bench/JOURNAL.md,
    "mem (twenty-first pass)")."""

    def __init__(self, source: Sequence, dtype: torch.dtype | None, indices: range):
        self.source, self.dtype, self.indices = source, dtype, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _Reread(self.source, self.dtype, self.indices[index])
        k = self.indices[index]
        try:
            batch = self.source[k]
        except IndexError as exc:  # (else a pass over the batches would end there, silently short)
            raise ValueError(f"calibration batch {k}: the inputs said they hold {len(self.source)} batches, but "
                             f"there is no batch {k} ({type(exc).__name__}: {first_line(exc)})") from None
        return _checked(batch, k, self.dtype)


def forward_order(model: nn.Module, batch) -> list[nn.Module]:
    """The modules of ``model`` in the order one forward pass on ``batch`` first calls them."""
    return _forward_calls(model, batch)[0]


def _forward_calls(model: nn.Module, batch, watched: Iterable[nn.Module] = ()
                   ) -> tuple[list[nn.Module], set[int], dict[int, int]]:
    """One forward pass of ``model`` on ``batch``: ``(order, once, shares)``. ``order`` as :func:`forward_order`;
    ``once``: the ids of the ``watched`` modules called exactly once, with a first argument that nothing changed in
    place later in the pass (its ``_version`` at the end of the pass is the one it had at the call): what the pass
    does after their call cannot change the inputs they were given (:class:`_Inputs`). ``shares``: for such a
    module whose first argument is the very tensor (same object, same version) an earlier one of ``once`` was given,
    its id -> that earlier module's id (the query, key and value projections of one attention). The watched modules'
    inputs are held until the pass ends (to read their versions then): one batch's, a few MB a layer."""
    order: list[nn.Module] = []
    seen: set[int] = set()
    watch = {id(m) for m in watched}
    calls: dict[int, int] = {}
    given: dict[int, tuple[torch.Tensor, int]] = {}
    shares: dict[int, int] = {}

    def hook(module, args):
        key = id(module)
        if key not in seen:
            seen.add(key)
            order.append(module)
        if key in watch and not isinstance(module, nn.Bilinear):  # (two inputs: a group of its own)
            calls[key] = calls.get(key, 0) + 1
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and calls[key] == 1:
                first = next((k for k, (t, v) in given.items() if t is x and v == x._version), None)
                if first is not None:
                    shares[key] = first
                given[key] = (x, x._version)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    once = {k for k, n in calls.items() if n == 1 and k in given and given[k][0]._version == given[k][1]}
    shares = {k: v for k, v in shares.items() if k in once and v in once}
    return order, once, shares


class _Stop(BaseException):
    """Raised by a hook of :class:`_Inputs` to end a forward pass once the layer's inputs are seen (a BaseException:
    a model's own ``except Exception`` does not take it)."""


class _Inputs:
    """How :meth:`_LayerFit.collect` gets a layer's inputs on a batch: a forward pass of the working model (and of
    the original) that ends at the layer when nothing after it could change them, and the inputs a layer given the
    same tensor took before it (its group: one attention's query, key and value projections) taken again instead
    of running the models once more.

    A pass ends at the layer (``stop``) where :func:`_forward_calls` found it called once per pass with an input
    nothing changes in place after its call, and only while the working model is in eval mode (in training mode
    dropout would draw fewer random numbers in an ended pass than in a whole one): the rest of the pass computes
    nothing the layer's inputs depend on. The inputs of a layer of a group (``held``, kept by batch index) are
    those of the group's first layer: the very tensor each pass gives them was made before the first of them ran,
    so coding the group's earlier layers does not change it (only without distillation steps between layers). The
    same inputs, the same sums, the same bits: all-MiniLM-L6-v2's calibrated file keeps its md5, and the repair of a
    BERT-base block its targets and blobs (bench/JOURNAL.md, big, twenty-third pass); one block of the base: 36 %
    less CPU."""

    def __init__(self, stop: bool = False, held: dict | None = None):
        self.stop = stop
        #: batch index -> {"x": original's inputs, "h": working model's}, for the layers of one group (None: none kept)
        self.held = held

    def run(self, model: nn.Module, batch, key: str, k: int, seen: dict) -> None:
        """Put the layer's inputs on batch ``k`` in ``seen[key]`` ("x" the original's, "h" the working model's)."""
        kept = None if self.held is None else self.held.get(k, {}).get(key)
        if kept is not None:
            seen[key] = list(kept)
            return
        try:
            _run(model, batch)
        except _Stop:
            pass
        finally:
            pass_ended(model)  # (a pass ended at the layer: the buffers it changed given back, kept_buffers)
        if self.held is not None and key in seen:
            self.held.setdefault(k, {})[key] = list(seen[key])
