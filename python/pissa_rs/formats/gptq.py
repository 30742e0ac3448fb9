"""GPTQ (`quant_method: "gptq"`: Qwen's *-GPTQ-Int4 / Int8 uploads, GPTQModel's and
AutoGPTQ's output), and its numerics exactly as GPTQModel 7.x (the library transformers 5
loads GPTQ with) dequantizes it in `PackableQuantLinear.dequantize_weight`:

- `X.qweight` int32 [C*b/32, R]: b-bit codes packed along the input rows, code k of a
  word at bits [k*b, (k+1)*b);
- `X.qzeros` int32 [G, R*b/32]: zero points packed along the output columns the same way;
- `X.scales` float16 (or bfloat16) [G, R];
- `X.g_idx` int32 [C]: each input column's group (desc_act: any order; absent: c // g).

The checkpoint formats GPTQModel writes: "gptq" (v1, AutoGPTQ's: every zero point stored
minus one, and GPTQModel adds 0x11111111 to each word on load, carries included) and
"gptq_v2" (zero points as they are). W^T[c, r] = s[g(c), r] * (q[c, r] - z[g(c), r]) in
the scales' dtype; W is its transpose, [R, C]. 2-, 4- and 8-bit codes (3-bit is packed
across words: refused by name).
"""

from __future__ import annotations

import torch

from ..tensors import as_torch
from .stored import Encoded, NamedCodes, SourceFormatError, Stored, group_companions

SUFFIX = ".qweight"
# what GPTQModel adds to each v1 qzeros word: one to every zero point in it
V1_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


class GPTQ(NamedCodes):
    suffix = SUFFIX
    quant_method = "gptq"
    scale_suffix = None
    can_keep = False  # an RTN re-encoding would lose GPTQ's calibration
    unquantized_key = None  # GPTQConfig names no modules it leaves in floats: partial targeting is refused

    def describe(self, config: dict) -> str:
        kind = "symmetric" if config.get("sym", True) else "asymmetric"
        return (f"GPTQ int{config.get('bits')} {kind}, group {config.get('group_size')}"
                f"{', desc_act' if config.get('desc_act') else ''} ({checkpoint_format(config)} format)")

    def part(self, checkpoint, config: dict, tensor: str) -> Encoded | None:
        from ..hub import headers_only

        if not self.encoded(tensor):
            return None
        return gptq_part(checkpoint, config, tensor, check_values=not headers_only(checkpoint.root))


def checkpoint_format(config: dict) -> str:
    """"gptq" (v1) or "gptq_v2", as transformers' GPTQConfig reads it (format, or the legacy checkpoint_format)."""
    return str(config.get("format") or config.get("checkpoint_format") or "gptq").lower()


def codes_of(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] int words -> [..., n, 32/b] uint8 codes (code k of a word at bits [k*b, (k+1)*b)),
    as GPTQModel's shift and mask give them (the word's low 32 bits), one slot at a time: the
    only temporaries are a word-sized tensor per slot."""
    per_word = 32 // bits
    out = torch.empty(*words.shape, per_word, dtype=torch.uint8, device=words.device)
    for k in range(per_word):
        out[..., k] = (words >> (bits * k)) & ((1 << bits) - 1)
    return out


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, v1: bool) -> torch.Tensor:
    """W [R, C] in the scales' dtype, as GPTQModel dequantizes it (v1 zero points first
    moved as its conversion to v2 moves them: +1 to each, as a 32-bit word addition):
    s * (q - z), each product one IEEE rounding of exact small integers, in place."""
    words = qzeros.to(torch.int64) & 0xFFFFFFFF
    if v1:
        words = (words + V1_OFFSET[bits]) & 0xFFFFFFFF
    zeros = codes_of(words, bits).reshape(scales.shape)  # [G, R]
    codes = codes_of(qweight.T, bits).reshape(qweight.shape[1], -1).T  # [C, R]: code k of row i is input i*32/b + k
    dtype, (cols, rows), groups = scales.dtype, codes.shape, scales.shape[0]
    w = codes.to(dtype)
    del codes
    index = g_idx.long()
    if torch.equal(index, torch.arange(cols, device=index.device) // (cols // groups)):  # groups in order: broadcast
        grouped = w.view(groups, cols // groups, rows)
        grouped.sub_(zeros.to(dtype)[:, None, :])
        grouped.mul_(scales[:, None, :])
    else:  # desc_act: any column in any group
        w.sub_(zeros.to(dtype)[index])
        w.mul_(scales[index])
    return w.T.contiguous()


def gptq_part(checkpoint, config: dict, tensor: str, check_values: bool = True) -> Encoded:
    """The Encoded read of the GPTQ weight whose codes are `tensor`; companions missing or of
    the wrong shape or dtype, a g_idx out of range, a group size that does not divide the
    columns: SourceFormatError naming file and tensor."""
    prefix = tensor[: -len(SUFFIX)]
    info = checkpoint.info(tensor)
    where = f"{info.file}: tensor '{tensor}'"
    bits, group = config.get("bits"), config.get("group_size", 128)
    fmt = checkpoint_format(config)
    if bits not in V1_OFFSET:
        raise SourceFormatError(f"{where}: {bits}-bit GPTQ is not read by pissa_rs (2, 4 and 8 are)")
    if fmt not in ("gptq", "gptq_v2"):
        raise SourceFormatError(f"{where}: GPTQ checkpoint format {fmt!r} is not read by pissa_rs (gptq, gptq_v2)")
    if info.dtype != "I32" or len(info.shape) != 2:
        raise SourceFormatError(f"{where} is {info.dtype} x {list(info.shape)}; GPTQ codes are I32 x [in*{bits}/32, out]")
    packed_rows, rows = info.shape
    cols = packed_rows * 32 // bits
    group, scale, zero = group_companions(checkpoint, tensor, prefix, (rows, cols), group, rows * bits // 32, "GPTQ")
    groups = cols // group
    g_name = f"{prefix}.g_idx"
    extra = [("zero_point", "I32", tuple(zero.shape), zero.nbytes)]
    staged = [tensor, scale.name, zero.name]
    if g_name in checkpoint:
        g_idx = checkpoint.info(g_name)
        if g_idx.dtype not in ("I32", "I64") or tuple(g_idx.shape) != (cols,):
            raise SourceFormatError(f"{g_idx.file}: tensor '{g_name}' is {g_idx.dtype} x {list(g_idx.shape)}; "
                                    f"it needs one group index per input column: int x [{cols}]")
        if check_values:
            values = as_torch(checkpoint.buffer(g_name))
            bad = (values < 0) | (values >= groups)
            if bool(bad.any()):
                raise SourceFormatError(f"{g_idx.file}: tensor '{g_name}' holds group indices outside "
                                        f"[0, {groups}) ({int(bad.sum())} of {cols}, e.g. {int(values[bad][0])})")
        extra.append(("g_idx", g_idx.dtype, (cols,), g_idx.nbytes))
        staged.append(g_name)
    args = (("bits", bits), ("shape", (rows, cols)), ("group_size", group), ("v1", fmt == "gptq"))
    stored = Stored(info.dtype, tuple(info.shape), info.nbytes, scale.dtype, tuple(scale.shape), scale.nbytes,
                    tuple(extra), args)
    return Encoded(stored, tuple(staged), "gptq", scale.dtype, (rows, cols), prefix + ".weight")
