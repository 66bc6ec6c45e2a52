"""codec.train.finetune with a file-size budget (codec.train.Budget): the quality chosen in the loop, the file it
writes within the budget and decoding to the weights of the last forward pass, bad budgets as one-line errors."""

from __future__ import annotations

import importlib
import io
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

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


def _ladder_index(quality: str) -> int:
    from codec.rd.ladder import scales, scale_of
    from codec.tensorcodec import EncodeOptions, parse_spec

    return scales().index(scale_of(parse_spec(f"jpeg,{quality}", EncodeOptions())))


@pytest.mark.parametrize("bits", [1.7, 2.5])
def test_the_file_is_within_the_budget_and_decodes_to_the_last_forward_pass(bits):
    model = _tiny()
    seen = []  # the first layer's weight as each forward pass sees it
    model[0].register_forward_pre_hook(lambda m, _: seen.append(m.weight.detach().clone()))
    budget = Budget(bits)
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


def _timed(monkeypatch, step_cost: float, measure_cost: float, **kwargs) -> Budget:
    """96 steps (coded every 4th, held over the last 24) on a scripted clock: each training step costs ``step_cost``
    seconds, each measurement ``measure_cost``; the file's size at ladder index i is 1.5 + i / 100 bits/weight, so
    the search settles on index 49 (1.99, the target) and every later measurement measures twice (49 fits, 50 not)."""
    clock = [0.0]
    monkeypatch.setattr(bm, "_clock", lambda: clock[0])

    def measure(self, model, index):  # as the real one: timed on the Budget's clock
        clock[0] += measure_cost
        self._count("measure", measure_cost)
        return 1.5 + index / 100

    def loss(out, y):
        clock[0] += step_cost
        return LOSS(out, y)

    monkeypatch.setattr(Budget, "_measure", measure)
    budget = Budget(2.0, **kwargs)
    finetune(_tiny(), _data(), loss, overrides=RULES, steps=96, refresh=4, budget=budget, validation=False)
    assert budget.history[0] == (0, budget.quality, 1.99) and budget.within
    return budget


@pytest.mark.parametrize("step_cost, measure_cost, steps, interval", [
    (10.0, 1.0, [0, *range(4, 72, 4), 96], 4),  # a costly step: measured at each coding, as before
    (1.0, 0.5, [0, 16, 32, 48, 64, 96], 16),  # a measurement (2 codec.save) costs a step: every 16 (68 follows 64)
    (1.0, 1.0, [0, 32, 64, 96], 32),  # 2 steps: every 32
    (1.0, 2.0, [0, 64, 96], 64),  # 4 steps: every 64 (68 follows 64)
    (1.0, 100.0, [0, 68, 96], 2048),  # far dearer: only the last coding before the hold
])
def test_the_default_interval_keeps_measuring_within_its_share_of_the_loops_time(monkeypatch, step_cost,
                                                                                 measure_cost, steps, interval):
    """``every=None``: measured every ``refresh * 2**k`` steps with the smallest k that keeps a measurement (two saves
    at their mean time, here the search's) within SHARE (10 %) of the loop's time, and at the last coding step before
    the hold unless the one before was measured; the cheaper the steps against a measurement, the longer the
    interval."""
    budget = _timed(monkeypatch, step_cost, measure_cost)
    assert [s for s, *_ in budget.history] == steps and budget.interval == interval
    measured = 2 * measure_cost * (len(steps) - 2)  # the tracking measurements (the search and the end aside)
    if interval < 2048:  # chosen to keep within the share
        assert measured <= bm.SHARE * (96 * step_cost + measured)


def test_an_explicit_every_is_honoured_whatever_the_costs(monkeypatch):
    budget = _timed(monkeypatch, 1.0, 1.0, every=8)  # the default would measure every 32 here
    assert [s for s, *_ in budget.history] == [0, *range(8, 72, 8), 96] and budget.interval == 8
    budget = _timed(monkeypatch, 1.0, 1.0, every=6)  # rounded up to a multiple of refresh (4)
    assert [s for s, *_ in budget.history] == [0, 8, 16, 24, 32, 40, 48, 56, 64, 96] and budget.interval == 8


def test_a_float_budget_is_a_budget_and_the_setting_string_is_exactly_the_ladders_scale():
    from codec.rd.ladder import scales, scale_of
    from codec.tensorcodec import EncodeOptions, parse_spec

    for scale in scales():
        assert scale_of(parse_spec("jpeg," + bm._spec_at(scale, EncodeOptions()), EncodeOptions())) == scale
    assert isinstance(bm.as_budget(0.5), Budget) and bm.as_budget(None) is None
    assert bm._escape("a[0]*?.w") == "a[[]0][*][?].w"


