"""The labs' self-checks reject wrong answers, each with what was expected, what came back and a hint.

For every exercise of labs 01-05 (``loracore/checks/labNN.py``) the correct answer (the solution
notebook's code, or loracore's own function) passes, and a typical learner mistake fails with the
friendly lines ``report`` prints: ``FAIL``, ``expected:``, ``got:``, ``hint:``, where the hint
names the fix for that mistake. Passing the right answer first proves a check does not fail
everything; failing the mistake proves it does not pass everything.

A second group of tests reads the check modules themselves: every ``Check`` they can build carries
a hint (the README promises one for every failure), and every ``check_*`` is an ``@exercise``
with points.
"""

from __future__ import annotations

import ast
import collections
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loracore import merge as M
from loracore.checks import lab01, lab02, lab03, lab04, lab05

from test_lab03_lab04_decisions import RESULTS, SWEEP, W, _heavy_tailed, _merged_scores  # noqa: E402
from loracore.data import IGNORE_INDEX
from loracore.evaluate import normalize_answer
from loracore.nf4 import dynamic_code
from loracore.selfcheck import ExerciseFailed
from loracore.serve.batched import apply_mixed_lora, batched_lora_delta, gather_factors

ROOT = Path(__file__).resolve().parents[1]
CHECK_MODULES = (lab01, lab02, lab03, lab04, lab05)


# --------------------------------------------------------------------------- reading report()'s lines

def _failures(out: str) -> list[dict[str, str]]:
    """The FAIL blocks ``report`` printed: name, expected, got and hint (missing keys: absent)."""
    blocks: list[dict[str, str]] = []
    for line in out.splitlines():
        m = re.match(r"^  FAIL  (.*)$", line)
        if m:
            blocks.append({"name": m.group(1)})
            continue
        m = re.match(r"^        (expected|got|hint):\s*(.*)$", line)
        if m and blocks:
            blocks[-1][m.group(1)] = m.group(2)
    return blocks


