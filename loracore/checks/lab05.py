"""Checks for lab 05, "serve swapped adapters": the per-row gather, the batched LoRA product,
the mixed-adapter layer that leaves rows without an adapter untouched, the eviction policy the
learner decides on, and the reflection questions on what the lab measured.

Every check of the three functions uses non-zero factors and adapters of different ranks
(zero-padded in the stacks), so code that ignores a row's adapter, or mixes two rows' adapters,
fails.

The eviction decision is pure Python (:mod:`loracore.checks.eviction`: the traces, their replay,
the LRU and FIFO baselines, all re-exported here for the lab). Its check scores the learner's
policy on a trace the learner never saw (another seed), against LRU measured on that same trace.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable

import torch

from loracore.checks.eviction import (ADAPTERS, HELD_OUT_SEED, MARGIN, SLOTS, TRACE_LENGTH, VISIBLE_SEED,
                                      PolicyError, fifo, lru, lru_slots_to_match, request_trace, simulate)
from loracore.layer import lora_update
from loracore.selfcheck import Check, Hints, call_learner, exercise, report

__all__ = ["ADAPTERS", "SLOTS", "MARGIN", "VISIBLE_SEED", "HELD_OUT_SEED", "TRACE_LENGTH", "PolicyError",
           "request_trace", "simulate", "lru", "fifo", "lru_slots_to_match", "check_gather_rows",
           "check_batched_lora", "check_mixed_lora", "check_eviction_policy", "check_batching_gain",
           "check_swap_reason", "check_lru_slots_needed", "hint"]


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


@exercise(points=1)
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


@exercise(points=1)
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


@exercise(points=2)
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


@exercise(points=3)
def check_eviction_policy(choose_victim: Callable) -> None:
    """Decision: ``choose_victim(resident, history) -> name`` beats LRU by :data:`MARGIN` on a
    held-out trace, with :data:`SLOTS` slots."""
    trace = request_trace(HELD_OUT_SEED)
    try:
        mine = simulate(choose_victim, trace)
    except PolicyError as e:
        report("eviction_policy", [Check(
            "returns one of the resident adapters", False, "a name from `resident`", str(e),
            "Return an element of the `resident` list you were given (a str), never a new name.")])
    base, first_in = simulate(lru, trace), simulate(fifo, trace)
    gap = round(mine - (base + MARGIN), 9)  # hit rates are counts / len(trace): no rounding noise
    report("eviction_policy", [
        Check.true(f"on a held-out trace ({len(trace)} requests, {SLOTS} slots) the hit rate beats "
                   f"LRU's by at least {MARGIN * 100:.0f} percentage points", gap >= 0,
                   f">= {base + MARGIN:.1%} (LRU {base:.1%} + {MARGIN * 100:.0f} points; FIFO "
                   f"{first_in:.1%})",
                   f"{mine:.1%}" + ("" if gap >= 0 else f": {-gap * 100:.1f} points short"),
                   hint="Look at the visible trace's picture: which adapters are busy, for how long, "
                        "and what a batch job's sweep does to LRU's slots. Try each idea on the visible "
                        "trace with simulate(choose_victim, trace) against simulate(lru, trace) first."),
    ])


# --------------------------------------------------------------------------- reflection questions

#: How far a number read off the figure may be from the measured one (relative).
READ_TOLERANCE = 0.25


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        return None
    return float(value)


@exercise(points=1)
def check_batching_gain(batching_gain: object, curves: dict) -> None:
    """Reflection 1: the one-adapter line's tokens/s at the largest concurrency over at 1, read off
    the figure (within :data:`READ_TOLERANCE` of the measured ratio)."""
    levels, rates = list(curves["concurrency"]), list(curves["one adapter"])
    measured = rates[-1] / rates[0]
    got = _number(batching_gain)
    ok = got is not None and abs(got - measured) <= READ_TOLERANCE * measured
    report("batching_gain", [Check.true(
        f"tokens/s of one adapter with {levels[-1]} clients at once / with {levels[0]}, as this run "
        f"measured it (within {READ_TOLERANCE:.0%})", ok,
        f"about {measured:.2f} ({rates[-1]:.1f} / {rates[0]:.1f} tokens/s)",
        repr(batching_gain) if got is None else f"{got:.2f}",
        hint="Read two points of the one-adapter line, the rightmost and the leftmost, and divide "
             "the first by the second. The check compares with this run's measurement: if the "
             "lab ran again, read the new figure (or the printed table).")])


#: Question 2's choices: the right one, and why each other one is wrong.
SWAP_CHOICES = {
    "A": "Two or three adapters in one batch need a slower product than one adapter.",
    "B": "A request whose adapter is not in a slot waits while the server evicts one and reads its "
         "own from disk; asking for three adapters in turn over two slots, nearly every request does.",
    "C": "The server loads the base model again whenever a request names another adapter.",
    "D": "capitals-v2 is a copy of capitals, so their rows collide in the batch and are computed twice.",
}
SWAP_ANSWER = "B"
_SWAP_WHY_NOT = {
    "A": "the mixed line (two adapters, both resident) runs about as fast as one adapter: the "
         "batched product gathers each row's factors whatever the mix.",
    "C": "the base weights are loaded once and never written; only an adapter's small factors are "
         "read into a slot.",
    "D": "routing is per row: capitals-v2 has its own slot, and no row ever sees another's adapter.",
}


@exercise(points=1)
def check_swap_reason(swap_reason: object) -> None:
    """Reflection 2 (multiple choice): why the swapping load makes fewer tokens/s."""
    got = swap_reason.strip().upper() if isinstance(swap_reason, str) else swap_reason
    if got == SWAP_ANSWER:
        why = ""
    elif got in _SWAP_WHY_NOT:
        why = f"not {got}: {_SWAP_WHY_NOT[got]}"
    else:
        why = f"one of the letters {', '.join(SWAP_CHOICES)} (a str)"
    report("swap_reason", [Check.true(
        "why three adapters over two slots make fewer tokens/s", got == SWAP_ANSWER,
        "the choice that the lab's measurements support", repr(swap_reason), hint=why)])


@exercise(points=1)
def check_lru_slots_needed(lru_slots_needed: object, choose_victim: Callable) -> None:
    """Reflection 3: how many slots LRU needs on the visible trace to match the learner's policy
    with :data:`SLOTS` (computed here from the learner's own policy)."""
    trace = request_trace(VISIBLE_SEED)
    want = lru_slots_to_match(choose_victim, trace)
    report("lru_slots_needed", [Check.equal(
        f"the fewest slots with which LRU's hit rate on the visible trace reaches your policy's with "
        f"{SLOTS}", lru_slots_needed, want,
        hint="simulate(lru, trace, slots=k) for k = 4, 5, 6, ...: the first k whose hit rate is at "
             "least simulate(choose_victim, trace)'s. Each slot is one adapter's memory.")])


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
    "choose_victim": (
        "LRU forgets everything but the last request of each adapter. Count: how often was each "
        "resident adapter asked for? Then ask: over which part of the history?",
        "A batch job asks for five cold adapters once each: LRU evicts busy adapters for them. "
        "Counting requests keeps the busy ones, but counts over the whole history keep the "
        "adapters that were busy two phases ago; count over a recent window instead.",
        "recent = collections.Counter(history[-WINDOW:])  # WINDOW: yours to choose, on the visible trace\n"
        "return min(resident, key=lambda name: recent[name])",
    ),
})
