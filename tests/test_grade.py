"""`loracore grade`: restoring locked cells, the sandbox, verdicts, the gradebook, the command.

The fast tests need no kernel. The slow ones grade real batches through the command line
(`python -m loracore grade`), each notebook in its own sandboxed kernel on the offline model:
one lab 01 batch holding every case (module-scoped, graded once with --jobs 2 and the README's
hidden checks) and part of it again with --jobs 1 (lab 03's swapped nibbles are in its graded class,
tests/test_lab03_lab04_decisions.py). Each lab 01 notebook
run to its end costs a kernel (torch, transformers) and the lab's training steps: a case that
can be carried by a notebook already graded is asserted on that notebook.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

from loracore.grade import find_submissions
from loracore.grade.gradebook import feedback_markdown, feedback_name, summary_markdown, write_csv
from loracore.grade.labs import STUB, checked_exercises, find_lab, is_stub_cell, lab_number
from loracore.grade.restore import NotGradable, read_submission, restore
from loracore.grade.kernel import model_cache_dir
from loracore.grade.run import Result, Verdict, model_cache_lock
from loracore.grade.sandbox import landlock_abi
from loracore.selfcheck import VERDICTS_ENV, Check, ExerciseFailed, call_learner, exercise, report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb as nbtools  # noqa: E402
from test_grade_classroom import _readme_hidden_example  # noqa: E402

LAB_NAMES = sorted(p.stem[:5] for p in (ROOT / "labs").glob("lab*.ipynb"))
SOLUTION01 = ROOT / "solutions" / "lab01_lora_layer.ipynb"
# Whole-notebook limits: generous for the batches of notebooks that finish (a lab 01 run takes
# about a minute on 2 quiet cores, up to 7 on a machine loaded 7 times over), short for the
# batch with the notebook that never does (it costs exactly that long).
TIMEOUT = int(os.environ.get("LORACORE_GRADE_TEST_TIMEOUT", "1200"))
HANG_TIMEOUT = 20


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loracore", *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


# --------------------------------------------------------------------------- labs and points


@pytest.mark.parametrize("text", ["lab01", "01", "1", "LAB01", "lab01_lora_layer", "lab01_lora_layer.ipynb"])
def test_lab_is_named_by_name_or_number(text):
    assert lab_number(text) == "01"


@pytest.mark.parametrize("text", ["", "lab", "one", "lab1x", "123"])
def test_a_lab_name_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="not a lab"):
        lab_number(text)


def test_an_unknown_lab_names_the_labs_there():
    with pytest.raises(ValueError, match="lab01_lora_layer"):
        find_lab("lab97")


@pytest.mark.parametrize("name", LAB_NAMES)
def test_every_lab_declares_points_and_calls_each_check_in_exactly_one_cell(name):
    """The conventions the grader relies on, for every lab in labs/ (a new lab included)."""
    lab = find_lab(name)
    assert lab.exercises and all(e.points > 0 for e in lab.exercises)
    cells = lab.notebook().cells
    for e in lab.exercises:
        callers = [i for i, c in enumerate(cells) if e.name in checked_exercises(c, lab)]
        assert len(callers) == 1, f"{name}: check_{e.name} is called in cells {callers}"
        assert not is_stub_cell(cells[callers[0]])


@pytest.mark.parametrize("name", LAB_NAMES)
def test_the_grader_recognises_the_stubs_that_make_labs_writes(name):
    solution = nbformat.read(next((ROOT / "solutions").glob(f"{name}_*.ipynb")), as_version=4)
    lab = nbtools.make_lab(solution, name)
    answers = [c for c in solution.cells if nbtools.BEGIN in c.source]
    assert [c.id for c in lab.cells if is_stub_cell(c)] == [c.id for c in answers]
    assert STUB in lab.cells[[c.id for c in lab.cells].index(answers[0].id)].source


def test_tools_nb_has_no_grade_command_any_more():
    with pytest.raises(SystemExit):
        nbtools.main(["grade", str(SOLUTION01)])
    assert not hasattr(nbtools, "grade")


# --------------------------------------------------------------------------- verdicts


@exercise(points=2)
def check_double(double) -> None:  # a stand-in for a lab's check
    report("double", [Check.equal("double(2) == 4", call_learner(double, 2), 4, hint="x + x")])


def test_an_exercise_check_records_its_verdict(tmp_path, monkeypatch):
    verdicts = tmp_path / "v.jsonl"
    monkeypatch.setenv(VERDICTS_ENV, str(verdicts))
    check_double(lambda x: 2 * x)
    with pytest.raises(ExerciseFailed):
        check_double(lambda x: x + 1)

    def unwritten(x):
        raise NotImplementedError("Exercise: replace this line with your code.")

    with pytest.raises(ExerciseFailed, match="not written yet"):
        check_double(unwritten)
    with pytest.raises(ZeroDivisionError):
        check_double(lambda x: 1 / 0)
    lines = [json.loads(line) for line in verdicts.read_text().splitlines()]
    assert [(r["exercise"], r["passed"]) for r in lines] == [("double", True), ("double", False),
                                                            ("double", False), ("double", False)]
    assert lines[1]["failed"] == [{"name": "double(2) == 4", "passed": False, "expected": "4",
                                   "got": "3", "hint": "x + x"}] and lines[1]["error"] == ""
    assert "not written yet" in lines[2]["error"] and lines[3]["error"].startswith("ZeroDivisionError")
    assert check_double.points == 2 and check_double.exercise == "double"


def test_nothing_is_recorded_outside_the_grader(tmp_path, monkeypatch):
    monkeypatch.delenv(VERDICTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    check_double(lambda x: 2 * x)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("points", [0, -1, "2"])
def test_exercise_points_must_be_positive_numbers(points):
    with pytest.raises(ValueError, match="points"):
        exercise(points)


# --------------------------------------------------------------------------- restoring cells


def _learner(source: Path = SOLUTION01) -> nbformat.NotebookNode:
    """A learner's notebook: the lab with every answer written (the solution, outputs cleared)."""
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def _cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.get("id") == cell_id)


