"""The kernel a submission runs in: limits first, then an ordinary IPython kernel.

``python -m loracore.grade.sandbox --workdir DIR --memory-mb N -f CONNECTION_FILE`` sets, in
this order, before any learner code exists in the process:

- a memory limit (``RLIMIT_AS``): an unbounded allocation ends in ``MemoryError`` inside the
  learner's cell, not in the machine's out-of-memory killer;
- a file-size limit (``RLIMIT_FSIZE``) and no core files;
- on Linux with Landlock (5.13+, :mod:`loracore.grade.landlock`), writes only beneath ``DIR``
  (and ``/dev/null`` and each ``--writable PATH``: the model cache's lock file, which every
  model load takes; not ``/dev/shm``, which nothing would clean, and which the labs do not
  use: torch needs it only to share tensors between processes): deleting or editing the
  course, another submission or anything else is refused by the kernel of the operating
  system (``PermissionError``); with ``--unlisted DIR`` (the grader's folder of every
  submission's files) and ``--unreadable PATH`` (the hidden checks, the submitted notebooks),
  reads everywhere but there, except beneath ``--readable PATH`` (this submission's own
  folder); no tracing of, so no ``/proc/PID/environ``, ``mem`` or ``fd`` of, a process
  outside the sandbox; and, where Landlock has scopes (6.12+), no signals to processes
  outside the sandbox (the grader, the other submissions' kernels);
- no new privileges, and no capabilities when started as root (so the limits stay put);
- standard output and error on ``/dev/null``: what the kernel or a process it starts writes
  there reaches no reader (the grader's result travels on a descriptor the kernel never has);

then starts ipykernel. The limits are inherited by every process the learner starts.

:func:`kill_descendants` is how the grader ends every process a submission started, whatever
session or process group it moved to: the runner of a submission is a child subreaper
(:func:`become_subreaper`), so an orphan (a double fork, ``setsid``) is re-parented to it
instead of to init and stays in its tree of processes.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import sys
import time

from loracore.grade.landlock import landlock_abi, restrict

__all__ = ["apply_limits", "become_subreaper", "descendants", "drop_capabilities", "kill_descendants",
           "landlock_abi", "limit_from_args", "quiet_output"]

_PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER = 24, 36


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def drop_capabilities() -> None:
    """As root: empty the capability bounding set and the process's own capabilities.

    Without them root can no longer raise its resource limits or act as another user; files
    it owns it still owns, which is what Landlock is for.
    """
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return
    libc = _libc()
    for cap in range(64):  # bounding set first: it needs CAP_SETPCAP, which goes last
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two data structs
    data = (Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def apply_limits(workdir: str, memory_mb: int, file_mb: int = 256,
                 writable: list[str] | None = None, readable: list[str] | None = None,
                 unlisted: list[str] | None = None, unreadable: list[str] | None = None) -> int:
    """Every limit in this module's docstring; returns the Landlock ABI used (0: none).

    ``writable`` adds paths that may be written besides ``workdir`` (the model cache's lock file).
    ``unlisted`` (folders: neither listed nor read) and ``unreadable`` (paths whose content is
    not read) restrict reads, except beneath ``readable`` paths; see
    :func:`loracore.grade.landlock.restrict`.
    """
    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    abi = restrict([workdir, "/dev/null", *(writable or [])], readable, unlisted, unreadable)
    drop_capabilities()
    return abi


def quiet_output() -> None:
    """Point file descriptors 1 and 2 at ``/dev/null`` (a process the learner starts inherits them)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(null, fd)
    finally:
        os.close(null)


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux 3.4+): orphans below it are re-parented to it.

    Returns False where that is not available (then a double-forked process escapes
    :func:`kill_descendants`).
    """
    if not sys.platform.startswith("linux"):
        return False
    return _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children() -> dict[int, list[int]]:
    """Every process's children, from ``/proc/PID/stat`` (parent pid: the field after the state)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # the command name may hold spaces and ')'
        if len(fields) > 1:
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def descendants(root: int) -> list[int]:
    """The pids of every process below ``root`` (children, their children, ...), now."""
    kids, found, todo = _children(), [], [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_descendants(root: int, *, include_root: bool = False, seconds: float = 10.0) -> list[int]:
    """SIGKILL every process below ``root`` (and ``root`` itself with ``include_root``).

    Each is stopped first (SIGSTOP: a stopped process cannot fork any more), until a walk of
    ``/proc`` finds no new one or ``seconds`` have passed; then all are killed. Returns the
    pids signalled. Only processes still below ``root`` are found: make ``root`` a subreaper
    (:func:`become_subreaper`) so that orphans stay there. Linux only (``[]`` elsewhere).
    """
    if not os.path.isdir("/proc"):
        return []
    targets: list[int] = [root] if include_root else []
    if include_root:
        _signal(root, signal.SIGSTOP)
    deadline = time.monotonic() + seconds
    while True:
        new = [p for p in descendants(root) if p not in targets]
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        targets.extend(new)
        if not new or time.monotonic() > deadline:
            break
    for pid in targets:
        _signal(pid, signal.SIGKILL)
    return targets


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # it ended meanwhile
        pass


def limit_from_args(argv: list[str]) -> tuple[int, list[str]]:
    """Apply the limits the command line ``argv`` asks for (this module's docstring).

    Returns the Landlock ABI used (0: limits only) and the arguments left for ipykernel.
    """
    parser = argparse.ArgumentParser(description="an IPython kernel inside the grader's limits")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--writable", action="append", default=[])
    parser.add_argument("--readable", action="append", default=None)
    parser.add_argument("--unlisted", action="append", default=None)
    parser.add_argument("--unreadable", action="append", default=None)
    args, rest = parser.parse_known_args(argv)
    abi = apply_limits(args.workdir, args.memory_mb, writable=args.writable, readable=args.readable,
                       unlisted=args.unlisted, unreadable=args.unreadable)
    return abi, rest


def main(argv: list[str] | None = None) -> None:
    abi, rest = limit_from_args(sys.argv[1:] if argv is None else argv)
    os.environ["LORACORE_SANDBOX"] = f"landlock {abi}" if abi else "limits only"
    quiet_output()
    from ipykernel.kernelapp import launch_new_instance

    sys.argv = [sys.argv[0], *rest]
    launch_new_instance()


if __name__ == "__main__":
    main()
