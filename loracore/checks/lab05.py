"""Checks for lab 05, "serve swapped adapters": the per-row gather, the batched LoRA product,
and the mixed-adapter layer that leaves rows without an adapter untouched.

Every check uses non-zero factors and adapters of different ranks (zero-padded in the stacks),
so code that ignores a row's adapter, or mixes two rows' adapters, fails.
"""

from __future__ import annotations

from typing import Callable

import torch

from loracore.layer import lora_update
from loracore.selfcheck import Check, Hints, call_learner, exercise, report


def _stacks(seed: int = 0, d_in: int = 12, d_out: int = 10, max_rank: int = 4):
    """Three adapters (ranks 2, 4, 3) in zero-padded stacks, their own factors, scalings."""
    g = torch.Generator().manual_seed(seed)
    ranks, scales = (2, 4, 3), torch.tensor([2.0, 0.5, 1.5])
    A = [torch.randn(r, d_in, generator=g) for r in ranks]
    B = [torch.randn(d_out, r, generator=g) for r in ranks]
    A_stack, B_stack = torch.zeros(3, max_rank, d_in), torch.zeros(3, d_out, max_rank)
    for s, r in enumerate(ranks):
        A_stack[s, :r], B_stack[s, :, :r] = A[s], B[s]
    x = torch.randn(5, 6, d_in, generator=g)
    base_out = torch.randn(5, 6, d_out, generator=g)
    return A, B, A_stack, B_stack, scales, x, base_out


@exercise(points=2)
def check_gather_rows(gather_rows: Callable) -> None:
    """Exercise 1: ``gather_rows(A_stack, B_stack, scales, slots) -> (A_rows, B_rows, scale_rows)``."""
    _, _, A_stack, B_stack, scales, _, _ = _stacks()
    slots = torch.tensor([2, 0, 0, 1, 2])
    got = call_learner(gather_rows, A_stack, B_stack, scales, slots)
    if not isinstance(got, tuple) or len(got) != 3:
        report("gather_rows", [Check(
            "returns (A_rows, B_rows, scale_rows)", False, "a tuple of three tensors",
            f"{type(got).__name__}", "return A_stack[slots], B_stack[slots], scales[slots]")])
    A_rows, B_rows, s_rows = got
    report("gather_rows", [
        Check.close("A_rows[i] is the stack entry of row i's slot", A_rows, A_stack[slots], atol=0, rtol=0,
                    hint="Index the first (slot) dimension with the whole slots tensor: A_stack[slots]."),
        Check.close("B_rows[i] is the stack entry of row i's slot", B_rows, B_stack[slots], atol=0, rtol=0,
                    hint="The same index as for A: B_stack[slots], so row i's A and B come from one slot."),
        Check.close("scale_rows[i] is row i's scaling", s_rows, scales[slots], atol=0, rtol=0,
                    hint="Gather the scalings too: scales[slots], one per row, not one per slot."),
    ])


@exercise(points=4)
def check_batched_lora(batched_lora: Callable) -> None:
    """Exercise 2: ``batched_lora(x, A_rows, B_rows, scale_rows) -> (rows, seq, out)`` with bmm."""
    A, B, A_stack, B_stack, scales, x, _ = _stacks(1)
    slots = torch.tensor([1, 2, 0, 0, 1])
    got = call_learner(batched_lora, x, A_stack[slots], B_stack[slots], scales[slots])
    want = torch.stack([lora_update(x[i], A[s], B[s], scales[s].item()) for i, s in enumerate(slots.tolist())])
    report("batched_lora", [
        Check.close("row i = scale_i * (x_i @ A_i.T) @ B_i.T, each row with its own adapter", got, want,
                    hint="Each row uses its own adapter: h = torch.bmm(x, A_rows.transpose(1, 2)); then "
                         "torch.bmm(h, B_rows.transpose(1, 2)); multiply by scale_rows.view(-1, 1, 1)."),
    ])


@exercise(points=4)
def check_mixed_lora(mixed_lora: Callable) -> None:
    """Exercise 3: ``mixed_lora(base_out, x, A_stack, B_stack, scales, slots)``; ``-1`` = no adapter."""
    A, B, A_stack, B_stack, scales, x, base_out = _stacks(2)
    slots = torch.tensor([0, -1, 2, -1, 1])
    before = base_out.clone()
    got = call_learner(mixed_lora, base_out, x, A_stack, B_stack, scales, slots)
    checks = [Check.true("base_out itself is not modified", torch.equal(base_out, before),
                         "base_out unchanged (work on a copy)", "base_out was changed in place",
                         hint="out = base_out.clone(), then write the rows with an adapter into out.")]
    if isinstance(got, torch.Tensor) and got.shape == base_out.shape:
        for i, s in enumerate(slots.tolist()):
            if s < 0:
                checks.append(Check.close(f"row {i} has no adapter: the base output bit for bit", got[i],
                                          before[i], atol=0, rtol=0,
                                          hint="Only rows with slots >= 0 get an adapter; the others "
                                               "must not even have 0 added."))
            else:
                want = before[i] + lora_update(x[i], A[s], B[s], scales[s].item())
                checks.append(Check.close(f"row {i} = base + its adapter (slot {s})", got[i], want,
                                          hint="Row i adds the adapter of slot slots[i]: A_stack[slots[i]], "
                                               "B_stack[slots[i]], scales[slots[i]] (gather, then bmm)."))
    else:
        checks.append(Check.close("output shape", got, before,
                                  hint="Return a tensor shaped like base_out: (rows, seq, out)."))
    report("mixed_lora", checks)


#: Hints on demand (``loracore.hint("lab05", "mixed_lora")`` in the lab): a nudge first,
#: nearly the code last.
hint = Hints("lab05", {
    "gather_rows": (
        "No loop needed: indexing a tensor's first dimension with a tensor of indices picks one "
        "entry per index.",
        "A_stack[slots] has shape (rows, R, in): row i is A_stack[slots[i]]. The same works for "
        "B_stack and scales.",
        "return A_stack[slots], B_stack[slots], scales[slots]",
    ),
    "batched_lora": (
        "The single-adapter formula, scale * (x @ A.T) @ B.T, with every matrix product done per row "
        "by torch.bmm.",
        "A_rows.transpose(1, 2) is (rows, in, R), so torch.bmm(x, it) is (rows, seq, R); then the "
        "same with B_rows.transpose(1, 2). scale_rows.view(-1, 1, 1) scales each row.",
        "h = torch.bmm(x, A_rows.transpose(1, 2))    # (rows, seq, R)\n"
        "return torch.bmm(h, B_rows.transpose(1, 2)) * scale_rows.view(-1, 1, 1)",
    ),
    "mixed_lora": (
        "Start from a copy of base_out, and change only the rows that have an adapter.",
        "(slots >= 0).nonzero().flatten() are those rows; gather_rows with slots[rows], then "
        "batched_lora on x[rows]. Skip the work when there are none.",
        "rows = (slots >= 0).nonzero().flatten()\n"
        "out = base_out.clone()\n"
        "if rows.numel():\n"
        "    A_rows, B_rows, scale_rows = gather_rows(A_stack, B_stack, scales, slots[rows])\n"
        "    out[rows] = base_out[rows] + batched_lora(x[rows], A_rows, B_rows, scale_rows)\n"
        "return out",
    ),
})
