"""Crash-safe writes: a file or a whole folder is replaced completely or not at all.

Used for adapter folders (:func:`loracore.adapters.save_adapter`), training checkpoints
(:mod:`loracore.checkpoint`) and the converted-model cache (:mod:`loracore.model_cache`);
:func:`sha256_file` checks what was written. A folder ``F`` is replaced in five moves:

1. write the new files into a hidden sibling ``.F.loracore-tmp-<id>`` and sync them;
2. rename it to ``.F.loracore-new-<id>``: from now on it is known to be complete;
3. rename ``F`` aside to ``.F.loracore-old-<id>``;
4. rename the new folder to ``F``;
5. remove the old one.

Whatever moment a crash or SIGKILL hits, ``F`` or one of the hidden siblings holds a complete
folder, and :func:`recover` knows which: if ``F`` is missing, the complete new one (else the old
one) takes its place, and every leftover is removed. Entries of the old folder that the new write
does not replace carry over (as hard links), so a user's own files in ``F`` are kept (unless
``keep_others=False``). :func:`remove_folder` deletes a folder the same way: renamed aside first,
so a crash never leaves half of it under its name.

Writers, removers and :func:`recover` hold an exclusive lock (``flock``) on the parent folder for
the whole of their work, so two saves of one folder at once (two processes, two threads) run one
after the other, and a reader's :func:`recover` never removes a live writer's hidden folder. The
lock goes with the process: a killed writer holds nothing. (Where ``fcntl`` is missing, Windows,
there is no lock: one writer per folder at a time.)

A write that the disk refuses (full, over a quota or the file-size limit, read-only, no
permission) raises :class:`DiskWriteError`: one line naming the file and the cause in words,
and what was kept. Files are written with :func:`write_bytes` (Python's own ``os.write``), so
the operating system's error reaches here: safetensors' and ``torch.save``'s writers report a
full disk as an opaque ``SafetensorError`` or "unexpected pos", so callers serialize to bytes
first and write those.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["write_folder", "recover", "remove_folder", "atomic_write_text", "atomic_write_file",
           "write_bytes", "sha256_file", "DiskWriteError", "STAGES"]

#: The moments of :func:`write_folder` at which :func:`_stage` is called (the crash tests kill there).
STAGES = ("new-complete", "old-aside", "new-in-place")


class DiskWriteError(OSError):
    """A write the disk refused; ``str()`` is one line naming the file, the cause and what was
    kept. ``errno`` is the operating system's."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


#: The causes a user can act on, in words (any other errno: the operating system's own words).
_CAUSES = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than the file system or this process's file-size "
                 "limit allows (File too large)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied (operation not permitted)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def cause(exc: OSError) -> str:
    """What went wrong in ``exc``, in words ("the disk is full (no space left on device)")."""
    return _CAUSES.get(exc.errno, exc.strerror or str(exc))


