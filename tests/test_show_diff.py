"""jwt show (tiles as a PNG) and jwt diff (per-tensor error table), on small synthetic models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import codec
from jwt_cli.main import cli


def run(*args, code: int = 0):
    """Invoke the CLI in-process, check the exit status and return the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture()
def model(tmp_path):
    """A .pt with a rows-mode matrix (28x28 rows), a grid matrix, a bias and tied weights; and its .jwt."""
    g = torch.Generator().manual_seed(0)
    sd = {"fc1.weight": torch.randn(64, 784, generator=g), "fc2.weight": torch.randn(150, 100, generator=g),
          "fc2.bias": torch.randn(150, generator=g)}
    sd["tied.weight"] = sd["fc2.weight"]
    torch.save(sd, tmp_path / "m.pt")
    run("encode", tmp_path / "m.pt", "-o", tmp_path / "m.jwt", "--row-shape", "28x28", "--quality", "50", "-q")
    return tmp_path / "m.pt", tmp_path / "m.jwt"


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG, checking that it is one."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_show_one_tile_beside_the_original_and_the_error(model, tmp_path):
    """--tile with --original writes a PNG of three panels and reports the tile's relative error."""
    pt, jwt = model
    result = run("show", jwt, "fc1.weight", "--tile", "3", "--original", pt, "-o", tmp_path / "t.png")
    assert "tile 3" in result.output and "relative error" in result.output
    width, height = png_size(tmp_path / "t.png")
    assert width > 2 * height  # three panels side by side
    original = torch.load(pt, weights_only=True)["fc1.weight"][3].double()
    decoded = codec.load(jwt)["fc1.weight"][3].double()
    expected = float((decoded - original).norm() / original.norm())
    assert f"{expected:.2%}" in result.output


def test_show_overview_and_lossless_tensors_without_original(model, tmp_path):
    """Without --tile an overview of the first tiles is drawn; a lossless tensor is shown in display tiles."""
    _, jwt = model
    assert "first 6 of 6 tiles" in run("show", jwt, "fc2.weight", "-o", tmp_path / "o.png").output
    png_size(tmp_path / "o.png")
    run("show", jwt, "fc2.bias", "-o", tmp_path / "b.png")
    png_size(tmp_path / "b.png")
    run("show", jwt, "tied.weight", "--tile", "0", "-o", tmp_path / "a.png")  # an alias shows its target
    png_size(tmp_path / "a.png")
    run("show", jwt, "fc1.weight")  # default name beside the input
    png_size(jwt.with_name("m.fc1.weight.png"))


@pytest.mark.parametrize("args, code, text", [
    (["fc1.weight", "--tile", "64"], 2, "has 64 tiles (0..63)"),
    (["fc9.weight"], 2, "no tensor 'fc9.weight'"),
])
def test_show_refuses_unknown_tensors_and_tiles(model, tmp_path, args, code, text):
    """An unknown tensor or an out-of-range tile is a usage error naming the valid range; nothing is written."""
    _, jwt = model
    result = run("show", jwt, *args, "-o", tmp_path / "x.png", code=code)
    assert text in result.output and not (tmp_path / "x.png").exists()


def test_diff_table_is_aligned_with_totals_and_bits(model, tmp_path):
    """diff of a .pt and its .jwt lists every tensor with errors and bits/weight in aligned columns, then totals."""
    pt, jwt = model
    lines = run("diff", pt, jwt).output.splitlines()
    head, rows = lines[0], lines[1:5]
    assert head.split() == ["name", "shape", "dtype", "rel.err", "max.err", "codec(B)", "bits/w(B)"]
    assert [r.split()[0] for r in rows] == ["fc1.weight", "fc2.weight", "fc2.bias", "tied.weight"]
    assert len({len(r) for r in [head, *rows] if "tied" not in r}) == 1  # right-aligned columns end together
    assert rows[2].split()[3] == "0.000e+00" and rows[3].split()[-1] == "-"
    total = next(line for line in lines if line.startswith("total"))
    assert "4 tensors" in total and any(line.startswith("B file:") for line in lines)


def test_diff_json_matches_the_decoded_errors(model, tmp_path):
    """diff --json gives per-tensor relative errors equal to those of the decoded tensors, and the bits from the index."""
    pt, jwt = model
    doc = json.loads(run("diff", pt, jwt, "--json").output)
    assert doc["schema_version"] == 1 and doc["only_in_a"] == doc["only_in_b"] == []
    original, decoded = torch.load(pt, weights_only=True), codec.load(jwt)
    by_name = {t["name"]: t for t in doc["tensors"]}
    for name, t in by_name.items():
        a, b = original[name].double(), decoded[name].double()
        assert t["rel_error"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-9)
        assert t["max_error"] == pytest.approx(float((b - a).abs().max()), rel=1e-9)
    with codec.open(jwt) as f:
        entry = f.reader.entry("fc1.weight")
        assert by_name["fc1.weight"]["bits_per_weight_b"] == pytest.approx(8 * entry.stored_bytes / entry.numel)
    assert by_name["tied.weight"]["codec_b"] == "=fc2.weight"


def test_diff_accepts_safetensors_folders_and_reports_missing_names(model, tmp_path):
    """Either side may be a .safetensors or a folder; names on one side only are listed."""
    pt, jwt = model
    sd = {k: v.clone() for k, v in torch.load(pt, weights_only=True).items() if k != "tied.weight"}
    sd["extra"] = torch.zeros(3)
    (tmp_path / "folder").mkdir()
    save_file(sd, tmp_path / "folder" / "model.safetensors")
    out = run("diff", tmp_path / "folder", jwt).output
    assert "only in A (1): extra" in out and "only in B (1): tied.weight" in out
    sd["fc2.bias"] = torch.zeros(150)
    save_file(sd, tmp_path / "z.safetensors")
    doc = json.loads(run("diff", tmp_path / "z.safetensors", pt, "--json").output)
    bias = next(t for t in doc["tensors"] if t["name"] == "fc2.bias")
    assert bias["rel_error"] is None and np.isfinite(bias["max_error"])
    assert "bits_per_weight_b" not in doc["totals"]
