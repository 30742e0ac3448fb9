"""FP8 (float8_e4m3fn) weights with scales, as two quant_methods store them, and their
numerics exactly as transformers' Fp8Dequantize / Fp8Quantize compute them:

- transformers' fine-grained FP8 (`quant_method: "fp8"`, DeepSeek-V3 / Kimi-K2 / Qwen3-FP8):
  `X.weight` float8_e4m3fn [R, C] with `X.weight_scale_inv` [R/bm, C/bn] per bm x bn block.
- compressed-tensors `float-quantized` FP8 (`quant_method: "compressed-tensors"`):
  `X.weight` float8_e4m3fn with `X.weight_scale` per tensor ([1]) or per channel ([R, 1]).
"""

from __future__ import annotations

import torch

FP8_DTYPES = ("F8_E4M3",)


class FineGrainedFP8:
    quant_method = "fp8"
    scale_suffix = "_scale_inv"
    can_keep = True  # keep_source_format can store a residual back in it
    unquantized_key = "modules_to_not_convert"  # quantization_config's list of modules left in floats

    def holds_codes(self, info) -> bool:
        """Whether checkpoint tensor `info` holds a weight's codes in this format."""
        return info.dtype in FP8_DTYPES

    def describe(self, config: dict) -> str:
        return f"FP8 (float8_e4m3fn) with {'x'.join(map(str, config.get('weight_block_size') or []))} block scales"

    def scale_shapes(self, config: dict, rows: int, cols: int) -> list[tuple[int, ...]] | str:
        """The scale shapes a [rows, cols] weight may have, or why none fits."""
        bm, bn = config.get("weight_block_size") or (rows, cols)
        if rows % bm or cols % bn:
            return f"is not divided by the block size {[bm, bn]} of config.json's quantization_config"
        return [(rows // bm, cols // bn)]


class CompressedTensorsFP8:
    quant_method = "compressed-tensors"
    scale_suffix = "_scale"
    can_keep = True
    unquantized_key = "ignore"

    def holds_codes(self, info) -> bool:
        return info.dtype in FP8_DTYPES

    def describe(self, config: dict) -> str:
        return "compressed-tensors FP8 (float8_e4m3fn) with per-tensor or per-channel scales"

    def scale_shapes(self, config: dict, rows: int, cols: int) -> list[tuple[int, ...]] | str:
        return [(1,), (1, 1), (), (rows, 1), (rows,)]


def scale_grid(rows: int, scale_shape) -> tuple[int, int]:
    """(scale rows, scale columns) of an FP8 weight's scales: a block grid as stored, a
    per-channel [R] / [R, 1], or a per-tensor [], [1], [1, 1]."""
    if len(scale_shape) == 2:
        return tuple(scale_shape)
    return (rows, 1) if scale_shape and scale_shape[0] == rows and rows > 1 else (1, 1)


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' Fp8Dequantize._dequantize_one: each block of the scale grid times its
    scale (E8M0 bytes: 2**(b - 127)), in float32, then bfloat16."""
    rows, cols = q.shape
    scale_rows, scale_cols = scale_grid(rows, tuple(scales.shape))
    grid = scales.reshape(scale_rows, scale_cols)
    s = (grid.to(torch.float32) - 127.0).exp2() if grid.dtype == torch.uint8 else grid.to(torch.float32)
    blocks = q.to(torch.float32).reshape(scale_rows, rows // scale_rows, scale_cols, cols // scale_cols)
    return (blocks * s[:, None, :, None]).to(torch.bfloat16).reshape(rows, cols)


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize._quantize_one: per block, scale = 448 / absmax (1 for an
    all-zero block), codes = clamp(w * scale) in float8_e4m3fn; returns (codes, 1/scale)."""
    finfo = torch.finfo(torch.float8_e4m3fn)
    rows, cols = w.shape
    bm, bn = block
    tiles = w.to(torch.float32).reshape(rows // bm, bm, cols // bn, bn)
    max_abs = tiles.abs().amax(dim=(1, 3))
    scales = torch.where(max_abs > 0, finfo.max / torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs)),
                         torch.ones_like(max_abs))
    inv = (1.0 / scales).to(torch.float32)
    codes = torch.clamp(tiles * scales[:, None, :, None], min=finfo.min, max=finfo.max).to(torch.float8_e4m3fn)
    return codes.reshape(rows, cols), inv.to(scale_dtype)
