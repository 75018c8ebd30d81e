"""Grade one submission: restore it, run it in a fresh sandboxed kernel, read the checks' verdicts.

:func:`grade_one` never raises for anything a submission does: every failure becomes a status
and a reason in its :class:`Result`. ``python -m loracore.grade.run --result-fd N`` runs it for
one job given as JSON on stdin and writes the result as JSON to descriptor N (without it: to
stdout), a pipe only the grader reads: the kernel's output goes to ``/dev/null``, never to the
grader. The batch runs each submission in its own process, a child subreaper that kills every
process below it (the kernel and whatever the learner started, in any session) before it
answers.

Verdicts: the checks of a course's check cell append them to ``$LORACORE_VERDICTS`` in the
submission's folder. The runner removes that file before each check cell and reads it (at
most :data:`~loracore.grade.verdicts.VERDICTS_MAX_BYTES`, never following a link or waiting on a pipe) right after, so
a record written at any other time (a learner's cell, a process it left running that holds
the file open) is never merged. Code of the learner's running *during* a check cell (a thread,
a process that opens the file then, or a replaced ``selfcheck._record``) can still write one:
the checks run in the learner's process, as the README says. Hidden checks
(:mod:`loracore.grade.hidden`) run in one more cell the runner appends, read the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

if __name__ == "__main__":
    # The runner's own process (python -m loracore.grade.run), which reads notebooks and
    # nothing else: jsonschema, under nbformat, imports rfc3987_syntax where it is installed,
    # and that builds a grammar as it loads (3 to 4 s of CPU, in every submission's runner)
    # for the "iri" string formats, which the notebook schemas never use. Without it
    # jsonschema leaves those two formats unchecked.
    sys.modules.setdefault("rfc3987_syntax", None)

import nbformat  # noqa: E402

from loracore.grade.hidden import Hidden, fail_unreported, hidden_cell, merge_hidden
from loracore.grade.kernel import COURSE_ROOT, Folders, Limits, kernel_env, model_cache_lock, notebook_client
from loracore.grade.labs import Lab
from loracore.grade.restore import NotGradable, read_submission, restore
from loracore.grade.sandbox import become_subreaper, kill_descendants
from loracore.grade.verdicts import Result, Verdict, merge_record, remove, take_records

__all__ = ["COURSE_ROOT", "Folders", "Limits", "Result", "Verdict", "grade_one", "main", "model_cache_lock"]

#: True in ``python -m loracore.grade.run``, a child subreaper: every process below it is the
#: submission's, so all of them are killed after its notebook (not so for a caller of grade_one).
_is_runner = False


def _first_error(cell: nbformat.NotebookNode) -> str:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            value = (out.get("evalue") or "").strip().splitlines()
            return f"{out.get('ename')}: {value[0] if value else ''}"[:300]
    return ""


def _reap() -> None:
    """Collect the exit status of every ended child (orphans re-parented here included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _execute(nb_cells: list, lab: Lab, folders: Folders, limits: Limits, result: Result) -> None:
    """Run the restored cells in the sandboxed kernel, filling ``result`` in."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    workdir = folders.work
    workdir.mkdir()
    verdict_file = workdir / ".verdicts.jsonl"
    env = kernel_env(workdir, verdict_file, limits)
    nb = nbformat.v4.new_notebook(cells=[g.cell for g in nb_cells])
    client = notebook_client(nb, folders, limits)
    deadline = time.monotonic() + limits.timeout
    stopped_at: str | None = None
    cell_errors: dict[str, str] = {}
    hidden_seen: set[str] = set()

    try:
        # The kernel's own output goes nowhere: it must not reach this process's descriptors.
        with client.setup_kernel(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            for index, graded in enumerate(nb_cells):
                if graded.cell.cell_type != "code":
                    continue
                client.timeout = max(1, int(deadline - time.monotonic()))
                if deadline - time.monotonic() <= 0:
                    raise CellTimeoutError("the notebook's time is up")
                checked = graded.origin in ("course", "hidden") and bool(graded.checks)
                if checked:  # only what this cell's run writes counts
                    remove(verdict_file)
                client.execute_cell(graded.cell, index)
                records = take_records(verdict_file) if checked else []
                if _first_error(graded.cell) and not graded.checks:
                    result.errors.append(f"{'your' if graded.origin == 'learner' else 'the lab'}'s "
                                         f"cell {index + 1} ({graded.cell.source.strip().splitlines()[0][:60]!r}): "
                                         f"{_first_error(graded.cell)}")
                if _first_error(graded.cell).startswith("SystemExit"):
                    # sys.exit / exit(): the learner asked the notebook to stop, as a script would
                    result.status = "exited"
                    stopped_at = f"cell {index + 1} called sys.exit() and the rest did not run"
                if checked and graded.origin == "hidden":
                    merge_hidden(result.verdicts, records, graded, hidden_seen)
                elif checked:  # only the course's check cells (and the grader's hidden one) grade
                    for record in records:
                        if record["exercise"] in graded.checks:
                            merge_record(result.verdicts, record)
                    for name in graded.checks:
                        if name not in result.verdicts and _first_error(graded.cell):
                            cell_errors.setdefault(name, _first_error(graded.cell))
                if result.status == "exited":
                    break
    except CellTimeoutError:
        result.status = "timeout"
        stopped_at = f"the notebook ran past its {limits.timeout:g} s limit"
    except DeadKernelError:
        result.status = "crashed"
        stopped_at = "the kernel died (os._exit, a crash, or the memory limit) and the rest did not run"
    except Exception as exc:  # the kernel would not start, or nbclient gave up
        result.status = "crashed"
        stopped_at = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        kernel = getattr(getattr(getattr(client, "km", None), "provisioner", None), "pid", None)
        if kernel:  # what the learner started below the kernel, in any session or group
            kill_descendants(kernel)
        if client.km is not None and client.km.has_kernel:
            try:
                client._cleanup_kernel()
            except Exception:
                pass
        if getattr(client, "km", None) is not None:
            pgid = getattr(getattr(client.km, "provisioner", None), "pgid", None)
            if pgid:
                try:
                    os.killpg(pgid, signal.SIGKILL)  # anything the learner started in the kernel
                except OSError:
                    pass
        if _is_runner:  # orphans too (a double fork): this process is their subreaper
            kill_descendants(os.getpid())
            _reap()
    for e in lab.exercises:
        if e.name not in result.verdicts:
            why = cell_errors.get(e.name) or stopped_at or "its check cell did not report a verdict"
            result.verdicts[e.name] = Verdict(False, [], f"the check did not run to a verdict: {why}")
    fail_unreported(result.verdicts, nb_cells, hidden_seen, stopped_at)
    notes = [stopped_at] if stopped_at else []
    mem = [c for c in nb.cells if _first_error(c).startswith("MemoryError")
           or "DefaultCPUAllocator" in _first_error(c)]
    if mem:
        notes.append(f"{len(mem)} cell(s) hit the {limits.memory_mb} MB memory limit")
    if client.dropped:
        notes.append(f"output past {limits.output_kb} kB dropped")
    result.reason = "; ".join(filter(None, [result.reason, *notes]))


def grade_one(path: str, lab: Lab, limits: Limits, hidden: Hidden | None = None, *,
              root: Path | None = None, unreadable: tuple[str, ...] = ()) -> Result:
    """Grade the submission at ``path`` for ``lab`` (with ``hidden`` checks: ``hidden.extend(lab)``
    and its cell last); the file itself is only read.

    Its files go in a new folder inside ``root`` (the batch's folder, which its kernel may not
    read; without it, a new one of its own); ``unreadable`` adds paths its kernel may not read
    (the hidden checks' file and the submissions are added here).
    """
    start = time.monotonic()
    result = Result(path, "ok", points={e.name: 0.0 for e in lab.exercises})
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="loracore-grade-")) if root is None else Path(root)
    hidden_file = (hidden.path,) if hidden is not None and hidden.path else ()
    folders = Folders.make(root, tuple(dict.fromkeys([*unreadable, *hidden_file, os.path.abspath(path)])))
    try:
        data = Path(path).read_bytes()
        learner = read_submission(data, lab)
        restored = restore(learner, lab, lab.notebook())
        notes = []
        if restored.restored:
            notes.append(f"{restored.restored} lab cell(s) changed or deleted by the learner, restored")
        result.reason = "; ".join(notes)
        _execute(restored.cells + ([hidden_cell(hidden)] if hidden else []), lab, folders, limits, result)
    except NotGradable as exc:
        result.status, result.reason = exc.status, exc.reason
    except OSError as exc:
        result.status, result.reason = "unreadable", f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(root if own_root else folders.own, ignore_errors=True)
    for e in lab.exercises:
        v = result.verdicts.get(e.name)
        result.points[e.name] = e.points if v is not None and v.passed else 0.0
    result.seconds = round(time.monotonic() - start, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m loracore.grade.run [--result-fd N]`` < job.json: grade one submission.

    The result goes to descriptor ``N`` as one JSON document (to stdout without it). ``N`` is
    not inherited by the kernel; every process started below this one is killed before the
    result is written.
    """
    import argparse

    parser = argparse.ArgumentParser(description="grade one submission given as JSON on stdin")
    parser.add_argument("--result-fd", type=int, default=None)
    args = parser.parse_args(argv)
    global _is_runner
    if args.result_fd is not None:
        os.set_inheritable(args.result_fd, False)
    _is_runner = become_subreaper()
    job = json.loads(sys.stdin.read())
    # The lab (its hidden exercises included) and the hidden checks come as the grader found
    # and checked them: finding them again would import the lab's checks, so torch (seconds
    # of CPU per submission, for nothing: the checks run in the kernel).
    lab = Lab.from_json(job["lab"])
    hidden = Hidden.from_json(job["hidden"]) if job.get("hidden") else None
    root = Path(job["root"]) if job.get("root") else None
    result = grade_one(job["path"], lab, Limits(**job["limits"]), hidden,
                       root=root, unreadable=tuple(job.get("unreadable", ())))
    data = json.dumps(asdict(result)).encode()
    if args.result_fd is None:
        sys.stdout.write("\n" + data.decode() + "\n")
        return
    with os.fdopen(args.result_fd, "wb") as out:
        out.write(data)


if __name__ == "__main__":
    main()
