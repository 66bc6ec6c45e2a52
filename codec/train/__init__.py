"""Training for the codec (torch only; the container and decoder do not change).

``rate(model, setting)``: a differentiable estimate of the bits jwt spends on the weights
(``loss = task + lam * codec.train.rate(model) / n``); ``finetune(model, data, ...)``: fine-tuning with
each weight passed through the real encode/decode of its setting (straight-through gradients), so the
model adapts to the exact file it will be stored as.
"""

from .finetune import coded_weights, finetune
from .rate import as_setting, entropy_bits, rate, tensor_rate

__all__ = ["as_setting", "coded_weights", "entropy_bits", "finetune", "rate", "tensor_rate"]
