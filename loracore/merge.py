"""Merging task vectors: task arithmetic, TIES and DARE, as pure functions on tensors.

A *task vector* is what fine-tuning added to the base weights; for a LoRA adapter it is
``ΔW = scaling · B @ A``. Merging combines several of them into one. Every function here
takes ``task_tensors``, a list of ``n`` tensors of one shape ``S`` (one per task), and
``weights``, ``n`` numbers, and returns one tensor of shape ``S``.

- :func:`task_arithmetic`: ``Σ w_i · t_i`` (Ilharco et al. 2023, "Editing models with task
  arithmetic"). Where two tasks pull a parameter in opposite directions they cancel:
  *interference*.
- :func:`ties`: TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): **trim** each task vector
  to its largest-magnitude entries, **elect** one sign per entry, and average only the
  entries that agree with it (**disjoint mean**).
- :func:`dare_linear`, :func:`dare_ties`: DARE (Yu et al. 2023, arXiv 2311.03099): **drop**
  entries at random and **rescale** the survivors by ``1 / density``, so the expected update
  is unchanged; then sum, or TIES' elect + disjoint mean.
- :func:`magnitude_prune`: trim, then the weighted sum.

The names and call signatures are those of ``peft.utils.merge_utils``, and the results are
equal to PEFT's bit for bit (with torch's global generator in the same state for DARE), so
what is learnt here carries over. Every random draw can also come from an explicit
``generator=``. Applying a merge to a model's adapters is :mod:`loracore.combine`'s job.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

__all__ = [
    "prune", "magnitude_prune_tensor", "random_prune_tensor", "calculate_majority_sign_mask",
    "disjoint_merge", "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties",
    "SIGN_METHODS", "check_density",
]

SIGN_METHODS = ("total", "frequency")
Weights = torch.Tensor | Sequence[float]


def check_density(density: float, where: str) -> None:
    """Refuse a density outside (0, 1] (the fraction of entries kept), naming ``where``."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0 < density <= 1):
        raise ValueError(f"{where}: density is the fraction of entries to keep and must be in (0, 1], "
                         f"got {density!r} (1 keeps everything; TIES' paper keeps 0.2)")


# ---- building blocks ----------------------------------------------------------------------
def magnitude_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' **trim**: keep the ``int(density · numel)`` entries of largest magnitude (over the
    whole tensor), zero the rest. tensor: any shape -> same shape.

    >>> magnitude_prune_tensor(torch.tensor([0.5, -2.0, 1.0, -0.1]), 0.5)
    tensor([ 0., -2.,  1., -0.])
    """
    check_density(density, "magnitude_prune_tensor")
    keep = int(density * tensor.numel())
    magnitude = tensor.abs().reshape(-1)
    if tensor.device.type == "cpu" and 0 < keep < magnitude.numel() \
            and not torch.isnan(magnitude).any():
        # On the CPU a selection (kthvalue) costs a fraction of topk, which also sorts the k
        # entries it returns (a 1536x576 ΔW at density 0.5: about a fifth). When exactly `keep`
        # entries reach the keep-th largest magnitude, they are the top-k set, so the result is
        # topk's. A tie at that threshold falls through to topk, which breaks it as PEFT does.
        above = magnitude >= torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values
        if int(above.sum()) == keep:
            return tensor * above.to(tensor.dtype).reshape(tensor.shape)
    mask = torch.zeros_like(magnitude)
    # topk breaks ties between equal magnitudes the same way as PEFT's, so the kept set agrees
    mask[torch.topk(magnitude, k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune_tensor(tensor: torch.Tensor, density: float, rescale: bool = True, *,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's **drop and rescale**: keep each entry with probability ``density`` (independently),
    then divide the survivors by ``density`` when ``rescale``. tensor: any shape -> same shape.

    Rescaling keeps the expectation: each entry is ``t/density`` with probability ``density``
    and 0 otherwise, so ``E[result] = t``. The mask is ``bernoulli(full_like(t, density))``
    drawn from ``generator`` (torch's global one by default, as PEFT does).

    >>> g = torch.Generator().manual_seed(0)
    >>> random_prune_tensor(torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, generator=g)
    tensor([2., 0., 6., 8.])
    """
    check_density(density, "random_prune_tensor")
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * keep
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a fraction ``density`` of ``tensor``'s entries: the largest (``"magnitude"``, TIES'
    trim) or a random draw (``"random"``, DARE's drop, divided by ``density`` when
    ``rescale``). ``density == 1`` returns ``tensor`` itself and draws nothing.
    tensor: any shape -> same shape."""
    check_density(density, "prune")
    if method not in ("magnitude", "random"):
        raise ValueError(f"prune: method must be 'magnitude' or 'random', got {method!r}")
    if density == 1:
        return tensor
    if method == "magnitude":
        return magnitude_prune_tensor(tensor, density)
    return random_prune_tensor(tensor, density, rescale, generator=generator)


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES' **elect**: one sign per entry, and where each task agrees with it.

    tensor: ``(n_tasks, *S)``, the task tensors stacked on dim 0 -> bool ``(n_tasks, *S)``.
    The elected sign is that of the column's sum (``"total"``: the mass decides) or of the sum
    of its signs (``"frequency"``: one task, one vote); a tie elects ``+``. An entry that is
    exactly 0 agrees with nothing, so it never counts in the mean.

    >>> calculate_majority_sign_mask(torch.tensor([[3.0, -1.0, 0.0], [-1.0, -1.0, 2.0], [-1.0, 2.0, 0.0]]))
    tensor([[ True, False, False],
            [False, False,  True],
            [False,  True, False]])

    (column 0: 3 - 1 - 1 = 1 > 0 elects +, although two of three tasks are negative; with
    ``"frequency"`` it would elect -.)
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"calculate_majority_sign_mask: method must be one of {SIGN_METHODS}, "
                         f"got {method!r}")
    signs = tensor.sign()
    votes = tensor.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return signs == elected


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """TIES' **disjoint mean**: per entry, the mean of only the tasks that agree with the elected
    sign (0 where none does). task_tensors, majority_sign_mask: ``(n_tasks, *S)`` -> ``(*S)``.

    >>> t = torch.tensor([[3.0, -1.0, 0.0], [-1.0, -1.0, 2.0], [-1.0, 2.0, 0.0]])
    >>> disjoint_merge(t, calculate_majority_sign_mask(t))
    tensor([3., 2., 2.])

    (a plain mean would give ``[0.33, 0, 0.67]``: the disagreeing and the zero entries dilute it.)
    """
    agreeing = (task_tensors * majority_sign_mask).sum(dim=0)
    count = torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)  # 0/0 -> 0/1
    return agreeing / count


# ---- the merges ---------------------------------------------------------------------------
def _stack(task_tensors: Sequence[torch.Tensor], weights: Weights, where: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack to ``(n, *S)`` and shape ``weights`` to ``(n, 1, ..., 1)`` for broadcasting."""
    if len(task_tensors) == 0:
        raise ValueError(f"{where}: task_tensors is empty; pass at least one tensor")
    shapes = {tuple(t.shape) for t in task_tensors}
    if len(shapes) > 1:
        raise ValueError(f"{where}: task tensors must share one shape, got {sorted(shapes)}")
    stacked = torch.stack(list(task_tensors), dim=0)
    if not isinstance(weights, torch.Tensor):
        weights = torch.tensor([float(w) for w in weights], dtype=stacked.dtype, device=stacked.device)
    if weights.dim() != 1 or weights.numel() != stacked.shape[0]:
        raise ValueError(f"{where}: need one weight per task tensor ({stacked.shape[0]}), got "
                         f"weights of shape {tuple(weights.shape)}")
    return stacked, weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def task_arithmetic(task_tensors: Sequence[torch.Tensor], weights: Weights) -> torch.Tensor:
    """The weighted sum ``Σ w_i · t_i``. task_tensors: n tensors of shape S; weights: ``(n,)``
    -> S.

    >>> task_arithmetic([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])], [0.5, 0.5])
    tensor([2., 0.])

    (the second entry: the tasks disagree and cancel out.)
    """
    stacked, w = _stack(task_tensors, weights, "task_arithmetic")
    return (stacked * w).sum(dim=0)


