"""Serving many adapters: loracore.serve against one adapter, against PEFT, and its load time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_serve.py [--quick]

On SmolLM2-135M-Instruct (float32, CPU), eight random r = 16 adapters on all seven
projections (q, k, v, o, gate, up, down), greedy decoding with ``ignore_eos`` so every request
generates exactly ``max_tokens``:

1. HTTP throughput of ``python -m loracore.serve`` (a real server process): ``N`` concurrent
   requests spread over 8 adapters vs the same load all on one adapter (target >= 0.8), and vs a
   server that swaps PEFT's active adapter per request and runs requests one at a time
   (``set_adapter`` + ``generate`` under a lock; target >= 4x). Generated tokens per second.
2. The mixed-adapter forward pass (``AdapterRegistry.forward``) vs PEFT's ``adapter_names``
   inference on the same batch (16 sequences x 64 tokens, 8 adapters); target <= 1.0.
3. Time to hot-load an r = 16 all-linear adapter (``AdapterRegistry.load``) vs PEFT's
   ``PeftModel.load_adapter`` (reported).

Every comparison is measured in the same run, interleaved, medians over repeats. The machine
is shared: absolute numbers move with its load, ratios much less.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
NUM_ADAPTERS = 8


def make_adapters(folder: Path) -> list[Path]:
    """Eight random r = 16 all-linear adapters for SmolLM2 (B ~ N(0, 0.002): a trained size)."""
    from loracore.adapters import save_adapter
    from loracore.models import load_base_model
    from loracore.surgery import inject, lora_layers

    paths = [folder / f"t{i}" for i in range(NUM_ADAPTERS)]
    if all((p / "adapter_model.safetensors").exists() for p in paths):
        return paths
    model, _ = load_base_model("smollm2-135m", verbose=False)
    g = torch.Generator().manual_seed(0)
    for i, path in enumerate(paths):
        inject(model, "all-linear", 16, 32, adapter_name=f"t{i}")
        with torch.no_grad():
            for layer in lora_layers(model).values():
                w = layer.lora_B[f"t{i}"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.002)
        save_adapter(model, path, adapter_name=f"t{i}")
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if requests.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not come up within 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_test(port: int, models: list[str], max_tokens: int) -> float:
    """Send one request per entry of ``models`` at once; generated tokens per second."""
    prompt = "Write a long story about a lighthouse keeper and the sea."

    def one(i_model):
        i, model = i_model
        r = requests.post(f"http://{HOST}:{port}/v1/completions", timeout=3600, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "seed": i})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        tokens = sum(pool.map(one, enumerate(models)))
    return tokens / (time.perf_counter() - t0)


# ---- the reference server: PEFT, one request at a time ------------------------------------
def peft_server(port: int, adapter_dir: str) -> None:
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel

    from loracore.models import load_base_model

    base, tok = load_base_model("smollm2-135m", verbose=False)
    paths = sorted(Path(adapter_dir).glob("t*"))
    model = PeftModel.from_pretrained(base, paths[0], adapter_name=paths[0].name)
    for p in paths[1:]:
        model.load_adapter(p, adapter_name=p.name)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {}

    @app.post("/v1/completions")
    def complete(body: dict) -> dict:
        ids = tok(body["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        n = int(body["max_tokens"])
        with lock, torch.no_grad():  # one request at a time, the adapter swapped for each
            model.set_adapter(body["model"])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n if body.get("ignore_eos") else 0, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = out.shape[1] - ids.shape[1]
        return {"choices": [{"text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": new,
                          "total_tokens": ids.shape[1] + new}}

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


# ---- in-process comparisons ----------------------------------------------------------------
def forward_and_load(paths: list[Path], repeats: int) -> dict:
    from peft import PeftModel

    from loracore.bench import interleaved_medians
    from loracore.models import load_base_model
    from loracore.serve import AdapterRegistry

    base, tok = load_base_model("smollm2-135m", verbose=False)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=paths[0].name)
    for p in paths[1:]:
        peft_model.load_adapter(p, adapter_name=p.name)
    peft_model.eval()
    registry = AdapterRegistry(base, max_loras=NUM_ADAPTERS, max_lora_rank=16)
    for p in paths:
        registry.load(p.name, p)
    ids = torch.randint(0, 49152, (16, 64), generator=torch.Generator().manual_seed(0))
    names = [paths[i % len(paths)].name for i in range(16)]
    with torch.no_grad():
        ours = registry.forward(ids, names)
        ref = peft_model(input_ids=ids, adapter_names=names).logits
    max_diff = (ours - ref).abs().max().item()

    def ours_fn():
        registry.forward(ids, names)

    def peft_fn():
        with torch.no_grad():
            peft_model(input_ids=ids, adapter_names=names)
    fwd = interleaved_medians({"ours": ours_fn, "peft": peft_fn}, repeats=repeats, warmup=1)

    # hot-load: load + unload under a new name (ours), load_adapter + delete_adapter (PEFT)
    counter = iter(range(10 ** 6))

    def load_ours():
        name = f"hot{next(counter)}"
        registry.load(name, paths[0])
        registry.unload(name)

    def load_peft():
        name = f"hot{next(counter)}"
        peft_model.load_adapter(paths[0], adapter_name=name)
        peft_model.delete_adapter(name)
    load = interleaved_medians({"ours": load_ours, "peft": load_peft}, repeats=repeats, warmup=1)
    return {"forward": fwd, "load": load, "max_diff": max_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller load: a smoke run")
    parser.add_argument("--requests", type=int, default=None, help="concurrent requests (default 32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64)")
    parser.add_argument("--peft-server", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_server:
        peft_server(int(args.peft_server[0]), args.peft_server[1])
        return
    n_req = args.requests or (8 if args.quick else 32)
    max_tokens = args.max_tokens or (8 if args.quick else 64)
    peft_req = max(2, n_req // 4)  # PEFT runs one at a time: its rate does not grow with the queue
    repeats = 2 if args.quick else 3

    from loracore.bench import write_result

    start_time = time.perf_counter()
    folder = Path(tempfile.gettempdir()) / "loracore_bench_serve"
    paths = make_adapters(folder)
    inproc = forward_and_load(paths, repeats=3 if args.quick else 5)

    port = free_port()
    ours = start([sys.executable, "-m", "loracore.serve", "--model", "smollm2-135m", "--lora-modules",
                  *[f"{p.name}={p}" for p in paths], "--max-loras", str(NUM_ADAPTERS),
                  "--max-num-seqs", str(n_req), "--host", HOST, "--port", str(port)], port)
    try:
        mixed_models = [paths[i % NUM_ADAPTERS].name for i in range(n_req)]
        single_models = [paths[0].name] * n_req
        load_test(port, mixed_models[:4], 2)  # warm-up
        mixed, single = [], []
        for round_ in range(repeats):  # interleaved, order alternating
            for which in (("m", "s") if round_ % 2 == 0 else ("s", "m")):
                if which == "m":
                    mixed.append(load_test(port, mixed_models, max_tokens))
                else:
                    single.append(load_test(port, single_models, max_tokens))
    finally:
        stop(ours)
    port = free_port()
    ref = start([sys.executable, __file__, "--peft-server", str(port), str(folder)], port)
    try:
        load_test(port, ["t0"], 2)
        peft_rates = [load_test(port, [paths[i % NUM_ADAPTERS].name for i in range(peft_req)], max_tokens)
                      for _ in range(max(1, repeats - 1))]
    finally:
        stop(ref)

    m, s, p = statistics.median(mixed), statistics.median(single), statistics.median(peft_rates)
    fwd, load = inproc["forward"], inproc["load"]
    rows = [
        {"what": f"HTTP throughput, {n_req} concurrent requests over {NUM_ADAPTERS} adapters vs all on one "
                 f"adapter, {max_tokens} new tokens each", "loracore": m, "reference": s,
         "reference_name": "loracore.serve, one adapter", "unit": "tokens/s", "ratio": m / s,
         "target": ">= 0.8"},
        {"what": f"HTTP throughput, {n_req} concurrent requests over {NUM_ADAPTERS} adapters vs PEFT "
                 f"swapping adapters one request at a time", "loracore": m, "reference": p,
         "reference_name": "PEFT set_adapter + generate, sequential", "unit": "tokens/s", "ratio": m / p,
         "target": ">= 4.0"},
        {"what": "mixed-adapter forward, 16 x 64 tokens, 8 adapters (time)", "loracore": fwd["ours"],
         "reference": fwd["peft"], "reference_name": "PEFT adapter_names", "unit": "s",
         "ratio": fwd["ours"] / fwd["peft"], "target": "<= 1.0"},
        {"what": "hot-load (and unload) an r=16 all-linear adapter", "loracore": load["ours"],
         "reference": load["peft"], "reference_name": "PEFT load_adapter + delete_adapter", "unit": "s",
         "ratio": load["ours"] / load["peft"], "target": "reported"},
    ]
    notes = (f"{'quick run (smaller load); ' if args.quick else ''}SmolLM2-135M float32 on the CPU; "
             f"greedy, ignore_eos; medians of {repeats} interleaved load tests (loracore) and "
             f"{max(1, repeats - 1)} (PEFT, {peft_req} requests: sequential, so its rate does not "
             f"depend on the queue length); mixed-batch logits vs PEFT max |diff| "
             f"{inproc['max_diff']:.1e}; shared machine, load average "
             f"{os.getloadavg()[0]:.1f} at the end; total {time.perf_counter() - start_time:.0f} s")
    write_result("serve", rows, notes=notes)
    print(notes)


if __name__ == "__main__":
    main()
