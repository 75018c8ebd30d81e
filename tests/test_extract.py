"""extract_lora: an adapter from two models' ΔW by truncated SVD, exact at full rank, checked
against PEFT loading the saved file.

Tolerances. A model made by merging a rank-4 adapter stores ``float32(W + ΔW)``, so the ΔW
seen by extraction carries float32 rounding of W (about 6e-8 relative); the extracted factors
reproduce ΔW to 1e-6 relative (measured ~8e-8), and the adapter's logits (PEFT's
``x @ W.T + (x @ A.T) @ B.T``) match the merged model's (``x @ (W + ΔW).T``) to 1e-5 on logits
of size ~1 (measured ~3e-7): the same float32 rounding of a 2-layer forward pass in two orders.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import assert_unchanged, fail_on_call, randomize_B, snapshot, tiny_qwen2
from transformers import AutoModelForCausalLM

import loracore.surgery as surgery
from loracore.adapters import save_adapter
from loracore.extract import extract_lora, rank_for_energy
from loracore.merged import merge_and_save
from loracore.models import load_base_model
from loracore.surgery import inject, lora_layers

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

TOKENS = torch.tensor([[5, 70, 101, 33, 200, 17, 64, 3], [9, 9, 120, 45, 2, 250, 31, 77]])


def base() -> torch.nn.Module:
    return load_base_model("tiny-qwen2", verbose=False)[0]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def peft_logits(folder) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own deprecation notices
        return logits(PeftModel.from_pretrained(base(), folder).eval())


def with_update(model, ranks: dict[str, int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Add a random update of the given rank to each layer named (by its last part) in
    ``ranks``; returns the exact ΔW added per full module name."""
    g = torch.Generator().manual_seed(seed)
    added = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in ranks and isinstance(module, torch.nn.Linear):
                out, inp = module.weight.shape
                k = ranks[leaf]
                delta = (torch.randn(out, k, generator=g) @ torch.randn(k, inp, generator=g)) * 0.01
                module.weight += delta
                added[name] = delta
    return added


def test_a_merged_course_adapter_is_recovered_exactly_at_its_rank(tmp_path):
    """A rank-4 adapter merged into the base (merge_and_save, reloaded as a plain model),
    extracted at r=4, saved, loaded by PEFT: the merged model's logits."""
    adapted = base()
    inject(adapted, "all-linear", r=4, lora_alpha=8)
    randomize_B(adapted)
    merge_and_save(adapted, tmp_path / "merged")
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    target = base()
    before = snapshot(tuned)

    result = extract_lora(tuned, target, r=4)

    assert_unchanged(tuned, before)
    assert set(result.ranks) == set(lora_layers(adapted)) and set(result.ranks.values()) == {4}
    assert max(result.errors.values()) < 1e-6, result.errors
    assert min(result.energy.values()) > 1 - 1e-9 and not result.not_captured and not result.unchanged
    for name, layer in lora_layers(target).items():  # the update itself, not only the logits
        original = lora_layers(adapted)[name].get_delta_weight("default")
        extracted = layer.get_delta_weight("default")
        assert layer.lora_alpha["default"] == 4 and layer.scaling["default"] == 1.0
        assert (extracted - original).norm() / original.norm() < 1e-6, name
    save_adapter(target, tmp_path / "extracted")
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 4.0, {})
    torch.testing.assert_close(peft_logits(tmp_path / "extracted"), logits(tuned), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(base()), logits(tuned), atol=1e-3)  # the update is visible


def test_below_the_rank_the_error_is_eckart_youngs():
    tuned = base()
    added = with_update(tuned, {"q_proj": 6, "up_proj": 6})
    target = base()
    result = extract_lora(tuned, target, r=2, target_modules=["q_proj", "up_proj"])
    assert set(result.ranks) == set(added) and set(result.ranks.values()) == {2}
    for name, delta in added.items():
        S = torch.linalg.svdvals(delta.double())
        tail = (S[2:] ** 2).sum().sqrt() / S.norm()  # the best rank-2 error there is
        assert result.errors[name] == pytest.approx(tail.item(), rel=1e-4)
        assert result.energy[name] == pytest.approx(((S[:2] ** 2).sum() / (S ** 2).sum()).item(), rel=1e-6)
        assert 0.05 < result.errors[name] < 1