def _passes(check: Callable[..., None], args: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    check(*args)
    out = capsys.readouterr().out
    assert "FAIL" not in out and re.search(r"all \d+ checks passed", out), out


def _rejects(check: Callable[..., None], args: tuple, hint: str,
             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseFailed) as info:
        check(*args)
    out = capsys.readouterr().out
    assert re.search(r"\d+ of \d+ checks failed \(see above\)", str(info.value)), str(info.value)
    blocks = _failures(out)
    assert blocks, f"no FAIL line printed:\n{out}"
    for b in blocks:  # every failed check says what it wanted, what it got, and what to do
        assert b.get("expected") and "got" in b and b.get("hint"), f"incomplete FAIL block {b}:\n{out}"
    assert any(hint in b["hint"] for b in blocks), f"no hint mentions {hint!r}:\n{out}"


# --------------------------------------------------------------------------- lab 01 (solutions/lab01)

def lora_forward(x, W, b, A, B, scaling):
    return x @ W.T + b + scaling * (x @ A.T) @ B.T


class LoRALayer(nn.Module):
    def __init__(self, base: nn.Linear, r: int, lora_alpha: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = lora_alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


class MergeableLoRALayer(LoRALayer):
    def __init__(self, base: nn.Linear, r: int, lora_alpha: float) -> None:
        super().__init__(base, r, lora_alpha)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) if self.merged else super().forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("already merged")
        self.base.weight += self.scaling * self.lora_B @ self.lora_A
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.scaling * self.lora_B @ self.lora_A
            self.merged = False


def _wrap(model: nn.Module, keep: Callable[[str, nn.Module], bool], r: int, lora_alpha: float,
          freeze: bool = True, layer: type = MergeableLoRALayer) -> nn.Module:
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and keep(name, module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer(module, r, lora_alpha))
    return model


def inject_lora(model, target_names, r, lora_alpha):
    return _wrap(model, lambda n, m: n.split(".")[-1] in target_names, r, lora_alpha)


# Mistakes in the layer: each a small edit of the reference.
class SwappedInit(LoRALayer):  # A zeros and B random: the adapter is not a no-op at the start
    def __init__(self, base, r, lora_alpha):
        super().__init__(base, r, lora_alpha)
        with torch.no_grad():
            self.lora_B.copy_(torch.randn(self.lora_B.shape) * 0.1)
            self.lora_A.zero_()


class InvertedScaling(LoRALayer):
    def __init__(self, base, r, lora_alpha):
        super().__init__(base, r, lora_alpha)
        self.scaling = r / lora_alpha


class ForwardWithoutScaling(LoRALayer):
    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T


class TransposedFactors(LoRALayer):  # A as (in, r), B as (r, out): x @ A @ B "works" too
    def __init__(self, base, r, lora_alpha):
        super().__init__(base, r, lora_alpha)
        self.lora_A = nn.Parameter(torch.empty(base.in_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(r, base.out_features))

    def forward(self, x):
        return self.base(x) + self.scaling * x @ self.lora_A @ self.lora_B


class BaseNotFrozen(LoRALayer):
    def __init__(self, base, r, lora_alpha):
        super().__init__(base, r, lora_alpha)
        self.base.requires_grad_(True)


class RandomB(LoRALayer):  # B drawn like A: the "fresh" adapter already changes the model
    def __init__(self, base, r, lora_alpha):
        super().__init__(base, r, lora_alpha)
        with torch.no_grad():
            self.lora_B.copy_(torch.randn(self.lora_B.shape) * 0.1)


class GaussianA(LoRALayer):  # randn: values far outside nn.Linear's Kaiming-uniform bound
    def __init__(self, base, r, lora_alpha):
        super().__init__(base, r, lora_alpha)
        with torch.no_grad():
            self.lora_A.copy_(torch.randn(self.lora_A.shape))


class MergeWithoutScaling(MergeableLoRALayer):
    @torch.no_grad()
    def merge(self):
        if self.merged:
            raise RuntimeError("already merged")
        self.base.weight += self.lora_B @ self.lora_A
        self.merged = True


class MergeTwiceSilently(MergeableLoRALayer):
    @torch.no_grad()
    def merge(self):
        self.base.weight += self.scaling * self.lora_B @ self.lora_A
        self.merged = True


class AdapterAddedWhileMerged(MergeableLoRALayer):
    def forward(self, x):
        return LoRALayer.forward(self, x)


class UnmergeForgetsWeight(MergeableLoRALayer):
    @torch.no_grad()
    def unmerge(self):
        self.merged = False


class UnmergeRefusesWhenNotMerged(MergeableLoRALayer):  # a fine design too: the check accepts it
    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("not merged")
        super().unmerge()


class UnmergeAlwaysSubtracts(MergeableLoRALayer):  # no `if self.merged`: a stray unmerge corrupts W
    @torch.no_grad()
    def unmerge(self):
        self.base.weight -= self.scaling * self.lora_B @ self.lora_A
        self.merged = False


def _lab01_training(mistake: str = "") -> tuple[list[float], nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), lambda n, m: True, 2, 4.0)
    base_weights = {n.replace(".base.", "."): p.detach().clone() for n, p in model.named_parameters()
                    if "lora_" not in n}
    losses = [2.3, 1.9, 1.4]
    if mistake == "flat":        # optimizer.step() forgotten: the loss never moves
        losses = [2.3, 2.3, 2.3]
    elif mistake == "empty":     # nothing appended in the loop
        losses = []
    elif mistake == "base moved":  # every parameter given to the optimizer, base unfrozen
        with torch.no_grad():
            model[0].base.weight.add_(0.01)
    return losses, model, base_weights


# --------------------------------------------------------------------------- lab 02 (solutions/lab02)

def mask_and_pad(examples, pad_id, *, mask_prompt=True, pad_label=IGNORE_INDEX, mask_pad=True,
                 left=False, dtype=torch.long):
    longest = max(len(p) + len(a) for p, a in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=dtype)
    labels = torch.full((len(examples), longest), pad_label, dtype=dtype)
    attention_mask = torch.zeros((len(examples), longest), dtype=dtype) if mask_pad \
        else torch.ones((len(examples), longest), dtype=dtype)
    for i, (prompt, answer) in enumerate(examples):
        n = len(prompt) + len(answer)
        where = slice(longest - n, longest) if left else slice(0, n)
        input_ids[i, where] = torch.tensor(prompt + answer)
        labels[i, where] = torch.tensor(([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + answer)
        attention_mask[i, where] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def training_step(model, batch, optimizer, *, shift=True, clip=True, zero_grad=True, item=True):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    vocab = logits.size(-1)
    if shift:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    else:  # the labels are not shifted: each position is asked to predict itself
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad()
    return loss.item() if item else loss


def evaluate_loop(model, tokenizer, conversations, max_new_tokens=10, *, new_only=True,
                  normalise=True, expected_at=-1, question_at=-2):
    results = []
    for messages in conversations:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        start = ids.shape[1] if new_only else 0
        prediction = tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()
        expected = messages[expected_at]["content"]
        same = (normalize_answer(prediction) == normalize_answer(expected)) if normalise \
            else prediction == expected
        results.append({"question": messages[question_at]["content"], "expected": expected,
                        "prediction": prediction, "correct": same})
    return results


def _with(fn: Callable[..., Any], **mistake: Any) -> Callable[..., Any]:
    """``fn`` with one of its mistake switches on, under the reference's signature."""
    def learner(*args: Any) -> Any:
        return fn(*args, **mistake)
    learner.__name__ = fn.__name__
    return learner


# --------------------------------------------------------------------------- lab 03 (solutions/lab03)

def nf4_code_book(*, negate=True, normalise=True, dtype=torch.float32, offset=0.9677083):
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())
    negative = -negative if negate else negative
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return (values / values.max() if normalise else values).to(dtype)


def symmetric_code_book():  # 8 values each side plus zero: 17, one too many for 4 bits
    normal = torch.distributions.Normal(0.0, 1.0)
    side = normal.icdf(torch.linspace(0.9677083, 0.5, 9)[:-1])
    values = torch.cat([-side, torch.zeros(1), side]).sort().values
    return values / values.max()


def quantize_blocks(w, code, blocksize=64, *, scale=True, absolute=True, transposed=False):
    blocks = w.float().view(blocksize, -1).T if transposed else w.float().view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if absolute else blocks.amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None] if scale else blocks
    indices = torch.bucketize(scaled.reshape(-1), (code[:-1] + code[1:]) / 2)
    return indices, absmax


def pack_nibbles(indices, *, swapped=False, dtype=torch.uint8):
    q = indices.to(torch.uint8)
    packed = (q[1::2] << 4) | q[0::2] if swapped else (q[0::2] << 4) | q[1::2]
    return packed.to(dtype)


def unpack_nibbles(packed, n, *, swapped=False):
    pair = [packed & 0x0F, packed >> 4] if swapped else [packed >> 4, packed & 0x0F]
    return torch.stack(pair, dim=1).view(-1)[:n].long()


def dequantize_blocks(packed, absmax, code, blocksize, shape, *, scale=True, swapped=False):
    n = absmax.numel() * blocksize
    values = code[unpack_nibbles(packed, n, swapped=swapped)].view(-1, blocksize)
    return (values * absmax[:, None] if scale else values).view(shape)


def double_quantize(absmax, blocksize=256, *, centre=True, offset_of=torch.mean, one_block=False,
                    dtype=torch.uint8):
    offset = offset_of(absmax)
    centred = absmax - offset if centre else absmax
    blocksize = centred.numel() if one_block else blocksize
    pad = -centred.numel() % blocksize
    blocks = F.pad(centred, (0, pad)).view(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax2.clamp(min=1e-38))[:, None]).view(-1)[: centred.numel()]
    code8 = dynamic_code()
    q8 = torch.bucketize(scaled, (code8[:-1] + code8[1:]) / 2)
    return q8.to(dtype), absmax2, offset


