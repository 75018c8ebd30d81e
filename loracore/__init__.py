"""loracore: LoRA, QLoRA, adapter merging and multi-adapter serving, built from scratch.

The modules are meant to be read in the order the course teaches them:
``models`` (base models), ``lora`` (the low-rank layer), ``adapters`` (files),
``train`` / ``data`` / ``evaluate``, ``nf4`` (4-bit quantization), ``qlora``, and
``optim`` (paged and 8-bit AdamW, on ``paging`` and ``quant8``).
"""

__version__ = "0.1.0"

import logging as _logging


class _NoKernelsHubNotice(_logging.Filter):
    """Drop the two lines that say bitsandbytes' optional CPU kernel was not fetched.

    On CPUs with AVX512-BF16, importing bitsandbytes (which PEFT does) asks the ``kernels``
    package for a faster 4-bit matmul from a kernel hub. Offline, ``kernels`` (a dependency of
    transformers since 5.25) first notes that it skips the hub's publisher check, then
    bitsandbytes notes that the download failed and falls back to its own kernel. The course
    runs offline by design, so both lines are noise a learner cannot act on; every other
    message of either logger still shows.
    """

    NOTICES = (
        "gemm_4bit_forward from kernels-community",  # bitsandbytes: the kernel was not fetched
        "publisher trust check for 'kernels-community/quantization-bitsandbytes'",  # kernels
    )

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


# A filter on a logger sees only the records logged to that very logger, so name both.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).addFilter(_NoKernelsHubNotice())
del _name
