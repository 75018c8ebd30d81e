"""Serving many adapters on one base model: the registry, mixed-adapter batches, continuous
batching and an OpenAI-compatible HTTP server (``python -m loracore.serve --help``)."""

from loracore.serve.batched import apply_mixed_lora, batched_lora_delta, gather_factors, use_slots
from loracore.serve.engine import Engine, PromptTooLong, Request, SamplingParams, sample_token
from loracore.serve.registry import (AdapterError, AdapterInfo, AdapterRegistry, NoFreeSlot,
                                     UnknownAdapter)

__all__ = [
    "AdapterRegistry", "AdapterInfo", "AdapterError", "UnknownAdapter", "NoFreeSlot",
    "gather_factors", "batched_lora_delta", "apply_mixed_lora", "use_slots",
    "Engine", "Request", "SamplingParams", "PromptTooLong", "sample_token",
]
