"""``loracore grade``: grade learners' lab notebooks in bulk, tamper-proof and robust.

One idea per module:

- :mod:`loracore.grade.labs`: a lab's notebook, its exercises and their points;
- :mod:`loracore.grade.restore`: the learner's answers put back into the course's copy of the
  lab (check cells and every other fixed cell come from the course);
- :mod:`loracore.grade.sandbox`: the kernel's limits (memory, files, writes, signals);
- :mod:`loracore.grade.run`: one submission in its own kernel, with a time limit, read back as
  the checks' verdicts;
- :mod:`loracore.grade.gradebook`: gradebook.csv, the class summary, feedback files.

:func:`grade` runs a batch, each submission in its own process, ``jobs`` at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from loracore.grade.labs import LABS_DIR, Exercise, Lab, find_lab
from loracore.grade.run import COURSE_ROOT, Limits, Result, Verdict

__all__ = ["grade", "find_submissions", "find_lab", "Lab", "Exercise", "Limits", "Result",
           "Verdict"]

#: Seconds the grader allows a submission's process beyond its notebook's time limit
#: (kernel start and shutdown) before it kills the whole process group.
GRACE_SECONDS = 90


def prepare_model_cache() -> None:
    """Build the offline model's cache now: a sandboxed kernel may only read it."""
    from loracore.models import build_smollm2_cache

    build_smollm2_cache(verbose=False)


def find_submissions(paths: Iterable[str | Path]) -> list[str]:
    """Every notebook named in ``paths`` (folders searched recursively), sorted, no duplicates.

    Raises ``FileNotFoundError`` for a path that does not exist.
    """
    found: set[str] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found.update(str(q) for q in p.rglob("*.ipynb")
                         if ".ipynb_checkpoints" not in q.parts and q.is_file())
        elif p.exists():
            found.add(str(p))
        else:
            raise FileNotFoundError(f"loracore grade: no such submission file or folder: {p}")
    return sorted(found)


def _run_in_process(path: str, lab: Lab, labs_dir: Path, limits: Limits) -> Result:
    """Grade one submission in a child process; the child's whole process group is killed after."""
    job = json.dumps({"path": path, "lab": lab.number, "labs_dir": str(labs_dir),
                      "limits": asdict(limits)})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(COURSE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "loracore.grade.run"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(job.encode(), timeout=limits.timeout + GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Result(path, "timeout", f"the grader stopped it after {limits.timeout:g} s "
                      "(and its kernel did not stop)", {e.name: 0.0 for e in lab.exercises},
                      seconds=round(time.monotonic() - start, 2))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it outlives its grading
        except OSError:
            pass
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        return Result.from_json(json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError, TypeError):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return Result(path, "grader error", f"exit code {proc.returncode}: {tail[0]}"[:300],
                      {e.name: 0.0 for e in lab.exercises},
                      seconds=round(time.monotonic() - start, 2))


def grade(lab: str | Lab, submissions: Iterable[str | Path], *, jobs: int = 1,
          limits: Limits | None = None, labs_dir: Path = LABS_DIR,
          progress: Callable[[int, int, Result], None] | None = None) -> tuple[Lab, list[Result]]:
    """Grade every notebook in ``submissions`` for ``lab``; ``jobs`` of them at a time.

    Each runs in a process of its own (see :mod:`loracore.grade.run`); results come back
    sorted by path, the same for any ``jobs``. Torch gets ``cores // jobs`` threads per kernel.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"loracore grade: --jobs must be a whole number >= 1, got {jobs!r}")
    lab = lab if isinstance(lab, Lab) else find_lab(lab, labs_dir)
    paths = find_submissions(submissions)
    if limits is None:
        limits = Limits(threads=max(1, (os.cpu_count() or 1) // jobs))
    if paths:
        prepare_model_cache()
    results: list[Result] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_in_process, p, lab, labs_dir, limits) for p in paths]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            if progress:
                progress(len(results), len(paths), result)
    return lab, sorted(results, key=lambda r: r.submission)
