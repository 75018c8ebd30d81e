"""A model with its adapters merged in, saved as a plain transformers model folder.

Where a program runs models but knows nothing of adapters (a plain ``transformers`` script, a
converter to another format), the adapter has to be inside the weights: every adapted layer's
weight becomes ``W + ΔW`` and the LoRA layers go away. :func:`merge_and_save` writes exactly
that folder (``config.json``, ``generation_config.json``, ``model.safetensors``, the
tokenizer's files), which ``AutoModelForCausalLM.from_pretrained(folder)`` loads with the
logits of PEFT's ``merge_and_unload()`` of the same adapter on the same base.

Three choices, and why:

- **The caller's model is not changed.** Each merged weight is computed on a copy
  (:meth:`~loracore.layer.LoRALinear.merged_weight`, the same function ``merge()`` uses), so
  the model keeps its LoRA layers, still trains, swaps and unmerges. (PEFT's
  ``merge_and_unload`` changes the model in place and returns the unwrapped base.)
- **DoRA is merged too**: a DoRA layer is ``m / ‖W + ΔW‖ · (W + ΔW)``, one plain matrix once
  computed (what PEFT merges). A 4-bit base is refused: its weights are packed codes, and
  ``W + ΔW`` rounded back to 4 bits is another model (merge into the float base instead).
- **Tied embeddings stay as they are in the model**: an output head that shares its weight with
  the input embeddings is written once and the saved config says ``tie_word_embeddings: true``;
  a head with its own weight is written and the config says ``false``. An adapter on a tied
  head is refused (merging it would change the embeddings too), as ``merge_adapters`` does.

The folder is written with :func:`loracore.atomic.write_folder`: a failure or a crash at any
moment leaves the previous folder (or none) in place, never half of a model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as serialize
from torch import nn

from loracore.atomic import write_bytes, write_folder
from loracore.layer import LoRALinear, is_float_linear, is_linear
from loracore.surgery import lora_layers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["merge_and_save", "merged_state_dict", "WEIGHTS_FILE"]

#: The weights file of the folder (transformers' name for an unsharded model).
WEIGHTS_FILE = "model.safetensors"


def _refuse_quantized(model: nn.Module) -> None:
    """A layer stored quantized cannot be written as a float model: say which and what to do."""
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if isinstance(module, LoRALinear) or is_linear(module):
            if not is_float_linear(base):
                raise TypeError(
                    f"merge_and_save: module {name!r} is a {type(base).__name__}, stored "
                    f"quantized (e.g. NF4): W + ΔW cannot be written into packed codes, and "
                    f"rounding the merged weight back to 4 bits makes another model. Dequantize "
                    f"first: save_adapter() the QLoRA adapter, load the float base "
                    f"(load_base_model(..., dtype=torch.float32)), load_adapter() the adapter onto "
                    f"it and merge_and_save that model; `loracore export merged ADAPTER --out "
                    f"FOLDER` does those steps")


def _plan(model: nn.Module, adapter_names: list[str] | None) -> dict[str, list[str]]:
    """LoRA layer name -> the adapters to merge into it (checked: known names, float bases)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"merge_and_save: {type(model).__name__} has no LoRA layers, so there is "
                         f"nothing to merge; a plain model is saved with model.save_pretrained()")
    if adapter_names is None:
        return {n: (layer.merged_adapters + [a for a in layer.active_adapters
                                             if a not in layer.merged_adapters]
                    if not layer.disabled else []) for n, layer in layers.items()}
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(a, str) for a in adapter_names):
        raise TypeError(f"merge_and_save: adapter_names must be a list of adapter names or None, "
                        f"got {adapter_names!r}")
    known = sorted({a for layer in layers.values() for a in layer.lora_A})
    missing = [a for a in adapter_names if a not in known]
    if missing:
        raise KeyError(f"merge_and_save: no adapter named {missing} in the model (adapters: {known})")
    return {n: [a for a in adapter_names if a in layer.lora_A] for n, layer in layers.items()}


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def merged_state_dict(model: nn.Module, adapter_names: list[str] | None = None
                      ) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict of ``model`` with its adapters merged and the LoRA layers gone, and
    whether the output head is tied to the input embeddings; ``model`` is not changed.

    Keys are the base model's own (``model.layers.0.self_attn.q_proj.weight``, never
    ``...base_layer.weight`` or ``lora_A``); each adapted layer's weight is
    ``(out_features, in_features)`` in the base dtype with ``adapter_names`` merged (default:
    what each layer computes now, see :meth:`~loracore.layer.LoRALinear.merged_weight`).
    Tensors are on the CPU, contiguous, none sharing memory; a tied head is left out (its
    weight is the embeddings'), as transformers writes it.
    """
    _refuse_quantized(model)
    plan = _plan(model, adapter_names)
    layers = lora_layers(model)
    # which parameters share memory: a merged weight tied to another is refused, as in merge_adapters
    owners: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        if p.numel():
            owners.setdefault((p.data_ptr(), tuple(p.shape)), []).append(key)
    for name, wanted in plan.items():
        weight = layers[name].base_layer.weight
        tied = [k for k in owners.get((weight.data_ptr(), tuple(weight.shape)), [])
                if k != f"{name}.base_layer.weight"]
        if wanted and tied:
            raise ValueError(f"merge_and_save: the weight of module {name!r} is tied to {tied} "
                             f"(tied embeddings): merging adapter(s) {wanted} into it would change "
                             f"those too. Leave this layer out of the adapter, or untie first: "
                             f"module.base_layer.weight = nn.Parameter(module.base_layer.weight.clone())")

    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        layer_name = next((n for n in layers if key.startswith(f"{n}.")), None)
        if layer_name is None:
            out[key] = tensor
            continue
        rest = key[len(layer_name) + 1:]
        if not rest.startswith("base_layer."):
            continue  # lora_A, lora_B, lora_magnitude_vector: inside the merged weight
        new_key = f"{layer_name}.{rest[len('base_layer.'):]}"
        if rest == "base_layer.weight":
            merged = layers[layer_name].merged_weight(plan[layer_name])
            if not torch.isfinite(merged).all():
                raise ValueError(f"merge_and_save: merging {plan[layer_name]} into module "
                                 f"{layer_name!r} gives inf or NaN; nothing was written")
            out[new_key] = merged
        else:
            out[new_key] = tensor

    # Tied embeddings: the head's key is left out when the head *is* the embedding (the config
    # then says so, and transformers ties them again on load); any other sharing is copied.
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = _module_name(model, get_in()) if callable(get_in) else None
    head_name = _module_name(model, get_out()) if callable(get_out) else None
    emb_key, head_key = f"{emb}.weight", f"{head_name}.weight"
    tied = (emb is not None and head_name is not None and emb_key in out and head_key in out
            and out[emb_key].data_ptr() == out[head_key].data_ptr())
    if tied:
        del out[head_key]
    seen: set[int] = set()
    for key, tensor in out.items():
        tensor = tensor.detach().to("cpu")
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[key] = tensor.contiguous()
    return out, tied


def _config_json(model: nn.Module, tied: bool, dtype: torch.dtype | None) -> str:
    """The model's config as transformers writes it, for the merged model: its class in
    ``architectures``, its dtype, the tie as it is, no quantization settings."""
    config = copy.deepcopy(model.config)  # the caller's config is not changed
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = tied
    # a GGUF-loaded model (dequantized to float on load) carries its GgufConfig: the weights
    # written here are plain floats (quantized layers were refused), and a later 4-bit load
    # of the folder would be refused as "already quantized"
    config.__dict__.pop("quantization_config", None)
    return config.to_json_string(use_diff=True)


def _check_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"merge_and_save: {folder} is a file; give a folder path")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"merge_and_save: {folder} exists and is not empty; pick a new folder, "
                              f"or pass overwrite=True (--overwrite) to replace it whole")


def merge_and_save(model: nn.Module, folder: str | os.PathLike, *,
                   tokenizer: PreTrainedTokenizerBase | None = None,
                   adapter_names: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` with its adapters merged into a transformers model folder; return it.

    ``folder`` gets ``config.json``, ``generation_config.json`` (when the model has one),
    ``model.safetensors`` and, with ``tokenizer``, the tokenizer's files:
    ``AutoModelForCausalLM.from_pretrained(folder)`` then loads the merged model, a plain one
    (no LoRA layers, nothing of loracore or PEFT needed).

    Args:
        model: a transformers model with loracore LoRA layers (float base; DoRA included). It
            is not changed: merged weights are computed on copies.
        folder: the folder to write. An existing non-empty folder is refused unless
            ``overwrite``, which replaces it whole (no old file stays beside the new model).
        tokenizer: saved into the folder too (recommended: the folder is then self-contained).
        adapter_names: which adapters to merge; default what the model computes now (its
            merged and active adapters, as PEFT's ``merge_and_unload``).

    Raises (before anything is written): ``TypeError`` for a quantized layer, ``ValueError``
    for a tied head with an adapter or a non-finite merged weight, ``KeyError`` for an unknown
    adapter name, ``FileExistsError`` for a non-empty folder without ``overwrite``.
    All or nothing: a failure while writing (:class:`loracore.atomic.DiskWriteError` for a
    refusing disk) leaves the previous folder, or none, in place.
    """
    if not hasattr(model, "config") or not callable(getattr(model.config, "to_json_string", None)):
        raise TypeError(f"merge_and_save: {type(model).__name__} has no transformers config; "
                        f"pass a model loaded with transformers (load_base_model, from_pretrained)")
    if not isinstance(overwrite, bool):
        raise TypeError(f"merge_and_save: overwrite must be True or False, got {overwrite!r}")
    target = Path(os.path.realpath(folder))
    _check_folder(target, overwrite)
    tensors, tied = merged_state_dict(model, adapter_names)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    config_text = _config_json(model, tied, dtypes.pop() if len(dtypes) == 1 else None)
    generation = getattr(model, "generation_config", None)
    generation_text = generation.to_json_string(use_diff=True) if generation is not None else None
    # serialized in memory first: write_bytes turns a full disk into an error naming the file
    weights = serialize(tensors, metadata={"format": "pt"})
    del tensors

    def write_files(tmp: Path) -> None:
        write_bytes(tmp / "config.json", config_text.encode("utf-8"))
        if generation_text is not None:
            write_bytes(tmp / "generation_config.json", generation_text.encode("utf-8"))
        write_bytes(tmp / WEIGHTS_FILE, weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    write_folder(target, write_files, keep_others=False)
    return target


def describe(folder: Path) -> str:
    """One line about a merged folder: its files and the weights' size."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    size = (folder / WEIGHTS_FILE).stat().st_size / 2**20
    return f"{folder}: {len(files)} files ({', '.join(files)}), {WEIGHTS_FILE} {size:.1f} MiB"

