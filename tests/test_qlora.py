"""QLoRA: the NF4 linear layer, quantizing a model, and LoRA on top of a 4-bit base; and
quantize_model's all-or-nothing refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, randomize_B, snapshot
from loracore import qlora
from loracore.adapters import load_adapter, save_adapter
from loracore.lora import inject, lora_layers, trainable_parameters
from loracore.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from loracore.models import load_base_model
from loracore.qlora import Linear4bit, model_bytes, quantize_model
from loracore.train import causal_lm_loss


def make_linear(in_features: int = 96, out_features: int = 40, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


# ---- Linear4bit -------------------------------------------------------------------------
def test_linear4bit_forward_is_linear_with_dequantized_weight():
    lin = make_linear()
    q = Linear4bit.from_linear(lin)
    x = torch.randn(3, 5, 96)
    w = dequantize_nf4(quantize_nf4(lin.weight.detach()))
    assert torch.allclose(q(x), x @ w.T + lin.bias, atol=1e-6)
    assert torch.equal(q.dequantize(), w)
    # and close to the original layer: 4-bit error, not garbage
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert 0 < rel.item() < 0.15


def test_linear4bit_contract_for_lora():
    q = Linear4bit.from_linear(make_linear(bias=False))
    assert (q.in_features, q.out_features) == (96, 40) and q.bias is None
    assert isinstance(q.weight, NF4Tensor) and q.weight.shape == (40, 96)
    assert q.dequantize().shape == (40, 96)
    assert all(not p.requires_grad for p in q.parameters())
    assert "bits/param" in repr(q)


def test_linear4bit_matches_bitsandbytes_linear4bit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb = pytest.importorskip("bitsandbytes")
    lin = make_linear(128, 64)
    ref = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32,
                            compress_statistics=True, quant_type="nf4")
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # quantizes on the first move, as on a GPU
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False,
                                   compress_statistics=True, quant_type="nf4").to("cpu")
    q = Linear4bit.from_linear(lin)
    assert torch.equal(q.weight_packed, ref.weight.data.view(-1))
    assert torch.equal(q.weight_absmax, ref.weight.quant_state.absmax)
    x = torch.randn(4, 128)
    assert torch.allclose(q(x), ref(x), atol=1e-5)


def test_backward_gives_input_gradient_and_saves_no_full_weight():
    lin = make_linear(256, 128)
    q = Linear4bit.from_linear(lin)
    x = torch.randn(2, 7, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = q(x)
    assert (128, 256) not in saved and (256, 128) not in saved, saved
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ q.dequantize().T + lin.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)


def test_compute_dtype_and_dtype_casts_keep_constants_float32():
    lin = make_linear()
    q = Linear4bit.from_linear(lin, double_quant=False, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 96)
    assert q(x).dtype == torch.float32  # returned in the input's dtype
    assert q(x.bfloat16()).dtype == torch.bfloat16
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert q.weight_absmax.dtype == torch.float32 and torch.equal(q.dequantize(), before)


def test_linear4bit_refuses_bad_input():
    q = Linear4bit.from_linear(make_linear())
    with pytest.raises(ValueError, match="in_features=96"):
        q(torch.randn(2, 95))
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="2-D NF4Tensor"):
        Linear4bit(quantize_nf4(torch.randn(4, 4, 4)))


# ---- quantize_model ---------------------------------------------------------------------
def test_quantize_model_replaces_all_linear_but_lm_head(tiny):
    model, _ = tiny
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantize_model(model)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear
    assert sum(k is Linear4bit for k in kinds.values()) == n_linear - 1 == 14
    assert sum(k is nn.Linear for k in kinds.values()) == 1
    assert all(not p.requires_grad for p in model.parameters())


def test_quantize_model_refuses_model_with_lora(tiny):
    model, _ = tiny
    inject(model, ["q_proj"], r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="quantize the base model first"):
        quantize_model(model)


def test_model_bytes_nf4_is_about_a_quarter_of_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(4)]).to(torch.bfloat16)
    bf16 = model_bytes(model)
    assert bf16 == 4 * 512 * 512 * 2
    quantize_model(model, skip=())
    nf4 = model_bytes(model)
    assert nf4 == 4 * (512 * 512 // 2 + 512 * 512 // 64 + 4 * 16 + 4)
    assert nf4 / bf16 < 0.27


# ---- QLoRA: LoRA on a 4-bit base ----------------------------------------------------------
def qlora_model(tiny, r: int = 4):
    model, tokenizer = tiny
    quantize_model(model)
    inject(model, "all-linear", r=r, lora_alpha=2 * r)
    return model, tokenizer


def test_lora_wraps_linear4bit_and_starts_at_the_quantized_base(tiny):
    model, tokenizer = tiny
    ids = torch.randint(0, 200, (2, 12))
    quantize_model(model)
    base_logits = model(input_ids=ids).logits
    inject(model, "all-linear", r=4, lora_alpha=8)
    layers = lora_layers(model)
    assert len(layers) == 14 and all(isinstance(l.base_layer, Linear4bit) for l in layers.values())
    assert torch.equal(model(input_ids=ids).logits, base_logits)  # B = 0: exactly the base
    trainable, total, _ = trainable_parameters(model)
    assert trainable == sum(l.lora_A["default"].weight.numel() + l.lora_B["default"].weight.numel()
                            for l in layers.values())
    assert all(l.lora_A["default"].weight.dtype == torch.float32 for l in layers.values())
    randomize_B(model, std=0.05)
    assert not torch.allclose(model(input_ids=ids).logits, base_logits)
    with pytest.raises(TypeError, match="Linear4bit"):
        next(iter(layers.values())).merge()


def test_qlora_training_step_lowers_the_loss(tiny):
    model, tokenizer = qlora_model(tiny)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 16))
    labels = ids.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = causal_lm_loss(model(input_ids=ids).logits, labels)
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # the 4-bit base never moved: same packed bytes, same frozen parameters
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_adapter_trained_on_4bit_base_saves_and_loads(tiny, tmp_path):
    from loracore.models import load_base_model
    model, _ = qlora_model(tiny)
    randomize_B(model, std=0.05)
    ids = torch.randint(0, 200, (2, 10))
    want = model(input_ids=ids).logits
    path = save_adapter(model, tmp_path / "qlora")
    fresh, _ = load_base_model("tiny-qwen2", verbose=False)
    quantize_model(fresh)
    load_adapter(fresh, path)
    assert torch.equal(fresh(input_ids=ids).logits, want)


def test_qlora_adapter_fingerprints_the_4bit_base(tiny, tmp_path):
    """The 4-bit bytes are hashed: the same base quantized again matches, a base quantized
    with another blocksize or from other weights is refused, and the float original (shapes
    only) is accepted, so a QLoRA adapter can be merged into the float base."""
    from loracore.models import load_base_model
    model, _ = qlora_model(tiny)
    randomize_B(model, std=0.05)
    path = save_adapter(model, tmp_path / "qlora")
    fp = load_fingerprint(path)
    assert fp["weights_sha256"] is None and len(fp["quantized_sha256"]) == 64

    same = quantize_model(load_base_model("tiny-qwen2", verbose=False)[0])
    load_adapter(same, path)

    other_blocksize = quantize_model(load_base_model("tiny-qwen2", verbose=False)[0], blocksize=128)
    with pytest.raises(ValueError, match="quantized weights hash differently"):
        load_adapter(other_blocksize, path)

    nudged = load_base_model("tiny-qwen2", verbose=False)[0]
    with torch.no_grad():
        nudged.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match="quantized weights hash differently"):
        load_adapter(quantize_model(nudged), path)

    float_base = load_base_model("tiny-qwen2", verbose=False)[0]
    load_adapter(float_base, path)
    assert len(lora_layers(float_base)) == len(lora_layers(model))


def load_fingerprint(path) -> dict:
    import json
    from safetensors import safe_open
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["loracore"])["base_fingerprint"]


def test_quantize_model_with_your_own_quantizer(tiny):
    """quantizer= uses the caller's function (lab 03 passes the learner's NF4); what it returns
    is checked per layer, and a bad one leaves the model as it was."""
    from loracore.models import load_base_model

    model, _ = tiny
    calls = []

    def mine(w: torch.Tensor) -> NF4Tensor:
        calls.append(tuple(w.shape))
        return quantize_nf4(w, blocksize=64, double_quant=True)

    quantize_model(model, quantizer=mine)
    reference = quantize_model(load_base_model("tiny-qwen2", verbose=False)[0])
    assert len(calls) == 14
    for (name, a), b in zip(model.named_modules(), reference.modules()):
        if isinstance(a, Linear4bit):
            assert torch.equal(a.weight.packed, b.weight.packed) and torch.equal(a.weight.absmax, b.weight.absmax)

    def half(w):  # a plausible slip: one code per byte, or the wrong number of bytes
        q = quantize_nf4(w, blocksize=64, double_quant=True)
        return NF4Tensor(q.packed[: q.packed.numel() // 2], q.absmax, q.shape, q.dtype, q.blocksize,
                         q.offset, q.absmax2)

    for bad, exc, message in ((lambda w: w, TypeError, "returned Tensor, not a loracore.nf4.NF4Tensor"),
                              (half, ValueError, "uint8 bytes")):
        fresh = load_base_model("tiny-qwen2", verbose=False)[0]
        before = {n: type(m) for n, m in fresh.named_modules()}
        with pytest.raises(exc, match=r"quantize_model: layer 'model\.layers\.0\.self_attn\.q_proj': .*" + message):
            quantize_model(fresh, quantizer=bad)
        assert {n: type(m) for n, m in fresh.named_modules()} == before


# ---- quantize_model and Linear4bit: hostile inputs, all or nothing ------------------------
@pytest.fixture(scope="module")
def base():
    """The tiny random Qwen2 and its tokenizer, loaded once; tests work on deep copies."""
    return load_base_model("tiny-qwen2", verbose=False)



@pytest.fixture
def model(base):
    return copy.deepcopy(base[0])


LINEAR_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                "model.layers.1.mlp.down_proj"]



# ---- quantize_model: all or nothing -------------------------------------------------------
@pytest.mark.parametrize("layer", LINEAR_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_model_refuses_a_non_finite_layer_before_converting_any(model, layer, bad):
    with torch.no_grad():
        model.get_submodule(layer).weight[1, 2] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"quantize_model: layer '{layer}' has 1 non-finite"):
        quantize_model(model)
    assert_unchanged(model, before)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_quantize_model_failure_in_the_third_quantization_leaves_the_model_whole(model, monkeypatch):
    calls = []
    real = Linear4bit.from_linear.__func__

    def failing(cls, linear, **kw):
        calls.append(linear)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(cls, linear, **kw)

    monkeypatch.setattr(Linear4bit, "from_linear", classmethod(failing))
    before = snapshot(model)
    third = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"][2]
    with pytest.raises(RuntimeError, match=rf"quantize_model: layer '{third}': injected failure; "
                                           r"nothing was quantized"):
        quantize_model(model)
    assert len(calls) == 3
    assert_unchanged(model, before)
    monkeypatch.undo()
    quantize_model(model)  # and a retry works on the untouched model
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) > 3


def test_quantize_model_failure_while_swapping_puts_every_layer_back(model, monkeypatch):
    calls = []
    real = qlora._swap

    def failing(parent, child, module):
        calls.append(child)
        if len(calls) == 3:
            raise RuntimeError("injected swap failure")
        real(parent, child, module)

    monkeypatch.setattr(qlora, "_swap", failing)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected swap failure"):
        quantize_model(model)
    assert len(calls) == 3  # two layers had been swapped in: both must be back
    assert_unchanged(model, before)


# ---- quantize_model: skip -----------------------------------------------------------------
@pytest.mark.parametrize("skip", ["lm_head", ["lm_head"], ("lm_head",), {"lm_head"}])
def test_skip_one_string_is_one_name(model, skip):
    quantize_model(model, skip=skip)
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)


def test_skip_a_list_of_last_names_and_full_names(model):
    quantize_model(model, skip=["lm_head", "down_proj", "model.layers.0.self_attn.q_proj"])
    assert type(model.lm_head) is nn.Linear
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in model.model.layers)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, Linear4bit)


@pytest.mark.parametrize("skip, exc, message", [
    (["lm_haed"], ValueError, r"skip names \['lm_haed'\], which match no nn.Linear"),
    ("down_prj", ValueError, r"skip names \['down_prj'\]"),
    ([3], TypeError, "skip holds 3; every entry must be a non-empty layer name"),
    ([""], TypeError, "skip holds ''"),
    (5, TypeError, "skip must be a layer name or a list of names, got int"),
])
def test_skip_bad_names_are_refused_and_change_nothing(model, skip, exc, message):
    before = snapshot(model)
    with pytest.raises(exc, match=message):
        quantize_model(model, skip=skip)
    assert_unchanged(model, before)


# ---- quantize_model / Linear4bit: arguments -----------------------------------------------
@pytest.mark.parametrize("kwargs, exc, message", [
    ({"compute_dtype": torch.int8}, TypeError, r"quantize_model: compute_dtype must be torch.float32.*torch.int8"),
    ({"compute_dtype": "float16"}, TypeError, r"quantize_model: compute_dtype .* got 'float16' \(str\)"),
    ({"compute_dtype": torch.float64}, TypeError, r"quantize_model: compute_dtype .*torch.float64"),
    ({"blocksize": 48}, ValueError, "quantize_model: blocksize must be a power of two"),
    ({"blocksize": True}, ValueError, "quantize_model: blocksize must be a power of two"),
    ({"double_quant": "yes"}, TypeError, "quantize_model: double_quant must be True or False"),
])
def test_quantize_model_bad_arguments_change_nothing(model, kwargs, exc, message):
    before = snapshot(model)
    with pytest.raises(exc, match=message):
        quantize_model(model, **kwargs)
    assert_unchanged(model, before)


def test_quantize_model_refuses_a_float64_layer_by_name(model):
    model.model.layers[1].mlp.gate_proj.double()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"layer 'model.layers.1.mlp.gate_proj' has weight dtype "
                                        r"torch.float64.*model.float\(\)"):
        quantize_model(model)
    assert_unchanged(model, before)


def test_quantize_model_refuses_a_model_with_lora_and_changes_nothing(model):
    inject(model, ["q_proj"], r=2, lora_alpha=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has LoRA layers; quantize the base model first"):
        quantize_model(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("compute_dtype", [torch.int32, "float32", torch.float64, 32])
def test_linear4bit_refuses_a_compute_dtype_that_is_not_a_float_dtype(compute_dtype):
    lin = nn.Linear(64, 8)
    with pytest.raises(TypeError, match=r"Linear4bit.from_linear: compute_dtype must be"):
        Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    with pytest.raises(TypeError, match=r"Linear4bit: compute_dtype must be"):
        Linear4bit(quantize_nf4(lin.weight.detach()), compute_dtype=compute_dtype)



# ---- Linear4bit: a tampered NF4Tensor is refused -------------------------------------------
def test_tampered_buffers_of_a_linear4bit_are_refused_at_forward():
    layer = Linear4bit.from_linear(nn.Linear(96, 40))
    layer.weight_absmax = layer.weight_absmax[:-2]  # e.g. a state dict from another blocksize
    with pytest.raises(ValueError, match="dequantize_nf4: inconsistent NF4Tensor: absmax holds"):
        layer(torch.randn(2, 96))


def test_non_finite_block_constants_are_refused_by_linear4bit():
    q = quantize_nf4(torch.randn(8, 64), double_quant=False)
    q.absmax[0] = float("nan")
    with pytest.raises(ValueError, match="Linear4bit: inconsistent NF4Tensor: .*hold NaN or inf"):
        Linear4bit(q)