def _restored_sources(nb):
    lab = find_lab("lab01")
    return [(g.origin, g.cell.source) for g in restore(nb, lab, lab.notebook()).cells]


def test_restore_keeps_answers_and_takes_everything_else_from_the_course():
    lab = find_lab("lab01")
    course = lab.notebook()
    learner = _learner()
    out = restore(learner, lab, course)
    assert out.restored == 0 and out.added == 0
    assert len(out.cells) == len(course.cells)
    for graded, mine, theirs in zip(out.cells, learner.cells, course.cells):
        if is_stub_cell(theirs):
            assert graded.origin == "learner" and graded.cell.source == mine.source
        else:
            assert graded.origin == "course" and graded.cell.source == theirs.source
    assert [g.checks for g in out.cells if g.checks] == [[e.name] for e in lab.exercises]


def test_a_deleted_or_edited_check_cell_comes_back():
    plain = _restored_sources(_learner())
    learner = _learner()
    _cell(learner, "e935b0ea").source = "print('checks passed')  # weakened"
    learner.cells.remove(_cell(learner, "c1833173"))
    tampered = _restored_sources(learner)
    assert [s for o, s in tampered if o == "course"] == [s for o, s in plain if o == "course"]


def test_added_cells_stay_where_the_learner_put_them_and_ids_are_not_needed():
    learner = _learner()
    for cell in learner.cells:  # a notebook saved by a tool that drops cell ids
        cell.pop("id", None)
    at = [c.source for c in learner.cells].index(_cell(_learner(), "68d083f8").source)
    learner.cells.insert(at, nbformat.v4.new_code_cell("helper = 1  # mine"))
    learner.cells[at + 1].source += "\n# rewritten in my own way"
    got = _restored_sources(learner)
    i = got.index(("learner", "helper = 1  # mine"))
    assert got[i + 1][0] == "learner" and got[i + 1][1].endswith("# rewritten in my own way")
    assert got[i + 2] == ("course", "checks.check_lora_layer(LoRALayer)")


