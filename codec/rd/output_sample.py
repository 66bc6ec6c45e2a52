"""A wide model output (a language model's logits over its vocabulary) compared on a fixed, seeded sample of its
last axis.

Calibration's sensitivity pass (:func:`codec.rd.calibrate.calibrate`) runs the model once more per layer and batch
and compares its output with the clean one; repair (:mod:`codec.rd.repair`) runs it twice per layer and batch to
collect the layer's inputs and three times per layer and held-out batch to judge a refit by the model's output
error. With a language model's head that output is ``(batch, tokens, vocabulary)``: on a 2+2 x 64 T5 with a
30,522-word vocabulary (2 M weights) the head's product, the float64 copies that compared the logits and the relative
MSE of the whole logits were most of a 110-CPU-second calibrated save (data-free: 1 s).

:class:`OutputSample` compares an output whose last axis is wider than :data:`WIDE_OUTPUT` on :data:`WIDE_OUTPUT`
positions of it, the same for every batch, layer and run with the same seed and width: ``torch.randperm(width)`` from
a CPU generator seeded by ``seed``, its first :data:`WIDE_OUTPUT` entries, sorted (a relative error is a ratio of
sums over the positions, estimated from 4096 of them per token). An output no wider is compared whole (:meth:`take`
gives it back as it is), so a model without a wide output computes exactly what it did before.

Where such an output is the very tensor a ``torch.nn.Linear`` head returned (checked by identity on a clean run:
the model does nothing to it after the head, as T5's, GPT-2's and BERT's language-model heads), the head computes
only the sampled rows of its weight while the comparisons run (:meth:`narrowed`: its ``forward`` replaced for the
duration, restored after), so the model never makes the other columns: the same values as the whole output's
sampled columns (a narrowed run is checked once against them, and narrowing given up where it fails or differs).
Repair's collection runs narrowed too: it needs the layers' inputs, not the output.

A head whose output the model passes on through functions that act on each position of the last axis alone
(:data:`COLUMNWISE`: arithmetic with a tensor of that width or broadcast over it, ``tanh``, a dtype cast) before it
returns it is a head too: BART's ``lm_head(h) + final_logits_bias``, a soft cap ``tanh(logits / c) * c``. The clean run
follows the head's output through them (:class:`_Follow`, a torch function mode); a narrowed run takes the same
positions of the other operands that span the whole width (:class:`_Narrow`), so the model makes only the sampled
columns of those sums too. Without it a 2+2 x 64 BART with a 30,522-word vocabulary (2.14 M weights) made its whole
logits and the bias sum in every pass: its calibrated save took 76-82 CPU seconds, 39-40 narrowed, the same bytes
(bench/JOURNAL.md, bart (thirtieth pass)). The first narrowed run is checked against the sampled whole one as before.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["OutputSample", "WIDE_OUTPUT"]

#: A model output whose last axis is wider than this is compared on this many positions of it (sampled).
WIDE_OUTPUT = 4096


_T = torch.Tensor
#: Functions that act on each position of the last axis alone, whose tensor arguments broadcast against each other:
#: a head's output passed through them is still a head's output, narrowed by taking the sampled positions of the
#: other arguments that span the head's whole width.
COLUMNWISE = frozenset({
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.tanh, torch.neg,
    _T.add, _T.sub, _T.mul, _T.div, _T.true_divide, _T.tanh, _T.neg, _T.add_, _T.sub_, _T.mul_, _T.div_, _T.tanh_,
    _T.__add__, _T.__radd__, _T.__iadd__, _T.__sub__, _T.__rsub__, _T.__isub__, _T.__mul__, _T.__rmul__,
    _T.__imul__, _T.__truediv__, _T.__rtruediv__, _T.__itruediv__, _T.__neg__,
})
#: Casts of their first argument (its dtype, device or memory layout; the values of each position kept).
CASTS = frozenset({_T.to, _T.float, _T.double, _T.half, _T.bfloat16, _T.contiguous, _T.type_as, _T.clone})


def _tensors(args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    """The tensor arguments of a call (a columnwise function's operands, by position or keyword)."""
    return [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]


class _Tracked:
    """Tensors (by identity, held weakly) that are a head's output or made from it by :data:`COLUMNWISE` /
    :data:`CASTS` functions, each with its head's name."""

    def __init__(self):
        self._by_id: dict[int, tuple[weakref.ref, str]] = {}

    def add(self, tensor: torch.Tensor, name: str) -> None:
        self._by_id[id(tensor)] = (weakref.ref(tensor), name)

    def name(self, tensor: object) -> str | None:
        got = self._by_id.get(id(tensor))
        return got[1] if got is not None and got[0]() is tensor else None

    def source(self, func, args: tuple, kwargs: dict | None) -> str | None:
        """The head of the tracked tensor a columnwise function or cast reads, or None."""
        if func in CASTS:
            return self.name(args[0]) if args else None
        if func in COLUMNWISE:
            return next((n for n in map(self.name, _tensors(args, kwargs)) if n is not None), None)
        return None


class _Follow(torch.overrides.TorchFunctionMode):
    """Around a clean run: the tensors made from the watched heads' outputs by columnwise functions and casts."""

    def __init__(self, tracked: _Tracked):
        super().__init__()
        self.tracked = tracked

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            name = self.tracked.source(func, args, kwargs)
            if name is not None:
                self.tracked.add(out, name)
        return out


class _Narrow(torch.overrides.TorchFunctionMode):
    """Around a narrowed run: a columnwise function of a narrowed head's output (or of a tensor made from it) takes
    the sampled positions ``picked[width]`` of its other tensor arguments whose last axis is the head's whole
    ``width``; its result is followed in turn."""

    def __init__(self, tracked: _Tracked, picked: dict[str, torch.Tensor], widths: dict[str, int]):
        super().__init__()
        self.tracked, self.picked, self.widths = tracked, picked, widths

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.tracked.source(func, args, kwargs)
        if name is not None and func in COLUMNWISE:
            width, picked = self.widths[name], self.picked[name]

            def narrow(a):
                if isinstance(a, torch.Tensor) and a.dim() and a.shape[-1] == width and self.tracked.name(a) is None:
                    return a.index_select(-1, picked.to(a.device))
                return a

            args = tuple(narrow(a) for a in args)
            kwargs = {k: narrow(v) for k, v in (kwargs or {}).items()}
        out = func(*args, **(kwargs or {}))
        if name is not None and isinstance(out, torch.Tensor):
            self.tracked.add(out, name)
        return out


def _narrowable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (its own ``forward``, not replaced on the instance)."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and "forward" not in vars(module) and module.weight.dim() == 2)


class OutputSample:
    """The positions of a wide output's last axis that comparisons use, and the heads that compute only them (see
    the module docstring). ``seed``: of the positions drawn; ``limit``: :data:`WIDE_OUTPUT` (read when made)."""

    def __init__(self, seed: int = 0, limit: int | None = None):
        limit = WIDE_OUTPUT if limit is None else limit
        if limit < 1:
            raise ValueError(f"OutputSample limit must be at least 1, got {limit}")
        self.seed, self.limit = int(seed), int(limit)
        self.heads: list[str] = []  # names of the modules whose output is a compared output (narrowed runs)
        self._columns: dict[tuple[int, str], torch.Tensor] = {}
        self._seen: dict[str, weakref.ref] = {}  # wide Linear layer -> its output in the watched run (weakly)
        self._followed: _Tracked | None = None  # tensors made from those outputs columnwise (the watched run)
        self.followed: list[str] = []  # the heads of :attr:`heads` whose output the model passes on columnwise
        self._checked = False

    def columns(self, width: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The sorted positions compared of an axis of ``width`` (on ``device``); None where it is compared whole."""
        if width <= self.limit:
            return None
        key = (int(width), str(device or "cpu"))
        if key not in self._columns:
            gen = torch.Generator().manual_seed(self.seed)
            picked = torch.randperm(int(width), generator=gen)[: self.limit].sort().values
            self._columns[key] = picked.to(device or "cpu")
        return self._columns[key]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s sampled positions of its last axis (a new tensor), or ``tensor`` itself where that axis is no
        wider than :attr:`limit` (a narrowed head's output, or any output not wide)."""
        if tensor.dim() == 0:
            return tensor
        picked = self.columns(tensor.shape[-1], tensor.device)
        return tensor if picked is None else tensor.index_select(-1, picked)

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        """Around one clean run of ``model``: remembers (weakly) the output of each of its plain Linear layers wider
        than :attr:`limit`, and the tensors the run makes from them by :data:`COLUMNWISE` functions and
        :data:`CASTS` (:class:`_Follow`: only where there is such a layer), for :meth:`adopt`."""
        self._seen, self._followed = {}, _Tracked()
        handles = []
        for name, module in model.named_modules():
            if _narrowable(module) and module.out_features > self.limit:
                def hook(mod, args, out, name=name):
                    if isinstance(out, torch.Tensor):
                        self._seen[name] = weakref.ref(out)
                        self._followed.add(out, name)
                handles.append(module.register_forward_hook(hook))
        try:
            with _Follow(self._followed) if handles else contextlib.nullcontext():
                yield
        finally:
            for h in handles:
                h.remove()

    def adopt(self, outputs: list[torch.Tensor]) -> None:
        """After :meth:`watch`: the wide Linear layers whose output tensor is one of ``outputs`` (the ones compared)
        become the heads narrowed runs narrow, and those whose output one of ``outputs`` was made from columnwise
        (:attr:`followed`) heads too."""
        seen, self._seen = self._seen, {}
        followed, self._followed = self._followed, None
        direct = {name for name, ref in seen.items() if any(ref() is t for t in outputs)}
        passed = {followed.name(t) for t in outputs} - {None} - direct if followed is not None else set()
        self.heads, self.followed = sorted(direct | passed), sorted(passed)
        self._checked = False

    @contextlib.contextmanager
    def narrowed(self, *models: nn.Module, keep: nn.Module | None = None) -> Iterator[None]:
        """Within: each head of :attr:`heads` in ``models`` (by name) but ``keep`` computes only the sampled rows of
        its weight (and bias); their ``forward`` is restored on leaving. Where a head of :attr:`followed` is narrowed,
        the columnwise functions of its output take the sampled positions of their other operands (:class:`_Narrow`,
        active for the whole run)."""
        patched = []
        tracked, picks, widths = _Tracked(), {}, {}
        try:
            for model in models:
                for name in self.heads:
                    module = _submodule(model, name)
                    if module is None or module is keep or not _narrowable(module):
                        continue
                    picked = self.columns(module.out_features, module.weight.device)
                    if picked is None:
                        continue

                    def forward(x, module=module, picked=picked, name=name):
                        bias = None if module.bias is None else module.bias.index_select(0, picked)
                        out = F.linear(x, module.weight.index_select(0, picked), bias)
                        tracked.add(out, name)
                        return out

                    module.forward = forward
                    patched.append(module)
                    if name in self.followed:
                        picks[name], widths[name] = picked, module.out_features
            # (only where the model passes a head's output on: a head whose output is the model's runs as before)
            with _Narrow(tracked, picks, widths) if picks else contextlib.nullcontext():
                yield
        finally:
            for module in patched:
                del module.forward

    def reference(self, model: nn.Module, batch, run: Callable, tensors: Callable, full: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
        """The compared outputs of ``model`` on ``batch``, sampled: a narrowed run's (``run(model, batch)``, its
        compared tensors listed by ``tensors(out)``), or ``full``'s (the same run's whole outputs) sampled.

        The first call checks the narrowed run against ``full``: the same shapes once sampled and the same values
        within float32 rounding; where it raises, or differs, the heads are dropped (no narrowing from then on)."""
        sampled_full = [self.take(t) for t in full]
        if not self.heads:
            return sampled_full
        try:
            with self.narrowed(model):
                got = [self.take(t) for t in tensors(run(model, batch))]
        except Exception:  # noqa: BLE001 -- a model that reads its head's output itself: compared whole, sampled
            self.heads = []
            return sampled_full
        if not self._checked:
            same = len(got) == len(sampled_full) and all(
                g.shape == s.shape and bool(torch.allclose(g.double(), s.double(), rtol=1e-4, atol=1e-6 * (
                    float(s.abs().max()) if s.numel() else 0.0)))
                for g, s in zip(got, sampled_full))
            if not same:
                self.heads = []
                return sampled_full
            self._checked = True
        return got


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
