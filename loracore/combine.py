"""Combining a model's adapters into a new adapter: linear, TIES, DARE on each layer's ΔW.

:func:`combine_adapters` is loracore's counterpart of PEFT's ``add_weighted_adapter``, with
two differences that matter:

- Every method works on each layer's task vector ``ΔW_i = scaling_i · B_i @ A_i``, never on
  ``A`` and ``B`` separately. (PEFT's ``linear``, ``ties``, ``dare_*`` combine the A's and the
  B's apart, which for two adapters is not ``Σ w_i ΔW_i``: the product of two sums has cross
  terms ``B_1 A_2``; and it needs equal ranks.) So adapters of different ranks and scalings
  (rsLoRA included) combine exactly.
- The merged ΔW is re-factorised into ``B @ A`` of rank ``svd_rank`` (default: the sum of the
  input ranks, capped at the layer's ``min(out, in)``), the best such approximation (truncated
  SVD, Eckart-Young). For ``linear`` the merged ΔW has at most that rank, so the result is
  exact, and no ``(out, in)`` matrix is ever decomposed: the stacked factors are
  orthogonalised (QR) and only a small ``(R, R)`` core goes through an SVD.

The result is an ordinary adapter (``lora_alpha = r``, so ``scaling = 1``): activate it with
``set_adapter``, merge it, save it with ``save_adapter``; PEFT loads it. Everything is
validated before the model is touched, and a failure half-way leaves the model as it was.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

from loracore import merge as M
from loracore.fingerprint import foreign_adapters
from loracore.layer import LoRALinear, check_adapter_name
from loracore.surgery import all_or_nothing, lora_layers

__all__ = ["combine_adapters", "combined_delta", "refactorize", "refactorize_sum", "split_svd",
           "COMBINATION_TYPES", "DEFAULT_DENSITY"]

#: combination_type -> what it does to the list of ΔWs ("linear" is task arithmetic)
COMBINATION_TYPES = ("linear", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
#: density when none is given: TIES' paper keeps the top 20% (k = 20). DARE has no default:
#: its paper drops 90% and more on large models, which is a choice to make, not to assume.
DEFAULT_DENSITY = {"magnitude_prune": 0.2, "ties": 0.2}
_SIGNED = ("ties", "dare_ties")


# ---- re-factorising a ΔW into B @ A -------------------------------------------------------
class NonFiniteError(ValueError):
    """A ΔW or its factors hold inf or NaN (an SVD of them would not converge)."""


def refactorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factorisation of ``delta`` (``(out, in)``): ``(A, B)`` with
    ``A: (rank, in)``, ``B: (out, rank)`` and ``B @ A`` the truncated SVD. The singular values
    are split as ``sqrt(S)`` on each side, so A and B are of similar size. Dense SVD."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return split_svd(U, S, Vh, rank)


def refactorize_sum(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], rank: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_i B_i @ A_i`` (``A_i: (r_i, in)``, ``B_i: (out, r_i)``) re-factorised to rank ``rank``
    without forming or decomposing the ``(out, in)`` sum.

    With ``A = [A_1; A_2; ...]`` (``(R, in)``, ``R = Σ r_i``) and ``B = [B_1 | B_2 | ...]``:
    ``B = Q_b R_b`` and ``A.T = Q_a R_a`` (reduced QR), so ``B @ A = Q_b (R_b R_a.T) Q_a.T``; the SVD
    of the small core ``R_b R_a.T = U S V.T`` gives the SVD of the sum,
    ``(Q_b U) S (Q_a V).T``. Cost: O((out + in) R²) instead of O(out · in · min(out, in)).
    Returns ``(A, B)`` of rank ``min(rank, R, out, in)``, exactly the truncated SVD."""
    A, B = torch.cat(list(As), dim=0), torch.cat(list(Bs), dim=1)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise NonFiniteError("refactorize_sum: the factors hold inf or NaN")
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return split_svd(Qb @ U, S, Vh @ Qa.T, rank)


def split_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``k = min(rank, len(S))`` from an SVD ``U @ diag(S) @ Vh`` of an
    ``(out, in)`` matrix (``U: (out, n)``, ``S: (n,)``, ``Vh: (n, in)``): ``A = sqrt(S_k) Vh_k``
    ``(k, in)`` and ``B = U_k sqrt(S_k)`` ``(out, k)``, so ``B @ A`` is the rank-k truncation."""
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root


# ---- the merged ΔW of one layer -----------------------------------------------------------
def _deltas(layer: LoRALinear, adapters: Sequence[str]) -> list[torch.Tensor]:
    """Each adapter's ΔW in float32 at least (bf16 factors are multiplied in float32)."""
    out = []
    for name in adapters:
        A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        dtype = torch.promote_types(A.dtype, torch.float32)
        out.append((B.to(dtype) @ A.to(dtype)) * layer.scaling[name])
    return out


