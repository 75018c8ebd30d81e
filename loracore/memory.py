"""Training memory by arithmetic: weights, gradients, master copy and optimizer state, in bytes.

One function, :func:`training_memory`, that lessons 03, 07 and 11 all call, so that the same
setup gives the same number everywhere. It counts every tensor of a model from its config
(:class:`ModelShape`), not from a rounded "7B", and charges each one what it costs:

=====================  ==========================  =======================  ====================
what is stored         full fine-tuning            LoRA                     QLoRA
=====================  ==========================  =======================  ====================
base weights           ``weight_bytes`` (bf16: 2)  ``weight_bytes``         NF4 + double quant.
                                                                            (about 0.516) for the
                                                                            blocks' linear layers,
                                                                            ``weight_bytes`` else
trained weights        (the base weights)          adapters, float32: 4     adapters, float32: 4
gradients              ``weight_bytes``            adapters only: 4         adapters only: 4
float32 master copy    4 (when weights < 4 bytes)  none (adapters are fp32) none
AdamW state            8 (two float32 moments)     adapters only: 8         adapters only: 8
=====================  ==========================  =======================  ====================

So a trained parameter costs 16 bytes either way (2 + 2 + 4 + 8 for mixed-precision full
fine-tuning, as in the ZeRO paper, Rajbhandari et al. 2020; 4 + 4 + 8 for a float32 adapter on a
bf16 base, which is what :class:`loracore.layer.LoRALinear` and PEFT keep), and a frozen one costs
its storage only. ``optimizer="adamw8bit"`` stores both moments in 8 bits, blockwise, with one
float32 absmax per 256 values (:mod:`loracore.optim`, ``state_bits=8``); tensors under
:data:`loracore.optim.MIN_8BIT_SIZE` values keep float32 state, as in bitsandbytes. Paging moves
that state between memories; it does not change its size, so it is not a separate option here.

Left out, and said so wherever a figure is shown: activations (they grow with batch size and
sequence length, and gradient checkpointing trades them for recomputation), the CUDA context,
temporary buffers, allocator fragmentation, and under FSDP the one layer gathered at a time.

**Units.** Everything is in bytes; :data:`GB` is 10**9 bytes (decimal, as disk and most GPU
spec sheets write it; a GiB is 2**30 = 1.074 GB). An "80 GB" GPU holds about 80 GiB, about 85 GB:
comparing these figures with a card's name errs on the safe side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

from loracore.nf4 import DQ_BLOCKSIZE
from loracore.optim import MIN_8BIT_SIZE
from loracore.quant8 import BLOCKSIZE as ADAM8_BLOCKSIZE

GB = 10**9  #: one decimal gigabyte, the unit of every figure the lessons print
NF4_BLOCKSIZE = 64  #: QLoRA's block of weights per absmax (``quantize_nf4``'s default)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer of the LLaMA family (LLaMA, Mistral, Qwen2, SmolLM2) by its
    config, with Hugging Face's field names. Each block: attention (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, grouped-query: ``num_key_value_heads`` key/value heads), a gated MLP
    (``gate_proj``, ``up_proj``: ``(intermediate_size, hidden_size)``; ``down_proj``) and two
    RMSNorm weights; then a final norm and the output head (shared with the embedding when
    ``tie_word_embeddings``). ``qkv_bias``: Qwen2's biases on q, k and v."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        sizes = {k: getattr(self, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads")}
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or v <= 0]
        if bad:
            raise ValueError(f"loracore.memory.ModelShape {self.name!r}: sizes must be positive "
                             f"integers, got {', '.join(bad)}")
        if self.hidden_size % self.num_attention_heads or \
                self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"loracore.memory.ModelShape {self.name!r}: hidden_size "
                             f"{self.hidden_size} must split into {self.num_attention_heads} heads, "
                             f"and those into {self.num_key_value_heads} key/value groups")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of each linear layer of one block, as ``nn.Linear``
        stores its weight. Example, Llama-2-7B: ``q_proj (4096, 4096)``, ``gate_proj (11008, 4096)``."""
        h, i = self.hidden_size, self.intermediate_size
        kv = self.num_key_value_heads * (h // self.num_attention_heads)
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def tensors(self) -> list[tuple[str, int, int]]:
        """Every parameter tensor as ``(name, numel, copies)``: a block's tensors once with
        ``copies = num_hidden_layers``. The blocks' linear weights are named as in
        :meth:`linear_shapes` (what QLoRA quantizes and LoRA may target)."""
        layers, h = self.num_hidden_layers, self.hidden_size
        found = [("embed_tokens", self.vocab_size * h, 1)]
        found += [(n, o * i, layers) for n, (o, i) in self.linear_shapes().items()]
        if self.qkv_bias:
            found += [(n + ".bias", self.linear_shapes()[n][0], layers)
                      for n in ("q_proj", "k_proj", "v_proj")]
        found += [("input_layernorm", h, layers), ("post_attention_layernorm", h, layers),
                  ("norm", h, 1)]
        if not self.tie_word_embeddings:
            found.append(("lm_head", self.vocab_size * h, 1))
        return found

    @property
    def num_parameters(self) -> int:
        """All parameters, a tied head counted once (what ``model.num_parameters()`` says)."""
        return sum(n * copies for _, n, copies in self.tensors())


# Configs as published with each model (its config.json on the Hugging Face hub).
SMOLLM2_135M = ModelShape("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, tie_word_embeddings=True)
QWEN2_0_5B = ModelShape("Qwen2-0.5B", 151936, 896, 4864, 24, 14, 2, tie_word_embeddings=True,
                        qkv_bias=True)
LLAMA_2_7B = ModelShape("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32)
LLAMA_2_70B = ModelShape("Llama-2-70B", 32000, 8192, 28672, 80, 64, 8)
LLAMA_3_1_405B = ModelShape("Llama-3.1-405B", 128256, 16384, 53248, 126, 128, 8)
PRESETS = {s.name: s for s in (SMOLLM2_135M, QWEN2_0_5B, LLAMA_2_7B, LLAMA_2_70B, LLAMA_3_1_405B)}


def _targets(shape: ModelShape, target_modules: str | Iterable[str]) -> list[str]:
    if target_modules == "all-linear":  # as PEFT: every linear layer of the blocks, not the head
        return list(PROJECTIONS)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown or not names:
        raise ValueError(f"loracore.memory: target_modules {names!r} for {shape.name}: use "
                         f"'all-linear' or names from {list(PROJECTIONS)}")
    return [n for n in PROJECTIONS if n in names]


def lora_tensors(shape: ModelShape, r: int, target_modules: str | Iterable[str] = "all-linear"
                 ) -> list[tuple[str, int, int]]:
    """The adapter's tensors as ``(name, numel, copies)``: ``lora_A (r, in_features)`` and
    ``lora_B (out_features, r)`` of each targeted projection, in every block."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"loracore.memory: r must be a positive integer, got {r!r}")
    shapes = shape.linear_shapes()
    return [t for n in _targets(shape, target_modules)
            for t in ((f"{n}.lora_A", r * shapes[n][1], shape.num_hidden_layers),
                      (f"{n}.lora_B", shapes[n][0] * r, shape.num_hidden_layers))]


def lora_parameters(shape: ModelShape, r: int, target_modules: str | Iterable[str] = "all-linear"
                    ) -> int:
    """Trainable parameters of LoRA: ``r * (in_features + out_features)`` per targeted layer.
    Example: Llama-2-7B, r = 16 on q and v: 32 blocks * 2 * 16 * (4096 + 4096) = 8,388,608."""
    return sum(n * copies for _, n, copies in lora_tensors(shape, r, target_modules))


def nf4_bytes(numel: int) -> int:
    """Bytes of one tensor in NF4 with double quantization, as ``quantize_nf4(w).nbytes``: two
    codes per byte, one 8-bit absmax per 64 weights, one float32 scale per 256 absmax, and one
    float32 offset. About 4.127 bits per weight (QLoRA's figure)."""
    blocks = -(-numel // NF4_BLOCKSIZE)
    return -(-numel // 2) + blocks + 4 * -(-blocks // DQ_BLOCKSIZE) + 4


def adam_state_bytes(numel: int, optimizer: str = "adamw") -> int:
    """Bytes of AdamW's two moments for one tensor: float32 (8 per value), or with ``adamw8bit``
    one byte per value plus a float32 absmax per 256 values, for each moment (about 2.03 per
    value), unless the tensor is smaller than ``MIN_8BIT_SIZE``."""
    if optimizer == "adamw" or numel < MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * (numel + 4 * -(-numel // ADAM8_BLOCKSIZE))


@dataclass(frozen=True)
class TrainingMemory:
    """What :func:`training_memory` returns: bytes **per GPU** of each part (floats, because
    sharding divides), and the parameter counts behind them."""

    model: str
    method: str
    optimizer: str
    n_gpus: int
    sharded: bool
    parameters: int        # of the base model
    trainable: int         # what the optimizer updates: every parameter, or the adapter's
    weights: float         # base (and adapter) weights as stored
    gradients: float
    master_weights: float  # float32 copy of weights stored in fewer than 4 bytes
    optimizer_state: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.master_weights + self.optimizer_state

    def gb(self) -> dict[str, float]:
        """Each part and the total in GB (10**9 bytes)."""
        parts = ("weights", "gradients", "master_weights", "optimizer_state", "total")
        return {k: getattr(self, k) / GB for k in parts}

    def __str__(self) -> str:
        where = (f"{self.n_gpus} GPUs, {'FSDP' if self.sharded else 'DDP'}" if self.n_gpus > 1
                 else "1 GPU")
        g = self.gb()
        return (f"{self.model}, {self.method}, {self.optimizer}, {where}: weights "
                f"{g['weights']:,.1f} + gradients {g['gradients']:,.1f} + master copy "
                f"{g['master_weights']:,.1f} + optimizer {g['optimizer_state']:,.1f} = "
                f"{g['total']:,.1f} GB per GPU")


def training_memory(shape: ModelShape, method: Literal["full", "lora", "qlora"] = "full", *,
                    r: int = 16, target_modules: str | Iterable[str] = "all-linear",
                    weight_bytes: int = 2, adapter_bytes: int = 4, master_weights: bool = True,
                    optimizer: Literal["adamw", "adamw8bit"] = "adamw", n_gpus: int = 1,
                    sharded: bool = False) -> TrainingMemory:
    """Memory per GPU to train ``shape`` with AdamW, activations left out (module docstring).

    Args:
        shape: the model, e.g. :data:`LLAMA_2_7B`.
        method: ``"full"`` (every parameter trained), ``"lora"`` (frozen base in
            ``weight_bytes``), ``"qlora"`` (the blocks' linear weights frozen in NF4).
        r, target_modules: the adapter (LoRA and QLoRA); ``"all-linear"`` as in PEFT.
        weight_bytes: bytes of a stored base weight (bf16: 2; float32: 4).
        adapter_bytes: bytes of an adapter weight and its gradient (float32: 4).
        master_weights: keep a float32 copy of trained weights stored in fewer than 4 bytes.
        optimizer: ``"adamw"`` (float32 moments) or ``"adamw8bit"``.
        n_gpus, sharded: data parallel over ``n_gpus``; DDP (``sharded=False``) keeps a full copy
            on each GPU, FSDP (full sharding) gives each 1/n of every part.

    Example: ``training_memory(LLAMA_2_7B).total / GB`` is 107.8 (16 bytes for each of
    6,738,415,616 parameters); ``training_memory(LLAMA_2_7B, "lora").total / GB`` is 14.1.
    """
    if method not in METHODS:
        raise ValueError(f"loracore.memory: method must be one of {METHODS}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"loracore.memory: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    for name, value in (("weight_bytes", weight_bytes), ("adapter_bytes", adapter_bytes),
                        ("n_gpus", n_gpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"loracore.memory: {name} must be a positive integer, got {value!r}")

    base = shape.tensors()
    if method == "full":
        trained, trained_bytes = base, weight_bytes
        weights = shape.num_parameters * weight_bytes
    else:
        trained, trained_bytes = lora_tensors(shape, r, target_modules), adapter_bytes
        quantized = set(PROJECTIONS) if method == "qlora" else set()
        weights = sum((nf4_bytes(n) if name in quantized else n * weight_bytes) * copies
                      for name, n, copies in base)
        weights += sum(n * copies for _, n, copies in trained) * adapter_bytes
    trainable = sum(n * copies for _, n, copies in trained)
    master = 4 * trainable if master_weights and trained_bytes < 4 else 0
    state = sum(adam_state_bytes(n, optimizer) * copies for _, n, copies in trained)
    split = n_gpus if sharded else 1
    return TrainingMemory(shape.name, method, optimizer, n_gpus, sharded, shape.num_parameters,
                          trainable, weights / split, trainable * trained_bytes / split,
                          master / split, state / split)


def format_gb(nbytes: float, digits: int = 1) -> str:
    """``nbytes`` in GB (10**9 bytes) with thousands separators: ``format_gb(1.1039e12, 0)`` is
    ``'1,104 GB'``."""
    if not math.isfinite(nbytes):
        raise ValueError(f"loracore.memory.format_gb: {nbytes!r} is not a number of bytes")
    return f"{nbytes / GB:,.{digits}f} GB"
