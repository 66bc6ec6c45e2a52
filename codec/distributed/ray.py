"""Coding tensors on a Ray cluster (the optional extra ``pip install 'jwt-weights[ray]'``).

:func:`encode_in_order` is :func:`codec.encode._encode_in_order` with each
tensor's coding (:func:`codec.tensorcodec.encode_tensor`, all its blobs)
run as one Ray task: the coordinating process reads the tensors, puts each
in the object store, and hands the results to the container writer in
state_dict order. A task codes exactly as a local encode with ``jobs=1``
does, so the container is byte for byte the same. When the tensors come
from checkpoint files (a safetensors shard folder) and the whole cluster
is this machine, a task reads its tensor from the file itself (reading
every tensor and copying it into the object store was most of the
coordinator's work, and the limit on the speed-up, see bench/JOURNAL.md)
and writes its coded blobs itself, into a part file of the writer's parts
folder beside the output: the coordinator gets only where they are and
their CRCs, and copies them into the output in the kernel when it closes
(returned through the object store and spooled by the coordinator, they
cost it 0.7 of its 3 CPU s and the workers 1.4 CPU s on the 4 GB
bench.big model, bench/JOURNAL.md sixteenth pass). At most ``window`` tasks
and ``AHEAD_BYTES`` of input beyond the oldest are in flight, so the
coordinator holds a bounded amount of input and coded data whatever the
model's size. A task whose worker dies is retried by Ray (``max_retries``);
if it still fails, the error propagates and the writer removes its
temporary file (no partial output).

The fast rate search (``bits_per_weight``, :mod:`codec.rd.fast`) spreads
its measurements too: :class:`RayExecutor` runs its tasks (each tensor's
sample coded at the candidate settings, each chosen point measured whole,
the tensor read by the worker from its file on a one-machine cluster)
on the workers, while the coordinator allocates between rounds. Its
tasks' results do not depend on where they ran, so the choices, and the
file, are those of a local search. The exhaustive search, the max-error
search and calibrated searches with a full ``H`` measure in the
coordinating process.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future
from typing import Any

from ..errors import EncodeError, first_line
from ..parallel import AHEAD_BYTES

__all__ = ["INSTALL_HINT", "RayExecutor", "connect", "encode_in_order"]

#: The one line a user without Ray is told.
INSTALL_HINT = "Ray is not installed: pip install 'jwt-weights[ray]' (or pip install ray)"
#: Retries of a task whose worker died.
MAX_RETRIES = 3
#: Tasks :func:`encode_in_order` keeps in flight at least (else two per CPU of the cluster): results are handed
#: out in order, so once the window is full a worker that is done waits while the oldest task runs. The final
#: coding of the 1.19 GB bench.big model at -b 3 on 2 workers (bench.ray_timeline, its tasks' CPU seconds):
#: 6.0-6.3 s with 4 in flight, 5.7 with 8, 5.1-5.6 at best. The coordinator holds at most this many tensors'
#: coded blobs.
MIN_WINDOW = 8


def _ray():
    try:
        import ray
    except ImportError:
        raise EncodeError(INSTALL_HINT) from None
    return ray


def connect(address: str) -> Any:
    """The ``ray`` module, connected: to the running session, a new local one (``"local"``), or ``address``."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"ray address must be 'auto', 'local' or host:port, found {address!r}")
    ray = _ray()
    if not ray.is_initialized():
        import logging

        try:  # Ray's own INFO lines ("Connecting to existing Ray cluster at ...") stay out of jwt's output
            if address == "local":  # a new cluster here even when one runs (without address= Ray joins that one)
                ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise EncodeError(f"ray: cannot connect to {address!r} ({str(exc).splitlines()[0][:200]})") from None
        except Exception as exc:  # noqa: BLE001 (Ray raises a bare Exception when its local node does not start)
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001 (nothing was started)
                pass
            raise EncodeError(f"ray: cannot start a cluster here ({first_line(exc, 200)}){_limit_hint()}") from None
    return ray