def double_dequantize(q8, absmax2, offset, blocksize=256, *, add_offset=True):
    scale = absmax2.repeat_interleave(blocksize)[: q8.numel()]
    return dynamic_code()[q8.long()] * scale + (offset if add_offset else 0)


def _pipeline(mistake: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(5)) * 0.02
    idx, absmax = quantize_blocks(weight.reshape(-1), nf4_code_book(), 64)
    packed = pack_nibbles(idx, swapped=mistake == "swapped nibbles")
    q8 = double_quantize(absmax, centre=mistake != "offset not subtracted")[0]
    return packed, q8, weight


# --------------------------------------------------------------------------- lab 04 (loracore.merge)

def trim(t, density, *, smallest=False, signed=True, extra=0):
    k = int(density * t.numel()) + extra
    flat = t.flatten()
    order = flat.abs().argsort(descending=not smallest)[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order] if signed else flat[order].abs()
    return out.view_as(t)


def elect_by_votes(stacked):  # counts signs instead of summing values
    elected = torch.where(stacked.sign().sum(0) >= 0, 1.0, -1.0)
    return stacked.sign() == elected


def elect_ties_to_minus(stacked):
    elected = torch.where(stacked.sum(0) > 0, 1.0, -1.0)
    return stacked.sign() == elected


def elect_zero_agrees(stacked):  # >= 0 makes a 0 vote for +
    plus = stacked.sum(0) >= 0
    return (stacked >= 0) == plus


def drop_and_rescale(t, density, generator=None, *, rescale="density", mask="bernoulli"):
    if mask == "bernoulli":
        keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    else:  # keeps with probability 1 - density: density read as the drop rate
        keep = (torch.rand(t.shape, generator=generator) >= density).float()
    factor = {"density": 1 / density, "none": 1.0, "drop rate": 1 / (1 - density)}[rescale]
    return t * keep * factor


def ties_weighted_before_election(ts, w, d):
    stacked = torch.stack([M.prune(t, d, "magnitude") for t in ts]) * w.view(-1, *[1] * ts[0].dim())
    return M.disjoint_merge(stacked, M.calculate_majority_sign_mask(stacked))


def ties_untrimmed(ts, w, d):
    stacked = torch.stack(list(ts))
    mask = M.calculate_majority_sign_mask(stacked)
    return M.disjoint_merge(stacked * w.view(-1, *[1] * ts[0].dim()), mask)


# --------------------------------------------------------------------------- lab 05 (loracore.serve)

def gather_first_rows(A, B, s, slots):  # the first len(slots) slots instead of row i's slot
    return A[: len(slots)], B[: len(slots)], s


def gather_B_by_position(A, B, s, slots):
    return A[slots], B[torch.arange(len(slots)) % B.shape[0]], s[slots]


def batched_without_scaling(x, A, B, s):
    return batched_lora_delta(x, A, B, torch.ones_like(s))


def batched_first_adapter_for_all(x, A, B, s):
    return batched_lora_delta(x, A[:1].expand_as(A), B[:1].expand_as(B), s[:1].expand_as(s))


def mixed_in_place(out, x, A, B, s, slots):
    rows = (slots >= 0).nonzero().flatten()
    out[rows] += batched_lora_delta(x[rows], *gather_factors(A, B, s, slots[rows]))
    return out


def mixed_minus_one_is_last_slot(out, x, A, B, s, slots):  # -1 indexes the last adapter
    return out + batched_lora_delta(x, *gather_factors(A, B, s, slots))


def mixed_slot_zero_for_base_rows(out, x, A, B, s, slots):
    return out + batched_lora_delta(x, *gather_factors(A, B, s, slots.clamp(min=0)))


def mixed_wrong_adapter(out, x, A, B, s, slots):  # every adapted row takes the next slot's adapter
    shifted = torch.where(slots >= 0, (slots + 1) % A.shape[0], slots)
    return apply_mixed_lora(out, x, A, B, s, shifted)


def recent_counts(resident, history):  # lab 05's decision: the adapter asked for least lately
    recent = collections.Counter(history[-200:])
    return min(resident, key=lambda name: recent[name])


