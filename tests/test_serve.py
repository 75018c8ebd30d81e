"""loracore.serve: the adapter registry, mixed-adapter batches and continuous batching.

All on the tiny random Qwen2 (milliseconds per forward pass). The server is tested in
test_serve_server.py.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from loracore.adapters import load_adapter, save_adapter
from loracore.layer import LoRALinear, lora_update
from loracore.models import build_tiny_qwen2
from loracore.serve import (AdapterError, AdapterRegistry, Engine, NoFreeSlot, PromptTooLong,
                            SamplingParams, UnknownAdapter, apply_mixed_lora, batched_lora_delta,
                            gather_factors, sample_token)
from loracore.serve import batched
from loracore.surgery import inject, lora_layers


def make_adapter(model, path, *, seed: int, r: int = 8, targets="all-linear", std: float = 0.3):
    """Save an adapter for ``model`` with random non-zero B (so it changes the output)."""
    m = copy.deepcopy(model)
    inject(m, targets, r, 2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
    save_adapter(m, path)
    return path


def with_adapter(model, path):
    """A copy of ``model`` with the adapter at ``path`` loaded the ordinary way (the reference)."""
    m = copy.deepcopy(model)
    load_adapter(m, path)
    return m.eval()


@pytest.fixture
def setup(tiny, tmp_path):
    model, tok = tiny
    paths = {"a": make_adapter(model, tmp_path / "a", seed=1),
             "b": make_adapter(model, tmp_path / "b", seed=2, r=4, targets=["q_proj", "v_proj"]),
             "c": make_adapter(model, tmp_path / "c", seed=3, r=16, targets=["gate_proj", "o_proj"])}
    return model, tok, paths


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# ---- the math ----------------------------------------------------------------------------
def test_batched_delta_equals_lora_update_per_row_and_leaves_other_rows_alone():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 24)
    base = torch.randn(5, 7, 40)
    A = [torch.randn(r, 24) for r in (3, 6)]
    B = [torch.randn(40, r) for r in (3, 6)]
    A_stack, B_stack = torch.zeros(2, 8, 24), torch.zeros(2, 40, 8)  # max rank 8, zero padded
    for s in range(2):
        A_stack[s, :A[s].shape[0]], B_stack[s, :, :B[s].shape[1]] = A[s], B[s]
    scales = torch.tensor([2.0, 0.5])
    slots = torch.tensor([1, -1, 0, 1, -1])
    before = base.clone()
    out = apply_mixed_lora(base, x, A_stack, B_stack, scales, slots)
    assert torch.equal(base, before), "the base output must not be modified in place"
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            assert torch.equal(out[i], base[i]), f"row {i} has no adapter: must be the base bit for bit"
        else:
            want = base[i] + lora_update(x[i], A[s], B[s], scales[s].item())
            torch.testing.assert_close(out[i], want, atol=1e-5, rtol=0)
            assert (out[i] - base[i]).abs().max() > 1e-2  # the adapter did something
    Ar, Br, sr = gather_factors(A_stack, B_stack, scales, slots.clamp(min=0))
    assert Ar.shape == (5, 8, 24) and Br.shape == (5, 40, 8) and sr.tolist() == [0.5, 2.0, 2.0, 0.5, 2.0]
    assert batched_lora_delta(x, Ar, Br, sr).shape == (5, 7, 40)
    # every row with an adapter takes the path without gather/scatter: the same bits as the rows
    # computed among rows without one, and still no in-place change
    full = torch.tensor([1, 0, 0, 1, 1])
    every = apply_mixed_lora(base, x, A_stack, B_stack, scales, full)
    assert torch.equal(base, before)
    assert torch.equal(every[[0, 3]], out[[0, 3]]) and torch.equal(every[2], out[2])
    for i, s in enumerate(full.tolist()):
        want = base[i] + lora_update(x[i], A[s], B[s], scales[s].item())
        torch.testing.assert_close(every[i], want, atol=1e-5, rtol=1e-6)  # entries of size ~50


# ---- registry + mixed forward -------------------------------------------------------------
def test_mixed_batch_rows_equal_each_adapter_alone(setup):
    model, tok, paths = setup
    reg = AdapterRegistry(model, max_loras=3, max_lora_rank=16)
    for name, p in paths.items():
        reg.load(name, p)
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    names = ["a", None, "b", "c", None]
    mixed = reg.forward(ids, names)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    for i, name in enumerate(names):
        if name is None:
            assert torch.equal(mixed[i], base[i]), f"row {i}: no adapter must equal the base bit for bit"
            continue
        with torch.no_grad():
            alone = with_adapter(model, paths[name])(input_ids=ids[i:i + 1]).logits[0]
        assert (alone - base[i]).abs().max() > 1e-3, "test adapter too weak to prove anything"
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
    # outside a mixed batch the hooks do nothing: the model is the base
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)


def test_load_and_unload_never_touch_the_base(setup):
    model, tok, paths = setup
    before, types = state(model), [type(m) for m in model.modules()]
    reg = AdapterRegistry(model, max_loras=2)
    reg.load("a", paths["a"])
    reg.load("b", paths["b"])
    reg.unload("a")
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types and not any(
        isinstance(m, LoRALinear) for m in model.modules())
    assert reg.names() == ["b"]
    info = reg.info("b")
    # r = 4 on q_proj (64 -> 64) and v_proj (64 -> 32) in 2 layers, float32
    assert info.nbytes == 2 * 4 * ((64 + 64) + (64 + 32)) * 4
    reg.close()
    assert hook_count(model) == 0


def test_lru_eviction_and_pins(setup):
    model, tok, paths = setup
    reg = AdapterRegistry(model, max_loras=2)
    reg.load("a", paths["a"])
    reg.load("b", paths["b"])
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    want_a = reg.forward(ids, ["a"])
    reg.forward(ids, ["b"])                 # b is now the most recently used
    reg.load("c", paths["c"])               # evicts a (least recently used)
    assert reg.resident() == ["b", "c"] and reg.names() == ["a", "b", "c"]
    pin_b, pin_c = reg.acquire("b"), reg.acquire("c")
    with pytest.raises(NoFreeSlot):
        reg.acquire("a")                    # both slots are pinned
    reg.release(pin_c)
    assert torch.equal(reg.forward(ids, ["a"]), want_a)  # read from disk again into c's slot
    assert reg.resident() == ["b", "a"]
    reg.release(pin_b)
    with pytest.raises(RuntimeError, match="not pinned"):
        reg.release(pin_b)


@pytest.mark.parametrize("case", ["missing", "other_base", "duplicate", "rank", "malformed",
                                  "base_name", "halfway"])
def test_failed_load_leaves_the_registry_as_it_was(setup, tmp_path, case, monkeypatch):
    model, tok, paths = setup
    reg = AdapterRegistry(model, max_loras=3, max_lora_rank=8, base_name="tiny")
    reg.load("a", paths["a"])
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    out_before, model_before = reg.forward(ids, ["a", None]), state(model)
    snapshot = (reg.names(), reg.resident(), reg.slot_bytes(), hook_count(model),
                {n: (s.A.clone(), s.B.clone()) for n, s in reg.stacks.items()})
    name, path, match = "new", paths["b"], None
    if case == "missing":
        path, match = tmp_path / "nowhere", "does not exist"
    elif case == "other_base":
        other, _ = build_tiny_qwen2(seed=7)
        path, match = make_adapter(other, tmp_path / "other", seed=4), "different base model"
    elif case == "duplicate":
        name, match = "a", "already loaded"
    elif case == "rank":
        path, match = paths["c"], "max_lora_rank"
    elif case == "malformed":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "adapter_config.json").write_text("{not json")
        (bad / "adapter_model.safetensors").write_bytes((paths["a"] / "adapter_model.safetensors").read_bytes())
        path, match = bad, "not valid JSON"
    elif case == "base_name":
        name, match = "tiny", "base model's name"
    elif case == "halfway":
        calls = {"n": 0}
        real_put = batched.SlotStack.put

        def flaky(self, *args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure")
            return real_put(self, *args)
        monkeypatch.setattr(batched.SlotStack, "put", flaky)
        match = "injected failure"
    with pytest.raises((AdapterError, RuntimeError), match=match):
        reg.load(name, path)
    monkeypatch.undo()
    assert (reg.names(), reg.resident(), reg.slot_bytes(), hook_count(model)) == snapshot[:4]
    for n, (A, B) in snapshot[4].items():
        assert torch.equal(reg.stacks[n].A, A) and torch.equal(reg.stacks[n].B, B)
    after = state(model)
    assert all(torch.equal(model_before[k], after[k]) for k in model_before)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.equal(reg.forward(ids, ["a", None]), out_before)


def test_unknown_adapter_and_wrong_row_count(setup):
    model, tok, paths = setup
    reg = AdapterRegistry(model)
    with pytest.raises(UnknownAdapter):
        reg.acquire("nope")
    with pytest.raises(UnknownAdapter):
        reg.unload("nope")
    with pytest.raises(ValueError, match="one per row"):
        reg.forward(torch.zeros(2, 3, dtype=torch.long), [None])


def test_peft_written_adapter_is_served(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    reg = AdapterRegistry(model)
    reg.load("p", tmp_path / "peft")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
    torch.testing.assert_close(reg.forward(ids, ["p"]), want, atol=1e-5, rtol=0)


# ---- sampling -----------------------------------------------------------------------------
def test_sample_token():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, 0.0, 1.0, g) == 1
    assert {sample_token(logits, 1.0, 0.01, g) for _ in range(20)} == {1}  # nucleus = top token
    assert {sample_token(logits, 1.0, 0.6, g) for _ in range(50)} == {1, 2}
    draws = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(40)]
    assert len(set(draws)) >= 3
    assert draws == [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(40)]


# ---- the engine ---------------------------------------------------------------------------
@pytest.fixture
def engine(setup):
    model, tok, paths = setup
    reg = AdapterRegistry(model, max_loras=3, max_lora_rank=16)
    for name, p in paths.items():
        reg.load(name, p)
    eng = Engine(model, tok, reg, max_num_seqs=8)
    yield eng, paths
    eng.close()


def prompt(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy(model, ids: list[int], n: int, eos) -> list[int]:
    """The reference: transformers' own greedy ``generate``, cut before the first EOS."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return out[:next((i for i, t in enumerate(out) if t in eos), len(out))]


