"""Adapter files and models: save a model's adapter in PEFT's format, load one into a model.

The format (two files, PEFT's keys, loracore's versioned record in the safetensors header) and
the pure reader :func:`~loracore.adapter_file.read_adapter` live in :mod:`loracore.adapter_file`.
Here: :func:`save_adapter` writes a model's adapter; :func:`check_base` says whether a file
read fits a model (its modules and shapes, and the fingerprint of the base it was trained on:
an adapter only means something on that exact base, so loading onto another is refused);
:func:`load_adapter` is read + check + inject the layers and copy the weights in.

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
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from torch import nn

from loracore.adapter_file import (CONFIG_NAME, FORMAT, MAGNITUDE, METADATA_KEY, PREFIX,
                                   SCALING_KEYS, WEIGHTS_NAME, AdapterFile, AdapterModule,
                                   read_adapter, refuse_or_warn)
from loracore.atomic import write_bytes, write_folder
from loracore.fingerprint import (base_fingerprint, compare_fingerprints, foreign_adapters,
                                  record_foreign)
from loracore.layer import LoRALinear, check_adapter_name, is_linear
from loracore.surgery import (all_or_nothing, changed_bases, inject_modules, linear_layer_names,
                              lora_layers)

__all__ = ["save_adapter", "load_adapter", "check_base", "read_adapter", "AdapterFile",
           "AdapterModule", "base_fingerprint", "foreign_adapters", "WEIGHTS_NAME", "CONFIG_NAME"]


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """``target_modules`` for the config: short names when they pick exactly ``names``,
    else a regex over full names (PEFT treats a string as ``re.fullmatch``)."""
    leaves = sorted({n.split(".")[-1] for n in names})
    candidates = [n for n in linear_layer_names(model) if n.split(".")[-1] in leaves]
    if sorted(candidates) == sorted(names):
        return leaves
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def save_file(tensors: dict[str, torch.Tensor], filename: str,
              metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file`` (the same bytes), written with :func:`loracore.atomic.write_bytes`:
    a full disk is then an ``OSError`` naming the file, where safetensors' own writer raises an
    opaque ``SafetensorError``."""
    write_bytes(Path(filename), serialize(tensors, metadata=metadata))


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
                 extra_files: dict[str, str] | None = None, convert_to_lora: bool = False,
                 changed_base_ok: bool = False) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to folder ``path`` in PEFT's format.

    Returns the folder. Crash-safe: a crash or SIGKILL at any moment leaves the folder holding
    the complete previous adapter or the complete new one (see the module docstring); other
    files in the folder are kept. Everything is checked before the disk is touched, so a
    refused save changes nothing; a write the disk refuses raises
    :class:`loracore.atomic.DiskWriteError` naming the file and the cause. One writer per
    folder at a time.

    ``extra_files``: text files (name: content) written in the same atomic swap as the
    adapter, so they always describe it (``loracore finetune``'s ``training_args.json``).

    An adapter whose initialisation changed its base (``inject(init_lora_weights="pissa" or
    "loftq")``, see :func:`~loracore.surgery.changed_bases`) is valid only on that changed base,
    so saving it is refused unless the call says what to write: ``convert_to_lora=True`` (PiSSA
    only) writes a plain LoRA adapter for the *original* base, of rank ``2r``: ``A' = [A; A0]``,
    ``B' = [B, -B0]``, so ``scaling·B'·A' = scaling·(B·A - B0·A0)``, the change training made
    (PEFT's ``path_initial_model_for_weight_conversion``; ``lora_alpha`` doubled, or times
    ``sqrt(2)`` with rsLoRA, to keep ``scaling``), with the original base's fingerprint;
    ``changed_base_ok=True`` writes it as it is, with the changed base's fingerprint (so loracore
    refuses to load it onto the original base; save that base too, e.g. with
    :func:`loracore.merged.merge_and_save` after ``remove_lora``).
    """
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        known = sorted({a for m in lora_layers(model).values() for a in m.lora_A})
        raise ValueError(f"save_adapter: no adapter named {adapter_name!r} in the model "
                         f"(adapters: {known})")
    for flag, value in (("convert_to_lora", convert_to_lora), ("changed_base_ok", changed_base_ok)):
        if not isinstance(value, bool):
            raise TypeError(f"save_adapter: {flag} must be True or False, got {value!r}")
    changed = changed_bases(model).get(adapter_name)
    if convert_to_lora and (changed is None or changed["init"] != "pissa"):
        what = "plain LoRA" if changed is None else changed["init"]
        raise ValueError(f"save_adapter: convert_to_lora=True converts a PiSSA adapter; adapter "
                         f"{adapter_name!r} is {what}"
                         + (" (its base is an NF4 approximation of the original, which no low-rank "
                            "adapter makes exact); pass changed_base_ok=True instead"
                            if what == "loftq" else ""))
    if changed is not None and not (convert_to_lora or changed_base_ok):
        pissa = changed["init"] == "pissa"
        options = "convert_to_lora=True (a rank-2r plain LoRA for the original base) or " if pissa else ""
        became = "the residual W - scaling·B0·A0" if pissa else "their NF4 values"
        raise ValueError(f"save_adapter: adapter {adapter_name!r} was initialised with "
                         f"{changed['init']!r}, which changed the base weights of its layers to "
                         f"{became}; it is only valid on that changed base. Pass {options}"
                         f"changed_base_ok=True (as it is, for the changed base)")
    if convert_to_lora and set(changed["initial"]) != set(layers):
        raise ValueError(f"save_adapter: adapter {adapter_name!r} is on {sorted(layers)[:3]}..., "
                         f"its PiSSA record on {sorted(changed['initial'])[:3]}...; cannot convert")
    folder = Path(os.path.realpath(path))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_adapter: {folder} is a file; give a folder path")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if (not isinstance(name, str) or name in (WEIGHTS_NAME, CONFIG_NAME) or name.startswith(".")
                or os.sep in name or (os.altsep and os.altsep in name) or not name):
            raise ValueError(f"save_adapter: extra_files: {name!r} is not a plain file name "
                             f"beside {WEIGHTS_NAME} and {CONFIG_NAME}")
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
            if convert_to_lora:  # ΔW = s·(B·A - B0·A0) = s·[B, -B0]·[A; A0]
                a0, b0 = changed["initial"][name]
                weight = (torch.cat([weight, a0.to(weight.dtype)], dim=0) if what == "lora_A"
                          else torch.cat([weight, -b0.to(weight.dtype)], dim=1))
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
    if convert_to_lora:  # twice the rank at the same scaling: alpha/r or alpha/sqrt(r)
        grow = 2.0 ** 0.5 if True in rslora else 2
        ranks = {n: 2 * v for n, v in ranks.items()}
        alphas = {n: v * grow for n, v in alphas.items()}
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
        fingerprint = (changed["fingerprint"] if convert_to_lora
                       else base_fingerprint(model, list(layers)))
    except ValueError as e:
        raise ValueError(f"save_adapter: {e}") from None
    ours = {"format": FORMAT, "base_fingerprint": fingerprint, "config": {k: config[k] for k in SCALING_KEYS}}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(ours)}
    config_text = json.dumps(config, indent=2) + "\n"

    def write_files(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        write_bytes(tmp / CONFIG_NAME, config_text.encode("utf-8"))
        for name, text in extra_files.items():
            write_bytes(tmp / name, text.encode("utf-8"))

    write_folder(folder, write_files)
    return folder


def check_base(model: nn.Module, adapter: AdapterFile, *, strict: bool = True,
               fingerprint_cache: dict | None = None, caller: str = "check_base") -> list[str]:
    """Check that ``adapter`` (from :func:`read_adapter`) fits ``model``; ``model`` is not changed.

    Refused (``ValueError``): a module the file has weights for that ``model`` lacks or that is
    not linear, and factor shapes that are not the layer's (A ``(r, in)``, B ``(out, r)``,
    a DoRA magnitude ``(out,)``). When the file records the fingerprint of the base it was
    trained on and ``model`` differs, ``strict=True`` refuses and ``strict=False`` warns.
    Returns what differs from the recorded base (empty when it matches or there is no record).
    ``fingerprint_cache``: see :func:`load_adapter`. ``caller``: the name errors start with.
    """
    modules = dict(model.named_modules())
    for name, m in adapter.modules.items():
        layer = modules.get(name)
        parts = name.split(".")
        inside_lora = any(isinstance(modules.get(".".join(parts[:i])), LoRALinear)
                          for i in range(1, len(parts)))
        if not (isinstance(layer, LoRALinear) or is_linear(layer)) or inside_lora:
            raise ValueError(f"{caller}: the adapter has weights for module {name!r}, which "
                             f"{type(model).__name__} does not have (or is not linear)")
        for what, got, want in (("lora_A", m.lora_A.shape, (m.r, layer.in_features)),
                                ("lora_B", m.lora_B.shape, (layer.out_features, m.r))):
            if tuple(got) != want:
                raise ValueError(f"{caller}: module {name!r}: {what} in the file has shape "
                                 f"{tuple(got)}, the model's layer needs {want}")
        # B's height is the magnitude's (read_adapter checked), so B's check covers it
    if not adapter.base_fingerprint:
        return []
    key = tuple(sorted(adapter.modules))
    if fingerprint_cache is not None and key in fingerprint_cache:
        current = fingerprint_cache[key]
    else:
        try:
            current = base_fingerprint(model, list(adapter.modules))
        except ValueError as e:
            raise ValueError(f"{caller}: {e}") from None
        if fingerprint_cache is not None:
            fingerprint_cache[key] = current
    foreign = compare_fingerprints(adapter.base_fingerprint, current)
    refuse_or_warn(foreign, f"{caller}: {adapter.path} was trained on a different base model",
                   "An adapter is tied to its exact base. Pass strict=False to load it anyway.", strict)
    return foreign


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 strict: bool = True, fingerprint_cache: dict | None = None) -> nn.Module:
    """Load an adapter folder written by loracore or PEFT into ``model`` (in place).

    ``path`` is the folder (or one of its two files). LoRA layers are injected where the file
    has weights (added as a new adapter where the layer already has LoRA). ``adapter_name``
    defaults to ``"default"``; the loaded adapter becomes the active one. With ``strict=True``
    an adapter whose recorded base fingerprint differs from ``model``, or whose config no
    longer matches its weights file, is refused; ``strict=False`` loads it with a warning.
    All or nothing: everything is checked first (:func:`read_adapter`, then
    :func:`check_base`), and a failure leaves ``model`` as it was.

    ``fingerprint_cache``: a dict the caller keeps between loads into the same ``model`` (keyed
    by the targeted module names), so the base weights are hashed once per set of layers instead
    of once per load. Valid only while the base weights do not change (a server that never writes
    them, like :class:`loracore.serve.AdapterRegistry`). Returns ``model``.
    """
    adapter_name = "default" if adapter_name is None else adapter_name
    check_adapter_name("load_adapter", adapter_name)  # the one check of the name on this path
    adapter = read_adapter(path, strict=strict, caller="load_adapter")
    modules = dict(model.named_modules())
    for name in adapter.modules:
        layer = modules.get(name)
        if isinstance(layer, LoRALinear) and adapter_name in layer.lora_A:
            raise ValueError(f"load_adapter: module {name!r} already has an adapter named "
                             f"{adapter_name!r}; pass another adapter_name or delete_adapter() first")
    foreign = check_base(model, adapter, strict=strict, fingerprint_cache=fingerprint_cache,
                         caller="load_adapter")

    # Layers sharing (r, alpha) are injected together, exactly the names the file holds.
    groups: dict[tuple[int, float], list[str]] = {}
    for name, m in adapter.modules.items():
        groups.setdefault((m.r, m.lora_alpha), []).append(name)
    with all_or_nothing(model):
        for (r, alpha), names in groups.items():
            inject_modules(model, names, r, alpha, lora_dropout=adapter.lora_dropout,
                           adapter_name=adapter_name, use_rslora=adapter.use_rslora,
                           use_dora=adapter.use_dora, checked=True)
        with torch.no_grad():
            for name, m in adapter.modules.items():
                layer = model.get_submodule(name)
                for what, tensor in (("lora_A", m.lora_A), ("lora_B", m.lora_B),
                                     (MAGNITUDE, m.lora_magnitude_vector)):
                    if tensor is not None:
                        weight = getattr(layer, what)[adapter_name].weight
                        weight.copy_(tensor.to(weight.device, weight.dtype))
    record_foreign(model, adapter_name, foreign)
    return model
