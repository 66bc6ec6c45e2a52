"""Encoding on Ray (codec/distributed/ray.py): byte equality with a local encode (the rate search's tasks on the
workers too), a worker that dies, no Ray.

The tests that need Ray share one local 2-CPU cluster (starting one costs seconds) and skip when the optional
extra is not installed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

import codec
import codec.distributed.ray as jwt_ray


def _ray_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    sd = {f"l{i}.weight": torch.randn(256, 200 + 8 * i, generator=g) for i in range(4)}
    sd["emb"] = torch.randn(512, 64, generator=g).to(torch.bfloat16)
    sd["l0.bias"] = torch.randn(256, generator=g)
    sd["tied"] = sd["emb"]
    return sd


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for this module's tests."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _dying(real, shape_of, marker: str | None = None, shape: tuple[int, ...] | None = None, after: bool = False):
    """``real`` (a Ray task body) made to kill its own worker process (os._exit), as if killed mid-encode.

    With ``marker`` only the first task to create that file (O_EXCL: one winner among all workers of this
    machine) dies; with ``shape`` every attempt at a tensor of that shape (``shape_of(args)``). It dies before
    its work, or with ``after`` once the work is done (the result is lost). Other tasks run as usual.
    """

    def body(*args):  # a closure: shipped to the workers by value
        dies = shape is not None and shape_of(args) == shape
        if marker is not None and not dies:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                dies = True
            except FileExistsError:
                pass
        if dies and not after:
            os._exit(1)
        out = real(*args)
        if dies:
            os._exit(1)
        return out

    return body


def _dying_task(marker: str | None = None, shape: tuple[int, ...] | None = None):
    """:func:`codec.distributed.ray._code` (a tensor sent through the object store) dying before coding."""
    return _dying(jwt_ray._code, lambda args: tuple(args[0].shape), marker, shape)


def _leftovers(folder) -> list[str]:
    """Files in ``folder`` other than the inputs a test wrote itself."""
    return sorted(p.name for p in folder.iterdir() if p.name not in ("local.jwt", "died", "m.pt"))


def test_ray_encode_is_byte_identical_to_a_local_one(cluster, tmp_path):
    """codec.save(ray=) on a local 2-CPU Ray cluster writes the same bytes as jobs=1, default and quality settings."""
    sd = _ray_model()
    for options in ({}, {"quality": 40}):
        codec.save(sd, tmp_path / "local.jwt", jobs=1, **options)
        codec.save(sd, tmp_path / "ray.jwt", ray="auto", **options)
        assert (tmp_path / "ray.jwt").read_bytes() == (tmp_path / "local.jwt").read_bytes()


def test_ray_workers_read_shards_themselves_on_one_machine(cluster, tmp_path, monkeypatch):
    """Encoding a safetensors folder on a one-machine cluster: each task reads its tensor from the shard (no
    tensor goes through the coordinator or the object store), and the file is the local encode's bytes."""
    from codec.io_formats import encode_model

    folder = tmp_path / "model"
    _shard_folder(folder)
    encode_model(folder, tmp_path / "local.jwt", jobs=1)

    def no_arrays(array, dtype_name, options):
        raise AssertionError("a tensor was sent through the object store")

    # The array path's task body is replaced here; _code_file runs on workers that import the real module.
    monkeypatch.setattr(jwt_ray, "_code", no_arrays)
    encode_model(folder, tmp_path / "ray.jwt", ray="auto")
    assert (tmp_path / "ray.jwt").read_bytes() == (tmp_path / "local.jwt").read_bytes()