@pytest.mark.parametrize("budget, kind, words", [
    (0, ValueError, "bits_per_weight"), (-1.0, ValueError, "bits_per_weight"), (math.nan, ValueError, "nan"),
    (math.inf, ValueError, "inf"), (True, TypeError, "bool"), ("0.3", TypeError, "str"),
])
def test_bad_budgets_are_one_line_errors(budget, kind, words):
    model = _tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(kind) as info:
        finetune(model, _data(), LOSS, overrides=RULES, steps=2, budget=budget, validation=False)
    assert "\n" not in str(info.value) and words in str(info.value)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # failed before training


def _first_file(model) -> float:
    """The bits/weight of ``model``'s file under RULES with the first layer at the ladder's coarsest quality."""
    buf = io.BytesIO()
    codec.save(model, buf, overrides=[*RULES, ("0.weight", "jpeg,q20,table=flat,q1")])
    return 8 * len(buf.getvalue()) / sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("start", ["setting", "coarsest"])
def test_a_budget_below_the_loops_first_file_trains_and_fits_once_training_has_shrunk_it(start):
    """The model's file at the coarsest quality is over the budget when the loop starts: it trains (it raised), the
    quality starts at the setting's (q20) or the coarsest (q1), steps down while the file is over, and a weight decay
    that shrinks the weights brings the file within the budget; it saves."""
    model = _tiny()
    first = _first_file(model)
    bits = 0.9 * first
    budget = Budget(bits, start=start, hold=0.25)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=3.0)
    finetune(model, _data(), LOSS, overrides=RULES, steps=48, refresh=2, budget=budget, optimizer=optimizer,
             validation=False)
    places = [_ladder_index(q) for _, q, _ in budget.history]
    assert budget.history[0][2] > bits  # measured over the budget at the start
    assert places[0] == (_ladder_index("q20") if start == "setting" else 0)
    # each measurement over the target (the size at the quality before it) moved the quality one rung down
    overs = [i for i, (_, _, size) in enumerate(budget.history[1:-1], 1) if size > budget.target]
    assert all(places[i] == max(places[i - 1] - 1, 0) for i in overs) and (overs or start == "coarsest")
    assert budget.within and budget.smallest is None and budget.bits <= bits
    data, bpw = _file(model, budget)
    assert bpw == budget.bits <= bits
    assert torch.equal(codec.load(data)["0.weight"], coded_weights(model, overrides=budget.overrides)["0.weight"])


def test_a_budget_the_model_cannot_reach_trains_then_save_refuses_naming_the_sizes(tmp_path):
    """Over the budget even at the coarsest quality after the last step: ``within`` is False, ``smallest`` the file at
    the coarsest quality, and ``save`` refuses in one line naming the size reached, the budget asked and the smallest
    budget that fits (which then fits); nothing is written."""
    model = _tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    budget = Budget(0.01)
    finetune(model, _data(), LOSS, overrides=RULES, steps=8, lr=1e-3, refresh=4, budget=budget, validation=False)
    assert not all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # it trained
    assert not budget.within and budget.quality == "q1" and budget.smallest == budget.bits > 0.01
    assert budget.history[-1] == (8, "q1", budget.bits)
    path = tmp_path / "m.jwt"
    with pytest.raises(ValueError) as info:
        budget.save(model, path)
    said = str(info.value)
    assert "\n" not in said and not path.exists()
    assert f"{budget.bits:.4f} bits/weight" in said and "over the 0.01 bits/weight asked" in said
    smallest = float(said.split("smallest budget that fits this model at this setting is ")[1].split()[0])
    assert budget.smallest <= smallest < budget.smallest + 1e-4
    # what else holds the file: the other tensors of the file at the coarsest quality, largest first, as stored
    written = io.BytesIO()
    codec.save(model, written, overrides=budget.overrides)
    stored = {e.name: e.stored_bytes for e in codec.open(written.getvalue()).reader.index.entries}
    assert budget.holders and budget.tensor not in [name for name, _, _ in budget.holders]
    assert [size for _, size, _ in budget.holders] == sorted((size for _, size, _ in budget.holders), reverse=True)
    assert all(stored[name] == size for name, size, _ in budget.holders)
    name, size, coding = budget.holders[0]
    assert f"besides {budget.tensor}, its largest tensors are {name} {size:,} B as {coding}" in said
    again = Budget(smallest)  # the figure named fits (a new Budget on the same weights: no training)
    finetune(model, _data(), LOSS, overrides=RULES, steps=0, budget=again, validation=False)
    assert again.within and again.bits <= smallest
    again.save(model, path)
    assert path.exists()


