"""NF4 quantization speed and memory against bitsandbytes, on the same tensor in the same run.

A 4096 x 4096 float32 matrix, blocksize 64, with double quantization (QLoRA's setting), CPU:

- quantize: ``loracore.nf4.quantize_nf4`` vs ``bitsandbytes.functional.quantize_4bit(...,
  quant_type="nf4", compress_statistics=True)``. Target: ratio <= 1.0.
- dequantize to float32: ``dequantize_nf4`` (the fast path: one table look-up per byte, in
  cache-sized pieces) vs ``bitsandbytes.functional.dequantize_4bit`` (a native C++ kernel).
  Target: ratio <= 1.5 (issue 27; it was <= 3.0 before the pieces).
  The readable path the lessons show (``dequantize_nf4_reference``) is timed too, for reference.
- memory of the stored weight, NF4 + double quantization vs bfloat16. Target: ratio <= 0.27.

The contenders run in alternation, round after round, so a busy patch of a shared machine
hits both alike; each figure is the median over rounds. The outputs are checked equal first.

    python benchmarks/bench_nf4.py [--quick]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from loracore.bench import interleaved_medians, write_result
from loracore.nf4 import dequantize_nf4, dequantize_nf4_reference, quantize_nf4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnbF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1024 x 1024 matrix, 3 rounds")
    args = parser.parse_args()
    n = 1024 if args.quick else 4096
    repeats = 3 if args.quick else 15
    torch.manual_seed(0)
    w = torch.randn(n, n) * 0.02
    blocksize = 64

    ours = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax), \
        "loracore and bitsandbytes disagree: fix that before timing"
    assert torch.equal(dequantize_nf4(ours), bnbF.dequantize_4bit(packed, state))

    q = interleaved_medians({
        "loracore": lambda: quantize_nf4(w, blocksize=blocksize, double_quant=True),
        "bitsandbytes": lambda: bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                   compress_statistics=True),
    }, repeats)
    d = interleaved_medians({
        "loracore": lambda: dequantize_nf4(ours, torch.float32),
        "bitsandbytes": lambda: bnbF.dequantize_4bit(packed, state),
        "loracore readable": lambda: dequantize_nf4_reference(ours, torch.float32),
    }, repeats)
    bf16_bytes = w.numel() * 2
    shape = f"{n}x{n} float32, blocksize 64, double quantization, {torch.get_num_threads()} threads"
    rows = [
        {"what": f"NF4 quantize ({shape})", "loracore": q["loracore"] * 1e3,
         "reference": q["bitsandbytes"] * 1e3, "reference_name": "bitsandbytes quantize_4bit",
         "unit": "ms", "ratio": q["loracore"] / q["bitsandbytes"], "target": "<= 1.0"},
        {"what": f"NF4 dequantize to float32, fast path ({shape})", "loracore": d["loracore"] * 1e3,
         "reference": d["bitsandbytes"] * 1e3, "reference_name": "bitsandbytes dequantize_4bit (C++)",
         "unit": "ms", "ratio": d["loracore"] / d["bitsandbytes"], "target": "<= 1.5"},
        {"what": f"NF4 dequantize, readable path (lessons) ({shape})",
         "loracore": d["loracore readable"] * 1e3, "reference": d["bitsandbytes"] * 1e3,
         "reference_name": "bitsandbytes dequantize_4bit (C++)", "unit": "ms",
         "ratio": d["loracore readable"] / d["bitsandbytes"], "target": "-"},
        {"what": f"stored weight memory, NF4 + DQ vs bfloat16 ({n}x{n})", "loracore": ours.nbytes / 2**20,
         "reference": bf16_bytes / 2**20, "reference_name": "bfloat16 tensor", "unit": "MiB",
         "ratio": ours.nbytes / bf16_bytes, "target": "<= 0.27"},
    ]
    write_result("nf4", rows, notes=f"{ours.bits_per_param:.6f} bits per parameter; outputs checked "
                                    f"bit-identical to bitsandbytes before timing; medians of {repeats} "
                                    f"interleaved rounds.")


if __name__ == "__main__":
    main()
