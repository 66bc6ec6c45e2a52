"""Issue 13, the command line as a new user meets it: diff, show, info, verify, HTTP without ranges,
closed pipes, option checks, rate-search reach, warnings, progress and start-up time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import codec
from jwt_cli.main import cli

from conftest import REPO

sys.path.insert(0, str(REPO))
from bench.http_server import serve  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / ".pp"), str(REPO), os.environ.get("PYTHONPATH", "")])}


def run(*args, code: int = 0):
    """Invoke the CLI in-process, check the exit status and return the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def jwt_process(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m jwt_cli ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "jwt_cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, **kwargs)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A folder with m.pt (three matrices, a bias) and its default encoding m.jwt."""
    folder = tmp_path_factory.mktemp("small")
    g = torch.Generator().manual_seed(0)
    sd = {f"l{i}.weight": torch.randn(128, 256, generator=g) for i in range(4)}
    sd["l0.bias"] = torch.randn(128, generator=g)
    torch.save(sd, folder / "m.pt")
    codec.save(sd, folder / "m.jwt")
    return folder


# -- item 3: jwt diff --json is valid JSON -----------------------------------------------------------------


def test_diff_json_with_nan_is_valid_json_and_shared_nan_counts_as_zero(tmp_path):
    """NaN at the same places in A and B adds nothing; NaN on one side gives null, never bare NaN."""
    a = torch.randn(64, 64)
    a[0, :5] = float("nan")
    b = a.clone()
    b[3, 3] += 1.0
    c = b.clone()
    c[7, 7] = float("nan")  # NaN in B alone
    for name, t in (("a", a), ("b", b), ("c", c)):
        torch.save({"w": t, "v": t[:8]}, tmp_path / f"{name}.pt")
    doc = json.loads(run("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json").output)  # strict parser
    finite = torch.nan_to_num(a, nan=0.0).double()
    expected = 1.0 / float(finite.norm())
    assert doc["tensors"][0]["rel_error"] == pytest.approx(expected)
    assert doc["totals"]["rel_error"] is not None
    text = run("diff", tmp_path / "a.pt", tmp_path / "c.pt", "--json").output
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert doc["tensors"][0]["rel_error"] is None and doc["totals"]["rel_error"] is None


# -- item 14: a closed pipe ------------------------------------------------------------------------------------


def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    """``jwt info x.jwt | head -1``: no 'Broken pipe' message, the status a Unix tool killed by SIGPIPE gives."""
    codec.save({f"t{i}": torch.zeros(3) for i in range(1500)}, tmp_path / "many.jwt")  # JSON of ~400 KB
    proc = subprocess.Popen([sys.executable, "-m", "jwt_cli", "info", str(tmp_path / "many.jwt"), "--json"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as head does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141) and err == "", err


# -- item 16: jwt show's names, fonts and formats --------------------------------------------------------------


def test_show_long_and_non_ascii_names_and_picture_formats(tmp_path):
    """A 300-character name gets a short default name; CJK/emoji names no matplotlib warnings; -o x.jpg is JPEG."""
    long_name, cjk, emoji = "block." * 50 + "weight", "层.权重", "🙂.weight"
    sd = {long_name: torch.randn(64, 300), cjk: torch.randn(64, 300), emoji: torch.randn(64, 300)}
    codec.save(sd, tmp_path / "m.jwt")
    for name in (long_name, cjk, emoji):
        proc = jwt_process("show", tmp_path / "m.jwt", name, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "Warning" not in proc.stderr and "Glyph" not in proc.stderr, proc.stderr
    pngs = sorted(p.name for p in tmp_path.glob("m.*.png"))
    assert len(pngs) == 3 and all(len(p) < 120 for p in pngs), pngs
    run("show", tmp_path / "m.jwt", cjk, "-o", tmp_path / "x.jpg")
    assert (tmp_path / "x.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes
    result = run("show", tmp_path / "m.jwt", cjk, "-o", tmp_path / "x.gif2", code=2)
    assert ".gif2" in result.output and not (tmp_path / "x.gif2").exists()


# -- item 17: URLs and folders ---------------------------------------------------------------------------------


def test_diff_and_show_take_urls_and_info_names_a_folder(small, tmp_path):
    """A URL is not mangled into a path ('http:/host'); a folder is called a folder."""
    with serve(small) as server:
        url = server.url("m.jwt")
        doc = json.loads(run("diff", small / "m.pt", url, "--json").output)
        local = json.loads(run("diff", small / "m.pt", small / "m.jwt", "--json").output)
        assert doc["tensors"] == local["tensors"] and doc["totals"] == local["totals"]
        assert doc["b"] == url
        out = tmp_path / "v.png"
        assert "relative error" in run("show", url, "l1.weight", "--original", small / "m.pt", "-o", out).output
        assert out.stat().st_size > 1000
    result = run("info", small, code=1)
    assert "is a folder" in result.output and "no such file" not in result.output


# -- item 18: HTTP without Range support -----------------------------------------------------------------------


def test_get_in_any_order_over_a_server_without_ranges(small, tmp_path):
    """Tensors behind the stream position restart the download; a truncated file fails like a local one."""
    expected = codec.load(small / "m.jwt")
    data = (small / "m.jwt").read_bytes()
    (tmp_path / "m.jwt").write_bytes(data)
    (tmp_path / "half.jwt").write_bytes(data[: len(data) // 2])
    with serve(tmp_path, ranges=False) as server:
        with codec.open(server.url("m.jwt")) as f:
            for name in ("l0.weight", "l1.weight", "l3.weight", "l0.bias", "l2.weight", "l0.weight"):
                assert torch.equal(f.get(name), expected[name]), name
        assert all(status == 200 for *_, status, _ in server.log)
        assert jwt_process("info", server.url("half.jwt")).returncode == 1
    assert jwt_process("info", tmp_path / "half.jwt").returncode == 1


# -- item 19: jwt verify ---------------------------------------------------------------------------------------


def test_verify_checks_everything_and_writes_nothing(small, tmp_path):
    """OK with counts and exit 0 on a good file; FAILED naming the tensor and exit 1 on a flipped bit."""
    before = set(small.iterdir())
    result = run("verify", small / "m.jwt")
    assert result.output.count("\n") == 1 and "OK" in result.output and "5 tensors" in result.output
    assert set(small.iterdir()) == before
    data = bytearray((small / "m.jwt").read_bytes())
    data[-50] ^= 0x10  # inside the last blob
    (tmp_path / "bad.jwt").write_bytes(bytes(data))
    result = run("verify", tmp_path / "bad.jwt", code=1)
    assert "FAILED" in result.output and "crc32" in result.output and "l0.bias" in result.output
    (tmp_path / "cut.jwt").write_bytes(bytes(data[:-10]))
    assert "truncated" in run("verify", tmp_path / "cut.jwt", code=1).output
    assert codec.verify(small / "m.jwt").tensors == 5
    assert "verify" in run("--help").output


# -- start-up: no torch for --version, --help and info --------------------------------------------------------


def test_version_help_and_info_start_without_torch(small):
    """``jwt --version`` and ``--help`` import neither torch nor numpy; ``jwt info`` not torch."""
    probe = ("import sys; from jwt_cli.main import cli; {call}; "
             "print(' '.join(m for m in ('torch', 'numpy') if m in sys.modules))")
    for args, absent in ((["--version"], ("torch", "numpy")), (["--help"], ("torch", "numpy")),
                         (["info", str(small / "m.jwt")], ("torch",))):
        call = f"cli.main({args!r}, standalone_mode=False)"
        proc = subprocess.run([sys.executable, "-c", probe.format(call=call)], env=ENV, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
        loaded = proc.stdout.strip().splitlines()[-1].split()
        assert not set(absent) & set(loaded), (args, loaded)
