"""Ranks a method chooses from its results (extract's energy share), applied at the commit:
each chosen target keeps its leading triplets, its record says so, and adapter_config.json's
rank_pattern / alpha_pattern hold the ranks with each module's scale unchanged (the factors
were computed with it)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

from ..factors import scaling
from .units import OutputSpec


def alpha_for(scale: float, r: int, use_rslora: bool) -> float:
    """The lora_alpha that gives scale s at rank r (PEFT's s = alpha / r, or alpha / sqrt(r))."""
    return scale * math.sqrt(r) if use_rslora else scale * r


def with_chosen_ranks(spec: OutputSpec, records: list[dict], chosen: dict[int, int]
                      ) -> tuple[OutputSpec, list[dict]]:
    """`spec` and `records` with target i at rank chosen[i] (<= its planned r)."""
    rslora = spec.options.use_rslora
    targets, records = list(spec.plan.targets), [dict(r) for r in records]
    for i, k in chosen.items():
        target, record = targets[i], records[i]
        if not 1 <= k <= target.r:
            raise ValueError(f"{target.tensor}: a chosen rank {k} is outside 1..{target.r}")
        scale = scaling(target.r, target.lora_alpha, rslora)
        targets[i] = replace(target, r=k, lora_alpha=alpha_for(scale, k, rslora))
        s2 = [v * v for v in record["singular_values"]]
        held = sum(s2)
        kept = sum(s2[:k]) / (held / record["energy_kept"]) if held > 0 and record["energy_kept"] > 0 else 1.0
        record.update(r=k, lora_alpha=targets[i].lora_alpha, singular_values=record["singular_values"][:k],
                      energy_kept=kept, rank_chosen_from=target.r)
    config = json.loads(spec.plan.adapter_config_json)
    by_module = {targets[i].module: targets[i] for i in chosen}
    if len(chosen) == len(targets):  # every module chosen: r is the largest rank, as a server reads it
        top = max(t.r for t in by_module.values())
        default_scale = scaling(config["r"], config["lora_alpha"], rslora)
        config["r"], config["lora_alpha"] = top, alpha_for(default_scale, top, rslora)
    r, alpha = config["r"], config["lora_alpha"]
    # PEFT applies the first pattern that matches a module, and the file's keys are sorted: the
    # patterns that matched a chosen module go, its exact name takes their place
    for field, value, default in (("rank_pattern", "r", r), ("alpha_pattern", "lora_alpha", alpha)):
        kept = {key: v for key, v in (config.get(field) or {}).items()
                if not any(re.match(rf"(.*\.)?({key})$", m) for m in by_module)}
        chosen_keys = {re.escape(m): getattr(t, value) for m, t in by_module.items() if getattr(t, value) != default}
        config[field] = {**kept, **chosen_keys}
    plan = replace(spec.plan, targets=targets, adapter_config_json=json.dumps(config, indent=2, sort_keys=True))
    return replace(spec, plan=plan), records
