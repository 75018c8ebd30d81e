"""Checks for lab 01, "build the LoRA layer": forward, layer, merge/unmerge, injection, training.

Every check uses a non-zero B: with B = 0 the adapter adds nothing, and any code would pass.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from loracore.surgery import inject, trainable_parameters
from loracore.selfcheck import Check, ExerciseFailed, Hints, call_learner, exercise, report


def _inputs(seed: int = 0, d_in: int = 12, d_out: int = 10, r: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, d_in, generator=g)
    W, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    return x, W, b, A, B


def _nonzero_B(layer: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


@exercise(points=2)
def check_lora_forward(lora_forward: Callable[..., torch.Tensor]) -> None:
    """Exercise 1: ``lora_forward(x, W, b, A, B, scaling)``."""
    x, W, b, A, B = _inputs()
    want = x @ W.T + b + 2.5 * (x @ A.T) @ B.T
    got = call_learner(lora_forward, x, W, b, A, B, 2.5)
    zero = call_learner(lora_forward, x, W, b, A, torch.zeros_like(B), 2.5)
    report("lora_forward", [
        Check.close("output = x @ W.T + b + scaling * (x @ A.T) @ B.T", got, want,
                    hint="Apply A first (x @ A.T has r columns), then B, then multiply by scaling "
                         "(the adapter term only); keep the base's bias b."),
        Check.close("B = 0 gives exactly the base output", zero, x @ W.T + b, atol=0, rtol=0,
                    hint="With B = 0 the adapter term must vanish, leaving x @ W.T + b: scale only "
                         "the adapter term, and keep the bias b."),
    ])


_SHAPES = ("lora_A is (r, in_features) and lora_B is (out_features, r), so that B @ A has the "
           "shape of base.weight, (out_features, in_features).")


@exercise(points=3)
def check_lora_layer(LoRALayer: type) -> None:
    """Exercise 2: ``LoRALayer(base: nn.Linear, r, lora_alpha)`` with ``lora_A``, ``lora_B``, ``scaling``."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = call_learner(LoRALayer, base, 4, 8.0)
    checks = [
        Check.true("keeps the base layer as .base", getattr(layer, "base", None) is base,
                   "layer.base is the nn.Linear you passed in", repr(getattr(layer, "base", None))[:80],
                   hint="Store the layer you were given: self.base = base (not a copy)."),
        Check.equal("lora_A has shape (r, in_features)", tuple(getattr(layer, "lora_A", torch.empty(0)).shape), (4, 12),
                    hint=_SHAPES),
        Check.equal("lora_B has shape (out_features, r)", tuple(getattr(layer, "lora_B", torch.empty(0)).shape), (10, 4),
                    hint=_SHAPES),
    ]
    if not all(c.passed for c in checks):
        report("LoRALayer", checks)
    A, B = layer.lora_A, layer.lora_B
    bound = 1 / math.sqrt(12)
    x = torch.randn(3, 12)
    checks += [
        Check.true("lora_A and lora_B are trainable nn.Parameters",
                   isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter) and A.requires_grad and B.requires_grad,
                   "two nn.Parameter with requires_grad=True", f"{type(A).__name__}, {type(B).__name__}",
                   hint="Wrap both in nn.Parameter(...), so the optimizer sees them and they train."),
        Check.true("the base layer is frozen", not any(p.requires_grad for p in base.parameters()),
                   "requires_grad=False on base.weight and base.bias",
                   str([p.requires_grad for p in base.parameters()]),
                   hint="Call self.base.requires_grad_(False)."),
        Check.true("lora_B starts at zero", bool(torch.count_nonzero(B) == 0), "all zeros",
                   f"{int(torch.count_nonzero(B))} non-zero entries",
                   hint="B = 0 makes B @ A = 0, so training starts exactly at the base model."),
        Check.true("lora_A is Kaiming-uniform (like nn.Linear's default)",
                   bool(A.abs().max() <= bound + 1e-6 and A.std() > bound / 4),
                   f"values in [-{bound:.3f}, {bound:.3f}], not all tiny",
                   f"max |A| = {A.abs().max().item():.3f}, std {A.std().item():.3f}",
                   hint="nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))."),
        Check.true("scaling = lora_alpha / r", math.isclose(float(getattr(layer, "scaling", float("nan"))), 2.0),
                   "2.0 for r=4, lora_alpha=8", repr(getattr(layer, "scaling", None)),
                   hint="self.scaling = lora_alpha / r (alpha over r, not r over alpha)."),
        Check.close("B = 0: forward equals the base layer", call_learner(layer, x), base(x), atol=0, rtol=0,
                    hint="With lora_B = 0 the adapter adds nothing: initialise lora_B to zeros and "
                         "return self.base(x) plus the adapter path."),
    ]
    _nonzero_B(layer)
    want = base(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    checks.append(Check.close("non-zero B: base(x) + scaling * (x @ A.T) @ B.T", call_learner(layer, x), want,
                              hint="Add the adapter path, multiplied by self.scaling, to self.base(x)."))
    report("LoRALayer", checks)


@exercise(points=2)
def check_merge(MergeableLoRALayer: type) -> None:
    """Exercise 3: ``merge()`` and ``unmerge()`` with a ``merged`` flag; a second merge raises."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    w0 = base.weight.detach().clone()
    layer = call_learner(MergeableLoRALayer, base, 4, 8.0)
    _nonzero_B(layer)
    x = torch.randn(3, 12)
    with torch.no_grad():
        before = layer(x)
        call_learner(layer.merge)
        merged_w = base.weight.detach().clone()
        after = layer(x)
    delta = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    twice: Any = "no error"
    try:
        layer.merge()
    except (RuntimeError, ValueError) as exc:
        twice = exc
    except NotImplementedError:
        twice = "NotImplementedError"
    with torch.no_grad():
        call_learner(layer.unmerge)
        restored = base.weight.detach().clone()
        unmerged_out = layer(x)
        try:  # a stray unmerge of an unmerged layer must change nothing (refusing it is fine too)
            call_learner(layer.unmerge)
        except (RuntimeError, ValueError):
            pass
        after_second_unmerge = base.weight.detach().clone()
    report("merge / unmerge", [
        Check.close("merge adds scaling * B @ A to base.weight", merged_w, w0 + delta,
                    hint="W <- W + scaling * B @ A, in place (under torch.no_grad())."),
        Check.true("merged: forward gives the same output (adapter not added twice)",
                   bool(torch.allclose(after, before, atol=1e-5)), "the same output as before merging",
                   f"max difference {(after - before).abs().max().item():.3g}",
                   hint="While merged, forward must skip the adapter path: it is already inside W."),
        Check.true("a second merge raises", isinstance(twice, (RuntimeError, ValueError)),
                   "RuntimeError (or ValueError)", repr(twice),
                   hint="Keep a self.merged flag and refuse to merge again."),
        Check.close("unmerge restores base.weight (within 1e-6)", restored, w0, atol=1e-6, rtol=0,
                    hint="W <- W - scaling * B @ A (the same update merge added), in place."),
        Check.close("unmerged: forward is back to base + adapter", unmerged_out, before, atol=1e-5,
                    hint="Set self.merged = False in unmerge, so forward adds the adapter path again."),
        Check.close("unmerge of a layer that is not merged leaves base.weight alone", after_second_unmerge,
                    restored, atol=0, rtol=0,
                    hint="Subtract only when merged: `if self.merged:` around the update in unmerge "
                         "(or raise a RuntimeError when it is not)."),
    ])


@exercise(points=2)
def check_inject(inject_lora: Callable[..., nn.Module], LayerClass: type) -> None:
    """Exercise 4: ``inject_lora(model, target_names, r, lora_alpha)`` on the tiny Qwen2."""
    from loracore.models import load_base_model

    model, _ = load_base_model("tiny-qwen2", verbose=False)
    reference, _ = load_base_model("tiny-qwen2", verbose=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(ids).logits
    out = call_learner(inject_lora, model, ["q_proj", "v_proj"], 4, 8.0)
    inject(reference, ["q_proj", "v_proj"], r=4, lora_alpha=8.0)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LayerClass))
    want = sorted(n for n, m in reference.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_A"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        logits = model(ids).logits
    report("inject_lora", [
        Check.true("returns the model", out is model, "the same model object", type(out).__name__,
                   hint="End with `return model` (the same object, changed in place)."),
        Check.equal("wraps exactly the q_proj and v_proj layers", wrapped, want,
                    hint="Compare the last part of each module's name (name.split('.')[-1]) with "
                         "target_names, and wrap only those nn.Linear layers."),
        Check.equal("trainable parameters: as many as loracore.inject gives",
                    trainable_parameters(model)[0], trainable_parameters(reference)[0],
                    hint="Freeze everything, then wrap only the target layers with r and lora_alpha "
                         "as given: only their lora_A and lora_B train."),
        Check.true("only lora_A / lora_B are trainable", bool(trainable) and all("lora_" in n for n in trainable),
                   "only names containing lora_A / lora_B", str(trainable[:3]),
                   hint="Freeze every parameter first (requires_grad_(False)), then wrap."),
        Check.close("at initialisation the logits are unchanged", logits, base_logits, atol=0, rtol=0,
                    hint="A fresh adapter is a no-op: lora_B = 0 in your layer, and no base weight changed."),
    ])


@exercise(points=1)
def check_loss_fell(losses: list[float], model: nn.Module, base_weights: dict[str, torch.Tensor]) -> None:
    """Exercise 5: the training loop lowered the loss and left every base weight untouched."""
    def original_name(name: str) -> str:  # a wrapped layer keeps its base weight under .base / .base_layer
        return name.replace(".base_layer.", ".").replace(".base.", ".")

    changed = [n for n, p in model.named_parameters()
               if original_name(n) in base_weights and not torch.equal(p, base_weights[original_name(n)])]
    checks = [
        Check.true("losses were recorded", len(losses) >= 2 and all(math.isfinite(v) for v in losses),
                   "a list of finite floats, one per step", repr(losses)[:120],
                   hint="Call losses.append(loss.item()) once per step (a float, not the tensor)."),
    ]
    if checks[0].passed:
        checks.append(Check.true("the loss fell", losses[-1] < losses[0], f"last < first ({losses[0]:.3f})",
                                 f"last = {losses[-1]:.3f}",
                                 hint="Call loss.backward(), optimizer.step() and optimizer.zero_grad() every step."))
    checks.append(Check.true("base weights did not move", not changed, "no change outside lora_A / lora_B",
                             f"{len(changed)} base tensors changed, e.g. {changed[:2]}",
                             hint="Only the adapter parameters may go to the optimizer."))
    report("training", checks)


__all__ = ["check_lora_forward", "check_lora_layer", "check_merge", "check_inject", "check_loss_fell",
           "ExerciseFailed", "hint"]


#: Hints on demand (``checks.hint("merge")`` in the lab): a nudge first, nearly the code last.
hint = Hints("lab01", {
    "lora_forward": (
        "Two parts added together: what the frozen layer computes (x W^T + b), and the adapter's "
        "path, multiplied by scaling.",
        "The adapter path goes through the narrow side: x @ A.T is (..., r), and multiplying that by "
        "B.T brings it to (..., out). Only that path is scaled.",
        "return x @ W.T + b + scaling * (x @ A.T) @ B.T",
    ),
    "LoRALayer": (
        "__init__ only stores things: the base layer, two nn.Parameter factors and a number. "
        "forward reuses the formula of exercise 1, with the base layer doing the x W^T + b part.",
        "Freeze with self.base.requires_grad_(False). Make lora_A with torch.empty(r, base.in_features) "
        "and fill it with nn.init.kaiming_uniform_(..., a=math.sqrt(5)); make lora_B with torch.zeros. "
        "Pass device=base.weight.device to both.",
        "self.base = base, then freeze it with requires_grad_(False)\n"
        "self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))\n"
        "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))\n"
        "self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))\n"
        "self.scaling = lora_alpha / r\n"
        "forward: return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T",
    ),
    "merge": (
        "Look at self.merged first: if it is already True, stop with an error. Otherwise change the "
        "weight, then remember that you did.",
        "The update has the weight's shape: self.lora_B @ self.lora_A is (out, in). Add it, times "
        "self.scaling, to self.base.weight in place (+=), which torch.no_grad() allows.",
        "if self.merged:\n"
        '    raise RuntimeError("already merged")\n'
        "self.base.weight += self.scaling * self.lora_B @ self.lora_A\n"
        "self.merged = True",
    ),
    "unmerge": (
        "The mirror image of merge, but only when there is something to take out.",
        "Subtract exactly what merge added, in place, and only inside `if self.merged:`.",
        "if self.merged:\n"
        "    self.base.weight -= self.scaling * self.lora_B @ self.lora_A\n"
        "    self.merged = False",
    ),
    "inject_lora": (
        "Two loops: one over model.parameters() to freeze, one over model.named_modules() to find "
        "the layers to wrap. Take list(model.named_modules()) first: you change the model while looping.",
        "A name like 'model.layers.0.self_attn.q_proj' splits with name.rpartition('.') into the "
        "parent's name and 'q_proj'; model.get_submodule(parent_name) is the parent, and "
        "setattr(parent, child_name, new_layer) swaps the child.",
        "(first freeze every parameter, then:)\n"
        "for name, module in list(model.named_modules()):\n"
        '    if isinstance(module, nn.Linear) and name.split(".")[-1] in target_names:\n'
        '        parent_name, _, child_name = name.rpartition(".")\n'
        "        parent = model.get_submodule(parent_name) if parent_name else model\n"
        "        setattr(parent, child_name, MergeableLoRALayer(module, r, lora_alpha))\n"
        "return model",
    ),
    "train_step": (
        "Four things happen in one step: compute the loss, compute the gradients, update the "
        "weights, forget the gradients. Then hand back a number.",
        "model(**batch, labels=labels) returns an output whose .loss is a 0-dimensional tensor. "
        "The tensor has .backward(); the optimizer has .step() and .zero_grad().",
        "loss = model(**batch, labels=labels).loss\n"
        "loss.backward(), then optimizer.step(), then optimizer.zero_grad()\n"
        "return loss.item()",
    ),
})
