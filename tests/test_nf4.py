"""NF4 against bitsandbytes: same code books, same packed bytes, same constants, same values.

bitsandbytes 0.50 runs ``quantize_4bit`` / ``dequantize_4bit`` on the CPU, so every check
here compares with the trusted implementation byte for byte. At the end: hostile inputs
(huge and non-finite values, a tampered NF4Tensor) are refused or stay finite.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import loracore.nf4 as nf4
from loracore.nf4 import (
    DQ_BLOCKSIZE, NF4Tensor, dequantize_blockwise_8bit, dequantize_nf4, dequantize_nf4_reference,
    dynamic_code, fp4_code, int4_code, nearest_code_index, nf4_code, pack_nibbles,
    quantize_blockwise_8bit, quantize_nf4, unpack_nibbles,
)
from loracore.qlora import Linear4bit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnbF = pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                              quant_type="nf4")


def bnb_dequantize(packed: torch.Tensor, state, shape: torch.Size) -> torch.Tensor:
    """bitsandbytes' dequantized values in ``shape``.

    The state is given the flat shape ``(numel,)``: bitsandbytes 0.50.2's native CPU kernel
    mis-assigns blocks when a block is longer than the last dimension (e.g. 512 x 64 at
    blocksize 512: errors of order 1, while its own PyTorch fallback agrees with us), and
    a flat shape takes its correct path. The values themselves are the same either way.
    """
    state.shape = torch.Size([math.prod(shape)])
    # Odd lengths take bitsandbytes' PyTorch path, which it wraps in torch.compile; compiling
    # per shape costs seconds and changes nothing (one multiply per value), so run it eagerly.
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(packed, state).reshape(shape)


def assert_same_as_bnb(w: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    packed, state = bnb_quantize(w, blocksize, double_quant)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    where = f"shape {tuple(w.shape)}, dtype {w.dtype}, blocksize {blocksize}, dq {double_quant}"
    assert torch.equal(q.packed, packed.view(-1)), f"packed bytes differ ({where})"
    assert q.absmax.dtype == state.absmax.dtype, where
    assert torch.equal(q.absmax, state.absmax), f"absmax differs ({where})"
    if double_quant:
        assert torch.equal(q.offset, state.offset), f"offset differs ({where})"
        assert torch.equal(q.absmax2, state.state2.absmax), f"absmax2 differs ({where})"
        assert state.state2.blocksize == DQ_BLOCKSIZE
    ours = dequantize_nf4(q)
    theirs = bnb_dequantize(packed, state, w.shape)
    assert ours.shape == w.shape and ours.dtype == w.dtype, where
    if w.dtype == torch.float32:
        assert (ours - theirs).abs().max().item() <= 1e-6, f"dequantized values differ ({where})"
        assert torch.equal(ours, theirs), f"dequantized values not bit-identical ({where})"
    else:  # bitsandbytes rounds float32 -> bf16/fp16 to nearest even, as torch does
        assert torch.equal(ours, theirs), f"dequantized values differ ({where})"
    assert torch.equal(ours, dequantize_nf4_reference(q)), f"fast and readable paths differ ({where})"


# ---- code books -------------------------------------------------------------------------
def test_nf4_code_is_bitsandbytes_code():
    ours, theirs = nf4_code(), bnbF.get_4bit_type("nf4", device="cpu")
    assert (ours - theirs).abs().max().item() <= 1e-7
    assert torch.equal(ours, theirs)  # in fact bit-identical


def test_nf4_code_shape_8_positive_7_negative_and_exact_zero():
    code = nf4_code()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1
    assert code[0] == -1 and code[-1] == 1
    assert torch.all(code[1:] > code[:-1])


def test_fp4_code_is_bitsandbytes_fp4_set():
    theirs = bnbF.get_4bit_type("fp4", device="cpu").sort().values
    assert torch.equal(fp4_code(), theirs)


def test_int4_code_is_symmetric_integer_grid():
    code = int4_code()
    assert code.shape == (16,)
    assert torch.equal(code.unique(), torch.arange(-7, 8, dtype=torch.float32) / 7)


def test_dynamic_code_is_bitsandbytes_dynamic_map():
    ours, theirs = dynamic_code(), bnbF.create_dynamic_map(signed=True)
    assert ours.shape == (256,)
    assert torch.equal(ours, theirs)
    assert torch.all(ours[1:] > ours[:-1])  # sorted, no duplicates


# ---- building blocks --------------------------------------------------------------------
def test_nearest_code_ties_go_to_the_lower_code():
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    x = torch.tensor([-0.5, 0.25, 0.75, -0.51, 0.26, 1.0, -1.0])
    assert nearest_code_index(x, code).tolist() == [0, 1, 2, 0, 2, 3, 0]


def test_pack_nibbles_even_index_in_high_nibble():
    packed = pack_nibbles(torch.tensor([1, 2, 3, 15, 0, 9, 4]), pad_index=7)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0x12, 0x3F, 0x09, 0x47]
    assert unpack_nibbles(packed, 7).tolist() == [1, 2, 3, 15, 0, 9, 4]


def test_8bit_blockwise_matches_bitsandbytes_quantize_blockwise():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-6, 1e-2, 1.0, 30.0):
        x = torch.randn(5000, generator=g) * scale
        x[256:512] = 0.0  # a block of zeros (0/0 must not become NaN)
        q, absmax = quantize_blockwise_8bit(x, 256)
        q_ref, state = bnbF.quantize_blockwise(x, blocksize=256)
        assert torch.equal(q, q_ref) and torch.equal(absmax, state.absmax)
        back = dequantize_blockwise_8bit(q, absmax, 256)
        assert torch.equal(back, bnbF.dequantize_blockwise(q_ref, state))
        assert torch.all(back[256:512] == 0)


# ---- bit-exact with bitsandbytes ----------------------------------------------------------
SHAPES = [(7,), (64,), (65,), (1, 1), (3, 5), (33, 97), (128, 256), (512, 64), (2, 3, 257),
          (64 * 256 + 64 * 3 + 1,)]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_bit_exact_random_normal(blocksize, double_quant):
    g = torch.Generator().manual_seed(blocksize + double_quant)
    for shape in SHAPES:
        assert_same_as_bnb(torch.randn(shape, generator=g) * 0.02, blocksize, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_blocksize_32(double_quant):
    g = torch.Generator().manual_seed(32)
    for shape in SHAPES[:6]:
        assert_same_as_bnb(torch.randn(shape, generator=g), 32, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bit_exact_half_precision_inputs(dtype, double_quant):
    g = torch.Generator().manual_seed(3)
    for shape in [(7,), (65,), (33, 97), (256, 64)]:
        assert_same_as_bnb((torch.randn(shape, generator=g) * 0.05).to(dtype), 64, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_many_random_tensors(double_quant):
    """Random sizes, scales and tails: heavy tails, outliers, exact ties with code values."""
    g = torch.Generator().manual_seed(11 + double_quant)
    for _ in range(40):
        n = int(torch.randint(1, 20000, (1,), generator=g))
        scale = 10.0 ** float(torch.randint(-6, 3, (1,), generator=g))
        w = torch.randn(n, generator=g) * scale
        if n > 10:
            w[torch.randint(0, n, (3,), generator=g)] *= 50.0  # outliers
            idx = torch.randint(0, n, (min(n, 50),), generator=g)  # values exactly on codes
            w[idx] = nf4_code()[torch.randint(0, 16, (idx.numel(),), generator=g)] * w.abs().max()
        bs = 2 ** int(torch.randint(6, 13, (1,), generator=g))
        assert_same_as_bnb(w, bs, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_edge_cases(double_quant):
    midpoints = (nf4_code()[:-1] + nf4_code()[1:]) / 2
    cases = {
        "zeros": torch.zeros(200),
        "zeros, short last block": torch.zeros(64 * 3 + 5),
        "one block of zeros": torch.cat([torch.randn(64), torch.zeros(64), torch.randn(70)]),
        "all equal": torch.full((64 * 5,), 0.3),
        "all equal, negative": torch.full((100,), -2.5),
        "tiny": torch.randn(500) * 1e-30,
        "subnormal": torch.full((130,), 1e-40),
        "huge": torch.randn(300) * 1e30,
        "exact midpoints": torch.cat([torch.ones(1), midpoints, -midpoints, torch.zeros(33)]),
        "single element": torch.tensor([0.7]),
        "alternating signs": torch.tensor([1.0, -1.0] * 100),
        "equal absmax everywhere": torch.randn(64 * 300).sign(),
    }
    for name, w in cases.items():
        try:
            assert_same_as_bnb(w, 64, double_quant)
        except AssertionError as exc:
            raise AssertionError(f"edge case {name!r}: {exc}") from None


@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_near_the_float32_limit_where_bitsandbytes_is_finite(double_quant):
    """Values up to 1e38 and mixed huge/tiny blocks: the float32 mean of the block constants
    does not overflow yet, so our bytes must still be bitsandbytes' (the overflow fallback in
    quantize_nf4 is taken only where bitsandbytes returns NaN; see
    test_huge_finite_values_quantize_to_finite_values below)."""
    g = torch.Generator().manual_seed(5)
    cases = {
        "one value at 1e38": torch.cat([torch.full((1,), 1e38), torch.randn(300, generator=g)]),
        "blocks of 1e38 and 1e-30": torch.cat([torch.randn(64, generator=g) * 1e37,
                                               torch.randn(64, generator=g) * 1e-30,
                                               torch.randn(70, generator=g)]),
    }
    for name, w in cases.items():
        try:
            assert_same_as_bnb(w, 64, double_quant)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None


def _values_where_reciprocal_and_division_disagree(num_blocks: int = 40) -> torch.Tensor:
    """Blocks ``[a, x1, x2, ...]`` whose ``x / a`` and ``x * (1 / a)`` fall on different sides
    of a midpoint between two NF4 codes: only the same rounding as bitsandbytes gets them right."""
    g = torch.Generator().manual_seed(5)
    midpoints = (nf4_code()[:-1] + nf4_code()[1:]) / 2
    a = torch.rand(num_blocks, generator=g) + 0.5
    near = midpoints[None, :] * a[:, None]  # (blocks, 15), on the midpoints
    picks = []
    for direction in (float("inf"), float("-inf")):
        x = torch.nextafter(near, torch.full_like(near, direction))
        differ = nearest_code_index(x * (1.0 / a[:, None]), nf4_code()) != \
            nearest_code_index(x / a[:, None], nf4_code())
        picks.append(torch.where(differ, x, near))
    rows = torch.cat([a[:, None], *picks, torch.zeros(num_blocks, 64 - 1 - 2 * 15)], dim=1)
    return rows.reshape(-1)


def test_reciprocal_rounding_cases_exist_and_match():
    w = _values_where_reciprocal_and_division_disagree()
    blocks = w.view(-1, 64)
    a = blocks[:, :1]
    assert (nearest_code_index(blocks * (1.0 / a), nf4_code())
            != nearest_code_index(blocks / a, nf4_code())).sum() > 20  # the test has teeth
    for dq in (False, True):
        assert_same_as_bnb(w, 64, dq)


# ---- storage ----------------------------------------------------------------------------
def test_bits_per_param_without_double_quant_is_exactly_4_5():
    q = quantize_nf4(torch.randn(4096, 64), blocksize=64, double_quant=False)
    assert q.bits_per_param == 4.5
    assert q.storage_bytes() == {"packed codes": 4096 * 32, "absmax": 4096 * 4}


def test_bits_per_param_with_double_quant():
    """QLoRA's "4.127 bits" is 4 + 8/64 + 32/(64*256) = 4.126953125, rounded to 3 decimals.
    Exact storage adds the one float32 offset per tensor: 32 bits over all its values."""
    n = 4096 * 4096
    q = quantize_nf4(torch.randn(4096, 4096), blocksize=64, double_quant=True)
    assert 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert q.bits_per_param == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n  # all dyadic: exact
    assert round(q.bits_per_param, 3) == 4.127
    assert q.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4


def test_storage_counts_padding_of_partial_blocks():
    q = quantize_nf4(torch.randn(3, 5), blocksize=64, double_quant=True)
    assert q.storage_bytes() == {"packed codes": 8, "absmax": 1, "absmax2": 4, "offset": 4}
    assert q.numel == 15 and q.num_blocks == 1


def test_round_trip_restores_shape_and_dtype_and_error_is_bounded():
    w = torch.randn(3, 7, 11, dtype=torch.bfloat16)
    q = quantize_nf4(w, blocksize=64)
    back = dequantize_nf4(q)
    assert back.shape == w.shape and back.dtype == torch.bfloat16
    assert dequantize_nf4(q, dtype=torch.float32).dtype == torch.float32
    # the largest gap between neighbouring NF4 codes is ~0.28: error <= half of it times absmax
    assert ((back.float() - w.float()).abs() <= 0.15 * w.float().abs().max()).all()


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    """Table 2 of QLoRA in miniature: NF4 has the smallest error on normal data."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    blocks = w.view(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True)
    errors = {}
    for name, code in {"int4": int4_code(), "fp4": fp4_code(), "nf4": nf4_code()}.items():
        approx = code[nearest_code_index(blocks / scale, code)] * scale
        errors[name] = (approx - blocks).pow(2).mean().item()
    assert errors["nf4"] < errors["int4"] and errors["nf4"] < errors["fp4"], errors


