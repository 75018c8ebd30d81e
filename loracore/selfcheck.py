"""Self-checks for lab exercises: a friendly pass, or what was expected, what came back and a hint.

A lab's check function builds a list of :class:`Check` results and hands them to
:func:`report`::

    def check_lora_forward(lora_forward) -> None:
        got = lora_forward(x, W, A, B, 2.0)
        report("lora_forward", [
            Check.close("output matches x @ W.T + s * x @ A.T @ B.T", got, want,
                        hint="Apply A first, then B, then multiply by the scaling."),
        ])

``report`` prints one line per check and raises :class:`ExerciseFailed` (an
``AssertionError``) when any failed, so a failing lab cell is red in Jupyter and in CI. Jupyter
shows it as its one-line message, not as a traceback through loracore's checking code.

Each lab's check function carries its exercise's points with :func:`exercise`
(``@exercise(points=2)``), next to the check itself. When ``$LORACORE_VERDICTS`` names a
file (``loracore grade`` sets it), every call of such a check appends its verdict there as
one JSON line, so the grader reads what the check decided rather than whether a cell raised.

Hints come on demand, not in the exercise: each lab's check module holds a :class:`Hints`
(``hint = Hints("lab04", {"trim": ("a nudge", ..., "nearly the code")})``), and a learner who
is stuck types ``checks.hint("trim")`` in a new cell; each call shows the next hint. A hint
prints and nothing else: it records no verdict.
"""

from __future__ import annotations

import functools
import json
import os
import textwrap
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:  # torch is imported where a tensor is compared: the grader and a lab's
    import torch  # stand-in checks import this module without paying for it

#: The environment variable naming the file that verdicts are appended to (one JSON line each).
VERDICTS_ENV = "LORACORE_VERDICTS"

F = TypeVar("F", bound=Callable[..., Any])


class ExerciseFailed(AssertionError):
    """Raised by :func:`report` when at least one check failed."""

    def _render_traceback_(self) -> list[str]:
        # IPython (so Jupyter) shows these lines instead of the traceback: the frames would all be
        # loracore's checking code, and the learner needs only the message (the checks are above it).
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


@dataclass(frozen=True)
class Check:
    """One checked fact about the learner's code."""

    name: str
    passed: bool
    expected: str = ""
    got: str = ""
    hint: str = ""

    @staticmethod
    def equal(name: str, got: Any, expected: Any, hint: str = "") -> "Check":
        """Passes when ``got == expected`` (plain Python values)."""
        return Check(name, bool(got == expected), repr(expected), repr(got), hint)

    @staticmethod
    def true(name: str, condition: bool, expected: str, got: str, hint: str = "") -> "Check":
        """Passes when ``condition`` holds; ``expected``/``got`` describe it in words."""
        return Check(name, bool(condition), expected, got, hint)

    @staticmethod
    def close(name: str, got: Any, expected: torch.Tensor, *, atol: float = 1e-5,
              rtol: float = 1e-5, hint: str = "") -> "Check":
        """Passes when tensor ``got`` has ``expected``'s shape and values within tolerance."""
        import torch

        if not isinstance(got, torch.Tensor):
            return Check(name, False, f"a tensor of shape {tuple(expected.shape)}",
                         f"{type(got).__name__}: {got!r}"[:200], hint)
        if got.shape != expected.shape:
            return Check(name, False, f"shape {tuple(expected.shape)}",
                         f"shape {tuple(got.shape)}", hint)
        got_f, exp_f = got.detach().float().cpu(), expected.detach().float().cpu()
        ok = bool(torch.allclose(got_f, exp_f, atol=atol, rtol=rtol))
        err = (got_f - exp_f).abs().max().item()
        return Check(name, ok, f"values within atol={atol:g}", f"max abs error {err:.3g}", hint)


def report(title: str, checks: list[Check]) -> None:
    """Print each check and raise :class:`ExerciseFailed` if any failed."""
    if _running:  # inside an @exercise check: its verdict is made of these checks
        _running[-1].extend(checks)
    failed = [c for c in checks if not c.passed]
    for c in checks:
        if c.passed:
            print(f"  ok    {c.name}")
        else:
            print(f"  FAIL  {c.name}")
            print(f"        expected: {c.expected}")
            print(f"        got:      {c.got}")
            if c.hint:
                print(f"        hint:     {c.hint}")
    if failed:
        raise ExerciseFailed(f"{title}: {len(failed)} of {len(checks)} checks failed (see above)")
    print(f"{title}: all {len(checks)} checks passed.")


