"""8-bit blockwise quantization, byte for byte as bitsandbytes does it: the ground floor of
the quantizers.

Two users: the 8-bit optimizer state of :mod:`loracore.optim` and NF4's double quantization
(the absmax constants, :mod:`loracore.nf4`). Both, and the 4-bit NF4 code itself, pick the
nearest entry of a code book with :func:`nearest_code_index`.

Adam keeps two numbers per parameter. 8-bit optimizers (Dettmers et al. 2021, arXiv 2110.02861)
store each as one byte: the state is cut into blocks of 256 values, each block is divided by its
largest magnitude (one float32 ``absmax`` per block) and every value becomes the index of the
nearest entry of a 256-value *dynamic* code, a tiny float format that is fine near 1 and coarse
near 0. The first moment can be negative and uses the signed code; the second moment never is,
so the unsigned code spends all 256 entries on ``[0, 1]``.

>>> q, absmax = quantize_blockwise(torch.tensor([0.5, -1.0]), dynamic_map(signed=True))
>>> absmax, dequantize_blockwise(q, absmax, dynamic_map(signed=True))
(tensor([1.]), tensor([ 0.5008, -0.9930]))

(The signed code's most negative value is -0.993, not -1: it has 1 but no -1.)

Bytes equal ``bitsandbytes.functional.quantize_blockwise(x, code=create_dynamic_map(signed),
blocksize=256)`` (checked in ``tests/test_optim.py``, and for NF4's absmax constants in
``tests/test_nf4.py``).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BLOCKSIZE", "nearest_code_index", "dynamic_map", "quantize_blockwise",
           "dequantize_blockwise"]

#: Elements per block, as bitsandbytes' 8-bit optimizers use since 0.44.
BLOCKSIZE = 256

#: bitsandbytes' CPU kernel does not search the 256 codes for every value: it first snaps the
#: scaled value to the nearest of 65,536 evenly spaced points on [-1, 1], then reads that
#: point's nearest code from a table. A value within 1/65535 of the midpoint of two codes can
#: therefore take the farther one, and 0 itself lands on the grid point just above 0. For
#: identical bytes we snap the same way.
_GRID_POINTS = 65536


def nearest_code_index(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ``code`` value for each element of ``x``; ties go to the lower code.

    x: any shape, float32, values in ``[-1, 1]``; code: ``(k,)`` sorted. Returns int32 of
    ``x``'s shape (half the memory traffic of int64 on a large weight). The decision
    boundaries are the float32 midpoints between neighbouring codes, and a value exactly on a
    midpoint takes the lower code (``bucketize``'s default, and what bitsandbytes does: this
    rule decides the bytes on ties).

    >>> nearest_code_index(torch.tensor([-0.9, 0.2, 0.25, 0.3]), torch.tensor([-1.0, 0.0, 0.5]))
    tensor([0, 1, 1, 2], dtype=torch.int32)
    """
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values = [torch.zeros(1), torch.ones(1)]
    for i in range(7):  # decades 1e-6 .. 1e0; finer (more bins) near 1
        bins = 2 ** i if signed else 2 ** (i + 1)  # the unsigned code needs no sign: twice the bins
        edges = torch.linspace(0.1, 1.0, bins + 1)
        magnitude = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        values += [magnitude, -magnitude] if signed else [magnitude]
    return torch.cat(values).sort().values


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code: ``(256,)`` sorted float32 values.

    Signed: 127 magnitudes and their negatives (1, 2, 4 .. 64 per decade from 1e-6 to 1), 0
    and 1, so it spans ``[-1, 1]``. Unsigned: 254 magnitudes (2, 4 .. 128 per decade), 0 and 1.
    """
    return _dynamic_map_cpu(bool(signed)).clone()


@functools.lru_cache(maxsize=8)
def _grid_table(code_bytes: bytes, device: torch.device) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    grid = -1.0 + (2.0 * torch.arange(_GRID_POINTS, dtype=torch.float32)) / (_GRID_POINTS - 1)
    return nearest_code_index(grid, code).to(torch.uint8).to(device)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE,
                       out: torch.Tensor | None = None, absmax_out: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, float) to indices into ``code: (256,)`` in blocks.

    Returns ``(q: x's shape, uint8, absmax: (ceil(numel / blocksize),) float32)``; ``out`` and
    ``absmax_out`` (same shapes) receive the results in place when given (a page view). A block
    of zeros keeps index 0 and absmax 0, which decodes to exactly 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)  # padding zeros never raise the max
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # a zero block: 0 * inf would be NaN
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    # (v + 1) / 2 * 65535 rounded half up: float32 steps in this order decide the grid point
    point = scaled.add_(1.0).mul_(0.5 * (_GRID_POINTS - 1)).add_(0.5).to(torch.int32)
    q = _grid_table(code.float().cpu().numpy().tobytes(), x.device)[point]
    q.masked_fill_((absmax == 0)[:, None], 0)
    q = q.reshape(-1)[:n].view(x.shape)
    if out is not None:
        out.copy_(q)
        q = out
    if absmax_out is not None:
        absmax_out.copy_(absmax)
        absmax = absmax_out
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``q`` (uint8, any shape) -> float32, same shape:
    ``code[q] * absmax`` of each element's block."""
    values = code.to(q.device)[q.reshape(-1).long()]
    n = values.numel()
    pad = -n % blocksize
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    return (values.view(-1, blocksize) * absmax[:, None]).reshape(-1)[:n].view(q.shape)
