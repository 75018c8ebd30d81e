"""The kernel a submission runs in: limits first, then an ordinary IPython kernel.

``python -m loracore.grade.sandbox --workdir DIR --memory-mb N -f CONNECTION_FILE`` sets, in
this order, before any learner code exists in the process:

- a memory limit (``RLIMIT_AS``): an unbounded allocation ends in ``MemoryError`` inside the
  learner's cell, not in the machine's out-of-memory killer;
- a file-size limit (``RLIMIT_FSIZE``) and no core files;
- on Linux with Landlock (5.13+), writes only beneath ``DIR`` (and ``/dev/null`` and each
  ``--writable PATH``: the model cache's lock file, which every model load takes; not
  ``/dev/shm``, which nothing would clean, and which the labs do not use: torch needs it only
  to share tensors between processes):
  deleting or editing the course, another submission or anything else is refused by the
  kernel of the operating system (``PermissionError``); and, where Landlock has scopes (6.12+),
  no signals to processes outside the sandbox (the grader, the other submissions' kernels);
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

# Landlock's system calls and flags (linux/landlock.h); the numbers are the same on every
# architecture that has them.
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE, _FS_REMOVE_DIR, _FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
_FS_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_PR_SET_NO_NEW_PRIVS, _PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER = 38, 24, 36
_O_PATH = getattr(os, "O_PATH", 0o10000000)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """Landlock's ABI version on this machine, or 0 when it has none (not Linux, too old, off)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0),
                                  ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(int(version), 0)


def restrict_writes(writable: list[str]) -> int:
    """Allow file-system writes only beneath ``writable`` for this process and its children.

    Returns the Landlock ABI used (0: not available, nothing restricted). Reads are not
    restricted: the kernel needs Python, torch and the course's files.
    """
    abi = landlock_abi()
    if abi == 0:
        return 0
    libc = _libc()
    handled = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE
    handled |= (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(handled, 0, (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path in writable:
            if not os.path.exists(path):
                continue
            fd = os.open(path, _O_PATH | os.O_CLOEXEC)
            try:
                # A single file (e.g. /dev/null) only takes the rights that apply to files.
                rights = handled if os.path.isdir(path) else _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
                rule = _PathBeneathAttr(rights, fd)
                if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


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
                 writable: list[str] | None = None) -> int:
    """Every limit in this module's docstring; returns the Landlock ABI used (0: none).

    ``writable`` adds paths that may be written besides ``workdir`` (the model cache's lock file).
    """
    memory = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    abi = restrict_writes([workdir, "/dev/null", *(writable or [])])
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="an IPython kernel inside the grader's limits")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--writable", action="append", default=[])
    args, rest = parser.parse_known_args(argv)
    abi = apply_limits(args.workdir, args.memory_mb, writable=args.writable)
    os.environ["LORACORE_SANDBOX"] = f"landlock {abi}" if abi else "limits only"
    quiet_output()
    from ipykernel.kernelapp import launch_new_instance

    sys.argv = [sys.argv[0], *rest]
    launch_new_instance()


if __name__ == "__main__":
    main()
