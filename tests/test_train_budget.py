"""codec.train.finetune with a file-size budget (codec.train.Budget): the quality chosen in the loop, the file it
writes within the budget and decoding to the weights of the last forward pass, bad budgets as one-line errors."""

from __future__ import annotations

import importlib
import io
import math

import pytest
import torch

import codec
from codec.train import Budget, coded_weights, finetune

bm = importlib.import_module("codec.train.budget")

LOSS = torch.nn.functional.cross_entropy
#: The first layer's weight (256 x 64) in JPEG, the second (10 x 256) in 4-bit quant, the biases lossless.
RULES = [("0.weight", "jpeg,q20,table=flat"), ("2.weight", "b4")]


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def _data(n: int = 4):
    torch.manual_seed(1)
    return [(torch.randn(64, 64), torch.randint(0, 10, (64,))) for _ in range(n)]


def _file(model, budget: Budget) -> tuple[bytes, float]:
    buf = io.BytesIO()
    budget.save(model, buf)
    data = buf.getvalue()
    return data, 8 * len(data) / sum(t.numel() for t in model.state_dict().values())


def _ladder_index(quality: str, ratio: float | None = None) -> int:
    from codec.rd.ladder import FINE_RATIO, scales, scale_of
    from codec.tensorcodec import EncodeOptions, parse_spec

    return scales(ratio or FINE_RATIO).index(scale_of(parse_spec(f"jpeg,{quality}", EncodeOptions())))


@pytest.mark.parametrize("bits, options", [(1.7, {}), (2.5, {}),
                                           (2.0, {"climb_until": 0.5, "ratio": 1.01, "aim": 1.0})])
def test_the_file_is_within_the_budget_and_decodes_to_the_last_forward_pass(bits, options):
    model = _tiny()
    seen = []  # the first layer's weight as each forward pass sees it
    model[0].register_forward_pre_hook(lambda m, _: seen.append(m.weight.detach().clone()))
    budget = Budget(bits, **options)
    finetune(model, _data(), LOSS, overrides=RULES, steps=24, lr=1e-3, refresh=4, vector_bits=4, budget=budget,
             validation=False)
    data, bpw = _file(model, budget)
    assert bpw <= bits and bpw == budget.bits
    assert budget.tensor == "0.weight" and budget.overrides[:2] == RULES
    assert budget.overrides[-1] == ("0.weight", f"jpeg,q20,table=flat,{budget.quality}")
    decoded = codec.load(data)
    assert torch.equal(decoded["0.weight"], seen[-1])  # the last forward pass (the final coding) is the file
    coded = coded_weights(model, overrides=budget.overrides, vector_bits=4)
    assert all(torch.equal(decoded[name], coded[name]) for name in coded)
    assert budget.bits > 0.9 * budget.target  # spent, not a step below (one fine step is about 3 % of the file)


def test_a_larger_budget_buys_a_higher_quality_and_a_larger_file():
    files = {}
    for bits in (2.0, 2.8):
        model, budget = _tiny(), Budget(bits)
        finetune(model, _data(), LOSS, overrides=RULES, steps=8, lr=1e-3, refresh=4, budget=budget,
                 validation=False)
        files[bits] = (_ladder_index(budget.quality), _file(model, budget)[1])
    assert files[2.8][0] > files[2.0][0] and files[2.0][1] < files[2.8][1] <= 2.8


def test_the_quality_moves_by_bounded_steps_and_is_held_over_the_last_part():
    model, budget = _tiny(), Budget(2.0, hold=0.5)
    finetune(model, _data(), LOSS, overrides=RULES, steps=32, lr=3e-3, refresh=4, budget=budget, validation=False)
    steps = [s for s, _, _ in budget.history]
    assert steps[0] == 0 and steps[-1] == 32  # the search before training, the file after the last step
    assert all(s % 4 == 0 and s < 16 for s in steps[1:-1])  # at coding steps, none in the held half
    places = [_ladder_index(q) for _, q, _ in budget.history]
    assert all(-1 <= b - a <= bm.CLIMB for a, b in zip(places, places[1:-1]))
    assert places[-1] == places[-2] or budget.stepped_down  # held: the file's quality is the last one trained
    # each measurement within the target after the search (it is what the quality was chosen for)
    assert budget.history[0][2] <= budget.target


