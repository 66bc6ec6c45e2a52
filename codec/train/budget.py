"""A file-size budget in the training loop: :func:`codec.train.finetune` with ``budget=`` picks the JPEG quality of
one tensor (by default the largest JPEG-coded one) on the fine ladder (:mod:`codec.rd.ladder`: steps of about 3 %
of the table's scale) so that the whole file, counted as ``codec.save`` writes it, stays just within
``bits_per_weight``; the model trains against that quality, and the last coding is the file.

Why: at one fixed quality the files of five seeds of the bench CNN spread over 0.240-0.281 bits/weight, as wide as a
quality step, so a fixed quality that keeps every file within 0.3 leaves most files a step below the budget
(bench/JOURNAL.md, twelfth pass). With the budget in the loop each file spends its own budget.

How (:class:`Budget`): at the first step of the first call, a bisection over the ladder for the highest step whose
file fits ``bits_per_weight * (1 - margin)``; then at intervals (``every`` steps, or by default an interval chosen
from the measured costs, below), at a coding step, the file is measured at the current step and at the next finer
ones, and the quality moves by a bounded step (one down if the file is over the target, up to two up while the
finer steps still fit); over the call's last ``hold`` fraction of steps the quality is held, so the network's last steps
train against the file's quality. After the last step the file is measured once more: if it is
over ``bits_per_weight`` itself (the weights moved during the hold), the quality steps down until it fits
(:attr:`Budget.stepped_down` counts those steps; the file then codes the float weights at a quality the network did
not train against last). Measuring a size is one ``codec.save`` of the model into memory (20 ms on the bench CNN).

The default interval (``every=None``) follows what a measurement costs against a training step: the loop times its
steps and the measurements (CPU seconds, :func:`time.process_time`) and measures at the coding steps, every
``refresh * 2**k`` steps with the smallest ``k`` for which measuring takes at most :data:`SHARE` (10 %) of the loop's
time (a measurement counted as two ``codec.save``, a step and a save at their mean CPU times so far), re-chosen at
each coding step; the last coding step before the hold is measured too (unless the one before it was), so that the
held quality is chosen on recent weights, and the file after the last step always is (``finish``). A
model whose steps are costly next to a ``codec.save`` (the bench CNN) is measured at every coding, as before; one
whose steps are cheap (the bench MLP: a save costs 1-2 of its loop steps) less often (every 32 steps), where
measuring at every coding cost 1.55x the fixed-quality loop's time (1.10x now: bench/JOURNAL.md, nineteenth
pass). The interval depends on the machine's timings, so two runs can measure at different steps; ``every=N`` gives
a fixed interval (and reproducible files).

A budget below the file the loop starts from (a fresh model's file at the coarsest quality is far larger than a
trained one's: the bench MLP's random init at q1 is 0.63 bits/weight) does not stop training: the loop starts at the
setting's quality (``start="setting"``, the default) or at the coarsest one (``start="coarsest"``) and the same
measurements step the quality down one rung at a time while the file is over the target, and up again once training
has made it small enough. If the file is still over the budget after the last step (at the coarsest quality),
:attr:`Budget.within` is False and :meth:`Budget.save` refuses, naming the size reached and the smallest budget that
fits (:attr:`Budget.smallest`).

Sizes are counted as ``codec.save`` writes them: a tensor tied to another (GPT-2's ``lm_head.weight`` and ``wte``,
``model.tie_weights()``) is stored once, so its values count once in the weights, and the budget's tensor is the one
the file codes (a tied name given as ``tensor`` means the tensor it is tied to).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Mapping

import torch

from ..tensorcodec import EncodeOptions, Overrides, parse_spec

__all__ = ["Budget", "BudgetDamageWarning"]

#: The most ladder steps a measurement moves the quality up (down: one): the file of a model trained with the codec
#: in the loop shrinks fast at first (the bench CNN's halves over its one-epoch loop), and the quality follows it.
CLIMB = 2

#: Where a budget below the loop's first file starts: the setting's quality, or the ladder's coarsest.
STARTS = ("setting", "coarsest")

#: After the last step, the file steps down one rung at a time this many times; still over, it jumps: the coarsest
#: rung measured, then a bisection between it and the current one (a file far over costs a few measurements, not one
#: per rung of the 242).
LINEAR_STEPS = 2

#: With ``every=None`` the interval is chosen so that measuring takes at most this share of the loop's time (steps
#: and measurements, as :func:`time.process_time` counts them), a measurement counted as two ``codec.save``: on the
#: bench MLP a save costs 1-2 of its loop steps (8-11 ms against 5-7.5 ms: every 32 steps), on the bench CNN a
#: fraction of one (12 ms against 77-85 ms: every coding).
SHARE = 0.1

#: A budget not met names this many of the largest tensors it does not move (:meth:`Budget.save`'s refusal).
HOLDERS = 3


def _clock() -> float:
    """The clock the default interval is timed with: this process's CPU seconds (every thread: the encoder's too)."""
    return time.process_time()


def _escape(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _spec_at(scale: int, base: EncodeOptions) -> str:
    """A quality item (``q7``, ``q6.82``) whose table scale is exactly ``scale`` percent (checked by parsing)."""
    from ..blobcodecs.jpeg import quality_at_scale, quality_scale
    from ..rd.ladder import scale_of

    q = quality_at_scale(scale)
    if quality_scale(q) == scale:
        return f"q{q}"
    value = 5000 / scale if scale >= 100 else (200 - scale) / 2
    for digits in range(2, 10):
        text = f"q{value:.{digits}f}".rstrip("0").rstrip(".")
        if scale_of(parse_spec(f"jpeg,{text}", base)) == scale:
            return text
    raise ValueError(f"budget: no quality text gives table scale {scale}")  # not reached on the ladder's scales


class Budget:
    """A whole-file size budget for :func:`codec.train.finetune` (``budget=Budget(0.3)`` or ``budget=0.3``).

    ``bits_per_weight``: the most the file may take, in bits per value of the model's state_dict (every tensor's
    blob and the container, as ``codec.save`` writes it). ``tensor``: the name of the tensor whose JPEG quality
    moves (default: the largest one the setting and overrides code as JPEG); the others keep their settings.
    ``margin``: the loop aims at ``bits_per_weight * (1 - margin)``, so that the weights' moves during the hold
    rarely take the file over. ``every``: measure the file every this many steps (rounded up to a multiple of
    ``refresh``); None (default): an interval of ``refresh`` times a power of two chosen from the timed costs so that
    measuring takes at most :data:`SHARE` of the loop's time, and the last coding step before the hold measured
    too (the module's docstring). ``hold``: the fraction of each call's last steps
    with the quality held. ``start``: where the loop starts when even the coarsest quality's file is over the budget
    on the weights it starts from (a fresh model): ``"setting"`` (default) at the quality the setting and overrides
    give the tensor, ``"coarsest"`` at the ladder's coarsest rung; either way the quality then steps down one rung per
    measurement while the file is over the target and climbs once it fits. (When a quality fits at the start, it
    is searched as before and ``start`` does not matter.)

    After finetune: :attr:`overrides` (the ``(glob, setting)`` rules to save with: the caller's with the tensor's
    quality appended), :attr:`quality` (its text, ``q6.82``), :attr:`bits` (the file's bits/weight, measured after
    the last step), :attr:`within` (``bits <= bits_per_weight``), :attr:`smallest` (when not within: the file's
    bits/weight at the coarsest quality, the smallest budget that fits this model now), :attr:`holders` (then: the
    other tensors' ``(name, bytes, coding)`` in that file, largest first), :attr:`history` (``(step, quality,
    bits/weight)`` of every measurement: the quality after it, the size measured at the quality before it),
    :attr:`stepped_down`, :attr:`interval` (the last interval between measurements used, in steps);
    :meth:`save` writes the file (and refuses one over the budget). Pass the same Budget to
    several finetune calls (a loop of epochs) to continue from its quality."""

    def __init__(self, bits_per_weight: float, tensor: str | None = None, margin: float = 0.005,
                 every: int | None = None, hold: float = 0.25, start: str = "setting"):
        if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, (int, float)) or not (
                0 < bits_per_weight < 64 and math.isfinite(bits_per_weight)):
            raise ValueError(f"budget: bits_per_weight must be a number above 0 and below 64, not {bits_per_weight!r}")
        if tensor is not None and not isinstance(tensor, str):
            raise TypeError(f"budget: tensor must be a tensor name or None, not {type(tensor).__name__}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 0.5:
            raise ValueError(f"budget: margin must be a number from 0 to below 0.5, not {margin!r}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"budget: every must be None or a positive integer, not {every!r}")
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= 1:
            raise ValueError(f"budget: hold must be a number from 0 to 1, not {hold!r}")
        if start not in STARTS:
            raise ValueError(f"budget: start must be one of {', '.join(map(repr, STARTS))}, not {start!r}")
        self.bits_per_weight, self.tensor, self.margin = float(bits_per_weight), tensor, float(margin)
        self.every, self.hold, self.start_at = every, float(hold), start
        self.smallest: float | None = None
        self.holders: list[tuple[str, int, str]] = []  # when over at the coarsest: (name, bytes, coding), largest first
        self.overrides: list[tuple[str, str]] | None = None
        self.quality: str | None = None
        self.bits: float | None = None
        self.history: list[tuple[int, str, float]] = []
        self.stepped_down = 0
        #: After the last finetune step: the file's bits/weight against the budget, the tensor's quality and its
        #: relative error there against the trained weights (one line; also given as a warning when the first
        #: measurement warned of damage or the file is over the budget).
        self.report: str | None = None
        self._warned = False  # the first measurement warned that the coarsest quality destroys the tensor
        self._index: int | None = None  # the current step on the ladder (an index into its scales, coarse first)
        self._opts: EncodeOptions | None = None
        self._base: list[tuple[str, str]] = []
        self._steps = 0  # steps of earlier calls (the history's step numbers run on)
        self.interval: int | None = None
        self._last = 0  # the step (of this call) of the last measurement
        self._seconds = {"step": 0.0, "measure": 0.0}  # CPU seconds of the steps and codec.save so far (all calls)
        self._counts = {"step": 0, "measure": 0}
        self._tic = 0.0

    def __repr__(self) -> str:
        return (f"Budget({self.bits_per_weight:g} bits/weight, tensor={self.tensor!r}, quality={self.quality}, "
                f"bits={self.bits})")

    @property
    def within(self) -> bool:
        """True if the file measured after the last finetune step fits the budget (False before any finetune)."""
        return self.bits is not None and self.bits <= self.bits_per_weight

    @property
    def target(self) -> float:
        """The bits/weight the loop aims at: ``bits_per_weight * (1 - margin)``."""
        return self.bits_per_weight * (1 - self.margin)

    # -- used by finetune ------------------------------------------------------------------------------------

    def start(self, model: torch.nn.Module, opts: EncodeOptions, rules: Overrides,
              vector_bits: int | None) -> Overrides:
        """Resolve the tensor, and on the first call search the ladder for the highest step that fits (when not even
        the coarsest step's file fits: start at the setting's step or the coarsest, as ``start`` says); the rules
        to code with. ValueError (one line) if no JPEG tensor."""
        from ..api import _sharing
        from ..rd.ladder import scale_of, scales

        from .finetune import _coded_as

        state = model.state_dict()
        self._opts, self._vector_bits, self._last = opts, vector_bits, 0
        if self._index is None:
            self._base = list(rules.rules)
            aliases = _sharing(state)[0]  # a tied name is stored once, as the tensor it is tied to
            jpeg = {n: t.numel() for n, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
                    and n not in aliases and _coded_as(t, rules.options_for(n, opts) or opts) == "jpeg"}
            if self.tensor is None:
                if not jpeg:
                    raise ValueError(_no_jpeg(state, aliases, opts, rules))
                self.tensor = max(jpeg, key=jpeg.get)
            else:
                self.tensor = aliases.get(self.tensor, self.tensor)
                if self.tensor not in jpeg:
                    raise ValueError(f"finetune: budget: tensor {self.tensor!r} is not coded as JPEG under this "
                                     f"setting and overrides" if self.tensor in state else
                                     f"finetune: budget: the model has no tensor {self.tensor!r}")
            self._ladder = scales()
            here = scale_of(rules.options_for(self.tensor, opts) or opts)
            self._index = min(range(len(self._ladder)), key=lambda i: abs(self._ladder[i] - here))
            sizes = {}

            def fits(i: int, limit: float) -> bool:
                sizes[i] = sizes.get(i) or self._measure(model, i)
                return sizes[i] <= limit

            if not fits(0, self.bits_per_weight):  # below the first file: train, and let the file come down
                if self.start_at == "coarsest":
                    self._index = 0
                fits(self._index, self.target)
                self.history.append((self._steps, self._text(self._index), sizes[self._index]))
                self._warn_damage(model, 0, sizes[0])
                return self._rules()
            lo, hi = 0, len(self._ladder)  # lo fits (the hard budget at least), hi does not (or is past the end)
            if fits(self._index, self.target):
                lo = self._index
            else:
                hi = self._index
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid, self.target):
                    lo = mid
                else:
                    hi = mid
            self._index = lo
            self.history.append((self._steps, self._text(lo), sizes[lo]))
            if lo == 0:  # the coarsest quality: said if it destroys the tensor (above it the loop trains it back)
                self._warn_damage(model, 0, None)
        return self._rules()

    def _damage(self, model: torch.nn.Module, index: int) -> float:
        """The tensor's relative RMS error at ladder step ``index`` (:attr:`codec.rd.allocate.RDPoint.damage`,
        data-free: the weights as they are now)."""
        from ..api import to_numpy
        from ..dtypes import get_dtype
        from ..rd.allocate import measure

        array, dtype = to_numpy(model.state_dict()[self.tensor])
        opts = Overrides(self._rules_at(index)).options_for(self.tensor, self._opts) or self._opts
        return measure(self.tensor, array, get_dtype(dtype), self._text(index), opts, keep_decoded=False)[0].damage

    def _warn_damage(self, model: torch.nn.Module, index: int, size: float | None) -> None:
        """At the first measurement, when the budget puts the tensor at the coarsest step (``index`` 0; ``size``: the
        file's bits/weight there when even that is over the budget, so the loop heads there): a
        :class:`BudgetDamageWarning` if that destroys it (a relative error over :data:`~codec.rd.allocate.DAMAGE`),
        naming the tensor, its error and the smallest budget that keeps it under the threshold (the file at the
        coarsest such step, on the weights as they are now). Finer steps are not judged: the loop trains the model
        against them (the qa MobileNet at q7.19, relative error 0.8, kept 81.34 % of 81.12)."""
        import warnings

        from ..rd.allocate import DAMAGE

        error = self._damage(model, index)
        if error <= DAMAGE:
            return
        lo, hi = index, len(self._ladder)  # lo destroys the tensor, hi does not (or is past the end)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._damage(model, mid) <= DAMAGE:
                hi = mid
            else:
                lo = mid
        if hi < len(self._ladder):
            need = math.ceil(self._measure(model, hi) * 1e4) / 1e4
            avoid = f"{need:g} bits/weight keeps it at {self._text(hi)}, under {DAMAGE}"
        else:
            avoid = f"no quality on the ladder keeps it under {DAMAGE}"
        where = (f"even the coarsest quality ({self._text(0)}, {size:.4f} bits/weight) is over the "
                 f"{self.bits_per_weight:g} bits/weight asked, so the loop drives {self.tensor!r} there"
                 if size is not None else f"{self.bits_per_weight:g} bits/weight puts {self.tensor!r} at the "
                 f"coarsest quality ({self._text(index)})")
        self._warned = True
        warnings.warn(f"finetune: budget: {where}: relative error {error:.2f} (over {DAMAGE}) on the weights as they "
                      f"are now; the loop trains the model around the coded tensor and may recover much of it (what "
                      f"the file loses is the coded model's accuracy at the end: the loop's closing line says where "
                      f"the file ends); {avoid}", BudgetDamageWarning, stacklevel=4)

    def track(self, model: torch.nn.Module, step: int) -> Overrides:
        """One measurement at ``step``: the quality one ladder step down if the file is over the target, else up
        by as many steps (at most :data:`CLIMB`) as still fit."""
        now = self._measure(model, self._index)
        if now > self.target and self._index > 0:
            self._index -= 1
        else:
            for _ in range(CLIMB):
                if now > self.target or self._index + 1 >= len(self._ladder):
                    break
                finer = self._measure(model, self._index + 1)
                if finer > self.target:
                    break
                self._index, now = self._index + 1, finer
        self.history.append((self._steps + step, self._text(self._index), now))
        self._last = step
        return self._rules()

    def finish(self, model: torch.nn.Module, steps: int) -> Overrides:
        """After the last step: the file at the held quality, stepped down while it is over ``bits_per_weight``
        (one rung at a time :data:`LINEAR_STEPS` times, then the coarsest rung and a bisection); over the budget
        even at the coarsest, :attr:`within` is False and :attr:`smallest` its size."""
        self._steps += steps
        self.bits, self.smallest = self._measure(model, self._index), None
        for _ in range(LINEAR_STEPS):
            if self.bits <= self.bits_per_weight or self._index == 0:
                break
            self._index -= 1
            self.stepped_down += 1
            self.bits = self._measure(model, self._index)
        if self.bits > self.bits_per_weight and self._index > 0:  # far over: the coarsest, then a bisection
            coarsest = self._measure(model, 0)
            lo, hi, at = 0, self._index, coarsest
            if coarsest <= self.bits_per_weight:  # lo fits, hi does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    size = self._measure(model, mid)
                    if size <= self.bits_per_weight:
                        lo, at = mid, size
                    else:
                        hi = mid
            self.stepped_down += self._index - lo
            self._index, self.bits = lo, at
        self.holders = []
        if self.bits > self.bits_per_weight:  # at the coarsest rung: the smallest file this model has now
            self.smallest = self.bits
            self.holders = self._holders(model)
        self.history.append((self._steps, self._text(self._index), self.bits))
        self._report(model)
        return self._rules()

    def _report(self, model: torch.nn.Module) -> None:
        """:attr:`report` after :meth:`finish`, given as a :class:`BudgetDamageWarning` too when the first
        measurement warned (so that warning is not the last word) or the file is over the budget."""
        import warnings

        from ..rd.allocate import DAMAGE

        error = self._damage(model, self._index)
        fits = (f"within the {self.bits_per_weight:g} bits/weight asked" if self.within else
                f"over the {self.bits_per_weight:g} bits/weight asked (budget.save refuses it; the smallest this "
                f"model gives now)")
        harm = (f"relative error {error:.2f} against the trained weights"
                + (f" (over {DAMAGE}: the model was trained with the tensor coded there, so measure the coded "
                   "model, codec.train.coded_weights or the saved file decoded, for what the file loses)"
                   if error > DAMAGE else f" (under {DAMAGE})"))
        self.report = (f"finetune: budget: the file ends at {self.bits:.4f} bits/weight, {fits}; {self.tensor!r} "
                       f"at {self._text(self._index)}: {harm}")
        if self._warned or not self.within:
            warnings.warn(self.report, BudgetDamageWarning, stacklevel=4)

    def due(self, step: int, refresh: int, tracked_until: int) -> bool:
        """Whether to measure at ``step`` of this call (a coding step, ``0 < step < tracked_until``): at multiples of
        ``every`` (rounded up to a multiple of ``refresh``: a quality moves where the weights are coded afresh)
        when given; by default once :meth:`interval_for` steps have passed since the last measurement, and at the
        last coding step before the hold unless the coding step before it was measured."""
        self.interval = self.interval_for(refresh)
        if self.every is not None:
            return step % self.interval == 0
        return step - self._last >= self.interval or (step + refresh >= tracked_until and step - self._last > refresh)

    def interval_for(self, refresh: int) -> int:
        """The steps between measurements: ``every`` rounded up to a multiple of ``refresh``; by default ``refresh *
        2**k`` with the smallest ``k`` for which a measurement takes at most :data:`SHARE` of the time of the steps
        between two and itself: a measurement counted as two ``codec.save`` (the current rung and the next finer
        one, as at a quality that holds) at their mean CPU time so far, a step at the steps' mean; ``refresh`` while
        nothing is timed. (Not the measurements' own times: while the file shrinks fast a measurement climbs and
        codes three rungs, which on the bench CNN put the interval at 8 instead of 4 early in a loop.)"""
        if self.every is not None:
            return -(-self.every // refresh) * refresh
        seconds, counts = self._seconds, self._counts
        track = 2 * seconds["measure"] / counts["measure"] if counts["measure"] else 0.0
        interval = refresh
        if counts["step"] and seconds["step"] > 0:
            need = track * (1 - SHARE) / (SHARE * seconds["step"] / counts["step"])
            while interval < need:
                interval *= 2
        return interval

    def step_began(self) -> None:
        """A training step begins (finetune times its steps for the default interval)."""
        self._tic = _clock()

    def step_ended(self) -> None:
        """The step begun last has ended."""
        self._count("step", _clock() - self._tic)

    def _count(self, kind: str, seconds: float) -> None:
        self._seconds[kind] += max(seconds, 0.0)
        self._counts[kind] += 1

    # -- the file ----------------------------------------------------------------------------------------------

    def save(self, model: torch.nn.Module, path, **kwargs) -> list[str]:
        """``codec.save(model, path)`` with the setting and overrides the last finetune coded with (its rounded
        vectors are in the model already): the file the network trained against last. A ValueError (one line,
        nothing written) when the last finetune ended over the budget (:attr:`within` False): it names the size
        reached, the budget asked and the smallest budget that fits; ``codec.save(model, path,
        overrides=budget.overrides)`` writes that file anyway."""
        from ..encode import save

        if self.overrides is None:
            raise ValueError("budget: no finetune has run with this budget yet")
        if not self.within:
            smallest = math.ceil((self.smallest or self.bits) * 1e4) / 1e4
            raise ValueError(f"budget: not saved: the file is {self.bits:.4f} bits/weight ({self.tensor} at "
                             f"{self.quality}, the coarsest quality), over the {self.bits_per_weight:g} bits/weight "
                             f"asked; the smallest budget that fits this model at this setting is {smallest:g} "
                             f"bits/weight{self._held_by()} (train longer or ask for more; codec.save(model, path, "
                             f"overrides=budget.overrides) writes it anyway)")
        return save(model, path, overrides=self.overrides, **self._fields(), **kwargs)

    def _fields(self) -> dict:
        return {f.name: getattr(self._opts, f.name) for f in dataclasses.fields(self._opts)}

    def _text(self, index: int) -> str:
        return _spec_at(self._ladder[index], self._opts)

    def _rules_at(self, index: int) -> list[tuple[str, str]]:
        rule = Overrides(self._base).rule_for(self.tensor)
        spec = rule[1] if rule is not None else "jpeg"
        return [*self._base, (_escape(self.tensor), f"{spec},{self._text(index)}")]

    def _rules(self) -> Overrides:
        self.overrides = self._rules_at(self._index)
        self.quality = self._text(self._index)
        return Overrides(self.overrides)

    def _held_by(self) -> str:
        """The refusal's words on what else the file spends: the largest tensors besides the one that moves."""
        if not self.holders:
            return ""
        named = ", ".join(f"{name} {size:,} B as {coding}" for name, size, coding in self.holders[:HOLDERS])
        return (f"; besides {self.tensor}, its largest tensors are {named}: a coarser setting or overrides for them "
                "lower it")

    def _holders(self, model: torch.nn.Module) -> list[tuple[str, int, str]]:
        """``(name, stored bytes, coding)`` of the file's tensors at the coarsest rung, the moving tensor left
        out, largest first (one more coding of the model, only when the budget is not met)."""
        from ..api import open as open_file

        entries = open_file(self._file(model, 0)).reader.index.entries
        held = [(e.name, e.stored_bytes, e.codec.describe() if e.codec is not None else "an alias")
                for e in entries if e.name != self.tensor and e.stored_bytes]
        return sorted(held, key=lambda item: -item[1])

    def _measure(self, model: torch.nn.Module, index: int) -> float:
        """The bits/weight of the file of ``model`` as it is now (float weights, vectors rounded as finetune
        writes them) with the tensor at ladder step ``index``. Coded with ``jobs=torch.get_num_threads()``: a
        training loop on one thread measures on one (the default's worker threads cost the bench MLP's
        measurement 10-40 % more CPU time, by the load: 10.5-11.5 ms against 8.2-9.5 ms) and without the
        lossy tensors' relative errors (``measure_errors=False``: the size is the same, the JPEG blob is not
        decoded again; 9.2-9.9 ms -> 6.1-6.4 ms on the bench MLP at its random start)."""
        tic = _clock()
        data, weights = self._coded(model, index)
        self._count("measure", _clock() - tic)
        return 8 * len(data) / weights

    def _file(self, model: torch.nn.Module, index: int) -> bytes:
        """The bytes of the file :meth:`_measure` measures."""
        return self._coded(model, index)[0]

    def _coded(self, model: torch.nn.Module, index: int) -> tuple[bytes, int]:
        """The file :meth:`_measure` measures and the number of values it counts (tied names once)."""
        from ..api import _sharing
        from ..encode import save

        from .finetune import _rounds, round_vector

        rules = Overrides(self._rules_at(index))
        state = {n: t.detach() for n, t in model.state_dict().items()}
        aliases = _sharing(state)[0]  # tied names: stored once by codec.save, counted once here
        if self._vector_bits:  # a tied vector rounded once, so that the file still stores it once
            state = {n: round_vector(t, self._vector_bits)
                     if n not in aliases and _rounds(t, rules.options_for(n, self._opts) or self._opts) else t
                     for n, t in state.items()}
            state.update({n: state[target] for n, target in aliases.items()})
        buf = io.BytesIO()  # coded on as many threads as torch trains with (the same bytes on any number)
        save(state, buf, overrides=rules.rules, jobs=torch.get_num_threads(), measure_errors=False, **self._fields())
        return buf.getvalue(), sum(t.numel() for n, t in state.items() if n not in aliases)


class BudgetDamageWarning(UserWarning):
    """A :class:`Budget` puts its tensor at a quality that destroys it (:meth:`Budget.start`'s first measurement),
    and, after such a warning or when the file ends over the budget, where the file ends (:attr:`Budget.report`)."""


def as_budget(budget) -> Budget | None:
    """``budget`` as finetune takes it: None, a :class:`Budget` or a number of bits per weight."""
    if budget is None or isinstance(budget, Budget):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Budget(budget)
    raise TypeError(f"finetune: budget must be None, a number of bits per weight or a codec.train.Budget, "
                    f"not {type(budget).__name__}")


def _no_jpeg(state: Mapping, aliases: Mapping, opts: EncodeOptions, rules: Overrides) -> str:
    """The one-line error of a budget with no JPEG tensor to move: why none is (the setting's codec, or every
    matrix under JPEG's smallest size) and what to pass instead."""
    from ..tensorcodec import MIN_IMAGE_ELEMENTS

    head = "finetune: budget: no tensor is coded as JPEG under this setting and overrides (the budget moves a JPEG " \
           "quality)"
    sizes = {n: t.numel() for n, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
             and t.dim() >= 2 and n not in aliases}
    if not sizes:
        return f"{head}: the model has no floating matrix"
    largest = max(sizes, key=sizes.get)
    if sizes[largest] < MIN_IMAGE_ELEMENTS:
        return (f"{head}: JPEG codes matrices of at least {MIN_IMAGE_ELEMENTS:,} elements, and the largest, "
                f"{largest!r}, has {sizes[largest]:,}; fine-tune without a budget at a quant setting "
                "(setting='b4') and save with bits_per_weight")
    from .finetune import _coded_as

    codec = _coded_as(state[largest], rules.options_for(largest, opts) or opts)
    return f"{head}: {largest!r} is coded as {codec}; pass a JPEG setting (setting='q50') or a 'jpeg' override for it"
