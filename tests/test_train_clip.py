"""codec.train.TileClip: each tile of a coded weight clipped to its mean +- k standard deviations after every
optimizer step, tile by tile as the encoder tiles it (so one outlier does not widen a whole tile's step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import codec
import codec.train
from codec.rd.gptq import tile_index
from codec.tensorcodec import EncodeOptions, parse_spec
from codec.tiling import plan_tiling

SETTING = [("0.weight", "jpeg,q7,table=ramp1"), ("2.weight", "b3")]


def _mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(200, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    with torch.no_grad():  # heavy-tailed, as a trained layer is, with outliers in some tiles
        model[0].weight.copy_(torch.distributions.StudentT(3.0).sample((96, 200)) * 0.05)
        model[0].weight[5, 7], model[0].weight[90, 199] = 3.0, -2.0
    return model


def _reference(w: np.ndarray, setting: str, k: float) -> np.ndarray:
    """Each element clipped to its tile's mean +- k population standard deviations (the encoder's tiles)."""
    opts = parse_spec(setting, EncodeOptions())
    matrix = w.reshape(w.shape[0], -1).astype(np.float64)
    tiles = plan_tiling(matrix.shape[0], matrix.shape[1], opts.tile, opts.row_shape, opts.params)
    tile_of = tile_index(tiles)
    out = matrix.copy()
    for t in np.unique(tile_of):
        values = matrix[tile_of == t]
        lo, hi = values.mean() - k * values.std(), values.mean() + k * values.std()
        out[tile_of == t] = np.clip(values, lo, hi)
    return out.reshape(w.shape)


def test_each_tile_is_clipped_to_its_mean_plus_minus_k_deviations_the_rest_untouched():
    model = _mlp()
    before = model[0].weight.detach().clone()
    clip = codec.train.TileClip(model, 3.0, overrides=SETTING)  # clips once at once
    assert clip.tensors == ["0.weight"]  # the largest JPEG tensor: the one a Budget moves
    after = model[0].weight.detach()
    expected = _reference(before.numpy(), "jpeg,q7,table=ramp1", 3.0)
    assert np.allclose(after.numpy(), expected, rtol=0, atol=1e-6)  # 200 columns: a 64 x 8 edge band of tiles
    inside = torch.from_numpy(expected).float() == before
    assert torch.equal(after[inside], before[inside])  # values within their tile's bounds keep their bits
    assert 0 < (~inside).sum() < 0.05 * before.numel() and after[5, 7] < 1.0 and after[90, 199] > -1.0
    assert torch.equal(model[2].weight, _mlp()[2].weight)  # the other tensors are not touched


def test_the_tile_ranges_shrink_and_the_same_quality_codes_the_clipped_weights_closer():
    """The point of it: the encoder's tile ranges come from the extremes; clipped, the tiles' step at one quality is
    finer, so the same quality codes them closer (in a budget loop the budget turns that into its quality choice)."""
    model = _mlp()
    clipped = _mlp()
    codec.train.TileClip(clipped, 3.0, overrides=SETTING)
    for m in (model, clipped):
        m[0].weight.requires_grad_(False)
    w, c = model[0].weight, clipped[0].weight
    assert (c[:64, :64].max() - c[:64, :64].min()) < 0.5 * (w[:64, :64].max() - w[:64, :64].min())
    opts = parse_spec("jpeg,q50,table=ramp1", EncodeOptions())
    err = [(codec.train.coded_weights(m, opts, names=["0.weight"])["0.weight"] - m[0].weight).abs().mean().item()
           for m in (model, clipped)]
    assert err[1] < 0.6 * err[0]  # measured: 0.025 against 0.054


def _widest(w: np.ndarray, setting: str) -> float:
    """The largest distance of a value from its tile's mean, in that tile's standard deviations."""
    opts = parse_spec(setting, EncodeOptions())
    tile_of = tile_index(plan_tiling(w.shape[0], w.shape[1], opts.tile, opts.row_shape, opts.params))
    return max(np.abs(w[tile_of == t] - w[tile_of == t].mean()).max() / w[tile_of == t].std()
               for t in np.unique(tile_of))


def test_it_holds_the_bound_over_a_finetune_loop_as_an_optimizer_hook():
    widest, calls = [], []
    for k in (None, 2.5):
        model = _mlp()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        if k:
            clip = codec.train.TileClip(model, k, overrides=SETTING)
            optimizer.register_step_post_hook(clip)
        torch.manual_seed(0)
        x, y = torch.randn(64, 200), torch.randint(0, 64, (64,))
        codec.train.finetune(model, [(x, y)] * 6, torch.nn.functional.cross_entropy, steps=6, overrides=SETTING,
                             optimizer=optimizer, refresh=2, validation=False)
        widest.append(_widest(model[0].weight.detach().numpy(), "jpeg,q7,table=ramp1"))
        calls.append(clip.calls if k else None)
    assert widest[0] > 10 and widest[1] <= 2.5 * 1.05  # (clipped, a tile's deviation shrinks a little)
    assert calls[1] == 7  # once at the start, then after each of the 6 steps


def test_every_n_clips_after_every_nth_step_only_and_named_tensors_are_clipped():
    model = _mlp()
    clip = codec.train.TileClip(model, 3.0, overrides=SETTING, tensors="2.weight", every=3)  # fc2: 3-bit quant
    assert clip.tensors == ["2.weight"] and "every=3" in repr(clip)
    with torch.no_grad():
        model[0].weight[0, 0] = model[2].weight[0, 0] = 50.0
    clip()  # the 1st step after the start: not clipped
    clip()
    assert model[2].weight[0, 0] == 50.0
    clip()  # the 3rd
    assert model[2].weight[0, 0] < 5.0 and model[0].weight[0, 0] == 50.0  # fc1 was not named


def test_a_conv_weight_is_clipped_over_its_matrix_as_the_encoder_tiles_it():
    torch.manual_seed(1)
    conv = torch.nn.Sequential(torch.nn.Conv2d(16, 80, 3))
    with torch.no_grad():
        conv[0].weight.copy_(torch.distributions.StudentT(2.0).sample(conv[0].weight.shape) * 0.1)
    before = conv[0].weight.detach().clone()
    codec.train.TileClip(conv, 2.0, setting="jpeg,q20")
    expected = _reference(before.numpy(), "jpeg,q20", 2.0)
    assert np.allclose(conv[0].weight.detach().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.nn.Linear(4, 4),), {"k": 0}, "k must be a positive number of standard deviations, not 0"),
    ((torch.nn.Linear(4, 4),), {"k": "4"}, "k must be a number of standard deviations, not '4'"),
    ((torch.nn.Linear(4, 4),), {"k": True}, "k must be a number of standard deviations, not True"),
    ((torch.nn.Linear(4, 4),), {"every": 0}, "every must be a positive integer, not 0"),
    (("model",), {}, "model must be a torch.nn.Module, not str"),
])
def test_bad_arguments_are_one_line_errors_naming_the_value(args, kwargs, message):
    with pytest.raises((TypeError, ValueError)) as exc:
        codec.train.TileClip(*args, **kwargs)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_tensor_not_coded_lossily_or_not_in_the_model_is_refused_by_name():
    model = _mlp()
    with pytest.raises(ValueError, match=r"'0\.bias' is stored losslessly under this setting"):
        codec.train.TileClip(model, overrides=SETTING, tensors="0.bias")
    with pytest.raises(ValueError, match=r"the model has no parameter 'fc9.weight'"):
        codec.train.TileClip(model, overrides=SETTING, tensors=["fc9.weight"])
    with pytest.raises(ValueError, match="no parameter is coded lossily"):
        codec.train.TileClip(model, setting="lossless")
    with pytest.raises(TypeError, match="tensors must be a parameter name or names, not 3"):
        codec.train.TileClip(model, overrides=SETTING, tensors=3)
