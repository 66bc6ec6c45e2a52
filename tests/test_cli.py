"""The jwt command line, run through click's CliRunner and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from jwt_cli.main import cli

torch.manual_seed(0)


@pytest.fixture()
def model_pt(tmp_path):
    """A small state_dict with a lossy matrix, a bias and an integer buffer."""
    sd = {"fc1.weight": torch.randn(128, 196), "fc1.bias": torch.randn(128), "steps": torch.tensor(3)}
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    return path


def run(*args: str):
    """Invoke the CLI in-process and return the result."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_encode_decode_round_trip_with_default_names(model_pt):
    """encode writes INPUT.jwt, decode writes a .pt torch.load reads with the same names/shapes/dtypes."""
    result = run("encode", model_pt, "--row-shape", "14x14", "--quality", "50")
    assert result.exit_code == 0, result.output
    jwt_path = model_pt.with_suffix(".jwt")
    assert jwt_path.exists() and "bits/weight" in result.output
    model_pt.rename(model_pt.with_name("orig.pt"))
    assert run("decode", jwt_path).exit_code == 0
    out = torch.load(model_pt, weights_only=True)
    orig = torch.load(model_pt.with_name("orig.pt"), weights_only=True)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in orig.items()}
    assert torch.equal(out["fc1.bias"], orig["fc1.bias"])


def test_info_json_lists_every_tensor_without_decoding(model_pt, tmp_path, monkeypatch):
    """info --json reports per-tensor codec and sizes, from the index alone."""
    import codec.reader

    assert run("encode", model_pt, "-o", tmp_path / "m.jwt", "-q").exit_code == 0
    monkeypatch.setattr(codec.reader, "decode_tensor", lambda *a: pytest.fail("info decoded a tensor"))
    result = run("info", tmp_path / "m.jwt", "--json")
    doc = json.loads(result.output)
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["fc1.weight"]["codec"] == "quant" and by_name["fc1.weight"]["tiles"] > 0  # the default
    assert by_name["fc1.bias"]["codec"] == "zstd_planes"
    assert doc["totals"]["nbytes"] == (tmp_path / "m.jwt").stat().st_size
    assert {"name", "shape", "dtype", "codec", "nbytes"} <= set(by_name["steps"])
    table = run("info", tmp_path / "m.jwt")
    assert "fc1.weight" in table.output and "total:" in table.output


def test_info_shows_compressed_tile_parameters():
    """info reports each tiled tensor's parameter blob (bytes, zstd frame or plain) and the format 1.4 total."""
    vector = Path(__file__).resolve().parent.parent / "fixtures/vectors/valid/params_zstd_quant.jwt"
    by_name = {t["name"]: t for t in json.loads(run("info", vector, "--json").output)["tensors"]}
    assert by_name["layer.weight"]["params_zstd"] and by_name["layer.weight"]["params_nbytes"] < 64 * 4
    assert not by_name["head.weight"]["params_zstd"] and by_name["head.weight"]["params_nbytes"] == 6 * 4
    text = run("info", vector).output
    assert "(format 1.4)" in text
    assert f"tile parameters: 1 tensors as zstd frames (flag params_zstd), 256 -> " \
           f"{by_name['layer.weight']['params_nbytes']} bytes" in text


