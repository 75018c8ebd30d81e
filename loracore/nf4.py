"""4-bit NormalFloat (NF4) quantization with double quantization, byte for byte as bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) stores a frozen weight in 4 bits per value:

1. **Blocks with an absmax.** The flattened weight is cut into blocks of ``blocksize``
   values (64 by default). Each block is divided by its largest magnitude, so it lies in
   ``[-1, 1]``, and that *absmax* is kept to undo the scaling.
2. **A code book of 16 values.** Each scaled value is replaced by the index of the nearest
   entry of a 16-value code book. NF4's code book is built from quantiles of the normal
   distribution, because trained weights are close to normal: every code is used about
   equally often (:func:`nf4_code`).
3. **Two codes per byte.** Element ``2i`` goes into the high nibble of byte ``i``,
   element ``2i+1`` into the low nibble (:func:`pack_nibbles`).
4. **Double quantization.** One float32 absmax per 64 values costs 32/64 = 0.5 bits per
   value. QLoRA subtracts their mean and quantizes them again to 8 bits, in blocks of 256,
   with bitsandbytes' signed dynamic code (:func:`dynamic_code`): 8/64 + 32/(64·256) bits.
   That 8-bit step is :mod:`loracore.quant8`'s, the same code the 8-bit optimizers use.

Everything here is checked against ``bitsandbytes.functional.quantize_4bit(...,
quant_type="nf4")`` in ``tests/test_nf4.py``: same packed bytes, same absmax, same 8-bit
absmax and offset, same dequantized values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

# nearest_code_index is quant8's; it is named here too because lesson 05 imports it from nf4.
from loracore.quant8 import dequantize_blockwise, dynamic_map, nearest_code_index, quantize_blockwise

__all__ = [
    "NF4_OFFSET", "DQ_BLOCKSIZE", "nf4_code", "fp4_code", "int4_code", "dynamic_code",
    "nearest_code_index", "pack_nibbles", "unpack_nibbles", "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit", "NF4Tensor", "quantize_nf4", "dequantize_nf4",
    "dequantize_nf4_reference", "check_blocksize",
]

#: Probability of NF4's outermost quantile: 1 - ½(1/30 + 1/32), the middle between where
#: the last of 15 and of 16 equal-probability bins would put it (rounded to 7 digits, as in
#: QLoRA's reference code). Using the exact quantile 1.0 would give ±infinity.
NF4_OFFSET = 0.9677083
#: Double quantization quantizes the absmax constants in blocks of this many (QLoRA: 256).
DQ_BLOCKSIZE = 256
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- code books ---------------------------------------------------------------------------
# Each code book is computed once; callers get a copy, so editing one in a notebook can
# never change the code that quantize_nf4 uses.
def _cached(fn):
    table = functools.lru_cache(maxsize=None)(fn)
    return functools.wraps(fn)(lambda: table().clone())


@_cached
def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, sorted, in ``[-1, 1]``: shape ``(16,)``, float32.

    Equal-probability quantiles of N(0, 1): 8 on the positive side, 7 on the negative side,
    plus an exact zero (a symmetric code with 16 values would have no zero, and a zero
    code keeps zero weights and padding exactly zero). Both sides are scaled so that the
    largest value is exactly 1.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    # Probabilities from NF4_OFFSET down to 0.5 (the median, i.e. zero, is dropped):
    # 9 points -> 8 positive quantiles, 8 points -> 7 negative ones.
    positive = normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    values = values.float().sort().values
    return values / values.max()


@_cached
def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 values (1 sign, 2 exponent, 1 mantissa bit), sorted: ``(16,)``.

    Normal numbers are ``2**e * (1 + m/2)`` for exponents ``e = 1, 2, 3`` and mantissa bit
    ``m``: {2, 3, 4, 6, 8, 12}; exponent zero gives 0 and one tiny subnormal (1/16).
    With the sign that makes 16 codes (+0 and -0 both decode to 0), scaled to ``[-1, 1]``.
    """
    magnitudes = [0.0, 0.0625] + [2.0 ** e * (1 + m / 2) for e in (1, 2, 3) for m in (0, 1)]
    values = torch.tensor(magnitudes + [-v for v in magnitudes], dtype=torch.float32)
    return (values / values.abs().max()).sort().values


