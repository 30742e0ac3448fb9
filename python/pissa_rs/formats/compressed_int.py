"""compressed-tensors `pack-quantized` INT weights (`quant_method: "compressed-tensors"`,
`format: "pack-quantized"`: Kimi-K2-Thinking's INT4, llm-compressor's W4A16 / W8A16), and
their numerics exactly as compressed-tensors 0.20.1 (the library transformers 5 loads them
with) decompresses them in `PackedQuantizationCompressor.decompress`:

- `X.weight_packed` int32 [R, ceil(C*b/32)]: b-bit codes, 32 / b to a word, element i at
  bits [i*b, (i+1)*b) of the little-endian stream, stored as q + 2**(b-1) (unsigned);
- `X.weight_scale` [R, C/g] (group), [R, 1] (channel) or [1] (tensor), in the model's
  float dtype, which is the dequantized weight's dtype;
- `X.weight_zero_point` (asymmetric, group / channel): int32 [ceil(R*b/32), C/g], the
  zero points packed the same way along the rows;
- `X.weight_g_idx` int32 [C] (`actorder: "group"` as compressed-tensors < 0.10 wrote it):
  column c's group; without it column c is in group c // g;
- `X.weight_shape` int [2]: [R, C].

W[r, c] = (q[r, c] - z[r, group(c)]) * s[r, group(c)], each step in the scale's dtype.
"""

from __future__ import annotations

import re

import torch

from ..tensors import as_torch
from .stored import Encoded, NamedCodes, SourceFormatError, Stored

PACKED_SUFFIX = ".weight_packed"
# the tensors a packed weight may come with, in the order a read stages them
COMPANIONS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


class CompressedTensorsPacked(NamedCodes):
    suffix = PACKED_SUFFIX
    quant_method = "compressed-tensors"
    format = "pack-quantized"
    scale_suffix = None  # its companions are found by the weight's module (`parts`), not one suffix
    can_keep = False  # re-encoding loses the calibration the codes came from (GPTQ / AWQ scales)
    unquantized_key = "ignore"

    def describe(self, config: dict) -> str:
        schemes = {_describe_args(g.get("weights") or {}) for g in (config.get("config_groups") or {}).values()}
        return f"compressed-tensors pack-quantized ({'; '.join(sorted(schemes)) or 'no weight scheme'})"

    def part(self, checkpoint, config: dict, tensor: str) -> Encoded | None:
        """How weight codes `tensor` are read, or None when `tensor` holds no packed weight."""
        from ..hub import headers_only

        if not self.encoded(tensor):
            return None
        stored, staged, dtype, shape = packed_part(checkpoint, config, tensor,
                                                   check_values=not headers_only(checkpoint.root))
        return Encoded(stored, tuple(staged), "int-packed", dtype, shape, self.weight_of(tensor))


def _describe_args(weights: dict) -> str:
    kind = "symmetric" if weights.get("symmetric", True) else "asymmetric"
    strategy = weights.get("strategy")
    group = f" {weights.get('group_size')}" if strategy == "group" else ""
    return f"int{weights.get('num_bits')} {kind}, {strategy}{group}"


def weight_args(config: dict, module: str) -> dict | None:
    """The `weights` quantization args of the config group that holds `module`, as
    compressed-tensors matches them: a group naming the module (exactly, or by a "re:"
    pattern) before one naming its class ("Linear"); None when `ignore` keeps it."""
    def names(target: str) -> bool:
        return target == module or (target.startswith("re:") and re.match(target[3:], module) is not None)

    if any(names(t) for t in config.get("ignore") or []):
        return None
    groups = list((config.get("config_groups") or {}).values())
    def is_class(target: str) -> bool:  # "Linear": a class name, no pattern, no dotted module path
        return not target.startswith("re:") and "." not in target

    for by_name in (True, False):
        for group in groups:
            targets = group.get("targets") or []
            if any(names(t) for t in targets) if by_name else any(is_class(t) for t in targets):
                return group.get("weights")
    return None


