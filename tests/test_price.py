"""A calibrated plan priced at what repair codes (codec.rd.price): the repaired candidates, their bytes and
distortion, the surcharge the plan's file leaves to repair, and a priced save within its budget."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import codec
from codec.dtypes import get_dtype
from codec.rd import allocate as A
from codec.rd import price as P
from codec.rd.gptq import jpeg_target
from codec.rd.repair import RepairSettings
from codec.tensorcodec import EncodeOptions, encode_tensor

F32 = get_dtype("float32")


def _layer() -> tuple[np.ndarray, np.ndarray]:
    """A 128 x 256 weight (JPEG on its menu) and the second moment of correlated inputs (what compensation uses)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    x = rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 256)) + 0.1 * rng.standard_normal((2000, 256))
    return w, x.T @ x / len(x)


def test_the_prices_follow_the_repair_settings(monkeypatch):
    assert P.RepairPrices.of(RepairSettings()) == P.RepairPrices(damp=RepairSettings().damp, jpeg=True,
                                                                 quant=P.PRICE_GPTQ)
    assert P.RepairPrices.of(RepairSettings(gptq=False)) == P.RepairPrices(jpeg=True, quant=False)
    assert P.RepairPrices.of(RepairSettings(gptq=False, compensate=False)) is None
    assert P.RepairPrices.of(RepairSettings(keep_size=False)) is None
    monkeypatch.setattr(P, "PRICE_GPTQ", True)
    assert P.RepairPrices.of(RepairSettings(compensate=False)) == P.RepairPrices(jpeg=False, quant=True)
    monkeypatch.setattr(P, "PRICE_GPTQ", False)
    assert P.RepairPrices.of(RepairSettings(compensate=False)) is None
    assert P.RepairPrices(quant=False).prices("jpeg") and not P.RepairPrices(quant=False).prices("quant")


def test_a_repaired_candidate_codes_the_compensated_target():
    """Each priced candidate of a tensor with a full H gets a twin with the same options; the twin's bytes are the
    compensated target's coding (what repair codes) and its output-space distortion is below the plain coding's."""
    w, h = _layer()
    measure_by = A.Distortion({"w": A.Weighting(h=h)})
    menu = P.RepairMenu(A.Menu(), measure_by, P.RepairPrices(quant=False))
    items = menu.candidates("w", w, F32, EncodeOptions())
    plain = A.candidates(w, F32, EncodeOptions())
    twins = [(label, o) for label, o in items if label.endswith(P.REPAIRED)]
    assert items[: len(plain)] == plain
    assert twins and all(o.codec == "jpeg" for _, o in twins)
    assert len(twins) == sum(o.codec == "jpeg" for _, o in plain)
    opts = next(o for label, o in twins if o.quality == 20)
    with measure_by.keeping("w"):
        repaired, _ = menu.measure("w", w, F32, "jpeg q20" + P.REPAIRED, opts, measure_by=measure_by)
        ordinary, _ = menu.measure("w", w, F32, "jpeg q20", opts, measure_by=measure_by)
    target, _ = jpeg_target(w, F32, opts, h, damp=RepairSettings().damp)
    coded = encode_tensor(target, F32, opts)
    assert repaired.nbytes == sum(map(len, coded.blobs)) + A.entry_bytes("w", F32, w.shape, coded, 10)
    assert repaired.options == ordinary.options
    assert repaired.nmse < ordinary.nmse
    # without a full H (data-free, or a diagonal) nothing is added
    assert P.RepairMenu(A.Menu(), A.Distortion(), P.RepairPrices()).candidates("w", w, F32, EncodeOptions()) == plain
    diagonal = A.Distortion({"w": A.Weighting(h=np.diag(h).copy())})
    assert P.RepairMenu(A.Menu(), diagonal, P.RepairPrices()).candidates("w", w, F32, EncodeOptions()) == plain


def test_a_save_makes_each_repaired_target_once(monkeypatch):
    """One RepairPrices (one save's) makes a candidate's compensated target once: a later plan's measure gives the
    same point without compensating again; other values or another H make their own target."""
    import codec.rd.gptq as G

    made = []

    def counting(array, *args, **kwargs):
        made.append(float(array.sum()))
        return jpeg_target(array, *args, **kwargs)

    monkeypatch.setattr(G, "jpeg_target", counting)
    w, h = _layer()
    prices = P.RepairPrices(quant=False)
    opts = EncodeOptions(codec="jpeg", quality=20)

    def point(array, hessian):
        measure_by = A.Distortion({"w": A.Weighting(h=hessian)})
        menu = P.RepairMenu(A.Menu(), measure_by, prices)
        with measure_by.keeping("w"):
            return menu.measure("w", array, F32, "jpeg q20" + P.REPAIRED, opts, measure_by=measure_by)[0]

    first, again = point(w, h), point(w, h)
    assert len(made) == 1 and first == again
    point(w * np.float32(1.5), h)
    assert len(made) == 2
    point(w, 2.0 * h)
    assert len(made) == 3
    assert P.RepairPrices(quant=False) == prices  # the codings are not part of what the prices are


