"""Lab 05's eviction decision, in pure Python: request traces, their replay through a few
adapter slots, and the baseline policies.

:func:`request_trace` draws a deterministic, skewed trace of adapter requests (popularity that
shifts twice, and batch jobs that sweep rarely used adapters); :func:`simulate` replays it
through ``SLOTS`` resident slots with a policy that picks the adapter to evict; :func:`lru` (what
``loracore.serve``'s registry does) and :func:`fifo` are the baselines the learner's policy is
compared with. The lab's checks (:mod:`loracore.checks.lab05`) score a policy on a held-out trace.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from loracore.selfcheck import call_learner

__all__ = ["ADAPTERS", "SLOTS", "MARGIN", "VISIBLE_SEED", "HELD_OUT_SEED", "TRACE_LENGTH", "Policy",
           "PolicyError", "request_trace", "simulate", "lru", "fifo", "lru_slots_to_match"]

#: The adapters the request traces name.
ADAPTERS = tuple(f"lora-{i:02d}" for i in range(12))
#: The memory budget: adapters that fit in the server's slots at once.
SLOTS = 4
#: The decision passes when its hit rate beats LRU's by this much on the held-out trace.
MARGIN = 0.05
#: The trace the lab shows (seed) and the one the check scores on, which the lab never shows.
VISIBLE_SEED, HELD_OUT_SEED = 0, 2025
TRACE_LENGTH = 3000

Policy = Callable[[list[str], list[str]], str]


def request_trace(seed: int = VISIBLE_SEED, n: int = TRACE_LENGTH) -> list[str]:
    """A deterministic trace of ``n`` adapter requests (names from :data:`ADAPTERS`).

    Three phases of equal length, each with its own popularity ranking of the 12 adapters
    (Zipf-like: the k-th most popular is asked for about 1/k^1.1 as often as the first), so what
    is popular changes twice; and, now and then (one request in 150 on average), a batch job
    that asks for 5 distinct adapters of the phase's less popular two thirds in a row.
    ``seed`` fixes everything: the same seed gives the same list on every machine.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"lab05.request_trace: n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(ADAPTERS))]
    trace: list[str] = []
    for phase in range(3):
        ranking = list(ADAPTERS)
        rng.shuffle(ranking)
        end = n * (phase + 1) // 3
        while len(trace) < end:
            if rng.random() < 1 / 150:  # a batch job sweeps adapters few users ask for
                trace += rng.sample(ranking[len(ranking) // 3:], 5)
            else:
                trace.append(rng.choices(ranking, weights)[0])
    return trace[:n]


class PolicyError(ValueError):
    """A policy returned something that is not one of the resident adapters."""


def simulate(choose_victim: Policy, trace: Sequence[str], slots: int = SLOTS) -> float:
    """Replay ``trace`` through ``slots`` slots; return the hit rate (hits / requests).

    A request for a resident adapter is a hit. Any other is a miss: the adapter is read into a
    free slot, or, when all ``slots`` are taken, into the slot of
    ``choose_victim(resident, history)``, where ``resident`` lists the resident adapters in the
    order they were read in (oldest first) and ``history`` is every request so far, oldest first,
    the one being served last (it is not resident). Both are fresh lists on every call.
    Raises :class:`PolicyError` when the policy names an adapter that is not resident.
    """
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"lab05.simulate: slots must be a positive int, got {slots!r}")
    trace = list(trace)
    if not trace:
        raise ValueError("lab05.simulate: the trace is empty")
    resident: list[str] = []
    hits = 0
    for t, name in enumerate(trace):
        if name in resident:
            hits += 1
            continue
        if len(resident) == slots:
            victim = call_learner(choose_victim, list(resident), trace[:t + 1])
            if not isinstance(victim, str) or victim not in resident:
                raise PolicyError(f"at request {t} ({name!r} needed a slot) the policy returned "
                                  f"{victim!r}, which is not one of the resident adapters {resident}")
            resident.remove(victim)
        resident.append(name)
    return hits / len(trace)


def lru(resident: list[str], history: list[str]) -> str:
    """Evict the resident adapter whose last request is the oldest (what ``loracore.serve`` does)."""
    seen: set[str] = set()
    if len(resident) == 1:
        return resident[0]
    for name in reversed(history[:-1]):  # walk back until all but one resident have been asked for
        if name in resident:
            seen.add(name)
            if len(seen) == len(resident) - 1:
                break
    return next(name for name in resident if name not in seen)


def fifo(resident: list[str], history: list[str]) -> str:
    """Evict the adapter that was read in first, however often it is asked for."""
    return resident[0]


def lru_slots_to_match(choose_victim: Policy, trace: Sequence[str], slots: int = SLOTS) -> int:
    """The fewest slots with which LRU's hit rate on ``trace`` reaches ``choose_victim``'s with
    ``slots`` slots (at most one slot per adapter in the trace, where every request after the
    first of each adapter is a hit)."""
    target = simulate(choose_victim, trace, slots)
    distinct = len(set(trace))
    return next((k for k in range(1, distinct) if simulate(lru, trace, k) >= target), distinct)
