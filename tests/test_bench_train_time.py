"""bench.train_time: the MLP budget loop's CPU time over the plain schedule's, with and without the quiet-input mask
(issue 10's <= 1.5x bound), one process's figures (tiny: 512 training images)."""

from __future__ import annotations

import warnings

import pytest

from bench import train_time


def test_a_child_process_prints_each_loops_ratio_to_the_same_plain_schedule(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a budget far below the tiny model's file: the damage warning
        train_time.main(["--child", "--train-size", "512", "--below", "0.1", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plain ") and [line.split(":")[0] for line in lines[1:]] == ["below 0.1", "below 0"]
    plain = float(lines[0].split()[1])
    for line in lines[1:]:
        seconds, ratio = float(line.split()[2]), float(line.split("ratio ")[1].split(",")[0])
        assert ratio == pytest.approx(seconds / plain, rel=0.02)  # (printed to the millisecond) and ratio > 0


def test_a_child_runs_each_mask_with_each_tile_clip_or_the_order_it_is_given(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_time.main(["--child", "--train-size", "256", "--below", "0.1", "--tile-clip", "4", "0"])
        train_time.main(["--child", "--train-size", "256", "--order", "0/0/0", "0.1/4/0"])
        train_time.main(["--child", "--train-size", "256", "--below", "0.1", "--tile-clip", "4", "--order-units",
                         "0.25,0.5", "0"])
        train_time.main(["--child", "--train-size", "256", "--order", "0.1/4/0.5"])
    lines = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith("plain")]
    assert lines == ["below 0.1 clip 4", "below 0.1", "below 0", "below 0.1 clip 4", "below 0.1 clip 4 order 0.25,0.5",
                     "below 0.1 clip 4", "below 0.1 clip 4 order 0.5"]
    assert train_time.loops([0.1, 0], [4]) == [("below 0.1 clip 4", 0.1, 4, ()), ("below 0 clip 4", 0, 4, ())]
    assert train_time.loops([0.1], [4], [(), (0.1, 0.2)])[1] == ("below 0.1 clip 4 order 0.1,0.2", 0.1, 4, (0.1, 0.2))


@pytest.mark.parametrize("argv", [["--below", "1.5"], ["--pairs", "0"], ["--train-size", "10"],
                                  ["--quality", "0"], ["--tile-clip", "-1"], ["--child", "--order", "0.1"],
                                  ["--order-units", "1.5"], ["--child", "--order", "0.1/4/x"]])
def test_bad_arguments_are_refused_before_training(argv, capsys):
    with pytest.raises(SystemExit):
        train_time.main(argv)
    assert "error" in capsys.readouterr().err
