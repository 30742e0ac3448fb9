"""INT sources: compressed-tensors `pack-quantized` checkpoints (Kimi-K2-Thinking's INT4,
llm-compressor's W4A16 / W8A16), written here by the compressed-tensors library itself
(tests/low_precision.py: its scheme set-up, scales, zero points and packing).

W is the weight as compressed-tensors decompresses it, bit for bit; every adapter holds the
top-r of that W; the residual is W's dtype (bfloat16); the output loads in transformers +
PEFT and gives the dequantized model's logits back; QPiSSA from the 4-bit source beats
re-quantizing it; hostile variants are refused naming file and tensor, before any write."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers
from helpers import text
from low_precision import save_compressed_int
from safetensors.torch import load_file, save_file

import pissa_rs

R = 4
IDS = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(0))
SCHEMES = {
    "int4-asym-group": dict(bits=4, symmetric=False),
    "int4-sym-group": dict(bits=4),
    "int8-sym-channel": dict(bits=8, strategy="channel"),
    "int4-asym-g_idx": dict(bits=4, symmetric=False, permute_groups=True),
}


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**text()))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def assert_loads_as(res, expected: torch.Tensor, src) -> None:
    """The output (residual + adapter) loads in transformers + PEFT, gives `expected` (the
    dequantized model's logits) within the residual's rounding, and verifies against `src`."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(res.out, dtype=torch.float32), res.adapter)
    got = logits(loaded)
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert pissa_rs.verify(res.out, against=src).ok


def library_weights(src) -> dict[str, torch.Tensor]:
    """Every packed weight as compressed-tensors itself decompresses it (its
    PackedQuantizationCompressor; a g_idx layout by its unpack and _dequantize with each
    column's group gathered, as the library did when it wrote that layout)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward_helpers import _dequantize

    stored = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**config["config_groups"]["group_0"]["weights"])
    out = {}
    for name in stored:
        if not name.endswith(".weight_packed"):
            continue
        module = name.removesuffix(".weight_packed")
        local = {k[len(module) + 1:]: v for k, v in stored.items() if k.startswith(f"{module}.weight_")}
        if "weight_g_idx" in local:
            g = local["weight_g_idx"].long()
            rows = int(local["weight_shape"][0])
            q = unpack_from_int32(local["weight_packed"], args.num_bits, local["weight_shape"])
            zero = None if "weight_zero_point" not in local else unpack_from_int32(
                local["weight_zero_point"], args.num_bits, (rows, local["weight_scale"].shape[1]), packed_dim=0)[:, g]
            out[f"{module}.weight"] = _dequantize(q, local["weight_scale"][:, g], zero)
        else:
            out[f"{module}.weight"] = PackedQuantizationCompressor.decompress(
                local, QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    return out


@pytest.fixture(scope="module", params=sorted(SCHEMES))
def source(request, tmp_path_factory):
    src = tmp_path_factory.mktemp(request.param) / "src"
    save_compressed_int(llama(), src, **SCHEMES[request.param])
    return request.param, src


def test_the_weights_read_are_the_librarys_bit_for_bit(source):
    _, src = source
    expected = library_weights(src)
    checkpoint = pissa_rs.Checkpoint(src)
    found = pissa_rs.resolve_targets(checkpoint, r=R, lora_alpha=R, config_dir=src).targets
    assert {t.tensor.removesuffix("_packed") for t in found} == set(expected)
    for t in found:
        got = t.location.read(checkpoint)
        want = expected[t.tensor.removesuffix("_packed")]
        assert got.dtype == want.dtype == torch.bfloat16 and t.shape == tuple(want.shape)
        assert torch.equal(got, want), t.tensor


def test_output_loads_as_the_dequantized_model_and_verifies(source, tmp_path):
    from peft import PeftModel

    name, src = source
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, out=tmp_path / "o", progress=False)
    assert res.report["source_format"] == "compressed-tensors"
    config = json.loads((res.out / "config.json").read_text())
    assert "quantization_config" not in config  # every packed Linear became a bfloat16 residual
    out = load_file(res.out / "model.safetensors")
    assert not [k for k in out if k.endswith(("_packed", "_scale", "_zero_point", "_shape", "_g_idx"))]
    weights = library_weights(src)
    adapter = load_file(res.adapter / "adapter_model.safetensors")
    for t in res.report["tensors"]:  # the adapter holds the top-r of the library's W
        w = weights[t["module"] + ".weight"].double()
        a = adapter[f"base_model.model.{t['module']}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{t['module']}.lora_B.weight"].double()
        assert out[t["module"] + ".weight"].dtype == torch.bfloat16
        assert torch.allclose(torch.linalg.svdvals(t["scale"] * b @ a)[:R], torch.linalg.svdvals(w)[:R],
                              rtol=1e-4, atol=1e-6), t["tensor"]

    reference = llama().to(torch.bfloat16)  # the library's W in a plain model: the reference
    reference.load_state_dict(reference.state_dict() | weights, strict=True)
    expected = logits(reference.float())
    if not name.endswith("g_idx"):  # transformers' own dequantizing load holds the same W (not g_idx's layout)
        own = transformers.LlamaForCausalLM.from_pretrained(
            src, dtype=torch.bfloat16, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
        held = own.state_dict()
        assert all(torch.equal(held[k], w) for k, w in weights.items())
    assert_loads_as(res, expected, src)


def test_targets_left_packed_stay_packed_and_config_json_says_which_are_not(tmp_path):
    """Only q/v adapted: the other Linears pass through packed, byte for byte, and
    quantization_config's `ignore` gains the decomposed modules: transformers loads both."""
    from peft import PeftModel

    src = save_compressed_int(llama(), tmp_path / "src", bits=4, symmetric=False)
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, target_modules=["q_proj", "v_proj"], out=tmp_path / "o",
                                        progress=False)
    config = json.loads((res.out / "config.json").read_text())["quantization_config"]
    assert set(config["ignore"]) == {"lm_head"} | {f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                   for p in ("q_proj", "v_proj")}
    a, b = pissa_rs.Checkpoint(src), pissa_rs.Checkpoint(res.out)
    for name in ("model.layers.0.mlp.up_proj.weight_packed", "model.layers.0.mlp.up_proj.weight_scale",
                 "model.layers.0.mlp.up_proj.weight_zero_point"):
        assert bytes(a.buffer(name)) == bytes(b.buffer(name))
    assert "model.layers.0.self_attn.q_proj.weight_packed" not in b
    assert b.info("model.layers.0.self_attn.q_proj.weight").dtype == "BF16"

    dequantize = transformers.CompressedTensorsConfig(dequantize=True)
    expected = logits(transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                                    quantization_config=dequantize).float())
    residual = transformers.LlamaForCausalLM.from_pretrained(res.out, dtype=torch.bfloat16,
                                                             quantization_config=dequantize)
    got = logits(PeftModel.from_pretrained(residual.float(), res.adapter))
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_qpissa_from_the_4bit_source_beats_requantizing_it(tmp_path):
    """QPiSSA (nf4) on the dequantized INT4 W: the report's error reduction against
    quantizing W itself is positive for every weight."""
    src = save_compressed_int(llama(), tmp_path / "src", bits=4, symmetric=False)
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, quantize="nf4", out=tmp_path / "o", progress=False)
    rows = pissa_rs.measure_quantization_error(res.out, src)["tensors"]
    assert {r["tensor"] for r in rows} == {t["tensor"].removesuffix("_packed") for t in res.report["tensors"]}
    assert all(r["error_reduction"] > 0 for r in rows)