def packed_columns(columns: int, bits: int) -> int:
    return -(-columns * bits // 32)


def unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' unpack_from_int32 along the last dimension: int32 words ->
    `count` signed codes (int8) per row. b = 2, 4, 8 (no code straddles a byte)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit codes")
    data = words.contiguous().view(torch.uint8)  # little-endian words: the stream's byte order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    codes = torch.stack([(data >> (bits * k)) & mask for k in range(per_byte)], dim=-1)
    codes = codes.reshape(*words.shape[:-1], -1)[..., :count]
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      g_idx: torch.Tensor | None, shape: tuple[int, int], bits: int) -> torch.Tensor:
    """The weight [R, C] in the scale's dtype, as compressed-tensors' decompress computes it:
    codes and zero points cast to the scale's dtype, subtracted, times the scale."""
    rows, cols = shape
    q = unpack(packed, bits, cols)
    dtype = scale.dtype
    scale2 = scale.reshape(rows, -1) if scale.numel() > 1 else scale.reshape(1, 1)
    zero = None
    if zero_point is not None:  # packed along the rows: unpack the transpose
        zero = unpack(zero_point.T, bits, rows).T
    value = q.to(dtype)  # the library's three steps, in place
    del q
    if g_idx is not None:  # any column to any group: gather per column
        index = g_idx.long()
        if zero is not None:
            value.sub_(zero[:, index].to(dtype))
        return value.mul_(scale2[:, index])
    groups = scale2.shape[1]  # (one group is a channel scale: the same products)
    grouped = value.view(rows, groups, cols // groups)
    if zero is not None:
        grouped.sub_(zero.reshape(rows, groups, 1).to(dtype))
    grouped.mul_(scale2.reshape(scale2.shape[0], groups, 1))
    return value


def packed_part(checkpoint, config: dict, tensor: str, check_values: bool = True):
    """(Stored part, the tensors staged for it, codes first, the decoded dtype, [R, C]) of the
    packed weight whose codes are `tensor`. Companions that are missing, of the wrong
    shape or dtype, a weight_shape that is not the codes', a g_idx out of range, a group
    size that does not divide the columns: SourceFormatError naming file and tensor."""
    prefix = tensor[: -len(PACKED_SUFFIX)]
    info = checkpoint.info(tensor)
    where = f"{info.file}: tensor '{tensor}'"
    args = weight_args(config, prefix)
    if args is None:
        raise SourceFormatError(f"{where} is packed, but config.json's quantization_config has no weight scheme for "
                                f"module '{prefix}' (config_groups / ignore)")
    bits, strategy, group = args.get("num_bits"), args.get("strategy"), args.get("group_size")
    if args.get("type", "int") != "int" or bits not in (2, 4, 8):
        raise SourceFormatError(f"{where}: pissa_rs reads 2-, 4- and 8-bit int codes; config.json's scheme for "
                                f"'{prefix}' is {args.get('type')} {bits}-bit")
    if strategy not in ("group", "channel", "tensor"):
        raise SourceFormatError(f"{where}: strategy {strategy!r} is not one pissa_rs reads (group, channel, tensor)")
    if info.dtype != "I32" or len(info.shape) != 2:
        raise SourceFormatError(f"{where} is {info.dtype} x {list(info.shape)}; packed codes are I32 x [rows, words]")
    names = {role: f"{prefix}.{role}" for role in COMPANIONS}
    for role in ("weight_scale", "weight_shape"):
        if names[role] not in checkpoint:
            raise SourceFormatError(f"{where} has no '{names[role]}' beside it (config.json: compressed-tensors "
                                    "pack-quantized)")
    shape_info = checkpoint.info(names["weight_shape"])
    rows, words = info.shape
    if shape_info.dtype not in ("I64", "I32") or tuple(shape_info.shape) != (2,):
        raise SourceFormatError(f"{shape_info.file}: tensor '{names['weight_shape']}' is {shape_info.dtype} x "
                                f"{list(shape_info.shape)}; a weight's shape is an int [2]")
    stored_shape = [int(v) for v in as_torch(checkpoint.buffer(names["weight_shape"])).tolist()] if check_values \
        else None
    cols = stored_shape[1] if stored_shape else words * 32 // bits
    if stored_shape and (stored_shape[0] != rows or packed_columns(cols, bits) != words):
        raise SourceFormatError(f"{shape_info.file}: tensor '{names['weight_shape']}' says {stored_shape}, but the "
                                f"codes '{tensor}' are {list(info.shape)} ({bits}-bit: [rows, ceil(cols*{bits}/32)])")
    groups = 1
    if strategy == "group":
        if not isinstance(group, int) or group < 1 or cols % group:
            raise SourceFormatError(f"{where}: group size {group} does not divide its {cols} columns")
        groups = cols // group
    scale = checkpoint.info(names["weight_scale"])
    allowed = [(rows, groups)] if strategy == "group" else [(rows, 1), (rows,)] if strategy == "channel" else \
        [(1,), (), (1, 1)]
    if tuple(scale.shape) not in allowed or scale.dtype not in ("BF16", "F16", "F32"):
        raise SourceFormatError(f"{scale.file}: scale tensor '{names['weight_scale']}' is {scale.dtype} x "
                                f"{list(scale.shape)}; weight '{prefix}' [{rows}, {cols}] ({strategy}) needs a float "
                                f"one of {[list(a) for a in allowed]}")
    extra, staged = [], [tensor, names["weight_scale"]]
    if not args.get("symmetric", True) and strategy in ("group", "channel"):
        zero = checkpoint.info(names["weight_zero_point"]) if names["weight_zero_point"] in checkpoint else None
        need = (packed_columns(rows, bits), groups)
        if zero is None or zero.dtype != "I32" or tuple(zero.shape) != need:
            got = f"is {zero.dtype} x {list(zero.shape)}" if zero else "is missing"
            raise SourceFormatError(f"{(zero or info).file}: zero-point tensor '{names['weight_zero_point']}' {got}; "
                                    f"the asymmetric weight '{prefix}' needs I32 x {list(need)}")
        extra.append(("zero_point", "I32", need, zero.nbytes))
        staged.append(names["weight_zero_point"])
    if names["weight_g_idx"] in checkpoint:
        g_idx = checkpoint.info(names["weight_g_idx"])
        if g_idx.dtype not in ("I32", "I64") or tuple(g_idx.shape) != (cols,):
            raise SourceFormatError(f"{g_idx.file}: tensor '{names['weight_g_idx']}' is {g_idx.dtype} x "
                                    f"{list(g_idx.shape)}; it needs one group index per column: int x [{cols}]")
        if check_values:
            values = as_torch(checkpoint.buffer(names["weight_g_idx"]))
            bad = (values < 0) | (values >= groups)
            if bool(bad.any()):
                raise SourceFormatError(f"{g_idx.file}: tensor '{names['weight_g_idx']}' holds group indices outside "
                                        f"[0, {groups}) ({int(bad.sum())} of {cols}, e.g. {int(values[bad][0])})")
        extra.append(("g_idx", g_idx.dtype, (cols,), g_idx.nbytes))
        staged.append(names["weight_g_idx"])
    extra.append(("shape", shape_info.dtype, (2,), shape_info.nbytes))
    staged.append(names["weight_shape"])
    part_args = (("bits", bits), ("shape", (rows, cols)))
    stored = Stored(info.dtype, (rows, words), info.nbytes, scale.dtype, tuple(scale.shape), scale.nbytes,
                    tuple(extra), part_args)
    return stored, staged, scale.dtype, (rows, cols)
