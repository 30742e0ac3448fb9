"""MiCA (PEFT's init_lora_weights="mica"): lora_B is W's bottom-r left singular vectors,
frozen during training, lora_A starts at zero, and the base weight stays as it is: the
output is the adapter alone, onto the original model."""

from __future__ import annotations

import torch

from ..factors import Factors, float32_oriented
from .base import FULL_SVD, Method, orthonormal_problem
from .registry import register
from ..svd import full_svd, singular_values


@register
class MiCA(Method):
    name = "mica"
    summary = "B frozen at the bottom-r left singular vectors, A = 0, the original model as base (full SVD)"
    solver = FULL_SVD
    changes_base = False
    quantizable = False
    adapts_parameters = False  # PEFT's ParamWrapper refuses the MiCA variant
    peft_name = "mica"
    config_init_lora_weights = "mica"  # PEFT's MiCA variant freezes lora_B only when it reads this

    def check(self, options):
        from ..requirements import require_feature

        super().check(options)
        require_feature("peft", "0.21", "method 'mica' (PEFT's MiCA variant, which freezes lora_B)")

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        w, total = float32_oriented(weight, fan_in_fan_out, ranks)
        U, S, _ = full_svd(w)
        k = S.shape[0]
        found = []
        for r, _ in ranks:
            minor = S[k - r:]
            found.append(Factors(
                lora_A=torch.zeros(r, w.shape[1], dtype=adapter_dtype, device=w.device),
                lora_B=U[:, k - r:].contiguous().to(adapter_dtype), residual=None, singular_values=minor,
                energy_kept=(minor.double().square().sum().item() / total) if total > 0 else 0.0, max_abs_error=0.0))
        return found

    def factor_problem(self, w, w_res, a, b, scale, tol, residual_eps=0.0):
        """A = 0, B orthonormal and spanning W's bottom-r left singular subspace: ||B^T W||_F^2 is
        at its minimum, the sum of W's bottom r squared singular values (Ky Fan)."""
        if a.abs().max().item() != 0:
            return "lora_A is not zero (MiCA starts from A = 0)"
        problem = orthonormal_problem(b, tol)
        if problem:
            return problem
        r = b.shape[1]
        floor = singular_values(w.double())[-r:].square().sum().item()
        held = (b.double().T @ w.double()).square().sum().item()
        total = w.double().square().sum().item()
        if held <= floor + tol * total:
            return None
        return (f"lora_B spans a subspace holding {held / max(total, 1e-30):.4g} of ||W||^2, not the bottom-{r} "
                f"left singular subspace's {floor / max(total, 1e-30):.4g} (not MiCA)")

    def lora_of_original(self, a, b, a0, b0):
        """The base is the original model: the trained adapter already is its LoRA (A0 = 0)."""
        return a, b
