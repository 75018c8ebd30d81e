"""Checks for lab 04, "merge two task adapters": trim, sign election, disjoint mean, DARE's
drop-and-rescale and the learner's whole TIES, each against :mod:`loracore.merge`.

The inputs hold the cases where merging code usually goes wrong: exact zeros (they vote for no
sign), columns where the larger total and the majority of votes disagree, equal totals (a tie
elects +), and columns where no task agrees with the elected sign (0, not a division by zero).

Then the learner decides: a merge method and density from a sweep the lab runs. The check merges
the chosen way again (:func:`merge_fn`, with loracore's merge functions), scores both tasks with
the lab's own scoring function, and accepts the choice when it is within one question of the
best in the sweep: with a few held-out questions per task, closer scores are ties. The reflection
questions are scored from the lab's own table.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from loracore import merge as M
from loracore.selfcheck import Check, ExerciseFailed, Hints, call_learner, exercise, report


def _tasks(seed: int = 0, n: int = 3, shape: tuple[int, ...] = (6, 9)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tasks = [torch.randn(shape, generator=g) for _ in range(n)]
    tasks[0][0, :3] = torch.tensor([3.0, -1.0, 0.0])  # total + but most votes -
    tasks[1][0, :3] = torch.tensor([-1.0, 1.0, 0.0])  # a tie in total (0): + is elected
    tasks[2][0, :3] = torch.tensor([-1.0, 0.0, 0.0])  # an all-zero column
    return tasks


def _tensor(name: str, got: object) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise ExerciseFailed(f"{name} should return a torch.Tensor, got {type(got).__name__}: "
                             f"end the function with `return` and the result tensor")
    return got


@exercise(points=2)
def check_trim(trim: Callable[[torch.Tensor, float], torch.Tensor]) -> None:
    """Exercise 1: ``trim(t, density)`` keeps the top ``int(density * numel)`` by magnitude."""
    t = _tasks()[0]
    checks = []
    for density in (0.2, 0.5, 0.9):
        got = _tensor("trim", call_learner(trim, t.clone(), density))
        want = M.prune(t, density, "magnitude")
        kept = int((got != 0).sum()) if got.shape == t.shape else -1
        checks.append(Check.close(f"density {density}: the {int(density * t.numel())} largest |t| kept, "
                                  f"the rest zero", got, want, atol=0, rtol=0,
                                  hint=f"kept {kept} entries. Rank |t| over the whole tensor "
                                       f"(t.abs().flatten().topk(k)), k = int(density * t.numel()) "
                                       f"(no more, no fewer), and keep the original signed values "
                                       f"there."))
    small = torch.tensor([0.5, -2.0, 1.0, -0.1])
    checks.append(Check.close("the docstring example [0.5, -2, 1, -0.1] at 0.5 -> [0, -2, 1, 0]",
                              call_learner(trim, small.clone(), 0.5), torch.tensor([0.0, -2.0, 1.0, 0.0]),
                              atol=0, rtol=0, hint="-2 has the largest magnitude: keep it, sign and all."))
    report("trim", checks)


@exercise(points=2)
def check_elect(elect: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Exercise 2: ``elect(stacked)`` -> bool mask of entries agreeing with the sign of the sum."""
    stacked = torch.stack(_tasks())
    got = _tensor("elect", call_learner(elect, stacked.clone()))
    want = M.calculate_majority_sign_mask(stacked, "total")
    checks = [
        Check.equal("a bool mask of shape (n_tasks, *S)", (got.dtype, tuple(got.shape)),
                    (torch.bool, tuple(stacked.shape)),
                    hint="Compare the tasks' signs with the elected sign: `signs == elected` is bool."),
    ]
    if checks[0].passed:
        col = got[:, 0, :3].tolist()
        checks += [
            Check.equal("column with values 3, -1, -1: the total (+1) elects +, so only task 0 agrees",
                        [row[0] for row in col], [True, False, False],
                        hint="Elect by the sign of the SUM over tasks (dim 0), not by counting votes."),
            Check.equal("column -1, 1, 0: the sum is 0, a tie elects +", [row[1] for row in col],
                        [False, True, False], hint="Use `sum >= 0` for + so that ties go to +."),
            Check.equal("column of zeros: a 0 agrees with no sign", [row[2] for row in col],
                        [False, False, False],
                        hint="Compare t.sign() (which is 0 for 0) with the elected ±1, never >= 0."),
            Check.close("every entry", got.int(), want.int(), atol=0, rtol=0,
                        hint="mask = stacked.sign() == elected, with elected = +1 where "
                             "stacked.sum(0) >= 0 and -1 elsewhere."),
        ]
    report("elect", checks)


