"""One known bitsandbytes log line, silenced where it is emitted.

On a CPU with AVX-512 BF16, importing bitsandbytes (which peft does on import, and the 4-bit
methods do at their first trial) tries to fetch an optional CPU kernel from the Hugging Face hub
through the ``kernels`` package; without it, the logger ``bitsandbytes.backends.cpu.ops`` warns
"Failed to load CPU gemm_4bit_forward from kernels-community: ... pip install kernels" and
bitsandbytes falls back to its own CPU code, which is what peftbench measures anyway. The filter
drops that one message on that one logger; every other bitsandbytes message still shows.
"""

from __future__ import annotations

import logging
import re

LOGGER = "bitsandbytes.backends.cpu.ops"
KNOWN = re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community: .*pip install kernels",
                   re.DOTALL)


class KernelsNoticeFilter(logging.Filter):
    """Drops the optional-kernel notice; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not KNOWN.match(record.getMessage())


def quiet_bitsandbytes() -> None:
    """Install the filter on bitsandbytes' CPU-ops logger (once; before bitsandbytes is imported)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, KernelsNoticeFilter) for f in logger.filters):
        logger.addFilter(KernelsNoticeFilter())
