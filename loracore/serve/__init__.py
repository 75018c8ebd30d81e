"""Serving many adapters on one base model (``python -m loracore.serve --help``), one idea per
module:

- :mod:`~loracore.serve.registry`: adapters loaded into slots of fixed rank, LRU beyond them;
- :mod:`~loracore.serve.batched`: one batch whose rows each use their own adapter;
- :mod:`~loracore.serve.decoder`: the forward pass over many requests, each with its own
  key/value cache, bit for bit independent of its batch-mates;
- :mod:`~loracore.serve.sampling`: a request's sampling parameters, and its next token from logits;
- :mod:`~loracore.serve.engine`: continuous batching, the scheduler that runs the decoder;
- :mod:`~loracore.serve.protocol`: the HTTP bodies the server accepts, and their rules;
- :mod:`~loracore.serve.server`: the OpenAI-compatible HTTP server (the ``serve`` extra).
"""

from loracore.serve.batched import apply_mixed_lora, batched_lora_delta, gather_factors, use_slots
from loracore.serve.engine import Engine, PromptTooLong, Request, SamplingParams, sample_token
from loracore.serve.registry import (AdapterError, AdapterInfo, AdapterRegistry, NoFreeSlot,
                                     UnknownAdapter)

__all__ = [
    "AdapterRegistry", "AdapterInfo", "AdapterError", "UnknownAdapter", "NoFreeSlot",
    "gather_factors", "batched_lora_delta", "apply_mixed_lora", "use_slots",
    "Engine", "Request", "SamplingParams", "PromptTooLong", "sample_token",
]
