"""pissa_rs.plan: what decompose_checkpoint would do, shown before an hour of work."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint
from .decompose import (
    DecomposeOptions,
    free_bytes,
    human_bytes,
    output_bytes,
    output_dirs,
    residual_bytes,
    resolve_source,
)
from .planning import is_model_dir, make_plan, source_layout
from .sources import source_format
from .targets import Target


@dataclass
class DecompositionPlan:
    input: Path
    outs: list[Path]  # one per rank
    options: DecomposeOptions
    targets: list[Target]  # at the largest rank
    passthrough: list[tuple[str, str, tuple[int, ...], int]]  # name, dtype, shape, bytes
    input_bytes: int
    residual_bytes: int  # all outputs together
    adapter_bytes: int
    free_bytes: int  # on out's filesystem
    estimated_seconds: float  # torch work only, from a throughput probe on the device
    stored_quantized: list[str] = field(default_factory=list)  # save_quantized: weights stored pre-quantized
    left_out: list[tuple[str, str]] = field(default_factory=list)  # picked but not decomposed, and why
    rank_limited: list[str] = field(default_factory=list)  # modules at their smaller dimension, below r
    source_format: str | None = None  # a low-precision source: what it is
    source_sizes: dict[str, int] = field(default_factory=dict)  # residual bytes (one rank) per storage choice

    @property
    def fits_on_disk(self) -> bool:
        return self.residual_bytes + self.adapter_bytes <= self.free_bytes

    @property
    def _qpissa(self) -> str:
        o = self.options
        if not o.quantize:
            return ""
        measured = " + error measurement" + (" and LoftQ" if o.compare_loftq else "") if o.measure_error else ""
        return f", QPiSSA for {o.quantize}{' (double quant)' if o.double_quant else ''} x{o.quant_iters}{measured}"

    def describe(self) -> str:
        lines = [f"input:  {self.input} ({human_bytes(self.input_bytes)})",
                 f"output: {', '.join(map(str, self.outs))} (residual {human_bytes(self.residual_bytes)} + adapter "
                 f"{human_bytes(self.adapter_bytes)}; {human_bytes(self.free_bytes)} free"
                 f"{'' if self.fits_on_disk else ' -- DOES NOT FIT'})",
                 f"method: {self.options.init_lora_weights}{self._qpissa}, device {','.join(map(str, self.options.torch_devices))}, "
                 f"estimated {self.estimated_seconds:.1f} s of SVD work",
                 *([f"source: {self.source_format}; residual as " + ", as ".join(
                     f"{k}: {human_bytes(v)}" for k, v in self.source_sizes.items())] if self.source_format else []),
                 f"{len(self.targets)} targets"
                 + (f" ({sum(t.expert is not None for t in self.targets)} of them experts, one line per layer's "
                    "parameter):" if any(t.expert is not None for t in self.targets) else ":")]
        shown = [t for t in self.targets if not t.expert]  # a layer's experts: one line
        width = max((len(t.parameter if t.expert is not None else t.tensor) for t in shown), default=0)
        for t in shown:
            name = t.parameter if t.expert is not None else t.tensor
            shape = [t.num_experts, *t.shape] if t.expert is not None else list(t.shape)
            kind = (f" ({t.num_experts} experts, each its own split{', stored in x out' if t.fan_in_fan_out else ''})"
                    if t.expert is not None else " (Conv1D)" if t.fan_in_fan_out else "")
            lines.append(f"  {name:<{width}}  {t.dtype:<5} {str(shape):<14} r={t.r} alpha={t.lora_alpha:g}{kind}")
        for t in shown:
            if t.module in self.rank_limited or t.parameter in self.rank_limited:
                lines.append(f"  rank {t.r} for {t.parameter or t.module}: its smaller dimension is below r")
        lines += [f"left out: {name}: {why}" for name, why in self.left_out]
        if self.stored_quantized:
            lines.append(f"{len(self.stored_quantized)} weights stored pre-quantized as {self.options.quantize} "
                         "(bitsandbytes' serialized format; the targets' residuals among them)")
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


def _quant_flops(t: Target, opts: DecomposeOptions) -> tuple[float, float]:
    """(more SVD flops, full-SVD flops) QPiSSA adds for one weight: its extra
    iterations, and the error measurement (singular values of two full matrices,
    T full SVDs more with LoftQ)."""
    if not opts.quantize:
        return 0.0, 0.0
    m, n = t.shape
    k, big = min(m, n), max(m, n)
    svdvals = 4.0 * big * k * k - 4.0 / 3.0 * k**3  # Householder bidiagonalization
    measure = (2 + (3 * opts.quant_iters + 1 if opts.compare_loftq else 0)) * svdvals if opts.measure_error else 0.0
    return (opts.quant_iters - 1) * _svd_flops(t, opts.niter), measure


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


def plan(path: str | os.PathLike[str], r: int | list[int] = 128, *, out: str | os.PathLike[str] | None = None,
         revision: str | None = None, **options) -> DecompositionPlan:
    """What `decompose_checkpoint(path, r, out=out, **options)` would do, without doing it:
    targets with shapes and ranks, pass-through tensors, bytes in and out, free disk and
    an estimate of the SVD time on the chosen device. Target mistakes raise here."""
    opts = DecomposeOptions(r=r, **options).validate()
    source, out = resolve_source(path, revision, Path(out) if out else None, opts.ranks, headers_only=True)
    return replace(plan_decomposition(source, opts, out), input=Path(path))


def plan_decomposition(path: Path, opts: DecomposeOptions, out: Path | None) -> DecompositionPlan:
    """`plan` with options already validated (the CLI's --dry-run)."""
    checkpoint = Checkpoint(path)
    outs = output_dirs(path, opts.ranks, out)
    plans = make_plan(path, [asdict(opts.for_rank(r)) for r in opts.ranks], outs)
    found = plans[-1]  # ranks ascend: the largest, whose SVD all share
    targets = {p.tensor for t in found.targets for p in t.weight_read(checkpoint).pieces}
    stored = [w.tensor for w in found.stored_quantized]
    passthrough = [(i.name, i.dtype, tuple(i.shape), i.nbytes) for i in checkpoint.tensors
                   if i.name not in targets and i.name not in stored]
    sizes = [output_bytes(checkpoint, p, opts) for p in plans]
    source_sizes, fmt = {}, source_format(path if is_model_dir(path) else None)
    if fmt.kind is not None:
        as_bf16 = found.source_as or source_layout(checkpoint, found.targets)
        source_sizes["bfloat16 (default)"] = residual_bytes(checkpoint, as_bf16)
        if fmt.kind in ("fp8", "compressed-tensors"):
            source_sizes["the source's FP8 (keep_source_format)"] = residual_bytes(checkpoint, {})
    residual, adapter = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    # The matmul flops alone predicted 40 s for the TinyLlama-shaped benchmark on the
    # 2-core CPU; QRs, rounding and copies made it 72 s: hence the factor.
    # Full SVDs (QPiSSA's error measurement) run at a lower rate: 2.5 s for the singular
    # values of a 5632 x 2048 matrix on that CPU, 2 to 5x what its flops predict.
    svd = sum(_svd_flops(t, opts.niter) + _quant_flops(t, opts)[0] for t in found.targets)
    full = sum(_quant_flops(t, opts)[1] for t in found.targets)
    # Several devices of one kind share the weights: the work divides between them.
    seconds = (1.8 * svd + 3.5 * full) / _device_flops(torch.device(opts.device)) / len(opts.torch_devices)
    return DecompositionPlan(
        input=path, outs=outs, options=opts, targets=found.targets, passthrough=passthrough,
        input_bytes=sum(i.nbytes for i in checkpoint.tensors), residual_bytes=residual, adapter_bytes=adapter,
        free_bytes=free_bytes(outs[0]), estimated_seconds=seconds, stored_quantized=stored,
        left_out=found.left_out, rank_limited=found.rank_limited,
        source_format=fmt.describe() if fmt.kind else None, source_sizes=source_sizes,
    )
