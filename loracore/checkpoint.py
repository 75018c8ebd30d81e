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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loracore.atomic import recover, write_folder

FORMAT = 1

__all__ = ["write_checkpoint", "read_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message says which file and why."""


def write_checkpoint(folder: Path, *, tensors: dict[str, torch.Tensor], optimizer: dict,
                     scheduler: dict, state: dict[str, Any], rng: list[dict]) -> None:
    """Write a checkpoint to ``folder`` atomically (:func:`loracore.atomic.write_folder`).

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

    write_folder(folder, fill)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Everything :func:`write_checkpoint` wrote: ``{"tensors", "optimizer", "scheduler",
    "state", "rng"}``. Raises :class:`CheckpointError` naming the missing or broken file."""
    recover(folder)  # a write killed half-way: take the complete checkpoint it left
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