def all_time_counts(resident, history):  # tempting: counts that never forget a past phase
    counts = collections.Counter(history)
    return min(resident, key=lambda name: counts[name])


CURVES = {"concurrency": [1, 2, 4, 8], "one adapter": [10.0, 16.0, 24.0, 30.0]}


# --------------------------------------------------------------------------- the right answers pass

RIGHT = [
    pytest.param(lab01.check_lora_forward, lambda: (lora_forward,), id="lab01-lora_forward"),
    pytest.param(lab01.check_lora_layer, lambda: (LoRALayer,), id="lab01-lora_layer"),
    pytest.param(lab01.check_merge, lambda: (MergeableLoRALayer,), id="lab01-merge"),
    pytest.param(lab01.check_merge, lambda: (UnmergeRefusesWhenNotMerged,), id="lab01-merge-unmerge-refuses"),
    pytest.param(lab01.check_inject, lambda: (inject_lora, MergeableLoRALayer), id="lab01-inject"),
    pytest.param(lab01.check_loss_fell, _lab01_training, id="lab01-loss_fell"),
    pytest.param(lab02.check_mask_and_pad, lambda: (mask_and_pad,), id="lab02-mask_and_pad"),
    pytest.param(lab02.check_training_step, lambda: (training_step,), id="lab02-training_step"),
    pytest.param(lab02.check_evaluate_loop, lambda: (evaluate_loop,), id="lab02-evaluate_loop"),
    pytest.param(lab03.check_nf4_code_book, lambda: (nf4_code_book,), id="lab03-nf4_code_book"),
    pytest.param(lab03.check_quantize_blocks, lambda: (quantize_blocks,), id="lab03-quantize_blocks"),
    pytest.param(lab03.check_pack, lambda: (pack_nibbles, unpack_nibbles), id="lab03-pack"),
    pytest.param(lab03.check_dequantize, lambda: (dequantize_blocks,), id="lab03-dequantize"),
    pytest.param(lab03.check_double_quantize, lambda: (double_quantize, double_dequantize),
                 id="lab03-double_quantize"),
    pytest.param(lab03.check_full_pipeline, _pipeline, id="lab03-full_pipeline"),
    pytest.param(lab04.check_trim, lambda: (trim,), id="lab04-trim"),
    pytest.param(lab04.check_elect, lambda: (M.calculate_majority_sign_mask,), id="lab04-elect"),
    pytest.param(lab04.check_disjoint_mean, lambda: (M.disjoint_merge,), id="lab04-disjoint_mean"),
    pytest.param(lab04.check_drop_and_rescale, lambda: (drop_and_rescale,), id="lab04-drop_and_rescale"),
    pytest.param(lab04.check_ties, lambda: (M.ties,), id="lab04-ties"),
    # labs 03 and 04: the decisions and questions (cases of tests/test_lab03_lab04_decisions.py)
    pytest.param(lab03.check_nf4_choice, lambda: (128, True, _heavy_tailed()), id="lab03-nf4_choice"),
    pytest.param(lab03.check_constant_bits, lambda: (lambda w: (lab03.nf4_cost(w, 256, True)[0] - 4, 256, True, w))(
        _heavy_tailed()), id="lab03-constant_bits"),
    pytest.param(lab03.check_saved_gb, lambda: (7e9 * ((8 / 64 + 32 / (64 * 256)) - (8 / 256 + 32 / (256 * 256)))
                                                / 8 / 1e9, 256, True), id="lab03-saved_gb"),
    pytest.param(lab03.check_why_error_grows, lambda: (" B",), id="lab03-why_error_grows"),
    pytest.param(lab04.check_merge_choice, lambda: (("ties", 0.3), SWEEP, _merged_scores(SWEEP), W, 8),
                 id="lab04-merge_choice"),
    pytest.param(lab04.check_merge_cost, lambda: (2, ("ties", 0.3), SWEEP, RESULTS, 8), id="lab04-merge_cost"),
    pytest.param(lab04.check_which_task_lost, lambda: ("records", ("ties", 0.3), SWEEP, RESULTS),
                 id="lab04-which_task_lost"),
    pytest.param(lab04.check_why_rescale, lambda: ("c",), id="lab04-why_rescale"),
    pytest.param(lab05.check_gather_rows, lambda: (gather_factors,), id="lab05-gather_rows"),
    pytest.param(lab05.check_batched_lora, lambda: (batched_lora_delta,), id="lab05-batched_lora"),
    pytest.param(lab05.check_mixed_lora, lambda: (apply_mixed_lora,), id="lab05-mixed_lora"),
    pytest.param(lab05.check_eviction_policy, lambda: (recent_counts,), id="lab05-eviction_policy"),
    pytest.param(lab05.check_batching_gain, lambda: (2.8, CURVES), id="lab05-batching_gain"),
    pytest.param(lab05.check_swap_reason, lambda: (" b",), id="lab05-swap_reason"),
    pytest.param(lab05.check_lru_slots_needed, lambda: (6, recent_counts), id="lab05-lru_slots_needed"),
]


@pytest.mark.parametrize("check, args", RIGHT)
def test_the_right_answer_passes(check, args, capsys):
    _passes(check, args(), capsys)


