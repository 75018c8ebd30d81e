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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nbformat

from loracore.env import SHORT_MODE  # the short mode, offline, as `make test` runs the labs
from loracore.grade.hidden import Hidden, fail_unreported, hidden_cell, hidden_from_source, merge_hidden
from loracore.grade.labs import Lab, find_lab
from loracore.grade.restore import NotGradable, read_submission, restore
from loracore.grade.sandbox import become_subreaper, kill_descendants
from loracore.grade.verdicts import Result, Verdict, merge_record, remove, take_records

#: The repository (or site-packages) folder that holds the ``loracore`` the kernel must import.
COURSE_ROOT = Path(__file__).resolve().parent.parent.parent


#: True in ``python -m loracore.grade.run``, a child subreaper: every process below it is the
#: submission's, so all of them are killed after its notebook (not so for a caller of grade_one).
_is_runner = False


def model_cache_lock() -> Path:
    """The lock file every load of the offline model opens for writing.

    The same path as ``loracore.models.cache_root() / ".smollm2.lock"`` (a test keeps them in
    step), without importing torch into every grading process.
    """
    env = os.environ.get("LORACORE_CACHE", "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "loracore"
    return root / ".smollm2.lock"


@dataclass
class Limits:
    """What one submission may use."""

    timeout: float = 600.0        # seconds for the whole notebook, kernel start included
    memory_mb: int = 6144         # the kernel's address space (RLIMIT_AS)
    output_kb: int = 1024         # all outputs together; the rest is dropped
    threads: int = 1              # torch / OpenMP threads in the kernel



@dataclass
class Folders:
    """Where one submission's files live while it is graded.

    ``root`` is the grader's folder for the whole batch; ``own`` (in it) holds this
    submission's ``work`` folder (the kernel's only writable place, its current folder) and
    its ``kernel.json`` connection file. The kernel may read ``own`` but nothing else of
    ``root``, nor any of ``unreadable`` (the hidden checks, the submitted notebooks).
    """

    root: Path
    own: Path
    unreadable: tuple[str, ...] = ()

    @classmethod
    def make(cls, root: Path, unreadable: tuple[str, ...] = ()) -> Folders:
        """A new submission's folder in ``root`` (made 0700, as ``root`` should be)."""
        return cls(root, Path(tempfile.mkdtemp(prefix="submission-", dir=root)), unreadable)

    @property
    def work(self) -> Path:
        return self.own / "work"

    @property
    def connection_file(self) -> Path:
        return self.own / "kernel.json"


def curve_supported() -> bool:
    """Whether this jupyter_client, ipykernel and pyzmq can encrypt a kernel's sockets (CurveZMQ)."""
    try:
        import zmq
        from ipykernel.kernelspec import get_kernel_dict
        from jupyter_client.manager import KernelManager
    except ImportError:
        return False
    kernel = get_kernel_dict().get("metadata", {}).get("supported_encryption", [])
    return bool(zmq.has("curve")) and "curve" in kernel and KernelManager.class_traits().get(
        "transport_encryption") is not None


def _sandbox_manager(argv: list[str], connection_file: Path) -> type:
    """A kernel manager class whose kernels start through :mod:`loracore.grade.sandbox`.

    Its connection file (the kernel's ports, the key that signs every message, the keys of
    the encryption) is ``connection_file``, in the submission's own folder: by default
    jupyter_client writes it to the shared temporary folder, where every other kernel of the
    batch could read it. Where :func:`curve_supported`, every socket of the kernel is
    encrypted: a process without the connection file cannot even read what the kernel
    publishes (the code it runs, its outputs), only send messages that it drops unsigned.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    curve = curve_supported()

    class SandboxKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.connection_file = str(connection_file)
            if curve:
                self.transport_encryption = "required"

        @property
        def kernel_spec(self) -> KernelSpec:  # the same Python, the grader's limits
            return KernelSpec(argv=argv, display_name="loracore grade", language="python",
                              resource_dir=str(COURSE_ROOT),
                              metadata={"supported_encryption": ["curve"]} if curve else {})

    return SandboxKernelManager


def kernel_argv(folders: Folders, limits: Limits) -> list[str]:
    """The command that starts a submission's kernel in :mod:`loracore.grade.sandbox`."""
    return [sys.executable, "-m", "loracore.grade.sandbox", "--workdir", str(folders.work),
            "--memory-mb", str(limits.memory_mb), "--writable", str(model_cache_lock()),
            # ipykernel may rewrite its connection file as it starts (it does with encryption keys)
            "--writable", str(folders.connection_file), "--readable", str(folders.own), "--unlisted", str(folders.root),
            *[arg for path in folders.unreadable for arg in ("--unreadable", path)],
            "-f", "{connection_file}"]


def _client(nb: nbformat.NotebookNode, folders: Folders, limits: Limits) -> Any:
    """An nbclient that caps outputs and starts the sandboxed kernel."""
    from nbclient import NotebookClient

    argv = kernel_argv(folders, limits)
    workdir = folders.work

    class CappedClient(NotebookClient):
        budget = limits.output_kb * 1024
        dropped = 0

        def output(self, outs, msg, display_id, cell_index):  # type: ignore[no-untyped-def]
            size = len(json.dumps(msg.get("content", {}), default=str))
            if size > self.budget:
                self.dropped += size
                return None
            self.budget -= size
            return super().output(outs, msg, display_id, cell_index)

    return CappedClient(nb, timeout=int(limits.timeout), allow_errors=True, kernel_name="python3",
                        kernel_manager_class=_sandbox_manager(argv, folders.connection_file),
                        shutdown_kernel="immediate",
                        iopub_timeout=10, resources={"metadata": {"path": str(workdir)}})


def _kernel_env(workdir: Path, verdicts: Path, limits: Limits) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONSTARTUP", "JPY_"))}
    env.update(SHORT_MODE)
    threads = str(max(1, limits.threads))
    env.update({
        "LORACORE_VERDICTS": str(verdicts),
        "PYTHONPATH": os.pathsep.join([str(COURSE_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        "TMPDIR": str(workdir / "tmp"), "IPYTHONDIR": str(workdir / ".ipython"),
        "MPLCONFIGDIR": str(workdir / ".matplotlib"), "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
    })
    for sub in ("tmp", ".ipython", ".matplotlib"):
        (workdir / sub).mkdir()
    return env


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
    env = _kernel_env(workdir, verdict_file, limits)
    nb = nbformat.v4.new_notebook(cells=[g.cell for g in nb_cells])
    client = _client(nb, folders, limits)
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
    lab = find_lab(job["lab"], Path(job["labs_dir"]))
    hidden = hidden_from_source(job["hidden"], lab) if job.get("hidden") else None
    root = Path(job["root"]) if job.get("root") else None
    result = grade_one(job["path"], hidden.extend(lab) if hidden else lab, Limits(**job["limits"]), hidden,
                       root=root, unreadable=tuple(job.get("unreadable", ())))
    data = json.dumps(asdict(result)).encode()
    if args.result_fd is None:
        sys.stdout.write("\n" + data.decode() + "\n")
        return
    with os.fdopen(args.result_fd, "wb") as out:
        out.write(data)


if __name__ == "__main__":
    main()
