"""Benchmark helpers: medians of repeated timings and one JSON result per benchmark.

Every script in ``benchmarks/`` measures loracore and its reference in the same run and
calls :func:`write_result`; ``make bench`` collects the JSON files into ``RESULTS.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def median_time(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1, got {repeats}")
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int = 7,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn within every round.

    Interleaving puts loracore and its reference under the same load at the same moments,
    so a busy machine slows both alike and their ratio stays meaningful. The order turns
    around every round (a, b, b, a, a, b ...), so neither side always runs first: whatever
    the previous call leaves behind (warm caches, memory to free) falls on both alike.
    """
    if repeats < 1:
        raise ValueError(f"interleaved_medians: repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for round_ in range(repeats):
        for name, fn in (order if round_ % 2 == 0 else order[::-1]):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # time the work, not just its launch
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    """A one-line description of the machine a benchmark ran on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def write_result(name: str, rows: list[dict[str, Any]], *, notes: str = "") -> Path:
    """Write ``benchmarks/results/<name>.json``.

    Each row: ``{"what": str, "loracore": float, "reference": float, "reference_name": str,
    "unit": str, "ratio": float, "target": str}`` (``ratio`` = loracore / reference).
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"name": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
               "rows": rows, "notes": notes}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    for r in rows:
        print(f"{r['what']}: loracore {r['loracore']:.4g} {r['unit']}, "
              f"{r['reference_name']} {r['reference']:.4g} {r['unit']}, ratio {r['ratio']:.3f} "
              f"(target {r.get('target', '-')})")
    return path
