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
    real = ft._code_planned  # every coding: the loop's and coded_weights'
    monkeypatch.setattr(ft, "_code_planned", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    finetune(model, _data(), LOSS, setting="b3", steps=7, lr=1e-2, refresh=3, validation=False)
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
    finetune(model, _data()[0][0], None, setting="lossless", steps=3, lr=1e-2, validation=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_mode_is_the_callers_choice():
    model = _with_dropout().eval()
    before = model[0].weight.detach().clone()
    finetune(model, _data()[0][0], None, setting="lossless", steps=3, lr=1e-2, train_mode=True, validation=False)
    assert not model.training
    assert not torch.equal(before, model[0].weight)  # dropout on: the student differs from the teacher and moves
    labelled = _with_dropout()
    seen = []
    labelled[1].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    finetune(labelled, _data(1), LOSS, setting="b4", steps=2, lr=1e-2, validation=False)
    finetune(labelled, _data(1), LOSS, setting="b4", steps=2, lr=1e-2, train_mode=False, validation=False)
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


def _params_blob(model, name: str, setting: str) -> bytes:
    """The first blob of ``name`` coded with ``setting``: every tile's packed offset and scale."""
    from codec.api import to_numpy
    from codec.dtypes import get_dtype
    from codec.tensorcodec import encode_tensor

    array, dtype = to_numpy(model.state_dict()[name])
    return encode_tensor(array, get_dtype(dtype), codec.train.as_setting(setting)).blobs[0]


@pytest.mark.parametrize("setting", ["b3", "jpeg,q8,tile=16x16"])
def test_keep_tiles_keeps_every_tiles_offset_and_scale(setting):
    """With keep_tiles the tiles' extremes stay where they were and the rest stays within them, so the encoder
    gives every tile the same offset/scale as before training; without it the same training moves them. Tensors
    stored losslessly for their shape (the 10x48 layer, biases) are not held."""
    import numpy as np

    runs = {}
    for keep in (False, True):
        model = _tiny()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        before = _params_blob(model, "0.weight", setting)
        finetune(model, _data(), LOSS, setting=setting, steps=12, lr=1e-2, refresh=2, keep_tiles=keep)
        runs[keep] = (model, start, before, _params_blob(model, "0.weight", setting))
    model, start, before, after = runs[True]
    assert after == before
    w, w0 = model[0].weight.detach(), start["0.weight"]
    assert not torch.equal(w, w0)  # trained all the same
    tile = (16, 16) if "tile" in setting else None
    if tile:  # each 16x16 tile: the same minimum and maximum, at the same elements
        for r in range(0, 48, 16):
            for c in range(0, 64, 16):
                a, b = w[r:r + 16, c:c + 16], w0[r:r + 16, c:c + 16]
                assert a.min() == b.min() and a.max() == b.max()
    assert not torch.equal(model[2].weight, start["2.weight"])  # lossless for its shape: free
    moved, _, before_free, after_free = runs[False]
    assert after_free != before_free  # the check can fail: the same run without keep_tiles moves them
    assert not np.allclose(moved[0].weight.detach().numpy(), w.numpy())


def test_keep_tiles_leaves_no_hook_on_the_callers_optimizer():
    model = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-1)
    finetune(model, _data(1), LOSS, setting="b3", steps=2, optimizer=optimizer, keep_tiles=True)
    hi = model[0].weight.detach().max().item()
    for _ in range(5):  # plain steps afterwards may leave the range again
        optimizer.zero_grad()
        (-model[0].weight.max()).backward()
        optimizer.step()
    assert model[0].weight.detach().max().item() > hi
    with pytest.raises(TypeError, match="keep_tiles"):
        finetune(model, _data(1), LOSS, setting="b3", steps=1, keep_tiles="yes")


def test_bench_train_distil_loss_and_its_option(capsys):
    from bench import train

    torch.manual_seed(5)
    out, logits, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(train.distil_loss(out, y, logits, 0.0), LOSS(out, y))
    assert torch.allclose(train.distil_loss(out, y, out, 1.0), torch.zeros(()), atol=1e-6)  # the teacher matched
    assert train.distil_loss(out, y, logits, 1.0) > 0.1
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "mlp", "--distil", "1.5"])
    assert exc.value.code == 2 and "--distil" in capsys.readouterr().err


