"""Low-precision sources: FP8 with block scales (transformers' fine-grained FP8, DeepSeek-V3's
layout), compressed-tensors FP8 (per channel, per tensor) and MXFP4 (GPT-OSS's experts),
written by the tests from random weights (tests/low_precision.py), decomposed, then
loaded with transformers + PEFT.

W is the dequantized source weight, as transformers dequantizes it (bfloat16). Every
adapter holds the top-r of that W; the residual is bfloat16 (or, with keep_source_format,
the source's FP8 again); the logits are the dequantized original model's; hostile
variants are refused naming file and tensor."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
import transformers
from helpers import text
from low_precision import dequantized, save_compressed_fp8, save_dequantized, save_fp8_block, save_mxfp4_gpt_oss
from safetensors.torch import load_file, save_file

import pissa_rs
from pissa_rs.cli import main

R = 4
IDS = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(0))
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**text()))


def deepseek():
    torch.manual_seed(0)
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**text(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=2, topk_group=1)))


def load_quietly(cls, path, **kwargs):
    """from_pretrained, with every warning and log record it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = logging.getLogger("transformers")
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        try:
            model = cls.from_pretrained(path, **kwargs)
        finally:
            logger.removeHandler(handler)
    return model, [str(w.message) for w in caught] + [r.getMessage() for r in records]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def close(got, expected, rel=2e-2):
    """bfloat16 models: the residual's rounding (2**-9 of it) moves the logits a little."""
    return (got - expected).abs().max().item() <= rel * expected.abs().max().item()


@pytest.mark.parametrize("fmt", ["fp8-block", "compressed-channel", "compressed-tensor"])
@pytest.mark.floor
def test_fp8_source_gives_a_bfloat16_residual_that_loads_as_the_dequantized_model(tmp_path, fmt):
    from peft import PeftModel

    src = tmp_path / "src"
    if fmt == "fp8-block":
        save_fp8_block(llama(), src)
    else:
        save_compressed_fp8(llama(), src, strategy=fmt.split("-")[1])
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, out=tmp_path / "o", progress=False)
    assert "quantization_config" not in json.loads((res.out / "config.json").read_text())
    assert res.report["source_format"] == ("fp8" if fmt == "fp8-block" else "compressed-tensors")
    out_ck = pissa_rs.Checkpoint(res.out)
    assert not [t for t in out_ck.tensors if t.name.endswith(("_scale", "_scale_inv")) or t.dtype == "F8_E4M3"]
    index = json.loads((res.out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(out_ck.names())

    # The dequantized original, as a plain bf16 model: the reference.
    reference_dir = save_dequantized(llama(), src, tmp_path / "reference")
    expected = logits(transformers.LlamaForCausalLM.from_pretrained(reference_dir, dtype=torch.float32))
    if fmt == "fp8-block":  # transformers' own dequantization of the FP8 checkpoint agrees
        own = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).float()
        assert torch.equal(logits(own), expected)

    residual, said = load_quietly(transformers.LlamaForCausalLM, res.out, dtype=torch.float32)
    assert not [m for m in said if "missing" in m.lower() or "unexpected" in m.lower() or "quantiz" in m.lower()], said
    loaded = PeftModel.from_pretrained(residual, res.adapter)
    assert close(logits(loaded), expected)

    reference = dequantized(src)
    adapter = load_file(res.adapter / "adapter_model.safetensors")
    for t in res.report["tensors"]:
        w = reference[t["tensor"]].double()
        a = adapter[f"base_model.model.{t['module']}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{t['module']}.lora_B.weight"].double()
        assert torch.allclose(torch.linalg.svdvals(t["scale"] * b @ a)[:R], torch.linalg.svdvals(w)[:R],
                              rtol=1e-4, atol=1e-6), t["tensor"]
    assert pissa_rs.verify(res.out, against=src).ok
    if fmt == "fp8-block":  # QPiSSA's measure, with W the dequantized source
        rows = pissa_rs.measure_quantization_error(res.out, src)["tensors"]
        assert {r["tensor"] for r in rows} == {t["tensor"] for t in res.report["tensors"]}
        assert all(r["error_reduction"] > 0 for r in rows)
    merged = pissa_rs.merge_adapter(res.out, res.adapter, tmp_path / "merged")
    assert close(logits(transformers.LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32)), expected)


