"""The kernel a submission's notebook runs in, as the grader starts it: its folders, its command,
its manager and its notebook client.

:class:`Folders`: each submission's files sit in a folder of its own inside the batch's
folder (its work folder and its kernel's connection file), so that the sandbox
(:mod:`loracore.grade.sandbox`) can let its kernel read its own part and nothing else of the
batch. :func:`kernel_argv` is the command line that applies those limits; the manager writes
the connection file there, not in the shared temporary folder, and encrypts the kernel's
sockets where it can (:func:`curve_supported`); the client caps the outputs it keeps.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracore.env import SHORT_MODE  # the short mode, offline, as `make test` runs the labs
from loracore.model_cache import cache_root

if TYPE_CHECKING:  # not imported by the kernel's launcher: see loracore.grade.labs
    import nbformat

#: The repository (or site-packages) folder that holds the ``loracore`` the kernel must import.
COURSE_ROOT = Path(__file__).resolve().parent.parent.parent


def model_cache_dir() -> Path:
    """The offline model's converted cache, ``loracore.models.smollm2_cache_dir()`` (a test
    keeps them in step), found without importing torch and transformers into the grader."""
    return cache_root() / "smollm2-135m-instruct"


def model_cache_lock() -> Path:
    """The lock file every load of the offline model opens for writing.

    The same path as ``loracore.models.cache_root() / ".smollm2.lock"`` (a test keeps them in
    step), without importing torch into every grading process
    (:mod:`loracore.model_cache` imports neither).
    """
    return cache_root() / ".smollm2.lock"


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


def notebook_client(nb: nbformat.NotebookNode, folders: Folders, limits: Limits) -> Any:
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


def kernel_env(workdir: Path, verdicts: Path, limits: Limits) -> dict[str, str]:
    """The kernel's environment: the short mode, ``verdicts`` for the checks, every cache and
    temporary file in ``workdir`` (whose folders for them it makes), ``limits.threads`` threads."""
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
