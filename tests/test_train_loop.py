"""codec.train.finetune's cheaper and smaller loop: coding every k-th step, rounded vectors, the caller's optimizer."""

from __future__ import annotations

import importlib
import io

import pytest
import torch

import codec
from codec.train import coded_weights, finetune, round_vector, round_vectors

ft = importlib.import_module("codec.train.finetune")  # the module (codec.train.finetune is the function)

LOSS = torch.nn.functional.cross_entropy


def _tiny():
    torch.manual_seed(2)  # 0.weight 48x64 is coded; 2.weight 10x48 (480 values) and the biases are stored losslessly
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))


def _data(n: int = 3):
    torch.manual_seed(3)
    return [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(n)]


def _bytes(model, name: str, setting: str = "b4") -> int:
    buf = io.BytesIO()
    codec.save(model, buf, overrides={"*": setting})
    with codec.open(buf.getvalue()) as f:
        return f.reader.entry(name).stored_bytes


def test_refresh_codes_every_kth_step_and_still_ends_on_the_file(monkeypatch):
    model = _tiny()
    calls = []
    real = ft.coded_weights
    monkeypatch.setattr(ft, "coded_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    finetune(model, _data(), LOSS, setting="b3", steps=7, lr=1e-2, refresh=3)
    assert len(calls) == 3 + 1  # steps 0, 3 and 6, and the final pass
    assert len(seen) == 7 + 1
    loaded = codec.load(_saved(model, "b3"))
    assert torch.equal(loaded["0.weight"], seen[-1])  # the last pass ran on the file's weights
    # a step between codings sees the float weights moved by the optimizer plus the last coding's residual:
    # neither the coded values of that step nor the float weights
    assert not torch.equal(seen[1], seen[0])


def _saved(model, setting: str) -> bytes:
    buf = io.BytesIO()
    codec.save(model, buf, overrides={"*": setting})
    return buf.getvalue()


def test_refresh_still_lowers_the_coded_loss():
    model = _tiny()
    x, y = _data(1)[0]

    def coded_loss():
        with torch.no_grad():
            return LOSS(torch.func.functional_call(model, coded_weights(model, "b2"), (x,)), y).item()

    before = coded_loss()
    finetune(model, [(x, y)], LOSS, setting="b2", steps=30, lr=1e-2, refresh=4)
    assert coded_loss() < before


def test_vector_bits_rounds_what_the_file_stores_losslessly_and_shrinks_it():
    model = _tiny()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plain_bytes = {name: _bytes(model, name) for name in ("0.bias", "2.weight")}
    finetune(model, _data(), LOSS, setting="b4", steps=5, lr=1e-2, vector_bits=3)
    state = model.state_dict()
    for name in ("0.bias", "2.weight", "2.bias"):  # stored losslessly for their shape: rounded in the model
        assert torch.equal(state[name], round_vector(state[name], 3)), name
        assert not torch.equal(state[name], original[name]), name  # and trained
        _, exponent = torch.frexp(state[name])
        assert torch.equal(torch.ldexp(state[name], 4 - exponent), torch.round(torch.ldexp(state[name], 4 - exponent)))
    assert not torch.equal(state["0.weight"], round_vector(state["0.weight"], 3))  # the coded matrix: float
    loaded = codec.load(_saved(model, "b4"))
    for name in ("0.bias", "2.weight", "2.bias"):
        assert torch.equal(loaded[name], state[name]), name  # bit-exact: the lossless path
    for name in ("0.bias", "2.weight"):
        assert _bytes(model, name) < 0.6 * plain_bytes[name], name
    assert torch.equal(coded_weights(model, "b4", vector_bits=3)["0.bias"], state["0.bias"])


def test_lossless_setting_is_not_rounded():
    model = _tiny()
    finetune(model, _data(), LOSS, setting="b4", steps=2, lr=1e-2, vector_bits=2, overrides={"0.bias": "lossless"})
    bias = model.state_dict()["0.bias"]
    assert not torch.equal(bias, round_vector(bias, 2))


def test_the_callers_optimizer_keeps_its_state_and_lr_follows_the_step():
    model = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _data(1)[0]
    LOSS(model(x), y).backward()
    optimizer.step()
    rates = []
    finetune(model, [(x, y)], LOSS, setting="b4", steps=3, optimizer=optimizer,
             lr=lambda step: rates.append(step) or 1e-3 * (step + 1))
    assert rates == [0, 1, 2]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)
    assert int(optimizer.state[model[0].weight]["step"]) == 1 + 3  # continued, not restarted


