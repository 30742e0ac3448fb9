"""CorDA (PEFT's init_lora_weights="corda"): the SVD of W·C, C the covariance of the layer's
inputs on calibration text (damped until it inverts well); lora_A = sqrt(S/s) (Vh C^-1),
lora_B = U sqrt(S/s), residual W - s·B@A. IPM keeps the top r triplets (instruction
following), KPM the bottom r (knowledge preserved: the adapter starts where the data's
directions are weakest)."""

from __future__ import annotations

import torch

from ..factors import factors_with_residual, float32_oriented
from .base import FULL_SVD, Method
from .registry import register
from ..svd import full_svd

# PEFT's collect_eigens_for_layer: damping starts at 1% of C's mean diagonal and doubles until
# ||C_fix @ C_fix^-1 - I||_F < 0.05.
FIRST_DAMP, INVERSE_TOLERANCE, MOST_DOUBLINGS = 0.01, 0.05, 64


def damped_inverse(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C + damp * mean(diag C) * I, its inverse, damp), as PEFT's CorDA damps C."""
    c = covariance.to(torch.float32)
    n = c.shape[0]
    mean_diagonal = torch.mean(torch.diag(c))
    if not torch.isfinite(mean_diagonal) or mean_diagonal.item() <= 0:
        raise ValueError(f"the input covariance has mean diagonal {mean_diagonal.item()}: the calibration samples "
                         "never reached this module with a nonzero input")
    damp = FIRST_DAMP
    for _ in range(MOST_DOUBLINGS):
        # PEFT's C + diag(damp * mean) and ||C_fix C_fix^-1 - I||_F, with the diagonal changed in
        # place (the same values bit for bit) rather than through n x n identity and diagonal
        # matrices: for an 8B down_proj each is 0.8 GB
        fixed = c.clone()
        fixed.diagonal().add_(torch.ones(n, device=c.device) * mean_diagonal * damp)
        inverse = torch.linalg.inv(fixed)
        product = fixed @ inverse
        product.diagonal().sub_(1.0)
        off = torch.linalg.vector_norm(product).item()
        del product
        if off < INVERSE_TOLERANCE:
            return fixed, inverse, damp
        damp *= 2
    raise ValueError(f"the input covariance would not invert within {INVERSE_TOLERANCE} after damping by {damp}")


class _CorDA(Method):
    solver = FULL_SVD
    peft_name = "corda"
    calibration = "covariance"
    # PEFT's CorDA hooks nn.Linear / Conv1D only; here experts get their routed tokens' covariance
    # (and routers their input's), and the factors train as a plain LoRA on PEFT's ParamWrapper.
    adapts_parameters = True
    own_options = ("calibrate_all_experts", "host_memory")
    keep: str  # "top" or "bottom"

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        if statistic is None:
            raise ValueError(f"method {self.name!r} needs the covariance of the weight's inputs (calibration data)")
        w, total = float32_oriented(weight, fan_in_fan_out, ranks)
        if statistic.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"the input covariance is {list(statistic.shape)}, the weight takes {w.shape[1]} inputs")
        fixed, inverse, _ = damped_inverse(statistic.to(w.device))
        U, S, Vh = full_svd(w @ fixed)
        del w, fixed
        V = Vh @ inverse  # rows: C^-1-mapped right singular vectors, so U S V = W exactly
        oriented = weight.T if fan_in_fan_out else weight
        k = S.shape[0]
        found = []
        for r, scale in ranks:
            picked = slice(0, r) if self.keep == "top" else slice(k - r, k)
            sqrt_s = torch.sqrt(S[picked] / scale)
            lora_A = (sqrt_s[:, None] * V[picked]).to(adapter_dtype)
            lora_B = (U[:, picked] * sqrt_s[None, :]).to(adapter_dtype)
            # the share of ||W||_F^2 the adapter holds: ||s B A||_F^2 = s^2 tr(B^T B A A^T)
            a, b = lora_A.double(), lora_B.double()
            held = scale * scale * torch.trace((b.T @ b) @ (a @ a.T)).item()
            found.append(factors_with_residual(oriented, lora_A, lora_B, scale, fan_in_fan_out,
                                               S[picked].to(torch.float32), held / total if total > 0 else 1.0))
        return found


@register
class CordaIPM(_CorDA):
    name = "corda-ipm"
    summary = ("CorDA's instruction-previewed mode: the top r triplets of W·C, C the covariance of the inputs on "
               "calibration text (full SVD)")
    keep = "top"


@register
class CordaKPM(_CorDA):
    name = "corda-kpm"
    summary = ("CorDA's knowledge-preserved mode: the bottom r triplets of W·C, so training moves the directions "
               "the calibration text uses least (full SVD)")
    keep = "bottom"
