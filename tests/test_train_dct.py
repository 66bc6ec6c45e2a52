"""codec.train DCT layers and per-tensor settings in codec-in-the-loop fine-tuning (tiny models, seconds)."""

from __future__ import annotations

import io

import pytest
import torch

import codec
from codec.train import DCTConv2d, DCTLinear, coded_weights, finetune, to_ordinary, with_dct_layers
from codec.train.rate import _dct_matrix


def _block_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """|DCT| of every 8x8 block of ``matrix`` (rows and columns multiples of 8), [blocks, 8, 8]."""
    r, c = matrix.shape
    blocks = matrix.reshape(r // 8, 8, c // 8, 8).permute(0, 2, 1, 3).reshape(-1, 8, 8)
    d = _dct_matrix()
    return (d @ blocks @ d.T).abs()


def test_dct_linear_holds_only_low_frequencies_trains_and_converts():
    torch.manual_seed(0)
    layer = DCTLinear(64, 32, keep=3)
    assert sum(p.numel() for p in layer.parameters()) == (32 // 8) * (64 // 8) * 9 + 32
    spectrum = _block_spectrum(layer.weight.detach())
    assert spectrum[:, :3, :3].sum() > 0
    high = spectrum.clone()
    high[:, :3, :3] = 0
    assert high.max() < 1e-5 * spectrum.max()
    # it trains: a few steps of fitting a target lower the loss, gradients reach the coefficients
    x, target = torch.randn(128, 64), torch.randn(128, 32)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert layer.dct.coeffs.grad.abs().sum() > 0 and losses[-1] < losses[0]
    plain = to_ordinary(layer)
    assert type(plain) is torch.nn.Linear and plain.weight.shape == (32, 64)
    assert torch.allclose(plain(x), layer(x), atol=1e-5)


def test_dct_layers_in_a_model_become_its_ordinary_state_dict():
    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    net = Net()
    x = torch.randn(4, 3, 8, 8)
    with_dct_layers(net, ["conv", "fc"], keep=8, rescale=False)  # keep=8: every frequency, the same layer
    assert isinstance(net.conv, DCTConv2d) and isinstance(net.fc, DCTLinear)
    with_dct_layers(Net(), ["fc"], keep=2)  # a fresh model's layer, projected and rescaled
    reference = Net()
    reference.load_state_dict({k.replace("dct.", ""): v for k, v in to_ordinary(Net()).state_dict().items()})
    out = net(x)
    to_ordinary(net)
    assert type(net.conv) is torch.nn.Conv2d and type(net.fc) is torch.nn.Linear
    assert set(net.state_dict()) == set(Net().state_dict())
    assert torch.allclose(net(x), out, atol=1e-5)


def test_dct_weight_codes_smaller_and_closer_than_an_unstructured_one():
    """The JPEG of a low-frequency DCT weight has (nearly) nothing else to code: at the same quality it is several
    times smaller than an unstructured weight of the same energy, and no less exact."""
    torch.manual_seed(2)
    w = DCTLinear(200, 96, keep=2).weight.detach()
    r = torch.randn(96, 200)
    r = r * w.norm() / r.norm()
    sizes, errors = {}, {}
    for name, t in (("dct", w), ("iid", r)):
        buf = io.BytesIO()
        codec.save({"w": t}, buf, overrides={"*": "jpeg,q50,table=flat"})
        sizes[name] = len(buf.getvalue())
        errors[name] = ((codec.load(buf.getvalue())["w"] - t).norm() / t.norm()).item()
    assert sizes["dct"] * 3 < sizes["iid"], sizes
    assert errors["dct"] < errors["iid"], errors


def test_bad_dct_arguments_are_one_line_errors():
    for kind, call in [(ValueError, lambda: DCTLinear(16, 16, keep=0)), (ValueError, lambda: DCTLinear(16, 16, keep=9)),
                       (TypeError, lambda: DCTLinear.from_linear(torch.nn.Conv2d(1, 1, 3))),
                       (TypeError, lambda: with_dct_layers(torch.nn.Sequential(torch.nn.ReLU()), ["0"])),
                       (TypeError, lambda: with_dct_layers("model", ["fc"]))]:
        with pytest.raises(kind) as info:
            call()
        assert "\n" not in str(info.value)


def _tiny():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))


def test_finetune_with_per_tensor_settings_ends_on_the_file_of_those_settings():
    """Overrides as codec.save takes them: each tensor coded at its own setting in the loop, and the file saved with
    the same overrides decodes to exactly the weights of the last forward pass."""
    model = _tiny()
    rules = [("0.weight", "jpeg,q20,table=flat"), ("2.weight", "b3")]
    x, y = torch.randn(32, 256), torch.randint(0, 16, (32,))
    finetune(model, [(x, y)], torch.nn.functional.cross_entropy, steps=3, lr=1e-3, overrides=rules)
    buf = io.BytesIO()
    codec.save(model, buf, overrides=rules)
    loaded = codec.load(buf.getvalue())
    last = coded_weights(model, overrides=rules)
    with codec.open(buf.getvalue()) as f:
        assert "Jpeg" in type(f.reader.entry("0.weight").codec).__name__
        assert "Quant" in type(f.reader.entry("2.weight").codec).__name__
    for name, t in loaded.items():
        assert torch.equal(t, last[name]), name
    assert torch.equal(loaded["0.bias"], model.state_dict()["0.bias"])  # lossless: itself, uncoded
    assert not torch.equal(loaded["0.weight"], model.state_dict()["0.weight"])


@pytest.mark.parametrize("overrides, kind", [({"0.weight": "jpegz"}, ValueError), (5, TypeError),
                                             ([("0.weight",)], TypeError)])
def test_bad_overrides_are_one_line_errors(overrides, kind):
    with pytest.raises(kind) as info:
        finetune(_tiny(), torch.zeros(2, 256), steps=1, overrides=overrides)
    assert "\n" not in str(info.value)
