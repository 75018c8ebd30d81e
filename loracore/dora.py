"""DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al. 2024) as pure functions.

DoRA splits a weight into a direction and a magnitude and adapts both. With the frozen base
weight ``W`` (out, in), the LoRA update ``ΔW = scaling · B @ A`` and a trainable vector
``m`` (out,), one value per output feature (one per row of ``W``):

    W' = m / ‖W + ΔW‖ · (W + ΔW)        (the norm is taken over in_features, row by row)

``m`` starts at ``‖W‖`` (B = 0), so training starts exactly at the base model. Following the
paper's section 4.3, the norm is treated as a constant in backward (detached): gradients reach
``m``, ``A`` and ``B`` but never flow through the norm, which saves memory and changes little.

The forward pass never forms ``W'``: with ``f = m / ‖W + ΔW‖`` and ``base = x @ W.T``,

    x @ W'.T = f · (base + scaling · (x @ A.T) @ B.T) = base + (f - 1) · base + f · lora(x)

so a layer adds ``(f - 1) · base + f · lora(x)`` to what the base layer returned (bias
excluded), as PEFT's ``DoraLinearLayer`` does. Names and conventions follow PEFT
(``lora_magnitude_vector``), so adapter files carry over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["weight_norm", "dora_scale", "dora_update", "dora_forward", "dora_merged_weight", "Magnitude"]


def weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """``‖W + scaling · B @ A‖`` row by row (L2 over in_features), detached from autograd.

    weight: ``(out, in)``, lora_A: ``(r, in)``, lora_B: ``(out, r)`` -> ``(out,)``, in the
    promoted dtype of the three (float32 for a bfloat16 base with float32 adapters)."""
    with torch.no_grad():
        dtype = torch.promote_types(weight.dtype, lora_A.dtype)
        lora_weight = lora_B.detach().to(dtype) @ lora_A.detach().to(dtype)
        return torch.linalg.norm(weight.detach().to(dtype) + scaling * lora_weight, dim=1)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``f = m / ‖W + ΔW‖``, ``(out,)``: how much each output row is rescaled. The norm is a
    constant (detached); the gradient reaches ``magnitude`` only."""
    return magnitude / norm.detach()


def dora_update(x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """What DoRA adds to a base layer's output: ``(f - 1) · base_out + f · scaling · B(A(x))``.

    x: ``(..., in)``; base_out: ``(..., out)``, the base layer's ``x @ W.T`` *without* bias
    (for the same ``x``); weight: ``(out, in)`` the unmerged base weight (for the norm);
    lora_A: ``(r, in)``, lora_B: ``(out, r)``, magnitude: ``(out,)`` -> ``(..., out)``.
    """
    f = dora_scale(magnitude, weight_norm(weight, lora_A, lora_B, scaling))
    lora_out = F.linear(F.linear(x, lora_A), lora_B)
    return (f - 1) * base_out + f * lora_out * scaling


def dora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 magnitude: torch.Tensor) -> torch.Tensor:
    """A DoRA linear layer as one function: ``x @ (m / ‖W + ΔW‖ · (W + ΔW)).T + b``.

    x: ``(..., in)``, weight: ``(out, in)``, bias: ``(out,)`` or None, lora_A: ``(r, in)``,
    lora_B: ``(out, r)``, magnitude: ``(out,)`` -> ``(..., out)``. With ``B = 0`` and
    ``m = ‖W‖`` it is the base layer (up to rounding)."""
    base_out = F.linear(x, weight)
    out = base_out + dora_update(x, base_out, weight, lora_A, lora_B, scaling, magnitude)
    return out if bias is None else out + bias


def dora_merged_weight(current: torch.Tensor, original: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, magnitude: torch.Tensor) -> torch.Tensor:
    """The weight after merging one DoRA adapter: ``f[:, None] · (current + ΔW)``, ``(out, in)``.

    ``current`` is the weight so far (the base plus any adapters merged before this one),
    ``original`` the unmerged base weight the norm is taken on (as the forward pass does), both
    ``(out, in)``; the result is in the promoted dtype. Several adapters merged in turn compose
    the way the forward pass applies them in turn (PEFT's order)."""
    dtype = current.dtype
    delta = (lora_B.detach().to(dtype) @ lora_A.detach().to(dtype)) * scaling
    f = dora_scale(magnitude.detach().to(dtype),
                   weight_norm(original, lora_A.to(dtype), lora_B.to(dtype), scaling).to(dtype))
    return f[:, None] * (current + delta)


class Magnitude(torch.nn.Module):
    """Holds one adapter's magnitude vector ``weight`` ``(out,)``, a trainable parameter; a
    module (not a bare parameter) so that its key is PEFT's ``lora_magnitude_vector.<name>.weight``."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"
