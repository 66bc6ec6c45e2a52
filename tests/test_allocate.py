"""Rate-distortion allocation: hulls, budgets, error bounds, overrides, calibration."""

from __future__ import annotations

import io
import itertools
import re
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import codec
from codec.rd.allocate import (RDPoint, allocate_budget, allocate_max_error, distortion, image_side, lower_hull,
                            row_images)
from codec.dtypes import get_dtype
from codec.tensorcodec import EncodeOptions, Overrides, parse_spec

RNG = np.random.default_rng(0)


def _pt(nbytes: int, nmse: float, label: str = "") -> RDPoint:
    return RDPoint(EncodeOptions(), label or f"{nbytes}", nbytes, nmse, nmse**0.5)


def _model() -> dict[str, torch.Tensor]:
    """A small model with smooth (image-like) and rough matrices, a tiny head and biases."""
    torch.manual_seed(0)
    smooth = torch.cumsum(torch.randn(256, 256), dim=1) / 16
    return {"a.weight": smooth, "a.bias": torch.randn(256), "b.weight": torch.randn(192, 256) * 0.05,
            "head.weight": torch.randn(10, 192), "head.bias": torch.randn(10)}


def test_lower_hull_is_convex_and_decreasing():
    """The hull keeps Pareto points with decreasing distortion and non-increasing slopes."""
    pts = [_pt(10, 1.0), _pt(20, 0.5), _pt(25, 0.49), _pt(30, 0.2), _pt(40, 0.19), _pt(50, 0.0), _pt(35, 0.6)]
    hull = lower_hull(pts)
    assert [p.nbytes for p in hull] == [10, 20, 30, 50]
    slopes = [(a.nmse - b.nmse) / (b.nbytes - a.nbytes) for a, b in itertools.pairwise(hull)]
    assert all(s1 >= s2 for s1, s2 in itertools.pairwise(slopes))


def test_budget_allocation_matches_brute_force_on_convex_menus():
    """On convex menus the Lagrangian + greedy choice is as good as exhaustive search."""
    hulls = {"x": lower_hull([_pt(10, 1.0), _pt(20, 0.4), _pt(40, 0.1), _pt(80, 0.0)]),
             "y": lower_hull([_pt(5, 0.8), _pt(15, 0.2), _pt(30, 0.05)]),
             "z": lower_hull([_pt(1, 0.3), _pt(50, 0.0)])}
    for budget in (16, 30, 45, 60, 100, 160):
        chosen = allocate_budget(hulls, {}, budget)
        assert sum(p.nbytes for p in chosen.values()) <= budget
        best = min((sum(c.nmse for c in combo) for combo in itertools.product(*hulls.values())
                    if sum(c.nbytes for c in combo) <= budget))
        assert sum(p.nmse for p in chosen.values()) <= best + 0.15  # greedy on a hull: near-optimal


def _weighted(chosen: dict[str, RDPoint], weights: dict[str, float]) -> float:
    return sum(weights.get(n, 1.0) * p.nmse for n, p in chosen.items())


def _optimum(points: dict[str, list[RDPoint]], weights: dict[str, float], budget: int) -> float:
    """The least weighted distortion of any one point per tensor within ``budget``, by enumeration."""
    names = list(points)
    return min(sum(weights.get(n, 1.0) * p.nmse for n, p in zip(names, combo))
               for combo in itertools.product(*points.values()) if sum(p.nbytes for p in combo) <= budget)


def _search(points: dict[str, list[RDPoint]], weights: dict[str, float], budget: int) -> dict[str, RDPoint]:
    """What the exhaustive search does with a tensor's points: equal slopes on the hulls, then best_fill."""
    from codec.rd.allocate import best_fill

    start = allocate_budget({n: lower_hull(p) for n, p in points.items()}, weights, budget, fill=False)
    return best_fill(points, weights, start, budget)


def test_few_tensors_get_the_knapsack_optimum_where_slopes_and_pairwise_trades_miss_it(monkeypatch):
    """Two cheap steep steps (a, b) take the slack the one large step of c needed: equal slopes choose a1 + b1,
    the greedy fill then c's off-hull point c- (21.5), and no trade of one tensor's step down for another's up
    fits c1's 300 extra bytes; c1 alone (20) is the optimum. Weighted, the optimum moves and is found again."""
    from codec.rd import allocate

    points = {"a": [_pt(100, 10.0, "a0"), _pt(150, 6.0, "a1")],
              "b": [_pt(100, 10.0, "b0"), _pt(150, 6.0, "b1")],
              "c": [_pt(100, 10.0, "c0"), _pt(250, 9.5, "c-"), _pt(400, 0.0, "c1")]}
    budget = 600
    chosen = _search(points, {}, budget)
    assert [chosen[n].label for n in "abc"] == ["a0", "b0", "c1"]
    assert _weighted(chosen, {}) == _optimum(points, {}, budget) == 20.0
    assert sum(p.nbytes for p in chosen.values()) <= budget
    monkeypatch.setattr(allocate, "KNAPSACK_TENSORS", 0)  # without the whole-front knapsack: the greedy plan
    assert _weighted(_search(points, {}, budget), {}) == 21.5
    monkeypatch.undo()
    weights = {"a": 3.0}  # a's step now gains 12: a1 + b1 + c- (33.5) beats c1 (40)
    chosen = _search(points, weights, budget)
    assert _weighted(chosen, weights) == _optimum(points, weights, budget)
    assert sum(p.nbytes for p in chosen.values()) <= budget


