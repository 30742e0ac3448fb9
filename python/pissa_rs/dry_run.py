"""pissa_rs.plan: what decompose_checkpoint would do, shown before an hour of work."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint
from .decompose import DecomposeOptions, default_out, free_bytes, human_bytes, output_bytes
from .planning import make_plan
from .targets import Target


@dataclass
class DecompositionPlan:
    input: Path
    out: Path
    options: DecomposeOptions
    targets: list[Target]
    passthrough: list[tuple[str, str, tuple[int, ...], int]]  # name, dtype, shape, bytes
    input_bytes: int
    residual_bytes: int
    adapter_bytes: int
    free_bytes: int  # on out's filesystem
    estimated_seconds: float  # torch work only, from a throughput probe on the device

    @property
    def fits_on_disk(self) -> bool:
        return self.residual_bytes + self.adapter_bytes <= self.free_bytes

    def describe(self) -> str:
        lines = [f"input:  {self.input} ({human_bytes(self.input_bytes)})",
                 f"output: {self.out} (residual {human_bytes(self.residual_bytes)} + adapter "
                 f"{human_bytes(self.adapter_bytes)}; {human_bytes(self.free_bytes)} free"
                 f"{'' if self.fits_on_disk else ' -- DOES NOT FIT'})",
                 f"method: {self.options.init_lora_weights}, device {self.options.device}, "
                 f"estimated {self.estimated_seconds:.1f} s of SVD work",
                 f"{len(self.targets)} targets:"]
        width = max((len(t.tensor) for t in self.targets), default=0)
        for t in self.targets:
            lines.append(f"  {t.tensor:<{width}}  {t.dtype:<5} {str(list(t.shape)):<14} r={t.r} alpha={t.lora_alpha:g}"
                         f"{' (Conv1D)' if t.fan_in_fan_out else ''}")
        lines.append(f"{len(self.passthrough)} pass-through tensors "
                     f"({human_bytes(sum(p[3] for p in self.passthrough))}, copied byte for byte):")
        lines += [f"  {name}  {dtype} {list(shape)}" for name, dtype, shape, _ in self.passthrough]
        return "\n".join(lines)


def _svd_flops(t: Target, niter: int) -> float:
    """Multiply-adds of torch.svd_lowrank(q=r, niter) (or a full SVD) on one weight, times 2."""
    m, n = t.shape
    if niter == 0:
        k = min(m, n)
        return 2.0 * (4 * m * n * k + 8 * k**3)
    return 2.0 * ((2 * niter + 2) * m * n * t.r + (2 * niter + 1) * (m + n) * t.r**2)


def _device_flops(device: torch.device) -> float:
    """Float32 matmul throughput of `device`, from a short probe."""
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 256, device=device)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return reps * 2 * 1024 * 1024 * 256 / (time.perf_counter() - start)


def plan(path: str | os.PathLike[str], r: int = 128, *, out: str | os.PathLike[str] | None = None,
         **options) -> DecompositionPlan:
    """What `decompose_checkpoint(path, r, out=out, **options)` would do, without doing it:
    targets with shapes and ranks, pass-through tensors, bytes in and out, free disk and
    an estimate of the SVD time on the chosen device. Target mistakes raise here."""
    opts = DecomposeOptions(r=r, **options).validate()
    return plan_decomposition(Path(path), opts, Path(out) if out else None)


def plan_decomposition(path: Path, opts: DecomposeOptions, out: Path | None) -> DecompositionPlan:
    """`plan` with options already validated (the CLI's --dry-run)."""
    checkpoint = Checkpoint(path)
    out = out or default_out(path, opts.r)
    found = make_plan(path, asdict(opts), out)
    targets = {t.tensor for t in found.targets}
    passthrough = [(i.name, i.dtype, tuple(i.shape), i.nbytes) for i in checkpoint.tensors if i.name not in targets]
    residual, adapter = output_bytes(checkpoint, found, opts.adapter_dtype)
    # The matmul flops alone predicted 40 s for the TinyLlama-shaped benchmark on the
    # 2-core CPU; QRs, rounding and copies made it 72 s: hence the factor.
    seconds = 1.8 * sum(_svd_flops(t, opts.niter) for t in found.targets) / _device_flops(torch.device(opts.device))
    return DecompositionPlan(
        input=path, out=out, options=opts, targets=found.targets, passthrough=passthrough,
        input_bytes=sum(i.nbytes for i in checkpoint.tensors), residual_bytes=residual, adapter_bytes=adapter,
        free_bytes=free_bytes(out), estimated_seconds=seconds,
    )
