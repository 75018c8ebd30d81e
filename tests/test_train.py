"""loracore.train on tiny-qwen2: the loss, padding invariance, learning, reproducibility, and the
adapter's life cycle (save, reload, remove); hostile batches and arguments are named and change
nothing."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from loracore.adapters import load_adapter, save_adapter
from loracore.data import IGNORE_INDEX, DataError, collate, load_sft_dataset, make_dataloader, pad_token_id
from loracore.evaluate import answer_loss
from loracore.lora import disable_adapters, inject, lora_layers, remove_lora
from loracore.models import load_base_model
from loracore.train import causal_lm_loss, lr_schedule, train

DATA = Path(__file__).resolve().parent.parent / "data"


def tiny():
    return load_base_model("tiny-qwen2")


@pytest.fixture(scope="module")
def dataset():
    tokenizer = tiny()[1]
    return load_sft_dataset(DATA / "capitals_train.jsonl", tokenizer, max_length=128, limit=8)


def fresh_lora(r: int = 4, targets=("q_proj", "v_proj")):
    model, tokenizer = tiny()
    inject(model, targets if isinstance(targets, str) else list(targets), r=r, lora_alpha=2 * r)
    return model, tokenizer


# ---------------------------------------------------------------- the loss

def test_loss_matches_transformers_own_loss(dataset):
    model, tokenizer = tiny()
    batch = collate(dataset.select(range(4)), pad_token_id(tokenizer))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    assert torch.allclose(causal_lm_loss(out.logits, batch["labels"]), out.loss, atol=1e-6)


def test_no_loss_flows_from_prompt_tokens(dataset):
    model, tokenizer = tiny()
    batch = collate(dataset.select(range(3)), pad_token_id(tokenizer))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.detach().requires_grad_(True)
    causal_lm_loss(logits, batch["labels"]).backward()
    # Position t is scored on token t+1: only positions whose next token is an answer token
    # may receive gradient; prompt and padding positions must receive exactly none.
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    grad_norm = logits.grad.abs().sum(-1)
    assert (grad_norm[~scored] == 0).all()
    assert (grad_norm[scored] > 0).all()
    assert scored.sum() < (batch["attention_mask"] == 1).sum() / 3  # the prompt is most of it


def test_padding_does_not_change_the_loss(dataset):
    model, tokenizer = tiny()
    pad = pad_token_id(tokenizer)
    examples = dataset.select(range(6))
    assert len(set(examples["length"])) > 1, "the test needs examples of different lengths"
    with torch.no_grad():
        alone = [causal_lm_loss(model(input_ids=b["input_ids"]).logits, b["labels"], reduction="sum")
                 for b in (collate([ex], pad) for ex in examples)]
        batch = collate(examples, pad)
        together = causal_lm_loss(model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"], reduction="sum")
    assert torch.allclose(sum(alone), together, rtol=1e-5)
    # and answer_loss does not depend on the batch size either
    assert math.isclose(answer_loss(model, make_dataloader(examples, tokenizer, batch_size=1)),
                        answer_loss(model, make_dataloader(examples, tokenizer, batch_size=6)),
                        rel_tol=1e-5)


def test_loss_refuses_a_batch_without_labels():
    with pytest.raises(ValueError, match="no labelled token"):
        causal_lm_loss(torch.zeros(1, 3, 5), torch.full((1, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match=r"logits \(1, 3, 5\) do not match labels \(1, 4\)"):
        causal_lm_loss(torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------- training

def test_a_few_steps_lower_the_loss_and_touch_only_lora(dataset):
    model, tokenizer = fresh_lora(r=8, targets="all-linear")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loader = make_dataloader(dataset, tokenizer, batch_size=4)
    before = answer_loss(model, loader)
    result = train(model, loader, num_steps=15, lr=2e-2, progress=False)
    after = answer_loss(model, loader)
    # A random tiny model starts near ln(vocab) = 5.56 nats; 15 steps reach about 5.15.
    assert after < before - 0.2, (before, after)
    assert len(result.losses) == len(result.lrs) == 15 and result.tokens > 0
    assert not model.training  # left in eval mode
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_same_seed_same_run(dataset):
    runs = []
    for extra_draws in (0, 5):
        torch.manual_seed(123)  # LoRA's A is drawn at injection: same seed, same start
        model, tokenizer = fresh_lora()
        torch.rand(extra_draws)  # the loop must not depend on the RNG state left before it
        result = train(model, make_dataloader(dataset, tokenizer, batch_size=4, seed=7),
                       num_steps=4, lr=1e-2, seed=3, progress=False)
        runs.append((result.losses, {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


def test_gradient_accumulation_averages_micro_batches(dataset):
    """Accumulating two copies of a batch must step exactly like that batch once."""
    _, tokenizer = tiny()
    batch = collate(dataset.select(range(4)), pad_token_id(tokenizer))
    weights = []
    for accum, batches in ((1, [batch]), (2, [batch, batch])):
        model, _ = fresh_lora()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        train(model, batches, num_steps=2, optimizer=opt, grad_accum_steps=accum,
              max_grad_norm=None, schedule="constant", progress=False)
        weights.append(torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_" in n]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def _lora_grads_after_one_step(batches, accum):
    """One SGD step with lr=0 (weights stay put): the accumulated gradient and logged loss."""
    model, _ = fresh_lora()
    with torch.no_grad():  # a non-zero B, so A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    grads = {}
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    class Capture(torch.optim.SGD):  # record .grad just before the step zeroes it
        def step(self, closure=None):
            grads.update({n: p.grad.clone() for n, p in zip(names, params)})
            return super().step(closure)

    result = train(model, batches, num_steps=1, optimizer=Capture(params, lr=0.0),
                   grad_accum_steps=accum, max_grad_norm=None, schedule="constant", progress=False)
    return grads, result.losses[0], model


def test_accumulation_equals_one_batch_of_the_union_with_unequal_answers(dataset):
    """Three micro-batches whose answers have very different token counts: their accumulated
    gradient and logged loss equal those of one batch holding all their examples."""
    _, tokenizer = tiny()
    pad = pad_token_id(tokenizer)
    examples = [dataset[i] for i in range(5)]
    # Shorten some answers by masking them (labels -100), so the counts differ a lot.
    examples[0] = dict(examples[0], labels=[IGNORE_INDEX] * (len(examples[0]["labels"]) - 2)
                       + examples[0]["labels"][-2:])
    groups = [examples[:1], examples[1:4], examples[4:]]
    micro = [collate(g, pad) for g in groups]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    assert len(set(counts)) == 3, counts  # unequal answer-token counts, or the test proves nothing
    union = collate(examples, pad)
    g_union, loss_union, model = _lora_grads_after_one_step([union], 1)
    g_accum, loss_accum, _ = _lora_grads_after_one_step(micro, 3)
    with torch.no_grad():
        want = causal_lm_loss(model(input_ids=union["input_ids"],
                                    attention_mask=union["attention_mask"]).logits,
                              union["labels"]).item()
    assert math.isclose(loss_union, want, rel_tol=1e-5)
    assert math.isclose(loss_accum, want, rel_tol=1e-5)
    assert g_union.keys() == g_accum.keys() and len(g_union) > 0
    for n in g_union:
        assert g_union[n].abs().sum() > 0, n
        assert torch.allclose(g_accum[n], g_union[n], rtol=1e-4, atol=1e-7), n
    # The old rule (mean of the micro-batch means) gives a different gradient here.
    per_batch = [_lora_grads_after_one_step([b], 1)[0] for b in micro]
    n = next(iter(g_union))
    mean_of_means = sum(g[n] for g in per_batch) / 3
    assert not torch.allclose(mean_of_means, g_union[n], rtol=1e-3, atol=1e-6)


def test_accumulation_skips_a_micro_batch_without_answer_tokens(dataset):
    """A micro-batch whose labels are all -100 adds nothing: the step equals the other one."""
    _, tokenizer = tiny()
    pad = pad_token_id(tokenizer)
    batch = collate(dataset.select(range(2)), pad)
    empty = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    g_one, loss_one, _ = _lora_grads_after_one_step([batch], 1)
    g_two, loss_two, _ = _lora_grads_after_one_step([batch, empty], 2)
    assert math.isclose(loss_one, loss_two, rel_tol=1e-6)
    assert all(torch.allclose(g_one[n], g_two[n], atol=1e-7) for n in g_one)
    with pytest.raises(ValueError, match="step 0: no labelled token in its 2 micro-batch"):
        _lora_grads_after_one_step([empty, empty], 2)


def test_the_given_optimizer_is_used(dataset):
    model, tokenizer = fresh_lora()
    start = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    train(model, make_dataloader(dataset, tokenizer, batch_size=4), num_steps=2, optimizer=opt,
          progress=False)
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_loraplus_gives_B_a_larger_learning_rate(dataset):
    model, tokenizer = fresh_lora()
    lr, ratio = 1e-3, 16.0
    train(model, make_dataloader(dataset, tokenizer, batch_size=4), num_steps=1, lr=lr,
          loraplus_lr_ratio=ratio, schedule="constant", max_grad_norm=None, progress=False)
    # Adam's first step moves every weight with a non-zero gradient by about lr (times the
    # sign of the gradient). B starts at zero, so its first step is about lr * ratio.
    b_moves = torch.cat([layer.lora_B["default"].weight.abs().flatten()
                         for layer in lora_layers(model).values()])
    assert math.isclose(b_moves.max().item(), lr * ratio, rel_tol=0.01)


def test_lr_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, num_steps=10, warmup_steps=3, kind="cosine")
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert lrs[3] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # strictly decaying after warm-up
    assert lrs[-1] < 0.1
    with pytest.raises(ValueError, match="warmup_steps <= num_steps"):
        lr_schedule(opt, num_steps=2, warmup_steps=5)


def test_clear_errors(dataset):
    model, tokenizer = tiny()  # nothing trainable? every base parameter is trainable: freeze them
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, make_dataloader(dataset, tokenizer), num_steps=1, progress=False)
    model, tokenizer = fresh_lora()
    with pytest.raises(ValueError, match="num_steps and grad_accum_steps must be >= 1"):
        train(model, make_dataloader(dataset, tokenizer), num_steps=0, progress=False)
    with pytest.raises(ValueError, match="batches are empty"):
        train(model, [], num_steps=1, progress=False)


# ---------------------------------------------------------------- the adapter's life cycle

@pytest.fixture(scope="module")
def trained(dataset):
    """A base model's logits, then the same model after LoRA training (B is non-zero)."""
    model, tokenizer = tiny()
    probe = collate(dataset.select(range(4)), pad_token_id(tokenizer))
    with torch.no_grad():
        base_logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    inject(model, "all-linear", r=4, lora_alpha=8)
    train(model, make_dataloader(dataset, tokenizer, batch_size=4), num_steps=10, lr=1e-2,
          progress=False)
    return model, tokenizer, probe, base_logits


