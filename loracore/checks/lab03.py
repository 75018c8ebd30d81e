"""Checks for lab 03, "implement NF4 and run QLoRA": each piece against bitsandbytes.

The learner writes the NF4 code book, blockwise quantization, nibble packing,
dequantization and double quantization; every check runs the learner's function on seeded
inputs and compares it with ``bitsandbytes.functional`` (CPU) on the same tensor.

Then the learner decides: a block size and whether to double-quantize, for a memory budget
(:data:`BUDGET_BITS`) within an error bound (:data:`ERROR_BOUND`) on a real weight. The check
quantizes that weight again with loracore's NF4 (:func:`nf4_cost`) and scores the choice from
what it measures; the reflection questions are scored from the learner's own choice.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from loracore import nf4
from loracore.nf4 import dequantize_nf4, nf4_code, quantize_nf4
from loracore.selfcheck import Check, Hints, call_learner, exercise, report


def _bnb():
    """``bitsandbytes.functional``, imported quietly (it warns about optional GPU kernels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbF
    return bnbF


def _weights(n: int = 64 * 96, seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def _bnb_reference(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """bitsandbytes' packed bytes, state, and the indices unpacked from its bytes."""
    packed, state = _bnb().quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                         compress_statistics=double_quant)
    packed = packed.view(-1)
    indices = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)[: w.numel()].long()
    return packed, state, indices


def _is_tensor(x: Any, dtype: torch.dtype | None = None) -> bool:
    return isinstance(x, torch.Tensor) and (dtype is None or x.dtype == dtype)


def _differ(got: Any, want: torch.Tensor) -> str:
    """``", N differ"`` when ``got`` holds as many values as ``want`` (else nothing to count)."""
    if isinstance(got, torch.Tensor) and got.numel() == want.numel():
        return f", {int((got.reshape(-1).long() != want.reshape(-1).long()).sum())} differ"
    return ""


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    return f"{type(x).__name__}: {x!r}"[:120]


@exercise(points=1)
def check_nf4_code_book(nf4_code_book: Callable[[], torch.Tensor]) -> None:
    """Exercise 1: ``nf4_code_book() -> (16,)`` float32, sorted, from normal quantiles."""
    got = call_learner(nf4_code_book)
    theirs = _bnb().get_4bit_type("nf4", device="cpu")
    checks = [Check.true("returns a float32 tensor of 16 values", _is_tensor(got, torch.float32)
                         and got.shape == (16,), "shape (16,), float32", _describe(got),
                         hint="16 values (7 negative, an exact 0, 8 positive: 4 bits hold 16 codes) "
                              "as float32: end with .float() or build with dtype=torch.float32.")]
    if not checks[0].passed:
        report("nf4_code_book", checks)
    checks += [
        Check.true("sorted, from -1 to 1", bool(torch.all(got[1:] > got[:-1])) and got[0] == -1
                   and got[-1] == 1, "strictly increasing, first -1, last 1",
                   f"first {got[0].item():.4f}, last {got[-1].item():.4f}",
                   hint="Sort the values and divide by the largest one."),
        Check.true("8 positive values, 7 negative, and an exact zero",
                   (int((got > 0).sum()), int((got < 0).sum()), int((got == 0).sum())) == (8, 7, 1),
                   "(8, 7, 1)", str((int((got > 0).sum()), int((got < 0).sum()), int((got == 0).sum()))),
                   hint="Positive side: 9 probabilities from the offset down to 0.5, drop 0.5; "
                        "negative side: 8 probabilities, drop 0.5; then add 0."),
        Check.close("equal to bitsandbytes' NF4 values within 1e-7", got, theirs, atol=1e-7, rtol=0,
                    hint="Use offset 0.9677083 and torch.linspace in float32 for the probabilities; "
                         "Normal(0, 1).icdf in float64, then .float() before dividing by the max."),
    ]
    report("nf4_code_book", checks)


@exercise(points=2)
def check_quantize_blocks(quantize_blocks: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Exercise 2: ``quantize_blocks(w: (n,), code, blocksize) -> (indices (n,), absmax (n/bs,))``."""
    checks = []
    for blocksize in (64, 256):
        w = _weights(seed=blocksize)
        _, state, want_idx = _bnb_reference(w, blocksize)
        got = call_learner(quantize_blocks, w, nf4_code(), blocksize)
        if not (isinstance(got, tuple) and len(got) == 2 and all(_is_tensor(t) for t in got)):
            report("quantize_blocks", [Check(f"returns (indices, absmax) (blocksize {blocksize})",
                                             False, "a tuple of two tensors", _describe(got),
                                             "return indices, absmax")])
        idx, absmax = got
        checks.append(Check.close(f"absmax per block equals bitsandbytes' (blocksize {blocksize})",
                                  absmax, state.absmax, atol=0, rtol=0,
                                  hint="One value per block: w.view(-1, blocksize).abs().amax(dim=1)."))
        if idx.shape != want_idx.shape:
            checks.append(Check(f"one index per value (blocksize {blocksize})", False,
                                f"shape {tuple(want_idx.shape)}", f"shape {tuple(idx.shape)}",
                                "One index per weight, flat: bucketize(scaled.view(-1), midpoints)."))
            continue
        wrong = (idx.long() != want_idx).nonzero().view(-1)
        scaled = (w.view(-1, blocksize) * (1.0 / state.absmax)[:, None]).view(-1)
        code = nf4_code()
        midpoints = (code[:-1] + code[1:]) / 2
        near_tie = bool(len(wrong)) and bool(
            ((scaled[wrong, None] - midpoints).abs().min(dim=1).values < 1e-6).all())
        checks.append(Check.true(
            f"indices identical to bitsandbytes' (blocksize {blocksize})", len(wrong) == 0,
            f"all {w.numel()} indices equal", f"{len(wrong)} differ (first at element "
            f"{wrong[0].item() if len(wrong) else '-'})",
            hint=("Every difference sits on a midpoint between two codes: scale with "
                  "w * (1 / absmax) as bitsandbytes does (not w / absmax), and send ties to "
                  "the lower code (torch.bucketize(x, midpoints))." if near_tie else
                  "Scale each block into [-1, 1], then take the nearest code: "
                  "torch.bucketize(scaled, midpoints) with midpoints = (code[:-1] + code[1:]) / 2.")))
    report("quantize_blocks", checks)


@exercise(points=2)
def check_pack(pack_nibbles: Callable[[torch.Tensor], torch.Tensor],
               unpack_nibbles: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Exercise 3: ``pack_nibbles(indices (n,)) -> (n/2,) uint8`` and its inverse."""
    small = call_learner(pack_nibbles, torch.tensor([1, 2, 3, 15, 0, 9]))
    checks = [Check.true("[1, 2, 3, 15, 0, 9] packs to bytes 0x12, 0x3F, 0x09",
                         _is_tensor(small, torch.uint8) and small.tolist() == [0x12, 0x3F, 0x09],
                         "uint8 tensor [18, 63, 9]", _describe(small) + (
                             f" {small.tolist()}" if isinstance(small, torch.Tensor) else ""),
                         hint="Element 2i goes to the high nibble: (q[0::2] << 4) | q[1::2], as uint8.")]
    w = _weights(seed=3)
    packed, _, indices = _bnb_reference(w)
    got = call_learner(pack_nibbles, indices)
    checks.append(Check.true("bytes identical to bitsandbytes' packed weight",
                             _is_tensor(got, torch.uint8) and torch.equal(got.view(-1), packed),
                             f"{packed.numel()} identical bytes", _describe(got) + _differ(got, packed),
                             hint="uint8, two indices per byte, the first of each pair in the high "
                                  "nibble: ((q[0::2] << 4) | q[1::2]).to(torch.uint8)."))
    back = call_learner(unpack_nibbles, packed, w.numel())
    checks.append(Check.true("unpack_nibbles(pack_nibbles(i)) == i",
                             _is_tensor(back) and back.shape == indices.shape
                             and torch.equal(back.long(), indices),
                             f"the {indices.numel()} original indices", _describe(back),
                             hint="High nibble: packed >> 4; low nibble: packed & 0x0F; interleave them "
                                  "with torch.stack([...], dim=1).view(-1)."))
    report("pack_nibbles / unpack_nibbles", checks)


@exercise(points=2)
def check_dequantize(dequantize_blocks: Callable[..., torch.Tensor]) -> None:
    """Exercise 4: ``dequantize_blocks(packed, absmax, code, blocksize, shape) -> tensor``."""
    checks = []
    for shape, blocksize in (((96, 64), 64), ((48, 128), 256)):
        w = _weights(shape[0] * shape[1], seed=shape[0]).view(shape)
        packed, state, _ = _bnb_reference(w, blocksize)
        # Flat shape: bitsandbytes 0.50's native CPU kernel mixes up blocks that are longer
        # than a row (here 256 > 128); on the flat tensor it is right (see tests/test_nf4.py).
        state.shape = torch.Size([w.numel()])
        want = _bnb().dequantize_4bit(packed.view(-1, 1), state).view(shape)
        got = call_learner(dequantize_blocks, packed, state.absmax, nf4_code(), blocksize, shape)
        checks.append(Check.close(f"equals bitsandbytes' dequantize_4bit, shape {shape}, "
                                  f"blocksize {blocksize}", got, want, atol=1e-6, rtol=0,
                                  hint="unpack, look up code[indices], multiply each block by its "
                                       "absmax, then .view(shape)."))
    report("dequantize_blocks", checks)


@exercise(points=2)
def check_double_quantize(double_quantize: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                          double_dequantize: Callable[..., torch.Tensor]) -> None:
    """Exercise 5: ``double_quantize(absmax) -> (q8 uint8, absmax2 float32, offset)`` and back."""
    w = _weights(64 * 256 * 3 + 64 * 40, seed=7)  # 808 blocks: 4 blocks of constants, one short
    _, state, _ = _bnb_reference(w, 64, double_quant=True)
    absmax = _bnb_reference(w, 64)[1].absmax
    got = call_learner(double_quantize, absmax)
    if not (isinstance(got, tuple) and len(got) == 3 and all(_is_tensor(t) for t in got)):
        report("double_quantize", [Check("returns (q8, absmax2, offset)", False,
                                         "a tuple of three tensors", _describe(got),
                                         "return q8, absmax2, offset")])
    q8, absmax2, offset = got
    checks = [
        Check.close("offset = mean of the absmax constants (bitsandbytes' offset)", offset,
                    state.offset, atol=0, rtol=0, hint="offset = absmax.mean()"),
        Check.close("absmax2: one float32 per block of 256 constants", absmax2, state.state2.absmax,
                    atol=0, rtol=0, hint="Subtract the offset first, then take |.|.amax per block "
                                         "of 256 (pad the last block)."),
    ]
    if _is_tensor(q8, torch.uint8) and q8.shape == state.absmax.shape:
        diff = (q8.long() - state.absmax.long()).abs()
        # bitsandbytes' CPU kernel snaps values to a 65,536-point grid before the nearest code,
        # so a value right on a midpoint may take the neighbour: allow that, nothing more.
        checks.append(Check.true("8-bit constants equal bitsandbytes' (a neighbouring code on a tie)",
                                 bool(diff.max() <= 1) and int((diff > 0).sum()) <= q8.numel() // 100,
                                 f"{q8.numel()} codes, at most 1% off by one",
                                 f"{int((diff > 0).sum())} differ, largest gap {int(diff.max())}",
                                 hint="Scale each block of 256 by 1 / absmax2, then the nearest entry of "
                                      "dynamic_code() (torch.bucketize with its midpoints)."))
        exact = int((diff > 0).sum()) == 0
        print(f"  note  8-bit constants {'bit-identical to' if exact else 'within one code of'} "
              f"bitsandbytes' (loracore.nf4 also snaps to its 65,536-point grid: always identical)")
    else:
        checks.append(Check("q8 is uint8 with one code per constant", False,
                            f"uint8 of shape {tuple(state.absmax.shape)}", _describe(q8),
                            "One 8-bit code per absmax constant (drop the padding), as "
                            ".to(torch.uint8)."))
    back = call_learner(double_dequantize, state.absmax, state.state2.absmax, state.offset)
    want = _bnb().dequantize_blockwise(state.absmax, state.state2) + state.offset
    checks.append(Check.close("double_dequantize gives bitsandbytes' absmax back", back, want,
                              atol=1e-7, rtol=0, hint="dynamic_code()[q8] * absmax2 per block, + offset"))
    report("double_quantize", checks)


@exercise(points=1)
def check_full_pipeline(packed: torch.Tensor, q8: torch.Tensor, weight: torch.Tensor) -> None:
    """Exercise 6: the learner's bytes for a real weight against ``quantize_4bit`` with double quant."""
    ref_packed, state, _ = _bnb_reference(weight.reshape(-1).float(), 64, double_quant=True)
    same_bytes = _is_tensor(packed, torch.uint8) and torch.equal(packed.view(-1), ref_packed)
    diff = (q8.long() - state.absmax.long()).abs() if _is_tensor(q8, torch.uint8) \
        and q8.shape == state.absmax.shape else None
    report("your NF4 of a real weight", [
        Check.true(f"{ref_packed.numel():,} packed bytes identical to bitsandbytes'", same_bytes,
                   "identical bytes", _describe(packed) + _differ(packed, ref_packed),
                   hint="Exercises 2 and 3 passed on their own? Then feed them the flattened weight "
                        "with the course's code book and blocksize 64: pack_nibbles(quantize_blocks("
                        "weight.reshape(-1), CODE, 64)[0])."),
        Check.true("8-bit absmax within one code of bitsandbytes'", diff is not None
                   and bool(diff.max() <= 1), "every constant", _describe(q8) + (
                       f", {int((diff > 1).sum())} off by more than one code" if diff is not None else ""),
                   hint="q8 comes from double_quantize(absmax) with the absmax of blocksize 64 from "
                        "quantize_blocks (exercise 5's function, unchanged)."),
    ])



# --------------------------------------------------------------------------- the decision

#: The lab's target for section 6's weight: at most this many bits per parameter, everything
#: stored counted (4-bit codes, block constants, second-level scales, offset) ...
BUDGET_BITS = 4.1
#: ... and a relative reconstruction error ``||dequantize(q) - w|| / ||w||`` at most this.
ERROR_BOUND = 0.12
#: The reflection's model: a 7-billion-parameter model's weights, all in NF4.
PARAMS_7B = 7e9


def nf4_cost(weight: torch.Tensor, blocksize: int, double_quant: bool) -> tuple[float, float]:
    """``(bits per parameter, relative error)`` of ``weight`` (any shape, float) in loracore's NF4.

    Bits count every stored byte (:attr:`loracore.nf4.NF4Tensor.nbytes`); the error is
    ``||dequantize(q) - w|| / ||w||``. Example: a (576, 576) weight at blocksize 64 with double
    quantization costs 4.127 bits per parameter (QLoRA's 4.127 plus 32 bits of offset).
    """
    w = weight.detach().float().cpu()
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    error = ((dequantize_nf4(q) - w).norm() / w.norm()).item()
    return q.bits_per_param, error


def _formula_bits(blocksize: int, double_quant: bool) -> float:
    """Bits per parameter without the per-tensor offset: 4 + constants per weight."""
    return 4 + (8 / blocksize + 32 / (blocksize * 256) if double_quant else 32 / blocksize)


def _choice(blocksize: Any, double_quant: Any, title: str) -> None:
    """Fail the exercise with a message unless ``(blocksize, double_quant)`` can be measured."""
    problem = ""
    if not isinstance(double_quant, bool):
        problem = f"DOUBLE_QUANT must be True or False, got {double_quant!r}"
    else:
        try:
            nf4.check_blocksize(blocksize, "BLOCKSIZE")
        except ValueError as exc:
            problem = str(exc)
    if problem:
        report(title, [Check("a block size and a double quantization to measure", False,
                             "BLOCKSIZE a power of two from the table, DOUBLE_QUANT True or False",
                             problem, hint="Pick one row of the table above.")])


@exercise(points=2)
def check_nf4_choice(blocksize: int, double_quant: bool, weight: torch.Tensor) -> None:
    """Decision: ``(blocksize, double_quant)`` meets :data:`BUDGET_BITS` and :data:`ERROR_BOUND`."""
    _choice(blocksize, double_quant, "your NF4 choice")
    bits, error = nf4_cost(weight, blocksize, double_quant)
    setting = f"blocksize {blocksize}, double quantization {'on' if double_quant else 'off'}"
    print(f"  note  measured again for {setting}: {bits:.4f} bits per parameter, "
          f"relative error {error:.2%}")
    report("your NF4 choice", [
        Check.true(f"memory: at most {BUDGET_BITS} bits per parameter", bits <= BUDGET_BITS,
                   f"<= {BUDGET_BITS} bits", f"{bits:.4f} bits" + (
                       f", {bits - BUDGET_BITS:.4f} over the budget" if bits > BUDGET_BITS else ""),
                   hint="Which part of the storage shrinks with a larger block, and which switch "
                        "makes the block constants cheaper? Read the bits column of your table."),
        Check.true(f"error: at most {ERROR_BOUND:.0%} relative error", error <= ERROR_BOUND,
                   f"<= {ERROR_BOUND:.0%}", f"{error:.2%}" + (
                       f", {100 * (error - ERROR_BOUND):.2f} points over the bound"
                       if error > ERROR_BOUND else ""),
                   hint="A larger block saves constants but stretches its codes over a wider "
                        "range: read the error column of your table for the largest block "
                        "that still meets the bound."),
    ])


@exercise(points=1)
def check_constant_bits(answer: float, blocksize: int, double_quant: bool,
                        weight: torch.Tensor) -> None:
    """Reflection 1: the bits per parameter the choice spends on block constants (not codes)."""
    _choice(blocksize, double_quant, "bits of block constants")
    want = nf4_cost(weight, blocksize, double_quant)[0] - 4
    ok = isinstance(answer, (int, float)) and not isinstance(answer, bool) \
        and abs(answer - want) <= 0.002
    near = isinstance(answer, (int, float)) and abs(answer - 4 - want) <= 0.002
    report("bits of block constants", [Check.true(
        f"bits per parameter spent on constants at blocksize {blocksize}, double quantization "
        f"{'on' if double_quant else 'off'} (within 0.002)", ok, f"{want:.4f}", repr(answer),
        hint=("That includes the 4 bits of the codes: subtract them." if near else
              "Everything but the 4-bit codes: the bits column of your table minus 4, or count "
              "them: 8 or 32 bits per block, plus 32 per 256 blocks with double quantization."))])


@exercise(points=1)
def check_saved_gb(answer: float, blocksize: int, double_quant: bool) -> None:
    """Reflection 2: GB (1e9 bytes) a 7e9-parameter model saves with the choice over QLoRA's."""
    _choice(blocksize, double_quant, "gigabytes saved on a 7B model")
    want = PARAMS_7B * (_formula_bits(64, True) - _formula_bits(blocksize, double_quant)) / 8 / 1e9
    ok = isinstance(answer, (int, float)) and not isinstance(answer, bool) \
        and abs(answer - want) <= max(0.002, 0.03 * abs(want))
    report("gigabytes saved on a 7B model", [Check.true(
        f"7e9 weights: QLoRA's setting (blocksize 64, double quantization) minus yours, in GB "
        f"(within 3%)", ok, f"{want:.4f} GB", repr(answer),
        hint="(bits per parameter at 64 with double quantization - yours) * 7e9 / 8 bytes, then "
             "divide by 1e9. A negative answer means your choice needs more memory.")])


#: Reflection 3, multiple choice: why does the error grow with the block size?
WHY_ERROR_GROWS = {
    "a": "A larger block holds fewer codes, so each weight gets fewer bits.",
    "b": "A larger block is more likely to hold a large weight; its absmax stretches the 16 codes "
         "over a wider range, so the typical weights, near zero, share fewer and coarser codes.",
    "c": "Double quantization rounds the absmax of a larger block more coarsely.",
    "d": "A larger block needs more bytes of constants, which leaves less for the codes.",
}
_WHY_FEEDBACK = {
    "a": "Every weight gets a 4-bit code at any block size: the codes per weight do not change.",
    "c": "The error grows the same way with double quantization off: look at both columns.",
    "d": "The opposite: a larger block has fewer constants per weight (the bits column falls).",
}


@exercise(points=1)
def check_why_error_grows(answer: str) -> None:
    """Reflection 3: multiple choice, :data:`WHY_ERROR_GROWS`; feedback on a wrong letter."""
    letter = answer.strip().lower() if isinstance(answer, str) else answer
    known = letter in WHY_ERROR_GROWS
    report("why the error grows with the block size", [Check.true(
        "the reason the error grows with the block size", letter == "b",
        "the letter of the right option", repr(answer) if not known else
        f"{letter}: {WHY_ERROR_GROWS[letter]}",
        hint=_WHY_FEEDBACK.get(letter, "Answer with one of the letters a, b, c, d as a string.")
        + " Think of what the absmax of a block is, and what that does to the 16 codes.")])

#: Hints on demand (``lab03.hint("pack_nibbles")`` in the lab): a nudge first, nearly the code last.
hint = Hints("lab03", {
    "nf4_code_book": (
        "Three pieces, then one sort and one division: 8 positive quantiles, 7 negative ones, one zero.",
        "A float64 torch.distributions.Normal(0, 1) has .icdf(p), the quantile. The probabilities are "
        "torch.linspace(offset, 0.5, 9) and (offset, 0.5, 8) without their last entry (the median).",
        "normal = torch.distributions.Normal(0.0, 1.0), on float64 tensors\n"
        "positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())\n"
        "negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())\n"
        "values = torch.cat([negative, one float64 zero, positive]).float().sort().values\n"
        "return values / values.max()",
    ),
    "quantize_blocks": (
        "Work on a (n / blocksize, blocksize) view of w: one row per block, so every per-block "
        "number is a reduction over dim 1.",
        "absmax = blocks.abs().amax(dim=1); multiply each row by 1 / absmax.clamp(min=1e-38) (use "
        "[:, None] to line it up with the rows); the midpoints are (code[:-1] + code[1:]) / 2.",
        "blocks = w.float().view(-1, blocksize)\n"
        "absmax = blocks.abs().amax(dim=1)\n"
        "scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]\n"
        "indices = torch.bucketize(scaled.view(-1), (code[:-1] + code[1:]) / 2)\n"
        "return indices, absmax",
    ),
    "pack_nibbles": (
        "Split the indices into the even positions and the odd positions: every byte takes one of each.",
        "q[0::2] are the even positions, q[1::2] the odd ones. Convert to torch.uint8 first, so the "
        "shift stays in one byte; << 4 moves a value to the high nibble, | combines.",
        "q = indices.to(torch.uint8)\n"
        "return (q[0::2] << 4) | q[1::2]",
    ),
    "unpack_nibbles": (
        "Each byte gives two indices: the high nibble first, then the low one.",
        "packed >> 4 is the high nibble, packed & 0x0F the low one. Stack them side by side "
        "(dim=1) and flatten, so they interleave in the right order; then keep the first n.",
        "return torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)[:n].long()",
    ),
    "dequantize_blocks": (
        "Reverse the steps of quantize_blocks: indices, then code values, then each block times its absmax.",
        "n = absmax.numel() * blocksize indices come from unpack_nibbles(packed, n); code[indices] "
        "looks the values up; view them as (n / blocksize, blocksize) to multiply by absmax[:, None].",
        "n = absmax.numel() * blocksize\n"
        "values = code[unpack_nibbles(packed, n)].view(-1, blocksize)\n"
        "return (values * absmax[:, None]).view(shape)",
    ),
    "double_quantize": (
        "It is quantize_blocks again, on the centred absmax values, with the 256-entry dynamic code "
        "and blocks of 256, plus padding for a short last block.",
        "offset is the mean of absmax; torch.nn.functional.pad(centred, (0, -m % blocksize)) fills the "
        "last block; bucketize on the midpoints of dynamic_code(), after dropping the padding.",
        "offset = absmax.mean(); centred = absmax - offset\n"
        "blocks = torch.nn.functional.pad(centred, (0, -centred.numel() % blocksize)).view(-1, blocksize)\n"
        "absmax2 = blocks.abs().amax(dim=1)\n"
        "scaled = (blocks * (1.0 / absmax2.clamp(min=1e-38))[:, None]).view(-1)[:centred.numel()]\n"
        "q8 = torch.bucketize(scaled, (code8[:-1] + code8[1:]) / 2), with code8 = dynamic_code()\n"
        "return q8.to(torch.uint8), absmax2, offset",
    ),
    "double_dequantize": (
        "Look each q8 up in dynamic_code(), scale it by its block's absmax2, add the offset back.",
        "Every q8 needs its block's absmax2: absmax2.repeat_interleave(blocksize) gives one per "
        "position; keep the first q8.numel(). Index the code with q8.long().",
        "scale = absmax2.repeat_interleave(blocksize)[:q8.numel()]\n"
        "return dynamic_code()[q8.long()] * scale + offset",
    ),
})
