"""Worker threads for coding blobs in parallel, and the job count.

libjpeg-turbo (through Pillow and imagecodecs), libjxl, zstd, zlib's CRC and
numpy's loops over large arrays all release the GIL, so a thread pool gives
real parallelism without copying data between processes. Work is split into
independent tasks (one image blob, one zstd frame) whose results are always
put together in a fixed order: the bytes written and the values decoded
never depend on the number of jobs.

``jobs`` everywhere means: ``None`` or ``0`` for one thread per available
core (:func:`default_jobs`), ``1`` for no worker threads at all (every task
runs at once in the caller's thread), ``n`` for ``n`` worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["default_jobs", "jobs_default", "resolve_jobs", "InlineExecutor", "INLINE", "make_executor",
           "make_process_executor", "Pending", "AHEAD_BYTES", "release_memory", "bound_heap", "sparse_zeros"]

#: Bytes a pipeline may hold ahead of its consumer beyond the newest tensor
#: (decoded tensors waiting to be handed out, or input tensors waiting to be
#: coded), so memory stays bounded whatever the model size.
AHEAD_BYTES = 64 << 20


_override: int | None = None


def default_jobs() -> int:
    """What ``jobs=None`` means: the cores this process may run on (at least 1), or :func:`jobs_default`'s."""
    if _override is not None:
        return _override
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_jobs(jobs: int | None) -> int:
    """Turn a ``jobs`` argument into a thread count; ValueError if it is not a count."""
    if jobs is None or (isinstance(jobs, int) and not isinstance(jobs, bool) and jobs == 0):
        return default_jobs()
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 0:
        raise ValueError(f"jobs must be a non-negative integer (0 or None: one per core), found {jobs!r}")
    return jobs


@contextlib.contextmanager
def jobs_default(jobs: int | None) -> Iterator[None]:
    """Within the block, ``jobs=None`` means ``jobs`` (the CLI's ``--jobs``, for code it calls indirectly)."""
    global _override
    before, _override = _override, (None if jobs is None else resolve_jobs(jobs))
    try:
        yield
    finally:
        _override = before


