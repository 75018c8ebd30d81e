"""`loracore grade` for a classroom: Canvas and Gradescope gradebooks from a roster, hidden checks.

The layouts are tested against the platforms' documented columns (see the docstring of
loracore/grade/exports.py for where each is documented): headers exactly, Canvas's
``Points Possible`` row, plain decimal points, quoted names with commas, UTF-8 without a BOM.
Hidden checks are tested on a small stand-in for lab 01 (a kernel per notebook, seconds each);
on the real lab 01, tests/test_grade.py grades its batch with the README's hidden checks and a
forward tuned to the visible shapes (test_on_lab01_a_hidden_check_fails_a_forward_tuned_to_the_visible_shapes).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from loracore.grade.exports import (CANVAS_IDENTITY, GRADESCOPE_COLUMNS, canvas_rows,
                                    check_roster_for, gradescope_rows, match_roster, points_text,
                                    read_roster, write_rows)
from loracore.grade.gradebook import feedback_markdown
from loracore.grade.hidden import hidden_from_source, load_hidden
from loracore.grade.labs import STUB, Exercise, Lab, find_lab
from loracore.grade.run import Result, Verdict

ROOT = Path(__file__).resolve().parent.parent

# A Canvas gradebook export, as an instructor downloads it: a BOM (Excel), the Points Possible
# row, names "Last, First" (so quoted), accents, a row without a login (the Test Student).
CANVAS_EXPORT = ("\ufeffStudent,ID,SIS User ID,SIS Login ID,Section,Lab 01 (777)\r\n"
                 "    Points Possible,,,,,13\r\n"
                 '"Lovelace, Ada",101,s101,ada@uni.edu,Sec A,\r\n'
                 '"Bobson, Bob",102,s102,bob@uni.edu,Sec A,\r\n'
                 '"Cy, Cyrus ""Cy""",103,s103,cy@uni.edu,Sec B,\r\n'
                 '"Dee, Zoë",104,s104,dee@uni.edu,Sec B,\r\n'
                 '"Ünal, Évelyne",105,s105,eve@uni.edu,Sec B,\r\n'
                 '"Student, Test",106,,,Sec A,\r\n')
GRADESCOPE_ROSTER = ("First Name,Last Name,SID,Email,Role\n"
                     "Ada,Lovelace,s101,ada@uni.edu,Student\n"
                     "Bob,\"Bobson, Jr.\",s102,bob@uni.edu,Student\n"
                     "Zoë,Dee,s104,dee@uni.edu,Student\n")


def _lab(tmp_path: Path) -> Lab:
    return Lab("01", tmp_path / "lab01_x.ipynb", (Exercise("a", 2.5), Exercise("b", 10)))


def _result(path: str, a: float, b: float) -> Result:
    return Result(path, "ok", "", {"a": a, "b": b}, {"a": Verdict(a > 0), "b": Verdict(b > 0)})


def _roster(tmp_path: Path, text: str = CANVAS_EXPORT, key: str | None = None):
    path = tmp_path / "roster.csv"
    path.write_bytes(text.encode("utf-8"))
    return read_roster(path, key)


# --------------------------------------------------------------------------- exports


@pytest.mark.parametrize("points, text", [(10.0, "10"), (7.5, "7.5"), (0.0, "0"), (-0.0, "0"),
                                          (12.5, "12.5"), (1 / 3, "0.3333"), (1234567.0, "1234567"),
                                          (2.00004, "2")])
def test_points_are_plain_decimals(points, text):
    assert points_text(points) == text


def test_a_canvas_roster_skips_points_possible_and_rows_without_the_key(tmp_path):
    roster = _roster(tmp_path)
    assert roster.key == "SIS Login ID" and roster.columns[:5] == CANVAS_IDENTITY
    assert [r["Student"] for r in roster.rows] == ["Lovelace, Ada", "Bobson, Bob", 'Cy, Cyrus "Cy"',
                                                  "Dee, Zoë", "Ünal, Évelyne"]


