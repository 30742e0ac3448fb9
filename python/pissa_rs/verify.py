"""Check a decomposition against its original, out of core: every target
reconstructs W within the rounding of its dtype, every other tensor is
byte-identical, and the adapter config fits the adapter."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint
from .decompose import ADAPTER_SUBDIR
from .merge import residual_weight_name
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_modules, module_scaling
from .tensors import as_torch


@dataclass
class VerifyReport:
    checked_targets: int = 0
    checked_passthrough: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the tensor

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(out: str | os.PathLike[str], against: str | os.PathLike[str]) -> VerifyReport:
    """Compare a decomposition's OUT with the ORIGINAL checkpoint it came from.

    A target passes when |W - (W_res + s*B@A)| <= eps(dtype) * (|W_res| + |W|)
    elementwise (two roundings: the residual's and the original's at most).
    """
    from peft import LoraConfig

    out, against = Path(out), Path(against)
    report = VerifyReport()
    residual, original = Checkpoint(out), Checkpoint(against)
    adapter_dir = out / ADAPTER_SUBDIR
    adapter = Checkpoint(adapter_dir / ADAPTER_WEIGHTS)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    raw_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())

    layout = [(t.name, t.dtype, tuple(t.shape)) for t in original.tensors]
    if sorted(layout) != sorted((t.name, t.dtype, tuple(t.shape)) for t in residual.tensors):
        mine = {t.name: (t.dtype, tuple(t.shape)) for t in residual.tensors}
        for name, dtype, shape in layout:
            if mine.get(name) != (dtype, shape):
                report.problems.append(f"{name}: {mine.get(name)} in {out} but {(dtype, shape)} in {against}")
        extra = set(mine) - {n for n, _, _ in layout}
        report.problems += [f"{name}: in {out} but not in {against}" for name in sorted(extra)]
        return report

    targets = {}
    for module, (a_key, b_key) in adapter_modules(adapter, adapter_dir / ADAPTER_WEIGHTS).items():
        tensor = residual_weight_name(residual, module)
        if tensor is None:
            report.problems.append(f"adapter module '{module}': no weight in {out}")
            continue
        targets[tensor] = (module.removeprefix("base_model.model."), a_key, b_key)

    for info in original.tensors:
        name = info.name
        if name not in targets:
            if bytes(original.buffer(name)) != bytes(residual.buffer(name)):
                report.problems.append(f"{name}: pass-through tensor differs from {against}")
            report.checked_passthrough += 1
        else:
            module, a_key, b_key = targets[name]
            r, _, scale = module_scaling(module, config.r, config.lora_alpha, config.rank_pattern,
                                         config.alpha_pattern, config.use_rslora)
            a, b = as_torch(adapter.buffer(a_key)), as_torch(adapter.buffer(b_key))
            if a.shape[0] != r or b.shape[1] != r:
                report.problems.append(f"{name}: adapter rank {a.shape[0]} but adapter_config says r={r}")
                continue
            delta = (scale * b.float()) @ a.float()
            if raw_config.get("fan_in_fan_out"):
                delta = delta.T
            w = as_torch(original.buffer(name)).double()
            w_res = as_torch(residual.buffer(name)).double()
            error = (w - (w_res + delta.double())).abs()
            bound = torch.finfo(as_torch(original.buffer(name)).dtype).eps * (w_res.abs() + w.abs()) + 1e-30
            if not torch.all(error <= bound):
                worst = (error - bound).argmax().item()
                report.problems.append(
                    f"{name}: residual + s*B@A differs from {against} by {error.flatten()[worst].item():.3g} "
                    f"(allowed {bound.flatten()[worst].item():.3g})"
                )
            report.checked_targets += 1
        original.release(name)
        residual.release(name)
    return report
