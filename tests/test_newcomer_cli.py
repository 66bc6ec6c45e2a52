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
                          text=True, check=False, **kwargs)


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
    codec.save({f"t{i}": torch.zeros(3) for i in range(3000)}, tmp_path / "many.jwt")  # a table of ~150 KB
    proc = subprocess.Popen([sys.executable, "-m", "jwt_cli", "info", str(tmp_path / "many.jwt")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as head does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141) and err == "", err


# -- item 16: jwt show's names, fonts and formats --------------------------------------------------------------


def test_show_long_and_non_ascii_names_and_picture_formats(tmp_path):
    """A 300-character name gets a short default name; CJK/emoji names no matplotlib warnings; -o x.jpg is JPEG."""
    import warnings

    long_name, cjk, emoji = "block." * 50 + "weight", "层.权重", "🙂.weight"
    sd = {long_name: torch.randn(64, 300), cjk: torch.randn(64, 300), emoji: torch.randn(64, 300)}
    codec.save(sd, tmp_path / "m.jwt")
    for name in (long_name, cjk, emoji):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run("show", tmp_path / "m.jwt", name)
        assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
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
    codec.save(expected, tmp_path / "att.jwt", attachments={"config.json": b"{}", "vocab.txt": b"a\n" * 5000})
    with serve(tmp_path, ranges=False) as server:
        with codec.open(server.url("m.jwt")) as f:
            for name in ("l0.weight", "l1.weight", "l3.weight", "l0.bias", "l2.weight", "l0.weight"):
                assert torch.equal(f.get(name), expected[name]), name
        assert all(status == 200 for *_, status, _ in server.log)
        server.log.clear()
        assert codec.verify(server.url("att.jwt")).attachments == 2
        assert len(server.log) == 1  # tensors, then attachments, from one response
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
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        loaded = proc.stdout.strip().splitlines()[-1].split()
        assert not set(absent) & set(loaded), (args, loaded)


# -- item 7: the rate search reaches above 8 bits --------------------------------------------------------------


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Four 128x256 Gaussian matrices as a state_dict and a .pt."""
    folder = tmp_path_factory.mktemp("four")
    g = torch.Generator().manual_seed(1)
    sd = {f"l{i}.weight": torch.randn(128, 256, generator=g) for i in range(4)}
    torch.save(sd, folder / "four.pt")
    return sd, folder


def _bits_and_error(sd, path):
    """(bits/weight of the file, largest relative error of a tensor)."""
    decoded = codec.load(path)
    worst = max(float((decoded[n] - t).norm() / t.norm()) for n, t in sd.items())
    return 8 * path.stat().st_size / sum(t.numel() for t in sd.values()), worst


def test_rate_search_lands_near_high_targets(four, tmp_path):
    """-b 10 and -b 16 land within a bit of the target; --max-error 0.001 is met well below lossless (32)."""
    sd, _ = four
    for target in (10.0, 16.0):
        codec.save(sd, tmp_path / "b.jwt", bits_per_weight=target)
        bits, _ = _bits_and_error(sd, tmp_path / "b.jwt")
        assert target - 1.0 <= bits <= target, (target, bits)
        with codec.open(tmp_path / "b.jwt") as f:
            assert all(f.reader.entry(n).codec.codec_id == "quant" for n in sd)
    codec.save(sd, tmp_path / "e.jwt", max_error=0.001)
    bits, worst = _bits_and_error(sd, tmp_path / "e.jwt")
    assert worst <= 0.001 and bits < 16, (bits, worst)


# -- item 8: options that would be ignored ---------------------------------------------------------------------


def test_contradicting_options_are_usage_errors(four):
    """Options that contradict each other by themselves exit 2 before any work, naming the option."""
    _, folder = four
    for args, word in ((["--bits", "4", "--codec", "jpeg"], "bits"), (["--codec", "quant", "--quality", "50"], "quality"),
                       (["--distance", "1", "--codec", "jpeg"], "distance"), (["-b", "3", "--quality", "50"], "quality"),
                       (["--set", "l0.weight=b4,q50"], "quality"), (["--codec", "lossless", "--row-shape", "16x16"],
                                                                   "row_shape")):
        result = run("encode", folder / "four.pt", "-o", folder / "x.jwt", *args, code=2)
        assert word in result.output, (args, result.output)
        assert not (folder / "x.jwt").exists()
    with pytest.raises(codec.EncodeError, match="bits"):
        codec.save({"w": torch.randn(64, 64)}, folder / "x.jwt", codec="jpeg", bits=4)


def test_options_the_data_overrides_are_reported(tmp_path):
    """A row shape that fits no row, a --set rule on a tensor kept lossless or on rows it does not fit, and a
    glob matching nothing are each named in a warning (the CLI) and in codec.save's notes."""
    g = torch.Generator().manual_seed(2)
    sd = {"l0.weight": torch.randn(64, 512, generator=g), "l0.bias": torch.randn(64, generator=g)}
    torch.save(sd, tmp_path / "m.pt")
    cases = {("--row-shape", "16x16"): "fits the rows of no matrix",
             ("--set", "l0.weight=rows=16x16"): "'l0.weight'",
             ("--set", "l0.bias=q50"): "stored losslessly",
             ("--set", "nothing.*=q50"): "matches no tensor"}
    for args, expected in cases.items():
        result = run("encode", tmp_path / "m.pt", "-o", tmp_path / "m.jwt", "-q", *args)
        warnings = [line for line in result.output.splitlines() if line.startswith("jwt: warning")]
        assert len(warnings) == 1 and expected in warnings[0], (args, result.output)
    notes = codec.save(sd, tmp_path / "m.jwt", overrides={"l0.weight": "rows=16x16"})
    assert any("l0.weight" in n and "16x16" in n for n in notes)
    assert codec.save(sd, tmp_path / "m.jwt", row_shape=(16, 32), codec="jpeg") == []  # fits: nothing to say


# -- item 9: worse than zeros, and the JPEG XL default ---------------------------------------------------------


def test_a_tensor_coded_worse_than_zeros_is_named(tmp_path):
    """1-bit quant and JPEG quality 1 give a relative error >= 1: a warning names the tensor and the error."""
    g = torch.Generator().manual_seed(3)
    sd = {"big.weight": torch.randn(128, 256, generator=g), "ok.weight": torch.randn(128, 256, generator=g)}
    notes = codec.save(sd, tmp_path / "m.jwt", codec="quant", bits=1, overrides={"ok.weight": "b8"})
    decoded = codec.load(tmp_path / "m.jwt")["big.weight"]
    error = float((decoded - sd["big.weight"]).norm() / sd["big.weight"].norm())
    assert error >= 1.0
    assert len(notes) == 1 and "'big.weight'" in notes[0] and f"{error:.3g}" in notes[0]
    torch.save(sd, tmp_path / "m.pt")
    result = run("encode", tmp_path / "m.pt", "-o", tmp_path / "q.jwt", "--quality", "1", "-q")
    assert result.output.count("no better than storing zeros") == 2
    assert codec.save(sd, tmp_path / "m.jwt") == []  # the default: nothing to say
    for options in ({"row_shape": (16, 16), "quality": 1}, {"codec": "jpegxl", "distance": 25.0},
                    {"codec": "jpeg", "quality": 1, "tile": (24, 40)}):  # rows, JPEG XL, edge tiles
        notes = codec.save(sd, tmp_path / "o.jwt", **options)
        decoded = codec.load(tmp_path / "o.jwt")
        errors = {n: float((decoded[n] - t).norm() / t.norm()) for n, t in sd.items()}
        assert sorted(n for n, e in errors.items() if e >= 1.0) == sorted(n for n in sd if any(f"'{n}'" in m
                                                                                              for m in notes))
        for note in notes:
            name = note.split("'")[1]
            assert f"{errors[name]:.3g}" in note, (options, note, errors)


def test_jpegxl_default_is_not_worse_than_jpeg_default(four, tmp_path):
    """At its default JPEG XL has no more error than JPEG at its default, for no more than 15 % more bytes."""
    sd, _ = four
    codec.save(sd, tmp_path / "x.jwt", codec="jpegxl")
    codec.save(sd, tmp_path / "j.jwt", codec="jpeg")
    bits_x, err_x = _bits_and_error(sd, tmp_path / "x.jwt")
    bits_j, err_j = _bits_and_error(sd, tmp_path / "j.jwt")
    assert err_x <= err_j and bits_x <= 1.15 * bits_j, (bits_x, err_x, bits_j, err_j)


# -- item 11: the progress bar under -b ------------------------------------------------------------------------


def test_progress_follows_the_work_of_the_rate_search(four, tmp_path):
    """codec.save reports per measured setting: the sum is what progress_total predicts, and the search (the
    bulk of the time) is the bulk of the units, so a bar has no 50 % -> 100 % jump."""
    from codec.api import progress_total

    sd, _ = four
    for target in ({"bits_per_weight": 2.0}, {"bits_per_weight": 10.0, "overrides": {"l0.*": "b4"}}, {}):
        calls: list[int] = []
        codec.save(sd, tmp_path / "p.jwt", progress=lambda name, n, calls=calls: calls.append(n), **target)
        assert sum(calls) == progress_total(sd, **target), target
        if target:
            coding = sum(t.numel() for t in sd.values())
            assert sum(calls) > 20 * coding  # the search's share is over 95 %
            assert max(calls) <= max(t.numel() for t in sd.values())  # steps of one setting of one tensor


def test_progress_bar_has_a_width_when_the_terminal_reports_none(monkeypatch):
    """A terminal of unknown (or zero) width still gets a bar of the default width."""
    from jwt_cli import common

    class Tty:
        def isatty(self):
            return True

        def fileno(self):
            raise OSError("no size")

        def write(self, text):
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(common.sys, "stderr", Tty())
    with common.progress_bar(100, "encode", quiet=False) as bar:
        assert not bar.disable and bar.ncols == common.DEFAULT_COLUMNS