@pytest.mark.parametrize("seed", [0, 1, 2, 14, 21, 28, 31, 55])
def test_few_tensors_allocation_is_the_brute_force_optimum_and_fits(seed):
    """Random non-convex menus of 3-4 tensors (budgets under KNAPSACK_STEPS bytes: the knapsack's byte grid is
    exact): the search's weighted distortion is within KNAPSACK_MARGIN of the enumerated optimum, and the plan
    fits the budget. Of seeds 0-59 (360 budgets), equal slopes + greedy fill + slack knapsack + trades alone
    missed the optimum in 5 (seeds 14, 21, 28, 31, 55: by 0.3-22.5 %; 4 of them by more than the margin)."""
    from codec.rd import allocate

    rng = np.random.default_rng(seed)
    points = {}
    for t in range(int(rng.integers(3, 5))):
        sizes = np.sort(rng.choice(np.arange(20, 2000), size=int(rng.integers(2, 7)), replace=False))
        errors = np.sort(rng.random(len(sizes)))[::-1] * rng.uniform(0.1, 10)
        points[f"t{t}"] = [_pt(int(b), float(e), f"t{t}/{i}") for i, (b, e) in enumerate(zip(sizes, errors))]
    weights = {n: float(rng.uniform(0.2, 5)) for n in points}
    floor = sum(p[0].nbytes for p in points.values())
    top = sum(p[-1].nbytes for p in points.values())
    for budget in np.linspace(floor, top, 7).astype(int)[1:]:
        chosen = _search(points, weights, int(budget))
        assert sum(p.nbytes for p in chosen.values()) <= budget
        best = _optimum(points, weights, int(budget))
        assert best <= _weighted(chosen, weights) <= best * (1 + allocate.KNAPSACK_MARGIN) + 1e-12


def test_budget_below_smallest_is_an_error():
    """A budget no choice fits is refused with the smallest size named."""
    with pytest.raises(codec.EncodeError, match="below the smallest"):
        allocate_budget({"x": [_pt(10, 1.0)]}, {}, 5)


def test_max_error_takes_the_cheapest_point_within_the_bound():
    """max_error picks, per tensor, the smallest point whose relative RMS error fits."""
    chosen = allocate_max_error({"x": [_pt(10, 0.04), _pt(20, 0.0009), _pt(90, 0.0)]}, 0.05)
    assert chosen["x"].nbytes == 20


def test_only_the_input_layer_or_the_users_row_shape_is_an_image():
    """Square rows count as images for the first matrix only, or where --row-shape fits."""
    base = EncodeOptions()
    assert row_images((512, 784), base, input_layer=True) == (28, 28)
    assert row_images((128, 3136), base, input_layer=False) is None  # 64 x 7 x 7 CNN features
    assert row_images((128, 3136), EncodeOptions(row_shape=(56, 56)), input_layer=False) == (56, 56)
    assert row_images((512, 100), base, input_layer=True) == (10, 10)


def test_image_prior_discounts_high_frequency_error():
    """For square-image rows, a checkerboard error costs less than a smooth one of equal energy."""
    assert image_side((512, 784)) == 28 and image_side((512, 100)) == 10 and image_side((64, 49)) is None
    assert image_side((64, 1024)) is None  # a power-of-two hidden size, not an image
    ref = RNG.standard_normal((16, 784))
    y, x = np.mgrid[0:28, 0:28]
    smooth = np.tile(np.cos(2 * np.pi * x / 28).ravel(), (16, 1))
    rough = np.tile(((-1.0) ** (x + y)).ravel(), (16, 1))
    smooth *= np.linalg.norm(rough) / np.linalg.norm(smooth)
    assert distortion(ref, ref + 0.1 * rough, (28, 28))[0] < 0.1 * distortion(ref, ref + 0.1 * smooth, (28, 28))[0]
    assert distortion(ref, ref + 0.1 * rough, (28, 28))[1] == pytest.approx(distortion(ref, ref + 0.1 * smooth)[1])
    plain = RNG.standard_normal((16, 50))
    assert distortion(plain, plain * 1.1) == pytest.approx((0.01, 0.01))


