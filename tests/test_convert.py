"""PiSSA -> LoRA conversion: equal to PEFT's own, file for file; compact; bad pairs."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from make_tiny_model import save_tiny_model
from peft import PeftModel
from transformers import AutoModelForCausalLM

import pissa_rs
from helpers import move_adapters
from pissa_rs.convert import AdapterMismatchError, convert_to_lora

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A decomposition, and its adapter 'fine-tuned' (moved at random), saved by PEFT."""
    root = tmp_path_factory.mktemp("convert")
    src = save_tiny_model(root / "m", "llama", layers=2)
    res = pissa_rs.decompose_checkpoint(src, r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, out=root / "o",
                                        progress=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), res.out, subfolder="pissa_init",
                                      is_trainable=True)
    move_adapters(model)
    model.save_pretrained(root / "ft")
    # PEFT's own conversion, on a copy of the init dir (PEFT rewrites its config).
    shutil.copytree(res.adapter, root / "init_copy")
    model.save_pretrained(root / "peft_lora", path_initial_model_for_weight_conversion=str(root / "init_copy"))
    return {"src": src, "res": res, "ft": root / "ft", "peft_lora": root / "peft_lora", "tuned": logits(model)}


def test_conversion_equals_peft_file_for_file(trained, tmp_path):
    result = convert_to_lora(trained["res"].adapter, trained["ft"], tmp_path / "lora")
    ours = safetensors.torch.load_file(tmp_path / "lora" / "adapter_model.safetensors")
    theirs = safetensors.torch.load_file(trained["peft_lora"] / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
    ours_cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((trained["peft_lora"] / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights",
                  "target_modules", "lora_dropout", "fan_in_fan_out", "task_type", "inference_mode"):
        mine, peft_s = ours_cfg[field], theirs_cfg[field]
        if isinstance(mine, list):  # PEFT stores sets as lists in no particular order
            mine, peft_s = sorted(mine), sorted(peft_s)
        assert mine == peft_s, field
    assert ours_cfg["r"] == 8 and ours_cfg["rank_pattern"] == {"v_proj": 4}
    assert set(result.ranks.values()) == {8, 4}


def test_converted_lora_on_the_original_model_gives_the_tuned_logits(trained, tmp_path):
    convert_to_lora(trained["res"].adapter, trained["ft"], tmp_path / "lora")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["src"]), tmp_path / "lora")
    torch.testing.assert_close(logits(model), trained["tuned"], atol=1e-4, rtol=0)


def test_compact_conversion_keeps_the_logits_with_ranks_at_most_2r(trained, tmp_path):
    result = convert_to_lora(trained["res"].adapter, trained["ft"], tmp_path / "lora", compact=True)
    assert all(1 <= k <= 8 for k in result.ranks.values())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["src"]), tmp_path / "lora")
    torch.testing.assert_close(logits(model), trained["tuned"], atol=1e-4, rtol=0)


def test_compact_finds_the_true_rank():
    from pissa_rs.convert import Truncation, _compact

    g = torch.Generator().manual_seed(0)
    b = torch.randn(40, 3, generator=g) @ torch.randn(3, 8, generator=g)  # rank 3 spread over 8 columns
    a = torch.randn(8, 30, generator=g)
    new_a, new_b, s, keep = _compact(a, b, Truncation(1e-6))
    assert keep == 3 and s.shape == (3,)  # the singular values above rounding
    assert new_a.shape == (3, 30) and new_b.shape == (40, 3)
    torch.testing.assert_close(new_b @ new_a, b @ a, atol=1e-4, rtol=1e-4)


def test_mismatched_adapters_are_refused_naming_the_module(trained, tmp_path):
    other = pissa_rs.decompose_checkpoint(trained["src"], r=2, out=tmp_path / "other", progress=False)
    with pytest.raises(AdapterMismatchError, match="module '.*'.*different ranks or shapes|r is"):
        convert_to_lora(other.adapter, trained["ft"], tmp_path / "x")
    fewer = pissa_rs.decompose_checkpoint(trained["src"], r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                                          target_modules=["q_proj", "v_proj"], out=tmp_path / "fewer", progress=False)
    with pytest.raises(AdapterMismatchError, match="module 'base_model.model.model.layers.0.*' is only in"):
        convert_to_lora(fewer.adapter, trained["ft"], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_init_config_that_still_says_pissa_is_refused(trained, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(trained["res"].adapter, init)
    cfg = json.loads((init / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (init / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match="init_lora_weights is 'pissa_niter_4'"):
        convert_to_lora(init, trained["ft"], tmp_path / "x")


def test_a_missing_file_is_named(trained, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(trained["res"].adapter, init)
    (init / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterMismatchError, match=r"init/adapter_model.safetensors: missing"):
        convert_to_lora(init, trained["ft"], tmp_path / "x")


def test_rslora_scaling_is_kept_like_peft(tmp_path):
    src = save_tiny_model(tmp_path / "m", "llama", layers=1)
    res = pissa_rs.decompose_checkpoint(src, r=4, lora_alpha=8, use_rslora=True, out=tmp_path / "o", progress=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), res.out, subfolder="pissa_init",
                                      is_trainable=True)
    move_adapters(model)
    tuned = logits(model)
    model.save_pretrained(tmp_path / "ft")
    shutil.copytree(res.adapter, tmp_path / "init_copy")
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init_copy"))
    convert_to_lora(res.adapter, tmp_path / "ft", tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (ours["r"], ours["lora_alpha"], ours["use_rslora"]) == (theirs["r"], theirs["lora_alpha"], True) == (8, 8 * 2**0.5, True)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), tmp_path / "ours")
    torch.testing.assert_close(logits(lora), tuned, atol=1e-4, rtol=0)


@pytest.mark.floor
def test_the_converted_lora_opens_by_its_folder_alone_on_the_original_model(trained, tmp_path):
    """AutoPeftModel loads the base that adapter_config.json names: the original model,
    not the residual the fine-tuned adapter was trained on (that gave logits off by ~1)."""
    from peft import AutoPeftModelForCausalLM

    for compact in (False, True):
        result = convert_to_lora(trained["res"].adapter, trained["ft"], tmp_path / f"lora{compact}", compact=compact)
        config = json.loads((result.out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == result.base_model == str(trained["src"].resolve())
        assert config["revision"] is None
        model = AutoPeftModelForCausalLM.from_pretrained(result.out)
        torch.testing.assert_close(logits(model), trained["tuned"], atol=1e-4, rtol=0)


def test_an_init_adapter_without_its_report_needs_the_base_model_named(trained, tmp_path):
    init = tmp_path / "moved" / "pissa_init"
    shutil.copytree(trained["res"].adapter, init)
    cfg = json.loads((init / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")  # the residual is elsewhere now
    (init / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError, match=r"pissa_init: no pissa_report.json.*--base-model"):
        convert_to_lora(init, trained["ft"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    result = convert_to_lora(init, trained["ft"], tmp_path / "y", base_model="org/original", revision="v1")
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/original", "v1")


def test_the_report_beside_a_residual_named_by_the_init_config_is_found(trained, tmp_path):
    """pissa_init copied away from its OUT: its config still names OUT, where the report is."""
    init = tmp_path / "elsewhere"
    shutil.copytree(trained["res"].adapter, init)
    result = convert_to_lora(init, trained["ft"], tmp_path / "lora")
    assert result.base_model == str(trained["src"].resolve())
