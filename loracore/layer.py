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
DoRA adapters (``use_dora=True``) add a magnitude vector; their math is in :mod:`loracore.dora`.
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

from loracore.dora import Magnitude, dora_merged_weight, dora_update, weight_norm

__all__ = [
    "scaling", "delta_weight", "lora_update", "lora_forward", "LoRALinear",
    "register_linear_type", "is_linear", "is_float_linear", "check_adapter_name", "check_adapter_args",
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


def check_adapter_name(where: str, name: object) -> None:
    """Refuse an adapter name that is not a non-empty string without dots (a dot would break
    the module paths PyTorch builds from it), naming ``where``."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{where}: adapter name must be a non-empty string without dots, "
                         f"got {name!r}")


def check_adapter_args(where: str, name: object, r: object, lora_alpha: object,
                       lora_dropout: object = 0.0) -> None:
    """Refuse an adapter's arguments with a message naming ``where`` and the fix; used by
    :meth:`LoRALinear.add_adapter` and, before anything changes, by model-level operations."""
    check_adapter_name(where, name)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{where}: r must be a positive int, got {r!r}")
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if (not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool)
            or not math.isfinite(lora_alpha)):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got {lora_alpha!r}")
    if lora_alpha == 0:
        raise ValueError(f"{where}: lora_alpha=0 makes scaling 0, so the adapter's output and the "
                         f"gradients of A and B are exactly zero: it could never learn. Use "
                         f"lora_alpha=r (or 2*r) instead")


class LoRALinear(nn.Module):
    """A frozen linear layer plus any number of named low-rank adapters.

    Args:
        base_layer: ``nn.Linear`` or a quantized stand-in (``loracore.qlora.Linear4bit``):
            any module with ``in_features``, ``out_features`` and ``forward(x)``. Kept as is.
        r, lora_alpha, adapter_name, lora_dropout, use_rslora, use_dora: when ``r`` is given,
            an adapter is added right away (see :meth:`add_adapter`); ``lora_alpha`` defaults to ``r``.

    Per adapter name: ``lora_A[name]`` is ``nn.Linear(in, r)`` (weight ``(r, in)``),
    ``lora_B[name]`` is ``nn.Linear(r, out)`` (weight ``(out, r)``), ``lora_dropout[name]``,
    and the dicts ``r``, ``lora_alpha``, ``scaling``. A DoRA adapter also has
    ``lora_magnitude_vector[name].weight`` ``(out,)`` (see :mod:`loracore.dora`).
    """

    def __init__(self, base_layer: nn.Module, r: int | None = None, lora_alpha: float | None = None,
                 *, adapter_name: str = "default", lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False,
                 autocast_adapter_dtype: bool = True) -> None:
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
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.autocast_adapter_dtype = autocast_adapter_dtype
        # The base weight as it was before the first merge, kept while anything is merged so
        # that unmerge() restores it bit for bit (see merge()).
        # A non-persistent buffer: it follows .to() but never enters a state_dict.
        self.register_buffer("_unmerged_weight", None, persistent=False)
        if r is not None:
            self.add_adapter(adapter_name, r, r if lora_alpha is None else lora_alpha,
                             lora_dropout, use_rslora, use_dora)

    # ---- adapters -------------------------------------------------------------------------
    def _adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Adapters live on the base layer's device, in its float dtype; float32 when the base
        is bfloat16/float16 (unless ``autocast_adapter_dtype=False``, as in PEFT: small updates
        to A and B would round away in 8 mantissa bits) or stores its weight quantized."""
        weight = getattr(self.base_layer, "weight", None)
        tensors = [weight] if isinstance(weight, torch.Tensor) else []
        tensors += list(self.base_layer.parameters()) + list(self.base_layer.buffers())
        device = tensors[0].device if tensors else torch.device("cpu")
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            dtype = weight.dtype
        else:
            dtype = getattr(self.base_layer, "compute_dtype", torch.float32)
        if self.autocast_adapter_dtype and dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        return device, dtype

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, *, checked: bool = False) -> None:
        """Add adapter ``name`` (A Kaiming-uniform, B zeros) and make it the only active one.
        With ``use_dora`` it also gets a magnitude ``m = ‖W‖`` row by row (:mod:`loracore.dora`).
        ``checked=True``: the caller has already checked the arguments (as
        :func:`~loracore.surgery.inject` does once for all its layers), so they are not checked
        again here."""
        if not checked:
            check_adapter_args("LoRALinear.add_adapter", name, r, lora_alpha, lora_dropout)
            if not isinstance(use_dora, bool):
                raise TypeError(f"LoRALinear.add_adapter: use_dora must be True or False, got {use_dora!r}")
        if use_dora:
            self._dense_weight("add_adapter(use_dora=True)")  # refuse before anything changes
        if name in self.lora_A:
            raise ValueError(f"LoRALinear.add_adapter: adapter {name!r} already exists on this layer "
                             f"(adapters: {list(self.lora_A)}); delete it first or pick another name")
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
        if use_dora:
            norm = weight_norm(self._dense_weight("add_adapter"), lora_A.weight, lora_B.weight,
                               self.scaling[name])
            self.lora_magnitude_vector[name] = Magnitude(norm.to(dtype))
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
        for name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].requires_grad_(name in names)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer (it must not be merged)."""
        self._check_names([name], "delete_adapter")
        if name in self.merged_adapters:
            raise RuntimeError(f"LoRALinear.delete_adapter: adapter {name!r} is merged into the base "
                               f"weight; unmerge() first")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            del d[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # ---- merging --------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name``: ``scaling · B @ A``, shape ``(out_features, in_features)``,
        computed in float32 at least (a bfloat16 product would round B @ A to 8 bits). For a DoRA
        adapter this is only the update of the direction: merging also rescales each row."""
        self._check_names([name], "get_delta_weight")
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = torch.promote_types(A.dtype, torch.float32)
        return delta_weight(A.to(dtype), B.to(dtype), self.scaling[name])

    def _base_weight(self, what: str) -> torch.Tensor:
        if not is_float_linear(self.base_layer):
            raise TypeError(f"LoRALinear.{what}: the base layer is a {type(self.base_layer).__name__}, "
                            f"not nn.Linear; its weight is stored quantized, so ΔW cannot be added "
                            f"to it in place. Dequantize the base first, or keep the adapter unmerged")
        return self.base_layer.weight

    def _dense_weight(self, what: str, original: bool = True) -> torch.Tensor:
        """The base weight ``(out, in)`` as a float tensor, for DoRA: dequantized for a 4-bit
        base; with ``original`` the weight before any merge (what DoRA's norm is taken on)."""
        base = self.base_layer
        if is_float_linear(base):
            kept = self._unmerged_weight
            return kept if original and kept is not None else base.weight
        if callable(getattr(base, "dequantize", None)):
            return base.dequantize()
        raise TypeError(f"LoRALinear.{what}: DoRA needs the base weight as a float matrix, and a "
                        f"{type(base).__name__} base has neither a float weight nor dequantize(); "
                        f"use plain LoRA (use_dora=False) on this layer")

    def _merged_weight(self, original: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``original + ΔW_1 + ΔW_2 ...``, added in order in (at least) float32, rounded once
        to the base dtype. A function of (original, names) only, so merging the same adapters
        onto the same original always gives the same bits (what rollback and
        :meth:`disable_adapters` rely on). In float32 it is PEFT's ``weight += ΔW`` exactly.
        A DoRA adapter rescales the rows of the sum so far instead (PEFT's order, as in forward)."""
        merged = original.to(torch.promote_types(original.dtype, torch.float32))
        for name in names:
            if name in self.lora_magnitude_vector:  # DoRA: rescale rows; the norm is on `original`
                merged = dora_merged_weight(
                    merged, original, self.lora_A[name].weight, self.lora_B[name].weight,
                    self.scaling[name], self.lora_magnitude_vector[name].weight)
            else:
                merged = merged + self.get_delta_weight(name).to(merged.dtype)
        return merged.to(original.dtype)

    @torch.no_grad()
    def merged_weight(self, names: list[str] | None = None) -> torch.Tensor:
        """The base weight with adapters ``names`` merged in, ``(out_features, in_features)`` in
        the base dtype, computed on a copy: the layer is not changed. Exactly what :meth:`merge`
        would write (the same function of the original weight and the names).

        ``names`` default: what the layer computes now, its merged adapters then its active
        unmerged ones (none while disabled). Given ``names`` are merged onto the *original*
        weight, whatever is merged in the layer now. Refused for a quantized base."""
        weight = self._base_weight("merged_weight")
        if names is None:
            names = [] if self.disabled else self.merged_adapters + [
                n for n in self.active_adapters if n not in self.merged_adapters]
        names = list(names)
        self._check_names(names, "merged_weight")
        original = weight.detach() if self._unmerged_weight is None else self._unmerged_weight
        if not names:
            return original.clone()
        return self._merged_weight(original, names)

    @torch.no_grad()
    def merge(self, names: list[str] | str | None = None, safe: bool = True) -> None:
        """Add ``ΔW`` of ``names`` (default: the active adapters) into the base weight.

        After merging, the forward pass is one plain matmul: no added latency. The merged
        weight is computed on a copy; with ``safe=True`` it is refused if it holds inf or NaN
        (``safe=False`` skips that check, as in PEFT). Merging an adapter that is already merged is
        an error, never a second add. Either every name is merged or none is.

        Memory: while anything is merged the layer keeps a copy of the original base weight
        (``out_features x in_features`` in the base dtype), so :meth:`unmerge` restores it bit
        for bit in bfloat16 as in float32 (subtracting ΔW again would round differently).
        A layer cannot see whether its weight is tied to another module's (a tied output head);
        :func:`loracore.surgery.merge_adapters` checks that and refuses.
        """
        names = list(self.active_adapters) if names is None else (
            [names] if isinstance(names, str) else list(names))
        self._check_names(names, "merge")
        weight = self._base_weight("merge")
        twice = [n for n in names if n in self.merged_adapters] + [
            n for i, n in enumerate(names) if n in names[:i]]
        if twice:
            raise RuntimeError(f"LoRALinear.merge: adapter(s) {twice} already merged into this layer; "
                               f"merging again would add ΔW twice. Call unmerge() first")
        if not names:
            return
        original = weight.detach().clone() if self._unmerged_weight is None else self._unmerged_weight
        new = self._merged_weight(original, self.merged_adapters + names)
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"LoRALinear.merge: merging adapter(s) {names} gives non-finite "
                             f"weights (inf/NaN); the base weight was left unchanged")
        weight.copy_(new)
        self._unmerged_weight = original
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the base weight as it was before the first merge, bit for bit (no-op when
        nothing is merged)."""
        if not self.merged:
            return
        self._base_weight("unmerge").copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters.clear()

    @torch.no_grad()
    def _restore_merge_state(self, merged: list[str], original: torch.Tensor | None) -> None:
        """Set the merged adapters back to ``merged`` (with the original weight ``original``),
        bit for bit: used to roll back a model-level operation that failed half-way."""
        if merged:
            self.base_layer.weight.copy_(self._merged_weight(original, merged))
        elif self._unmerged_weight is not None:
            self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = original
        self.merged_adapters[:] = merged

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside the block the layer is the base layer: ``forward`` returns ``base_layer(x)``.

        Bit for bit, also when adapters are merged: they are unmerged on entry (the original
        weight comes back exactly) and merged back on exit (the same bits as before)."""
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
        ``base(x) + Σ_active, unmerged scaling · B(A(dropout(x)))``. ``x`` is cast to the
        adapter's dtype on the adapter path and the update back to the output's dtype."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"LoRALinear.forward: input of shape {tuple(x.shape)} does not end in "
                             f"in_features={self.in_features}; pass (..., {self.in_features})")
        result = self.base_layer(x)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue  # already inside the base weight
            lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
            if name in self.lora_magnitude_vector:
                result = self._dora_forward(name, x.to(lora_A.dtype), result)
                continue
            x_in = self.lora_dropout[name](x.to(lora_A.dtype))
            # PEFT's operations in PEFT's order (see lora_update), so the two agree bit for bit;
            # another order rounds differently, and 30 layers turn that into ~1e-4 on the logits.
            result = result + lora_update(x_in, lora_A, lora_B, self.scaling[name]).to(result.dtype)
        return result

    def _dora_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (..., out) plus DoRA adapter ``name``'s term, with PEFT's semantics: the
        base output it rescales is ``result`` so far minus the bias (adapters applied in turn
        compose, as merging them in turn does); with dropout active in training, it is
        ``dropout(x) @ W.T`` instead, and dropout applies to the LoRA path too."""
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result if bias is None else result - bias
        else:
            x = dropout(x)
            base_out = F.linear(x, self._dense_weight("forward", original=False).to(x.dtype))
        extra = dora_update(x, base_out, self._dense_weight("forward"), self.lora_A[name].weight,
                                 self.lora_B[name].weight, self.scaling[name],
                                 self.lora_magnitude_vector[name].weight)
        return (result + extra).to(result.dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]:g}"
                             + (", dora" if n in self.lora_magnitude_vector else "") for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}")
