"""`pissa-rs qerror`: the paper's quantization-error reduction of any residual +
adapter pair on disk against its original, one weight at a time (out of core)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._pissa_rs import Checkpoint
from .formats.bnb_serialized import read_weight
from .hub import resolve_model
from .constants import ADAPTER_SUBDIR
from .report import OutputReport
from .formats.peft_adapter import ADAPTER_WEIGHTS, adapter_targets
from .quant import Quantization, quantization_error
from .tensors import as_torch
from .precision import in_ieee_float32


@in_ieee_float32
def measure_quantization_error(out: str | os.PathLike[str], against: str | os.PathLike[str],
                               quantize: str | None = None, double_quant: bool | None = None,
                               device: str = "cpu", revision: str | None = None,
                               progress: bool = True) -> dict[str, Any]:
    """For every adapter module of OUT: ||W - (deq(quant(W_res)) + s*B@A)||_*, QLoRA's
    ||W - deq(quant(W))||_* and 1 - their ratio, W from `against`. `quantize` and
    `double_quant` default to what OUT's report names (else nf4, no double quant).
    Two full SVDs per weight: a progress bar on stderr unless `progress=False`."""
    from tqdm.auto import tqdm

    out, against = Path(out), resolve_model(against, revision)  # against: a path or a Hub model ID
    held = OutputReport.read(out)
    kind = quantize or held.options.get("quantize") or "nf4"
    if double_quant is None:
        double_quant = held.made_for_double_quant(kind)
    quant = Quantization(kind, double_quant=double_quant)
    storage, stored = held.storage, held.stored
    if storage is not None and storage != quant:
        raise ValueError(f"{out}: its residual is stored quantized as {storage.kind}"
                         f"{' with double quantization' if storage.double_quant else ''}; it cannot be measured "
                         f"as {quant.kind}{' with double quantization' if quant.double_quant else ''}")
    residual, original = Checkpoint(out), Checkpoint(against)
    adapter_dir = out / ADAPTER_SUBDIR
    adapter = Checkpoint(adapter_dir / ADAPTER_WEIGHTS)
    rows = []
    # Experts and routers stay unquantized when transformers loads with bitsandbytes: nothing to measure.
    targets = [t for t in adapter_targets(adapter_dir, adapter, residual, out) if t.quantized_at_load]
    for target in tqdm(targets, desc="qerror", unit="weight", disable=not progress):
        if target.location is not None:  # stored in FP8: W is the dequantized source weight
            w, w_res = target.weight(original).to(device), target.weight(residual, residual=True).to(device)
        else:
            w = as_torch(original.buffer(target.tensor)).to(device)
            # A residual stored quantized is measured as stored: what the model computes with.
            w_res = read_weight(residual, target.tensor, storage, stored).to(device)
        lora_A = as_torch(adapter.buffer(target.a_key)).to(device)
        lora_B = as_torch(adapter.buffer(target.b_key)).to(device)
        with torch.no_grad():
            measured = quantization_error(w, w_res, lora_A, lora_B, target.scale, quant, target.fan_in_fan_out,
                                          residual_is_dequantized=target.tensor in stored)
        rows.append({"tensor": target.tensor, "quant_error": measured.error, "qlora_error": measured.qlora_error,
                     "error_reduction": measured.reduction})
        if target.location is None:
            original.release(target.tensor)
            residual.release(target.tensor)
    return {
        "quantize": kind,
        "double_quant": double_quant,
        "error_reduction_mean": sum(r["error_reduction"] for r in rows) / max(len(rows), 1),
        "tensors": rows,
    }
