"""A LoRA extracted from a fully fine-tuned model: per target weight, the top-r singular
triplets of W_ft - W_base (lora_B = U sqrt(S/s), lora_A = sqrt(S/s) Vh, randomized SVD;
niter=0: exact), an adapter onto BASE; nothing else is written. What it drops of the
difference is the record's 1 - energy_kept. With extract_energy, each module keeps the fewest
of those triplets that hold that share of the difference (chosen at the commit, from the
records); with extract_save_modules, the adapter carries those modules whole."""

from __future__ import annotations

import torch

from ..factors import factors_at_ranks
from .base import RANDOMIZED_SVD, Method
from .registry import register
from ..svd import singular_values

CAPTURED_SHARE = 0.9  # verify: the share of the best rank-r capture an extracted adapter must reach
# extract_energy: a share within this (relative to the difference's squared norm) of the one asked
# for counts as reached, so that E = 1 keeps the numerical rank, not the float32 rounding below it
ENERGY_SLACK = 1e-6


def energy_rank(singular_values: list[float], energy_kept: float, energy: float) -> int:
    """The fewest leading triplets (of those found, singular values descending) that keep
    `energy` of the difference's squared Frobenius norm, which the found ones keep
    `energy_kept` of; all of them when they keep less."""
    s2 = torch.tensor(singular_values, dtype=torch.float64).square()
    held = s2.sum().item()
    if held == 0 or energy_kept <= 0:
        return 1  # no change at all: one (zero) triplet keeps the module in the adapter
    total = held / energy_kept
    cumulative = torch.cumsum(s2, dim=0)
    k = int(torch.searchsorted(cumulative, (energy - ENERGY_SLACK) * total).item()) + 1
    return min(k, len(singular_values))


@register
class Extract(Method):
    name = "extract"
    summary = ("a LoRA of BASE from a fine-tuned model: the top-r triplets of W_ft - W_base (randomized SVD; "
               "niter=0: exact), the base model untouched")
    solver = RANDOMIZED_SVD
    changes_base = False
    quantizable = False
    adapter_subdir = ""  # a plain LoRA of BASE: OUT is the adapter folder, as to-lora's
    reads_base = True  # each target's statistic: BASE's matrix of the same tensor
    own_options = ("extract_base", "extract_energy", "extract_save_modules")

    def probe_statistic(self, rows, cols, r, salt, fixed, device):
        """A fixed base weight (the statistic is BASE's matrix)."""
        return fixed(rows, cols, 70 + salt).to(device=device, dtype=torch.float32)

    def check(self, options):
        super().check(options)
        if not options.extract_base:
            raise ValueError("method 'extract' needs the base model the fine-tuned one started from "
                             "(extract_base=..., pissa-rs extract-lora BASE FINETUNED OUT)")
        energy = options.extract_energy
        if energy is not None:
            if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
                raise ValueError(f"extract_energy must be in (0, 1], got {energy!r}")
            if options.several_ranks:
                raise ValueError("extract_energy chooses each module's rank up to r: give one rank (the largest)")
        saved = options.extract_save_modules
        if saved is not None and (isinstance(saved, str) or not all(isinstance(m, str) and m for m in saved)):
            raise ValueError(f"extract_save_modules must be a list of module names (or ['all']), got {saved!r}")

    def commit_ranks(self, options, targets, records):
        """extract_energy: per module (not per expert: a ParamWrapper layer has one rank, which
        PEFT re-derives for fused experts on load), the fewest of its r triplets that keep that
        share of ||W_ft - W_base||^2; a module whose r triplets keep less keeps all r."""
        if options.extract_energy is None:
            return {}
        return {i: energy_rank(record["singular_values"], record["energy_kept"], options.extract_energy)
                for i, (target, record) in enumerate(zip(targets, records)) if target.parameter is None}

    def modules_to_save(self, options):
        return list(options.extract_save_modules or [])

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
        best = singular_values(d)[:r].square().sum().item()
        if held >= CAPTURED_SHARE * best - tol * total:
            return None
        return (f"the adapter captures {held / max(total, 1e-30):.4g} of ||W_ft - W_base||^2, the top-{r} triplets "
                f"{best / max(total, 1e-30):.4g}: it is not the LoRA of W_ft - W_base")
