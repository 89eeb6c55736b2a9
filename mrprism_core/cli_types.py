"""argparse types for the command lines' numbers: a bad value ends in argparse's one-line
``error: argument --cases: must be >= 1, got 0`` (exit 2) before anything runs, instead of
an error from deep inside torch, or an empty result."""

from __future__ import annotations

import argparse

__all__ = ["positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """A whole number >= 1 (cases, epochs, seeds, rounds, sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (learning rates, epsilons)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value
