"""Initialisations that start LoRA from the base weight's own structure: PiSSA and LoftQ.

Plain LoRA starts from ``B = 0``, so the adapted model starts equal to the base. These two start
from a non-zero ``B·A`` taken out of the base weight ``W (out, in)`` instead, and change the
base so that the model's starting weight is (nearly) unchanged:

- **PiSSA** (Meng et al. 2024, arXiv 2404.02948): ``scaling·B·A`` is the best rank-``r``
  approximation of ``W`` (its top ``r`` singular triplets, ``U_r diag(S_r) V_rᵀ``), and the base
  becomes the residual ``W - scaling·B·A``. Training then moves the principal directions.
- **LoftQ** (Li et al. 2023, arXiv 2310.08659): the base becomes an NF4 weight ``Q`` and
  ``scaling·B·A`` the best rank-``r`` fit of what ``Q`` misses, alternating
  ``Q = NF4(W - scaling·B·A)`` and ``scaling·B·A = SVD_r(W - dequant(Q))``, so the 4-bit model
  starts closer to ``W`` than plain QLoRA's ``dequant(NF4(W))``.

Both split each singular value evenly between the factors: with ``W ≈ U_r diag(S_r) V_rᵀ``,
``B = U_r diag(sqrt(S_r / scaling))`` and ``A = diag(sqrt(S_r / scaling)) V_rᵀ``, so
``scaling·B·A = U_r diag(S_r) V_rᵀ`` whatever ``lora_alpha`` is. PEFT's PiSSA does the same;
PEFT's LoftQ ignores ``scaling`` (it equals ours when ``scaling == 1``, i.e. ``lora_alpha == r``).

Pure functions on tensors; :func:`loracore.surgery.inject` puts their results into a model.
"""

from __future__ import annotations

import torch

from loracore.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["INIT_NAMES", "principal_factors", "pissa_init", "loftq_init", "relative_error"]

#: the values of ``inject(init_lora_weights=...)``: True is plain LoRA (B = 0); also
#: ``"pissa_niter_K"`` (PiSSA by randomized SVD with K power iterations)
INIT_NAMES = (True, "pissa", "loftq")


def _check_weight(weight: torch.Tensor, r: int, scaling: float, where: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be a 2-D float tensor (out, in), got "
                        f"{getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"{where}: r must be an int in 1..{min(weight.shape)} (min(out, in) of a "
                         f"{tuple(weight.shape)} weight), got {r!r}")
    if not scaling > 0:
        raise ValueError(f"{where}: scaling must be > 0, got {scaling!r}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{where}: the {tuple(weight.shape)} weight holds inf or NaN")


def principal_factors(m: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling·B·A`` the best rank-``r`` approximation of ``m`` (Eckart-Young).

    m: ``(out, in)`` float32. Returns A ``(r, in)``, B ``(out, r)``, float32: each singular value
    split evenly, ``A = diag(sqrt(S_r/scaling)) V_rᵀ``, ``B = U_r diag(sqrt(S_r/scaling))``.
    Example: ``m = diag(4, 1)``, ``r = 1``, ``scaling = 1`` -> ``A = [[2, 0]]``, ``B = [[2], [0]]``
    (up to the sign SVD picks for a singular vector pair)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def pissa_init(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: ``(A, B, residual)`` for a base weight ``weight (out, in)``.

    A ``(r, in)``, B ``(out, r)``: the top ``r`` singular triplets of ``weight`` (computed in
    float32), scaled as in :func:`principal_factors`. residual ``(out, in)``, in ``weight``'s
    dtype: ``weight - scaling·B·A``, the new base. ``residual + scaling·B·A`` equals ``weight`` up
    to float rounding.

    ``niter``: estimate the triplets by randomized SVD (``torch.svd_lowrank`` with ``niter``
    power iterations; PEFT's ``"pissa_niter_K"``), much faster on large weights and drawn from
    the global random generator; the residual still makes ``residual + scaling·B·A == weight``."""
    _check_weight(weight, r, scaling, "pissa_init")
    w = weight.detach().float()
    if niter is None:
        lora_A, lora_B = principal_factors(w, r, scaling)
    else:
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ValueError(f"pissa_init: niter must be an int >= 0, got {niter!r}")
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        root = torch.sqrt(s / scaling)
        lora_A, lora_B = root[:, None] * v.T, u * root[None, :]
    residual = w - scaling * (lora_B @ lora_A)
    return lora_A, lora_B, residual.to(weight.dtype)


def loftq_init(weight: torch.Tensor, r: int, scaling: float, num_iter: int = 1, *,
               blocksize: int = 64, double_quant: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, NF4Tensor]:
    """LoftQ with NF4: ``(A, B, Q)`` for a base weight ``weight (out, in)``.

    ``num_iter`` rounds of: ``Q = NF4(weight - scaling·B·A)`` (``B·A = 0`` in the first round, so
    one round is plain NF4 plus the best low-rank fit of its error), then ``(A, B)`` the best
    rank-``r`` fit of ``weight - dequant(Q)`` (:func:`principal_factors`). Returns A ``(r, in)``
    and B ``(out, r)`` in float32, and ``Q`` (the NF4 base, ``blocksize`` and ``double_quant``
    as :func:`loracore.nf4.quantize_nf4`; PEFT's LoftQ uses 64 and no double quantization)."""
    _check_weight(weight, r, scaling, "loftq_init")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"loftq_init: num_iter (loftq_iter) must be an int >= 1, got {num_iter!r}")
    w = weight.detach().float()
    low_rank = torch.zeros_like(w)  # scaling·B·A; zero before the first round
    for _ in range(num_iter):
        q = quantize_nf4(w - low_rank, blocksize, double_quant)
        lora_A, lora_B = principal_factors(w - dequantize_nf4(q, torch.float32), r, scaling)
        low_rank = scaling * (lora_B @ lora_A)
    return lora_A, lora_B, q


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||weight - approx||_F / ||weight||_F`` (both ``(out, in)``), in float64: how much of the
    weight a quantized base (plus an adapter's ``scaling·B·A``) misses."""
    w = weight.detach().double()
    return float(torch.linalg.norm(w - approx.detach().double()) / torch.linalg.norm(w))
