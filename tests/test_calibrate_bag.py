"""``nn.EmbeddingBag`` calibrated as ``nn.Embedding`` is (twenty-sixth pass, bench/JOURNAL.md "bag (twenty-sixth
pass)"): its rows weighted by their shares of the bags' output error, its sensitivity measured through the model's
own call (2-D ids, or flat ids with ``offsets``; ``per_sample_weights``; ``mode`` "mean", "sum" or "max")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import codec
from codec.rd import calibrate as cal


def _shares_by_hand(bag: nn.EmbeddingBag, ids: torch.Tensor, offsets, psw) -> torch.Tensor:
    """:func:`codec.rd.calibrate.bag_shares` written out bag by bag (the coefficient of each row in each bag,
    squared)."""
    if ids.dim() == 2:
        bags = [(ids[b], None if psw is None else psw[b]) for b in range(ids.shape[0])]
    else:
        ends = offsets[1:].tolist() + ([] if bag.include_last_offset else [ids.numel()])
        starts = offsets[:-1] if bag.include_last_offset else offsets
        bags = [(ids[s:e], None if psw is None else psw[s:e]) for s, e in zip(starts.tolist(), ends)]
    out = torch.zeros(bag.num_embeddings, dtype=torch.float64)
    for rows, weights in bags:
        kept = [(int(r), 1.0 if weights is None else float(w))
                for r, w in zip(rows, weights if weights is not None else rows) if int(r) != bag.padding_idx]
        if not kept:
            continue
        if bag.mode == "max":
            best = bag.weight.detach()[[r for r, _ in kept]].argmax(0)  # per dimension, which id holds the maximum
            for k in best.tolist():
                out[kept[k][0]] += 1 / bag.embedding_dim
            continue
        coef: dict[int, float] = {}
        for r, w in kept:
            coef[r] = coef.get(r, 0.0) + (w / len(kept) if bag.mode == "mean" else w)
        for r, c in coef.items():
            out[r] += c * c
    return out


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_bag_shares_are_each_rows_squared_coefficient_in_every_bag(mode, padding_idx):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(40, 16, mode=mode, padding_idx=padding_idx)
    ids = torch.randint(0, 40, (6, 5))
    ids[0, :3] = 3  # padding, and a row held twice by one bag
    ids[1, 1] = ids[1, 0]
    psw = torch.rand(6, 5) + 0.5 if mode == "sum" else None
    want = _shares_by_hand(bag, ids, None, psw)
    got = cal.bag_shares(bag, {"input": ids, "offsets": None, "per_sample_weights": psw})
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    flat, offsets = ids.reshape(-1), torch.tensor([0, 5, 5, 12, 20, 27])  # uneven bags, one empty
    flat_psw = None if psw is None else psw.reshape(-1)
    want = _shares_by_hand(bag, flat, offsets, flat_psw)
    got = cal.bag_shares(bag, {"input": flat, "offsets": offsets, "per_sample_weights": flat_psw})
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    bag.include_last_offset = True  # the last offset ends the last bag (torch: it is the number of ids)
    last = torch.tensor([0, 5, 5, 12, 20, 30])
    assert torch.allclose(cal.bag_shares(bag, {"input": flat, "offsets": last, "per_sample_weights": flat_psw}),
                          _shares_by_hand(bag, flat, last, flat_psw), rtol=1e-12, atol=1e-12)
    # the shares are what independent row errors of unit variance cost the bags' outputs: E|dY|^2 = D sum(shares)
    bag.include_last_offset = False
    y = bag(ids, per_sample_weights=psw).detach()
    gen = torch.Generator().manual_seed(1)
    weight = bag.weight.detach()
    draws = [float((F.embedding_bag(ids, weight + 1e-4 * torch.randn(40, 16, generator=gen), mode=mode,
                                    per_sample_weights=psw, padding_idx=padding_idx) - y).pow(2).sum()) / 1e-8
             for _ in range(400)]
    shares = cal.bag_shares(bag, {"input": ids, "offsets": None, "per_sample_weights": psw})
    assert sum(draws) / len(draws) == pytest.approx(16 * float(shares.sum()), rel=0.1)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_the_noise_error_goes_through_the_calls_offsets_and_weights(mode):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(64, 16, mode=mode, padding_idx=5)
    flat, offsets = torch.randint(0, 64, (30,)), torch.tensor([0, 4, 4, 17])
    flat[2] = 5
    for by_rows in (True, False):
        noise = cal._Noise(bag.weight.detach(), torch.device("cpu"), 7)
        noise.by_rows = by_rows
        clean = bag(flat, offsets)
        got = noise.bag_error(bag, cal.bag_arguments((flat,), {"offsets": offsets}), clean)
        want = F.embedding_bag(flat, bag.weight.detach() + noise.whole(), offsets, mode=mode, padding_idx=5) - clean
        assert torch.allclose(got, want, atol=1e-6)


class _BagNet(nn.Module):
    def __init__(self, mode: str = "mean"):
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(4000, 64, mode=mode)
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 384), nn.Linear(384, 384), nn.Linear(384, 4)

    def forward(self, input, offsets=None, per_sample_weights=None):
        hidden = F.relu(self.fc1(self.bag(input, offsets, per_sample_weights)))
        return self.fc3(F.relu(self.fc2(hidden)))


def _task(n: int, gen: torch.Generator, length: int = 16):
    """Four classes, each with its own pool of 400 token ids; 30 % of a sample's ids from its class's pool."""
    pools = torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:1600].view(4, 400)
    y = torch.randint(0, 4, (n,), generator=gen)
    own = pools[y][torch.arange(n)[:, None], torch.randint(0, 400, (n, length), generator=gen)]
    ids = torch.where(torch.rand(n, length, generator=gen) < 0.3, own,
                      torch.randint(0, 4000, (n, length), generator=gen))
    return ids, torch.rand(n, length, generator=gen) + 0.5, y


def _trained(mode: str):
    gen = torch.Generator().manual_seed(0)
    (ids, w, y), held = _task(TRAIN, gen), _task(1024, gen)
    model = _BagNet(mode)
    run = (lambda m, i, s: m(i, per_sample_weights=s)) if mode == "sum" else (lambda m, i, s: m(i))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(0, TRAIN, 64):
        loss = F.cross_entropy(run(model, ids[i:i + 64], w[i:i + 64]), y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), run, held


TRAIN = 10000


def test_flat_ids_with_offsets_calibrate_as_2d_ids():
    model, _, (ids, _, _) = _trained("mean")
    flat = [{"input": ids[i:i + 64].reshape(-1), "offsets": torch.arange(0, 64 * 16, 16)} for i in range(0, 256, 64)]
    two_d = [ids[i:i + 64] for i in range(0, 256, 64)]
    a = cal.calibrate(model, two_d, sensitivity_samples=1 << 30)
    b = cal.calibrate(model, flat, sensitivity_samples=1 << 30)
    assert a.layers["bag.weight"].kind == "embedding_bag"
    assert torch.equal(torch.from_numpy(a.layers["bag.weight"].h), torch.from_numpy(b.layers["bag.weight"].h))
    for name in ("bag.weight", "fc1.weight", "fc2.weight", "fc3.weight"):
        assert a.layers[name].sensitivity == pytest.approx(b.layers[name].sensitivity, rel=1e-5)
    stats = a.layers["bag.weight"]
    assert 0.0 < stats.sensitivity and 0.2 < stats.gain < 5
    # mean of 16 ids: each id's share is 1/256 of a bag (an id held twice by a bag counts (2/16)^2)
    assert float(stats.h.sum()) == pytest.approx(256 / 16, rel=0.05)


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_a_bag_model_calibrated_is_no_worse_than_data_free_and_no_note_names_its_bag(tmp_path, mode):
    """Before: 'bag.weight' (EmbeddingBag: a layer kind calibration does not measure) coded by the data-free
    weighting, beside calibrated layers whose sensitivities are on another scale. ``mode="sum"`` runs with
    ``per_sample_weights`` given by keyword (dict batches)."""
    model, run, (ids, w, _) = _trained(mode)
    calib = ([{"input": ids[i:i + 64], "per_sample_weights": w[i:i + 64]} for i in range(0, 256, 64)]
             if mode == "sum" else ids[:256])
    test_ids, test_w = ids[256:], w[256:]  # held out
    with torch.no_grad():
        ref = run(model, test_ids, test_w)

    def error(path) -> float:
        decoded = copy.deepcopy(model)
        codec.load_into(decoded, path)
        with torch.no_grad():
            return float((run(decoded, test_ids, test_w) - ref).pow(2).sum() / ref.pow(2).sum())

    budget = 1
    codec.save(model, tmp_path / "free.jwt", bits_per_weight=budget)
    notes = codec.save(model, tmp_path / "cal.jwt", bits_per_weight=budget, calibration=calib)
    assert not [n for n in notes if "bag.weight" in n and "data-free" in n], notes
    assert "4 layers" in codec.open(tmp_path / "cal.jwt").metadata["jwt.calibration"]
    for name in ("free", "cal"):
        assert budget * 0.97 <= codec.open(tmp_path / f"{name}.jwt").totals().bits_per_weight <= budget
    assert error(tmp_path / "cal.jwt") <= error(tmp_path / "free.jwt")


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_flat_ids_with_offsets_count_bags_as_samples(tmp_path, monkeypatch, mode):
    """Before (offsets pass): a batch of flat ids with ``offsets`` counted its ids as samples (64 bags of 16 ids:
    1,024), so the sensitivity passes stopped after its first batch (256 "samples") where 2-D ids give them four,
    and the file said "8192 inputs" for 512. A bag is a sample; ``per_sample_weights`` by keyword (``sum``) counts
    none."""
    model, _, (ids, w, _) = _trained(mode)
    psw = mode == "sum"

    def batch(i: int, flat: bool) -> dict:
        rows = ids[i:i + 64]
        out = {"input": rows.reshape(-1), "offsets": torch.arange(0, rows.numel(), 16)} if flat else {"input": rows}
        if psw:
            out["per_sample_weights"] = w[i:i + 64].reshape(-1) if flat else w[i:i + 64]
        return out

    forms = {name: [batch(i, name == "flat") for i in range(0, 512, 64)] for name in ("2-D", "flat")}
    passed: list[int] = []
    original = cal._sensitivity_pass
    monkeypatch.setattr(cal, "_sensitivity_pass", lambda *a: passed.append(a[5]) or original(*a))
    seen = {}
    for name, batches in forms.items():
        passed.clear()
        calib = cal.calibrate(model, batches)
        seen[name] = (calib.samples, calib.batches, list(passed))
    want = (512, 8, list(range(cal.SENSITIVITY_SAMPLES // 64)))
    assert seen["2-D"] == want and seen["flat"] == want, seen
    files = {}
    for name, batches in forms.items():
        codec.save(model, tmp_path / f"{name}.jwt", bits_per_weight=1, calibration=batches)
        files[name] = (tmp_path / f"{name}.jwt").read_bytes()
    assert codec.open(tmp_path / "flat.jwt").metadata["jwt.calibration"].startswith("512 inputs in 8 batches")
    assert files["flat"] == files["2-D"]


def test_flat_ids_with_a_last_offset_count_one_bag_fewer_than_offsets():
    """``include_last_offset=True``: 65 offsets end 64 bags."""
    model, _, (ids, _, _) = _trained("mean")
    model.bag.include_last_offset = True
    flat = [{"input": ids[i:i + 64].reshape(-1), "offsets": torch.arange(0, 64 * 16 + 1, 16)}
            for i in range(0, 512, 64)]
    calib = cal.calibrate(model, flat)
    two_d = cal.calibrate(model, [ids[i:i + 64] for i in range(0, 512, 64)])
    assert (calib.samples, calib.batches) == (two_d.samples, two_d.batches) == (512, 8)
    for name in ("bag.weight", "fc1.weight", "fc2.weight", "fc3.weight"):  # the same 4 sensitivity batches
        assert calib.layers[name].sensitivity == pytest.approx(two_d.layers[name].sensitivity, rel=1e-5)
