"""An adapter folder on disk: PEFT's format, loracore's record in it, and a pure reader.

A folder holds two files, exactly as ``peft.PeftModel.save_pretrained`` writes them:

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r) for every adapted module (no adapter name in the keys), and for
  a DoRA adapter (``use_dora: true``) ``...lora_magnitude_vector`` (out,);
- ``adapter_config.json``: ``peft_type``, ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora`` ... so ``PeftModel.from_pretrained(base, folder)`` loads it.

The config holds PEFT's keys only. loracore's own record goes into the safetensors header
(``__metadata__["loracore"]``, a JSON string that PEFT ignores), versioned by its ``"format"``
(:data:`FORMAT`): a fingerprint of the base model the adapter was trained on
(:mod:`loracore.fingerprint`) and the scaling keys of the config the weights were saved with,
so that a config that no longer matches its weights is caught. A file PEFT wrote has no record.

:func:`read_adapter` reads a folder into an :class:`AdapterFile` and checks everything that can
be checked without a model; it changes no model. Only safetensors are read: a pickle file
(``.bin``, ``.pt``) can run code when loaded. Writing and loading into a model are
:mod:`loracore.adapters`' job.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from loracore import layer as L
from loracore.atomic import recover

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
METADATA_KEY = "loracore"  # in the safetensors header
#: version of loracore's record in the header. Format 1: ``{"format": 1, "base_fingerprint":
#: ..., "config": {the scaling keys}}``; records written before the version existed have the
#: same layout and read as format 1. (Older still, "format 0": the record sat in the config
#: under ``"loracore"``, tied to the weights file by a save id; still read.)
FORMAT = 1
SCALING_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
MAGNITUDE = "lora_magnitude_vector"  # PEFT's key for DoRA's magnitude (no ".weight" on disk)

__all__ = ["read_adapter", "AdapterFile", "AdapterModule", "refuse_or_warn", "WEIGHTS_NAME", "CONFIG_NAME",
           "PREFIX", "METADATA_KEY", "FORMAT", "SCALING_KEYS", "MAGNITUDE"]


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module of a file: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, its
    ``lora_alpha`` and ``scaling`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA), and for
    DoRA ``lora_magnitude_vector`` ``(out,)`` (else ``None``). Tensors as stored (CPU)."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    lora_alpha: float
    scaling: float
    lora_magnitude_vector: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]


@dataclass(frozen=True)
class AdapterFile:
    """What :func:`read_adapter` found in a folder, checked.

    ``config``: ``adapter_config.json`` as written (PEFT's keys); ``modules``: full module name
    -> :class:`AdapterModule`; ``base_fingerprint``: loracore's record of the base the adapter
    was trained on (``None`` for a file PEFT wrote); ``format``: the record's format
    (``None``: no loracore record)."""
    path: Path
    config: dict
    modules: dict[str, AdapterModule]
    base_fingerprint: dict | None
    format: int | None

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora") or False)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def lora_dropout(self) -> float:
        return self.config.get("lora_dropout", 0.0) or 0.0

    @property
    def r(self) -> int:
        """The config's ``r`` (PEFT's rank for every module not in :attr:`rank_pattern`); the
        most common module rank when the config has none."""
        if "r" in self.config:
            return self.config["r"]
        return collections.Counter(m.r for m in self.modules.values()).most_common(1)[0][0]

    @property
    def lora_alpha(self) -> float:
        """The config's ``lora_alpha``; the most common module alpha when the config has none."""
        if "lora_alpha" in self.config:
            return self.config["lora_alpha"]
        return collections.Counter(m.lora_alpha for m in self.modules.values()).most_common(1)[0][0]

    @property
    def rank_pattern(self) -> dict[str, int]:
        """Full module name -> rank, for the modules whose rank is not :attr:`r`."""
        return {n: m.r for n, m in self.modules.items() if m.r != self.r}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """Full module name -> lora_alpha, for the modules whose alpha is not :attr:`lora_alpha`."""
        return {n: m.lora_alpha for n, m in self.modules.items() if m.lora_alpha != self.lora_alpha}


