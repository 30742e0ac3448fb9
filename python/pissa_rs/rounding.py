"""How this process's torch rounds: the real decomposition (the method's, QPiSSA when
asked) run on small fixed inputs on a device and hashed. Two processes whose probes agree
round the same way; two that disagree would write other bytes for the same input.

Why a measurement and not a list of versions (docs/design.md, "What decides the bytes"):
on an x86-64 CPU the randomized SVD's bits depend on which code path MKL takes for each
GEMM (and for the Cholesky and triangular solve), and MKL picks it per CPU model, also
under MKL_CBWR=COMPATIBLE: two CPUs with the same torch, the same ISA level and the same
`get_cpu_capability()` were seen to round differently. Running the code path itself is
the only fingerprint that sees that.

The inputs are built from integers (exact on every machine); the shapes span the kernel
paths a GEMM takes: a few dozen columns, a wide weight, inner dimensions past MKL's and
cuBLAS's blocking (above 1024), in both orientations."""

from __future__ import annotations

import hashlib
import os
import threading

from typing import TYPE_CHECKING

import torch

from ._pissa_rs import PissaError
from .precision import float32_matmul_state
from .quant import Quantization, qpissa_factors_at_ranks
from .tensors import TORCH_DTYPES

if TYPE_CHECKING:
    from .options import DecomposeOptions
    from .planning.targets import Target

# (rows, cols, rank): tall, wide, medium, and long inner dimensions for both GEMMs of the
# subspace iteration (A @ basis has inner dimension cols, A^T @ basis has rows).
PROBE_SHAPES = ((64, 48, 4), (40, 200, 8), (384, 256, 32), (2048, 192, 8), (192, 2048, 8), (1280, 1152, 8))
PROBE_SEED = 20261202
QUANT_PROBE_SHAPE = (128, 96, 8)
# Fault injection for the tests (as resume.py's PISSA_RS_SIGNAL_AT): a process with this set
# measures another probe, as a machine that rounds differently would.
PROBE_SALT = "PISSA_RS_ROUNDING_PROBE_SALT"

_cache: dict[tuple, str] = {}
_lock = threading.Lock()


class RoundingMismatchError(PissaError, RuntimeError):
    """Two machines or devices of one run (or a run and the run it resumes) round differently:
    their probes differ, so they would write other bytes for the same input."""


def hashed_uniform(n: int, offset: int = 0) -> torch.Tensor:
    """n float64 values in [-0.5, 0.5) from an integer hash of offset .. offset + n - 1: the
    same bits on every machine (no random generator, no transcendental function), and 24
    bits each, so exact in float32."""
    i = torch.arange(n, dtype=torch.int64) + offset
    h = (i * 2654435761 + 12345) % (1 << 32)
    h = (h ^ (h >> 13)) * 1274126177 % (1 << 32)
    return (h >> 8).to(torch.float64) / float(1 << 24) - 0.5


def fixed_weight(rows: int, cols: int, salt: int) -> torch.Tensor:
    """A rows x cols float32 matrix of hashed_uniform values, the columns scaled down."""
    values = hashed_uniform(rows * cols, salt * 1_000_003)
    # a decaying spectrum, like a trained weight's, so the leading singular values are separated
    scale = 1.0 / (1.0 + torch.arange(cols, dtype=torch.float64) / 8.0)
    return (values.reshape(rows, cols) * scale).to(torch.float32)


def rounding_probe(device: torch.device | str, dtypes: list[str], niter: int, adapter_dtype: torch.dtype,
                   quantization: Quantization | None = None, quant_iters: int = 1, method: str = "pissa") -> str:
    """A hex digest of the decomposition's outputs on fixed inputs, computed on `device` in
    each weight dtype of `dtypes` ("F32", "F16", "BF16") with this process's torch threads.
    `method`: the initialization method's own decomposition (methods/) is what is probed.
    Cached per process: the rounding of a process does not change while it runs."""
    device = torch.device(device)
    parts = []
    for dtype in sorted(set(dtypes)):  # measured and cached one dtype at a time, so any set of them hits
        # the float32 matmul precision too: a probe measured under TF32 is not one measured without
        key = (str(device), (dtype,), niter, str(adapter_dtype), quantization, quant_iters, torch.get_num_threads(),
               method, tuple(sorted(float32_matmul_state().items())))
        with _lock:
            if key not in _cache:
                _cache[key] = _measure(device, key[1], niter, adapter_dtype, quantization, quant_iters, method)
            parts.append(_cache[key])
    if len(parts) == 1:
        return parts[0]
    return hashlib.sha256("+".join(parts).encode()).hexdigest()[:24]