def test_bench_train_keeps_tiles_in_the_last_part_of_the_loop_only(monkeypatch):
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (1280, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 1280), epochs=2, seed=0, decay="last")
    _, _, snapshot = schedule.run(snapshot_at=1)
    calls = []
    monkeypatch.setattr(train.codec.train, "finetune", lambda model, part, *a, steps, lr, keep_tiles, **k: calls.append(
        (steps, keep_tiles, lr(0))))
    schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6), keep_tiles=0.25)
    assert [(steps, keep) for steps, keep, _ in calls] == [(8, False), (2, True)]  # 10 steps of 128: the last 2 kept
    assert calls[0][2] == pytest.approx(1e-3) and calls[1][2] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 0.8)))
    calls.clear()
    schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6))
    assert [(steps, keep) for steps, keep, _ in calls] == [(10, False)]


def test_bench_train_penalties_in_the_loop_rate_every_nth_step_at_the_ladder_setting_units_every_step(
        monkeypatch, capsys):
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (1280, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 1280), epochs=1, seed=0)
    _, _, snapshot = schedule.run(snapshot_at=0)
    point = train.ladder_point("mlp", 6, "ramp1")
    losses = []

    def fake_finetune(model, part, loss_fn, *a, penalty=None, **k):
        out, y = torch.zeros(2, 10), torch.zeros(2, dtype=torch.int64)
        losses.append([loss_fn(out, y).item() + (0.0 if penalty is None else penalty(model).item())
                       for _ in range(5)])

    monkeypatch.setattr(train.codec.train, "finetune", fake_finetune)
    schedule.codec_epochs(snapshot, point, lam=2.0, every=2)
    schedule.codec_epochs(snapshot, point, group=0.5)
    schedule.codec_epochs(snapshot, point)
    (rated, grouped, plain), ce = losses, np.log(10)
    model = snapshot["model"]
    rate = train.rate_penalty(model, "fc1", "jpeg,q6,table=ramp1", 2.0).item()  # the snapshot's weights
    units = 0.5 * model.fc1.weight.norm(dim=1).mean().item()
    assert rate > 0.05 and units > 0.05
    assert rated == pytest.approx([ce + rate, ce, ce + rate, ce, ce + rate], rel=1e-5)
    assert grouped == pytest.approx([ce + units] * 5, rel=1e-5)
    assert plain == pytest.approx([ce] * 5, rel=1e-6)
    for option in ("--loop-lam", "--group"):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "mlp", option, "-1"])
        assert exc.value.code == 2 and option in capsys.readouterr().err


def test_bench_train_weight_average_is_the_debiased_ema_and_continues_from_a_snapshot():
    from bench import train

    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = train.WeightAverage(model, (0.5, 0.9))
    optimizer.register_step_post_hook(average)
    seen = []
    for x, y in _data(4):
        optimizer.zero_grad()
        LOSS(model(x), y).backward()
        optimizer.step()
        seen.append(model[0].weight.detach().clone())
        if len(seen) == 2:
            snapshot = average.snapshot()
    for decay, averaged in average.models().items():
        ema = sum((1 - decay) * decay ** (len(seen) - 1 - i) * w for i, w in enumerate(seen)) / (1 - decay ** 4)
        assert torch.allclose(averaged[0].weight, ema, atol=1e-6), decay
        assert not averaged.training and averaged is not model
    resumed = train.WeightAverage(model, (0.5, 0.9), snapshot)
    assert resumed.steps == 2 and torch.equal(resumed.sums[0.5]["0.weight"], snapshot["sums"][0.5]["0.weight"])
    resumed()  # one more step at the current weights: the first two still weigh in
    ema = (0.25 * 0.5 * seen[0] + 0.5 * 0.5 * seen[1] + 0.5 * seen[3]) / (1 - 0.5 ** 3)
    assert torch.allclose(resumed.models()[0.5][0].weight, ema, atol=1e-6)


