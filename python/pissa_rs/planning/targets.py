"""Which checkpoint tensors PiSSA decomposes: PEFT's target_modules semantics,
applied to a model built on the meta device from config.json (no weights)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._pissa_rs import Checkpoint, PissaError
from ..formats.bnb_serialized import StoredQuantized
from ..formats.peft_adapter import module_scaling
from .mapping import ExpertLayoutError, Piece, WeightRead, expert_reads, meta_model, model_mapping, plain_or_encoded
from ..formats.sources import SourceFormatError, source_format
from .. import compat
from ..noise import quiet_library_noise

# PEFT and transformers are imported inside the functions that use them: a
# decomposition can plan in a child process and never hold them (~250 MB).

DECOMPOSABLE_DTYPES = ("F32", "F16", "BF16")
READABLE_FORMATS = ("floating point, FP8 (fine-grained blocks; compressed-tensors per tensor or channel), MXFP4, "
                    "compressed-tensors pack-quantized INT2/4/8, GPTQ (2/4/8-bit, gptq and gptq_v2 formats), AWQ "
                    "(4-bit GEMM) and pre-quantized bitsandbytes (nf4 / fp4, double quant, int8)")


class TargetError(PissaError, ValueError):
    """target_modules, rank or dtype choices that cannot be applied to this checkpoint."""


@dataclass(frozen=True)
class Target:
    """One matrix to decompose: a module's weight, or one expert of a parameter
    PEFT adapts through target_parameters (a ParamWrapper: MoE experts, routers)."""

    module: str  # the LoRA layer's name in the model: adapter keys are built from it
    tensor: str  # the weight's name in the checkpoint; for an expert, "<parameter>[e]"
    shape: tuple[int, int]  # as stored
    dtype: str
    fan_in_fan_out: bool  # stored in x out (GPT-2 Conv1D; GPT-OSS's experts)
    r: int
    lora_alpha: float
    location: WeightRead | None = None  # where its bytes are, if not the whole of `tensor`
    parameter: str | None = None  # the parameter a ParamWrapper adapts (None: a module's weight)
    expert: int | None = None  # its index among the parameter's experts
    num_experts: int = 1
    quantized_at_load: bool = True  # whether transformers' bitsandbytes loading quantizes it (QPiSSA applies)

    def weight_read(self, checkpoint: Checkpoint) -> WeightRead:
        if self.location is not None:
            return self.location
        info = checkpoint.info(self.tensor)
        return WeightRead((Piece(self.tensor, 0, info.nbytes),), info.dtype, self.shape)

    def as_record(self) -> dict:
        """What the report says of it beyond a plain module weight: the parameter it is (one
        expert) of, and where its bytes are and how they decode (experts, FP8 / MXFP4)."""
        record = {}
        if self.parameter is not None:
            record.update(parameter=self.parameter, expert=self.expert, num_experts=self.num_experts)
        if self.location is not None:
            record.update(self.location.as_record())
        return record


@dataclass(frozen=True)
class TargetSelection:
    targets: list[Target]
    task_type: str | None  # "CAUSAL_LM" when the model is a causal LM
    architecture: str | None
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (module or parameter, why not decomposed)
    rank_limited: list[str] = field(default_factory=list)  # modules whose smaller dimension is below r
    other_modules: list[str] = field(default_factory=list)  # every module of the model that is no target
    target_parameters: list[str] = field(default_factory=list)  # as adapter_config.json lists them
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT's (fused experts) and parameters below r
    alpha_pattern: dict[str, float] = field(default_factory=dict)


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


def peft_converted(lora_config, model, where):
    """The config as PEFT itself rewrites it for this model before building layers
    (transformers 5's fused MoE experts: v4 names such as w1/w3/gate_proj/up_proj
    become target_parameters, with the fused pair's rank and alpha doubled)."""
    import copy

    config = copy.deepcopy(lora_config)
    try:
        compat.convert_config_for_transformers(config, model)
    except ValueError as err:  # e.g. half of a fused pair named
        raise TargetError(f"{where}: PEFT cannot apply these target_modules to this model: {err}") from None
    return config


def _matches(entry: str, name: str) -> bool:
    """PEFT's rule for one entry of a target_modules / exclude_modules list: the whole
    name, or its last dotted parts."""
    return name == entry or name.endswith("." + entry)


def check_list_entries(field: str, entries, converted, names: list[str], where,
                       hint_names: list[str] | None = None) -> None:
    """Every entry of a target_modules / exclude_modules *list* must match a module (a
    regex or "all-linear" keeps PEFT's meaning): PEFT drops an entry that matches nothing
    in silence, so `querry,value` would decompose `value` alone. Entries PEFT's own
    conversion moved elsewhere (MoE experts become target_parameters) matched. The
    closest of `hint_names` (default: `names`) are suggested."""
    import difflib

    if not isinstance(entries, (list, tuple, set)):
        return
    still = set(converted) if isinstance(converted, (list, tuple, set)) else set()
    for entry in sorted(entries):
        if entry not in still or any(_matches(entry, n) for n in names):
            continue
        hints = hint_names if hint_names is not None else names
        leaves = sorted({n.rsplit(".", 1)[-1] for n in hints})
        close = difflib.get_close_matches(entry, leaves, n=3, cutoff=0.6)
        close = close or difflib.get_close_matches(entry, hints, n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                else f"its linear modules end in: {', '.join(leaves[:20])}")
        raise TargetError(f"{where}: {field} entry '{entry}' matched no module of this model; {hint}")


def _matching_parameters(model, wanted) -> list[str]:
    """Full names of the parameters a target_parameters list picks, PEFT's way (whole name or suffix)."""
    return [name for name, _ in model.named_parameters() if any(_matches(w, name) for w in wanted or ())]


def _param_wrappers(model, config) -> list[tuple[str, str, int, float, int, bool]]:
    """PEFT's own LoRA layers for `config`'s target_parameters, built on a copy of the
    meta model: (layer name, parameter name, r, alpha, experts, stored in x out) each.
    The layer names are those PEFT's keys use: several parameters of one module nest,
    the later parameter's wrapper outside (`experts`), the earlier inside (`experts.base_layer`)."""
    import copy

    with quiet_library_noise():
        from peft import get_peft_model
        from peft.tuners.lora.layer import ParamWrapper

    with torch.device("meta"), quiet_library_noise():
        peft_model = get_peft_model(copy.deepcopy(model), config)
    found = []
    for name, layer in peft_model.named_modules():
        if isinstance(layer, ParamWrapper):
            module = name.removeprefix("base_model.model.")
            param = f"{module.replace('.base_layer', '')}.{layer.parameter_name}"
            found.append((module, param, layer.r["default"], layer.lora_alpha["default"], layer.num_experts,
                          layer.num_experts > 1 and not compat.swapped_in_out(layer)))
    return found


def _parameter_targets(checkpoint, model, mapping, converted, *, r, lora_alpha, use_rslora, named: bool,
                       exclude_parameters, where, fmt) -> tuple[list[Target], list[tuple[str, str]], dict, list[str]]:
    """The targets of every parameter PEFT adapts through target_parameters, one per
    expert: (targets, left out, rank_pattern entries for parameters smaller than r,
    the parameters' names as adapter_config.json lists them)."""
    with quiet_library_noise():
        from peft import LoraConfig

    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    params = _matching_parameters(model, converted.target_parameters)
    excluded = set(_matching_parameters(model, exclude_parameters))
    left_out = [(p, "excluded by exclude_parameters") for p in params if p in excluded]
    usable, reads = [], {}
    for param in params:
        if param in excluded:
            continue
        if len(shapes[param]) not in (2, 3):
            raise TargetError(f"{where}: target parameter {param} is {list(shapes[param])}; PiSSA needs a 2-D "
                              "weight or a 3-D stack of experts")
        try:
            reads[param] = expert_reads(mapping, checkpoint, param, shapes[param], fmt)
        except SourceFormatError as err:
            raise TargetError(str(err)) from None
        except ExpertLayoutError as err:
            if named:
                raise TargetError(str(err)) from None
            left_out.append((param, str(err)))
            continue
        for read in reads[param]:
            if read.dtype not in DECOMPOSABLE_DTYPES:
                piece = read.pieces[0]
                raise TargetError(f"{checkpoint.info(piece.tensor).file}: target tensor '{piece.tensor}' is "
                                  f"{read.dtype}; PiSSA needs a {'/'.join(DECOMPOSABLE_DTYPES)} weight")
        usable.append(param)
    rank_pattern = dict(converted.rank_pattern or {})
    clamps = {}
    for param in usable:
        rank, _, _ = module_scaling(param, r, lora_alpha, rank_pattern, converted.alpha_pattern or {}, use_rslora)
        limit = min(shapes[param][-2:])
        if rank > limit:
            clamps[param] = limit
    if not usable:
        return [], left_out, {}, []
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=[], target_parameters=sorted(usable),
                        rank_pattern={**clamps, **rank_pattern}, alpha_pattern=dict(converted.alpha_pattern or {}),
                        use_rslora=use_rslora, init_lora_weights=False)
    targets = []
    for module, param, rank, alpha, experts, transposed in _param_wrappers(model, config):
        for e, read in enumerate(reads[param]):
            is_expert = len(shapes[param]) == 3
            tensor = f"{param}[{e}]" if is_expert else read.pieces[0].tensor
            whole = not is_expert and read.decode is None and read.pieces[0].start == 0 and len(read.pieces) == 1
            targets.append(Target(module, tensor, read.shape, read.dtype, transposed, rank, alpha,
                                  None if whole else read, param, e if is_expert else None, experts,
                                  quantized_at_load=False))
    # As adapter_config.json lists them: PEFT's own names where they pick exactly these, else every name.
    listed = sorted(converted.target_parameters or [])
    if set(_matching_parameters(model, listed)) != set(usable):
        listed = sorted(usable)
    return targets, left_out, clamps, listed


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
    target_parameters: list[str] | None = None,
    exclude_parameters: list[str] | None = None,
) -> TargetSelection:
    """The weights to decompose, each with its rank and alpha, as PEFT would pick them
    on the model config.json names; what PEFT would pick but cannot be decomposed here
    (or is not in the checkpoint) is listed in `left_out`, never dropped in silence."""
    where = checkpoint.index_path or checkpoint.files[0]
    fmt = source_format(config_dir)
    if fmt.kind is not None and fmt.codec is None:  # before any target is looked at: the whole model is
        raise TargetError(f"{Path(config_dir) / 'config.json'}: the checkpoint is {fmt.describe()}; pissa_rs reads "
                          f"{READABLE_FORMATS} (docs/limits.md)")
    if target_modules is None:
        raise TargetError(f"{where}: target_modules is required")
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = sorted(target_modules)
    lora_config = lora_config_for(r, lora_alpha, target_modules, exclude_modules, rank_pattern, alpha_pattern, use_rslora)
    config_path = Path(config_dir) / "config.json" if config_dir else None
    named = _names_modules(target_modules)
    param_targets: list[Target] = []
    listed_parameters: list[str] = []
    patterns: tuple[dict, dict] = ({}, {})
    clamps: dict[str, int] = {}

    found: list[tuple[str, str, bool]] = []  # (module, tensor, fan_in_fan_out)
    left_out: list[tuple[str, str]] = []  # (module or parameter, why)
    task_type = architecture = None
    other_modules: list[str] = []
    if config_path is not None and config_path.is_file():
        with quiet_library_noise():
            from transformers.pytorch_utils import Conv1D

        model, mapping = model_mapping(checkpoint, config_path.parent)
        task_type, architecture = mapping.task_type, mapping.architecture
        lora_config.target_parameters = list(target_parameters or [])
        # What PEFT itself makes of the config on this model: MoE experts and routers
        # become target_parameters, and leave target_modules.
        lora_config = peft_converted(lora_config, model, where)
        param_targets, param_left_out, clamps, listed_parameters = _parameter_targets(
            checkpoint, model, mapping, lora_config, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
            named=bool(target_parameters), exclude_parameters=exclude_parameters, where=where, fmt=fmt)
        module_names = [name for name, _ in model.named_modules() if name]
        linear = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
        check_list_entries("target_modules", target_modules, lora_config.target_modules, module_names, where, linear)
        check_list_entries("exclude_modules", exclude_modules, exclude_modules, module_names, where, linear)
        patterns = ({**clamps, **(lora_config.rank_pattern or {})}, dict(lora_config.alpha_pattern or {}))
        if isinstance(lora_config.target_modules, set):
            lora_config.target_modules = sorted(lora_config.target_modules)
        lora_config = compat.include_all_linear(lora_config, model)
        for name, module in model.named_modules():
            if not name or not compat.target_module_exists(lora_config, name):
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
        left_out += param_left_out
        if not target_parameters:  # experts PEFT's expansion leaves alone on this model type
            adapted = {t.parameter for t in param_targets} | {p for p, _ in param_left_out}
            left_out += [(name, "a stack of experts this target_modules does not pick on this model type "
                                "(PEFT's own expansion leaves it too); name it in target_parameters to adapt it")
                         for name, p in model.named_parameters() if p.dim() == 3 and name not in adapted]
    else:
        if not named:
            raise TargetError(
                f"{where}: target_modules='all-linear' needs the model's config.json to tell linear layers "
                "from others; pass explicit target_modules (e.g. ['q_proj', 'v_proj']) or config_dir"
            )
        weights = [info.name[: -len(".weight")] for info in checkpoint.tensors if info.name.endswith(".weight")]
        check_list_entries("target_modules", target_modules, target_modules, weights, where)
        check_list_entries("exclude_modules", exclude_modules, exclude_modules, weights, where)
        for info in checkpoint.tensors:
            if info.name.endswith(".weight") and compat.target_module_exists(lora_config, info.name[: -len(".weight")]):
                found.append((info.name[: -len(".weight")], info.name, False))

    if not found and not param_targets:
        raise TargetError(f"{where}: target_modules={target_modules!r} matched no module"
                          + (f" with a weight to decompose (left out: {left_out[0][0]}: {left_out[0][1]})"
                             if left_out else ""))

    targets, rank_limited, refused = [], [], None
    for module, tensor, fan_in_fan_out in found:
        info = checkpoint.info(tensor)
        read = None
        if fmt.codec is not None and fmt.codec.holds_codes(info):
            try:  # stored encoded (FP8, packed INT): read as codes and scales, decomposed dequantized
                read = plain_or_encoded(checkpoint, fmt, [tensor], None, where)
            except (SourceFormatError, ExpertLayoutError) as err:
                raise TargetError(str(err)) from None
            read = read if read.decode is not None else None
        if len(info.shape) != 2 or (info.dtype not in DECOMPOSABLE_DTYPES and read is None):
            raise TargetError(
                f"{info.file}: target tensor '{tensor}' is {info.dtype} x {list(info.shape)}; "
                f"PiSSA needs a 2-D {'/'.join(DECOMPOSABLE_DTYPES)} weight, or FP8 / MXFP4 / packed INT with their "
                f"scales (config.json: {fmt.describe()})"
            )
        shape = read.shape if read else tuple(info.shape)
        rank, alpha, _ = module_scaling(module, r, lora_alpha, lora_config.rank_pattern, lora_config.alpha_pattern,
                                        use_rslora)
        limit = min(shape)
        if not 1 <= rank <= limit:
            refused = refused or (f"{info.file}: tensor '{tensor}' of shape {list(shape)} cannot take rank {rank}: "
                                  f"r must be in [1, {limit}]")
        if rank > limit:  # a weight smaller than r: its whole spectrum, at rank = its smaller dimension
            rank_limited.append(module)
            rank = limit
        targets.append(Target(module, tensor, shape, read.dtype if read else info.dtype, fan_in_fan_out,
                              rank, alpha, read))
    if refused and (len(rank_limited) == len(targets) or any(t.r < 1 for t in targets)):
        raise TargetError(f"{refused}; no target can take that rank")  # a mistake, not a few small weights
    rank_limited += sorted(clamps)
    return TargetSelection(targets + param_targets, task_type, architecture, left_out, rank_limited, other_modules,
                      listed_parameters, *patterns)


