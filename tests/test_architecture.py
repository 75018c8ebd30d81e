"""docs/ARCHITECTURE.md as a test: imports only go down, every module has its place, and a
module over 300 lines says why it is still one idea."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loracore"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def module_name(path: Path) -> str:
    """``loracore/serve/engine.py`` -> ``serve.engine``; a package's ``__init__`` -> its name;
    the top ``__init__`` -> ``loracore``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "loracore"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def documented_order() -> list[str]:
    """The modules of the floors table, in the order written (``checks.*`` stands for every
    module of ``loracore/checks``)."""
    table = DOC.read_text().split("## Floors", 1)[1].split("\n## ", 1)[0]
    order: list[str] = []
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) > 3 and cells[1].strip()[:1].isdigit():
            for name in re.findall(r"`([\w.*]+)`", cells[2]):
                if name == "checks.*":
                    order += sorted(m for m in MODULES if m.startswith("checks"))
                else:
                    order.append(name)
    return order


def loracore_imports(path: Path) -> set[str]:
    """Every loracore module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "loracore":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("loracore."):
                found.add(node.module.removeprefix("loracore."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("loracore.") for a in node.names
                         if a.name.startswith("loracore."))
    return {name for name in found if name in MODULES}


def test_the_floors_table_lists_every_module_once():
    order = documented_order()
    duplicates = sorted({m for m in order if order.count(m) > 1})
    assert not duplicates, f"docs/ARCHITECTURE.md lists these twice: {duplicates}"
    unknown = sorted(set(order) - set(MODULES))
    assert not unknown, f"docs/ARCHITECTURE.md lists modules that do not exist: {unknown}"
    missing = sorted(set(MODULES) - set(order))
    assert not missing, (f"add these modules to docs/ARCHITECTURE.md's floors, where their "
                         f"imports allow: {missing}")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_modules_listed_before_it(name):
    order = documented_order()
    if name not in order:
        pytest.skip("not in the table (the test above names it)")
    place = order.index(name)
    upward = sorted(m for m in loracore_imports(MODULES[name])
                    if m != name and m in order and order.index(m) > place)
    assert not upward, (f"loracore.{name} imports {upward}, listed after it in "
                        f"docs/ARCHITECTURE.md: an import that points up or sideways")


def test_the_check_can_fail_on_an_upward_import(tmp_path):
    """The parser sees imports inside functions and ``from loracore import x`` too."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from loracore.serve.engine import Engine\n"
                     "from loracore import layer, not_a_module\n")
    assert loracore_imports(probe) == {"serve.engine", "layer"}


def test_every_module_over_300_lines_says_why_it_is_one_idea():
    doc = DOC.read_text().split("## Modules over 300 lines", 1)[1]
    explained = set(re.findall(r"^\| `([\w/]+\.py)` \|", doc, re.M))
    long = {str(p.relative_to(PACKAGE)) for p in MODULES.values()
            if len(p.read_text().splitlines()) > 300}
    assert long <= explained, (f"over 300 lines and not explained in docs/ARCHITECTURE.md: "
                               f"{sorted(long - explained)}")
    stale = sorted(m for m in explained - long)
    assert not stale, f"docs/ARCHITECTURE.md explains modules no longer over 300 lines: {stale}"


def test_the_package_docstring_names_every_module():
    import loracore

    doc = loracore.__doc__ or ""
    tops = {m.split(".")[0] for m in MODULES if m != "loracore"}
    missing = sorted(m for m in tops if f"``{m}``" not in doc)
    assert not missing, f"loracore/__init__.py's map of the package omits {missing}"


def test_the_readme_library_table_names_every_module():
    readme = (ROOT / "README.md").read_text().split("## The library", 1)[1].split("\n## ", 1)[0]
    tops = {m.split(".")[0] for m in MODULES if m not in ("loracore", "__main__", "_quiet")}
    missing = sorted(m for m in tops
                     if f"loracore/{m}.py" not in readme and f"loracore/{m}/" not in readme)
    assert not missing, f"README's library table omits {missing}"


def test_the_command_line_and_the_grader_start_without_torch():
    """torch, transformers and datasets cost about 5 s of CPU per process: `loracore --help`, a
    refused argument, the grader (whose kernels import them on their own) and the labs' check
    pattern (`selfcheck`, which imports torch only to compare tensors) never load them."""
    code = ("import sys\n"
            "from loracore.cli import build_parser\n"
            "build_parser().parse_args(['grade', 'lab01', 'class'])\n"
            "import loracore.grade, loracore.grade.exports, loracore.grade.gradebook, loracore.selfcheck\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets'})\n"
            "print(heavy)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the command line imported {done.stdout.strip()}"
