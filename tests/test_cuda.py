"""The same library on a GPU: these run only where CUDA is available (skipped on CI's CPU).

They pin what must not depend on the device: LoRA's invariants and its agreement with the
CPU result, the NF4 bytes, the tiny model's forward pass under pick_device()'s dtype, serving
with ``--device cuda --dtype bfloat16`` against the CPU's float32 answers, and
``loracore finetune`` on the GPU.
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


# ---- serving and fine-tuning on the GPU ------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_adapters(tmp_path_factory):
    """Two adapters made on the CPU's float32 tiny model, as a learner's would be."""
    from test_serve import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_base_model("tiny-qwen2", verbose=False)
    return {"a": make_adapter(model, root / "a", seed=1),
            "b": make_adapter(model, root / "b", seed=2, r=4, targets=["q_proj", "v_proj"])}


def _cuda_bf16_engine(paths):
    from loracore.serve import AdapterRegistry, Engine

    model, tok = load_base_model("tiny-qwen2", dtype=torch.bfloat16, device="cuda", verbose=False)
    reg = AdapterRegistry(model, max_loras=2)
    for name, path in paths.items():
        reg.load(name, path)
    return Engine(model, tok, reg)


def test_serving_on_cuda_in_bf16_stays_near_the_cpu_float32_answer(cpu_adapters):
    """Greedy tokens from the engine on CUDA in bfloat16, checked step by step against the CPU
    float32 model given the same prefix: each is within BF16_LOGIT_TOLERANCE of that model's
    best token (test_serve_device.py says why not equality: bfloat16 flips near-ties, and the
    tiny random model's logits are full of them). Seeded sampling repeats on the GPU too."""
    from loracore.serve import SamplingParams
    from test_serve import prompt, with_adapter
    from test_serve_device import BF16_LOGIT_TOLERANCE, PROMPTS, near_greedy_gaps

    model32, tok = load_base_model("tiny-qwen2", verbose=False)
    eng = _cuda_bf16_engine(cpu_adapters)
    try:
        assert eng.decoder.device.type == "cuda" and eng.decoder.dtype == torch.bfloat16
        for name in (None, "a", "b"):
            ref = model32 if name is None else with_adapter(model32, cpu_adapters[name])
            for text in PROMPTS:
                ids = prompt(tok, text)
                got = eng.generate(ids, name, SamplingParams(max_tokens=12, ignore_eos=True))
                assert len(got) == 12
                assert max(near_greedy_gaps(ref, ids, got)) <= BF16_LOGIT_TOLERANCE, (text, name)
        seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5)
        assert eng.generate(ids, "a", seeded) == eng.generate(ids, "a", seeded)
    finally:
        eng.close()


def test_server_with_device_cuda(cpu_adapters):
    """``python -m loracore.serve --device cuda --dtype bfloat16``: its startup line says so, and
    its answers are the in-process CUDA engine's (same device, dtype and shapes)."""
    from loracore.serve import SamplingParams
    from test_serve import prompt
    from test_serve_server import post, running_server

    eng = _cuda_bf16_engine(cpu_adapters)
    try:
        with running_server(["--model", "tiny-qwen2", "--device", "cuda", "--dtype", "bfloat16",
                             "--lora-modules", f"a={cpu_adapters['a']}"]) as (url, proc):
            lines = []
            while not lines or not lines[-1].startswith("loracore.serve:"):
                lines.append(proc.stdout.readline().decode())
            assert lines[-1].startswith("loracore.serve: tiny-qwen2 on cuda in bfloat16 with adapters ['a']")
            for name, adapter in (("tiny-qwen2", None), ("a", "a")):
                r = post(url, "/v1/completions", {"model": name, "prompt": "Once", "max_tokens": 6,
                                                  "temperature": 0})
                assert r.status_code == 200, r.text
                want = eng.generate(prompt(eng.tokenizer, "Once"), adapter, SamplingParams(max_tokens=6))
                assert r.json()["choices"][0]["text"] == eng.tokenizer.decode(want, skip_special_tokens=True)
    finally:
        eng.close()


def test_finetune_runs_on_cuda(tmp_path):
    """`loracore finetune` on the GPU: a few steps, finite losses, a trained adapter, and the
    dtype that resolve_device_dtype decides (float32 where it says float16)."""
    import json

    from loracore import finetune
    from loracore.models import resolve_device_dtype
    from test_finetune import COMMON, _adapter

    assert finetune.main([*COMMON, "--steps", "3", "--out", str(tmp_path / "o")]) == 0
    settings = json.loads((tmp_path / "o" / "training_args.json").read_text())
    want = "bfloat16" if resolve_device_dtype("cuda")[1] == torch.bfloat16 else "float32"
    assert settings["dtype"] == want
    history = json.loads((tmp_path / "o" / "history.json").read_text())
    assert len(history["loss"]) == 3 and all(map(lambda x: x == x and abs(x) < 1e4, history["loss"]))
    weights = _adapter(tmp_path / "o")
    assert all(weights[k].abs().max() > 0 for k in weights if k.endswith("lora_B.weight"))
