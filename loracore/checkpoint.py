"""Training checkpoints that survive a crash, and resume to the same result bit for bit.

A checkpoint is a folder with everything the next step depends on:

- ``adapter.safetensors``: the trainable tensors (``lora_A`` / ``lora_B``), by parameter name;
- ``optimizer.pt``: the optimizer's and the learning-rate schedule's state (tensors and
  numbers only, read back with ``torch.load(weights_only=True)``, which runs no code);
- ``state.json``: the step, where the data stream stands, the loss history so far, and a
  format version;
- ``rng.pt``: every process's random-number-generator state (dropout masks).

It is written with :func:`loracore.atomic.write_folder`, as adapter folders are: into a hidden
sibling folder, synced, then renamed into place, so a SIGKILL at any moment leaves either the
previous checkpoint or the new one, never a mix; reading or writing again cleans up after it.
Reading checks every file before anything uses it: a missing, damaged or foreign file (a pickle
holding anything but tensors and numbers is refused, never run) and NaN or inf in the adapter or
the optimizer state are refused with the file named.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from loracore.atomic import recover, write_bytes, write_folder

FORMAT = 1
NAMES = ("adapter.safetensors", "optimizer.pt", "rng.pt", "state.json")

__all__ = ["write_checkpoint", "read_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message says which file and why."""


def _torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: written with :func:`loracore.atomic.write_bytes`, a full disk
    is an ``OSError`` naming the file (``torch.save`` to a path says "unexpected pos")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_checkpoint(folder: Path, *, tensors: dict[str, torch.Tensor], optimizer: dict,
                     scheduler: dict, state: dict[str, Any], rng: list[dict]) -> None:
    """Write a checkpoint to ``folder`` atomically (:func:`loracore.atomic.write_folder`).

    tensors: trainable parameters by name (any shapes); optimizer / scheduler: their
    ``state_dict()``; state: JSON-able progress (step, data position, history); rng: one
    ``{"cpu": ByteTensor, "cuda": ByteTensor | None}`` per process, in rank order. A write the
    disk refuses raises :class:`loracore.atomic.DiskWriteError` (the file, the cause) and
    leaves the previous checkpoint as it was.
    """
    def fill(tmp: Path) -> None:
        write_bytes(tmp / "adapter.safetensors",
                    save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
        write_bytes(tmp / "optimizer.pt", _torch_bytes({"optimizer": optimizer, "scheduler": scheduler}))
        write_bytes(tmp / "rng.pt", _torch_bytes(rng))
        write_bytes(tmp / "state.json",
                    (json.dumps({"format": FORMAT, **state}, indent=1) + "\n").encode("utf-8"))

    write_folder(folder, fill)


def _not_finite(value: Any, where: str = "") -> str | None:
    """The first NaN or infinity in ``value`` (tensors, numbers, nested dicts and lists), as
    "NaN in WHERE"; ``None`` when all is finite."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            if torch.isnan(value).any():
                return f"NaN in {where}"
            if torch.isinf(value).any():
                return f"inf in {where}"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} in {where}"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _not_finite(item, f"{where}/{key}" if where else str(key))
        if found:
            return found
    return None


def _load_pickle(path: Path) -> Any:
    """``torch.load(weights_only=True)``: plain tensors, numbers and containers only; anything
    else (a class, a function: a pickle can run code when loaded) is refused, not run."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{path} is damaged or cut short ({_first(exc)})") from None
        what = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(
            f"{path} holds something other than plain tensors and numbers"
            f"{f' ({what.group(1)})' if what else ''}; it will not be loaded, since loading such a "
            f"file can run code (loracore never writes one: it was made elsewhere)") from None
    except Exception as exc:  # a truncated or foreign file: torch's reason
        raise CheckpointError(f"{path} is damaged or cut short ({_first(exc)})") from None


def _first(exc: Exception) -> str:
    """The first sentence of an error's text (torch's run on for a paragraph)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Everything :func:`write_checkpoint` wrote: ``{"tensors", "optimizer", "scheduler",
    "state", "rng"}``. Raises :class:`CheckpointError` naming the missing or broken file: one
    missing, damaged or cut short, holding anything but plain tensors and numbers (never
    unpickled), or holding NaN or inf (a run diverged: resuming would train on it)."""
    recover(folder)  # a write killed half-way: take the complete checkpoint it left
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    missing = [n for n in NAMES if not (folder / n).is_file()]
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
    path = folder / "adapter.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged or cut short ({exc})") from None
    opt, rng = _load_pickle(folder / "optimizer.pt"), _load_pickle(folder / "rng.pt")
    if not (isinstance(opt, dict) and isinstance(opt.get("optimizer"), dict)
            and isinstance(opt.get("scheduler"), dict)):
        raise CheckpointError(f"{folder / 'optimizer.pt'} does not hold an optimizer's and a "
                              f"schedule's state")
    if not (isinstance(rng, list) and rng and all(isinstance(r, dict) and "cpu" in r for r in rng)):
        raise CheckpointError(f"{folder / 'rng.pt'} does not hold random-number-generator states")
    for file, content in ((path, tensors), (folder / "optimizer.pt", opt["optimizer"])):
        bad = _not_finite(content)
        if bad:
            raise CheckpointError(f"{file} holds {bad} (the run had diverged when it was saved); "
                                  f"resuming would train on it")
    return {"tensors": tensors, "optimizer": opt["optimizer"], "scheduler": opt["scheduler"],
            "state": state, "rng": rng}
