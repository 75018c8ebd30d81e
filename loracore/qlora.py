"""QLoRA: a frozen NF4 base model with LoRA adapters on top.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) fine-tunes a model whose base weights are
stored in 4 bits (:mod:`loracore.nf4`) while the LoRA matrices stay in 16 or 32 bits:

    y = x @ dequantize(W_nf4).T + scaling · (x @ A.T) @ B.T

Only ``A`` and ``B`` get gradients. The base weight is decoded on the fly, block by block
constants and all, in every forward pass and again in the backward pass (to pass the
gradient on to earlier layers), and never kept in full precision between the two.

Usage::

    model = quantize_model(model)                     # every nn.Linear but lm_head -> Linear4bit
    inject(model, "all-linear", r=16, lora_alpha=32)  # loracore.surgery, unchanged
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from loracore.layer import register_linear_type
from loracore.nf4 import NF4Tensor, check_blocksize, dequantize_nf4, quantize_nf4
from loracore.surgery import all_or_nothing, lora_layers
from loracore.surgery import replace_module as _swap  # a module-level name a test can make fail

__all__ = ["Linear4bit", "quantize_model", "model_bytes"]

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_compute_dtype(compute_dtype: object, where: str) -> None:
    """``compute_dtype`` must be a floating ``torch.dtype`` that NF4 decodes into."""
    if compute_dtype not in _COMPUTE_DTYPES or not isinstance(compute_dtype, torch.dtype):
        raise TypeError(f"{where}: compute_dtype must be torch.float32, torch.bfloat16 or "
                        f"torch.float16 (the dtype the 4-bit weight is decoded into), got "
                        f"{compute_dtype!r} ({type(compute_dtype).__name__})")


class _NF4Linear(torch.autograd.Function):
    """``x @ W.T`` for an NF4 ``W`` that saves only the packed weight for the backward pass.

    Plain ``F.linear(x, dequantize(W))`` would keep every layer's decoded full-precision
    weight alive until backward, which is the memory QLoRA exists to save. Here backward
    decodes the weight a second time instead (what bitsandbytes' ``MatMul4Bit`` does too).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.weight, ctx.dtype = weight, dtype
        return x @ dequantize_nf4(weight, dtype).T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_out @ dequantize_nf4(ctx.weight, ctx.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None  # the base weight is frozen: no gradient for it


@register_linear_type  # so inject() wraps it, and merge() refuses to add ΔW to packed codes
class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (``out_features x in_features``).

    Storage (buffers, so ``.to(device)`` and ``state_dict`` carry them): ``weight_packed``
    (uint8 codes), ``weight_absmax`` and, with double quantization, ``weight_absmax2`` and
    ``weight_offset``. ``weight`` returns them as a :class:`~loracore.nf4.NF4Tensor`;
    ``dequantize()`` decodes it. ``bias`` stays in full precision, frozen.

    forward: x ``(..., in_features)`` -> ``(..., out_features)``, computed in ``compute_dtype``
    and returned in ``x``'s dtype.
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None, *,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(weight, NF4Tensor) or len(weight.shape) != 2:
            raise TypeError(f"Linear4bit: weight must be a 2-D NF4Tensor (out, in), got {weight!r}")
        weight.validate("Linear4bit", check_values=True)
        _check_compute_dtype(compute_dtype, "Linear4bit")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"Linear4bit: bias of shape {tuple(bias.shape)} does not fit weight "
                             f"{tuple(weight.shape)}")
        self.blocksize = weight.blocksize
        self.original_dtype = weight.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_packed", weight.packed)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_absmax2", weight.absmax2)
        self.register_buffer("weight_offset", weight.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None,
                    quantizer: Callable[[torch.Tensor], NF4Tensor] | None = None) -> "Linear4bit":
        """Quantize ``linear.weight`` to NF4. ``compute_dtype`` defaults to the weight's dtype.

        ``quantizer``: your own function from the ``(out, in)`` weight to an :class:`NF4Tensor`
        (lab 03 passes the learner's), used instead of :func:`quantize_nf4`; ``blocksize`` and
        ``double_quant`` are then up to the quantizer. What it returns is checked."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if compute_dtype is not None:
            _check_compute_dtype(compute_dtype, "Linear4bit.from_linear")
        with torch.no_grad():
            w = linear.weight.detach()
            if quantizer is None:
                q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
            else:
                q = quantizer(w)
                _check_quantized(q, w)
        return cls(q, linear.bias, compute_dtype=compute_dtype or linear.weight.dtype)

    @property
    def weight(self) -> NF4Tensor:
        """The packed NF4 weight (not a ``torch.Tensor``; see :meth:`dequantize`)."""
        return NF4Tensor(self.weight_packed, self.weight_absmax,
                         torch.Size((self.out_features, self.in_features)), self.original_dtype,
                         self.blocksize, self.weight_offset, self.weight_absmax2)

    def dequantize(self) -> torch.Tensor:
        """The decoded weight, ``(out_features, in_features)`` in ``compute_dtype``."""
        return dequantize_nf4(self.weight, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear4bit: input of shape {tuple(x.shape)} does not end in "
                             f"in_features={self.in_features}")
        out = _NF4Linear.apply(x.to(self.compute_dtype), self.weight, self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) casts every float buffer; the block constants must stay
        # float32 or dequantization would drift from what was quantized. Keep their dtype.
        keep = {n: getattr(self, n) for n in ("weight_absmax", "weight_absmax2", "weight_offset")
                if getattr(self, n) is not None and getattr(self, n).is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def extra_repr(self) -> str:
        q = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={q.double_quant}, compute_dtype={self.compute_dtype}, "
                f"{q.bits_per_param:.3f} bits/param")


def _check_quantized(q: object, w: torch.Tensor) -> None:
    """What a custom quantizer returned must describe ``w``: an NF4Tensor of its shape, with
    one packed byte per two values. The rest (constants per block, dtypes) is checked by
    ``NF4Tensor.validate`` when :class:`Linear4bit` is built from it."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"the quantizer returned {type(q).__name__}, not a loracore.nf4.NF4Tensor")
    if tuple(q.shape) != tuple(w.shape):
        raise ValueError(f"the quantizer's NF4Tensor has shape {tuple(q.shape)}; the weight is "
                         f"{tuple(w.shape)}")
    need = -(-w.numel() // 2)
    if q.packed.dtype != torch.uint8 or q.packed.numel() != need:
        raise ValueError(f"the quantizer's packed codes are {q.packed.numel()} {q.packed.dtype} "
                         f"values; {w.numel()} weights need {need} uint8 bytes")


def _skip_names(skip: object) -> set[str]:
    """``skip`` as a set of names: one string is one name (not a set of characters)."""
    if isinstance(skip, str):
        return {skip}
    try:
        names = list(skip)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"quantize_model: skip must be a layer name or a list of names, got "
                        f"{type(skip).__name__}") from None
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"quantize_model: skip holds {bad[0]!r}; every entry must be a non-empty "
                        f"layer name such as 'lm_head'")
    return set(names)