def test_to_device_copy_keeps_values():
    q = quantize_nf4(torch.randn(10, 10))
    q2 = q.to("cpu")
    assert torch.equal(dequantize_nf4(q), dequantize_nf4(q2)) and "NF4Tensor" in repr(q)


# ---- refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_refuses_non_finite(bad):
    w = torch.randn(300)
    w[170] = bad
    with pytest.raises(ValueError, match="non-finite.*block 2"):
        quantize_nf4(w)
    w = torch.randn(70)
    w[-1] = bad  # in the short last block
    with pytest.raises(ValueError, match="non-finite"):
        quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [0, 1, 48, 100, -64, 64.0, True])
def test_refuses_blocksize_not_power_of_two(blocksize):
    with pytest.raises(ValueError, match="power of two"):
        quantize_nf4(torch.randn(128), blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_refuses_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        quantize_nf4(torch.ones(64, dtype=dtype))


def test_refuses_empty_and_non_tensor():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match="NF4Tensor"):
        dequantize_nf4(torch.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4(quantize_nf4(torch.ones(64)), dtype=torch.int8)


def test_nf4tensor_fields():
    q = quantize_nf4(torch.randn(10, 100), blocksize=128, double_quant=True)
    assert isinstance(q, NF4Tensor) and q.double_quant and q.blocksize == 128
    assert q.packed.shape == (500,) and q.absmax.dtype == torch.uint8 and q.absmax.shape == (8,)
    assert q.absmax2.shape == (1,) and q.offset.shape == ()
    q = quantize_nf4(torch.randn(10, 100), blocksize=128, double_quant=False)
    assert not q.double_quant and q.absmax.dtype == torch.float32 and q.offset is None


# ---- NF4: the fast path's table and pieces -------------------------------------------------
def test_byte_table_decodes_every_byte_high_nibble_first():
    """All 256 bytes through the fast path: each gives code[high], code[low], bit for bit."""
    b = torch.arange(256)
    q = NF4Tensor(b.to(torch.uint8), torch.ones(8), torch.Size((512,)), torch.float32, 64)
    want = nf4_code()[torch.stack([b >> 4, b & 0x0F], dim=1)].reshape(-1)
    assert torch.equal(dequantize_nf4(q), want)
    assert torch.equal(dequantize_nf4_reference(q), want)
    # The table's 8-byte containers are only copied; none is a NaN whose bits a copy could touch.
    assert torch.isfinite(nf4._byte_table(torch.device("cpu"))).all()


def test_scale_blocks_docstring_example():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = nf4._scale_blocks_(values, torch.tensor([10.0, 100.0]), 2)
    assert out is values and values.tolist() == [10.0, 20.0, 300.0, 400.0, 500.0]


@pytest.mark.parametrize("blocks", [1, 255, 256, 257, 549])
def test_fast_absmax_decode_is_the_8bit_dequantize_plus_offset(blocks):
    g = torch.Generator().manual_seed(blocks)
    q = quantize_nf4(torch.randn(blocks * 64 - 3, generator=g) * 0.02, 64, double_quant=True)
    want = dequantize_blockwise_8bit(q.absmax, q.absmax2, DQ_BLOCKSIZE) + q.offset
    assert torch.equal(nf4._absmax_float_fast(q), want)


#: Every block size check_blocksize accepts up to 8192; bitsandbytes takes 32 ... 4096.
ALL_BLOCKSIZES = [2 ** k for k in range(1, 14)]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", ALL_BLOCKSIZES)
def test_dequantize_in_small_pieces_is_bit_exact(monkeypatch, blocksize, double_quant):
    """Pieces of 128 values (smaller than most blocks, then a piece is one block): odd sizes,
    short last blocks and pieces, against bitsandbytes where it takes the block size and
    against the readable path always, for float32, bfloat16 and float16 outputs."""
    monkeypatch.setattr(nf4, "CPU_CHUNK", 128)
    g = torch.Generator().manual_seed(blocksize + 7 * double_quant)
    for n in (1, 7, 128, 129, 1001, 3 * blocksize + 5, 20000 + 2 * blocksize + 1):
        w = torch.randn(n, generator=g) * 0.02
        if 32 <= blocksize <= 4096:
            assert_same_as_bnb(w, blocksize, double_quant)
        q = quantize_nf4(w, blocksize, double_quant)
        full = dequantize_nf4(q, torch.float32)
        assert torch.equal(full, dequantize_nf4_reference(q, torch.float32)), (n, blocksize)
        for dtype in (torch.bfloat16, torch.float16):
            ours = dequantize_nf4(q, dtype)
            assert ours.dtype == dtype and ours.shape == w.shape
            assert torch.equal(ours, dequantize_nf4_reference(q, dtype)), (n, blocksize, dtype)
            assert torch.equal(ours, full.to(dtype)), (n, blocksize, dtype)


@pytest.mark.parametrize("chunk", [2, 64, 4096, 1 << 22])
def test_piece_size_never_changes_a_bit(monkeypatch, chunk):
    g = torch.Generator().manual_seed(3)
    q = quantize_nf4(torch.randn(97, 331, generator=g) * 0.02, 64, double_quant=True)
    want = dequantize_nf4_reference(q)
    monkeypatch.setattr(nf4, "CPU_CHUNK", chunk)
    assert torch.equal(dequantize_nf4(q), want)
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), dequantize_nf4_reference(q, torch.bfloat16))


