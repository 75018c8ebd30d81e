"""loracore.train.train_step, the one optimizer step of `train` and `loracore finetune`: what it
equals, what a micro-batch without answer tokens does (nothing), and how it refuses and fails.

A micro-batch whose labels are all -100 contributes zero: no loss, no gradient, no token to the
count, and no NaN; `train` and `loracore finetune` (one process and two) are both checked.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracore import finetune
from loracore.data import IGNORE_INDEX, DataError, collate, load_sft_dataset, pad_token_id
from loracore.lora import inject
from loracore.models import load_base_model
from loracore.train import StepResult, count_answer_tokens, lr_schedule, train, train_step

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "capitals_train.jsonl"


@pytest.fixture(scope="module")
def batches():
    """Two micro-batches of real examples (unequal answers) and one with no answer token."""
    tokenizer = load_base_model("tiny-qwen2", verbose=False)[1]
    data = load_sft_dataset(DATA, tokenizer, max_length=128, limit=5)
    pad = pad_token_id(tokenizer)
    a, b = collate(data.select(range(2)), pad), collate(data.select(range(2, 5)), pad)
    empty = dict(a, labels=torch.full_like(a["labels"], IGNORE_INDEX))
    return a, b, empty


def lora_model(seed: int = 0, dropout: float = 0.0):
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    torch.manual_seed(seed)
    inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=dropout)
    with torch.no_grad():  # a non-zero B, so that A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return model.train()


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_step(micro, **kw) -> tuple[StepResult, dict[str, torch.Tensor]]:
    model = lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    result = train_step(model, micro, opt, lr_schedule(opt, num_steps=3), **kw)
    return result, trainable(model)


# ---- count_answer_tokens ------------------------------------------------------------------
def test_count_answer_tokens_counts_after_the_shift():
    assert count_answer_tokens(torch.tensor([[-100, -100, 7, 8]])) == 2
    assert count_answer_tokens(torch.tensor([[5, -100, -100]])) == 0  # position 0 is never predicted
    assert count_answer_tokens(torch.tensor([[1, 2], [-100, 3]])) == 2
    assert count_answer_tokens(torch.full((2, 5), IGNORE_INDEX)) == 0


@pytest.mark.parametrize("labels", [torch.tensor([1, 2, 3]), [[1, 2]], torch.zeros(1, 2, 3)])
def test_count_answer_tokens_refuses_what_is_not_batch_by_seq(labels):
    with pytest.raises(ValueError, match=r"count_answer_tokens: labels must be a \(batch, seq\)"):
        count_answer_tokens(labels)


# ---- what a step equals -------------------------------------------------------------------
def test_the_step_is_trains_step_bit_for_bit(batches):
    a, b, _ = batches
    step, after = one_step([a, b], max_grad_norm=0.5)
    model = lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    result = train(model, [a, b], num_steps=1, optimizer=opt, grad_accum_steps=2,
                   max_grad_norm=0.5, schedule="constant", progress=False)
    assert result.losses == [step.loss] and result.lrs == [step.lr] == [1e-2]
    assert all(torch.equal(p, after[n]) for n, p in trainable(model).items())


def test_the_logged_loss_is_the_mean_over_all_answer_tokens(batches):
    a, b, _ = batches
    model = lora_model()
    with torch.no_grad():
        sums = [torch.nn.functional.cross_entropy(
            model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[:, :-1]
            .reshape(-1, model.config.vocab_size), x["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum").item() for x in (a, b)]
    step, _ = one_step([a, b])
    want = sum(sums) / (count_answer_tokens(a["labels"]) + count_answer_tokens(b["labels"]))
    assert math.isclose(step.loss, want, rel_tol=1e-5)
    assert step.lr == 1e-2  # no warm-up: the cosine schedule starts at the full rate


# ---- a micro-batch without answer tokens --------------------------------------------------
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_micro_batch_without_answer_tokens_contributes_exactly_zero(batches, where):
    a, b, empty = batches
    micro = {"first": [empty, a, b], "middle": [a, empty, b], "last": [a, b, empty]}[where]
    with_empty, after_with = one_step(micro)
    without, after_without = one_step([a, b])
    assert math.isfinite(with_empty.loss)
    assert with_empty == without  # the same loss and lr, bit for bit
    assert all(torch.equal(after_with[n], after_without[n]) for n in after_without)
    assert all(torch.isfinite(p).all() for p in after_with.values())


def test_train_with_a_micro_batch_without_answer_tokens(batches):
    """`train` cycles [a, empty] with grad_accum_steps=2: every step equals a step on a alone."""
    a, _, empty = batches
    runs = []
    for micro, accum in (([a, empty], 2), ([a], 1)):
        model = lora_model()
        result = train(model, micro, num_steps=3, lr=1e-2, grad_accum_steps=accum, progress=False)
        runs.append((result.losses, trainable(model)))
    assert runs[0][0] == runs[1][0] and all(math.isfinite(x) for x in runs[0][0])
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[1][1])


def test_a_step_without_any_answer_token_is_refused_before_anything_changes(batches):
    _, _, empty = batches
    model = lora_model()
    before = trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = lr_schedule(opt, num_steps=3)
    with pytest.raises(ValueError, match=r"train: step 7: no labelled token in its 2 "
                                         r"micro-batch\(es\) \(all labels are -100\)"):
        train_step(model, [empty, empty], opt, sched, where="train: step 7")
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())
    assert opt.state_dict()["state"] == {} and sched.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())


# ---- finetune -----------------------------------------------------------------------------
COMMON = ["--model", "tiny-qwen2", "--rank", "4", "--lora-alpha", "8", "--lr", "5e-3",
          "--no-progress", "--steps", "3"]


def _blank_first_example(monkeypatch):
    """finetune's tokenized examples, the first one with no answer token (labels all -100)."""
    original = finetune._tokenize

    def blanked(dataset, tokenizer, max_length):
        out = original(dataset, tokenizer, max_length)
        out[0] = dict(out[0], labels=[IGNORE_INDEX] * len(out[0]["labels"]))
        return out

    monkeypatch.setattr(finetune, "_tokenize", blanked)


