"""An adapter extracted from two models: ``ΔW = W_tuned - W_base`` per layer, truncated SVD.

A model fine-tuned without LoRA (a full fine-tune, or a model with an adapter merged in) differs
from its base by ``ΔW`` in every linear layer. The best rank-``k`` approximation of ``ΔW`` in
the Frobenius norm is its truncated SVD (Eckart-Young): with ``ΔW = U S Vᵀ``,

    B = U_k sqrt(S_k)   (out, k),    A = sqrt(S_k) V_kᵀ   (k, in),    B @ A ≈ ΔW

which :func:`extract_lora` puts into ``base`` as an ordinary loracore adapter with
``lora_alpha = r`` (``scaling = 1``, so ``B @ A`` *is* the update), saveable in PEFT's format
with :func:`loracore.adapters.save_adapter`. When ``k >= rank(ΔW)`` the adapter is exact up to
float rounding: a model made by merging a rank-8 adapter gives back that update at ``r=8``.

The rank is ``r`` for every layer, or, with ``energy``, per layer the smallest ``k`` whose
singular values keep that fraction of ``‖ΔW‖²_F = Σ S²`` (then ranks differ between layers:
``save_adapter`` writes them as PEFT's ``rank_pattern`` and ``alpha_pattern``, which PEFT
and :func:`~loracore.adapter_file.read_adapter` read). What a LoRA adapter cannot hold
(changed embeddings, norms, biases, untargeted layers) is listed and warned about.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from loracore.combine import split_svd
from loracore.layer import LoRALinear, check_adapter_name, is_float_linear
from loracore.surgery import all_or_nothing, inject_modules, target_names

__all__ = ["extract_lora", "Extraction", "rank_for_energy"]


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_lora` put into the base model, by full module name:

    ``ranks``: the adapter's rank per layer; ``errors``: the relative reconstruction error
    ``‖ΔW - B @ A‖_F / ‖ΔW‖_F`` per layer (0 is exact); ``energy``: the fraction of
    ``‖ΔW‖²_F`` the kept singular values hold; ``unchanged``: targeted layers whose ``ΔW`` is
    exactly zero (left out of the adapter); ``not_captured``: parameters that differ between
    the two models but are not in the adapter (embeddings, norms, biases, untargeted layers)."""
    ranks: dict[str, int]
    errors: dict[str, float]
    energy: dict[str, float]
    unchanged: list[str] = field(default_factory=list)
    not_captured: list[str] = field(default_factory=list)


def rank_for_energy(S: torch.Tensor, energy: float, tol: float = 0.0) -> int:
    """The smallest ``k`` with ``Σ_{i<k} S_i² >= energy · Σ S_i²``, at least 1, and never
    counting singular values ``<= tol`` (rounding noise). S: ``(n,)``, descending.

    >>> rank_for_energy(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.9)   # 9, 13, 14 of 14
    2
    """
    power = S.double() ** 2
    cumulative = torch.cumsum(power, 0)
    k = int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1
    significant = int((S > tol).sum().item())
    return max(1, min(k, significant, S.numel()))


