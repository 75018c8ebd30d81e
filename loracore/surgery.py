"""Model surgery: putting LoRA layers into a whole model, and the operations on all of them.

:func:`inject` finds a model's linear layers by name and wraps each in a
:class:`~loracore.layer.LoRALinear` in place; the other functions act on every LoRA layer of
the model at once (activate, disable, merge, unmerge, delete an adapter, unwrap everything).
The layer itself, and the math, live in :mod:`loracore.layer`.
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from typing import Iterator

from torch import nn

from loracore.layer import LoRALinear, is_linear

__all__ = [
    "inject", "lora_layers", "linear_layer_names", "trainable_parameters", "set_adapter",
    "disable_adapters", "merge_adapters", "unmerge_adapters", "delete_adapter", "remove_lora",
]


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (never a LoRA target under "all-linear", as in PEFT)."""
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers LoRA could target (inside LoRALinear: the layer itself)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            names.append(name)
        elif is_linear(module) and not _inside_lora(name, model):
            names.append(name)
    return names


def _inside_lora(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoRALinear):
            return True
    return False


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):  # as in PEFT: one string is a regex over the full name
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: nn.Module, target_modules: list[str] | str, r: int, lora_alpha: float, *,
           lora_dropout: float = 0.0, adapter_name: str = "default",
           use_rslora: bool = False) -> nn.Module:
    """Wrap matching linear layers of ``model`` in :class:`LoRALinear`, in place.

    ``target_modules``: layer names matched against the end of each module's full name
    (``["q_proj", "v_proj"]``), ``"all-linear"`` (every linear layer except the output head),
    or one regex string matched against full names. Every base parameter is frozen; only the
    new adapter's parameters are trainable. A layer that is already a ``LoRALinear`` gets
    the new adapter added. Returns ``model``.
    """
    if isinstance(target_modules, (list, tuple, set)) and not target_modules:
        raise ValueError("inject: target_modules is empty")
    candidates = linear_layer_names(model)
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n in candidates if n not in heads]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
        chosen = [n for n in candidates if _matches(n, target_modules)]
    if not chosen:
        raise ValueError(f"inject: target_modules {target_modules!r} match no linear layer of "
                         f"{type(model).__name__}. Its linear layers are: "
                         f"{sorted({n.split('.')[-1] for n in candidates})} (full names like "
                         f"{candidates[:3]})")
    if not hasattr(model, "_loracore_requires_grad"):  # remembered so remove_lora can restore it
        model._loracore_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        else:
            _replace(model, name, LoRALinear(module, r, lora_alpha, adapter_name=adapter_name,
                                             lora_dropout=lora_dropout, use_rslora=use_rslora))
    set_adapter(model, adapter_name)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in ``model``, by full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layers(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers; call inject() first")
    return layers


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """``(trainable, total, percent)`` parameter counts of ``model``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, 100.0 * trainable / total if total else 0.0


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Activate adapter(s) ``names`` on every LoRA layer that has them (others: none active)."""
    names = [names] if isinstance(names, str) else list(names)
    layers = _layers(model, "set_adapter")
    known = {n for layer in layers.values() for n in layer.lora_A}
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"set_adapter: no adapter named {missing} in the model (adapters: {sorted(known)})")
    for layer in layers.values():
        layer.set_adapter([n for n in names if n in layer.lora_A])


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block (see :meth:`LoRALinear.disable_adapters`)."""
    with ExitStack() as stack:
        for layer in _layers(model, "disable_adapters").values():
            stack.enter_context(layer.disable_adapters())
        yield


def merge_adapters(model: nn.Module, names: list[str] | str | None = None) -> None:
    """Merge ``names`` (default: the active adapters) into every LoRA layer's base weight."""
    for layer in _layers(model, "merge_adapters").values():
        wanted = layer.active_adapters if names is None else (
            [names] if isinstance(names, str) else names)
        layer.merge([n for n in wanted if n in layer.lora_A])


def unmerge_adapters(model: nn.Module) -> None:
    """Undo every merge in ``model``."""
    for layer in _layers(model, "unmerge_adapters").values():
        layer.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every LoRA layer that has it."""
    layers = [layer for layer in _layers(model, "delete_adapter").values() if name in layer.lora_A]
    if not layers:
        raise KeyError(f"delete_adapter: no adapter named {name!r} in the model")
    for layer in layers:
        layer.delete_adapter(name)


def remove_lora(model: nn.Module) -> nn.Module:
    """Unwrap every ``LoRALinear`` back to its base layer (unmerging first), in place.

    What is left is the original model: same modules, same names, base weights restored
    (exactly, unless something was merged: then within float rounding), and the
    ``requires_grad`` flags it had before :func:`inject`. Returns ``model``."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        _replace(model, name, layer.base_layer)
    flags = model.__dict__.pop("_loracore_requires_grad", None)
    if flags is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    return model
