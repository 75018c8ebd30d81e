"""Put a learner's answers back into the course's copy of the lab.

The learner may change only the stub cells (their answers) and may add cells of their own.
Everything else (setup, markdown, check cells, cells that use the answers) is taken from the
course's lab, so a deleted, edited or weakened check is simply back. Learner cells are matched
to the lab's cells by cell id first (Jupyter keeps ids when a cell is edited), then by their
unchanged source; a cell that matches nothing is the learner's own and stays where it was,
after the last lab cell that precedes it in the learner's notebook, which puts a rewritten
answer in its stub's position.

>>> graded = restore(learner_notebook, lab, lab.notebook())
>>> [c.origin for c in graded.cells][:4]
['course', 'course', 'course', 'learner']
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import nbformat

from loracore.grade.labs import Lab, checked_exercises, is_stub_cell

#: Below this share of the lab's fixed cells found in a notebook, it is not that lab's notebook.
SAME_LAB_SHARE = 0.5


class NotGradable(ValueError):
    """A submission that cannot be graded; ``status`` goes to the gradebook."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class GradedCell:
    """A cell of the notebook that will run: ``origin`` is "course" or "learner"."""

    cell: nbformat.NotebookNode
    origin: str
    checks: list[str] = field(default_factory=list)  # exercises whose check this cell calls


@dataclass
class Restored:
    cells: list[GradedCell]
    restored: int   # lab cells the learner had changed or deleted, put back from the course's copy
    added: int      # the learner's own extra cells, kept


def read_submission(data: bytes, lab: Lab) -> nbformat.NotebookNode:
    """Parse a submitted file; raise :class:`NotGradable` for anything that is not a notebook."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotGradable("invalid notebook", f"not a JSON notebook file: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        raise NotGradable("invalid notebook", "JSON without a list of cells: not a Jupyter notebook")
    try:
        nb = nbformat.reads(json.dumps(raw), as_version=4)
    except Exception as exc:  # nbformat raises several kinds for malformed notebooks
        raise NotGradable("invalid notebook", f"nbformat cannot read it: {exc}"[:300]) from None
    for i, cell in enumerate(nb.cells):
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw") \
                or not isinstance(cell.get("source"), str):
            raise NotGradable("invalid notebook", f"cell {i} is not a code, markdown or raw cell")
    return nb


def _norm(source: str) -> str:
    return source.strip()


def _match(learner: list, lab_cells: list) -> list[int | None]:
    """For each learner cell, the index of the lab cell it is (or None for the learner's own)."""
    matched: list[int | None] = [None] * len(learner)
    taken: set[int] = set()
    by_id = {c.get("id"): k for k, c in enumerate(lab_cells) if c.get("id")}
    for i, cell in enumerate(learner):  # 1. same cell id and type
        k = by_id.get(cell.get("id"))
        if k is not None and k not in taken and lab_cells[k].cell_type == cell.cell_type:
            matched[i] = k
            taken.add(k)
    for k, lab_cell in enumerate(lab_cells):  # 2. an unchanged copy (a notebook re-saved without ids)
        if k in taken:
            continue
        for i, cell in enumerate(learner):
            if matched[i] is None and cell.cell_type == lab_cell.cell_type \
                    and _norm(cell.source) == _norm(lab_cell.source):
                matched[i] = k
                taken.add(k)
                break
    return matched


def restore(learner_nb: nbformat.NotebookNode, lab: Lab, lab_nb: nbformat.NotebookNode) -> Restored:
    """The notebook to run: the lab's fixed cells from the course, the learner's answers and extras.

    Raises :class:`NotGradable` ("not a lab NN notebook") when too few of the lab's fixed cells
    appear in ``learner_nb`` (by id or unchanged source).
    """
    lab_cells = lab_nb.cells
    learner = [c for c in learner_nb.cells if c.cell_type in ("code", "markdown")]
    matched = _match(learner, lab_cells)
    fixed = [k for k, c in enumerate(lab_cells) if not is_stub_cell(c)]
    found = {k for k in matched if k is not None}
    if not fixed or len(found & set(fixed)) < SAME_LAB_SHARE * len(fixed):
        raise NotGradable(f"not a lab {lab.number} notebook",
                          f"only {len(found & set(fixed))} of the {len(fixed)} cells of "
                          f"{lab.path.name} that learners do not edit are in it")
    # Learner cells that are not a lab cell follow the last lab cell before them (-1: the top).
    after: dict[int, list] = {}
    stub_answer: dict[int, nbformat.NotebookNode] = {}
    anchor = -1
    for cell, k in zip(learner, matched):
        if k is None:
            after.setdefault(anchor, []).append(cell)
        else:
            anchor = k
            if is_stub_cell(lab_cells[k]):
                stub_answer[k] = cell

    def learner_cell(cell: nbformat.NotebookNode) -> GradedCell:
        if cell.cell_type == "code":
            clean = nbformat.v4.new_code_cell(cell.source)
        else:
            clean = nbformat.v4.new_markdown_cell(cell.source)
        return GradedCell(clean, "learner")

    cells = [learner_cell(c) for c in after.get(-1, [])]
    restored = 0
    for k, lab_cell in enumerate(lab_cells):
        if is_stub_cell(lab_cell):
            if k in stub_answer:
                cells.append(learner_cell(stub_answer[k]))
        else:
            mine = [c for c, m in zip(learner, matched) if m == k]
            if not mine or _norm(mine[0].source) != _norm(lab_cell.source):
                restored += 1
            course = copy.deepcopy(lab_cell)
            if course.cell_type == "code":
                course.outputs, course.execution_count = [], None
            cells.append(GradedCell(course, "course", checked_exercises(course, lab)))
        cells.extend(learner_cell(c) for c in after.get(k, []))
    added = sum(len(v) for v in after.values())
    return Restored(cells, restored, added)
