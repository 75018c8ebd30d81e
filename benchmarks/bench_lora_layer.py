"""The LoRA layer's speed, at Qwen2-0.5B's shapes (896→896 and 896→4864), r = 16,
a batch of 8 × 256 tokens, float32 on the CPU.

- forward + backward of ``loracore.lora.LoRALinear`` vs PEFT's LoRA ``Linear`` (the same
  A, B and base weight; base frozen, input requiring a gradient as inside a model).
  Target: ratio ≤ 1.0.
- merged forward (inference) vs a plain ``nn.Linear``: once ΔW is merged the layer should
  cost nothing extra. Target: ratio ≤ 1.02.

The contenders are timed in alternation, round after round, so that a slow patch of the
machine hits them alike; each figure is a median over rounds.

    python benchmarks/bench_lora_layer.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLinear
from torch import nn

from loracore.bench import interleaved_medians, write_result
from loracore.lora import LoRALinear

SHAPES = [(896, 896), (896, 4864)]
R, ALPHA, BATCH, SEQ = 16, 32, 8, 256


def layers(d_in: int, d_out: int) -> tuple[nn.Linear, LoRALinear, nn.Module]:
    """A plain layer, and loracore's and PEFT's LoRA around copies of it with equal A and B."""
    torch.manual_seed(0)
    plain = nn.Linear(d_in, d_out)
    ours = LoRALinear(copy.deepcopy(plain), r=R, lora_alpha=ALPHA)
    ours.base_layer.requires_grad_(False)
    nn.init.normal_(ours.lora_B["default"].weight, std=0.01)
    wrapped = get_peft_model(nn.Sequential(copy.deepcopy(plain)),
                             LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    theirs = next(m for m in wrapped.modules() if isinstance(m, PeftLinear))
    with torch.no_grad():
        for d in ("lora_A", "lora_B"):
            getattr(theirs, d)["default"].weight.copy_(getattr(ours, d)["default"].weight)
    return plain, ours, theirs


def forward_backward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        layer(x).sum().backward()
        x.grad = None
        for p in params:
            p.grad = None
    return step


def forward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            layer(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    repeats = 5 if args.quick else 21

    rows = []
    for d_in, d_out in SHAPES:
        plain, ours, theirs = layers(d_in, d_out)
        x = torch.randn(BATCH, SEQ, d_in, requires_grad=True)
        t = interleaved_medians({"ours": forward_backward(ours, x),
                                 "peft": forward_backward(theirs, x)}, repeats)
        rows.append({"what": f"forward+backward {d_in}→{d_out}, r={R}, {BATCH}×{SEQ} tokens",
                     "loracore": t["ours"], "reference": t["peft"], "reference_name": "PEFT lora.Linear",
                     "unit": "s", "ratio": t["ours"] / t["peft"], "target": "≤ 1.0"})

        ours.merge()
        x = x.detach()
        t = interleaved_medians({"ours": forward(ours, x), "plain": forward(plain, x)}, repeats)
        rows.append({"what": f"merged forward {d_in}→{d_out}, {BATCH}×{SEQ} tokens",
                     "loracore": t["ours"], "reference": t["plain"], "reference_name": "nn.Linear",
                     "unit": "s", "ratio": t["ours"] / t["plain"], "target": "≤ 1.02"})

    write_result("lora_layer", rows, notes=(
        "float32 on the CPU; loracore and its reference are timed alternately in each round "
        f"({repeats} rounds, median). PEFT {__import__('peft').__version__}."))


if __name__ == "__main__":
    main()
