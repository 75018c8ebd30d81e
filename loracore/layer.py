"""The LoRA layer: a frozen linear layer plus trainable low-rank adapters.

A frozen linear layer ``W`` (out_features x in_features) gets a trainable low-rank update
``ΔW = scaling · B @ A`` with ``A: (r, in_features)`` and ``B: (out_features, r)``:

    y = x @ W.T + b + scaling · (dropout(x) @ A.T) @ B.T

``A`` starts Kaiming-uniform and ``B`` starts at zero, so ``ΔW = 0`` and training begins
exactly at the base model. ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
rsLoRA). The names follow PEFT (``lora_A``, ``lora_B``, ``scaling``, ``merge()`` ...), so
what a learner reads here carries over to ``peft.tuners.lora``.

The math is a few pure functions (:func:`scaling`, :func:`delta_weight`, :func:`lora_forward`,
the ones lab 01 has learners write); :class:`LoRALinear` holds the state and calls them.
Putting layers into a whole model is :mod:`loracore.surgery`'s job; this module imports none
of it. Quantized base layers register themselves with :func:`register_linear_type`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "scaling", "delta_weight", "lora_update", "lora_forward", "LoRALinear",
    "register_linear_type", "is_linear", "is_float_linear",
]


# ---- the math, as pure functions ----------------------------------------------------------
def scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor in front of ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
    rsLoRA (Kalajdzievski 2023), which keeps the update's size stable as ``r`` grows.

    >>> scaling(32, 16), scaling(32, 16, use_rslora=True)
    (2.0, 8.0)
    """
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW = scaling · B @ A``. lora_A: ``(r, in)``, lora_B: ``(out, r)`` -> ``(out, in)``."""
    return scaling * (lora_B @ lora_A)


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """The adapter's path: ``scaling · (x @ A.T) @ B.T``, ``(..., in)`` -> ``(..., out)``.

    ``A`` is applied first, so only an ``r``-wide bottleneck is formed, never the
    ``(out, in)`` matrix ``B @ A``. The scaling multiplies the output: PEFT's order, so the two
    agree bit for bit (scaling the bottleneck instead rounds differently).
    """
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """A LoRA linear layer as one function: ``x @ W.T + b + scaling · (x @ A.T) @ B.T``.

    x: ``(..., in)``, weight: ``(out, in)``, bias: ``(out,)`` or None, lora_A: ``(r, in)``,
    lora_B: ``(out, r)`` -> ``(..., out)``. With ``lora_B = 0`` it is the base layer exactly.
    """
    return F.linear(x, weight, bias) + lora_update(x, lora_A, lora_B, scaling)


# ---- which layers LoRA can wrap -----------------------------------------------------------
# Classes that count as "a linear layer LoRA can wrap" besides nn.Linear. They store their
# weight in some other form (quantized), so ΔW is never added to it in place.
_EXTRA_LINEAR_TYPES: list[type] = []


def register_linear_type(cls: type) -> type:
    """Let LoRA wrap instances of ``cls``: a module with ``in_features``, ``out_features`` and
    ``forward(x)`` whose weight is not a float tensor that ΔW can be added to (a quantized
    layer such as :class:`loracore.qlora.Linear4bit`). Usable as a class decorator."""
    if cls not in _EXTRA_LINEAR_TYPES:
        _EXTRA_LINEAR_TYPES.append(cls)
    return cls


def is_linear(module: nn.Module) -> bool:
    """True for a layer LoRA can wrap: ``nn.Linear`` or a registered type; False for a
    ``LoRALinear`` (it is already wrapped)."""
    return (not isinstance(module, LoRALinear)
            and isinstance(module, (nn.Linear, *_EXTRA_LINEAR_TYPES)))


def is_float_linear(module: nn.Module) -> bool:
    """True for a plain floating-point ``nn.Linear``, whose weight can take ΔW in place; False
    for a quantized layer (even one that subclasses ``nn.Linear``, as bitsandbytes' does)."""
    return (isinstance(module, nn.Linear) and not isinstance(module, tuple(_EXTRA_LINEAR_TYPES))
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
        self.scaling[name] = scaling(lora_alpha, r, use_rslora)
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
        return delta_weight(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

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
            lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
            x_in = self.lora_dropout[name](x.to(lora_A.dtype))
            # PEFT's operations in PEFT's order (see lora_update), so the two agree bit for bit;
            # another order rounds differently, and 30 layers turn that into ~1e-4 on the logits.
            result = result + lora_update(x_in, lora_A, lora_B, self.scaling[name]).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]:g}" for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}")
