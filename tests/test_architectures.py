"""Every architecture as transformers saves it: tiny models of each family, saved with
save_pretrained (float32), decomposed, then loaded by transformers + PEFT.

For each: PEFT's own get_peft_model with the same target_modules builds LoRA layers on
exactly the modules our adapter holds; loading our output warns of no missing or
unexpected key; the original outputs come back; every adapter holds the top-r
principal part of its original weight. Mixtures of experts: test_moe.py."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import load_output_without_key_warnings, save_spread, text
from safetensors.torch import load_file

import pissa_rs

R = 4
LANGUAGE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def llava_config():
    return transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**text()),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=16, patch_size=8),
        image_token_index=95,
    )


# family -> (model class, config, target_modules as a user passes them)
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(**text()), "all-linear"),
    "mistral": (transformers.MistralForCausalLM, lambda: transformers.MistralConfig(**text()), "all-linear"),
    "qwen2-tied": (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(**text(tie_word_embeddings=True)),
                   "all-linear"),
    "phi3": (transformers.Phi3ForCausalLM, lambda: transformers.Phi3Config(**text(pad_token_id=0)), "all-linear"),
    "gemma2": (transformers.Gemma2ForCausalLM, lambda: transformers.Gemma2Config(**text(head_dim=16)), "all-linear"),
    "gpt2": (transformers.GPT2LMHeadModel,
             lambda: transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                             bos_token_id=0, eos_token_id=0),
             "all-linear"),
    "bert-base": (transformers.BertModel,
                  lambda: transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=96),
                  "all-linear"),
    "llava-language": (transformers.LlavaForConditionalGeneration, llava_config, LANGUAGE),
}


def save(family: str, path):
    cls, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    save_spread(cls(config()), path, max_shard_size="100KB")
    return cls


def lora_modules(model) -> set[str]:
    """Modules PEFT wrapped in a LoRA Linear layer, by their name in the base model."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_as_transformers_saves_it(family, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    cls, _, target_modules = FAMILIES[family]
    src = tmp_path / "src"
    save(family, src)
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, target_modules=target_modules, out=tmp_path / "o",
                                        progress=False)
    adapter = load_file(res.adapter / "adapter_model.safetensors")
    ours = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in adapter if ".lora_A." in k}
    assert ours and {t["module"] for t in res.report["tensors"]} == ours

    # PEFT's own expansion of the same target_modules on the real model: the same Linear layers.
    original = cls.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = outputs(original, ids)
    peft_own = get_peft_model(original, LoraConfig(r=R, lora_alpha=R, target_modules=target_modules))
    assert lora_modules(peft_own) == ours
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["target_modules"] != "all-linear" and not config.get("target_parameters")

    # Our output loads with no missing or unexpected keys and gives the original outputs back.
    loaded = load_output_without_key_warnings(cls, res.out, caplog)
    assert lora_modules(loaded) == ours
    got = outputs(loaded, ids)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    # Every LoRA layer holds the top-r principal part of its original weight.
    original_ck = pissa_rs.Checkpoint(src)
    for t in res.report["tensors"]:
        w = pissa_rs.as_torch(original_ck.buffer(t["tensor"])).float()
        a = adapter[f"base_model.model.{t['module']}.lora_A.weight"]
        b = adapter[f"base_model.model.{t['module']}.lora_B.weight"]
        top = torch.linalg.svdvals(w)[: t["r"]]
        held = torch.linalg.svdvals(t["scale"] * b @ a)[: t["r"]]
        assert torch.allclose(held, top, rtol=1e-4, atol=1e-5), t["module"]


def test_modules_whose_weights_the_checkpoint_lacks(tmp_path):
    """A base model saved under a config that names a model with a head: all-linear lists the
    head's modules as left out; naming one of them explicitly is an error."""
    save("bert-base", tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, out=tmp_path / "o", progress=False)
    assert res.report["architecture"] == "BertForMaskedLM"
    left = {item["name"]: item["why"] for item in res.report["left_out"]}
    assert "cls.predictions.transform.dense" in left and "not in the checkpoint" in left["cls.predictions.transform.dense"]
    assert len(res.report["tensors"]) == 12
    with pytest.raises(pissa_rs.TargetError, match="'cls.predictions.transform.dense' has no weight tensor"):
        pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, out=tmp_path / "o2", target_modules=["dense"],
                                      progress=False)


def test_a_weight_smaller_than_r_gets_its_own_rank(tmp_path):
    """k_proj and v_proj are 16 x 64 here: at r=32 they are decomposed at rank 16, recorded
    in rank_pattern so that PEFT builds them at that rank."""
    from peft import PeftModel

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**text(), "num_key_value_heads": 1})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=32, niter=0, out=tmp_path / "o", progress=False)
    limited = res.report["rank_limited"]
    assert sorted(limited) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj"))
    ranks = {t["module"]: t["r"] for t in res.report["tensors"]}
    assert all(ranks[m] == 16 for m in limited) and ranks["model.layers.0.self_attn.q_proj"] == 32
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert all(config["rank_pattern"][m] == 16 for m in limited)
    model = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(res.out), res.out,
                                      subfolder="pissa_init")
    assert model.base_model.model.model.layers[0].self_attn.k_proj.lora_A["default"].weight.shape == (16, 64)
    assert pissa_rs.verify(res.out, against=tmp_path / "src").ok


def test_a_model_with_a_head_saved_under_its_base_models_config(tmp_path):
    """The other way round: a BertForMaskedLM checkpoint ("bert." prefix, "cls." head) whose
    config names BertModel. transformers drops the prefix at load; so does the mapping, and
    the head's tensors pass through untouched."""
    from peft import PeftModel

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=96, architectures=["BertModel"])
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "src")
    saved = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**saved, "architectures": ["BertModel"]}))
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, niter=0, out=tmp_path / "o", progress=False)
    assert all(t["tensor"].startswith("bert.") and not t["module"].startswith("bert.") for t in res.report["tensors"])
    assert len(res.report["tensors"]) == 6 and pissa_rs.verify(res.out, against=tmp_path / "src").ok
    # BertForMaskedLM has no pooler: BertModel's pooler.dense is named, not silently skipped.
    assert [item["name"] for item in res.report["left_out"]] == ["pooler.dense"]
    ids = torch.randint(0, 90, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = outputs(transformers.BertModel.from_pretrained(tmp_path / "src").eval(), ids)
    loaded = PeftModel.from_pretrained(transformers.BertModel.from_pretrained(res.out).eval(), res.out,
                                       subfolder="pissa_init")
    assert torch.allclose(outputs(loaded, ids), expected, atol=1e-4)


def test_load_for_training_builds_the_class_config_json_names(tmp_path):
    save("bert-base", tmp_path / "src")
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, out=tmp_path / "o", progress=False)
    model = pissa_rs.load_for_training(res.out, compute_dtype=torch.float32)
    assert type(model.get_base_model()).__name__ == "BertModel"
    assert lora_modules(model) == {t["module"] for t in res.report["tensors"]}