def combined_delta(layer: LoRALinear, adapters: Sequence[str], weights: Sequence[float],
                   combination_type: str = "ties", density: float | None = None,
                   majority_sign_method: Literal["total", "frequency"] = "total", *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The merged ΔW ``(out, in)`` of one layer: the :mod:`loracore.merge` function named by
    ``combination_type`` applied to the adapters' ΔWs (what :func:`combine_adapters` then
    re-factorises)."""
    deltas = _deltas(layer, adapters)
    w = torch.tensor([float(x) for x in weights], dtype=deltas[0].dtype, device=deltas[0].device)
    if combination_type in ("linear", "task_arithmetic"):
        return M.task_arithmetic(deltas, w)
    if combination_type == "magnitude_prune":
        return M.magnitude_prune(deltas, w, density)
    if combination_type == "ties":
        return M.ties(deltas, w, density, majority_sign_method)
    if combination_type == "dare_linear":
        return M.dare_linear(deltas, w, density, generator=generator)
    if combination_type == "dare_ties":
        return M.dare_ties(deltas, w, density, majority_sign_method, generator=generator)
    raise ValueError(f"combined_delta: unknown combination_type {combination_type!r}; "
                     f"known: {list(COMBINATION_TYPES)}")


def _layer_factors(layer: LoRALinear, adapters: Sequence[str], weights: Sequence[float],
                   combination_type: str, density: float | None, majority_sign_method: str,
                   rank: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's ``(A, B)`` on one layer (scaling 1)."""
    if combination_type in ("linear", "task_arithmetic"):
        # Σ w_i s_i B_i A_i = [w_1 s_1 B_1 | w_2 s_2 B_2 ...] @ [A_1; A_2; ...]: exact, no dense SVD
        As, Bs = [], []
        for a, w in zip(adapters, weights):
            A, B = layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach()
            dtype = torch.promote_types(A.dtype, torch.float32)
            As.append(A.to(dtype))
            Bs.append(B.to(dtype) * (w * layer.scaling[a]))
        return refactorize_sum(As, Bs, rank)
    delta = combined_delta(layer, adapters, weights, combination_type, density,
                           majority_sign_method, generator=generator)
    return refactorize(delta, rank)


# ---- validation ---------------------------------------------------------------------------
def _validate(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
              combination_type: str, density: float | None, majority_sign_method: str,
              svd_rank: int | None) -> tuple[dict[str, LoRALinear], float | None]:
    where = "combine_adapters"
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"{where}: unknown combination_type {combination_type!r}; known: "
                         f"{list(COMBINATION_TYPES)}")
    if majority_sign_method not in M.SIGN_METHODS:
        raise ValueError(f"{where}: unknown majority_sign_method {majority_sign_method!r}; known: "
                         f"{list(M.SIGN_METHODS)}")
    if isinstance(adapters, str) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"{where}: adapters must be a non-empty list of adapter names, got {adapters!r}")
    if isinstance(weights, (str, bytes)) or len(weights) != len(adapters):
        raise ValueError(f"{where}: need one weight per adapter: {len(adapters)} adapters "
                         f"{list(adapters)}, got {len(weights)} weights {list(weights)}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
               for w in weights):
        raise ValueError(f"{where}: weights must be finite numbers, got {list(weights)}")
    if combination_type in ("linear", "task_arithmetic"):
        if density is not None:
            raise ValueError(f"{where}: density={density!r} has no effect with combination_type="
                             f"{combination_type!r} (nothing is pruned); leave it None")
    else:
        if density is None:
            if combination_type not in DEFAULT_DENSITY:
                raise ValueError(f"{where}: combination_type={combination_type!r} needs a density in "
                                 f"(0, 1] (the fraction of entries kept; DARE's paper drops 90%: 0.1)")
            density = DEFAULT_DENSITY[combination_type]
        M.check_density(density, where)
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool)
                                 or svd_rank <= 0):
        raise ValueError(f"{where}: svd_rank must be a positive int or None, got {svd_rank!r}")
    check_adapter_name(where, adapter_name)

    layers = lora_layers(model)
    known = sorted({a for layer in layers.values() for a in layer.lora_A})
    if not layers:
        raise ValueError(f"{where}: {type(model).__name__} has no LoRA layers; inject() or load_adapter() first")
    missing = [a for a in adapters if a not in known]
    if missing:
        raise KeyError(f"{where}: no adapter named {missing} in the model (adapters: {known})")
    if adapter_name in known:
        raise ValueError(f"{where}: the model already has an adapter named {adapter_name!r}; pick "
                         f"another name or delete_adapter() it first")
    dora = [a for a in adapters if any(a in layer.lora_magnitude_vector for layer in layers.values())]
    if dora:
        raise ValueError(f"{where}: adapter(s) {dora} are DoRA: a DoRA layer is not W + ΔW (it rescales "
                         f"each row by its magnitude), so combining ΔWs is not defined for it. Merge "
                         f"it into the base (merge_adapters) or combine plain LoRA adapters only")
    foreign = foreign_adapters(model)
    for a in adapters:
        if a in foreign:
            raise ValueError(f"{where}: adapter {a!r} was loaded (strict=False) onto a base model it "
                             f"was not trained on: " + "; ".join(foreign[a]) + ". Its task vector "
                             f"was learned against other weights, so adding it to the others is "
                             f"meaningless; load each adapter onto its own base")
    where_is = {a: [n for n, layer in layers.items() if a in layer.lora_A] for a in adapters}
    first = adapters[0]
    for other in adapters[1:]:
        only_first = [n for n in where_is[first] if n not in where_is[other]]
        only_other = [n for n in where_is[other] if n not in where_is[first]]
        if only_first or only_other:
            raise ValueError(f"{where}: adapters {first!r} and {other!r} are on different layers: "
                             f"only {first!r} on {only_first[:5]}{' ...' if len(only_first) > 5 else ''}, "
                             f"only {other!r} on {only_other[:5]}{' ...' if len(only_other) > 5 else ''}. "
                             f"Combine adapters that target the same modules")
    return {n: layers[n] for n in where_is[first]}, density


