"""MXFP4 (`quant_method: "mxfp4"`, GPT-OSS's experts): `P_blocks` uint8 [E, R, G, 16] (two
e2m1 values a byte, low nibble first) and `P_scales` uint8 [E, R, G] (E8M0 exponents, bias
127) for a parameter P the model holds as [E, G*32, R]; dequantized exactly as transformers'
convert_moe_packed_tensors does."""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class MXFP4:
    quant_method = "mxfp4"
    scale_suffix = None  # its scales are named by the parameter, not the weight (P_scales)
    can_keep = False
    unquantized_key = "modules_to_not_convert"

    def holds_codes(self, info) -> bool:
        return info.name.endswith("_blocks")

    def describe(self, config: dict) -> str:
        return "MXFP4 (e2m1 codes, E8M0 scales per 32)"


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' convert_moe_packed_tensors for one expert: [R, G, 16] bytes and [R, G]
    exponents -> [R, G*32] bfloat16 (low nibble first), before its transpose."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.bfloat16, device=blocks.device)
    rows, groups, width = blocks.shape
    out = torch.empty(rows * groups, width * 2, dtype=torch.bfloat16, device=blocks.device)
    flat = blocks.reshape(-1, width)
    out[:, 0::2] = lut[(flat & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(flat >> 4).to(torch.int)]
    torch.ldexp(out, scales.to(torch.int32).reshape(-1, 1) - 127, out=out)
    return out.reshape(rows, groups * width * 2)
