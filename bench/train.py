"""Training for the codec on Fashion-MNIST: plain training coded afterwards against training that knows the codec.

One run trains the bench MLP (or CNN) with one schedule (Adam, lr 1e-3, batch 128, same seed and batch order)
in these ways and codes every result with jwt, scoring the decoded file on the 10,000 test images:

* ``plain``: no penalty; coded afterwards by the rate search at each ``--bits`` budget (data-free, and with
  calibration inputs and repair, :mod:`codec.rd.repair`), and at each point of the setting ladder;
* ``codec``: the same schedule, its last ``--codec-epochs`` epochs run with the codec in the loop at one setting of
  the ladder (:func:`codec.train.finetune` with the labels, continuing the schedule's Adam: the forward pass sees
  the weights as the file will hold them, straight-through gradients; coded every ``--refresh`` steps, biases
  rounded to ``--vector-bits`` significand bits; ``--keep-tiles F`` holds the tiles' offset/scale over the loop's
  last fraction F, ``--distil W`` adds the plain model's outputs to the labels, ``--group G`` a group penalty on the
  largest layer's rows and ``--loop-lam L`` its rate penalty at the ladder setting), then saved with that setting; one
  model per ladder point, the epochs before shared with the plain run (same batches, so the same weights);
* ``lam=L``: the same schedule with ``L * codec.train.rate(layer, --rate-setting) / n`` added to the loss of the
  largest layer every ``--rate-every`` steps from epoch ``--warmup`` on, coded afterwards by the search;
* ``dct``: (``--dct K``) the largest layer a :class:`codec.train.DCTLinear` holding K x K low-frequency DCT
  coefficients per 8x8 block, converted to an ordinary layer, coded at the ladder.

``--decay last --decay-epochs N`` lowers the learning rate to 0 over the last N epochs and ``--ema D`` keeps a moving
average of the weights (:class:`WeightAverage`), both for the plain and the codec schedule alike: a stable endpoint
(with a constant rate the plain model ends 84.8-86.3 % on the MLP's seeds 0-4, decayed over its last epoch
86.1-86.5 %). The averaged plain model is then a reference of its own, and the codec run's average is coded at the
loop's setting beside the loop's own file.

Training time is CPU seconds of this process (``time.process_time``; one thread), a codec model's including the
epochs it shares with the plain run. With several ``--seed`` each row is the mean over the seeds (the endpoint of
a short constant-rate schedule moves by 1-1.5 points from seed to seed). Writes ``bench/results/train_<model>.md``
and ``.png`` (after each seed, the seeds so far). ``--budget B`` adds a loop that picks the largest layer's quality
in the loop so that the whole file stays within B bits/weight (:class:`codec.train.Budget`)::

    python -m bench.train --model mlp --lam 0 --table ramp1 --refresh 4 --vector-bits 4 --seed 0 --seed 1 --seed 2
    python -m bench.train --model cnn --epochs 2 --train-size 30000
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import codec
import codec.train
from bench.models import accuracy, load_fashion_mnist, make_model, model_class, preprocess

OUT = Path(__file__).resolve().parent / "results"
#: The largest layer of each model (the one the ladder varies, the penalty and the DCT layer apply to) and the
#: settings of the others: the output layers and the CNN's convolutions in few-bit quant, biases lossless (the CNN's
#: conv2 at 2 bits: at 4 it alone took 0.175 bits/weight of the 0.3 target).
BIG = {"mlp": "fc1", "cnn": "fc1"}
#: The layers that read the largest layer's units (their order, :func:`codec.train.order_units`, moves with it).
NEXT = {"mlp": ["fc2"], "cnn": ["fc2"]}
REST = {"mlp": [("fc2.weight", "b3")], "cnn": [("conv1.weight", "b8"), ("conv2.weight", "b2"), ("fc2.weight", "b4")]}
LADDER = {"mlp": (4, 5, 6, 8, 10), "cnn": (4, 5, 6, 8, 10)}
DECAY_NOTE = {"none": "", "cosine": ", cosine decay to 0", "last": ", cosine decay to 0 over the last {} epoch(s)"}


def ladder_point(kind: str, quality: float, table: str = "flat",
                 variant: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The overrides (codec.save's) of one ladder point: the largest layer in grid-tiled JPEG at ``quality`` with
    ``table`` (grid tiles are the cheapest structure jwt has: one set of JPEG headers, 64x64 tiles), the rest as
    REST with the ``(tensor, setting)`` pairs of ``variant`` in place of (or added to) REST's."""
    changed = dict(variant)
    rest = [(name, changed.pop(name, setting)) for name, setting in REST[kind]]
    return [(f"{BIG[kind]}.weight", f"jpeg,q{quality},table={table}"), *rest, *changed.items()]


def quality_arg(text: str) -> float:
    """``--quality``: a whole quality as an int (``6``, labelled ``q6``), a step between two as a float (``6.5``)."""
    value = float(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"quality {text} is not in 1..100")
    return int(value) if value.is_integer() else value


