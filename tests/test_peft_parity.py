"""loracore against PEFT, the trusted implementation: same A and B, same logits (within 1e-5),
and adapter files that each library loads from the other, with and without rsLoRA.

The SmolLM2-135M tests are marked ``slow`` (each loads the real model once, ~3 s cached).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402

from loracore.adapters import load_adapter, save_adapter  # noqa: E402
from loracore.lora import LoRALinear, inject, lora_layers  # noqa: E402
from loracore.models import load_base_model  # noqa: E402

ATOL = 1e-5
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(name: str) -> nn.Module:
    """A fresh copy of a base model (loading is faster than deep-copying SmolLM2)."""
    return load_base_model(name, verbose=False)[0]


def randomize_lora(modules, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero B (and a fresh A) in every LoRA layer of loracore or PEFT."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for d in (m.lora_A, m.lora_B):
                for lin in d.values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


def peft_lora_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, PeftLinear)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_both_directions(name: str, targets, use_rslora: bool, tmp_path) -> None:
    ours = load(name)
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    base_logits = logits(ours, ids)
    r, alpha = 8, 16

    # loracore -> PEFT
    inject(ours, targets, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    randomize_lora(lora_layers(ours).values(), seed=1)
    save_adapter(ours, tmp_path / "loracore_adapter")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Unexpected keyword")  # our config is PEFT's own
        theirs = PeftModel.from_pretrained(load(name), tmp_path / "loracore_adapter").eval()
    assert len(peft_lora_modules(theirs)) == len(lora_layers(ours))
    want = logits(theirs, ids)
    torch.testing.assert_close(logits(ours, ids), want, atol=ATOL, rtol=0)
    assert (want - base_logits).abs().max() > 1e-3  # the adapter really changes the model
    del ours

    # PEFT -> loracore
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                        task_type="CAUSAL_LM")
    theirs = get_peft_model(load(name), config).eval()
    randomize_lora(peft_lora_modules(theirs), seed=2)
    theirs.save_pretrained(tmp_path / "peft_adapter")
    ours = load_adapter(load(name), tmp_path / "peft_adapter")
    assert len(lora_layers(ours)) == len(peft_lora_modules(theirs))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_matches_peft_linear(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    ours = LoRALinear(copy.deepcopy(base), r=4, lora_alpha=16, use_rslora=use_rslora)
    theirs = get_peft_model(nn.Sequential(copy.deepcopy(base)),
                            LoraConfig(r=4, lora_alpha=16, target_modules=["0"], use_rslora=use_rslora))
    peft_layer = peft_lora_modules(theirs)[0]
    randomize_lora([ours], seed=3, std=0.2)
    with torch.no_grad():
        for d in ("lora_A", "lora_B"):
            getattr(peft_layer, d)["default"].weight.copy_(getattr(ours, d)["default"].weight)
    assert ours.scaling["default"] == peft_layer.scaling["default"]
    x = torch.randn(5, 32)
    torch.testing.assert_close(ours(x), peft_layer(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.get_delta_weight("default"), peft_layer.get_delta_weight("default"))
    ours.merge()
    peft_layer.merge()
    torch.testing.assert_close(ours.base_layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_tiny_qwen2_adapters_match_peft_both_ways(use_rslora, tmp_path):
    check_both_directions("tiny-qwen2", SEVEN, use_rslora, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("use_rslora", [False, True])
def test_smollm2_adapters_match_peft_both_ways(use_rslora, tmp_path):
    targets = SEVEN if use_rslora else ["q_proj", "v_proj"]
    check_both_directions("smollm2-135m", targets, use_rslora, tmp_path)
