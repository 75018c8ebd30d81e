"""Hidden checks: an instructor's checks that run only at grading, never shown in the lab.

A hidden-checks file is Python beside the course (``hidden/lab01.py``), written like a lab's
checks module: each check is a function ``check_NAME`` marked ``@exercise(points=...)`` that
builds :class:`~loracore.selfcheck.Check` results and hands them to ``report``. Its parameters
are *names of the learner's notebook*: ``def check_lora_forward(lora_forward)`` is called with
the notebook's ``lora_forward``. Two kinds, by name:

- ``check_NAME`` for one of the lab's exercises tightens it: the exercise passes only if its
  visible check *and* every hidden check for it pass; it must declare the same points;
- any other ``check_NAME`` is a hidden exercise of its own, with its own points: one more
  column of the gradebook (after the lab's).

How it runs: :func:`load_hidden` runs the file in the grader (to find its checks, or to refuse
it with a message naming the file) and keeps its source. Each submission's runner appends one
cell to the restored notebook, after the last one, that builds the checks from that source and
calls them: in the same sandboxed kernel, after the learner's code. The verdict file is
emptied before that cell and read right after it, like a course's check cell, and only the
records of the hidden checks count from it. A hidden check that gives no verdict (the
notebook stopped before the end, the kernel died, the name is not defined) fails.

What is guaranteed: the source is in no file the learner is given, and not in the kernel's
environment, arguments or working folder; it reaches the kernel as the text of the last cell,
after every learner cell has run (a cell that the grader made, not one restored or kept from
the notebook: the learner cannot add, edit or reorder it); a verdict written by a learner's
cell for a hidden exercise counts for nothing; the feedback names a failed hidden check
(``FAIL (hidden) NAME``) without its expected value, output or hint.

What is not: the checks run in the learner's process, as the visible ones do, so learner code
that runs *during* the hidden cell (an IPython ``pre_run_cell`` hook or input transformer
registered earlier, a replaced ``selfcheck._record`` or ``torch.allclose``, a thread) can read
that cell's source, rewrite it or forge its verdicts (a rewritten cell that reports nothing
fails the hidden checks; one that writes passing verdicts is the forgery the README names); and the kernel may read any file the grading user may (the sandbox limits
writes, not reads), the hidden file included if its path is found (it is in the grader's
command line, ``/proc/PID/cmdline``). Hidden checks stop a learner who tuned an answer to the
visible checks; they do not stop one who attacks the grader, which is for a reviewer to spot.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING, Any

from loracore.grade.labs import Exercise, Lab
from loracore.grade.verdicts import Verdict, merge_record

if TYPE_CHECKING:  # imported where used: nbformat costs seconds (see loracore.grade.labs)
    from loracore.grade.restore import GradedCell

#: How the hidden checks' code is named in tracebacks (never the file's path).
HIDDEN_FILENAME = "<hidden checks>"


@dataclass(frozen=True)
class Hidden:
    """The hidden checks of one lab: their source, which exercise each grades, and the new ones."""

    source: str
    checks: tuple[str, ...]          # exercise names, one per check function, in file order
    extra: tuple[Exercise, ...]      # hidden exercises that are not the lab's own
    path: str | None = None          # the file they came from: the kernels may not read it

    def extend(self, lab: Lab) -> Lab:
        """``lab`` with the hidden exercises after its own (gradebook columns, points)."""
        return dataclasses.replace(lab, exercises=lab.exercises + self.extra)

    def to_json(self) -> dict:
        """The checks as plain JSON data (how the grader hands them to a submission's runner)."""
        return {"source": self.source, "checks": list(self.checks), "path": self.path,
                "extra": [[e.name, e.points] for e in self.extra]}

    @classmethod
    def from_json(cls, data: dict) -> Hidden:
        """The checks :meth:`to_json` gave, as the grader checked them (their source not run)."""
        return cls(data["source"], tuple(data["checks"]),
                   tuple(Exercise(name, float(points)) for name, points in data["extra"]), data["path"])


def checks_of(source: str, origin: str) -> list[tuple[str, float]]:
    """Run ``source`` as a module and return its ``@exercise`` checks as (exercise, points).

    Raises ``ValueError`` naming ``origin`` for code that does not run, a ``check_`` function
    without ``@exercise``, or a file without any check.
    """
    module = types.ModuleType("loracore_hidden_checks")
    try:
        exec(compile(source, origin, "exec"), module.__dict__)
    except Exception as exc:
        raise ValueError(f"loracore grade: the hidden checks {origin} do not run: "
                         f"{type(exc).__name__}: {exc}") from None
    found, unmarked = [], []
    for name, fn in vars(module).items():
        if not (name.startswith("check_") and callable(fn)) \
                or getattr(fn, "__module__", None) != module.__name__:
            continue  # not a check, or one imported from elsewhere
        if hasattr(fn, "points") and hasattr(fn, "exercise"):
            found.append((fn.exercise, float(fn.points)))
        else:
            unmarked.append(name)
    if unmarked:
        raise ValueError(f"loracore grade: in the hidden checks {origin}, {unmarked} are not "
                         f"marked @exercise(points=...) (from loracore.selfcheck)")
    if not found:
        raise ValueError(f"loracore grade: the hidden checks {origin} define no check: write "
                         f"functions check_NAME marked @exercise(points=...)")
    return found


def hidden_from_source(source: str, lab: Lab, origin: str = HIDDEN_FILENAME) -> Hidden:
    """The :class:`Hidden` checks in ``source`` for ``lab``, validated against its exercises."""
    own = {e.name: e.points for e in lab.exercises}
    extra: list[Exercise] = []
    names = []
    for name, points in checks_of(source, origin):
        if name in own and points != own[name]:
            raise ValueError(f"loracore grade: the hidden check_{name} in {origin} declares "
                             f"{points:g} points, but lab {lab.number}'s exercise {name} is worth "
                             f"{own[name]:g}: a hidden check of a lab's exercise keeps its points")
        if name not in own:
            extra.append(Exercise(name, points))
        names.append(name)
    return Hidden(source, tuple(names), tuple(extra))


def load_hidden(path: Path | str, lab: Lab) -> Hidden:
    """Read and validate the hidden checks file ``path`` for ``lab``.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"loracore grade: no hidden checks file {path}")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"loracore grade: the hidden checks {path} are not UTF-8 ({exc.reason})") from None
    return dataclasses.replace(hidden_from_source(source, lab, str(path)), path=str(path.resolve()))


def _run_hidden(source: str, namespace: dict) -> None:  # runs in the kernel, as the cell's body
    """Build the hidden checks from ``source`` and call each with the notebook's names."""
    import inspect as _inspect
    import types as _types

    from loracore.selfcheck import Check, _record

    module = _types.ModuleType("loracore_hidden_checks")
    exec(compile(source, "<hidden checks>", "exec"), module.__dict__)  # HIDDEN_FILENAME
    for name, fn in list(vars(module).items()):
        if not (name.startswith("check_") and hasattr(fn, "exercise")) \
                or getattr(fn, "__module__", None) != module.__name__:
            continue
        params = [p for p in _inspect.signature(fn).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        absent = [p.name for p in params if p.name not in namespace]
        if absent:
            _record(fn.exercise, [Check.true(f"the notebook defines {', '.join(absent)}", False,
                                             "defined by your notebook", "not defined")], None)
            continue
        try:
            fn(*(namespace[p.name] for p in params))
        except BaseException:  # recorded by @exercise; the next check still runs
            pass


def hidden_cell_source(hidden: Hidden) -> str:
    """The code of the cell the runner appends: the hidden source as a string literal, run."""
    body = inspect.getsource(_run_hidden)
    return (f"def _loracore_hidden():\n"
            f"    {body.replace(chr(10), chr(10) + '    ').rstrip()}\n"
            f"    _run_hidden({json.dumps(hidden.source)}, globals())\n"
            f"_loracore_hidden()\n"
            f"del _loracore_hidden\n")


def hidden_cell(hidden: Hidden) -> GradedCell:
    """The grader's last cell of every notebook: origin "hidden", its checks' exercises."""
    import nbformat

    from loracore.grade.restore import GradedCell

    return GradedCell(nbformat.v4.new_code_cell(hidden_cell_source(hidden)), "hidden",
                      list(dict.fromkeys(hidden.checks)))


def merge_hidden(verdicts: dict[str, Verdict], records: list[dict[str, Any]],
                 graded: GradedCell, seen: set[str]) -> None:
    """Fold the hidden cell's records for its exercises into ``verdicts``, noting them in ``seen``.

    A failed hidden check keeps only its name (and ``hidden``): the feedback does not show
    what it expected, what it got or its hint.
    """
    for record in records:
        if record["exercise"] in graded.checks:
            failed = [{"name": str(c.get("name", "")), "hidden": "yes"}
                      for c in record.get("failed") or [] if isinstance(c, dict)]
            merge_record(verdicts, {**record, "failed": failed,
                                    "error": "a hidden check raised an error" if record.get("error") else ""})
            seen.add(record["exercise"])


def fail_unreported(verdicts: dict[str, Verdict], cells: list[GradedCell], seen: set[str],
                    why: str | None) -> None:
    """Fail every exercise whose hidden check gave no verdict (the notebook stopped first)."""
    for name in dict.fromkeys(n for g in cells if g.origin == "hidden" for n in g.checks):
        if name not in seen:
            merge_record(verdicts, {"exercise": name, "passed": False, "failed": [],
                                    "error": f"its hidden check did not run to a verdict: "
                                             f"{why or 'it reported nothing'}"})
