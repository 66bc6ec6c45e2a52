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


def test_example_usage_errors_exit_2_before_training():
    for args in (["--codec-epochs", "3", "--epochs", "2"], ["--rate-setting", "jpegz"], ["--model", "resnet"],
                 ["--quality", "0"]):
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
