"""Messages libraries print on import that are not about what pissa_rs does,
silenced around the imports pissa_rs itself triggers (and nowhere else)."""

from __future__ import annotations

import contextlib
import logging

# bitsandbytes (imported by PEFT and transformers) warns on CPUs with AVX-512 BF16
# that its optional `kernels` package for CPU 4-bit inference is missing.
_NOISE = {"bitsandbytes.backends.cpu.ops": ("kernels-community",)}


class _DropMatching(logging.Filter):
    def __init__(self, needles: tuple[str, ...]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


@contextlib.contextmanager
def quiet_library_noise():
    """Within the block, the known library noise above is not logged."""
    filters = [(logging.getLogger(name), _DropMatching(needles)) for name, needles in _NOISE.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
