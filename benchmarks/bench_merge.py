"""Combining two adapters into a new one: ``loracore.combine.combine_adapters`` vs PEFT's
``add_weighted_adapter``, on SmolLM2-135M with two r = 16 adapters (non-zero A and B) on all
seven projections (q, k, v, o, gate, up, down: 210 layers), float32 on the CPU.

- ``linear`` (weights 0.7, 0.3) vs PEFT ``svd`` at the same rank (32): both give exactly
  0.7·ΔW₁ + 0.3·ΔW₂; ours orthogonalises the factors and decomposes a 32×32 core, PEFT takes a
  dense SVD of every ΔW. Target: ratio ≤ 0.2.
- ``ties`` (density 0.2) vs PEFT ``ties_svd`` at rank 32: both decompose the dense merged ΔW.
  Target: ratio ≤ 1.0.

Each result's reconstruction error is reported as ||B·A - ΔW*||_F / ||ΔW*||_F over all layers,
ΔW* being the exact merge of the ΔWs; PEFT's ``linear`` (which combines A's and B's apart) and
its default ``svd`` rank (the largest input rank, 16) are shown for comparison. Interleaved
medians (loracore and PEFT in turn within every round).

    python benchmarks/bench_merge.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLinear

from loracore import merge as M
from loracore.bench import interleaved_medians, write_result
from loracore.combine import combine_adapters
from loracore.models import load_base_model
from loracore.surgery import delete_adapter, inject, lora_layers

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, WEIGHTS, DENSITY, RANK = 16, 32, [0.7, 0.3], 0.2, 32


def models():
    """loracore's and PEFT's SmolLM2 with the same adapters "one" and "two" (random, non-zero)."""
    ours = load_base_model("smollm2-135m", verbose=False)[0]
    for name in ("one", "two"):
        inject(ours, SEVEN, r=R, lora_alpha=ALPHA, adapter_name=name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            for d in (layer.lora_A, layer.lora_B):
                for lin in d.values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
    theirs = get_peft_model(load_base_model("smollm2-135m", verbose=False)[0],
                            LoraConfig(r=R, lora_alpha=ALPHA, target_modules=SEVEN), adapter_name="one")
    theirs.add_adapter("two", LoraConfig(r=R, lora_alpha=ALPHA, target_modules=SEVEN))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, PeftLinear)}
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for d in ("lora_A", "lora_B"):
                for a in ("one", "two"):
                    getattr(peft_layers[name], d)[a].weight.copy_(getattr(layer, d)[a].weight)
    return ours, theirs, peft_layers


def relative_error(layers: dict, name: str, method: str) -> float:
    """||ΔW_new - ΔW*||_F / ||ΔW*||_F over all layers (ΔW* from the pure function)."""
    num = den = 0.0
    w = torch.tensor(WEIGHTS)
    with torch.no_grad():
        for layer in layers.values():
            deltas = [layer.get_delta_weight("one"), layer.get_delta_weight("two")]
            want = M.task_arithmetic(deltas, w) if method == "linear" else M.ties(deltas, w, DENSITY)
            num += (layer.get_delta_weight(name) - want).norm().item() ** 2
            den += want.norm().item() ** 2
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    repeats, warmup = (3, 0) if args.quick else (5, 1)
    torch.set_grad_enabled(False)
    ours, theirs, peft_layers = models()

    def run_ours(method: str, **kw):
        def fn():
            combine_adapters(ours, ["one", "two"], WEIGHTS, "new", combination_type=method, **kw)
            delete_adapter(ours, "new")
        return fn

    def run_peft(method: str, **kw):
        def fn():
            theirs.add_weighted_adapter(["one", "two"], WEIGHTS, "new", combination_type=method, **kw)
            theirs.delete_adapter("new")
        return fn

    rows, errors = [], {}
    for ours_method, peft_method, kw, target in (
            ("linear", "svd", {}, "≤ 0.2"),
            ("ties", "ties_svd", {"density": DENSITY}, "≤ 1.0")):
        t = interleaved_medians({"ours": run_ours(ours_method, svd_rank=RANK, **kw),
                                 "peft": run_peft(peft_method, svd_rank=RANK, **kw)},
                                repeats, warmup=warmup)
        combine_adapters(ours, ["one", "two"], WEIGHTS, "new", combination_type=ours_method,
                         svd_rank=RANK, **kw)
        theirs.add_weighted_adapter(["one", "two"], WEIGHTS, "new", combination_type=peft_method,
                                    svd_rank=RANK, **kw)
        errors[f"loracore {ours_method}, r={RANK}"] = relative_error(lora_layers(ours), "new", ours_method)
        errors[f"PEFT {peft_method}, r={RANK}"] = relative_error(peft_layers, "new", ours_method)
        delete_adapter(ours, "new")
        theirs.delete_adapter("new")
        rows.append({"what": f"combine two r={R} adapters on 210 layers: {ours_method} "
                             f"(PEFT {peft_method}), rank {RANK}",
                     "loracore": t["ours"], "reference": t["peft"],
                     "reference_name": f"PEFT add_weighted_adapter({peft_method})", "unit": "s",
                     "ratio": t["ours"] / t["peft"], "target": target})
    theirs.add_weighted_adapter(["one", "two"], WEIGHTS, "new", combination_type="svd")
    errors[f"PEFT svd, default rank {R}"] = relative_error(peft_layers, "new", "linear")
    theirs.delete_adapter("new")
    theirs.add_weighted_adapter(["one", "two"], WEIGHTS, "new", combination_type="linear")
    errors["PEFT linear (A and B combined apart)"] = relative_error(peft_layers, "new", "linear")
    theirs.delete_adapter("new")
    notes = ("Relative reconstruction error ||B·A - ΔW*||_F / ||ΔW*||_F over all 210 layers "
             "(ΔW* = the exact merge of the two ΔWs): "
             + "; ".join(f"{k}: {v:.2e}" for k, v in errors.items())
             + ". TIES' merged ΔW is not low-rank, so any rank-32 adapter of it is approximate "
             "(both libraries find the same best one). CPU shared with other jobs: timings are noisy.")
    for k, v in errors.items():
        print(f"reconstruction error, {k}: {v:.2e}")
    write_result("merge", rows, notes=notes)


if __name__ == "__main__":
    main()
