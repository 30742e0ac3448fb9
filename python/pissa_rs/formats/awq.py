"""AWQ, GEMM packing (`quant_method: "awq"`, `format` / `version: "gemm"`: Qwen's *-AWQ
uploads, AutoAWQ's and GPTQModel's output), and its numerics exactly as GPTQModel 7.x (the
library transformers 5 loads AWQ with) dequantizes it in `dequantize_gemm`:

- `X.qweight` int32 [C, R*b/32]: codes packed along the output columns, 32/b to a word in
  AWQ's interleaved order (word slot k holds column AWQ_ORDER[k] of its 8);
- `X.qzeros` int32 [G, R*b/32]: zero points packed the same way;
- `X.scales` float16 [G, R].

W^T[c, r] = (q[c, r] - z[c // g, r]) * s[c // g, r] in the scales' dtype; W is its
transpose, [R, C]. 4-bit GEMM with zero points only (GEMV / Marlin layouts and
`zero_point: false` are refused by name).
"""

from __future__ import annotations

import torch

from .gptq import codes_of
from .stored import Encoded, NamedCodes, SourceFormatError, Stored, group_companions

SUFFIX = ".qweight"
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # word slot -> column, GPTQModel's packing_utils


class AWQ(NamedCodes):
    suffix = SUFFIX
    quant_method = "awq"
    scale_suffix = None
    can_keep = False  # an RTN re-encoding would lose AWQ's activation-aware scales
    unquantized_key = "modules_to_not_convert"

    def describe(self, config: dict) -> str:
        return f"AWQ int{config.get('bits', 4)} {layout(config).upper()}, group {config.get('group_size')}"

    def part(self, checkpoint, config: dict, tensor: str) -> Encoded | None:
        return awq_part(checkpoint, config, tensor) if self.encoded(tensor) else None


def layout(config: dict) -> str:
    """"gemm", "gemv", ...: as transformers' AwqConfig reads it (format, or the legacy version)."""
    return str(config.get("format") or config.get("version") or "gemm").lower()


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """W [R, C] in the scales' dtype, as GPTQModel's dequantize_gemm computes W^T."""
    order = torch.arange(qweight.shape[1] * 32 // bits, device=qweight.device).view(-1, 32 // bits)
    order = order[:, list(AWQ_REVERSE_ORDER)].reshape(-1)

    def unpack(words):
        return codes_of(words, bits).reshape(words.shape[0], -1)[:, order]

    dtype, groups = scales.dtype, scales.shape[0]
    w = unpack(qweight).to(dtype)  # [C, R]; (q - z) * s in place: the library's products, fewer temporaries
    grouped = w.view(groups, group_size, -1)
    grouped.sub_(unpack(qzeros).to(dtype)[:, None, :])
    grouped.mul_(scales[:, None, :])
    return w.T.contiguous()


def awq_part(checkpoint, config: dict, tensor: str) -> Encoded:
    """The Encoded read of the AWQ weight whose codes are `tensor`; companions missing or of
    the wrong shape or dtype, a group size that does not divide the columns:
    SourceFormatError naming file and tensor."""
    prefix = tensor[: -len(SUFFIX)]
    info = checkpoint.info(tensor)
    where = f"{info.file}: tensor '{tensor}'"
    bits, group = config.get("bits", 4), config.get("group_size", 128)
    if layout(config) != "gemm" or bits != 4 or config.get("zero_point", True) is False:
        raise SourceFormatError(f"{where}: pissa_rs reads AWQ's 4-bit GEMM layout with zero points; config.json says "
                                f"{layout(config)}, {bits}-bit, zero_point {config.get('zero_point', True)}")
    if info.dtype != "I32" or len(info.shape) != 2:
        raise SourceFormatError(f"{where} is {info.dtype} x {list(info.shape)}; AWQ codes are I32 x [in, out*4/32]")
    cols, words = info.shape
    rows = words * 32 // bits
    group, scale, zero = group_companions(checkpoint, tensor, prefix, (rows, cols), group, words, "AWQ")
    args = (("bits", bits), ("shape", (rows, cols)), ("group_size", group))
    stored = Stored(info.dtype, tuple(info.shape), info.nbytes, scale.dtype, tuple(scale.shape), scale.nbytes,
                    (("zero_point", "I32", tuple(zero.shape), zero.nbytes),), args)
    return Encoded(stored, (tensor, scale.name, zero.name), "awq", scale.dtype, (rows, cols),
                   prefix + ".weight")
