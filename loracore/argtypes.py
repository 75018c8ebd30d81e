"""Argument types for the command line (``argparse``'s ``type=``): one rule for every command.

>>> positive_int("3"), positive_float("1e-3")
(3, 0.001)

``positive_int`` takes whole numbers >= 1; ``positive_float`` finite numbers > 0, so ``nan``,
``inf`` and ``-1`` are refused with a message that says what was expected (argparse prints it
after the option's name and exits with status 2). ``lab_number_or_none`` reads a lab's name the
one way both ``loracore grade LAB`` and ``loracore.hint(LAB, ...)`` accept it. Nothing here imports torch: ``loracore
grade`` starts without it.
"""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["positive_int", "positive_float", "lab_number_or_none"]


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


def lab_number_or_none(lab: str) -> str | None:
    """``"lab01"``, ``"01"``, ``"1"``, ``"lab01_lora_layer"`` or its ``.ipynb`` -> ``"01"``;
    ``None`` for anything that names no lab (each caller words its own refusal)."""
    m = re.fullmatch(r"(?:lab)?0*(\d{1,2})(?:_\w*)?(?:\.ipynb)?", str(lab).strip().lower())
    return f"{int(m.group(1)):02d}" if m else None
