"""How much of each linear weight NF4 misses, plain and after LoftQ, on a course model.

For every linear layer of the decoder blocks: ``||W - approx|| / ||W||`` with ``approx`` plain NF4
(blocksize 64, with and without double quantization) and LoftQ's ``dequant(Q) + scaling·B·A``
(rank ``--r``, 1 and ``--iters`` rounds), and the time LoftQ takes. One process, one model load.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/loftq_error.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from loracore.lora_init import loftq_init, relative_error
from loracore.models import load_base_model
from loracore.nf4 import dequantize_nf4, quantize_nf4
from loracore.surgery import target_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="only the first N blocks")
    args = parser.parse_args()
    model = load_base_model(args.model, verbose=False)[0]
    names = target_names(model, "all-linear")
    if args.layers is not None:
        names = [n for n in names if int(n.split(".layers.")[1].split(".")[0]) < args.layers]
    rows, seconds = collections.defaultdict(lambda: collections.defaultdict(list)), collections.Counter()
    scaling = 2.0  # lora_alpha = 2r; LoftQ's error does not depend on it (see lora_init)
    for name in names:
        w = model.get_submodule(name).weight.detach().float()
        kind = name.split(".")[-1]
        for dq in (False, True):
            rows[kind][f"nf4{'_dq' if dq else ''}"].append(
                relative_error(w, dequantize_nf4(quantize_nf4(w, 64, dq), torch.float32)))
        for n in (1, args.iters):
            start = time.perf_counter()
            a, b, q = loftq_init(w, args.r, scaling, n)
            seconds[n] += time.perf_counter() - start
            rows[kind][f"loftq_{n}"].append(relative_error(w, dequantize_nf4(q, torch.float32) + scaling * b @ a))
    columns = ["nf4_dq", "nf4", "loftq_1", f"loftq_{args.iters}"]
    print(f"{args.model}: {len(names)} linear layers, r={args.r}; relative Frobenius error (mean)")
    print(f"{'layer':10s} " + " ".join(f"{c:>9s}" for c in columns))
    every = collections.defaultdict(list)
    for kind, cols in rows.items():
        print(f"{kind:10s} " + " ".join(f"{sum(cols[c]) / len(cols[c]):9.5f}" for c in columns))
        for c in columns:
            every[c] += cols[c]
    print(f"{'all':10s} " + " ".join(f"{sum(every[c]) / len(every[c]):9.5f}" for c in columns))
    print(f"LoftQ time for all layers: 1 round {seconds[1]:.1f} s, {args.iters} rounds "
          f"{seconds[args.iters]:.1f} s (threads: {torch.get_num_threads()})")
    print(json.dumps({k: {c: sum(v) / len(v) for c, v in cols.items()} for k, cols in rows.items()}))


if __name__ == "__main__":
    main()