def test_every_exercise_is_covered_by_a_right_answer_and_a_mistake():
    exercises = {f"{m.__name__}.{name}" for m in CHECK_MODULES for name, fn in vars(m).items()
                 if name.startswith("check_") and callable(fn)}
    right = {f"{p.values[0].__module__}.{p.values[0].__name__}" for p in RIGHT}
    wrong = {f"{p.values[0].__module__}.{p.values[0].__name__}" for p in MISTAKES}
    assert right == exercises and wrong == exercises, (exercises - right, exercises - wrong)


# --------------------------------------------------------------------------- typical mistakes fail

MISTAKES = [
    # lab 01
    pytest.param(lab01.check_lora_forward, lambda: (lambda x, W, b, A, B, s: x @ W.T + b + (x @ A.T) @ B.T,),
                 "multiply by scaling", id="lab01-forward-forgets-scaling"),
    pytest.param(lab01.check_lora_forward, lambda: (lambda x, W, b, A, B, s: x @ W.T + s * (x @ A.T) @ B.T,),
                 "bias b", id="lab01-forward-forgets-bias"),
    pytest.param(lab01.check_lora_forward, lambda: (lambda x, W, b, A, B, s: s * (x @ W.T + b + (x @ A.T) @ B.T),),
                 "multiply by scaling", id="lab01-forward-scales-the-base-too"),
    pytest.param(lab01.check_lora_layer, lambda: (SwappedInit,), "B = 0", id="lab01-layer-A-zero-B-random"),
    pytest.param(lab01.check_lora_layer, lambda: (InvertedScaling,), "lora_alpha / r", id="lab01-layer-r-over-alpha"),
    pytest.param(lab01.check_lora_layer, lambda: (ForwardWithoutScaling,), "self.scaling",
                 id="lab01-layer-forward-forgets-scaling"),
    pytest.param(lab01.check_lora_layer, lambda: (TransposedFactors,), "(r, in_features)",
                 id="lab01-layer-transposed-A-and-B"),
    pytest.param(lab01.check_lora_layer, lambda: (BaseNotFrozen,), "requires_grad_(False)",
                 id="lab01-layer-base-not-frozen"),
    pytest.param(lab01.check_lora_layer, lambda: (GaussianA,), "kaiming_uniform_", id="lab01-layer-randn-A"),
    pytest.param(lab01.check_merge, lambda: (MergeWithoutScaling,), "scaling * B @ A", id="lab01-merge-forgets-scaling"),
    pytest.param(lab01.check_merge, lambda: (MergeTwiceSilently,), "merged flag", id="lab01-merge-twice-allowed"),
    pytest.param(lab01.check_merge, lambda: (AdapterAddedWhileMerged,), "skip the adapter path",
                 id="lab01-merge-adapter-added-twice"),
    pytest.param(lab01.check_merge, lambda: (UnmergeForgetsWeight,), "W <- W - scaling * B @ A",
                 id="lab01-unmerge-leaves-W"),
    pytest.param(lab01.check_merge, lambda: (UnmergeAlwaysSubtracts,), "if self.merged",
                 id="lab01-unmerge-when-not-merged"),
    pytest.param(lab01.check_inject, lambda: (lambda m, t, r, a: _wrap(m, lambda n, mod: n.split(".")[-1] in t, r, a,
                                                                       freeze=False), MergeableLoRALayer),
                 "Freeze every parameter first", id="lab01-inject-forgets-freezing"),
    pytest.param(lab01.check_inject, lambda: (lambda m, t, r, a: _wrap(m, lambda n, mod: "lm_head" not in n, r, a),
                                              MergeableLoRALayer),
                 "name.split", id="lab01-inject-wraps-every-linear"),
    pytest.param(lab01.check_inject, lambda: (lambda m, t, r, a: _wrap(m, lambda n, mod: n.split(".")[-1] in t,
                                                                       r, a) and None, MergeableLoRALayer),
                 "return model", id="lab01-inject-returns-none"),
    pytest.param(lab01.check_inject, lambda: (lambda m, t, r, a: _wrap(m, lambda n, mod: n.split(".")[-1] in t, r, a,
                                                                       layer=RandomB), RandomB),
                 "lora_B = 0", id="lab01-inject-layer-not-a-no-op"),
    pytest.param(lab01.check_loss_fell, lambda: _lab01_training("flat"), "optimizer.step()", id="lab01-loss-flat"),
    pytest.param(lab01.check_loss_fell, lambda: _lab01_training("empty"), "losses.append", id="lab01-loss-not-recorded"),
    pytest.param(lab01.check_loss_fell, lambda: _lab01_training("base moved"), "Only the adapter parameters",
                 id="lab01-loss-base-moved"),
    # lab 02
    pytest.param(lab02.check_mask_and_pad, lambda: (_with(mask_and_pad, mask_prompt=False),),
                 "-100 on prompt tokens", id="lab02-mask-prompt-not-masked"),
    pytest.param(lab02.check_mask_and_pad, lambda: (_with(mask_and_pad, pad_label=0),),
                 "AND on padding", id="lab02-mask-padding-labelled-pad-id"),
    pytest.param(lab02.check_mask_and_pad, lambda: (_with(mask_and_pad, mask_pad=False),),
                 "0 on padding", id="lab02-mask-attention-on-padding"),
    pytest.param(lab02.check_mask_and_pad, lambda: (_with(mask_and_pad, left=True),),
                 "on the right", id="lab02-mask-left-padding"),
    pytest.param(lab02.check_mask_and_pad, lambda: (_with(mask_and_pad, dtype=torch.int32),),
                 "dtype=torch.long", id="lab02-mask-int32"),
    pytest.param(lab02.check_training_step, lambda: (_with(training_step, shift=False),),
                 "Shift by one", id="lab02-step-labels-not-shifted"),
    pytest.param(lab02.check_training_step, lambda: (_with(training_step, clip=False),),
                 "clip_grad_norm_", id="lab02-step-not-clipped"),
    pytest.param(lab02.check_training_step, lambda: (_with(training_step, zero_grad=False),),
                 "zero_grad()", id="lab02-step-gradients-left"),
    pytest.param(lab02.check_training_step, lambda: (_with(training_step, item=False),),
                 "loss.item()", id="lab02-step-returns-tensor"),
    pytest.param(lab02.check_evaluate_loop, lambda: (_with(evaluate_loop, new_only=False),),
                 "decode only the new tokens", id="lab02-eval-decodes-prompt"),
    pytest.param(lab02.check_evaluate_loop, lambda: (_with(evaluate_loop, normalise=False),),
                 "normalize_answer", id="lab02-eval-exact-comparison"),
    pytest.param(lab02.check_evaluate_loop, lambda: (_with(evaluate_loop, expected_at=0),),
                 "messages[-1]", id="lab02-eval-expected-is-the-question"),
    pytest.param(lab02.check_evaluate_loop, lambda: (_with(evaluate_loop, question_at=-1),),
                 "messages[-2]", id="lab02-eval-question-is-the-answer"),
    # lab 03
    pytest.param(lab03.check_nf4_code_book, lambda: (_with(nf4_code_book, negate=False),),
                 "negative side", id="lab03-code-negative-side-sign"),
    pytest.param(lab03.check_nf4_code_book, lambda: (_with(nf4_code_book, normalise=False),),
                 "divide by the largest", id="lab03-code-not-normalised"),
    pytest.param(lab03.check_nf4_code_book, lambda: (_with(nf4_code_book, dtype=torch.float64),),
                 "float32", id="lab03-code-float64"),
    pytest.param(lab03.check_nf4_code_book, lambda: (symmetric_code_book,),
                 "7 negative", id="lab03-code-17-values"),
    pytest.param(lab03.check_nf4_code_book, lambda: (_with(nf4_code_book, offset=0.99),),
                 "offset 0.9677083", id="lab03-code-wrong-offset"),
    pytest.param(lab03.check_quantize_blocks, lambda: (_with(quantize_blocks, scale=False),),
                 "Scale each block into [-1, 1]", id="lab03-quant-not-scaled"),
    pytest.param(lab03.check_quantize_blocks, lambda: (_with(quantize_blocks, absolute=False),),
                 ".abs().amax", id="lab03-quant-max-not-absmax"),
    pytest.param(lab03.check_quantize_blocks, lambda: (_with(quantize_blocks, transposed=True),),
                 "w.view(-1, blocksize)", id="lab03-quant-blocks-across-the-wrong-axis"),
    pytest.param(lab03.check_pack, lambda: (_with(pack_nibbles, swapped=True), unpack_nibbles),
                 "high nibble", id="lab03-pack-nibbles-swapped"),
    pytest.param(lab03.check_pack, lambda: (_with(pack_nibbles, dtype=torch.int64), unpack_nibbles),
                 "uint8", id="lab03-pack-int64"),
    pytest.param(lab03.check_pack, lambda: (pack_nibbles, _with(unpack_nibbles, swapped=True)),
                 "High nibble: packed >> 4", id="lab03-unpack-swapped"),
    pytest.param(lab03.check_dequantize, lambda: (_with(dequantize_blocks, scale=False),),
                 "multiply each block by its absmax", id="lab03-dequant-forgets-absmax"),
    pytest.param(lab03.check_dequantize, lambda: (_with(dequantize_blocks, swapped=True),),
                 "unpack", id="lab03-dequant-nibbles-swapped"),
    pytest.param(lab03.check_double_quantize, lambda: (_with(double_quantize, centre=False), double_dequantize),
                 "Subtract the offset first", id="lab03-dq-offset-not-subtracted"),
    pytest.param(lab03.check_double_quantize, lambda: (_with(double_quantize, offset_of=torch.median),
                                                       double_dequantize),
                 "absmax.mean()", id="lab03-dq-median-offset"),
    pytest.param(lab03.check_double_quantize, lambda: (_with(double_quantize, one_block=True), double_dequantize),
                 "per block of 256", id="lab03-dq-one-block"),
    pytest.param(lab03.check_double_quantize, lambda: (_with(double_quantize, dtype=torch.int64), double_dequantize),
                 "uint8", id="lab03-dq-int64-codes"),
    pytest.param(lab03.check_double_quantize, lambda: (double_quantize, _with(double_dequantize, add_offset=False)),
                 "+ offset", id="lab03-dq-dequant-forgets-offset"),
    pytest.param(lab03.check_full_pipeline, lambda: _pipeline("swapped nibbles"), "pack_nibbles",
                 id="lab03-pipeline-nibbles-swapped"),
    pytest.param(lab03.check_full_pipeline, lambda: _pipeline("offset not subtracted"), "double_quantize",
                 id="lab03-pipeline-absmax-codes-wrong"),
    # lab 04
    pytest.param(lab04.check_trim, lambda: (_with(trim, smallest=True),), "topk", id="lab04-trim-keeps-smallest"),
    pytest.param(lab04.check_trim, lambda: (_with(trim, signed=False),), "sign and all", id="lab04-trim-drops-sign"),
    pytest.param(lab04.check_trim, lambda: (_with(trim, extra=1),), "k = int(density * t.numel())",
                 id="lab04-trim-off-by-one"),
    pytest.param(lab04.check_elect, lambda: (elect_by_votes,), "SUM over tasks", id="lab04-elect-counts-votes"),
    pytest.param(lab04.check_elect, lambda: (elect_ties_to_minus,), "ties go to +", id="lab04-elect-tie-minus"),
    pytest.param(lab04.check_elect, lambda: (elect_zero_agrees,), "never >= 0", id="lab04-elect-zero-votes"),
    pytest.param(lab04.check_disjoint_mean, lambda: (lambda s, m: (s * m).sum(0) / m.sum(0),),
                 "clamped to at least 1", id="lab04-mean-divides-by-zero"),
    pytest.param(lab04.check_disjoint_mean, lambda: (lambda s, m: (s * m).sum(0) / s.shape[0],),
                 "must not dilute", id="lab04-mean-over-all-tasks"),
    pytest.param(lab04.check_drop_and_rescale, lambda: (_with(drop_and_rescale, rescale="none"),),
                 "divide by density", id="lab04-dare-no-rescale"),
    pytest.param(lab04.check_drop_and_rescale, lambda: (_with(drop_and_rescale, rescale="drop rate"),),
                 "divide by density", id="lab04-dare-rescales-by-drop-rate"),
    pytest.param(lab04.check_drop_and_rescale, lambda: (_with(drop_and_rescale, mask="drop rate"),),
                 "torch.bernoulli", id="lab04-dare-density-read-as-drop-rate"),
    pytest.param(lab04.check_ties, lambda: (ties_weighted_before_election,), "UNWEIGHTED",
                 id="lab04-ties-weights-before-election"),
    pytest.param(lab04.check_ties, lambda: (ties_untrimmed,), "Trim each task", id="lab04-ties-no-trim"),
    # lab 05
    # labs 03 and 04: the decisions and questions
    pytest.param(lab03.check_nf4_choice, lambda: (64, False, _heavy_tailed()), "bits", id="lab03-nf4-over-budget"),
    pytest.param(lab03.check_constant_bits, lambda: (lambda w: (lab03.nf4_cost(w, 256, True)[0], 256, True, w))(
        _heavy_tailed()), "subtract", id="lab03-constant-bits-with-the-codes"),
    pytest.param(lab03.check_saved_gb, lambda: (1.0, 256, True), "7e9 / 8 bytes", id="lab03-saved-gb-wrong"),
    pytest.param(lab03.check_why_error_grows, lambda: ("d",), "bits column falls", id="lab03-why-error-wrong"),
    pytest.param(lab04.check_merge_choice, lambda: (("ties", 0.7), SWEEP, _merged_scores(SWEEP), W, 8),
                 "within one question of the highest total", id="lab04-merge-choice-a-question-short"),
    pytest.param(lab04.check_merge_cost, lambda: (3, ("ties", 0.3), SWEEP, RESULTS, 8), "Alone:",
                 id="lab04-merge-cost-miscounted"),
    pytest.param(lab04.check_which_task_lost, lambda: ("capitals", ("ties", 0.3), SWEEP, RESULTS),
                 "Compare each task", id="lab04-which-task-wrong"),
    pytest.param(lab04.check_why_rescale, lambda: ("b",), "elects no sign", id="lab04-why-rescale-wrong"),
    pytest.param(lab05.check_gather_rows, lambda: (gather_first_rows,), "A_stack[slots]",
                 id="lab05-gather-first-slots"),
    pytest.param(lab05.check_gather_rows, lambda: (gather_B_by_position,), "B_stack[slots]",
                 id="lab05-gather-B-wrong-index"),
    pytest.param(lab05.check_gather_rows, lambda: (lambda A, B, s, slots: (A[slots], B[slots], s),),
                 "scales[slots]", id="lab05-gather-scales-not-gathered"),
    pytest.param(lab05.check_batched_lora, lambda: (batched_without_scaling,), "scale_rows.view(-1, 1, 1)",
                 id="lab05-batched-forgets-scaling"),
    pytest.param(lab05.check_batched_lora, lambda: (batched_first_adapter_for_all,), "own adapter",
                 id="lab05-batched-one-adapter-for-all"),
    pytest.param(lab05.check_mixed_lora, lambda: (mixed_in_place,), "base_out.clone()", id="lab05-mixed-in-place"),
    pytest.param(lab05.check_mixed_lora, lambda: (mixed_minus_one_is_last_slot,), "slots >= 0",
                 id="lab05-mixed-minus-one-indexes-last"),
    pytest.param(lab05.check_mixed_lora, lambda: (mixed_slot_zero_for_base_rows,), "slots >= 0",
                 id="lab05-mixed-base-rows-get-slot-0"),
    pytest.param(lab05.check_mixed_lora, lambda: (mixed_wrong_adapter,), "A_stack[slots[i]]",
                 id="lab05-mixed-wrong-adapter"),
    pytest.param(lab05.check_eviction_policy, lambda: (lab05.lru,), "simulate(lru, trace)",
                 id="lab05-eviction-the-servers-own-lru"),
    pytest.param(lab05.check_eviction_policy, lambda: (all_time_counts,), "for how long",
                 id="lab05-eviction-counts-that-never-forget"),
    pytest.param(lab05.check_eviction_policy, lambda: (lambda resident, history: "lora-99",),
                 "an element of the `resident` list", id="lab05-eviction-names-no-resident"),
    pytest.param(lab05.check_batching_gain, lambda: (1.5, CURVES), "divide the first by the second",
                 id="lab05-batching-gain-misread"),
    pytest.param(lab05.check_batching_gain, lambda: (1 / 3, CURVES), "divide the first by the second",
                 id="lab05-batching-gain-upside-down"),
    pytest.param(lab05.check_swap_reason, lambda: ("A",), "runs about as fast as one adapter",
                 id="lab05-swap-blames-the-product"),
    pytest.param(lab05.check_swap_reason, lambda: ("C",), "loaded once", id="lab05-swap-blames-the-base"),
    pytest.param(lab05.check_swap_reason, lambda: ("yes",), "one of the letters", id="lab05-swap-not-a-letter"),
    pytest.param(lab05.check_lru_slots_needed, lambda: (4, recent_counts), "simulate(lru, trace, slots=k)",
                 id="lab05-lru-slots-as-many-as-yours"),
]