def test_a_budget_continues_over_several_calls_without_a_new_search(monkeypatch):
    model, budget = _tiny(), Budget(2.0)
    finetune(model, _data(), LOSS, overrides=RULES, steps=8, refresh=4, budget=budget, validation=False)
    quality, measured = budget.quality, []
    real = Budget._measure
    monkeypatch.setattr(Budget, "_measure", lambda self, *a: measured.append(a[1]) or real(self, *a))
    finetune(model, _data(), LOSS, overrides=RULES, steps=1, refresh=4, budget=budget, validation=False)
    assert measured == [_ladder_index(quality)]  # one measurement: the file after the step, at the same quality
    assert budget.history[-1][0] == 9


def test_the_file_steps_down_when_the_held_weights_grew_over_the_budget(monkeypatch):
    model, budget = _tiny(), Budget(2.0, hold=1.0)
    real = Budget.start
    sizes = iter([2.2, 2.1, 1.95])  # after the last step: over the budget twice, then within

    def start(self, *args):
        rules = real(self, *args)  # the real search; the file's sizes after it are scripted
        self._measure = lambda model, index: (measured.append(index), next(sizes))[1]
        return rules

    measured = []
    monkeypatch.setattr(Budget, "start", start)
    finetune(model, _data(), LOSS, overrides=RULES, steps=2, refresh=4, budget=budget, validation=False)
    held = _ladder_index(budget.history[0][1])
    assert measured == [held, held - 1, held - 2]
    assert budget.stepped_down == 2 and budget.bits == 1.95 and _ladder_index(budget.quality) == held - 2
    data, _ = _file(model, budget)
    assert torch.equal(codec.load(data)["0.weight"], coded_weights(model, overrides=budget.overrides)["0.weight"])


def _scripted(monkeypatch, sizes):
    """Every file size a Budget measures is ``sizes(index - start, step)``: ``start`` the ladder step of the
    rules' q20, ``step`` the forward passes the model has run (0 in the search, ``s`` at the measurement of step
    ``s``, the call's length after the last step). Returns the model to finetune."""
    from codec.rd.ladder import scales

    model, clock = _tiny(), [0]
    model.register_forward_pre_hook(lambda *_: clock.__setitem__(0, clock[0] + 1))
    monkeypatch.setattr(Budget, "_size", lambda self, _, index: sizes(
        index - scales(self.ratio).index(250), clock[0]))  # q20: table scale 250
    return model


@pytest.mark.parametrize("climb_until, last_climb", [(0.5, 12), (1.0, 28)])
def test_no_climb_after_climb_until(monkeypatch, climb_until, last_climb):
    """A file that shrinks 2 % a step (a finer ladder step: 3 % larger) takes the quality up at every
    measurement; with ``climb_until=0.5`` only in the call's first half, then it holds (the default: all along)."""
    model = _scripted(monkeypatch, lambda index, step: 1.9 * 1.03 ** index * 0.98 ** step)
    budget = Budget(2.0, hold=0.0, climb_until=climb_until)
    finetune(model, _data(), LOSS, overrides=RULES, steps=32, refresh=4, budget=budget, validation=False)
    places = [(s, _ladder_index(q)) for s, q, _ in budget.history]
    climbs = [s for (_, a), (s, b) in zip(places, places[1:]) if b > a]
    assert climbs[0] == 4 and climbs[-1] == last_climb  # a climb at every measurement until then, none after
    assert all(b >= a for (_, a), (_, b) in zip(places, places[1:]))  # nothing over the target: no step down
    assert budget.bits <= 2.0 and budget.stepped_down == 0


def test_the_aim_takes_a_quality_the_file_will_shrink_into(monkeypatch):
    """A file that shrinks 0.5 % a step at every quality (a finer step of the 1.01 ladder: 2 % larger): without
    ``aim`` the quality held over the last quarter is where the file fits at its last measurement, and the file
    ends about 6 % under the target (12 steps after it); with ``aim=1`` the shrink measured at one quality is
    aimed at over those steps, and the file ends within the budget and within one ladder step of the target."""
    files = {}
    for aim in (0.0, 1.0):
        model = _scripted(monkeypatch, lambda index, step: 1.9 * 1.02 ** index * 0.995 ** step)
        budget = Budget(2.0, hold=0.25, ratio=1.01, aim=aim)
        finetune(model, _data(), LOSS, overrides=RULES, steps=32, refresh=4, budget=budget, validation=False)
        assert budget.bits <= 2.0 and budget.stepped_down == 0
        files[aim] = budget
    assert files[0.0].bits < 0.95 * files[0.0].target
    assert files[1.0].target / 1.02 <= files[1.0].bits <= files[1.0].target
    held = [_ladder_index(q, 1.01) for s, q, _ in files[1.0].history if s >= 20]
    assert len(set(held)) == 1  # held from the last measurement (step 20) on


