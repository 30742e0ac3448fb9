"""Tiny checkpoints in the low-precision formats the largest open models ship in, built
from random weights the way their quantizers lay them out:

- transformers' fine-grained FP8 (`FineGrainedFP8Config`, DeepSeek-V3's layout): every
  Linear weight quantized by transformers' own `Fp8Quantize` op, `weight_scale_inv` per block;
- compressed-tensors `float-quantized` FP8, per-channel (or per-tensor) `weight_scale`
  (the compressed-tensors library is not needed to write it: e4m3 codes = W / scale);
- MXFP4 (GPT-OSS's experts): `*_blocks` of e2m1 codes, two a byte, and `*_scales` of
  E8M0 exponents per 32 values.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
import transformers
from helpers import save_spread, text
from safetensors.torch import load_file, save_file


def _rewrite(path: Path, convert, quantization_config: dict) -> None:
    """Every shard's tensors through `convert(name, tensor) -> {name: tensor}`, and config.json
    with the quantization_config."""
    for shard in sorted(path.glob("*.safetensors")):
        tensors = {}
        for name, value in load_file(shard).items():
            tensors.update(convert(name, value))
        save_file(tensors, shard, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {n: f.name for f in sorted(path.glob("*.safetensors")) for n in load_file(f)}
        index.write_text(json.dumps(data))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2))


def dequantized(src) -> dict[str, torch.Tensor]:
    """The source's weights as transformers dequantizes them, by a formula written here (not
    pissa_rs's): FP8 codes times their block / channel / tensor scale in float32, then
    bfloat16; other tensors as stored."""
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    out = {}
    for name, value in tensors.items():
        if name.endswith(("_scale_inv", "_scale")):
            continue
        scale = tensors.get(f"{name}_scale_inv", tensors.get(f"{name}_scale"))
        if value.dtype == torch.float8_e4m3fn:
            rows, cols = value.shape
            s = scale.float().reshape(scale.shape[0] if scale.numel() > 1 else 1, -1)
            s = s.repeat_interleave(rows // s.shape[0], 0).repeat_interleave(cols // s.shape[1], 1)
            value = (value.float() * s).to(torch.bfloat16)
        out[name] = value
    return out


def save_dequantized(model, src: Path, reference: Path) -> Path:
    """`src` as a plain bfloat16 checkpoint of its weights dequantized (`dequantized`), with
    `model`'s config and `src`'s tokenizer files: what transformers loads it as."""
    model.to(torch.bfloat16).save_pretrained(reference)
    for old in reference.glob("*.safetensors*"):
        old.unlink()
    save_file(dequantized(src), reference / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            (reference / name).write_bytes((src / name).read_bytes())
    return reference


def is_quantized_linear(name: str, value: torch.Tensor) -> bool:
    """A Linear layer's weight, as the FP8 quantizers convert them: not the embeddings, the
    output head or a router."""
    return (name.endswith(".weight") and value.dim() == 2
            and not any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate.", "norm")))


def save_fp8_block(model, path: Path, block=(32, 32), only=None) -> None:
    """`model` saved, then its Linear weights (those `only` accepts) in transformers'
    fine-grained FP8 format, quantized by transformers' own Fp8Quantize."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    save_spread(model, path, max_shard_size="100KB")
    config = FineGrainedFP8Config(weight_block_size=list(block))
    quantize = Fp8Quantize(types.SimpleNamespace(quantization_config=config))

    def convert(name, value):
        if is_quantized_linear(name, value) and (only is None or only(name)):
            return quantize.convert({name: value.to(torch.bfloat16)})
        return {name: value.to(torch.bfloat16)}

    _rewrite(path, convert, config.to_dict())


def save_compressed_fp8(model, path: Path, strategy="channel") -> None:
    """compressed-tensors' float-quantized FP8: codes = W / scale with scale = absmax / 448,
    per output channel ([R, 1]) or per tensor ([1])."""
    save_spread(model, path, max_shard_size="100KB")
    finfo = torch.finfo(torch.float8_e4m3fn)

    def convert(name, value):
        if not is_quantized_linear(name, value):
            return {name: value.to(torch.bfloat16)}
        w = value.float()
        absmax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
        scale = (absmax / finfo.max).to(torch.bfloat16)
        codes = torch.clamp(w / scale.float(), finfo.min, finfo.max).to(torch.float8_e4m3fn)
        return {name: codes, f"{name}_scale": scale}

    _rewrite(path, convert, {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}}},
        "ignore": ["lm_head"]})