def test_bench_train_decays_over_the_last_epochs_asked_and_averages_both_runs(capsys):
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (1280, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 1280), epochs=2, seed=0, decay="last", decay_epochs=1,
                              ema=(0.9,))
    assert [schedule.lr(s) for s in (0, 9, 10)] == pytest.approx([1e-3, 1e-3, 1e-3])
    assert schedule.lr(15) == pytest.approx(0.5e-3) and schedule.lr(19) < 0.03e-3
    plain, _, snapshot = schedule.run(snapshot_at=0)
    assert set(schedule.averaged) == {0.9} and snapshot["average"]["steps"] == 0
    assert not torch.equal(schedule.averaged[0.9].fc1.weight, plain.fc1.weight)
    looped, _ = schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6))
    assert set(schedule.averaged) == {0.9} and not torch.equal(schedule.averaged[0.9].fc1.weight, looped.fc1.weight)
    for option, value in (("--ema", "1"), ("--ema", "0"), ("--decay-epochs", "3")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "mlp", option, value])
        assert exc.value.code == 2 and option in capsys.readouterr().err


def test_a_fractional_quality_trains_and_saves_the_table_between_two_qualities():
    """``q6.5``: libjpeg's table at 6.5 (scale 769 %), stored as its 64 entries; finetune, coded_weights, rate and
    codec.save agree on it, and the file decodes to the weights of the loop's last forward pass."""
    from codec.tensorcodec import EncodeOptions, parse_spec

    opts = parse_spec("jpeg,q6.5,table=flat", EncodeOptions())
    assert (opts.quality, opts.scale) == (6, 769)
    assert parse_spec("q6.0", EncodeOptions()).scale is None  # a whole quality is its name
    for bad in ("q0.5", "q100.5", "q6.5.1", "q.5"):
        with pytest.raises(codec.EncodeError, match="q"):
            parse_spec(bad, EncodeOptions())
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))  # 16,384: JPEG
    rules = [("0.weight", "jpeg,q6.5,table=flat"), ("2.weight", "b4")]
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    finetune(model, [(x, y)], LOSS, steps=3, lr=1e-3, overrides=rules, validation=False)
    buf = io.BytesIO()
    codec.save(model, buf, overrides=rules)
    loaded = codec.load(buf.getvalue())
    assert torch.equal(loaded["0.weight"], seen[-1])
    assert torch.equal(coded_weights(model, overrides=rules)["0.weight"], seen[-1])
    with codec.open(buf.getvalue()) as f:
        table = f.reader.entry("0.weight").codec.table
    assert isinstance(table, list) and len(table) == 64
    sizes, estimates = [], []
    for q in ("q6", "q6.5", "q7"):
        sizes.append(len(encode_blob(model, "jpeg," + q + ",table=flat")))
        estimates.append(codec.train.rate({"w": model[0].weight}, setting="jpeg," + q + ",table=flat").item())
    assert sizes[0] < sizes[1] < sizes[2] and estimates[0] < estimates[1] < estimates[2]


def encode_blob(model, setting: str) -> bytes:
    from codec.api import to_numpy
    from codec.dtypes import get_dtype
    from codec.tensorcodec import encode_tensor

    array, dtype = to_numpy(model[0].weight)
    return b"".join(encode_tensor(array, get_dtype(dtype), codec.train.as_setting(setting)).blobs)


def test_the_loop_is_the_straight_through_estimator_and_gives_the_model_back_its_weights():
    """Three steps coded every 2nd step equal a by-hand straight-through loop (functional_call on ``coded + (w -
    w.detach())``, then ``w + residual``) bit for bit; a weight shared by two layers stays one tensor; and a loss
    that fails leaves the model's float weights in place, not the coded values the step had put in it."""
    def tied():
        torch.manual_seed(4)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                    torch.nn.ReLU(), torch.nn.Linear(64, 10))
        model[2].weight = model[0].weight
        return model

    data = _data(3)
    model = tied()
    finetune(model, data, LOSS, setting="b3", steps=3, lr=1e-2, refresh=2, validation=False)
    assert model[2].weight is model[0].weight

    by_hand = tied()
    params = dict(by_hand.named_parameters())
    shared = {"2.weight": "0.weight"}  # the tied weight's second name: its uses' gradients both reach it
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    residual = {}
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad()
        if step % 2 == 0:
            coded = coded_weights(by_hand, "b3")
            residual = {n: coded[n] - p.detach() for n, p in params.items()}
            values = {**coded, **{n: coded[n] + (p - p.detach()) for n, p in params.items()}}
        else:
            values = {n: p + residual[n] for n, p in params.items()}
        values.update({n: values[first] for n, first in shared.items()})
        LOSS(torch.func.functional_call(by_hand, values, (x,), tie_weights=False), y).backward()
        optimizer.step()
    for name, p in params.items():
        assert torch.equal(model.get_parameter(name), p), name

    before = {n: t.clone() for n, t in model.state_dict().items()}

    def failing(out, y):
        raise RuntimeError("a bad batch")

    with pytest.raises(RuntimeError, match="a bad batch"):
        finetune(model, data, failing, setting="b3", steps=2, validation=False)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    assert model[2].weight is model[0].weight