def order_arg(text: str) -> tuple[float, ...]:
    """``--order-units``: comma-separated fractions of the loop, each from 0 to below 1 (``0`` alone: never)."""
    try:
        fractions = tuple(sorted({float(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated fractions of the loop") from None
    if any(not 0 <= f < 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"{text!r}: each fraction of the loop must be from 0 to below 1")
    return tuple(f for f in fractions if f > 0)


def parse_variant(text: str) -> tuple[tuple[str, str], ...]:
    """``"conv2.weight=b3,fc2.weight=b8"`` as ``(("conv2.weight", "b3"), ("fc2.weight", "b8"))``; ValueError if a
    part is not ``tensor=setting``. (A setting with commas, like JPEG's, is not allowed here: the ladder's own
    layer carries those.)"""
    pairs = tuple(tuple(part.split("=", 1)) for part in text.split(",") if part)
    if not pairs or any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise ValueError(f"--variant {text!r}: expected tensor=setting[,tensor=setting...]")
    return pairs


def parse_sets(texts: Sequence[str], kind: str) -> tuple[tuple[str, str], ...]:
    """``--set`` values (``"conv2.weight=jpeg,q12,table=flat"``, one tensor each) as ``(tensor, setting)`` pairs;
    ValueError naming the value if one is not ``tensor=setting``, names no weight of the ``kind`` model or names the
    largest layer's weight (the ladder's own: ``--quality`` and ``--table`` set it)."""
    names = [name for name, _ in make_model(kind, 0).named_parameters()]
    pairs = []
    for text in texts:
        name, _, setting = text.partition("=")
        if not name or not setting:
            raise ValueError(f"--set {text!r}: expected tensor=setting")
        if name not in names:
            raise ValueError(f"--set {text!r}: the {kind} has no {name!r} (its tensors: {', '.join(names)})")
        if name == f"{BIG[kind]}.weight":
            raise ValueError(f"--set {text!r}: {name} is the ladder's layer (--quality and --table set it)")
        pairs.append((name, setting))
    return tuple(pairs)


def variant_label(quality: float, variant: Sequence[tuple[str, str]]) -> str:
    """The "coded with" label of a ladder point: ``q6`` or ``q6, conv2.weight=b3``."""
    return ", ".join([f"q{quality}", *(f"{name}={setting}" for name, setting in variant)])


def batches_of(inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
               size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's batches in the schedule's order."""
    return [(inputs[b], targets[b]) for b in torch.randperm(len(inputs), generator=generator).split(size)]


def unit_norms(weight: torch.Tensor) -> torch.Tensor:
    """The mean L2 norm of a weight's rows (a layer's output units)."""
    return weight.flatten(1).norm(dim=1).mean()


def unit_penalty(model: torch.nn.Module, layer: str) -> torch.Tensor:
    """The mean L2 norm of ``layer``'s output units (its weight's rows; a group-lasso term: it shrinks whole units,
    whose rows JPEG then codes as near-constant blocks)."""
    return unit_norms(model.get_submodule(layer).weight)


def rate_penalty(model: torch.nn.Module, layer: str, setting: str, lam: float) -> torch.Tensor:
    """``lam`` times the estimated bits per weight of ``layer``'s weight under ``setting``."""
    weight = model.get_submodule(layer).weight
    return lam * codec.train.rate({"w": weight}, setting) / weight.numel()


class WeightAverage:
    """Exponential moving averages of a model's parameters at several ``decays`` (an optimizer step post-hook:
    each average moves ``1 - decay`` of the way to the weights after every step), debiased as Adam's moments are
    (started at zero, divided by ``1 - decay**steps``), so the weights a run starts from do not linger in them.
    ``state``: the averages and step count of a :meth:`snapshot`, to continue them."""

    def __init__(self, model: torch.nn.Module, decays: Sequence[float], state: dict | None = None):
        self.model, self.params = model, dict(model.named_parameters())
        state = copy.deepcopy(state) if state is not None else {
            "steps": 0, "sums": {d: {n: torch.zeros_like(p) for n, p in self.params.items()} for d in decays}}
        self.steps, self.sums = state["steps"], state["sums"]

    def __call__(self, *_) -> None:
        self.steps += 1
        with torch.no_grad():
            for decay, sums in self.sums.items():
                for name, p in self.params.items():
                    sums[name].lerp_(p.detach(), 1 - decay)

    def snapshot(self) -> dict:
        return copy.deepcopy({"steps": self.steps, "sums": self.sums})

    def models(self) -> dict[float, torch.nn.Module]:
        """``{decay: a copy of the model holding that average}`` (buffers as the model's now; eval mode)."""
        averaged = {}
        for decay, sums in self.sums.items():
            model = copy.deepcopy(self.model).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(sums[name] / (1 - decay ** self.steps))
            averaged[decay] = model
        return averaged


class Schedule:
    """The shared schedule: ``epochs`` epochs of Adam on the training set, deterministic given ``seed``; ``decay``
    "cosine" lowers the rate from 1e-3 to 0 over the whole schedule (a codec run's epochs in the loop included),
    "last" over its last ``decay_epochs`` epochs only (constant 1e-3 before). ``ema``: decays of
    :class:`WeightAverage` kept over the schedule (a codec run continues the plain run's from the snapshot); after
    :meth:`run` or :meth:`codec_epochs`, :attr:`averaged` holds ``{decay: averaged model}`` of that run."""

    def __init__(self, kind: str, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int,
                 decay: str = "none", decay_epochs: int = 1, ema: Sequence[float] = ()):
        self.kind, self.epochs, self.seed, self.decay = kind, epochs, seed, decay
        self.decay_epochs, self.ema = decay_epochs, tuple(ema)
        self.averaged: dict[float, torch.nn.Module] = {}
        self.budget: codec.train.Budget | None = None
        self.inputs, self.targets = preprocess(images), torch.as_tensor(labels, dtype=torch.int64)

    def steps(self) -> int:
        return -(-len(self.inputs) // 128)

    def lr(self, step: int) -> float:
        """The learning rate of the schedule's step ``step`` (0-based, over all epochs)."""
        if self.decay == "cosine":
            return 1e-3 * 0.5 * (1 + math.cos(math.pi * step / (self.steps() * self.epochs)))
        first = self.steps() * (self.epochs - self.decay_epochs)
        if self.decay == "last" and step >= first:
            return 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - first) / (self.steps() * self.decay_epochs)))
        return 1e-3

    def run(self, lam: float = 0.0, rate_setting: str = "", every: int = 8, warmup: int = 0,
            snapshot_at: int | None = None, bar: tqdm | None = None, model: torch.nn.Module | None = None
            ) -> tuple[torch.nn.Module, float, dict | None]:
        """Train a fresh model (``lam`` 0: plainly). Returns it, the CPU seconds taken and, with ``snapshot_at``,
        the state at the start of that epoch (model, generator, seconds so far) for :meth:`codec_epochs`."""
        model = model if model is not None else make_model(self.kind, self.seed)
        torch.set_num_threads(1)  # bench.models.accuracy sets 2: training times are one thread's
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        start, snapshot, step = time.process_time(), None, 0
        average = self._average(model, optimizer)
        model.train()
        for epoch in range(self.epochs):
            if epoch == snapshot_at:
                snapshot = {"model": copy.deepcopy(model), "generator": generator.get_state(),
                            "optimizer": copy.deepcopy(optimizer.state_dict()), "epoch": epoch,
                            "seconds": time.process_time() - start, "average": average.snapshot()}
            for i, (x, y) in enumerate(batches_of(self.inputs, self.targets, generator)):
                for group in optimizer.param_groups:
                    group["lr"] = self.lr(step)
                step += 1
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if lam and epoch >= warmup and i % every == 0:
                    loss = loss + rate_penalty(model, BIG[self.kind], rate_setting, lam)
                loss.backward()
                optimizer.step()
                if bar is not None:
                    bar.update(1)
        model.eval()
        self.averaged = average.models()
        return model, time.process_time() - start, snapshot

    def _average(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict | None = None) -> WeightAverage:
        """A :class:`WeightAverage` of ``model`` at the schedule's ``ema`` decays, updated after each of
        ``optimizer``'s steps (from ``state``, a snapshot's, if given)."""
        average = WeightAverage(model, self.ema, state)
        optimizer.register_step_post_hook(average)
        return average

    def codec_epochs(self, snapshot: dict, overrides: Sequence[tuple[str, str]], bar: tqdm | None = None,
                     refresh: int = 1, vector_bits: int | None = None, keep_tiles: float = 0.0,
                     teacher: torch.nn.Module | None = None, distil: float = 0.0, group: float = 0.0,
                     lam: float = 0.0, every: int = 8, freeze_tail: float = 0.0,
                     freeze: Sequence[str] = (), budget: float | None = None,
                     budget_hold: float = 0.25, budget_every: int | None = None,
                     budget_start: str = "setting", label_smoothing: float = 0.0,
                     inputs_below: float = 0.0, tile_clip: float = 0.0,
                     order_at: Sequence[float] = ()) -> tuple[torch.nn.Module, float]:
        """The schedule's remaining epochs from ``snapshot`` with the codec in the loop at ``overrides``
        (:func:`codec.train.finetune` with the labels, continuing the schedule's Adam and rates; ``refresh``,
        ``vector_bits`` as finetune takes them; ``keep_tiles``: the fraction of the loop's steps, its last ones,
        run with finetune's ``keep_tiles``, the tile extremes where they were when that part began). With
        ``teacher`` and ``distil`` > 0 the loss is ``(1 - distil)`` times the labels' cross-entropy plus ``distil``
        times the KL divergence from the teacher's outputs (:func:`distil_loss`; the teacher's logits computed once
        per batch, in the time). ``group`` > 0 adds ``group`` times :func:`unit_penalty` of the largest layer to the
        loss, ``lam`` > 0 its :func:`rate_penalty` at its own setting in ``overrides`` every ``every`` steps (both on
        the float weights). ``freeze_tail``: the fraction of the loop's steps, its last ones, run with the
        parameters named in ``freeze`` (default: the largest layer's weight) frozen, so their coding is the file's
        from the start of that part on and the rest trains against exactly it. ``budget``: bits/weight of the whole
        file; the largest layer's quality (starting from its setting in ``overrides``) is then chosen in the loop so
        that the file fits (:class:`codec.train.Budget`, its quality held over the last ``budget_hold`` of each
        finetune call, the file measured every ``budget_every`` steps (None: the Budget's default, an interval
        chosen from the timed costs of a step and a measurement), starting at
        ``budget_start``, "setting" or "coarsest", when the file the loop starts from is over the budget at every
        quality), and :attr:`budget` holds the Budget (its ``overrides`` are the file's; ``within`` False when the
        file ended over the budget). ``label_smoothing``: the labels' cross-entropy in the loop with that much
        label smoothing (torch's ``label_smoothing``; the plain run's stays without). ``inputs_below``: the largest
        layer's weight columns whose input is nonzero in fewer than that fraction of the first 8,192 training
        images (measured on the snapshot's model) held at zero over the loop (:class:`codec.train.InputMask`, in
        :attr:`input_mask`). ``tile_clip``: the largest layer's weights clipped after every step to each tile's mean
        +- that many standard deviations (:class:`codec.train.TileClip`, after the mask; in :attr:`tile_clip`; 0:
        none). ``order_at``: fractions of the loop (0 to below 1) at whose steps the largest layer's units are
        reordered so that neighbouring rows are alike (:func:`codec.train.order_units`, its next layer's inputs and
        Adam's moments alike; between finetune calls, so no coding's residual is held over a reorder). Returns
        the model and the CPU seconds of the whole schedule (the shared epochs included, not the teacher's
        training)."""
        model = copy.deepcopy(snapshot["model"])
        self.budget = (codec.train.Budget(budget, tensor=f"{BIG[self.kind]}.weight", hold=budget_hold,
                                          every=budget_every, start=budget_start)
                       if budget is not None else None)
        torch.set_num_threads(1)
        generator = torch.Generator()
        generator.set_state(snapshot["generator"])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        start = time.process_time()
        average = self._average(model, optimizer, snapshot["average"])
        loop_steps = self.steps() * (self.epochs - snapshot["epoch"])
        self.input_mask = None
        if inputs_below > 0:
            self.input_mask = codec.train.InputMask(model, self.inputs[:8192].split(1024), inputs_below,
                                                    BIG[self.kind])
            optimizer.register_step_post_hook(self.input_mask)
        self.tile_clip = None
        if tile_clip > 0:
            self.tile_clip = codec.train.TileClip(model, tile_clip, overrides=overrides,
                                                  tensors=f"{BIG[self.kind]}.weight")
            optimizer.register_step_post_hook(self.tile_clip)
        loss_fn = functools.partial(F.cross_entropy, label_smoothing=label_smoothing)
        if teacher is not None and distil > 0:
            teacher = teacher.eval()
            loss_fn = lambda out, y, logits: distil_loss(out, y, logits, distil, label_smoothing)  # noqa: E731
        penalty = (self._penalty(model, dict(overrides)[f"{BIG[self.kind]}.weight"], group, lam, every)
                   if group > 0 or lam > 0 else None)
        end = snapshot["epoch"] * self.steps() + loop_steps  # global steps
        kept_from, frozen_from = end - round(keep_tiles * loop_steps), end - round(freeze_tail * loop_steps)
        ordered = {end - loop_steps + round(at * loop_steps) for at in order_at}
        frozen = [model.get_parameter(name) for name in (freeze or [f"{BIG[self.kind]}.weight"])]
        for epoch in range(snapshot["epoch"], self.epochs):
            batches = batches_of(self.inputs, self.targets, generator)
            if teacher is not None and distil > 0:
                with torch.no_grad():
                    batches = [(x, y, teacher(x)) for x, y in batches]
            first = epoch * self.steps()
            cuts = sorted({0, len(batches), *(min(max(at - first, 0), len(batches)) for at in (kept_from,
                                                                                             frozen_from, *ordered))})
            for a, b in itertools.pairwise(cuts):
                part, keep = batches[a:b], first >= kept_from
                if part and first in ordered:  # the units reordered between finetune calls: no residual held
                    codec.train.order_units(model, BIG[self.kind], NEXT[self.kind], optimizer)
                if part:
                    for p in frozen:  # frozen: no gradient, so finetune neither trains nor moves it
                        p.requires_grad_(first < frozen_from)
                    codec.train.finetune(model, part, loss_fn, steps=len(part), overrides=overrides, penalty=penalty,
                                         optimizer=optimizer, lr=lambda i, first=first: self.lr(first + i),
                                         refresh=refresh, vector_bits=vector_bits, keep_tiles=keep,
                                         budget=self.budget,
                                         progress=bar if bar is not None else False,
                                         validation=False)  # a training loop: its test set is the check
                first += len(part)
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
        self.averaged = average.models()
        return model, snapshot["seconds"] + time.process_time() - start

    def _penalty(self, model: torch.nn.Module, setting: str, group: float, lam: float, every: int):
        """finetune's ``penalty``: ``group`` times the largest layer's :func:`unit_penalty` and, every ``every``-th
        step, ``lam`` times its :func:`rate_penalty` under ``setting``, of the **float** weights (finetune calls it
        with them back in the model; inside the loss they would be the coded values, which cost the CNN 2-6 points:
        bench/JOURNAL.md, twelfth pass)."""
        layer, calls = BIG[self.kind], itertools.count()

        def penalty(model: torch.nn.Module) -> torch.Tensor:
            term = torch.zeros(())
            if group > 0:
                term = term + group * unit_penalty(model, layer)
            if lam > 0 and next(calls) % every == 0:
                term = term + rate_penalty(model, layer, setting, lam)
            return term

        return penalty


#: Lines a run adds below its table (the qualities a --budget run chose, per seed).
NOTES: list[str] = []

#: Temperature of :func:`distil_loss`.
TEMPERATURE = 2.0


def distil_loss(out: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, weight: float,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1 - weight)`` times the cross-entropy with ``labels`` (with ``label_smoothing``) plus ``weight`` times
    ``T^2`` KL(teacher || student) at temperature ``T`` (:data:`TEMPERATURE`; Hinton et al.'s knowledge
    distillation), ``logits`` the teacher's."""
    kl = F.kl_div(F.log_softmax(out / TEMPERATURE, dim=1), F.log_softmax(logits / TEMPERATURE, dim=1),
                  log_target=True, reduction="batchmean")
    return (1 - weight) * F.cross_entropy(out, labels, label_smoothing=label_smoothing) + weight * TEMPERATURE ** 2 * kl


def coded(model: torch.nn.Module, **save_args) -> tuple[dict, float]:
    """The state_dict a file of ``model`` decodes to, and the file's bits per weight (whole file)."""
    from codec.api import _sharing

    buf = io.BytesIO()
    codec.save(model, buf, **save_args)
    state = model.state_dict()
    aliases = _sharing(state)[0]  # a tied tensor is stored once: counted once, as codec.train.Budget counts it
    n_weights = sum(t.numel() for n, t in state.items() if n not in aliases)
    return codec.load(buf.getvalue()), 8 * len(buf.getvalue()) / n_weights


def main(argv: Sequence[str] | None = None, prog: str | None = None, description: str | None = None) -> None:
    """The run; ``argv``, ``prog`` and ``description`` let examples/train_compressible.py present it."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--cnn", dest="model", action="store_const", const="cnn", help="same as --model cnn")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--codec-epochs", type=int, default=1, help="last epochs with the codec in the loop")
    parser.add_argument("--decay", choices=("none", "cosine", "last"), default="none", help="learning rate "
                        "schedule: constant 1e-3, or cosine from 1e-3 to 0 over all epochs or over the last "
                        "--codec-epochs only (plain and codec alike)")
    parser.add_argument("--decay-epochs", type=int, help="with --decay last: the epochs the decay spans (default: "
                        "--codec-epochs)")
    parser.add_argument("--ema", type=float, action="append", help="also keep an exponential moving average of "
                        "the weights with this decay per step (0-1; several: one each) over the plain and the codec "
                        "schedule; the averaged plain model is its own reference, the codec run's average is coded "
                        "at the loop's setting")
    parser.add_argument("--refresh", type=int, action="append", help="codec in the loop: code the weights every N "
                        "steps, the residual straight through in between (default 1; several: a run for each)")
    parser.add_argument("--keep-tiles", type=float, action="append", help="codec in the loop: the fraction (0-1) of "
                        "the loop's last steps that keep each tile's extremes where they were when that part began "
                        "(finetune's keep_tiles; default 0; several: a run for each)")
    parser.add_argument("--freeze-tail", type=float, action="append", help="codec in the loop: the fraction (0-1) "
                        "of the loop's last steps run with the --freeze tensors frozen, so the rest trains against "
                        "exactly their coding in the file (default 0; several: a run for each)")
    parser.add_argument("--freeze", action="append", help="with --freeze-tail: the parameters to freeze, "
                        "comma-separated (default: the largest layer's weight; several: a run for each)")
    parser.add_argument("--distil", type=float, action="append", help="codec in the loop: weight (0-1) of the KL "
                        "divergence from the plain model's outputs beside the labels (default 0; several: a run for "
                        "each; the time then includes the plain schedule's remaining epochs)")
    parser.add_argument("--label-smoothing", type=float, action="append", help="codec in the loop: the labels' "
                        "cross-entropy with this much label smoothing (0-1; the plain run without; default 0; "
                        "several: a run for each)")
    parser.add_argument("--inputs-below", type=float, action="append", help="codec in the loop: hold at zero the "
                        "largest layer's weight columns whose input is nonzero in fewer than this fraction (0-1) of "
                        "the first 8,192 training images (codec.train.InputMask; default 0: none; several: a run for "
                        "each)")
    parser.add_argument("--tile-clip", type=float, action="append", help="codec in the loop: clip the largest "
                        "layer's weights after every step to each tile's mean +- this many standard deviations, so "
                        "the encoder's tile ranges stay narrow (codec.train.TileClip; default 0: none; several: a run "
                        "for each)")
    parser.add_argument("--order-units", type=order_arg, action="append", help="codec in the loop: reorder the "
                        "largest layer's units (its rows, the next layer's columns) at these fractions of the loop, "
                        "comma-separated (0.1,0.2,0.3), so that neighbouring rows are alike and code smoother "
                        "(codec.train.order_units; default 0: never; several: a run for each)")
    parser.add_argument("--group", type=float, action="append", help="codec in the loop: add this times the mean "
                        "L2 norm of the largest layer's rows (its units; a group penalty) to the loss (default 0; "
                        "several: a run for each)")
    parser.add_argument("--loop-lam", type=float, action="append", help="codec in the loop: add this times the "
                        "estimated bits/weight of the largest layer at its ladder setting (codec.train.rate) to the "
                        "loss every --rate-every steps (default 0; several: a run for each)")
    parser.add_argument("--vector-bits", type=int, help="codec in the loop: round biases to this many significand "
                        "bits (stored losslessly, exactly)")
    parser.add_argument("--quality", type=quality_arg, action="append", help="ladder: JPEG qualities of the largest "
                        "layer (6; 6.5: libjpeg's table formula at 6.5, between q6's and q7's, as the setting q6.5)")
    parser.add_argument("--budget", type=float, action="append", default=[], help="codec in the loop: also a run "
                        "that chooses the largest layer's quality in the loop so that the whole file stays within "
                        "this many bits/weight (codec.train.Budget; starting from the first --quality; several: a "
                        "run for each; a budget below the file the loop starts from trains too, from "
                        "--budget-start, and a file still over it at the end is a row 'over the budget')")
    parser.add_argument("--budget-every", type=int, help="with --budget: measure the file every N steps (rounded "
                        "up to a multiple of --refresh; default: --refresh times a power of two chosen from the timed "
                        "costs, so that measuring takes at most 10 %% of the loop's time: codec.train.Budget)")
    parser.add_argument("--budget-start", choices=codec.train.budget.STARTS, action="append", help="with --budget: "
                        "where the quality starts when the file the loop starts from is over the budget at every "
                        "quality (a fresh model): the first --quality ('setting', default) or the coarsest; it then "
                        "steps down one rung per measurement while over (several: a run for each)")
    parser.add_argument("--budget-hold", type=float, action="append", help="with --budget: the fraction of the "
                        "loop's last steps with the quality held (default 0.25; several: a run for each)")
    parser.add_argument("--budget-only", action="store_true", help="with --budget: no codec-in-the-loop runs at the "
                        "fixed --quality points (the plain ladder rows stay)")
    parser.add_argument("--table", default="flat", help="ladder: JPEG table of the largest layer (flat, ramp1, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="TENSOR=SETTING", help="code TENSOR with "
                        "SETTING (codec.save's per-tensor setting, commas allowed: one tensor per --set) in every run "
                        "instead of the default the table's header names, e.g. --set conv2.weight=jpeg,q12,table=flat "
                        "(not the largest layer's weight: --quality and --table set it)")
    parser.add_argument("--variant", action="append", default=[], help="ladder: also code the other tensors this "
                        "way, e.g. conv2.weight=b3,fc2.weight=b8 (each --variant a ladder of its own at every "
                        "--quality, beside the default settings)")
    parser.add_argument("--lam", type=float, action="append", help="penalty strength(s) (default 1 and 4)")
    parser.add_argument("--rate-setting", default="jpeg,q8,table=flat", help="the setting the penalty estimates")
    parser.add_argument("--rate-every", type=int, default=8, help="add the rate penalty every N steps")
    parser.add_argument("--warmup", type=int, default=1, help="epochs before the penalty starts")
    parser.add_argument("--bits", type=float, action="append", help="budgets of the post-training search")
    parser.add_argument("--calibration", type=int, default=1024, help="training images for calibration/repair (0: "
                        "none)")
    parser.add_argument("--dct", type=int, action="append", default=[], help="also a DCT-layer run keeping K x K "
                        "coefficients per 8x8 block")
    parser.add_argument("--train-size", type=int, default=60000)
    parser.add_argument("--seed", type=int, action="append", help="seed(s) of the schedule (default 0); several: "
                        "each row the mean over them")
    parser.add_argument("--out", type=Path, help="path of the table and plot, without suffix "
                        "(default bench/results/train_<model>)")
    args = parser.parse_args(argv)
    if not 0 < args.codec_epochs <= args.epochs:
        parser.error("--codec-epochs must be between 1 and --epochs")
    args.seed = args.seed or [0]
    if args.decay_epochs is not None and not 0 < args.decay_epochs <= args.epochs:
        parser.error("--decay-epochs must be between 1 and --epochs")
    if any(not 0 < d < 1 for d in args.ema or []):
        parser.error("--ema must be between 0 and 1")
    if any(r < 1 for r in args.refresh or []):
        parser.error("--refresh must be a positive integer")
    if any(not 0 <= k <= 1 for k in args.keep_tiles or []):
        parser.error("--keep-tiles must be between 0 and 1")
    if any(not 0 <= f <= 1 for f in args.freeze_tail or []):
        parser.error("--freeze-tail must be between 0 and 1")
    args.freeze = [tuple(name for name in text.split(",") if name) for text in args.freeze or []]
    names = dict(make_model(args.model, 0).named_parameters())
    if any(not f or any(name not in names for name in f) for f in args.freeze):
        parser.error(f"--freeze: the {args.model}'s parameters are {', '.join(names)}")
    args.freeze = args.freeze or [()]
    if any(not 0 <= d <= 1 for d in args.distil or []):
        parser.error("--distil must be between 0 and 1")
    if any(not 0 <= ls < 1 for ls in args.label_smoothing or []):
        parser.error("--label-smoothing must be from 0 to below 1")
    if any(not 0 <= f <= 1 for f in args.inputs_below or []):
        parser.error("--inputs-below must be between 0 and 1")
    if any(k < 0 for k in args.tile_clip or []):
        parser.error("--tile-clip must not be negative (0: none)")
    if any(g < 0 for g in args.group or []):
        parser.error("--group must not be negative")
    if any(g < 0 for g in args.loop_lam or []):
        parser.error("--loop-lam must not be negative")
    if any(not 0 < b < 64 for b in args.budget):
        parser.error("--budget must be above 0 and below 64 bits/weight")
    args.budget_hold = args.budget_hold or [0.25]
    if any(not 0 <= h <= 1 for h in args.budget_hold):
        parser.error("--budget-hold must be between 0 and 1")
    if args.budget_only and not args.budget:
        parser.error("--budget-only needs --budget")
    if args.budget_every is not None and args.budget_every < 1:
        parser.error("--budget-every must be a positive integer")
    if not args.budget and (args.budget_every is not None or args.budget_start):
        parser.error("--budget-every and --budget-start need --budget")
    if args.vector_bits is not None and not 1 <= args.vector_bits <= 22:
        parser.error("--vector-bits must be between 1 and 22")
    kind = args.model
    lams = [lam for lam in (args.lam if args.lam is not None else [1.0, 4.0]) if lam > 0]  # --lam 0: none
    qualities = args.quality or list(LADDER[kind])
    budgets = args.bits or [0.2, 0.3, 0.4, 0.6, 1.0]
    try:  # a bad setting fails here, not after training
        codec.train.as_setting(args.rate_setting)
        args.base = parse_sets(args.set, args.model)
        args.variants = [args.base, *((*args.base, *parse_variant(v)) for v in args.variant)]
        for q in qualities:
            for variant in args.variants:
                codec.train.as_overrides(ladder_point(kind, q, args.table, variant))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)
    images, labels = load_fashion_mnist("train")
    images, labels = images[: args.train_size], labels[: args.train_size]
    runs = []
    for seed in args.seed:  # the table rewritten after each seed: a long run stopped early keeps its seeds so far
        runs.append(one_seed(args, seed, images, labels, qualities, lams, budgets))
        write(args.out or OUT / f"train_{kind}", kind, args, runs, images)


def one_seed(args, seed: int, images: np.ndarray, labels: np.ndarray, qualities: Sequence[float], lams: Sequence[float],
             budgets: Sequence[float]) -> tuple[float, list[tuple]]:
    """One seed's run: the plain model's float accuracy and the rows ``(curve, how, bits/weight, accuracy, time vs
    plain)``."""
    kind = args.model
    test_images, test_labels = load_fashion_mnist("test")
    schedule = Schedule(kind, images, labels, args.epochs, seed, args.decay, args.decay_epochs or args.codec_epochs,
                        args.ema or ())
    cls = model_class(kind)
    steps = schedule.steps() * args.epochs

    with tqdm(total=steps, desc=f"plain (seed {seed})", unit="step") as bar:
        plain, plain_seconds, snapshot = schedule.run(snapshot_at=args.epochs - args.codec_epochs, bar=bar)
    reference = accuracy(plain, test_images, test_labels)
    rows: list[tuple] = []
    averaged = {decay: accuracy(model, test_images, test_labels) for decay, model in schedule.averaged.items()}

    def record(curve: str, how: str, state_bpw: tuple[dict, float] | None, seconds: float, note: str = "",
               against: float = reference) -> float:
        """Append a row (points lost ``against`` that float accuracy); returns the row's accuracy."""
        if state_bpw is None:
            rows.append((curve, f"{how}: {note}", np.nan, np.nan, seconds / plain_seconds, against))
            return np.nan
        state, bpw = state_bpw
        acc = accuracy((cls, state), test_images, test_labels)
        rows.append((curve, how, bpw, acc, seconds / plain_seconds, against))
        return acc

    for decay, acc in averaged.items():
        rows.append((f"plain, float, average {decay:g}", "float32", 32.0, acc, 1.0, reference))

    def searched(curve: str, model: torch.nn.Module, seconds: float, **extra) -> None:
        for b in tqdm(budgets, desc=f"coding {curve}", unit="file"):
            try:
                record(curve, f"-b {b:g}", coded(model, bits_per_weight=b, **extra), seconds)
            except codec.EncodeError as exc:  # below the smallest encoding the search has for this model
                record(curve, f"-b {b:g}", None, seconds, str(exc).split(";")[0].split(" (")[0])

    searched("plain, search", plain, plain_seconds)
    if args.calibration:
        calib = preprocess(images[: args.calibration])
        searched("plain, search + calibration/repair", plain, plain_seconds, calibration=calib, repair=True)
    rounded = f", biases at {args.vector_bits} significand bits" if args.vector_bits else ""
    points = [(variant_label(q, variant), ladder_point(kind, q, args.table, variant))
              for variant in args.variants for q in qualities]
    for label, point in points:
        model = plain
        if args.vector_bits:  # like for like: the plain model's vectors rounded after training
            model = copy.deepcopy(plain)
            codec.train.round_vectors(model, args.vector_bits, overrides=point)
        record(f"plain, ladder{rounded}", label, coded(model, overrides=point), plain_seconds)
    tails = [(tail, freeze if tail else ()) for tail in dict.fromkeys(args.freeze_tail or [0.0])
             for freeze in (args.freeze if tail else [()])]  # nothing frozen: one run, whatever --freeze says
    for every, keep, distil, group, lam, (tail, freeze), smooth, below, clip, order in itertools.product(
            args.refresh or [1], args.keep_tiles or [0], args.distil or [0.0], args.group or [0.0],
            args.loop_lam or [0.0], tails, args.label_smoothing or [0.0], args.inputs_below or [0.0],
            args.tile_clip or [0.0], args.order_units or [()]):
        frozen = ", ".join(freeze or [f"{BIG[kind]}.weight"])
        reorders = ",".join(f"{f:g}" for f in order)
        loop = (f"codec in the loop, last {args.codec_epochs} epoch(s), coded every {every} step(s){rounded}"
                f"{f', tile extremes kept ({keep:g} of the loop)' if keep else ''}"
                f"{f', distilled {distil:g}' if distil else ''}{f', unit penalty {group:g}' if group else ''}"
                f"{f', label smoothing {smooth:g}' if smooth else ''}"
                f"{f', inputs nonzero in under {below:g} of the images held at zero' if below else ''}"
                f"{f', tiles clipped at {clip:g} standard deviations' if clip else ''}"
                f"{f', units reordered at {reorders} of the loop' if order else ''}"
                f"{f', rate penalty {lam:g} every {args.rate_every}' if lam else ''}"
                f"{f', {frozen} frozen ({tail:g} of the loop)' if tail else ''}")
        budget_points = [(f"budget {b:g} (q in the loop, held {hold:g}{f', from {start}' if args.budget_start else ''}"
                          f"{f', measured every {args.budget_every}' if args.budget_every else ''})",
                          ladder_point(kind, qualities[0], args.table, args.base), (b, hold, start))
                         for b in args.budget for hold in args.budget_hold
                         for start in args.budget_start or ["setting"]]
        for label, point, budget in [*((label, point, None) for label, point in points
                                       if not args.budget_only), *budget_points]:
            with tqdm(total=schedule.steps() * args.codec_epochs, desc=f"codec {label}", unit="step") as bar:
                extra = ({"budget": budget[0], "budget_hold": budget[1], "budget_start": budget[2],
                          "budget_every": args.budget_every} if budget else {})
                model, seconds = schedule.codec_epochs(snapshot, point, bar=bar, refresh=every,
                                                       vector_bits=args.vector_bits, keep_tiles=keep,
                                                       teacher=plain if distil else None, distil=distil,
                                                       group=group, lam=lam, every=args.rate_every,
                                                       freeze_tail=tail, freeze=freeze, label_smoothing=smooth,
                                                       inputs_below=below, tile_clip=clip, order_at=order,
                                                       **extra)
            if distil:  # the teacher is the whole plain schedule: its epochs after the snapshot count too
                seconds += plain_seconds - snapshot["seconds"]
            if budget is not None:  # the file is the loop's last coding, at the quality it chose
                point = schedule.budget.overrides
                NOTES.append(f"seed {seed}, {loop}, {label}: {BIG[kind]} at {schedule.budget.quality}, "
                             f"{schedule.budget.bits:.4f} bits/weight, stepped down {schedule.budget.stepped_down} "
                             f"at the end, measured every {schedule.budget.interval} steps last; qualities in the "
                             f"loop (step: quality bits/weight): "
                             + ", ".join(f"{s}: {q} {b:.4f}" for s, q, b in schedule.budget.history))
                print(NOTES[-1])
                if not schedule.budget.within:  # no figure for a file the budget does not hold
                    over = (f"over the budget ({schedule.budget.bits:.4f} bits/weight reached at "
                            f"{schedule.budget.quality}; the smallest budget that fits "
                            f"{math.ceil(schedule.budget.smallest * 1e4) / 1e4:g})")
                    NOTES.append(f"seed {seed}, {loop}, {label}: {over}")
                    print(NOTES[-1])
                    record(loop, label, None, seconds, over)
                    continue
            state_bpw = coded(model, overrides=point)
            record(loop, label, state_bpw, seconds)
            for decay, average in schedule.averaged.items():  # against the plain run's average of the same decay
                record(f"{loop}, its file; plain averaged {decay:g}", label, state_bpw, seconds,
                       against=averaged[decay])
                if args.vector_bits:
                    codec.train.round_vectors(average, args.vector_bits, overrides=point)
                record(f"{loop}, average {decay:g} coded", label, coded(average, overrides=point), seconds,
                       against=averaged[decay])
    for lam in lams:
        with tqdm(total=steps, desc=f"lam={lam:g}", unit="step") as bar:
            model, seconds, _ = schedule.run(lam, args.rate_setting, args.rate_every, args.warmup, bar=bar)
        searched(f"lam={lam:g}, search", model, seconds)
    for k in args.dct:
        model = codec.train.with_dct_layers(make_model(kind, seed), [BIG[kind]], keep=k)
        with tqdm(total=steps, desc=f"dct keep {k}", unit="step") as bar:
            model, seconds, _ = schedule.run(bar=bar, model=model)
        model = codec.train.to_ordinary(model)
        for q in qualities:
            record(f"DCT layer {k}x{k}/8x8", f"q{q}", coded(model, overrides=ladder_point(kind, q, args.table)),
                   seconds)
    return reference, rows


def write(path: Path, kind: str, args, runs: list[tuple[float, list[tuple]]], images) -> None:
    """The table (``.md``) and plot (``.png``) of a run: each row the mean over the seeds (points lost: the mean
    of each seed's own plain float accuracy minus the row's, with its range over the seeds)."""
    import os
    import sys

    script = Path(sys.argv[0]).name
    runner = "python -m bench.train" if script == "train.py" else f"python examples/{script}"
    command = " ".join([runner, *sys.argv[1:]])
    references = [reference for reference, _ in runs]
    reference = float(np.mean(references))
    by_row: dict[tuple[str, str], list[tuple]] = {}
    for _, rows in runs:
        for curve, how, bpw, acc, cost, ref in rows:
            by_row.setdefault((curve, how), []).append((bpw, acc, ref - acc, cost))

    load = os.getloadavg()[0]
    rest = {**dict(REST[kind]), **dict(getattr(args, "base", ()))}  # --set's settings in place of REST's
    seeds = ", ".join(map(str, args.seed[: len(runs)]))
    lines = [f"# Training for the codec: {kind}, {args.epochs} epochs on {len(images)} images", "",
             f"`{command}` (load average {load:.1f} at the end; times are CPU seconds, one thread)", "",
             (f"Reference: the plain model's float accuracy {reference:.2f} % (seeds {seeds}: "
              f"{', '.join(f'{r:.2f}' for r in references)}). The ladder codes the largest layer "
              f"({BIG[kind]}) as grid-tiled JPEG with the {args.table} table at quality q and the rest as "
              f"{', '.join(f'{n}={s}' for n, s in rest.items())} (biases lossless"
              f"{f', rounded to {args.vector_bits} significand bits' if args.vector_bits else ''}). Schedule: "
              f"Adam lr 1e-3{DECAY_NOTE[args.decay].format(args.decay_epochs or args.codec_epochs)}, batch 128"
              f"{f', weights averaged (decays {args.ema})' if args.ema else ''}. Each row is the "
              f"mean over the seeds; points lost against each seed's own plain model, [min, max] over the seeds."),
             "",
             ("| model | coded with | bits/weight (file) [min, max] | test accuracy % | points lost [min, max] | "
              "training time vs plain |"),
             "|---|---|---|---|---|---|"]
    curves: dict[str, list[tuple[float, float]]] = {}
    for (curve, how), values in by_row.items():
        bpw, acc, lost, cost = (np.array(column, dtype=float) for column in zip(*values))
        spread = f" [{np.min(lost):+.2f}, {np.max(lost):+.2f}]" if len(values) > 1 else ""
        bits = f" [{np.min(bpw):.3f}, {np.max(bpw):.3f}]" if len(values) > 1 else ""  # a budget holds for each file
        lines.append(f"| {curve} | {how} | {np.mean(bpw):.3f}{bits} | {np.mean(acc):.2f} | "
                     f"{np.mean(lost):+.2f}{spread} | {np.mean(cost):.2f}x |")
        if not np.isnan(bpw).any():
            curves.setdefault(curve, []).append((float(np.mean(bpw)), float(np.mean(acc))))
    if len(runs) > 1:  # paired comparisons need each seed's figures, not only the means
        lines += ["", f"Per seed ({seeds}): test accuracy % at bits/weight, points lost.", ""]
        for (curve, how), values in by_row.items():
            each = "; ".join(f"{acc:.2f} at {bpw:.3f}, {lost:+.2f}" for bpw, acc, lost, _ in values)
            lines.append(f"- {curve}, {how}: {each}")
    if NOTES:
        lines += ["", "Budget runs: the quality chosen in the loop.", "", *(f"- {note}" for note in NOTES)]
    text = "\n".join(lines) + "\n"
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(*zip(*sorted(curve)), marker="o", label=name)
    ax.axhline(reference - 0.5, color="grey", ls="--", lw=1, label="plain float - 0.5 points")
    ax.set_xscale("log")
    ax.set_xlabel("bits/weight (whole file)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0.0, reference - 25), reference + 3)
    ax.set_title(f"{kind}: coded after plain training vs trained for the codec")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