@_cached
def int4_code() -> torch.Tensor:
    """Symmetric 4-bit integers ``k / 7`` for ``k = -7 .. 7`` (15 distinct values, 0 twice): ``(16,)``."""
    return (torch.tensor(list(range(-7, 8)) + [0], dtype=torch.float32) / 7).sort().values


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code: 256 sorted values in ``[-1, 1]``, float32.

    The code double quantization stores the absmax constants in; it is
    :func:`loracore.quant8.dynamic_map` with ``signed=True`` (a fresh copy each call).
    A tiny float format (Dettmers 2015, arXiv 1511.04561): for each decade ``10**-6 ..
    10**0`` there are ``2**i`` linearly spaced values (``i = 0 .. 6``, coarse for tiny
    numbers, fine near 1), mirrored for negatives, plus 0 and 1: 2·127 + 2 = 256 codes.
    """
    return dynamic_map(signed=True)


#: Index of 0.0 in :func:`nf4_code` (7 negative codes come first).
_NF4_ZERO = 7


# ---- nibbles ------------------------------------------------------------------------------
def pack_nibbles(indices: torch.Tensor, pad_index: int = 0) -> torch.Tensor:
    """Pack 4-bit indices two per byte: element ``2i`` high nibble, ``2i+1`` low nibble.

    indices: ``(n,)`` integers in ``0..15``. Returns uint8 ``(ceil(n / 2),)``; an odd ``n``
    is padded with one ``pad_index`` (dropped again by :func:`unpack_nibbles`). NF4 pads
    with the code of 0.0, like bitsandbytes, so the padding decodes to an exact zero.
    """
    q = indices.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad_index)])
    return (q[0::2] << 4) | q[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: packed ``(m,)`` uint8 -> ``(n,)`` int64 indices."""
    pairs = torch.stack([packed >> 4, packed & 0x0F], dim=-1)  # (m, 2): high, low
    return pairs.reshape(-1)[:n].long()


# ---- 8-bit blockwise (the absmax constants in double quantization) ------------------------
def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x: (n,)`` float32 to 8-bit :func:`dynamic_code` indices in blocks.

    Returns ``(indices: (n,) uint8, absmax: (ceil(n / blocksize),) float32)``: double
    quantization's step, :func:`loracore.quant8.quantize_blockwise` with the signed code (a
    block of zeros gets index 0 and absmax 0, which decodes to exactly 0).
    """
    return quantize_blockwise(x, dynamic_map(signed=True), blocksize)


def dequantize_blockwise_8bit(indices: torch.Tensor, absmax: torch.Tensor,
                              blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``(n,)`` uint8 -> ``(n,)`` float32."""
    return dequantize_blockwise(indices, absmax, dynamic_map(signed=True), blocksize)


