"""The third-party messages the `loramix` command hides, each matched by its text and the module that emits it.

Every verb used to print two lines that say nothing about the user's run:

- bitsandbytes, on import on a CPU with AVX512-BF16, logs a warning that its optional `kernels` package is
  missing. That package only speeds up 4-bit matrix products on the CPU; bitsandbytes falls back to its own kernel
  and the results are the same.
- transformers' `is_gradient_checkpointing` property warns (FutureWarning) that it is deprecated; PEFT reads it
  in `get_peft_model` (building or training an expert), so the warning is about PEFT's code, not the user's.

Only those two are filtered, by message and module: any other warning from the same libraries still shows. The
filters are installed by the command line only; a Python user of the library keeps their own warning settings.
"""

from __future__ import annotations

import logging
import warnings

BITSANDBYTES_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community"
GRADIENT_CHECKPOINTING = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    """Drops the log records whose unformatted message starts with `prefix`; keeps every other record."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_warnings() -> None:
    """Install the two filters (see the module docstring); calling it again adds nothing."""
    logger = logging.getLogger(BITSANDBYTES_LOGGER)  # created now if bitsandbytes is not imported yet
    if not any(isinstance(f, _DropMessage) and f.prefix == BITSANDBYTES_KERNELS for f in logger.filters):
        logger.addFilter(_DropMessage(BITSANDBYTES_KERNELS))
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING, category=FutureWarning,
                            module=r"transformers\.modeling_utils")
