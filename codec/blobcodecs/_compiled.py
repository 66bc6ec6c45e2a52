"""Compiled loops for the rotated byte planes (optional: ``pip install 'jwt-weights[fast]'``, which adds numba).

Each loop does in one pass over memory what :mod:`codec.blobcodecs.zstd`'s numpy code does in several: ``join[k]``
joins ``k`` byte planes, most significant first, into ``k``-byte words and rotates each word right by ``rotation``
bits (decode); ``split[k]`` rotates each word left and writes its bytes to the planes (encode). ``planes`` is one
flat ``uint8`` buffer of ``k`` planes of ``n`` bytes; ``words`` / ``out`` are ``n`` unsigned ``k``-byte integers.
The numpy code is the reference: tests/test_compiled.py compares the two bit for bit.

Importing this module imports numba; each loop is compiled for its word size (a constant of the loop, so that
LLVM unrolls the plane loop and vectorizes the element loop) on its first call and cached on disk (``cache=True``).
Loading them costs about 1 CPU second in a new process even from the cache, 3-5 s the first time ever
(bench/JOURNAL.md, thirteenth pass), which is why :mod:`codec.blobcodecs.zstd` calls them only once a process has
moved enough bytes to pay for it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["join", "split"]


def _loops(word: type, k: int):
    """``(join, split)`` compiled for ``k``-byte words of numpy type ``word``."""
    bits = 8 * k

    @njit(cache=True, nogil=True, boundscheck=False)
    def join_k(planes, rotation, out):  # pragma: no cover - compiled (tests compare it with the numpy path)
        n = out.size
        grid = planes.reshape(k, n)
        right, left = word(rotation), word((bits - rotation) % bits)
        for i in range(n):
            w = word(0)
            for j in range(k):
                w = (w << word(8)) | word(grid[j, i])
            out[i] = (w >> right) | (w << left)

    @njit(cache=True, nogil=True, boundscheck=False)
    def split_k(words, rotation, planes):  # pragma: no cover - compiled
        n = words.size
        grid = planes.reshape(k, n)
        left, right = word(rotation), word((bits - rotation) % bits)
        for i in range(n):
            w = (words[i] << left) | (words[i] >> right)
            for j in range(k):
                grid[j, i] = np.uint8((w >> word(bits - 8 - 8 * j)) & word(255))

    return join_k, split_k


_BY_SIZE = {k: _loops(word, k) for k, word in ((2, np.uint16), (4, np.uint32), (8, np.uint64))}
#: ``join[k](planes, rotation, out)``: planes (most significant first) to words rotated right ``rotation`` bits.
join = {k: loops[0] for k, loops in _BY_SIZE.items()}
#: ``split[k](words, rotation, planes)``: words rotated left ``rotation`` bits to planes, most significant first.
split = {k: loops[1] for k, loops in _BY_SIZE.items()}