def _plain(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by the plain model's names: a LoRA layer's base weight under the layer's
    name, no LoRA factors (so a model with adapters compares with one without)."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in f".{name}":
            continue
        out[name.replace(".base_layer.", ".")] = p
    return out


def _weight(model: nn.Module, name: str, which: str) -> torch.Tensor:
    """The float weight ``(out, in)`` of linear layer ``name`` (a LoRA layer's base weight)."""
    module = model.get_submodule(name)
    base = module.base_layer if isinstance(module, LoRALinear) else module
    if not is_float_linear(base):
        raise TypeError(f"extract_lora: module {name!r} of the {which} model is a "
                        f"{type(base).__name__}, not a float nn.Linear (stored quantized?): ΔW needs "
                        f"both weights as float matrices; load both models in float")
    if isinstance(module, LoRALinear) and module.merged:
        raise ValueError(f"extract_lora: module {name!r} of the {which} model has adapters "
                         f"{module.merged_adapters} merged into its weight; unmerge them first")
    return base.weight.detach()


def _check(tuned: nn.Module, base: nn.Module, r: object, energy: object, adapter_name: str,
           target_modules: object) -> list[str]:
    """Every argument checked; returns the layers to extract (full names)."""
    if (r is None) == (energy is None):
        raise ValueError(f"extract_lora: pass exactly one of r (one rank for every layer) or energy "
                         f"(the fraction of ΔW's squared singular values to keep, per layer); got "
                         f"r={r!r}, energy={energy!r}")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
        raise ValueError(f"extract_lora: r must be a positive int, got {r!r}")
    if energy is not None and (not isinstance(energy, (int, float)) or isinstance(energy, bool)
                               or not math.isfinite(energy) or not 0 < energy <= 1):
        raise ValueError(f"extract_lora: energy must be a number in (0, 1] (0.9 keeps 90% of "
                         f"‖ΔW‖²), got {energy!r}")
    check_adapter_name("extract_lora", adapter_name)
    if type(tuned) is not type(base):
        raise ValueError(f"extract_lora: the tuned model is a {type(tuned).__name__} and the base a "
                         f"{type(base).__name__}; ΔW needs two models of one architecture")
    if any(isinstance(m, LoRALinear) for m in tuned.modules()):
        raise ValueError("extract_lora: the tuned model has LoRA layers; merge them into a plain "
                         "model first (merge_and_save, then from_pretrained), or use the adapter itself")
    theirs, ours = _plain(tuned), _plain(base)
    for key in sorted(set(theirs) | set(ours)):
        if key not in theirs or key not in ours:
            where = "tuned" if key not in theirs else "base"
            raise ValueError(f"extract_lora: parameter {key!r} is missing from the {where} model: "
                             f"the two models do not have the same architecture")
        if theirs[key].shape != ours[key].shape:
            raise ValueError(f"extract_lora: module {key.rpartition('.')[0]!r}: {key.rpartition('.')[2]} "
                             f"has shape {tuple(theirs[key].shape)} in the tuned model and "
                             f"{tuple(ours[key].shape)} in the base; ΔW needs equal shapes")
    names = target_names(base, "all-linear" if target_modules is None else target_modules,
                         "extract_lora")
    taken = [n for n in names if isinstance(base.get_submodule(n), LoRALinear)
             and adapter_name in base.get_submodule(n).lora_A]
    if taken:
        raise ValueError(f"extract_lora: modules {taken[:3]} of the base already have an adapter "
                         f"named {adapter_name!r}; pass another adapter_name")
    return names


@torch.no_grad()
def extract_lora(tuned: nn.Module, base: nn.Module, r: int | None = None,
                 energy: float | None = None, target_modules: list[str] | str | None = None, *,
                 adapter_name: str = "default") -> Extraction:
    """Put into ``base`` (in place) the LoRA adapter closest to ``tuned``: per targeted linear
    layer, the truncated SVD of ``ΔW = W_tuned - W_base`` ``(out, in)`` as ``B (out, k) @ A (k, in)``.

    Args:
        tuned: the fine-tuned model, same architecture and shapes as ``base``; not changed.
        base: the base model; gets adapter ``adapter_name`` (``lora_alpha = r``, so
            ``scaling = 1``), active, on each targeted layer whose ``ΔW`` is not zero. It may
            already hold other (unmerged) adapters: ``ΔW`` is taken against its base weights.
        r: one rank for every layer (capped at ``min(out, in)``); exact up to float rounding
            when ``r >= rank(ΔW)``.
        energy: instead of ``r``: per layer the smallest rank keeping this fraction (0, 1] of
            ``‖ΔW‖²_F`` (see :func:`rank_for_energy`), never counting singular values at float
            rounding level; ``energy=1`` gives each layer its numerical rank.
        target_modules: the layers, as :func:`~loracore.surgery.inject` reads them; default
            every linear layer but the output head (``"all-linear"``).

    Returns an :class:`Extraction` (ranks, relative errors, kept energy, unchanged layers, and
    the differing parameters the adapter cannot hold, which are also warned about).

    The SVD runs in float64 (on the weights' device); A and B are stored in the adapter dtype
    (the base dtype, float32 for a 16-bit base). Everything is checked before ``base``
    changes; a failure half-way leaves it as it was.
    """
    names = _check(tuned, base, r, energy, adapter_name, target_modules)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    kept: dict[str, float] = {}
    unchanged = []
    for name in names:
        w_base = _weight(base, name, "base")
        w_tuned = _weight(tuned, name, "tuned").to(w_base.device)
        delta = w_tuned.double() - w_base.double()  # float64: no rounding for 32-bit weights or less
        if not torch.isfinite(delta).all():
            raise ValueError(f"extract_lora: module {name!r}: ΔW holds inf or NaN; check both models")
        if not delta.any():
            unchanged.append(name)
            continue
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        # singular values below this are the rounding of the stored weights, not an update
        eps = max(torch.finfo(w_base.dtype).eps, torch.finfo(w_tuned.dtype).eps)
        tol = S[0].item() * max(delta.shape) * eps
        k = min(r, S.numel()) if r is not None else rank_for_energy(S, energy, tol)
        # the dtype LoRALinear gives adapters: the base's, float32 on a 16-bit base
        dtype = torch.float32 if w_base.dtype in (torch.bfloat16, torch.float16) else w_base.dtype
        A, B = (t.to(dtype) for t in split_svd(U, S, Vh, k))
        factors[name] = (A, B)
        # measured on the factors as they will be stored (rounded to the adapter dtype)
        errors[name] = float(torch.linalg.norm(delta - B.double() @ A.double()) / torch.linalg.norm(delta))
        kept[name] = float((S[:k] ** 2).sum() / (S ** 2).sum())
    if not factors:
        raise ValueError("extract_lora: the two models have equal weights in every targeted layer "
                         f"({len(names)} layers); there is no update to extract")

    theirs, ours = _plain(tuned), _plain(base)
    not_captured = [k for k in ours if k not in {f"{n}.weight" for n in factors}
                    and not torch.equal(theirs[k].to(ours[k].device), ours[k])]
    if not_captured:
        warnings.warn(f"extract_lora: {len(not_captured)} parameters differ between the two models "
                      f"but are not in the adapter (a LoRA adapter holds only updates of linear "
                      f"weights): {not_captured[:5]}{' ...' if len(not_captured) > 5 else ''}",
                      stacklevel=2)

    by_rank: dict[int, list[str]] = {}
    for name, (A, _) in factors.items():
        by_rank.setdefault(A.shape[0], []).append(name)
    with all_or_nothing(base):
        for k, group in by_rank.items():
            inject_modules(base, group, k, float(k), adapter_name=adapter_name)
        for name, (A, B) in factors.items():
            layer = base.get_submodule(name)
            layer.lora_A[adapter_name].weight.copy_(A)
            layer.lora_B[adapter_name].weight.copy_(B)
    return Extraction(ranks={n: A.shape[0] for n, (A, _) in factors.items()}, errors=errors,
                      energy=kept, unchanged=unchanged, not_captured=not_captured)
