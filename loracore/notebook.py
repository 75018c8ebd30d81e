"""Small helpers every notebook uses: the short mode, seeding, timing."""

from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from typing import Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")

#: True when the short mode is on (``LORACORE_FAST=1``; ``make test`` sets it).
#: Notebooks shrink step counts and data sizes with it, never the code path.
FAST: bool = os.environ.get("LORACORE_FAST", "").strip().lower() in {"1", "true", "yes", "on"}


def fast_or_full(fast: T, full: T) -> T:
    """Return ``fast`` in the short mode and ``full`` otherwise.

    >>> num_steps = fast_or_full(fast=5, full=90)
    """
    return fast if FAST else full


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so a run can be repeated."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed_everything: seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextmanager
def timer(label: str | None = None) -> Iterator[dict[str, float]]:
    """Time a block: ``with timer("merge") as t: ...`` then ``t["seconds"]``.

    Prints ``label: 1.23 s`` at the end when a label is given.
    """
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
        if label is not None:
            print(f"{label}: {result['seconds']:.2f} s")
