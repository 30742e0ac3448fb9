"""OLoRA (PEFT's init_lora_weights="olora"): W = QR, lora_B = Q[:, :r], lora_A = R[:r],
residual W - s * B @ A."""

from __future__ import annotations

import torch

from ..factors import factors_with_residual, float32_oriented
from .base import QR, Method, orthonormal_problem
from .registry import register


@register
class OLoRA(Method):
    name = "olora"
    summary = "W's QR: B = Q[:, :r] (orthonormal), A = R[:r], the rest in the residual"
    solver = QR
    peft_name = "olora"

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        # PEFT's olora_init takes the QR of the weight as stored; for a Conv1D (fan_in_fan_out)
        # that is W^T, whose factors do not fit the layer: here always the out x in W.
        w, total = float32_oriented(weight, fan_in_fan_out, ranks)
        Q, R = torch.linalg.qr(w)
        del w
        oriented = weight.T if fan_in_fan_out else weight
        found = []
        for r, scale in ranks:
            lora_A, lora_B = R[:r].contiguous().to(adapter_dtype), Q[:, :r].contiguous().to(adapter_dtype)
            # ||Q_r^T W||_F^2 = ||R_r||_F^2: the share of W in the adapter's column space
            kept = R[:r].double().square().sum().item()
            found.append(factors_with_residual(oriented, lora_A, lora_B, scale, fan_in_fan_out,
                                               torch.empty(0, device=R.device), kept / total if total > 0 else 1.0))
        return found

    def factor_problem(self, w, w_res, a, b, scale, tol, residual_eps=0.0):
        """B orthonormal, A = R[:r] upper triangular, and Q_r^T W_res = (1 - s) R_r (W = QR)."""
        problem = orthonormal_problem(b, tol)
        if problem:
            return problem
        size = a.abs().max().item() + 1e-30
        below = torch.tril(a.double(), diagonal=-1).abs().max().item()
        if below > tol * size:
            return f"lora_A is not upper triangular (|A[i, j<i]| up to {below:.3g}): not R of W's QR"
        gap = (b.double().T @ w_res.double() - (1 - scale) * a.double()).abs().max().item()
        # the residual's own rounding moves B^T W_res by up to eps * a column's norm
        rounding = residual_eps * torch.linalg.vector_norm(w_res.double(), dim=0).max().item()
        if gap > tol * (size + w.abs().max().item()) + rounding:
            return f"B^T W_res differs from (1 - s) A by {gap:.3g}: B, A are not Q[:, :r], R[:r] of W's QR (not OLoRA)"
        return None