def magnitude_prune(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float
                    ) -> torch.Tensor:
    """Trim each task tensor to its top ``density`` by magnitude, then the weighted sum.
    task_tensors: n tensors of shape S; weights: ``(n,)`` -> S."""
    check_density(density, "magnitude_prune")
    trimmed = [prune(t, density, "magnitude") for t in task_tensors]
    stacked, w = _stack(trimmed, weights, "magnitude_prune")
    return (stacked * w).sum(dim=0)


def ties(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect, disjoint mean.
    task_tensors: n tensors of shape S; weights: ``(n,)`` -> S.

    The sign is elected on the trimmed, *unweighted* tensors; the weights multiply the tensors
    that enter the disjoint mean (PEFT's order).

    >>> ties([torch.tensor([4.0, 1.0, -3.0]), torch.tensor([-2.0, 1.0, 0.5])], [1.0, 1.0], 0.7)
    tensor([ 4.,  1., -3.])

    (trim keeps 2 of 3 in each: ``[4, 0, -3]`` and ``[-2, 1, 0]``; elect ``[+, +, -]``; the
    mean over agreeing tasks keeps 4 whole instead of averaging it with -2.)
    """
    check_density(density, "ties")
    trimmed = [prune(t, density, "magnitude") for t in task_tensors]
    stacked, w = _stack(trimmed, weights, "ties")
    mask = calculate_majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(stacked * w, mask)


def dare_linear(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (Yu et al. 2023, arXiv 2311.03099): drop each entry with probability
    ``1 - density``, rescale the survivors by ``1 / density``, then the weighted sum.
    task_tensors: n tensors of shape S; weights: ``(n,)`` -> S. Random: the masks are drawn
    in task order from ``generator`` (default: torch's global generator, as PEFT)."""
    check_density(density, "dare_linear")
    dropped = [prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors]
    stacked, w = _stack(dropped, weights, "dare_linear")
    return (stacked * w).sum(dim=0)


def dare_ties(task_tensors: Sequence[torch.Tensor], weights: Weights, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total", *,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's drop and rescale, then TIES' elect and disjoint mean.
    task_tensors: n tensors of shape S; weights: ``(n,)`` -> S. Random, as :func:`dare_linear`."""
    check_density(density, "dare_ties")
    dropped = [prune(t, density, "random", rescale=True, generator=generator) for t in task_tensors]
    stacked, w = _stack(dropped, weights, "dare_ties")
    mask = calculate_majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(stacked * w, mask)