def test_bad_loop_arguments_are_one_line_errors():
    model = _tiny()
    x = torch.zeros(2, 64)
    cases = [(ValueError, {"refresh": 0}), (ValueError, {"refresh": 1.5}), (ValueError, {"vector_bits": 0}),
             (ValueError, {"vector_bits": True}), (ValueError, {"vector_bits": 40}),
             (TypeError, {"optimizer": "adam"}), (ValueError, {"lr": "fast"})]
    for kind, kwargs in cases:
        with pytest.raises(kind) as info:
            finetune(model, x, steps=1, **kwargs)
        assert "\n" not in str(info.value), kwargs
    with pytest.raises(ValueError):
        coded_weights(model, "b4", vector_bits=-1)


def test_round_vectors_after_plain_training_names_what_it_rounded():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = round_vectors(model, 2, "b4", overrides={"2.bias": "lossless"})
    assert names == ["0.bias", "2.weight"]  # the coded 48x64 matrix and the bias asked lossless are kept
    state = model.state_dict()
    assert torch.equal(state["0.weight"], before["0.weight"]) and torch.equal(state["2.bias"], before["2.bias"])
    assert torch.equal(state["0.bias"], round_vector(before["0.bias"], 2))
    assert (state["0.bias"] - before["0.bias"]).abs().max() <= before["0.bias"].abs().max() / 8
    with pytest.raises(TypeError):
        round_vectors("model", 2)
    with pytest.raises(ValueError):
        round_vectors(model, None)
    with pytest.raises(ValueError):
        round_vector(torch.ones(3), 0)


def _with_dropout():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Dropout(0.5), torch.nn.Linear(48, 10))


def test_distillation_runs_the_student_without_dropout():
    """Distilling (no loss_fn) the student must match the teacher's deterministic outputs: with a lossless
    setting they are equal, so nothing moves. With dropout on (training mode) the student chased dropout noise
    and its weights drifted; the model's own mode is restored."""
    model = _with_dropout().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, _data()[0][0], None, setting="lossless", steps=3, lr=1e-2)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_mode_is_the_callers_choice():
    model = _with_dropout().eval()
    before = model[0].weight.detach().clone()
    finetune(model, _data()[0][0], None, setting="lossless", steps=3, lr=1e-2, train_mode=True)
    assert not model.training
    assert not torch.equal(before, model[0].weight)  # dropout on: the student differs from the teacher and moves
    labelled = _with_dropout()
    seen = []
    labelled[1].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    finetune(labelled, _data(1), LOSS, setting="b4", steps=2, lr=1e-2)
    finetune(labelled, _data(1), LOSS, setting="b4", steps=2, lr=1e-2, train_mode=False)
    # two steps and the final pass each, in the loop's mode
    assert seen == [True, True, True, False, False, False] and labelled.training
    with pytest.raises(TypeError, match="train_mode"):
        finetune(labelled, _data(1), LOSS, setting="b4", steps=1, train_mode="yes")


def test_bench_train_variant_replaces_or_adds_settings_and_rejects_bad_ones(capsys):
    from bench import train

    assert train.ladder_point("cnn", 6, variant=train.parse_variant("conv2.weight=b3,extra.weight=b5")) == [
        ("fc1.weight", "jpeg,q6,table=flat"), ("conv1.weight", "b8"), ("conv2.weight", "b3"), ("fc2.weight", "b4"),
        ("extra.weight", "b5")]
    assert train.variant_label(6, train.parse_variant("conv2.weight=b3")) == "q6, conv2.weight=b3"
    for bad in ("conv2.weight", "conv2.weight=b3,=b2", "conv2.weight=b99"):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "cnn", "--variant", bad])
        assert exc.value.code == 2
        assert "--variant" in capsys.readouterr().err or bad == "conv2.weight=b99"
