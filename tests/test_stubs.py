"""Lab exercises state the contract, never the code; hints come on demand.

What a learner sees of an exercise in ``labs/`` is its stub cell (the signature, the docstring, a
``# YOUR CODE HERE: ...`` line) and the Markdown just above it. None of that may contain a line
of the answer in ``solutions/``: compared with whitespace removed, no line of a
``### BEGIN SOLUTION`` block may appear there, not even as the expression of an assignment or a
``return`` (``return loss.item()`` leaks through "return ``loss.item()``"). Trivial lines are
ignored: blank, comments, ``pass``, ``return x, y``, ``else:``, and a line the exercise gives
outside its answer block (``self.merged = False`` in a given ``__init__``).

Every exercise still shows a worked example (the word "Example" in its Markdown or its stub),
and its hints live next to its checks (``loracore/checks/labNN.py``): a few of them, from a
nudge to nearly the code, one more per call, reachable with the line the lab's introduction
gives. A hint records no verdict, and a learner's cell that asks for one is kept by the grader
as the learner's own.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import nbformat
import pytest

import loracore
from loracore.grade.labs import find_lab, is_stub_cell
from loracore.grade.restore import restore
from loracore.selfcheck import VERDICTS_ENV, Hints

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PAIRS = [(p, ROOT / "labs" / p.name) for p in sorted((ROOT / "solutions").glob("lab*.ipynb"))]
IDS = [p.stem[:5] for p, _ in PAIRS]

#: Lines that any stub may share with its answer: they say nothing about the solution.
TRIVIAL = re.compile(r"(return\s*)?\(?[\w.]*(\s*,\s*[\w.]+)*\)?|pass|else:|try:|continue|break")


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def answer_lines(source: str) -> list[str]:
    """The non-trivial lines between BEGIN and END SOLUTION, comments dropped, except those the
    cell also gives outside its answer blocks."""
    lines, given, inside = [], set(), False
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            inside = True
        elif stripped.startswith(END):
            inside = False
        elif inside:
            code = re.sub(r"\s+#.*$", "", stripped) if not stripped.startswith("#") else ""
            if not TRIVIAL.fullmatch(code):
                lines.append(code)
        else:
            given.add(_squash(line))
    return [line for line in lines if _squash(line) not in given]


def leaked(line: str, shown: str) -> bool:
    """Whether ``line`` of an answer, or the expression it assigns or returns, is in ``shown``.

    An expression alone counts unless it only names a given thing: ``code = dynamic_code()``
    may say "``dynamic_code()``, given", but not ``loss.item()`` for ``return loss.item()``.
    """
    if TRIVIAL.fullmatch(line.strip()):
        return False
    shown = _squash(shown)
    forms = {_squash(line)}
    m = re.fullmatch(r"(?:return\s+|[\w.\[\], ]+?\s*[-+*/]?=\s*)(.+)", line.strip())
    if m and not re.fullmatch(r"[\w.]*(\(\))?|[-+]?[\d.e-]+", m.group(1).strip()) \
            or m and m.group(0).startswith("return"):
        forms.add(_squash(m.group(1)))
    return any(f in shown for f in forms)


def exercises(solution: Path, lab: Path) -> list[tuple[str, list[str], str, str]]:
    """Per answer cell of ``solution``: its id, its answer lines, what the lab shows of it (the
    stub and every Markdown cell since the previous exercise), and the stub with the nearest
    Markdown cell above it (where its worked example belongs)."""
    sol = nbformat.read(solution, as_version=4)
    by_id = {c.id: c for c in nbformat.read(lab, as_version=4).cells}
    out = []
    for i, cell in enumerate(sol.cells):
        if cell.cell_type != "code" or BEGIN not in cell.source:
            continue
        above = [by_id[c.id].source for c in sol.cells[:i] if c.cell_type == "markdown"]
        since = [k for k in range(i) if BEGIN in sol.cells[k].source]
        prose = [by_id[c.id].source for c in sol.cells[since[-1] + 1 if since else 0:i]
                 if c.cell_type == "markdown"]
        stub = by_id[cell.id].source
        out.append((cell.id, answer_lines(cell.source), "\n".join(prose + [stub]),
                    "\n".join(above[-1:] + [stub])))
    return out


def test_the_comparison_can_fail():
    cell = "    ### BEGIN SOLUTION x\n    y = a @ b  # why\n    return y, z\n    ### END SOLUTION"
    assert answer_lines(cell) == ["y = a @ b"]
    assert answer_lines("flag = 0\n### BEGIN SOLUTION\nflag = 0\nflag = 1\n### END SOLUTION") == ["flag = 1"]
    assert leaked("y = a @ b", "compute `a@b`") and leaked("return loss.item()", "return `loss.item()`")
    assert leaked("self.w += s * B @ A", "# YOUR CODE HERE: self.w  +=  s * B @ A")
    assert not leaked("y = a @ b", "the product of a and b") and not leaked("return x", "return x")
    assert not leaked("code = dynamic_code()", "`dynamic_code()`, given") and leaked("return f()", "`f()`")


@pytest.mark.parametrize("solution, lab", PAIRS, ids=IDS)
def test_no_stub_shows_a_line_of_its_answer(solution, lab):
    found = [f"cell {cid}: {line!r}" for cid, lines, shown, _ in exercises(solution, lab)
             for line in lines if leaked(line, shown)]
    assert not found, f"{lab.name} shows answer lines:\n" + "\n".join(found)


@pytest.mark.parametrize("solution, lab", PAIRS, ids=IDS)
def test_every_exercise_shows_a_worked_example(solution, lab):
    bare = [cid for cid, _, _, near in exercises(solution, lab) if not re.search(r"\bExample\b", near)]
    assert not bare, f"{lab.name}: no worked example above or in the stub of cells {bare}"


# --------------------------------------------------------------------------- hints on demand


def _hints(solution: Path) -> Hints:
    return importlib.import_module(f"loracore.checks.{solution.stem[:5]}").hint


def _functions_written(solution: Path) -> set[str]:
    """The names a learner asks hints for: each function holding an answer; a class's answered
    ``__init__``/``forward`` count as the class, its other answered methods by their own name."""
    names = set()
    for cell in nbformat.read(solution, as_version=4).cells:
        if cell.cell_type != "code" or BEGIN not in cell.source:
            continue
        holds = lambda node: BEGIN in (ast.get_source_segment(cell.source, node) or "")  # noqa: E731
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.FunctionDef) and holds(node):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                for method in (m for m in node.body if isinstance(m, ast.FunctionDef) and holds(m)):
                    names.add(node.name if method.name in ("__init__", "forward") else method.name)
    return names


@pytest.mark.parametrize("solution, lab", PAIRS, ids=IDS)
def test_every_written_function_has_hints_from_a_nudge_to_nearly_the_code(solution, lab):
    hints = _hints(solution)
    written = _functions_written(solution)
    assert set(hints.names) == written, f"{solution.stem[:5]}: hints for {hints.names}, answers in {written}"
    for name in hints.names:
        steps = hints.hints[name]
        assert len(steps) >= 2 and all(s.strip() for s in steps), name


@pytest.mark.parametrize("solution, lab", PAIRS, ids=IDS)
def test_the_intro_says_how_to_ask_for_a_hint_with_a_name_the_lab_imports(solution, lab):
    nb = nbformat.read(lab, as_version=4)
    intro = nb.cells[0].source
    calls = re.findall(r"`(\w+)\.hint\(([^`]*)\)`", intro)
    assert calls, f"{lab.name}: the introduction does not show the hint line"
    setup = ast.parse(nb.cells[1].source)
    bound = {a.asname or a.name.split(".")[0] for n in ast.walk(setup)
             if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    for receiver, args in calls:
        assert receiver in bound, f"{lab.name}: `{receiver}.hint` but the setup cell binds {sorted(bound)}"
        names = [ast.literal_eval(a) for a in ast.parse(f"f({args})").body[0].value.args]
        assert names[-1] in _hints(solution).names, (lab.name, names)


def test_each_call_shows_the_next_hint_then_stays_at_the_last(capsys):
    hints = Hints("lab99", {"area": ("nudge", "closer", "nearly the code")})
    shown = []
    for _ in range(4):
        hints("area")
        shown.append(capsys.readouterr().out)
    assert "1 of 3" in shown[0] and "nudge" in shown[0] and "again" in shown[0]
    assert "2 of 3" in shown[1] and "closer" in shown[1]
    assert "3 of 3" in shown[2] and "nearly the code" in shown[2] and "last" in shown[2]
    assert shown[3] == shown[2]
    hints("area", 1)
    assert "1 of 3" in capsys.readouterr().out
    with pytest.raises(ValueError, match="lab99 has no exercise 'aera'.*area"):
        hints("aera")


def test_loracore_hint_names_the_lab_and_shares_its_count(capsys):
    from loracore.checks import lab04

    lab04.hint.reset()
    loracore.hint("lab04", "trim")
    loracore.hint("4", "trim")
    assert "2 of" in capsys.readouterr().out
    lab04.hint("trim")
    assert "3 of" in capsys.readouterr().out
    lab04.hint.reset()
    with pytest.raises(ValueError, match="lab 09"):
        loracore.hint("lab09", "trim")


def test_a_hint_records_no_verdict(tmp_path, monkeypatch):
    from loracore.checks import lab01

    verdicts = tmp_path / "verdicts.jsonl"
    monkeypatch.setenv(VERDICTS_ENV, str(verdicts))
    for name in lab01.hint.names:
        lab01.hint(name)
    assert not verdicts.exists()
    lab01.hint.reset()


def test_the_grader_keeps_a_hint_cell_as_the_learners_own():
    lab = find_lab("lab01")
    course = lab.notebook()
    learner = nbformat.read(ROOT / "solutions" / "lab01_lora_layer.ipynb", as_version=4)
    at = [c.id for c in learner.cells].index("c374cea8")  # the merge exercise
    learner.cells.insert(at, nbformat.v4.new_code_cell('checks.hint("merge")'))
    out = restore(learner, lab, course)
    assert out.added == 1 and out.restored == 0
    sources = [(g.origin, g.cell.source, g.checks) for g in out.cells]
    assert ("learner", 'checks.hint("merge")', []) in sources
    assert [g.checks for g in out.cells if g.checks] == [[e.name] for e in lab.exercises]
    fixed = [c.source for c in course.cells if not is_stub_cell(c)]
    assert [s for origin, s, _ in sources if origin == "course"] == fixed
