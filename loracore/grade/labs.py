"""What the grader knows about a lab: its notebook, its exercises and points, its kinds of cells.

A lab follows the course's conventions (CONTRIBUTING.md): ``labs/labNN_topic.ipynb`` is
generated from ``solutions/labNN_topic.ipynb``; each answer became a stub cell that raises
``NotImplementedError``; ``loracore.checks.labNN`` holds the checks, each marked with
``@exercise(points=...)``; a check cell calls one of them (``checks.check_merge(...)`` or
``check_merge(...)``).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import nbformat

from loracore.argtypes import lab_number_or_none

# nbformat is imported where a notebook is read, torch (through the lab's checks) where a lab
# is found: the kernel's launcher (loracore.grade.sandbox) and each submission's runner import
# this package, and those imports cost seconds of CPU each (nbformat's jsonschema builds an IRI
# parser as it loads).

#: The course's copy of the labs (the repository's ``labs/`` folder).
LABS_DIR = Path(__file__).resolve().parent.parent.parent / "labs"

#: The line ``tools/nb.py make-labs`` puts where each answer goes (tests/test_grade.py keeps
#: the two in step).
STUB = 'raise NotImplementedError("Exercise: replace this line with your code.")'


@dataclass(frozen=True)
class Exercise:
    """One graded exercise: ``name`` is its check's name without ``check_``."""

    name: str
    points: float


@dataclass(frozen=True)
class Lab:
    """A lab as the grader sees it."""

    number: str                # "01"
    path: Path                 # the course's labs/labNN_topic.ipynb
    exercises: tuple[Exercise, ...]

    @property
    def name(self) -> str:
        return f"lab{self.number}"

    @property
    def max_points(self) -> float:
        return sum(e.points for e in self.exercises)

    def notebook(self) -> nbformat.NotebookNode:
        import nbformat

        return nbformat.read(self.path, as_version=4)

    def to_json(self) -> dict:
        """The lab as plain JSON data (how the grader hands it to a submission's runner)."""
        return {"number": self.number, "path": str(self.path),
                "exercises": [[e.name, e.points] for e in self.exercises]}

    @classmethod
    def from_json(cls, data: dict) -> Lab:
        """The lab :meth:`to_json` gave, without finding it again (no checks module imported)."""
        return cls(data["number"], Path(data["path"]),
                   tuple(Exercise(name, float(points)) for name, points in data["exercises"]))


def lab_number(lab: str) -> str:
    """``"lab01"``, ``"01"``, ``"1"`` or ``"lab01_lora_layer"`` -> ``"01"``."""
    number = lab_number_or_none(lab)
    if number is None:
        raise ValueError(f"loracore grade: {lab!r} is not a lab; give its name or number, "
                         f"e.g. lab01, 01 or 1")
    return number


def exercises_of(module_name: str) -> tuple[Exercise, ...]:
    """The ``@exercise`` checks of ``loracore.checks.labNN``, in the order they are defined."""
    module = importlib.import_module(module_name)
    found = [Exercise(fn.exercise, float(fn.points)) for fn in vars(module).values()
             if callable(fn) and hasattr(fn, "points") and hasattr(fn, "exercise")
             and getattr(fn, "__module__", None) == module_name]
    if not found:
        raise ValueError(f"{module_name} declares no exercise: mark each check function with "
                         f"@exercise(points=...) from loracore.selfcheck")
    return tuple(found)


def find_lab(lab: str, labs_dir: Path = LABS_DIR) -> Lab:
    """The lab named ``lab`` (see :func:`lab_number`), with its checks' exercises and points."""
    number = lab_number(lab)
    matches = sorted(labs_dir.glob(f"lab{number}_*.ipynb"))
    if len(matches) != 1:
        known = ", ".join(p.stem for p in sorted(labs_dir.glob("lab*.ipynb"))) or "none"
        raise ValueError(f"loracore grade: no single lab{number}_*.ipynb in {labs_dir} "
                         f"({len(matches)} found; labs there: {known})")
    try:
        exercises = exercises_of(f"loracore.checks.lab{number}")
    except ModuleNotFoundError as exc:
        raise ValueError(f"loracore grade: lab {number} has no checks module "
                         f"loracore/checks/lab{number}.py ({exc})") from None
    return Lab(number, matches[0], exercises)


def is_stub_cell(cell: nbformat.NotebookNode) -> bool:
    """True for a lab cell where the learner writes an answer (it holds a generated stub)."""
    return cell.cell_type == "code" and STUB in cell.source


def checked_exercises(cell: nbformat.NotebookNode, lab: Lab) -> list[str]:
    """The exercises whose check a lab cell calls (``check_NAME(`` in its source)."""
    if cell.cell_type != "code":
        return []
    return [e.name for e in lab.exercises if re.search(rf"\bcheck_{e.name}\s*\(", cell.source)]
