"""`loracore grade lab05` on a class of mixed submissions: solved, blank, partly wrong, tampered.

One batch of four notebooks, graded once through the command line (each in its own sandboxed
kernel, in short mode, on the offline model; each starts lab 05's server). The partly wrong
learner keeps the server's own LRU as the eviction policy (the tempting decision: it does not
beat LRU) and blames the batched product for the cost of swapping; the tampered one is the same
learner who also edits, deletes and forges checks, which earns nothing.
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from test_grade import _learner

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "lab05_serve_adapters.ipynb"
LAB = ROOT / "labs" / "lab05_serve_adapters.ipynb"
TIMEOUT = int(os.environ.get("LORACORE_GRADE_TEST_TIMEOUT", "1200"))
EXERCISES = ("gather_rows", "batched_lora", "mixed_lora", "eviction_policy", "batching_gain",
             "swap_reason", "lru_slots_needed")
FULL = {"gather_rows": "1", "batched_lora": "1", "mixed_lora": "2", "eviction_policy": "3",
        "batching_gain": "1", "swap_reason": "1", "lru_slots_needed": "1", "total": "10"}


def _cell(nb: nbformat.NotebookNode, text: str) -> nbformat.NotebookNode:
    """The one code cell whose source holds ``text``."""
    found = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert len(found) == 1, (text, len(found))
    return found[0]


def _replace(nb: nbformat.NotebookNode, text: str, old: str, new: str) -> None:
    cell = _cell(nb, text)
    assert old in cell.source, (text, old)
    cell.source = cell.source.replace(old, new)


def _class(folder: Path) -> None:
    folder.mkdir()
    solved = _learner(SOLUTION)
    nbformat.write(solved, folder / "solved.ipynb")
    nbformat.write(_learner(LAB), folder / "blank.ipynb")
    wrong = copy.deepcopy(solved)
    policy = _cell(wrong, "def choose_victim(").source
    start, end = policy.index("    ### BEGIN SOLUTION"), policy.index("    ### END SOLUTION")
    _cell(wrong, "def choose_victim(").source = (policy[:start] + "    return lru(resident, history)  # the server's own\n"
                                                 + policy[end + len("    ### END SOLUTION"):])
    _replace(wrong, 'swap_reason = "', 'swap_reason = "B"', 'swap_reason = "A"')
    nbformat.write(wrong, folder / "wrong.ipynb")
    tampered = copy.deepcopy(wrong)
    _cell(tampered, "check_eviction_policy(choose_victim)").source = "print('eviction_policy: all checks passed')"
    tampered.cells.remove(_cell(tampered, "check_swap_reason(swap_reason)"))
    forge = ("import json, os\nfor name in ['eviction_policy', 'swap_reason']:\n"
             "    open(os.environ['LORACORE_VERDICTS'], 'a').write(json.dumps("
             "{'exercise': name, 'passed': True, 'checks': 1, 'failed': [], 'error': ''}) + '\\n')")
    at = tampered.cells.index(_cell(tampered, "def choose_victim("))
    tampered.cells.insert(at + 1, nbformat.v4.new_code_cell(forge))
    nbformat.write(tampered, folder / "tampered.ipynb")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab05")
    folder = tmp / "class"
    _class(folder)
    out = tmp / "gradebook.csv"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "loracore", "grade", "lab05", str(folder), "--out", str(out),
                           "--feedback", str(tmp / "feedback"), "--timeout", str(TIMEOUT), "--jobs", "2"],
                          capture_output=True, text=True, env=env, timeout=3 * TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {Path(r["submission"]).name: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    feedback = {p.name: p.read_text() for p in (tmp / "feedback").glob("*.md")}
    return rows, feedback


def _points(row) -> dict[str, str]:
    return {k: row[k] for k in (*EXERCISES, "total")}


def _feedback(feedback: dict[str, str], name: str) -> str:
    found = [text for file, text in feedback.items() if name.removesuffix(".ipynb") in file]
    assert len(found) == 1, (name, list(feedback))
    return found[0]


@pytest.mark.slow
def test_the_solution_gets_full_marks_and_the_blank_lab_zero(graded):
    rows, feedback = graded
    solved, blank = rows["solved.ipynb"], rows["blank.ipynb"]
    assert _points(solved) == FULL and solved["maximum"] == "10" and solved["status"] == "ok", solved
    assert _points(blank) == {k: "0" for k in FULL} and blank["status"] == "ok", blank
    assert "choose_victim is not written yet" in _feedback(feedback, "blank.ipynb")


@pytest.mark.slow
def test_keeping_lru_and_a_wrong_choice_lose_exactly_those_points(graded):
    rows, feedback = graded
    row = rows["wrong.ipynb"]
    # question 3 still passes: it is computed from the learner's own policy (LRU needs its 4 slots)
    assert _points(row) == {**FULL, "eviction_policy": "0", "swap_reason": "0", "total": "6"}, row
    text = _feedback(feedback, "wrong.ipynb")
    assert "FAIL on a held-out trace" in text and "points short" in text
    assert "not A: the mixed line" in text


@pytest.mark.slow
def test_editing_deleting_or_forging_checks_earns_nothing(graded):
    rows, _ = graded
    tampered = rows["tampered.ipynb"]
    assert _points(tampered) == _points(rows["wrong.ipynb"]) and tampered["status"] == "ok", tampered
    assert "restored" in tampered["reason"]