@pytest.mark.parametrize("bpw", [1.5, 3.0])
def test_bits_per_weight_lands_within_three_percent(tmp_path, bpw):
    """The whole file, index included, lands at or under B and within 3 % of it."""
    sd = _model()
    codec.save(sd, tmp_path / "m.jwt", bits_per_weight=bpw)
    weights = sum(t.numel() for t in sd.values())
    actual = 8 * os.path.getsize(tmp_path / "m.jwt") / weights
    assert 0.97 * bpw <= actual <= bpw
    out = codec.load(tmp_path / "m.jwt")
    assert all(out[k].shape == v.shape for k, v in sd.items())


def test_max_error_bounds_every_tensor(tmp_path):
    """With max_error every lossy tensor's relative RMS error is within the bound."""
    sd = _model()
    codec.save(sd, tmp_path / "m.jwt", max_error=0.02)
    out = codec.load(tmp_path / "m.jwt")
    for name, t in sd.items():
        assert float((out[name] - t).norm() / t.norm()) <= 0.02, name


def test_overrides_are_kept_under_a_budget(tmp_path):
    """Tensors matched by --set keep their setting; the rest share what is left."""
    sd = _model()
    codec.save(sd, tmp_path / "m.jwt", bits_per_weight=2.0, overrides={"head.*": "lossless", "a.weight": "b4"})
    with codec.open(tmp_path / "m.jwt") as f:
        assert f.reader.entry("head.weight").codec.codec_id == "zstd_planes"
        assert f.reader.entry("a.weight").codec.get_config()["bits"] == 4
    assert os.path.getsize(tmp_path / "m.jwt") * 8 <= 2.0 * sum(t.numel() for t in sd.values())


def test_calibration_spends_bits_on_the_tensor_the_score_cares_about(tmp_path):
    """A score that only depends on b.weight makes the allocator give b.weight more bytes."""
    sd = _model()
    ref = sd["b.weight"]
    calls = []

    def score(candidate):
        calls.append(1)
        return -float((candidate["b.weight"] - ref).norm())

    codec.save(sd, tmp_path / "plain.jwt", bits_per_weight=1.5)
    notes = codec.save(sd, tmp_path / "cal.jwt", bits_per_weight=1.5, calibrate=score)
    with codec.open(tmp_path / "plain.jwt") as p, codec.open(tmp_path / "cal.jwt") as c:
        assert c.reader.entry("b.weight").stored_bytes > p.reader.entry("b.weight").stored_bytes
    assert len(calls) >= 2
    assert [n for n in notes if n.startswith("calibrate:")] == [
        n for n in notes if n.startswith("calibrate: kept the calibrated plan, scored ")]  # it scores better
    assert any(isinstance(n, codec.encode.Note) and n.startswith("calibrate: kept the calibrated plan") for n in notes)


def _quartic_score(sd):
    """A score flat at a probe's 1 % error and steep at a file's errors: quartic in a.weight's error, quadratic in
    b.weight's (higher is better)."""
    a0, b0 = sd["a.weight"].double(), sd["b.weight"].double()

    def nmse(t, ref):
        return float(((t.double() - ref) ** 2).sum() / (ref ** 2).sum())

    def score(candidate):
        return -100 * nmse(candidate["a.weight"], a0) ** 2 - nmse(candidate["b.weight"], b0)

    return score


def test_a_score_the_probes_mislead_gets_the_data_free_plan(tmp_path, monkeypatch):
    """With the 1 % probe alone (no rounds at the plan's errors), a score quartic in a.weight's error makes the
    sensitivities call a.weight nearly free and the calibrated plan starves it; the save compares the two plans'
    files by the user's score and keeps the data-free one, says so, and stays within the budget."""
    import codec.encode
    import codec.rd.probe

    monkeypatch.setattr(codec.rd.probe, "ROUNDS", 0)
    kept, plain, calibrated = _quartic_files(tmp_path)
    assert len(kept) == 1 and kept[0].startswith("calibrate: kept the data-free plan, scored ")
    assert isinstance(kept[0], codec.encode.Note)
    assert calibrated >= plain


def _quartic_files(tmp_path, budget: float = 1.2) -> tuple[list, float, float]:
    """The quartic score's model saved at ``budget`` data-free (plain.jwt) and with the score (cal.jwt): the save's
    "calibrate:" notes and both files' scores; the calibrated file is checked within the budget."""
    sd = _model()
    score = _quartic_score(sd)
    codec.save(sd, tmp_path / "plain.jwt", bits_per_weight=budget)
    notes = codec.save(sd, tmp_path / "cal.jwt", bits_per_weight=budget, calibrate=score)
    plain, calibrated = (score(codec.load(tmp_path / f"{n}.jwt")) for n in ("plain", "cal"))
    assert os.path.getsize(tmp_path / "cal.jwt") * 8 <= budget * sum(t.numel() for t in sd.values())
    return [n for n in notes if n.startswith("calibrate:")], plain, calibrated


