"""Grading throughput: `loracore grade --jobs 2` against `--jobs 1` on the same batch.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_grade.py [--copies 20] [--repeats 1]

The batch is ``--copies`` copies of lab 01 solved (the solution notebook, outputs cleared),
each graded in full: its own sandboxed kernel, the short mode, the offline model loaded, the
five checks and the short training run. Both settings grade the same files, in turn within
each round (``loracore.bench.interleaved_medians``), so a busy machine slows both alike.
With ``--jobs N`` each kernel gets ``cores // N`` torch threads, so on 2 cores the two
settings use the same two cores: the gain is what running notebooks side by side buys
(kernel start, model load and Python overheads run in parallel), the goal being close to 2x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat

from loracore.bench import interleaved_medians, write_result
from loracore.grade import grade

ROOT = Path(__file__).resolve().parent.parent


def make_batch(folder: Path, copies: int) -> list[Path]:
    """``copies`` solved lab 01 notebooks in ``folder``."""
    nb = nbformat.read(ROOT / "solutions" / "lab01_lora_layer.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    paths = []
    for i in range(copies):
        path = folder / f"learner{i:02d}.ipynb"
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-grade-") as tmp:
        paths = make_batch(Path(tmp), args.copies)
        seen: dict[int, list] = {}

        def run(jobs: int):
            def go() -> None:
                _, results = grade("lab01", paths, jobs=jobs)
                bad = [r for r in results if r.total() != 10 or r.status != "ok"]
                if bad:  # a benchmark of failing runs would measure the wrong thing
                    raise RuntimeError(f"--jobs {jobs}: {bad[0].submission} got "
                                       f"{bad[0].total()} ({bad[0].status}: {bad[0].reason})")
                seen[jobs] = results
            return go

        times = interleaved_medians({"jobs 2": run(2), "jobs 1": run(1)}, repeats=args.repeats,
                                    warmup=0)
    n = args.copies
    per_submission = {j: sorted(r.seconds for r in seen[j])[n // 2] for j in (1, 2)}
    write_result("grade", [
        {"what": f"wall time, grading {n} copies of lab 01 (solved, short mode)",
         "loracore": times["jobs 2"], "reference": times["jobs 1"],
         "reference_name": "loracore grade --jobs 1", "unit": "s",
         "ratio": times["jobs 2"] / times["jobs 1"], "target": "about 0.5 on 2 cores (reported)"},
        {"what": "wall seconds per submission (batch time / copies)",
         "loracore": times["jobs 2"] / n, "reference": times["jobs 1"] / n,
         "reference_name": "loracore grade --jobs 1", "unit": "s",
         "ratio": times["jobs 2"] / times["jobs 1"], "target": "reported"},
    ], notes=(f"{n} copies, {args.repeats} round(s), {os.cpu_count()} cores; --jobs N gives each "
              f"kernel cores // N torch threads. Median time one submission takes from start to "
              f"verdict: {per_submission[2]:.1f} s with --jobs 2, {per_submission[1]:.1f} s with "
              f"--jobs 1. Total {time.perf_counter() - start:.0f} s."))


if __name__ == "__main__":
    main()
