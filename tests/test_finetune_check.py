"""codec.train.finetune's check: it never ends on weights that code to a worse model than the starting ones."""

from __future__ import annotations

import importlib
import io
import warnings

import pytest
import torch

import codec
from codec.train import NotKeptWarning, coded_weights, finetune

LOSS = torch.nn.functional.cross_entropy


def _tiny():
    torch.manual_seed(2)  # 0.weight 48x64 is coded; 2.weight 10x48 and the biases are stored losslessly
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))


def _labelled(n: int, seed: int = 3):
    """``n`` batches labelled by a fixed random linear map: a task that generalizes from batch to batch."""
    w = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))  # the same map for every seed
    torch.manual_seed(seed)
    xs = [torch.randn(32, 64) for _ in range(n)]
    return [(x, (x @ w).argmax(1)) for x in xs]


def _file(model, setting: str) -> bytes:
    buf = io.BytesIO()
    codec.save(model, buf, overrides={"*": setting})
    return buf.getvalue()


def _loss(model, batches, setting: str) -> float:
    coded = coded_weights(model, setting)
    with torch.no_grad():
        return sum(LOSS(torch.func.functional_call(model, coded, (x,)), y).item() for x, y in batches) / len(batches)


def test_a_run_that_hurts_ends_on_the_starting_weights_and_says_so():
    model = _tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [x for x, _ in _labelled(8)]
    with pytest.warns(NotKeptWarning, match=r"not kept.*on 2 held-out batches .* after 20 steps, .* before"):
        finetune(model, batches, None, setting="b3", steps=20, lr=1.0)  # distillation at a far too high lr
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert _file(model, "b3") == _file(_tiny(), "b3")  # the file of the model as given


def test_a_diverging_run_on_few_batches_is_checked_on_them():
    model = _tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(NotKeptWarning, match="on the training batches"):
        finetune(model, _labelled(2), LOSS, setting="b3", steps=10, lr=5.0)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_overfitting_few_samples_is_caught_on_validation_batches():
    """Random labels: training fits them, held-out labels (random too) get worse."""
    model = _tiny()
    start = model[0].weight.detach().clone()
    torch.manual_seed(5)
    noise = [(torch.randn(16, 64), torch.randint(0, 10, (16,))) for _ in range(4)]
    with pytest.warns(NotKeptWarning, match="on 4 validation batches"):
        finetune(model, noise[:2], LOSS, setting="b4", steps=60, lr=1e-2, validation=noise[2:] * 2)
    assert torch.equal(model[0].weight.detach(), start)


def test_a_run_that_helps_keeps_its_weights_and_holds_out_every_fourth_batch():
    model = _tiny()
    start = model[0].weight.detach().clone()
    batches = _labelled(8)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].data_ptr()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotKeptWarning)
        finetune(model, batches, LOSS, setting="b2", steps=30, lr=1e-2, refresh=2, check_every=30)  # at the end
    assert not torch.equal(model[0].weight.detach(), start)
    held = {batches[3][0].data_ptr(), batches[7][0].data_ptr()}
    trained = {x.data_ptr() for x, _ in batches} - held
    assert set(seen) == trained | held
    assert seen[:2] == [p for p in (batches[3][0].data_ptr(), batches[7][0].data_ptr())]  # the check before
    assert set(seen[2:32]) == trained  # the 30 steps never see the held-out batches
    fresh = _labelled(4, seed=9)  # and the kept file is better on data it never saw
    assert _loss(model, fresh, "b2") < _loss(_tiny(), fresh, "b2")


def test_validation_batches_train_on_all_the_data_and_check_on_theirs():
    model = _tiny()
    batches, check = _labelled(3), _labelled(2, seed=4)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].data_ptr()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotKeptWarning)  # kept: the map generalizes
        finetune(model, batches, LOSS, setting="b2", steps=6, lr=1e-2, validation=check)
    assert {x.data_ptr() for x, _ in batches + check} == set(seen)


def test_check_every_keeps_the_best_weights_seen():
    """Five good steps, then a learning rate that destroys the model: it ends on the fifth step's weights, which a
    five-step run reproduces exactly; without the intermediate check it would end on the starting ones."""
    batches, check = _labelled(5), _labelled(2, seed=4)
    lr = lambda step: 1e-2 if step < 5 else 50.0  # noqa: E731
    runs = {}
    for name, kwargs in {"early": {"steps": 10, "check_every": 5}, "five": {"steps": 5, "check_every": 5},
                         "end only": {"steps": 10, "check_every": 10}}.items():
        model = _tiny()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            finetune(model, batches, LOSS, setting="b3", lr=lr, validation=check, **kwargs)
        runs[name] = (model[0].weight.detach().clone(), [w for w in caught if w.category is NotKeptWarning])
    assert torch.equal(runs["early"][0], runs["five"][0]) and not runs["early"][1] and not runs["five"][1]
    assert torch.equal(runs["end only"][0], _tiny()[0].weight.detach()) and runs["end only"][1]


def test_by_default_it_checks_five_times(monkeypatch):
    ft = importlib.import_module("codec.train.finetune")
    calls = []
    real = ft._code_planned  # every coding: the loop's and coded_weights'
    monkeypatch.setattr(ft, "_code_planned", lambda *a, **k: calls.append(1) or real(*a, **k))
    finetune(_tiny(), _labelled(8), LOSS, setting="b3", steps=10, lr=1e-3, refresh=100)
    assert len(calls) == 1 + 1 + 5 + 1  # the check before, step 0's coding, checks after steps 2, 4, ... 10, the final pass


def test_no_check_with_validation_false():
    model = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotKeptWarning)
        finetune(model, _labelled(2), LOSS, setting="b3", steps=10, lr=5.0, validation=False)
    assert not torch.equal(model[0].weight.detach(), _tiny()[0].weight.detach())  # diverged, and kept


def test_bad_validation_arguments_are_one_line_errors():
    model = _tiny()
    data = _labelled(2)
    cases = [(TypeError, {"validation": True}), (TypeError, {"validation": 5}), (TypeError, {"validation": "x"}),
             (TypeError, {"validation": 2.5}), (ValueError, {"validation": []}),
             (ValueError, {"check_every": 0}), (ValueError, {"check_every": 1.5}), (ValueError, {"check_every": True}),
             (ValueError, {"check_every": 2, "validation": False})]
    for kind, kwargs in cases:
        with pytest.raises(kind, match="validation|check_every") as info:
            finetune(model, data, LOSS, setting="b3", steps=1, **kwargs)
        assert "\n" not in str(info.value), kwargs