# ---- the model-level operation -------------------------------------------------------------
def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float],
                     adapter_name: str, *, combination_type: str = "ties",
                     density: float | None = None,
                     majority_sign_method: Literal["total", "frequency"] = "total",
                     svd_rank: int | None = None,
                     generator: torch.Generator | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` to every layer that holds ``adapters``: per layer, the
    merge ``combination_type`` of their ΔWs with ``weights``, re-factorised to rank ``svd_rank``.

    Args:
        adapters, weights: names of adapters in ``model`` (on the same layers; ranks and
            scalings may differ) and one weight each (negative subtracts a task).
        combination_type: ``"linear"`` (= ``"task_arithmetic"``), ``"magnitude_prune"``,
            ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` (see :mod:`loracore.merge`).
        density: fraction kept by the pruning methods; default 0.2 for ``ties`` and
            ``magnitude_prune`` (TIES' paper), required for ``dare_*``, refused for ``linear``.
        majority_sign_method: ``"total"`` or ``"frequency"`` (``ties``, ``dare_ties``).
        svd_rank: rank of the new adapter; default the sum of the input ranks. Capped at each
            layer's ``min(out, in)`` (and, for ``linear``, at the sum of the input ranks), where
            the merged ΔW is represented exactly.
        generator: where DARE draws its masks (default torch's global generator). Layers are
            visited in model order, adapters in the given order.

    The new adapter has ``lora_alpha = r`` (``scaling = 1``), is frozen and not activated:
    the model's active adapters are unchanged (``set_adapter(model, adapter_name)`` to use it).
    Returns ``model``. Raises before any change on bad input; if anything fails later
    (a non-finite result, an error half-way) the model is left exactly as it was.
    """
    layers, density = _validate(model, adapters, weights, adapter_name, combination_type, density,
                                majority_sign_method, svd_rank)

    # 1. compute every layer's new factors; nothing in the model changes yet
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            ranks = [layer.r[a] for a in adapters]
            rank = min(svd_rank or sum(ranks), layer.out_features, layer.in_features)
            try:
                new_A, new_B = _layer_factors(layer, adapters, weights, combination_type, density,
                                              majority_sign_method, rank, generator)
            except (NonFiniteError, torch.linalg.LinAlgError) as exc:
                raise ValueError(f"combine_adapters: the combination is not finite (inf/NaN) on "
                                 f"layer {name!r} ({exc}); check the adapters' weights there. The "
                                 f"model was not changed") from None
            if not (torch.isfinite(new_A).all() and torch.isfinite(new_B).all()):
                raise ValueError(f"combine_adapters: the combination is not finite (inf/NaN) on "
                                 f"layer {name!r}; check the adapters' weights there. The model "
                                 f"was not changed")
            factors[name] = (new_A, new_B)

    # 2. add the adapter everywhere, undoing it all if anything fails half-way
    saved = {n: (list(layer.active_adapters),
                 {k: p.requires_grad for k, p in layer.named_parameters()}) for n, layer in layers.items()}
    with all_or_nothing(model), torch.no_grad():
        for name, layer in layers.items():
            new_A, new_B = factors[name]
            rank = new_A.shape[0]
            layer.add_adapter(adapter_name, rank, float(rank))
            layer.lora_A[adapter_name].weight.copy_(new_A)
            layer.lora_B[adapter_name].weight.copy_(new_B)
            _restore(layer, *saved[name])
    return model


def _restore(layer: LoRALinear, active: list[str], flags: dict[str, bool]) -> None:
    """Put back the active adapters and requires_grad flags ``add_adapter`` changed; the new
    adapter (not in ``flags``) stays frozen."""
    layer.active_adapters = list(active)
    for key, p in layer.named_parameters():
        p.requires_grad_(flags.get(key, False))