# ---- NF4 ----------------------------------------------------------------------------------
@dataclass
class NF4Tensor:
    """A tensor stored as packed NF4 codes plus its block constants.

    Fields:
        packed: ``(ceil(numel / 2),)`` uint8, two 4-bit codes per byte (high nibble first).
        absmax: ``(num_blocks,)``: float32 absmax per block, or, with double quantization,
            uint8 indices into :func:`dynamic_code` of ``absmax - offset``.
        shape, dtype: the original tensor's shape and dtype (``dequantize_nf4`` restores both).
        blocksize: values per block.
        offset: ``()`` float32 mean of the absmax constants (double quantization only).
        absmax2: ``(ceil(num_blocks / 256),)`` float32 absmax of each block of 256 constants
            (double quantization only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return self.absmax.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def storage_bytes(self) -> dict[str, int]:
        """Bytes per stored part. The code books are shared constants, not part of a tensor."""
        parts = {"packed codes": self.packed.numel() * self.packed.element_size(),
                 "absmax": self.absmax.numel() * self.absmax.element_size()}
        if self.double_quant:
            parts["absmax2"] = self.absmax2.numel() * self.absmax2.element_size()
            parts["offset"] = self.offset.numel() * self.offset.element_size()
        return parts

    @property
    def nbytes(self) -> int:
        """Exact storage in bytes (see :meth:`storage_bytes`)."""
        return sum(self.storage_bytes().values())

    @property
    def bits_per_param(self) -> float:
        """``8 * nbytes / numel``. At blocksize 64: 4.5 without double quantization; with it
        ``4 + 8/64 + 32/(64·256) = 4.12695...`` (QLoRA's "4.127") plus 32 bits of offset per
        tensor (and the padding of a partial last block)."""
        return 8 * self.nbytes / self.numel

    def validate(self, where: str = "NF4Tensor", *, check_values: bool = False) -> None:
        """Raise ``ValueError``/``TypeError`` (prefixed by ``where``) unless every field agrees.

        Checks what decoding relies on, so a tampered or hand-built tensor is refused before
        any lookup reads out of range: ``shape`` (non-negative ints, not empty), ``dtype``,
        ``blocksize``, ``packed`` (uint8, ``ceil(numel / 2)`` bytes), ``absmax`` (one per
        block; float32, or uint8 with double quantization), ``absmax2`` and ``offset``
        (float32, both present or both absent) and that all live on one device. O(1):
        metadata only. ``check_values=True`` also reads the float constants (finite).
        """
        def bad(msg: str, exc: type = ValueError) -> None:
            raise exc(f"{where}: inconsistent NF4Tensor: {msg}")

        try:
            shape = torch.Size(self.shape)
        except (TypeError, ValueError):
            bad(f"shape must be a sequence of ints, got {self.shape!r}", TypeError)
        if any(s < 0 for s in shape) or math.prod(shape) == 0:
            bad(f"shape {tuple(shape)} holds no values")
        if self.dtype not in _FLOAT_DTYPES:
            bad(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}", TypeError)
        check_blocksize(self.blocksize, f"{where}: inconsistent NF4Tensor")
        n = math.prod(shape)
        for name in ("packed", "absmax"):
            if not isinstance(getattr(self, name), torch.Tensor):
                bad(f"{name} must be a tensor, got {type(getattr(self, name)).__name__}", TypeError)
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1:
            bad(f"packed must be a 1-D uint8 tensor, got {self.packed.dtype} of shape "
                f"{tuple(self.packed.shape)}")
        if self.packed.numel() != (n + 1) // 2:
            bad(f"packed holds {self.packed.numel()} bytes; shape {tuple(shape)} needs "
                f"ceil({n} / 2) = {(n + 1) // 2}")
        blocks = -(-n // self.blocksize)
        if (self.offset is None) != (self.absmax2 is None):
            bad("offset and absmax2 must be both set (double quantization) or both None")
        want_dtype = torch.uint8 if self.absmax2 is not None else torch.float32
        if self.absmax.dtype != want_dtype or self.absmax.dim() != 1:
            bad(f"absmax must be a 1-D {want_dtype} tensor "
                f"({'double' if self.absmax2 is not None else 'no double'} quantization), got "
                f"{self.absmax.dtype} of shape {tuple(self.absmax.shape)}")
        if self.absmax.numel() != blocks:
            bad(f"absmax holds {self.absmax.numel()} constants; {n} values in blocks of "
                f"{self.blocksize} need {blocks}")
        parts = [self.packed, self.absmax]
        if self.absmax2 is not None:
            for name in ("absmax2", "offset"):
                t = getattr(self, name)
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                    bad(f"{name} must be a float32 tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}", TypeError)
            want2 = -(-blocks // DQ_BLOCKSIZE)
            if self.absmax2.shape != (want2,):
                bad(f"absmax2 has shape {tuple(self.absmax2.shape)}; {blocks} constants in "
                    f"blocks of {DQ_BLOCKSIZE} need ({want2},)")
            if self.offset.numel() != 1:
                bad(f"offset must hold one value, got shape {tuple(self.offset.shape)}")
            parts += [self.absmax2, self.offset]
        devices = {t.device for t in parts}
        if len(devices) > 1:
            bad(f"its parts are on different devices {sorted(map(str, devices))}; use .to(device)")
        if check_values:
            floats = [t for t in parts if t.is_floating_point()]
            if not all(bool(torch.isfinite(t).all()) for t in floats):
                bad("its block constants (absmax/absmax2/offset) hold NaN or inf")

    def to(self, device: torch.device | str) -> "NF4Tensor":
        """A copy on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(move(self.packed), move(self.absmax), self.shape, self.dtype,
                         self.blocksize, move(self.offset), move(self.absmax2))

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}"
                f"{dq}, {self.nbytes} bytes, {self.bits_per_param:.4f} bits/param)")


