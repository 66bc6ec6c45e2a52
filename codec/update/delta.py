"""The arithmetic of updates: ``new = base + difference``, rounded once to the tensor's dtype (spec 12.3)."""

from __future__ import annotations

import numpy as np

from ..dtypes import DType, from_float64, round_significand, to_float64

__all__ = ["add_difference", "difference", "round_significand"]


def add_difference(base: np.ndarray, diff: np.ndarray, dtype: DType) -> np.ndarray:
    """``base + diff`` (storage form) rounded once to ``dtype``, as a new array.

    The spec's rule is the exact sum rounded to nearest (ties to even) in
    the dtype, which is what IEEE addition in the dtype gives; numpy adds
    float16 through float32, and bfloat16 goes through binary64 here: both
    double roundings are innocuous (the wider format has more than twice the
    precision plus one bit), so every path gives the correctly rounded sum.
    """
    _check("add_difference", dtype, base=base, diff=diff)
    if dtype.name in ("float64", "float32", "float16"):
        with np.errstate(over="ignore", invalid="ignore"):
            return np.add(base, diff, dtype=dtype.storage)
    return from_float64(to_float64(base, dtype) + to_float64(diff, dtype), dtype)


def difference(new: np.ndarray, base: np.ndarray, dtype: DType) -> np.ndarray:
    """``new - base`` rounded to ``dtype`` (storage form): what an encoder codes for a delta entry."""
    _check("difference", dtype, new=new, base=base)
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype.name in ("float64", "float32", "float16"):
            return np.subtract(new, base, dtype=dtype.storage)
        return from_float64(to_float64(new, dtype) - to_float64(base, dtype), dtype)


def _check(function: str, dtype: object, **arrays: object) -> None:
    """A TypeError naming the argument for what is not a numpy array / a :class:`codec.dtypes.DType`."""
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{function}: {name} must be a numpy array (storage form), not {type(value).__name__}")
    if not isinstance(dtype, DType):
        raise TypeError(f"{function}: dtype must be a codec.dtypes.DType (codec.dtypes.get_dtype('float32')), "
                        f"not {type(dtype).__name__}")
