"""Adapter files: save and load LoRA weights in PEFT's on-disk format.

A folder holds two files, exactly as ``peft.PeftModel.save_pretrained`` writes them:

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r) for every adapted module (no adapter name in the keys), and for
  a DoRA adapter (``use_dora: true``) ``...lora_magnitude_vector`` (out,);
- ``adapter_config.json``: ``peft_type``, ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora`` ... so ``PeftModel.from_pretrained(base, folder)`` loads it.

The config holds PEFT's keys only. loracore's own record goes into the safetensors header
(``__metadata__["loracore"]``, a JSON string that PEFT ignores): a fingerprint of the base model
the adapter was trained on (architecture, target shapes, a hash of the targeted base weights,
float or 4-bit; :mod:`loracore.fingerprint`) and the scaling keys of the config the weights
were saved with. An adapter only means something on that exact base, so loading onto another is
refused, and so is a config that no longer matches its weights (an interrupted save, or a hand-edited ``lora_alpha``).
Only safetensors are read: a pickle file (``.bin``, ``.pt``) can run code when loaded.

Saving is crash-safe (:mod:`loracore.atomic`): both files are written into a fresh hidden sibling
folder, synced, then swapped in with renames, so a crash or SIGKILL at any moment leaves either
the complete previous adapter or the complete new one; the next save (or a load that finds no
folder) finishes or removes what an interrupted swap left. Loading is all-or-nothing: every tensor and config value
is checked before the model changes, and a failure half-way leaves the model as it was.
"""

from __future__ import annotations

import collections
import json
import os
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loracore.atomic import recover, write_folder
from loracore.fingerprint import (base_fingerprint, compare_fingerprints, foreign_adapters,
                                  record_foreign)
from loracore.layer import LoRALinear, check_adapter_args
from loracore.surgery import all_or_nothing, inject, linear_layer_names, lora_layers

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
METADATA_KEY = "loracore"  # in the safetensors header
SCALING_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
MAGNITUDE = "lora_magnitude_vector"  # PEFT's key for DoRA's magnitude (no ".weight" on disk)

