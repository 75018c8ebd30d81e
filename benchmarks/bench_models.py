"""Base-model loading and generation speed.

- Load time of SmolLM2-135M: loracore's safetensors cache vs transformers reading the
  packaged GGUF directly (what every load would cost without the cache). The one-off
  conversion (GGUF load + cache write) is reported too.
- Greedy generation tokens/s of the cached model vs the GGUF-loaded one: the same
  architecture and weights, so the ratio should be 1; it guards against the cache
  changing dtype or layout.

    python benchmarks/bench_models.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from loracore import models
from loracore.bench import interleaved_medians, median_time, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, fewer tokens")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    new_tokens = 16 if args.quick else 64

    gguf = models.smollm2_gguf_path()

    def load_gguf():
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # The conversion is a one-off: time it once, in a private cache folder.
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("LORACORE_CACHE")
        os.environ["LORACORE_CACHE"] = tmp
        start = time.perf_counter()
        models.build_smollm2_cache(verbose=False)
        conversion = time.perf_counter() - start
        if old is None:
            del os.environ["LORACORE_CACHE"]
        else:
            os.environ["LORACORE_CACHE"] = old

    models.build_smollm2_cache(verbose=False)
    cached = median_time(lambda: models.load_base_model("smollm2-135m", verbose=False),
                         repeats=repeats, warmup=1)
    direct = median_time(load_gguf, repeats=max(1, repeats // 2), warmup=0)

    model, tokenizer = models.load_base_model("smollm2-135m", verbose=False)
    reference = load_gguf().eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about low-rank matrices."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def generate(m):
        with torch.no_grad():
            # min_new_tokens: every run produces exactly new_tokens tokens
            m.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)

    gen = interleaved_medians({"ours": lambda: generate(model),
                               "ref": lambda: generate(reference)}, repeats=repeats, warmup=1)
    t_ours, t_ref = gen["ours"], gen["ref"]

    rows = [
        {"what": "load SmolLM2-135M (cached) vs GGUF load", "loracore": cached,
         "reference": direct, "reference_name": "transformers GGUF load", "unit": "s",
         "ratio": cached / direct, "target": "< 0.3"},
        {"what": "one-off cache conversion vs GGUF load", "loracore": conversion,
         "reference": direct, "reference_name": "transformers GGUF load", "unit": "s",
         "ratio": conversion / direct, "target": "-"},
        {"what": f"greedy generation, {new_tokens} tokens (s per token; lower is better)",
         "loracore": t_ours / new_tokens, "reference": t_ref / new_tokens,
         "reference_name": "GGUF-loaded model", "unit": "s/token",
         "ratio": t_ours / t_ref, "target": "≈ 1.0"},
    ]
    write_result("models", rows, notes=(
        f"Generation: {new_tokens / t_ours:.1f} tokens/s with the cached model, "
        f"{new_tokens / t_ref:.1f} tokens/s with the GGUF-loaded one (batch 1, greedy)."))


if __name__ == "__main__":
    main()
