"""Two known log lines about bitsandbytes' optional CPU kernel, silenced where they are emitted.

On a CPU with AVX-512 BF16, importing bitsandbytes (which peft does on import, and the 4-bit
methods do at their first trial) tries to fetch an optional CPU kernel,
``kernels-community/quantization-bitsandbytes``, from the Hugging Face hub through the ``kernels``
package (which transformers 5.25 installs). When that fails (no ``kernels``, no network, not in the
local cache, publisher not verifiable) the logger ``bitsandbytes.backends.cpu.ops`` warns "Failed to
load CPU gemm_4bit_forward from kernels-community: ... pip install kernels", and in offline mode
``kernels`` itself first warns "Skipping publisher trust check for
'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode".
bitsandbytes then falls back to its own CPU code, which is what peftbench measures anyway. Each
filter drops that one message on that one logger; every other message of both loggers still shows.
"""

from __future__ import annotations

import logging
import re

LOGGER = "bitsandbytes.backends.cpu.ops"
KNOWN = re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community: .*pip install kernels",
                   re.DOTALL)
KERNELS_LOGGER = "kernels._internals.hf_hub"
KERNELS_KNOWN = re.compile(r"^Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")


class KernelsNoticeFilter(logging.Filter):
    """Drops one known notice (bitsandbytes' optional-kernel one by default); passes everything else."""

    def __init__(self, known: re.Pattern = KNOWN) -> None:
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.known.match(record.getMessage())


def quiet_bitsandbytes() -> None:
    """Install the filters on the two loggers (once; before bitsandbytes is imported)."""
    for name, known in ((LOGGER, KNOWN), (KERNELS_LOGGER, KERNELS_KNOWN)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, KernelsNoticeFilter) for f in logger.filters):
            logger.addFilter(KernelsNoticeFilter(known))