def test_greedy_equals_transformers_generate(engine):
    eng, paths = engine
    model, tok = eng.model, eng.tokenizer
    ids = prompt(tok, "The capital of Vourremia is")
    for name in (None, "a", "b"):
        ref = model if name is None else with_adapter(model, paths[name])
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
        out = out[:next((i for i, t in enumerate(out) if t in eng.eos), len(out))]
        assert eng.generate(ids, name, SamplingParams(max_tokens=10)) == out, name


def test_concurrent_requests_equal_each_request_alone(engine):
    """N threads x M adapters, greedy and seeded sampling: every answer equals the answer the
    same request gets alone (no cross-adapter leakage, no dependence on batch-mates)."""
    eng, paths = engine
    tok = eng.tokenizer
    jobs = []
    for i in range(24):
        adapter = [None, "a", "b", "c"][i % 4]
        params = SamplingParams(max_tokens=6 + i % 7, temperature=0.0 if i % 3 == 0 else 1.0,
                                top_p=1.0 if i % 2 else 0.9, seed=100 + i)
        jobs.append((prompt(tok, f"request {i}: " + "x" * (i % 5)), adapter, params))
    alone = [eng.generate(*job) for job in jobs]
    assert len({tuple(a) for a in alone}) > 12  # the answers really differ
    results: dict[int, list[int]] = {}

    def worker(k):
        for j in range(k, len(jobs), 6):
            results[j] = eng.generate(*jobs[j])
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[j] for j in range(len(jobs))] == alone
    assert max(eng.batch_sizes) > 1, "the requests never shared a batch"