def bnb_quantized_weights(checkpoint: Checkpoint, config_dir: str | Path) -> list[StoredQuantized]:
    """The weights transformers quantizes when it loads this model with a
    BitsAndBytesConfig: every nn.Linear / Conv1D but the modules its quantizer keeps
    (output head, tied weights, the model's _keep_in_fp32_modules), decided by
    transformers' own functions on the meta-device model."""
    with quiet_library_noise():
        from transformers.pytorch_utils import Conv1D

    model, mapping = model_mapping(checkpoint, config_dir)
    keep = compat.modules_not_quantized(model)
    found = []
    for name, module in model.named_modules():
        if not (isinstance(module, Conv1D) or type(module) is torch.nn.Linear) or not compat.should_quantize(name, keep):
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
        from transformers.pytorch_utils import Conv1D

    model, _ = meta_model(config_dir)
    linear = [name for name, m in model.named_modules() if name and isinstance(m, (torch.nn.Linear, Conv1D))]
    expanded = compat.include_all_linear(lora_config_for(8, 8, "all-linear", None, None, None, False), model)
    all_linear = sorted(expanded.target_modules, key=linear.index)
    by_suffix: dict[str, list[str]] = {}
    for name in linear:
        by_suffix.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return TargetChoices(type(model).__name__, all_linear, by_suffix, head_name)
