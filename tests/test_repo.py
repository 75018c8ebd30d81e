"""The course as a whole: dependencies agree, notebooks are clean, labs match their solutions."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb as nbtools  # noqa: E402


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["course"]}
    env = (ROOT / "environment.yml").read_text()
    pip_block = env.split("- pip:", 1)[1]
    listed = {_norm(line.strip()[2:]) for line in pip_block.splitlines()
              if line.strip().startswith("- ") and not line.strip().startswith("- -e")}
    assert listed == wanted, (f"only in environment.yml: {sorted(listed - wanted)}; "
                              f"only in pyproject.toml: {sorted(wanted - listed)}")
    python = re.search(r"-\s*python\s*(\S+)", env).group(1)
    assert python == project["requires-python"]


NOTEBOOKS = nbtools.all_notebooks()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_clean(path):
    assert nbtools.problems(path) == [], f"{path.name}: run `make clean-nb`"


def test_notebook_names_follow_the_convention():
    for path in NOTEBOOKS:
        pattern = r"\d\d_[a-z0-9_]+\.ipynb" if path.parent.name == "lessons" else r"lab\d\d_[a-z0-9_]+\.ipynb"
        assert re.fullmatch(pattern, path.name), f"{path.parent.name}/{path.name}"


def test_labs_are_in_sync_with_solutions():
    assert nbtools.main(["check-labs"]) == 0, "run `make labs`"


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    missing = [f"{p.parent.name}/{p.name}" for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"README.md's lesson table does not mention {missing}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_the_makefile_runs_the_short_mode_of_loracore_env():
    """``make test`` and ``loracore grade`` run one short mode: the Makefile's TEST_ENV spells
    loracore.env.SHORT_MODE for make, variable for variable, in the same order."""
    from loracore.env import SHORT_MODE
    line = re.search(r"^TEST_ENV\s*:=\s*(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert line, "the Makefile has no TEST_ENV := ... line"
    assert line.group(1).split() == [f"{k}={v}" for k, v in SHORT_MODE.items()], (
        f"the Makefile's TEST_ENV is {line.group(1)!r}; loracore/env.py's SHORT_MODE is {SHORT_MODE}")


def _resolves(dotted: str) -> bool:
    """``loracore.a.b``: the longest importable module prefix, then attributes."""
    import importlib
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_contributing_names_only_what_exists():
    """CONTRIBUTING.md once sent contributors to ``loracore.selfcheck.run_checks``, which never
    existed: every ``loracore.…`` name it gives, and every name its self-check line gives,
    must be importable."""
    import loracore.selfcheck as selfcheck
    text = (ROOT / "CONTRIBUTING.md").read_text()
    missing = [d for d in sorted(set(re.findall(r"`(loracore(?:\.\w+)+)[`(]", text))) if not _resolves(d)]
    line = next(l for l in text.splitlines() if l.startswith("- Self-checks:"))
    names = {n.split(".")[0] for n in re.findall(r"`@?([A-Za-z_][\w.]*)", line)} - {"loracore"}
    missing += [f"loracore.selfcheck.{n}" for n in sorted(names) if not hasattr(selfcheck, n)]
    assert not missing, f"CONTRIBUTING.md names {missing}, which do not exist"


# --------------------------------------------------------------------------- the lab generator


def _solution_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Lab"),
        nbformat.v4.new_code_cell("import math", execution_count=1,
                                  outputs=[nbformat.v4.new_output("stream", text="ready\n")]),
        nbformat.v4.new_code_cell(
            "def area(r):\n    ### BEGIN SOLUTION radius squared times pi\n    return math.pi * r**2\n"
            "    ### END SOLUTION", execution_count=2),
        nbformat.v4.new_code_cell("print(area(1.0))", execution_count=3,
                                  outputs=[nbformat.v4.new_output("stream", text="3.14\n")],
                                  metadata={"tags": ["uses-exercise"]}),
    ]
    return nb


def test_lab_replaces_solutions_with_a_stub_that_raises():
    lab = nbtools.make_lab(_solution_notebook(), "lab99_test.ipynb")
    stub = lab.cells[2].source
    assert "return math.pi" not in stub and "BEGIN SOLUTION" not in stub
    assert "    # YOUR CODE HERE: radius squared times pi" in stub
    namespace: dict = {}
    exec("import math\n" + stub, namespace)
    with pytest.raises(NotImplementedError):
        namespace["area"](1.0)
    # the check cell may fail until solved, and shows no answer
    assert "raises-exception" in lab.cells[3].metadata["tags"] and lab.cells[3].outputs == []
    # setup cells keep their outputs
    assert lab.cells[1].outputs[0].text == "ready\n" and "tags" not in lab.cells[1].metadata


@pytest.mark.parametrize("source", [
    "### BEGIN SOLUTION\nx = 1",
    "x = 1\n### END SOLUTION",
    "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION",
])
def test_unbalanced_solution_markers_are_refused(source):
    nb = _solution_notebook()
    nb.cells[2].source = source
    with pytest.raises(ValueError, match="lab99"):
        nbtools.make_lab(nb, "lab99_test.ipynb")


def test_clean_numbers_cells_and_drops_noise():
    nb = _solution_notebook()
    nb.metadata["widgets"] = {"state": {}}
    nb.cells[1].execution_count = 17
    nb.cells[1].metadata["scrolled"] = True
    nb.cells[1].outputs[0].text = "step 1\rstep 2\rdone\n"
    cleaned = nbtools.clean(nb)
    assert "widgets" not in cleaned.metadata
    assert [c.get("execution_count") for c in cleaned.cells[1:]] == [1, None, 2]
    assert cleaned.cells[1].metadata == {} and cleaned.cells[1].outputs[0].text == "done\n"
    assert nbformat.writes(nbtools.clean(cleaned)) == nbformat.writes(cleaned)  # idempotent


def test_a_notebook_that_lost_its_figures_is_flagged(tmp_path):
    """Executed with a non-interactive backend (MPLBACKEND=Agg), a drawing cell stores no image:
    nb.py check must say so, and a cell with its image (or a live widget) passes."""
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    png = new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    text = new_output("stream", name="stdout", text="ok\n")
    nb = new_notebook(cells=[new_code_cell("print('ok')", outputs=[text]),
                             new_code_cell("fig, ax = plt.subplots()\nax.plot([1, 2])", outputs=[png]),
                             new_code_cell("plt.show()", outputs=[]),
                             new_code_cell("display(widgets.VBox([]))\nax.plot([1])", outputs=[])])
    path = tmp_path / "figs.ipynb"
    nbformat.write(nbtools.clean(nb), path)
    assert nbtools.figures_missing(nbformat.read(path, as_version=4)) == [2]
    assert any("cells [2] draw a figure but store none" in p for p in nbtools.problems(path))