def test_eviction_with_requests_in_flight(setup):
    model, tok, paths = setup
    reg = AdapterRegistry(model, max_loras=1)
    for name, p in paths.items():
        reg.load(name, p)
    eng = Engine(model, tok, reg)
    try:
        jobs = [(prompt(tok, f"q{i}"), "abc"[i % 3], SamplingParams(max_tokens=8, temperature=1.0, seed=i))
                for i in range(9)]
        alone = [eng.generate(*j) for j in jobs]
        reqs = [eng.submit(*j) for j in jobs]   # 3 adapters, 1 slot: they take turns
        assert [r.result(60) for r in reqs] == alone
        assert all(reg.info(n).pins == 0 for n in "abc")
    finally:
        eng.close()


def test_load_and_unload_while_requests_run(engine, tmp_path):
    eng, paths = engine
    tok = eng.tokenizer
    ids = prompt(tok, "hello")
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=5)
    want = eng.generate(ids, "a", params)
    running = [eng.submit(ids, "a", params) for _ in range(3)]
    eng.registry.unload("a")                      # in use: finishes first, then frees its slot
    make_adapter(eng.model, tmp_path / "d", seed=9)
    eng.registry.load("d", tmp_path / "d")        # while the others run
    assert [r.result(60) for r in running] == [want] * 3
    with pytest.raises(UnknownAdapter):
        eng.submit(ids, "a", params)
    got = eng.generate(ids, "d", SamplingParams(max_tokens=4))   # d serves as itself:
    assert got == greedy(with_adapter(eng.model, tmp_path / "d"), ids, 4, eng.eos)
    assert got != eng.generate(ids, None, SamplingParams(max_tokens=4))  # not as the base
    eng.registry.load("a", paths["a"])            # the name can be used again
    assert eng.generate(ids, "a", params) == want


