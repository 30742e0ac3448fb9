"""Merge an adapter into its residual model, out of core: W = W_res + s*B@A,
for serving engines that take no adapters. Same streaming engine as decompose:
Rust copies every other tensor and writes results in the background."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._pissa_rs import Checkpoint, Pipeline
from .decompose import abandon, copy_model_files, writers_like
from .factors import round_difference
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterMismatchError, adapter_modules, module_scaling
from .tensors import TORCH_DTYPES, as_numpy_bytes, as_torch


def residual_weight_name(residual: Checkpoint, module: str) -> str | None:
    """The residual's weight for an adapter module ("base_model.model.<module>"):
    the same name, or without the head model's first component."""
    name = module.removeprefix("base_model.model.")
    for candidate in (f"{name}.weight", f"{name.split('.', 1)[-1]}.weight"):
        if candidate in residual:
            return candidate
    return None


def merge_adapter(residual_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                  out_dir: str | os.PathLike[str]) -> Path:
    """Write residual + adapter as one plain model to `out_dir` (same names, dtypes
    and shards as the residual). Merging an untrained pissa_init gives back the
    original model up to the weights' own rounding."""
    residual_dir, adapter_dir, out = Path(residual_dir), Path(adapter_dir), Path(out_dir)
    for needed in (adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG):
        if not needed.is_file():
            raise AdapterMismatchError(f"{needed}: missing")
    residual = Checkpoint(residual_dir)
    adapter = Checkpoint(adapter_dir / ADAPTER_WEIGHTS)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    r, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    fan_in_fan_out = config.get("fan_in_fan_out", False)

    jobs = []  # (residual tensor, lora_A key, lora_B key, scale)
    for module, (key, b_key) in adapter_modules(adapter, adapter_dir / ADAPTER_WEIGHTS).items():
        tensor = residual_weight_name(residual, module)
        if tensor is None:
            raise AdapterMismatchError(f"{adapter_dir}: module '{module}' has no weight in {residual_dir}")
        a_shape, b_shape = adapter.info(key).shape, adapter.info(b_key).shape
        w_shape = tuple(residual.info(tensor).shape)
        expected = (b_shape[0], a_shape[1]) if not fan_in_fan_out else (a_shape[1], b_shape[0])
        if w_shape != expected or a_shape[0] != b_shape[1]:
            raise AdapterMismatchError(
                f"module '{module}': adapter B{list(b_shape)} A{list(a_shape)} does not fit weight '{tensor}' "
                f"{list(w_shape)} of {residual_dir}"
            )
        _, _, scale = module_scaling(module.removeprefix("base_model.model."), r, alpha, rank_pattern,
                                     alpha_pattern, rslora)
        jobs.append((tensor, key, b_key, scale))

    out.mkdir(parents=True, exist_ok=True)
    writers = writers_like(residual, out)
    merged = {job[0] for job in jobs}
    pipeline = Pipeline(residual, [(i.name, writers[i.file], i.name) for i in residual.tensors if i.name not in merged])
    try:
        for tensor, a_key, b_key, scale in jobs:
            w = as_torch(residual.buffer(tensor))
            delta = (scale * as_torch(adapter.buffer(b_key)).float()) @ as_torch(adapter.buffer(a_key)).float()
            if fan_in_fan_out:
                delta = delta.T
            # W_res + delta, rounded once to the weight's dtype.
            merged_w, _ = round_difference(w.float(), -delta, TORCH_DTYPES[residual.info(tensor).dtype])
            pipeline.submit(writers[residual.info(tensor).file], tensor, as_numpy_bytes(merged_w), release=tensor)
        pipeline.finish()
        for writer in writers.values():
            writer.finalize()
    except BaseException as err:
        first = abandon(pipeline, writers.values(), err)
        if first is err:
            raise
        raise first from err
    copy_model_files(residual, residual_dir, out)
    return out