__all__ = ["save_adapter", "load_adapter", "base_fingerprint", "foreign_adapters", "WEIGHTS_NAME",
           "CONFIG_NAME"]


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """``target_modules`` for the config: short names when they pick exactly ``names``,
    else a regex over full names (PEFT treats a string as ``re.fullmatch``)."""
    leaves = sorted({n.split(".")[-1] for n in names})
    candidates = [n for n in linear_layer_names(model) if n.split(".")[-1] in leaves]
    if sorted(candidates) == sorted(names):
        return leaves
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` to folder ``path`` in PEFT's format.

    Returns the folder. Crash-safe: a crash or SIGKILL at any moment leaves the folder holding
    the complete previous adapter or the complete new one (see the module docstring); other
    files in the folder are kept. Everything is checked before the disk is touched, so a
    refused save changes nothing. One writer per folder at a time.
    """
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        known = sorted({a for m in lora_layers(model).values() for a in m.lora_A})
        raise ValueError(f"save_adapter: no adapter named {adapter_name!r} in the model "
                         f"(adapters: {known})")
    folder = Path(os.path.realpath(path))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapter: {folder} is a file; give a folder path")
    foreign = foreign_adapters(model).get(adapter_name)
    if foreign:
        warnings.warn(f"save_adapter: adapter {adapter_name!r} was loaded (strict=False) onto a base "
                      f"it was not trained on (" + "; ".join(foreign) + f"); the file written to "
                      f"{folder} records THIS model as its base", stacklevel=2)

    tensors = {}
    for name, layer in layers.items():
        for what in ("lora_A", "lora_B"):
            weight = getattr(layer, what)[adapter_name].weight.detach().cpu().contiguous()
            if not torch.isfinite(weight).all():
                raise ValueError(f"save_adapter: {what} of adapter {adapter_name!r} on module {name!r} "
                                 f"holds inf or NaN (diverged training?); nothing was written, "
                                 f"since loading it would be refused")
            tensors[f"{PREFIX}{name}.{what}.weight"] = weight
        if adapter_name in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach().cpu().contiguous()
            if not torch.isfinite(magnitude).all():
                raise ValueError(f"save_adapter: the DoRA magnitude of adapter {adapter_name!r} on "
                                 f"module {name!r} holds inf or NaN; nothing was written")
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = magnitude
    dora = {n: adapter_name in m.lora_magnitude_vector for n, m in layers.items()}
    if len(set(dora.values())) > 1:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} is DoRA on "
                         f"{[n for n, d in dora.items() if d][:3]} but plain LoRA on "
                         f"{[n for n, d in dora.items() if not d][:3]}; PEFT's config has one use_dora")
    ranks = {n: m.r[adapter_name] for n, m in layers.items()}
    alphas = {n: m.lora_alpha[adapter_name] for n, m in layers.items()}
    rslora = {m.use_rslora[adapter_name] for m in layers.values()}
    dropout = {m.lora_dropout[adapter_name].p if isinstance(m.lora_dropout[adapter_name], nn.Dropout)
               else 0.0 for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} mixes rsLoRA and plain scaling "
                         f"across layers; PEFT's config has one use_rslora")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropout),
        "target_modules": _target_modules(model, list(layers)),
        "use_rslora": rslora.pop(),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": all(dora.values()),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    try:
        fingerprint = base_fingerprint(model, list(layers))
    except ValueError as e:
        raise ValueError(f"save_adapter: {e}") from None
    ours = {"base_fingerprint": fingerprint, "config": {k: config[k] for k in SCALING_KEYS}}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(ours)}
    config_text = json.dumps(config, indent=2) + "\n"

    def write_files(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(config_text)

    write_folder(folder, write_files)
    return folder


def _adapter_folder(path: Path) -> Path:
    """The adapter folder ``path`` names: the folder itself, or one of its two files."""
    if path.is_file():
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise ValueError(f"load_adapter: {path} is a pickle file; loracore reads only safetensors, "
                             f"because unpickling can run arbitrary code. Convert it with "
                             f"safetensors.torch.save_file in a process you trust")
        if path.name not in (WEIGHTS_NAME, CONFIG_NAME):
            raise ValueError(f"load_adapter: {path} is a file, not an adapter folder; pass the folder "
                             f"that holds {WEIGHTS_NAME} and {CONFIG_NAME} (loracore reads only "
                             f"those two names, never another file from the folder)")
        return path.parent
    if not path.exists():
        recover(path)  # an interrupted save may have left the adapter in a hidden sibling
    if not path.is_dir():
        raise FileNotFoundError(f"load_adapter: no adapter folder at {path}")
    return path


def _read_files(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, the weights file's header metadata) from an adapter folder."""
    weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not weights.exists():
        pickles = [p.name for p in map(path.joinpath, PICKLE_NAMES) if p.exists()]
        if pickles:
            raise ValueError(f"load_adapter: {path} holds {pickles} but no {WEIGHTS_NAME}. loracore "
                             f"reads only safetensors, because unpickling can run arbitrary code. "
                             f"Convert it with safetensors.torch.save_file in a process you trust")
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {path}")
    if not config_file.exists():
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {path}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_adapter: {config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {config_file} holds a JSON {type(config).__name__}, not an "
                         f"object with keys such as r and lora_alpha")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a truncated/foreign file
        raise ValueError(f"load_adapter: {weights} is not a readable safetensors file ({e}); it is "
                         f"truncated or in another format. Save the adapter again") from None
    return config, tensors, metadata


def _loracore_record(config: dict, metadata: dict[str, str], path: Path) -> tuple[dict, list[str]]:
    """loracore's record of a save (``{}`` for a file written by PEFT) and the ways the config
    disagrees with it. Files saved before the record moved to the header keep it in the
    config, tied to the weights file by a save id; they still load."""
    if METADATA_KEY in metadata:
        try:
            ours = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise ValueError(f"load_adapter: the loracore record in {path / WEIGHTS_NAME} is "
                             f"not valid JSON; save the adapter again") from None
        saved = ours.get("config") or {}
        problems = [f"{key}: the weights were saved with {saved[key]!r}, {CONFIG_NAME} says "
                    f"{config.get(key)!r}" for key in SCALING_KEYS
                    if key in saved and saved[key] != config.get(key)]
        return ours, problems
    ours = config.get("loracore") or {}
    file_id = metadata.get("loracore_save_id")
    if ours.get("save_id") and file_id and ours["save_id"] != file_id:
        return ours, [f"{CONFIG_NAME} and {WEIGHTS_NAME} come from two different saves"]
    return ours, []


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: dict, path: Path) -> None:
    where = path / CONFIG_NAME
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {path} is a {config.get('peft_type')} adapter; only LORA is supported")
    if not isinstance(config.get("use_dora", False), (bool, type(None))):
        raise ValueError(f"load_adapter: {where}: use_dora must be true or false, got {config['use_dora']!r}")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise ValueError(f"load_adapter: {path} has {key}={config[key]!r}; loracore supports only "
                             f"{key}={ok!r}")
    if config.get("modules_to_save"):
        raise ValueError(f"load_adapter: {path} also stores full copies of {config['modules_to_save']} "
                         f"(modules_to_save), which loracore does not support")
    for key in ("r", "lora_alpha"):
        if key in config and not _is_number(config[key]):
            raise ValueError(f"load_adapter: {where}: {key} must be a finite number, got {config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(_is_number(v) for v in pattern.values()):
            raise ValueError(f"load_adapter: {where}: {key} must map module names to numbers, "
                             f"got {pattern!r}")
    dropout = config.get("lora_dropout") or 0.0
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"load_adapter: {where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"load_adapter: {where}: use_rslora must be true or false, "
                         f"got {config['use_rslora']!r}")


def _pattern_value(pattern: dict, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key matches the full name or its tail."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _refuse_or_warn(problems: list[str], headline: str, advice: str, strict: bool) -> None:
    """Raise ``ValueError`` listing ``problems`` (``strict``), else warn; nothing when empty."""
    if not problems:
        return
    msg = f"load_adapter: {headline}:\n  - " + "\n  - ".join(problems)
    if strict:
        raise ValueError(f"{msg}\n{advice}")
    warnings.warn(msg, stacklevel=3)


def _pairs(tensors: dict[str, torch.Tensor], weights: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {"lora_A": (r, in), "lora_B": (out, r)} (and DoRA's
    ``"lora_magnitude_vector"``: (out,)), from keys like ``base_model.model.<name>.lora_A.weight``,
    each tensor checked."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = re.fullmatch(rf"(?:base_model\.model\.)?(.+)\.({MAGNITUDE})(?:\.weight)?", key)
        if m is not None:
            name = m.group(1)
            if tensor.dim() != 1 or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"load_adapter: module {name!r}: the DoRA magnitude in {weights} has "
                                 f"shape {tuple(tensor.shape)} and dtype {tensor.dtype}; it must be a "
                                 f"finite 1-D float vector, one value per output feature")
            if MAGNITUDE in pairs.get(name, {}):
                raise ValueError(f"load_adapter: {weights} has two DoRA magnitudes for module {name!r}")
            pairs.setdefault(name, {})[MAGNITUDE] = tensor
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"load_adapter: {weights} has tensor {key!r}, which is not a "
                             f"LoRA A/B weight; loracore loads plain LoRA adapters only")
        name, what = m.groups()
        if what in pairs.get(name, {}):
            raise ValueError(f"load_adapter: {weights} has two {what} tensors for module {name!r}")
        if tensor.dim() != 2 or 0 in tensor.shape or not tensor.is_floating_point():
            raise ValueError(f"load_adapter: module {name!r}: {what} in {weights} has shape "
                             f"{tuple(tensor.shape)} and dtype {tensor.dtype}; a LoRA weight is a "
                             f"2-D float matrix with rank r >= 1")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"load_adapter: module {name!r}: {what} in {weights} holds inf or NaN; "
                             f"the adapter is broken (diverged training?), loading it would break "
                             f"every output")
        pairs.setdefault(name, {})[what] = tensor
    return pairs


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 strict: bool = True, fingerprint_cache: dict | None = None) -> nn.Module:
    """Load an adapter folder written by loracore or PEFT into ``model`` (in place).

    ``path`` is the folder (or one of its two files). LoRA layers are injected where the file
    has weights (added as a new adapter where the layer already has LoRA). ``adapter_name``
    defaults to ``"default"``; the loaded adapter becomes the active one. With ``strict=True``
    an adapter whose recorded base fingerprint differs from ``model``, or whose config no
    longer matches its weights file, is refused; ``strict=False`` loads it with a warning.
    All or nothing: everything is checked first, and a failure leaves ``model`` as it was.

    ``fingerprint_cache``: a dict the caller keeps between loads into the same ``model`` (keyed
    by the targeted module names), so the base weights are hashed once per set of layers instead
    of once per load. Valid only while the base weights do not change (a server that never writes
    them, like :class:`loracore.serve.AdapterRegistry`). Returns ``model``.
    """
    adapter_name = "default" if adapter_name is None else adapter_name
    check_adapter_args("load_adapter", adapter_name, 1, 1.0)
    path = _adapter_folder(Path(path))
    weights = path / WEIGHTS_NAME
    config, tensors, metadata = _read_files(path)
    _check_config(config, path)
    ours, mismatch = _loracore_record(config, metadata, path)
    _refuse_or_warn(mismatch, f"{CONFIG_NAME} in {path} does not match its weights file",
                    "An interrupted save or an edited config: save the adapter again, or pass "
                    "strict=False to load it with the config as it is.", strict)
    pairs = _pairs(tensors, weights)
    if not pairs:
        raise ValueError(f"load_adapter: {weights} holds no LoRA tensors")

    modules = dict(model.named_modules())
    use_dora = bool(config.get("use_dora") or False)
    for name, ab in pairs.items():
        if not {"lora_A", "lora_B"} <= set(ab):
            raise ValueError(f"load_adapter: module {name!r} has only {sorted(ab)} in {weights}")
        if (MAGNITUDE in ab) != use_dora:
            raise ValueError(f"load_adapter: {CONFIG_NAME} in {path} says use_dora={use_dora} but "
                             f"module {name!r} {'has' if MAGNITUDE in ab else 'has no'} DoRA magnitude "
                             f"({MAGNITUDE}) in {weights}: the files do not belong together")
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "in_features"):
            raise ValueError(f"load_adapter: the adapter has weights for module {name!r}, which "
                             f"{type(model).__name__} does not have (or is not linear)")
        A, B = ab["lora_A"], ab["lora_B"]
        r = A.shape[0]
        for what, got, want in (("lora_A", A.shape, (r, layer.in_features)),
                                ("lora_B", B.shape, (layer.out_features, r))):
            if tuple(got) != want:
                raise ValueError(f"load_adapter: module {name!r}: {what} in the file has shape "
                                 f"{tuple(got)}, the model's layer needs {want}")
        if use_dora and tuple(ab[MAGNITUDE].shape) != (layer.out_features,):
            raise ValueError(f"load_adapter: module {name!r}: the DoRA magnitude ({MAGNITUDE}) in the "
                             f"file has shape {tuple(ab[MAGNITUDE].shape)}, the model's layer needs "
                             f"({layer.out_features},), one value per output feature")
        if isinstance(layer, LoRALinear) and adapter_name in layer.lora_A:
            raise ValueError(f"load_adapter: module {name!r} already has an adapter named "
                             f"{adapter_name!r}; pass another adapter_name or delete_adapter() first")

    saved_fp = ours.get("base_fingerprint")
    if saved_fp:
        missing = sorted(set(saved_fp.get("targets") or {}) - set(pairs))
        if missing:
            raise ValueError(f"load_adapter: {weights} has no tensors for modules {missing}, which "
                             f"the adapter was saved with: the file is incomplete or was edited. "
                             f"Save the adapter again")
        key = tuple(sorted(pairs))
        if fingerprint_cache is not None and key in fingerprint_cache:
            current = fingerprint_cache[key]
        else:
            try:
                current = base_fingerprint(model, list(pairs))
            except ValueError as e:
                raise ValueError(f"load_adapter: {e}") from None
            if fingerprint_cache is not None:
                fingerprint_cache[key] = current
        foreign = compare_fingerprints(saved_fp, current)
        _refuse_or_warn(foreign, f"{path} was trained on a different base model",
                        "An adapter is tied to its exact base. Pass strict=False to load it anyway.",
                        strict)
    else:
        foreign = []

    # Layer groups sharing (r, alpha); each group targets exactly its full names.
    groups: dict[tuple[int, float], list[str]] = {}
    for name, ab in pairs.items():
        r = ab["lora_A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        if alpha == 0:
            raise ValueError(f"load_adapter: {path / CONFIG_NAME} gives module {name!r} lora_alpha=0, "
                             f"which makes its output exactly zero; fix the config")
        groups.setdefault((r, alpha), []).append(name)
    with all_or_nothing(model):
        for (r, alpha), names in groups.items():
            inject(model, "(" + "|".join(re.escape(n) for n in names) + ")", r, alpha,
                   lora_dropout=config.get("lora_dropout", 0.0) or 0.0, adapter_name=adapter_name,
                   use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora)
        with torch.no_grad():
            for name, ab in pairs.items():
                layer = model.get_submodule(name)
                for what in ("lora_A", "lora_B", MAGNITUDE):
                    if what in ab:
                        weight = getattr(layer, what)[adapter_name].weight
                        weight.copy_(ab[what].to(weight.device, weight.dtype))
    record_foreign(model, adapter_name, foreign)
    return model
