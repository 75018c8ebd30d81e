"""A plain training loop for causal language models, readable top to bottom.

Nothing here is specific to LoRA: :func:`train` updates whatever parameters have
``requires_grad=True``. After ``loracore.lora.inject`` that is only the ``lora_A`` / ``lora_B``
matrices, so the same loop fine-tunes an adapter. One optimizer step (:func:`train_step`, also
the step of ``loracore finetune``) is:

1. take ``grad_accum_steps`` micro-batches and count their answer tokens
   (:func:`count_answer_tokens`); for each one: forward, *summed* loss on its answer tokens
   (:func:`causal_lm_loss`), divided by the answer tokens of all of them, backward (gradients
   add up). The step then sees exactly the mean loss of one batch made of all the
   micro-batches, however their answers' lengths differ. A micro-batch without answer tokens
   adds nothing (no loss, no gradient, no count);
2. clip the gradient norm to ``max_grad_norm``;
3. ``optimizer.step()``, then the learning-rate schedule's step, then zero the gradients.

The loss of every step is returned (:class:`TrainResult`) and can be plotted.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from loracore.data import IGNORE_INDEX, check_batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on the labelled (answer) tokens.

    logits: (batch, seq, vocab); labels: (batch, seq) with ``-100`` where no loss is wanted.
    Position ``t`` predicts token ``t + 1``, so logits drop their last position and labels
    their first. ``reduction="mean"`` averages over every labelled token in the batch;
    ``"sum"`` returns the total, useful to combine batches exactly.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"causal_lm_loss: logits {tuple(logits.shape)} do not match "
                         f"labels {tuple(labels.shape)} in (batch, seq)")
    shift_logits = logits[:, :-1, :].float()  # float32 for the softmax even under bf16
    shift_labels = labels[:, 1:]
    if count_answer_tokens(labels) == 0:
        raise ValueError("causal_lm_loss: no labelled token in this batch (all labels are -100)")
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                           shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)


def count_answer_tokens(labels: torch.Tensor) -> int:
    """How many tokens :func:`causal_lm_loss` scores in ``labels: (batch, seq)``.

    The labelled positions (not :data:`~loracore.data.IGNORE_INDEX`) after the one-token
    shift: position 0 is never predicted, so a label there counts for nothing.
    ``[[-100, -100, 7, 8]]`` -> 2; ``[[5, -100, -100]]`` -> 0.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"count_answer_tokens: labels must be a (batch, seq) tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _check_int(value: Any, name: str, where: str, minimum: int | None) -> None:
    """``value`` must be an ``int`` (>= ``minimum`` unless None): ``10.0``, ``2.5`` and
    ``True`` are refused (a float step count is usually a computed value that should have been
    rounded on purpose)."""
    if isinstance(value, bool) or not isinstance(value, int):
        fix = f"; round it on purpose, e.g. int({value!r})" if isinstance(value, float) else ""
        raise TypeError(f"{where}: {name} must be an int, got {value!r} "
                        f"({type(value).__name__}){fix}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")


def _check_real(value: Any, name: str, where: str, *, positive: bool) -> None:
    """``value`` must be a finite real number, > 0 if ``positive`` else >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"{where}: {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")


def _check_schedule(num_steps: Any, warmup_steps: Any, kind: Any) -> None:
    """What :func:`lr_schedule` needs (also checked by :func:`train` before it starts)."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr_schedule: kind must be 'cosine', 'linear' or 'constant', got {kind!r}")
    _check_int(num_steps, "num_steps", "lr_schedule", minimum=1)
    _check_int(warmup_steps, "warmup_steps", "lr_schedule", minimum=0)
    if not 0 <= warmup_steps <= num_steps:
        raise ValueError(f"lr_schedule: need 0 <= warmup_steps <= num_steps, got "
                         f"{warmup_steps} and {num_steps}")


def lr_schedule(optimizer: torch.optim.Optimizer, *, num_steps: int, warmup_steps: int = 0,
                kind: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then ``"cosine"`` or ``"linear"`` decay
    to 0 at ``num_steps``, or ``"constant"``. Multiplies each parameter group's own lr."""
    _check_schedule(num_steps, warmup_steps, kind)

    def factor(step: int) -> float:  # ``step`` optimizer steps have been taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)  # never exactly 0: the first step must move
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024): ``lora_B`` learns
    ``loraplus_lr_ratio`` times faster than ``lora_A``.

    Returns groups ``{"name", "params", "lr", "weight_decay"}`` for the trainable ``lora_A``
    weights (lr), ``lora_B`` weights and DoRA magnitudes (lr · ratio, as in PEFT's
    ``create_loraplus_optimizer``) and any other trainable parameters (lr);
    pass them straight to ``torch.optim.AdamW``.
    """
    if lr <= 0 or loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_param_groups: lr and loraplus_lr_ratio must be positive, "
                         f"got lr={lr}, loraplus_lr_ratio={loraplus_lr_ratio}")
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # DoRA's magnitude vector learns at B's rate, as PEFT's LoRA+ optimizer puts it
        key = ("lora_A" if ".lora_A." in name else
               "lora_B" if ".lora_B." in name or ".lora_magnitude_vector." in name else "other")
        groups[key].append(p)
    if not groups["lora_A"] and not groups["lora_B"]:
        raise ValueError("loraplus_param_groups: the model has no trainable LoRA parameters; "
                         "call inject() first")
    lrs = {"lora_A": lr, "lora_B": lr * loraplus_lr_ratio, "other": lr}
    return [{"name": k, "params": v, "lr": lrs[k], "weight_decay": weight_decay}
            for k, v in groups.items() if v]


@dataclass
class TrainResult:
    """What :func:`train` measured. ``losses[i]``/``lrs[i]``: loss and lr of optimizer step i."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    tokens: int = 0          # real (non-padding) tokens processed, prompt included
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def plot(self, ax: Any = None, label: str | None = None) -> Any:
        """Loss per optimizer step (and a moving average once there are enough steps)."""
        return plot_losses(self.losses, ax=ax, label=label)