def greedy_ids(model, tokenizer, probe) -> torch.Tensor:
    """Eight greedy tokens after the first example's prompt (no early stop, so all are compared)."""
    prompt = probe["input_ids"][:1, :20]
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=8, min_new_tokens=8, pad_token_id=pad_token_id(tokenizer))


def test_save_and_reload_gives_identical_generations(trained, tmp_path):
    model, tokenizer, probe, base_logits = trained
    with torch.no_grad():
        trained_logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)  # the adapter does something
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = tiny()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(greedy_ids(fresh, tokenizer, probe), greedy_ids(model, tokenizer, probe))
    with torch.no_grad():
        reloaded = fresh(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.equal(reloaded, trained_logits)


def test_disabling_and_removing_the_adapter_restore_base_logits_exactly(trained):
    model, tokenizer, probe, base_logits = trained
    with torch.no_grad(), disable_adapters(model):
        disabled = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.equal(disabled, base_logits)
    remove_lora(model)
    assert not lora_layers(model)
    with torch.no_grad():
        removed = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.equal(removed, base_logits)  # bit for bit: removal is clean unlearning


# ---------------------------------------------------------------- lab 02's self-check

def test_lab02_training_step_check_accepts_right_and_rejects_unshifted():
    from loracore.checks.lab02 import check_training_step
    from loracore.selfcheck import ExerciseFailed

    def step(model, batch, optimizer, shift=True):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if shift:
            loss = causal_lm_loss(logits, batch["labels"])
        else:  # forgets that position t predicts token t + 1
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                     ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    check_training_step(step)
    with pytest.raises(ExerciseFailed):
        check_training_step(lambda m, b, o: step(m, b, o, shift=False))


# ---- hostile batches and arguments: named, and nothing changed ------------------------------
@pytest.fixture(scope="module")
def base():
    """The tiny random Qwen2 and its tokenizer, loaded once; tests work on deep copies."""
    return load_base_model("tiny-qwen2", verbose=False)



@pytest.fixture(scope="module")
def tokenized(base):
    return load_sft_dataset(DATA / "capitals_train.jsonl", base[1], max_length=128, limit=4)



def _batch(base, tokenized) -> dict:
    return collate(tokenized.select(range(2)), pad_token_id(base[1]))


def _lora(base) -> nn.Module:
    m = copy.deepcopy(base[0])
    torch.manual_seed(0)
    inject(m, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    return m


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("attention_mask"), r"the batch has no 'attention_mask' \(the 1s over real "
                                        r"tokens.*it has \['input_ids', 'labels'\]"),
    (lambda b: b.pop("labels"), r"the batch has no 'labels'"),
    (lambda b: b.update(labels=b["labels"].float()), r"batch\['labels'\] must be a 2-D integer tensor"),
    (lambda b: b.update(attention_mask=b["attention_mask"][:, :-1]),
     r"batch\['attention_mask'\] has shape \(2, \d+\) but input_ids has"),
    (lambda b: b.update(input_ids=b["input_ids"].tolist()), r"batch\['input_ids'\] must be a 2-D"),
])
def test_a_bad_batch_is_named_by_train_and_answer_loss(base, tokenized, change, message):
    batch = _batch(base, tokenized)
    change(batch)
    model = _lora(base)
    before = snapshot(model)
    with pytest.raises(DataError, match=r"train: step 0, micro-batch 0: " + message):
        train(model, [batch], num_steps=2, progress=False)
    model.train(before["training"])  # train() always leaves eval mode; compare the rest
    assert_unchanged(model, before)  # the first micro-batch is checked before any update
    with pytest.raises(DataError, match=r"answer_loss: batch 0: " + message):
        answer_loss(model, [batch])


