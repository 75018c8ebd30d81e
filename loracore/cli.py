"""The ``loracore`` command: one subcommand per task (``grade``, ``finetune``, ``export``).

A subcommand is a module-level ``add_NAME(subparsers)`` that declares its arguments and sets
``func``, the function that runs it and returns the exit status; :data:`SUBCOMMANDS` lists
them. A new one (``finetune``, ``serve``) is one more such function and one more entry.

    loracore grade lab01 submissions/ --out gradebook.csv --feedback feedback/ --jobs 2
    loracore finetune --model smollm2-135m --data train.jsonl --out runs/x --steps 90
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
    p.set_defaults(func=run_grade)


def run_grade(args: argparse.Namespace) -> int:
    import os

    from loracore.extras import MissingExtra, require_extra

    try:  # before any work: a package missing at the chart would waste the whole run
        require_extra("grade", "loracore grade")
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from loracore.grade import LABS_DIR, Limits, grade
    from loracore.grade.gradebook import summary_markdown, write_chart, write_csv, write_feedback

    limits = Limits(timeout=args.timeout, memory_mb=args.memory,
                    threads=max(1, (os.cpu_count() or 1) // args.jobs))

    def progress(done: int, total: int, r) -> None:  # type: ignore[no-untyped-def]
        print(f"[{done}/{total}] {r.submission}: {r.total():g} points ({r.status}, {r.seconds:.0f} s)",
              file=sys.stderr, flush=True)

    try:
        lab, results = grade(args.lab, args.submissions, jobs=args.jobs, limits=limits,
                             labs_dir=args.labs or LABS_DIR, progress=progress)
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
    ok = sum(r.status == "ok" for r in results)
    print(f"graded {len(results)} submission(s) of lab {lab.number} ({ok} ran to the end): {out}, "
          f"{out.with_suffix('.md')}, {chart}" + (f", feedback in {args.feedback}" if args.feedback else ""))
    return 0


def add_finetune(subparsers: argparse._SubParsersAction) -> None:
    from loracore.finetune import add_arguments, run_command

    p = subparsers.add_parser(
        "finetune", help="fine-tune a LoRA adapter on a chat JSONL file (torchrun for many processes)",
        description="Fine-tune a LoRA adapter on chat-format JSONL and save it in PEFT's format, "
                    "with checkpoints to resume from. Under torchrun each process takes its share "
                    "of every global batch (spell the rank --rank there).")
    add_arguments(p)
    p.set_defaults(func=run_command)


# ---- loracore export TARGET: one block per target, sharing the `export` parser ----------------
def export_targets(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subparsers of ``loracore export`` (``gguf``, ``merged``, ...), made by the first
    target that asks and found again by the next, so each target stays one self-contained block."""
    export = subparsers.choices.get("export")
    if export is None:
        export = subparsers.add_parser(
            "export", help="write an adapter for another runtime (llama.cpp/Ollama, a merged model)",
            description="Write an adapter for another runtime; one subcommand per target.")
        export.set_defaults(targets=export.add_subparsers(dest="target", metavar="TARGET",
                                                          required=True))
    return export.get_default("targets")


def add_export_gguf(subparsers: argparse._SubParsersAction) -> None:
    p = export_targets(subparsers).add_parser(
        "gguf", help="the adapter as a GGUF LoRA file for llama.cpp and Ollama",
        description="Write an adapter folder (PEFT's format) as llama.cpp's GGUF LoRA file "
                    "(llama-cli -m BASE.gguf --lora FILE), and an Ollama Modelfile beside it "
                    "(FROM the base, ADAPTER the file). What llama.cpp cannot load (DoRA, a "
                    "module it does not adapt, another architecture) is refused.")
    p.add_argument("adapter", type=Path, metavar="ADAPTER", help="the adapter folder")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--base-gguf", type=Path, metavar="FILE",
                   help="the base model's GGUF file: the adapter is checked against it "
                        "(architecture, tensor names and shapes) and the Modelfile names it")
    p.add_argument("--config", type=Path, metavar="DIR",
                   help="the base model's folder (config.json), when the adapter does not record "
                        "its base and no --base-gguf is given")
    p.add_argument("--write-base", metavar="MODEL",
                   help="first write the base model MODEL (a course model name such as "
                        "smollm2-135m or qwen2-0.5b, or a model folder) to --base-gguf")
    p.add_argument("--base-dtype", choices=["f32", "f16", "bf16"], default="f16",
                   help="the type of the base's weights with --write-base (default f16)")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32",
                   help="the adapter tensors' type (default f32, exact)")
    p.add_argument("--no-modelfile", dest="modelfile", action="store_false",
                   help="do not write OUT's .Modelfile for Ollama")
    p.set_defaults(func=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    from loracore.atomic import DiskWriteError
    from loracore.gguf_export import export_gguf_adapter
    from loracore.models import BaseModelError

    try:
        if args.write_base:
            if args.base_gguf is None:
                raise ValueError("--write-base needs --base-gguf FILE, the file to write it to")
            _write_base(args.write_base, args.base_gguf, args.base_dtype)
        out = export_gguf_adapter(args.adapter, args.out, base_gguf=args.base_gguf,
                                  config=args.config, dtype=args.dtype, modelfile=args.modelfile)
    except (ValueError, FileNotFoundError, DiskWriteError, BaseModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    modelfile = out.with_name(f"{out.stem}.Modelfile")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)"
          + (f" and {modelfile}" if args.modelfile else "")
          + f"\nrun it: llama-cli -m {args.base_gguf or 'BASE.gguf'} --lora {out}")
    return 0
def _write_base(model: str, out: Path, dtype: str) -> None:
    """``loracore export gguf --write-base``: a course model or a model folder, as a GGUF file."""
    from loracore.gguf_base import export_gguf_base
    from loracore.models import KNOWN_MODELS, load_base_model

    if model in KNOWN_MODELS:
        base, tokenizer = load_base_model(model)
    elif Path(model).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base, tokenizer = AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    else:
        raise ValueError(f"--write-base {model!r} is neither a course model ({sorted(KNOWN_MODELS)}) "
                         f"nor a model folder")
    export_gguf_base(base, tokenizer, out, dtype=dtype)
    print(f"wrote the base {model} to {out} ({out.stat().st_size / 1e6:.1f} MB, {dtype})")


# ---- end of loracore export gguf ---------------------------------------------------------------


#: Each adds one subcommand to the parser.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_grade, add_finetune,
                                                                   add_export_gguf]


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
