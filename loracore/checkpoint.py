"""Training checkpoints that survive a crash, and resume to the same result bit for bit.

A checkpoint is a folder with everything the next step depends on:

- ``adapter.safetensors``: the trainable tensors (``lora_A`` / ``lora_B``), by parameter name;
- ``optimizer.pt``: the optimizer's and the learning-rate schedule's state (tensors and
  numbers only, read back with ``torch.load(weights_only=True)``, which runs no code);
- ``state.json``: the step, where the data stream stands, the loss history so far, and a
  format version;
- ``rng.pt``: every process's random-number-generator state (dropout masks).

It is written into a fresh temporary folder next to its place, flushed to disk, and only then
renamed into place: a SIGKILL at any moment leaves either the previous checkpoint or the new
one, never a mix. Leftover temporary folders from a killed write are removed by the next write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
TMP_PREFIX = ".tmp-checkpoint-"
OLD_SUFFIX = ".old"

__all__ = ["write_checkpoint", "read_checkpoint", "replace_folder", "atomic_write_text",
           "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message says which file and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the
    old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Make ``target`` a folder whose files ``fill(tmp_folder)`` writes, atomically.

    The new folder is written and flushed next to ``target`` first. Then the old one is renamed
    aside (``target.old``), the new one renamed into place, and the old one deleted. A kill
    between the two renames leaves ``target.old`` and no ``target``: :func:`read_checkpoint`
    takes the ``.old`` one then, so a complete checkpoint is always found.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{TMP_PREFIX}*"):  # from a write that was killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    old = target.with_name(target.name + OLD_SUFFIX)
    if old.exists() and not target.exists():  # killed between the renames last time
        os.replace(old, target)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=TMP_PREFIX))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(folder: Path, *, tensors: dict[str, torch.Tensor], optimizer: dict,
                     scheduler: dict, state: dict[str, Any], rng: list[dict]) -> None:
    """Write a checkpoint to ``folder`` atomically (see :func:`replace_folder`).

    tensors: trainable parameters by name (any shapes); optimizer / scheduler: their
    ``state_dict()``; state: JSON-able progress (step, data position, history); rng: one
    ``{"cpu": ByteTensor, "cuda": ByteTensor | None}`` per process, in rank order.
    """
    def fill(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / "adapter.safetensors"))
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state}, indent=1) + "\n")

    replace_folder(folder, fill)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Everything :func:`write_checkpoint` wrote: ``{"tensors", "optimizer", "scheduler",
    "state", "rng"}``. Raises :class:`CheckpointError` naming the missing or broken file."""
    old = folder.with_name(folder.name + OLD_SUFFIX)
    if not folder.exists() and old.exists():  # killed between the two renames of a write
        folder = old
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    names = ("adapter.safetensors", "optimizer.pt", "rng.pt", "state.json")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing {missing}")
    try:
        state = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder / 'state.json'} is not valid JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder / 'state.json'}: checkpoint format "
                              f"{state.get('format') if isinstance(state, dict) else '?'}, "
                              f"this loracore reads format {FORMAT}")
    try:
        tensors = load_file(str(folder / "adapter.safetensors"))
        opt = torch.load(folder / "optimizer.pt", weights_only=True)
        rng = torch.load(folder / "rng.pt", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise CheckpointError(f"checkpoint {folder} has an unreadable file ({exc})") from None
    return {"tensors": tensors, "optimizer": opt["optimizer"], "scheduler": opt["scheduler"],
            "state": state, "rng": rng}
