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
from .convert import A_KEY
from .decompose import ADAPTER_SUBDIR
from .factors import scaling
from .merge import residual_weight_name
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
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
    from peft.utils.other import get_pattern_key

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
    for key in adapter.names():
        match = A_KEY.match(key)
        if match:
            tensor = residual_weight_name(residual, match["module"])
            if tensor is None:
                report.problems.append(f"adapter module '{match['module']}': no weight in {out}")
                continue
            targets[tensor] = (match["module"].removeprefix("base_model.model."), key,
                               key.replace(".lora_A", ".lora_B", 1))

    for info in original.tensors:
        name = info.name
        if name not in targets:
            if bytes(original.buffer(name)) != bytes(residual.buffer(name)):
                report.problems.append(f"{name}: pass-through tensor differs from {against}")
            report.checked_passthrough += 1
        else:
            module, a_key, b_key = targets[name]
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            a, b = as_torch(adapter.buffer(a_key)), as_torch(adapter.buffer(b_key))
            if a.shape[0] != r or b.shape[1] != r:
                report.problems.append(f"{name}: adapter rank {a.shape[0]} but adapter_config says r={r}")
                continue
            delta = (scaling(r, alpha, config.use_rslora) * b.float()) @ a.float()
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