def check_blocksize(blocksize: int, where: str) -> None:
    """Raise ``ValueError`` (prefixed by ``where``) unless ``blocksize`` is an int power of two
    >= 2: the blocks of NF4 and of :func:`loracore.qlora.quantize_model`."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"{where}: blocksize must be a power of two >= 2 (bitsandbytes uses "
                         f"32 ... 4096, QLoRA 64), got {blocksize!r}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``w`` (any shape, float32/bfloat16/float16) to NF4.

    Bit-exact with ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)``. Raises ``ValueError`` on non-finite values, an
    empty tensor or a blocksize that is not a power of two; ``TypeError`` on another dtype.

    Huge finite values (up to float32's 3.4e38) quantize to finite values. With double
    quantization the block constants share one 8-bit scale per 256 blocks, so a block far
    smaller than its neighbours (1 next to 1e38) loses its precision, as in bitsandbytes;
    ``double_quant=False`` keeps every block's own float32 scale.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4: weight of shape {tuple(w.shape)} has dtype {w.dtype}; "
                        f"NF4 quantizes float32, bfloat16 or float16 (convert with .float())")
    check_blocksize(blocksize, "quantize_nf4")
    n = w.numel()
    if n == 0:
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} is empty")
    flat = w.reshape(-1).float()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    tail = flat[full:]  # the short last block, when blocksize does not divide n
    # max |x| from min and max, without materialising |x| (one pass fewer).
    lo, hi = torch.aminmax(blocks, dim=1)
    absmax = torch.maximum(hi, -lo)
    if full < n:  # bitsandbytes stores the short block's absmax clamped to >= 1e-38
        absmax = torch.cat([absmax, tail.abs().max().clamp(min=1e-38)[None]])
    if not torch.isfinite(absmax).all():  # NaN and inf both reach their block's max
        bad = int((~torch.isfinite(absmax)).nonzero()[0, 0])
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} has non-finite values "
                         f"(first in block {bad}, elements {bad * blocksize}..); refusing to quantize")
    code = nf4_code().to(w.device)
    # bitsandbytes multiplies by the reciprocal (cheaper than dividing); x * (1/a) and x / a
    # can differ in the last bit, which can move a value across a midpoint, so we do the same.
    # A block of zeros is scaled by 1/1e-38 (0 stays 0) but keeps absmax 0. A value above 1
    # by an ulp still gets code 15, so no clamp is needed.
    inv = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)
    idx = nearest_code_index((blocks * inv[:, None]).view(-1), code)
    if full < n:  # ... and divides the short block (the stored absmax is never 0 there)
        idx = torch.cat([idx, nearest_code_index(tail / absmax[-1], code)])
    packed = pack_nibbles(idx, pad_index=_NF4_ZERO)
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    if not torch.isfinite(offset):
        # Every absmax is finite, but their float32 sum overflowed (values near 3.4e38).
        # bitsandbytes returns NaN constants here; averaging in float64 gives the true mean,
        # which fits in float32 (a mean never exceeds the largest value). Normal weights never
        # take this branch, so the bytes stay identical to bitsandbytes' elsewhere.
        offset = absmax.double().mean().float()
    q_absmax, absmax2 = quantize_blockwise_8bit(absmax - offset, DQ_BLOCKSIZE)
    q = NF4Tensor(packed, q_absmax, w.shape, w.dtype, blocksize, offset, absmax2)
    if not torch.isfinite(_absmax_float(q)).all():  # rounding up at the edge of float32
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} has values up to "
                         f"{absmax.max().item():.3g}, too close to the float32 limit (3.4e38) for "
                         f"double quantization; pass double_quant=False or rescale the weight")
    return q


def _absmax_float(q: NF4Tensor) -> torch.Tensor:
    """The float32 absmax per block, decoding the 8-bit constants under double quantization."""
    if not q.double_quant:
        return q.absmax
    return dequantize_blockwise_8bit(q.absmax, q.absmax2, DQ_BLOCKSIZE) + q.offset


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The readable path: unpack nibbles, look up codes, multiply by each block's absmax.

    Returns a tensor of ``q.shape`` in ``dtype`` (default: the original dtype).
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize_nf4_reference: expected an NF4Tensor, got {type(q).__name__}")
    q.validate("dequantize_nf4_reference")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4_reference: dtype must be float32, bfloat16 or float16, "
                        f"got {dtype!r}")
    idx = unpack_nibbles(q.packed, q.numel)
    values = nf4_code().to(q.device)[idx]  # (numel,) in [-1, 1]
    scale = _absmax_float(q).repeat_interleave(q.blocksize)[: q.numel]
    return (values * scale).view(q.shape).to(dtype or q.dtype)


# ---- the fast path ------------------------------------------------------------------------
# Every trick below only changes *where* a float32 value is computed, never *how*: each output
# value is still the one product ``code[nibble] * absmax`` of the readable path, in float32,
# so the result is bit for bit the same (tests/test_nf4.py checks it against both).
@functools.lru_cache(maxsize=None)
def _byte_table(device: torch.device) -> torch.Tensor:
    """``(256,)`` float64 *containers*: entry ``b`` holds the two float32 values of byte ``b``.

    Row ``b`` of the ``(256, 2)`` float32 table ``[code[b >> 4], code[b & 15]]`` (high nibble
    first, as packed) is seen as one 8-byte number, so one look-up copies both values of a
    byte. It is never used in arithmetic, only copied, and a copy moves the 8 bytes
    unchanged (none of them is a NaN: a float32 in ``[-1, 1]`` puts at most 0x3FF in the
    float64 exponent), so viewing the result as float32 gives the two code values back bit
    for bit. Float64 rather than int64 because ``index_select`` has a faster loop for
    floating types (about 25% on the CPU).
    """
    b = torch.arange(256)
    pairs = nf4_code()[torch.stack([b >> 4, b & 0x0F], dim=1)]  # (256, 2) float32
    return pairs.view(torch.float64).view(-1).to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_code_on(device: torch.device) -> torch.Tensor:
    return dynamic_map(signed=True).to(device)


def _scale_blocks_(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply ``values: (m,)`` in place, block by block: block ``i`` by ``scales[i]``.

    A short last block (``m`` not a multiple of ``blocksize``) uses ``scales[-1]``. Example:
    values ``[1, 2, 3, 4, 5]``, scales ``[10, 100]``, blocksize 2 -> ``[10, 20, 300, 400, 500]``.
    """
    full = values.numel() - values.numel() % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < values.numel():
        values[full:].mul_(scales[-1])
    return values


