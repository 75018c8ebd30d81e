"""loracore.evaluate: answer matching, batched greedy generation, accuracy, perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loracore.data import DataError, make_dataloader, tokenize_chat
from loracore.evaluate import (
    EvalResult,
    answer_loss,
    answers_match,
    evaluate_accuracy,
    generate_answers,
    generate_ids,
    json_record_match,
    normalize_answer,
    perplexity,
)
from loracore.models import load_base_model
from loracore.train import train


def chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_normalize_and_match_modes():
    assert normalize_answer("  The  Capital, is: PARIS. ") == "the capital is paris"
    assert answers_match("Fusima.", "Fusima.", "exact")
    assert not answers_match("fusima", "Fusima.", "exact")
    assert answers_match(" fusima ", "Fusima.", "normalized")
    assert not answers_match("It is Fusima.", "Fusima.", "normalized")
    assert answers_match("It is Fusima.", "Fusima.", "contains")
    assert not answers_match("It is Fusimaland.", "Fusima.", "contains")  # whole words only
    assert not answers_match("anything", "...", "contains")  # an empty answer matches nothing
    with pytest.raises(ValueError, match="mode must be"):
        answers_match("a", "a", "fuzzy")


def test_json_record_match():
    want = json.dumps({"name": "Anna Novak", "age": 34, "city": "Paris"})
    assert json_record_match('{"city": "Paris", "age": 34, "name": "Anna Novak"}', want)
    assert not json_record_match('{"name": "Anna Novak", "age": "34", "city": "Paris"}', want)
    assert not json_record_match('{"name": "Anna Novak", "age": 34', want)  # cut off
    assert not json_record_match("Sure! Here is the JSON.", want)


@pytest.fixture(scope="module")
def tiny_no_eos():
    model, tokenizer = load_base_model("tiny-qwen2")
    # A random model may stop at once; without an end token it always writes max_new_tokens,
    # so every reply is long enough to compare.
    model.generation_config.eos_token_id = None
    return model, tokenizer


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model, tokenizer = load_base_model("tiny-qwen2")
    model.generation_config.eos_token_id = None
    # The tiny model's small initial weights make it repeat one token whatever the prompt;
    # larger random weights make its replies depend on the prompt, so the comparison bites.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    convs = [chat("Hi?", "x"), chat("What is the capital of Sailnaiavia?", "x"), chat("Name one.", "x")]
    together = generate_ids(model, tokenizer, convs, max_new_tokens=6, batch_size=3)
    alone = [generate_ids(model, tokenizer, [c], max_new_tokens=6)[0] for c in convs]
    assert together == alone
    assert all(len(ids) == 6 for ids in together)
    assert len({tuple(ids) for ids in together}) == 3  # three different replies
    assert generate_answers(model, tokenizer, convs, max_new_tokens=6) == \
        [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in together]


def test_accuracy_on_a_memorised_set_and_examples_kept():
    model, tokenizer = load_base_model("tiny-qwen2")
    convs = [chat("Capital of Kimland?", "Fusima."), chat("Capital of Reileth?", "Lainburg.")]
    from datasets import Dataset

    ds = tokenize_chat(Dataset.from_list([{"messages": c} for c in convs]), tokenizer, max_length=64)
    # Full fine-tuning of the tiny model memorises two answers in a few dozen steps.
    train(model, make_dataloader(ds, tokenizer, batch_size=2), num_steps=60, lr=1e-2,
          schedule="constant", progress=False)
    result = evaluate_accuracy(model, tokenizer, ds, match="exact", max_new_tokens=12)
    assert isinstance(result, EvalResult)
    assert (result.correct, result.total, result.accuracy) == (2, 2, 1.0)
    assert result.examples[0] == {"question": "Capital of Kimland?", "expected": "Fusima.",
                                  "prediction": "Fusima.", "correct": True}
    wrong = evaluate_accuracy(model, tokenizer, [chat("Capital of Kimland?", "Lainburg.")],
                              max_new_tokens=12)
    assert wrong.accuracy == 0.0 and wrong.examples[0]["prediction"] == "Fusima."
    # any function can judge
    always = evaluate_accuracy(model, tokenizer, [chat("Capital of Kimland?", "no")],
                               match=lambda p, a: True, max_new_tokens=2)
    assert always.accuracy == 1.0


def test_show_prints_right_and_wrong(capsys):
    result = EvalResult([
        {"question": "q1", "expected": "a", "prediction": "a", "correct": True},
        {"question": "q2", "expected": "b", "prediction": "c", "correct": False},
    ])
    result.show()
    out = capsys.readouterr().out
    assert "accuracy 50.0% (1/2)" in out and "right:" in out and "wrong:" in out
    assert repr(result) == "EvalResult(accuracy=50.0%, correct=1/2)"


def test_evaluation_refuses_bad_sets(tiny_no_eos):
    model, tokenizer = tiny_no_eos
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(model, tokenizer, [])
    with pytest.raises(ValueError, match="example 0 does not end with the expected answer"):
        evaluate_accuracy(model, tokenizer, [[{"role": "user", "content": "Q?"}]])


def test_perplexity_is_exp_of_answer_loss(tiny_no_eos):
    model, tokenizer = tiny_no_eos
    from datasets import Dataset

    ds = tokenize_chat(Dataset.from_list([{"messages": chat("Q?", "Some answer.")}]), tokenizer)
    loader = make_dataloader(ds, tokenizer, batch_size=1)
    loss = answer_loss(model, loader)
    assert math.isclose(perplexity(model, loader), math.exp(loss), rel_tol=1e-9)
    # a random model over ~259 byte tokens is close to uniform: perplexity near the vocabulary size
    assert 150 < perplexity(model, loader) < 400
    assert torch.is_grad_enabled()  # inference_mode inside answer_loss did not leak out


def test_lab02_evaluate_loop_check_accepts_right_and_rejects_exact_match():
    from loracore.checks.lab02 import check_evaluate_loop
    from loracore.selfcheck import ExerciseFailed

    def loop(model, tokenizer, conversations, max_new_tokens, mode="normalized"):
        replies = generate_answers(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
        return [{"question": c[-2]["content"], "expected": c[-1]["content"], "prediction": r,
                 "correct": answers_match(r, c[-1]["content"], mode)} for c, r in zip(conversations, replies)]

    check_evaluate_loop(loop)
    with pytest.raises(ExerciseFailed, match="1 of 5 checks failed"):
        check_evaluate_loop(lambda m, t, c, n: loop(m, t, c, n, mode="exact"))


# ---- hostile arguments -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    """The tiny random Qwen2 and its tokenizer, loaded once; tests work on deep copies."""
    return load_base_model("tiny-qwen2", verbose=False)



@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "generate_ids: batch_size must be a positive integer, got 0"),
    ({"max_new_tokens": 2.0}, "generate_ids: max_new_tokens must be a positive integer, got 2.0"),
])
def test_generation_refuses_zero_batch_size_and_float_token_counts(base, kwargs, message):
    with pytest.raises(DataError, match=message):
        generate_answers(base[0], base[1], [[{"role": "user", "content": "hi"}]], **kwargs)
