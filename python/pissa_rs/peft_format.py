"""PEFT's adapter layout: key names in adapter_model.safetensors and the
adapter_config.json that PEFT's own LoraConfig writes and reads."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from ._pissa_rs import Checkpoint, PissaError
from .factors import scaling

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
A_KEY = re.compile(r"^(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight$")


class AdapterMismatchError(PissaError, ValueError):
    """The initial and fine-tuned adapters do not belong together, or the input is not a PiSSA adapter pair."""


def adapter_modules(adapter: Checkpoint, where: Path | str) -> dict[str, tuple[str, str]]:
    """Every module of an adapter file, as its keys name it ("base_model.model.<module>"),
    -> (lora_A key, lora_B key). An A without its B, or no module at all, is refused."""
    modules = {}
    for name in adapter.names():
        match = A_KEY.match(name)
        if match:
            b = name.replace(".lora_A", ".lora_B", 1)
            if b not in adapter:
                raise AdapterMismatchError(f"{where}: module '{match['module']}' has {name} but no {b}")
            modules[match["module"]] = (name, b)
    if not modules:
        raise AdapterMismatchError(f"{where}: no lora_A / lora_B weights found")
    return modules


def module_scaling(module: str, r: int, lora_alpha: float, rank_pattern: dict, alpha_pattern: dict,
                   use_rslora: bool) -> tuple[int, float, float]:
    """PEFT's rank, alpha and scale s for one module (its name in the model), rank_pattern
    and alpha_pattern applied as PEFT's LoRA layers apply them."""
    from peft.utils.other import get_pattern_key

    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), lora_alpha)
    return rank, alpha, scaling(rank, alpha, use_rslora)


def lora_a_key(module: str) -> str:
    """The key PeftModel.save_pretrained gives a module's lora_A."""
    return f"base_model.model.{module}.lora_A.weight"


def lora_b_key(module: str) -> str:
    return f"base_model.model.{module}.lora_B.weight"


def adapter_config(
    *,
    r: int,
    lora_alpha: float,
    target_modules: str | list[str],
    exclude_modules: str | list[str] | None,
    rank_pattern: dict[str, int] | None,
    alpha_pattern: dict[str, float] | None,
    use_rslora: bool,
    fan_in_fan_out: bool,
    task_type: str | None,
    base_model_name_or_path: str,
):
    """The config of an initialised PiSSA adapter, as PEFT expects to load it:
    init_lora_weights=True (the SVD is already done) and no dropout (dropping
    principal components at random would defeat PiSSA)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=sorted(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules,
        exclude_modules=exclude_modules,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        init_lora_weights=True,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )


def adapter_config_json(config) -> str:
    """adapter_config.json's text, as PEFT's own serializer writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return (Path(tmp) / ADAPTER_CONFIG).read_text()