@exercise(points=2)
def check_disjoint_mean(disjoint_mean: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 3: ``disjoint_mean(stacked, mask)`` -> the mean over agreeing tasks only."""
    stacked = torch.stack(_tasks())
    mask = M.calculate_majority_sign_mask(stacked)
    got = _tensor("disjoint_mean", call_learner(disjoint_mean, stacked.clone(), mask.clone()))
    want = M.disjoint_merge(stacked, mask)
    report("disjoint_mean", [
        Check.equal("shape: one tensor like a single task", tuple(got.shape), tuple(want.shape),
                    hint="Sum over dim 0 (the task axis)."),
        Check.true("no NaN where no task agrees (0 instead)", bool(torch.isfinite(got).all()),
                   "all finite", f"{int((~torch.isfinite(got)).sum())} non-finite entries",
                   hint="Divide by the count of agreeing tasks clamped to at least 1."),
        Check.close("the mean of the agreeing entries", got, want,
                    hint="(stacked * mask).sum(0) / mask.sum(0).clamp(min=1): zeros and "
                         "disagreeing entries must not dilute the mean."),
    ])


@exercise(points=2)
def check_drop_and_rescale(drop_and_rescale: Callable[..., torch.Tensor]) -> None:
    """Exercise 4: ``drop_and_rescale(t, density, generator)``: DARE, drawn like PEFT."""
    t = _tasks()[0]
    got = _tensor("drop_and_rescale", call_learner(drop_and_rescale, t.clone(), 0.3,
                                                   torch.Generator().manual_seed(7)))
    want = M.prune(t, 0.3, "random", rescale=True, generator=torch.Generator().manual_seed(7))
    big = torch.full((200, 200), 2.0)
    mean = call_learner(drop_and_rescale, big, 0.25, torch.Generator().manual_seed(1)).mean().item()
    kept = got[got != 0] / t[got != 0] if got.shape == t.shape else torch.tensor([])
    report("drop_and_rescale", [
        Check.true("survivors are divided by density", bool(kept.numel() and torch.allclose(kept, torch.full_like(kept, 1 / 0.3))),
                   f"every kept entry = t / 0.3 = {1 / 0.3:.3f} · t",
                   f"ratios {sorted({round(v, 3) for v in kept.tolist()})[:4]}",
                   hint="Multiply by the 0/1 mask, then divide by density."),
        Check.true("the expected value is kept: a tensor of 2.0 at density 0.25 averages about 2",
                   abs(mean - 2.0) < 0.1, "mean within 0.1 of 2.0", f"{mean:.3f}",
                   hint="Keep each entry with probability density, then divide the survivors by "
                        "density (not by 1 - density): on average nothing changes."),
        # 1e-5, not bit equality: t * mask / density and t * mask * (1 / density) differ in the last
        # bit; a different mask is off by whole entries.
        Check.close("the same mask as loracore/PEFT from the same generator", got, want, atol=1e-5, rtol=0,
                    hint="Draw the mask with torch.bernoulli(torch.full_like(t, density), "
                         "generator=generator): one draw per entry, in that way, so the random "
                         "stream matches."),
    ])


@exercise(points=2)
def check_ties(my_ties: Callable[..., torch.Tensor]) -> None:
    """Exercise 5: ``my_ties(task_tensors, weights, density)`` equals ``loracore.merge.ties``."""
    tasks = _tasks(seed=3)
    checks = []
    for weights, density in (([1.0, 1.0, 1.0], 0.5), ([0.7, -0.4, 1.3], 0.3), ([1.0, 0.5, 2.0], 1.0)):
        got = _tensor("my_ties", call_learner(my_ties, [t.clone() for t in tasks], torch.tensor(weights), density))
        want = M.ties(tasks, torch.tensor(weights), density)
        checks.append(Check.close(f"weights {weights}, density {density}", got, want,
                                  hint="Trim each task, stack, elect on the UNWEIGHTED trimmed stack, "
                                       "then apply the weights and take the disjoint mean."))
    report("my_ties", checks)



# --------------------------------------------------------------------------- the decision

#: The merge methods of the lab's sweep: (method, density) with density 1.0 for "linear".
METHODS = ("linear", "ties", "dare")
#: The seed of DARE's random drop: the sweep and the check draw the same masks.
DARE_SEED = 0

Scores = tuple[float, float]  # (capitals accuracy, records accuracy), each in [0, 1]


def merge_fn(method: str, density: float, weights: torch.Tensor) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """A function ``[ΔW_capitals, ΔW_records] -> merged ΔW`` (each ``(out, in)``) for one merge.

    ``"linear"`` is the weighted sum (``density`` must be 1.0), ``"ties"`` TIES at ``density``,
    ``"dare"`` DARE's drop-and-rescale then the sum, its masks drawn from one generator seeded
    with :data:`DARE_SEED` on the tensors' device, layer after layer: calling ``merge_fn`` again
    draws the same masks. Example: ``merge_fn("ties", 0.3, torch.tensor([1.0, 1.0]))``.
    """
    if method not in METHODS:
        raise ValueError(f"lab04 merge_fn: method must be one of {METHODS}, got {method!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"lab04 merge_fn: density must be a number in (0, 1], got {density!r}")
    if method == "linear":
        if density != 1:
            raise ValueError(f"lab04 merge_fn: the linear merge keeps everything: density 1.0, "
                             f"got {density!r}")
        return lambda deltas: M.task_arithmetic(deltas, weights)
    if method == "ties":
        return lambda deltas: M.ties(deltas, weights, density)
    generator: list[torch.Generator] = []  # made on the first call, on the tensors' device

    def dare(deltas: list[torch.Tensor]) -> torch.Tensor:
        if not generator:
            generator.append(torch.Generator(device=deltas[0].device).manual_seed(DARE_SEED))
        return M.dare_linear(deltas, weights, density, generator=generator[0])
    return dare


def _right(scores: Scores, n_eval: int) -> int:
    """Questions answered right over both tasks (each accuracy is a count out of ``n_eval``)."""
    return round((scores[0] + scores[1]) * n_eval)


def _label(choice: tuple) -> str:
    return choice[0] if choice[0] == "linear" else f"{choice[0]} at density {choice[1]}"


def _in_sweep(choice: Any, sweep: dict, title: str) -> tuple[str, float]:
    """``choice`` as ``(method, density)`` when it is a row of ``sweep``; else fail with the rows."""
    if not (isinstance(choice, tuple) and len(choice) == 2 and choice in sweep):
        report(title, [Check("your choice is one of the merges in the sweep", False,
                             "one of " + ", ".join(repr(k) for k in sweep), repr(choice)[:120],
                             hint='A tuple (method, density) as in the table, e.g. ("dare", 0.5).')])
    return choice


@exercise(points=2)
def check_merge_choice(choice: tuple[str, float], sweep: dict[tuple[str, float], Scores],
                       merged_scores: Callable[[Callable], Scores], weights: torch.Tensor,
                       n_eval: int) -> None:
    """Decision: ``choice`` is within one question (both tasks together) of the sweep's best, and
    merging it again gives the sweep's scores for it."""
    method, density = _in_sweep(choice, sweep, "your merge choice")
    again = tuple(merged_scores(merge_fn(method, density, weights)))
    best = max(sweep, key=lambda k: _right(sweep[k], n_eval))
    right, top = _right(again, n_eval), _right(sweep[best], n_eval)
    tied = [_label(k) for k in sweep if _right(sweep[k], n_eval) >= top - 1]
    print(f"  note  {_label(choice)} merged and scored again: capitals {again[0]:.0%}, records "
          f"{again[1]:.0%}, {right} of {2 * n_eval} questions; within one question of the best: "
          + ", ".join(tied))
    report("your merge choice", [
        Check.true("merged again, it scores what your table says", again == tuple(sweep[choice]),
                   f"capitals {sweep[choice][0]:.0%}, records {sweep[choice][1]:.0%} (your table)",
                   f"capitals {again[0]:.0%}, records {again[1]:.0%}",
                   hint="Run the sweep cell again, then your choice and this check, without "
                        "changing the table in between."),
        Check.true(f"within one question (of {2 * n_eval}, both tasks) of the best in the sweep",
                   right >= top - 1, f"at least {top - 1} right ({_label(best)} gets {top})",
                   f"{right} right, {top - 1 - right} too few" if right < top - 1 else f"{right} right",
                   hint="Add up both tasks' scores for each row of the table: which rows are within "
                        "one question of the highest total?"),
    ])


@exercise(points=1)
def check_merge_cost(answer: int, choice: tuple[str, float], sweep: dict[tuple[str, float], Scores],
                     results: dict[str, Scores], n_eval: int) -> None:
    """Reflection 1: questions (both tasks) the chosen merge gets right fewer than the adapters alone."""
    _in_sweep(choice, sweep, "what your merge costs")
    alone = round((results["capitals adapter alone"][0] + results["records adapter alone"][1]) * n_eval)
    want = alone - _right(sweep[choice], n_eval)
    ok = isinstance(answer, (int, float)) and not isinstance(answer, bool) and answer == want
    report("what your merge costs", [Check.true(
        "questions right with each adapter alone on its own task, minus with your merge",
        ok, str(want), repr(answer),
        hint=f"Alone: capitals adapter on capitals + records adapter on records, out of {n_eval} "
             f"each (accuracy × {n_eval}); then the same for your merge on both tasks; subtract.")])


@exercise(points=1)
def check_which_task_lost(answer: str, choice: tuple[str, float], sweep: dict[tuple[str, float], Scores],
                          results: dict[str, Scores]) -> None:
    """Reflection 2: which task the chosen merge costs more ("capitals", "records" or "same")."""
    _in_sweep(choice, sweep, "which task your merge costs more")
    lost = (results["capitals adapter alone"][0] - sweep[choice][0],
            results["records adapter alone"][1] - sweep[choice][1])
    want = "capitals" if lost[0] > lost[1] else "records" if lost[1] > lost[0] else "same"
    got = answer.strip().lower() if isinstance(answer, str) else answer
    report("which task your merge costs more", [Check.true(
        "the task that loses more accuracy in your merge than with its adapter alone", got == want,
        f"{want!r} (capitals loses {lost[0]:+.0%} points, records {lost[1]:+.0%})"
        if got in ("capitals", "records", "same") else '"capitals", "records" or "same"',
        repr(answer), hint="Compare each task's score in your merge with its own adapter alone, "
                           "from the table; equal losses are \"same\".")])


#: Reflection 3, multiple choice: why does DARE divide the entries it keeps by the density?
WHY_RESCALE = {
    "a": "To make the merged update sparse, so that the model is smaller.",
    "b": "To settle the sign conflicts between the two tasks.",
    "c": "So that every entry keeps its expected value: kept with probability density and divided by "
         "it, the dropped update is on average the update itself, and the merged ΔW keeps its size.",
    "d": "So that both tasks get the same weight in the merge.",
}
_RESCALE_FEEDBACK = {
    "a": "The merged ΔW is added into the dense base weights: nothing gets smaller, and rescaling "
         "does not change which entries are zero.",
    "b": "DARE alone elects no sign (that is TIES' step, or DARE-TIES'): its sum keeps the conflicts.",
    "d": "The weights do that (w = [1, 1] here); the rescaling is per entry, the same for both tasks.",
}


@exercise(points=1)
def check_why_rescale(answer: str) -> None:
    """Reflection 3: multiple choice, :data:`WHY_RESCALE`; feedback on a wrong letter."""
    letter = answer.strip().lower() if isinstance(answer, str) else answer
    report("why DARE rescales", [Check.true(
        "the reason DARE divides the kept entries by the density", letter == "c",
        "the letter of the right option",
        f"{letter}: {WHY_RESCALE[letter]}" if letter in WHY_RESCALE else repr(answer),
        hint=_RESCALE_FEEDBACK.get(letter, "Answer with one of the letters a, b, c, d as a string.")
        + " What is the average of an entry that is t / density with probability density, else 0?")])

#: Hints on demand (``checks.hint("trim")`` in the lab): a nudge first, nearly the code last.
hint = Hints("lab04", {
    "trim": (
        "Rank the magnitudes over the whole tensor, flattened; the k largest keep their value.",
        "t.abs().flatten().topk(k).indices are the positions to keep, with k = int(density * t.numel()). "
        "Build a flat 0/1 mask from them and give it t's shape.",
        "k = int(density * t.numel())\n"
        "keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)\n"
        "keep[t.abs().flatten().topk(k).indices] = 1\n"
        "return t * keep.reshape(t.shape)",
    ),
    "elect": (
        "The elected sign is one per entry, from the sum over the task axis; then each task either "
        "has that sign or not.",
        "torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0) is the elected sign; stacked.sign() is 0 "
        "for a 0, so comparing it with ±1 gives False there.",
        "elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)\n"
        "return stacked.sign() == elected",
    ),
    "disjoint_mean": (
        "A mean is a sum divided by a count: here both only over the agreeing tasks.",
        "Multiplying by the mask zeroes the disagreeing entries; mask.sum(dim=0) counts the agreeing "
        "tasks; .clamp(min=1) keeps a count of 0 from dividing.",
        "return (stacked * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)",
    ),
    "drop_and_rescale": (
        "Two steps: a random 0/1 mask the shape of t, then multiply by it and divide by density.",
        "torch.full_like(t, density) is the keep probability of every entry; torch.bernoulli draws "
        "one 0 or 1 from each, with generator=generator.",
        "mask = torch.bernoulli(torch.full_like(t, density), generator=generator)\n"
        "return t * mask / density",
    ),
    "my_ties": (
        "Your three functions, in order, with the weights applied between elect and disjoint_mean.",
        "torch.stack the trimmed tasks (skip trim when density >= 1); elect on that stack; reshape "
        "weights to (n_tasks, 1, 1, ...) so it multiplies each task.",
        "stacked = torch.stack([t if density >= 1 else trim(t, density) for t in task_tensors])\n"
        "mask = elect(stacked)\n"
        "w = weights.reshape(-1, *([1] * (stacked.dim() - 1)))\n"
        "return disjoint_mean(stacked * w, mask)",
    ),
})
