"""The torch-facing API: save/load/open, dtypes, sharing, determinism, streams."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import codec
from codec.api import TORCH_DTYPES, read_state_dict

torch.manual_seed(0)


def _all_dtypes() -> dict[str, torch.Tensor]:
    """One tensor of every supported dtype, plus 0-d, empty and non-contiguous ones."""
    out = {}
    for dtype in TORCH_DTYPES:
        if dtype.is_floating_point:
            t = torch.randn(33, 17).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(33, 17) > 0.5
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(max(info.min, -1000), min(info.max, 1000), (33, 17)).to(dtype)
        out[f"t.{str(dtype).removeprefix('torch.')}"] = t
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 7)
    out["noncontig"] = torch.randn(40, 60).t()
    out["int_scalar"] = torch.tensor(7, dtype=torch.int64)
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_lossless_is_bit_exact_for_every_dtype(tmp_path):
    """--codec lossless returns every dtype, shape and bit unchanged."""
    sd = _all_dtypes()
    codec.save(sd, tmp_path / "m.jwt", codec="lossless")
    out = codec.load(tmp_path / "m.jwt")
    assert list(out) == list(sd)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert _bits(out[name]) == _bits(t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_lossy_tensors_keep_their_dtype_and_are_close(tmp_path, dtype):
    """A lossy matrix comes back in its own dtype with small relative error at quality 95."""
    w = torch.randn(256, 300).to(dtype)
    codec.save({"w": w}, tmp_path / "m.jwt", quality=95)
    with codec.open(tmp_path / "m.jwt") as f:
        assert f.reader.entry("w").codec.codec_id == "jpeg"
        back = f.get("w")
    assert back.dtype == dtype and back.shape == w.shape
    rel = (back.double() - w.double()).norm() / w.double().norm()
    assert rel < 0.03


def test_shared_storage_is_stored_once_and_shared_again(tmp_path):
    """Tied tensors become an alias entry and load as one tensor object."""
    emb = torch.randn(300, 64)
    sd = {"embed.weight": emb, "head.weight": emb, "other": emb.clone()}
    codec.save(sd, tmp_path / "m.jwt")
    with codec.open(tmp_path / "m.jwt") as f:
        assert f.reader.entry("head.weight").alias == "embed.weight"
        assert f.reader.entry("other").alias is None
    out = codec.load(tmp_path / "m.jwt")
    assert out["head.weight"] is out["embed.weight"]
    assert out["other"] is not out["embed.weight"]


def test_same_input_gives_same_bytes(tmp_path):
    """Encoding is deterministic and does not depend on anything but tensors and options."""
    sd = {"a": torch.randn(200, 100), "b": torch.arange(10)}
    codec.save(sd, tmp_path / "1.jwt", quality=30)
    codec.save(dict(sd), tmp_path / "2.jwt", quality=30)
    assert (tmp_path / "1.jwt").read_bytes() == (tmp_path / "2.jwt").read_bytes()


def test_open_is_lazy_and_get_decodes_one_tensor(tmp_path, monkeypatch):
    """codec.open reads only the index; get decodes only the tensor asked for."""
    import codec.reader as reader_mod

    sd = {f"layer{i}.weight": torch.randn(128, 128) for i in range(4)}
    codec.save(sd, tmp_path / "m.jwt", metadata={"author": "test"})
    decoded = []
    real = reader_mod.decode_tensor
    monkeypatch.setattr(reader_mod, "decode_tensor", lambda e, b, **kw: decoded.append(e.name) or real(e, b, **kw))
    with codec.open(tmp_path / "m.jwt") as f:
        assert f.keys() == list(sd) and len(f) == 4 and "layer2.weight" in f
        assert f.metadata == {"author": "test"}
        assert decoded == []
        f.get("layer2.weight")
    assert decoded == ["layer2.weight"]


def test_non_seekable_stream_decodes_in_order(tmp_path):
    """codec.load reads a pipe-like stream front to back, giving the same tensors as a file."""
    sd = {"a": torch.randn(100, 200), "b": torch.randn(10), "c": torch.randn(64, 64)}
    sd["tied"] = sd["a"]
    codec.save(sd, tmp_path / "m.jwt")
    data = (tmp_path / "m.jwt").read_bytes()

    class Pipe(io.RawIOBase):
        def __init__(self):
            self.buf = io.BytesIO(data)

        def readable(self):
            return True

        def seekable(self):
            return False

        def readinto(self, b):
            chunk = self.buf.read(min(len(b), 1000))
            b[: len(chunk)] = chunk
            return len(chunk)

    from_stream = codec.load(io.BufferedReader(Pipe()))
    from_file = codec.load(tmp_path / "m.jwt")
    assert list(from_stream) == list(sd)
    for name in sd:
        assert torch.equal(from_stream[name], from_file[name])
    assert from_stream["tied"] is from_stream["a"]


def test_save_writes_to_a_file_object(tmp_path):
    """codec.save accepts a binary file object and codec.load accepts bytes."""
    buf = io.BytesIO()
    codec.save({"x": torch.randn(50, 50)}, buf, codec="lossless")
    assert torch.equal(codec.load(buf.getvalue())["x"], codec.load(buf.getvalue())["x"])


def test_failed_save_leaves_no_file(tmp_path):
    """An error while encoding leaves neither the output nor a temporary file."""
    with pytest.raises(codec.EncodeError):
        codec.save({"ok": torch.randn(10), "bad": torch.randn(2, 2).to(torch.complex64)}, tmp_path / "m.jwt")
    assert list(tmp_path.iterdir()) == []


def test_read_state_dict_flattens_checkpoints_and_warns_about_what_it_cannot_keep(tmp_path):
    """A checkpoint's tensors come back under dotted names; a value the tree cannot keep is named in a warning."""
    sd = {"w": torch.randn(3, 3), "step": 5}
    torch.save({"model": sd, "epoch": 3, "raw": b"bytes"}, tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning, match=r"raw \(bytes\)"):
        out = read_state_dict(tmp_path / "ckpt.pt")
    assert list(out) == ["model.w"] and torch.equal(out["model.w"], sd["w"])


def test_read_state_dict_refuses_non_weights(tmp_path):
    """A file that is not a weights-only checkpoint is an EncodeError naming the file."""
    (tmp_path / "x.pt").write_bytes(b"hello")
    with pytest.raises(codec.EncodeError, match="x.pt"):
        read_state_dict(tmp_path / "x.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(codec.EncodeError, match="not a state_dict"):
        read_state_dict(tmp_path / "list.pt")


def test_seed_setting_meets_its_budget(mlp_state_dict, fmnist_subset, tmp_path):
    """The seed setting (28x28 rows at quality 20) costs <= 1.0 bits per first-layer weight and <= 1 point."""
    import sys

    sys.path.insert(0, str(__import__("conftest").REPO))
    from bench.models import evaluate_state_dict

    images, labels = fmnist_subset
    codec.save(mlp_state_dict, tmp_path / "m.jwt", quality=20, row_shape=(28, 28))
    with codec.open(tmp_path / "m.jwt") as f:
        entry = f.reader.entry("fc1.weight")
        assert entry.tiling.mode == "rows" and entry.tiling.tile_h == 28
        bits = 8 * entry.stored_bytes / entry.numel
    decoded = codec.load(tmp_path / "m.jwt")
    before = evaluate_state_dict("mlp", mlp_state_dict, images, labels)
    after = evaluate_state_dict("mlp", decoded, images, labels)
    assert bits <= 1.0
    assert before - after <= 1.0
    assert np.isfinite(after)
