"""Landlock: what a sandboxed kernel may read and write, enforced by the operating system's kernel.

Landlock (Linux 5.13+) lets an unprivileged process give up file-system rights for itself and
every process it starts, for good. It is an allow-list: each right it *handles* is refused
everywhere except beneath the paths a rule names. The grader's kernel gets

- **writes** only beneath its own work folder and a few named files (``/dev/null``, the model
  cache's lock file);
- **reads** everywhere except the grader's own folder (every submission's work folder and
  kernel connection file) and a few named files (the hidden checks, the submitted notebooks);
  its own submission's folder is given back. Listing a folder is one right, reading a file's
  bytes (or executing it) another: the files are hidden from both, but the folders holding
  the named files stay listable, since Python finds a module by listing its folder and those
  files may sit in the course's repository, which is on the import path;
- where Landlock has scopes (ABI 6, Linux 6.12+): no signals to, and no connections to
  abstract Unix sockets of, processes outside its domain.

A process in a Landlock domain also cannot trace a process outside it, so the files of
``/proc/PID`` that need that right (``environ``, ``mem``, ``fd/``, ``cwd``, ``root``) are closed
to it for the grader and the other submissions' kernels (each kernel has a domain of its own).

Landlock cannot say "everything except X": :func:`allow_all_but` lists what to grant instead.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
from collections.abc import Iterable

# Landlock's system calls and flags (linux/landlock.h); the numbers are the same on every
# architecture that has them.
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REMOVE_DIR, _FS_REMOVE_FILE = 1 << 4, 1 << 5
_FS_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_PR_SET_NO_NEW_PRIVS = 38
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


def allow_all_but(excluded: Iterable[str | os.PathLike]) -> list[str]:
    """The paths to grant so that everything is reachable except what lies beneath ``excluded``.

    A Landlock rule on a folder covers everything beneath it, so "all but X" is: for each
    folder on the way from ``/`` down to X, every entry but the one leading to X. Example,
    with ``/`` holding ``home``, ``tmp``, ``usr`` and ``/tmp`` holding ``a``, ``b``::

        allow_all_but(["/tmp/a"]) -> ["/home", "/tmp/b", "/usr"]

    Paths are resolved first (``/var/run`` is judged where it leads); an excluded path that
    does not exist is ignored. Symbolic links among the entries are left out: a link grants
    nothing by itself, and granting what it points to could grant an excluded path (the
    target is reachable by its own path if that is not excluded). The folders on the way are
    not granted themselves (a rule on them would cover X); an entry added to them later is not
    covered either. A folder that cannot be listed contributes nothing (it stays closed).
    Returns sorted absolute paths; ``["/"]`` when nothing is excluded.
    """
    out = {os.path.realpath(p) for p in excluded if os.path.lexists(p)}
    # a path beneath another excluded one adds nothing
    out = {p for p in out if not any(q != p and _beneath(p, q) for q in out)}
    if not out:
        return ["/"]
    if "/" in out:
        return []
    on_the_way = {os.path.dirname(p) for p in out}
    for p in list(on_the_way):
        while p != "/":
            p = os.path.dirname(p)
            on_the_way.add(p)
    granted = []
    for folder in on_the_way:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if path in on_the_way or path in out or os.path.islink(path):
                continue
            granted.append(path)
    return sorted(granted)


def _beneath(path: str, folder: str) -> bool:
    return folder == "/" or path.startswith(folder.rstrip("/") + "/")


def restrict(writable: list[str], readable: list[str] | None = None,
             unlisted: list[str] | None = None, unreadable: list[str] | None = None) -> int:
    """Restrict this process and its children as the module's docstring says.

    ``writable``: folders or files that may be written (and read). With ``unlisted`` or
    ``unreadable`` given, reads are restricted too: nothing beneath an ``unlisted`` folder may be
    listed or read, no ``unreadable`` path's content may be read (its folder stays listable),
    except beneath a ``readable`` path (the submission's own folder). With neither, reads are
    not restricted. Paths that do not exist are skipped. Returns the Landlock ABI used (0: not
    available, nothing restricted).
    """
    abi = landlock_abi()
    if abi == 0:
        return 0
    read_rules = unlisted is not None or unreadable is not None
    write = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE
    write |= (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR if read_rules else 0
    handled = write | read
    rules = [(path, handled, True) for path in writable]
    rules += [(path, read, True) for path in (readable or [])]
    if read_rules:  # entries listed from folders: never through a link put there meanwhile
        hidden = [*(unlisted or []), *(unreadable or [])]
        rules += [(path, _FS_READ_DIR, False) for path in allow_all_but(unlisted or [])]
        rules += [(path, _FS_READ_FILE | _FS_EXECUTE, False) for path in allow_all_but(hidden)]
    libc = _libc()
    attr = _RulesetAttr(handled, 0, (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path, rights, follow in rules:
            _add_rule(libc, ruleset, path, rights, abi, follow)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_RESTRICT_SELF, ruleset, 0) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: str, rights: int, abi: int, follow: bool) -> None:
    """Grant ``rights`` beneath ``path`` (a missing path, or one that vanished meanwhile: none).

    Without ``follow``, a link (one put there since the folder was listed) is skipped.
    """
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError:
        return
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISLNK(mode):
            return
        if not stat.S_ISDIR(mode):
            # a file (e.g. /dev/null) only takes the rights that apply to files
            rights &= _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
        if not rights:
            return
        rule = _PathBeneathAttr(rights, fd)
        if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
