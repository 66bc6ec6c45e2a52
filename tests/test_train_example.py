"""examples/train_compressible.py as a user runs it: help, and usage errors before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / ".pp"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(REPO / "examples" / "train_compressible.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def test_example_help_explains_the_options():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--cnn", "--quality", "--codec-epochs", "--lam", "--dct", "overrides=setting"):
        assert option in result.stdout, option


def test_example_help_gives_its_own_defaults():
    """The option list is bench/train.py's, whose defaults the example replaces (--help said --out defaults to
    bench/results/train_<model>, --table to flat, --lam to 1 and 4): the help names the example's own, for the model
    asked about."""
    mlp, cnn = _run("--help").stdout, _run("--cnn", "--help").stdout
    for text, model in ((mlp, "mlp"), (cnn, "cnn")):
        said = " ".join(text.split("This example's defaults (")[1].split(". The table")[0].split())
        assert said.startswith(f"{model}; ")
        for option in ("--lam 0", "--calibration 0", "--bits 0.4", f"--out train_compressible_{model}",
                       "--refresh 4", "--vector-bits 4", f"--table {'ramp1' if model == 'mlp' else 'flat'}"):
            assert option in said, (model, option)
    assert "--decay last" in " ".join(mlp.split()) and "--group 0.1" in " ".join(cnn.split())


def test_example_usage_errors_exit_2_before_training():
    for args in (["--codec-epochs", "3", "--epochs", "2"], ["--rate-setting", "jpegz"], ["--model", "resnet"],
                 ["--quality", "0"]):
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_compressible", REPO / "examples" / "train_compressible.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(monkeypatch, *runs: list[str]) -> list[list[str]]:
    """The argument lists the example hands bench.train for each of ``runs`` (the example's own arguments)."""
    module = _example_module()
    seen = []
    monkeypatch.setattr(module.train, "main", lambda argv, **kw: seen.append(argv))
    for args in runs:
        module.main(args)
    return seen


def _values(argv: list[str], option: str) -> list[str]:
    """Every value ``argv`` gives ``option`` (``--option value`` or ``--option=value``)."""
    return [a.split("=", 1)[1] if a.startswith(option + "=") else argv[i + 1]
            for i, a in enumerate(argv) if a.split("=")[0] == option]


def test_example_defaults_yield_to_the_users_options(monkeypatch):
    """The example's defaults (coded every 4th step, biases rounded to 4 bits) apply unless the user gives the
    option: a given --refresh replaces the default rather than adding a second run."""
    module = _example_module()
    seen = []
    monkeypatch.setattr(module.train, "main", lambda argv, **kw: seen.append(argv))
    module.main(["--refresh", "1", "--cnn"])
    module.main(["--vector-bits=2"])
    first, second = seen
    assert first.count("--refresh") == 1 and first[first.index("--refresh") + 1] == "1"
    assert first[first.index("--vector-bits") + 1] == "4" and "train_compressible_cnn" in first
    assert "--vector-bits" not in second and "--vector-bits=2" in second
    assert second[second.index("--refresh") + 1] == "4"


def test_example_runs_the_mlps_whole_schedule_in_the_loop_unless_told(monkeypatch):
    module = _example_module()
    seen = []
    monkeypatch.setattr(module.train, "main", lambda argv, **kw: seen.append(argv))
    for args in ([], ["--epochs", "3"], ["--epochs=1"], ["--codec-epochs", "1"], ["--cnn"]):
        module.main(args)
    value = [argv[argv.index("--codec-epochs") + 1] if "--codec-epochs" in argv else None for argv in seen]
    assert value == ["2", "3", "1", "1", None]  # the CNN keeps bench.train's default (1): 2 measured worse
    assert seen[3].count("--codec-epochs") == 1
    decay = [(argv[argv.index("--decay") + 1], argv[argv.index("--decay-epochs") + 1]) if "--decay" in argv else None
             for argv in seen]
    assert decay == [("last", "1")] * 4 + [None]  # the MLP's endpoint decayed over its last epoch; the CNN: constant
    assert [argv[argv.index("--group") + 1] if "--group" in argv else None for argv in seen[:5]] == [None] * 4 + ["0.1"]
    module.main(["--decay", "none"])
    assert seen[-1].count("--decay") == 1 and seen[-1][seen[-1].index("--decay") + 1] == "none"


def test_example_budget_loops_train_with_label_smoothing_unless_told(monkeypatch):
    """With --budget the loop's cross-entropy has label smoothing 0.1 (measured better at the same file size on
    both models, bench/JOURNAL.md, twenty-fifth pass); without a budget nothing changes; the user's value wins."""
    module = _example_module()
    seen = []
    monkeypatch.setattr(module.train, "main", lambda argv, **kw: seen.append(argv))
    for args in (["--budget", "0.2"], ["--cnn", "--budget=0.3"], [], ["--cnn"], ["--budget", "0.2",
                                                                                "--label-smoothing", "0"]):
        module.main(args)
    smoothing = [argv[argv.index("--label-smoothing") + 1] if "--label-smoothing" in argv else None for argv in seen]
    assert smoothing == ["0.1", "0.1", None, None, "0"]
    assert seen[-1].count("--label-smoothing") == 1


def test_example_mlp_budget_loops_hold_quiet_inputs_at_zero_unless_told(monkeypatch):
    """With --budget the MLP's loop holds fc1's columns of pixels nonzero in under 10 % of the images at zero (8 of 8
    seeds better at budget 0.2, bench/JOURNAL.md, twenty-seventh pass); not without a budget, not on the CNN (not
    measured better there); the user's value wins."""
    module = _example_module()
    seen = []
    monkeypatch.setattr(module.train, "main", lambda argv, **kw: seen.append(argv))
    for args in (["--budget", "0.2"], ["--budget=0.2", "--inputs-below", "0"], [], ["--cnn", "--budget", "0.3"]):
        module.main(args)
    below = [argv[argv.index("--inputs-below") + 1] if "--inputs-below" in argv else None for argv in seen]
    assert below == ["0.1", "0", None, None]
    assert seen[1].count("--inputs-below") == 1


def test_example_mlp_budget_loops_clip_fc1s_tiles_at_4_deviations_unless_told(monkeypatch):
    """With --budget the MLP's loop clips fc1's tiles at mean +- 4 standard deviations (12 of 16 seeds better at
    budget 0.2, bench/JOURNAL.md, thirtieth pass); not without a budget, not on the CNN (not better there); the
    user's value wins."""
    seen = _runs(monkeypatch, ["--budget", "0.2"], ["--budget=0.2", "--tile-clip=0"], [], ["--cnn", "--budget", "0.3"])
    assert [_values(argv, "--tile-clip") for argv in seen] == [["4"], ["0"], [], []]


def test_example_cnn_codes_fc1_with_the_flat_table_the_mlp_with_ramp1_unless_told(monkeypatch):
    """The CNN's fc1 with the flat table (ramp1 lost 0.16 points more at budget 0.3 on 3 seeds, each worse:
    bench/JOURNAL.md, twenty-ninth pass), the MLP's with ramp1 (its best); the user's --table wins."""
    seen = _runs(monkeypatch, ["--cnn", "--budget", "0.3"], ["--cnn"], ["--budget", "0.2"], ["--cnn", "--table=ramp1"])
    assert [_values(argv, "--table") for argv in seen] == [["flat"], ["flat"], ["ramp1"], ["ramp1"]]


def test_example_mlp_budget_loops_reorder_fc1s_units_early_unless_told(monkeypatch):
    """With --budget the MLP's loop reorders fc1's units once, at 0.1 of the loop (bench/JOURNAL.md,
    thirty-first pass); not without a budget, not on the CNN; the user's value wins."""
    seen = _runs(monkeypatch, ["--budget", "0.2"], ["--budget=0.2", "--order-units=0"], [],
                 ["--cnn", "--budget", "0.3"])
    assert [_values(argv, "--order-units") for argv in seen] == [["0.1"], ["0"], [], []]
