"""Sequential coding with repair: code the lossy tensors in forward order and let the rest make up for them.

Encoder side only; the decoder and the file format are unchanged. Given a
model, unlabelled calibration inputs and the options the allocator chose for
every stored tensor, :func:`code_with_repair` returns the values to encode
instead of the original ones:

1. The lossy tensors are coded one at a time in the order a forward pass
   first uses them (found with hooks). Coding one means encoding it with its
   planned options and decoding the result; from then on the working copy of
   the model holds the decoded values, exactly what a reader will get.
2. After each, what is not yet coded repairs the damage: the layer's own bias
   (when stored losslessly) takes the closed-form correction
   ``b += (W - W_hat) E[x]`` over the layer's inputs in the partly coded
   model, then a few Adam steps of distillation (MSE to the original model's
   outputs, no labels) train every parameter whose final value is still
   free: the weights not yet coded and everything stored losslessly (biases,
   norm layers).
3. A weight coded with ``quant`` is rounded by GPTQ (:mod:`codec.rd.gptq`)
   with the second moment ``H = E[x x^T]`` of its inputs in the partly coded
   model, so its rounding errors are fed forward through ``H^-1`` instead of
   left where they fall; a ``jpeg`` weight likewise, a group of columns (a
   column of tiles, or an 8x8 block of each row's image) at a time.
4. A final pass of distillation trains the losslessly stored parameters alone.

Every returned target is what was encoded when its tensor's turn came, and
the working model held that encoding's decoded values from then on, so
encoding ``targets[name]`` with ``options[name]`` (deterministic) gives
exactly the model the repair was computed for.
"""

# The modules, each importing only those above it (none of them reads a name of this one):
#   settings  RepairSettings, Repaired, held_out
#   slots     the stored tensors of the working model (_Slot, _slots) and _code (encode, then decode)
#   inputs    calibration batches and forward hooks (_check_inputs, forward_order, _Inputs)
#   losses    output errors, distillation and codec-in-the-loop fine-tuning (output_error, _distill, _finetune)
#   fit       a layer's least-squares fit (_LayerFit, _HeldOut)
#   budget    coding within the byte budget (_code_within, _fit_size, constant_growth, moved_growth)
#   loop      the entry points and the sequential loop (code_with_repair, repair, _repair, _refit_judged)
# The names below are re-exported for ``from codec.rd.repair import X``. A monkeypatch must set a name in the
# module whose code reads it (e.g. ``codec.rd.repair.budget.RESERVE``, read by ``_held``): setting it here changes
# nothing that repair runs.

from .budget import (FINE_STEP, PRUNE_SPAN, PRUNE_STEP, PRUNE_UNDER, RESERVE, STEP_UP_FROM, VECTOR_FLOOR,
                     constant_growth, fitted_share, moved_growth)
from .fit import SPLIT_MOMENT_BYTES
from .inputs import forward_order
from .losses import LOSSLESS, TUNED_CODECS, output_error
from .loop import RESPEND_FROM, RESPEND_WEIGHTS, code_with_repair, repair
from .settings import HOLDOUT_EVERY, Repaired, RepairSettings, held_out

__all__ = ["RepairSettings", "Repaired", "code_with_repair", "forward_order", "output_error", "repair"]