def test_stops_at_eos_and_max_tokens_and_refuses_bad_requests(engine):
    eng, _ = engine
    ids = prompt(eng.tokenizer, "hi")
    req = eng.submit(ids, None, SamplingParams(max_tokens=3))
    assert len(req.result(30)) == 3 and req.finish_reason == "length"
    eos = next(iter(eng.eos))
    # make EOS the argmax everywhere: the first token stops the request
    eng.model.lm_head.register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([eos]), 1e4))
    req = eng.submit(ids, None, SamplingParams(max_tokens=5))
    assert req.result(30) == [] and req.finish_reason == "stop"
    req = eng.submit(ids, None, SamplingParams(max_tokens=3, ignore_eos=True))  # vLLM's benchmark switch
    assert req.result(30) == [eos] * 3 and req.finish_reason == "length"
    with pytest.raises(PromptTooLong, match="maximum context length is 512"):
        eng.submit(list(range(200)) * 3, None, SamplingParams(max_tokens=1))
    for bad in (SamplingParams(max_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0)):
        with pytest.raises(ValueError):
            eng.submit(ids, None, bad)
    with pytest.raises(UnknownAdapter):
        eng.submit(ids, "nope")


# ---- lab 05's self-checks pass the library's functions and fail wrong ones ------------------
def test_lab05_checks():
    from loracore.checks import lab05
    from loracore.selfcheck import ExerciseFailed

    lab05.check_gather_rows(gather_factors)
    lab05.check_batched_lora(batched_lora_delta)
    lab05.check_mixed_lora(lambda out, x, A, B, s, slots: apply_mixed_lora(out, x, A, B, s, slots))

    def adds_zero_to_base_rows(out, x, A, B, s, slots):
        return out + batched_lora_delta(x, *gather_factors(A, B, s, slots.clamp(min=0)))

    def ignores_scaling(x, A, B, s):
        return batched_lora_delta(x, A, B, torch.ones_like(s))
    for check, wrong in ((lab05.check_mixed_lora, adds_zero_to_base_rows),
                         (lab05.check_batched_lora, ignores_scaling),
                         (lab05.check_gather_rows, lambda A, B, s, slots: (A[:len(slots)], B[:len(slots)], s))):
        with pytest.raises(ExerciseFailed):
            check(wrong)