def test_probes_at_the_plans_errors_rank_the_tensors_the_one_percent_probe_ranks_wrong(tmp_path):
    """The same quartic score: probed again at the errors the first plan gives (both signs), a.weight is no longer
    free; the calibrated plan then scores clearly above the data-free file by the user's score (main's 1 % plan
    scored below it, and its save kept the data-free file), the save keeps it and says so, within the budget."""
    kept, plain, calibrated = _quartic_files(tmp_path)
    assert len(kept) == 1 and kept[0].startswith("calibrate: kept the calibrated plan, scored "), kept
    assert calibrated > plain + 0.1 * abs(plain), (calibrated, plain)


def test_a_save_scores_no_set_of_values_twice(tmp_path):
    """A save scores the same values more than once (a round's plan can come back to an earlier one; the data-free
    check scores the calibrated plan the rounds scored; a replan probes the same candidates): the user's score sees
    each distinct state_dict once (without the save's memo it saw some twice here)."""
    sd = _model()
    score, seen = _quartic_score(sd), []

    def counted(candidate):
        seen.append(b"".join(t.detach().contiguous().numpy().tobytes() for t in candidate.values()))
        return score(candidate)

    codec.save(sd, tmp_path / "cal.jwt", bits_per_weight=1.2, calibrate=counted)
    assert len(seen) >= 4 and len(set(seen)) == len(seen)


def _vectors_model() -> dict[str, torch.Tensor]:
    """A matrix beside twelve small vectors (the BatchNorm CNN's shape of problem: most probed tensors are vectors)."""
    torch.manual_seed(1)
    sd = {"a.weight": torch.cumsum(torch.randn(128, 128), dim=1) / 16, "b.weight": torch.randn(64, 128) * 0.05}
    sd.update({f"n{i}.weight": 1 + torch.randn(64) * 0.1 for i in range(12)})
    return sd


def _squares_score(sd):
    """Minus the sum of each tensor's NMSE, the vectors' weighed 1000x (higher is better)."""
    ref = {n: t.double() for n, t in sd.items()}

    def score(candidate):
        return -sum((1000 if n.startswith("n") else 1) * float(((candidate[n].double() - r) ** 2).sum() / (r ** 2).sum())
                    for n, r in ref.items())

    return score


def test_held_tensors_unprobed_bound_the_calls_and_the_check_finds_the_kept_plans_score(tmp_path, monkeypatch):
    """Twelve vectors whose only lossy setting is the 1 % probe's (8-bit significands), held there by the plan: with
    :data:`codec.rd.probe.HELD` the rounds probe only the two matrices (two calls each a round) and score each plan
    once, and the data-free check finds the calibrated plan's score in the memo: the user's score is called at most
    1 + 14 (the 1 % probes) + 2 x 2 x 2 + 3 + 1 times (main: 38, each vector's mirror image and the check's second
    call among them). Without the switch the vectors are probed as before, and the check still calls once."""
    import codec.encode
    import codec.rd.probe

    sd = _vectors_model()
    score, calls, checked = _squares_score(sd), [], []

    def counted(candidate):
        calls.append(1)
        return score(candidate)

    better = codec.encode._better_by_score

    def check(*args, **kwargs):
        before = len(calls)
        try:
            return better(*args, **kwargs)
        finally:
            checked.append(len(calls) - before)

    monkeypatch.setattr(codec.encode, "_better_by_score", check)
    counts = []
    for held in (True, False):
        monkeypatch.setattr(codec.rd.probe, "HELD", held)
        calls.clear()
        notes = codec.save(sd, tmp_path / "cal.jwt", bits_per_weight=2, calibrate=counted)
        assert any(n.startswith("calibrate: kept") for n in notes)
        counts.append(len(calls))
    got = codec.load(tmp_path / "cal.jwt")
    assert all(not torch.equal(got[f"n{i}.weight"], sd[f"n{i}.weight"]) for i in range(12))  # rounded: lossy
    rounds = codec.rd.probe.ROUNDS
    assert counts[0] <= 1 + 14 + 2 * 2 * rounds + (rounds + 1) + 1 < counts[1], counts
    assert max(checked) <= 1, checked  # at most the data-free plan's file: the calibrated plan's score is the memo's


def test_the_check_scores_the_file_as_written_rounded_vectors_included(tmp_path):
    """The data-free check's note gives each plan's score as the file holds it: a vector stored with rounded
    significands is scored rounded (before, the check put in only the lossy codecs' tensors and scored the vectors
    as given, a score the written file does not have)."""
    sd = _vectors_model()
    score = _squares_score(sd)
    notes = codec.save(sd, tmp_path / "cal.jwt", bits_per_weight=2, calibrate=score)
    (note,) = [n for n in notes if n.startswith("calibrate: kept the calibrated plan, scored ")]
    noted = float(re.match(r"calibrate: kept the calibrated plan, scored (\S+) ", note).group(1))
    assert noted == pytest.approx(score(codec.load(tmp_path / "cal.jwt")), rel=1e-5)