class InlineExecutor(Executor):
    """An executor without threads: ``submit`` runs the task at once (``jobs=1``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # delivered by future.result(), as a pool would
            future.set_exception(exc)
        return future


#: The shared thread-less executor.
INLINE = InlineExecutor()


def make_executor(jobs: int | None) -> Executor:
    """A thread pool of ``jobs`` workers, or :data:`INLINE` for one job."""
    n = resolve_jobs(jobs)
    return INLINE if n == 1 else ThreadPoolExecutor(n, thread_name_prefix="jwt")


def make_process_executor(jobs: int | None) -> Executor:
    """A pool of ``jobs`` forked worker processes, for tasks whose Python work holds the GIL (the fast search
    codes thousands of small samples: mapping, mosaics and bookkeeping in Python, with only the codec calls
    releasing the GIL, so threads ran it on about one core). :data:`INLINE` for one job; a thread pool where
    ``fork`` is not available (a spawned worker would import torch again, seconds per worker).

    Tasks and results travel pickled: give them small inputs (a sample, one tensor) and module-level
    functions. Results must not depend on which process ran a task.
    """
    n = resolve_jobs(jobs)
    if n == 1:
        return INLINE
    if "fork" not in multiprocessing.get_all_start_methods():
        return ThreadPoolExecutor(n, thread_name_prefix="jwt")
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))


class Pending:
    """The submitted parts of one tensor and how to put their results together.

    ``result()`` waits for every part in order and returns
    ``assemble(results)``; the first failing part (in part order) raises.
    """

    def __init__(self, futures: Sequence[Future], assemble: Callable[[list[Any]], Any]):
        self.futures = list(futures)
        self._assemble = assemble

    def result(self) -> Any:
        """Wait for the parts and return the assembled result."""
        try:
            values = [f.result() for f in self.futures]
        except BaseException:
            self.cancel()
            raise
        assemble, self._assemble, self.futures = self._assemble, None, []
        return assemble(values)

    def done(self) -> bool:
        """True when every part has finished (successfully or not)."""
        return all(f.done() for f in self.futures)

    def cancel(self) -> None:
        """Cancel the parts that have not started (running ones finish and are dropped)."""
        for f in self.futures:
            f.cancel()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


#: Blocks of at least this many bytes get a mapping of their own from glibc (:func:`bound_heap`).
MMAP_THRESHOLD = 1 << 20


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for the rest of the process; whether it could.

    glibc raises its threshold (up to 32 MB) each time a mapped block is freed, so later blocks of that size come
    from the heap, and when freed stay resident as holes the next stage may not reuse: calibrating
    all-MiniLM-L6-v2 peaked at 379 MB above the model with 90 MB live after it (281 MB resident), 227 MB with the
    threshold fixed at 1 MB (98 MB resident after). Called by calibrated encodes, whose stages free and allocate
    many blocks of megabytes (moment matrices, decoded tensors). A no-op without glibc.

    4 MB, measured end to end on that encode: the rate search's peak 259 MB instead of 284 and 17 s of system time
    instead of 27 (fewer page faults), but repair's 309 MB instead of 284: 1 MB kept."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


#: A training loop's heap (:func:`steady_heap`): requests of this many bytes or more get their own mapping (glibc's
#: dynamic maximum), and this many free bytes at the top of the heap are kept before it is trimmed (twice it, as
#: glibc's dynamic rule sets it).
STEADY_MMAP_THRESHOLD = 32 << 20
STEADY_TRIM_THRESHOLD = 2 * STEADY_MMAP_THRESHOLD


def steady_heap() -> bool:
    """Hold glibc's mmap and trim thresholds at :data:`STEADY_MMAP_THRESHOLD` and :data:`STEADY_TRIM_THRESHOLD`
    for the process (:func:`codec.train.finetune` calls it at its start); whether it could (Linux with glibc).

    A training step frees and allocates tensors of a layer's size several times (Adam's temporaries, gradients), so
    where no larger block was freed before, glibc trims its heap and grows it again at each step, and every 4 KB page
    faults back in: on the bench MLP (a 784x512 layer, 1.6 MB) an epoch of codec-in-the-loop training took 0.2-0.6 s
    of system time and 100,000-400,000 page faults, 0.00-0.07 s and under 1,000 with these thresholds (bench/
    JOURNAL.md, "train (twentieth pass)"). These are the values glibc's own rule reaches after a 32 MB block is
    freed; a calibrated encode later in the process sets its own (:func:`bound_heap`). Changes no computed value."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD))


def release_memory() -> bool:
    """Hand the C heap's free pages back to the system, between the stages of a long encode; whether it could.

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap: after calibrating
    all-MiniLM-L6-v2, 87 MB of them stayed resident (247 MB above the model, 160 MB after a trim), counted again
    in the next stage's peak wherever fragmentation keeps them from being reused.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def sparse_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A writable C-contiguous array of zeros of which only the pages written become resident, in small pages.

    ``np.zeros`` maps large arrays without writing them too, but numpy advises the kernel to back arrays of 4 MB
    or more with transparent huge pages (``MADV_HUGEPAGE``), so that writing one row makes its whole 2 MB resident:
    920 scattered rows of all-MiniLM-L6-v2's 30,522 x 384 float32 embedding (47 MB) took 44 MB resident that way,
    4.7 MB in small pages. Here the array is a private anonymous mapping of its own, not advised. Where the
    platform has no such mapping (Windows), ``np.zeros``."""
    dtype = np.dtype(dtype)
    count = 1
    for n in shape:
        count *= int(n)
    if count * dtype.itemsize < mmap.PAGESIZE or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(shape, dtype)
    mapping = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return np.frombuffer(mapping, dtype, count).reshape(shape)  # the array holds the mapping (its base)
