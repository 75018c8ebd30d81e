"""The LoRA layer and how to put it into a model.

A frozen linear layer ``W`` (out_features x in_features) gets a trainable low-rank update
``ΔW = scaling · B @ A`` with ``A: (r, in_features)`` and ``B: (out_features, r)``:

    y = x @ W.T + scaling · (dropout(x) @ A.T) @ B.T

``A`` starts Kaiming-uniform and ``B`` starts at zero, so ``ΔW = 0`` and training begins
exactly at the base model. ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
rsLoRA). The names follow PEFT (``lora_A``, ``lora_B``, ``scaling``, ``merge()`` ...), so
what a learner reads here carries over to ``peft.tuners.lora``.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "LoRALinear", "inject", "trainable_parameters", "lora_layers", "set_adapter",
    "disable_adapters", "merge_adapters", "unmerge_adapters", "delete_adapter", "remove_lora",
    "loraplus_param_groups", "linear_layer_names", "register_linear_type", "is_linear",
    "is_float_linear",
]

# Extra classes that count as "a linear layer LoRA can wrap" besides nn.Linear.
_EXTRA_LINEAR_TYPES: list[type] = []


def register_linear_type(cls: type) -> type:
    """Let ``inject`` target instances of ``cls`` (a module with ``in_features``,
    ``out_features`` and ``forward(x)``). Usable as a class decorator; returns ``cls``."""
    if cls not in _EXTRA_LINEAR_TYPES:
        _EXTRA_LINEAR_TYPES.append(cls)
    return cls


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear, *_EXTRA_LINEAR_TYPES]
    try:  # imported lazily: qlora builds on this module, so a top-level import would be circular
        from loracore.qlora import Linear4bit  # type: ignore[attr-defined]
        types.append(Linear4bit)
    except ImportError:
        pass
    return tuple(types)


def is_linear(module: nn.Module) -> bool:
    """True for a layer LoRA can wrap: ``nn.Linear``, ``loracore.qlora.Linear4bit`` or a
    registered type; False for a ``LoRALinear`` (it is already wrapped)."""
    return not isinstance(module, LoRALinear) and isinstance(module, _linear_types())


def is_float_linear(module: nn.Module) -> bool:
    """True for a plain floating-point ``nn.Linear``, whose weight can take ΔW in place; False
    for a quantized layer (even one that subclasses ``nn.Linear``, as bitsandbytes' does)."""
    quantized = _linear_types()[1:]
    return (isinstance(module, nn.Linear) and not (quantized and isinstance(module, quantized))
            and module.weight.is_floating_point())


class LoRALinear(nn.Module):
    """A frozen linear layer plus any number of named low-rank adapters.

    Args:
        base_layer: ``nn.Linear`` or a quantized stand-in (``loracore.qlora.Linear4bit``):
            any module with ``in_features``, ``out_features`` and ``forward(x)``. Kept as is.
        r, lora_alpha, adapter_name, lora_dropout, use_rslora: when ``r`` is given, an
            adapter is added right away (see :meth:`add_adapter`); ``lora_alpha`` defaults to ``r``.

    Per adapter name: ``lora_A[name]`` is ``nn.Linear(in, r)`` (weight ``(r, in)``),
    ``lora_B[name]`` is ``nn.Linear(r, out)`` (weight ``(out, r)``), ``lora_dropout[name]``,
    and the dicts ``r``, ``lora_alpha``, ``scaling``.
    """

    def __init__(self, base_layer: nn.Module, r: int | None = None, lora_alpha: float | None = None,
                 *, adapter_name: str = "default", lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        for attr in ("in_features", "out_features"):
            if not isinstance(getattr(base_layer, attr, None), int):
                raise TypeError(f"LoRALinear: base layer {type(base_layer).__name__} has no integer "
                                f"`{attr}`; LoRA wraps nn.Linear-like layers only")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        if r is not None:
            self.add_adapter(adapter_name, r, r if lora_alpha is None else lora_alpha,
                             lora_dropout, use_rslora)

    # ---- adapters -------------------------------------------------------------------------
    def _adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Adapters live on the base layer's device, in its float dtype (float32 when the
        base stores its weight quantized, e.g. as packed 4-bit integers)."""
        weight = getattr(self.base_layer, "weight", None)
        tensors = [weight] if isinstance(weight, torch.Tensor) else []
        tensors += list(self.base_layer.parameters()) + list(self.base_layer.buffers())
        device = tensors[0].device if tensors else torch.device("cpu")
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return device, weight.dtype
        return device, getattr(self.base_layer, "compute_dtype", torch.float32)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name`` (A Kaiming-uniform, B zeros) and make it the only active one."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"LoRALinear.add_adapter: adapter name must be a non-empty string "
                             f"without dots, got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"LoRALinear.add_adapter: adapter {name!r} already exists on this layer "
                             f"(adapters: {list(self.lora_A)}); delete it first or pick another name")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRALinear.add_adapter: r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRALinear.add_adapter: lora_dropout must be in [0, 1), got {lora_dropout}")
        if not math.isfinite(lora_alpha):
            raise ValueError(f"LoRALinear.add_adapter: lora_alpha must be finite, got {lora_alpha}")
        device, dtype = self._adapter_device_dtype()
        lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        # A: nn.Linear's own default (Kaiming-uniform, a=sqrt(5)), as in PEFT. B: zeros, so the
        # product B @ A is zero and the wrapped model starts exactly at the base model.
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.use_rslora[name] = use_rslora
        # rsLoRA: alpha/sqrt(r) keeps the update's size stable as r grows; alpha/r shrinks it.
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.set_adapter(name)

    def _check_names(self, names: list[str], what: str) -> None:
        missing = [n for n in names if n not in self.lora_A]
        if missing:
            raise KeyError(f"LoRALinear.{what}: no adapter named {missing} on this layer "
                           f"(adapters: {list(self.lora_A)})")

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters; only their parameters stay trainable."""
        names = [names] if isinstance(names, str) else list(names)
        self._check_names(names, "set_adapter")
        self.active_adapters = names
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name in names)
            self.lora_B[name].requires_grad_(name in names)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer (it must not be merged)."""
        self._check_names([name], "delete_adapter")
        if name in self.merged_adapters:
            raise RuntimeError(f"LoRALinear.delete_adapter: adapter {name!r} is merged into the base "
                               f"weight; unmerge() first")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del d[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # ---- merging --------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name``: ``scaling · B @ A``, shape ``(out_features, in_features)``."""
        self._check_names([name], "get_delta_weight")
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _base_weight(self, what: str) -> torch.Tensor:
        if not is_float_linear(self.base_layer):
            raise TypeError(f"LoRALinear.{what}: the base layer is a {type(self.base_layer).__name__}, "
                            f"not nn.Linear; its weight is stored quantized, so ΔW cannot be added "
                            f"to it in place. Dequantize the base first, or keep the adapter unmerged")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self, names: list[str] | str | None = None, safe: bool = True) -> None:
        """Add ``ΔW`` of ``names`` (default: the active adapters) into the base weight.

        After merging, the forward pass is one plain matmul: no added latency. With
        ``safe=True`` the sum is computed on a copy and refused if it holds inf or NaN.
        Merging an adapter that is already merged is an error, never a second add.
        """
        names = list(self.active_adapters) if names is None else (
            [names] if isinstance(names, str) else list(names))
        self._check_names(names, "merge")
        weight = self._base_weight("merge")
        twice = [n for n in names if n in self.merged_adapters]
        if twice:
            raise RuntimeError(f"LoRALinear.merge: adapter(s) {twice} already merged into this layer; "
                               f"merging again would add ΔW twice. Call unmerge() first")
        for name in names:
            delta = self.get_delta_weight(name).to(weight.dtype)
            if safe:
                new = weight.clone() + delta
                if not torch.isfinite(new).all():
                    raise ValueError(f"LoRALinear.merge: merging adapter {name!r} gives non-finite "
                                     f"weights (inf/NaN); the base weight was left unchanged")
                weight.copy_(new)
            else:
                weight.add_(delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged ``ΔW`` from the base weight again (no-op when nothing is merged)."""
        if not self.merged:
            return
        weight = self._base_weight("unmerge")
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.sub_(self.get_delta_weight(name).to(weight.dtype))

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside the block the layer is the base layer: ``forward`` returns ``base_layer(x)``.

        Bit for bit when nothing is merged; merged adapters are unmerged on entry and merged
        back on exit (float rounding applies to that round trip)."""
        merged = list(self.merged_adapters)
        self.unmerge()
        was_disabled, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = was_disabled
            if merged:
                self.merge(merged)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(..., in_features)`` -> ``(..., out_features)``:
        ``base(x) + Σ_active, unmerged scaling · B(A(dropout(x)))``."""
        result = self.base_layer(x)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue  # already inside the base weight
            lora_A = self.lora_A[name]
            update = self.lora_B[name](lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            # PEFT's operations in PEFT's order, so the two agree bit for bit. (Scaling the r-wide
            # bottleneck, or fusing the add into the matmul, is a little faster but rounds
            # differently, and 30 layers turn that into ~1e-4 on the logits.)
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]:g}" for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}")


# ---- whole models ---------------------------------------------------------------------------
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


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): ``lora_B`` learns
    ``loraplus_lr_ratio`` times faster than ``lora_A``.

    Returns groups ``{"name", "params", "lr", "weight_decay"}`` for the trainable ``lora_A``
    weights (lr), ``lora_B`` weights (lr · ratio) and any other trainable parameters (lr);
    pass them straight to ``torch.optim.AdamW``.
    """
    if lr <= 0 or loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_param_groups: lr and loraplus_lr_ratio must be positive, "
                         f"got lr={lr}, loraplus_lr_ratio={loraplus_lr_ratio}")
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "lora_A" if ".lora_A." in name else "lora_B" if ".lora_B." in name else "other"
        groups[key].append(p)
    if not groups["lora_A"] and not groups["lora_B"]:
        raise ValueError("loraplus_param_groups: the model has no trainable LoRA parameters; "
                         "call inject() first")
    lrs = {"lora_A": lr, "lora_B": lr * loraplus_lr_ratio, "other": lr}
    return [{"name": k, "params": v, "lr": lrs[k], "weight_decay": weight_decay}
            for k, v in groups.items() if v]