def candidate_dtypes(checkpoint) -> list[str]:
    """The weight dtypes a decomposition of `checkpoint` is likely to probe, from its headers
    alone: those of its 2-D float tensors, and bfloat16 for FP8 / MXFP4 ones (decoded to it)."""
    found = set()
    for info in checkpoint.tensors:
        if len(info.shape) >= 2:
            found.add(info.dtype if info.dtype in ("F32", "F16", "BF16") else
                      "BF16" if info.dtype.startswith("F8") or info.name.endswith("_blocks") else None)
    return sorted(found - {None})


def warm_probes(options: DecomposeOptions, checkpoint) -> None:
    """Measure, ahead of the plan, the probes devices_probe will likely ask for (for every
    dtype candidate_dtypes finds): run while the planning child works, they cost no wall time."""
    from .options import ADAPTER_DTYPES

    if options.quantization is not None:
        return  # QPiSSA's probe needs the quantizer the plan chooses (its check imports bitsandbytes)
    for device in dict.fromkeys(options.torch_devices):
        rounding_probe(device, candidate_dtypes(checkpoint), options.niter, ADAPTER_DTYPES[options.adapter_dtype],
                       options.quantization, options.quant_iters, options.method)


def _measure(device, dtypes, niter, adapter_dtype, quantization, quant_iters, method_name) -> str:
    from .methods import get_method

    method = get_method(method_name)
    digest = hashlib.sha256(os.environ.get(PROBE_SALT, "").encode())

    def absorb(*tensors: torch.Tensor) -> None:
        for t in tensors:
            digest.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

    with torch.no_grad():
        for name in dtypes:
            dtype = TORCH_DTYPES.get(name, torch.float32)
            for salt, (rows, cols, r) in enumerate(PROBE_SHAPES):
                w = fixed_weight(rows, cols, salt).to(device=device, dtype=dtype)
                f = method.factors_at_ranks(w, [(r, 2.0)], niter=niter, seed=PROBE_SEED + salt,
                                            adapter_dtype=adapter_dtype, fan_in_fan_out=False,
                                            statistic=method.probe_statistic(rows, cols, r, salt, fixed_weight, device))[0]
                absorb(f.lora_A, f.lora_B, *([f.residual] if f.residual is not None else []), f.singular_values,
                       torch.tensor([f.energy_kept, f.max_abs_error], dtype=torch.float64))
            if quantization is not None:
                rows, cols, r = QUANT_PROBE_SHAPE
                w = fixed_weight(rows, cols, 99).to(device=device, dtype=dtype)
                f = qpissa_factors_at_ranks(w, [(r, 2.0)], quantization, quant_iters, niter=niter,
                                            seed=PROBE_SEED, adapter_dtype=adapter_dtype, method=method,
                                            statistic=method.probe_statistic(rows, cols, r, 99, fixed_weight, device))[0]
                absorb(f.lora_A, f.lora_B, f.residual)
    return digest.hexdigest()[:24]


def job_probe(options: DecomposeOptions, targets: list[Target], device: torch.device | str) -> str:
    """The probe of a decomposition with `options` of `targets` (their dtypes as decoded),
    on `device`."""
    from .options import ADAPTER_DTYPES

    return rounding_probe(device, sorted({t.dtype for t in targets}), options.niter,
                          ADAPTER_DTYPES[options.adapter_dtype], options.quantization, options.quant_iters,
                          options.method)


def devices_probe(options: DecomposeOptions, targets: list[Target]) -> str:
    """The probe every device of `options` shares; refused, naming them, when two devices
    (GPUs of two models, say) would round differently: which tensor lands on which device
    is decided at run time, so a mix could not say which tensors came from where."""
    probes = {str(d): job_probe(options, targets, d) for d in options.torch_devices}
    if len(set(probes.values())) > 1:
        raise RoundingMismatchError(
            "the devices " + ", ".join(probes) + " round differently (rounding probes "
            + ", ".join(f"{d}: {p}" for d, p in probes.items()) + "); a run over them would write other bytes "
            "than a run on any one of them: give devices of one model")
    return next(iter(probes.values()))
