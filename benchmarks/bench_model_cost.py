"""What Qwen2-0.5B costs on this machine compared with SmolLM2-135M: the factor behind the
course's model policy (README, "Which model where?") and each notebook's time for Qwen2-0.5B.

Qwen2-0.5B's weights cannot be downloaded here, but its cost does not depend on them: the
Qwen2-0.5B-shaped model is built from its published configuration (24 layers, hidden 896,
14 heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings, q/k/v biases) with random
weights, in float32 on the CPU. The reference is the offline SmolLM2-135M.

- one LoRA training step (r = 16 on every linear layer, batch 8 x 64 tokens, AdamW);
- greedy generation, 16 new tokens after a 32-token prompt (s per token).

    python benchmarks/bench_model_cost.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from loracore.bench import interleaved_medians, write_result
from loracore.lora import inject
from loracore.models import load_base_model

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def qwen2_05b_shaped() -> torch.nn.Module:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7

    smol, _ = load_base_model("smollm2-135m", verbose=False)
    qwen = qwen2_05b_shaped()
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in (("smol", smol), ("qwen", qwen))}

    def train_step_fn(model):
        inject(model, "all-linear", r=16, lora_alpha=32)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 10_000, (8, 64), generator=g)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        return step

    def generate_fn(model):
        ids = torch.randint(0, 10_000, (1, 32), generator=torch.Generator().manual_seed(1))

        def gen():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                               min_new_tokens=16, do_sample=False, pad_token_id=0)
        return gen

    gen = interleaved_medians({"qwen": generate_fn(qwen), "smol": generate_fn(smol)},
                              repeats=repeats, warmup=1)
    train = interleaved_medians({"qwen": train_step_fn(qwen), "smol": train_step_fn(smol)},
                                repeats=repeats, warmup=1)
    rows = [
        {"what": "LoRA training step, r=16 all-linear, batch 8x64 (s)", "loracore": train["qwen"],
         "reference": train["smol"], "reference_name": "SmolLM2-135M", "unit": "s",
         "ratio": train["qwen"] / train["smol"], "target": "-"},
        {"what": "greedy generation, 16 tokens after 32 (s per token)", "loracore": gen["qwen"] / 16,
         "reference": gen["smol"] / 16, "reference_name": "SmolLM2-135M", "unit": "s/token",
         "ratio": gen["qwen"] / gen["smol"], "target": "-"},
    ]
    write_result("model_cost", rows, notes=(
        f"'loracore' column: a Qwen2-0.5B-shaped model (random weights, {sizes['qwen'] / 1e6:.0f}M "
        f"parameters) vs SmolLM2-135M ({sizes['smol'] / 1e6:.1f}M), float32 on the CPU."))


if __name__ == "__main__":
    main()