def _shard_folder(folder, sd: dict[str, torch.Tensor] | None = None, first: int = 3) -> dict[str, torch.Tensor]:
    """``sd`` (default: _ray_model without its alias) as a folder of two safetensors shards, the ``first``
    tensors in the first; its tensors."""
    from safetensors.torch import save_file

    sd = sd if sd is not None else {k: v for k, v in _ray_model().items() if k != "tied"}
    names = list(sd)
    folder.mkdir()
    save_file({k: sd[k] for k in names[:first]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[first:]}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < first else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sd


def _dying_file_task(marker: str | None = None, shape: tuple[int, ...] | None = None, after: bool = False):
    """:func:`codec.distributed.ray._code_file` (a tensor read from its shard) dying before coding or, with
    ``after``, once it has written its blobs into its part file."""
    return _dying(jwt_ray._code_file, lambda args: tuple(args[2]), marker, shape, after)


def _parts_written(monkeypatch) -> list[str]:
    """Names of the tensors the coordinator's writer got as part files (Encoded.part), collected as it adds them."""
    from codec.writer import Writer

    seen: list[str] = []
    real_add = Writer.add

    def add(self, name, dtype, shape, encoded, base=None):
        if encoded.part is not None:
            assert encoded.blobs == [] and os.path.dirname(encoded.part[0]) == self.parts_folder()
            seen.append(name)
        return real_add(self, name, dtype, shape, encoded, base)

    monkeypatch.setattr(Writer, "add", add)
    return seen


def test_ray_workers_write_coded_blobs_to_part_files(cluster, tmp_path, monkeypatch):
    """Encoding a safetensors folder on a one-machine cluster: every tensor's blobs are written by its worker
    into a part file beside the output (none come back through the object store), the output is the local
    encode's bytes, and the parts folder is gone afterwards, through a path or a file object."""
    import io

    from codec.io_formats import encode_model

    sd = _shard_folder(tmp_path / "model")
    encode_model(tmp_path / "model", tmp_path / "local.jwt", jobs=1)
    seen = _parts_written(monkeypatch)
    encode_model(tmp_path / "model", tmp_path / "ray.jwt", ray="auto")
    assert sorted(seen) == sorted(sd)
    assert (tmp_path / "ray.jwt").read_bytes() == (tmp_path / "local.jwt").read_bytes()
    assert _leftovers(tmp_path) == ["model", "ray.jwt"]
    seen.clear()
    from codec.io_formats import open_source

    out = io.BytesIO()
    codec.save(open_source(tmp_path / "model").tensors, out, ray="auto")
    assert sorted(seen) == sorted(sd)
    reference = io.BytesIO()
    codec.save(open_source(tmp_path / "model").tensors, reference, jobs=1)
    assert out.getvalue() == reference.getvalue()
    assert _leftovers(tmp_path) == ["model", "ray.jwt"]


@pytest.mark.parametrize("after", [False, True], ids=["before coding", "after writing its part"])
def test_ray_survives_a_worker_that_dies_writing_parts(cluster, tmp_path, monkeypatch, after):
    """A worker reading its tensor from a shard exits mid-encode, before coding or once its blobs are in its
    part file (so that file holds bytes no entry points to): the task is retried, the file is the local one's
    bytes and no part file is left."""
    from codec.io_formats import encode_model

    _shard_folder(tmp_path / "model")
    encode_model(tmp_path / "model", tmp_path / "local.jwt", jobs=1)
    monkeypatch.setattr(jwt_ray, "_code_file", _dying_file_task(marker=str(tmp_path / "died"), after=after))
    encode_model(tmp_path / "model", tmp_path / "ray.jwt", ray="auto")
    assert (tmp_path / "died").exists()
    assert (tmp_path / "ray.jwt").read_bytes() == (tmp_path / "local.jwt").read_bytes()
    assert _leftovers(tmp_path) == ["model", "ray.jwt"]


def test_ray_failure_writing_parts_leaves_no_output(cluster, tmp_path, monkeypatch):
    """A tensor whose every attempt kills its worker after writing its part: one-line error naming it, and
    neither the output, nor its temporary file, nor the parts folder is left."""
    from codec.io_formats import encode_model

    _shard_folder(tmp_path / "model")
    monkeypatch.setattr(jwt_ray, "MAX_RETRIES", 1)
    monkeypatch.setattr(jwt_ray, "_code_file", _dying_file_task(shape=(256, 216), after=True))
    with pytest.raises(codec.EncodeError, match=r"^ray: tensor 'l2.weight' was not coded \(WorkerCrashedError"):
        encode_model(tmp_path / "model", tmp_path / "out.jwt", ray="auto")
    assert _leftovers(tmp_path) == ["model"]


def test_ray_survives_a_worker_that_dies_mid_encode(cluster, tmp_path, monkeypatch):
    """A worker process that exits while coding a tensor: Ray retries the task, the file is the local one's bytes."""
    sd = _ray_model()
    codec.save(sd, tmp_path / "local.jwt", jobs=1)
    monkeypatch.setattr(jwt_ray, "_code", _dying_task(marker=str(tmp_path / "died")))
    codec.save(sd, tmp_path / "ray.jwt", ray="auto")
    assert (tmp_path / "died").exists()  # a worker did die
    assert (tmp_path / "ray.jwt").read_bytes() == (tmp_path / "local.jwt").read_bytes()
    assert _leftovers(tmp_path) == ["ray.jwt"]


def test_ray_unrecoverable_failure_leaves_no_output(cluster, tmp_path, monkeypatch):
    """A tensor whose every attempt kills its worker: jwt encode --ray fails with one line naming it (exit 1, no
    traceback) and leaves neither the output nor a temporary file."""
    from jwt_cli.main import cli

    monkeypatch.setattr(jwt_ray, "MAX_RETRIES", 1)  # two attempts, not four: the test stays short
    monkeypatch.setattr(jwt_ray, "_code", _dying_task(shape=(256, 216)))
    torch.save(_ray_model(), tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["encode", str(tmp_path / "m.pt"), "-o", str(tmp_path / "out.jwt"), "--ray", "auto",
                                 "-q"])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]  # Ray adds its own log lines
    assert r.exit_code == 1 and len(errors) == 1, r.output
    assert errors[0].startswith("Error: ray: tensor 'l2.weight' was not coded (WorkerCrashedError after 1 retries: ")
    assert _leftovers(tmp_path) == []