def test_finetune_skips_a_micro_batch_without_answer_tokens(tmp_path, monkeypatch):
    """Three examples, one a micro-batch each, all three in every step; the first has no
    answer token. The run equals one on the other two alone (up to the order of the sums)."""
    lines = DATA.read_text().splitlines()
    three, two = tmp_path / "three.jsonl", tmp_path / "two.jsonl"
    three.write_text("\n".join(lines[:3]) + "\n")
    two.write_text("\n".join(lines[1:3]) + "\n")
    assert finetune.main([*COMMON, "--data", str(two), "--batch-size", "1", "--grad-accum", "2",
                          "--out", str(tmp_path / "two")]) == 0
    _blank_first_example(monkeypatch)
    assert finetune.main([*COMMON, "--data", str(three), "--batch-size", "1", "--grad-accum", "3",
                          "--out", str(tmp_path / "three")]) == 0
    h3 = json.loads((tmp_path / "three" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert all(math.isfinite(x) for x in h3["loss"])
    assert h3["loss"] == pytest.approx(h2["loss"], abs=1e-6)
    a3 = load_file(str(tmp_path / "three" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a3.keys() == a2.keys() and all(torch.isfinite(a3[k]).all() for k in a3)
    assert all(torch.allclose(a3[k], a2[k], atol=1e-6, rtol=0) for k in a3)
    assert any(a3[k].abs().max() > 0 for k in a3 if k.endswith("lora_B.weight"))


BLANKED_RUN = textwrap.dedent("""
    import sys
    import loracore.finetune as ft
    original = ft._tokenize
    def blanked(dataset, tokenizer, max_length):
        out = original(dataset, tokenizer, max_length)
        out[0] = dict(out[0], labels=[-100] * len(out[0]["labels"]))
        return out
    ft._tokenize = blanked
    sys.exit(ft.main(sys.argv[1:]))
""")


def test_two_processes_when_one_has_no_answer_tokens(tmp_path, monkeypatch):
    """batch 2 over 2 processes, one row each: whenever the blank example is a process's row,
    that process runs a micro-batch with no answer token (a zero loss, so that it joins the
    gradient all-reduce). No hang, no NaN, and the adapter equals the one-process run's (run
    here, in pytest's process, as under ``torchrun --nproc_per_node=1``: WORLD_SIZE 1)."""
    lines = DATA.read_text().splitlines()
    data = tmp_path / "three.jsonl"
    data.write_text("\n".join(lines[:3]) + "\n")  # 4 rows a step: the blank one in every step
    script = tmp_path / "blanked.py"
    script.write_text(BLANKED_RUN)
    args = [*COMMON, "--data", str(data), "--batch-size", "2", "--grad-accum", "2"]
    runs = {}
    with monkeypatch.context() as m:
        _blank_first_example(m)
        assert finetune.main([*args, "--out", str(tmp_path / "n1")]) == 0
    runs[1] = (load_file(str(tmp_path / "n1" / "adapter_model.safetensors")),
               json.loads((tmp_path / "n1" / "history.json").read_text())["loss"])
    for nproc in (2,):
        out = tmp_path / f"n{nproc}"
        with socket.socket() as s:  # a free port for the process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                   HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                               f"--nproc_per_node={nproc}", "--master-addr=127.0.0.1",
                               f"--master-port={port}", str(script), *args, "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[nproc] = (load_file(str(out / "adapter_model.safetensors")),
                       json.loads((out / "history.json").read_text())["loss"])
    (a1, l1), (a2, l2) = runs[1], runs[2]
    assert all(math.isfinite(x) for x in l2) and l1 == pytest.approx(l2, abs=1e-6)
    assert all(torch.allclose(a1[k], a2[k], atol=1e-6, rtol=0) for k in a1)


# ---- bad input and failure half-way -------------------------------------------------------
@pytest.mark.parametrize("micro, message", [
    ([], "micro_batches must be a non-empty list of batches, got list"),
    (None, "micro_batches must be a non-empty list of batches, got NoneType"),
    ("batch", "micro_batches must be a non-empty list of batches, got dict"),
])
def test_bad_micro_batches_are_refused(batches, micro, message):
    model = lora_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=message):
        train_step(model, batches[0] if micro == "batch" else micro, opt)


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": torch.ones(1, 3, dtype=torch.long)}, r"train_step, micro-batch 1: the batch has no "
                                                      r"'attention_mask', 'labels'"),
    ([1, 2], r"train_step, micro-batch 1: a batch must be a dict"),
])
def test_a_malformed_micro_batch_is_refused_before_anything_runs(batches, bad, message):
    model = lora_model()
    before = trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(DataError, match=message):
        train_step(model, [batches[0], bad], opt)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())