def disk_write_error(exc: OSError, path: Path | str, kept: str) -> DiskWriteError:
    """``exc`` as a :class:`DiskWriteError`: "cannot write PATH: CAUSE; KEPT"."""
    if isinstance(exc, DiskWriteError):
        return exc
    return DiskWriteError(exc.errno, f"cannot write {path}: {cause(exc)}; {kept}")


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` with ``os.write`` (no sync: the caller syncs).
    A refused write raises ``OSError`` with the file's name and the system's errno."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except OSError as exc:
                exc.filename = str(path)
                raise
    finally:
        os.close(fd)


def _stage(name: str) -> None:
    """Marks a stage of :func:`write_folder` (a no-op; the crash tests kill the process here)."""


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename: a crash leaves
    the old file or the new one, never half of one."""
    atomic_write_file(path, lambda tmp: write_bytes(tmp, text.encode("utf-8")))


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Replace the file ``path`` by what ``write(tmp)`` writes to a temporary path beside it,
    synced, then renamed over ``path``: a crash, or an exception raised by ``write``, leaves
    the old file (or no file) in place and no temporary one, never half of a file. A write the
    disk refuses raises :class:`DiskWriteError` naming ``path``."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        # mkstemp makes the file private (0600); give it the mode an ordinary write would (the
        # old file's, else 0666 less the umask), so that another user (Ollama's) can read it
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        kept = f"{path} is unchanged" if path.exists() else "nothing was written"
        raise disk_write_error(exc, path, kept) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits; read in 4 MiB chunks, so a large
    file (a model's weights) never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _leftovers(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {"tmp": [], "new": [], "old": [], "del": []}
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.loracore-(tmp|new|old|del)-[0-9a-f]{{32}}")
    if folder.parent.is_dir():
        for entry in folder.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if m:
                found[m.group(1)].append(entry)
    return found


_held = threading.local()  # this thread's locks: parent folder -> how many times entered


@contextmanager
def _parent_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder``'s parent (re-entrant within a thread)."""
    parent = os.path.realpath(folder.parent)
    depth: dict[str, int] = _held.__dict__.setdefault("depth", {})
    if fcntl is None or depth.get(parent) or not os.path.isdir(parent):
        depth[parent] = depth.get(parent, 0) + 1
        try:
            yield
        finally:
            depth[parent] -= 1
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            pass
        depth[parent] = 1
        try:
            yield
        finally:
            depth[parent] = 0
    finally:
        os.close(fd)  # releases the lock


def recover(folder: Path) -> None:
    """Finish or undo an interrupted :func:`write_folder` of ``folder`` and remove its hidden
    leftovers: if the folder is missing, the complete new one (else the old one) takes its place.
    Waits for a write of ``folder`` (or a sibling) in progress to end first."""
    with _parent_lock(folder):
        _recover(folder)


def _recover(folder: Path) -> None:
    left = _leftovers(folder)
    if not folder.exists():
        for complete in left["new"] + left["old"]:
            os.rename(complete, folder)
            fsync_dir(folder.parent)
            break
    for entry in left["tmp"] + left["new"] + left["old"] + left["del"]:
        if entry.exists():
            shutil.rmtree(entry)


def remove_folder(folder: Path) -> None:
    """Delete ``folder`` (and what an interrupted write of it left): renamed aside to a hidden
    ``.F.loracore-del-<id>`` first, so a crash half-way never leaves half of it under its name."""
    with _parent_lock(folder):
        _remove_folder(folder)


def _remove_folder(folder: Path) -> None:
    _recover(folder)
    if folder.is_dir():
        aside = folder.parent / f".{folder.name}.loracore-del-{uuid.uuid4().hex}"
        os.rename(folder, aside)
        fsync_dir(folder.parent)
        shutil.rmtree(aside)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)  # the same bytes, no copy
    except OSError:
        shutil.copy2(src, dst)


def write_folder(folder: Path, write_files: Callable[[Path], None], *,
                 keep_others: bool = True) -> None:
    """Replace ``folder`` by a new one whose files ``write_files(tmp)`` writes, atomically as
    seen by a reader (see the module docstring). Finishes an earlier interrupted write first.

    ``keep_others``: carry over the old folder's entries that the new write does not replace
    (a user's own files); ``False`` makes the new folder hold exactly what was written (a
    cache that must not mix two builds)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_write_error(exc, folder, "nothing was written") from None
    with _parent_lock(folder):
        _write_folder(folder, write_files, keep_others)


def _write_folder(folder: Path, write_files: Callable[[Path], None], keep_others: bool) -> None:
    token = uuid.uuid4().hex
    tmp = folder.parent / f".{folder.name}.loracore-tmp-{token}"
    new = folder.parent / f".{folder.name}.loracore-new-{token}"
    old = folder.parent / f".{folder.name}.loracore-old-{token}"

    def refused(exc: OSError) -> DiskWriteError:
        """Name the file as the user knows it: the one in ``folder`` the write would replace."""
        name = str(exc.filename or "")
        for hidden in (tmp, new):
            if name == str(hidden) or name.startswith(f"{hidden}{os.sep}"):
                name = str(folder) + name[len(str(hidden)):]
        kept = (f"{folder} still holds its previous version" if folder.is_dir()
                else "nothing was written")  # the write below puts the old folder back first
        return disk_write_error(exc, name or folder, kept)

    try:
        _recover(folder)
        os.mkdir(tmp)
    except OSError as exc:
        raise refused(exc) from None
    try:
        write_files(tmp)
        written = [p for p in tmp.iterdir() if p.is_file()]
        if folder.exists():
            os.chmod(tmp, stat.S_IMODE(folder.stat().st_mode))
            for entry in (folder.iterdir() if keep_others else ()):
                if (tmp / entry.name).exists():
                    continue  # replaced by the new write
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(entry), str(tmp / entry.name))
        for path in written:
            with open(path, "rb") as f:
                try:
                    os.fsync(f.fileno())  # where some file systems first report a full disk
                except OSError as exc:
                    exc.filename = str(path)
                    raise
        fsync_dir(tmp)
        os.rename(tmp, new)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise refused(exc) from None
        raise
    fsync_dir(folder.parent)
    _stage("new-complete")
    try:
        if folder.exists():
            os.rename(folder, old)
            _stage("old-aside")
        os.rename(new, folder)
    except BaseException as exc:  # still running (not killed): put the previous folder back now
        if not folder.exists() and old.exists():
            os.rename(old, folder)
        shutil.rmtree(new, ignore_errors=True)
        if isinstance(exc, OSError):
            raise refused(exc) from None
        raise
    fsync_dir(folder.parent)
    _stage("new-in-place")
    shutil.rmtree(old, ignore_errors=True)
