"""Per-notebook wall time from pytest's ``--durations=0`` report of an nbval run.

    python tools/notebook_times.py smollm2.log qwen2.log [--names smollm2-135m qwen2-stand-in]

Each log is the output of ``pytest --nbval-lax --durations=0 ... lessons labs solutions``; the
seconds of every cell's setup, call and teardown are summed per notebook (the kernel's start is
in the first cell's setup). Prints one Markdown table, a column per log, and the totals.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s\s+(setup|call|teardown)\s+(\S+\.ipynb)::")


def notebook_seconds(log: str) -> dict[str, float]:
    """``{"lessons/04_training.ipynb": 312.4, ...}`` from one pytest log's durations report."""
    out: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        m = LINE.match(line)
        if m:
            out[m.group(3)] += float(m.group(1))
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--names", nargs="*", help="column names (default: the log file names)")
    args = p.parse_args(argv)
    names = args.names or [log.stem for log in args.logs]
    if len(names) != len(args.logs):
        p.error(f"{len(args.logs)} logs but {len(names)} names")
    columns = [notebook_seconds(log.read_text(errors="replace")) for log in args.logs]
    if not any(columns):
        p.error("no notebook durations found: run pytest with --durations=0")
    notebooks = sorted(set().union(*columns))
    print("| notebook | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for nb in notebooks:
        cells = [f"{c[nb] / 60:.1f} min" if nb in c else "–" for c in columns]
        print(f"| `{nb}` | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(f"**{sum(c.values()) / 60:.1f} min**" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