def test_the_end_step_down_jumps_when_far_over(monkeypatch):
    """After the last step a file far over the budget is not walked down one rung per measurement over the 242-rung
    ladder: two single steps, then the coarsest rung and a bisection."""
    model, budget = _tiny(), Budget(2.0, hold=1.0)
    real = Budget.start

    def start(self, *args):
        rules = real(self, *args)
        self._measure = lambda model, index: (measured.append(index), 1.5 + index / 50)[1]
        return rules

    measured = []
    monkeypatch.setattr(Budget, "start", start)
    finetune(model, _data(), LOSS, overrides=RULES, steps=2, refresh=4, budget=budget, validation=False)
    held = _ladder_index(budget.history[0][1])
    assert held > 30 and measured[:4] == [held, held - 1, held - 2, 0] and len(measured) < 15
    assert _ladder_index(budget.quality) == 25 and budget.bits == 2.0 and budget.within  # the highest that fits
    assert budget.stepped_down == held - 25


class _Tied(torch.nn.Module):
    """A tiny language-model shape: the output layer's weight is the input embedding's (``tie_weights``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = torch.nn.Embedding(256, 64)
        self.mid = torch.nn.Linear(64, 64)
        self.lm_head = torch.nn.Linear(64, 256, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.mid(self.wte(ids).mean(1))))


def test_a_tied_weight_is_counted_once_as_the_file_stores_it():
    """GPT-2's ``lm_head.weight`` is ``wte.weight``: codec.save stores it once, so the budget counts it once (it
    counted it twice: the file came out at 1.5x the budget), and the tensor whose quality moves is the stored one,
    also when the tied name is given."""
    torch.manual_seed(1)
    data = [(torch.randint(0, 256, (32, 8)), torch.randint(0, 256, (32,))) for _ in range(4)]
    for tensor in (None, "lm_head.weight"):
        model = _Tied()
        budget = Budget(2.5, tensor=tensor)
        finetune(model, data, LOSS, setting="jpeg,q20,table=flat", overrides=[("mid.weight", "b4")], steps=8,
                 lr=1e-3, refresh=4, vector_bits=4, budget=budget, validation=False)
        assert budget.tensor == "wte.weight" and budget.within
        data_, bpw = _file(model, budget)
        with codec.open(data_) as f:
            assert f.totals().weights == 256 * 64 + 64 * 64 + 64  # the tied tensor once
            assert f.totals().bits_per_weight == budget.bits <= 2.5
            assert budget.bits > 0.9 * budget.target  # spent, at the file's own count
        decoded = codec.load(data_)
        assert decoded["lm_head.weight"] is decoded["wte.weight"]


@pytest.mark.parametrize("kwargs, overrides, words", [
    ({"tensor": "9.weight"}, RULES, "no tensor '9.weight'"),
    ({"tensor": "2.weight"}, RULES, "is not coded as JPEG"),
    ({}, [("*", "b4")], "is coded as quant; pass a JPEG setting"),
])
def test_a_budget_needs_a_jpeg_tensor(kwargs, overrides, words):
    with pytest.raises(ValueError) as info:
        finetune(_tiny(), _data(), LOSS, overrides=overrides, steps=1, budget=Budget(2.0, **kwargs),
                 validation=False)
    assert "\n" not in str(info.value) and words in str(info.value)


def test_a_budget_on_a_model_too_small_for_jpeg_says_why():
    """A GRU's 192 x 64 matrices are under JPEG's smallest size: the error names the largest and the way out."""
    model = torch.nn.GRU(16, 64)
    data = [torch.randn(5, 2, 16) for _ in range(2)]
    with pytest.raises(ValueError) as info:
        finetune(model, data, lambda out: out[0].pow(2).mean(), setting="q50", steps=1, budget=2.0,
                 validation=False)
    message = str(info.value)
    assert "\n" not in message and "'weight_hh_l0', has 12,288" in message and "16,384" in message


@pytest.mark.parametrize("kwargs", [{"margin": 0.5}, {"margin": -0.1}, {"every": 0}, {"hold": 1.5},
                                    {"tensor": 3}, {"start": "fine"}, {"start": None}])
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
    for argv in (["--budget", "0"], ["--budget-only"], ["--budget", "0.3", "--budget-hold", "2"]):
        with pytest.raises(SystemExit) as exc:
            train.main(["--model", "mlp", *argv])
        assert exc.value.code == 2 and "--budget" in capsys.readouterr().err


def test_bench_train_decay_reaches_the_loop_and_the_budget_run_step_for_step():
    """``--decay last``: the codec epochs (fixed quality and budget alike) step at the plain run's learning rates at
    the same global steps, going to 0 at the end; the budget then measures and holds as at a constant rate."""
    import numpy as np

    from bench import train

    rng = np.random.default_rng(0)
    schedule = train.Schedule("mlp", rng.integers(0, 255, (1280, 28, 28), dtype=np.uint8),
                              rng.integers(0, 10, 1280), epochs=2, seed=0, decay="last", decay_epochs=1)
    rates: list[float] = []
    hook = register_optimizer_step_pre_hook(  # every optimizer, the ones made inside too
        lambda optimizer, *_: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        _, _, snapshot = schedule.run(snapshot_at=1)
        plain = rates[:]
        point = train.ladder_point("mlp", 6, "ramp1")
        runs = {}
        for budget in (None, 1.0):
            rates.clear()
            looped, _ = schedule.codec_epochs(snapshot, point, refresh=2, budget=budget, vector_bits=4,
                                              budget_every=2)  # a fixed interval: the default's follows timings
            runs[budget] = rates[:]
    finally:
        hook.remove()
    assert len(plain) == 20 and plain[:11] == pytest.approx([1e-3] * 11)
    assert plain[19] < 0.03e-3 and all(a > b for a, b in zip(plain[10:], plain[11:]))
    assert runs[None] == pytest.approx(plain[10:], rel=1e-12) and runs[1.0] == pytest.approx(plain[10:], rel=1e-12)
    budget = schedule.budget
    assert budget.bits <= 1.0 and [s for s, *_ in budget.history] == [0, 2, 4, 6, 10]  # search, measures, held, end
    assert train.coded(looped, overrides=budget.overrides)[1] == budget.bits


def test_bench_train_a_budget_under_the_loops_first_file_trains_and_an_unmet_one_is_a_row(tmp_path, capsys):
    """With the whole schedule in the loop (``--codec-epochs`` = ``--epochs``, the MLP example's default) the loop
    starts from a fresh model, whose file at the coarsest quality is over a small budget: the budget run trains (it
    was a row "not run"), and a budget it cannot reach is a row "over the budget" naming the sizes, not a figure."""
    from bench import train

    out = tmp_path / "t"
    train.main(["--model", "mlp", "--epochs", "1", "--codec-epochs", "1", "--train-size", "256", "--lam", "0",
                "--calibration", "0", "--bits", "1", "--quality", "6", "--table", "ramp1", "--refresh", "2",
                "--budget", "0.05", "--budget-every", "4", "--budget-start", "coarsest", "--out", str(out)])
    said = capsys.readouterr().out
    assert "over the budget" in said and "the smallest budget that fits" in said
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| codec in the loop")]
    assert len(rows) == 2 and "| q6 |" in rows[0] and " nan " not in rows[0]
    assert "budget 0.05 (q in the loop, held 0.25, from coarsest, measured every 4): over the budget" in rows[1]
    assert "smallest budget that fits" in rows[1]


def test_bench_train_budget_flags_parse_and_reach_the_budget(monkeypatch):
    """``--budget-every N`` and ``--budget-start`` reach the Budget (one run per value); bad values are usage
    errors."""
    import numpy as np

    from bench import train

    seen = []
    real = train.Schedule.codec_epochs
    monkeypatch.setattr(train.Schedule, "codec_epochs", lambda self, *a, **k: (
        seen.append((k.get("budget"), k.get("budget_every"), k.get("budget_start"))), real(self, *a, **k))[1])
    monkeypatch.setattr(train, "write", lambda *a, **k: None)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(train, "load_fashion_mnist", lambda split: (
        rng.integers(0, 255, (256, 28, 28), dtype=np.uint8), rng.integers(0, 10, 256)))
    train.main(["--model", "mlp", "--epochs", "2", "--codec-epochs", "1", "--lam", "0", "--calibration", "0",
                "--bits", "1", "--quality", "6", "--refresh", "2", "--budget", "1.0", "--budget-only",
                "--budget-every", "3", "--budget-start", "setting", "--budget-start", "coarsest"])
    assert seen == [(1.0, 3, "setting"), (1.0, 3, "coarsest")]


@pytest.mark.parametrize("argv", [["--budget", "0.3", "--budget-every", "0"],
                                  ["--budget", "0.3", "--budget-start", "top"],
                                  ["--budget-every", "4"], ["--budget-start", "coarsest"]])
def test_bench_train_bad_budget_flags_are_usage_errors(argv, capsys):
    from bench import train

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