def _limit_hint() -> str:
    """Why a local Ray node may not start: under ``ulimit -v`` its raylet cannot map the object store (by default
    30 % of the machine's memory, one mapping), and Ray only reports a start-up timeout."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return ""
    if limit == resource.RLIM_INFINITY:
        return ""
    return (f"; a memory limit of {limit / 2**20:,.0f} MB is set (ulimit -v), and Ray's processes map their object "
            f"store beyond it: raise the limit for --ray, or encode without it (-j 1 needs least)")


def _code(array, dtype_name: str, options):
    """One task: code a whole tensor as a ``jobs=1`` local encode does.

    The result leaves the worker ready to be written: each blob is a numpy byte array (a view of the bytes, no
    copy), which Ray serializes out of band into its object store, so the coordinator gets views of shared memory
    instead of unpickling copies; and each blob's CRC-32 is computed here, in parallel, not in the coordinator.
    """
    import numpy as np

    from ..dtypes import get_dtype
    from ..format import crc32
    from ..tensorcodec import encode_tensor

    encoded = encode_tensor(array, get_dtype(dtype_name), options)
    encoded.crcs = [crc32(blob) for blob in encoded.blobs]
    encoded.blobs = [np.frombuffer(blob, np.uint8) for blob in encoded.blobs]
    return encoded


def _code_file(file: str, start: int, shape: tuple[int, ...], dtype_name: str, name: str, options,
               parts: str | None = None):
    """One task that reads its tensor from the checkpoint file itself, then codes it as :func:`_code` does.

    With ``parts`` (the writer's parts folder, :meth:`codec.writer.Writer.parts_folder`, on this machine) the
    task writes the blobs itself, one after another at the end of its worker's part file there, and returns only
    where they are (``Encoded.part``) with their CRCs: the coded bytes go neither through Ray's object store nor
    through the coordinating process, which copies them into the output in the kernel when it closes.
    """
    from ..rawfile import read_array  # (not io_formats: it imports torch, seconds in a fresh worker)

    encoded = _code(read_array(file, start, shape, dtype_name, name), dtype_name, options)
    if parts is None:
        return encoded
    path = os.path.join(parts, f"{os.getpid()}.part")  # one writer per file: a worker runs one task at a time
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # fails once the folder is gone
    try:
        offset = os.lseek(fd, 0, os.SEEK_END)
        for blob in encoded.blobs:
            view = memoryview(blob).cast("B")
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    encoded.part = (path, offset, [len(blob) for blob in encoded.blobs])
    encoded.blobs = []
    return encoded


def _one_machine(ray) -> bool:
    """True when every live node of the cluster is this machine (its workers see this machine's files)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def _failure(ray, exc: BaseException, name: str) -> BaseException:
    """What a task's failure is raised as: an exception raised by the work itself as it is (a local encode raises
    the same); a task that could not finish (its worker died ``MAX_RETRIES + 1`` times, its node was lost, the
    cluster ran out of memory) as an :class:`EncodeError` naming the tensor."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        if isinstance(exc.cause, Exception):
            return exc.cause
        return EncodeError(f"ray: tensor {name!r}: {first_line(exc, 300)}")
    if isinstance(exc, ray.exceptions.RayError):
        return EncodeError(f"ray: tensor {name!r} was not coded ({type(exc).__name__} after {MAX_RETRIES} retries: "
                           f"{first_line(exc, 300)})")
    return exc


def _result(ray, ref, name: str):
    """``ray.get(ref)``, with the cluster's failures as one-line errors naming the tensor (:func:`_failure`)."""
    try:
        return ray.get(ref)
    except Exception as exc:
        raise _failure(ray, exc, name) from None


class RayExecutor(Executor):
    """A :class:`concurrent.futures.Executor` whose tasks are Ray tasks: what the fast rate search
    (:func:`codec.rd.fast.plan_fast`) runs its predictions and measurements on, in place of its local worker
    processes and threads.

    ``submit(fn, *args)`` runs ``fn(*args)`` on a worker (``fn`` a module-level function; arguments and
    results travel through Ray's object store) and returns a future; a task whose worker dies is retried
    (:data:`MAX_RETRIES`), and failures reach the future as :func:`_failure` words them. A task's first
    argument, when it is a string, is the tensor it works on (the search's tasks, :func:`codec.rd.fast._named`).
    ``workers``: the cluster's CPUs, how many tasks the search keeps in flight per worker. ``local_files``:
    whether the cluster is this machine (:func:`_one_machine`), so a task can read a checkpoint file itself.
    :meth:`share` puts a value in the object store once for several tasks. Leaving the executor (or
    ``shutdown``) cancels the tasks still running.
    """

    def __init__(self, ray):
        self._ray = ray
        self._remote: dict[Callable, Any] = {}
        self._refs: dict[Future, Any] = {}
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.local_files = _one_machine(ray)

    def share(self, value: Any) -> Any:
        """``value`` in the object store (a reference): passed to several tasks, it is copied there once, and each
        task gets the value itself (read-only arrays in shared memory on the worker's machine)."""
        return self._ray.put(value)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(fn)
        ref = remote.remote(*args, **kwargs)
        name = args[0] if args and isinstance(args[0], str) else getattr(fn, "__name__", "task")
        out: Future = Future()
        self._refs[out] = ref

        def settle(done: Future) -> None:
            self._refs.pop(out, None)
            try:
                out.set_result(done.result())
            except BaseException as exc:  # noqa: BLE001 (handed to the caller through the future)
                out.set_exception(_failure(self._ray, exc, name))

        ref.future().add_done_callback(settle)
        return out

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for ref in list(self._refs.values()):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 (a task that has just finished)
                pass
        self._refs.clear()


def encode_in_order(state_dict: Mapping[str, Any], aliases: dict[str, str], options_for: Callable[[str], Any],
                    address: str, window: int | None = None,
                    done: dict[str, Any] | None = None, parts: Callable[[], str] | None = None) -> Iterator[tuple]:
    """Yield ``(name, alias target, dtype, shape, Encoded)`` in ``state_dict`` order (:class:`codec.encode.Arrays`),
    coded on Ray workers; a tensor in ``done`` (name -> ``Encoded``, the rate search's codings with the chosen
    options) is handed out as it is, not coded again. ``parts``: the writer's
    :meth:`~codec.writer.Writer.parts_folder`; where workers read their tensors from the files themselves (one
    machine) they write the coded blobs there too, and the ``Encoded`` handed out says where (``part``)."""
    from ..dtypes import get_dtype

    ray = connect(address)
    task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_code)
    file_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_code_file)
    locate = getattr(state_dict, "location", None)
    if not (callable(locate) and _one_machine(ray)):
        locate = None
    if window is None:
        window = max(MIN_WINDOW, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    ahead = 0
    folder = None  # the writer's parts folder, made once a worker writes there

    def finish() -> tuple:
        nonlocal ahead
        name, target, dtype, shape, ref, nbytes = pending.popleft()
        ahead -= nbytes
        if ref is None or not isinstance(ref, ray.ObjectRef):  # an alias, or coded by the search
            return name, target, dtype, shape, ref
        return name, target, dtype, shape, _result(ray, ref, name)

    try:
        for name in state_dict:
            if name in aliases:
                pending.append((name, aliases[name], None, (), None, 0))
            elif done and name in done:
                shape, dtype_name = tuple(state_dict.shape(name)), state_dict.dtype_name(name)
                pending.append((name, None, get_dtype(dtype_name), shape, done.pop(name), 0))  # held once
            elif locate is not None and locate(name) is not None:  # the worker reads it: no copy passes through here
                shape, dtype_name = tuple(state_dict.shape(name)), state_dict.dtype_name(name)
                if folder is None and parts is not None:
                    folder = parts()
                ref = file_task.remote(*locate(name), shape, dtype_name, name, options_for(name), folder)
                pending.append((name, None, get_dtype(dtype_name), shape, ref, 0))
            else:
                array, dtype_name = state_dict.array(name), state_dict.dtype_name(name)
                ref = task.remote(ray.put(array), dtype_name, options_for(name))
                pending.append((name, None, get_dtype(dtype_name), tuple(array.shape), ref, array.nbytes))
                ahead += array.nbytes
                del array
            while len(pending) > window or (len(pending) > 1 and ahead > 4 * AHEAD_BYTES):
                yield finish()
        while pending:
            yield finish()
    finally:
        for item in pending:
            if isinstance(item[4], ray.ObjectRef):
                ray.cancel(item[4], force=True)
