"""Mixture-of-experts models (twenty-second pass, bench/moe.py): each expert calibrated over the tokens routed to it,
the router as a layer, and the command line encoding a transformers MoE folder whose file holds one tensor per
expert where the model holds 3D parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec
from codec.rd import calibrate as calibrate_module
from codec.rd.calibrate import calibrate, uncalibrated
from codec.rd.experts import experts_info, moe_modules, parse_slice, slice_name


class _Router(nn.Module):
    def __init__(self, experts: int, hidden: int, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(experts, hidden))

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.reshape(-1, self.weight.shape[1]), self.weight)
        top = logits.softmax(-1).topk(self.top_k, dim=-1)
        return logits, top.values, top.indices


class _Experts(nn.Module):
    """Not a transformers class: recognised by its 3D parameters and its ``top_k_index`` argument."""

    def __init__(self, experts: int, hidden: int, inner: int, transposed: bool, gated: bool):
        super().__init__()
        self.is_transposed, self.has_gate = transposed, gated
        width = 2 * inner if gated else inner
        up = (experts, hidden, width) if transposed else (experts, width, hidden)
        down = (experts, inner, hidden) if transposed else (experts, hidden, inner)
        setattr(self, "gate_up_proj" if gated else "up_proj", nn.Parameter(torch.randn(up) / hidden ** 0.5))
        self.down_proj = nn.Parameter(torch.randn(down) / inner ** 0.5)
        self.act_fn = F.silu

    def forward(self, hidden_states, top_k_index, top_k_weights):
        up = self.gate_up_proj if self.has_gate else self.up_proj
        out = torch.zeros_like(hidden_states)
        for e in range(up.shape[0]):
            token, pos = torch.where(top_k_index == e)
            x = hidden_states[token]
            y = x @ up[e] if self.is_transposed else F.linear(x, up[e])
            if self.has_gate:
                g, u = y.chunk(2, dim=-1)
                y = self.act_fn(g) * u
            else:
                y = self.act_fn(y)
            y = y @ self.down_proj[e] if self.is_transposed else F.linear(y, self.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, pos, None])
        return out


class _MoeNet(nn.Module):
    def __init__(self, transposed=False, gated=True, experts=4, hidden=8, inner=6):
        super().__init__()
        self.embed = nn.Embedding(20, hidden)
        self.block = nn.Module()
        self.block.gate = _Router(experts, hidden)
        self.block.experts = _Experts(experts, hidden, inner, transposed, gated)
        self.head = nn.Linear(hidden, 20)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = self.block.gate(flat)
        return self.head(x + self.block.experts(flat, index, weights).reshape(x.shape))


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding left out of every statistic
    return [{"input_ids": ids, "attention_mask": mask}]


def _routes(model, batch):
    """The hidden states the experts module got and the experts each real token was routed to."""
    got = {}
    handle = model.block.experts.register_forward_hook(lambda m, a, o: got.update(x=a[0], index=a[1]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    keep = batch["attention_mask"].reshape(-1).bool()
    return got["x"][keep], got["index"][keep]


@pytest.mark.parametrize("transposed,gated", [(False, True), (True, True), (False, False)])
def test_each_expert_gets_the_moments_of_the_tokens_routed_to_it(transposed, gated):
    torch.manual_seed(0)
    model = _MoeNet(transposed, gated).eval()
    info = experts_info(model.block.experts)
    assert info is not None and info.transposed == transposed and info.gated == gated
    assert list(moe_modules(model)[1]) == ["block.gate.weight"]
    calib = calibrate(model, _batches())
    up = f"block.experts.{info.up}"
    x, index = _routes(model, _batches()[0])
    assert sum(calib.layers[f"{up}[{e}]"].samples for e in range(4)) == 56 * 2  # 56 real tokens, top 2
    hs = []
    for e in range(4):
        rows = x[(index == e).any(-1)]
        h = calib.layers[f"{up}[{e}]"].h
        assert h.shape == (8, 8)
        assert torch.allclose(torch.from_numpy(h), rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
        down = calib.layers[f"block.experts.down_proj[{e}]"]
        assert down.h.shape == (6, 6) and down.samples == len(rows)
        assert calib.layers[f"{up}[{e}]"].sensitivity > 1e-6
        hs.append(h)
    assert all(not torch.allclose(torch.from_numpy(hs[0]), torch.from_numpy(h)) for h in hs[1:])  # own statistics
    assert calib.layers["block.gate.weight"].h.shape == (8, 8)
    assert calib.layers["block.gate.weight"].samples == 56
    # the model's own 3D parameters (what codec.save stores) are weighed too: nothing left to the data-free weighting
    weightings = calib.weightings()
    for param in (up, "block.experts.down_proj"):
        assert weightings[param].fits(tuple(getattr(model.block.experts, param.rpartition(".")[2]).shape))
    assert not any("[" in name for name in weightings)
    assert uncalibrated(model, calib, [n for n, t in model.state_dict().items() if t.dim() >= 2]) is None


def test_noise_put_into_an_expert_is_taken_out_again():
    torch.manual_seed(0)
    model = _MoeNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate(model, _batches())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def _unrouted(model, expert=0):
    """Hooks that keep every token from ``expert`` (its logits -inf), as a router that never picks it."""

    def hook(module, args, output):
        logits = output[0].clone()
        logits[:, expert] = float("-inf")
        top = logits.softmax(-1).topk(output[2].shape[-1], dim=-1)
        return output[0], top.values, top.indices

    return [r.register_forward_hook(hook) for r in moe_modules(model)[1].values()]


@pytest.mark.parametrize("how", ["mean", "data-free"])
def test_an_expert_no_token_reached_is_said_and_weighed(monkeypatch, how):
    monkeypatch.setattr(calibrate_module, "UNREACHED", how)
    torch.manual_seed(0)
    model = _MoeNet().eval()
    handles = _unrouted(model)
    calib = calibrate(model, _batches())
    for h in handles:
        h.remove()
    note = [n for n in calib.notes if "no calibration token" in n]
    assert len(note) == 1 and "expert 0 of 'block.experts' (4 experts)" in note[0], calib.notes
    if how == "mean":
        assert "mean of the other experts" in note[0]
        mean = sum(calib.layers[f"block.experts.gate_up_proj[{e}]"].h for e in (1, 2, 3)) / 3
        assert calib.layers["block.experts.gate_up_proj[0]"].samples == 0
        assert torch.allclose(torch.from_numpy(calib.layers["block.experts.gate_up_proj[0]"].h),
                              torch.from_numpy(mean), rtol=1e-5)
    else:
        assert "data-free weighting" in note[0]
        assert "block.experts.gate_up_proj[0]" not in calib.layers
        assert "block.experts.gate_up_proj" not in calib.weightings()  # the whole tensor: data-free
        line = uncalibrated(model, calib, ["block.experts.gate_up_proj"])
        assert "'block.experts.gate_up_proj' (not reached by the calibration inputs)" in line
        stored = slice_name("block.experts.gate_up_proj", 0, 0, 12, False)
        line = uncalibrated(model, calib, [stored, slice_name("block.experts.gate_up_proj", 1, 0, 12, False)])
        assert line is not None and stored in line and "not reached" in line


def test_slice_names_read_back():
    assert parse_slice(slice_name("m.experts.gate_up_proj", 3, 0, 128, False)) == ("m.experts.gate_up_proj", 3)
    assert parse_slice(slice_name("m.experts.down_proj", 0, 4, 8, True)) == ("m.experts.down_proj", 0)
    assert parse_slice("m.experts.down_proj[2]") == ("m.experts.down_proj", 2)
    for plain in ("m.experts.down_proj", "a[b]", "m.w[1, 2:3].T", "m.w[1, :, 2:3]"):
        assert parse_slice(plain) is None


# --- transformers folders through the command line


def _tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "home", "in", "park"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return transformers, transformers.BertTokenizerFast.from_pretrained(str(tmp_path))


def _folder(tmp_path, family):
    transformers, tokenizer = _tokenizer(tmp_path)
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2, pad_token_id=0)
    torch.manual_seed(0)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=24, num_local_experts=4,
                                                                           **common))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            moe_intermediate_size=12, shared_expert_intermediate_size=24, intermediate_size=24, num_experts=4,
            decoder_sparse_step=1, mlp_only_layers=[], **common))
    folder = tmp_path / family
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\na dog ran far away\nthe dog sat in the park\n"
                                        "a cat ran home\nthe mat in the park\n")
    return transformers, model.eval(), tokenizer, folder


def _cli(*args):
    from click.testing import CliRunner

    from jwt_cli.main import cli

    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_cli_encodes_an_moe_folder_with_calibration_and_decodes_a_loadable_folder(tmp_path, family):
    """Before: exit 1, "a conversion that splits or merges tensors". Now the file keeps the folder's per-expert
    names, each weighed by its expert's own statistics (no data-free note), and `jwt decode -o DIR/` gives a
    folder from_pretrained loads, with the logits of the API-decoded tensors."""
    transformers, model, tokenizer, folder = _folder(tmp_path, family)
    out = tmp_path / "moe.jwt"
    result = _cli("encode", folder, "-b", "28", "--calibration", tmp_path / "texts.txt", "-o", out)
    assert result.exit_code == 0, result.output
    assert "data-free weighting" not in result.output, result.output
    from safetensors.torch import load_file

    stored = load_file(folder / "model.safetensors")
    decoded = codec.load(out)
    assert set(decoded) == set(stored)  # the folder's own names
    assert any(".experts.3." in name for name in decoded)
    result = _cli("decode", out, "-o", f"{tmp_path / 'dec'}/")
    assert result.exit_code == 0, result.output
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dec").eval()
    batch = tokenizer(["the cat sat on the mat", "a dog ran far away home"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref, got = model(**batch).logits, back(**batch).logits
    assert (got - ref).norm() / ref.norm() < 0.1
    experts = back.model.layers[0].mlp.experts
    w2 = next(t for n, t in decoded.items() if ".experts.2." in n and ("w2" in n or "down_proj" in n))
    assert torch.equal(experts.down_proj[2], w2)  # the decoded file tensor is that expert's matrix


def test_cli_maps_each_file_tensor_to_its_experts_slice(tmp_path):
    transformers, model, _, folder = _folder(tmp_path, "mixtral")
    from safetensors.torch import load_file

    from jwt_cli.calibration import model_names

    names = model_names(folder, model, load_file(folder / "model.safetensors"))
    assert names["model.layers.0.block_sparse_moe.experts.1.w1.weight"] == \
        "model.layers.0.mlp.experts.gate_up_proj[1, 0:24]"
    assert names["model.layers.0.block_sparse_moe.experts.1.w3.weight"] == \
        "model.layers.0.mlp.experts.gate_up_proj[1, 24:48]"
    assert names["model.layers.0.block_sparse_moe.experts.3.w2.weight"] == \
        "model.layers.0.mlp.experts.down_proj[3, 0:16]"
    assert names["model.layers.0.block_sparse_moe.gate.weight"] == "model.layers.0.mlp.gate.weight"


def test_a_conversion_that_is_no_experts_slice_is_refused_in_one_line(tmp_path):
    """A file tensor that holds parts of two experts (not one expert's rows) is not mapped: refused as before."""
    transformers, model, _, folder = _folder(tmp_path, "mixtral")
    from safetensors.torch import load_file

    from jwt_cli.calibration import expert_slices

    def mixed(model, tensors):
        p = tensors["model.layers.0.mlp.experts.down_proj"]
        return {"odd.weight": torch.cat([p[0, :8], p[1, 8:]]), "even.weight": p[2].T.contiguous()}

    assert expert_slices(model, ["model.layers.0.mlp.experts.down_proj"], mixed) == {}
    import click

    from jwt_cli.calibration import model_names

    weights = load_file(folder / "model.safetensors")
    merged = {k: v for k, v in weights.items() if ".experts.0." not in k}
    merged["model.layers.0.block_sparse_moe.experts.0.w13.weight"] = torch.randn(48, 16)
    with pytest.raises(click.ClickException) as refused:
        model_names(folder, model, merged)
    line = refused.value.message
    assert "\n" not in line
    assert "'model.layers.0.block_sparse_moe.experts.0.w13.weight' is not among its parameters" in line
    assert "'model.layers.0.mlp.experts.gate_up_proj' and 1 more are not in the file" in line
