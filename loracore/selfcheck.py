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
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, TypeVar

import torch

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
