"""Each internal of PEFT and transformers pissa_rs relies on (pissa_rs.compat), called on a
tiny model as the planner calls it: a release that changes one fails here, by name."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers
from helpers import text
from peft import LoraConfig

from pissa_rs import compat


@pytest.fixture(scope="module")
def llama():
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**text()))


@pytest.fixture(scope="module")
def mixtral():
    with torch.device("meta"):
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**text(num_local_experts=4,
                                                                               num_experts_per_tok=2)))


def test_all_linear_expansion_and_matching(llama):
    expanded = compat.include_all_linear(LoraConfig(target_modules="all-linear"), llama)
    assert "model.layers.0.self_attn.q_proj" in expanded.target_modules or "q_proj" in expanded.target_modules
    assert not any("lm_head" in m for m in expanded.target_modules)
    config = LoraConfig(target_modules=["q_proj"])
    assert compat.target_module_exists(config, "model.layers.1.self_attn.q_proj")
    assert not compat.target_module_exists(config, "model.layers.1.self_attn.k_proj")


def test_minimal_target_modules_and_pattern_keys():
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    others = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert compat.minimal_target_modules(modules, others) == {"q_proj"}
    assert compat.pattern_key(["q_proj", "layers.1.self_attn.k_proj"], "model.layers.1.self_attn.k_proj") \
        == "layers.1.self_attn.k_proj"


def test_moe_config_conversion_and_param_wrappers(mixtral):
    import copy

    from peft import get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    config = LoraConfig(target_modules=["w1", "w2", "w3", "q_proj"], r=4, lora_alpha=4)
    import warnings

    warnings.simplefilter("ignore")
    compat.convert_config_for_transformers(config, mixtral)
    assert config.target_parameters  # the fused experts, through target_parameters
    with torch.device("meta"):
        built = get_peft_model(copy.deepcopy(mixtral), config)
    wrappers = [m for m in built.modules() if isinstance(m, ParamWrapper)]
    # Mixtral's experts are stored out x in: PEFT swaps them (GPT-OSS's, in x out, it does not)
    assert wrappers and all(compat.swapped_in_out(w) is True for w in wrappers)


def test_checkpoint_renaming_and_expert_merges(mixtral):
    renamings, converters = compat.conversion_mapping(mixtral)
    assert converters, "Mixtral's per-expert tensors are merged at load"
    params = mixtral.state_dict()
    param, merged_by = compat.rename_checkpoint_key("model.layers.0.block_sparse_moe.experts.3.w1.weight", renamings,
                                                    converters, mixtral.base_model_prefix, params)
    assert param == "model.layers.0.mlp.experts.gate_up_proj" and merged_by is not None
    converter = next(c for c in converters if merged_by in c.source_patterns)
    assert compat.converter_operations(converter) == [(compat.MERGE_MODULELIST, 0), (compat.CONCATENATE, 1)]


def test_modules_bitsandbytes_loading_leaves_unquantized(llama):
    keep = compat.modules_not_quantized(llama)
    assert "lm_head" in keep
    assert compat.should_quantize("model.layers.0.mlp.up_proj", keep)
    assert not compat.should_quantize("lm_head", keep)


def test_a_missing_internal_is_named_with_the_library_version(monkeypatch):
    module = importlib.import_module("peft.tuners.tuners_utils")
    monkeypatch.delattr(module, "_find_minimal_target_modules")
    with pytest.raises(compat.LibraryInternalsError,
                       match=r"peft \d+\.\d+.* has no peft\.tuners\.tuners_utils\._find_minimal_target_modules"):
        compat.minimal_target_modules(["a.q"], ["a.k"])