def call_learner(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function, turning a still-unsolved stub into a clear message."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise ExerciseFailed(
            f"{getattr(fn, '__name__', 'this function')} is not written yet: "
            f"replace the `raise NotImplementedError` in its cell with your code. ({exc})"
        ) from None


# --------------------------------------------------------------------------- hints on demand


class Hints:
    """A lab's hints, exercise by exercise, from a nudge (first) to nearly the code (last).

    A hint is prose (wrapped to the notebook's width) or, when it holds line breaks, code
    (printed line by line as written).

    ``hints("trim")`` prints the next hint for ``trim`` (then stays at the last);
    ``hints("trim", 2)`` prints hint 2 again. The count lives in this object, so it starts
    again with a fresh kernel. Nothing is recorded for grading.

    >>> hint = Hints("lab99", {"area": ("Which formula?", "pi times r squared.")})
    >>> hint("area")
    Hint 1 of 2 for area:
      Which formula?
    (Run the same line again for the next hint.)
    """

    def __init__(self, lab: str, hints: dict[str, tuple[str, ...]]) -> None:
        for name, steps in hints.items():
            if not steps or not all(isinstance(s, str) and s.strip() for s in steps):
                raise ValueError(f"{lab}: the hints for {name!r} must be non-empty strings")
        self.lab = lab
        self.hints = {name: tuple(steps) for name, steps in hints.items()}
        self._shown: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        """The exercises that have hints, in the lab's order."""
        return list(self.hints)

    def __call__(self, name: str, n: int | None = None) -> None:
        """Print hint ``n`` (from 1) for exercise ``name``, or the next one when ``n`` is None."""
        if name not in self.hints:
            raise ValueError(f"{self.lab} has no exercise {name!r}; its hints are for: "
                             f"{', '.join(self.names)}")
        steps = self.hints[name]
        if n is None:
            n = min(self._shown.get(name, 0) + 1, len(steps))
        if not 1 <= n <= len(steps):
            raise ValueError(f"{self.lab}: {name} has hints 1 to {len(steps)}, not {n}")
        self._shown[name] = max(self._shown.get(name, 0), n)
        print(f"Hint {n} of {len(steps)} for {name}:")
        text = steps[n - 1]
        if "\n" in text:  # code, line by line as written
            print(textwrap.indent(text, "  "))
        else:
            print(textwrap.fill(text, width=96, initial_indent="  ", subsequent_indent="  ",
                                break_long_words=False, break_on_hyphens=False))
        print("(Run the same line again for the next hint.)" if n < len(steps) else
              "(That was the last hint: it is nearly the code. Write it in your own words.)")

    def reset(self) -> None:
        """Start every exercise's hints from the first again."""
        self._shown.clear()


# --------------------------------------------------------------------------- verdicts

# One list of checks per @exercise call in progress (a stack: a check may call another).
_running: list[list[Check]] = []


def exercise(points: float) -> Callable[[F], F]:
    """Declare that the decorated ``check_*`` function grades one exercise worth ``points``.

    The grader finds a lab's exercises by this mark (``fn.points``, ``fn.exercise``). Each
    call records one verdict: passed when every check given to :func:`report` passed and
    nothing else went wrong (a learner's function that raises fails the exercise with its
    error as the message).
    """
    if not isinstance(points, (int, float)) or points <= 0:
        raise ValueError(f"exercise: points must be a positive number, got {points!r}")

    def mark(check: F) -> F:
        name = check.__name__.removeprefix("check_")

        @functools.wraps(check)
        def run(*args: Any, **kwargs: Any) -> Any:
            checks: list[Check] = []
            _running.append(checks)
            error: BaseException | None = None
            try:
                return check(*args, **kwargs)
            except BaseException as exc:  # recorded, then raised as the learner would see it
                error = exc
                raise
            finally:
                _running.pop()
                _record(name, checks, error)

        run.points = points  # type: ignore[attr-defined]
        run.exercise = name  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return mark


def _record(name: str, checks: list[Check], error: BaseException | None) -> None:
    """Append one verdict line to ``$LORACORE_VERDICTS`` (nothing when it is unset)."""
    path = os.environ.get(VERDICTS_ENV)
    if not path:
        return
    # report() raises ExerciseFailed after listing the failures: that is no extra message.
    message = "" if error is None or (isinstance(error, ExerciseFailed) and any(
        not c.passed for c in checks)) else f"{type(error).__name__}: {error}"[:500]
    verdict = {
        "exercise": name,
        "passed": error is None and bool(checks) and all(c.passed for c in checks),
        "checks": len(checks),
        "failed": [asdict(c) for c in checks if not c.passed],
        "error": message,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(verdict, default=str) + "\n")
