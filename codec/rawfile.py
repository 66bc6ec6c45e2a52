"""A tensor's raw bytes read from a checkpoint file with plain reads.

Shared by :mod:`codec.io_formats` (a safetensors shard read tensor by
tensor) and :mod:`codec.distributed.ray` (a task that reads its tensor
itself). It imports no torch: a fresh Ray worker that imports it starts
in a fraction of a second rather than the seconds torch takes.
"""

from __future__ import annotations

import numpy as np

from .dtypes import get_dtype
from .errors import EncodeError

__all__ = ["read_array"]


def read_array(file: str, start: int, shape: tuple[int, ...], dtype_name: str, name: str) -> np.ndarray:
    """The storage-form array of ``shape`` at byte ``start`` of ``file`` (never memory-mapped: the address space
    holds this tensor only); EncodeError naming ``name`` when the file ends first."""
    array = np.empty(shape, get_dtype(dtype_name).storage)
    with open(file, "rb") as f:
        f.seek(start)
        if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
            raise EncodeError(f"{file}: tensor {name!r} is truncated")
    return array
