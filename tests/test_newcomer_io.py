"""Issue 13, files in and out as a new user meets them: default outputs, checkpoint dicts, shared memory,
links out of a model folder, metadata, size figures, error messages and the Python API's arguments."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import codec
from codec import io_formats
from codec.api import TREE_KEY
from jwt_cli.main import cli


def run(*args, code: int = 0):
    """Invoke the CLI in-process (stderr apart), check the exit status and return the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def one_line_error(result, *words: str) -> str:
    """The failure message of ``result``: exit 1, one line, no traceback, holding ``words``."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model: one lossy matrix and a bias."""
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(64, 64, generator=g), "fc.bias": torch.randn(64, generator=g)}


# -- 1. a default decode output never replaces a file ---------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_default_decode_output_never_replaces_the_original(tmp_path, suffix):
    """`jwt encode mid.pt; jwt decode mid.jwt` leaves mid.pt alone, writes mid.decoded.pt and says so."""
    src = tmp_path / f"mid{suffix}"
    (torch.save if suffix == ".pt" else save_file)(weights(), src)
    before = src.read_bytes()
    run("encode", src, "-q")
    first = run("decode", tmp_path / "mid.jwt", "-q")
    assert src.read_bytes() == before
    assert f"mid.decoded{suffix}" in first.stderr and (tmp_path / f"mid.decoded{suffix}").is_file()
    second = run("decode", tmp_path / "mid.jwt", "-q")
    assert f"mid.decoded-2{suffix}" in second.stderr and (tmp_path / f"mid.decoded-2{suffix}").is_file()
    assert src.read_bytes() == before
    back = codec.read_tensors(tmp_path / f"mid.decoded{suffix}")
    assert set(back) == set(weights()) and torch.equal(back["fc.bias"], weights()["fc.bias"])


def test_default_decode_of_a_folder_picks_a_fresh_folder(tmp_path):
    """A folder's .jwt decodes beside it into FOLDER.decoded/ when FOLDER exists; the folder is left as it was."""
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(weights(), folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    run("encode", folder, "-q")
    result = run("decode", tmp_path / "m.jwt", "-q")
    assert "m.decoded" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "m.decoded").iterdir()) == ["config.json", "model.safetensors"]
    assert not io_formats.default_output(tmp_path / "x.jwt", {}).exists()


# -- 2. checkpoint dicts --------------------------------------------------------------------------------------


def _training_checkpoint() -> dict:
    """A checkpoint as training scripts write it: model, EMA copy, Adam's state_dict after one step, epoch.

    The optimizer part is laid out as ``torch.optim.Adam.state_dict()`` lays it out (built by hand: importing
    torch.optim takes seconds).
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    state = {i: {"step": torch.tensor(1.0), "exp_avg": 0.1 * p.detach().clone(), "exp_avg_sq": 0.01 * p.detach() ** 2}
             for i, p in enumerate(model.parameters())}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "foreach": None,
               "maximize": False, "capturable": False, "differentiable": False, "fused": None, "params": [0, 1, 2, 3]}]
    return {"model": model.state_dict(), "ema": ema, "optimizer": {"state": state, "param_groups": groups}, "epoch": 3,
            "config": {"lr": 1e-3, "sizes": (64, 4), "name": "mlp", "flags": [True, None], "best": float("inf")}}


def _same(a, b, path="") -> None:
    """Assert two checkpoints have the same structure, plain values and (close) tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.allclose(a.float(), b.float(), atol=0.05 * float(a.float().abs().max()) + 1e-6), path
        return
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}.{i}")
    else:
        assert a == b, (path, a, b)


