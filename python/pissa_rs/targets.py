"""Which checkpoint tensors PiSSA decomposes: PEFT's target_modules semantics,
applied to a model built on the meta device from config.json (no weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint, PissaError
from .bnb_format import StoredQuantized
from .peft_format import module_scaling
from .mapping import meta_model, model_mapping
from .noise import quiet_library_noise

# PEFT and transformers are imported inside the functions that use them: a
# decomposition can plan in a child process and never hold them (~250 MB).

DECOMPOSABLE_DTYPES = ("F32", "F16", "BF16")


class TargetError(PissaError, ValueError):
    """target_modules, rank or dtype choices that cannot be applied to this checkpoint."""


@dataclass(frozen=True)
class Target:
    module: str  # the module's name in the model: adapter keys are built from it
    tensor: str  # the weight's name in the checkpoint
    shape: tuple[int, int]  # as stored
    dtype: str
    fan_in_fan_out: bool  # GPT-2 Conv1D: stored in x out
    r: int
    lora_alpha: float


@dataclass(frozen=True)
class TargetPlan:
    targets: list[Target]
    task_type: str | None  # "CAUSAL_LM" when the model is a causal LM
    architecture: str | None
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (module or parameter, why not decomposed)
    rank_limited: list[str] = field(default_factory=list)  # modules whose smaller dimension is below r
    other_modules: list[str] = field(default_factory=list)  # every module of the model that is no target


def lora_config_for(r, lora_alpha, target_modules, exclude_modules, rank_pattern, alpha_pattern, use_rslora):
    with quiet_library_noise():
        from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=target_modules, exclude_modules=exclude_modules,
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, use_rslora=use_rslora,
    )


def _names_modules(target_modules) -> bool:
    """Whether target_modules names modules itself (a list or regex), rather than "all-linear"."""
    return not (isinstance(target_modules, str) and target_modules.lower() == "all-linear")


def _peft_target_parameters(lora_config, model) -> list[str]:
    """The parameters PEFT's own expansion of this config targets through target_parameters
    (fused MoE experts, routers that are not Linear layers), by full name."""
    import copy

    with quiet_library_noise():
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    config = copy.deepcopy(lora_config)
    try:
        convert_peft_config_for_transformers(config, model, None)
    except ValueError:  # PEFT refuses half of a fused pair: nothing PEFT could target to list here
        return []
    wanted = set(getattr(config, "target_parameters", None) or [])
    return [name for name, _ in model.named_parameters()
            if any(name == w or name.endswith("." + w) for w in wanted)]


def resolve_targets(
    checkpoint: Checkpoint,
    *,
    r: int,
    lora_alpha: float,
    target_modules: str | list[str] | None = "all-linear",
    exclude_modules: str | list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    config_dir: str | Path | None = None,
) -> TargetPlan:
    """The weights to decompose, each with its rank and alpha, as PEFT would pick them
    on the model config.json names; what PEFT would pick but cannot be decomposed here
    (or is not in the checkpoint) is listed in `left_out`, never dropped in silence."""
    with quiet_library_noise():
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    where = checkpoint.index_path or checkpoint.files[0]
    if target_modules is None:
        raise TargetError(f"{where}: target_modules is required")
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = sorted(target_modules)
    lora_config = lora_config_for(r, lora_alpha, target_modules, exclude_modules, rank_pattern, alpha_pattern, use_rslora)
    as_given = lora_config_for(r, lora_alpha, target_modules, exclude_modules, rank_pattern, alpha_pattern, use_rslora)
    config_path = Path(config_dir) / "config.json" if config_dir else None
    named = _names_modules(target_modules)

    found: list[tuple[str, str, bool]] = []  # (module, tensor, fan_in_fan_out)
    left_out: list[tuple[str, str]] = []  # (module or parameter, why)
    task_type = architecture = None
    other_modules: list[str] = []
    if config_path is not None and config_path.is_file():
        with quiet_library_noise():
            from transformers.pytorch_utils import Conv1D

        model, mapping = model_mapping(checkpoint, config_path.parent)
        task_type, architecture = mapping.task_type, mapping.architecture
        lora_config = _maybe_include_all_linear_layers(lora_config, model)
        for name, module in model.named_modules():
            if not name or not check_target_module_exists(lora_config, name):
                if name:
                    other_modules.append(name)
                continue
            if not isinstance(module, (torch.nn.Linear, Conv1D)):
                raise TargetError(
                    f"{where}: target module '{name}' is a {type(module).__name__}, not a Linear or Conv1D layer; "
                    "PiSSA decomposes linear weights only"
                )
            tensor = mapping.module_weight(name)
            if tensor is None:
                if named:
                    raise TargetError(f"{where}: target module '{name}' has no weight tensor in the checkpoint "
                                      f"(its parameter {name}.weight is not among the checkpoint's tensors)")
                left_out.append((name, "its weight is not in the checkpoint (saved from another model class?)"))
                other_modules.append(name)
                continue
            found.append((name, tensor, isinstance(module, Conv1D)))
        left_out += [(p, "a parameter PEFT targets through target_parameters (MoE experts, routers); "
                         "not decomposed yet") for p in _peft_target_parameters(as_given, model)]
    else:
        if not named:
            raise TargetError(
                f"{where}: target_modules='all-linear' needs the model's config.json to tell linear layers "
                "from others; pass explicit target_modules (e.g. ['q_proj', 'v_proj']) or config_dir"
            )
        for info in checkpoint.tensors:
            if info.name.endswith(".weight") and check_target_module_exists(lora_config, info.name[: -len(".weight")]):
                found.append((info.name[: -len(".weight")], info.name, False))

    if not found:
        raise TargetError(f"{where}: target_modules={target_modules!r} matched no module"
                          + (f" with a weight to decompose (left out: {left_out[0][0]}: {left_out[0][1]})"
                             if left_out else ""))

    targets, rank_limited, refused = [], [], None
    for module, tensor, fan_in_fan_out in found:
        info = checkpoint.info(tensor)
        if len(info.shape) != 2 or info.dtype not in DECOMPOSABLE_DTYPES:
            raise TargetError(
                f"{info.file}: target tensor '{tensor}' is {info.dtype} x {list(info.shape)}; "
                f"PiSSA needs a 2-D {'/'.join(DECOMPOSABLE_DTYPES)} weight"
            )
        rank, alpha, _ = module_scaling(module, r, lora_alpha, lora_config.rank_pattern, lora_config.alpha_pattern,
                                        use_rslora)
        limit = min(info.shape)
        if not 1 <= rank <= limit:
            refused = refused or (f"{info.file}: tensor '{tensor}' of shape {list(info.shape)} cannot take rank {rank}: "
                                  f"r must be in [1, {limit}]")
        if rank > limit:  # a weight smaller than r: its whole spectrum, at rank = its smaller dimension
            rank_limited.append(module)
            rank = limit
        targets.append(Target(module, tensor, tuple(info.shape), info.dtype, fan_in_fan_out, rank, alpha))
    if refused and (len(rank_limited) == len(targets) or any(t.r < 1 for t in targets)):
        raise TargetError(f"{refused}; no target can take that rank")  # a mistake, not a few small weights
    return TargetPlan(targets, task_type, architecture, left_out, rank_limited, other_modules)


def bnb_quantized_weights(checkpoint: Checkpoint, config_dir: str | Path) -> list[StoredQuantized]:
    """The weights transformers quantizes when it loads this model with a
    BitsAndBytesConfig: every nn.Linear / Conv1D but the modules its quantizer keeps
    (output head, tied weights, the model's _keep_in_fp32_modules), decided by
    transformers' own functions on the meta-device model."""
    with quiet_library_noise():
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

    model, mapping = model_mapping(checkpoint, config_dir)
    keep = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    found = []
    for name, module in model.named_modules():
        if not (isinstance(module, Conv1D) or type(module) is torch.nn.Linear) or not should_convert_module(name, keep):
            continue
        tensor = mapping.module_weight(name)
        if tensor is None:
            continue  # not in this checkpoint: transformers has nothing to quantize there either
        info = checkpoint.info(tensor)
        if len(info.shape) != 2 or info.dtype not in DECOMPOSABLE_DTYPES:
            raise TargetError(f"{info.file}: tensor '{tensor}' is {info.dtype} x {list(info.shape)}; bitsandbytes "
                              f"quantizes 2-D {'/'.join(DECOMPOSABLE_DTYPES)} weights")
        found.append(StoredQuantized(tensor, tuple(info.shape), info.dtype, isinstance(module, Conv1D)))
    return found


@dataclass(frozen=True)
class TargetChoices:
    """What each common target_modules value would pick in one model."""

    architecture: str
    all_linear: list[str]  # module names "all-linear" picks
    by_suffix: dict[str, list[str]]  # linear module suffix ("q_proj") -> module names
    output_head: str | None  # the head "all-linear" leaves out


def target_choices(config_dir: str | Path) -> TargetChoices:
    """The linear modules of the model config.json describes, grouped the ways
    target_modules can name them, with PEFT's own "all-linear" expansion."""
    with quiet_library_noise():
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
        from transformers.pytorch_utils import Conv1D

    model, _ = meta_model(config_dir)
    linear = [name for name, m in model.named_modules() if name and isinstance(m, (torch.nn.Linear, Conv1D))]
    expanded = _maybe_include_all_linear_layers(lora_config_for(8, 8, "all-linear", None, None, None, False), model)
    all_linear = sorted(expanded.target_modules, key=linear.index)
    by_suffix: dict[str, list[str]] = {}
    for name in linear:
        by_suffix.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return TargetChoices(type(model).__name__, all_linear, by_suffix, head_name)
