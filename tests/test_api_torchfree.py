"""Encoding a safetensors input without torch (codec.encode): the same bytes as from torch tensors, and torch is
never imported by ``jwt encode`` of a .safetensors file or a folder of shards, nor by a decode to safetensors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import codec
from codec import io_formats
from codec.api import TORCH_DTYPES, to_numpy
from codec.encode import Arrays, float64_values, progress_total
from jwt_cli.main import cli


def _model(generator_seed: int = 0) -> dict[str, torch.Tensor]:
    """A small transformer-like state_dict in every dtype family: matrices followed by LayerNorms (their gains
    weigh the rate search), a bf16 and an fp16 matrix, fp8 gains, integer and bool buffers."""
    g = torch.Generator().manual_seed(generator_seed)
    return {
        "enc.0.dense.weight": torch.randn(96, 128, generator=g).to(torch.bfloat16),
        "enc.0.dense.bias": torch.randn(96, generator=g).to(torch.bfloat16),
        "enc.0.LayerNorm.weight": (1 + 0.3 * torch.randn(96, generator=g)).to(torch.float8_e4m3fn),
        "enc.0.LayerNorm.bias": torch.randn(96, generator=g),
        "enc.1.dense.weight": torch.randn(64, 96, generator=g).half(),
        "enc.1.ln.weight": (1 + 0.3 * torch.randn(64, generator=g)).to(torch.float8_e5m2),
        "enc.2.weight": torch.randn(80, 64, generator=g),
        "enc.2.norm.weight": 1 + 0.3 * torch.randn(80, generator=g),
        "ids": torch.arange(50, dtype=torch.int64),
        "mask": torch.rand(30, generator=g) > 0.5,
    }


def _folder(root, sd: dict[str, torch.Tensor]):
    """A Hugging Face style folder: the tensors in two safetensors shards with their index, and a config."""
    root.mkdir()
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for file, part in shards.items():
        save_file({n: sd[n] for n in part}, root / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text('{"hidden_size": 96}')
    return root


@pytest.mark.parametrize("args", [[], ["-b", "3"], ["--max-error", "0.05", "--set", "enc.2.*=lossless"]])
def test_cli_encode_of_safetensors_is_the_bytes_codec_save_writes_from_torch_tensors(tmp_path, args):
    """The torch-free path (a .safetensors read as storage arrays) and the torch path (the same tensors as torch
    tensors, converted at the edge) write byte-identical files, with and without a rate search."""
    path = tmp_path / "m.safetensors"
    save_file(_model(), path, metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["encode", str(path), "-o", str(tmp_path / "cli.jwt"), "-q", *args])
    assert result.exit_code == 0, result.output
    with io_formats.open_source(path) as src:
        order, meta = list(src.tensors), src.metadata
    loaded = load_file(path)
    tensors = {n: loaded[n] for n in order}  # torch tensors, in the file's order
    options: dict = {}
    if args[:1] == ["-b"]:
        options["bits_per_weight"] = float(args[1])
    elif args:
        options.update(max_error=0.05, overrides=[("enc.2.*", "lossless")])
    codec.save(tensors, tmp_path / "api.jwt", metadata={"source": path.name, **meta}, **options)
    assert (tmp_path / "cli.jwt").read_bytes() == (tmp_path / "api.jwt").read_bytes()
    back = codec.load(tmp_path / "cli.jwt")
    assert torch.equal(back["ids"], tensors["ids"]) and torch.equal(back["mask"], tensors["mask"])
    assert back["enc.0.dense.weight"].dtype == torch.bfloat16


_NO_TORCH = """
import sys
from pathlib import Path
from jwt_cli.main import cli
import codec
from codec.encode import Arrays
import numpy as np