@pytest.mark.parametrize("norm", [0.0, -1.0, float("nan"), float("inf"), True])
def test_a_bad_max_grad_norm_is_refused(batches, norm):
    model = lora_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=r"train_step \(None skips clipping\): max_grad_norm "
                                         r"must be a finite number > 0"):
        train_step(model, [batches[0]], opt, max_grad_norm=norm)


def test_a_model_with_nothing_to_train_is_refused(batches):
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    model.requires_grad_(False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="train_step: the model has no trainable parameters"):
        train_step(model, [batches[0]], opt)


@pytest.mark.parametrize("had_grads", [False, True])
def test_a_failure_half_way_leaves_parameters_gradients_and_optimizer_as_they_were(
        batches, had_grads):
    a, b, _ = batches
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    if had_grads:  # the caller's own gradients must come back unchanged, not zeroed
        for p in params:
            p.grad = torch.full_like(p, 0.25)
    before = trainable(model)
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = lr_schedule(opt, num_steps=3)
    real_forward, calls = model.forward, []

    def forward(*args, **kwargs):  # the second micro-batch's forward fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected: out of memory")
        return real_forward(*args, **kwargs)

    model.forward = forward
    with pytest.raises(RuntimeError, match="injected"):
        train_step(model, [a, b], opt, sched)
    assert len(calls) == 2  # the first micro-batch's backward really ran
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())
    for p, g in zip(params, grads_before):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert opt.state_dict()["state"] == {} and sched.last_epoch == 0
    del model.forward  # the same model steps normally afterwards
    if had_grads:
        for p in params:
            p.grad = None
    assert math.isfinite(train_step(model, [a, b], opt, sched).loss)
