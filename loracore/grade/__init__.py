"""``loracore grade``: grade learners' lab notebooks in bulk, tamper-proof and robust.

One idea per module:

- :mod:`loracore.grade.labs`: a lab's notebook, its exercises and their points;
- :mod:`loracore.grade.restore`: the learner's answers put back into the course's copy of the
  lab (check cells and every other fixed cell come from the course);
- :mod:`loracore.grade.landlock`: what the kernel may read and write, and whom it may reach;
- :mod:`loracore.grade.sandbox`: the kernel's limits (memory, files, Landlock's rules);
- :mod:`loracore.grade.kernel`: the kernel as the grader starts it (its folders, command,
  manager, notebook client);
- :mod:`loracore.grade.verdicts`: the checks' verdict records, read back safely, and a
  submission's :class:`Result`;
- :mod:`loracore.grade.hidden`: an instructor's hidden checks, run in a last cell at grading;
- :mod:`loracore.grade.run`: one submission in its own kernel, with a time limit, read back as
  the checks' verdicts;
- :mod:`loracore.grade.gradebook`: gradebook.csv, the class summary, feedback files;
- :mod:`loracore.grade.exports`: Canvas's and Gradescope's CSV layouts, joined with a roster.

:func:`grade` runs a batch, each submission in its own process, ``jobs`` at a time.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from loracore.grade.hidden import Hidden, load_hidden
from loracore.grade.labs import LABS_DIR, Exercise, Lab, find_lab
from loracore.grade.kernel import COURSE_ROOT, Limits, model_cache_dir
from loracore.grade.sandbox import kill_descendants
from loracore.grade.verdicts import Result, Verdict

__all__ = ["grade", "find_submissions", "find_lab", "load_hidden", "Hidden", "Lab", "Exercise",
           "Limits", "Result", "Verdict", "threads_per_job"]

#: Seconds the grader allows a submission's process beyond its notebook's time limit
#: (kernel start and shutdown) before it kills the whole process group.
GRACE_SECONDS = 90

#: The most the grader reads of a runner's result (a JSON document of a few kB) and of its
#: standard error (the last lines, to name what went wrong): its memory does not grow with
#: what a submission writes.
RESULT_MAX_BYTES = 16 * 2**20
STDERR_TAIL_BYTES = 4096

#: Seconds the grader waits for a runner to exit once its result is in, or once killed.
EXIT_WAIT_SECONDS = 10


def prepare_model_cache() -> None:
    """Build the offline model's cache now: a sandboxed kernel may only read it.

    A complete cache (the usual case) is checked without importing ``loracore.models``: its
    transformers costs about 6 s of CPU, once per batch, for nothing.
    """
    from loracore.model_cache import cache_problem

    if cache_problem(model_cache_dir()) is None:
        return
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


def _read_result(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Read ``fd`` until its end (True), ``deadline`` or :data:`RESULT_MAX_BYTES` (False)."""
    data = bytearray()
    while len(data) <= RESULT_MAX_BYTES:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return bytes(data), False
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