def test_ray_task_errors_are_the_local_ones(cluster, tmp_path, monkeypatch):
    """An exception raised by the coding itself reaches the caller as itself (as with a local encode), not wrapped."""
    def broken(array, dtype_name, options):
        raise codec.EncodeError(f"cannot code a {array.shape} tensor")

    monkeypatch.setattr(jwt_ray, "_code", broken)
    with pytest.raises(codec.EncodeError, match=r"^cannot code a \(256, 200\) tensor$"):
        codec.save(_ray_model(), tmp_path / "out.jwt", ray="auto")
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[dict[str, torch.Tensor], bytes]:
    """_ray_model with a tensor large enough for the fast search to predict it from a sample (the others it
    measures whole), and its local file at 1.5 bits/weight (jobs=1)."""
    sd = _ray_model()
    sd["big.weight"] = torch.randn(512, 384, generator=torch.Generator().manual_seed(6))
    path = tmp_path_factory.mktemp("searched") / "local.jwt"
    codec.save(sd, path, jobs=1, bits_per_weight=1.5)
    return sd, path.read_bytes()


def test_ray_runs_the_rate_search_on_its_workers(cluster, searched, tmp_path, monkeypatch):
    """codec.save(bits_per_weight=, ray=): the fast search's predictions and whole-tensor measurements are Ray
    tasks, and the file is the local search's bytes (jobs=1)."""
    import codec.rd.fast as fast

    sd, local = searched
    submitted: list[str] = []
    real_submit = jwt_ray.RayExecutor.submit

    def counted(self, fn, *args, **kwargs):
        submitted.append(args[1].__name__)  # the search submits _named(name, task, ...)
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(jwt_ray.RayExecutor, "submit", counted)
    codec.save(sd, tmp_path / "ray.jwt", ray="auto", bits_per_weight=1.5)
    assert (tmp_path / "ray.jwt").read_bytes() == local
    assert {fast._predict_task.__name__, fast._measure_task.__name__} <= set(submitted)