# ---- NF4: huge and non-finite values ------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("huge", [1e38, 3e38, 3.4e38, -3.4e38])
def test_huge_finite_values_quantize_to_finite_values(huge, double_quant):
    """Before: values near the float32 limit overflowed the mean of the block constants and
    quantize_nf4 died with an index overflow (bitsandbytes returns NaN there)."""
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    w[0, 0], w[3, 7], w[5, 100] = huge, -huge, huge / 2
    q = quantize_nf4(w, double_quant=double_quant)
    d = dequantize_nf4(q)
    assert torch.isfinite(d).all()
    for idx in [(0, 0), (3, 7)]:  # the largest value of a block is stored exactly (code ±1)
        assert math.isclose(d[idx].item(), w[idx].item(), rel_tol=1e-2)
    assert torch.equal(dequantize_nf4_reference(q), d)


def test_mixed_huge_and_tiny_blocks_without_double_quant_keep_each_blocks_scale():
    """One absmax per block in float32: a block of 1e-30s is not crushed by a block of 1e38s."""
    g = torch.Generator().manual_seed(1)
    w = torch.cat([torch.randn(64, generator=g) * 1e38 / 4, torch.randn(64, generator=g) * 1e-30,
                   torch.randn(64, generator=g)])
    d = dequantize_nf4(quantize_nf4(w, double_quant=False))
    code = nf4_code()
    bound = (code[1:] - code[:-1]).max().item() / 2 * 1.001  # half the widest gap, times absmax
    for block in range(3):
        x, y = w[block * 64:(block + 1) * 64], d[block * 64:(block + 1) * 64]
        assert ((x - y).abs().max() / x.abs().max()).item() <= bound, block