@pytest.mark.parametrize("check, args, hint", MISTAKES)
def test_a_typical_mistake_fails_with_expected_got_and_a_hint(check, args, hint, capsys):
    _rejects(check, args(), hint, capsys)


def test_an_unsolved_stub_is_reported_as_not_written_yet_in_every_lab():
    def stub(*args):
        raise NotImplementedError("Exercise: replace this line with your code.")
    for check, n in ((lab01.check_lora_forward, 1), (lab02.check_mask_and_pad, 1), (lab03.check_pack, 2),
                     (lab04.check_trim, 1), (lab05.check_gather_rows, 1)):
        with pytest.raises(ExerciseFailed, match="is not written yet"):
            check(*[stub] * n)


# --------------------------------------------------------------------------- hints and points, read from the code

def _check_calls(path: Path) -> list[ast.Call]:
    """Every ``Check(...)``, ``Check.close/equal/true(...)`` built in a check module."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Name) and f.id == "Check") or (
                isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "Check"):
            calls.append(node)
    return calls


# How many positional arguments reach `hint` in each constructor (see loracore/selfcheck.py).
HINT_POSITION = {"Check": 4, "equal": 3, "true": 4, "close": None}


@pytest.mark.parametrize("module", CHECK_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_check_that_can_fail_carries_a_hint(module):
    path = Path(module.__file__)
    calls = _check_calls(path)
    assert calls, f"{path.name}: no Check built"
    missing = []
    for call in calls:
        kind = call.func.id if isinstance(call.func, ast.Name) else call.func.attr
        hint = next((k.value for k in call.keywords if k.arg == "hint"), None)
        pos = HINT_POSITION[kind]
        if hint is None and pos is not None and len(call.args) > pos:
            hint = call.args[pos]
        empty = hint is None or (isinstance(hint, ast.Constant) and not str(hint.value).strip())
        if empty:
            missing.append(f"{path.name}:{call.lineno}")
    assert not missing, f"Check without a hint (every failure must say what to do): {missing}"


def test_the_hint_reader_finds_a_missing_hint(tmp_path):
    """The test above can fail: a module with a hint-less check is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("Check.true('x', False, 'a', 'b')\nCheck.close('y', 1, 2, hint='ok')\nCheck('z', False, 'a', 'b', '')\n")
    calls = _check_calls(bad)
    hints = [next((k for k in c.keywords if k.arg == "hint"), None) for c in calls]
    assert len(calls) == 3 and hints[0] is None and hints[1] is not None and len(calls[2].args) == 5


