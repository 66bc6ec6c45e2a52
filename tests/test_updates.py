"""Updates (format 1.1): coding a model as differences from a base the receiver holds, and decoding it back.

Round trips through codec.save/load and the CLI; the base is checked
before anything is decoded or written; chains of updates do not pile up
error; the rate search reaches very low budgets on an update.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import codec
from codec.update import Base
from jwt_cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _models(seed: int = 0):
    """A base model and a fine-tune of it: changed, unchanged, renamed, reshaped, added, removed and tied tensors."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(32, 16, generator=g)
    old = {
        "fc1.weight": torch.randn(64, 96, generator=g) * 0.05,
        "fc1.bias": torch.randn(64, generator=g) * 0.01,
        "frozen.weight": torch.randn(16, 32, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(100),
        "head.weight": torch.randn(10, 64, generator=g),
        "gone": torch.ones(3),
        "emb": emb,
        "lm_head": emb,
    }
    new_emb = emb + 0.001 * torch.randn(32, 16, generator=g)
    new = {
        "fc1.weight": old["fc1.weight"] + 0.002 * torch.randn(64, 96, generator=g),
        "fc1.bias": old["fc1.bias"] + 1e-4 * torch.randn(64, generator=g),
        "frozen.weight": old["frozen.weight"].clone(),
        "renamed": old["gone"].clone(),  # bit-identical to a base tensor of another name
        "steps": torch.tensor(200),
        "head.weight": torch.randn(64, 10, generator=g),  # reshaped
        "added": torch.arange(5.0),
        "emb": new_emb,
        "lm_head": new_emb,
    }
    return old, new


def _check(decoded: dict, new: dict, rel: float) -> None:
    assert list(decoded) == list(new)
    for name, tensor in new.items():
        got = decoded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        if not tensor.is_floating_point():
            assert torch.equal(got, tensor), name
            continue
        err = float((got.float() - tensor.float()).norm() / max(float(tensor.float().norm()), 1e-30))
        assert err <= rel, (name, err)


def test_update_round_trip_every_kind_of_tensor(tmp_path):
    """codec.save(base=) then codec.load(base=): each kind of entry decodes; ties stay tied; unchanged is exact."""
    old, new = _models()
    path = tmp_path / "u.jwt"
    codec.save(new, path, base=old)
    with codec.Reader(path, base=codec.api.as_base(old)) as reader:
        kinds = {e.name: "alias" if e.alias else "full" if e.base is None else
                 "unchanged" if e.unchanged else "delta" for e in reader.index.entries}
        refs = {e.name: e.base.name for e in reader.index.entries if e.base}
    assert kinds == {"fc1.weight": "delta", "fc1.bias": "delta", "frozen.weight": "unchanged",
                     "renamed": "unchanged", "steps": "full", "head.weight": "full", "added": "full",
                     "emb": "delta", "lm_head": "alias"}
    assert refs["renamed"] == "gone"
    decoded = codec.load(path, base=old)
    _check(decoded, new, 1e-3)  # 8-bit quant of a difference ~4 % of the weights: ~1e-4 relative
    assert torch.equal(decoded["frozen.weight"], new["frozen.weight"])
    assert torch.equal(decoded["renamed"], new["renamed"])
    assert decoded["lm_head"] is decoded["emb"]


def test_update_without_base_is_not_a_1_0_file_and_1_0_files_stay_1_0(tmp_path):
    """An update has the flag 'update' (minor 1 or more); without a base, no flag: minor 2 for the 1.2 codec
    zstd_planes (lossless float32 biases), and a file without either is a 1.0 file, as before; any of them is a
    1.3 file with the flag 'index_zstd' where its index is stored compressed (spec 8.6)."""
    old, new = _models()
    codec.save(new, tmp_path / "u.jwt", base=old)
    codec.save(new, tmp_path / "m.jwt")
    codec.save({"steps": torch.arange(10)}, tmp_path / "i.jwt")
    for name, minor, flags in (("u", 2, 1), ("m", 2, 0), ("i", 0, 0)):
        head = (tmp_path / f"{name}.jwt").read_bytes()[:40]
        if head[12] & 2:  # the index stored compressed (flag index_zstd, 1.3): a zstd frame follows the header
            minor, flags = 3, flags | 2
            assert head[32:36] == b"\x28\xb5\x2f\xfd"
        assert head[8:16] == bytes([1, 0, minor, 0, flags, 0, 0, 0]), name


def test_missing_or_wrong_base_is_refused_before_decoding(tmp_path):
    """load without a base, or with another or a modified one: BaseError naming the tensor; open reads the index."""
    old, new = _models()
    path = tmp_path / "u.jwt"
    codec.save(new, path, base=old)
    with pytest.raises(codec.BaseError, match="no base was given"):
        codec.load(path)
    with codec.open(path) as f:  # the index is readable without the base
        assert f.is_update and "fc1.weight" in f.keys()
        with pytest.raises(codec.BaseError, match="needs its base"):
            f.get("fc1.weight")
        assert torch.equal(f.get("added"), new["added"])  # full entries need nothing from the base
    modified = dict(old)
    modified["fc1.bias"] = old["fc1.bias"].clone()
    modified["fc1.bias"][7] += 1e-6
    with pytest.raises(codec.BaseError, match="tensor 'fc1.bias' differs") as info:
        codec.load(path, base=modified)
    assert "\n" not in str(info.value) and "u.jwt" in str(info.value)
    extra = dict(old, more=torch.zeros(2))
    with pytest.raises(codec.BaseError, match="has 9 tensors"):
        codec.load(path, base=extra)
    fewer = {k: v for k, v in old.items() if k != "steps"}  # a tensor the update does not use
    with pytest.raises(codec.BaseError, match="has 7 tensors"):
        codec.load(path, base=fewer)
    with pytest.raises(TypeError, match="base must be"):
        codec.load(path, base=42)


def test_jwt_base_differences_are_taken_against_the_decoded_base_so_chains_do_not_accumulate(tmp_path):
    """v1 -> v2 -> v3, each update against the previous *decoded* model: v3's error is one step's, not a sum."""
    g = torch.Generator().manual_seed(3)
    v1 = {"w": torch.randn(128, 128, generator=g) * 0.05}
    v2 = {"w": v1["w"] + 0.01 * torch.randn(128, 128, generator=g)}
    v3 = {"w": v2["w"] + 0.01 * torch.randn(128, 128, generator=g)}
    codec.save(v1, tmp_path / "v1.jwt", bits=4, codec="quant")  # a coarse base: its error would carry over
    codec.save(v2, tmp_path / "v2.jwt", base=tmp_path / "v1.jwt")
    v2_decoded = codec.load(tmp_path / "v2.jwt", base=tmp_path / "v1.jwt")
    torch.save(v2_decoded, tmp_path / "v2.pt")
    codec.save(v3, tmp_path / "v3.jwt", base=tmp_path / "v2.pt")
    v3_decoded = codec.load(tmp_path / "v3.jwt", base=tmp_path / "v2.pt")
    step = float((v3["w"] - v2["w"]).abs().max())  # 8-bit quant of a difference of this range
    assert float((v3_decoded["w"] - v3["w"]).abs().max()) <= 1.1 * 2 * step / 255
    v1_error = float((codec.load(tmp_path / "v1.jwt")["w"] - v1["w"]).abs().max())
    assert v1_error > 10 * 2 * step / 255  # so the base's own error did not reach v3
    with pytest.raises(codec.BaseError, match="is itself an update"):
        codec.save(v3, tmp_path / "x.jwt", base=tmp_path / "v2.jwt")


def test_rate_search_reaches_very_low_budgets_on_an_update(tmp_path):
    """-b 0.05 lands on an update (unchanged and coarse settings on the menu); error measured on the new weights."""
    g = torch.Generator().manual_seed(5)
    old = {"a": torch.randn(256, 256, generator=g) * 0.05, "b": torch.randn(128, 256, generator=g) * 0.05}
    new = {"a": old["a"] + 0.004 * torch.randn(256, 256, generator=g), "b": old["b"].clone()}
    new["b"][:64] += 0.02 * torch.randn(64, 256, generator=g)
    weights = sum(t.numel() for t in new.values())
    sizes, errors = {}, {}
    for bpw in (0.05, 0.5):
        path = tmp_path / f"u{bpw}.jwt"
        codec.save(new, path, base=old, bits_per_weight=bpw, jobs=1)
        sizes[bpw] = path.stat().st_size
        assert 8 * sizes[bpw] / weights <= bpw
        decoded = codec.load(path, base=old)
        _check(decoded, new, 0.3)  # 'b' left unchanged is 28 % off
        errors[bpw] = sum(float((decoded[n] - new[n]).norm() ** 2 / new[n].norm() ** 2) for n in new)
    assert sizes[0.5] > 2 * sizes[0.05] and errors[0.5] < errors[0.05] / 4
    with pytest.raises(codec.EncodeError):
        codec.save(new, tmp_path / "x.jwt", bits_per_weight=0.05)  # a full model cannot get there
    codec.save(new, tmp_path / "e.jwt", base=old, max_error=0.02, jobs=1)
    decoded = codec.load(tmp_path / "e.jwt", base=old)
    for name in new:
        err = float((decoded[name] - new[name]).norm() / new[name].norm())
        assert err <= 0.02, (name, err)


def test_cli_encode_info_decode_with_base(tmp_path):
    """jwt encode --base, jwt info (update, base digest), jwt decode --base; wrong/missing base: exit 1, no output."""
    old, new = _models()
    torch.save(old, tmp_path / "old.pt")
    torch.save(new, tmp_path / "new.pt")
    r = run("encode", tmp_path / "old.pt", "-o", tmp_path / "old.jwt", "-q")
    assert r.exit_code == 0, r.output
    r = run("encode", tmp_path / "new.pt", "--base", tmp_path / "old.jwt", "-o", tmp_path / "u.jwt")
    assert r.exit_code == 0, r.output
    assert "differences" in r.output and "unchanged" in r.output
    digest = Base.open(tmp_path / "old.jwt").digest()
    r = run("info", tmp_path / "u.jwt")
    assert r.exit_code == 0 and f"sha256:{digest}" in r.output and "unchanged" in r.output, r.output
    doc = json.loads(run("info", tmp_path / "u.jwt", "--json").output)
    compressed = (tmp_path / "u.jwt").read_bytes()[12] & 2  # the index stored as a zstd frame (1.3)
    assert doc["update"] == {"base_sha256": digest, "base_tensors": 8}
    assert doc["format_version"] == ("1.3" if compressed else "1.2")
    assert {t["name"]: t.get("base") for t in doc["tensors"]}["renamed"] == "gone"
    out = tmp_path / "new_decoded.pt"
    for base in ([], ["--base", tmp_path / "old.pt"]):  # missing; the original .pt is not the decoded base
        r = run("decode", tmp_path / "u.jwt", "-o", out, *base)
        assert r.exit_code == 1 and not out.exists(), r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert "tensor 'fc1.weight' differs" in r.output
    r = run("decode", tmp_path / "u.jwt", "--base", tmp_path / "old.jwt", "-o", out)
    assert r.exit_code == 0, r.output
    _check(torch.load(out, weights_only=True), new, 1e-2)
    r = run("encode", tmp_path / "new.pt", "--base", tmp_path / "old.jwt", "-o", tmp_path / "old.jwt")
    assert r.exit_code == 1 and "overwrite the base" in r.output
    r = run("decode", tmp_path / "u.jwt", "--base", tmp_path / "missing.jwt", "-o", out)
    assert r.exit_code == 1 and "missing.jwt" in r.output


def test_update_vectors_decode_through_the_api_with_a_base_path():
    """codec.load(update vector, base=its base file) gives the expected arrays (the vectors' pairs, via torch)."""
    from pathlib import Path

    from codec.api import to_numpy

    vectors = Path(__file__).resolve().parent.parent / "fixtures" / "vectors"
    manifest = json.loads((vectors / "manifest.json").read_text())
    for item in manifest["updates"]["cases"]:
        if "error" in item:
            continue
        arrays = np.load(vectors / item["expected"])
        state_dict = codec.load(vectors / item["file"], base=vectors / item["base"])
        for t in item["tensors"]:
            assert to_numpy(state_dict[t["name"]])[0].tobytes() == arrays[t["expected"]].tobytes()


def test_fill_can_take_a_pareto_point_off_the_hull():
    """With fill_front, the greedy pass takes a cheap off-hull difference that fits (the next hull point does not)."""
    from codec.rd.allocate import RDPoint, fill_budget, lower_hull, pareto_front
    from codec.tensorcodec import EncodeOptions

    o = EncodeOptions()
    pts = [RDPoint(o, "unchanged", 100, 0.04), RDPoint(o, "q1", 7000, 0.013), RDPoint(o, "q2", 7700, 0.0086)]
    assert [p.label for p in lower_hull(pts)] == ["unchanged", "q2"]
    assert [p.label for p in pareto_front(pts)] == ["unchanged", "q1", "q2"]
    chosen = {"w": pts[0]}
    assert fill_budget({"w": lower_hull(pts)}, {}, chosen, 7200)["w"].label == "unchanged"
    assert fill_budget({"w": pareto_front(pts)}, {}, chosen, 7200)["w"].label == "q1"


def test_writer_refuses_base_references_it_cannot_write(tmp_path):
    """A base reference needs an update writer; a difference needs a floating dtype."""
    from codec.dtypes import get_dtype
    from codec.format import BaseId, BaseRef
    from codec.tensorcodec import EncodeOptions, encode_tensor
    from codec.writer import Writer

    ref = BaseRef("x", "0" * 64)
    array = np.arange(4, dtype=np.int32)
    encoded = encode_tensor(array, get_dtype("int32"), EncodeOptions())
    with Writer(tmp_path / "a.jwt") as w, pytest.raises(codec.EncodeError, match="not an update"):
        w.add_unchanged("x", get_dtype("int32"), (4,), ref)
    with Writer(tmp_path / "b.jwt", base=BaseId("0" * 64, 1)) as w, pytest.raises(codec.EncodeError,
                                                                                 match="floating dtype"):
        w.add("x", get_dtype("int32"), (4,), encoded, base=ref)


def test_show_and_diff_with_base_read_an_update_as_the_new_model(tmp_path):
    """jwt show/diff --base: the update decodes to the new model; the error against the new model is small and
    against the base is the change; costs are the update's; missing base: usage (2); wrong base: one line (1)."""
    old, new = _models()
    torch.save(old, tmp_path / "old.pt")
    torch.save(new, tmp_path / "new.pt")
    codec.save(old, tmp_path / "old.jwt")
    codec.save(new, tmp_path / "u.jwt", base=tmp_path / "old.jwt")
    u, png = tmp_path / "u.jwt", tmp_path / "x.png"

    def rel(doc, name):
        return {t["name"]: t for t in doc["tensors"]}[name]["rel_error"]

    r = run("diff", tmp_path / "new.pt", u, "--base", tmp_path / "old.jwt", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    rows = {t["name"]: t for t in doc["tensors"]}
    assert rows["frozen.weight"]["codec_b"] == "unchanged" and rows["fc1.weight"]["codec_b"].endswith("+base")
    assert rel(doc, "fc1.weight") < 0.01 and doc["totals"]["file_bytes_b"] == u.stat().st_size
    r = run("diff", tmp_path / "old.jwt", u, "--base", tmp_path / "old.jwt", "--json")  # what the update changes
    assert r.exit_code == 0, r.output
    change = float((new["fc1.weight"] - old["fc1.weight"]).norm() / old["fc1.weight"].norm())
    assert rel(json.loads(r.output), "fc1.weight") == pytest.approx(change, rel=0.2)
    r = run("diff", u, u, "--base", tmp_path / "old.jwt")  # both sides updates of one base
    assert r.exit_code == 0 and "total (9 tensors)" in r.output, r.output

    r = run("show", u, "fc1.weight", "--base", tmp_path / "old.jwt", "--original", tmp_path / "new.pt", "-o", png)
    assert r.exit_code == 0 and png.stat().st_size > 0, r.output
    assert float(r.output.split("relative error ")[1].rstrip().rstrip("%")) < 1.0, r.output
    png.unlink()
    r = run("show", u, "fc1.weight", "--base", tmp_path / "old.jwt", "--original", tmp_path / "old.pt", "-o", png)
    assert r.exit_code == 0, r.output
    assert float(r.output.split("relative error ")[1].rstrip().rstrip("%")) > 2.0, r.output

    png.unlink()
    for args in (("diff", tmp_path / "new.pt", u), ("show", u, "fc1.weight", "-o", png)):
        r = run(*args)  # no base: a usage message naming the update and the option
        assert r.exit_code == 2 and "u.jwt is an update" in r.output and "--base" in r.output, r.output
        r = run(*args, "--base", tmp_path / "old.pt")  # the original, not the base as decoded: refused
        assert r.exit_code == 1 and "tensor 'fc1.weight' differs" in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        r = run(*args, "--base", tmp_path / "missing.jwt")
        assert r.exit_code == 1 and "missing.jwt: no such file" in r.output, r.output
        r = run(*args, "--base", u)  # an update is no base
        assert r.exit_code == 1 and "is itself an update" in r.output, r.output
        assert not png.exists()
    r = run("diff", tmp_path / "new.pt", tmp_path / "old.jwt", "--base", tmp_path / "old.jwt")
    assert r.exit_code == 0 and "is not used: neither" in r.output, r.output


def test_round_significand_keeps_the_bits_asked_and_is_exact_on_values_that_have_them():
    """Each element within 2**-(bits+1) of itself (relative), exact where it already fits; every float dtype."""
    from codec.api import to_numpy
    from codec.dtypes import get_dtype, to_float64
    from codec.update.delta import round_significand

    rng = np.random.default_rng(0)
    values = rng.standard_normal(4096) * 10.0 ** rng.integers(-6, 3, 4096)
    for name in ("float64", "float32", "float16", "bfloat16"):
        dtype = get_dtype(name)
        stored = to_numpy(torch.from_numpy(values).to(getattr(torch, name)))[0]
        for bits in (1, 3, 6):
            x = to_float64(stored, dtype)
            y = to_float64(round_significand(stored, dtype, bits), dtype)
            assert np.all(np.abs(y - x) <= np.abs(x) * 2.0 ** -(bits + 1)), (name, bits)
            assert np.array_equal(to_float64(round_significand(round_significand(stored, dtype, bits), dtype, bits),
                                             dtype), y), (name, bits)  # already rounded: unchanged
        assert not np.array_equal(y, x)


def test_a_changed_vector_can_be_coded_as_a_rounded_difference_at_a_low_budget(tmp_path):
    """A bias's difference (no lossy codec takes a vector) is coded with its significands rounded: cheaper than
    the exact difference, closer than leaving the base's bias."""
    from codec.reader import Reader

    g = torch.Generator().manual_seed(0)
    old = {"fc.weight": torch.randn(256, 256, generator=g) * 0.05, "fc.bias": torch.randn(1024, generator=g) * 0.1}
    new = {"fc.weight": old["fc.weight"] + 0.004 * torch.randn(256, 256, generator=g),
           "fc.bias": old["fc.bias"] + 0.01 * torch.randn(1024, generator=g)}
    path = tmp_path / "u.jwt"
    codec.save(new, path, base=old, bits_per_weight=0.2, jobs=1)
    with Reader(path) as r:
        bias = r.entry("fc.bias")
    assert bias.base is not None and bias.codec is not None and bias.stored_bytes < 1024 * 4 / 3
    decoded = codec.load(path, base=old)["fc.bias"]
    change = new["fc.bias"] - old["fc.bias"]
    error = decoded - new["fc.bias"]
    assert 0 < float(error.norm()) < 0.5 * float(change.norm())
    assert torch.all(error.abs() <= change.abs() * 0.25 + 1e-7)  # at worst one significand bit: 2**-2 of it


def test_repair_is_refused_with_a_base_and_off_by_default_for_an_update(tmp_path):
    """Repair codes whole weights, not differences: repair=True with base= is a ValueError; calibration= alone
    gives an update within the budget."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    old = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    inputs = torch.randn(64, 64, generator=g)
    with pytest.raises(ValueError, match="repair=True and base="):
        codec.save(model, tmp_path / "r.jwt", base=old, bits_per_weight=1.0, calibration=inputs, repair=True)
    assert not (tmp_path / "r.jwt").exists()
    codec.save(model, tmp_path / "c.jwt", base=old, bits_per_weight=3.0, calibration=inputs, jobs=1)
    weights = sum(p.numel() for p in model.state_dict().values())
    assert 8 * (tmp_path / "c.jwt").stat().st_size / weights <= 3.0
    decoded, new = codec.load(tmp_path / "c.jwt", base=old), model.state_dict()
    error = sum(float((decoded[k] - new[k]).norm() ** 2) for k in new)
    assert error < 0.5 * sum(float((old[k] - new[k]).norm() ** 2) for k in new)  # closer to new than the base is
