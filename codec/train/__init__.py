"""Training for the codec (torch only; the container and decoder do not change).

``rate(model, setting)``: a differentiable estimate of the bits jwt spends on the weights
(``loss = task + lam * codec.train.rate(model) / n``; in finetune, its ``penalty=``); ``finetune(model, data, ..., overrides=...)``: training with
each weight passed through the real encode/decode of its setting (straight-through gradients), so the model
adapts to the exact file it will be stored as (measured: the way that pays, bench/results/train_mlp.md; ``refresh=4``
codes every 4th step, ``vector_bits=4`` rounds the biases the file stores losslessly: ``round_vectors`` does that
alone); it ends on the starting weights, with a ``NotKeptWarning``, when they code to a better file on held-out
batches (``validation=``);
``finetune(..., budget=0.3)`` (or a :class:`Budget`) picks the largest JPEG tensor's quality in the loop so that the
whole file stays within 0.3 bits/weight, and the last coding is the file (``Budget.save`` writes it; a budget below
the loop's first file trains from the setting's or the coarsest quality, and a file still over it at the end is
refused: ``Budget.within``);
``DCTLinear`` / ``DCTConv2d``: layers held as low-frequency DCT coefficients of JPEG's 8x8 blocks,
``to_ordinary`` turns them back into ordinary layers;
``InputMask(model, inputs, below=0.1)``: an optimizer step hook that holds at zero the largest linear layer's weight
columns whose input is nonzero in fewer than 10 % of the samples (weights that see no data: their bytes go to the
rest: bench/JOURNAL.md, twenty-seventh pass);
``TileClip(model, k=4.0, overrides=...)``: an optimizer step hook that clips the largest JPEG tensor's weights to
each tile's mean +- 4 standard deviations, so one outlier does not widen a whole tile's step (bench/JOURNAL.md,
thirtieth pass);
``order_units(model, "fc1", "fc2", optimizer)``: a hidden layer's units reordered (its rows, the next layer's
columns, Adam's moments alike: the same network) so that neighbouring rows are alike and JPEG's blocks smoother
down the columns; between two finetune calls early in the loop (bench/JOURNAL.md, thirty-first pass).
"""

from .budget import Budget, BudgetDamageWarning
from .clip import TileClip
from .dct import DCTConv2d, DCTLinear, to_ordinary, with_dct_layers
from .finetune import NotKeptWarning, as_overrides, coded_weights, finetune, round_vector, round_vectors
from .mask import InputMask
from .order import order_units, similar_order
from .rate import as_setting, entropy_bits, rate, tensor_rate

__all__ = ["Budget", "BudgetDamageWarning", "DCTConv2d", "DCTLinear", "InputMask", "NotKeptWarning", "TileClip",
           "as_overrides", "as_setting", "coded_weights", "entropy_bits", "finetune", "order_units", "rate",
           "round_vector", "round_vectors", "similar_order", "tensor_rate", "to_ordinary", "with_dct_layers"]
