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
