"""One QLoRA training step on SmolLM2-135M: loracore vs PEFT + bitsandbytes, same run, CPU.

Both sides: every linear layer except ``lm_head`` in NF4 with double quantization (blocksize
64, float32 compute), LoRA r = 16, alpha = 32 on q/k/v/o/gate/up/down projections, AdamW,
one step = forward + loss + backward + optimizer step on a batch of 8 x 64 tokens.

- loracore: ``load_base_model("smollm2-135m")``, ``quantize_model``, ``inject``.
- reference: ``AutoModelForCausalLM.from_pretrained(smollm2_cache_dir(),
  quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True), device_map="cpu")`` and ``peft.get_peft_model``.

Target: ratio <= 0.9 (issue 27; it was <= 1.3). The base-weight memory of the two quantized models is reported too.

    python benchmarks/bench_qlora.py [--quick]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Callable

import torch
from torch import nn

from loracore.bench import interleaved_medians, write_result
from loracore.lora import inject
from loracore.models import load_base_model, smollm2_cache_dir
from loracore.qlora import model_bytes, quantize_model
from loracore.train import causal_lm_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32


def loracore_model() -> nn.Module:
    model, _ = load_base_model("smollm2-135m", verbose=False)
    quantize_model(model)
    inject(model, TARGETS, r=R, lora_alpha=ALPHA)
    return model


def peft_model() -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    load_base_model("smollm2-135m", verbose=False)  # builds the safetensors cache if missing
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(smollm2_cache_dir(), quantization_config=config,
                                                    device_map="cpu", dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                           lora_dropout=0.0))


def step_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> float:
        loss = causal_lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base (everything but the LoRA matrices).

    bitsandbytes keeps a layer's block constants in ``weight.quant_state``, outside the
    module's parameters and buffers, so they are added here.
    """
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    extra = 0
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is None:
            continue
        parts = [state.absmax, state.offset]
        if state.state2 is not None:
            parts.append(state.state2.absmax)
        extra += sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return model_bytes(model) - lora + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a batch of 2 x 32 tokens, 2 rounds")
    args = parser.parse_args()
    batch, seq, repeats = (2, 32, 2) if args.quick else (8, 64, 5)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (batch, seq))

    ours, theirs = loracore_model(), peft_model()
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_ours == n_theirs, f"different adapters: {n_ours} vs {n_theirs} trainable parameters"
    t = interleaved_medians({"loracore": step_fn(ours, ids), "peft": step_fn(theirs, ids)}, repeats)
    mem_ours, mem_theirs = base_bytes(ours), base_bytes(theirs)
    rows = [
        {"what": f"QLoRA training step, SmolLM2-135M, r=16 on 7 projections, batch {batch}x{seq}",
         "loracore": t["loracore"], "reference": t["peft"],
         "reference_name": "PEFT + bitsandbytes Linear4bit", "unit": "s",
         "ratio": t["loracore"] / t["peft"], "target": "<= 0.9"},
        {"what": "quantized base model memory (params + buffers, NF4 + DQ, embeddings float32)",
         "loracore": mem_ours / 2**20, "reference": mem_theirs / 2**20,
         "reference_name": "PEFT + bitsandbytes model", "unit": "MiB",
         "ratio": mem_ours / mem_theirs, "target": "-"},
    ]
    write_result("qlora", rows, notes=f"{n_ours:,} trainable parameters on both sides; medians of "
                                      f"{repeats} interleaved steps after one warm-up step.")


if __name__ == "__main__":
    main()