def test_a_state_dict_of_copies_is_a_one_line_error():
    """finetune puts the coded values into the tensors state_dict(keep_vars=True) names; a model whose state_dict
    returns copies would train on its float weights unseen, so it is refused."""
    class Copies(torch.nn.Sequential):
        def state_dict(self, *args, **kwargs):
            return {n: t.detach().clone() for n, t in super().state_dict(*args, **kwargs).items()}

    torch.manual_seed(1)
    model = Copies(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    with pytest.raises(TypeError, match="state_dict entry '0.weight' is not one of the model's parameters"):
        finetune(model, _data(), LOSS, setting="b3", steps=2, validation=False)


def test_bench_train_freezes_the_chosen_tensors_over_the_loops_last_part_only(monkeypatch, capsys):
    """``freeze_tail``: the loop's last steps run with the frozen tensors out of training (no gradient), so their
    coding stays the one the file will hold; before that part and after the loop they train as before."""
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (1280, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 1280), epochs=2, seed=0)
    _, _, snapshot = schedule.run(snapshot_at=1)
    point = train.ladder_point("mlp", 6, "ramp1")
    looped, _ = schedule.codec_epochs(snapshot, point, refresh=2, freeze_tail=1.0)  # the whole loop (10 steps)
    start = snapshot["model"]
    assert torch.equal(looped.fc1.weight, start.fc1.weight)  # never moved ...
    assert not torch.equal(looped.fc2.weight, start.fc2.weight)  # ... while the rest trained
    assert torch.equal(coded_weights(looped, overrides=point)["fc1.weight"],
                       coded_weights(start, overrides=point)["fc1.weight"])  # the file's fc1 is what the loop saw
    assert all(p.requires_grad for p in looped.parameters())
    calls = []
    real = train.codec.train.finetune

    def spy(model, part, *a, steps, keep_tiles, **k):
        calls.append((steps, keep_tiles, model.fc1.weight.requires_grad, model.fc2.weight.requires_grad))
        return real(model, part, *a, steps=steps, keep_tiles=keep_tiles, **k)

    monkeypatch.setattr(train.codec.train, "finetune", spy)
    looped, _ = schedule.codec_epochs(snapshot, point, refresh=2, freeze_tail=0.2)
    assert calls == [(8, False, True, True), (2, False, False, True)]
    calls.clear()
    schedule.codec_epochs(snapshot, point, refresh=2, keep_tiles=0.5, freeze_tail=0.2,
                          freeze=("fc1.weight", "fc2.weight"))
    assert calls == [(5, False, True, True), (3, True, True, True), (2, True, False, False)]
    for option, value in (("--freeze-tail", "1.5"), ("--freeze", "fc3.weight"), ("--freeze", ",")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "mlp", option, value])
        assert exc.value.code == 2 and option in capsys.readouterr().err


def test_a_penalty_is_the_float_weights_while_the_loss_sees_the_coded_values():
    """finetune calls the loss with the coded values in the model's tensors; ``penalty(model)`` runs with the float
    weights back (a norm or rate penalty on the coded values cost the CNN 2-6 points, bench/JOURNAL.md, twelfth
    pass), and its gradient reaches the weights."""
    model = _tiny()
    start = model[0].weight.detach().clone()
    coded = coded_weights(model, "b2")["0.weight"]
    assert not torch.equal(coded, start)
    in_loss, in_penalty = [], []

    def loss_fn(out, y):
        in_loss.append(model[0].weight.detach().clone())
        return 0.0 * out.sum()  # no gradient of its own: the step is the penalty's alone

    def penalty(m):
        in_penalty.append(m[0].weight.detach().clone())
        return (m[0].weight ** 2).sum()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    finetune(model, _data(1), loss_fn, setting="b2", steps=1, optimizer=optimizer, penalty=penalty, validation=False)
    assert torch.equal(in_loss[0], coded) and torch.equal(in_penalty[0], start)
    assert len(in_penalty) == 1  # once a step; not in the final report's pass
    assert torch.allclose(model[0].weight.detach(), start - 0.1 * 2 * start, atol=1e-7)


