"""The ``loracore`` command: one subcommand per task (``grade``, ``finetune``, ``export``).

A subcommand is a module-level ``add_NAME(subparsers)`` that declares its arguments and sets
``func``, the function that runs it and returns the exit status; :data:`SUBCOMMANDS` lists
them. A new one (``finetune``, ``serve``) is one more such function and one more entry.

    loracore grade lab01 submissions/ --out gradebook.csv --feedback feedback/ --jobs 2
    loracore grade lab01 submissions/ --hidden hidden/lab01.py --roster roster.csv \
        --canvas canvas.csv --assignment "Lab 01 (123456)" --gradescope gradescope.csv
    loracore finetune --model smollm2-135m --data train.jsonl --out runs/x --steps 90
    loracore export merged runs/x --out merged/x
    loracore export gguf runs/x --out x.gguf --base-gguf base.gguf --write-base smollm2-135m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from loracore.argtypes import positive_float, positive_int


def add_grade(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "grade", help="grade learners' lab notebooks in bulk",
        description="Grade learners' lab notebooks: the checks and every cell a learner may not "
                    "change are restored from the course's copy of the lab, each notebook runs in "
                    "its own sandboxed kernel in the short mode, and points come from the checks' "
                    "own verdicts. Writes a gradebook (CSV), a summary (Markdown + PNG chart) and, "
                    "with --feedback, one Markdown file per learner.")
    p.add_argument("lab", help="the lab: its name or number (lab01, 01, 1)")
    p.add_argument("submissions", nargs="+", metavar="SUBMISSION",
                   help="a notebook, or a folder searched recursively for notebooks")
    p.add_argument("--out", type=Path, default=Path("gradebook.csv"),
                   help="the gradebook CSV (default gradebook.csv); the summary goes next to it "
                        "as .md and the chart as .png")
    p.add_argument("--feedback", type=Path, metavar="DIR",
                   help="write one Markdown file per learner here")
    p.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="time limit per notebook, kernel start included (default 600)")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="notebooks graded at once, each in its own process (default 1)")
    p.add_argument("--memory", type=positive_int, default=6144, metavar="MB",
                   help="memory limit of each notebook's kernel, in MB (default 6144)")
    p.add_argument("--labs", type=Path, default=None, metavar="DIR",
                   help="where the course's lab notebooks are (default: the course's labs/)")
    p.add_argument("--hidden", type=Path, metavar="FILE",
                   help="hidden checks (a Python file of @exercise checks) run after each notebook "
                        "in its kernel; never shown in the lab")
    platform = p.add_argument_group("gradebooks for a learning platform (need --roster)")
    platform.add_argument("--roster", type=Path, metavar="FILE",
                          help="the class list exported from Canvas (its gradebook CSV) or "
                               "Gradescope (its roster CSV); each submission is named after one "
                               "of its columns: jdoe@uni.edu.ipynb")
    platform.add_argument("--roster-key", metavar="COLUMN", default=None,
                          help="the roster column submissions are named after (default: the first "
                               "of 'SIS Login ID', 'Email', 'SIS User ID', 'SID', 'ID' it has)")
    platform.add_argument("--canvas", type=Path, metavar="FILE",
                          help="write a gradebook in Canvas's import layout (one assignment column)")
    platform.add_argument("--assignment", metavar="NAME", default=None,
                          help="the Canvas assignment column, as your Canvas export names it, e.g. "
                               "'Lab 01 (123456)' (default: the lab's name, which Canvas would "
                               "import as a new assignment)")
    platform.add_argument("--gradescope", type=Path, metavar="FILE",
                          help="write the scores in Gradescope's layout (names, SID, Email, Total Score)")
    platform.add_argument("--missing", choices=["blank", "zero"], default="blank",
                          help="the score of a roster learner without a submission (default blank: "
                               "the platform keeps what it has)")
    p.set_defaults(func=run_grade)


def run_grade(args: argparse.Namespace) -> int:
    from loracore.extras import MissingExtra, require_extra

    try:  # before any work: a package missing at the chart would waste the whole run
        require_extra("grade", "loracore grade")
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from loracore.grade import LABS_DIR, Limits, find_submissions, grade, threads_per_job
    from loracore.grade.exports import (canvas_rows, check_roster_for, gradescope_rows,
                                        match_roster, read_roster, write_rows)
    from loracore.grade.gradebook import summary_markdown, write_chart, write_csv, write_feedback

    limits = Limits(timeout=args.timeout, memory_mb=args.memory,
                    threads=threads_per_job(args.jobs))

    def progress(done: int, total: int, r) -> None:  # type: ignore[no-untyped-def]
        print(f"[{done}/{total}] {r.submission}: {r.total():g} points ({r.status}, {r.seconds:.0f} s)",
              file=sys.stderr, flush=True)

    matched = None
    try:
        if (args.canvas or args.gradescope) and not args.roster:
            raise ValueError("loracore grade: --canvas and --gradescope need --roster, the class "
                             "list that names each learner's submission")
        if args.roster:  # every learner matched before an hour of grading, not after
            roster = read_roster(args.roster, args.roster_key)
            for platform, wanted in (("canvas", args.canvas), ("gradescope", args.gradescope)):
                if wanted:
                    check_roster_for(roster, platform)
            matched = match_roster(roster, find_submissions(args.submissions))
        lab, results = grade(args.lab, args.submissions, jobs=args.jobs, limits=limits,
                             labs_dir=args.labs or LABS_DIR, progress=progress, hidden=args.hidden)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not results:
        print("error: loracore grade: no .ipynb file in the submissions given", file=sys.stderr)
        return 2
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, lab, results)
    chart = out.with_suffix(".png")
    write_chart(chart, lab, results)
    out.with_suffix(".md").write_text(summary_markdown(lab, results, chart.name), encoding="utf-8")
    if args.feedback:
        write_feedback(args.feedback, lab, results)
    if matched is not None:
        if args.canvas:
            write_rows(args.canvas, canvas_rows(lab, results, matched, args.assignment or lab.name,
                                                args.missing))
        if args.gradescope:
            write_rows(args.gradescope, gradescope_rows(lab, results, matched, args.missing))
        if matched.missing:
            print(f"{len(matched.missing)} learner(s) of the roster have no submission (score "
                  f"{args.missing}): " + ", ".join(r[matched.roster.key] for r in matched.missing),
                  file=sys.stderr)
    ok = sum(r.status == "ok" for r in results)
    print(f"graded {len(results)} submission(s) of lab {lab.number} ({ok} ran to the end): {out}, "
          f"{out.with_suffix('.md')}, {chart}" + (f", feedback in {args.feedback}" if args.feedback else "")
          + "".join(f", {p}" for p in (args.canvas, args.gradescope) if p and matched is not None))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    # torch, transformers and datasets load here, when a run starts, not for every command.
    from loracore.finetune import run_command

    return run_command(args)


def add_finetune(subparsers: argparse._SubParsersAction) -> None:
    from loracore.finetune_args import add_arguments

    p = subparsers.add_parser(
        "finetune", help="fine-tune a LoRA adapter on a chat JSONL file (torchrun for many processes)",
        description="Fine-tune a LoRA adapter on chat-format JSONL and save it in PEFT's format, "
                    "with checkpoints to resume from. Under torchrun each process takes its share "
                    "of every global batch (spell the rank --rank there).")
    add_arguments(p)
    p.set_defaults(func=run_finetune)


def add_export(subparsers: argparse._SubParsersAction) -> None:
    from loracore.export import add_arguments

    p = subparsers.add_parser(
        "export", help="turn an adapter into what another program runs (a merged model folder)",
        description="Export an adapter folder for another program: `merged` writes the base "
                    "model with the adapter merged in, as a plain transformers folder.")
    add_arguments(p)


#: Each adds one subcommand to the parser.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_grade, add_finetune, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracore", description="loracore's command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loracore`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