def test_energy_picks_a_rank_per_layer_and_peft_reads_the_pattern(tmp_path):
    tuned = base()
    added = with_update(tuned, {"q_proj": 2, "v_proj": 5, "down_proj": 3})
    target = base()
    result = extract_lora(tuned, target, energy=1.0)  # each layer's numerical rank
    assert result.ranks == {n: {"q_proj": 2, "v_proj": 5, "down_proj": 3}[n.rpartition(".")[2]]
                            for n in added}
    assert max(result.errors.values()) < 1e-6
    assert len(result.unchanged) == 14 - len(added)  # 7 linear layers x 2 blocks, the rest equal
    save_adapter(target, tmp_path / "extracted")
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == {
        k: float(v) for k, v in config["rank_pattern"].items()}  # scaling 1 on every layer
    torch.testing.assert_close(peft_logits(tmp_path / "extracted"), logits(tuned), rtol=0, atol=1e-5)

    smaller = extract_lora(tuned, base(), energy=0.8)
    for name in added:
        assert smaller.ranks[name] <= result.ranks[name] and smaller.energy[name] >= 0.8
        S = torch.linalg.svdvals(added[name].double())
        k = smaller.ranks[name]
        assert k == 1 or ((S[:k - 1] ** 2).sum() / (S ** 2).sum()).item() < 0.8  # the smallest such k


def test_rank_for_energy():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 13, 14 of 14
    assert [rank_for_energy(S, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert rank_for_energy(torch.tensor([1.0, 1e-9]), 1.0, tol=1e-6) == 1  # noise is not rank


def test_what_an_adapter_cannot_hold_is_listed_and_warned_about():
    tuned = base()
    with_update(tuned, {"o_proj": 2})
    with torch.no_grad():
        tuned.model.norm.weight += 0.1
        tuned.model.layers[0].self_attn.q_proj.bias += 0.1
    with pytest.warns(UserWarning, match="2 parameters differ.*not in the adapter"):
        result = extract_lora(tuned, base(), r=2)
    assert sorted(result.not_captured) == ["model.layers.0.self_attn.q_proj.bias", "model.norm.weight"]
    assert list(result.ranks) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_a_second_extraction_goes_beside_the_first():
    tuned_a, tuned_b = base(), base()
    with_update(tuned_a, {"q_proj": 2}, seed=1)
    with_update(tuned_b, {"q_proj": 3}, seed=2)
    target = base()
    extract_lora(tuned_a, target, r=2, adapter_name="a")
    result = extract_lora(tuned_b, target, r=3, adapter_name="b")
    assert max(result.errors.values()) < 1e-6
    layer = target.get_submodule("model.layers.0.self_attn.q_proj")
    assert sorted(layer.lora_A) == ["a", "b"] and layer.active_adapters == ["b"]


def test_refusals_name_the_problem_and_change_nothing():
    tuned = base()
    with_update(tuned, {"q_proj": 2})
    target = base()
    before = snapshot(target)
    with pytest.raises(ValueError, match="exactly one of r .* or energy"):
        extract_lora(tuned, target)
    with pytest.raises(ValueError, match="exactly one of r"):
        extract_lora(tuned, target, r=2, energy=0.9)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="r must be a positive int"):
            extract_lora(tuned, target, r=bad)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
            extract_lora(tuned, target, energy=bad)
    # same class, other shapes (intermediate 96, vocabulary 128): the module and both shapes named
    with pytest.raises(ValueError, match=r"'model.embed_tokens': weight has shape \(128, 64\) in the "
                                         r"tuned model and \(259, 64\) in the base"):
        extract_lora(tiny_qwen2(), target, r=2)
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM and the base a Qwen2ForCausalLM"):
        extract_lora(llama, target, r=2)
    with pytest.raises(ValueError, match="equal weights in every targeted layer"):
        extract_lora(base(), target, r=2)
    with pytest.raises(ValueError, match="extract_lora: target_modules \\['nope'\\] match no linear layer"):
        extract_lora(tuned, target, r=2, target_modules=["nope"])
    with_lora = copy.deepcopy(tuned)
    inject(with_lora, ["q_proj"], r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="tuned model has LoRA layers"):
        extract_lora(with_lora, target, r=2)
    assert_unchanged(target, before)


def test_a_failure_half_way_leaves_the_base_as_it_was(monkeypatch):
    tuned = base()
    with_update(tuned, {"q_proj": 2, "v_proj": 3})
    target = base()
    before = snapshot(target)
    fail_on_call(monkeypatch, surgery, "_replace", 3)  # the third layer swapped in
    with pytest.raises(RuntimeError, match="injected failure"):
        extract_lora(tuned, target, energy=1.0)
    assert_unchanged(target, before)
    assert not lora_layers(target)
