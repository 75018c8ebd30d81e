"""The same library on a GPU: these run only where CUDA is available (skipped on CI's CPU).

They pin what must not depend on the device: LoRA's invariants and its agreement with the
CPU result, the NF4 bytes, and the tiny model's forward pass under pick_device()'s dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loracore.models import load_base_model, pick_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_pick_device_chooses_the_gpu_with_a_16_bit_dtype():
    device, dtype = pick_device()
    assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def test_lora_layer_on_gpu_matches_cpu():
    from loracore.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    layer = LoRALinear(base, r=8, lora_alpha=16)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # non-zero B, or nothing is tested
    x = torch.randn(4, 10, 64)
    want = layer(x)
    gpu = layer.to("cuda")
    got = gpu(x.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    base_out = base.cuda()(x.cuda()).clone()
    with gpu.disable_adapters():
        assert torch.equal(gpu(x.cuda()), base_out)
    w0 = gpu.base_layer.weight.detach().clone()
    gpu.merge()
    torch.testing.assert_close(gpu(x.cuda()).cpu(), want, atol=1e-4, rtol=1e-4)
    gpu.unmerge()
    torch.testing.assert_close(gpu.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_tiny_model_with_lora_runs_in_bf16_on_gpu():
    from loracore.lora import inject, trainable_parameters

    device, dtype = pick_device()
    model, tokenizer = load_base_model("tiny-qwen2", dtype=dtype, device=device, verbose=False)
    inject(model, "all-linear", r=4, lora_alpha=8)
    trainable, total, _ = trainable_parameters(model)
    assert 0 < trainable < total
    ids = tokenizer("hello GPU", return_tensors="pt").to(device)
    model.train()
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_nf4_bytes_do_not_depend_on_the_device():
    from loracore.nf4 import dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    w = torch.randn(300, 129)  # odd count: a partial last block
    cpu = quantize_nf4(w, blocksize=64, double_quant=True)
    gpu = quantize_nf4(w.cuda(), blocksize=64, double_quant=True)
    assert torch.equal(gpu.packed.cpu(), cpu.packed)
    assert torch.equal(gpu.absmax.cpu(), cpu.absmax)
    torch.testing.assert_close(dequantize_nf4(gpu).cpu(), dequantize_nf4(cpu), atol=1e-6, rtol=0)


def test_nf4_matches_bitsandbytes_cuda_kernels():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from loracore.nf4 import dequantize_nf4, quantize_nf4

    torch.manual_seed(1)
    for shape in [(256, 256), (1000, 37), (4096,)]:
        w = torch.randn(*shape, device="cuda")
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                            compress_statistics=False)
        ours = quantize_nf4(w, blocksize=64, double_quant=False)
        assert torch.equal(ours.packed, packed.reshape(-1)), shape
        torch.testing.assert_close(ours.absmax, state.absmax, atol=0, rtol=0)
        torch.testing.assert_close(dequantize_nf4(ours, dtype=torch.float32),
                                   bnb_f.dequantize_4bit(packed, state).float(), atol=1e-6, rtol=0)
