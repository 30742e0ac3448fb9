"""The oldest versions of the libraries pissa_rs calls into that it works with (the
floors pyproject.toml declares and CI's floor stage tests), checked on first use so
that an older library installed in a user's environment gives one clear line, not
an AttributeError from deep inside it."""

from __future__ import annotations

import functools
import re

# Keep in step with pyproject.toml's dependencies (a test compares them).
FLOORS = {
    "torch": "2.6",
    # Bisected with the floor tests: transformers 5.0 fails the MoE expert conversion
    # (WeightRenaming.convert's signature), 5.12 cannot load a DeepSeek-V3 adapter on its
    # routers; PEFT 0.19 has no expert expansion.
    "transformers": "5.13",
    "peft": "0.20",
    "bitsandbytes": "0.46.1",  # transformers 5's 4-bit loading calls into it
    "huggingface_hub": "1.3",
    "numpy": "1.26",
    "tqdm": "4.66",
}
# The first versions pissa_rs is not yet tested with (pyproject.toml caps them). PEFT's minor
# releases move what pissa_rs builds on (0.22 adapts Qwen2-MoE-style experts under all-linear and
# rewrites fused experts' rank_pattern at load), so a new one is ported before it is allowed.
# Warned about, not refused: PEFT's own layout check still refuses an adapter it would load otherwise.
CEILINGS = {"peft": "0.23"}
# Missing is fine for these: pissa_rs works without them (the reference quantizer).
OPTIONAL = ("bitsandbytes",)


class DependencyVersionError(ImportError):
    """An installed library is older than pissa_rs needs."""


def _release(text: str) -> tuple[int, ...]:
    """'2.6.0+cu124' -> (2, 6, 0); '0.19.1.dev0' -> (0, 19, 1)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0].split("dev")[0])[:3])


def too_old(package: str, installed: str) -> bool:
    return _release(installed) < _release(FLOORS[package])


def require_feature(package: str, floor: str, what: str) -> None:
    """Raise DependencyVersionError when `what` needs a newer `package` than the declared floor
    (a feature that raises no floor for everyone else, e.g. PEFT 0.21's MiCA)."""
    from importlib.metadata import version

    installed = version(package)
    if _release(installed) < _release(floor):
        raise DependencyVersionError(f'{what} needs {package} >= {floor} (found {installed}): '
                                     f'pip install -U "{package}>={floor}"')


@functools.cache
def require_versions() -> None:
    """Raise DependencyVersionError naming the first library older than its floor, with
    the pip command that fixes it. Reads installed metadata only: imports nothing."""
    from importlib.metadata import PackageNotFoundError, version

    for package in FLOORS:
        try:
            installed = version(package)
        except PackageNotFoundError:
            if package in OPTIONAL:
                continue
            raise DependencyVersionError(f'pissa_rs needs {package} >= {FLOORS[package]} (not installed): '
                                         f'pip install "{package}>={FLOORS[package]}"') from None
        if too_old(package, installed):
            raise DependencyVersionError(f'pissa_rs needs {package} >= {FLOORS[package]} (found {installed}): '
                                         f'pip install -U "{package}>={FLOORS[package]}"')
        if package in CEILINGS and _release(installed) >= _release(CEILINGS[package]):
            import warnings

            warnings.warn(f'pissa_rs is not yet tested with {package} {installed} (>= {CEILINGS[package]}): '
                          f'pip install "{package}>={FLOORS[package]},<{CEILINGS[package]}"', stacklevel=2)