@pytest.mark.parametrize("bad, name", [(float("nan"), "nan"), (float("inf"), "inf"),
                                       (-float("inf"), "-inf")])
def test_quantize_nf4_refuses_non_finite_naming_the_block(bad, name):
    w = torch.zeros(300)
    w[200] = bad
    with pytest.raises(ValueError, match=r"quantize_nf4: .*non-finite values \(first in block 3"):
        quantize_nf4(w)


# ---- NF4: a tampered NF4Tensor is refused before decoding ---------------------------------
def _tamper(q: NF4Tensor, how: str) -> NF4Tensor:
    r = dataclasses.replace
    return {
        "shape larger": lambda: r(q, shape=torch.Size((40, 200))),
        "shape empty": lambda: r(q, shape=torch.Size((0, 96))),
        "shape negative": lambda: r(q, shape=(-40, 96)),
        "shape of floats": lambda: r(q, shape=(40.0, 96)),
        "blocksize not a power of two": lambda: r(q, blocksize=48),
        "blocksize changed": lambda: r(q, blocksize=128),
        "packed truncated": lambda: r(q, packed=q.packed[:-1]),
        "packed int32": lambda: r(q, packed=q.packed.int()),
        "absmax truncated": lambda: r(q, absmax=q.absmax[:-1]),
        "absmax float (double quant)": lambda: r(q, absmax=q.absmax.float()),
        "absmax2 missing": lambda: r(q, absmax2=None),
        "absmax2 wrong length": lambda: r(q, absmax2=torch.ones(3)),
        "offset float64": lambda: r(q, offset=q.offset.double()),
        "dtype int": lambda: r(q, dtype=torch.int8),
        "dtype string": lambda: r(q, dtype="float32"),
        "parts on two devices": lambda: r(q, absmax=q.absmax.to("meta")),
    }[how]()


