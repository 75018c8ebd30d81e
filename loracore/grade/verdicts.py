"""What the checks of a graded notebook decided: the records they write, read back safely and
merged per exercise, and a submission's :class:`Result` (a row of the gradebook).

The checks of a course's check cell append one JSON line per exercise to
``$LORACORE_VERDICTS``; :func:`take_records` reads the file (at most
:data:`VERDICTS_MAX_BYTES`, never following a link or waiting on a pipe) and removes it, and
:func:`merge_record` folds a record into the exercise's :class:`Verdict`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The most the runner reads of the verdict file after one check cell (a lab's are a few kB).
VERDICTS_MAX_BYTES = 2**20


@dataclass
class Verdict:
    """What the checks of one exercise decided (merged over the calls in its check cells)."""

    passed: bool
    failed: list[dict[str, str]] = field(default_factory=list)  # the checks that failed
    error: str = ""                                              # why, when no check says it


@dataclass
class Result:
    """One submission's row of the gradebook, and what its feedback file says."""

    submission: str
    status: str
    reason: str = ""
    points: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # cells that raised, outside the checks
    seconds: float = 0.0

    def total(self) -> float:
        return sum(self.points.values())

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Result":
        verdicts = {k: Verdict(**v) for k, v in data.pop("verdicts", {}).items()}
        return Result(**data, verdicts=verdicts)


def remove(path: Path) -> None:
    """Remove ``path`` whatever the learner made of it (a file, a link, a pipe, a folder)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def take_records(path: Path) -> list[dict[str, Any]]:
    """The verdict records in ``path``, which is then removed.

    Read without following a link or waiting on a pipe (``O_NOFOLLOW | O_NONBLOCK``, regular
    files only), at most :data:`VERDICTS_MAX_BYTES`.
    """
    data = b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                while len(data) < VERDICTS_MAX_BYTES:
                    chunk = os.read(fd, VERDICTS_MAX_BYTES - len(data))
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            pass
        finally:
            os.close(fd)
    remove(path)
    records = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("exercise"), str):
            records.append(record)
    return records


def merge_record(verdicts: dict[str, Verdict], record: dict[str, Any]) -> None:
    """An exercise passes only if every call of its check in a check cell passed."""
    name = record["exercise"]
    old = verdicts.get(name)
    passed = bool(record.get("passed")) and (old is None or old.passed)
    failed = (old.failed if old else []) + list(record.get("failed") or [])
    error = (old.error if old and old.error else "") or str(record.get("error") or "")
    verdicts[name] = Verdict(passed, failed, error)
