"""A LoRA extracted from a fully fine-tuned model: per target weight, the top-r singular
triplets of W_ft - W_base (lora_B = U sqrt(S/s), lora_A = sqrt(S/s) Vh, randomized SVD;
niter=0: exact), an adapter onto BASE; nothing else is written. What it drops of the
difference is the record's 1 - energy_kept."""

from __future__ import annotations

import torch

from ..factors import factors_at_ranks
from .base import RANDOMIZED_SVD, Method
from .registry import register

CAPTURED_SHARE = 0.9  # verify: the share of the best rank-r capture an extracted adapter must reach


@register
class Extract(Method):
    name = "extract"
    summary = ("a LoRA of BASE from a fine-tuned model: the top-r triplets of W_ft - W_base (randomized SVD; "
               "niter=0: exact), the base model untouched")
    solver = RANDOMIZED_SVD
    changes_base = False
    quantizable = False
    reads_base = True  # each target's statistic: BASE's matrix of the same tensor
    own_options = ("extract_base",)

    def check(self, options):
        super().check(options)
        if not options.extract_base:
            raise ValueError("method 'extract' needs the base model the fine-tuned one started from "
                             "(extract_base=..., pissa-rs extract-lora BASE FINETUNED OUT)")

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        if statistic is None:
            raise ValueError("method 'extract' needs the base model's weight of the same tensor")
        if statistic.shape != weight.shape:
            raise ValueError(f"the base model's weight is {list(statistic.shape)}, the fine-tuned one "
                             f"{list(weight.shape)}")
        difference = weight.float() - statistic.float()
        found = factors_at_ranks(difference, ranks, niter, seed, adapter_dtype, fan_in_fan_out)
        for factors in found:
            factors.residual = None  # the base stays as it is: only the adapter is written
        return found

    def factor_problem(self, w, w_res, a, b, scale, tol, residual_eps=0.0):
        """`w`: W_ft - W_base. The adapter captures at least 90% of what the difference's top-r
        triplets capture (the randomized SVD comes within a fraction of a percent of them on a
        separated spectrum, and within a few percent on a flat one; other factors fall far below)."""
        r = a.shape[0]
        d = w.double()
        total = d.square().sum().item()
        held = total - (d - scale * b.double() @ a.double()).square().sum().item()
        best = torch.linalg.svdvals(d)[:r].square().sum().item()
        if held >= CAPTURED_SHARE * best - tol * total:
            return None
        return (f"the adapter captures {held / max(total, 1e-30):.4g} of ||W_ft - W_base||^2, the top-{r} triplets "
                f"{best / max(total, 1e-30):.4g}: it is not the LoRA of W_ft - W_base")
