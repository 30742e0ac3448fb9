"""The mapping layer: which checkpoint tensors make up which model parameter.

The model is the class config.json names (`architectures[0]`), built on the meta
device; checkpoint names become parameter names through transformers' own
conversion mapping (the renames it applies at load, e.g. Mixtral's
`block_sparse_moe.` -> `mlp.`, legacy names, a base model's prefix added or
dropped). Tensors that transformers merges into one parameter at load (fused MoE
experts) are kept apart: they are not one weight to decompose.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint
from .noise import quiet_library_noise


def model_class_for(config):
    """The class config.json names, if transformers has it; else None."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "_from_config"):
            return cls
    return None


def _task_type(model) -> str | None:
    """PEFT's task type for the model: CAUSAL_LM for causal LMs, SEQ_2_SEQ_LM for encoder-decoders."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    name = type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "CAUSAL_LM"
    if name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values():
        return "SEQ_2_SEQ_LM"
    return None


def meta_model(config_dir: str | Path):
    """(model on the meta device, PEFT task type). Cached while config.json is unchanged."""
    path = Path(config_dir) / "config.json"
    return _meta_model_cached(str(config_dir), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _meta_model_cached(config_dir: str, _mtime_ns: int):
    with quiet_library_noise():
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    cls = model_class_for(config)
    with torch.device("meta"):
        if cls is not None:
            model = cls._from_config(config)
        else:  # config.json names no class transformers knows: what the auto classes build
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    return model, _task_type(model)


@dataclass
class CheckpointMapping:
    """Which checkpoint tensor holds which model parameter."""

    architecture: str
    task_type: str | None
    tensor_of: dict[str, str] = field(default_factory=dict)  # parameter -> the one tensor holding it
    merged: dict[str, list[str]] = field(default_factory=dict)  # parameter -> tensors merged into it at load

    def module_weight(self, module: str) -> str | None:
        """The checkpoint tensor of `module`'s weight, or None when the checkpoint lacks it
        (or holds it only merged with others)."""
        return self.tensor_of.get(f"{module}.weight")


def checkpoint_mapping(model, checkpoint: Checkpoint) -> CheckpointMapping:
    """Every checkpoint tensor through transformers' own load-time renaming of `model`."""
    with quiet_library_noise():
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    params = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    mapping = CheckpointMapping(type(model).__name__, _task_type(model))
    for name in checkpoint.names():
        param, merged_by = rename_source_key(name, renamings, converters, prefix, params)
        if merged_by is not None:
            mapping.merged.setdefault(param, []).append(name)
        elif param in params:  # otherwise no parameter of this model (a head it lacks): passed through
            mapping.tensor_of[param] = name
    return mapping


def model_mapping(checkpoint: Checkpoint, config_dir: str | Path):
    """(meta model, its CheckpointMapping) for a checkpoint with a config.json."""
    model, _ = meta_model(config_dir)
    return model, checkpoint_mapping(model, checkpoint)
