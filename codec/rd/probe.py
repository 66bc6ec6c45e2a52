"""A user's score probed at the errors a plan lands on (the ``calibrate=`` score path's later rounds).

:func:`codec.rd.allocate.sensitivities` weighs each tensor by the score's drop under one probe at about 1 %
relative error. A budget's plan gives tensors 10-90 % errors, where that probe says little: its drop is mostly the
score's first-order term ``grad . error``, whose sign is chance (the bench CNN's probe and its mirror image moved
the score by opposite amounts 5-100x their mean), and the curvature at 1 % does not predict the drop at 50 % either
(a tensor probed as nearly free got 95 % error and the CNN fell to 18 % accuracy).

:func:`replan_at_errors` plans again from probes at the plan's own errors: each lossy tensor is coded as the plan
codes it and the score is taken with that error and with its mirror image (original minus the error), whose mean
cancels the first-order term (:data:`MIRROR`); the weight is that mean drop per unit distortion (a tensor the plan
keeps at or under the first probe's error is left unprobed, its weight as it stands, :data:`HELD`; with that off it
is probed, both ways, at the first probe's candidate: a smaller error is within the score's rounding).
Up to :data:`ROUNDS` such rounds, each plan scored whole (every tensor decoded as it plans); the plan kept is the
one the score rates highest, the first round's plan included, so a round can only help by the user's score. Cost
per round: one more coding of each lossy tensor, two calls of the score per tensor whose point moved (the memo of
:func:`codec.api.calibrate_score` answers the others) and one for the plan (at -b 1 the bench CNN's rounds call
the score 13 times, the BatchNorm CNN's 33: 15 of them the mirror images of its vectors' 1 % probes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..dtypes import from_float64, to_float64
from ..errors import EncodeError

#: Rounds of probes at the plan's errors after the first plan (each: probes, a plan, its whole score).
ROUNDS = 2

#: Probe a tensor at its plan's error with the mirror image of that error too (two calls of the score; their mean
#: cancels the first-order term), or (False) with the plan's own error alone (one call: the drop that coding gives).
MIRROR = True

#: Leave unprobed (their weights as they stand) the tensors the plan holds at or under their first probe's error,
#: rather than probing them, both ways, at that probe's candidate. On since the twenty-eighth pass (bench/JOURNAL.md,
#: "settle"): with :func:`codec.save`'s replans for the index's share chosen by the score, not by size, no row of
#: the bench's CNN / BatchNorm CNN / MLP at -b 0.6-1.5 lost accuracy against it off (the BatchNorm CNN at -b 1: 60
#: calls of the score against 76, the same file; the CNN -b 0.6 on its second draw +0.74 points). On, the
#: twenty-seventh pass lost 0.77 points on that CNN row: the size rule then kept a plan the score rated lower.
HELD = True

#: A drop is floored at this fraction of the base score's size (at least 1): no tensor is treated as free
#: (the same floor as :func:`codec.rd.allocate.sensitivities`).
FLOOR = 1e-6


def replan_at_errors(tensors, first: tuple, weights: dict[str, float], plan: Callable[[dict[str, float]], tuple],
                     code: Callable, score: Callable[[dict[str, np.ndarray]], float],
                     first_probes: dict[str, object], rounds: int | None = None) -> tuple:
    """The best by ``score`` of the plan ``first`` (``(chosen, ...)``, ``chosen`` name to
    :class:`codec.rd.allocate.RDPoint`) and up to ``rounds`` replans (``plan(weights)``, same form), each planned with
    the weights its predecessor's errors give (module docstring). ``tensors(names)`` yields ``(name, array, dtype)``
    (storage form); ``code(name, array, dtype, point)`` gives the tensor decoded as ``point`` codes it;
    ``first_probes[name]``: the first probe's candidate (its :class:`codec.rd.allocate.RDPoint`) of each probed
    tensor. ``rounds``: :data:`ROUNDS` unless given."""
    rounds = ROUNDS if rounds is None else rounds
    base = score({})
    floor = FLOOR * max(abs(base), 1.0)
    weights = dict(weights)
    current, best, best_score = first, first, -np.inf  # a score of NaN never replaces the first plan
    for round_ in range(rounds + 1):
        chosen = current[0]
        probing = round_ < rounds
        decoded: dict[str, np.ndarray] = {}
        lossy = {n for n, p in chosen.items() if p.nmse > 0}
        for name, array, dtype in tensors(lossy):
            if name not in lossy:
                continue
            point = chosen[name]
            decoded[name] = out = code(name, array, dtype, point)
            if not probing:
                continue
            at = first_probes.get(name)
            if at is not None and point.rel_error <= at.rel_error and HELD:
                continue  # held at or under the first probe's error: its weight stands (no call)
            if at is not None and point.rel_error < at.rel_error:
                point, out = at, code(name, array, dtype, at)
            if MIRROR:
                original = to_float64(array, dtype)
                mirror = from_float64(2 * original - to_float64(out, dtype), dtype)
                del original
                drop = base - (score({name: out}) + score({name: mirror})) / 2
            else:
                drop = base - score({name: out})
            weights[name] = max(drop, floor) / point.nmse
        whole = score(decoded)
        del decoded
        if whole > best_score:
            best, best_score = current, whole
        if not probing:
            break
        try:
            again = plan(weights)
        except EncodeError:  # these weights' damage notes leave no room: the plans so far stand
            break
        if {n: p.options for n, p in again[0].items()} == {n: p.options for n, p in chosen.items()}:
            break  # the weights moved no tensor: the same plan again
        current = again
    return best
