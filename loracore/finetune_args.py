"""The options of ``loracore finetune`` (and ``python -m loracore.finetune``), apart from the
training itself.

Nothing here imports torch, transformers or datasets (about 5 s of CPU time): ``loracore
--help``, ``loracore grade`` and a refused argument answer without them, and
:mod:`loracore.finetune` imports them only when a run starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loracore.argtypes import positive_float, positive_int

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's options (shared by ``loracore finetune`` and ``python -m loracore.finetune``)."""
    a = parser.add_argument
    a("--model", required=True, help="a course model (smollm2-135m, qwen2-0.5b, tiny-qwen2) "
      "or a local Hugging Face model folder")
    a("--data", required=True, type=Path, help="training conversations, chat-format JSONL")
    a("--eval", type=Path, help="held-out conversations, chat-format JSONL")
    a("--out", required=True, type=Path, help="output folder (adapter, args, history, checkpoint)")
    # --rank and --lora-r are the same option: under torchrun, spell it one of those, because
    # torchrun's own parser reads "--r" as an abbreviation of its --rdzv-*/--role options.
    a("--r", "--rank", "--lora-r", dest="r", type=positive_int, default=16,
      help="LoRA rank (default 16); --rank under torchrun")
    a("--lora-alpha", type=positive_float, default=32.0, help="LoRA alpha (default 32)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input (default 0)")
    a("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    a("--use-dora", action="store_true",
      help="DoRA (Liu et al. 2024): a trained magnitude per output feature on top of LoRA "
           "(PEFT's use_dora; vLLM does not serve DoRA adapters: merge them first)")
    a("--target-modules", default="all-linear",
      help="'all-linear' or comma-separated layer names such as q_proj,v_proj")
    a("--steps", type=positive_int, required=True, help="optimizer steps")
    a("--batch-size", type=positive_int, default=8, help="global batch: examples per step "
      "per accumulation round, split over the processes (default 8)")
    a("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    a("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    a("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    a("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    a("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping norm")
    a("--max-length", type=positive_int, default=256, help="longest example in tokens")
    a("--qlora", action="store_true", help="quantize the base to NF4 first (QLoRA)")
    a("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
      help="base model dtype (auto: bfloat16 on a GPU that computes it natively, else float32)")
    a("--seed", type=int, default=0, help="seeds the adapter's init and the data order")
    a("--save-every", type=positive_int, help="write a checkpoint every N steps")
    a("--eval-every", type=positive_int, help="evaluate on --eval every N steps")
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--overwrite", action="store_true", help="replace what --out holds")
    a("--no-progress", action="store_true", help="no progress bar")
    return parser