def test_the_score_path_keeps_the_replan_its_score_rates_highest_not_the_largest(tmp_path, monkeypatch):
    """A small model of many tensors has its plan's file measured and planned again when it lands under the budget
    (codec.encode's ``settle``). Here the first plan (every weight at 3 bits) lands far under -b 5 and the replan
    spends more bytes but codes the one weight the score cares about at 1 bit: by size (main's rule, the larger file
    within the budget) the replan was kept (and the data-free check, given the same two plans, could not undo it);
    in the score path the plan the user's score rates highest is kept. The data-free path still keeps the larger."""
    import codec.encode

    torch.manual_seed(0)
    sd = {}
    for i in range(40):
        sd[f"blocks.{i}.query.weight"] = torch.randn(64, 64) * 0.05
        sd[f"blocks.{i}.query.bias"] = torch.randn(64) * 0.01
    ref = {n: t.double() for n, t in sd.items()}

    def score(candidate):  # blocks.0's error weighed 1000x (higher is better)
        return -sum((1000 if n.startswith("blocks.0.") else 1) *
                    float(((candidate[n].double() - r) ** 2).sum() / (r ** 2).sum()) for n, r in ref.items())

    plans = []

    def fake_plan(arrays, aliases, base, *args, **kwargs):  # the first plan of a settle, then its replans
        first = kwargs["reserve"] >= 0 and not plans
        plans.append(first)
        weight = "b3" if first else "b4"
        return {n: parse_spec("lossless" if n.endswith("bias") else
                              "b1" if n == "blocks.0.query.weight" and not first else weight, base) for n in arrays}

    monkeypatch.setattr(codec.encode, "_plan", fake_plan)
    budget = int(5 * sum(t.numel() for t in sd.values()) / 8)
    codec.save(sd, tmp_path / "plain.jwt", bits_per_weight=5)
    assert len(plans) > 1  # planned again: the first plan's file was more than 1 % under the budget
    plans.clear()
    notes = codec.save(sd, tmp_path / "cal.jwt", bits_per_weight=5, calibrate=score)
    plain, calibrated = (codec.load(tmp_path / f"{n}.jwt") for n in ("plain", "cal"))
    assert os.path.getsize(tmp_path / "plain.jwt") > os.path.getsize(tmp_path / "cal.jwt")  # data-free: the larger
    assert os.path.getsize(tmp_path / "cal.jwt") <= budget
    assert score(calibrated) > score(plain) + 1, (score(calibrated), score(plain))
    assert any(n.startswith("calibrate: kept the calibrated plan") for n in notes), notes


def test_parse_spec_and_overrides_last_match_wins():
    """Settings parse into options and the last matching glob wins."""
    base = EncodeOptions()
    assert parse_spec("q30,table=jpeg,rows=28x28", base).row_shape == (28, 28)
    assert parse_spec("b5", base).codec == "quant" and parse_spec("jpegxl,d1.5", base).distance == 1.5
    rules = Overrides([("*.weight", "q10"), ("fc2.*", "lossless")])
    assert rules.options_for("fc2.weight", base).codec == "lossless"
    assert rules.options_for("fc1.weight", base).quality == 10
    assert rules.options_for("a.bias", base) is None
    with pytest.raises(codec.EncodeError, match="cannot read"):
        Overrides([("x", "q")]).check(base)


def test_cli_rate_options(tmp_path):
    """jwt encode -b and --set work from the command line; -b with --max-error is a usage error."""
    from jwt_cli.main import cli

    torch.save(_model(), tmp_path / "m.pt")
    runner = CliRunner()
    ok = runner.invoke(cli, ["encode", str(tmp_path / "m.pt"), "-b", "2", "--set", "head.*=lossless"])
    assert ok.exit_code == 0, ok.output
    both = runner.invoke(cli, ["encode", str(tmp_path / "m.pt"), "-b", "2", "--max-error", "0.1"])
    assert both.exit_code == 2
    bad = runner.invoke(cli, ["encode", str(tmp_path / "m.pt"), "--set", "x=zz"])
    assert bad.exit_code == 2 and "cannot read 'zz'" in bad.output


