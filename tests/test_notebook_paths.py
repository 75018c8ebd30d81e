"""Every learner's path: what the notebooks store and how they choose their model and device.

- Stored outputs are what a learner reads before running anything, on their own machine: no
  absolute path of the machine that ran them, no temporary folder's name, no host name, and no
  reference to a file the learner does not have.
- Every notebook that loads a base model asks :func:`loracore.models.pick_device` and puts every
  model it loads there; none hard-codes a course model or branches on a model's class name, so
  the same cells work on Qwen2-0.5B, SmolLM2-135M and a GPU.
"""

from __future__ import annotations

import ast
import re
import socket
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb as nbtools  # noqa: E402

NOTEBOOKS = nbtools.all_notebooks()
IDS = [f"{p.parent.name}/{p.name}" for p in NOTEBOOKS]

#: Text a stored output must not contain, with why.
MACHINE_SPECIFIC = [
    (re.compile(r"(?<![\w.~])/(home|root|Users|tmp|var/folders|private/var|work|mnt|opt|srv)/"),
     "an absolute path of the machine that ran it"),
    (re.compile(r"\b[A-Z]:\\\\"), "a Windows drive path"),
    (re.compile(r"\btmp[a-z0-9_]{8}\b|\bpytest-of-\w+|\b\w+-[a-z0-9_]{8}/pages\.bin"),
     "a temporary folder's random name"),
    (re.compile(r"\.venv/lib/python"), "a path inside the machine's virtual environment"),
]
#: Files of the course's authors that learners do not get.
NOT_SHIPPED = re.compile(r"\b(COURSE\.md|STYLE\.md|\.\./shared\b|the brief\b)")


def _outputs(cell) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            texts.append(out["text"])
        for mime, value in out.get("data", {}).items():
            if mime.startswith("text/"):
                texts.append(value if isinstance(value, str) else "".join(value))
        if "traceback" in out:
            texts.append("\n".join(out["traceback"]))
    return texts


def machine_specific(text: str) -> list[str]:
    """What in ``text`` names the machine that produced it, one line per finding."""
    found = []
    for pattern, why in MACHINE_SPECIFIC:
        found += [f"{why}: {m.group(0)!r}" for m in pattern.finditer(text)]
    host = socket.gethostname()
    if len(host) >= 6 and host in text:
        found.append(f"this machine's host name {host!r}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_outputs_name_nothing_of_the_machine_that_ran_them(path):
    nb = nbformat.read(path, as_version=4)
    problems = [f"cell {i}: {p}" for i, cell in enumerate(nb.cells) for text in _outputs(cell)
                for p in machine_specific(text)]
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebooks_cite_only_what_learners_have(path):
    nb = nbformat.read(path, as_version=4)
    problems = [f"cell {i}: {m.group(0)!r}" for i, cell in enumerate(nb.cells)
                for text in [cell.source, *_outputs(cell)] for m in NOT_SHIPPED.finditer(text)]
    assert not problems, f"{path.name} cites files learners do not have: " + "; ".join(problems)


@pytest.mark.parametrize("text, bad", [
    ("Adapter saved to /home/ann/course/runs/one", True),
    ("page file: /tmp/loracore-pages-mpr09s8g/pages.bin", True),
    ("refused: load_adapter: /tmp/tmp36nu583u/capitals was trained", True),
    ("Adapter saved to runs/lesson11/one", False),
    ("see ~/.cache/loracore/smollm2-135m-instruct", False),
    ("logits (batch, seq, vocab): (1, 7, 49152); 3/4 right", False),
])
def test_the_scan_finds_machine_paths_and_only_them(text, bad):
    assert bool(machine_specific(text)) == bad


# --------------------------------------------------------------------------- model and device


def _code(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def _parse(path: Path) -> ast.AST:
    # cells may hold IPython syntax (%magic, !shell); the course's do not, but keep the test honest
    lines = [line for line in _code(path).splitlines() if not line.lstrip().startswith(("%", "!"))]
    return ast.parse("\n".join(lines), filename=str(path))


LOADERS = [p for p in NOTEBOOKS if "load_base_model(" in _code(p) or "--model" in _code(p)]


def test_the_model_loading_notebooks_are_found():
    names = {p.name for p in LOADERS}
    assert len(LOADERS) >= 15 and "lab02_finetune_qwen2.ipynb" in names, sorted(names)


@pytest.mark.parametrize("path", LOADERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_model_loading_notebook_asks_pick_device_and_uses_it(path):
    tree = _parse(path)
    assert _calls(tree, "pick_device"), f"{path.name} loads a model but never asks pick_device()"
    for call in _calls(tree, "load_base_model"):
        if any(k.arg == "device" for k in call.keywords):
            continue
        # inside a subprocess's source (a string) the probe measures the CPU process on purpose
        pytest.fail(f"{path.name} line {call.lineno}: load_base_model(...) without device=: "
                    "the model would stay on the CPU on a GPU machine")


@pytest.mark.parametrize("path", LOADERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_notebook_hard_codes_a_model_or_branches_on_its_class(path):
    tree = _parse(path)
    for call in _calls(tree, "load_base_model"):
        if call.args and isinstance(call.args[0], ast.Constant):
            pytest.fail(f"{path.name} line {call.lineno}: load_base_model({call.args[0].value!r}) "
                        "hard-codes a model where the learner's belongs")
    for node in ast.walk(tree):
        if isinstance(node, (ast.IfExp, ast.If, ast.Compare)):
            text = ast.unparse(node)
            if "__name__" in text and "type(" in text and ("==" in text or " in " in text):
                pytest.fail(f"{path.name} line {node.lineno}: branches on a model's class name: {text[:80]}")