@pytest.mark.parametrize("penalty, error, words", [
    (3.0, TypeError, "penalty must be callable"),
    (lambda m: m[0].weight, TypeError, "scalar tensor"),
    (lambda m: 1.0, TypeError, "scalar tensor"),
])
def test_a_bad_penalty_is_a_one_line_error(penalty, error, words):
    with pytest.raises(error, match=words) as exc:
        finetune(_tiny(), _data(1), LOSS, setting="b4", steps=1, penalty=penalty, validation=False)
    assert "\n" not in str(exc.value)


def test_bench_train_penalties_are_the_float_weights_value_and_gradient():
    """The loop's unit and rate penalties, as bench.train hands them to finetune's ``penalty``: the float weights'
    value and gradient."""
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (128, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 128), epochs=1, seed=0)
    model = train.make_model("mlp", 0)
    penalty = schedule._penalty(model, "jpeg,q6,table=ramp1", 0.5, 2.0, 1)
    w = model.fc1.weight
    ref = w.detach().clone().requires_grad_()
    expected = 0.5 * train.unit_norms(ref) + 2.0 * codec.train.rate({"w": ref}, "jpeg,q6,table=ramp1") / ref.numel()
    expected.backward()
    loss = penalty(model)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(w.grad, ref.grad, rtol=1e-5, atol=1e-9) and ref.grad.abs().max() > 0


