"""PagedAdamW: AdamW's numbers with and without paging, the resident bound, checkpoints taken
while pages are out, 8-bit state byte-identical to bitsandbytes, and every refusal."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch

import loracore.optim as optim_mod
from loracore.lora import inject
from loracore.optim import MIN_8BIT_SIZE, PagedAdamW
from loracore.quant8 import dequantize_blockwise, dynamic_map, quantize_blockwise
from loracore.train import loraplus_param_groups, train

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

# Shapes with every awkward case: 2-D, odd 1-D, above and below the 8-bit threshold, not a
# multiple of the 256-element block, and one larger than the tests' page budgets.
SHAPES = [(48, 40), (301,), (16, 200), (MIN_8BIT_SIZE + 77,), (7,)]


def params(shapes=SHAPES, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def run(ps, opt, steps, seed=1, start=0):
    """``steps`` updates with seeded gradients (step ``start`` onwards, so a run can resume)."""
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(seed * 100_000 + t)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()
    return ps


def max_diff(a, b):
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b))


HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


# ---------------------------------------------------------------- 32-bit: AdamW itself

def test_equals_torch_adamw_without_paging():
    ref = params()
    run(ref, torch.optim.AdamW(ref, **HYPER), 100)
    ours = params()
    with PagedAdamW(ours, **HYPER) as opt:
        run(ours, opt, 100)
        stats = opt.paging_stats()
    assert max_diff(ref, ours) < 1e-6
    assert max_diff(params(), ours) > 1e-2  # it did move
    assert stats["page_outs"] == 0 and stats["page_ins"] == 0 and stats["offload_file"] is None


def test_equals_torch_adamw_with_evictions_every_step(tmp_path):
    ref = params()
    run(ref, torch.optim.AdamW(ref, **HYPER), 100)
    ours = params()
    budget = 4 * 1024  # 4 pages of 1 KiB for about 90 KiB of state
    with PagedAdamW(ours, **HYPER, page_bytes=1024, resident_bytes=budget,
                    offload_dir=str(tmp_path)) as opt:
        before = opt.paging_stats()
        for t in range(100):
            run(ours, opt, 1, start=t)
            now = opt.paging_stats()
            assert now["page_outs"] > before["page_outs"] and now["page_ins"] > before["page_ins"]
            assert now["peak_resident_bytes"] <= budget + 1024
            before = now
        assert now["bytes_out"] == now["page_outs"] * 1024
        assert now["state_bytes"] > 10 * budget
    assert max_diff(ref, ours) < 1e-6


def test_states_inside_one_page_and_across_pages_both_equal_torch_adamw():
    """Small tensors whose states each sit inside one page take the uncut window; larger ones
    straddle pages and are cut where their slots stop being consecutive. Both, with pages
    moving every step, give torch's AdamW."""
    shapes = [(7,), (20, 3), (300,), (5,), (33, 17), (1,), (64,)]
    ref = params(shapes)
    run(ref, torch.optim.AdamW(ref, **HYPER), 30)
    ours = params(shapes)
    with PagedAdamW(ours, **HYPER, page_bytes=1024, resident_bytes=4 * 1024) as opt:
        kinds = {opt._layout[p].one_page_each for p in ours}
        run(ours, opt, 30)
        assert opt.paging_stats()["page_outs"] > 0
    assert kinds == {True, False}  # both paths were taken
    assert max_diff(ref, ours) < 1e-6


def test_peak_resident_never_exceeds_budget_plus_one_page():
    # A parameter whose state alone is larger than the budget is updated page by page.
    shapes = [(9000,), (300,), (40, 40), (5000,)]
    for page, pages in [(256, 2), (1024, 3), (4096, 5)]:
        ps = params(shapes)
        with PagedAdamW(ps, page_bytes=page, resident_bytes=pages * page + 100) as opt:
            run(ps, opt, 3)
            opt.set_resident_bytes(2 * page)  # a spike: the budget falls mid-training
            assert opt.paging_stats()["resident_bytes"] <= 2 * page
            run(ps, opt, 2, start=3)
            stats = opt.paging_stats()
        assert stats["peak_resident_bytes"] <= pages * page + 100 + page
        assert stats["page_outs"] > 0