work = Path(sys.argv[1])
runs = [
    ["encode", str(work / "m.safetensors"), "-o", str(work / "a.jwt"), "-q"],
    ["encode", str(work / "m.safetensors"), "-o", str(work / "b.jwt"), "-b", "3", "-j", "2"],
    ["encode", str(work / "folder"), "-o", str(work / "f.jwt"), "-b", "3", "-q"],
    ["encode", str(work / "m2.safetensors"), "-o", str(work / "u.jwt"), "--base", str(work / "a.jwt"), "-b", "3",
     "-q"],
    ["decode", str(work / "f.jwt"), "-o", str(work / "out") + "/", "-q"],
    ["decode", str(work / "b.jwt"), "-o", str(work / "b.safetensors"), "-q"],
]
for args in runs:
    try:
        cli(args, standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
codec.encode_model(work / "folder", work / "api.jwt")
codec.save(Arrays({"w": ((64, 64), "float32")}, lambda name: np.ones((64, 64), np.float32)), work / "arrays.jwt")
print("torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "safetensors", "tqdm")))
"""


def test_encode_and_decode_of_safetensors_never_import_torch(tmp_path):
    """``jwt encode`` of a .safetensors file (default, -b, -j 2), of a folder of shards, an update against a .jwt
    base, ``jwt decode`` to a folder and to a .safetensors, codec.encode_model and codec.save of Arrays: torch is
    not in sys.modules after all of them (it costs seconds of start-up), nor tqdm (no bar shows off a terminal),
    and the outputs are right."""
    sd = _model()
    save_file(sd, tmp_path / "m.safetensors")
    changed = dict(sd, **{"enc.2.weight": sd["enc.2.weight"] + 0.01})
    save_file(changed, tmp_path / "m2.safetensors")
    _folder(tmp_path / "folder", sd)
    paths = os.pathsep.join([p for p in sys.path if p])
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "False []", r.stdout[-500:]
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert (tmp_path / "out" / "config.json").read_text() == '{"hidden_size": 96}'
    assert set(out) == set(sd) and torch.equal(out["ids"], sd["ids"])
    assert torch.equal(load_file(tmp_path / "b.safetensors")["mask"], sd["mask"])
    assert (tmp_path / "f.jwt").read_bytes()[:4] == (tmp_path / "api.jwt").read_bytes()[:4]
    with codec.open(tmp_path / "u.jwt", base=tmp_path / "a.jwt") as f:
        assert f.is_update and torch.equal(f.get("ids"), sd["ids"])
    assert torch.equal(codec.load(tmp_path / "arrays.jwt")["w"], torch.ones(64, 64))


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_float64_values_are_torchs_for_every_dtype(dtype):
    """The float64 values the data-free weighting reads from storage arrays are exactly torch's .to(float64), for
    every code of the 8-bit floats (NaN where torch has NaN) and the edges of the others."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.arange(256, dtype=torch.uint8).view(dtype)
    elif dtype == torch.bool:
        t = torch.tensor([True, False, True])
    elif dtype.is_floating_point:
        info = torch.finfo(dtype)
        t = torch.tensor([0.0, -0.0, 1.5, -2.25, info.max, info.min, info.tiny, info.tiny / 4, float("inf"),
                          float("nan")]).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.tensor([0, 1, info.max, info.min, info.max - 1], dtype=dtype)
    array, name = to_numpy(t)
    np.testing.assert_array_equal(float64_values(array, name), t.to(torch.float64).numpy())


def test_arrays_mapping_reads_on_access_and_progress_counts_from_shapes(tmp_path):
    """Arrays reads a tensor each time it is asked for (KeyError for a name it lacks), and progress_total of it
    is what progress_total of the same torch tensors is, without reading anything; shapes given as lists are
    tuples (the LayerNorm weighting compares them), so the file is the one codec.save writes from the tensors."""
    sd = _model()
    reads: list[str] = []

    def read(name):
        reads.append(name)
        return to_numpy(sd[name])[0]

    arrays = Arrays({n: (list(t.shape), TORCH_DTYPES[t.dtype]) for n, t in sd.items()}, read)  # shapes as lists
    assert progress_total(arrays, bits_per_weight=3.0) == progress_total(sd, bits_per_weight=3.0) > 0
    assert reads == []
    assert arrays["ids"].tolist() == list(range(50)) and reads == ["ids"]
    with pytest.raises(KeyError):
        arrays.array("nope")
    codec.save(arrays, tmp_path / "a.jwt", bits_per_weight=3.0)
    codec.save(sd, tmp_path / "t.jwt", bits_per_weight=3.0)
    assert (tmp_path / "a.jwt").read_bytes() == (tmp_path / "t.jwt").read_bytes()


def test_lazy_tensors_takes_a_reader_or_a_loader():
    """io_formats.LazyTensors over storage arrays gives torch tensors on indexing, and over a torch loader gives
    storage arrays from array(); giving both or neither is a one-line TypeError."""
    t = torch.randn(3, 4).to(torch.bfloat16)
    info = {"t": ((3, 4), "bfloat16")}
    by_read = io_formats.LazyTensors(info, read=lambda name: to_numpy(t)[0])
    by_load = io_formats.LazyTensors(info, lambda name: t)
    assert torch.equal(by_read["t"], t) and np.array_equal(by_load.array("t"), to_numpy(t)[0])
    with pytest.raises(TypeError, match="exactly one of load"):
        io_formats.LazyTensors(info)


@pytest.mark.parametrize("bits", [None, 12.0])
def test_attachments_compressed_on_threads_give_the_same_bytes(tmp_path, monkeypatch, bits):
    """Attachments are compressed on threads of their own (while the tensors are coded, or before the search): the
    file is the same bytes whatever the number of jobs, and the same as when they are compressed one at a time as
    they are written (over PACK_AHEAD_BYTES); a missing attachment file fails naming it, leaving no output."""
    from codec import encode

    _folder(tmp_path / "folder", _model())
    rng = np.random.default_rng(0)
    (tmp_path / "folder" / "vocab.txt").write_text("\n".join(f"w{rng.integers(10**6)}" for _ in range(3000)))
    (tmp_path / "folder" / "sub").mkdir()
    (tmp_path / "folder" / "sub" / "tokenizer.json").write_bytes(rng.integers(0, 40, 5000, dtype=np.uint8).tobytes())
    options = {} if bits is None else {"bits_per_weight": bits}
    outputs = []
    for k, jobs in enumerate([1, 3, 2]):
        if k == 2:
            monkeypatch.setattr(encode, "PACK_AHEAD_BYTES", 0)
        codec.encode_model(tmp_path / "folder", tmp_path / f"{k}.jwt", jobs=jobs, **options)
        outputs.append((tmp_path / f"{k}.jwt").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    with codec.open(tmp_path / "0.jwt") as f:
        assert f.get_attachment("vocab.txt") == (tmp_path / "folder" / "vocab.txt").read_bytes()
        assert sorted(f.attachments) == ["config.json", "sub/tokenizer.json", "vocab.txt"]
    with io_formats.open_source(tmp_path / "folder") as src:
        (tmp_path / "folder" / "vocab.txt").unlink()
        with pytest.raises(FileNotFoundError, match="vocab.txt"):
            codec.save(src.tensors, tmp_path / "gone.jwt", attachments=src.attachments, jobs=2, **options)
    assert not (tmp_path / "gone.jwt").exists()


@pytest.mark.parametrize("read, found", [
    (lambda name: np.zeros((4, 4), np.float64), "float64 [4, 4]"),
    (lambda name: np.zeros((2, 8), np.float32), "float32 [2, 8]"),
    (lambda name: [[0.0] * 4] * 4, "a list"),
])
def test_arrays_that_read_other_than_announced_fail_naming_the_tensor(tmp_path, read, found):
    """An Arrays whose reader returns another dtype or shape than its info says (or no array) is a one-line
    EncodeError naming the tensor, before anything is coded; no file is left."""
    arrays = Arrays({"w": ((4, 4), "float32")}, read)
    with pytest.raises(codec.EncodeError, match=rf"tensor 'w': read as {re.escape(found)}, not the float32 \[4, 4\]"):
        codec.save(arrays, tmp_path / "m.jwt")
    assert not (tmp_path / "m.jwt").exists()