def _rewrite(src, change) -> None:
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("plant, message", [
    (lambda t: t.pop(f"{Q}.weight_scale"), r"q_proj\.weight_packed' has no 'model\.layers\.0\.self_attn\.q_proj"
                                           r"\.weight_scale'"),
    (lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :2].contiguous()}),
     r"scale tensor '.*q_proj\.weight_scale' is BF16 x \[64, 2\]"),
    (lambda t: t.update({f"{Q}.weight_g_idx": torch.arange(64, dtype=torch.int32) // 16 + 1}),
     r"'.*q_proj\.weight_g_idx' holds group indices outside \[0, 4\)"),
    (lambda t: t.update({f"{Q}.weight_shape": torch.tensor([64, 48])}),
     r"'.*q_proj\.weight_shape' says \[64, 48\], but the codes"),
    (lambda t: t.pop(f"{Q}.weight_zero_point"), r"zero-point tensor '.*q_proj\.weight_zero_point' is missing"),
    (lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"][:, :7].contiguous()}),
     r"weight_shape' says \[64, 64\], but the codes '.*q_proj\.weight_packed' are \[64, 7\]"),
])
def test_hostile_packed_tensors_are_refused_naming_file_and_tensor(tmp_path, plant, message):
    src = save_compressed_int(llama(), tmp_path / "src", bits=4, symmetric=False)
    _rewrite(src, plant)
    with pytest.raises(pissa_rs.TargetError, match=rf"model\.safetensors: .*{message}"):
        pissa_rs.decompose_checkpoint(src, r=R, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_a_group_size_that_does_not_divide_the_columns_is_refused(tmp_path):
    src = save_compressed_int(llama(), tmp_path / "src", bits=4)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 24
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(pissa_rs.TargetError, match=r"model\.safetensors: tensor '.*weight_packed': group size 24 "
                                                   r"does not divide its 64 columns"):
        pissa_rs.decompose_checkpoint(src, r=R, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["compressed-tensors", "gptq"])
def test_moe_experts_packed_per_expert_as_kimi_k2_ships_them(tmp_path, method):
    """DeepSeek-V3 (Kimi-K2's architecture) with its routed experts packed INT4 per expert
    (compressed-tensors as Kimi-K2-Thinking ships them; GPTQ as MoE GPTQ uploads do), the rest
    as saved: every expert's [gate; up] and down are the library's W bit for bit, the output
    is plain and loads with PEFT to the dequantized model's logits."""
    from helpers import save_spread
    from low_precision import library_gptq, pack_experts_gptq, pack_experts_int
    from peft import PeftModel
    from test_low_precision import deepseek

    src = tmp_path / "src"
    save_spread(deepseek().to(torch.bfloat16 if method == "compressed-tensors" else torch.float16), src)
    pack_experts_int(src, symmetric=False) if method == "compressed-tensors" else pack_experts_gptq(src)
    stored = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())["quantization_config"]

    def library(module: str) -> torch.Tensor:
        if method == "gptq":
            return library_gptq(*(stored[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), 4,
                                True).contiguous()
        from compressed_tensors.compressors import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        scheme = QuantizationScheme(targets=["Linear"],
                                    weights=QuantizationArgs(**config["config_groups"]["group_0"]["weights"]))
        local = {k[len(module) + 1:]: v for k, v in stored.items() if k.startswith(f"{module}.weight_")}
        return PackedQuantizationCompressor.decompress(local, scheme)["weight"]

    checkpoint = pissa_rs.Checkpoint(src)
    found = pissa_rs.resolve_targets(checkpoint, r=R, lora_alpha=R, config_dir=src,
                                     target_parameters=["experts.gate_up_proj", "experts.down_proj"]).targets
    experts = [t for t in found if t.expert is not None]
    assert len(experts) == 8
    for t in experts:
        prefix = f"model.layers.1.mlp.experts.{t.expert}"
        want = (torch.cat([library(f"{prefix}.gate_proj"), library(f"{prefix}.up_proj")])
                if t.parameter.endswith("gate_up_proj") else library(f"{prefix}.down_proj"))
        assert torch.equal(t.location.read(checkpoint), want), t.tensor

    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, out=tmp_path / "o", progress=False,
                                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    assert "quantization_config" not in json.loads((res.out / "config.json").read_text())
    out = pissa_rs.Checkpoint(res.out)
    assert not [n for n in out.names() if n.endswith(("_packed", "_zero_point", ".qweight", ".qzeros", ".g_idx"))]
    assert out.info("model.layers.1.mlp.experts.3.down_proj.weight").dtype == ("BF16" if method != "gptq" else "F16")

    reference = tmp_path / "reference"  # the library's W as a plain checkpoint
    shutil.copytree(src, reference)
    codes = ".weight_packed" if method != "gptq" else ".qweight"
    plain = {k: v for k, v in stored.items()
             if not k.endswith(("_packed", "_scale", "_zero_point", "_shape", ".qweight", ".qzeros", ".scales", ".g_idx"))}
    plain |= {m + ".weight": library(m) for m in {k.removesuffix(codes) for k in stored if k.endswith(codes)}}
    save_file(plain, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((reference / "config.json").read_text())
    del config["quantization_config"]
    (reference / "config.json").write_text(json.dumps(config))
    expected = logits(transformers.DeepseekV3ForCausalLM.from_pretrained(reference, dtype=torch.float32))
    loaded = PeftModel.from_pretrained(transformers.DeepseekV3ForCausalLM.from_pretrained(res.out, dtype=torch.float32),
                                       res.adapter)
    got = logits(loaded)
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert pissa_rs.verify(res.out, against=src).ok


@pytest.mark.parametrize("method", ["hqq", "quanto"])
def test_formats_not_read_yet_are_named_before_anything_is_written(tmp_path, method):
    src = tmp_path / "src"
    llama().save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(pissa_rs.TargetError, match=rf"config\.json: the checkpoint is quantized with '{method}' "
                                                   r"\(not readable by pissa_rs\); pissa_rs reads .*compressed-tensors "
                                                   r"pack-quantized INT2/4/8, GPTQ .*, AWQ \(4-bit GEMM\) and "
                                                   r"pre-quantized bitsandbytes"):
        pissa_rs.decompose_checkpoint(src, r=R, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# --- GPTQ and AWQ: reference quantizers from the formats' specification, the libraries' own
# dequantizers (GPTQModel's, transcribed in tests/low_precision.py) as the oracle

LIBRARY_FORMATS = {
    "gptq-v1-sym": ("gptq", dict()),
    "gptq-v2-asym-desc_act": ("gptq", dict(sym=False, v1=False, desc_act=True)),
    "gptq-v1-asym": ("gptq", dict(sym=False)),
    "gptq-int8": ("gptq", dict(bits=8)),
    "awq-gemm": ("awq", dict()),
}


def library_dequantized(src) -> dict[str, torch.Tensor]:
    """Every GPTQ / AWQ weight as GPTQModel dequantizes it, by module weight name."""
    from low_precision import library_awq, library_gptq

    stored = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())["quantization_config"]
    out = {}
    for name in stored:
        if name.endswith(".qweight"):
            p = name.removesuffix(".qweight")
            out[f"{p}.weight"] = (
                library_gptq(stored[name], stored[f"{p}.qzeros"], stored[f"{p}.scales"], stored[f"{p}.g_idx"],
                             config["bits"], config["checkpoint_format"] == "gptq")
                if config["quant_method"] == "gptq" else
                library_awq(stored[name], stored[f"{p}.qzeros"], stored[f"{p}.scales"], config["group_size"])
            ).contiguous()
    return out


@pytest.mark.parametrize("kind", sorted(LIBRARY_FORMATS))
def test_gptq_and_awq_read_bit_for_bit_and_load_as_the_dequantized_model(kind, tmp_path):
    from low_precision import save_gptq_or_awq
    from peft import PeftModel

    method, kwargs = LIBRARY_FORMATS[kind]
    src = save_gptq_or_awq(llama(), tmp_path / "src", method, **kwargs)
    expected_w = library_dequantized(src)
    checkpoint = pissa_rs.Checkpoint(src)
    found = pissa_rs.resolve_targets(checkpoint, r=R, lora_alpha=R, config_dir=src).targets
    assert {t.tensor.removesuffix(".qweight") + ".weight" for t in found} == set(expected_w)
    for t in found:
        got = t.location.read(checkpoint)
        assert got.dtype == torch.float16 and torch.equal(got, expected_w[t.tensor.removesuffix(".qweight") + ".weight"])

    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, out=tmp_path / "o", progress=False)
    assert res.report["source_format"] == method
    assert "quantization_config" not in json.loads((res.out / "config.json").read_text())
    out = pissa_rs.Checkpoint(res.out)
    assert not [n for n in out.names() if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    assert out.info("model.layers.1.mlp.down_proj.weight").dtype == "F16"

    reference = llama().to(torch.float16)
    reference.load_state_dict(reference.state_dict() | expected_w, strict=True)
    expected = logits(reference.float())
    assert_loads_as(res, expected, src)


def test_awq_left_partly_packed_names_the_decomposed_modules_not_to_convert(tmp_path):
    from low_precision import save_gptq_or_awq

    src = save_gptq_or_awq(llama(), tmp_path / "src", "awq")
    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, target_modules=["q_proj"], out=tmp_path / "o",
                                        progress=False)
    config = json.loads((res.out / "config.json").read_text())["quantization_config"]
    assert config["modules_to_not_convert"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    a, b = pissa_rs.Checkpoint(src), pissa_rs.Checkpoint(res.out)
    assert bytes(a.buffer("model.layers.0.mlp.up_proj.qweight")) == bytes(b.buffer("model.layers.0.mlp.up_proj.qweight"))
    assert b.info("model.layers.0.self_attn.q_proj.weight").dtype == "F16"


def test_gptq_left_partly_quantized_is_refused_before_any_write(tmp_path):
    """GPTQConfig has no list of modules it leaves in floats: the output could not say."""
    from low_precision import save_gptq_or_awq

    src = save_gptq_or_awq(llama(), tmp_path / "src", "gptq")
    with pytest.raises(pissa_rs.TargetError, match=r"GPTQ int4 .* cannot mark the decomposed modules as no longer "
                                                   r"quantized .*model\.layers\.\d\.\w+\.\w+_proj\.qweight \(and \d+ "
                                                   r"more\) would stay quantized"):
        pissa_rs.decompose_checkpoint(src, r=R, target_modules=["q_proj"], out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


P = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("method, plant, message", [
    ("gptq", lambda t: t.pop(f"{P}.scales"), r"q_proj\.qweight' has no '.*q_proj\.scales' beside it"),
    ("gptq", lambda t: t.update({f"{P}.g_idx": torch.full((64,), 4, dtype=torch.int32)}),
     r"'.*q_proj\.g_idx' holds group indices outside \[0, 4\) \(64 of 64, e\.g\. 4\)"),
    ("gptq", lambda t: t.update({f"{P}.qzeros": t[f"{P}.qzeros"][:, :4].contiguous()}),
     r"zero-point tensor '.*q_proj\.qzeros' is I32 x \[4, 4\]; weight '.*q_proj' needs I32 x \[4, 8\]"),
    ("awq", lambda t: t.update({f"{P}.scales": t[f"{P}.scales"][:2].contiguous()}),
     r"scale tensor '.*q_proj\.scales' is F16 x \[2, 64\]"),
    ("awq", lambda t: t.update({f"{P}.qweight": t[f"{P}.qweight"].float()}), r"q_proj\.qweight' is F32 x \[64, 8\]"),
])
def test_hostile_gptq_and_awq_tensors_are_refused_naming_file_and_tensor(tmp_path, method, plant, message):
    from low_precision import save_gptq_or_awq

    src = save_gptq_or_awq(llama(), tmp_path / "src", method)
    _rewrite(src, plant)
    with pytest.raises(pissa_rs.TargetError, match=rf"model\.safetensors: .*{message}"):
        pissa_rs.decompose_checkpoint(src, r=R, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_corda_on_a_gptq_source_is_corda_on_its_dequantized_checkpoint(tmp_path):
    """The calibration forward reads each layer's INT weights dequantized as GPTQModel does:
    CorDA from the GPTQ checkpoint writes the bytes CorDA from a float16 checkpoint holding
    those weights writes."""
    from helpers import calibration_texts, save_tokenizer
    from low_precision import save_gptq_or_awq

    src, reference = tmp_path / "src", tmp_path / "reference"
    tokenizer = save_tokenizer(src, calibration_texts())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    save_gptq_or_awq(model, src, "gptq", sym=False)
    shutil.copytree(src, reference)
    stored = load_file(src / "model.safetensors")
    plain = {k: v for k, v in stored.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    save_file(plain | library_dequantized(src), reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((reference / "config.json").read_text())
    del config["quantization_config"]
    (reference / "config.json").write_text(json.dumps(config))

    outputs = []
    for path in (src, reference):
        res = pissa_rs.decompose_checkpoint(path, r=R, method="corda-ipm", calibration=calibration_texts()[:6],
                                            calibration_samples=6, calibration_length=24, out=tmp_path / f"o-{path.name}",
                                            progress=False)
        outputs.append((load_file(res.adapter / "adapter_model.safetensors"), load_file(res.out / "model.safetensors")))
    (adapter_a, residual_a), (adapter_b, residual_b) = outputs
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert residual_a.keys() == residual_b.keys() and all(torch.equal(residual_a[k], residual_b[k]) for k in residual_a)


# --- pre-quantized bitsandbytes: written by transformers + bitsandbytes (quantized at load,
# then save_pretrained, as the *-bnb-4bit uploads are made)

BNB = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def save_bnb(path, kind):
    plain = path.parent / f"{path.name}-bf16"
    llama().to(torch.bfloat16).save_pretrained(plain)
    model = transformers.LlamaForCausalLM.from_pretrained(
        plain, dtype=torch.bfloat16, quantization_config=transformers.BitsAndBytesConfig(**BNB[kind]))
    model.save_pretrained(path)
    return path


def bnb_library(src) -> dict[str, torch.Tensor]:
    """Every bnb weight as bitsandbytes dequantizes it: its portable implementation (the
    `default` backend, the arithmetic its CUDA kernels have; unwrapped from torch.compile).
    Not the native CPU kernel, which depends on the CPU (AVX-512) and disagrees on some
    shapes (a 64 x 96 fp4 weight: max 0.023 off, farther from the original than this)."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default import ops

    stored = load_file(src / "model.safetensors")
    out = {}
    for name, value in stored.items():
        if value.dtype == torch.int8:
            out[name] = bnbf.int8_vectorwise_dequant(value, stored[name.removesuffix(".weight") + ".SCB"]).to(
                torch.bfloat16)
        elif any(f"{name}.quant_state.bitsandbytes__{k}" in stored for k in ("nf4", "fp4")):
            state = bnbf.QuantState.from_dict({k[len(name) + 1:]: v for k, v in stored.items()
                                               if k.startswith(name + ".")}, device=torch.device("cpu"))
            absmax = state.absmax
            if state.nested:
                absmax = ops._dequantize_blockwise_compute.__wrapped__(
                    state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32)
                absmax = absmax + state.offset
            out[name] = ops._dequantize_4bit_compute.__wrapped__(value.reshape(-1), absmax, state.code,
                                                                 state.blocksize, state.shape, state.dtype)
    return out


@pytest.mark.parametrize("kind", sorted(BNB))
def test_prequantized_bitsandbytes_reads_bit_for_bit_and_loads_as_the_dequantized_model(kind, tmp_path):
    from peft import PeftModel

    src = save_bnb(tmp_path / "src", kind)
    expected_w = bnb_library(src)
    checkpoint = pissa_rs.Checkpoint(src)
    found = pissa_rs.resolve_targets(checkpoint, r=R, lora_alpha=R, config_dir=src).targets
    assert {t.tensor for t in found} == set(expected_w)
    for t in found:
        got = t.location.read(checkpoint)
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected_w[t.tensor]), t.tensor

    res = pissa_rs.decompose_checkpoint(src, r=R, niter=0, out=tmp_path / "o", progress=False)
    assert res.report["source_format"] == "bitsandbytes"
    assert "quantization_config" not in json.loads((res.out / "config.json").read_text())
    out = pissa_rs.Checkpoint(res.out)
    assert not [n for n in out.names() if n.endswith(("absmax", "_map", ".SCB", "weight_format")) or ".quant_state." in n]
    assert out.info("model.layers.1.mlp.down_proj.weight").dtype == "BF16"
    assert tuple(out.info("model.layers.1.mlp.down_proj.weight").shape) == (64, 96)

    reference = llama().to(torch.bfloat16)
    reference.load_state_dict(reference.state_dict() | expected_w, strict=True)
    expected = logits(reference.float())
    assert_loads_as(res, expected, src)


B = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("kind, plant, message", [
    ("nf4-double", lambda t: t.pop(f"{B}.nested_absmax"), rf"tensor '{re.escape(B)}\.nested_absmax' is missing"),
    ("nf4-double", lambda t: t[f"{B}.quant_map"].mul_(2), rf"tensor '{re.escape(B)}\.quant_map' is not bitsandbytes' "
                                                          r"nf4 code table"),
    ("fp4", lambda t: t.update({B: t[B][:100].contiguous()}), rf"'{re.escape(B)}' is U8 x \[100, 1\] \(100 bytes\)"),
    ("int8", lambda t: t.pop("model.layers.0.self_attn.q_proj.SCB"), r"row scale tensor '.*q_proj\.SCB' is missing"),
])
def test_hostile_bitsandbytes_tensors_are_refused_naming_file_and_tensor(tmp_path, kind, plant, message):
    src = save_bnb(tmp_path / "src", kind)
    _rewrite(src, plant)
    with pytest.raises(pissa_rs.TargetError, match=rf"model\.safetensors: .*{message}"):
        pissa_rs.decompose_checkpoint(src, r=R, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_each_module_takes_the_scheme_compressed_tensors_gives_it():
    """A group naming the module (exactly or by "re:") wins over one naming its class;
    `ignore` leaves it unquantized; an exact module name is no class name."""
    from pissa_rs.formats.compressed_int import weight_args

    config = {"config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}},
        "group_1": {"targets": [r"re:.*mlp\.down_proj$"], "weights": {"num_bits": 8}},
        "group_2": {"targets": ["model.layers.1.self_attn.o_proj"], "weights": {"num_bits": 2}},
    }, "ignore": ["lm_head", r"re:.*layers\.0\.self_attn\.k_proj$"]}
    assert weight_args(config, "model.layers.0.mlp.down_proj") == {"num_bits": 8}
    assert weight_args(config, "model.layers.0.self_attn.q_proj") == {"num_bits": 4}
    assert weight_args(config, "model.layers.1.self_attn.o_proj") == {"num_bits": 2}
    assert weight_args(config, "lm_head") is None
    assert weight_args(config, "model.layers.0.self_attn.k_proj") is None
    only_named = {"config_groups": {"g": {"targets": ["model.layers.1.self_attn.o_proj"], "weights": {}}}}
    assert weight_args(only_named, "model.layers.0.self_attn.q_proj") is None


def test_a_decode_plan_survives_its_record_and_fp8_records_keep_their_fields():
    """The plan travels as JSON (planning child, resume): a part with extra tensors and args
    comes back equal; one without them (FP8) records no `extra`/`args`, as before they existed,
    so FP8 reports keep their bytes."""
    from pissa_rs.formats.sources import Decode
    from pissa_rs.formats.stored import Stored

    gptq = Stored("I32", (4, 96), 1536, "F16", (2, 96), 384,
                  extra=(("qzeros", "I32", (2, 12), 96), ("g_idx", "I32", (32,), 128)),
                  args=(("bits", 4), ("shape", (96, 32))))
    decode = Decode("gptq", (gptq,))
    assert Decode.from_record(json.loads(json.dumps(decode.as_record()))) == decode
    fp8 = Decode("fp8", (Stored("F8_E4M3", (96, 32), 3072, "F32", (1, 1), 4),))
    record = fp8.as_record()
    assert set(record["parts"][0]) == {"codes_dtype", "codes_shape", "codes_nbytes", "scale_dtype", "scale_shape",
                                       "scale_nbytes"}
    assert Decode.from_record(json.loads(json.dumps(record))) == fp8
