"""The command lines' number types: a bad count or rate is argparse's one-line error."""

from __future__ import annotations

import argparse

import pytest

from mrprism_core.cli_types import positive_float, positive_int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--lr", type=positive_float, default=None)
    return parser


def test_good_values_pass_through():
    args = _parser().parse_args(["--seeds", "2", "--lr", "1e-3"])
    assert (args.seeds, args.lr) == (2, 1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
        (["--seeds", "2.5"], "argument --seeds: expected a whole number, got '2.5'"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0.0"),
        (["--lr", "nan"], "argument --lr: must be > 0, got nan"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    ],
)
def test_a_bad_number_is_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _parser().parse_args(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"tool: error: {message}")
