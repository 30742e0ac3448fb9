"""Check a LoRA converted from a fine-tuned adapter (to-lora, at its full rank or truncated)
against the two adapters it came from, from the factors alone: each module's error against
the exact update is no more than the best approximation at the LoRA's rank allows, and is
the share of energy the conversion recorded as dropped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .convert import CONVERSION_REPORT, AdapterPair, expert_factors, open_adapter
from .formats.peft_adapter import adapter_modules, module_scaling
from .methods.base import factor_core
from .tensors import as_torch
from .verify import VerifyReport
from .precision import in_ieee_float32
from .svd import singular_values

# float32 factors: the error of a rounded factorization, relative to the update, is ~1e-7;
# as a share of energy (squared) far below this
SHARE_SLACK = 1e-8


@in_ieee_float32
def verify_lora(lora: str | os.PathLike[str], init: str | os.PathLike[str],
                finetuned: str | os.PathLike[str]) -> VerifyReport:
    """For each module (each expert) of the LoRA at `lora`: its error share
    ||dW - s'B'A'||_F^2 / ||dW||_F^2 against the exact update dW of `finetuned` over `init`
    is at most the best possible at its rank (Eckart-Young: the energy beyond its rank)
    plus float32 rounding, and equals what pissa_conversion.json records as dropped (a LoRA
    without it must be exact). Nothing is formed at the size of a weight."""
    lora = Path(lora)
    pair = AdapterPair(init, finetuned)
    checkpoint, config = open_adapter(lora)
    modules = adapter_modules(checkpoint, lora)
    report = VerifyReport()
    if set(modules) != set(pair.tuned_mods):
        only = sorted(set(modules) ^ set(pair.tuned_mods))[0]
        report.problems.append(f"module '{only}' is only in {lora if only in modules else pair.finetuned_dir}: "
                               "the LoRA is not a conversion of these adapters")
        return report
    record_path = lora / CONVERSION_REPORT
    recorded = json.loads(record_path.read_text())["modules"] if record_path.is_file() else None
    for module, (a_key, b_key) in modules.items():
        key = pair.pattern_key(module)
        scale = module_scaling(key, config["r"], config["lora_alpha"], dict(config.get("rank_pattern") or {}),
                               dict(config.get("alpha_pattern") or {}), bool(config.get("use_rslora")))[2]
        a, b = as_torch(checkpoint.buffer(a_key)), as_torch(checkpoint.buffer(b_key))
        experts, exact_scale = pair.experts_of(module), pair.scale(module)
        worst = 0.0
        for e, (ea, eb) in enumerate(pair.updates(module)):
            la, lb = expert_factors(a, b, experts, e) if experts > 1 else (a, b)
            s = singular_values(factor_core(ea * exact_scale, eb))
            total = float((s ** 2).sum())
            error = torch.linalg.matrix_norm(factor_core(torch.cat([ea.double() * exact_scale, la.double() * scale]),
                                                   torch.cat([eb.double(), -lb.double()], dim=1)))
            share = float(error ** 2) / total if total > 0 else float(error ** 2)
            rank = int((la.abs().sum(dim=1) > 0).sum())  # an expert's rows past its own rank: padding zeros
            best = float((s[rank:] ** 2).sum()) / total if total > 0 else 0.0
            where = f"{module}" + (f" expert {e}" if experts > 1 else "")
            if share > best + SHARE_SLACK:
                report.problems.append(f"{where}: drops {share:.3g} of the update's energy; the best rank-"
                                       f"{rank} LoRA drops {best:.3g}")
            worst = max(worst, share)
        expected = recorded[key]["dropped"] if recorded is not None and key in recorded else 0.0
        if abs(worst - expected) > SHARE_SLACK + 1e-6 * expected:
            report.problems.append(f"{module}: drops {worst:.6g} of the update's energy, "
                                   f"{CONVERSION_REPORT if recorded is not None else 'an exact conversion'} says "
                                   f"{expected:.6g}")
        report.checked_targets += 1
    return report
