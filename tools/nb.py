#!/usr/bin/env python3
"""Notebook housekeeping for the course: clean, check, execute, and generate labs.

    python tools/nb.py clean [NB ...]        normalise notebooks in place (default: all)
    python tools/nb.py check [NB ...]        exit 1 if any notebook is not clean
    python tools/nb.py execute NB [NB ...]   run top to bottom in FULL mode, store outputs, clean
    python tools/nb.py make-labs             solutions/labNN_*.ipynb -> labs/labNN_*.ipynb
    python tools/nb.py check-labs            exit 1 if labs/ is out of sync with solutions/

Grading learners' labs is `loracore grade LAB SUBMISSION...` (loracore/grade/), not this tool.

A clean notebook has no execution-count noise (code cells with outputs are numbered
1, 2, 3 ... in order; cells without outputs have none), no per-cell metadata except
tags, no widget state or widget outputs, progress-bar streams collapsed to their final line, and a
fixed kernelspec.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIRS = ("lessons", "labs", "solutions")
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
USES_EXERCISE = "uses-exercise"
RAISES = "raises-exception"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]{6,}\b")


def all_notebooks() -> list[Path]:
    return sorted(p for d in NOTEBOOK_DIRS for p in (ROOT / d).glob("*.ipynb"))


def _collapse_progress(text: str) -> str:
    """Keep what a terminal would show: the text after the last carriage return of each line."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean(nb: Any) -> Any:
    """Return a normalised copy of notebook ``nb`` (see the module docstring)."""
    nb = copy.deepcopy(nb)
    language = nb.metadata.get("language_info", {}).get("name", "python")
    nb.metadata = nbformat.NotebookNode(
        {"kernelspec": dict(KERNELSPEC), "language_info": {"name": language}})
    count = 0
    for cell in nb.cells:
        tags = sorted(set(cell.get("metadata", {}).get("tags", [])))
        cell.metadata = nbformat.NotebookNode({"tags": tags} if tags else {})
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        outputs = []
        for out in cell.outputs:
            if out.output_type == "stream":
                out.text = _collapse_progress(out.text)
                if not out.text.strip():
                    continue
                if outputs and outputs[-1].output_type == "stream" and outputs[-1].name == out.name:
                    outputs[-1].text += out.text
                    continue
            if out.output_type in ("display_data", "execute_result") and WIDGET_MIME in out.data:
                # A live widget (a progress bar, a slider): its text fallback shows the
                # widget's first state, e.g. "0%|", which would mislead a reader.
                continue
            outputs.append(out)
        cell.outputs = outputs
        if outputs:
            count += 1
            cell.execution_count = count
            for out in outputs:
                if out.output_type == "execute_result":
                    out.execution_count = count
        else:
            cell.execution_count = None
    return nb


def problems(path: Path) -> list[str]:
    """Why the notebook at ``path`` is not clean (empty when it is)."""
    nb = nbformat.read(path, as_version=4)
    found = []
    if nbformat.writes(clean(nb)) != nbformat.writes(nb):
        found.append("not normalised (run `make clean-nb`)")
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
            if ADDRESS.search(text):
                found.append(f"cell {i} prints a memory address")
    ran = any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
    executed = [i for i in figures_missing(nb)
                if RAISES not in nb.cells[i].metadata.get("tags", [])] if ran else []
    if executed:
        found.append(f"cells {executed} draw a figure but store none (executed with a "
                     f"non-interactive matplotlib backend?)")
    return found


def write_if_changed(path: Path, nb: Any) -> bool:
    text = nbformat.writes(nb) + "\n"
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a crash never leaves half a notebook
    return True


# --------------------------------------------------------------------------- labs


