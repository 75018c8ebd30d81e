"""One offline notice silenced: bitsandbytes' optional CPU kernel was not fetched.

Installed by ``import loracore`` (tests/test_env.py checks both lines are dropped and every
other message of either logger still shows).
"""

from __future__ import annotations

import logging

__all__ = ["install"]


class _NoKernelsHubNotice(logging.Filter):
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

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


#: A filter on a logger sees only the records logged to that very logger, so name both.
LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def install() -> None:
    """Add the filter to both loggers, once (a second call changes nothing)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoKernelsHubNotice) for f in logger.filters):
            logger.addFilter(_NoKernelsHubNotice())
