"""The PiSSA math of docs/design.md, in pure torch: no I/O, so it is easy to test.

Matches PEFT's LoraLayer.pissa_init: "pissa" (exact SVD) when niter == 0,
"pissa_niter_K" (torch.svd_lowrank's K subspace iterations, svd.py) otherwise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .precision import in_ieee_float32
from .svd import full_svd, randomized_svd


def scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale s: lora_alpha / r, or lora_alpha / sqrt(r) with rslora."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the tensor's name: the same
    input and seed give the same factors whatever order tensors run in."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def two_sum_low(a: torch.Tensor, b: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Knuth's TwoSum: the exact rounding error of high = fl(a + b), so that
    a + b == high + low exactly."""
    b_virtual = high - a
    return (a - (high - b_virtual)) + (b - b_virtual)


def round_difference(w: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w - delta (float32 inputs) correctly rounded to `dtype`, in one rounding.

    float32: IEEE subtraction already is. float16 / bfloat16: rounding the
    float32 difference again can land one ulp off, but only when that float32
    value sits exactly on a tie between two `dtype` neighbours and the
    subtraction's own rounding error points away from the chosen one. Ties are
    found from the bit pattern (cheap), and only they are examined. Returns
    the rounded tensor and the float32 difference it rounds.
    """
    high = w - delta
    if dtype == torch.float32:
        return high, high
    rounded = high.to(dtype)
    bits = high.view(torch.int32)
    if dtype == torch.bfloat16:  # bfloat16 keeps float32's top 16 bits
        candidates = (bits & 0xFFFF) == 0x8000
    else:  # float16 keeps 10 of 23 mantissa bits; below 2**-14 it is subnormal
        candidates = ((bits & 0x1FFF) == 0x1000) | (high.abs() < 2.0**-14)
    idx = candidates.nonzero(as_tuple=True)
    if idx[0].numel():
        h, r = high[idx], rounded[idx]
        low = two_sum_low(w[idx], -delta[idx], h)
        gap = h - r.to(torch.float32)  # exact: r is within an ulp of h
        other = torch.nextafter(r, torch.where(gap > 0, float("inf"), float("-inf")).to(dtype))
        tie = (gap != 0) & ((other.to(torch.float32) - h).abs() == gap.abs())
        rounded[idx] = torch.where(tie & (low * gap > 0), other, r)
    return rounded, high


@dataclass
class Factors:
    """One weight's PiSSA split: W == residual + scale * lora_B @ lora_A."""

    lora_A: torch.Tensor  # r x in, adapter dtype
    lora_B: torch.Tensor  # out x r, adapter dtype
    # out x in (as stored: in x out for fan_in_fan_out), weight dtype; None for a method that
    # leaves the base weight as it is (MiCA)
    residual: torch.Tensor | None
    singular_values: torch.Tensor  # the singular values of W the adapter starts from, float32 (empty: none, QR)
    energy_kept: float  # the share of ||W||_F^2 in the adapter's column space: sum(S_r^2) / ||W||_F^2
    max_abs_error: float  # max |residual - (W - scale * B @ A)|, the difference in float32: the cast's error


@in_ieee_float32
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
    return factors_at_ranks(weight, [(r, scale)], niter, seed, adapter_dtype, fan_in_fan_out)[0]


def factors_at_ranks(
    weight: torch.Tensor,
    ranks: list[tuple[int, float]],
    niter: int = 4,
    seed: int | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    fan_in_fan_out: bool = False,
) -> list[Factors]:
    """PiSSA factors at several (rank, scale) pairs from one SVD at the largest
    rank: the smaller ranks take its leading singular triplets."""
    w, total = float32_oriented(weight, fan_in_fan_out, ranks)
    q = max(r for r, _ in ranks)
    if niter == 0:
        U, S, Vh = full_svd(w)
        U, S, Vh = U[:, :q], S[:q], Vh[:q]
    else:
        # svd_lowrank's math from a start drawn on the CPU by a generator of its own: the same
        # on every device, and safe in concurrent threads (no global generator involved).
        U, S, V = randomized_svd(w, q, niter, seed)
        Vh = V.T
    # The float32 copy is not needed past the SVD: the residual upcasts the weight a block at a time.
    del w
    oriented = weight.T if fan_in_fan_out else weight
    return [
        factors_from_triplets(oriented, U[:, :r], S[:r], Vh[:r], scale, adapter_dtype, fan_in_fan_out, total)
        for r, scale in ranks
    ]


def float32_oriented(weight: torch.Tensor, fan_in_fan_out: bool, ranks: list[tuple[int, float]]
                     ) -> tuple[torch.Tensor, float]:
    """The weight in float32, out x in, and ||W||_F^2; its dtype, shape and the ranks checked."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"PiSSA needs a float32, float16 or bfloat16 weight, got {weight.dtype}")
    w = weight.to(torch.float32)
    if fan_in_fan_out:
        w = w.T
    rows, cols = w.shape
    for r, _ in ranks:
        if not 1 <= r <= min(rows, cols):
            raise ValueError(f"rank {r} is not in [1, min({rows}, {cols})]")
    flat = w.reshape(-1)
    total = torch.dot(flat, flat).item()
    return w, total


# Rows of the residual computed at a time (about 16 MiB of float32 each): a weight costs
# its float32 delta and its residual, not several float32 copies of itself.
BLOCK_ELEMENTS = 1 << 22


def factors_from_triplets(oriented, U, S, Vh, scale, adapter_dtype, fan_in_fan_out, total) -> Factors:
    """PiSSA's split of singular triplets (any of W's, top or bottom): A = sqrt(S/s) Vh,
    B = U sqrt(S/s), and the residual from them. `oriented`: the weight (out x in, a view
    of the stored tensor) in its own dtype; `total`: ||W||_F^2."""
    sqrt_s = torch.sqrt(S / scale)
    lora_A = (sqrt_s[:, None] * Vh).to(adapter_dtype)
    lora_B = (U * sqrt_s[None, :]).to(adapter_dtype)
    energy_kept = (S.double().square().sum().item() / total) if total > 0 else 1.0
    return factors_with_residual(oriented, lora_A, lora_B, scale, fan_in_fan_out, S.to(torch.float32), energy_kept)


def factors_with_residual(oriented, lora_A, lora_B, scale, fan_in_fan_out, singular_values, energy_kept) -> Factors:
    """Factors as stored, and the residual W - s * B @ A computed from them."""
    dtype = oriented.dtype
    # PEFT's expression, in float32 from the factors as stored, as one product (row blocks
    # of a product need not round as the whole product does).
    delta = (scale * lora_B.to(torch.float32)) @ lora_A.to(torch.float32)
    # Rounded once to the weight's dtype, so residual + delta is within half an ulp of the
    # residual's dtype of W; a block of rows at a time.
    residual = torch.empty(delta.shape, dtype=dtype, device=delta.device)
    max_abs_error = 0.0  # float32: the difference is the residual, no cast
    step = max(1, BLOCK_ELEMENTS // max(delta.shape[1], 1))
    for start in range(0, delta.shape[0], step):
        rows = slice(start, start + step)
        block, difference = round_difference(oriented[rows].to(torch.float32), delta[rows], dtype)
        residual[rows] = block
        if dtype != torch.float32 and block.numel():  # the cast's error |residual - (W - s*B@A)|
            max_abs_error = max(max_abs_error, block.to(torch.float32).sub_(difference).abs_().max().item())
    del delta
    if fan_in_fan_out:
        residual = residual.T
    return Factors(
        lora_A=lora_A,
        lora_B=lora_B,
        residual=residual.contiguous(),
        singular_values=singular_values,
        energy_kept=energy_kept,
        max_abs_error=max_abs_error,
    )