def _strip_solution(source: str, where: str) -> str:
    """Replace every BEGIN/END SOLUTION block in ``source`` by a stub that raises."""
    out: list[str] = []
    inside = False
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if inside:
                raise ValueError(f"{where}: nested {BEGIN}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            hint = stripped[len(BEGIN):].strip(" :-")
            out.append(f"{indent}# YOUR CODE HERE{': ' + hint if hint else ''}")
            out.append(f'{indent}raise NotImplementedError("Exercise: replace this line with your code.")')
        elif stripped.startswith(END):
            if not inside:
                raise ValueError(f"{where}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} without {END}")
    return "\n".join(out)


def make_lab(solution: Any, name: str) -> Any:
    """The learner's twin of a solution notebook."""
    lab = copy.deepcopy(solution)
    n_exercises = 0
    for i, cell in enumerate(lab.cells):
        if cell.cell_type != "code":
            continue
        tags = set(cell.metadata.get("tags", []))
        has_solution = BEGIN in cell.source
        if has_solution:
            n_exercises += 1
            cell.source = _strip_solution(cell.source, f"{name} cell {i}")
        if has_solution or USES_EXERCISE in tags:
            cell.outputs = []
            cell.execution_count = None
            tags.add(RAISES)  # may fail until the learner has written the exercises
        if tags:
            cell.metadata["tags"] = sorted(tags)
    if n_exercises == 0:
        raise ValueError(f"{name}: no {BEGIN} block, so the lab would have no exercise")
    return clean(lab)


def lab_pairs() -> list[tuple[Path, Path]]:
    return [(s, ROOT / "labs" / s.name) for s in sorted((ROOT / "solutions").glob("lab*.ipynb"))]


# --------------------------------------------------------------------------- execution


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Set (a value) or remove (None) environment variables for the kernels started inside the
    block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(path: Path, *, fast: bool = False, timeout: int = 3600) -> Any:
    """Run a notebook top to bottom in a fresh kernel (full mode unless ``fast``)."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    # MPLBACKEND=Agg (handy for tests) would make every figure vanish from the stored outputs:
    # the kernel must pick Jupyter's inline backend itself
    with _environment(LORACORE_FAST="1" if fast else "0", MPLBACKEND=None):
        client.execute()
    missing = figures_missing(nb)
    if missing:
        raise RuntimeError(f"{path}: cells {missing} draw a figure but stored none (is the "
                           f"matplotlib backend non-interactive?); outputs not written")
    return nb


def figures_missing(nb: Any) -> list[int]:
    """Indices of code cells that call ``plt.show()``/``plt.subplots`` or ``ax.`` plotting but
    have no image among their outputs."""
    draws = re.compile(r"plt\.(show|subplots|figure)\(|\.(plot|bar|loglog|semilogy)\(")
    missing = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not draws.search(cell.source):
            continue
        if "widgets." in cell.source:  # an interactive widget draws live; clean() drops its output
            continue
        if not any("image/png" in out.get("data", {}) or WIDGET_MIME in out.get("data", {})
                   or out.get("output_type") == "error"
                   for out in cell.get("outputs", [])):
            missing.append(i)
    return missing


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["clean", "check", "execute", "make-labs",
                                            "check-labs"])
    parser.add_argument("paths", nargs="*", type=Path)
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.paths] or all_notebooks()

    if args.command == "clean":
        for p in paths:
            if write_if_changed(p, clean(nbformat.read(p, as_version=4))):
                print(f"cleaned {p.relative_to(ROOT)}")
        return 0
    if args.command == "check":
        bad = {p: problems(p) for p in paths}
        bad = {p: v for p, v in bad.items() if v}
        for p, v in bad.items():
            print(f"{p.relative_to(ROOT)}: {'; '.join(v)}")
        return 1 if bad else 0
    if args.command == "execute":
        if not args.paths:
            parser.error("execute needs at least one notebook")
        for p in paths:
            print(f"executing {p.relative_to(ROOT)} (full mode) ...", flush=True)
            write_if_changed(p, clean(execute(p)))
        return 0
    if args.command == "make-labs":
        for sol, lab in lab_pairs():
            if write_if_changed(lab, make_lab(nbformat.read(sol, as_version=4), sol.name)):
                print(f"wrote {lab.relative_to(ROOT)}")
        return 0
    if args.command == "check-labs":
        stale = []
        for sol, lab in lab_pairs():
            want = nbformat.writes(make_lab(nbformat.read(sol, as_version=4), sol.name)) + "\n"
            if not lab.exists() or lab.read_text() != want:
                stale.append(lab)
        extra = sorted(set((ROOT / "labs").glob("*.ipynb")) - {lab for _, lab in lab_pairs()})
        for lab in stale:
            print(f"{lab.relative_to(ROOT)} is out of sync with solutions/: run `make labs`")
        for lab in extra:
            print(f"{lab.relative_to(ROOT)} has no solution notebook in solutions/")
        return 1 if stale or extra else 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
