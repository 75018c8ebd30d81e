"""The forward pass the serving engine runs: a Llama/Qwen2 decoder over many requests' new
tokens at once, each request with its own key/value cache and its own adapter slot.

It calls the model's own modules (embeddings, norms, projections, MLP, ``lm_head``), so LoRA
hooks and weights are the model's; only the order of operations is written out here, so that a
request's tokens never depend on its batch-mates, exactly (not only up to rounding):

- attention runs per request over its own :class:`KVCache`, so no padding or mask ever enters it;
- every row-wise operation (linear layers, norms, activations) runs in chunks of exactly
  :data:`CHUNK` rows, padded. On a CPU, a matrix product's rounding can change with the number
  of rows (BLAS picks kernels by shape), so a row's bits would otherwise depend on how many
  requests are running. With fixed shapes they cannot;
- rotary embeddings are computed once for every position and looked up.

Written for Llama/Qwen2-style models (SmolLM2, Qwen2, the tiny test model). The scheduler that
decides which requests run is :mod:`loracore.serve.engine`; this module knows nothing of it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loracore.serve.batched import use_slots

__all__ = ["Decoder", "KVCache", "CHUNK"]

CHUNK = 16  # rows per row-wise matmul; fixed so a row's rounding never depends on the batch

#: ``rowwise(fn, x, slots)``: ``fn`` applied to ``x: (T, d)`` with row ``i`` under adapter slot
#: ``slots[i]`` -> ``(T, d_out)``.
RowWise = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


class KVCache:
    """One request's keys and values, one tensor per layer: ``(kv_heads, length, head_dim)``."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        """Tokens cached so far (the position of the next token)."""
        return self.keys[0].shape[1] if self.keys else 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' ``k``, ``v: (kv_heads, n, head_dim)`` to ``layer`` (layers are
        filled in order, 0 first) and return that layer's whole cache ``(kv_heads, length, head_dim)``."""
        if len(self.keys) <= layer:
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=1)
            self.values[layer] = torch.cat([self.values[layer], v], dim=1)
        return self.keys[layer], self.values[layer]


class Decoder:
    """The decoder of ``model`` (a Llama/Qwen2-style causal LM), run request by request.

    Works where the model is (:attr:`device`, :attr:`dtype`: the CPU or a GPU, float32 or
    16-bit): every tensor it makes is created there, the caches hold the model's dtype, and
    the logits it returns are float32. Raises ``TypeError`` for any other architecture, or for
    sliding-window attention.
    """

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "q_proj"):
            raise TypeError(f"Engine: {type(model).__name__} is not a Llama/Qwen2-style causal LM "
                            f"(model.model.layers[i].self_attn.q_proj); the serving loop supports those only")
        if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", False):
            raise TypeError("Engine: sliding-window attention is not supported")
        self.model = model
        self.max_model_len = int(model.config.max_position_embeddings)
        # every tensor the pass makes lives where the weights do; the key/value caches take the
        # dtype of the projections that fill them, which is the model's
        weight = inner.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        with torch.no_grad():  # rotary cos/sin for every position, once (see the module docstring)
            pos = torch.arange(self.max_model_len, device=self.device).unsqueeze(0)
            probe = torch.zeros(1, 1, model.config.hidden_size, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, pos)
            self._cos, self._sin = cos[0], sin[0]                   # (max_len, head_dim)

    def prefill(self, ids: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        """One new request's prompt ``ids: (n,)``, alone, under adapter ``slot`` (-1: the base),
        into an empty ``cache``. Returns the logits of the next token ``(vocab,)``, float32, on
        the model's device."""
        ids = ids.to(self.device)
        n = ids.numel()
        slots = torch.tensor([slot], device=self.device)

        def whole(fn, x, _slots):  # the whole prompt as one row: (1, n, d)
            with use_slots(slots):
                return fn(x.unsqueeze(0)).squeeze(0)

        hidden = self._layers_forward(ids, torch.arange(n, device=self.device), [cache], [(0, n)],
                                      slots, whole)
        return whole(self.model.lm_head, hidden[-1:], slots)[0].float()

    def decode(self, ids: torch.Tensor, caches: list[KVCache], slots: torch.Tensor) -> torch.Tensor:
        """One token per request: ``ids: (B,)``, request ``i`` with ``caches[i]`` and adapter
        ``slots[i]``. Returns the logits ``(B, vocab)``, float32, on the model's device."""
        ids, slots = ids.to(self.device), slots.to(self.device)
        positions = torch.tensor([c.length for c in caches], device=self.device)
        hidden = self._layers_forward(ids, positions, caches, [(i, i + 1) for i in range(len(caches))],
                                      slots, _rowwise)
        return _rowwise(self.model.lm_head, hidden, slots).float()

    def _layers_forward(self, ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache],
                        spans: list[tuple[int, int]], slots: torch.Tensor, rowwise: RowWise) -> torch.Tensor:
        """The decoder over ``ids: (T,)`` tokens; ``spans[i]`` is request i's token range.
        Returns the final hidden states ``(T, hidden)``."""
        inner = self.model.model
        x = inner.embed_tokens(ids)                                   # (T, hidden)
        cos, sin = self._cos[positions], self._sin[positions]          # (T, head_dim)
        for li, layer in enumerate(inner.layers):
            attn = layer.self_attn
            hd = attn.head_dim
            h = rowwise(layer.input_layernorm, x, slots)
            q = rowwise(attn.q_proj, h, slots).view(-1, attn.config.num_attention_heads, hd)
            k = rowwise(attn.k_proj, h, slots).view(-1, attn.config.num_key_value_heads, hd)
            v = rowwise(attn.v_proj, h, slots).view(-1, attn.config.num_key_value_heads, hd)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            a = torch.cat([_attend(attn, q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                   v[s:e].transpose(0, 1), cache, li, causal=e - s > 1)
                           for cache, (s, e) in zip(caches, spans)])
            x = x + rowwise(attn.o_proj, a, slots)
            h = rowwise(layer.post_attention_layernorm, x, slots)
            mlp = layer.mlp
            gate = rowwise(mlp.gate_proj, h, slots)
            up = rowwise(mlp.up_proj, h, slots)
            act = rowwise(lambda t: mlp.act_fn(t), gate, slots)
            x = x + rowwise(mlp.down_proj, act * up, slots)
        return rowwise(inner.norm, x, slots)


def _rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             slots: torch.Tensor) -> torch.Tensor:
    """``fn`` on ``x: (T, d)`` in chunks of exactly CHUNK rows -> ``(T, d_out)``."""
    T = x.shape[0]
    pad = (-T) % CHUNK
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        slots = torch.cat([slots, slots.new_full((pad,), -1)])
    outs = []
    for i in range(0, T + pad, CHUNK):
        with use_slots(slots[i:i + CHUNK]):
            outs.append(fn(x[i:i + CHUNK].unsqueeze(1)).squeeze(1))
    return torch.cat(outs)[:T]


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cache: KVCache, layer: int, causal: bool) -> torch.Tensor:
    """One request's attention. q: ``(heads, n, d)``, k/v: ``(kv_heads, n, d)`` (the new
    tokens, already rotated) -> ``(n, heads * d)``. Appends k/v to the request's cache."""
    K, V = cache.append(layer, k, v)
    out = F.scaled_dot_product_attention(q.unsqueeze(0), K.unsqueeze(0), V.unsqueeze(0),
                                         is_causal=causal, scale=attn.scaling, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[1], -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (the Llama/Qwen2 "rotate half" form). x: ``(T, heads, d)``,
    cos/sin: ``(T, d)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