def test_deepseek_v3_fp8_experts_and_what_stays_fp8(tmp_path):
    """DeepSeek-V3 as it ships: every Linear in FP8 with 8x8 (here) block scales, experts
    per-expert tensors. Attention, router and routed experts adapted (named: PEFT 0.22's
    all-linear adapts the dense MLPs too, 0.21's does not); the dense first MLP and the shared
    experts stay FP8, and config.json says so."""
    from peft import PeftModel

    src = tmp_path / "src"
    save_fp8_block(deepseek(), src, block=(8, 8))
    res = pissa_rs.decompose_checkpoint(
        src, r=R, niter=0, out=tmp_path / "o", progress=False,
        target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
        target_parameters=["gate.weight", "experts.gate_up_proj", "experts.down_proj"])
    config = json.loads((res.out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and "model.layers.1.mlp.experts" in config["modules_to_not_convert"]
    out_ck = pissa_rs.Checkpoint(res.out)
    assert out_ck.info("model.layers.1.mlp.experts.0.up_proj.weight").dtype == "BF16"
    assert out_ck.info("model.layers.1.mlp.shared_experts.up_proj.weight").dtype == "F8_E4M3"
    src_ck = pissa_rs.Checkpoint(src)
    for name in ("model.layers.1.mlp.shared_experts.up_proj.weight",
                 "model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv"):
        assert bytes(src_ck.buffer(name)) == bytes(out_ck.buffer(name))  # untouched FP8 passes through

    expected = logits(transformers.DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.bfloat16).float())
    residual, said = load_quietly(transformers.DeepseekV3ForCausalLM, res.out, dtype=torch.bfloat16)
    assert not [m for m in said if "missing" in m.lower() or "unexpected" in m.lower()], said
    loaded = PeftModel.from_pretrained(residual.float(), res.adapter)
    assert close(logits(loaded), expected)
    assert pissa_rs.verify(res.out, against=src).ok


def test_gpt_oss_mxfp4_experts(tmp_path):
    from peft import PeftModel

    src = tmp_path / "src"
    save_mxfp4_gpt_oss(src)
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, target_parameters=EXPERTS, out=tmp_path / "o",
                                        progress=False)
    assert "quantization_config" not in json.loads((res.out / "config.json").read_text())
    out_ck = pissa_rs.Checkpoint(res.out)
    assert out_ck.info("model.layers.0.mlp.experts.gate_up_proj").dtype == "BF16"
    assert tuple(out_ck.info("model.layers.0.mlp.experts.gate_up_proj").shape) == (4, 64, 192)
    assert not [n for n in out_ck.names() if n.endswith(("_blocks", "_scales"))]

    original = transformers.GptOssForCausalLM.from_pretrained(
        src, dtype=torch.bfloat16, quantization_config=transformers.Mxfp4Config(dequantize=True))
    expected = logits(original.float())
    residual, said = load_quietly(transformers.GptOssForCausalLM, res.out, dtype=torch.float32)
    assert not [m for m in said if "missing" in m.lower() or "unexpected" in m.lower() or "quantiz" in m.lower()], said
    loaded = PeftModel.from_pretrained(residual, res.adapter)
    assert close(logits(loaded), expected)

    adapter = load_file(res.adapter / "adapter_model.safetensors")
    for t in (t for t in res.report["tensors"] if t.get("expert") is not None):
        e, n = t["expert"], t["num_experts"]
        w = original.get_parameter(t["parameter"])[e].detach().double().T  # held in x out
        a = adapter[f"base_model.model.{t['module']}.lora_A.weight"].double().view(n, R, -1)[e]
        b = adapter[f"base_model.model.{t['module']}.lora_B.weight"].double().view(-1, R, n)[:, :, e]
        assert torch.allclose(torch.linalg.svdvals(t["scale"] * b @ a)[:R], torch.linalg.svdvals(w)[:R],
                              rtol=1e-4, atol=1e-6), t["tensor"]
    assert pissa_rs.verify(res.out, against=src).ok
    with pytest.raises(pissa_rs.TargetError, match="keep_source_format"):
        pissa_rs.decompose_checkpoint(src, r=R, target_parameters=EXPERTS, keep_source_format=True,
                                      out=tmp_path / "k", progress=False)


