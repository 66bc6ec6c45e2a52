"""Weights that read quiet inputs, held at zero in a training loop (:class:`InputMask`).

A linear layer's weight column that reads an input which is zero in nearly every sample gets next to no gradient:
it keeps its random initial values, and the file pays for them as for any trained weight. On Fashion-MNIST the
border pixels are 0 in most images: of the bench MLP's 784 ``fc1`` inputs, 105 are nonzero in fewer than 10 % of
the training images, and the codec loop's ``fc1`` columns that read them hold values of RMS 0.046 against 0.052 for
the rest (bench/JOURNAL.md, twenty-seventh pass). Held at zero, they code as cheaper JPEG blocks and the budget
spends the bytes on the weights that see data. Encoder-side only: the file and the decoder do not change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["InputMask"]


class _Seen(BaseException):
    """Raised by the activity pass's hook once every masked layer has seen a batch's input (a BaseException, so that
    a model's own ``except Exception`` does not swallow it)."""


class InputMask:
    """An optimizer step post-hook (``optimizer.register_step_post_hook(mask)``) that zeroes, after every step, the
    columns of each of ``layers``' weights (``torch.nn.Linear`` modules, by name; default: the model's largest one)
    whose input is nonzero in fewer than ``below`` (a fraction, 0 to 1) of the samples of ``data``.

    ``data``: the inputs the activity is measured on, once, here, with the model as given (a tensor or array of
    inputs, a mapping of them such as a tokenizer's output, or an iterable of batches, each the inputs or
    ``(inputs, *targets)``, as :func:`codec.train.finetune` takes them; a sample is one row of the layer's input
    flattened over its leading dimensions: an image, or a token; a layer called more than once in a forward counts
    its first call, and each forward stops once every layer has its input). The columns are zeroed here too.
    :attr:`columns` holds ``{layer: the zeroed column indices}``, :attr:`activity` ``{layer: the fraction of
    samples in which each input is nonzero}``."""

    def __init__(self, model: torch.nn.Module, data, below: float = 0.1, layers: Iterable[str] | str | None = None):
        from .finetune import _batches, _run, _split

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"InputMask: model must be a torch.nn.Module, not {type(model).__name__}")
        if isinstance(below, bool) or not isinstance(below, (int, float)):
            raise TypeError(f"InputMask: below must be a number (a fraction from 0 to 1), not {below!r}")
        if not 0 <= below <= 1:
            raise ValueError(f"InputMask: below must be a fraction from 0 to 1, not {below!r}")
        modules = dict(model.named_modules())
        if layers is None:
            linear = [(m.weight.numel(), name) for name, m in modules.items() if isinstance(m, torch.nn.Linear)]
            if not linear:
                raise ValueError("InputMask: the model holds no torch.nn.Linear layer (layers= names them)")
            layers = [max(linear)[1]]
        elif isinstance(layers, str):
            layers = [layers]
        self.layers: dict[str, torch.nn.Linear] = {}
        for name in layers:
            if not isinstance(modules.get(name), torch.nn.Linear):
                raise ValueError(f"InputMask: layer {name!r} is "
                                 f"{'not in the model' if name not in modules else type(modules[name]).__name__}; "
                                 f"it takes torch.nn.Linear layers ("
                                 f"{', '.join(n for n, m in modules.items() if isinstance(m, torch.nn.Linear))})")
            self.layers[name] = modules[name]
        counts = {name: [0, torch.zeros(m.in_features, dtype=torch.float64)] for name, m in self.layers.items()}
        seen: set[str] = set()

        def counter(name):
            def hook(_module, args):
                if name in seen:
                    return
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                counts[name][0] += x.shape[0]
                counts[name][1] += (x != 0).sum(0, dtype=torch.float64)
                seen.add(name)
                if len(seen) == len(self.layers):
                    raise _Seen  # every layer has its input: the rest of the forward is not needed
            return hook

        handles = [m.register_forward_pre_hook(counter(name)) for name, m in self.layers.items()]
        mode = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in _batches(data, "data"):
                    seen.clear()
                    try:
                        _run(model, _split(batch)[0])
                    except _Seen:
                        pass
        finally:
            model.train(mode)
            for handle in handles:
                handle.remove()
        unseen = [name for name, (n, _) in counts.items() if n == 0]
        if unseen:
            raise ValueError(f"InputMask: data held no samples that reach {', '.join(map(repr, unseen))}")
        self.activity = {name: (nonzero / n).float() for name, (n, nonzero) in counts.items()}
        self.columns = {name: (a < below).nonzero().flatten() for name, a in self.activity.items()}
        # Each layer's columns to keep as a row of ones with zeros at the quiet columns, multiplied in after every
        # step: one pass over the weight, 47 us on the bench MLP's fc1 (512 x 784, 105 columns) against 164 us for
        # index_fill_ along its columns (a strided write per index), 0.11 CPU s over the MLP's 938-step loop, 1.7 %
        # of its plain schedule (bench/JOURNAL.md, twenty-eighth pass). A quiet column then holds +0 or -0 (the sign
        # of the weight it held; equal to 0, and JPEG and quant map both to the same pixel); one that held inf or NaN
        # (a diverged run) holds NaN.
        self._keep = {name: self._ones_but(layer.weight, self.columns[name])
                      for name, layer in self.layers.items() if len(self.columns[name])}
        self()

    @staticmethod
    def _ones_but(weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """A row of ones of ``weight``'s dtype and device, zero at ``columns``."""
        keep = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)
        keep[columns.to(weight.device)] = 0
        return keep

    def __call__(self, *_) -> None:
        with torch.no_grad():
            for name, keep in self._keep.items():
                weight = self.layers[name].weight
                if keep.dtype != weight.dtype or keep.device != weight.device:  # the model moved or was cast
                    keep = self._keep[name] = self._ones_but(weight, self.columns[name])
                weight.mul_(keep)

    def __repr__(self) -> str:
        return "InputMask(" + ", ".join(f"{name}: {len(c)} of {self.layers[name].in_features} columns"
                                        for name, c in self.columns.items()) + ")"
