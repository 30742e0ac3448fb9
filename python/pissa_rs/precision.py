"""IEEE float32 matrix products for pissa_rs's math, whatever the calling process set.

Many training scripts turn TF32 on for the whole process (`allow_tf32`,
`set_float32_matmul_precision("high")`), and "medium" also sends the CPU's oneDNN
matmuls to bfloat16. A product of float32 operands rounded to 10 (or 7) mantissa bits
breaks the reconstruction bound the residual is built to (W_res + s*B@A within half an
ulp of W) and changes the bytes, so every entry point that does math runs under
`ieee_float32()`, and the caller's settings come back afterwards exactly as they were.

torch has two APIs for this: the legacy one (`allow_tf32`, `set_float32_matmul_precision`)
and, from 2.9, a per-backend `fp32_precision`. Where the caller used the per-backend one,
the legacy getters raise, and setting through the legacy API afterwards leaves a state that
breaks the caller's next call: so with the per-backend API present, only it is read and
written, per backend (CUDA's and oneDNN's matmuls, the two our products go through), which
restores either kind of caller state as it was.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable)

# Before torch 2.9 this variable makes cuBLAS take TF32 whatever the process sets.
TF32_OVERRIDE = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"

# The matmul backends a float32 product of ours can go through.
_PER_BACKEND = ("cuda", "mkldnn")

_lock = threading.Lock()
_depth = 0
_saved: dict[str, object] | None = None


def per_backend_api() -> bool:
    """torch >= 2.9: each backend has its own fp32_precision."""
    return all(hasattr(getattr(torch.backends, b), "matmul") and hasattr(_matmul_settings(b), "fp32_precision")
               for b in _PER_BACKEND) and hasattr(torch.backends, "fp32_precision")


def _matmul_settings(backend: str):
    return getattr(torch.backends, backend).matmul


def float32_matmul_state() -> dict[str, str]:
    """The float32 matmul precision in force now, per backend ("ieee": full float32; "tf32",
    "bf16"; "none": the backend follows the generic setting), or the legacy setting."""
    if per_backend_api():
        state = {b: _matmul_settings(b).fp32_precision for b in _PER_BACKEND}
        state["generic"] = torch.backends.fp32_precision
        return state
    state = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
             "cuda_allow_tf32": str(torch.backends.cuda.matmul.allow_tf32)}
    if os.environ.get(TF32_OVERRIDE) == "1":  # before torch 2.9, cuBLAS then takes TF32 whatever is set
        state["tf32_override"] = "1"
    return state


def _save() -> dict[str, object]:
    if per_backend_api():
        return {b: _matmul_settings(b).fp32_precision for b in _PER_BACKEND}
    return {"precision": torch.get_float32_matmul_precision(), "allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _force_ieee() -> None:
    if per_backend_api():
        for backend in _PER_BACKEND:
            _matmul_settings(backend).fp32_precision = "ieee"
    else:
        if os.environ.get(TF32_OVERRIDE) == "1":
            warnings.warn(f"{TF32_OVERRIDE}=1 makes this torch ({torch.__version__}) multiply float32 in TF32 on "
                          "CUDA whatever pissa_rs sets: the residual's error bound and the bytes will not hold; "
                          "unset it, or use torch >= 2.9", stacklevel=4)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False


def _restore(saved: dict[str, object]) -> None:
    if per_backend_api():
        for backend in _PER_BACKEND:
            _matmul_settings(backend).fp32_precision = saved[backend]
    else:
        torch.set_float32_matmul_precision(saved["precision"])
        if torch.backends.cuda.matmul.allow_tf32 != saved["allow_tf32"]:
            torch.backends.cuda.matmul.allow_tf32 = saved["allow_tf32"]


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Full-precision float32 matmuls inside; the caller's settings restored on the way out.
    Re-entrant and shared by threads: the outermost entry saves, the last exit restores."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _save()
            _force_ieee()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                saved, _saved = _saved, None
                _restore(saved)


def in_ieee_float32(fn: F) -> F:
    """`fn` run under ieee_float32()."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ieee_float32():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