_DEFAULT_SKIP = ("lm_head",)


def quantize_model(model: nn.Module, skip: str | Iterable[str] = _DEFAULT_SKIP, *, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   quantizer: Callable[[torch.Tensor], NF4Tensor] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`Linear4bit`, in place.

    ``skip``: layer names kept as they are: a name matches a module's last name part (e.g.
    ``"lm_head"``) or its full name (``"model.layers.0.mlp.down_proj"``); one string is one
    name. The output head stays in full precision as in QLoRA (and is tied to the embeddings
    in many small models). Quantize *before* adding LoRA: a model that already has LoRA
    layers is refused. Returns ``model``.

    All or nothing: every target is checked first (float32/bfloat16/float16, 2-D, finite),
    and every layer is quantized before the first one is swapped in; if anything still fails,
    the model is put back exactly as it was (same modules, weights and ``requires_grad``).
    The price: at the peak the original layers and their 4-bit copies (about 4.1/16 of a
    bfloat16 layer's bytes) are held together, where swapping one by one held one layer's.

    ``quantizer``: a function ``(out, in) weight -> NF4Tensor`` to use instead of loracore's
    (see :meth:`Linear4bit.from_linear`); what it returns is checked layer by layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: expected an nn.Module, got {type(model).__name__}")
    if lora_layers(model):
        raise ValueError(f"quantize_model: {type(model).__name__} already has LoRA layers; "
                         f"quantize the base model first, then inject() the adapters")
    names = _skip_names(skip)
    check_blocksize(blocksize, "quantize_model")
    if not isinstance(double_quant, bool):
        raise TypeError(f"quantize_model: double_quant must be True or False, got {double_quant!r}")
    if compute_dtype is not None:
        _check_compute_dtype(compute_dtype, "quantize_model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    explicit = skip is not _DEFAULT_SKIP  # the default may name no layer (a model without a head)
    unknown = sorted(n for n in names if n not in linears
                     and not any(full.split(".")[-1] == n for full in linears))
    if explicit and unknown:
        raise ValueError(f"quantize_model: skip names {unknown}, which match no nn.Linear of "
                         f"{type(model).__name__} (by last name part or full name); "
                         f"check the spelling, e.g. {sorted({k.split('.')[-1] for k in linears})[:8]}")
    targets = [name for name in linears
               if name.split(".")[-1] not in names and name not in names]
    if not targets:
        raise ValueError(f"quantize_model: {type(model).__name__} has no nn.Linear outside "
                         f"skip={sorted(names)}")
    for name in targets:  # check every target before touching any
        w = linears[name].weight
        if w.dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"quantize_model: layer '{name}' has weight dtype {w.dtype}; NF4 "
                            f"quantizes float32, bfloat16 or float16 (model.float() first)")
        if w.dim() != 2 or w.numel() == 0:
            raise ValueError(f"quantize_model: layer '{name}' has weight of shape "
                             f"{tuple(w.shape)}; expected a non-empty (out, in) matrix")
        if not bool(torch.isfinite(w).all()):
            count = int((~torch.isfinite(w)).sum())
            raise ValueError(f"quantize_model: layer '{name}' has {count} non-finite weight(s) "
                             f"(NaN or inf); nothing was quantized. Fix or reload that layer first")
    # Quantize everything first (the model is untouched until every layer has succeeded).
    new: dict[str, Linear4bit] = {}
    for name in targets:
        try:
            new[name] = Linear4bit.from_linear(linears[name], blocksize=blocksize,
                                               double_quant=double_quant, compute_dtype=compute_dtype,
                                               quantizer=quantizer)
        except Exception as exc:
            msg = f"quantize_model: layer '{name}': {exc}; nothing was quantized"
            try:
                wrapped = type(exc)(msg)
            except Exception:  # an exception type that takes other arguments
                wrapped = RuntimeError(msg)
            raise wrapped from exc
    with all_or_nothing(model):  # a failure half-way puts the original layers back
        for name in targets:
            _swap(model, name, new[name])
        for p in model.parameters():  # the base is frozen; LoRA adds the only trainable weights
            p.requires_grad_(False)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers, counting tied tensors once.

    For a quantized model this is the real footprint: packed codes and block constants.
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
