"""MiLoRA: the adapter starts from W's bottom-r (minor) singular triplets, split as PiSSA
splits the top ones; the residual keeps the principal part. Not in PEFT: it loads as a
plain LoRA onto the residual."""

from __future__ import annotations

import torch

from ..factors import factors_from_triplets, float32_oriented
from .base import FULL_SVD, Method, adapter_singular_values
from .registry import register
from ..svd import full_svd, singular_values


@register
class MiLoRA(Method):
    name = "milora"
    summary = "minor (bottom-r) singular triplets in the adapter, the principal part in the residual (full SVD)"
    solver = FULL_SVD

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        w, total = float32_oriented(weight, fan_in_fan_out, ranks)
        U, S, Vh = full_svd(w)
        del w
        oriented = weight.T if fan_in_fan_out else weight
        k = S.shape[0]
        return [factors_from_triplets(oriented, U[:, k - r:], S[k - r:], Vh[k - r:], scale, adapter_dtype,
                                      fan_in_fan_out, total)
                for r, scale in ranks]

    def factor_problem(self, w, w_res, a, b, scale, tol, residual_eps=0.0):
        """The adapter holds the minor part: its singular values are W's bottom r."""
        r = a.shape[0]
        bottom = singular_values(w.double())[-r:].float()
        held = adapter_singular_values(a, b, scale)
        gap = (held - bottom).abs().max().item()
        if gap <= tol * bottom.max().item() + tol * 1e-3 * w.abs().max().item():
            return None
        return (f"the adapter's singular values {held[:3].tolist()}... are not W's bottom {r} "
                f"{bottom[:3].tolist()}... (not MiLoRA)")
