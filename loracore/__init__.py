"""loracore: LoRA, QLoRA, adapter merging and multi-adapter serving, built from scratch.

The modules are meant to be read in the order the course teaches them:
``models`` (base models), ``lora`` (the low-rank layer), ``adapters`` (files),
``train`` / ``data`` / ``evaluate``, ``nf4`` (4-bit quantization), ``qlora``, and
``optim`` (paged and 8-bit AdamW, on ``paging`` and ``quant8``).
"""

__version__ = "0.1.0"

import logging as _logging


class _NoKernelsHubNotice(_logging.Filter):
    """Drop bitsandbytes' notice that its optional CPU kernel could not be fetched.

    On CPUs with AVX512-BF16, importing bitsandbytes (which PEFT does) tries to download a
    faster 4-bit matmul from a kernel hub and logs a warning when that fails. The course runs
    offline by design and bitsandbytes falls back to its own kernel, so the line is noise a
    learner cannot act on; every other bitsandbytes message still shows.
    """

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNotice())