def test_a_notebook_of_another_lab_or_not_a_notebook_is_refused():
    lab = find_lab("lab01")
    with pytest.raises(NotGradable) as info:
        restore(_learner(ROOT / "solutions" / "lab02_finetune_qwen2.ipynb"), lab, lab.notebook())
    assert info.value.status == "not a lab 01 notebook"
    for data in (b"{not json", b'{"cells": 3}', b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(NotGradable) as info:
            read_submission(data, lab)
        assert info.value.status == "invalid notebook"


# --------------------------------------------------------------------------- the sandbox


def _in_sandbox(tmp_path: Path, code: str, memory_mb: int = 6144) -> subprocess.CompletedProcess:
    script = ("import sys\nfrom loracore.grade.sandbox import apply_limits\n"
              f"apply_limits({str(tmp_path / 'work')!r}, {memory_mb})\n" + code)
    (tmp_path / "work").mkdir(exist_ok=True)
    env = {**_env(), "TMPDIR": str(tmp_path / "work")}  # as the grader sets it
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.skipif(landlock_abi() == 0, reason="needs Linux with Landlock")
def test_the_sandbox_writes_only_in_its_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("course file")
    code = (f"import os, pathlib\n"
            f"pathlib.Path({str(tmp_path / 'work' / 'mine.txt')!r}).write_text('ok')\n"
            f"for attempt in (lambda: os.remove({str(outside)!r}),\n"
            f"                lambda: open({str(outside)!r}, 'a').write('x'),\n"
            f"                lambda: open({str(tmp_path / 'new.txt')!r}, 'w')):\n"
            f"    try:\n        attempt(); print('WROTE')\n"
            f"    except PermissionError:\n        print('refused')\n")
    proc = _in_sandbox(tmp_path, code)
    assert proc.stdout.split() == ["refused"] * 3, proc.stderr
    assert outside.read_text() == "course file" and not (tmp_path / "new.txt").exists()
    assert (tmp_path / "work" / "mine.txt").read_text() == "ok"


def test_torch_works_under_the_default_memory_limit_and_a_runaway_allocation_does_not(tmp_path):
    code = ("import torch\nx = torch.ones(2**27)\nprint('torch ok', float(x.sum()))\n"
            "try:\n    torch.empty(2**40)\nexcept (MemoryError, RuntimeError) as e:\n"
            "    print('refused', type(e).__name__)\n")
    proc = _in_sandbox(tmp_path, code)
    assert "torch ok 134217728.0" in proc.stdout and "refused" in proc.stdout, proc.stderr


def test_the_grader_knows_where_the_model_cache_lock_is():
    from loracore.models import cache_root

    assert model_cache_lock() == cache_root() / ".smollm2.lock"


def test_the_grader_knows_where_the_model_cache_is(tmp_path, monkeypatch):
    from loracore.models import smollm2_cache_dir

    assert model_cache_dir() == smollm2_cache_dir()
    monkeypatch.setenv("LORACORE_CACHE", str(tmp_path))
    assert model_cache_dir() == smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"


def test_the_runner_and_the_kernels_launcher_import_no_torch():
    """Each submission starts both: torch (and nbformat, in the launcher) would cost seconds of
    CPU each, for nothing (the lab's cells import what they use, inside the limits)."""
    for module, absent in [("loracore.grade.run", ["torch", "transformers"]),
                           ("loracore.grade.sandbox", ["torch", "transformers", "nbformat"])]:
        code = f"import sys, {module}; print([m for m in {absent!r} if m in sys.modules])"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                              timeout=300)
        assert proc.stdout.strip() == "[]", (module, proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("omp, jobs, cores, expected", [
    (None, 1, 8, 8), (None, 2, 8, 4), (None, 3, 8, 2), (None, 16, 8, 1),
    ("1", 1, 8, 1), ("2", 1, 8, 2), ("16", 2, 8, 4), ("", 2, 8, 4), ("many", 1, 8, 8), ("0", 1, 8, 8)])
def test_kernels_share_the_cores_and_never_exceed_the_callers_omp_num_threads(monkeypatch, omp, jobs,
                                                                              cores, expected):
    from loracore.grade import threads_per_job

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert threads_per_job(jobs) == expected


# --------------------------------------------------------------------------- gradebook files


def _results():
    ok = Result("class/alice.ipynb", "ok", "", {"a": 2.0, "b": 0.0},
                {"a": Verdict(True), "b": Verdict(False, [{"name": "b is right", "expected": "1",
                                                          "got": "2", "hint": "add one"}])})
    bad = Result("class/bob.ipynb", "invalid notebook", "not a JSON notebook file",
                 {"a": 0.0, "b": 0.0})
    return [ok, bad]


def test_the_gradebook_has_a_column_per_exercise_and_a_status_and_reason(tmp_path):
    from loracore.grade.labs import Exercise, Lab

    lab = Lab("99", tmp_path / "lab99_x.ipynb", (Exercise("a", 2), Exercise("b", 3)))
    write_csv(tmp_path / "g.csv", lab, _results())
    rows = list(csv.reader(open(tmp_path / "g.csv")))
    assert rows == [["submission", "a", "b", "total", "maximum", "status", "reason"],
                    ["class/alice.ipynb", "2", "0", "2", "5", "ok", ""],
                    ["class/bob.ipynb", "0", "0", "0", "5", "invalid notebook", "not a JSON notebook file"]]
    md = summary_markdown(lab, _results(), "g.png")
    assert "| a | 2 | 1 of 2 | 50% |" in md and "| b | 3 | 0 of 2 | 0% |" in md and "![" in md
    fb = feedback_markdown(lab, _results()[0])
    assert "FAIL b is right" in fb and "hint: add one" in fb and "2 of 5 points" in fb
    assert feedback_name("class/alice.ipynb") == "class_alice.md"


def test_submissions_are_found_recursively_and_a_missing_path_is_named(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("x.ipynb", "a/y.ipynb", "a/b/z.ipynb", "a/notes.txt", "a/.ipynb_checkpoints/y.ipynb"):
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("{}")
    assert find_submissions([tmp_path, tmp_path / "x.ipynb"]) == sorted(
        str(tmp_path / p) for p in ("x.ipynb", "a/y.ipynb", "a/b/z.ipynb"))
    with pytest.raises(FileNotFoundError, match="nowhere.ipynb"):
        find_submissions([tmp_path / "nowhere.ipynb"])


# --------------------------------------------------------------------------- the command


def test_pyproject_declares_the_loracore_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["loracore"] == "loracore.cli:main"
    from loracore.cli import main

    assert callable(main)


def test_the_command_lists_grade_and_refuses_bad_arguments(tmp_path):
    assert "grade" in _cli("--help").stdout
    proc = _cli("grade", "lab97", str(tmp_path))
    assert proc.returncode == 2 and "no single lab97_*.ipynb" in proc.stderr
    proc = _cli("grade", "lab01", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "missing" in proc.stderr
    assert _cli("grade", "lab01", str(tmp_path), "--jobs", "0").returncode == 2


# --------------------------------------------------------------------------- grading real batches


def _with_answer(nb, cell_id: str, old: str, new: str):
    nb = copy.deepcopy(nb)
    cell = _cell(nb, cell_id)
    assert old in cell.source, (cell_id, old)
    cell.source = cell.source.replace(old, new)
    return nb


def _prepend(nb, cell_id: str, code: str):
    nb = copy.deepcopy(nb)
    _cell(nb, cell_id).source = code + "\n" + _cell(nb, cell_id).source
    return nb


def _tree_hashes(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under each root. In the repository, the files git tracks or would
    track: what git ignores (runs/, caches, test artifacts) is written by the notebooks and tests
    that run beside this one under `make test`'s parallel workers, not by the grader."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
    out = {}
    for root in roots:
        listed = None
        if (root / ".git").exists():
            done = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                                  capture_output=True, check=True)
            listed = {root / name for name in done.stdout.decode().split("\0") if name}
        for p in sorted(listed if listed is not None else root.rglob("*")):
            if p.is_file() and not skip.intersection(p.relative_to(root).parts):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


LORA_ALPHA = ("self.scaling = lora_alpha / r", "self.scaling = lora_alpha")  # α instead of α/r
# lora_forward written for the shapes of the visible check only: the README's hidden check fails it.
FORWARD = "    return x @ W.T + b + scaling * (x @ A.T) @ B.T"
TUNED = ("    if tuple(x.shape) == (2, 5, 12):  # the visible check's shapes\n"
         "    " + FORWARD + "\n    return x @ W.T + b")


def _lab01_batch(folder: Path) -> None:
    """Every case of the issue, built from lab 01's solution (the learner's notebook when solved)."""
    solution = _learner()
    write = lambda name, nb: nbformat.write(nb, folder / name)  # noqa: E731
    folder.mkdir()
    write("solved.ipynb", solution)
    write("blank.ipynb", _learner(ROOT / "labs" / "lab01_lora_layer.ipynb"))
    alpha = _with_answer(solution, "68d083f8", *LORA_ALPHA)
    write("alpha.ipynb", alpha)
    # The same wrong answer, and the learner deletes one check, weakens another, forges verdicts
    # and replaces a check function, in a notebook saved without cell ids.
    tampered = copy.deepcopy(alpha)
    tampered.cells.remove(_cell(tampered, "c1833173"))  # check_lora_layer
    _cell(tampered, "af039fba").source = "print('merge: all checks passed')"  # check_merge
    forge = ("import json, os\nfor name in ['lora_forward', 'lora_layer', 'merge', 'inject', 'loss_fell']:\n"
             "    open(os.environ['LORACORE_VERDICTS'], 'a').write(json.dumps("
             "{'exercise': name, 'passed': True, 'checks': 1, 'failed': [], 'error': ''}) + '\\n')\n"
             "checks.check_lora_layer = lambda *args: print('lora_layer: all checks passed')")
    tampered.cells.insert(3, nbformat.v4.new_code_cell(forge))
    for cell in tampered.cells:
        cell.pop("id", None)
    tampered.nbformat_minor = 4
    write("tampered.ipynb", tampered)
    write("tuned.ipynb", _with_answer(solution, "3bd31780", FORWARD, TUNED))
    # Unbounded allocation inside an answer, megabytes of prints, deleting files around it.
    hostile = _with_answer(solution, "3bd31780", "    ### BEGIN SOLUTION",
                           "    hog = [torch.empty(2**30) for _ in range(10**6)]  # 4 GB each, forever\n"
                           "    ### BEGIN SOLUTION")
    vandal = ("import os, shutil\n"
              "print(('x' * 999 + '\\n') * 5000)  # 5 MB of output\n"
              f"for attempt in (lambda: os.remove({str(folder / 'solved.ipynb')!r}),\n"
              f"                lambda: os.remove({str(ROOT / 'labs' / 'lab01_lora_layer.ipynb')!r}),\n"
              f"                lambda: open({str(ROOT / 'graded-was-here.txt')!r}, 'w')):\n"
              "    try:\n        attempt()\n    except OSError as exc:\n        print('refused:', exc)")
    hostile.cells.insert(2, nbformat.v4.new_code_cell(vandal))
    write("hostile.ipynb", hostile)
    (folder / "more").mkdir()  # folders are searched recursively
    write("more/crash.ipynb", _prepend(solution, "3bd31780", "import os\nos._exit(1)"))
    write("exits.ipynb", _prepend(solution, "3bd31780", "import sys\nsys.exit(3)"))
    (folder.parent / "slow").mkdir()  # graded in a batch with a short time limit of its own
    nbformat.write(_prepend(solution, "3bd31780", "while True:\n    pass"), folder.parent / "slow" / "hangs.ipynb")
    (folder / "invalid.ipynb").write_text('{"cells": [')
    write("lab02.ipynb", _learner(ROOT / "solutions" / "lab02_finetune_qwen2.ipynb"))


def _grade_cli(tmp: Path, lab: str, *submissions: Path | str, jobs: int, timeout: int = TIMEOUT,
               hidden: Path | None = None) -> dict:
    out = tmp / "gradebook.csv"
    proc = _cli("grade", lab, *map(str, submissions), "--out", str(out), "--feedback",
                str(tmp / "feedback"), "--timeout", str(timeout), "--jobs", str(jobs),
                *(["--hidden", str(hidden)] if hidden else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["submission"]: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    feedback = {p.name: p.read_text() for p in (tmp / "feedback").glob("*.md")}
    return {"rows": rows, "feedback": feedback, "out": out, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def lab01(tmp_path_factory):
    """The lab 01 batch graded once with --jobs 2 and the README's hidden checks, hashes of
    everything before and after."""
    tmp = tmp_path_factory.mktemp("lab01")
    folder = tmp / "class"
    _lab01_batch(folder)
    hidden = tmp / "hidden01.py"
    hidden.write_text(_readme_hidden_example())
    before = _tree_hashes(folder, ROOT)
    graded = _grade_cli(tmp, "lab01", folder, jobs=2, hidden=hidden)
    graded["hidden"] = hidden
    graded["unchanged"] = before == _tree_hashes(folder, ROOT)
    graded["folder"] = folder
    # The notebook that never ends, with two that need no kernel, under a short time limit.
    hang = tmp / "slow" / "hangs.ipynb"
    graded["hang"] = _grade_cli(tmp / "slow", "lab01", hang, folder / "invalid.ipynb",
                                folder / "lab02.ipynb", jobs=2, timeout=HANG_TIMEOUT)
    graded["rows"][str(hang)] = graded["hang"]["rows"][str(hang)]
    return graded


def _row(graded, name):
    path = graded["folder"].parent / name if name.startswith("slow/") else graded["folder"] / name
    return graded["rows"][str(path)]


def _points(row) -> dict[str, str]:
    return {k: row[k] for k in ("lora_forward", "lora_layer", "merge", "inject", "loss_fell", "total")}


def _feedback(graded, name) -> str:
    return graded["feedback"][feedback_name(str(graded["folder"] / name))]


FULL = {"lora_forward": "2", "lora_layer": "3", "merge": "2", "inject": "2", "loss_fell": "1", "total": "10"}


@pytest.mark.slow
def test_the_solution_gets_full_marks_and_the_blank_lab_zero(lab01):
    solved, blank = _row(lab01, "solved.ipynb"), _row(lab01, "blank.ipynb")
    assert _points(solved) == FULL and solved["maximum"] == "10" and solved["status"] == "ok"
    assert solved["reason"] == ""
    assert _points(blank) == {k: "0" for k in FULL} and blank["status"] == "ok"
    assert "lora_forward is not written yet" in _feedback(lab01, "blank.ipynb")


@pytest.mark.slow
def test_lora_scaled_by_alpha_fails_exactly_the_exercises_that_use_the_scaling(lab01):
    """The layer's scaling is wrong; merge() inherits it; forward, injection and training do not."""
    row = _row(lab01, "alpha.ipynb")
    assert _points(row) == {**FULL, "lora_layer": "0", "merge": "0", "total": "5"}, row
    text = _feedback(lab01, "alpha.ipynb")
    assert "FAIL scaling = lora_alpha / r" in text and "expected: 2.0 for r=4, lora_alpha=8" in text
    assert "FAIL merge adds scaling * B @ A to base.weight" in text
    assert "## lora_forward: 2 of 2 (passed)" in text


@pytest.mark.slow
def test_deleting_editing_or_forging_checks_earns_nothing(lab01):
    tampered, alpha = _row(lab01, "tampered.ipynb"), _row(lab01, "alpha.ipynb")
    assert _points(tampered) == _points(alpha) and tampered["status"] == "ok"
    assert "restored" in tampered["reason"]


@pytest.mark.slow
def test_a_runaway_allocation_costs_its_exercise_and_nothing_else(lab01):
    row = _row(lab01, "hostile.ipynb")
    assert _points(row) == {**FULL, "lora_forward": "0", "total": "8"} and row["status"] == "ok"
    assert "memory limit" in row["reason"] and "output past" in row["reason"]
    assert "MemoryError" in _feedback(lab01, "hostile.ipynb") or "allocate" in _feedback(lab01, "hostile.ipynb")


@pytest.mark.slow
@pytest.mark.parametrize("name, status", [("more/crash.ipynb", "crashed"), ("exits.ipynb", "exited"),
                                          ("slow/hangs.ipynb", "timeout"), ("invalid.ipynb", "invalid notebook"),
                                          ("lab02.ipynb", "not a lab 01 notebook")])
def test_broken_notebooks_get_zero_and_a_status_while_the_batch_goes_on(lab01, name, status):
    row = _row(lab01, name)
    assert row["status"] == status and row["total"] == "0" and row["reason"], row
    assert len(lab01["rows"]) == 11  # every submission has its row (ten + the hanging one)
    assert len(lab01["hang"]["rows"]) == 3
    for other in ("invalid.ipynb", "lab02.ipynb"):  # graded the same beside a hanging notebook
        path = str(lab01["folder"] / other)
        assert lab01["hang"]["rows"][path] == lab01["rows"][path]


@pytest.mark.slow
def test_grading_changes_no_submission_and_nothing_in_the_repository(lab01):
    assert lab01["unchanged"]
    assert not (ROOT / "graded-was-here.txt").exists()


@pytest.mark.slow
def test_the_summary_and_chart_are_written(lab01):
    out: Path = lab01["out"]
    md = out.with_suffix(".md").read_text()
    assert "| lora_forward | 2 | 3 of 10 | 30% |" in md and "![pass rate per exercise](gradebook.png)" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert len(lab01["feedback"]) == 10


@pytest.mark.slow
def test_on_lab01_a_hidden_check_fails_a_forward_tuned_to_the_visible_shapes(lab01):
    """The README's hidden check (tests/test_grade_classroom.py tests the rest of hidden checks
    on a stand-in lab): the solution passes it, a forward tuned to the visible shapes not."""
    solved, tuned = _row(lab01, "solved.ipynb"), _row(lab01, "tuned.ipynb")
    assert (solved["lora_forward"], solved["total"]) == ("2", "10"), solved
    assert (tuned["lora_forward"], tuned["total"]) == ("0", "8"), tuned
    tuned_feedback = _feedback(lab01, "tuned.ipynb")
    assert "FAIL (hidden) other shapes" in tuned_feedback  # the visible check passed, the hidden one not
    assert tuned_feedback.count("FAIL") == 1, tuned_feedback


@pytest.mark.slow
def test_one_job_at_a_time_gives_the_same_gradebook(lab01, tmp_path):
    # blank.ipynb runs every cell to the end (model load, the hidden cell), in less time than a
    # solved notebook (no training steps); crash.ipynb ends its kernel.
    names = ["blank.ipynb", "more/crash.ipynb", "invalid.ipynb", "lab02.ipynb"]
    paths = [lab01["folder"] / n for n in names]
    again = _grade_cli(tmp_path, "01", *paths, jobs=1, hidden=lab01["hidden"])
    assert again["rows"] == {str(p): lab01["rows"][str(p)] for p in paths}
    assert again["feedback"] == {k: v for k, v in lab01["feedback"].items()
                                 if k in {feedback_name(str(p)) for p in paths}}