def read_adapter(path: str | os.PathLike, *, strict: bool = True,
                 caller: str = "read_adapter") -> AdapterFile:
    """Read and check an adapter folder written by loracore or PEFT; no model is touched.

    ``path`` is the folder (or one of its two files). Checked here: both files are there and
    readable, the config has only settings loracore supports, every tensor is a finite LoRA
    factor with A ``(r, in)`` and B ``(out, r)`` of one rank (and a DoRA magnitude ``(out,)``
    exactly where ``use_dora`` says), no module the record names is missing, no alpha is 0.
    A config that no longer matches its weights file (an interrupted save, a hand-edited
    ``lora_alpha``) is refused with ``strict=True``, else warned about. What needs the model
    (its modules and shapes, the base fingerprint) is :func:`loracore.adapters.check_base`.
    ``caller``: the name errors start with (:func:`~loracore.adapters.load_adapter` passes its
    own). Like a load, a read that finds no folder first finishes an interrupted save
    (:func:`loracore.atomic.recover`).
    """
    folder = _adapter_folder(Path(path), caller)
    weights = folder / WEIGHTS_NAME
    config, tensors, metadata = _read_files(folder, caller)
    _check_config(config, folder, caller)
    record, fmt, mismatch = _loracore_record(config, metadata, folder, caller)
    refuse_or_warn(mismatch, f"{caller}: {CONFIG_NAME} in {folder} does not match its weights file",
                   "An interrupted save or an edited config: save the adapter again, or pass "
                   "strict=False to load it with the config as it is.", strict)
    pairs = _pairs(tensors, weights, caller)
    if not pairs:
        raise ValueError(f"{caller}: {weights} holds no LoRA tensors")
    use_dora = bool(config.get("use_dora") or False)
    for name, ab in pairs.items():
        _check_module(name, ab, use_dora, folder, caller)
    fingerprint = record.get("base_fingerprint") or None
    if fingerprint:
        missing = sorted(set(fingerprint.get("targets") or {}) - set(pairs))
        if missing:
            raise ValueError(f"{caller}: {weights} has no tensors for modules {missing}, which "
                             f"the adapter was saved with: the file is incomplete or was edited. "
                             f"Save the adapter again")
    modules = {}
    for name, ab in pairs.items():
        r = ab["lora_A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        if alpha == 0:
            raise ValueError(f"{caller}: {folder / CONFIG_NAME} gives module {name!r} lora_alpha=0, "
                             f"which makes its output exactly zero; fix the config")
        modules[name] = AdapterModule(ab["lora_A"], ab["lora_B"], alpha,
                                      L.scaling(alpha, r, bool(config.get("use_rslora", False))),
                                      ab.get(MAGNITUDE))
    return AdapterFile(folder, config, modules, fingerprint, fmt)


def refuse_or_warn(problems: list[str], headline: str, advice: str, strict: bool) -> None:
    """Nothing when ``problems`` is empty; else ``ValueError`` (``strict``) or a warning, its
    message the ``headline``, one line per problem, and (when raising) the ``advice``."""
    if not problems:
        return
    msg = f"{headline}:\n  - " + "\n  - ".join(problems)
    if strict:
        raise ValueError(f"{msg}\n{advice}")
    warnings.warn(msg, stacklevel=3)  # at the caller's caller: the line that read or loaded


# ---- the steps of a read -------------------------------------------------------------------
def _adapter_folder(path: Path, caller: str) -> Path:
    """The adapter folder ``path`` names: the folder itself, or one of its two files."""
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise ValueError(f"{caller}: {path} is a pickle file; loracore reads only safetensors, "
                             f"because unpickling can run arbitrary code. Convert it with "
                             f"safetensors.torch.save_file in a process you trust")
        if path.name not in (WEIGHTS_NAME, CONFIG_NAME):
            raise ValueError(f"{caller}: {path} is a file, not an adapter folder; pass the folder "
                             f"that holds {WEIGHTS_NAME} and {CONFIG_NAME} (loracore reads only "
                             f"those two names, never another file from the folder)")
        return path.parent
    if not path.exists():
        recover(path)  # an interrupted save may have left the adapter in a hidden sibling
    if not path.is_dir():
        raise FileNotFoundError(f"{caller}: no adapter folder at {path}")
    return path


def _read_files(path: Path, caller: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, the weights file's header metadata) from an adapter folder."""
    weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not weights.exists():
        pickles = [p.name for p in map(path.joinpath, PICKLE_NAMES) if p.exists()]
        if pickles:
            raise ValueError(f"{caller}: {path} holds {pickles} but no {WEIGHTS_NAME}. loracore "
                             f"reads only safetensors, because unpickling can run arbitrary code. "
                             f"Convert it with safetensors.torch.save_file in a process you trust")
        raise FileNotFoundError(f"{caller}: no {WEIGHTS_NAME} in {path}")
    if not config_file.exists():
        raise FileNotFoundError(f"{caller}: no {CONFIG_NAME} in {path}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{caller}: {config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{caller}: {config_file} holds a JSON {type(config).__name__}, not an "
                         f"object with keys such as r and lora_alpha")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a truncated/foreign file
        raise ValueError(f"{caller}: {weights} is not a readable safetensors file ({e}); it is "
                         f"truncated or in another format. Save the adapter again") from None
    return config, tensors, metadata


def _loracore_record(config: dict, metadata: dict[str, str], path: Path,
                     caller: str) -> tuple[dict, int | None, list[str]]:
    """loracore's record of a save (``{}`` for a file written by PEFT), its format, and the
    ways the config disagrees with it."""
    weights = path / WEIGHTS_NAME
    if METADATA_KEY in metadata:
        try:
            ours = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise ValueError(f"{caller}: the loracore record in {weights} is "
                             f"not valid JSON; save the adapter again") from None
        if not isinstance(ours, dict):
            raise ValueError(f"{caller}: the loracore record in {weights} is a JSON "
                             f"{type(ours).__name__}, not an object; save the adapter again")
        fmt = ours.get("format", FORMAT)  # no version yet: written before it existed, same layout
        if fmt != FORMAT:
            raise ValueError(f"{caller}: the loracore record in {weights} has format {fmt!r}; "
                             f"this loracore reads format {FORMAT}. A newer loracore wrote it: "
                             f"upgrade loracore, or save the adapter again with this one")
        saved = ours.get("config") or {}
        problems = [f"{key}: the weights were saved with {saved[key]!r}, {CONFIG_NAME} says "
                    f"{config.get(key)!r}" for key in SCALING_KEYS
                    if key in saved and saved[key] != config.get(key)]
        return ours, fmt, problems
    if "loracore" not in config:
        return {}, None, []  # PEFT wrote it
    # format 0: the record in the config, tied to its weights file by a save id
    ours = config.get("loracore") or {}
    if not isinstance(ours, dict):
        raise ValueError(f"{caller}: {path / CONFIG_NAME}: loracore must be an object, got {ours!r}")
    file_id = metadata.get("loracore_save_id")
    if ours.get("save_id") and file_id and ours["save_id"] != file_id:
        return ours, 0, [f"{CONFIG_NAME} and {WEIGHTS_NAME} come from two different saves"]
    return ours, 0, []


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: dict, path: Path, caller: str) -> None:
    where = path / CONFIG_NAME
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{caller}: {path} is a {config.get('peft_type')} adapter; only LORA is supported")
    if not isinstance(config.get("use_dora", False), (bool, type(None))):
        raise ValueError(f"{caller}: {where}: use_dora must be true or false, got {config['use_dora']!r}")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise ValueError(f"{caller}: {path} has {key}={config[key]!r}; loracore supports only "
                             f"{key}={ok!r}")
    if config.get("modules_to_save"):
        raise ValueError(f"{caller}: {path} also stores full copies of {config['modules_to_save']} "
                         f"(modules_to_save), which loracore does not support")
    for key in ("r", "lora_alpha"):
        if key in config and not _is_number(config[key]):
            raise ValueError(f"{caller}: {where}: {key} must be a finite number, got {config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(_is_number(v) for v in pattern.values()):
            raise ValueError(f"{caller}: {where}: {key} must map module names to numbers, "
                             f"got {pattern!r}")
    dropout = config.get("lora_dropout") or 0.0
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"{caller}: {where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{caller}: {where}: use_rslora must be true or false, "
                         f"got {config['use_rslora']!r}")


def _pattern_value(pattern: dict, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key matches the full name or its tail."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pairs(tensors: dict[str, torch.Tensor], weights: Path,
           caller: str) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {"lora_A": (r, in), "lora_B": (out, r)} (and DoRA's
    ``"lora_magnitude_vector"``: (out,)), from keys like ``base_model.model.<name>.lora_A.weight``,
    each tensor checked."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = re.fullmatch(rf"(?:base_model\.model\.)?(.+)\.({MAGNITUDE})(?:\.weight)?", key)
        if m is not None:
            name = m.group(1)
            if tensor.dim() != 1 or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"{caller}: module {name!r}: the DoRA magnitude in {weights} has "
                                 f"shape {tuple(tensor.shape)} and dtype {tensor.dtype}; it must be a "
                                 f"finite 1-D float vector, one value per output feature")
            if MAGNITUDE in pairs.get(name, {}):
                raise ValueError(f"{caller}: {weights} has two DoRA magnitudes for module {name!r}")
            pairs.setdefault(name, {})[MAGNITUDE] = tensor
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{caller}: {weights} has tensor {key!r}, which is not a "
                             f"LoRA A/B weight; loracore loads plain LoRA adapters only")
        name, what = m.groups()
        if what in pairs.get(name, {}):
            raise ValueError(f"{caller}: {weights} has two {what} tensors for module {name!r}")
        if tensor.dim() != 2 or 0 in tensor.shape or not tensor.is_floating_point():
            raise ValueError(f"{caller}: module {name!r}: {what} in {weights} has shape "
                             f"{tuple(tensor.shape)} and dtype {tensor.dtype}; a LoRA weight is a "
                             f"2-D float matrix with rank r >= 1")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{caller}: module {name!r}: {what} in {weights} holds inf or NaN; "
                             f"the adapter is broken (diverged training?), loading it would break "
                             f"every output")
        pairs.setdefault(name, {})[what] = tensor
    return pairs


