"""loracore: LoRA, QLoRA, adapter merging and multi-adapter serving, built from scratch.

The modules are meant to be read in the order the course teaches them:
``models`` (base models), ``lora`` (the low-rank layer), ``adapters`` (files),
``train`` / ``data`` / ``evaluate``, ``nf4`` (4-bit quantization), ``qlora``, and
``optim`` (paged and 8-bit AdamW, on ``paging`` and ``quant8``).
"""

__version__ = "0.1.0"
