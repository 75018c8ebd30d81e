"""Paged and 8-bit AdamW: loracore's PagedAdamW vs torch.optim.AdamW and bitsandbytes' AdamW8bit.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_optim.py [--quick] [--big-params N]

Two sets of parameters, each with fixed random gradients, timed per ``optimizer.step()``:

- the LoRA parameters of SmolLM2-135M with r = 16 on all seven projections (4.88M parameters
  in 420 tensors of 9k to 25k elements);
- a large set: ``--big-params`` parameters (default 50M) in tensors of 1M elements.

Rows: step time with every page resident vs ``torch.optim.AdamW`` (target <= 1.1); with a
budget of a quarter of the state, the extra time per GB paged vs copying the same bytes to and
from a memory-mapped file directly (target <= 1.3, issue 27), and the peak resident state vs the budget; 8-bit state
memory vs 32-bit (target <= 0.27) and 8-bit step time vs bitsandbytes' ``AdamW8bit`` on the CPU.
Timings are medians of interleaved repeats (``loracore.bench.interleaved_medians``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch

from loracore.bench import interleaved_medians, write_result
from loracore.optim import PagedAdamW

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 1e6


def lora_shapes() -> list[tuple[int, ...]]:
    """Shapes of the trainable tensors of SmolLM2-135M with LoRA r=16 on all seven projections."""
    from loracore.lora import inject
    from loracore.models import load_base_model

    model, _ = load_base_model("smollm2-135m", verbose=False)
    inject(model, TARGETS, r=16, lora_alpha=32)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def raw_file_seconds_per_gb(nbytes: int, page_bytes: int) -> float:
    """Median seconds per GB to write ``nbytes`` page by page to a memory-mapped file and read
    them back: the bare cost of the slow tier, without any bookkeeping."""
    with tempfile.TemporaryDirectory(prefix="bench-optim-") as d:
        path = os.path.join(d, "raw.bin")
        with open(path, "wb") as f:
            f.truncate(nbytes)
        mapped = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        fast = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)

        def out_and_in() -> None:
            for lo in range(0, nbytes, page_bytes):
                mapped[lo:lo + page_bytes].copy_(fast[lo:lo + page_bytes])
            for lo in range(0, nbytes, page_bytes):
                fast[lo:lo + page_bytes].copy_(mapped[lo:lo + page_bytes])

        t = interleaved_medians({"raw": out_and_in}, repeats=5, warmup=1)["raw"]
        del mapped
    return t / (2 * nbytes / 1e9)


def measure(label: str, shapes: list[tuple[int, ...]], repeats: int, page_bytes: int) -> list[dict]:
    numel = sum(torch.Size(s).numel() for s in shapes)
    rows = []
    # 1. Everything resident vs torch's AdamW (the same arithmetic, one op sequence per tensor).
    ours_ps, ref_ps = make_params(shapes), make_params(shapes)
    ours = PagedAdamW(ours_ps, page_bytes=page_bytes)
    ref = torch.optim.AdamW(ref_ps, foreach=False)
    t = interleaved_medians({"ours": ours.step, "ref": ref.step}, repeats=repeats, warmup=1)
    rows.append({"what": f"{label}: AdamW step, all state resident", "loracore": t["ours"],
                 "reference": t["ref"], "reference_name": "torch.optim.AdamW", "unit": "s",
                 "ratio": t["ours"] / t["ref"], "target": "<= 1.1"})
    state_bytes = ours.paging_stats()["state_bytes"]
    ours.close()
    del ref, ref_ps

    # 2. A budget of a quarter of the state: paging every step.
    budget = max(4 * page_bytes, state_bytes // 4 // page_bytes * page_bytes)
    paged_ps = make_params(shapes)
    paged = PagedAdamW(paged_ps, page_bytes=page_bytes, resident_bytes=budget)
    resident_ps = make_params(shapes)
    resident = PagedAdamW(resident_ps, page_bytes=page_bytes)
    paged.step()
    before = paged.paging_stats()
    paged.step()
    after = paged.paging_stats()
    moved = (after["bytes_in"] - before["bytes_in"]) + (after["bytes_out"] - before["bytes_out"])
    t = interleaved_medians({"paged": paged.step, "resident": resident.step},
                            repeats=repeats, warmup=1)
    overhead = (t["paged"] - t["resident"]) / (moved / 1e9)
    raw = raw_file_seconds_per_gb(moved // 2, page_bytes)
    peak = paged.paging_stats()["peak_resident_bytes"]
    rows.append({"what": f"{label}: extra step time per GB paged (budget 1/4 of "
                         f"{state_bytes / MB:.0f} MB state, {moved / MB:.0f} MB moved/step, "
                         f"step {t['paged']:.3g} s vs {t['resident']:.3g} s resident)",
                 "loracore": overhead, "reference": raw,
                 "reference_name": "raw page copies to/from a memory-mapped file",
                 "unit": "s/GB", "ratio": overhead / raw, "target": "<= 1.3"})
    rows.append({"what": f"{label}: peak resident state, budget 1/4 of the state",
                 "loracore": peak / MB, "reference": budget / MB, "reference_name": "the budget",
                 "unit": "MB", "ratio": peak / budget, "target": "<= 1 + one page"})
    paged.close()
    resident.close()
    del paged_ps, resident_ps

    # 3. 8-bit state: memory vs 32-bit, time vs bitsandbytes' AdamW8bit on the CPU.
    import bitsandbytes as bnb

    q_ps, b_ps = make_params(shapes), make_params(shapes)
    q = PagedAdamW(q_ps, state_bits=8, page_bytes=page_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = bnb.optim.AdamW8bit(b_ps)
    t = interleaved_medians({"ours": q.step, "bnb": b.step}, repeats=repeats, warmup=1)
    q_bytes = q.paging_stats()["state_bytes"]
    rows.append({"what": f"{label}: 8-bit state memory vs 32-bit", "loracore": q_bytes / MB,
                 "reference": state_bytes / MB, "reference_name": "PagedAdamW 32-bit state",
                 "unit": "MB", "ratio": q_bytes / state_bytes, "target": "<= 0.27"})
    rows.append({"what": f"{label}: 8-bit AdamW step", "loracore": t["ours"],
                 "reference": t["bnb"], "reference_name": f"bitsandbytes {bnb.__version__} "
                 "AdamW8bit (CPU)", "unit": "s", "ratio": t["ours"] / t["bnb"],
                 "target": "reported"})
    q.close()
    print(f"{label}: {numel / 1e6:.2f}M parameters in {len(shapes)} tensors done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (2 repeats, 5M large set); prints, writes nothing")
    parser.add_argument("--big-params", type=float, default=50e6,
                        help="parameters in the large set (default 50M)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine OpenMP barriers "
                             "make small ops erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    big = int(5e6 if args.quick else args.big_params)
    repeats = 2 if args.quick else 7
    start, load = time.perf_counter(), os.getloadavg()[0]  # another job on the cores shows here
    rows = measure("LoRA r=16, SmolLM2-135M", lora_shapes(), repeats, page_bytes=1 << 20)
    big_shapes = [(1000, 1000)] * (big // 1_000_000)
    rows += measure(f"{len(big_shapes)}M parameters", big_shapes, max(2, repeats - 2),
                    page_bytes=1 << 20)
    notes = (f"{'quick smoke run; ' if args.quick else ''}{torch.get_num_threads()} torch "
             f"thread(s); 1 MiB pages; fixed gradients; medians of interleaved repeats; load average "
             f"{load:.1f} at the start (2 or more: the CPU was shared, timings noisy); total {time.perf_counter() - start:.0f} s")
    if args.quick:  # a smoke run checks the script; it does not replace real results
        for r in rows:
            print(f"{r['what']}: loracore {r['loracore']:.4g} {r['unit']}, "
                  f"{r['reference_name']} {r['reference']:.4g} {r['unit']}, ratio {r['ratio']:.3f}")
        print(notes)
    else:
        write_result("optim", rows, notes=notes)


if __name__ == "__main__":
    main()
