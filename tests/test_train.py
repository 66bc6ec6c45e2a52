"""codec.train: the differentiable rate estimate and codec-in-the-loop fine-tuning (tiny models, seconds)."""

from __future__ import annotations

import io

import pytest
import torch

import codec
from codec.train import coded_weights, finetune, rate


def _real_bits(tensor: torch.Tensor, setting: str) -> int:
    buf = io.BytesIO()
    codec.save({"w": tensor}, buf, overrides={"*": setting})
    with codec.open(buf.getvalue()) as f:
        return 8 * f.reader.entry("w").stored_bytes


@pytest.mark.parametrize("setting", ["b4", "q50"])
def test_rate_has_gradients_and_tracks_the_real_size(setting):
    torch.manual_seed(0)
    w = torch.randn(128, 256, requires_grad=True)
    est = rate([w], setting)
    assert est.dim() == 0 and est.requires_grad
    est.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    real = _real_bits(w.detach(), setting)
    assert 0.75 < est.item() / real < 1.25, (est.item(), real)


@pytest.mark.parametrize("setting", ["b8", "q75"])
def test_rate_falls_as_weights_become_compressible(setting):
    """Shrinking the bulk of a tile toward zero, its range (and so the step) kept, leaves fewer bits to code."""
    torch.manual_seed(1)
    w = torch.randn(128, 256)
    rates = []
    for shrink in (1.0, 0.5, 0.1):
        v = torch.where(w.abs() > 2.5, w, w * shrink)
        rates.append(rate({"w": v}, setting).item())
    assert rates[0] > rates[1] > rates[2], rates
    # and a gradient step on the rate alone lowers it
    v = w.clone().requires_grad_(True)
    before = rate([v], setting)
    before.backward()
    with torch.no_grad():
        v -= 1e-3 * v.grad / v.grad.abs().max()
    assert rate([v.detach()], setting).item() < before.item()


def test_rate_of_a_model_counts_small_tensors_as_constants():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    est = rate(model, "b4")
    est.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[2].weight.grad is None  # 4x32: stored losslessly, a constant
    buf = io.BytesIO()
    codec.save(model, buf, overrides={"*": "b4"})
    with codec.open(buf.getvalue()) as f:
        real = 8 * sum(f.reader.entry(n).stored_bytes for n in model.state_dict())
    assert 0.7 < est.item() / real < 1.3


def _tiny():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))


@pytest.mark.parametrize("setting", ["b3", {"codec": "quant", "bits": 5}])
def test_finetune_ends_on_the_weights_the_file_decodes_to(setting):
    model = _tiny()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    data = [torch.randn(32, 64) for _ in range(3)]
    finetune(model, data, setting=setting, steps=4, lr=1e-3, validation=False)  # the check: test_train_loop.py
    assert len(seen) >= 5 + 3  # the teacher's forward passes are hooked too (a copy of the layer)
    assert not torch.equal(model[0].weight.detach(), original["0.weight"])  # it trained
    spec = setting if isinstance(setting, str) else "b5"
    buf = io.BytesIO()
    codec.save(model, buf, overrides={"*": spec})
    loaded = codec.load(buf.getvalue())
    assert torch.equal(loaded["0.weight"], seen[-1])  # the last forward pass ran on the file's weights
    assert not torch.equal(seen[-1], model[0].weight.detach())  # ... which are not the float weights
    for name, t in coded_weights(model, setting).items():
        assert torch.equal(loaded[name], t), name


def test_finetune_with_labels_lowers_the_coded_loss():
    model = _tiny()
    torch.manual_seed(3)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    loss_fn = torch.nn.functional.cross_entropy

    def coded_loss():
        with torch.no_grad():
            return loss_fn(torch.func.functional_call(model, coded_weights(model, "b2"), (x,)), y).item()

    before = coded_loss()
    finetune(model, [(x, y)], loss_fn, setting="b2", steps=30, lr=1e-2)
    assert coded_loss() < before


def test_bad_arguments_are_one_line_errors():
    model = _tiny()
    cases = [(TypeError, lambda: rate("model")), (TypeError, lambda: rate(model, setting=3)),
             (ValueError, lambda: rate(model, setting="jpegxl")), (ValueError, lambda: rate(model, setting="zz")),
             (ValueError, lambda: rate(model, setting={"colour": 1})), (TypeError, lambda: rate({"w": [1.0]})),
             (TypeError, lambda: finetune("model", torch.zeros(2, 64))),
             (TypeError, lambda: finetune(model, 5)), (TypeError, lambda: finetune(model, torch.zeros(2, 64), 3)),
             (ValueError, lambda: finetune(model, torch.zeros(2, 64), steps=-1)),
             (ValueError, lambda: finetune(model, torch.zeros(2, 64), lr=0))]
    for kind, call in cases:
        with pytest.raises(kind) as info:
            call()
        assert "\n" not in str(info.value)