def test_lossless_codec_is_bit_exact(model_pt, tmp_path):
    """--codec lossless gives back exactly the input tensors."""
    run("encode", model_pt, "-o", tmp_path / "m.jwt", "--codec", "lossless")
    run("decode", tmp_path / "m.jwt", "-o", tmp_path / "back.pt")
    a, b = torch.load(model_pt, weights_only=True), torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, code, text", [
    (["encode", "missing.pt"], 1, "missing.pt: no such file"),
    (["decode", "missing.jwt"], 1, "missing.jwt: no such file"),
    (["info", "missing.jwt"], 1, "missing.jwt: no such file"),
    (["encode", "x.pt", "--tile", "0x5"], 2, "--tile"),
    (["encode", "x.pt", "--quality", "101"], 2, "--quality"),
    (["frobnicate"], 2, "No such command"),
    (["decode", "-"], 2, "-o is required"),
])
def test_errors_and_usage_exit_codes(tmp_path, monkeypatch, args, code, text):
    """Failures exit 1 and usage errors exit 2, each with a message naming the problem."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code
    assert text in result.output
    assert "Traceback" not in result.output


def test_bad_files_give_one_line_errors(tmp_path):
    """A non-.jwt, a truncated file and a foreign .pt give one-line errors naming the file."""
    (tmp_path / "text.jwt").write_text("hello world, definitely not jwt" * 3)
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    for args in (["info", tmp_path / "text.jwt"], ["decode", tmp_path / "text.jwt", "-o", tmp_path / "o.pt"],
                 ["encode", tmp_path / "bad.pt", "-o", tmp_path / "o.jwt"]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and str(args[1]) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "text.jwt"]


def test_output_equal_to_input_is_refused(model_pt):
    """-o naming the input is refused and the input is left byte for byte."""
    before = model_pt.read_bytes()
    result = run("encode", model_pt, "-o", model_pt)
    assert result.exit_code == 1 and "refusing to overwrite the input" in result.output
    assert model_pt.read_bytes() == before


def test_decode_from_stdin_in_a_subprocess(model_pt, tmp_path):
    """`jwt decode - -o out.pt < model.jwt` works through a real pipe and the installed entry point."""
    jwt_path = tmp_path / "m.jwt"
    subprocess.run([sys.executable, "-m", "jwt_cli", "encode", str(model_pt), "-o", str(jwt_path), "-q"], check=True)
    with open(jwt_path, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "jwt_cli", "decode", "-", "-o", str(tmp_path / "s.pt")],
                              stdin=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert set(torch.load(tmp_path / "s.pt", weights_only=True)) == {"fc1.weight", "fc1.bias", "steps"}


def test_help_explains_the_options():
    """--help of encode documents the codec choices and the row shape option."""
    result = run("encode", "--help")
    assert "--row-shape" in result.output and "lossless" in result.output and "Examples" in result.output


def test_out_of_memory_names_the_input_and_what_needs_less(tmp_path, monkeypatch):
    """Under `ulimit -v` a user's sharded checkpoint that -j 1 encodes failed at the default threads with only
    "Error: out of memory": the message names the input and says that -j 1 needs least; exit 1, no output."""
    import codec.encode
    from jwt_cli.main import cli

    torch.save({"w": torch.randn(64, 64)}, tmp_path / "m.pt")

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(codec.encode, "save", no_memory)
    for jobs, hint in ((None, True), ("2", True), ("1", False)):
        args = ["encode", str(tmp_path / "m.pt"), "-q"] + ([] if jobs is None else ["-j", jobs])
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines() == [
            f"Error: {tmp_path / 'm.pt'}: out of memory" + (" (each coding thread holds its own tensors and buffers: "
                                                           "-j 1 needs least)" if hint else "")]
        assert not (tmp_path / "m.jwt").exists()


def test_decode_to_a_folder_says_what_it_wrote(tmp_path):
    """`jwt decode m.jwt -o out/` said "N tensors and the attachments" even when the file had none: it now counts
    the shards and attachments written, and names none where there are none."""
    import json

    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, tmp_path / "m.pt")
    assert CliRunner().invoke(cli, ["encode", str(tmp_path / "m.pt"), "-q"]).exit_code == 0
    r = CliRunner().invoke(cli, ["decode", str(tmp_path / "m.jwt"), "-o", str(tmp_path / "out") + "/"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == f"{tmp_path / 'out'}/: 2 tensors"
    folder = tmp_path / "hf"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"a": torch.randn(300, 300), "c": torch.randn(300, 300)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 300}))
    (folder / "vocab.txt").write_text("a\nb\n")
    assert CliRunner().invoke(cli, ["encode", str(folder), "-o", str(tmp_path / "hf.jwt"), "-q"]).exit_code == 0
    r = CliRunner().invoke(cli, ["decode", str(tmp_path / "hf.jwt"), "-o", str(tmp_path / "hf_out") + "/",
                                 "--max-shard-size", "400KB"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == f"{tmp_path / 'hf_out'}/: 2 tensors in 2 shards and 2 attachments"
