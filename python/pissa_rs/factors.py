"""The PiSSA math of DESIGN.md, in pure torch: no I/O, so it is easy to test.

Matches PEFT's LoraLayer.pissa_init: "pissa" (exact SVD) when niter == 0,
"pissa_niter_K" (torch.svd_lowrank with K subspace iterations) otherwise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


def scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale s: lora_alpha / r, or lora_alpha / sqrt(r) with rslora."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the tensor's name: the same
    input and seed give the same factors whatever order tensors run in."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def round_to_nearest(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype, correctly rounded. torch casts float64 to float16 and
    bfloat16 through float32, and that double rounding can land one ulp off
    near a tie; step to the neighbour when it is closer."""
    rounded = exact.to(dtype)
    if dtype == torch.float32:
        return rounded
    miss = exact - rounded.to(torch.float64)
    toward = torch.where(miss > 0, float("inf"), float("-inf")).to(dtype)
    neighbour = torch.nextafter(rounded, toward)
    closer = (exact - neighbour.to(torch.float64)).abs() < miss.abs()
    return torch.where(closer, neighbour, rounded)


@dataclass
class Factors:
    """One weight's PiSSA split: W == residual + scale * lora_B @ lora_A."""

    lora_A: torch.Tensor  # r x in, adapter dtype
    lora_B: torch.Tensor  # out x r, adapter dtype
    residual: torch.Tensor  # out x in (as stored: in x out for fan_in_fan_out), weight dtype
    singular_values: torch.Tensor  # top-r singular values of W, float32, descending
    energy_kept: float  # sum(S_r^2) / ||W||_F^2
    max_abs_error: float  # max |W - (residual + scale * B @ A)| after the cast


def principal_factors(
    weight: torch.Tensor,
    r: int,
    scale: float,
    niter: int = 4,
    seed: int | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    fan_in_fan_out: bool = False,
) -> Factors:
    """PiSSA-decompose one weight as stored (in x out when fan_in_fan_out).

    The SVD runs in float32 on the weight's device. The residual is computed
    from the factors as stored (cast to `adapter_dtype`), so residual + s*B@A
    reconstructs W up to the residual's own cast, whatever the SVD's error.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"PiSSA needs a float32, float16 or bfloat16 weight, got {weight.dtype}")
    w = weight.to(torch.float32)
    if fan_in_fan_out:
        w = w.T
    rows, cols = w.shape
    if not 1 <= r <= min(rows, cols):
        raise ValueError(f"rank {r} is not in [1, min({rows}, {cols})]")

    if niter == 0:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(w, q=r, niter=niter)
        Vh = V.T
    sqrt_s = torch.sqrt(S / scale)
    lora_A = (sqrt_s[:, None] * Vh).to(adapter_dtype)
    lora_B = (U * sqrt_s[None, :]).to(adapter_dtype)

    # PEFT's expression, in float32 from the factors as stored.
    delta = (scale * lora_B.to(torch.float32)) @ lora_A.to(torch.float32)
    # The difference is formed in float64 (exact for two float32 values in
    # practice) and rounded once to the weight's dtype, so residual + delta is
    # within half an ulp of the residual's dtype of W.
    exact = w.to(torch.float64) - delta.to(torch.float64)
    residual = round_to_nearest(exact, weight.dtype)
    max_abs_error = (residual.to(torch.float64) - exact).abs().max().item() if w.numel() else 0.0
    del exact
    total = w.square().sum()
    energy_kept = (S.square().sum() / total).item() if total > 0 else 1.0
    if fan_in_fan_out:
        residual = residual.T
    return Factors(
        lora_A=lora_A,
        lora_B=lora_B,
        residual=residual.contiguous(),
        singular_values=S.to(torch.float32),
        energy_kept=energy_kept,
        max_abs_error=max_abs_error,
    )
