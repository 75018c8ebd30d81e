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
``keep_others=False``). One writer per folder at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["write_folder", "recover", "atomic_write_text", "sha256_file", "STAGES"]

#: The moments of :func:`write_folder` at which :func:`_stage` is called (the crash tests kill there).
STAGES = ("new-complete", "old-aside", "new-in-place")


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits; read in 4 MiB chunks, so a large
    file (a model's weights) never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _leftovers(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {"tmp": [], "new": [], "old": []}
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.loracore-(tmp|new|old)-[0-9a-f]{{32}}")
    if folder.parent.is_dir():
        for entry in folder.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if m:
                found[m.group(1)].append(entry)
    return found


def recover(folder: Path) -> None:
    """Finish or undo an interrupted :func:`write_folder` of ``folder`` and remove its hidden
    leftovers: if the folder is missing, the complete new one (else the old one) takes its place."""
    left = _leftovers(folder)
    if not folder.exists():
        for complete in left["new"] + left["old"]:
            os.rename(complete, folder)
            fsync_dir(folder.parent)
            break
    for entry in left["tmp"] + left["new"] + left["old"]:
        if entry.exists():
            shutil.rmtree(entry)


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    token = uuid.uuid4().hex
    tmp = folder.parent / f".{folder.name}.loracore-tmp-{token}"
    new = folder.parent / f".{folder.name}.loracore-new-{token}"
    old = folder.parent / f".{folder.name}.loracore-old-{token}"
    os.mkdir(tmp)
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
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, new)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
    _stage("new-complete")
    try:
        if folder.exists():
            os.rename(folder, old)
            _stage("old-aside")
        os.rename(new, folder)
    except BaseException:  # still running (not killed): put the previous folder back now
        if not folder.exists() and old.exists():
            os.rename(old, folder)
        shutil.rmtree(new, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
    _stage("new-in-place")
    shutil.rmtree(old, ignore_errors=True)