def plot_losses(losses: list[float], ax: Any = None, label: str | None = None,
                window: int = 5) -> Any:
    """Draw a loss curve on ``ax`` (a new (7, 3.5) figure if None); returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    steps = range(1, len(losses) + 1)
    line, = ax.plot(steps, losses, alpha=0.35 if len(losses) >= 2 * window else 1.0,
                    label=None if len(losses) >= 2 * window else label)
    if len(losses) >= 2 * window:
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color=line.get_color(), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    if label is not None:
        ax.legend()
    return ax


def _forever(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches epoch after epoch. Re-iterating a DataLoader reshuffles it (its seeded
    generator moves on), unlike ``itertools.cycle``, which would replay the first epoch."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("train: the batches are empty (an empty dataset?)")


class StepResult(NamedTuple):
    """What one :func:`train_step` measured."""

    loss: float  #: mean loss per answer token of all the micro-batches (of all processes)
    lr: float    #: the learning rate of the first parameter group, used by this step


def train_step(model: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]],
               optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
               max_grad_norm: float | None = 1.0, where: str = "train_step") -> StepResult:
    """One optimizer step on ``micro_batches``, weighted by answer tokens (see the module docstring).

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
            ``.logits: (batch, seq, vocab)``, or its ``DistributedDataParallel`` wrapper.
        micro_batches: dicts with ``input_ids``, ``attention_mask`` and ``labels``, each
            ``(batch, seq)`` (the batch size may differ between them), on the model's device.
            Under DDP each process passes its own rows of every micro-batch.
        optimizer, scheduler: stepped once each (``scheduler`` may be None).
        max_grad_norm: clip the global norm of the trainable parameters' gradient to this
            (finite, > 0); None skips clipping.
        where: prefix of the error messages (e.g. ``"train: step 3"``).

    Each micro-batch's summed loss is divided by the answer tokens of all of them (of every
    process under DDP), so the step equals one batch of their union. A micro-batch without
    answer tokens contributes zero: it is skipped, except under DDP, where every process runs
    it with a zero loss, because each must join every gradient all-reduce. A step without
    any answer token raises ``ValueError``, and a malformed batch
    :class:`~loracore.data.DataError`, before anything changes.

    Returns ``StepResult(loss, lr)``. The gradients are zeroed (set to None) after the step;
    if a forward or backward fails, they are put back as they were and nothing has changed.
    """
    if isinstance(micro_batches, dict) or not isinstance(micro_batches, Sequence) \
            or not micro_batches:
        raise ValueError(f"{where}: micro_batches must be a non-empty list of batches, got "
                         f"{type(micro_batches).__name__}")
    for i, batch in enumerate(micro_batches):
        check_batch(batch, f"{where}, micro-batch {i}")
    if max_grad_norm is not None:
        # clip_grad_norm_ with a negative norm flips the gradient: the step would ascend.
        _check_real(max_grad_norm, "max_grad_norm", f"{where} (None skips clipping)",
                    positive=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{where}: the model has no trainable parameters (did you inject LoRA?)")
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    group = model.process_group if ddp else None  # the processes DDP averages over
    world = dist.get_world_size(group) if ddp else 1
    device = params[0].device
    counts = [count_answer_tokens(b["labels"]) for b in micro_batches]
    total = sum(counts)
    if ddp:  # the answer tokens of every process's rows
        total_t = torch.tensor(total, device=device)
        dist.all_reduce(total_t, group=group)
        total = int(total_t)
    if total == 0:
        raise ValueError(f"{where}: no labelled token in its {len(micro_batches)} "
                         f"micro-batch(es) (all labels are -100)")
    saved = {p: p.grad.clone() for p in params if p.grad is not None}  # usually none
    step_loss = 0.0
    try:
        for i, (batch, count) in enumerate(zip(micro_batches, counts)):
            if count == 0 and not ddp:
                continue  # adds nothing to the union's loss or gradient
            last = i == len(micro_batches) - 1
            # DDP adds up the gradients of all processes in the backward of the last micro-batch
            with (model.no_sync() if ddp and not last else nullcontext()):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                if count:
                    loss = causal_lm_loss(logits, batch["labels"], reduction="sum") / total
                else:  # zero, but through the graph, so DDP's gradient hooks still fire
                    loss = logits.sum() * 0.0
                # DDP averages the processes' gradients; times world_size makes that their sum
                (loss * world if world > 1 else loss).backward()
            if count:
                step_loss += loss.item()
    except BaseException:
        for p in params:
            p.grad = saved.get(p)
        raise
    if ddp:
        loss_t = torch.tensor(step_loss, dtype=torch.float64, device=device)
        dist.all_reduce(loss_t, group=group)
        step_loss = float(loss_t)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, lr)


def train(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, num_steps: int,
          lr: float = 1e-3, optimizer: torch.optim.Optimizer | None = None,
          weight_decay: float = 0.0, loraplus_lr_ratio: float | None = None,
          grad_accum_steps: int = 1, max_grad_norm: float | None = 1.0,
          warmup_steps: int = 0, schedule: str = "cosine", seed: int = 0,
          progress: bool = True, plot: bool = False) -> TrainResult:
    """Train ``model``'s trainable parameters for ``num_steps`` optimizer steps.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
            ``.logits: (batch, seq, vocab)``. Only parameters with ``requires_grad`` change.
        batches: an iterable of dicts with ``input_ids``, ``attention_mask``, ``labels``, each
            ``(batch, seq)`` (e.g. :func:`loracore.data.make_dataloader`); re-iterated as needed.
        num_steps: optimizer steps (an int; each uses ``grad_accum_steps`` batches).
        lr: peak learning rate, finite and > 0 (ignored when ``optimizer`` is given).
        optimizer: any ``torch.optim.Optimizer`` over the trainable parameters; default AdamW.
        weight_decay: AdamW's decoupled weight decay (default optimizer only).
        loraplus_lr_ratio: if set, LoRA+ (Hayou et al. 2024): ``lora_B`` gets ``lr * ratio``,
            ``lora_A`` gets ``lr`` (default optimizer only; needs LoRA layers).
        grad_accum_steps: micro-batches whose gradients add up before one step; each is
            weighted by its number of answer tokens, so the step equals one batch of all of
            them (and the logged loss is that batch's mean loss per answer token).
        max_grad_norm: clip the global gradient norm to this (> 0); None to skip clipping.
        warmup_steps, schedule: see :func:`lr_schedule`.
        seed: seeds PyTorch before training (dropout masks); the data order comes from the
            loader's own seed.
        progress: show a tqdm bar with the running loss.
        plot: draw the loss curve at the end.

    Returns a :class:`TrainResult`; the model is left in eval mode.
    """
    for name, value in (("num_steps", num_steps), ("grad_accum_steps", grad_accum_steps)):
        _check_int(value, name, "train", minimum=None)
    if num_steps < 1 or grad_accum_steps < 1:
        raise ValueError(f"train: num_steps and grad_accum_steps must be >= 1, got "
                         f"{num_steps} and {grad_accum_steps}")
    _check_real(lr, "lr", "train", positive=True)
    _check_real(weight_decay, "weight_decay", "train", positive=False)
    if loraplus_lr_ratio is not None:
        _check_real(loraplus_lr_ratio, "loraplus_lr_ratio", "train", positive=True)
    if max_grad_norm is not None:
        # clip_grad_norm_ with a negative norm flips the gradient: the step would ascend.
        _check_real(max_grad_norm, "max_grad_norm", "train (None skips clipping)", positive=True)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"train: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("train: the model has no trainable parameters (did you inject LoRA?)")
    _check_schedule(num_steps, warmup_steps, schedule)  # before the model or the RNG is touched
    torch.manual_seed(seed)
    if optimizer is None:
        if loraplus_lr_ratio is not None:
            groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                           weight_decay=weight_decay)
        else:
            groups = [{"params": trainable, "weight_decay": weight_decay}]
        optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = lr_schedule(optimizer, num_steps=num_steps, warmup_steps=warmup_steps, kind=schedule)
    device = next(model.parameters()).device

    result = TrainResult()
    data = _forever(batches)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(num_steps), desc="training", disable=not progress)
    try:
        for step in bar:
            # All micro-batches of the step first: the loss of each is divided by the answer
            # tokens of all of them, so the step equals one batch of their union.
            micro = []
            for i in range(grad_accum_steps):
                batch = next(data)
                check_batch(batch, f"train: step {step}, micro-batch {i}")
                micro.append({k: v.to(device) for k, v in batch.items()
                              if isinstance(v, torch.Tensor)})
            result.tokens += sum(int(b["attention_mask"].sum()) for b in micro)
            loss, lr = train_step(model, micro, optimizer, scheduler, max_grad_norm=max_grad_norm,
                                  where=f"train: step {step}")
            result.lrs.append(lr)
            result.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
    finally:
        model.eval()
        result.seconds = time.perf_counter() - start
    if plot:
        result.plot()
    return result