def save_mxfp4_gpt_oss(path: Path, seed: int = 0) -> None:
    """A tiny GPT-OSS whose experts are MXFP4 as OpenAI ships them: random e2m1 codes and
    exponents around 2**-5, laid out [E, R, G, 16] / [E, R, G] for a parameter the model
    holds as [E, G*32, R]; everything else bfloat16."""
    config = transformers.GptOssConfig(**text(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    torch.manual_seed(seed)
    save_spread(transformers.GptOssForCausalLM(config), path)
    g = torch.Generator().manual_seed(seed)

    def convert(name, value):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, cols, rows = value.shape  # held [E, G*32, R]
            blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.int32)
            scales = torch.randint(120, 124, (experts, rows, cols // 32), generator=g, dtype=torch.int32)
            return {f"{name}_blocks": blocks.to(torch.uint8), f"{name}_scales": scales.to(torch.uint8)}
        return {name: value.to(torch.bfloat16)}

    _rewrite(path, convert, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


def save_compressed_int(model, path: Path, *, bits: int = 4, symmetric: bool = True, strategy: str = "group",
                        group_size: int | None = 16, ignore=("lm_head",), permute_groups: bool = False) -> Path:
    """compressed-tensors `pack-quantized` INT, written by the compressed-tensors library
    itself: its own scheme set-up (`apply_quantization_config`), its own scales and zero
    points (`calculate_qparams` on each group's min / max), its own packing
    (`ModelCompressor.compress_model`) and config (`update_config`). `permute_groups`: the
    layout actorder="group" had (compressed-tensors < 0.10): groups of a column permutation,
    `weight_g_idx` naming each column's group, codes in the original column order."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=list(ignore), format="pack-quantized")
    model = model.to(torch.bfloat16)
    apply_quantization_config(model, config, show_progress=False)
    g_idx = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        w = module.weight.data.float()
        if permute_groups:
            perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(len(g_idx)))
            index = torch.empty_like(perm)
            index[perm] = torch.arange(w.shape[1]) // group_size
            g_idx[name] = index.to(torch.int32)
            w = w[:, perm]
        groups = w.reshape(w.shape[0], -1, group_size) if strategy == "group" else w.reshape(w.shape[0], 1, -1)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), module.quantization_scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        if permute_groups:  # the library quantizes per element with each column's own group's scale
            module.weight_scale.data = module.weight_scale.data  # (kept [R, G]: the codes come below)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    if permute_groups:
        _compress_with_g_idx(model, g_idx, bits)
    else:
        compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return path


def _compress_with_g_idx(model, g_idx: dict, bits: int) -> None:
    """Packs each weight the way compressed-tensors < 0.10 did under actorder="group": codes
    by the library's `quantize` with every column's own group's scale and zero point
    (gathered by g_idx), packed by its `pack_to_int32`, g_idx stored beside them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize

    for name, module in model.named_modules():
        if name not in g_idx:
            continue
        index = g_idx[name].long()
        args = module.quantization_scheme.weights
        scale, zero = module.weight_scale.data, getattr(module, "weight_zero_point", None)
        channel_args = args.model_copy(update={"strategy": "channel", "group_size": None})
        codes = torch.stack([quantize(x=module.weight.data[:, c:c + 1], scale=scale[:, index[c]:index[c] + 1],
                                      zero_point=None if zero is None else zero.data[:, index[c]:index[c] + 1],
                                      args=channel_args, dtype=torch.int8)[:, 0] for c in range(len(index))], 1)
        packed = pack_to_int32(codes, bits)
        shape = torch.tensor(module.weight.shape)
        del module.weight
        module.register_parameter("weight_packed", torch.nn.Parameter(packed, requires_grad=False))
        module.register_parameter("weight_shape", torch.nn.Parameter(shape, requires_grad=False))
        module.register_parameter("weight_g_idx", torch.nn.Parameter(g_idx[name], requires_grad=False))
        if zero is not None:
            del module.weight_zero_point
            module.register_parameter("weight_zero_point", torch.nn.Parameter(
                pack_to_int32(zero.data.to(torch.int8), bits, packed_dim=0), requires_grad=False))


EXPERT_WEIGHT = r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$"


def pack_experts_gptq(path: Path, *, group_size: int = 16) -> Path:
    """A saved MoE checkpoint's routed experts (per-expert tensors) as GPTQ v1 (asymmetric),
    everything else as saved: how Qwen3-MoE / DeepSeek GPTQ uploads store their experts."""
    import re

    def convert(name, value):
        if not re.search(EXPERT_WEIGHT, name):
            return {name: value}
        prefix = name.removesuffix(".weight")
        return {f"{prefix}.{k}": v for k, v in gptq_tensors(value.to(torch.float16), group_size=group_size,
                                                             sym=False).items()}

    _rewrite(path, convert, {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                             "sym": False, "checkpoint_format": "gptq"})
    return path


def pack_experts_int(path: Path, *, bits: int = 4, group_size: int = 16, symmetric: bool = True) -> Path:
    """A saved MoE checkpoint's routed experts (per-expert tensors on disk, as Kimi-K2 ships
    them) as compressed-tensors pack-quantized INT, by the library's own functions: group
    scales and zero points (`calculate_qparams`), codes (`quantize`), packing
    (`pack_to_int32`); everything else stays bfloat16, as Kimi-K2-Thinking's config says."""
    import re

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)

    def convert(name, value):
        if not re.search(EXPERT_WEIGHT, name):
            return {name: value}
        w = value.to(torch.bfloat16)
        groups = w.float().reshape(w.shape[0], -1, group_size)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        scale = scale.to(torch.bfloat16)
        codes = quantize(x=w, scale=scale, zero_point=None if symmetric else zero, args=args, dtype=torch.int8)
        prefix = name.removesuffix(".weight")
        out = {f"{prefix}.weight_packed": pack_to_int32(codes, bits), f"{prefix}.weight_scale": scale,
               f"{prefix}.weight_shape": torch.tensor(list(w.shape))}
        if not symmetric:
            out[f"{prefix}.weight_zero_point"] = pack_to_int32(zero.to(torch.int8), bits, packed_dim=0)
        return out

    _rewrite(path, convert, {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": [r"re:.*mlp\.experts\.\d+\..*"], "format": "pack-quantized",
                                      "weights": args.model_dump(mode="json")}},
        "ignore": ["lm_head"]})
    return path


# --- GPTQ and AWQ: reference quantizers written from the formats' specification (their
# libraries do not install beside the rest of the suite), checked against the libraries' own
# dequantizers, transcribed below from GPTQModel (github.com/ModelCloud/GPTQModel, 7.3.4,
# commit f4c327a17).

def _rtn_groups(w: torch.Tensor, columns: torch.Tensor, bits: int, sym: bool):
    """Round-to-nearest codes of w[:, columns] (one group), GPTQ's min/max rule: (scale [R],
    zero [R], codes [R, len(columns)])."""
    maxq = 2 ** bits - 1
    x = w[:, columns].float()
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = ((hi - lo) / maxq).clamp(min=1e-8).to(torch.float16)
    zero = torch.full_like(scale.float(), (maxq + 1) / 2) if sym else torch.round(-lo / scale.float())
    codes = torch.clamp(torch.round(x / scale.float()[:, None]) + zero[:, None], 0, maxq)
    return scale, zero.to(torch.int64), codes.to(torch.int64)


def _pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes packed 32/b to an int32 word along `dim`, code k at bits [k*b, (k+1)*b)."""
    pack = 32 // bits
    c = codes.movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], -1, pack)
    words = (c << (torch.arange(pack) * bits)).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def gptq_tensors(w: torch.Tensor, *, bits=4, group_size=16, sym=True, desc_act=False, v1=True, seed=0):
    """One Linear weight [R, C] as GPTQ stores it: qweight, qzeros, scales, g_idx."""
    rows, cols = w.shape
    order = torch.randperm(cols, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(cols)
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[order] = (torch.arange(cols) // group_size).to(torch.int32)
    scales, zeros, codes = [], [], torch.empty(rows, cols, dtype=torch.int64)
    for g in range(cols // group_size):
        columns = order[g * group_size:(g + 1) * group_size]
        s, z, q = _rtn_groups(w, columns, bits, sym)
        scales.append(s)
        zeros.append(z)
        codes[:, columns] = q
    zeros = torch.stack(zeros)  # [G, R]
    stored_zeros = (zeros - 1) & (2 ** bits - 1) if v1 else zeros  # v1: every zero point minus one
    return {"qweight": _pack(codes.T, bits, 0), "qzeros": _pack(stored_zeros, bits, 1),
            "scales": torch.stack(scales), "g_idx": g_idx}


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_tensors(w: torch.Tensor, *, group_size=16):
    """One Linear weight [R, C] as AWQ's GEMM layout stores it (4-bit, zero points): qweight
    [C, R/8], qzeros [G, R/8], scales [G, R], columns interleaved in AWQ_ORDER."""
    rows, cols = w.shape
    scales, zeros, codes = [], [], torch.empty(rows, cols, dtype=torch.int64)
    for g in range(cols // group_size):
        columns = torch.arange(g * group_size, (g + 1) * group_size)
        s, z, q = _rtn_groups(w, columns, 4, sym=False)
        scales.append(s)
        zeros.append(z)
        codes[:, columns] = q
    interleave = torch.arange(rows).view(-1, 8)[:, AWQ_ORDER].reshape(-1)
    return {"qweight": _pack(codes.T[:, interleave], 4, 1), "qzeros": _pack(torch.stack(zeros)[:, interleave], 4, 1),
            "scales": torch.stack(scales)}


def save_gptq_or_awq(model, path: Path, method: str, **kwargs) -> Path:
    """`model` in float16 saved by transformers, every decoder Linear re-stored as GPTQ (or AWQ)
    tensors, config.json given the quantization_config the format's library writes."""
    model.to(torch.float16).save_pretrained(path)
    group = kwargs.get("group_size", 16)
    seeds = iter(range(10_000))

    def convert(name, value):
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            return {name: value}
        prefix = name.removesuffix(".weight")
        found = gptq_tensors(value, seed=next(seeds), **kwargs) if method == "gptq" else awq_tensors(value, **kwargs)
        return {f"{prefix}.{k}": v for k, v in found.items()}

    if method == "gptq":
        config = {"quant_method": "gptq", "bits": kwargs.get("bits", 4), "group_size": group,
                  "desc_act": kwargs.get("desc_act", False), "sym": kwargs.get("sym", True),
                  "checkpoint_format": "gptq" if kwargs.get("v1", True) else "gptq_v2"}
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}
    _rewrite(path, convert, config)
    return path


