"""Codec-in-the-loop fine-tuning: the forward pass sees the weights exactly as the file will hold them.

Each step codes every floating tensor of the model with the real encoder of its setting and decodes it
(:func:`codec.tensorcodec.encode_tensor` / :func:`~codec.tensorcodec.decode_tensor` on the storage form, the
bytes ``codec.save`` writes), runs the model on those values (:func:`torch.func.functional_call`) and passes the
gradient straight through to the float weights (``coded + (w - w.detach())``: exactly the coded values forward,
gradient 1 to ``w``). The float weights keep the small updates that rounding would erase, and the model adapts
to its file.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch.func import functional_call

from ..errors import EncodeError
from ..format import TensorEntry
from ..tensorcodec import EncodeOptions, Overrides, decode_tensor, encode_tensor, not_applied
from .rate import as_setting

__all__ = ["as_overrides", "coded_weights", "finetune"]

#: Per-tensor settings as codec.save takes them: ``{glob: setting}`` or ``[(glob, setting), ...]``.
OverrideRules = Mapping[str, str] | Sequence[tuple[str, str]] | None


def coded_weights(model: torch.nn.Module, setting: EncodeOptions | str | Mapping | None = None,
                  names: Iterable[str] | None = None, overrides: Overrides | OverrideRules = None
                  ) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the model's state_dict as ``codec.save(model, path, overrides=overrides, **fields of
    setting)`` stores it, decoded (no gradients): what :func:`codec.load` will give. ``overrides``: per-tensor
    settings by glob, as codec.save takes them (the last match wins). ``names`` limits it to some tensors."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"coded_weights: model must be a torch.nn.Module, not {type(model).__name__}")
    opts, rules = as_setting(setting), as_overrides(overrides, setting)
    state = model.state_dict()
    wanted = state.keys() if names is None else names
    return {name: _code(state[name], rules.options_for(name, opts) or opts) for name in wanted}


def as_overrides(overrides: Overrides | OverrideRules, setting=None) -> Overrides:
    """:class:`codec.tensorcodec.Overrides` of ``overrides`` (None, a mapping or a list of ``(glob, setting)``),
    every setting checked against ``setting`` (a bad one is a one-line ValueError here, not mid-training)."""
    if isinstance(overrides, Overrides):
        rules = overrides
    elif overrides is None or isinstance(overrides, Mapping) or (
            isinstance(overrides, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == 2
                                                          for r in overrides)):
        rules = Overrides(overrides)
    else:
        raise TypeError(f"overrides must be a mapping or a list of (glob, setting) pairs, "
                        f"not {type(overrides).__name__}")
    try:
        rules.check(as_setting(setting))
    except EncodeError as exc:
        raise ValueError(f"overrides: {exc}") from None
    return rules


def _code(t: torch.Tensor, opts: EncodeOptions) -> torch.Tensor:
    """The real encode/decode of one tensor (a copy of it, on its device); a tensor stored losslessly is its own
    decoded value, and is copied without coding it."""
    from ..api import to_numpy, to_torch
    from ..dtypes import get_dtype

    array, name = to_numpy(t.detach())
    dtype = get_dtype(name)
    if opts.codec == "lossless" or (not_applied(array.shape, dtype, opts) or "").startswith("stored losslessly"):
        return t.detach().clone()
    encoded = encode_tensor(array, dtype, opts)
    decoded = decode_tensor(TensorEntry("", dtype, tuple(array.shape), encoded.codec, encoded.tiling), encoded.blobs)
    return to_torch(decoded, name).to(t.device).clone()


def _batches(data) -> Iterable:
    """Batches of ``data``: a tensor (one batch) or an iterable of batches (re-iterated for each pass)."""
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        return data
    raise TypeError(f"finetune: data must be a tensor or an iterable of batches, not {type(data).__name__}")


def _split(batch) -> tuple[object, tuple]:
    """``(inputs, rest)``: a batch is the inputs, or a tuple/list whose first item is the inputs."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("finetune: an empty batch")
        return batch[0], tuple(batch[1:])
    return batch, ()


def finetune(model: torch.nn.Module, data, loss_fn: Callable[..., torch.Tensor] | None = None,
             setting: EncodeOptions | str | Mapping | None = None, steps: int = 100, lr: float = 1e-4,
             progress=False, overrides: Overrides | OverrideRules = None) -> torch.nn.Module:
    """Fine-tune ``model`` in place, ``steps`` Adam steps at ``lr``, with every tensor coded as ``setting`` stores
    it (see :func:`codec.train.as_setting`; ``overrides``: per-tensor settings by glob, as codec.save takes them;
    save afterwards with the same options and overrides) in the forward pass.

    ``data``: a tensor of inputs or an iterable of batches (cycled), each the inputs or ``(inputs, *targets)``.
    ``loss_fn(outputs, *targets)``: the loss; None distils the original model's outputs (mean squared error of
    the outputs: no labels needed). ``progress``: True for a progress bar of its own, or a tqdm bar to update
    once a step. Returns the model, with its float weights; the file saved from it with the
    same setting decodes to exactly the weights of the last forward pass (``coded_weights(model, setting)``),
    which is run after the last update to report the final loss.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"finetune: model must be a torch.nn.Module, not {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"finetune: loss_fn must be callable or None, not {type(loss_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"finetune: steps must be a non-negative integer, not {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"finetune: lr must be a positive number, not {lr!r}")
    opts, rules = as_setting(setting), as_overrides(overrides, setting)
    batches = _batches(data)
    teacher = None
    if loss_fn is None:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(params.values(), lr=float(lr))
    stream = itertools.cycle(batches) if steps else iter(())
    own_bar = progress is True
    bar = progress if hasattr(progress, "update") else None  # the caller's bar: one update a step
    if own_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps + 1, desc="finetune", unit="step")

    def loss_at(batch) -> torch.Tensor:
        inputs, rest = _split(batch)
        coded = coded_weights(model, opts, overrides=rules)
        for name, p in params.items():  # straight through: coded values forward, identity backward
            coded[name] = coded[name] + (p - p.detach())  # exactly the coded values (+0), gradient 1 to p
        if teacher is None:
            return loss_fn(functional_call(model, coded, (inputs,)), *rest)
        with torch.no_grad():
            target = teacher(inputs)
        return torch.nn.functional.mse_loss(functional_call(model, coded, (inputs,)), target)

    was_training = model.training
    model.train()
    last = None
    for _ in range(steps):
        last = next(stream)
        optimizer.zero_grad()
        loss = loss_at(last)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4g}")
    model.train(was_training)
    if last is None:
        last = next(iter(batches), None)
    if last is not None:
        with torch.no_grad():
            final = loss_at(last)
        if own_bar:
            bar.update(1)
            bar.set_postfix(loss=f"{final.item():.4g}")
    if own_bar:
        bar.close()
    return model
