"""The instructor's outputs: gradebook.csv, a Markdown summary with a bar chart, feedback files.

Rows are sorted by submission path and hold no timings, so the same submissions give the
same files whatever ``--jobs`` was.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from loracore.grade.labs import Lab
from loracore.grade.verdicts import Result


def _fmt(points: float) -> str:
    return f"{points:g}"


def write_csv(path: Path, lab: Lab, results: list[Result]) -> None:
    """One row per submission: path, points per exercise, total, maximum, status, reason."""
    names = [e.name for e in lab.exercises]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", *names, "total", "maximum", "status", "reason"])
        for r in results:
            writer.writerow([r.submission, *(_fmt(r.points.get(n, 0.0)) for n in names),
                             _fmt(r.total()), _fmt(lab.max_points), r.status, r.reason])


def pass_rates(lab: Lab, results: list[Result]) -> dict[str, float]:
    """The share of submissions that earned each exercise's points (0 when there are none)."""
    n = len(results)
    return {e.name: (sum(r.points.get(e.name, 0) > 0 for r in results) / n if n else 0.0)
            for e in lab.exercises}


def write_chart(path: Path, lab: Lab, results: list[Result]) -> None:
    """A bar chart of the class's pass rate per exercise (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = pass_rates(lab, results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(list(rates), [100 * v for v in rates.values()], color="tab:blue")
    ax.bar_label(bars, labels=[f"{100 * v:.0f}%" for v in rates.values()])
    ax.set_ylim(0, 110)
    ax.set_ylabel("submissions that passed (%)")
    ax.set_xlabel("exercise")
    ax.set_title(f"lab {lab.number}: pass rate per exercise ({len(results)} submissions)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_markdown(lab: Lab, results: list[Result], chart: str | None) -> str:
    """The class at a glance: statuses, pass rate and points per exercise, mean total."""
    n = len(results)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    rates = pass_rates(lab, results)
    mean = sum(r.total() for r in results) / n if n else 0.0
    lines = [f"# Lab {lab.number} gradebook ({lab.path.name})", "",
             f"{n} submission(s); mean total {mean:.1f} of {_fmt(lab.max_points)}; "
             + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) + ".", "",
             "| exercise | points | passed | pass rate |", "|---|---:|---:|---:|"]
    for e in lab.exercises:
        passed = sum(r.points.get(e.name, 0) > 0 for r in results)
        lines.append(f"| {e.name} | {_fmt(e.points)} | {passed} of {n} | {100 * rates[e.name]:.0f}% |")
    if chart:
        lines += ["", f"![pass rate per exercise]({chart})"]
    problems = [r for r in results if r.status != "ok"]
    if problems:
        lines += ["", "## Not graded to the end", "", "| submission | status | reason |", "|---|---|---|"]
        lines += [f"| {r.submission} | {r.status} | {r.reason} |" for r in problems]
    return "\n".join(lines) + "\n"


def feedback_name(submission: str) -> str:
    """A file name for a learner's feedback: the submission's path, flattened.

    >>> feedback_name("class/alice/lab01.ipynb")
    'class_alice_lab01.md'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", submission.removesuffix(".ipynb")).strip("_.") + ".md"


def feedback_markdown(lab: Lab, result: Result) -> str:
    """What the learner would have seen: each failed check with its message and hint."""
    lines = [f"# Lab {lab.number} feedback: {Path(result.submission).name}", "",
             f"**{_fmt(result.total())} of {_fmt(lab.max_points)} points** (status: {result.status})"]
    if result.reason:
        lines += ["", f"Note: {result.reason}."]
    if result.status in ("invalid notebook", "unreadable") or result.status.startswith("not a lab"):
        return "\n".join(lines) + "\n"
    for e in lab.exercises:
        v = result.verdicts.get(e.name)
        earned = result.points.get(e.name, 0.0)
        mark = "passed" if v is not None and v.passed else "not passed"
        lines += ["", f"## {e.name}: {_fmt(earned)} of {_fmt(e.points)} ({mark})"]
        if v is None or v.passed:
            continue
        for check in v.failed:
            if check.get("hidden"):  # what a hidden check expects stays with the instructor
                lines += ["", f"- FAIL (hidden) {check.get('name', '')}"]
                continue
            lines += ["", f"- FAIL {check.get('name', '')}",
                      f"  - expected: {check.get('expected', '')}",
                      f"  - got: {check.get('got', '')}"]
            if check.get("hint"):
                lines.append(f"  - hint: {check['hint']}")
        if v.error:
            lines += ["", f"- {v.error}"]
    if result.errors:
        lines += ["", "## Other cells that raised an error", ""]
        lines += [f"- {e}" for e in result.errors]
    return "\n".join(lines) + "\n"


def write_feedback(folder: Path, lab: Lab, results: list[Result]) -> list[Path]:
    """One Markdown file per submission in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written, seen = [], set()
    for r in results:
        name = feedback_name(r.submission)
        while name in seen:  # two paths that flatten to the same name
            name = name.removesuffix(".md") + "_.md"
        seen.add(name)
        path = folder / name
        path.write_text(feedback_markdown(lab, r), encoding="utf-8")
        written.append(path)
    return written
