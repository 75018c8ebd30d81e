"""Argument types for the command line (``argparse``'s ``type=``): one rule for every command.

>>> positive_int("3"), positive_float("1e-3")
(3, 0.001)

``positive_int`` takes whole numbers >= 1; ``positive_float`` finite numbers > 0, so ``nan``,
``inf`` and ``-1`` are refused with a message that says what was expected (argparse prints it
after the option's name and exits with status 2). Nothing here imports torch: ``loracore
grade`` starts without it.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "positive_float"]


def positive_int(text: str) -> int:
    """``text`` as an int >= 1; else ``argparse.ArgumentTypeError`` (``"2.5"``, ``"0"``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """``text`` as a finite float > 0; else ``argparse.ArgumentTypeError`` (``"nan"``,
    ``"inf"``, ``"0"``, ``"-1"``, ``"fast"``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):  # NaN fails every comparison: test finiteness
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value
