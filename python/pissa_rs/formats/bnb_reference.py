"""bitsandbytes' quantization formats in pure torch: the reference its kernels
are checked against, and what a decomposition uses where they are wrong.

Every step copies bitsandbytes 0.50's portable implementation (its "default"
backend), expression for expression, so that the two agree bit for bit:
4-bit blockwise absmax over the flattened weight (blocks may span rows), the
NF4 / FP4 code tables, nearest-code rounding by bucketize over the midpoints
(a tie goes to the lower code), two codes per byte (first in the high nibble),
double quantization of the absmax (mean offset, 8-bit dynamic map, blocks of
256), and LLM.int8()'s row-wise absmax of the weight cast to float16.
No I/O and no bitsandbytes import: it also runs where bitsandbytes is absent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), sorted.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# get_4bit_type("fp4"): sign, 2 exponent bits, 1 mantissa bit, in bit-pattern order, scaled by 1/12.
FP4_CODE_UNSCALED = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
DOUBLE_QUANT_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes the absmax in blocks of 256
INT8_DEQUANT_SCALE = 7.874015718698502e-3  # bitsandbytes' 1/127


@functools.cache
def _code_cpu(kind: str) -> torch.Tensor:
    if kind == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if kind == "fp4":
        data = torch.tensor(FP4_CODE_UNSCALED, dtype=torch.float32)
        return data.div_(data.abs().max())
    if kind == "dynamic":
        return dynamic_map()
    raise ValueError(f"unknown 4-bit code {kind!r}")


def code_table(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values of a 4-bit code ("nf4", "fp4") or the 256 of the 8-bit "dynamic" map, float32."""
    return _code_cpu(kind).to(device)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True): the 8-bit code double quantization stores the absmax in."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blockwise_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / block absmax clamped to [-1, 1], absmax) over a flat float32 tensor;
    a last partial block is divided, full ones multiplied by the reciprocal, as bitsandbytes does."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return scaled, absmax


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (a tie goes to the lower value), as uint8."""
    order = torch.argsort(code)
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    rank = torch.bucketize(scaled, midpoints, out_int32=True)
    if torch.equal(order, torch.arange(len(code), device=order.device)):  # nf4, dynamic: sorted already
        return rank.to(torch.uint8)
    return order.to(torch.uint8)[rank]


def _blockwise_dequant(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (float32, flat) times their block's absmax."""
    n = values.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(full)
    if rem:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out


@dataclass
class Quantized4bit:
    """One weight in bitsandbytes' 4-bit format, as Params4bit holds and serializes it."""

    packed: torch.Tensor  # uint8 [ceil(n / 2), 1]: two codes per byte, the first in the high nibble
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] with double quantization
    kind: str  # "nf4" or "fp4"
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the weight had when quantized, and dequantizes to
    nested_absmax: torch.Tensor | None = None  # double quantization: float32 [ceil(blocks / 256)]
    nested_offset: float | None = None  # double quantization: the mean subtracted before quantizing


# Weights are quantized this many elements at a time (whole blocks: the same result), so
# that the float32 temporaries stay small next to the weight itself.
CHUNK_ELEMENTS = 1 << 22


def quantize_4bit(x: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> Quantized4bit:
    """bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant, quant_type=kind)."""
    flat = x.reshape(-1)
    code = code_table(kind, x.device)
    step = CHUNK_ELEMENTS // (2 * blocksize) * 2 * blocksize  # whole blocks, an even count
    packed_parts, absmax_parts = [], []
    for start in range(0, max(flat.numel(), 1), step):
        scaled, absmax = _blockwise_scaled(flat[start:start + step].float(), blocksize)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = _nearest_code(scaled, code)
        del scaled
        packed_parts.append((q[::2] << 4) | q[1::2])
        absmax_parts.append(absmax)
    packed = torch.cat(packed_parts).unsqueeze(1)
    absmax = torch.cat(absmax_parts)
    result = Quantized4bit(packed, absmax, kind, blocksize, tuple(x.shape), x.dtype)
    if double_quant:
        offset = absmax.mean()
        scaled2, result.nested_absmax = _blockwise_scaled(absmax - offset, DOUBLE_QUANT_BLOCKSIZE)
        result.absmax = _nearest_code(scaled2, code_table("dynamic", x.device)).to(torch.uint8)
        result.nested_offset = offset.item()
    return result


def block_absmax(q: Quantized4bit) -> torch.Tensor:
    """The float32 absmax of every block, undoing double quantization."""
    if q.nested_absmax is None:
        return q.absmax.float()
    dynamic = code_table("dynamic", q.absmax.device)
    absmax = _blockwise_dequant(dynamic[q.absmax.long()], q.nested_absmax, DOUBLE_QUANT_BLOCKSIZE)
    return absmax + torch.tensor(q.nested_offset, dtype=torch.float32, device=absmax.device)


def dequantize_4bit(q: Quantized4bit) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit: code value times block absmax (float32), cast to q.dtype."""
    n = 1
    for d in q.shape:
        n *= d
    flat = q.packed.reshape(-1)
    code = code_table(q.kind, flat.device)
    absmax = block_absmax(q)
    out = torch.empty(n, dtype=q.dtype, device=flat.device)
    step = CHUNK_ELEMENTS // (2 * q.blocksize) * 2 * q.blocksize  # whole blocks, an even count
    for start in range(0, n, step):
        count = min(step, n - start)
        chunk = flat[start // 2:(start + count + 1) // 2]
        values = torch.empty(chunk.numel() * 2, dtype=torch.float32, device=flat.device)
        values[::2] = code[(chunk >> 4).long()]
        values[1::2] = code[(chunk & 0xF).long()]
        first = start // q.blocksize
        out[start:start + count] = _blockwise_dequant(values[:count], absmax[first:], q.blocksize)
    return out.reshape(q.shape)


def int8_rows_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s weight format (Int8Params): x cast to float16, each row scaled by
    127 / its absmax and rounded. Returns (int8 codes, float32 row absmax "SCB").
    An all-zero row gets zero codes (bitsandbytes would divide by zero)."""
    a = x.to(torch.float16)
    row_stats = a.abs().max(dim=1).values.float()
    codes = torch.round(a * (127.0 / row_stats.unsqueeze(-1)))
    codes = torch.where(row_stats.unsqueeze(-1) > 0, codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
    return codes.to(torch.int8), row_stats


def int8_rows_dequantize(codes: torch.Tensor, row_stats: torch.Tensor) -> torch.Tensor:
    """bitsandbytes.functional.int8_vectorwise_dequant: float32."""
    return codes * row_stats.view(-1, 1) * INT8_DEQUANT_SCALE
