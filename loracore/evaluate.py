"""Honest measurement: generation-based accuracy on held-out questions, and perplexity.

Accuracy asks the model each held-out question (greedy decoding, so the answer is the
model's single most likely reply and a rerun gives the same one), compares the reply with the
expected answer, and keeps every example so a notebook can show right and wrong side by side.

Comparisons (``match``):

* ``"exact"``: the reply, stripped of surrounding whitespace, equals the answer.
* ``"normalized"``: equal after lower-casing, dropping punctuation and extra spaces.
* ``"contains"``: the normalised answer appears as whole words in the normalised reply
  (for chatty models: "The capital of France is Paris." contains "paris").
* any function ``(prediction, answer) -> bool``, e.g. :func:`json_record_match`.
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from loracore.data import check_batch, check_count, collate, pad_token_id, prompt_text
from loracore.train import causal_lm_loss, count_answer_tokens

Matcher = Callable[[str, str], bool]
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, replace punctuation by spaces, collapse whitespace: ``" Paris. "`` -> ``"paris"``."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def answers_match(prediction: str, answer: str, mode: str = "normalized") -> bool:
    """Compare a model's reply with the expected answer (see the module docstring)."""
    if mode == "exact":
        return prediction.strip() == answer.strip()
    if mode == "normalized":
        return normalize_answer(prediction) == normalize_answer(answer)
    if mode == "contains":
        want = normalize_answer(answer)
        return bool(want) and f" {want} " in f" {normalize_answer(prediction)} "
    raise ValueError(f"answers_match: mode must be 'exact', 'normalized' or 'contains', got {mode!r}")


def json_record_match(prediction: str, answer: str) -> bool:
    """True when the reply parses as JSON and equals the expected JSON object (every key and
    value, types included: ``"age": 34`` is not ``"age": "34"``); key order does not matter."""
    try:
        return json.loads(prediction.strip()) == json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return False


@dataclass
class EvalResult:
    """Accuracy plus every example: ``{"question", "expected", "prediction", "correct"}``."""

    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(ex["correct"] for ex in self.examples)

    @property
    def total(self) -> int:
        return len(self.examples)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __repr__(self) -> str:
        return f"EvalResult(accuracy={self.accuracy:.1%}, correct={self.correct}/{self.total})"

    def show(self, n: int = 6, width: int = 38) -> None:
        """Print up to ``n`` right and ``n`` wrong examples in columns: question, expected, reply."""
        def cut(s: str) -> str:
            s = " ".join(s.split())
            return s if len(s) <= width else s[: width - 1] + "…"

        print(f"accuracy {self.accuracy:.1%} ({self.correct}/{self.total})")
        for title, ok in (("right", True), ("wrong", False)):
            rows = [ex for ex in self.examples if ex["correct"] == ok][:n]
            if not rows:
                continue
            print(f"\n{title}:")
            print(f"  {'question':<{width}}  {'expected':<{width // 2}}  reply")
            for ex in rows:
                print(f"  {cut(ex['question']):<{width}}  {cut(ex['expected'])[: width // 2]:<{width // 2}}"
                      f"  {cut(ex['prediction'])}")


def _as_conversations(data: Any) -> list[list[dict[str, str]]]:
    """Accept a ``datasets.Dataset`` / list of rows with ``messages``, or lists of messages."""
    rows = list(data["messages"]) if hasattr(data, "column_names") else list(data)
    convs = [r["messages"] if isinstance(r, dict) else r for r in rows]
    if not convs:
        raise ValueError("evaluate: the evaluation set is empty")
    return convs


@torch.inference_mode()
def generate_ids(model: nn.Module, tokenizer: Any, conversations: Sequence[Sequence[dict]],
                 *, max_new_tokens: int = 16, batch_size: int = 16,
                 progress: bool = False) -> list[list[int]]:
    """Greedy reply tokens for each conversation (its last assistant message, if any, is left
    out), up to and including the end-of-turn token, without padding.

    Prompts are batched with **left** padding: every prompt then ends at the same column, so
    the next token of every row is generated at the same step. The model reads the attention
    mask (and derives positions from it), so a padded row gives the same reply as alone.
    """
    check_count(batch_size, "batch_size", "generate_ids")
    check_count(max_new_tokens, "max_new_tokens", "generate_ids")
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    prompts = [tokenizer(prompt_text(tokenizer, conv), add_special_tokens=False)["input_ids"]
               for conv in conversations]
    replies: list[list[int]] = []
    batch_starts = range(0, len(prompts), batch_size)
    for start in tqdm(batch_starts, desc="generating", disable=not progress):
        chunk = [{"input_ids": ids, "labels": ids} for ids in prompts[start: start + batch_size]]
        batch = collate(chunk, pad_id, padding_side="left")
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():  # only what was generated
            # A row that finished early is filled with padding up to the longest: cut it there.
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            replies.append(row[:cut])
    return replies


def generate_answers(model: nn.Module, tokenizer: Any, conversations: Sequence[Sequence[dict]],
                     *, max_new_tokens: int = 16, batch_size: int = 16,
                     progress: bool = False) -> list[str]:
    """Greedy replies as text (special tokens dropped, whitespace stripped); see :func:`generate_ids`."""
    ids = generate_ids(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress=progress)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


def evaluate_accuracy(model: nn.Module, tokenizer: Any, data: Any, *,
                      match: str | Matcher = "normalized", max_new_tokens: int = 16,
                      batch_size: int = 16, progress: bool = False) -> EvalResult:
    """Generation accuracy on a held-out set whose last message is the expected answer.

    ``data``: a dataset from :func:`loracore.data.load_chat_jsonl` (or a list of
    conversations). Returns an :class:`EvalResult` with every question, expected answer,
    reply and verdict.
    """
    convs = _as_conversations(data)
    for i, conv in enumerate(convs):
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError(f"evaluate_accuracy: example {i} does not end with the expected "
                             "answer (an assistant message)")
    judge: Matcher = match if callable(match) else (lambda p, a: answers_match(p, a, match))
    replies = generate_answers(model, tokenizer, convs, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress)
    return EvalResult([
        {"question": conv[-2]["content"] if len(conv) > 1 else "", "expected": conv[-1]["content"],
         "prediction": reply, "correct": bool(judge(reply, conv[-1]["content"]))}
        for conv, reply in zip(convs, replies)
    ])


@torch.inference_mode()
def answer_loss(model: nn.Module, batches: Any) -> float:
    """Mean cross-entropy (nats per token) on the labelled answer tokens of every batch.

    Sums the loss over all batches before dividing by the token count, so the result does
    not depend on how the examples were grouped into batches.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        check_batch(batch, f"answer_loss: batch {i}")
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += causal_lm_loss(logits, batch["labels"], reduction="sum").item()
        count += count_answer_tokens(batch["labels"])
    if count == 0:
        raise ValueError("answer_loss: no labelled tokens in the batches")
    return total / count


def perplexity(model: nn.Module, batches: Any) -> float:
    """``exp(answer_loss)``: how many equally likely next tokens the model is, on average,
    choosing between on the answer tokens. 1 is certainty; lower is better."""
    return math.exp(answer_loss(model, batches))
