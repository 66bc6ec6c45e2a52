"""Reading .jwt files over HTTP: Range requests, streaming, servers without ranges, errors naming the URL."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest
import torch

import codec
from codec.sources.http import HttpSource, RemoteError

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench.http_server import serve  # noqa: E402

torch.manual_seed(0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder with a .jwt of several lossy and lossless tensors (and an alias) bigger than the first read."""
    folder = tmp_path_factory.mktemp("served")
    sd = {f"layer{i}.weight": torch.randn(256, 256) for i in range(6)}
    sd.update({f"layer{i}.bias": torch.randn(256) for i in range(6)})
    sd["tied"] = sd["layer0.weight"]
    codec.save(sd, folder / "m.jwt", codec="jpeg", quality=95)
    return folder


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_open_reads_the_index_then_one_range_per_tensor(model_dir):
    """codec.open(url) costs one request; get(name) one Range request for that tensor's blobs alone."""
    local = model_dir / "m.jwt"
    with serve(model_dir) as server:
        with codec.open(server.url("m.jwt")) as f, codec.open(local) as g:
            assert f.keys() == g.keys() and f.metadata == g.metadata
            assert len(server.log) == 1 and server.log[0][2] == "bytes=0-65535" and server.log[0][3] == 206
            assert torch.equal(f.get("layer4.weight"), g.get("layer4.weight"))
            entry = f.reader.entry("layer4.weight")
            assert len(server.log) == 2 and server.log[1][3] == 206
            assert server.log[1][4] == entry.stored_bytes
    assert server.bytes_sent() < local.stat().st_size


def test_load_streams_the_data_section_in_one_response(model_dir):
    """codec.load(url) gives the same tensors as the local file, from one extra streamed request."""
    with serve(model_dir) as server:
        for jobs in (1, 2):
            server.log.clear()
            _same(codec.load(server.url("m.jwt"), jobs=jobs), codec.load(model_dir / "m.jwt"))
            assert len(server.log) == 2 and server.log[1][2].endswith("-") and server.log[1][3] == 206
    out = codec.load(model_dir / "m.jwt")
    assert out["tied"] is out["layer0.weight"]


def test_a_server_that_ignores_range_is_read_as_a_stream(model_dir):
    """Without Range support the whole response is decoded in file order from one request; a tensor behind
    the position restarts the download (tests/test_newcomer_cli.py covers any order)."""
    with serve(model_dir, ranges=False) as server:
        _same(codec.load(server.url("m.jwt")), codec.load(model_dir / "m.jwt"))
        assert len(server.log) == 1 and server.log[0][3] == 200
        with codec.open(server.url("m.jwt")) as f:
            assert torch.equal(f.get("layer5.weight"), codec.load(model_dir / "m.jwt")["layer5.weight"])
            assert len(server.log) == 2
            f.get("layer0.weight")
        assert len(server.log) == 3 and server.log[2][2] is None  # a new GET of the whole file


def test_a_file_replaced_on_the_server_is_an_error(model_dir, tmp_path):
    """If-Range with the first answer's ETag turns a file changed between requests into a clear error."""
    (tmp_path / "m.jwt").write_bytes((model_dir / "m.jwt").read_bytes())
    with serve(tmp_path) as server, codec.open(server.url("m.jwt")) as f:
        codec.save({"other": torch.randn(300, 300)}, tmp_path / "m.jwt")
        with pytest.raises(RemoteError, match="whole file|changed") as info:
            f.get("layer3.weight")
        assert server.url("m.jwt") in str(info.value)


def test_http_errors_name_the_url(model_dir):
    """404, a refused connection and a silent server each raise RemoteError (an OSError) naming the URL."""
    with serve(model_dir) as server:
        missing = server.url("missing.jwt")
        with pytest.raises(RemoteError, match="404") as info:
            codec.open(missing)
        assert missing in str(info.value) and isinstance(info.value, OSError)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/m.jwt"
    with pytest.raises(RemoteError) as info:
        codec.load(closed)
    assert closed in str(info.value)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/m.jwt"
        with pytest.raises(RemoteError, match="no answer within 0.3 s") as info:
            HttpSource(url, timeout=0.3)
    assert url in str(info.value)


def test_truncated_and_empty_files_are_format_errors(model_dir, tmp_path):
    """A file cut short on the server, or empty, is refused like a local one, naming the URL."""
    data = (model_dir / "m.jwt").read_bytes()
    (tmp_path / "cut.jwt").write_bytes(data[: len(data) - 100])
    (tmp_path / "empty.jwt").write_bytes(b"")
    with serve(tmp_path) as server:
        with pytest.raises(codec.FormatError, match="truncated") as info:
            codec.open(server.url("cut.jwt"))
        assert server.url("cut.jwt") in str(info.value)
        with pytest.raises(codec.FormatError, match="header"):
            codec.open(server.url("empty.jwt"))


def test_tensors_are_handed_out_while_the_download_goes_on(model_dir):
    """codec.open(url).items() yields the first tensors while the rest of the file has not been sent."""
    size = (model_dir / "m.jwt").stat().st_size
    with serve(model_dir, hold_after=size // 2) as server, codec.open(server.url("m.jwt")) as f:
        items = f.items()
        first: list = []
        reader = threading.Thread(target=lambda: first.append(next(items)), daemon=True)
        reader.start()
        reader.join(timeout=60)
        stalled = server.bytes_sent() < size
        server.release.set()
        reader.join()
        assert first and first[0][0] == "layer0.weight" and stalled
        assert len(list(items)) == 12


def test_cli_info_and_decode_read_a_url(model_dir, tmp_path):
    """`jwt info URL --json` downloads only the first bytes; `jwt decode URL -o x.pt -j 2` equals the local decode."""
    import json

    from click.testing import CliRunner

    from jwt_cli.main import cli

    with serve(model_dir) as server:
        url = server.url("m.jwt")
        result = CliRunner().invoke(cli, ["info", url, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        assert doc["file"] == url and len(doc["tensors"]) == 13 and len(server.log) == 1
        result = CliRunner().invoke(cli, ["decode", url, "-o", str(tmp_path / "x.pt"), "-j", "2", "-q"])
        assert result.exit_code == 0, result.output
        missing = CliRunner().invoke(cli, ["decode", server.url("nope.jwt"), "-o", str(tmp_path / "y.pt")])
    assert missing.exit_code == 1 and server.url("nope.jwt") in missing.output and "404" in missing.output
    _same(torch.load(tmp_path / "x.pt", weights_only=True), codec.load(model_dir / "m.jwt"))


def test_stopping_a_stream_early_does_not_wait_for_the_link(model_dir):
    """Closing a streamed iteration while the download is stalled returns, and the file still answers get(name)."""
    size = (model_dir / "m.jwt").stat().st_size
    with serve(model_dir, hold_after=size // 2) as server, codec.open(server.url("m.jwt"), timeout=600) as f:
        done: list = []

        def first_then_stop():  # a close that waited for the stalled read would take the 600 s timeout
            arrays = f.reader.iter_arrays()
            done.append(next(arrays)[0].name)
            while server.bytes_sent() < (1 << 16) + size // 2:  # the index, then the stream up to the stall
                time.sleep(0.01)
            time.sleep(0.2)  # the reading thread is now blocked on the stalled link
            arrays.close()
            done.append(f.get("layer0.bias").shape)

        worker = threading.Thread(target=first_then_stop, daemon=True)
        worker.start()
        worker.join(timeout=60)
        finished = not worker.is_alive()
        server.release.set()
    assert finished and done == ["layer0.weight", torch.Size([256])]
