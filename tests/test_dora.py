"""DoRA (loracore.dora, LoRALinear(use_dora=True)) against PEFT's ``LoraConfig(use_dora=True)``.

Same A, B and magnitude give the same logits, the same gradients and the same few training
steps; merge/unmerge are exact; adapter files go both ways between loracore and PEFT; the places
that cannot handle DoRA refuse it by name. Everything on tiny-qwen2 (float32 unless said), seconds.
"""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from loracore import dora  # noqa: E402
from loracore.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter  # noqa: E402
from loracore.combine import combine_adapters  # noqa: E402
from loracore.layer import LoRALinear  # noqa: E402
from loracore.qlora import Linear4bit, quantize_model  # noqa: E402
from loracore.serve import AdapterError, AdapterRegistry  # noqa: E402
from loracore.surgery import (delete_adapter, inject, lora_layers, merge_adapters,  # noqa: E402
                              remove_lora, set_adapter, trainable_parameters, unmerge_adapters)

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # q, v have a bias in Qwen2; o, down do not
R, ALPHA = 4, 8
ATOL = 1e-5
MAG = "lora_magnitude_vector"


@pytest.fixture
def base(tiny):
    return tiny[0].eval()


@pytest.fixture
def ids(base):
    return torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def randomize(model: nn.Module, adapter: str = "default", seed: int = 1, std: float = 0.1) -> None:
    """Random A and non-zero B (the magnitude stays at its init ‖W‖, so m/‖W+ΔW‖ != 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if adapter in layer.lora_A:
                for d in (layer.lora_A, layer.lora_B):
                    w = d[adapter].weight
                    w.copy_(torch.randn(w.shape, generator=g) * std)


def dora_model(base: nn.Module, *, seed: int = 1, **kw) -> nn.Module:
    model = inject(copy.deepcopy(base), TARGETS, r=R, lora_alpha=ALPHA, use_dora=True, **kw)
    randomize(model, seed=seed)
    return model


def peft_twin(ours: nn.Module, base: nn.Module, adapters=("default",), **kw) -> nn.Module:
    """A PEFT DoRA model holding exactly our adapters' A, B and magnitude."""
    theirs = None
    for name in adapters:
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True, **kw)
        if theirs is None:
            theirs = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
    state = theirs.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if ".lora_" in key:
                state["base_model.model." + key].copy_(value)
                copied += 1
    assert copied == len(lora_layers(ours)) * 3 * len(adapters)
    return theirs


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- the layer -------------------------------------------------------------------------------
def test_magnitude_starts_at_row_norms_and_the_model_at_the_base(base, ids):
    model = inject(copy.deepcopy(base), TARGETS, r=R, lora_alpha=ALPHA, use_dora=True)
    for name, layer in lora_layers(model).items():
        m = layer.lora_magnitude_vector["default"].weight
        assert m.shape == (layer.out_features,) and m.requires_grad
        torch.testing.assert_close(m, torch.linalg.norm(layer.base_layer.weight, dim=1), atol=0, rtol=0)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-6, rtol=0)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                             use_dora=True))
    peft_state = theirs.state_dict()
    for key, value in model.state_dict().items():
        if MAG in key:  # PEFT initialises the magnitude the same way, bit for bit
            torch.testing.assert_close(value, peft_state["base_model.model." + key], atol=0, rtol=0)


def test_pure_functions_agree_with_the_layer_and_the_definition():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    layer = LoRALinear(linear, r=3, lora_alpha=6, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(7) + 0.5)
    x = torch.randn(5, 12)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    W = linear.weight + 2.0 * B @ A
    want = x @ (m[:, None] * W / W.norm(dim=1, keepdim=True)).T + linear.bias  # W' = m · V / ‖V‖
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(dora.dora_forward(x, linear.weight, linear.bias, A, B, 2.0, m), want,
                                   atol=1e-5, rtol=0)
    assert dora.weight_norm(linear.weight, A, B, 2.0).shape == (7,)