def test_prefetch_brings_the_next_parameter_in_ahead():
    ps = params([(1000,), (1000,), (1000,), (1000,)])  # 8000 bytes of state each
    with PagedAdamW(ps, page_bytes=1024, resident_bytes=20 * 1024) as opt:
        run(ps, opt, 3)
        stats = opt.paging_stats()
    assert stats["prefetched_pages"] > 0 and stats["page_ins"] >= stats["prefetched_pages"]


def test_pages_really_go_to_the_file_and_it_is_removed_on_close(tmp_path):
    ps = params()
    opt = PagedAdamW(ps, page_bytes=1024, resident_bytes=2048, offload_dir=str(tmp_path))
    run(ps, opt, 2)
    path = opt.paging_stats()["offload_file"]
    assert path is not None and os.path.dirname(os.path.dirname(path)) == str(tmp_path)
    assert os.path.getsize(path) == opt.paging_stats()["pages"] * 1024
    with open(path, "rb") as f:
        assert any(f.read())  # evicted state is there, not zeros
    opt.close()
    opt.close()  # twice is fine
    assert not os.path.exists(os.path.dirname(path)) and os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()


def test_files_are_removed_when_a_step_raises(tmp_path, monkeypatch):
    ps = params()
    calls = {"n": 0}
    real = optim_mod.adamw_update_

    def failing(*args, **kwargs):  # fail half-way through a step, after pages moved
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError("disk full (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(optim_mod, "adamw_update_", failing)
    with pytest.raises(OSError, match="injected"):
        with PagedAdamW(ps, page_bytes=1024, resident_bytes=2048,
                        offload_dir=str(tmp_path)) as opt:
            run(ps, opt, 3)
    assert opt.paging_stats()["offload_file"] is None and os.listdir(tmp_path) == []

    # Without close(): dropping the optimizer removes the files too.
    opt = PagedAdamW(params(), page_bytes=1024, resident_bytes=2048, offload_dir=str(tmp_path))
    calls["n"] = -1000
    run(opt.param_groups[0]["params"], opt, 1)
    assert len(os.listdir(tmp_path)) == 1
    del opt
    gc.collect()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("state_bits", [32, 8])
def test_resume_mid_paging_gives_the_same_next_steps(state_bits):
    kw = dict(**HYPER, state_bits=state_bits, page_bytes=1024, resident_bytes=4096)
    straight = params()
    with PagedAdamW(straight, **kw) as opt:
        run(straight, opt, 5)
        stats = opt.paging_stats()
        assert stats["resident_bytes"] < stats["state_bytes"]  # some pages are out right now
        saved = opt.state_dict()
        saved_params = [p.detach().clone() for p in straight]
        assert opt.paging_stats() == stats  # saving moved nothing
        run(straight, opt, 5, start=5)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    with PagedAdamW(resumed, **{**kw, "resident_bytes": 8192}) as opt2:  # another budget
        opt2.load_state_dict(saved)
        again = opt2.state_dict()
        for i, entry in saved["state"].items():
            for name, value in entry.items():
                assert torch.equal(value, again["state"][i][name]), (i, name)
        run(resumed, opt2, 5, start=5)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_state_dict_is_torch_adamw_shaped():
    ps = params()
    ref = torch.optim.AdamW(ref_ps := params(), **HYPER)
    run(ref_ps, ref, 3)
    with PagedAdamW(ps, **HYPER, page_bytes=1024, resident_bytes=2048) as opt:
        run(ps, opt, 3)
        ours = opt.state_dict()
    theirs = ref.state_dict()
    assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    for i, entry in theirs["state"].items():
        assert float(ours["state"][i]["step"]) == float(entry["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            assert ours["state"][i][name].shape == entry[name].shape
            assert torch.allclose(ours["state"][i][name], entry[name], rtol=1e-5, atol=1e-7)


def test_load_state_dict_from_other_parameters_is_refused_and_changes_nothing():
    ps = params()
    with PagedAdamW(ps, page_bytes=1024, resident_bytes=4096) as opt:
        run(ps, opt, 2)
        other_shapes = list(SHAPES)
        other_shapes[2] = (8, 200)
        other = params(other_shapes)
        with PagedAdamW(other, page_bytes=1024) as opt_other:
            run(other, opt_other, 1)
            wrong = opt_other.state_dict()
        before, stats = opt.state_dict(), opt.paging_stats()
        with pytest.raises(ValueError, match=r"group 0 parameter 2: saved shape \[8, 200\], "
                                             r"here \[16, 200\]"):
            opt.load_state_dict(wrong)
        with pytest.raises(ValueError, match="parameter group"):
            opt.load_state_dict({**before, "param_groups": before["param_groups"] * 2})
        with PagedAdamW(params(), state_bits=8) as opt8:
            with pytest.raises(ValueError, match="8-bit state"):
                opt.load_state_dict(opt8.state_dict())
        with pytest.raises(ValueError, match="not a PagedAdamW state_dict"):
            opt.load_state_dict(torch.optim.AdamW(params()).state_dict())
        after = opt.state_dict()
        assert opt.paging_stats() == stats
        for i, entry in before["state"].items():
            for name, value in entry.items():
                assert torch.equal(value, after["state"][i][name])


def test_refusal_names_the_lora_plus_group(tiny):
    model, _ = tiny
    inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    groups = loraplus_param_groups(model, lr=1e-3)
    opt = PagedAdamW(groups)
    saved = opt.state_dict()
    saved["paged_adamw"]["shapes"][0] = [1, 1]
    with pytest.raises(ValueError, match=r"group 0 \('lora_A'\) parameter 0"):
        opt.load_state_dict(saved)


# ---------------------------------------------------------------- 8-bit state

def test_dynamic_maps_equal_bitsandbytes():
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), bnbF.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_bytes_equal_bitsandbytes_quantize_blockwise(signed):
    code = dynamic_map(signed)
    g = torch.Generator().manual_seed(0)
    for n in (1, 255, 256, 257, 1000, 4096 + 77):
        for scale in (1e-7, 1e-3, 1.0, 30.0):
            x = torch.randn(n, generator=g) * scale
            x = x if signed else x * x
            if n >= 512:
                x[256:512] = 0  # a block of zeros
            q, absmax = quantize_blockwise(x, code)
            ref_q, ref_state = bnbF.quantize_blockwise(x, code=code.clone(), blocksize=256)
            assert torch.equal(q, ref_q), (n, scale)
            assert torch.equal(absmax, ref_state.absmax), (n, scale)
            ref_x = bnbF.dequantize_blockwise(ref_q, ref_state)
            assert torch.equal(dequantize_blockwise(q, absmax, code), ref_x)


@pytest.mark.parametrize("paged", [False, True])
def test_8bit_updates_match_bitsandbytes_adamw8bit(paged):
    ref = params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_opt = bnb.optim.AdamW8bit(ref, **HYPER)
    run(ref, bnb_opt, 50)
    ours = params()
    kw = dict(page_bytes=1024, resident_bytes=4096) if paged else {}
    with PagedAdamW(ours, **HYPER, state_bits=8, **kw) as opt:
        run(ours, opt, 50)
        state = opt.state_dict()["state"]
        assert (opt.paging_stats()["page_outs"] > 0) == paged
    for i, (a, b) in enumerate(zip(ref, ours)):
        if a.numel() >= MIN_8BIT_SIZE:  # 8-bit state: the same bytes, the same parameters
            s = bnb_opt.state[a]
            assert torch.equal(a, b)
            assert torch.equal(state[i]["exp_avg"], s["state1"])
            assert torch.equal(state[i]["exp_avg_sq"], s["state2"])
            assert torch.equal(state[i]["exp_avg_absmax"], s["absmax1"])
        else:  # float32 state; bitsandbytes orders the 32-bit arithmetic a little differently
            assert state[i]["exp_avg"].dtype == torch.float32
            assert (a - b).abs().max() < 1e-6


def test_8bit_state_is_about_a_quarter_of_32bit():
    shapes = [(256, 256), (1024, 64)]
    sizes = {}
    for bits in (32, 8):
        ps = params(shapes)
        with PagedAdamW(ps, state_bits=bits, page_bytes=256) as opt:
            sizes[bits] = opt.paging_stats()["state_bytes"]
    assert sizes[8] / sizes[32] <= 0.26  # 2 bytes + 8 bytes per 256 vs 8 bytes per element


# ---------------------------------------------------------------- with the training loop

def test_trains_with_loracore_train_and_lora_plus_groups(tiny):
    from loracore.data import load_sft_dataset, make_dataloader
    from pathlib import Path

    model, tokenizer = tiny
    inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    data = load_sft_dataset(Path(__file__).resolve().parent.parent / "data" /
                            "capitals_train.jsonl", tokenizer, max_length=128, limit=4)
    batches = list(make_dataloader(data, tokenizer, batch_size=2, shuffle=False))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = {}
    for kind in ("torch", "paged"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        groups = loraplus_param_groups(model, lr=1e-2, weight_decay=0.01)
        opt = (torch.optim.AdamW(groups) if kind == "torch" else
               PagedAdamW(groups, page_bytes=1024, resident_bytes=4096))
        losses[kind] = train(model, batches, num_steps=6, optimizer=opt, progress=False).losses
        if kind == "paged":
            assert opt.paging_stats()["page_outs"] > 0
            assert [g["name"] for g in opt.param_groups] == ["lora_A", "lora_B"]
            opt.close()
    assert losses["paged"][-1] < losses["paged"][0]
    assert max(abs(a - b) for a, b in zip(losses["torch"], losses["paged"])) < 1e-4


# ---------------------------------------------------------------- refusals

def test_bad_arguments_are_refused(tmp_path):
    ps = params()
    with pytest.raises(ValueError, match="state_bits must be 8 or 32"):
        PagedAdamW(ps, state_bits=16)
    with pytest.raises(ValueError, match="smaller than one page"):
        PagedAdamW(ps, page_bytes=4096, resident_bytes=1000)
    with pytest.raises(ValueError, match="at least 4096 bytes"):
        PagedAdamW(ps, state_bits=8, page_bytes=1024, resident_bytes=2048)
    with pytest.raises(ValueError, match="multiple of 256"):
        PagedAdamW(ps, page_bytes=1000)
    with pytest.raises(ValueError, match="not a directory"):
        PagedAdamW(ps, offload_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="floating-point"):
        PagedAdamW([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(ps, betas=(0.9, 1.0))
    opt = PagedAdamW(ps, page_bytes=1024, resident_bytes=4096)
    with pytest.raises(ValueError, match="smaller than one page"):
        opt.set_resident_bytes(10)


def test_unwritable_offload_dir_is_refused(tmp_path):
    if os.geteuid() == 0:  # root writes through permissions; /proc refuses new files to all
        locked = "/proc"
    else:
        (tmp_path / "locked").mkdir()
        (tmp_path / "locked").chmod(0o500)
        locked = str(tmp_path / "locked")
    with pytest.raises(ValueError, match="not writable"):
        PagedAdamW(params(), offload_dir=locked)


def test_sparse_gradients_are_refused_before_anything_changes():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.randn(5))
    opt = PagedAdamW([dense, emb.weight])
    dense.grad = torch.ones(5)
    emb(torch.tensor([1, 2])).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(ValueError, match="sparse gradient.*Nothing was changed"):
        opt.step()
    assert torch.equal(dense, before) and opt.state_dict()["state"] == {}


# ---------------------------------------------------------------- CUDA (pinned host tier)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pages_to_pinned_memory_and_equals_adamw():
    ref = params(device="cuda")
    run(ref, torch.optim.AdamW(ref, **HYPER), 20)
    ours = params(device="cuda")
    with PagedAdamW(ours, **HYPER, page_bytes=1024, resident_bytes=4096) as opt:
        run(ours, opt, 20)
        stats = opt.paging_stats()
        assert opt._pool._slow.is_pinned() and stats["offload_file"] is None
    assert stats["page_outs"] > 0 and max_diff(ref, ours) < 1e-5