def test_a_batch_that_is_not_a_dict(base):
    with pytest.raises(DataError, match=r"train: step 0, micro-batch 0: a batch must be a dict"):
        train(_lora(base), [torch.zeros(2, 3)], num_steps=1, progress=False)



# ---- train: arguments are checked before anything changes ---------------------------------
@pytest.mark.parametrize("kwargs, exc, message", [
    ({"max_grad_norm": -1.0}, ValueError, r"train \(None skips clipping\): max_grad_norm must be "
                                          r"a finite number > 0, got -1.0"),
    ({"max_grad_norm": 0}, ValueError, "max_grad_norm must be a finite number > 0, got 0"),
    ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm must be a finite number > 0"),
    ({"max_grad_norm": float("inf")}, ValueError, "max_grad_norm must be a finite number > 0"),
    ({"num_steps": 10.0}, TypeError, r"train: num_steps must be an int, got 10.0 \(float\); "
                                     r"round it on purpose, e.g. int\(10.0\)"),
    ({"num_steps": 2.5}, TypeError, r"train: num_steps must be an int, got 2.5"),
    ({"num_steps": True}, TypeError, r"train: num_steps must be an int, got True \(bool\)"),
    ({"num_steps": "3"}, TypeError, r"train: num_steps must be an int, got '3' \(str\)"),
    ({"num_steps": -2}, ValueError, "train: num_steps and grad_accum_steps must be >= 1"),
    ({"grad_accum_steps": 2.0}, TypeError, r"train: grad_accum_steps must be an int, got 2.0"),
    ({"grad_accum_steps": 0}, ValueError, "num_steps and grad_accum_steps must be >= 1, got 2 and 0"),
    ({"grad_accum_steps": False}, TypeError, r"train: grad_accum_steps must be an int, got False"),
    ({"lr": 0.0}, ValueError, "train: lr must be a finite number > 0, got 0.0"),
    ({"lr": -1e-3}, ValueError, "train: lr must be a finite number > 0, got -0.001"),
    ({"lr": float("nan")}, ValueError, "train: lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, ValueError, "train: lr must be a finite number > 0, got inf"),
    ({"lr": "1e-3"}, ValueError, "train: lr must be a finite number > 0, got '1e-3'"),
    ({"weight_decay": -0.1}, ValueError, "train: weight_decay must be a finite number >= 0"),
    ({"loraplus_lr_ratio": float("nan")}, ValueError, "train: loraplus_lr_ratio must be a finite"),
    ({"warmup_steps": 1.5}, TypeError, r"lr_schedule: warmup_steps must be an int, got 1.5"),
    ({"warmup_steps": 5}, ValueError, "lr_schedule: need 0 <= warmup_steps <= num_steps"),
    ({"schedule": "cosin"}, ValueError, "lr_schedule: kind must be 'cosine'"),
    ({"optimizer": "adam"}, TypeError, "train: optimizer must be a torch.optim.Optimizer, got str"),
])
def test_train_refuses_bad_arguments_before_touching_anything(base, tokenized, kwargs, exc, message):
    model = _lora(base)
    model.train()
    before = snapshot(model)
    rng = torch.get_rng_state()
    args = {"num_steps": 2, **kwargs}
    with pytest.raises(exc, match=message):
        train(model, [_batch(base, tokenized)], progress=False, **args)
    assert_unchanged(model, before)  # not even switched to eval mode
    assert torch.equal(torch.get_rng_state(), rng)  # nor the global RNG seeded


def test_max_grad_norm_none_still_skips_clipping(base, tokenized):
    model = _lora(base)
    result = train(model, [_batch(base, tokenized)], num_steps=1, max_grad_norm=None, progress=False)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])


def test_lr_schedule_refuses_a_float_step_count():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(TypeError, match=r"lr_schedule: num_steps must be an int, got 10.0"):
        lr_schedule(opt, num_steps=10.0)
