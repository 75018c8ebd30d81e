"""Self-checks for lab 02 (fine-tune with LoRA, then remove the adapter).

Each check runs the learner's function on small inputs (the tiny random Qwen2, in well under a
second) and compares it with loracore's own implementation.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from loracore.data import IGNORE_INDEX, collate
from loracore.evaluate import answers_match, generate_answers
from loracore.surgery import inject
from loracore.models import load_base_model
from loracore.selfcheck import Check, Hints, call_learner, exercise, report
from loracore.train import causal_lm_loss


@exercise(points=3)
def check_mask_and_pad(mask_and_pad: Callable[..., dict[str, torch.Tensor]]) -> None:
    """``mask_and_pad(examples, pad_id)`` with ``examples = [(prompt_ids, answer_ids), ...]``."""
    examples = [([7, 8, 9], [10, 11]), ([5], [6, 2]), ([1, 2, 3, 4], [9])]
    got = call_learner(mask_and_pad, examples, 0)
    want = collate([{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a} for p, a in examples],
                   pad_id=0)
    checks = [Check.true("returns a dict with input_ids, attention_mask and labels",
                         isinstance(got, dict) and {"input_ids", "attention_mask", "labels"} <= set(got),
                         "keys input_ids, attention_mask, labels",
                         repr(sorted(got)) if isinstance(got, dict) else type(got).__name__,
                         hint="return {'input_ids': ..., 'attention_mask': ..., 'labels': ...}")]
    if checks[0].passed:
        hints = {
            "input_ids": "Prompt then answer, padded on the right with pad_id up to the longest example.",
            "attention_mask": "1 on every real token (prompt and answer), 0 on padding.",
            "labels": "-100 on prompt tokens AND on padding; the answer token ids where the answer is.",
        }
        for key, hint in hints.items():
            checks.append(Check.close(f"{key} (shape and values)", got[key], want[key], atol=0, hint=hint))
            if isinstance(got[key], torch.Tensor):
                checks.append(Check.equal(f"{key} has dtype torch.long", got[key].dtype, torch.long,
                                          hint="Build the tensors with dtype=torch.long."))
    report("mask_and_pad", checks)


def _tiny_lora(seed: int = 0) -> torch.nn.Module:
    model, _ = load_base_model("tiny-qwen2")  # the same seeded random weights every time
    torch.manual_seed(seed)
    # lora_alpha=32 (scaling 8): the gradient norm is about 1.6, above the clipping threshold of
    # 1.0, so a step that forgets to clip moves the weights differently (at scaling 2 it is 0.6,
    # and clipping would change nothing to check).
    inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=32)
    with torch.no_grad():  # a non-zero B, so every LoRA matrix gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@exercise(points=3)
def check_training_step(training_step: Callable[..., float]) -> None:
    """``training_step(model, batch, optimizer) -> float`` (one step, gradient clipped to 1.0)."""
    model = _tiny_lora()
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX          # a prompt
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 9:] = 0             # and some padding in the second row
    labels[1, 9:] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}

    def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)

    opt = sgd(model)
    got_loss = call_learner(training_step, model, {k: v.clone() for k, v in batch.items()}, opt)

    ref_opt = sgd(reference)
    logits = reference(input_ids=ids, attention_mask=attention_mask).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
    ref_opt.step()
    ref_opt.zero_grad()

    got_params = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])
    want_params = torch.cat([p.detach().flatten() for n, p in reference.named_parameters() if "lora_" in n])
    grads_left = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    report("training_step", [
        Check.true("returns the loss as a Python float", isinstance(got_loss, float),
                   "a float (use loss.item())", type(got_loss).__name__,
                   hint="Return loss.item(), not the tensor: keeping tensors keeps their graphs alive."),
        Check.true("the loss is the next-token loss on answer tokens only",
                   isinstance(got_loss, float) and abs(got_loss - loss.item()) < 1e-4,
                   f"{loss.item():.5f}", f"{got_loss}",
                   hint="Shift by one (logits[:, :-1] predict labels[:, 1:]) and use "
                        "F.cross_entropy(..., ignore_index=-100)."),
        Check.close("LoRA weights after the step match one clipped optimizer step", got_params,
                    want_params, atol=1e-6,
                    hint="backward(), then clip_grad_norm_(trainable, 1.0), then optimizer.step()."),
        Check.true("gradients are zeroed after the step", not grads_left, "no leftover gradients",
                   f"{len(grads_left)} parameters still hold gradients",
                   hint="Call optimizer.zero_grad() at the end, or the next step adds to old gradients."),
    ])


@exercise(points=4)
def check_evaluate_loop(evaluate_loop: Callable[..., list[dict[str, Any]]]) -> None:
    """``evaluate_loop(model, tokenizer, conversations, max_new_tokens) -> list of dicts``."""
    model, tokenizer = load_base_model("tiny-qwen2")
    model.generation_config.eos_token_id = None  # replies always run to max_new_tokens
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger random weights: replies that depend on the question
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    questions = ["Capital of Kimland?", "Capital of Reileth?", "Name a city.", "Hello?"]
    probe = [[{"role": "user", "content": q}] for q in questions]
    replies = generate_answers(model, tokenizer, probe, max_new_tokens=4)
    # Two expected answers are the model's own replies (changed in case, so only a normalised
    # comparison accepts them); two are not.
    expected = [replies[0].upper() + ".", "no such reply", replies[2] + " !", "nope"]
    convs = [p + [{"role": "assistant", "content": e}] for p, e in zip(probe, expected)]
    got = call_learner(evaluate_loop, model, tokenizer, convs, 4)
    want_correct = [answers_match(r, e) for r, e in zip(replies, expected)]
    ok_shape = isinstance(got, list) and len(got) == 4 and all(isinstance(g, dict) for g in got)
    checks = [Check.true("returns one dict per conversation", ok_shape, "a list of 4 dicts",
                         f"{type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}",
                         hint="Append {'question', 'expected', 'prediction', 'correct'} per example.")]
    if ok_shape:
        checks += [
            Check.equal("predictions are the greedy replies", [g.get("prediction") for g in got], replies,
                        hint="Render the prompt with the chat template (add_generation_prompt=True), "
                             "generate with do_sample=False, decode only the new tokens with "
                             "skip_special_tokens=True, and strip()."),
            Check.equal("'correct' uses the normalised comparison", [g.get("correct") for g in got],
                        want_correct, hint="Compare normalize_answer(prediction) with "
                                           "normalize_answer(expected)."),
            Check.equal("'expected' is the last message", [g.get("expected") for g in got], expected,
                        hint="expected = messages[-1]['content'] (the assistant's reference answer)."),
            Check.equal("'question' is the user's message", [g.get("question") for g in got], questions,
                        hint="question = messages[-2]['content'] (the user's turn before the answer)."),
        ]
    report("evaluate_loop", checks)


#: Hints on demand (``loracore.hint("lab02", "training_step")`` in the lab): a nudge first,
#: nearly the code last.
hint = Hints("lab02", {
    "mask_and_pad": (
        "First find the longest prompt + answer; then make three (batch, longest) tensors already "
        "filled with what padding needs (pad_id, -100, 0), and fill in each example's row.",
        "torch.full((batch, longest), value, dtype=torch.long) makes a filled tensor. For row i with "
        "n = len(prompt) + len(answer): input_ids gets prompt + answer in its first n places, the mask "
        "gets 1 there, and labels get the answer only, after the prompt's place.",
        "longest = max(len(p) + len(a) for p, a in examples)\n"
        "input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)\n"
        "labels and attention_mask the same way, filled with IGNORE_INDEX and 0\n"
        "for i, (prompt, answer) in enumerate(examples):\n"
        "    n = len(prompt) + len(answer)\n"
        "    input_ids[i, :n] = torch.tensor(prompt + answer)\n"
        "    labels[i, len(prompt):n] = torch.tensor(answer)\n"
        "    attention_mask[i, :n] = 1",
    ),
    "training_step": (
        "Forward, loss, backward, clip, step, clear: the loss is the only part that needs thought. "
        "The last position's logits and the first position's label have no partner.",
        "Drop the last position of the logits and the first of the labels so that they line up, "
        "flatten both to (batch * (seq - 1), ...) and give them to F.cross_entropy with "
        "ignore_index=IGNORE_INDEX. Clip [p for p in model.parameters() if p.requires_grad].",
        'logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits\n'
        'loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), batch["labels"][:, 1:].reshape(-1),\n'
        "                       ignore_index=IGNORE_INDEX)\n"
        "loss.backward()\n"
        "torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)\n"
        "optimizer.step(), optimizer.zero_grad(), return loss.item()",
    ),
    "evaluate_loop": (
        "One conversation at a time: build the prompt text, turn it into ids on the model's device, "
        "generate, cut off the prompt, decode, compare.",
        "tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) "
        "gives the prompt text; tokenizer(text, add_special_tokens=False)['input_ids'] its ids. "
        "model.generate returns the prompt followed by the reply: keep out[0, len(prompt_ids):].",
        "prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)\n"
        'ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)\n'
        "with torch.no_grad():\n"
        "    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,\n"
        "                         do_sample=False, pad_token_id=tokenizer.pad_token_id)\n"
        "prediction = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()\n"
        "correct = normalize_answer(prediction) == normalize_answer(expected)",
    ),
})