def test_the_surcharge_is_what_the_chosen_repaired_points_cost_beyond_the_plain_coding():
    w, h = _layer()
    measure_by = A.Distortion({"w": A.Weighting(h=h)})

    def tensors(names=None):
        yield "w", w, F32

    surcharge: dict = {}
    chosen = A.plan_options(tensors, EncodeOptions(), lambda n: None, bits_per_weight=1.0, measure_by=measure_by,
                            search="exhaustive", price=P.RepairPrices(), surcharge=surcharge)
    plain = A.plan_options(tensors, EncodeOptions(), lambda n: None, bits_per_weight=1.0, measure_by=measure_by,
                           search="exhaustive")
    assert set(surcharge) <= {"w"} and all(v >= 0 for v in surcharge.values())
    opts = chosen["w"]
    original = encode_tensor(w, F32, opts)
    plan_bytes = sum(map(len, original.blobs)) + A.entry_bytes("w", F32, w.shape, original, 10)
    assert plan_bytes + surcharge.get("w", 0) <= w.size * 1.0 / 8  # the priced plan within the budget
    assert plain["w"].codec in ("jpeg", "quant", "lossless")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(256, 128), nn.Linear(128, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("bits", [2.0, 3.0])
def test_a_priced_repaired_save_keeps_its_budget(bits, monkeypatch):
    """codec.save(model, calibration=x) of a small model prices repair's codings (the repaired candidates are
    measured) and its file stays within the budget, however much of the plan's file repair's codings take."""
    calls = []
    real = P.repaired_point
    monkeypatch.setattr(P, "repaired_point", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    model = _Net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 256, generator=g)
    weights = sum(t.numel() for t in model.state_dict().values())
    buf = io.BytesIO()
    notes = codec.save(model, buf, bits_per_weight=bits, calibration=x)
    assert calls, "no repaired candidate was measured"
    assert 8 * len(buf.getvalue()) / weights <= bits, notes
    back = _Net()
    back.load_state_dict(codec.load(buf.getvalue()))
    with torch.no_grad():
        assert float((back(x) - model(x)).norm() / model(x).norm()) < 0.5


def test_the_plan_names_the_jpeg_tensors_it_priced_uncompensated(monkeypatch):
    """A priced plan's chosen JPEG point of a tensor offered repaired twins is either a twin (its surcharge) or the
    uncompensated coding (``plain``: repair codes it so); a tensor without a full H is offered none and is in
    neither; with :data:`codec.rd.price.PLAIN_AS_PRICED` off, ``plain`` stays empty."""
    w, h = _layer()
    v = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    measure_by = A.Distortion({"w": A.Weighting(h=h)})

    def tensors(names=None):
        yield "w", w, F32
        yield "v", v, F32

    for bits in (0.6, 1.0, 2.0):
        surcharge: dict = {}
        plain: set = set()
        chosen = A.plan_options(tensors, EncodeOptions(), lambda n: None, bits_per_weight=bits, measure_by=measure_by,
                                search="exhaustive", price=P.RepairPrices(), surcharge=surcharge, plain=plain)
        assert "v" not in plain and "v" not in surcharge
        if chosen["w"].codec == "jpeg":
            assert ("w" in plain) != ("w" in surcharge), (bits, chosen, surcharge)
        else:  # (a quant point: GPTQ's twin or not, repair's GPTQ is not what plain_jpeg names)
            assert "w" not in plain
        assert not plain & set(surcharge)
    monkeypatch.setattr(P, "PLAIN_AS_PRICED", False)
    plain = set()
    A.plan_options(tensors, EncodeOptions(), lambda n: None, bits_per_weight=1.0, measure_by=measure_by,
                   search="exhaustive", price=P.RepairPrices(), plain=plain)
    assert plain == set()


def test_repair_codes_a_plain_priced_jpeg_weight_without_compensation(monkeypatch):
    """RepairSettings.plain_jpeg: the named JPEG weights are coded without JPEG compensation (a note names them);
    the others are compensated as before. A name that is not a string is a TypeError."""
    import codec.rd.gptq as G
    from codec.rd.repair import code_with_repair

    compensated = []

    def counting(array, *args, **kwargs):
        compensated.append(array.shape)
        return jpeg_target(array, *args, **kwargs)

    monkeypatch.setattr(G, "jpeg_target", counting)
    model = _Net().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 256, generator=g)
    batches = list(x.split(64))
    options = {n: EncodeOptions(codec="lossless") for n in model.state_dict()}
    options["a.weight"] = options["b.weight"] = EncodeOptions(codec="jpeg", quality=20)
    _, notes, _ = code_with_repair(model, batches, options, settings=RepairSettings())
    assert (128, 256) in compensated and (16, 128) in compensated
    compensated.clear()
    _, notes, _ = code_with_repair(model, batches, options, settings=RepairSettings(plain_jpeg=frozenset({"a.weight"})))
    assert (128, 256) not in compensated and (16, 128) in compensated
    assert any("without compensation" in n and "a.weight" in n for n in notes), notes
    with pytest.raises(TypeError, match="plain_jpeg"):
        code_with_repair(model, batches, options, settings=RepairSettings(plain_jpeg="a.weight"))


def test_a_save_passes_the_plain_priced_tensors_to_repair(monkeypatch):
    """codec.save hands repair the JPEG tensors its (priced) plan chose uncompensated, by the model's names, in the
    settings it repairs with; the user's own settings are kept beside them."""
    import codec.api
    import codec.rd.allocate

    real_plan, real_repair = codec.rd.allocate.plan_options, codec.api.repaired_arrays
    seen = []

    def plan_options(*args, plain=None, **kwargs):
        chosen = real_plan(*args, plain=plain, **kwargs)
        if plain is not None:
            plain.add("a.weight")  # (as if its plan had chosen the uncompensated point)
        return chosen

    def repaired_arrays(*args, **kwargs):
        seen.append(args[9])
        return real_repair(*args, **kwargs)

    monkeypatch.setattr(codec.rd.allocate, "plan_options", plan_options)
    monkeypatch.setattr(codec.api, "repaired_arrays", repaired_arrays)
    model = _Net()
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    codec.save(model, io.BytesIO(), bits_per_weight=2.0, calibration=x, repair=RepairSettings(damp=0.02))
    assert len(seen) == 1 and seen[0].plain_jpeg == {"a.weight"} and seen[0].damp == 0.02
