"""Per-notebook wall time from pytest's ``--durations=0`` report of an nbval run.

    python tools/notebook_times.py smollm2.log qwen2.log [--names smollm2-135m qwen2-stand-in]

Each log is the output of ``pytest --nbval-lax --durations=0 ... lessons labs solutions``; the
seconds of every cell's setup, call and teardown are summed per notebook (the kernel's start is
in the first cell's setup). Prints one Markdown table, a column per log, and the totals.
With ``--durations-json tools/test_durations.json`` it also stores every file's seconds (test files
included) from the first log: ``conftest.py`` hands pytest-xdist the longest files first.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([\d.]+)s\s+(setup|call|teardown)\s+(\S+\.(?:ipynb|py))::")


def file_seconds(log: str) -> dict[str, float]:
    """``{"lessons/04_training.ipynb": 312.4, "tests/test_grade.py": 332.3, ...}``: seconds per
    file (notebook or test file) from one pytest log's durations report."""
    out: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        m = LINE.match(line)
        if m:
            out[m.group(3)] += float(m.group(1))
    return dict(out)


def notebook_seconds(log: str) -> dict[str, float]:
    """``{"lessons/04_training.ipynb": 312.4, ...}``: the notebooks of :func:`file_seconds`."""
    return {f: s for f, s in file_seconds(log).items() if f.endswith(".ipynb")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--names", nargs="*", help="column names (default: the log file names)")
    p.add_argument("--durations-json", type=Path, metavar="OUT",
                   help="also write the first log's seconds per file (tests and notebooks) to OUT, "
                        "the order conftest.py gives pytest-xdist (tools/test_durations.json)")
    args = p.parse_args(argv)
    names = args.names or [log.stem for log in args.logs]
    if len(names) != len(args.logs):
        p.error(f"{len(args.logs)} logs but {len(names)} names")
    columns = [notebook_seconds(log.read_text(errors="replace")) for log in args.logs]
    if not any(columns):
        p.error("no notebook durations found: run pytest with --durations=0")
    if args.durations_json:
        seconds = file_seconds(args.logs[0].read_text(errors="replace"))
        args.durations_json.write_text(json.dumps(
            {f: round(s, 1) for f, s in sorted(seconds.items(), key=lambda kv: -kv[1])}, indent=1) + "\n")
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
