"""Repair's settings and results: :class:`RepairSettings` (how much repair to do), :class:`Repaired` (what
:func:`codec.rd.repair.repair` returns) and :func:`held_out` (the calibration batches a fit is checked on).

The bottom of the package: every other module of :mod:`codec.rd.repair` reads these, and this one imports none of
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ...tensorcodec import Encoded, EncodeOptions
from ..calibrate import FULL_H_MAX


#: The refit holds out every this-many-th calibration batch to check that it generalizes (from this many batches).
HOLDOUT_EVERY = 4


def held_out(n: int) -> list[int]:
    """The indices of ``n`` batches held out to check a fit (every :data:`HOLDOUT_EVERY`-th, from that many batches;
    none below); repair's refit and fine-tuning and :func:`codec.train.finetune` use it."""
    return [i for i in range(n) if n >= HOLDOUT_EVERY and i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]


@dataclass(frozen=True)
class RepairSettings:
    """How much repair to do.

    The defaults are the closed-form steps alone (refit, GPTQ, least-squares
    bias), which measured best for their time on the bench MLP and CNN
    (``python -m bench.repair``): distillation on top (``steps``,
    ``final_steps``) moved test accuracy by at most 0.2 points there, at 3-5
    times the time.
    """

    #: Adam steps of distillation after each lossy tensor is coded, on everything still free (0: none).
    steps: int = 0
    #: Adam steps on the losslessly stored parameters once everything is coded (0: none).
    final_steps: int = 0
    #: Adam learning rate.
    lr: float = 1e-3
    #: Least-squares bias of each coded Linear / ConvNd layer, when its bias is stored losslessly.
    bias_correction: bool = True
    #: After a Linear / ConvNd layer without a bias of its own is coded, the BatchNorm that follows it takes a
    #: per-channel least-squares gain as well as the mean (its weight times ``a``, its running mean moved to match):
    #: ``a = cov(z, z_hat) / var(z_hat)`` of the original layer's outputs ``z`` and the coded one's ``z_hat`` over
    #: the calibration inputs, so the normalized output is the best affine estimate of the original's, channel by
    #: channel (the bias correction alone is ``a = 1``).
    batchnorm_gain: bool = False
    #: Before coding a Linear / ConvNd weight, refit it by ridge regression so the layer maps its inputs in the
    #: partly coded model to the original layer's outputs (needs a pass of the original model per layer); kept only
    #: where, fitted on the other batches, it lowers the model's output error on the held-out ones
    #: (:func:`_refit_judged`; from :data:`HOLDOUT_EVERY` batches, none below).
    refit: bool = True
    #: GPTQ rounding for ``quant`` weights of Linear / ConvNd layers.
    gptq: bool = True
    #: The same for ``jpeg`` weights, a group of columns at a time (:func:`codec.rd.gptq.jpeg_target`). Measured
    #: on all-MiniLM-L6-v2's FFN and attention matrices: 2-2.5x less output error on held-out sentences at +0.1-0.3 %
    #: of the tensor's bytes.
    compensate: bool = True
    #: A ``jpeg`` weight in ``rows`` mode (a tile per output unit) is also coded at higher qualities with the DCT
    #: coefficients that matter least to the output pruned to fit its size (:mod:`codec.rd.rdo`: each unit's
    #: output sensitivity times the tile's scale and the inputs' energy), and each candidate coding is scored by the
    #: output error weighted by the units' sensitivities. Needs ``keep_size``.
    prune: bool = True
    #: ``prune`` in grid tiles too (any JPEG weight). Measured on the bench CNN and BatchNorm CNN at ``-b 0.6``
    #: (fc1 in 64 x 64 tiles at quality 5, conv2 / conv3): no pruned coding won, the same files as without, for
    #: up to 1.2x the repair's CPU time.
    prune_grid: bool = False
    #: Damping of GPTQ, JPEG compensation and the refit, a fraction of the mean diagonal of ``H``.
    damp: float = 0.01
    #: The same for a layer with no more calibration rows than input columns, whose ``H`` is rank-deficient: the
    #: compensation and the refit then fit the calibration inputs' own subspace. Measured on the bench BatchNorm CNN
    #: at ``-b 0.6`` (fc1: 3,136 inputs, 2,000 calibration images; bench/JOURNAL.md, "Lead's checks after the merges
    #: (eleventh pass)"): with 0.01 repair kept fc1's compensated coding at q3.15 over the plan's q6 by the
    #: calibration inputs' error, and the held-out KL rose by a third.
    damp_few_rows: float = 0.1
    #: A Linear / Conv layer with more input columns than this gets no ``H`` (8 x columns^2 bytes, factored in
    #: columns^3 time): its weight is coded as it stands and only its bias is corrected, from the inputs' means (a
    #: note names it). The default is calibration's own limit (:data:`codec.rd.calibrate.FULL_H_MAX`, above which it
    #: keeps H's diagonal: 8192). Measured on a grouped CNN whose head is ``Linear(6272, 10)`` (81 % of its weights),
    #: ``-b 2`` with 1,000 images (bench/JOURNAL.md, nineteenth pass): 82.49 % in 36.5 CPU s and +428 MB with the
    #: head's full ``H``, 81.45 % in 4.2 CPU s and no memory above the model's without (``max_columns=4096``); a
    #: VGG-like head (25,088 columns) would need 5 GB.
    max_columns: int = FULL_H_MAX
    #: Seed of torch's generator during repair (the caller's generator state is restored after).
    seed: int = 0
    #: Calibration batches used to collect a layer's input statistics (None: all).
    stats_batches: int | None = None
    #: Keep every lossy tensor within the bytes its planned options give the original values: refit and GPTQ
    #: values can code larger (measured: the bench CNN's file grew from 0.60 to 0.65 bits/weight at ``-b 0.6``),
    #: so a tensor that would grow past its plan plus what the tensors before it saved is coded with the next
    #: cheaper options (JPEG quality - 1, JPEG XL distance x 1.1) until it fits.
    keep_size: bool = True
    #: A tensor that fits its plan with credit to spare is coded with dearer options while they fit
    #: (:func:`_stepped_up`). Only when repair is given a ``spare`` (:func:`repair`): without one, the plan is within
    #: :data:`codec.encode.SPARE_MARGIN` of the budget and the savings keep-size leaves are that margin (measured:
    #: all-MiniLM-L6-v2 at ``-b 3.5`` spent them and ended at 3.5001 bits/weight, over, at 4x repair's CPU time).
    step_up: bool = True
    #: Codec-in-the-loop fine-tuning once everything is coded (:func:`codec.train.finetune`, see :func:`_finetune`):
    #: this many Adam steps on the floating parameters stored losslessly and the weights coded with ``quant``, each
    #: lossy tensor passed through its real encode/decode (straight-through gradients to float shadows that start at
    #: the repaired targets), matching the original model's outputs on the calibration inputs but every
    #: :data:`HOLDOUT_EVERY`-th batch; kept only when it lowers the output error on those held-out batches, the
    #: re-coded tensors within their planned bytes (0: none).
    finetune_steps: int = 0
    #: Adam learning rate of the fine-tuning.
    finetune_lr: float = 1e-4
    #: Code the weights every this many fine-tuning steps (the residual of the last coding passed in between).
    finetune_refresh: int = 4
    #: Fine-tuning loss: "mse" (relative MSE of every floating output, as repair) or "kl" (KL divergence of the
    #: softmax of the outputs' last axis at temperature 2: for classifiers, whose outputs are logits).
    finetune_loss: str = "mse"
    #: Names (the model's) of ``jpeg`` weights coded without JPEG compensation (their refit or weight coded as it
    #: is, keep-size's steps and pruning as for any other): a plan priced at repair's codings (:mod:`codec.rd.price`)
    #: chose their uncompensated point over the compensated one, so compensating them would code a target the plan
    #: did not buy. Measured on the bench BatchNorm CNN at ``-b 0.6``: the plan chose fc1's uncompensated q6, repair
    #: coded its compensated target (2.1x the bytes at q6) at q3.92 instead, which erred less on the calibration
    #: inputs and more on held-out ones (bench/JOURNAL.md, "refit (thirty-first pass)"). Set by :func:`codec.save`
    #: and ``bench.repair`` from their plan.
    plain_jpeg: frozenset[str] = frozenset()


@dataclass
class Repaired:
    """What :func:`repair` produced."""

    #: name -> array in storage form to encode instead of the original (the tensors the repair changed).
    targets: dict[str, np.ndarray]
    #: One-line remarks for the user.
    notes: list[str]
    #: The working copy holding exactly the values a reader decodes from ``targets`` and the options.
    model: nn.Module
    #: name -> the options to encode with, where repair had to change the planned ones (``keep_size``).
    options: dict[str, EncodeOptions]
    #: name -> every lossy tensor's encoding: its target coded with its options (``Encoded.rel_error`` measured),
    #: what a writer stores for it without coding it again.
    encoded: dict[str, Encoded]
