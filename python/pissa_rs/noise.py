"""Messages libraries print that are not about what pissa_rs does, silenced
around the library calls pissa_rs itself makes (and nowhere else)."""

from __future__ import annotations

import contextlib
import logging
import warnings

from .requirements import require_versions

# bitsandbytes (imported by PEFT and transformers) warns on CPUs with AVX-512 BF16
# that its optional `kernels` package for CPU 4-bit inference is missing.
_NOISE = {"bitsandbytes.backends.cpu.ops": ("kernels-community",)}
# Python warnings from the meta-device PEFT models planning builds: the adapter config
# names the output folder while the meta model came from the input's config (PEFT says
# it "was renamed"), and transformers' deprecation of a name PEFT still reads.
_WARNINGS = (
    (UserWarning, r"The PEFT config's `base_model_name_or_path` was renamed"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


class _DropMatching(logging.Filter):
    def __init__(self, needles: tuple[str, ...]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


@contextlib.contextmanager
def quiet_library_noise():
    """Within the block, the known library noise above is neither logged nor warned.
    (warnings.catch_warnings is process-wide: used only where no other thread runs.)
    Every import of transformers, PEFT and bitsandbytes goes through here: the first
    one checks their versions (requirements.py)."""
    require_versions()
    filters = [(logging.getLogger(name), _DropMatching(needles)) for name, needles in _NOISE.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            for category, message in _WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