LAB_POINTS = {"lab01": 10, "lab02": 10, "lab03": 15, "lab04": 15, "lab05": 10}


@pytest.mark.parametrize("module", CHECK_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_check_function_is_an_exercise_with_points(module):
    from loracore.grade.labs import exercises_of

    checks = {name.removeprefix("check_"): fn for name, fn in vars(module).items()
              if name.startswith("check_") and callable(fn)}
    found = {e.name: e.points for e in exercises_of(module.__name__)}
    assert set(found) == set(checks), (set(checks) - set(found))
    assert all(p > 0 for p in found.values()), found
    # Each lab's total (labs 03 and 04 gained a decision
    # and three questions: 15; labs 01, 02 and 05: 10).
    assert sum(found.values()) == LAB_POINTS[module.__name__.rsplit(".", 1)[-1]], found


# --------------------------------------------------------------------------- the stubs in labs/ carry hints

def test_every_exercise_stub_in_the_labs_says_what_to_write():
    """Each ``# YOUR CODE HERE`` that tools/nb.py make-labs writes has a hint after it (from the
    solution's ``### BEGIN SOLUTION <hint>`` line), as in lab 01."""
    import nbformat

    labs = sorted((ROOT / "labs").glob("lab*.ipynb"))
    assert labs
    bare = []
    for path in labs:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            for line in cell.source.split("\n") if cell.cell_type == "code" else []:
                m = re.match(r"\s*# YOUR CODE HERE(?::\s*(.*))?$", line)
                if m and len((m.group(1) or "").split()) < 3:  # a hint is a few words at least
                    bare.append(f"{path.name} cell {i}")
    assert not bare, f"stubs without a hint (add one after ### BEGIN SOLUTION in solutions/): {bare}"
