"""The C heap of a training loop: glibc's malloc thresholds held where a loop's tensors do not make it thrash.

glibc serves requests of at least ``M_MMAP_THRESHOLD`` bytes with their own mappings and gives the top of its heap
back to the system once more than ``M_TRIM_THRESHOLD`` bytes of it are free; both start at 128 KB and follow the
largest mapped block freed so far (up to 32 MB, twice that for the trim). A training step frees and allocates
tensors of a layer's size several times (Adam's temporaries, the gradients), so where no larger block was freed
before, the heap is trimmed and grown again at each step, and every 4 KB page of it faults back in: on the bench
MLP (a 784x512 layer, 1.6 MB) an epoch of codec-in-the-loop training took 0.2-0.6 s of system time and 100,000 to
400,000 page faults, against 0.03-0.09 s and 25,000-44,000 when the loop's first coding had freed a 3.4 MB block
(the binary64 copy of the layer the mapping made until the twentieth pass; bench/JOURNAL.md, "train (twentieth
pass)"), and 0.00-0.07 s and under 1,000 faults with the thresholds held here.

:func:`steady_heap` sets both thresholds once per process, to the values glibc's own rule reaches after freeing a
:data:`MMAP_THRESHOLD` block (the heap keeps up to :data:`TRIM_THRESHOLD` bytes free instead of returning them). It
changes no computed value; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "steady_heap"]

#: Requests of this many bytes or more get their own mapping (glibc's ``M_MMAP_THRESHOLD``; its dynamic maximum).
MMAP_THRESHOLD = 32 << 20
#: Free bytes at the top of the heap kept before it is trimmed (``M_TRIM_THRESHOLD``: twice the above, as glibc's
#: dynamic rule sets it).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_done: bool | None = None


def steady_heap() -> bool:
    """Hold glibc's mmap and trim thresholds at :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` for this process
    (once; :func:`codec.train.finetune` calls it). True where they are set (Linux with glibc), False elsewhere."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD))
    return _done
