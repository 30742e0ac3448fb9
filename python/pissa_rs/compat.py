"""Every internal of PEFT and transformers pissa_rs relies on, in one place: each looked up
by name, so a release that moves or renames one fails here with the function and the
library's version named (tests/test_compat.py calls each one), not deep inside a run."""

from __future__ import annotations

import importlib
from typing import Any

from ._pissa_rs import PissaError
from .noise import quiet_library_noise


class LibraryInternalsError(PissaError, ImportError):
    """An installed PEFT or transformers lacks an internal pissa_rs needs."""


def _internal(module: str, name: str) -> Any:
    """`module.name`, or an error naming it and the installed version of its library."""
    try:
        with quiet_library_noise():
            return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise _missing(f"{module}.{name}", err) from None


def _missing(what: str, err: Exception) -> LibraryInternalsError:
    from importlib.metadata import version

    library = what.split(".", 1)[0]
    return LibraryInternalsError(
        f"{library} {version(library)} has no {what}, which pissa_rs uses ({err}); install the {library} "
        "version pissa_rs was tested with (see pissa_rs.requirements.FLOORS) or report it")


# --- PEFT -----------------------------------------------------------------------------

def include_all_linear(lora_config, model):
    """PEFT's expansion of target_modules="all-linear" on `model` (a copy of the config)."""
    return _internal("peft.tuners.tuners_utils", "_maybe_include_all_linear_layers")(lora_config, model)


def target_module_exists(lora_config, name: str) -> bool:
    """Whether PEFT's target_modules / exclude_modules matching picks module `name`."""
    return bool(_internal("peft.tuners.tuners_utils", "check_target_module_exists")(lora_config, name))


def minimal_target_modules(modules: list[str], others: list[str]) -> set[str]:
    """The shortest suffixes that pick exactly `modules` and none of `others`, as PEFT's
    save_pretrained condenses a long target_modules list."""
    return set(_internal("peft.tuners.tuners_utils", "_find_minimal_target_modules")(modules, others))


def pattern_key(keys, module: str) -> str:
    """The rank_pattern / alpha_pattern key PEFT applies to `module` (the module itself if none)."""
    return _internal("peft.utils.other", "get_pattern_key")(keys, module)


def convert_config_for_transformers(lora_config, model) -> None:
    """PEFT's rewrite of a LoRA config for transformers 5's fused MoE parameters (in place)."""
    _internal("peft.utils.transformers_weight_conversion", "convert_peft_config_for_transformers")(
        lora_config, model, None)


def swapped_in_out(param_wrapper) -> bool:
    """Whether PEFT's ParamWrapper stores its parameter in x out (GPT-OSS's experts)."""
    try:
        return bool(param_wrapper._did_swap_in_out_features)
    except AttributeError as err:
        raise _missing("peft.tuners.lora.layer.ParamWrapper._did_swap_in_out_features", err) from None


# --- transformers -----------------------------------------------------------------------

def conversion_mapping(model) -> tuple[list, list]:
    """transformers' load-time renamings and weight converters for `model`'s class."""
    transforms = _internal("transformers.conversion_mapping", "get_model_conversion_mapping")(model)
    renaming = _internal("transformers.core_model_loading", "WeightRenaming")
    converter = _internal("transformers.core_model_loading", "WeightConverter")
    return [t for t in transforms if isinstance(t, renaming)], [t for t in transforms if isinstance(t, converter)]


def rename_checkpoint_key(name: str, renamings: list, converters: list, prefix: str | None, params: dict):
    """(the model parameter a checkpoint tensor loads into, the source pattern of the
    converter that merges it, or None), as transformers' loading decides."""
    return _internal("transformers.core_model_loading", "rename_source_key")(name, renamings, converters, prefix,
                                                                             params)


# transformers' converter operations pissa_rs can read experts through, by class name
MERGE_MODULELIST, CONCATENATE = "MergeModulelist", "Concatenate"


def converter_operations(converter) -> list[tuple[str, int | None]]:
    """(operation class name, dim) of each step of a transformers weight converter."""
    for name in (MERGE_MODULELIST, CONCATENATE):
        _internal("transformers.core_model_loading", name)  # gone or renamed: say so here
    return [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]


def modules_not_quantized(model) -> list[str]:
    """The modules transformers' bitsandbytes loading leaves unquantized on `model`."""
    quantizer = _internal("transformers.quantizers.base", "HfQuantizer")
    return quantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))


def should_quantize(name: str, keep: list[str]) -> bool:
    """Whether transformers quantizes module `name` when `keep` are left unquantized."""
    return bool(_internal("transformers.quantizers.quantizers_utils", "should_convert_module")(name, keep))
