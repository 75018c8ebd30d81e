"""How the serving registry reads adapters (loracore/serve/registry.py): with read_adapter and
check_base, never by wrapping the live model in LoRA layers, and reporting each file's own
``r`` and ``lora_alpha``, right for rsLoRA and for mixed per-module ranks.

All on the tiny random Qwen2."""

from __future__ import annotations

import ast
import copy
import inspect
import json
import math

import pytest
import torch
from safetensors import safe_open

import loracore.serve.registry as registry_mod
from loracore.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loracore.layer import LoRALinear
from loracore.serve import AdapterError, AdapterRegistry
from loracore.surgery import inject, lora_layers


def save_random(model, path, parts, *, seed: int = 1):
    """Save ``model``'s adapter "default" after giving every B a non-zero value; ``parts``:
    ``[(targets, r, lora_alpha, use_rslora), ...]`` injected in turn (mixed ranks)."""
    m = copy.deepcopy(model)
    for targets, r, alpha, rslora in parts:
        inject(m, targets, r, alpha, use_rslora=rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in lora_layers(m).values():
            w = lay.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return save_adapter(m, path)


def served_equals_loaded(model, reg, name, folder) -> None:
    """The registry's output for ``name`` is the model with the adapter loaded the ordinary way."""
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    reference = load_adapter(copy.deepcopy(model), folder).eval()
    with torch.no_grad():
        want, base = reference(input_ids=ids).logits, model(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3, "test adapter too weak to prove anything"
    torch.testing.assert_close(reg.forward(ids, [name, name]), want, atol=1e-5, rtol=0)


def test_rslora_adapter_reports_its_own_alpha(tiny, tmp_path):
    model, _ = tiny
    folder = save_random(model, tmp_path / "rs", [(["q_proj", "v_proj"], 16, 8, True)])
    reg = AdapterRegistry(model, max_loras=2, max_lora_rank=16)
    info = reg.load("rs", folder)
    assert (info.r, info.lora_alpha, info.use_rslora) == (16, 8, True)
    assert info.lora_alpha != 8 / math.sqrt(16) * 16  # what scaling * r reported before
    assert info.rank_pattern == {} and info.alpha_pattern == {}
    served_equals_loaded(model, reg, "rs", folder)


def test_mixed_rank_adapter_reports_the_files_r_alpha_and_patterns(tiny, tmp_path):
    model, _ = tiny
    folder = save_random(model, tmp_path / "mixed", [(["q_proj", "k_proj"], 8, 16, False),
                                                     (["down_proj"], 2, 6, False)])
    config = json.loads((folder / CONFIG_NAME).read_text())
    reg = AdapterRegistry(model, max_loras=2, max_lora_rank=8)
    info = reg.load("mixed", folder)
    assert (info.r, info.lora_alpha) == (config["r"], config["lora_alpha"]) == (8, 16)
    assert info.rank_pattern == config["rank_pattern"] == {f"model.layers.{i}.mlp.down_proj": 2
                                                          for i in range(2)}
    assert info.alpha_pattern == config["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 6
                                                            for i in range(2)}
    assert len(info.modules) == 6
    ranks = {n: 2 if "down_proj" in n else 8 for n in info.modules}
    layers = {n: model.get_submodule(n) for n in info.modules}
    assert info.nbytes == sum(4 * r * (layers[n].in_features + layers[n].out_features)
                              for n, r in ranks.items())  # float32 factors at their own ranks
    served_equals_loaded(model, reg, "mixed", folder)


def test_a_peft_rslora_file_reports_peft_config_values(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = tiny
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "up_proj"],
        rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    reg = AdapterRegistry(model, max_lora_rank=4)
    info = reg.load("p", tmp_path / "peft")
    assert (info.r, info.lora_alpha, info.use_rslora) == (4, 12, True)
    assert info.rank_pattern == {f"model.layers.{i}.mlp.up_proj": 2 for i in range(2)}
    assert info.alpha_pattern == {f"model.layers.{i}.mlp.up_proj": 3 for i in range(2)}
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
    torch.testing.assert_close(reg.forward(ids, ["p"]), want, atol=1e-5, rtol=0)


def test_reading_never_wraps_the_model(tiny, tmp_path, monkeypatch):
    """No LoRA layer is made, even for a moment: the registry reads files, it does not load
    them into the model."""
    model, _ = tiny
    folder = save_random(model, tmp_path / "a", [("all-linear", 4, 8, False)])

    def refuse(*args, **kwargs):
        raise AssertionError("the registry must not build a LoRALinear")

    monkeypatch.setattr(LoRALinear, "__init__", refuse)
    reg = AdapterRegistry(model, max_loras=1)
    reg.load("a", folder)
    reg.load("b", folder)  # no free slot: "a" is evicted, "b" read
    reg.acquire("a")  # "a" read again from disk
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_registry_imports_neither_the_layer_nor_the_surgery():
    tree = ast.parse(inspect.getsource(registry_mod))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert "loracore.adapter_file" in imported  # the test can see imports at all
    assert not imported & {"loracore.layer", "loracore.surgery", "loracore.lora"}


def test_newer_record_format_is_refused_and_the_registry_is_unchanged(tiny, tmp_path):
    import safetensors.torch
    model, _ = tiny
    good = save_random(model, tmp_path / "good", [(["q_proj"], 4, 8, False)])
    newer = save_random(model, tmp_path / "newer", [(["q_proj"], 4, 8, False)])
    path = newer / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    metadata["loracore"] = json.dumps(json.loads(metadata["loracore"]) | {"format": 2})
    safetensors.torch.save_file(safetensors.torch.load_file(str(path)), str(path), metadata=metadata)
    reg = AdapterRegistry(model, max_loras=2)
    reg.load("good", good)
    with pytest.raises(AdapterError, match="AdapterRegistry: the loracore record .* has format 2; "
                                           "this loracore reads format 1"):
        reg.load("newer", newer)
    assert reg.names() == ["good"] and reg.resident() == ["good"]