def test_canvas_gradebook_has_canvas_columns_points_possible_and_quoted_utf8_names(tmp_path):
    lab = _lab(tmp_path)
    subs = [f"class/{name}.ipynb" for name in ("ada@uni.edu", "BOB@uni.edu ", "cy@uni.edu", "dee@uni.edu")]
    results = [_result(subs[0], 2.5, 10), _result(subs[1], 0, 7.5), _result(subs[2], 2.5, 0),
               _result(subs[3], 0, 0)]
    matched = match_roster(_roster(tmp_path), subs)
    assert [r["SIS Login ID"] for r in matched.missing] == ["eve@uni.edu"]
    rows = canvas_rows(lab, results, matched, "Lab 01 (777)")
    assert rows == [
        ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "Lab 01 (777)"],
        ["    Points Possible", "", "", "", "", "12.5"],
        ["Lovelace, Ada", "101", "s101", "ada@uni.edu", "Sec A", "12.5"],
        ["Bobson, Bob", "102", "s102", "bob@uni.edu", "Sec A", "7.5"],
        ['Cy, Cyrus "Cy"', "103", "s103", "cy@uni.edu", "Sec B", "2.5"],
        ["Dee, Zoë", "104", "s104", "dee@uni.edu", "Sec B", "0"],
        ["Ünal, Évelyne", "105", "s105", "eve@uni.edu", "Sec B", ""],  # no submission: blank
    ]
    assert canvas_rows(lab, results, matched, "Lab 01 (777)", missing="zero")[-1][-1] == "0"
    write_rows(tmp_path / "canvas.csv", rows)
    data = (tmp_path / "canvas.csv").read_bytes()
    assert data.startswith(b"Student,ID,SIS User ID,SIS Login ID,Section,Lab 01 (777)\r\n")  # no BOM
    assert b'\r\n    Points Possible,,,,,12.5\r\n' in data
    assert b'"Lovelace, Ada",101,s101,ada@uni.edu,Sec A,12.5\r\n' in data
    assert b'"Cy, Cyrus ""Cy""",103' in data and "Dee, Zoë".encode("utf-8") in data
    assert list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""))) == rows


def test_gradescope_scores_have_its_columns_and_names_split(tmp_path):
    lab = _lab(tmp_path)
    subs = ["x/ada@uni.edu.ipynb", "x/bob@uni.edu.ipynb"]
    results = [_result(subs[0], 2.5, 10), _result(subs[1], 0, 7.5)]
    matched = match_roster(_roster(tmp_path, GRADESCOPE_ROSTER), subs)
    assert matched.roster.key == "Email"
    rows = gradescope_rows(lab, results, matched)
    assert rows == [["First Name", "Last Name", "SID", "Email", "Total Score"],
                    ["Ada", "Lovelace", "s101", "ada@uni.edu", "12.5"],
                    ["Bob", "Bobson, Jr.", "s102", "bob@uni.edu", "7.5"],
                    ["Zoë", "Dee", "s104", "dee@uni.edu", ""]]
    assert rows[0] == GRADESCOPE_COLUMNS
    write_rows(tmp_path / "gs.csv", rows)
    assert (tmp_path / "gs.csv").read_bytes().decode("utf-8").splitlines()[2] == 'Bob,"Bobson, Jr.",s102,bob@uni.edu,7.5'
    # keyed by SID instead: the same rows
    by_sid = match_roster(_roster(tmp_path, GRADESCOPE_ROSTER, key="SID"), ["s101.ipynb", "s102.ipynb"])
    assert gradescope_rows(lab, [_result("s101.ipynb", 2.5, 10), _result("s102.ipynb", 0, 7.5)], by_sid) == rows


def test_a_submission_without_a_roster_row_or_one_learner_twice_is_refused_by_name(tmp_path):
    roster = _roster(tmp_path)
    with pytest.raises(ValueError) as info:
        match_roster(roster, ["a/ada@uni.edu.ipynb", "a/mallory@uni.edu.ipynb", "b/zed.ipynb"])
    assert "2 submission(s)" in str(info.value) and "a/mallory@uni.edu.ipynb" in str(info.value) \
        and "b/zed.ipynb" in str(info.value) and "'SIS Login ID'" in str(info.value)
    with pytest.raises(ValueError, match="a/ada@uni.edu.ipynb and b/ADA@uni.edu.ipynb"):
        match_roster(roster, ["a/ada@uni.edu.ipynb", "b/ADA@uni.edu.ipynb"])