def test_budget_counts_attachments(tmp_path):
    """Attachment bytes come out of the budget: the whole file still lands at or under B."""
    sd = _model()
    noise = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()  # incompressible
    notes = codec.save(sd, tmp_path / "m.jwt", bits_per_weight=2.0, attachments={"tokenizer.bin": noise})
    weights = sum(t.numel() for t in sd.values())
    assert 8 * os.path.getsize(tmp_path / "m.jwt") <= 2.0 * weights
    with codec.open(tmp_path / "m.jwt") as f:
        assert f.get_attachment("tokenizer.bin") == noise
    # the user is told what the attachment costs the weights, in bits/weight of the budget
    said = [n for n in notes if isinstance(n, codec.Note) and "attachment" in n]
    assert len(said) == 1, notes
    got = re.search(r"takes ([\d,]+) bytes compressed, ([\d.]+) of the 2 bits/weight .*\(ask -b ([\d.]+) ", said[0])
    assert got, said[0]
    stored, share, ask = int(got[1].replace(",", "")), float(got[2]), float(got[3])
    assert 20000 <= stored <= 20100  # incompressible: its bytes plus zstd's framing
    assert share == pytest.approx(8 * stored / weights, abs=1e-3) and ask == pytest.approx(2 + share, abs=2e-3)
    # a few bytes of config are not worth a note
    small = codec.save(sd, tmp_path / "s.jwt", bits_per_weight=2.0, attachments={"config.json": b"{}"})
    assert not [n for n in small if "attachment" in n], small


def test_impossible_budget_is_refused_before_measuring_everything(tmp_path, monkeypatch):
    """A budget the first tensors already overflow fails at once: only the first tensor's menu is measured, the
    others at their cheapest settings only, and the message names the whole model's smallest encoding."""
    from codec.rd import allocate

    measured = {}
    real = allocate.measure
    monkeypatch.setattr(allocate, "measure", lambda name, *a, **k: measured.update(
        {name: measured.get(name, 0) + 1}) or real(name, *a, **k))
    sd = {f"w{i}": torch.randn(256, 256) for i in range(5)}
    menu = len(allocate.candidates(sd["w0"].numpy(), get_dtype("float32"), EncodeOptions()))
    floor = len(allocate.floor_settings(allocate.candidates(sd["w0"].numpy(), get_dtype("float32"), EncodeOptions())))
    with pytest.raises(codec.EncodeError, match=r"below the smallest encoding \((\d+\.\d+) bits/weight\)") as info:
        codec.save(sd, tmp_path / "m.jwt", bits_per_weight=0.01, search="exhaustive")
    assert measured == {"w0": menu + floor, **{f"w{i}": floor for i in range(1, 5)}}
    assert not (tmp_path / "m.jwt").exists()
    smallest = float(re.search(r"\((\d+\.\d+) bits", str(info.value)).group(1))
    for search in ("exhaustive", "fast"):  # the same figure from the fast search, and a budget there is met
        with pytest.raises(codec.EncodeError, match=re.escape(f"({smallest:.3f} bits/weight)")):
            codec.save(sd, tmp_path / "m.jwt", bits_per_weight=smallest * 0.8, search=search)
    codec.save(sd, tmp_path / "m.jwt", bits_per_weight=smallest + 0.002, search="exhaustive")
    assert 8 * (tmp_path / "m.jwt").stat().st_size / 5 / 256**2 <= smallest + 0.002


