"""Mixed-adapter batches: one forward pass, a different adapter (or none) on every row.

Every adapter the server holds sits in a *slot* of two stacked tensors per layer, padded with
zeros to the largest rank allowed (vLLM pre-allocates the same way, at ``--max-lora-rank``):

    A_stack: (num_slots, max_rank, in_features)     B_stack: (num_slots, out_features, max_rank)

A batch carries one slot index per row (``-1``: no adapter). The adapter path is then two
batched matrix products over the rows' gathered factors, the idea behind Punica's BGMV kernel
and vLLM's LoRA kernels:

    A_rows = A_stack[slots]                      # (rows, max_rank, in)
    h      = x @ A_rows.T                        # (rows, seq, max_rank)   one bmm
    y     += scaling[slots] · h @ B_rows.T       # (rows, seq, out)        one bmm

Zero padding adds exact zeros, so a rank-8 adapter in a rank-16 slot gives the same numbers up
to float rounding. Rows without an adapter are never touched: they equal the base layer bit
for bit. The hooks are installed on the base model's linear layers; the model's weights and
its modules stay as they were.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["gather_factors", "batched_lora_delta", "apply_mixed_lora", "SlotStack", "use_slots"]


def gather_factors(A_stack: torch.Tensor, B_stack: torch.Tensor, scales: torch.Tensor,
                   slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's own factors. A_stack: ``(S, r, in)``, B_stack: ``(S, out, r)``, scales:
    ``(S,)``, slots: ``(rows,)`` of slot indices in ``[0, S)`` ->
    ``A_rows (rows, r, in)``, ``B_rows (rows, out, r)``, ``scale_rows (rows,)``.

    >>> A = torch.arange(2.).view(2, 1, 1); B = 10 * A; s = torch.tensor([1., 2.])
    >>> [t.flatten().tolist() for t in gather_factors(A, B, s, torch.tensor([1, 1, 0]))]
    [[1.0, 1.0, 0.0], [10.0, 10.0, 0.0], [2.0, 2.0, 1.0]]
    """
    return A_stack[slots], B_stack[slots], scales[slots]


def batched_lora_delta(x: torch.Tensor, A_rows: torch.Tensor, B_rows: torch.Tensor,
                       scale_rows: torch.Tensor) -> torch.Tensor:
    """The LoRA path of every row with its own adapter: ``scale_i · (x_i @ A_i.T) @ B_i.T``.

    x: ``(rows, seq, in)``, A_rows: ``(rows, r, in)``, B_rows: ``(rows, out, r)``,
    scale_rows: ``(rows,)`` -> ``(rows, seq, out)``. Two ``torch.bmm`` calls; the
    ``(out, in)`` matrix ``B @ A`` is never formed, and the scaling multiplies the output, in
    the order :func:`loracore.layer.lora_update` uses.
    """
    h = torch.bmm(x, A_rows.transpose(1, 2))          # (rows, seq, r)
    return torch.bmm(h, B_rows.transpose(1, 2)) * scale_rows.view(-1, 1, 1)


def apply_mixed_lora(base_out: torch.Tensor, x: torch.Tensor, A_stack: torch.Tensor,
                     B_stack: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                     present: torch.Tensor | None = None) -> torch.Tensor:
    """``base_out`` plus each row's adapter. base_out: ``(rows, ..., out)``, x: ``(rows, ..., in)``,
    slots: ``(rows,)`` (``-1``: no adapter), present: ``(S,)`` bool, False where the slot's
    adapter does not adapt this layer. Rows without an adapter are returned unchanged (the
    same bits); ``base_out`` itself is not modified.
    """
    slots = slots.to(base_out.device)
    use = slots >= 0
    if present is not None:
        use = use & present[slots.clamp(min=0)]
    rows = use.nonzero().flatten()
    if rows.numel() == 0:
        return base_out
    lead = x.shape[1:-1]
    if rows.numel() == slots.numel():
        # every row has an adapter here (the usual case when serving adapters): the same sums
        # as below, without copying base_out and scattering the rows back into the copy
        xr = x.reshape(rows.numel(), -1, x.shape[-1]).to(A_stack.dtype)
        delta = batched_lora_delta(xr, *gather_factors(A_stack, B_stack, scales, slots))
        return base_out + delta.reshape(base_out.shape).to(base_out.dtype)
    xr = x[rows].reshape(rows.numel(), -1, x.shape[-1]).to(A_stack.dtype)
    delta = batched_lora_delta(xr, *gather_factors(A_stack, B_stack, scales, slots[rows]))
    out = base_out.clone()
    out[rows] = base_out[rows] + delta.reshape(rows.numel(), *lead, -1).to(base_out.dtype)
    return out


# ---- which slot each row uses, for the duration of one forward pass --------------------------
_state = threading.local()


@contextmanager
def use_slots(slots: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, every layer with a :class:`SlotStack` hook adds row ``i``'s adapter
    (slot ``slots[i]``, ``-1`` for none) to its output. slots: ``(batch,)``. Per thread, so a
    forward pass in one thread never sees another thread's rows."""
    previous = getattr(_state, "slots", None)
    _state.slots = slots
    try:
        yield
    finally:
        _state.slots = previous


class SlotStack:
    """The stacked factors of one linear layer, and the forward hook that applies them.

    A_stack: ``(num_slots, max_rank, in)``, B_stack: ``(num_slots, out, max_rank)``,
    scales: ``(num_slots,)``, present: ``(num_slots,)`` bool. Memory is allocated once, at
    ``max_rank`` (what vLLM pre-allocates for ``--max-loras`` x ``--max-lora-rank``).
    """

    def __init__(self, layer: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layer = layer
        self.A = torch.zeros(num_slots, max_rank, layer.in_features, dtype=dtype, device=device)
        self.B = torch.zeros(num_slots, layer.out_features, max_rank, dtype=dtype, device=device)
        # float32 whatever the model's dtype: alpha / sqrt(r) rounded to bfloat16 would change an
        # adapter's strength by up to 0.4%; the product is rounded to the model's dtype once
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.present = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self.handle = layer.register_forward_hook(self._hook)

    @torch.no_grad()
    def put(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Write an adapter's factors (A: ``(r, in)``, B: ``(out, r)``) into ``slot``."""
        r = A.shape[0]
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :r] = A.to(self.A.device, self.A.dtype)  # the file's tensors are on the CPU
        self.B[slot, :, :r] = B.to(self.B.device, self.B.dtype)
        self.scales[slot] = scale
        self.present[slot] = True

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scales[slot] = 0.0
        self.present[slot] = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.scales))

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        slots = getattr(_state, "slots", None)
        if slots is None or not bool(self.present.any()):
            return output
        x = inputs[0]
        if x.shape[0] != slots.shape[0]:
            raise RuntimeError(f"mixed-adapter batch: the layer got {x.shape[0]} rows but "
                               f"{slots.shape[0]} slot indices were given; pass one per row")
        return apply_mixed_lora(output, x, self.A, self.B, self.scales, slots, self.present)

    def remove(self) -> None:
        self.handle.remove()