class _Tied(torch.nn.Module):
    """A user's net with a shared parameter (as a language model ties its embedding and output layer)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 64)
        self.proj = torch.nn.Linear(64, 64, bias=False)
        self.proj2 = torch.nn.Linear(64, 64, bias=False)
        self.proj2.weight = self.proj.weight
        self.head = torch.nn.Linear(64, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(torch.relu(self.proj(h)) + self.proj2(h))


def test_finetune_and_coded_weights_on_a_model_with_tied_weights(tmp_path):
    """finetune's check ran the coded model through functional_call with both names of a tie and raised torch's
    "got multiple values for keys ... which are tied" (with the default validation, labels or distillation alike);
    coded_weights coded the second name with its own rule although the file stores it as an alias of the first,
    so the loop's accuracy and the file's differed. Now finetune runs, and coded_weights is what codec.load gives,
    for both names."""
    torch.manual_seed(0)
    model = _Tied()
    x = torch.randn(96, 32)
    y = torch.randint(0, 4, (96,))
    setting = [("proj.weight", "b3")]  # proj2.weight, the same tensor, matches no rule: the file holds proj's coding
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]
    finetune(model, batches, torch.nn.functional.cross_entropy, steps=6, lr=1e-3, overrides=setting)
    finetune(model, [b[0] for b in batches], None, steps=6, lr=1e-3, overrides=setting)
    assert model.proj.weight is model.proj2.weight
    coded = codec.train.coded_weights(model, overrides=setting)
    codec.save(model, tmp_path / "t.jwt", overrides=setting)
    loaded = codec.load(tmp_path / "t.jwt")
    assert set(loaded) == set(coded)
    for name in loaded:
        assert torch.equal(loaded[name], coded[name]), name
    assert torch.equal(coded["proj2.weight"], coded["proj.weight"])
    assert not torch.equal(coded["proj.weight"], model.proj.weight.detach())  # coded at 3 bits, not the floats
    only = codec.train.coded_weights(model, overrides=setting, names=["proj2.weight"])
    assert list(only) == ["proj2.weight"] and torch.equal(only["proj2.weight"], loaded["proj2.weight"])


def test_a_tqdm_bar_is_not_redrawn_at_every_step_and_still_shows_the_loss():
    """The loop sets each step's loss on the caller's tqdm bar without redrawing it (set_postfix(refresh=False)):
    the bar redraws at its own pace (here: only when it closes), where a redraw a step cost 24 us of CPU."""
    from tqdm.std import tqdm

    out = io.StringIO()
    with tqdm(total=12, file=out, mininterval=3600, miniters=10**6) as bar:
        finetune(_tiny(), _data(), LOSS, setting="b3", steps=12, lr=1e-2, refresh=4, validation=False, progress=bar)
        drawn = out.getvalue().count("\r")
    assert drawn <= 2  # the opening draw (and none a step: 12 before)
    assert "loss=" in out.getvalue()  # drawn on close with the last step's loss


def test_a_bar_without_tqdms_refresh_argument_still_gets_the_loss():
    seen = []

    class Bar:
        def update(self, n):
            seen.append(n)

        def set_postfix(self, **kwargs):  # no refresh=: called as before
            seen.append(sorted(kwargs))

    finetune(_tiny(), _data(), LOSS, setting="b3", steps=3, validation=False, progress=Bar())
    assert seen == [["loss"], 1] * 3


def test_bench_train_label_smoothing_is_the_loops_cross_entropy_only(monkeypatch, capsys):
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (640, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 640), epochs=1, seed=0)
    _, _, snapshot = schedule.run(snapshot_at=0)
    torch.manual_seed(6)
    out, y, logits = torch.randn(8, 10), torch.randint(0, 10, (8,)), torch.randn(8, 10)
    losses = []
    monkeypatch.setattr(train.codec.train, "finetune", lambda model, part, loss_fn, *a, **k: losses.append(
        loss_fn(out, y) if len(part[0]) == 2 else loss_fn(out, y, logits)))
    schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6), label_smoothing=0.1)
    schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6))
    smoothed, plain = losses
    assert torch.allclose(smoothed, LOSS(out, y, label_smoothing=0.1)) and torch.allclose(plain, LOSS(out, y))
    assert not torch.allclose(smoothed, plain)
    assert torch.allclose(train.distil_loss(out, y, logits, 0.0, 0.1), LOSS(out, y, label_smoothing=0.1))
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "mlp", "--label-smoothing", "1"])
    assert exc.value.code == 2 and "--label-smoothing" in capsys.readouterr().err


def test_bench_train_inputs_below_holds_the_quiet_pixels_columns_at_zero_over_the_loop(capsys):
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (256, 28, 28), dtype=np.uint8)
    images[:, :2] = 0  # the top two rows of pixels: 0 in every image but one in 16 (6 %)
    images[::16, :2] = 7
    schedule = train.Schedule("mlp", images, rng.integers(0, 10, 256), epochs=1, seed=0)
    _, _, snapshot = schedule.run(snapshot_at=0)
    model, _ = schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6), refresh=2, inputs_below=0.1)
    assert schedule.input_mask.columns["fc1"].tolist() == list(range(56))
    assert torch.all(model.fc1.weight[:, :56] == 0) and torch.all(model.fc1.weight[:, 56:] != 0)
    assert torch.all(snapshot["model"].fc1.weight[:, :56] != 0)  # the snapshot is not touched
    model, _ = schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6), refresh=2)
    assert schedule.input_mask is None and torch.all(model.fc1.weight[:, :56] != 0)
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "mlp", "--inputs-below", "1.5"])
    assert exc.value.code == 2 and "--inputs-below must be between 0 and 1" in capsys.readouterr().err


def test_bench_train_tile_clip_clips_fc1s_tiles_over_the_loop_and_rejects_a_negative_k(capsys):
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (256, 28, 28), dtype=np.uint8), rng.integers(0, 10, 256),
                              epochs=1, seed=0)
    _, _, snapshot = schedule.run(snapshot_at=0)
    with torch.no_grad():  # an outlier in fc1's first 64 x 64 tile
        snapshot["model"].fc1.weight[3, 5] = 1.0
    point = train.ladder_point("mlp", 6)
    widest = []
    for k in (0, 2.5):
        model, _ = schedule.codec_epochs(snapshot, point, refresh=2, tile_clip=k)
        tile = model.fc1.weight.detach()[:64, :64]
        widest.append(((tile - tile.mean()).abs().max() / tile.std(unbiased=False)).item())
    assert schedule.tile_clip is not None and schedule.tile_clip.tensors == ["fc1.weight"]
    assert widest[0] > 20 and widest[1] <= 2.5 * 1.05  # the outlier trains on without it, clipped with it
    assert snapshot["model"].fc1.weight[3, 5] == 1.0  # the snapshot is not touched
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "mlp", "--tile-clip", "-1"])
    assert exc.value.code == 2 and "--tile-clip must not be negative" in capsys.readouterr().err


def test_bench_train_set_codes_a_tensor_its_way_in_every_run_and_rejects_bad_ones(monkeypatch, tmp_path, capsys):
    """``--set conv2.weight=jpeg,...`` (commas allowed, one tensor a --set) replaces REST's setting of that tensor in
    the plain ladder, the loops at each quality and the budget's loop, and the table's header says so; a tensor the
    model lacks, the ladder's own layer or a value without ``=`` is a usage error."""
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (256, 28, 28), dtype=np.uint8), rng.integers(0, 10, 256)
    monkeypatch.setattr(train, "load_fashion_mnist", lambda split: (images, labels))
    loops, files = [], []
    real_loop, real_coded = train.Schedule.codec_epochs, train.coded
    monkeypatch.setattr(train.Schedule, "codec_epochs", lambda self, snapshot, overrides, *a, **k: (
        loops.append(dict(overrides)), real_loop(self, snapshot, overrides, *a, **k))[1])
    monkeypatch.setattr(train, "coded", lambda model, **k: (files.append(dict(k.get("overrides") or {})),
                                                            real_coded(model, **k))[1])
    setting = "jpeg,q12,table=flat"
    train.main(["--model", "cnn", "--epochs", "1", "--codec-epochs", "1", "--lam", "0", "--calibration", "0",
                "--bits", "1", "--quality", "6", "--refresh", "2", "--budget", "2", "--budget-every", "2",
                "--set", f"conv2.weight={setting}", "--out", str(tmp_path / "t")])
    assert len(loops) == 2 and all(o["conv2.weight"] == setting and o["fc2.weight"] == "b4" for o in loops)
    assert [o.get("conv2.weight") for o in files if o] == [setting] * 3  # the ladder row and both loops' files
    assert f"conv2.weight={setting}" in (tmp_path / "t.md").read_text()
    for bad, words in (("conv9.weight=b3", "no 'conv9.weight'"), ("fc1.weight=b3", "the ladder's layer"),
                       ("conv2.weight", "expected tensor=setting"), ("conv2.weight=jpegz", "--set")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "cnn", "--set", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert words in err or bad == "conv2.weight=jpegz", (bad, err)


def test_bench_train_order_units_reorders_fc1s_units_at_the_loops_fractions_and_rejects_bad_ones(monkeypatch,
                                                                                                   capsys):
    """``order_at``: fc1's units reordered (fc1's rows and bias, fc2's columns alike) at the loop steps those fractions
    name, between finetune calls; ``--order-units 0.1,0.5`` parses to those fractions, a fraction of 1 or a word is a
    usage error."""
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (512, 28, 28), dtype=np.uint8), rng.integers(0, 10, 512),
                              epochs=1, seed=0)
    _, _, snapshot = schedule.run(snapshot_at=0)
    calls, real, x = [], codec.train.order_units, torch.rand(8, 784)

    def order(model, layer, following, optimizer):
        before, fc1 = model(x), model.fc1.weight.detach().clone()
        done = real(model, layer, following, optimizer)
        calls.append((layer, list(following), done))
        assert torch.equal(model.fc1.weight, fc1[done]) and done != list(range(512))
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)  # the same function
        return done

    monkeypatch.setattr(codec.train, "order_units", order)
    steps = []
    real_finetune = codec.train.finetune
    monkeypatch.setattr(codec.train, "finetune", lambda model, part, *a, **k: (steps.append(len(part)),
                                                                              real_finetune(model, part, *a, **k))[1])
    model, _ = schedule.codec_epochs(snapshot, train.ladder_point("mlp", 6), refresh=2, order_at=(0.25, 0.5))
    assert [(layer, following) for layer, following, _ in calls] == [("fc1", ["fc2"])] * 2
    assert steps == [1, 1, 2]  # 4 steps: finetune calls cut at steps 1 and 2, where the units were reordered
    assert train.order_arg("0.5,0.1") == (0.1, 0.5) and train.order_arg("0") == ()
    for bad, says in (("1", "from 0 to below 1"), ("half", "not comma-separated fractions")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "mlp", "--order-units", bad])
        assert exc.value.code == 2 and says in capsys.readouterr().err
