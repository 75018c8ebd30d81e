"""Training throughput: loracore's loop + loracore LoRA vs the same loop + PEFT LoRA.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py [--quick]

Both sides: SmolLM2-135M-Instruct in float32, LoRA r = 16, alpha = 32 on all seven projections
(q, k, v, o, gate, up, down), no dropout, AdamW lr 1e-3, the same fixed batches of the course's
capitals data, trained by ``loracore.train.train``. Only the LoRA implementation differs.

Each side runs in its own subprocess, so its peak memory is its own: on a CPU the peak
resident set size (RSS) during training minus the RSS just before it (gradients, activations,
optimizer state), on a GPU ``torch.cuda.max_memory_allocated``. Throughput counts real
(non-padding) tokens per second; the reported figure is the median over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux: write 5 to clear_refs), so the
    peak measured is the training's, not the model load's."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(side: str, quick: bool) -> dict:
    """Train with one LoRA implementation; return tokens/s and peak memory."""
    from loracore.data import load_sft_dataset, make_dataloader
    from loracore.models import load_base_model, pick_device
    from loracore.train import train

    device, _ = pick_device()
    torch.manual_seed(0)
    model, tokenizer = load_base_model("smollm2-135m", device=device)
    if side == "loracore":
        from loracore.lora import inject

        inject(model, TARGETS, r=16, lora_alpha=32)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    batch_size, steps, repeats = (2, 1, 2) if quick else (8, 2, 5)
    data = load_sft_dataset(ROOT / "data" / "capitals_train.jsonl", tokenizer, max_length=64,
                            limit=batch_size * steps)
    batches = list(make_dataloader(data, tokenizer, batch_size=batch_size, shuffle=False))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    rss_before = _status_mb("VmRSS")
    train(model, batches, num_steps=steps, progress=False)  # warm-up (allocator, kernels)
    rates = []
    for _ in range(repeats):
        result = train(model, batches, num_steps=steps, progress=False)
        rates.append(result.tokens / result.seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e6
        memory_what = "peak CUDA memory allocated"
    else:
        peak = _status_mb("VmHWM") - rss_before
        memory_what = "peak RSS growth during training"
    return {"tokens_per_s": statistics.median(rates), "peak_mb": peak, "memory_what": memory_what,
            "tokens_per_step": sum(int(b["attention_mask"].sum()) for b in batches) / steps,
            "device": str(device)}


def run_side(side: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", side] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (2 tiny steps)")
    parser.add_argument("--worker", choices=["loracore", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
        return

    from loracore.bench import write_result

    start = time.perf_counter()
    ours, ref = run_side("loracore", args.quick), run_side("peft", args.quick)
    rows = [
        {"what": "LoRA training throughput, SmolLM2-135M, r=16, 7 projections, float32",
         "loracore": ours["tokens_per_s"], "reference": ref["tokens_per_s"],
         "reference_name": "PEFT 0.21 + the same loop", "unit": "tokens/s",
         "ratio": ours["tokens_per_s"] / ref["tokens_per_s"], "target": ">= 1.0"},
        {"what": f"training memory ({ours['memory_what']})",
         "loracore": ours["peak_mb"], "reference": ref["peak_mb"],
         "reference_name": "PEFT 0.21 + the same loop", "unit": "MB",
         "ratio": ours["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else float("nan"),
         "target": "<= 1.0 (reported)"},
    ]
    notes = (f"{'quick smoke run; ' if args.quick else ''}device {ours['device']}; "
             f"{ours['tokens_per_step']:.0f} real tokens per step (batch of "
             f"{'2' if args.quick else '8'} capitals chats); median tokens/s over repeats; "
             f"each side in its own process; total {time.perf_counter() - start:.0f} s")
    if args.quick:  # a smoke run checks the script works; it does not replace real results
        for r in rows:
            print(f"{r['what']}: loracore {r['loracore']:.4g} {r['unit']}, "
                  f"{r['reference_name']} {r['reference']:.4g} {r['unit']}, ratio {r['ratio']:.3f}")
        print(notes)
    else:
        write_result("train", rows, notes=notes)


if __name__ == "__main__":
    main()