def _check_module(name: str, ab: dict[str, torch.Tensor], use_dora: bool, path: Path,
                  caller: str) -> None:
    """One module's tensors belong together: A and B both there, of one rank, and a DoRA
    magnitude of B's height exactly when the config says ``use_dora``."""
    weights = path / WEIGHTS_NAME
    if not {"lora_A", "lora_B"} <= set(ab):
        raise ValueError(f"{caller}: module {name!r} has only {sorted(ab)} in {weights}")
    if (MAGNITUDE in ab) != use_dora:
        raise ValueError(f"{caller}: {CONFIG_NAME} in {path} says use_dora={use_dora} but "
                         f"module {name!r} {'has' if MAGNITUDE in ab else 'has no'} DoRA magnitude "
                         f"({MAGNITUDE}) in {weights}: the files do not belong together")
    A, B = ab["lora_A"], ab["lora_B"]
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"{caller}: module {name!r}: lora_A in {weights} has shape "
                         f"{tuple(A.shape)} (rank {A.shape[0]}) but lora_B has shape "
                         f"{tuple(B.shape)}, which needs ({B.shape[0]}, {A.shape[0]}): A (r, in) "
                         f"and B (out, r) must share the rank r")
    if use_dora and tuple(ab[MAGNITUDE].shape) != (B.shape[0],):
        raise ValueError(f"{caller}: module {name!r}: the DoRA magnitude ({MAGNITUDE}) in the "
                         f"file has shape {tuple(ab[MAGNITUDE].shape)}; lora_B {tuple(B.shape)} "
                         f"needs ({B.shape[0]},), one value per output feature")
