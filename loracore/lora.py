"""LoRA in one import: the layer and the operations on a whole model.

The two ideas live in two modules, each readable in one sitting:

- :mod:`loracore.layer`: the math as pure functions (``scaling``, ``delta_weight``,
  ``lora_forward``) and :class:`LoRALinear`, a frozen linear layer with named adapters
  (``merge()``, ``unmerge()``, ``get_delta_weight()``, as in PEFT);
- :mod:`loracore.surgery`: :func:`inject` puts LoRA layers into a model, and
  ``set_adapter``, ``merge_adapters``, ``disable_adapters``, ``remove_lora``... act on all of
  them at once.

This module re-exports both, so ``from loracore.lora import inject, LoRALinear`` works.
LoRA+ parameter groups sit next to the training loop (:mod:`loracore.train`).
"""

from loracore.layer import (LoRALinear, delta_weight, is_float_linear, is_linear, lora_forward,
                            lora_update, register_linear_type, scaling)
from loracore.surgery import (delete_adapter, disable_adapters, inject, linear_layer_names,
                              lora_layers, merge_adapters, remove_lora, set_adapter,
                              trainable_parameters, unmerge_adapters)

__all__ = [
    "LoRALinear", "scaling", "delta_weight", "lora_update", "lora_forward",
    "register_linear_type", "is_linear", "is_float_linear",
    "inject", "lora_layers", "linear_layer_names", "trainable_parameters", "set_adapter",
    "disable_adapters", "merge_adapters", "unmerge_adapters", "delete_adapter", "remove_lora",
]