def _stop(proc: subprocess.Popen, answered: bool) -> None:
    """End the runner and every process below it (it is their subreaper), waiting a bounded time.

    A runner that ``answered`` is given :data:`EXIT_WAIT_SECONDS` to exit by itself first.
    """
    if answered:
        try:
            proc.wait(timeout=EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        kill_descendants(proc.pid, include_root=True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner's group, whatever remains of it
    except OSError:
        pass
    try:
        proc.wait(timeout=EXIT_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        pass


def _run_in_process(path: str, lab: Lab, limits: Limits,
                    hidden: Hidden | None = None, root: Path | None = None,
                    unreadable: tuple[str, ...] = ()) -> Result:
    """Grade one submission in a child process (the runner); nothing of it outlives its grading.

    The result comes back on a pipe given to the runner alone (the kernel it starts never has
    it); its stdout is ``/dev/null`` and its stderr a file read only for its last lines. Every
    wait is bounded: ``limits.timeout + GRACE_SECONDS`` for the result, then
    ``EXIT_WAIT_SECONDS`` for the runner to exit before it and its processes are killed.
    ``root`` and ``unreadable``: see :func:`loracore.grade.run.grade_one`. ``lab`` (with the
    hidden exercises, if any) and ``hidden`` go to the runner as data, already found and
    checked here: the runner imports neither the lab's checks module nor torch.
    """
    job = json.dumps({"path": path, "lab": lab.to_json(), "limits": asdict(limits),
                      "hidden": hidden.to_json() if hidden else None,
                      "root": str(root) if root else None, "unreadable": list(unreadable)})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(COURSE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    zeros = {e.name: 0.0 for e in lab.exercises}
    start = time.monotonic()
    read_fd, write_fd = os.pipe()
    data, complete = b"", False
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "loracore.grade.run", "--result-fd",
                                     str(write_fd)], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                    pass_fds=(write_fd,), start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        try:
            try:
                assert proc.stdin is not None
                proc.stdin.write(job.encode())
                proc.stdin.close()
            except BrokenPipeError:  # it died at once: its stderr says why
                pass
            data, complete = _read_result(read_fd, start + limits.timeout + GRACE_SECONDS)
        finally:
            os.close(read_fd)
            _stop(proc, complete)
        seconds = round(time.monotonic() - start, 2)
        if complete:
            try:
                return Result.from_json(json.loads(data))
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
                pass
        elif len(data) <= RESULT_MAX_BYTES:  # the time ran out
            return Result(path, "timeout", f"the grader stopped it after "
                          f"{limits.timeout + GRACE_SECONDS:g} s without a result (its time "
                          f"limit is {limits.timeout:g} s)", zeros, seconds=seconds)
        stderr.seek(0, os.SEEK_END)
        stderr.seek(max(0, stderr.tell() - STDERR_TAIL_BYTES))
        tail = stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
    why = f"exit code {proc.returncode}: {tail[0]}" if len(data) <= RESULT_MAX_BYTES else \
        f"a result over {RESULT_MAX_BYTES} bytes"
    return Result(path, "grader error", why[:300], zeros, seconds=seconds)


def threads_per_job(jobs: int) -> int:
    """Torch / OpenMP threads for each of ``jobs`` kernels graded at once.

    The cores this process may run on, shared out between the jobs, and never more than an
    ``OMP_NUM_THREADS`` the caller set: when the machine is busy with other work, threads
    beyond a core each wait on each other (README, "A busy CPU?": ten times slower measured).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, jobs))
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) >= 1:
        threads = min(threads, int(cap))
    return threads


def grade(lab: str | Lab, submissions: Iterable[str | Path], *, jobs: int = 1,
          limits: Limits | None = None, labs_dir: Path = LABS_DIR,
          progress: Callable[[int, int, Result], None] | None = None,
          hidden: Hidden | str | Path | None = None) -> tuple[Lab, list[Result]]:
    """Grade every notebook in ``submissions`` for ``lab``; ``jobs`` of them at a time.

    Each runs in a process of its own (see :mod:`loracore.grade.run`); results come back
    sorted by path, the same for any ``jobs``. Torch gets :func:`threads_per_job` threads per kernel.
    ``hidden`` (a file, or :func:`load_hidden`'s result) adds hidden checks: the returned lab
    holds their extra exercises after its own.

    Every submission's files (its kernel's work folder and connection file) go in one folder
    of the grader's, made for this batch and removed after it; no kernel may read that folder
    (beyond its own part of it), the hidden checks' file or any submitted notebook
    (:mod:`loracore.grade.landlock`).
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"loracore grade: --jobs must be a whole number >= 1, got {jobs!r}")
    lab = lab if isinstance(lab, Lab) else find_lab(lab, labs_dir)
    if hidden is not None and not isinstance(hidden, Hidden):
        hidden = load_hidden(hidden, lab)
    if hidden is not None:
        lab = hidden.extend(lab)
    paths = find_submissions(submissions)
    if limits is None:
        limits = Limits(threads=threads_per_job(jobs))
    if paths:
        prepare_model_cache()
    unreadable = tuple(os.path.abspath(p) for p in [*([hidden.path] if hidden and hidden.path else []), *paths])
    results: list[Result] = []
    root = Path(tempfile.mkdtemp(prefix="loracore-grade-"))  # made 0700
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_run_in_process, p, lab, limits, hidden, root, unreadable)
                       for p in paths]
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                if progress:
                    progress(len(results), len(paths), result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lab, sorted(results, key=lambda r: r.submission)