TAMPERS = {
    "shape larger": "packed holds 1920 bytes; shape \\(40, 200\\) needs",
    "shape empty": "shape \\(0, 96\\) holds no values",
    "shape negative": "holds no values",
    "shape of floats": "shape must be a sequence of ints",
    "blocksize not a power of two": "blocksize must be a power of two",
    "blocksize changed": "absmax holds 60 constants; 3840 values in blocks of 128 need 30",
    "packed truncated": "packed holds 1919 bytes",
    "packed int32": "packed must be a 1-D uint8 tensor",
    "absmax truncated": "absmax holds 59 constants",
    "absmax float (double quant)": "absmax must be a 1-D torch.uint8 tensor \\(double quantization\\)",
    "absmax2 missing": "offset and absmax2 must be both set",
    "absmax2 wrong length": "absmax2 has shape \\(3,\\)",
    "offset float64": "offset must be a float32 tensor",
    "dtype int": "dtype must be float32, bfloat16 or float16, got torch.int8",
    "dtype string": "dtype must be float32, bfloat16 or float16, got 'float32'",
    "parts on two devices": "on different devices",
}


@pytest.mark.parametrize("how", list(TAMPERS))
def test_tampered_nf4tensor_is_refused_before_decoding(how):
    q = quantize_nf4(torch.randn(40, 96, generator=torch.Generator().manual_seed(2)))
    bad = _tamper(q, how)
    for fn, name in ((dequantize_nf4, "dequantize_nf4"),
                     (dequantize_nf4_reference, "dequantize_nf4_reference"),
                     (Linear4bit, "Linear4bit")):
        with pytest.raises((ValueError, TypeError), match=rf"{name}: inconsistent NF4Tensor: "
                                                          rf".*{TAMPERS[how]}"):
            fn(bad)




@pytest.mark.parametrize("dtype", [torch.int32, "float32"])
def test_dequantize_refuses_a_non_float_output_dtype(dtype):
    q = quantize_nf4(torch.randn(8, 64))
    for fn in (dequantize_nf4, dequantize_nf4_reference):
        with pytest.raises(TypeError, match=f"{fn.__name__}: dtype must be float32"):
            fn(q, dtype)
