"""Layers whose weights are held as low-frequency DCT coefficients of 8x8 blocks (JPEG's blocks).

A weight is coded by jwt as a matrix (rows: the first axis, columns: the rest flattened) cut into tiles whose
8x8 blocks are JPEG's blocks (grid tiles start at multiples of 64, so the blocks of the matrix and of the JPEG
images coincide). :class:`DCTLinear` and :class:`DCTConv2d` hold, for every 8x8 block of that matrix, only the
``keep x keep`` lowest frequencies of its orthonormal DCT (JPEG's transform); the weight is their inverse DCT.
They train like ordinary layers (gradients reach the coefficients), have ``keep**2 / 64`` of the parameters,
and :func:`to_ordinary` turns them back into ``nn.Linear`` / ``nn.Conv2d`` with the same outputs, whose
state_dict ``codec.save`` stores like any other: the JPEG of such a weight has nothing above those frequencies
but the pixel rounding, so at a quality that keeps them the file loses little on top of the training.

Measured against the other ways of training for the codec in bench/results/train_mlp.md (``--dct``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .rate import _dct_matrix

__all__ = ["DCTConv2d", "DCTLinear", "to_ordinary", "with_dct_layers"]

BLOCK = 8


class _DCTWeight(torch.nn.Module):
    """A weight of ``shape`` as ``keep x keep`` DCT coefficients per 8x8 block of its matrix view."""

    def __init__(self, shape: tuple[int, ...], keep: int, weight: torch.Tensor | None = None, rescale: bool = True):
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= BLOCK:
            raise ValueError(f"keep must be an integer 1..{BLOCK}, not {keep!r}")
        self.shape, self.keep = tuple(shape), keep
        self.rows, self.cols = shape[0], math.prod(shape[1:])
        self.coeffs = torch.nn.Parameter(torch.zeros(-(-self.rows // BLOCK), -(-self.cols // BLOCK), keep, keep))
        if weight is not None:
            with torch.no_grad():
                self.coeffs.copy_(self.project(weight) * (BLOCK / keep if rescale else 1.0))

    def basis(self) -> torch.Tensor:
        return _dct_matrix()[: self.keep].to(self.coeffs.device, self.coeffs.dtype)  # [keep, 8]

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept coefficients of ``weight`` (zero-padded to whole blocks)."""
        gr, gc = self.coeffs.shape[:2]
        m = weight.detach().reshape(self.rows, self.cols).to(self.coeffs.dtype)
        m = F.pad(m, (0, gc * BLOCK - self.cols, 0, gr * BLOCK - self.rows))
        blocks = m.reshape(gr, BLOCK, gc, BLOCK).permute(0, 2, 1, 3)
        d = self.basis()
        return d @ blocks @ d.T

    def forward(self) -> torch.Tensor:
        d = self.basis()
        blocks = d.T @ self.coeffs @ d  # [gr, gc, 8, 8]
        gr, gc = blocks.shape[:2]
        m = blocks.permute(0, 2, 1, 3).reshape(gr * BLOCK, gc * BLOCK)[: self.rows, : self.cols]
        return m.reshape(self.shape)


