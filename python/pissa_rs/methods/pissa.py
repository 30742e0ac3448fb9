"""PiSSA: the adapter starts from W's top-r singular triplets, the residual keeps the rest
(PEFT's "pissa" with an exact SVD, "pissa_niter_K" with the randomized one)."""

from __future__ import annotations

from ..factors import factors_at_ranks
from .base import RANDOMIZED_SVD, Method, adapter_singular_values
from .registry import register


@register
class PiSSA(Method):
    name = "pissa"
    summary = "principal singular triplets in the adapter, the rest in the residual (randomized SVD; niter=0: exact)"
    solver = RANDOMIZED_SVD
    peft_name = "pissa"

    def init_lora_weights(self, niter: int) -> str:
        return "pissa" if niter == 0 else f"pissa_niter_{niter}"

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        return factors_at_ranks(weight, ranks, niter, seed, adapter_dtype, fan_in_fan_out)

    def factor_problem(self, w, w_res, a, b, scale, tol, residual_eps=0.0):
        """The adapter holds the principal part: its mean squared singular value is above the
        residual's (the randomized SVD's triplets are approximate, so no sharper bound holds for
        every output; bottom or random triplets fall below it)."""
        r, k = a.shape[0], min(w.shape)
        held = adapter_singular_values(a, b, scale).double().square().sum().item()
        left = w_res.double().square().sum().item()
        if k == r or held / r >= left / (k - r):
            return None
        return (f"the adapter's mean squared singular value {held / r:.4g} is below the residual's "
                f"{left / (k - r):.4g}: it does not hold W's top-{r} triplets (not PiSSA)")