def test_ray_search_survives_a_worker_that_dies(cluster, searched, tmp_path, monkeypatch):
    """A worker that exits while predicting a tensor's settings from its sample: the task is retried and the
    search chooses what a local one does."""
    import codec.rd.fast as fast

    sd, local = searched
    real, marker = fast._predict_task, str(tmp_path / "died")

    def dying(*args):  # a closure: Ray ships it by value, so the workers run it (the search passes it as an argument)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os._exit(1)
        except FileExistsError:
            pass
        return real(*args)

    monkeypatch.setattr(fast, "_predict_task", dying)
    codec.save(sd, tmp_path / "ray.jwt", ray="auto", bits_per_weight=1.5)
    assert (tmp_path / "died").exists()
    assert (tmp_path / "ray.jwt").read_bytes() == local
    assert _leftovers(tmp_path) == ["ray.jwt"]


def _search_folder(folder) -> None:
    """A 2-shard safetensors folder whose ``big.weight`` dominates (more than ``fast.DOMINANT`` of the weights):
    the search measures its chosen point's hull neighbours too, several points of one tensor in one round."""
    g = torch.Generator().manual_seed(7)
    sd = {"big.weight": torch.randn(1024, 512, generator=g) * torch.linspace(0.5, 2, 512),
          "l0.weight": torch.randn(256, 200, generator=g), "l0.bias": torch.randn(256, generator=g),
          "emb": torch.randn(512, 64, generator=g).to(torch.bfloat16)}
    _shard_folder(folder, sd, 2)


def _measurements(monkeypatch) -> list[tuple]:
    """What the search submits to the Ray executor for whole-tensor measurements, as ``(tensor, number of points,
    whether the tensor went as a file location)``, recorded in the coordinator."""
    import codec.rd.fast as fast

    seen: list[tuple] = []
    real_submit = jwt_ray.RayExecutor.submit

    def recorded(self, fn, *args, **kwargs):
        if args[1].__name__ == fast._measure_task.__name__:  # _named(name, _measure_task, name, source, ...)
            seen.append((args[0], len(args[5]), isinstance(args[3], fast.FileTensor)))
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(jwt_ray.RayExecutor, "submit", recorded)
    return seen


def test_ray_search_splits_measurements_and_workers_read_the_shards(cluster, tmp_path, monkeypatch):
    """-b on a safetensors folder, one-machine cluster: the chosen points are measured one task a point, each
    task reading its tensor from the shard (nothing put in the object store), and the file is a local -j 1
    encode's bytes."""
    from codec.io_formats import encode_model

    _search_folder(tmp_path / "model")
    encode_model(tmp_path / "model", tmp_path / "local.jwt", jobs=1, bits_per_weight=1.5)
    seen = _measurements(monkeypatch)

    def no_share(self, value):
        raise AssertionError("a tensor was put in the object store")

    monkeypatch.setattr(jwt_ray.RayExecutor, "share", no_share)
    encode_model(tmp_path / "model", tmp_path / "ray.jwt", ray="auto", bits_per_weight=1.5)
    assert (tmp_path / "ray.jwt").read_bytes() == (tmp_path / "local.jwt").read_bytes()
    from_files = [(n, k) for n, k, located in seen if located]
    assert from_files and all(k == 1 for _, k in from_files)  # one point a task
    assert max(sum(1 for n, _ in from_files if n == name) for name, _ in from_files) > 1