def test_training_checkpoint_keeps_every_part_and_decodes_to_the_same_nesting(tmp_path):
    """model, ema, optimizer (int keys, param_groups) and epoch survive `jwt encode` + `jwt decode -o x.pt`."""
    ckpt = _training_checkpoint()
    torch.save(ckpt, tmp_path / "ckpt.pt")
    result = run("encode", tmp_path / "ckpt.pt", "-q")
    assert "warning" not in result.stderr
    with codec.open(tmp_path / "ckpt.jwt") as f:
        names = f.keys()
    assert {"model.0.weight", "ema.2.bias", "optimizer.state.0.exp_avg", "optimizer.state.3.step"} <= set(names)
    run("decode", tmp_path / "ckpt.jwt", "-o", tmp_path / "back.pt", "-q")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    _same(ckpt, back)
    assert back["optimizer"]["param_groups"] == ckpt["optimizer"]["param_groups"]
    assert torch.equal(back["optimizer"]["state"][2]["exp_avg_sq"], ckpt["optimizer"]["state"][2]["exp_avg_sq"])
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    assert codec.load_into(model, tmp_path / "ckpt.jwt") is not None  # the weights under 'model.'


@pytest.mark.parametrize("obj, names", [
    ({"w": torch.ones(3), "sub": {"x": torch.zeros(2)}}, ["w", "sub.x"]),
    ({"a": {"w": torch.ones(3)}, "b": {"w": torch.zeros(3)}}, ["a.w", "b.w"]),
    ({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, ["a.b", "a.b#2"]),  # dotted keys stay unambiguous
    ({"layers": [torch.ones(2), {"w": torch.zeros(1)}], 7: torch.full((2,), 7.0)}, ["layers.0", "layers.1.w", "7"]),
])
def test_nested_dicts_round_trip_through_the_api(tmp_path, obj, names):
    """codec.save of a nested dict names tensors by dotted path; decode_model to .pt rebuilds the same object."""
    codec.save(obj, tmp_path / "n.jwt")
    assert list(codec.load(tmp_path / "n.jwt")) == names
    codec.decode_model(tmp_path / "n.jwt", tmp_path / "n.pt")
    _same(obj, torch.load(tmp_path / "n.pt", weights_only=True))


def test_plain_state_dict_has_no_tree_and_unkeepable_values_are_named(tmp_path):
    """A plain state_dict writes no jwt.tree; a value JSON cannot hold is named in a warning and marked dropped."""
    codec.save(weights(), tmp_path / "plain.jwt")
    assert not any(k.startswith(TREE_KEY) for k in codec.open(tmp_path / "plain.jwt").metadata)
    torch.save({"model": weights(), "seen": {1, 2}, "tag": b"raw"}, tmp_path / "c.pt")
    result = run("encode", tmp_path / "c.pt", "-q")
    assert "seen (set)" in result.stderr and "tag (bytes)" in result.stderr
    tree = codec.open(tmp_path / "c.jwt").metadata[TREE_KEY]
    assert '"dropped":"builtins.set"' in tree and '"dropped":"builtins.bytes"' in tree
    decoded = run("decode", tmp_path / "c.jwt", "-o", tmp_path / "c2.pt", "-q")
    assert "seen (builtins.set)" in decoded.stderr
    assert set(torch.load(tmp_path / "c2.pt", weights_only=True)) == {"model"}


def test_a_long_tree_spans_several_metadata_values(tmp_path):
    """A tree over the readers' 64 KiB string limit is split over jwt.tree, jwt.tree.1, ... and still round trips."""
    obj = {"w": torch.ones(4), "history": [float(i) / 7 for i in range(20000)]}
    codec.save(obj, tmp_path / "h.jwt")
    meta = codec.open(tmp_path / "h.jwt").metadata
    assert f"{TREE_KEY}.1" in meta
    codec.decode_model(tmp_path / "h.jwt", tmp_path / "h.pt")
    assert torch.load(tmp_path / "h.pt", weights_only=True)["history"] == obj["history"]
    assert max(map(len, run("info", tmp_path / "h.jwt").stdout.splitlines())) < 300  # jwt info shortens it


def test_a_checkpoint_nested_too_deep_is_one_line(tmp_path):
    """A checkpoint nested hundreds of levels deep: one line naming the file (no RecursionError traceback)."""
    obj: dict = {"w": torch.ones(2)}
    for _ in range(300):
        obj = {"a": obj}
    torch.save(obj, tmp_path / "deep.pt")
    one_line_error(run("encode", tmp_path / "deep.pt", code=1), "deep.pt", "levels deep")
    with pytest.raises(codec.EncodeError, match="levels deep"):
        codec.save(obj, tmp_path / "deep.jwt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.pt"]


def test_a_malformed_tree_is_a_format_error(tmp_path):
    """A hostile jwt.tree (unknown node, missing tensor) fails with one line, no traceback and no output."""
    for tree in ('{"evil":1}', '{"tensor":"nope"}', '[' * 60000):
        codec.save(weights(), tmp_path / "m.jwt", metadata={TREE_KEY: tree})
        one_line_error(run("decode", tmp_path / "m.jwt", "-o", tmp_path / "m.pt", code=1), "jwt.tree")
        assert not (tmp_path / "m.pt").exists()


# -- 4. overlapping views -------------------------------------------------------------------------------------


def test_overlapping_views_stay_equal_after_decoding(tmp_path):
    """{'a': b, 'b': b[:10]}: both stored exactly (with a note), so decoded b still equals decoded a[:10]."""
    base = torch.randn(256, 256)
    notes = codec.save({"a": base, "b": base[:10], "c": torch.randn(128, 128)}, tmp_path / "v.jwt")
    assert any("'a', 'b'" in n and "overlapping" in n for n in notes), notes
    back = codec.load(tmp_path / "v.jwt")
    assert torch.equal(back["b"], back["a"][:10]) and torch.equal(back["a"], base)
    with codec.open(tmp_path / "v.jwt") as f:
        codecs = {e.name: e.codec.codec_id for e in f.reader.index.entries}
    assert codecs == {"a": "zstd_planes", "b": "zstd_planes", "c": "quant"}  # disjoint tensors are coded as usual
    assert codec.api._sharing({"x": base[:100], "y": base[100:]})[1] == []  # adjacent, not overlapping


# -- 5. links out of a model folder ---------------------------------------------------------------------------


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    save_file(weights(), root / "model.safetensors")
    (root / "config.json").write_text('{"a": 1}')
    return root


def test_links_out_of_a_model_folder_are_skipped_with_a_warning(tmp_path):
    """link.txt -> a file outside is not embedded (warning names it); a link inside the folder still travels."""
    folder = _folder(tmp_path / "m")
    (tmp_path / "secret.txt").write_text("password")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    (folder / "same.json").symlink_to("config.json")
    result = run("encode", folder, "-o", tmp_path / "m.jwt", "-q")
    assert "link.txt" in result.stderr and "out of the folder" in result.stderr
    with codec.open(tmp_path / "m.jwt") as f:
        assert sorted(f.attachments) == ["config.json", "same.json"]
        assert b"password" not in b"".join(f.get_attachment(a) for a in f.attachments)
    (folder / "link.txt").unlink()
    (folder / "model.safetensors").rename(tmp_path / "w.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "w.safetensors")
    one_line_error(run("encode", folder, "-o", tmp_path / "m2.jwt", code=1), "model.safetensors", "symbolic link")


def test_a_hugging_face_cache_snapshot_still_encodes(tmp_path):
    """In the hub cache every file of snapshots/REV/ is a link to ../../blobs/: those are followed."""
    blobs = _folder(tmp_path / "models--x" / "blobs")
    snap = tmp_path / "models--x" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (snap / name).symlink_to(Path("../../blobs") / name)
    result = run("encode", snap, "-o", tmp_path / "s.jwt", "-q")
    assert "warning" not in result.stderr
    with codec.open(tmp_path / "s.jwt") as f:
        assert f.attachments == ["config.json"] and f.get_attachment("config.json") == b'{"a": 1}'
    assert blobs.is_dir()


# -- 6. --meta source=... -------------------------------------------------------------------------------------


def test_meta_source_keeps_the_users_value(tmp_path):
    """`--meta source=mine` is stored as given; without it the input's name is."""
    torch.save(weights(), tmp_path / "mid.pt")
    run("encode", tmp_path / "mid.pt", "--meta", "source=mine", "-q")
    assert codec.open(tmp_path / "mid.jwt").metadata["source"] == "mine"
    codec.encode_model(tmp_path / "mid.pt", tmp_path / "api.jwt", metadata={"source": "theirs"})
    assert codec.open(tmp_path / "api.jwt").metadata["source"] == "theirs"
    run("encode", tmp_path / "mid.pt", "-q")
    assert codec.open(tmp_path / "mid.jwt").metadata["source"] == "mid.pt"


# -- 10. one bits/weight --------------------------------------------------------------------------------------


def test_encode_summary_info_and_api_agree_on_bits_per_weight(tmp_path):
    """With tied tensors, `jwt encode`'s summary, `jwt info` and f.totals() print the same two figures."""
    sd = {**weights(), "tied.weight": None}
    sd["tied.weight"] = sd["fc.weight"]
    torch.save(sd, tmp_path / "t.pt")
    summary = run("encode", tmp_path / "t.pt").stdout
    info = run("info", tmp_path / "t.jwt").stdout
    doc = json.loads(run("info", tmp_path / "t.jwt", "--json").stdout)["totals"]
    with codec.open(tmp_path / "t.jwt") as f:
        totals = f.totals()
    size = (tmp_path / "t.jwt").stat().st_size
    assert totals.weights == 64 * 64 + 64 and totals.raw_bytes == 4 * totals.weights  # the alias adds nothing
    assert totals.bits_per_weight == pytest.approx(8 * size / totals.weights)
    assert totals.ratio == pytest.approx(totals.raw_bytes / size)
    figures = f"{totals.bits_per_weight:.3f} bits/weight, {totals.ratio:.1f}x smaller"
    assert figures in summary and figures in info, (summary, info)
    assert doc["bits_per_weight"] == totals.bits_per_weight and doc["ratio"] == totals.ratio


# -- 12. errors name the output, not a temporary file --------------------------------------------------------


def test_errors_name_the_output_not_a_temporary_file(tmp_path):
    """-o into a missing folder, onto a folder, and codec.save there: messages name what was asked for."""
    torch.save(weights(), tmp_path / "mid.pt")
    line = one_line_error(run("encode", tmp_path / "mid.pt", "-o", tmp_path / "nodir" / "x.jwt", code=1),
                          "nodir/x.jwt", "does not exist")
    assert not re.search(r"tmp\w{6,}|\.tmp", line), line
    with pytest.raises(FileNotFoundError) as caught:
        codec.save(weights(), tmp_path / "nodir" / "x.jwt")
    assert caught.value.filename == str(tmp_path / "nodir" / "x.jwt") and ".tmp" not in str(caught.value)
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        codec.save(weights(), tmp_path / "adir")
    assert caught.value.filename == str(tmp_path / "adir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "mid.pt"]


def test_permission_errors_name_the_output_even_as_root(tmp_path, monkeypatch):
    """A folder that refuses new files (simulated: root ignores modes) gives one line naming the output."""
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir or ".", "tmp6_jym0y3"))

    torch.save(weights(), tmp_path / "mid.pt")
    for name in ("TemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    line = one_line_error(run("encode", tmp_path / "mid.pt", "-o", tmp_path / "x.jwt", code=1), "x.jwt",
                          "Permission denied")
    assert "tmp6_jym0y3" not in line
    monkeypatch.undo()
    run("encode", tmp_path / "mid.pt", "-o", tmp_path / "x.jwt", "-q")
    for name in ("TemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    for out in ("back.pt", "back.safetensors", "back/"):
        line = one_line_error(run("decode", tmp_path / "x.jwt", "-o", f"{tmp_path}/{out}", code=1), out.rstrip("/"))
        assert "tmp6_jym0y3" not in line and "Permission denied" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_error_names_the_output(tmp_path):
    """Encoding into a read-only folder: one line naming the output, no temporary name."""
    torch.save(weights(), tmp_path / "mid.pt")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_line_error(run("encode", tmp_path / "mid.pt", "-o", ro / "x.jwt", code=1), "ro/x.jwt")
        assert ".tmp" not in line and "tmp" not in line.split("ro/x.jwt")[1]
    finally:
        ro.chmod(0o755)


# -- 13. -o FOLDER/ -------------------------------------------------------------------------------------------


def test_output_folder_gets_the_jwt_inside(tmp_path):
    """`-o outdir/` creates outdir and writes outdir/mid.jwt; an existing folder without the slash too."""
    torch.save(weights(), tmp_path / "mid.pt")
    run("encode", tmp_path / "mid.pt", "-o", f"{tmp_path / 'outdir'}/", "-q")
    assert (tmp_path / "outdir" / "mid.jwt").is_file()
    (tmp_path / "there").mkdir()
    run("encode", tmp_path / "mid.pt", "-o", tmp_path / "there", "-q")
    assert [p.name for p in (tmp_path / "there").iterdir()] == ["mid.jwt"]
    codec.encode_model(tmp_path / "mid.pt", f"{tmp_path / 'api'}/")
    assert (tmp_path / "api" / "mid.jwt").is_file()


# -- 15. our own message when torch refuses a .pt --------------------------------------------------------------


class Custom:
    """A class torch's safe loader does not know."""


@pytest.mark.parametrize("kind, words", [("text", "not a PyTorch file"), ("object", "Custom"),
                                         ("pickle", "not a PyTorch file"), ("truncated", "truncated"),
                                         ("npz", "x.npy")])
def test_refused_pt_gets_one_line_of_our_own(tmp_path, kind, words):
    """A text file named .pt, a checkpoint with an object, a plain pickle, a cut file, an .npz: one line saying
    what the file is not and what jwt reads, never torch's advice to load with weights_only=False."""
    src = tmp_path / "bad.pt"
    if kind == "text":
        src.write_text("hello, this is not a model\n")
    elif kind == "object":
        torch.save({"w": torch.ones(2), "obj": Custom()}, src)
    elif kind == "pickle":
        src.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    elif kind == "truncated":
        torch.save(weights(), src)
        src.write_bytes(src.read_bytes()[:2000])
    else:
        import numpy as np

        np.savez(tmp_path / "a.npz", x=np.ones(3))
        (tmp_path / "a.npz").rename(src)
    line = one_line_error(run("encode", src, code=1), "bad.pt", words, ".safetensors", "model folder")
    assert "weights_only" not in line and "False" not in line and "trust" not in line, line
    assert "enforce fail" not in line and not line.rstrip(")").endswith(" "), line


# -- 20. the Python API's arguments --------------------------------------------------------------------------


def test_open_file_indexing_and_get_options(tmp_path):
    """f['name'] decodes; a missing name is a KeyError naming it; get() takes dtype= and device=."""
    codec.save({**weights(), "ids": torch.arange(4)}, tmp_path / "m.jwt")
    with codec.open(tmp_path / "m.jwt") as f:
        assert torch.equal(f["fc.bias"], weights()["fc.bias"])
        with pytest.raises(KeyError, match="nope"):
            f["nope"]
        assert f.get("fc.weight", dtype=torch.float16, device="cpu").dtype == torch.float16
        assert f.get("ids", dtype="bfloat16").dtype == torch.int64  # integers keep their dtype


def test_decode_side_usage_errors_are_not_encode_errors(tmp_path):
    """dtype=torch.int32 and a non-empty output folder: UsageError (a ValueError), never EncodeError."""
    codec.save(weights(), tmp_path / "m.jwt")
    with pytest.raises(codec.UsageError, match="floating") as caught:
        codec.load(tmp_path / "m.jwt", dtype=torch.int32)
    assert not isinstance(caught.value, codec.EncodeError) and isinstance(caught.value, ValueError)
    with pytest.raises(TypeError, match="dtype"):
        codec.load(tmp_path / "m.jwt", dtype=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(codec.UsageError, match="not empty") as caught:
        codec.decode_model(tmp_path / "m.jwt", tmp_path / "full")
    assert not isinstance(caught.value, codec.EncodeError)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_save_takes_a_module_and_refuses_what_it_cannot_store(tmp_path):
    """nn.Module -> its state_dict; a tensor or a list -> one-line TypeError; {} -> refused, no file."""
    layer = torch.nn.Linear(4, 4)
    codec.save(layer, tmp_path / "lin.jwt")
    back = codec.load(tmp_path / "lin.jwt")
    assert set(back) == {"weight", "bias"} and torch.equal(back["bias"], layer.bias.detach())
    for bad in (torch.ones(3), [torch.ones(2), torch.ones(3)]):
        with pytest.raises(TypeError) as caught:
            codec.save(bad, tmp_path / "bad.jwt")
        assert "\n" not in str(caught.value) and "state_dict" in str(caught.value)
    with pytest.raises(codec.EncodeError, match="no tensors"):
        codec.save({}, tmp_path / "empty.jwt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lin.jwt"]


@pytest.mark.parametrize("kwargs, error, words", [
    ({"bits_per_weight": "abc"}, TypeError, "bits_per_weight must be a number, not str"),
    ({"bits_per_weight": True}, TypeError, "bits_per_weight must be a number, not bool"),
    ({"bits_per_weight": float("nan")}, ValueError, "bits_per_weight=nan: must be above 0"),
    ({"bits_per_weight": -1}, ValueError, "bits_per_weight=-1: must be above 0"),
    ({"bits_per_weight": 65}, ValueError, "at most 64"),
    ({"max_error": 0}, ValueError, "max_error=0: must be above 0"),
    ({"max_error": "0.1"}, TypeError, "max_error must be a number"),
    ({"bitz": 3}, TypeError, "unexpected keyword argument 'bitz'"),
    ({"bits_per_weight": 4, "calibrate": 3}, TypeError, "calibrate= must be a function of a state_dict"),
])
def test_save_names_a_wrong_argument_in_one_line(tmp_path, kwargs, error, words):
    """Wrong rate targets and unknown keywords: one line naming the argument (not an internal comparison or
    dataclass error), nothing written."""
    with pytest.raises(error) as caught:
        codec.save(weights(), tmp_path / "m.jwt", **kwargs)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert "EncodeOptions.__init__" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_wrong_path_and_source_types_are_type_errors_not_attribute_errors(tmp_path):
    """codec.save(sd, 123) and codec.open(5) / codec.load(5.0): a TypeError naming what is accepted."""
    with pytest.raises(TypeError, match="path must be a file path or a binary file object open for writing, not int"):
        codec.save(weights(), 123)
    for bad in (5, 5.0, None):
        with pytest.raises(TypeError, match=f"binary file object open for reading, not {type(bad).__name__}"):
            codec.open(bad)
        with pytest.raises(TypeError, match="not " + type(bad).__name__):
            codec.load(bad)
    buf = io.BytesIO()
    codec.save(weights(), buf)  # a writable file object is a destination
    assert set(codec.load(buf.getvalue())) == set(weights())
    with pytest.raises(TypeError, match="encode_model: source must be the path"):
        codec.encode_model(weights(), tmp_path / "m.jwt")
    codec.save(weights(), tmp_path / "m.jwt")
    with pytest.raises(TypeError, match="decode_model: output must be a path"):
        codec.decode_model(tmp_path / "m.jwt", 7)
    layer = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, not str \(the model comes first"):
        codec.load_into(str(tmp_path / "m.jwt"), layer)  # arguments swapped
    with pytest.raises(TypeError, match="load_into: model must be a torch.nn.Module, not dict"):
        codec.load_into(weights(), tmp_path / "m.jwt")