def test_norm_is_a_constant_in_backward():
    """Section 4.3 of the paper: no gradient flows through ‖W + ΔW‖. With the norm treated as a
    constant the layer is linear in B, so the gradient of B is f·(x-side) only."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5, bias=False), r=2, lora_alpha=2, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    A, m = layer.lora_A["default"].weight.detach(), layer.lora_magnitude_vector["default"].weight.detach()
    f = m / dora.weight_norm(layer.base_layer.weight, A, layer.lora_B["default"].weight, 1.0)
    want = f[:, None] * (torch.ones(4, 5).T @ (x @ A.T))  # d/dB of Σ f · (x A.T B.T), f constant
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, want, atol=1e-5, rtol=0)


# ---- against PEFT ----------------------------------------------------------------------------
def test_forward_equals_peft(base, ids):
    ours = dora_model(base)
    theirs = peft_twin(ours, base).eval()
    want = logits(theirs, ids)
    torch.testing.assert_close(logits(ours, ids), want, atol=ATOL, rtol=0)
    assert (want - logits(base, ids)).abs().max() > 1e-2  # the adapter really changes the model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_equals_peft_on_a_half_precision_base(base, ids, dtype):
    half = copy.deepcopy(base).to(dtype)
    ours = dora_model(half)
    layer = next(iter(lora_layers(ours).values()))
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32  # adapters in fp32
    theirs = peft_twin(ours, half).eval()
    torch.testing.assert_close(logits(ours, ids).float(), logits(theirs, ids).float(), atol=0, rtol=0)


def test_gradients_and_training_steps_equal_peft(base, ids):
    ours = dora_model(base)
    theirs = peft_twin(ours, base)
    named = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_named = dict(theirs.named_parameters())
    assert len(named) == 3 * len(TARGETS) * base.config.num_hidden_layers
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    for n, p in named.items():
        q = theirs_named["base_model.model." + n]
        assert p.grad is not None and p.grad.abs().max() > 0, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)

    opts = [torch.optim.AdamW(named.values(), lr=1e-2),
            torch.optim.AdamW([theirs_named["base_model.model." + n] for n in named], lr=1e-2)]
    start = {n: p.detach().clone() for n, p in named.items()}
    for model, opt in zip((ours, theirs), opts):
        model.train()
        for _ in range(4):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    for n, p in named.items():
        assert not torch.equal(p, start[n]), f"{n} did not train"
        torch.testing.assert_close(p, theirs_named["base_model.model." + n], atol=1e-5, rtol=1e-4, msg=n)
    torch.testing.assert_close(logits(ours.eval(), ids), logits(theirs.eval(), ids), atol=1e-4, rtol=0)


def test_dropout_in_training_follows_peft(base, ids):
    ours = dora_model(base, lora_dropout=0.3)
    theirs = peft_twin(ours, base, lora_dropout=0.3)
    outs = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(5)  # the same dropout masks, drawn in the same order
        outs.append(model(input_ids=ids).logits.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
    torch.manual_seed(6)
    assert (ours(input_ids=ids).logits.detach() - outs[0]).abs().max() > 1e-4  # dropout is on
    torch.testing.assert_close(logits(ours.eval(), ids), logits(theirs.eval(), ids), atol=ATOL, rtol=0)


def test_several_adapters_switch_and_compose_like_peft(base, ids):
    ours = dora_model(base)
    inject(ours, TARGETS, r=R, lora_alpha=ALPHA, use_dora=True, adapter_name="second")
    randomize(ours, "second", seed=2)
    theirs = peft_twin(ours, base, adapters=("default", "second")).eval()
    for active in ("default", "second", ["default", "second"]):
        set_adapter(ours, active)
        theirs.base_model.set_adapter(active)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)
    layer = next(iter(lora_layers(ours).values()))
    for active, frozen in (("default", "second"), ("second", "default")):
        set_adapter(ours, active)  # only the active adapter's magnitude trains
        assert layer.lora_magnitude_vector[active].weight.requires_grad
        assert not layer.lora_magnitude_vector[frozen].weight.requires_grad
    delete_adapter(ours, "second")
    assert list(layer.lora_magnitude_vector) == ["default"]


def test_plain_and_dora_adapters_together_compose_like_peft(base, ids):
    ours = dora_model(base)
    inject(ours, TARGETS, r=R, lora_alpha=ALPHA, adapter_name="plain")
    randomize(ours, "plain", seed=4)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                             use_dora=True))
    theirs.add_adapter("plain", LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    state = theirs.state_dict()
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if ".lora_" in key:
                state["base_model.model." + key].copy_(value)
    theirs.eval()
    for active in (["plain", "default"], ["default", "plain"]):  # order matters: DoRA rescales
        set_adapter(ours, active)
        theirs.base_model.set_adapter(active)
        want = logits(theirs, ids)
        torch.testing.assert_close(logits(ours, ids), want, atol=ATOL, rtol=0)
        merge_adapters(ours)
        torch.testing.assert_close(logits(ours, ids), want, atol=ATOL, rtol=0)
        unmerge_adapters(ours)


def test_trainable_parameters_count_the_magnitude(base):
    model = dora_model(base)
    trainable, _, _ = trainable_parameters(model)
    want = sum(l.r["default"] * (l.in_features + l.out_features) + l.out_features
               for l in lora_layers(model).values())
    assert trainable == want
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                             use_dora=True))
    assert trainable == theirs.get_nb_trainable_parameters()[0]


# ---- merge and unmerge -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_equals_forward_and_unmerge_restores_bits(base, ids, dtype):
    model = dora_model(copy.deepcopy(base).to(dtype))
    inject(model, TARGETS, r=R, lora_alpha=ALPHA, use_dora=True, adapter_name="second")
    randomize(model, "second", seed=2)
    originals = {n: l.base_layer.weight.detach().clone() for n, l in lora_layers(model).items()}
    for active in ("default", ["default", "second"]):
        set_adapter(model, active)
        want = logits(model, ids)
        merge_adapters(model)
        got = logits(model, ids)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        else:  # W' rounded once to half precision, against fp32 adapter math: a few ulps
            bound = 4 * torch.finfo(dtype).eps * want.float().abs().max()
            assert (got.float() - want.float()).abs().max() < bound
        unmerge_adapters(model)
        for n, layer in lora_layers(model).items():
            assert torch.equal(layer.base_layer.weight, originals[n]), n
        torch.testing.assert_close(logits(model, ids), want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weight_equals_peft_merge(base, dtype):
    base = copy.deepcopy(base).to(dtype)
    ours = dora_model(base)
    theirs = peft_twin(ours, base).merge_and_unload(safe_merge=True)
    merge_adapters(ours)
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, theirs.get_submodule(name).weight,
                                   atol=1e-6 if dtype == torch.float32 else 0, rtol=0)
    remove_lora(ours)
    for name, p in ours.named_parameters():  # removed: the base again, bit for bit
        assert torch.equal(p, dict(base.named_parameters())[name]), name


def test_partly_merged_layer_uses_the_unmerged_weight_for_the_norm(base, ids):
    model = dora_model(base)
    inject(model, TARGETS, r=R, lora_alpha=ALPHA, use_dora=True, adapter_name="second")
    randomize(model, "second", seed=2)
    set_adapter(model, ["default", "second"])
    want = logits(model, ids)
    merge_adapters(model, ["default"])  # "second" still runs unmerged on top
    torch.testing.assert_close(logits(model, ids), want, atol=ATOL, rtol=0)


# ---- 4-bit bases -----------------------------------------------------------------------------
def test_dora_on_a_4bit_base_uses_the_dequantized_weight(base, ids):
    q = quantize_model(copy.deepcopy(base))
    dense = copy.deepcopy(base)
    with torch.no_grad():  # the float model with exactly the 4-bit model's weights
        for name, module in q.named_modules():
            if isinstance(module, Linear4bit):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    ours_q, ours_d = dora_model(q), dora_model(dense)
    for lq, ld in zip(lora_layers(ours_q).values(), lora_layers(ours_d).values()):
        torch.testing.assert_close(lq.lora_magnitude_vector["default"].weight,
                                   ld.lora_magnitude_vector["default"].weight, atol=0, rtol=0)
    torch.testing.assert_close(logits(ours_q, ids), logits(ours_d, ids), atol=1e-5, rtol=0)
    ours_q(input_ids=ids, labels=ids).loss.backward()
    mags = [l.lora_magnitude_vector["default"].weight for l in lora_layers(ours_q).values()]
    assert all(m.grad is not None and m.grad.abs().max() > 0 for m in mags)
    with pytest.raises(TypeError, match="Linear4bit"):
        merge_adapters(ours_q)


def test_qlora_dora_adapter_round_trip(base, ids, tmp_path):
    q = quantize_model(copy.deepcopy(base))
    ours = dora_model(q)
    folder = save_adapter(ours, tmp_path / "qdora")
    back = load_adapter(quantize_model(copy.deepcopy(base)), folder)
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), atol=0, rtol=0)


# ---- adapter files ---------------------------------------------------------------------------
def test_saved_dora_adapter_loads_in_peft_and_back(base, ids, tmp_path):
    ours = dora_model(base)
    want = logits(ours, ids)
    folder = save_adapter(ours, tmp_path / "ours")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["use_dora"] is True
    keys = safetensors.torch.load_file(str(folder / WEIGHTS_NAME)).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert sum(k.endswith(MAG) for k in keys) == len(lora_layers(ours))
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(logits(theirs, ids), want, atol=ATOL, rtol=0)
    back = load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)


def test_peft_saved_dora_adapter_loads_here(base, ids, tmp_path):
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True)
    theirs = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".lora_" in n:  # B non-zero and the magnitude away from ‖W‖
                p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)) if MAG in n
                        else torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert all("default" in l.lora_magnitude_vector for l in lora_layers(ours).values())
    torch.testing.assert_close(logits(ours, ids), logits(theirs.eval(), ids), atol=ATOL, rtol=0)


def test_plain_lora_files_stay_plain(base, tmp_path):
    plain = inject(copy.deepcopy(base), TARGETS, r=R, lora_alpha=ALPHA)
    folder = save_adapter(plain, tmp_path / "plain")
    assert json.loads((folder / CONFIG_NAME).read_text())["use_dora"] is False
    assert not any(MAG in k for k in safetensors.torch.load_file(str(folder / WEIGHTS_NAME)))
    loaded = load_adapter(copy.deepcopy(base), folder)
    assert not any(l.lora_magnitude_vector for l in lora_layers(loaded).values())


def _rewrite(folder, tensors=None, config=None):
    if tensors is not None:
        safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME))  # no loracore record
    if config is not None:
        (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_bad_dora_files_are_refused_by_name(base, tmp_path):
    folder = save_adapter(dora_model(base), tmp_path / "ad")
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    config = json.loads((folder / CONFIG_NAME).read_text())
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"
    cases = [
        ({**tensors, key: torch.ones(5)}, config, r"'model.layers.1.mlp.down_proj'.*\(5,\).*needs \(\d+,\)"),
        ({**tensors, key: torch.ones(2, 3)}, config, r"down_proj.*shape \(2, 3\)"),
        ({**tensors, key: tensors[key] * float("nan")}, config, "down_proj.*finite"),
        ({k: v for k, v in tensors.items() if k != key}, config, "use_dora=True.*down_proj.*has no DoRA"),
        (tensors, config | {"use_dora": False}, "use_dora=False.*has DoRA"),
        (tensors, config | {"use_dora": "yes"}, "use_dora must be true or false"),
    ]
    for bad_tensors, bad_config, match in cases:
        _rewrite(folder, bad_tensors, bad_config)
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            load_adapter(model, folder)
        assert not lora_layers(model)  # refused before anything changed


def test_failure_half_way_leaves_the_model_as_it_was(base, ids, monkeypatch):
    model = inject(copy.deepcopy(base), TARGETS, r=R, lora_alpha=ALPHA)  # plain LoRA first
    want = logits(model, ids)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []
    real = dora.Magnitude.__init__

    def flaky(self, magnitude):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        real(self, magnitude)

    monkeypatch.setattr(dora.Magnitude, "__init__", flaky)
    for target in (model, copy.deepcopy(base)):
        before = dict(target.named_modules()).keys()
        calls.clear()
        with pytest.raises(RuntimeError, match="injected"):
            inject(target, TARGETS, r=R, lora_alpha=ALPHA, use_dora=True, adapter_name="d")
        assert dict(target.named_modules()).keys() == before
        assert not any(l.lora_magnitude_vector for l in lora_layers(target).values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(logits(model, ids), want, atol=0, rtol=0)


def test_crash_mid_save_of_a_dora_adapter_keeps_the_previous_one(base, ids, tmp_path, monkeypatch):
    from loracore import adapters
    plain = inject(copy.deepcopy(base), TARGETS, r=R, lora_alpha=ALPHA)
    randomize(plain)
    folder = save_adapter(plain, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(dora_model(base), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    torch.testing.assert_close(logits(load_adapter(copy.deepcopy(base), folder), ids), logits(plain, ids),
                               atol=0, rtol=0)


def test_mixed_dora_and_plain_adapter_is_not_saved(base, tmp_path):
    model = inject(copy.deepcopy(base), ["q_proj"], r=R, lora_alpha=ALPHA, use_dora=True)
    inject(model, ["v_proj"], r=R, lora_alpha=ALPHA)
    with pytest.raises(ValueError, match="DoRA on .*plain LoRA on"):
        save_adapter(model, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# ---- refusals ---------------------------------------------------------------------------------
def test_combine_adapters_refuses_dora(base):
    model = dora_model(base)
    inject(model, TARGETS, r=R, lora_alpha=ALPHA, adapter_name="plain")
    with pytest.raises(ValueError, match=r"\['default'\] are DoRA"):
        combine_adapters(model, ["plain", "default"], [0.5, 0.5], "both", combination_type="linear")
    assert all("both" not in l.lora_A for l in lora_layers(model).values())


def test_serving_registry_refuses_dora_and_says_merge(base, tmp_path):
    folder = save_adapter(dora_model(base), tmp_path / "dora")
    model = copy.deepcopy(base)
    reg = AdapterRegistry(model, max_loras=2, max_lora_rank=8)
    try:
        with pytest.raises(AdapterError, match="DoRA.*merge it into the base"):
            reg.load("d", folder)
        assert reg.names() == [] and not lora_layers(model)
    finally:
        reg.close()


def test_inject_refuses_dora_where_the_weight_is_not_float(base):
    model = copy.deepcopy(base)
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight = nn.Parameter(torch.zeros(proj.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.self_attn\.q_proj \(Linear\)"):
        inject(model, ["q_proj"], r=R, lora_alpha=ALPHA, use_dora=True)
    assert not lora_layers(model)
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        inject(model, ["v_proj"], r=R, lora_alpha=ALPHA, use_dora="yes")
    with pytest.raises(TypeError, match="Linear.*use_dora=False"):
        LoRALinear(proj, r=2, use_dora=True)
    with pytest.raises(TypeError, match="LoRALinear.add_adapter: use_dora must be True or False"):
        LoRALinear(nn.Linear(4, 3), r=2, use_dora=1)


@pytest.mark.slow
def test_real_model_dora_file_loads_in_peft_with_equal_logits(smollm2, tmp_path):
    """SmolLM2-135M, q and v in all 30 layers: our DoRA adapter's file, loaded by PEFT, gives
    the same logits as loracore. (All seven projections take ~3x longer: each DoRA forward forms
    W + ΔW to take its norm.)"""
    real = smollm2[0].eval()
    ids = torch.randint(0, real.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    ours = inject(copy.deepcopy(real), ["q_proj", "v_proj"], r=8, lora_alpha=16, use_dora=True)
    randomize(ours, std=0.02)
    want = logits(ours, ids)
    assert (want - logits(real, ids)).abs().max() > 1e-2
    folder = save_adapter(ours, tmp_path / "real")
    del ours
    theirs = PeftModel.from_pretrained(real, folder).eval()
    torch.testing.assert_close(logits(theirs, ids), want, atol=1e-4, rtol=0)