def library_gptq(qweight, qzeros, scales, g_idx, bits, v1):
    """GPTQModel's dequantization of one GPTQ layer, transcribed: its v1 -> v2 zero-point
    conversion (utils/model.py, convert_gptq_v1_to_v2_format_module: one word addition) and
    PackableQuantLinear.dequantize_weight's 2/4/8-bit branch with num_itr=1
    (nn_modules/qlinear/__init__.py), then the transpose to the Linear's [out, in]."""
    qzeros = qzeros.clone()
    if v1:
        qzeros += {2: 0b01010101010101010101010101010101, 4: 0b00010001000100010001000100010001,
                   8: 0b00000001000000010000000100000001}[bits]
    pack_factor = 32 // bits
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    dequant_dtype = torch.int16 if bits == 8 else torch.int8
    maxq = 2 ** bits - 1
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, pack_factor),
                                      wf.unsqueeze(0)).to(dequant_dtype)
    zeros = torch.bitwise_and(zeros, maxq).reshape(scales.shape)
    weight = torch.bitwise_and(torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, pack_factor, -1),
                                                         wf.unsqueeze(-1)).to(dequant_dtype), maxq)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    weights = scales[g_idx.long()] * (weight - zeros[g_idx.long()])
    return weights.t()


def library_awq(qweight, qzeros, scales, group_size):
    """GPTQModel's quantization/awq/utils/packing_utils.dequantize_gemm (4-bit), transcribed
    (unpack_awq, reverse_awq_order and the overflow masks), then the transpose."""
    shifts = torch.arange(0, 32, 4)
    iweight = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweight = iweight.view(iweight.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    reverse = torch.arange(iweight.shape[-1], dtype=torch.int32).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    izeros, iweight = izeros[:, reverse], iweight[:, reverse]
    iweight, izeros = torch.bitwise_and(iweight, 15), torch.bitwise_and(izeros, 15)
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return ((iweight - izeros) * scales).t()