@pytest.mark.parametrize("text, key, message", [
    ("Student,ID,SIS Login ID\nA,1,a\nB,2,a\n", None, "on two rows"),
    ("Name,Notes\nA,x\n", None, "none of the columns"),
    ("Student,ID\nA,1\n", "Email", "no column 'Email'"),
    ("", None, "is empty"),
    ("Student,ID,SIS Login ID\n    Points Possible,,\n", None, "no row"),
])
def test_a_roster_that_cannot_name_submissions_is_refused(tmp_path, text, key, message):
    with pytest.raises(ValueError, match=message):
        _roster(tmp_path, text, key)


def test_a_roster_that_is_not_utf8_or_lacks_the_platforms_identity_is_refused(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("Student,SIS Login ID\nZo\xeb,z\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_roster(tmp_path / "latin1.csv")
    canvas_only = _roster(tmp_path)
    with pytest.raises(ValueError, match="Gradescope matches students by"):
        check_roster_for(canvas_only, "gradescope")
    gradescope_only = _roster(tmp_path, GRADESCOPE_ROSTER)
    with pytest.raises(ValueError, match="Canvas matches students by"):
        check_roster_for(gradescope_only, "canvas")


# --------------------------------------------------------------------------- hidden checks: the file

HIDDEN = textwrap.dedent("""\
    # HIDDEN-MARKER-5e1f: this text must never reach a learner's kernel before its last cell
    from loracore.selfcheck import Check, call_learner, exercise, report

    @exercise(points=2)
    def check_lora_forward(double):
        report("double, hidden", [Check.equal("double(5) == 10", call_learner(double, 5), 10,
                                              hint="HIDDEN-HINT")])

    @exercise(points=3)
    def check_generalises(double):
        got = [call_learner(double, x) for x in (-3, 0, 7)]
        report("generalises", [Check.equal("double on -3, 0, 7", got, [-6, 0, 14], hint="HIDDEN-HINT")])
    """)


def test_hidden_checks_tighten_the_labs_exercises_and_add_their_own(tmp_path):
    lab = find_lab("lab01")
    hidden = hidden_from_source(HIDDEN, lab)
    assert hidden.checks == ("lora_forward", "generalises")
    assert hidden.extra == (Exercise("generalises", 3.0),)
    extended = hidden.extend(lab)
    assert [e.name for e in extended.exercises][-2:] == ["loss_fell", "generalises"]
    assert extended.max_points == lab.max_points + 3


@pytest.mark.parametrize("source, message", [
    ("def check_x(a):\n    pass\n", "not marked @exercise"),
    ("x = 1\n", "define no check"),
    ("import nowhere_such_module\n", "do not run: ModuleNotFoundError"),
    ("from loracore.selfcheck import exercise\n@exercise(points=5)\ndef check_lora_forward(f):\n    pass\n",
     "declares 5 points, but lab 01's exercise lora_forward is worth 2"),
    ("from loracore.checks.lab01 import check_merge\n", "define no check"),  # imported, not its own
])
def test_a_hidden_checks_file_that_is_wrong_is_refused_naming_it(tmp_path, source, message):
    path = tmp_path / "hidden_lab01.py"
    path.write_text(source)
    with pytest.raises(ValueError, match=message) as info:
        load_hidden(path, find_lab("lab01"))
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no hidden checks file"):
        load_hidden(tmp_path / "nowhere.py", find_lab("lab01"))


def test_feedback_names_a_failed_hidden_check_but_not_what_it_expects(tmp_path):
    lab = Lab("01", tmp_path / "lab01_x.ipynb", (Exercise("a", 2),))
    verdict = Verdict(False, [{"name": "shown", "expected": "1", "got": "2", "hint": "visible hint"},
                              {"name": "double(5) == 10", "hidden": "yes"}])
    text = feedback_markdown(lab, Result("x.ipynb", "ok", "", {"a": 0.0}, {"a": verdict}))
    assert "- FAIL shown" in text and "visible hint" in text
    assert "- FAIL (hidden) double(5) == 10" in text and text.count("expected:") == 1


# --------------------------------------------------------------------------- through the command

NAMES = [("lora_forward", 2), ("lora_layer", 3), ("merge", 2), ("inject", 2), ("loss_fell", 1)]
SETUP = textwrap.dedent("""\
    from loracore.selfcheck import Check, call_learner, exercise, report

    def _check(name, points):
        def check(double):
            report(name, [Check.equal("double(2) == 4", call_learner(double, 2), 4)])
        check.__name__ = "check_" + name
        return exercise(points)(check)

    for _name, _points in %r:
        globals()["check_" + _name] = _check(_name, _points)
    """ % NAMES)
REAL = "def double(x):\n    return 2 * x"
TUNED = "def double(x):\n    return 4 if x == 2 else 0  # passes the visible check only"
# Looks for the hidden checks' text wherever a learner's cell could, before the hidden cell runs;
# always raises, so that its message (in the feedback) shows it ran.
PROBE = textwrap.dedent("""\
    import os, sys
    marker, found = "HIDDEN-MARKER-" + "5e1f", []
    found += [f"env {k}" for k, v in os.environ.items() if marker in v]
    found += ["argv"] if marker in " ".join(sys.argv) else []
    found += [f"global {k}" for k, v in list(globals().items())
              if k != "marker" and isinstance(v, str) and marker in v]
    for root, _, files in os.walk("."):
        for f in files:
            try:
                if marker in open(os.path.join(root, f), errors="ignore").read():
                    found.append(os.path.join(root, f))
            except OSError:
                pass
    raise RuntimeError(f"probe ran, marker found in {found}" if found else "probe ran, marker not found")
    """)
FORGE = textwrap.dedent("""\
    import json, os
    for name in ["lora_forward", "generalises"]:
        open(os.environ["LORACORE_VERDICTS"], "a").write(json.dumps(
            {"exercise": name, "passed": True, "checks": 1, "failed": [], "error": ""}) + "\\n")
    def check_generalises(double):  # a learner's own "hidden" check, which never runs
        pass
    """)


def _fake_lab(folder: Path) -> Path:
    """``labs/lab01_fake.ipynb``: the setup, one stub, one check cell per exercise of lab 01."""
    cells = [nbformat.v4.new_markdown_cell("# Lab 01, a stand-in"), nbformat.v4.new_code_cell(SETUP),
             nbformat.v4.new_code_cell(STUB)]
    cells += [nbformat.v4.new_code_cell(f"check_{name}(double)") for name, _ in NAMES]
    for i, cell in enumerate(cells):
        cell.id = f"cell{i:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), folder / "lab01_fake.ipynb")
    return folder


def _notebook(labs: Path, path: Path, answer: str, *extra: str, at_end: bool = False) -> None:
    nb = nbformat.read(labs / "lab01_fake.ipynb", as_version=4)
    nb.cells[2].source = answer
    for k, code in enumerate(extra):
        nb.cells.insert(len(nb.cells) if at_end else 3 + k, nbformat.v4.new_code_cell(code))
    nbformat.write(nb, path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "loracore", "grade", *args], capture_output=True,
                          text=True, env=env, timeout=900)


def test_bad_roster_or_hidden_file_stops_the_command_before_any_grading(tmp_path, capsys):
    from loracore.cli import main

    labs = _fake_lab(tmp_path / "labs")
    (tmp_path / "class").mkdir()
    _notebook(labs, tmp_path / "class" / "mallory@uni.edu.ipynb", REAL)
    (tmp_path / "roster.csv").write_text(CANVAS_EXPORT, encoding="utf-8")
    common = ["grade", "01", str(tmp_path / "class"), "--labs", str(labs), "--out", str(tmp_path / "g.csv")]

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main([*common, *args]) == 2
        return capsys.readouterr().err

    assert "need --roster" in refused("--canvas", str(tmp_path / "c.csv"))
    err = refused("--roster", str(tmp_path / "roster.csv"), "--canvas", str(tmp_path / "c.csv"))
    assert "mallory@uni.edu.ipynb" in err and "'SIS Login ID'" in err, err
    err = refused("--roster", str(tmp_path / "roster.csv"), "--gradescope", str(tmp_path / "s.csv"))
    assert "Gradescope matches students by" in err
    (tmp_path / "bad.py").write_text("def check_x(a):\n    pass\n")
    assert "not marked @exercise" in refused("--hidden", str(tmp_path / "bad.py"))
    assert "no hidden checks file" in refused("--hidden", str(tmp_path / "nowhere.py"))
    assert not (tmp_path / "g.csv").exists() and not (tmp_path / "c.csv").exists()


def test_hidden_checks_fail_an_answer_tuned_to_the_visible_ones_and_canvas_gets_the_totals(tmp_path):
    labs = _fake_lab(tmp_path / "labs")
    cls = tmp_path / "class"
    cls.mkdir()
    _notebook(labs, cls / "ada@uni.edu.ipynb", REAL, PROBE)
    _notebook(labs, cls / "bob@uni.edu.ipynb", TUNED)
    _notebook(labs, cls / "cy@uni.edu.ipynb", TUNED, FORGE, at_end=True)  # just before the hidden cell
    _notebook(labs, cls / "dee@uni.edu.ipynb", REAL, "import sys\nsys.exit(0)", at_end=True)
    (tmp_path / "hidden.py").write_text(HIDDEN)
    (tmp_path / "roster.csv").write_text(CANVAS_EXPORT, encoding="utf-8")
    out = tmp_path / "out" / "gradebook.csv"
    proc = _cli("01", str(cls), "--labs", str(labs), "--out", str(out), "--feedback",
                str(tmp_path / "fb"), "--jobs", "2", "--timeout", "120", "--hidden",
                str(tmp_path / "hidden.py"), "--roster", str(tmp_path / "roster.csv"),
                "--canvas", str(tmp_path / "canvas.csv"), "--assignment", "Lab 01 (777)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 learner(s) of the roster have no submission (score blank): eve@uni.edu" in proc.stderr
    rows = {Path(r["submission"]).stem: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    columns = ["lora_forward", "lora_layer", "merge", "inject", "loss_fell", "generalises", "total",
               "maximum"]
    got = {k: [r[c] for c in columns] + [r["status"]] for k, r in rows.items()}
    assert got == {
        "ada@uni.edu": ["2", "3", "2", "2", "1", "3", "13", "13", "ok"],
        "bob@uni.edu": ["0", "3", "2", "2", "1", "0", "8", "13", "ok"],    # tuned: hidden fails
        "cy@uni.edu": ["0", "3", "2", "2", "1", "0", "8", "13", "ok"],     # forged: counts nothing
        "dee@uni.edu": ["0", "3", "2", "2", "1", "0", "8", "13", "exited"],  # hidden never ran
    }
    feedback = {p.stem.rpartition("class_")[2]: p.read_text() for p in (tmp_path / "fb").glob("*.md")}
    ada = feedback["ada_uni.edu"]
    assert "probe ran, marker not found" in ada, ada
    bob = feedback["bob_uni.edu"]
    assert "FAIL (hidden) double(5) == 10" in bob and "HIDDEN-HINT" not in bob
    assert "## generalises: 0 of 3 (not passed)" in bob
    assert "hidden check did not run to a verdict" in feedback["dee_uni.edu"]
    canvas = (tmp_path / "canvas.csv").read_bytes().decode("utf-8")
    assert canvas.splitlines() == [
        "Student,ID,SIS User ID,SIS Login ID,Section,Lab 01 (777)",
        "    Points Possible,,,,,13",
        '"Lovelace, Ada",101,s101,ada@uni.edu,Sec A,13',
        '"Bobson, Bob",102,s102,bob@uni.edu,Sec A,8',
        '"Cy, Cyrus ""Cy""",103,s103,cy@uni.edu,Sec B,8',
        '"Dee, Zoë",104,s104,dee@uni.edu,Sec B,8',
        '"Ünal, Évelyne",105,s105,eve@uni.edu,Sec B,',
    ]
    # The lab notebook the learners were given holds no hidden text.
    assert "HIDDEN-MARKER" not in (labs / "lab01_fake.ipynb").read_text()


# --------------------------------------------------------------------------- the README's example

def _readme_hidden_example() -> str:
    """The hidden-checks file the README shows (so the README's example is the one tested)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("# hidden/lab01.py\n", 1)[1].split("```", 1)[0]
    return textwrap.dedent(block)


def test_the_readmes_hidden_checks_example_is_a_valid_file_for_lab01():
    hidden = hidden_from_source(_readme_hidden_example(), find_lab("lab01"))
    assert hidden.checks == ("lora_forward",) and hidden.extra == ()