def test_a_float_budget_is_a_budget_and_the_setting_string_is_exactly_the_ladders_scale():
    from codec.rd.ladder import scales, scale_of
    from codec.tensorcodec import EncodeOptions, parse_spec

    for scale in {*scales(), *scales(1.01)}:  # the default ladder and a finer one (Budget's ratio)
        assert scale_of(parse_spec("jpeg," + bm._spec_at(scale, EncodeOptions()), EncodeOptions())) == scale
    assert isinstance(bm.as_budget(0.5), Budget) and bm.as_budget(None) is None
    assert bm._escape("a[0]*?.w") == "a[[]0][*][?].w"


@pytest.mark.parametrize("budget, kind, words", [
    (0, ValueError, "bits_per_weight"), (-1.0, ValueError, "bits_per_weight"), (math.nan, ValueError, "nan"),
    (math.inf, ValueError, "inf"), (True, TypeError, "bool"), ("0.3", TypeError, "str"),
    (0.01, ValueError, "below the smallest file"),
])
def test_bad_budgets_are_one_line_errors(budget, kind, words):
    model = _tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(kind) as info:
        finetune(model, _data(), LOSS, overrides=RULES, steps=2, budget=budget, validation=False)
    assert "\n" not in str(info.value) and words in str(info.value)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # failed before training


@pytest.mark.parametrize("kwargs, overrides, words", [
    ({"tensor": "9.weight"}, RULES, "no tensor '9.weight'"),
    ({"tensor": "2.weight"}, RULES, "is not coded as JPEG"),
    ({}, [("*", "b4")], "no tensor is coded as JPEG"),
])
def test_a_budget_needs_a_jpeg_tensor(kwargs, overrides, words):
    with pytest.raises(ValueError) as info:
        finetune(_tiny(), _data(), LOSS, overrides=overrides, steps=1, budget=Budget(2.0, **kwargs),
                 validation=False)
    assert "\n" not in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("kwargs", [{"margin": 0.5}, {"margin": -0.1}, {"every": 0}, {"hold": 1.5},
                                    {"tensor": 3}, {"climb_until": -0.1}, {"climb_until": 1.5},
                                    {"climb_until": True}, {"climb_until": "0.5"}, {"ratio": 1.0},
                                    {"ratio": 2.0}, {"ratio": math.nan}, {"aim": -0.5}, {"aim": 1.5},
                                    {"aim": math.nan}])
def test_bad_budget_options_are_one_line_errors(kwargs):
    with pytest.raises((ValueError, TypeError)) as info:
        Budget(0.3, **kwargs)
    assert "\n" not in str(info.value) and "budget" in str(info.value)
    with pytest.raises(ValueError):
        Budget(0.3).save(_tiny(), io.BytesIO())  # no finetune yet: no quality to save with


def test_bench_train_budget_runs_and_rejects_bad_options(capsys):
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (1280, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 1280), epochs=2, seed=0)
    _, _, snapshot = schedule.run(snapshot_at=1)
    point = train.ladder_point("mlp", 6, "ramp1")
    looped, _ = schedule.codec_epochs(snapshot, point, refresh=2, budget=1.0, vector_bits=4)
    budget = schedule.budget
    assert budget.tensor == "fc1.weight" and budget.bits <= 1.0
    state, bpw = train.coded(looped, overrides=budget.overrides)
    assert bpw == budget.bits
    for argv in (["--budget", "0"], ["--budget-only"], ["--budget", "0.3", "--budget-hold", "2"],
                 ["--budget", "0.3", "--budget-option", "climb_until=2"],
                 ["--budget", "0.3", "--budget-option", "hold=0.5"], ["--budget", "0.3", "--budget-option", "aim=x"]):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "mlp", *argv])
        assert exc.value.code == 2 and "--budget" in capsys.readouterr().err


def test_subpackages_are_reached_after_a_plain_import_codec():
    """A new user's script: ``import codec`` then ``codec.train.Budget(...)``, as the README writes it; in a fresh
    interpreter (in the suite other tests have imported codec.train already) it was an AttributeError. The
    subpackages are imported on first use only: ``import codec`` alone still does not import torch."""
    import os
    import subprocess
    import sys

    script = ("import sys, codec\n"
              "assert 'torch' not in sys.modules\n"
              "print(codec.train.Budget(0.5).bits_per_weight, callable(codec.train.finetune),\n"
              "      codec.sources.RemoteError.__name__, callable(codec.blobcodecs.zstd.use_compiled),\n"
              "      callable(codec.update.difference), codec.rd.__name__)\n")
    paths = os.pathsep.join([p for p in sys.path if p])
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0.5", "True", "RemoteError", "True", "True", "codec.rd"]
