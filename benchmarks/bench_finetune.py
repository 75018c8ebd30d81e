"""`loracore finetune` throughput: vs the notebook loop, and two gloo processes vs one.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_finetune.py [--quick]

Every side trains SmolLM2-135M-Instruct (float32) with LoRA r = 16, alpha = 32 on all seven
projections, AdamW lr 1e-3, global batches of 8 capitals chats, for the same number of steps,
each run in its own fresh process. Throughput is real (non-padding) tokens per second of the
training loop alone (model loading excluded on both sides): the command's ``history.json``, and
``TrainResult.tokens / seconds`` of ``loracore.train.train`` for the notebook loop. The runs of
the two sides alternate (a, b, b, a, ...) and each figure is the median over repeats.

Two processes on this 2-core machine: torchrun gives each process one thread, so the same
arithmetic is split over the same two cores, plus a gradient all-reduce. It is reported to show
that data parallelism needs hardware of its own (a GPU per process), not as a target.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "capitals_train.jsonl"


def notebook_worker(steps: int) -> dict:
    """The notebook way: load, inject, make a DataLoader, call train()."""
    import torch

    from loracore.data import load_sft_dataset, make_dataloader
    from loracore.models import load_base_model
    from loracore.surgery import inject
    from loracore.train import train

    model, tokenizer = load_base_model("smollm2-135m", verbose=False)
    torch.manual_seed(0)
    inject(model, "all-linear", r=16, lora_alpha=32)
    data = load_sft_dataset(DATA, tokenizer, max_length=256)
    result = train(model, make_dataloader(data, tokenizer, batch_size=8), num_steps=steps,
                   lr=1e-3, progress=False)
    return {"tokens_per_s": result.tokens / result.seconds}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_run(steps: int, nproc: int) -> float:
    """Tokens/s of one `loracore finetune` run (under torchrun when nproc > 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                     "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
                    if nproc > 1 else [sys.executable])
        cmd = launcher + ["-m", "loracore.finetune", "--model", "smollm2-135m", "--data", str(DATA),
                          "--out", str(Path(tmp) / "out"), "--rank", "16", "--lora-alpha", "32",
                          "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3",
                          "--no-progress"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        return json.loads((Path(tmp) / "out" / "history.json").read_text())["tokens_per_second"]


def notebook_run(steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", str(steps)], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def alternate(runs: dict, repeats: int) -> dict[str, float]:
    """Median of each side's result, the sides alternating a, b, b, a, ... ."""
    values: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for round_ in range(repeats):
        for name, fn in (order if round_ % 2 == 0 else order[::-1]):
            values[name].append(fn())
    return {name: statistics.median(v) for name, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 1 repeat")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(notebook_worker(args.worker)))
        return

    from loracore.bench import write_result

    steps, repeats = (2, 1) if args.quick else (8, 3)
    start = time.perf_counter()
    vs_loop = alternate({"command": lambda: command_run(steps, 1),
                         "notebook": lambda: notebook_run(steps)}, repeats)
    vs_one = alternate({"two": lambda: command_run(steps, 2),
                        "one": lambda: command_run(steps, 1)}, repeats)
    rows = [
        {"what": "loracore finetune vs the notebook loop (train()), SmolLM2-135M, r=16, batch 8",
         "loracore": vs_loop["command"], "reference": vs_loop["notebook"],
         "reference_name": "loracore.train.train", "unit": "tokens/s",
         "ratio": vs_loop["command"] / vs_loop["notebook"], "target": ">= 0.95"},
        {"what": "two gloo processes (torchrun) vs one, the same command, 2 CPU cores",
         "loracore": vs_one["two"], "reference": vs_one["one"],
         "reference_name": "one process", "unit": "tokens/s",
         "ratio": vs_one["two"] / vs_one["one"], "target": "reported (2 cores: no speed-up expected)"},
    ]
    notes = (f"{'quick smoke run; ' if args.quick else ''}{steps} steps per run, median of "
             f"{repeats} runs per side, sides alternating; loop time only (model loading "
             f"excluded); total {time.perf_counter() - start:.0f} s")
    if args.quick:
        for r in rows:
            print(f"{r['what']}: {r['loracore']:.4g} vs {r['reference']:.4g} {r['unit']}, "
                  f"ratio {r['ratio']:.3f}")
        print(notes)
    else:
        write_result("finetune", rows, notes=notes)


if __name__ == "__main__":
    main()