# -- rounded significands for the tensors only the lossless codec takes ------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_significand_bits_round_a_lossless_tensor_and_its_error_is_reported(dtype):
    """``significand_bits=b`` codes round_significand(values, b) with the lossless codec (the decoder is the
    lossless one); each element within 2**-(b+1) relative error, which a checked encode reports; fewer bytes."""
    from codec.dtypes import round_significand
    from codec.tensorcodec import decode_encoded, encode_tensor

    dt = get_dtype(dtype)
    values = torch.randn(512, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
    array = codec.api.to_numpy(values)[0]
    exact = encode_tensor(array, dt, EncodeOptions(codec="lossless"))
    rounded = encode_tensor(array, dt, EncodeOptions(codec="lossless", significand_bits=4))
    back = decode_encoded(rounded, dt, array.shape)
    assert np.array_equal(back, round_significand(array, dt, 4))
    x, y = (codec.dtypes.to_float64(a, dt) for a in (array, back))
    assert np.all(np.abs(y - x) <= 2.0 ** -5 * np.abs(x)) and not np.array_equal(x, y)
    assert sum(map(len, rounded.blobs)) < sum(map(len, exact.blobs))
    checked = codec.tensorcodec.start_encode(array, dt, EncodeOptions(codec="lossless", significand_bits=4),
                                             check=True).result()
    assert 0 < checked.rel_error <= 2.0 ** -5


def test_significand_bits_leave_what_they_cannot_round_exact():
    """Integers, values with NaN or infinity, and as many bits as the dtype has: coded exactly."""
    from codec.tensorcodec import decode_encoded, encode_tensor

    cases = [(np.arange(100, dtype=np.int32), "int32", 3),
             (np.array([1.0, np.nan, 2.5, np.inf] * 8, dtype=np.float32), "float32", 3),
             (np.linspace(-1, 1, 64, dtype=np.float32), "float32", 23),
             (np.linspace(-1, 1, 64, dtype=np.float16), "float16", 10)]
    for array, name, bits in cases:
        dt = get_dtype(name)
        encoded = encode_tensor(array, dt, EncodeOptions(codec="lossless", significand_bits=bits))
        assert encoded.blobs == encode_tensor(array, dt, EncodeOptions(codec="lossless")).blobs, name
        assert np.array_equal(decode_encoded(encoded, dt, array.shape), array, equal_nan=True)
    with pytest.raises(codec.EncodeError, match="significand bits 53 is not in 0..52"):
        EncodeOptions(codec="lossless", significand_bits=53)


def test_rate_search_rounds_biases_unless_told_to_keep_them_exact(tmp_path):
    """Under -b the search may store a bias with VECTOR_BITS significand bits (its menu's cheaper lossless point;
    the smallest encoding counts it): within 2**-(VECTOR_BITS+1), fewer bytes; a user's ``lossless`` override and a
    plain encode keep it exact."""
    from codec.rd.allocate import VECTOR_BITS, candidates, floor_settings

    sd = _model()
    menu = candidates(sd["a.bias"].numpy(), get_dtype("float32"), EncodeOptions())
    assert [label for label, _ in menu] == ["lossless", f"lossless s{VECTOR_BITS}"]
    assert [label for label, _ in floor_settings(menu)] == [f"lossless s{VECTOR_BITS}"]
    assert len(candidates(sd["a.bias"].numpy().astype(np.int64), get_dtype("int64"), EncodeOptions())) == 1
    codec.save(sd, tmp_path / "b.jwt", bits_per_weight=2)
    codec.save(sd, tmp_path / "e.jwt", bits_per_weight=2, overrides={"a.bias": "lossless"})
    codec.save(sd, tmp_path / "p.jwt")
    rounded, exact = codec.load(tmp_path / "b.jwt")["a.bias"], codec.load(tmp_path / "e.jwt")["a.bias"]
    assert torch.allclose(rounded, sd["a.bias"], rtol=2.0 ** -(VECTOR_BITS + 1), atol=0)
    assert not torch.equal(rounded, sd["a.bias"])
    assert torch.equal(exact, sd["a.bias"]) and torch.equal(codec.load(tmp_path / "p.jwt")["a.bias"],
                                                              sd["a.bias"])
    with codec.open(tmp_path / "b.jwt") as b, codec.open(tmp_path / "e.jwt") as e:
        assert b.reader.entries["a.bias"].stored_bytes < e.reader.entries["a.bias"].stored_bytes


@pytest.mark.parametrize("shape", [(0, 5), (64, 0), (0,)])
@pytest.mark.parametrize("target", [{"bits_per_weight": 4.0}, {"max_error": 0.05},
                                    {"bits_per_weight": 4.0, "search": "exhaustive"}])
def test_an_empty_tensor_beside_the_weights_does_not_break_the_search(shape, target):
    """A user's state_dict with an empty tensor (a pruned-index buffer, a placeholder parameter): the search and
    the refusal of a budget too small handle it (they raised numpy's "cannot reshape array of size 0" or a
    ZeroDivisionError); it round-trips with its shape and dtype, and the budget holds."""
    import io

    import codec

    sd = {"w": torch.randn(128, 128, generator=torch.Generator().manual_seed(0)), "e": torch.zeros(shape),
          "idx": torch.zeros(0, dtype=torch.long)}
    buf = io.BytesIO()
    codec.save(sd, buf, **target)
    out = codec.load(io.BytesIO(buf.getvalue()))
    assert tuple(out["e"].shape) == shape and out["e"].dtype == torch.float32
    assert tuple(out["idx"].shape) == (0,) and out["idx"].dtype == torch.long
    assert torch.norm(out["w"] - sd["w"]) / torch.norm(sd["w"]) < 0.2
    if "bits_per_weight" in target:
        assert 8 * len(buf.getvalue()) / 128 ** 2 <= target["bits_per_weight"]
        with pytest.raises(codec.EncodeError, match="below the smallest encoding"):
            codec.save(sd, io.BytesIO(), bits_per_weight=0.05)


def test_the_refusals_figure_is_the_smallest_encodings_file():
    """A budget below the smallest encoding is refused with that smallest's figure N, the index counted as it will
    be written (compressed; main counted each entry as JSON less a lean 80 % of the compression, and N was 11 %
    above the file the cheapest settings give on this model of 18 small tensors: 3.032 against 2.7225). N is within
    2 % of that file, a save at N writes a file within N, and one 2 % below N is refused."""
    from codec.api import tensor_arrays
    from codec.encode import _planned_size, _tensor_source, encoder_versions
    from codec.rd.allocate import floor_encodings

    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(64, 64), torch.nn.GELU()]
    sd = torch.nn.Sequential(*layers, torch.nn.Linear(64, 10)).state_dict()
    weights = sum(t.numel() for t in sd.values())
    with pytest.raises(codec.EncodeError, match="below the smallest encoding") as info:
        codec.save(sd, io.BytesIO(), bits_per_weight=0.01)
    n = float(re.search(r"\(([\d.]+) bits/weight\)", str(info.value)).group(1))
    arrays, aliases, *_ = tensor_arrays(sd)
    floor = {name: e for name, _, _, e in floor_encodings(_tensor_source(arrays, list(arrays)), EncodeOptions(),
                                                          lambda name: None)}
    smallest = _planned_size(arrays, aliases, None, {}, encoder_versions(), {"compress": True}, None, {}, 1,
                             done=floor)
    assert 8 * smallest / weights <= n <= 1.02 * 8 * smallest / weights
    out = io.BytesIO()
    assert not [m for m in codec.save(sd, out, bits_per_weight=n) if "avoids it" in str(m)]
    assert len(out.getvalue()) <= int(n * weights / 8)
    with pytest.raises(codec.EncodeError, match="below the smallest encoding"):
        codec.save(sd, io.BytesIO(), bits_per_weight=0.98 * n)