class DCTLinear(torch.nn.Module):
    """``nn.Linear`` with its weight held as ``keep x keep`` low-frequency DCT coefficients per 8x8 block.

    ``DCTLinear(in_features, out_features, keep=2)`` starts from nn.Linear's initialisation projected onto the
    kept frequencies and scaled back to its spread; :meth:`from_linear` starts from a given layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, keep: int = 2,
                 _init: torch.nn.Linear | None = None, rescale: bool = True):
        super().__init__()
        layer = _init if _init is not None else torch.nn.Linear(in_features, out_features, bias=bias)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dct = _DCTWeight(tuple(layer.weight.shape), keep, layer.weight, rescale)
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach().clone())

    @classmethod
    def from_linear(cls, layer: torch.nn.Linear, keep: int = 2, rescale: bool = False) -> DCTLinear:
        """A DCTLinear from ``layer``: its weight projected on the kept frequencies (``rescale``: scaled back to
        the weight's spread, for a freshly initialised layer)."""
        if not isinstance(layer, torch.nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, not {type(layer).__name__}")
        return cls(layer.in_features, layer.out_features, layer.bias is not None, keep, layer, rescale)

    @property
    def weight(self) -> torch.Tensor:
        return self.dct()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_ordinary(self) -> torch.nn.Linear:
        """The ``nn.Linear`` with this layer's weight and bias."""
        layer = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class DCTConv2d(torch.nn.Module):
    """``nn.Conv2d`` with its weight ``[out, in/groups, kh, kw]`` held as ``keep x keep`` low-frequency DCT
    coefficients per 8x8 block of its matrix view ``[out, in/groups * kh * kw]`` (jwt's view of it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, keep: int = 2, _init: torch.nn.Conv2d | None = None,
                 rescale: bool = True):
        super().__init__()
        layer = _init if _init is not None else torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                                                padding, dilation, groups, bias)
        if not isinstance(layer.padding, tuple) or layer.padding_mode != "zeros":
            raise ValueError("DCTConv2d: only numeric padding with zeros")
        self.conv_args = {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                          "kernel_size": layer.kernel_size, "stride": layer.stride, "padding": layer.padding,
                          "dilation": layer.dilation, "groups": layer.groups}
        self.dct = _DCTWeight(tuple(layer.weight.shape), keep, layer.weight, rescale)
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach().clone())

    @classmethod
    def from_conv(cls, layer: torch.nn.Conv2d, keep: int = 2, rescale: bool = False) -> DCTConv2d:
        """A DCTConv2d from ``layer`` (see :meth:`DCTLinear.from_linear`)."""
        if not isinstance(layer, torch.nn.Conv2d):
            raise TypeError(f"from_conv: expected an nn.Conv2d, not {type(layer).__name__}")
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, bias=layer.bias is not None,
                   keep=keep, _init=layer, rescale=rescale)

    @property
    def weight(self) -> torch.Tensor:
        return self.dct()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        return F.conv2d(x, self.weight, self.bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    def to_ordinary(self) -> torch.nn.Conv2d:
        """The ``nn.Conv2d`` with this layer's weight and bias."""
        layer = torch.nn.Conv2d(**self.conv_args, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


def with_dct_layers(model: torch.nn.Module, names: Iterable[str], keep: int = 2,
                    rescale: bool = True) -> torch.nn.Module:
    """Replace the named ``nn.Linear`` / ``nn.Conv2d`` submodules of ``model`` (in place) by DCT layers started
    from them (``rescale``: scaled back to their spread, right for a fresh model; False: their projection, for a
    trained one). Returns the model."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"with_dct_layers: model must be a torch.nn.Module, not {type(model).__name__}")
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, torch.nn.Linear):
            new = DCTLinear.from_linear(layer, keep, rescale)
        elif isinstance(layer, torch.nn.Conv2d):
            new = DCTConv2d.from_conv(layer, keep, rescale)
        else:
            raise TypeError(f"with_dct_layers: {name!r} is a {type(layer).__name__}, not an nn.Linear or nn.Conv2d")
        _set(model, name, new)
    return model


def to_ordinary(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every DCT layer of ``model`` (in place) by its ordinary layer: the state_dict then has the names
    and shapes of the original model's, and ``codec.save`` stores it. Returns the model (or the ordinary layer,
    if ``model`` is itself a DCT layer)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_ordinary: model must be a torch.nn.Module, not {type(model).__name__}")
    if isinstance(model, (DCTLinear, DCTConv2d)):
        return model.to_ordinary()
    for name, module in list(model.named_modules()):
        if isinstance(module, (DCTLinear, DCTConv2d)):
            _set(model, name, module.to_ordinary())
    return model


def _set(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
