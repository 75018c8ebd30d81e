"""QLoRA: the NF4 linear layer, quantizing a model, and LoRA on top of a 4-bit base."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from loracore.adapters import load_adapter, save_adapter
from loracore.lora import inject, lora_layers, trainable_parameters
from loracore.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from loracore.qlora import Linear4bit, model_bytes, quantize_model
from loracore.train import causal_lm_loss


def make_linear(in_features: int = 96, out_features: int = 40, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


def randomize_B(model: nn.Module, std: float = 0.05) -> None:
    """Non-zero B, so an adapter's contribution is visible (B starts at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


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
    randomize_B(model)
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
    randomize_B(model)
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
    randomize_B(model)
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
