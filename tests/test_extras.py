"""The pip extras: pyproject.toml and loracore.extras name the same packages, and a command used
without its extra says which one to install (the missing package is simulated in a fresh
process by ``sys.modules[name] = None``, which makes ``import name`` fail)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loracore.extras import EXTRAS, MissingExtra, require_extra

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_each_extra_in_pyproject_is_the_table_in_loracore_extras():
    extras = _project()["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        assert sorted(_name(r) for r in extras[extra]) == sorted(packages), extra
    assert set(extras) == set(EXTRAS) | {"course"}


def test_course_installs_every_extra_with_the_same_pins_and_the_library_none_of_them():
    project = _project()
    extras = project["optional-dependencies"]
    course = set(extras["course"])
    for extra in EXTRAS:
        assert set(extras[extra]) <= course, f"{extra}: not in course, or pinned differently"
    core = {_name(r) for r in project["dependencies"]}
    assert not core & {p for packages in EXTRAS.values() for p in packages}


def test_require_extra_passes_when_installed_and_refuses_an_unknown_extra():
    for extra in EXTRAS:  # the test environment is the course's: everything is installed
        require_extra(extra, "this test")
    with pytest.raises(ValueError, match="unknown extra 'gui'.*'grade', 'serve'"):
        require_extra("gui", "this test")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_missing_extra_names_the_extra_and_the_missing_packages():
    run = _run("import sys; sys.modules['uvicorn'] = None\n"
               "from loracore.extras import MissingExtra, require_extra\n"
               "try:\n"
               "    require_extra('serve', 'python -m loracore.serve')\n"
               "except MissingExtra as e:\n"
               "    assert isinstance(e, ModuleNotFoundError) and e.name == 'uvicorn', e.name\n"
               "    print(e)\n")
    assert run.returncode == 0, run.stderr
    assert "python -m loracore.serve needs uvicorn," in run.stdout
    assert "pip install 'loracore[serve]'" in run.stdout and "fastapi" not in run.stdout
    assert issubclass(MissingExtra, ImportError)


def test_the_server_module_without_fastapi_says_install_the_serve_extra():
    run = _run("import sys; sys.modules['fastapi'] = None\nimport loracore.serve.server")
    assert run.returncode != 0
    assert "MissingExtra" in run.stderr and "loracore.serve.server needs fastapi" in run.stderr
    assert "pip install 'loracore[serve]'" in run.stderr
    # the engine itself needs no extra
    run = _run("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
               "from loracore.serve import Engine, AdapterRegistry")
    assert run.returncode == 0, run.stderr


def test_python_m_loracore_serve_without_uvicorn_exits_2_naming_the_extra():
    run = _run("import sys; sys.modules['uvicorn'] = None\n"
               "from loracore.serve.__main__ import main\n"
               "sys.exit(main(['--model', 'tiny-qwen2']))")
    assert run.returncode == 2, run.stderr
    assert "loracore.serve: python -m loracore.serve needs uvicorn" in run.stderr
    assert "pip install 'loracore[serve]'" in run.stderr


def test_loracore_grade_without_nbformat_exits_2_before_grading(tmp_path):
    out = tmp_path / "gradebook.csv"
    run = _run("import sys; sys.modules['nbformat'] = None; sys.modules['matplotlib'] = None\n"
               "from loracore.cli import main\n"
               f"sys.exit(main(['grade', 'lab01', {str(tmp_path)!r}, '--out', {str(out)!r}]))")
    assert run.returncode == 2, run.stderr
    assert "error: loracore grade needs nbformat, matplotlib," in run.stderr
    assert "pip install 'loracore[grade]'" in run.stderr
    assert not out.exists()