def test_ray_search_survives_a_worker_that_dies_in_a_split_measurement(cluster, tmp_path, monkeypatch):
    """A worker that exits while measuring one of a tensor's several chosen points (a task of a split
    measurement): the task is retried and the file is still a local -j 1 encode's bytes."""
    import codec.rd.fast as fast
    from codec.io_formats import encode_model

    _search_folder(tmp_path / "model")
    encode_model(tmp_path / "model", tmp_path / "local.jwt", jobs=1, bits_per_weight=1.5)
    real, marker = fast._measure_task, str(tmp_path / "died")

    def dying(name, array, dtype, points, rows, weighting, keep):  # a closure, shipped to the workers by value
        if isinstance(array, fast.FileTensor) and not keep:  # a tensor's second (or later) point: a split task
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os._exit(1)
            except FileExistsError:
                pass
        return real(name, array, dtype, points, rows, weighting, keep)

    monkeypatch.setattr(fast, "_measure_task", dying)
    encode_model(tmp_path / "model", tmp_path / "ray.jwt", ray="auto", bits_per_weight=1.5)
    assert (tmp_path / "died").exists()
    assert (tmp_path / "ray.jwt").read_bytes() == (tmp_path / "local.jwt").read_bytes()


def test_ray_search_puts_each_tensor_once_and_a_bounded_number_ahead(cluster, searched, tmp_path, monkeypatch):
    """Tensors that are not in files (a state_dict): each measured tensor is put in the object store once for all
    its points' tasks, and no more than ``4 * AHEAD_BYTES`` of them are ahead of the measurements (with the bound
    at 0, a tensor is put only when no measurement is running); the file is the local one's."""
    import codec.rd.fast as fast

    sd, local = searched
    shared: list[tuple[str, bool]] = []  # (the reference, whether every measurement submitted so far had finished)
    used: list[str] = []  # the reference each measurement task got
    futures: list = []
    real_share, real_submit = jwt_ray.RayExecutor.share, jwt_ray.RayExecutor.submit

    def counted(self, fn, *args, **kwargs):
        future = real_submit(self, fn, *args, **kwargs)
        if args[1].__name__ == fast._measure_task.__name__ and isinstance(args[3], jwt_ray._ray().ObjectRef):
            used.append(args[3].hex())
            futures.append(future)
        return future

    def share(self, value):
        ref = real_share(self, value)
        shared.append((ref.hex(), all(f.done() for f in futures)))
        return ref

    monkeypatch.setattr(jwt_ray.RayExecutor, "submit", counted)
    monkeypatch.setattr(jwt_ray.RayExecutor, "share", share)
    monkeypatch.setattr(fast, "AHEAD_BYTES", 0)
    codec.save(sd, tmp_path / "ray.jwt", ray="auto", bits_per_weight=1.5)
    assert (tmp_path / "ray.jwt").read_bytes() == local
    assert shared and all(idle for _, idle in shared)
    assert sorted(set(used)) == sorted(ref for ref, _ in shared)  # every task's tensor came from one put


def test_ray_missing_is_a_one_line_error(tmp_path, monkeypatch):
    """Without Ray installed, codec.save(ray=) and jwt encode --ray say how to install it; no output is left."""
    import builtins

    from jwt_cli.main import cli

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    sd = {"w": torch.randn(16, 16)}
    with pytest.raises(codec.EncodeError, match="pip install"):
        codec.save(sd, tmp_path / "m.jwt", ray="auto")
    torch.save(sd, tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["encode", str(tmp_path / "m.pt"), "--ray", "auto"])
    assert r.exit_code == 1 and "pip install" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.jwt").exists()


