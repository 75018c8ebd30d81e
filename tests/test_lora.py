"""Invariants of the LoRA layer and of injection (loracore/layer.py, loracore/surgery.py).

Every test that checks an output sets B to non-zero values first: with B = 0 the adapter
adds nothing, and a test of it would pass whatever the code did.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import loracore.surgery as surgery
from conftest import Q0, assert_unchanged, fail_on_call, randomize_B, snapshot, tiny_qwen2
from loracore.lora import (LoRALinear, delete_adapter, disable_adapters, inject, is_linear,
                           linear_layer_names, lora_layers, merge_adapters, register_linear_type,
                           remove_lora, set_adapter, trainable_parameters, unmerge_adapters)
from loracore.layer import lora_update
from loracore.train import loraplus_param_groups


@pytest.fixture
def layer() -> LoRALinear:
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(16, 12), r=4, lora_alpha=8)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


# ---- the layer ----------------------------------------------------------------------------
def test_shapes_init_and_scaling(layer):
    assert layer.lora_A["default"].weight.shape == (4, 16)
    assert layer.lora_B["default"].weight.shape == (12, 4)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    a = layer.lora_A["default"].weight
    bound = 1 / math.sqrt(16)  # kaiming_uniform_(a=sqrt(5)) on fan_in 16
    assert a.abs().max() <= bound and a.std() > bound / 4
    assert layer.scaling["default"] == 8 / 4
    rs = LoRALinear(nn.Linear(16, 12), r=4, lora_alpha=8, use_rslora=True)
    assert rs.scaling["default"] == 8 / math.sqrt(4)


def test_base_is_frozen_and_kept(layer):
    base = layer.base_layer
    assert isinstance(base, nn.Linear)
    inner = LoRALinear(base, r=2, lora_alpha=2)
    assert inner.base_layer is base


def test_zero_B_leaves_output_unchanged(layer, x):
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_is_base_plus_scaled_low_rank(layer, x):
    randomize_B(layer)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x @ W.T + b + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_get_delta_weight(layer):
    randomize_B(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.get_delta_weight("default"), 2.0 * B @ A)
    assert layer.get_delta_weight("default").shape == (12, 16)


def test_merge_unmerge_round_trip(layer, x):
    randomize_B(layer)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert not torch.allclose(layer.base_layer.weight, w0)
    torch.testing.assert_close(layer(x), unmerged_out, atol=1e-5, rtol=1e-5)  # same function
    torch.testing.assert_close(layer.base_layer(x), unmerged_out, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    assert (layer.base_layer.weight - w0).abs().max() <= 1e-6
    layer.unmerge()  # nothing merged: a no-op


def test_double_merge_is_refused(layer):
    randomize_B(layer)
    layer.merge()
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w)  # nothing was added twice


def test_non_finite_merge_is_refused(layer):
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e38)
        layer.lora_A["default"].weight.fill_(1e38)
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, w) and not layer.merged
    layer.merge(safe=False)  # unsafe: does what it is told
    assert not torch.isfinite(layer.base_layer.weight).all()


def test_disabled_adapter_is_base_bit_for_bit(layer, x):
    randomize_B(layer)
    with layer.disable_adapters():
        assert torch.equal(layer(x), layer.base_layer(x))
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_disable_while_merged_restores_the_merge(layer, x):
    randomize_B(layer)
    out = layer(x)
    layer.merge()
    with layer.disable_adapters():
        assert not layer.merged
        assert not torch.allclose(layer(x), out)
    assert layer.merged
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)


def test_two_active_adapters_add(layer, x):
    layer.add_adapter("second", r=2, lora_alpha=4)
    randomize_B(layer)
    base = layer.base_layer(x)
    layer.set_adapter("default")
    d1 = layer(x) - base
    layer.set_adapter("second")
    d2 = layer(x) - base
    layer.set_adapter(["default", "second"])
    torch.testing.assert_close(layer(x), base + d1 + d2, atol=1e-6, rtol=1e-5)
    both = layer.get_delta_weight("default") + layer.get_delta_weight("second")
    layer.merge()
    assert layer.merged_adapters == ["default", "second"]
    torch.testing.assert_close(layer.base_layer(x), base + x @ both.T, atol=1e-5, rtol=1e-5)


def test_add_adapter_activates_it_and_set_adapter_controls_training(layer):
    layer.add_adapter("b", r=2, lora_alpha=2)
    assert layer.active_adapters == ["b"]
    assert not layer.lora_A["default"].weight.requires_grad
    assert layer.lora_B["b"].weight.requires_grad
    with pytest.raises(KeyError, match="nope"):
        layer.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("b", r=2, lora_alpha=2)


def test_delete_adapter(layer, x):
    randomize_B(layer)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.delete_adapter("default")
    layer.unmerge()
    layer.delete_adapter("default")
    assert list(layer.lora_A) == [] and layer.active_adapters == []
    torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=2.5), dict(lora_dropout=1.0)])
def test_bad_adapter_arguments(bad):
    kwargs = dict(r=2, lora_alpha=2.0) | bad
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4)).add_adapter("a", **kwargs)


def test_wrapping_something_not_linear_is_refused():
    with pytest.raises(TypeError, match="in_features"):
        LoRALinear(nn.ReLU())


def test_dropout_only_on_the_adapter_path(x):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), r=4, lora_alpha=8, lora_dropout=0.5)
    randomize_B(layer)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # adapter path is random in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    with layer.disable_adapters():
        layer.train()
        assert torch.equal(layer(x), layer.base_layer(x))  # the base path never drops


def test_gradients_reach_only_the_adapter(layer, x):
    inject_model = nn.Sequential(layer)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    inject_model(x).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None
    # At step 0, B = 0: B gets a gradient, A gets none (it only matters through B).
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert layer.lora_A["default"].weight.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_on_a_low_precision_base_is_float32(dtype):
    """As PEFT's autocast_adapter_dtype: A and B in float32, the output in the base's dtype."""
    layer = LoRALinear(nn.Linear(8, 8).to(dtype), r=2, lora_alpha=4)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.dtype == torch.float32
    randomize_B(layer)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    base = layer.base_layer(x)
    update = lora_update(x.float(), layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                         layer.scaling["default"])
    assert torch.equal(out, base + update.to(dtype))
    assert layer.get_delta_weight("default").dtype == torch.float32


def test_adapter_follows_base_dtype_when_asked():
    layer = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2, lora_alpha=4,
                       autocast_adapter_dtype=False)
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


# ---- a quantized stand-in base (what loracore.qlora.Linear4bit looks like to LoRA) ------------
class FakeQuantLinear(nn.Module):
    """A frozen layer storing int8 weights plus a scale: not nn.Linear, same interface."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.detach().abs().max() / 127
        self.register_buffer("qweight", torch.round(lin.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.float() * self.scale).T


def test_quantized_base_is_wrapped_unchanged_but_not_merged(x):
    register_linear_type(FakeQuantLinear)
    model = nn.Sequential(FakeQuantLinear(nn.Linear(16, 12)), nn.ReLU(), nn.Linear(12, 3))
    assert is_linear(model[0])
    inject(model, "all-linear", r=2, lora_alpha=4)
    assert isinstance(model[0], LoRALinear) and isinstance(model[0].base_layer, FakeQuantLinear)
    layer = model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    randomize_B(layer)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default").T,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="FakeQuantLinear"):
        layer.merge()
    remove_lora(model)
    assert isinstance(model[0], FakeQuantLinear)


# ---- a whole model ------------------------------------------------------------------------
def test_inject_targets_freezes_and_counts():
    model = tiny_qwen2()
    total_before = sum(p.numel() for p in model.parameters())
    inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    layers = lora_layers(model)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    # q_proj 64->64, v_proj 64->32 (2 kv heads of 16): r * (in + out) each, two layers
    want = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    trainable, total, pct = trainable_parameters(model)
    assert trainable == want and total == total_before + want
    assert pct == pytest.approx(100 * want / total)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_all_linear_excludes_the_output_head():
    model = tiny_qwen2()
    model.config.tie_word_embeddings = False
    model.lm_head = nn.Linear(64, 128, bias=False)  # untied, so lm_head is an nn.Linear of its own
    inject(model, "all-linear", r=2, lora_alpha=2)
    names = {n.split(".")[-1] for n in lora_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(lora_layers(model)) == 14 and isinstance(model.lm_head, nn.Linear)


def test_bad_targets_list_the_linear_layers():
    model = tiny_qwen2()
    with pytest.raises(ValueError) as err:
        inject(model, ["query", "value"], r=4, lora_alpha=8)
    msg = str(err.value)
    assert "match no linear layer" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    with pytest.raises(ValueError, match="empty"):
        inject(model, [], r=4, lora_alpha=8)
    assert not lora_layers(model)  # a refused inject changed nothing


def test_disabled_model_gives_base_logits_bit_for_bit(ids):
    model = tiny_qwen2()
    with torch.no_grad():
        base_logits = model(ids).logits
    inject(model, "all-linear", r=4, lora_alpha=8)
    randomize_B(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_logits)
        with disable_adapters(model):
            assert torch.equal(model(ids).logits, base_logits)


def test_model_merge_unmerge_and_adapters(ids):
    model = tiny_qwen2()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    inject(model, ["q_proj", "o_proj"], r=2, lora_alpha=2, adapter_name="other")
    randomize_B(model)
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"].active_adapters == ["other"]
    set_adapter(model, "default")
    with torch.no_grad():
        want = model(ids).logits
        merge_adapters(model)
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
        with pytest.raises(RuntimeError, match="already merged"):
            merge_adapters(model)
        unmerge_adapters(model)
    for name, layer in lora_layers(model).items():
        w0 = base_state[f"{name}.weight"]
        assert (layer.base_layer.weight - w0).abs().max() <= 1e-6
    delete_adapter(model, "other")
    assert "model.layers.0.self_attn.o_proj" in lora_layers(model)  # wrapped, no adapters left
    with pytest.raises(KeyError):
        set_adapter(model, "other")


def test_remove_lora_gives_back_the_exact_original(ids):
    model = tiny_qwen2()
    original = copy.deepcopy(model)
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag remove_lora must restore
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, "all-linear", r=4, lora_alpha=8)
    randomize_B(model)
    remove_lora(model)
    assert not lora_layers(model)
    assert repr(model) == repr(original)
    sd, sd0 = model.state_dict(), original.state_dict()
    assert list(sd) == list(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_linear_layer_names_skip_lora_internals():
    model = tiny_qwen2()
    before = linear_layer_names(model)
    inject(model, "all-linear", r=2, lora_alpha=2)
    assert linear_layer_names(model) == before


def test_loraplus_param_groups():
    model = tiny_qwen2()
    inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    groups = loraplus_param_groups(model, lr=1e-4, loraplus_lr_ratio=16)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lora_A", "lora_B"}
    assert by_name["lora_B"]["lr"] == pytest.approx(16e-4) and by_name["lora_A"]["lr"] == 1e-4
    assert len(by_name["lora_A"]["params"]) == len(by_name["lora_B"]["params"]) == 4
    torch.optim.AdamW(groups)  # a valid optimizer spec
    with pytest.raises(ValueError, match="inject"):
        loraplus_param_groups(tiny_qwen2(), lr=1e-4)


def test_loraplus_groups_dora_magnitudes_with_B_as_peft_does():
    """PEFT's create_loraplus_optimizer gives lora_B and 1-D adapter parameters (DoRA's
    magnitude) lr · ratio; loracore's groups hold the same parameters at the same rates."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    ours = tiny_qwen2()
    inject(ours, ["q_proj", "v_proj"], r=4, lora_alpha=8, use_dora=True)
    groups = {g["name"]: g for g in loraplus_param_groups(ours, lr=1e-4, loraplus_lr_ratio=16)}
    names = {id(p): n for n, p in ours.named_parameters()}
    fast = sorted(names[id(p)].split(".", 1)[1] for p in groups["lora_B"]["params"])
    assert sum(".lora_magnitude_vector." in n for n in fast) == 4 and groups["lora_B"]["lr"] == pytest.approx(16e-4)

    theirs = get_peft_model(tiny_qwen2(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     use_dora=True))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
    pnames = {id(p): n for n, p in theirs.named_parameters()}
    peft_fast = sorted(pnames[id(p)].removeprefix("base_model.model.").split(".", 1)[1]
                       .replace(".default.", ".").replace(".default", "")
                       for g in opt.param_groups if g["lr"] == pytest.approx(16e-4) for p in g["params"])
    ours_fast = sorted(n.replace(".default.", ".").replace(".default", "") for n in fast)
    assert ours_fast == peft_fast


def test_regex_target_and_reinjection_match_exact_names():
    model = tiny_qwen2()
    inject(model, r"model\.layers\.1\.mlp\.(up|down)_proj", r=2, lora_alpha=2)
    assert sorted(lora_layers(model)) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    inject(model, ["down_proj"], r=4, lora_alpha=4, adapter_name="b")  # adds to the wrapped layer
    layer = lora_layers(model)["model.layers.1.mlp.down_proj"]
    assert sorted(layer.lora_A) == ["b", "default"] and layer.r == {"default": 2, "b": 4}
    assert len(lora_layers(model)) == 3


# ---- the lab's self-checks (loracore/checks/lab01.py) -------------------------------------
def test_lab01_checks_pass_a_right_answer_and_explain_a_wrong_one(capsys):
    from loracore.checks import lab01
    from loracore.selfcheck import ExerciseFailed

    lab01.check_lora_forward(lambda x, W, b, A, B, s: x @ W.T + b + s * (x @ A.T) @ B.T)
    with pytest.raises(ExerciseFailed):
        lab01.check_lora_forward(lambda x, W, b, A, B, s: x @ W.T + b + (x @ A.T) @ B.T)  # no scaling
    assert "hint" in capsys.readouterr().out

    def stub(*args):
        raise NotImplementedError("Exercise: replace this line with your code.")

    with pytest.raises(ExerciseFailed, match="not written yet"):
        lab01.check_lora_forward(stub)


def test_quantized_subclass_of_nn_linear_is_not_merged():
    class Int8Linear(nn.Linear):  # like bitsandbytes' layers: an nn.Linear holding integer weights
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__(d_in, d_out, bias=False)
            self.weight = nn.Parameter(torch.ones(d_out, d_in, dtype=torch.int8), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.float().T

    layer = LoRALinear(Int8Linear(8, 4), r=2, lora_alpha=2)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with pytest.raises(TypeError, match="Int8Linear"):
        layer.merge()


def test_forward_shapes_and_mixed_dtypes():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), r=4, lora_alpha=8)
    randomize_B(layer)
    v = torch.randn(16)
    want = layer.base_layer(v) + 2.0 * layer.lora_B["default"].weight @ (layer.lora_A["default"].weight @ v)
    torch.testing.assert_close(layer(v), want, atol=1e-6, rtol=1e-5)  # a single vector: (in,) -> (out,)

    class HalfOut(nn.Module):  # a base whose output dtype differs from the float32 adapter's
        in_features, out_features = 16, 12

        def forward(self, x):
            return torch.zeros(*x.shape[:-1], 12, dtype=torch.bfloat16)

    mixed = LoRALinear(HalfOut(), r=4, lora_alpha=8)
    randomize_B(mixed)
    out = mixed(torch.randn(3, 16))
    assert out.dtype == torch.bfloat16 and out.abs().sum() > 0


# ---- the pure functions and the module structure -------------------------------------------
def test_pure_functions_are_what_the_layer_computes(layer, x):
    from loracore.layer import delta_weight, lora_forward, scaling
    randomize_B(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    assert scaling(8, 4) == layer.scaling["default"] == 2.0
    assert scaling(8, 4, use_rslora=True) == 4.0
    assert torch.equal(delta_weight(A, B, 2.0), layer.get_delta_weight("default"))
    # the layer calls the same function, so the two agree bit for bit
    assert torch.equal(lora_forward(x, base.weight, base.bias, A, B, 2.0), layer(x))
    assert torch.equal(lora_forward(x, base.weight, base.bias, A, torch.zeros_like(B), 2.0), base(x))


def test_one_idea_per_module_and_no_import_circle():
    """layer.py imports no model surgery (only DoRA's pure math), qlora registers itself with the layer, and nothing
    imports loracore.lora (the facade) from inside the library."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "loracore"

    def imports(module: str) -> set[str]:
        tree = ast.parse((root / f"{module}.py").read_text())
        return {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loracore")}

    assert imports("layer") == {"loracore.dora"} and imports("dora") == set()  # pure math only
    assert "loracore.layer" in imports("surgery") and "loracore.qlora" not in imports("surgery")
    assert "loracore.layer" in imports("qlora")
    for path in root.rglob("*.py"):
        if path.name != "lora.py":
            tree = ast.parse(path.read_text())
            used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert "loracore.lora" not in used, f"{path.name} imports the facade loracore.lora"


# ---- exact merge / unmerge in low precision (issue 16) --------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_five_merge_unmerge_cycles_restore_a_small_layer_bit_for_bit(dtype, x):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12).to(dtype), r=4, lora_alpha=8)
    randomize_B(layer)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.float32
    for _ in range(5):
        layer.merge()
        # the merged weight is rounded once from the float32 sum (not ΔW rounded, then added)
        assert torch.equal(layer.base_layer.weight, (w0.float() + delta).to(dtype))
        with layer.disable_adapters():  # the base, exactly, even though it was merged
            assert torch.equal(layer.base_layer.weight, w0)
            assert torch.equal(layer(x.to(dtype)), layer.base_layer(x.to(dtype)))
        assert torch.equal(layer.base_layer.weight, (w0.float() + delta).to(dtype))
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, w0)
    assert layer._unmerged_weight is None  # the copy is dropped once nothing is merged


def test_subtracting_delta_again_would_not_restore_bfloat16():
    """Why the original weight is kept: W + ΔW - ΔW is not W once rounded to bfloat16."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64).to(torch.bfloat16), r=4, lora_alpha=8)
    randomize_B(layer)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default").to(torch.bfloat16)
    assert not torch.equal((w0 + delta) - delta, w0)
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_five_cycles_on_tiny_qwen2_in_bfloat16_restore_every_weight(ids):
    model = tiny_qwen2().to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, "all-linear", r=4, lora_alpha=8)
    inject(model, ["q_proj", "v_proj"], r=2, lora_alpha=4, adapter_name="two")
    randomize_B(model)
    assert all(lin.weight.dtype == torch.float32 for layer in lora_layers(model).values()
               for lin in layer.lora_A.values())
    set_adapter(model, ["default", "two"])
    with torch.no_grad():
        unmerged = model(ids).logits
        for _ in range(5):
            merge_adapters(model)
            assert not torch.equal(lora_layers(model)["model.layers.0.mlp.up_proj"].base_layer.weight,
                                   original["model.layers.0.mlp.up_proj.weight"])
            with disable_adapters(model):
                base_logits = model(ids).logits
            unmerge_adapters(model)
            assert torch.equal(model(ids).logits, unmerged)
        remove_lora(model)
        sd = model.state_dict()
        assert all(torch.equal(sd[k], original[k]) for k in original)
        assert torch.equal(model(ids).logits, base_logits)


def test_trainable_parameters_count_a_4bit_base_as_its_logical_weights():
    """As PEFT: a 4-bit layer's out*in weights count in the total (not its packed bytes)."""
    from loracore.qlora import quantize_model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False))
    float_total = sum(p.numel() for p in model.parameters())
    quantize_model(model, skip=())
    assert trainable_parameters(model)[1] == float_total
    inject(model, ["0", "2"], r=4, lora_alpha=8)
    adapter = 4 * (64 + 128) + 4 * (128 + 32)
    trainable, total, pct = trainable_parameters(model)
    assert (trainable, total) == (adapter, float_total + adapter)
    assert pct == pytest.approx(100 * adapter / (float_total + adapter))


# ---- hostile inputs: refused, or rolled back half-way, and nothing changed ----------------
# Each case asserts that the error names its cause and that the model is exactly as it was
# (conftest.snapshot: module objects, bits, requires_grad, adapters, inject's record).
@pytest.fixture(scope="module")
def _base() -> nn.Module:
    return tiny_qwen2()


@pytest.fixture
def base(_base) -> nn.Module:
    return copy.deepcopy(_base)


@pytest.fixture
def trained(_base) -> nn.Module:
    """A copy of the base with a q/v adapter whose B is non-zero (``base`` stays bare)."""
    model = inject(copy.deepcopy(_base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    randomize_B(model)
    return model



# ---- inject: bad arguments refused before anything changes --------------------------------
BAD_INJECT = [
    (dict(r=0), ValueError, "inject: r must be a positive int"),
    (dict(r=-1), ValueError, "inject: r must be a positive int"),
    (dict(r=2.5), ValueError, "inject: r must be a positive int"),
    (dict(r=True), ValueError, "inject: r must be a positive int"),
    (dict(lora_alpha=0), ValueError, "inject: lora_alpha=0 .*never learn"),
    (dict(lora_alpha=0.0), ValueError, "inject: lora_alpha=0 .*never learn"),
    (dict(lora_alpha=float("nan")), ValueError, "inject: lora_alpha must be a finite number"),
    (dict(lora_alpha="8"), ValueError, "inject: lora_alpha must be a finite number"),
    (dict(lora_dropout=1.0), ValueError, r"inject: lora_dropout must be a number in \[0, 1\)"),
    (dict(lora_dropout=-0.1), ValueError, r"inject: lora_dropout must be a number in \[0, 1\)"),
    (dict(adapter_name=""), ValueError, "inject: adapter name must be a non-empty string"),
    (dict(adapter_name="a.b"), ValueError, "inject: adapter name must be .*without dots"),
    (dict(adapter_name=None), ValueError, "inject: adapter name must be a non-empty string"),
    (dict(target_modules=None), TypeError, "inject: target_modules must be a list of layer names"),
    (dict(target_modules=42), TypeError, "inject: target_modules must be a list of layer names"),
    (dict(target_modules=[]), ValueError, "inject: target_modules is empty"),
    (dict(target_modules=""), ValueError, "inject: target_modules is an empty string"),
    (dict(target_modules=["q_proj", 3]), TypeError, "inject: every entry of target_modules"),
    (dict(target_modules="q_proj("), ValueError,
     r"inject: target_modules 'q_proj\(' is not a valid regular expression.*\['q_proj'\]"),
    (dict(target_modules="q_proj"), ValueError,
     r"single string is read as a regex over full module names.*\['q_proj'\]"),
    (dict(target_modules=["nope"]), ValueError, r"match no linear layer.*'q_proj'"),
]


@pytest.mark.parametrize("bad, exc, message", BAD_INJECT, ids=[str(b) for b, _, _ in BAD_INJECT])
def test_inject_refuses_bad_arguments_and_changes_nothing(base, bad, exc, message):
    kwargs = dict(target_modules=["q_proj"], r=4, lora_alpha=8) | bad
    before = snapshot(base)
    with pytest.raises(exc, match=message):
        inject(base, **kwargs)
    assert_unchanged(base, before)  # in particular: nothing frozen, no record left
    assert all(p.requires_grad for p in base.parameters())


def test_second_inject_with_overlapping_targets_wraps_nothing(trained):
    before = snapshot(trained)
    with pytest.raises(ValueError, match=rf"inject: modules \[.*'{Q0}'.*\] already have an adapter "
                                         r"named 'default'.*delete_adapter"):
        inject(trained, ["q_proj", "k_proj"], r=2, lora_alpha=2)
    assert_unchanged(trained, before)  # k_proj was not wrapped
    inject(trained, ["q_proj", "k_proj"], r=2, lora_alpha=2, adapter_name="other")  # the fix works


@pytest.mark.parametrize("n", [1, 3, 6])
def test_inject_failing_half_way_rolls_back(base, monkeypatch, n):
    before = snapshot(base)
    fail_on_call(monkeypatch, surgery, "_replace", n)
    with pytest.raises(RuntimeError, match="injected failure"):
        inject(base, "all-linear", r=4, lora_alpha=8)
    assert_unchanged(base, before)
    assert not lora_layers(base) and not hasattr(base, "_loracore_requires_grad")


def test_inject_interrupted_on_a_model_with_adapters_rolls_back(trained, monkeypatch):
    before = snapshot(trained)
    fail_on_call(monkeypatch, LoRALinear, "add_adapter", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        inject(trained, ["q_proj", "v_proj", "k_proj"], r=2, lora_alpha=2, adapter_name="b")
    assert_unchanged(trained, before)
    monkeypatch.undo()
    inject(trained, ["q_proj", "v_proj", "k_proj"], r=2, lora_alpha=2, adapter_name="b")  # retry works


# ---- the layer ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 15), (3, 17), (16, 3), ()])
def test_forward_with_the_wrong_width_names_in_features_and_the_shape(shape):
    layer = LoRALinear(nn.Linear(16, 12), r=4, lora_alpha=8)
    with pytest.raises(ValueError, match=rf"LoRALinear.forward: input of shape "
                                         rf"{re.escape(str(tuple(shape)))}.*in_features=16"):
        layer(torch.zeros(shape))


def test_add_adapter_lora_alpha_zero_is_refused_with_the_reason():
    layer = LoRALinear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="LoRALinear.add_adapter: lora_alpha=0.*exactly zero"):
        layer.add_adapter("a", r=2, lora_alpha=0)
    assert not layer.lora_A and not layer.r


# ---- set_adapter / delete_adapter / remove_lora ---------------------------------------------
@pytest.mark.parametrize("names, exc, message", [
    ("defualt", KeyError, r"set_adapter: no adapter named \['defualt'\].*'default'"),
    (["default", "nope"], KeyError, r"set_adapter: no adapter named \['nope'\]"),
    (None, TypeError, "set_adapter: adapter names must be a string or a list of strings"),
    ([1], TypeError, "set_adapter: adapter names must be a string or a list of strings"),
])
def test_set_adapter_refusals(trained, names, exc, message):
    before = snapshot(trained)
    with pytest.raises(exc, match=message):
        set_adapter(trained, names)
    assert_unchanged(trained, before)


def test_operations_on_a_model_without_lora_say_inject_first(base):
    before = snapshot(base)
    for op in (lambda: set_adapter(base, "default"), lambda: merge_adapters(base),
               lambda: unmerge_adapters(base), lambda: delete_adapter(base, "default")):
        with pytest.raises(ValueError, match="has no LoRA layers; call inject"):
            op()
    assert_unchanged(base, before)


def test_delete_adapter_merged_on_one_layer_deletes_nowhere(trained):
    lora_layers(trained)["model.layers.1.self_attn.v_proj"].merge()
    before = snapshot(trained)
    with pytest.raises(RuntimeError, match=r"delete_adapter: adapter 'default' is merged into "
                                           r"\['model.layers.1.self_attn.v_proj'\].*unmerge"):
        delete_adapter(trained, "default")
    assert_unchanged(trained, before)


@pytest.mark.parametrize("name, exc, message", [
    ("nope", KeyError, r"delete_adapter: no adapter named \['nope'\]"),
    (None, TypeError, "delete_adapter: the adapter name must be a string"),
])
def test_delete_adapter_refusals(trained, name, exc, message):
    before = snapshot(trained)
    with pytest.raises(exc, match=message):
        delete_adapter(trained, name)
    assert_unchanged(trained, before)


def test_remove_lora_failing_half_way_rolls_back(trained, monkeypatch):
    merge_adapters(trained)
    before = snapshot(trained)
    fail_on_call(monkeypatch, surgery, "_replace", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        remove_lora(trained)
    assert_unchanged(trained, before)  # still wrapped, still merged, same bits


# ---- merge_adapters -----------------------------------------------------------------------
def test_merge_unknown_name_is_refused(trained):
    before = snapshot(trained)
    with pytest.raises(KeyError, match=r"merge_adapters: no adapter named \['defualt'\].*'default'"):
        merge_adapters(trained, "defualt")
    with pytest.raises(TypeError, match="merge_adapters: adapter names must be"):
        merge_adapters(trained, [None])
    assert_unchanged(trained, before)


def test_merge_into_a_tied_output_head_is_refused(base):
    inject(base, ["q_proj", "lm_head"], r=4, lora_alpha=8)
    randomize_B(base)
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"merge_adapters: the weight of module 'lm_head' is tied to "
                                         r"\['model.embed_tokens.weight'\].*untie"):
        merge_adapters(base)
    assert_unchanged(base, before)  # q_proj not merged either, embeddings untouched


def test_merge_into_an_untied_output_head_works():
    model = inject(tiny_qwen2(tied=False), ["lm_head"], r=4, lora_alpha=8)
    randomize_B(model)
    emb = model.model.embed_tokens.weight.detach().clone()
    merge_adapters(model)
    assert lora_layers(model)["lm_head"].merged and torch.equal(model.model.embed_tokens.weight, emb)


def test_merge_twice_is_refused_naming_the_module(trained):
    merge_adapters(trained)
    before = snapshot(trained)
    with pytest.raises(RuntimeError, match=rf"merge_adapters: adapter\(s\) \['default'\] already "
                                           rf"merged into module '{Q0}'"):
        merge_adapters(trained)
    assert_unchanged(trained, before)


def test_merge_into_a_quantized_base_is_refused_naming_the_module():
    from loracore.qlora import Linear4bit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[1] = Linear4bit.from_linear(model[1])
    inject(model, ["0", "1"], r=2, lora_alpha=4)
    before = snapshot(model)
    with pytest.raises(TypeError, match="merge_adapters: module '1' has a Linear4bit base"):
        merge_adapters(model)
    assert_unchanged(model, before)


def test_merge_non_finite_on_the_last_layer_merges_nothing(trained):
    last = list(lora_layers(trained).values())[-1]
    with torch.no_grad():
        last.lora_A["default"].weight.fill_(1e30)
        last.lora_B["default"].weight.fill_(1e30)
    before = snapshot(trained)
    with pytest.raises(ValueError, match=r"merge_adapters: module 'model.layers.1.self_attn.v_proj'"
                                         r".*non-finite.*nothing was merged"):
        merge_adapters(trained)
    assert_unchanged(trained, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3])
def test_merge_failing_half_way_rolls_back_bit_for_bit(base, monkeypatch, dtype, n):
    """A second adapter merged on top of a first one, failing on the n-th layer: the first
    stays merged with exactly its bits, the second is merged nowhere."""
    base.to(dtype)
    inject(base, ["q_proj", "v_proj"], r=4, lora_alpha=8, adapter_name="a")
    inject(base, ["q_proj", "v_proj"], r=2, lora_alpha=4, adapter_name="b")
    randomize_B(base)
    merge_adapters(base, "a")
    before = snapshot(base)
    fail_on_call(monkeypatch, LoRALinear, "merge", n)
    with pytest.raises(RuntimeError, match="injected failure"):
        merge_adapters(base, "b")
    assert_unchanged(base, before)


def test_unmerge_failing_half_way_rolls_back(trained, monkeypatch):
    merge_adapters(trained)
    before = snapshot(trained)
    fail_on_call(monkeypatch, LoRALinear, "unmerge", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        unmerge_adapters(trained)
    assert_unchanged(trained, before)
