"""Element types of stored tensors and their numpy storage representation.

The format names dtypes by string. numpy has no bfloat16 or float8, so those
travel through numpy as unsigned integers holding the bit patterns (the
"storage dtype"); the torch edge (:mod:`codec.api`) reinterprets them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EncodeError

__all__ = ["DType", "DTYPES", "get_dtype", "to_float64", "from_float64"]


@dataclass(frozen=True)
class DType:
    """One element type: its format name, numpy storage dtype and kind."""

    name: str
    storage: np.dtype
    #: True for floating types, which the lossy (image) codecs accept.
    floating: bool

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.storage.itemsize


def _dt(name: str, storage: str, floating: bool = False) -> DType:
    return DType(name, np.dtype(storage), floating)


#: Every dtype the format knows, by name. Names are never reused.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _dt("float64", "<f8", True),
        _dt("float32", "<f4", True),
        _dt("float16", "<f2", True),
        _dt("bfloat16", "<u2", True),
        _dt("float8_e4m3fn", "u1"),
        _dt("float8_e5m2", "u1"),
        _dt("int64", "<i8"),
        _dt("int32", "<i4"),
        _dt("int16", "<i2"),
        _dt("int8", "i1"),
        _dt("uint64", "<u8"),
        _dt("uint32", "<u4"),
        _dt("uint16", "<u2"),
        _dt("uint8", "u1"),
        _dt("bool", "?"),
    )
}


def get_dtype(name: str) -> DType:
    """Return the :class:`DType` called ``name``; EncodeError if unknown."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise EncodeError(f"unsupported dtype {name!r}") from None


def to_float64(array: np.ndarray, dtype: DType) -> np.ndarray:
    """Return the values of a floating tensor in storage form as float64."""
    if dtype.name == "bfloat16":
        bits = array.astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return array.astype(np.float64)


def from_float64(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Round float64 values to ``dtype``'s storage form (round half to even).

    float32/float16/float64 use IEEE conversion; bfloat16 rounds to float32
    first, then keeps the top 16 bits with round-half-to-even on the rest
    (NaN cannot occur: lossy tensors are finite). Values beyond the dtype's
    range round to infinity, as IEEE specifies, without a RuntimeWarning.
    """
    with np.errstate(over="ignore"):
        if dtype.name != "bfloat16":
            return values.astype(dtype.storage)
        bits = values.astype(np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return ((bits + rounding) >> 16).astype(np.uint16)


#: Significand bits (after the leading one) of the floating dtypes whose values an encoder may round
#: (:func:`round_significand`).
SIGNIFICAND = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}


def round_significand(values: np.ndarray, dtype: DType, bits: int) -> np.ndarray:
    """``values`` (storage form, finite) with each significand rounded to ``bits`` bits after the leading one
    (to nearest, ties to even), in storage form again: at most ``2**-(bits + 1)`` relative error an element.

    An encoder's lossy option for a tensor the image codecs cannot take (a bias, a norm layer's parameters, an
    update's difference of them): stored with the lossless codec, the zeroed low bits cost next to nothing, and
    the decoder is the lossless one. Rounding twice to the same ``bits`` gives the same values.
    """
    x = to_float64(values, dtype)
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return from_float64(np.ldexp(np.round(np.ldexp(mantissa, bits + 1)), exponent - bits - 1), dtype)