def test_a_calibrated_save_gets_a_file_at_the_refusals_figure():
    """With calibration, the refusal before any work (the index counted as written) names N, and a save at a budget
    a little above N writes a file: the repaired save's plan, which counts the index by the lean estimate to leave
    repair a spare, counts it as written where the budget is too small for that (before: refused after calibrating,
    with a larger figure, 3.042 against 2.771 on this model)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(64, 64), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 10))
    data = torch.randn(128, 64).split(64)
    weights = sum(t.numel() for t in model.state_dict().values())
    with pytest.raises(codec.EncodeError, match="below the smallest encoding") as info:
        codec.save(model, io.BytesIO(), bits_per_weight=0.01, calibration=data)
    n = float(re.search(r"\(([\d.]+) bits/weight\)", str(info.value)).group(1))
    out = io.BytesIO()
    codec.save(model, out, bits_per_weight=1.01 * n, calibration=data)
    assert len(out.getvalue()) <= int(1.01 * n * weights / 8)


def test_a_small_model_of_many_tensors_spends_its_budget(monkeypatch):
    """A small model of many tiled tensors: its index is a fair share of the file. The plan counted each entry as
    JSON and the index's compression by a lean estimate, and the first plan came out 5-9 % under the budget (a
    140,000-weight ViT of 72 tensors at -b 3: 2.654 bits/weight, 8 tensors left damaged), planned again with what
    was left. The index is now counted as the smallest encoding writes it (compressed): the first plan alone is
    within 1 % of the budget, never over (main: 0.95 of it), and the second plans keep it there."""
    import codec.encode as encode

    torch.manual_seed(0)
    sd = {}
    for i in range(40):
        sd[f"blocks.{i}.query.weight"] = torch.randn(64, 64) * 0.05
        sd[f"blocks.{i}.query.bias"] = torch.randn(64) * 0.01
    budget = int(4.0 * sum(t.numel() for t in sd.values()) / 8)
    for replans in (0, encode.REPLANS):
        monkeypatch.setattr(encode, "REPLANS", replans)
        out = io.BytesIO()
        codec.save(sd, out, bits_per_weight=4.0)
        assert 0.99 * budget <= out.getbuffer().nbytes <= budget, replans


def test_a_pruned_layers_mask_is_coded_exactly_and_the_weights_decode_pruned(tmp_path):
    """torch.nn.utils.prune stores ``weight_mask`` (0/1, float32) beside ``weight_orig``: a budgeted save codes the
    mask with 1-bit quant, whose tiles map 0 and 1 exactly, and repair does not step it up a bit. On the 2-bit floor
    of the ordinary menu its ones came back as 1.0020 (scale 1/3 rounded up to bfloat16), so every kept weight was
    scaled by the codec."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(196, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    prune.l1_unstructured(net[0], "weight", amount=0.6)
    state = net.state_dict()
    x = torch.randn(256, 196)
    for bits, model, calibration in ((1.5, state, None), (3.0, state, None), (1.5, net, [x[:128], x[128:]])):
        path = tmp_path / f"pruned{bits}{calibration is None}.jwt"
        codec.save(model, path, bits_per_weight=bits, calibration=calibration)  # calibrated: repair steps no bit up
        back = codec.load(path)
        assert torch.equal(back["0.weight_mask"], state["0.weight_mask"]), bits
        with codec.Reader(path) as reader:
            assert reader.entry("0.weight_mask").codec.get_config()["bits"] == 1