def _absmax_float_fast(q: NF4Tensor) -> torch.Tensor:
    """:func:`_absmax_float` in three passes over one buffer: look up the 8-bit codes, scale
    each block of 256 by its ``absmax2``, add the offset; the same float32 product, then
    the same sum, as ``dequantize_blockwise_8bit(...) + offset``."""
    if not q.double_quant:
        return q.absmax
    absmax = torch.index_select(_dynamic_code_on(q.device), 0, q.absmax.int())  # (num_blocks,)
    return _scale_blocks_(absmax, q.absmax2, DQ_BLOCKSIZE).add_(q.offset)


#: On the CPU, :func:`dequantize_nf4` makes its output in pieces of this many values (16 MiB
#: of float32, half the 32 MiB L3 cache of the machine the benchmarks ran on): each piece is
#: looked up, scaled and converted while it is still in the cache, so main memory sees the
#: output written once instead of read and written three times. Smaller pieces measured no
#: faster and cost one more round of Python and thread start-ups per piece.
CPU_CHUNK = 1 << 22


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4 -> tensor of ``q.shape`` in ``dtype`` (default: the original dtype).

    The fast path, bit for bit the values of :func:`dequantize_nf4_reference`:

    - one look-up per *byte* in a 256-entry table gives both of its values at once (each
      entry is the pair ``code[high], code[low]``, the same float32 numbers the readable
      path picks one at a time);
    - each block is then multiplied in place by its absmax: the same single float32
      product ``code * absmax`` per value, so the same rounding;
    - on the CPU the output is made in pieces of :data:`CPU_CHUNK` values that stay in the
      cache. The pieces cut only between blocks and each value goes through the same
      operations as in one piece, so the split cannot change a bit.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize_nf4: expected an NF4Tensor, got {type(q).__name__}")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    q.validate("dequantize_nf4")  # metadata only: a tampered tensor must not index out of range
    dtype = dtype or q.dtype
    n, bs = q.numel, q.blocksize
    table = _byte_table(q.device)
    absmax = _absmax_float_fast(q)  # (num_blocks,) float32
    total = 2 * q.packed.numel()  # n, plus one padding value when n is odd
    out = torch.empty(total, dtype=dtype, device=q.device)
    # Whole blocks per piece (blocksize and CPU_CHUNK are powers of two, so one divides the
    # other); off the CPU a single piece: a GPU gains nothing from the split.
    step = max(CPU_CHUNK, bs) if q.device.type == "cpu" else total
    # float32 values go straight into the output; bfloat16/float16 through a float32 buffer.
    buffer = out if dtype == torch.float32 else torch.empty(min(step, total), dtype=torch.float32,
                                                                  device=q.device)
    for start in range(0, total, step):
        stop = min(start + step, total)
        piece = out[start:stop] if dtype == torch.float32 else buffer[: stop - start]
        # int32 indices: index_select takes them, and they are half the size of int64.
        index = q.packed[start // 2: stop // 2].int()
        torch.index_select(table, 0, index, out=piece.view(torch.float64))
        _scale_blocks_(piece, absmax[start // bs:], bs)
        if dtype != torch.float32:  # rounds to nearest even, exactly as .to(dtype) does
            out[start:stop].copy_(piece)
    return out[:n].view(q.shape)