def test_keep_source_format_writes_the_residual_back_in_fp8(tmp_path, capsys):
    from peft import PeftModel

    src = tmp_path / "src"
    save_fp8_block(llama(), src)
    assert main(["decompose", str(src), "-r", str(R), "--keep-source-format", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "source: FP8 (float8_e4m3fn) with 32x32 block scales" in printed and "keep_source_format" in printed
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, keep_source_format=True, out=tmp_path / "o",
                                        progress=False)
    src_ck, out_ck = pissa_rs.Checkpoint(src), pissa_rs.Checkpoint(res.out)
    assert [(t.name, t.dtype, t.shape) for t in src_ck.tensors] == [(t.name, t.dtype, t.shape) for t in out_ck.tensors]
    assert json.loads((res.out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for t in res.report["tensors"]:
        assert 0 < t["requant_error_relative"] < 0.1, t
    assert pissa_rs.verify(res.out, against=src).ok

    expected = logits(transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).float())
    bf16 = pissa_rs.decompose_checkpoint(src, r=R, niter=0, out=tmp_path / "b", progress=False)
    as_bf16 = logits(PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(bf16.out, dtype=torch.float32), bf16.adapter))
    kept = logits(PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(res.out, dtype=torch.bfloat16).float(), res.adapter))
    # FP8 re-quantization costs more than bf16 rounding, and stays small
    assert (as_bf16 - expected).abs().max() < (kept - expected).abs().max() < 0.2 * expected.abs().max()
    # Merged, it is FP8 again (W re-quantized): the source's layout, close to the original.
    merged = pissa_rs.merge_adapter(res.out, res.adapter, tmp_path / "merged")
    merged_ck = pissa_rs.Checkpoint(merged)
    assert [(t.name, t.dtype) for t in merged_ck.tensors] == [(t.name, t.dtype) for t in src_ck.tensors]
    again = logits(transformers.LlamaForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).float())
    assert (again - expected).abs().max() < 0.2 * expected.abs().max()


def _hostile(src, name, change):
    shard = next(f for f in sorted(src.glob("*.safetensors")) if name in load_file(f))
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():  # the index lists what the shards hold
        data = json.loads(index.read_text())
        data["weight_map"] = {n: f.name for f in sorted(src.glob("*.safetensors")) for n in load_file(f)}
        index.write_text(json.dumps(data))
    return shard


@pytest.mark.parametrize("case", ["scale shape", "nan scale", "no scale", "block does not divide", "mxfp4 shape"])
def test_hostile_low_precision_inputs_are_refused_naming_file_and_tensor(tmp_path, case):
    src = tmp_path / "src"
    q = "model.layers.0.self_attn.q_proj.weight"
    kwargs = {}
    if case == "mxfp4 shape":
        save_mxfp4_gpt_oss(src)
        name = "model.layers.1.mlp.experts.down_proj_blocks"
        shard = _hostile(src, name, lambda t: t.update({name: t[name][:, :, :1].contiguous()}))
        kwargs["target_parameters"] = EXPERTS
        match = rf"{shard.name}.*'{name}'"
    else:
        save_fp8_block(llama(), src)
        if case == "scale shape":
            shard = _hostile(src, q, lambda t: t.update({f"{q}_scale_inv": torch.ones(2, 1)}))
            match = rf"{shard.name}.*'{q}_scale_inv'.*\[2, 1\]"
        elif case == "nan scale":
            shard = _hostile(src, q, lambda t: t[f"{q}_scale_inv"].__setitem__((0, 1), float("nan")))
            match = rf"{shard.name}.*'{q}_scale_inv'.*NaN"
        elif case == "no scale":
            shard = _hostile(src, q, lambda t: t.pop(f"{q}_scale_inv"))
            match = rf"{shard.name}.*'{q}'.*no scale"
        else:  # config.json's block size does not divide the weights
            config = json.loads((src / "config.json").read_text())
            config["quantization_config"]["weight_block_size"] = [48, 48]
            (src / "config.json").write_text(json.dumps(config))
            match = r"safetensors: tensor 'model\.layers\.0\..*' \[64, 64\] is not divided by the block size \[48, 48\]"
    with pytest.raises(pissa_rs.TargetError, match=match):
        pissa_rs.decompose_checkpoint(src, r=R, out=tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_keep_source_format_for_compressed_tensors(tmp_path, strategy):
    """Per-channel and per-tensor scales are re-computed the same way (absmax / 448 per
    channel or tensor, in the source's scale dtype); the layout and config stay the input's."""
    src = tmp_path / "src"
    save_compressed_fp8(llama(), src, strategy=strategy)
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, keep_source_format=True, out=tmp_path / "o",
                                        progress=False)
    src_ck, out_ck = pissa_rs.Checkpoint(src), pissa_rs.Checkpoint(res.out)
    assert [(t.name, t.dtype, t.shape) for t in src_ck.tensors] == [(t.name, t.dtype, t.shape) for t in out_ck.tensors]
    assert all(0 < t["requant_error_relative"] < 0.1 for t in res.report["tensors"])
    assert pissa_rs.verify(res.out, against=src).ok