@pytest.mark.parametrize("address, expected", [("local", "local"), ("auto", "auto"), ("10.0.0.5:6379", "10.0.0.5:6379")])
def test_ray_local_starts_a_cluster_here_and_ray_info_lines_stay_quiet(monkeypatch, address, expected):
    """--ray local starts a cluster of its own, as its help says, even while another runs on the machine (a plain
    ray.init() joins that one: a user's, or a colleague's benchmark cluster); Ray's INFO lines ("Connecting to
    existing Ray cluster at ...") do not show up in `jwt encode -q`. Checked on the calls made, without a cluster."""
    import logging
    import types

    calls = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append(kw))
    monkeypatch.setattr(jwt_ray, "_ray", lambda: fake)
    assert jwt_ray.connect(address) is fake
    assert len(calls) == 1 and calls[0]["address"] == expected
    assert calls[0]["logging_level"] == logging.WARNING and calls[0]["log_to_driver"] is False


_HARD_EXIT = """
import os, sys
import codec.encode as encoding
from codec.errors import EncodeError

how = sys.argv[1]

def save(*args, **kwargs):
    if how == "hard":
        os._exit(1)  # what Ray's core worker does when the local raylet dies under it (plasma connection lost)
    raise EncodeError("ray: tensor 'w' was not coded (LocalRayletDiedError after 3 retries: ...)")

encoding.save = save
from jwt_cli.main import main
sys.argv = ["jwt", "encode", sys.argv[2], "-o", sys.argv[3], "--ray", "local", "-q"]
main()
"""


@pytest.mark.parametrize("how", ["hard", "raised"])
def test_ray_encode_ended_by_ray_itself_still_says_so(tmp_path, how):
    """When the local cluster dies mid-encode, Ray may end jwt's process itself (``_Exit(1)`` from its core worker,
    the reason only in Ray's session log): jwt encode --ray must still end with its one-line error naming the
    output, exit 1, and no output or temporary file. An error jwt raises itself is said once (no second line)."""
    pytest.importorskip("ray")
    import subprocess
    import sys

    import numpy as np
    from safetensors.numpy import save_file

    from conftest import REPO

    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "m.safetensors"))
    out = tmp_path / "out.jwt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / ".pp"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _HARD_EXIT, how, str(tmp_path / "m.safetensors"), str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode == 1, r.stderr
    assert len(errors) == 1, r.stderr
    assert (str(out) in errors[0]) if how == "hard" else ("LocalRayletDiedError" in errors[0])
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("limited", [False, True])
def test_ray_cluster_that_cannot_start_is_a_one_line_error(tmp_path, monkeypatch, limited):
    """`jwt encode --ray local` under `ulimit -v 1536 MB`: the raylet cannot map its object store and Ray raises a
    bare Exception ("The current node timed out during startup...") after 30 s; jwt showed its traceback. Now one
    line naming the cause, with the memory limit when one is set; exit 1, no output. Checked without a cluster."""
    import resource
    import types

    from jwt_cli.main import cli

    def init(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.\nmore lines")

    shut = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init, shutdown=lambda: shut.append(1))
    monkeypatch.setattr(jwt_ray, "_ray", lambda: fake)
    if limited:
        monkeypatch.setattr(resource, "getrlimit", lambda which: (1536 * 2**20, resource.RLIM_INFINITY))
    with pytest.raises(codec.EncodeError, match="cannot start a cluster here .The current node timed out") as info:
        jwt_ray.connect("local")
    assert ("ulimit -v" in str(info.value)) == limited and ("1,536 MB" in str(info.value)) == limited
    assert shut  # what Ray started before it gave up is stopped
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["encode", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.jwt"), "--ray", "local"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
    assert r.output.startswith("Error: ray: cannot start a cluster here") and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_ray_watcher_gone_does_not_change_the_outcome():
    """The watcher of `jwt encode --ray` killed on its own (a user's kill, a process-group signal): disarming it
    afterwards must not raise (a BrokenPipeError would turn jwt's result into a quiet exit 141)."""
    import signal
    import time

    from jwt_cli.encode import _disarm, _watch_for_a_hard_exit

    watch = _watch_for_a_hard_exit("x.jwt")
    assert watch is not None
    os.kill(watch[0], signal.SIGKILL)
    time.sleep(0.2)
    _disarm(watch)
