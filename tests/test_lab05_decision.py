"""Lab 05's eviction decision: the request traces, the replay, the baselines, and what passes.

Pure Python, no model: the check scores a learner's policy by replaying a held-out trace, so
these tests pin the replay's rules on hand-made traces, and show that the decision has room:
two reasonable policies pass, the server's own LRU, FIFO and a tempting one (counts that never
forget) fail, and a policy that memorised the visible trace does not carry over.
"""

from __future__ import annotations

import collections

import pytest

from loracore.checks import lab05
from loracore.checks.lab05 import (HELD_OUT_SEED, MARGIN, SLOTS, VISIBLE_SEED, PolicyError, fifo, lru,
                                   lru_slots_to_match, request_trace, simulate)
from loracore.selfcheck import ExerciseFailed


def window(n):
    def policy(resident, history):
        recent = collections.Counter(history[-n:])
        return min(resident, key=lambda name: recent[name])
    return policy


def all_time_counts(resident, history):
    counts = collections.Counter(history)
    return min(resident, key=lambda name: counts[name])


def test_a_trace_is_the_same_for_a_seed_and_another_for_another_seed():
    a, b = request_trace(VISIBLE_SEED), request_trace(VISIBLE_SEED)
    assert a == b and len(a) == 3000 and set(a) == set(lab05.ADAPTERS)
    assert request_trace(HELD_OUT_SEED) != a
    # skewed: the busiest adapter of a phase takes far more than a twelfth of it
    first_phase = collections.Counter(a[:1000]).most_common()
    assert first_phase[0][1] > 3 * 1000 / 12 > first_phase[-1][1]
    # and what is busy changes from phase to phase
    assert collections.Counter(a[2000:]).most_common(1)[0][0] != first_phase[0][0]
    with pytest.raises(ValueError, match="positive int"):
        request_trace(n=0)


def test_the_replay_counts_hits_and_asks_the_policy_only_when_the_slots_are_full():
    calls = []

    def spy(resident, history):
        calls.append((list(resident), list(history)))
        resident.clear()  # the policy's lists are copies: this changes nothing in the replay
        return calls[-1][0][0]

    trace = ["a", "b", "a", "c", "b", "d", "a"]
    # 2 slots: a b | a hit | c evicts a (spy: first read in) | b hit | d evicts b | a evicts c
    assert simulate(spy, trace, slots=2) == pytest.approx(2 / 7)
    assert calls == [(["a", "b"], ["a", "b", "a", "c"]),
                     (["b", "c"], ["a", "b", "a", "c", "b", "d"]),
                     (["c", "d"], trace)]


def test_lru_and_fifo_follow_their_definitions():
    resident = ["lora-03", "lora-07", "lora-01", "lora-10"]
    history = ["lora-03", "lora-10", "lora-07", "lora-01", "lora-03", "lora-05"]
    assert lru(resident, history) == "lora-10" and fifo(resident, history) == "lora-03"
    assert lru(["x"], ["x", "y"]) == "x"
    # the lab's worked example
    assert simulate(lru, ["a", "b", "a", "c", "b"], slots=2) == pytest.approx(1 / 5)  # c evicts b
    assert simulate(fifo, ["a", "b", "a", "c", "a"], slots=2) == pytest.approx(1 / 5)  # c evicts a


def test_a_policy_that_returns_no_resident_adapter_is_named_with_the_request():
    with pytest.raises(PolicyError, match=r"at request 2 \('c' needed a slot\) the policy returned 'z'"):
        simulate(lambda resident, history: "z", ["a", "b", "c"], slots=2)
    with pytest.raises(ValueError, match="slots must be a positive int"):
        simulate(lru, ["a"], slots=0)


def test_two_reasonable_policies_pass_and_the_tempting_ones_fail():
    held_out = request_trace(HELD_OUT_SEED)
    need = simulate(lru, held_out) + MARGIN
    for good in (window(100), window(300)):
        assert simulate(good, held_out) >= need + 0.02  # with room to spare
        lab05.check_eviction_policy(good)
    visible = request_trace(VISIBLE_SEED)
    ranking = [name for name, _ in collections.Counter(visible).most_common()]
    memorised = lambda resident, history: max(resident, key=ranking.index)  # noqa: E731
    for bad in (lru, fifo, all_time_counts, memorised):
        with pytest.raises(ExerciseFailed):
            lab05.check_eviction_policy(bad)
    # memorising scores better on the trace it was read from: that is why the check holds one out
    assert simulate(memorised, visible) > simulate(memorised, held_out) + 0.1


def test_question_3_is_computed_from_the_learners_policy():
    visible = request_trace(VISIBLE_SEED)
    assert lru_slots_to_match(lru, visible) == SLOTS  # LRU needs exactly its own slots
    k = lru_slots_to_match(window(200), visible)
    assert k > SLOTS and simulate(lru, visible, k) >= simulate(window(200), visible) > simulate(lru, visible, k - 1)
    lab05.check_lru_slots_needed(k, window(200))
    with pytest.raises(ExerciseFailed):
        lab05.check_lru_slots_needed(k - 1, window(200))


@pytest.mark.parametrize("answer, passes", [(3.0, True), (2.3, True), (3.7, True), (2.2, False),
                                            (3.8, False), ("3", False), (True, False), (float("nan"), False)])
def test_question_1_reads_the_run_within_a_quarter(answer, passes):
    curves = {"concurrency": [1, 8], "one adapter": [10.0, 30.0]}
    if passes:
        lab05.check_batching_gain(answer, curves)
    else:
        with pytest.raises(ExerciseFailed):
            lab05.check_batching_gain(answer, curves)


def test_question_2_explains_each_wrong_choice(capsys):
    lab05.check_swap_reason("B")
    for wrong in ("A", "C", "D"):
        with pytest.raises(ExerciseFailed):
            lab05.check_swap_reason(wrong)
        assert f"not {wrong}:" in capsys.readouterr().out
