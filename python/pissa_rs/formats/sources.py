"""Low-precision source checkpoints: which format config.json names (FORMATS, one module
per format: fp8.py, mxfp4.py), what a stored weight is when it is not a float tensor, and
how to get its values. A target whose weight is stored in FP8 or MXFP4 is read as its codes
and scales, dequantized on the compute device (`Decode`), and the SVD and residual see only
the dequantized matrix.
Each is dequantized exactly as transformers does it when it loads the checkpoint
dequantized, to bfloat16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pissa_rs import Checkpoint
from .fp8 import FP8_DTYPES, CompressedTensorsFP8, FineGrainedFP8, dequantize_fp8, quantize_fp8_blocks, scale_grid
from .stored import Encoded, SourceFormatError, Stored, typed
from .awq import AWQ, dequantize_awq
from .bnb_prequantized import BitsAndBytesPrequantized, dequantize_bnb_4bit, dequantize_bnb_int8
from .compressed_int import CompressedTensorsPacked, dequantize_packed
from .gptq import GPTQ, dequantize_gptq
from .mxfp4 import MXFP4, dequantize_mxfp4

OUT_DTYPE = "BF16"  # what transformers dequantizes these formats to for training
SCALE_DTYPES = ("F32", "BF16", "F16", "U8", "F8_E8M0")


@dataclass(frozen=True)
class SourceFormat:
    """How config.json says the checkpoint's weights are stored."""

    kind: str | None  # config.json's quant_method ("fp8", "compressed-tensors", "mxfp4", ...), or None (floats)
    config: dict | None  # its quantization_config

    @property
    def codec(self):
        """The format's module-level description (FORMATS), None for floats or a format we cannot read."""
        return FORMATS.get((self.kind, (self.config or {}).get("format")), FORMATS.get(self.kind))

    @property
    def scale_suffix(self) -> str | None:
        return self.codec.scale_suffix if self.codec else None

    @property
    def can_keep(self) -> bool:
        """Whether keep_source_format can store residuals back in this format."""
        return bool(self.codec and self.codec.can_keep)

    def describe(self) -> str:
        if self.kind is None:
            return "floating point"
        if self.codec is None:
            return f"quantized with {self.kind!r} (not readable by pissa_rs)"
        return self.codec.describe(self.config)


# The low-precision formats pissa_rs reads, by quantization_config's quant_method (one module
# each), or by (quant_method, format) where one library stores several (compressed-tensors)
FORMATS = {f.quant_method: f for f in (FineGrainedFP8(), CompressedTensorsFP8(), MXFP4(), GPTQ(), AWQ(),
                                        BitsAndBytesPrequantized())}
FORMATS[(CompressedTensorsPacked.quant_method, CompressedTensorsPacked.format)] = CompressedTensorsPacked()


def source_format(config_dir: str | Path | None) -> SourceFormat:
    path = Path(config_dir) / "config.json" if config_dir else None
    if path is None or not path.is_file():
        return SourceFormat(None, None)
    quant = json.loads(path.read_text()).get("quantization_config")
    if not quant:
        return SourceFormat(None, None)
    return SourceFormat(quant.get("quant_method"), quant)


def _decode_fp8(part: Stored, codes, scale, extra) -> torch.Tensor:
    return dequantize_fp8(typed(codes, part.codes_dtype, part.codes_shape),
                          typed(scale, part.scale_dtype, part.scale_shape))


def _decode_mxfp4(part: Stored, codes, scale, extra) -> torch.Tensor:
    return dequantize_mxfp4(codes.view(part.codes_shape), scale.view(part.scale_shape))


def _decode_int_packed(part: Stored, codes, scale, extra) -> torch.Tensor:
    args = dict(part.args)
    return dequantize_packed(typed(codes, part.codes_dtype, part.codes_shape),
                             typed(scale, part.scale_dtype, part.scale_shape),
                             extra.get("zero_point"), extra.get("g_idx"), tuple(args["shape"]), args["bits"])


def _decode_gptq(part: Stored, codes, scale, extra) -> torch.Tensor:
    args = dict(part.args)
    rows, cols = args["shape"]
    g_idx = extra.get("g_idx")
    if g_idx is None:  # (GPTQModel's default: input column c in group c // g)
        g_idx = torch.arange(cols, device=codes.device) // args["group_size"]
    return dequantize_gptq(typed(codes, part.codes_dtype, part.codes_shape), extra["zero_point"],
                           typed(scale, part.scale_dtype, part.scale_shape), g_idx, args["bits"], args["v1"])


def _decode_awq(part: Stored, codes, scale, extra) -> torch.Tensor:
    args = dict(part.args)
    return dequantize_awq(typed(codes, part.codes_dtype, part.codes_shape), extra["zero_point"],
                          typed(scale, part.scale_dtype, part.scale_shape), args["bits"], args["group_size"])


def _decode_bnb_4bit(part: Stored, codes, scale, extra) -> torch.Tensor:
    return dequantize_bnb_4bit(codes, typed(scale, part.scale_dtype, part.scale_shape), extra.get("nested_absmax"),
                               dict(part.args))


def _decode_bnb_int8(part: Stored, codes, scale, extra) -> torch.Tensor:
    return dequantize_bnb_int8(typed(codes, part.codes_dtype, part.codes_shape),
                               typed(scale, part.scale_dtype, part.scale_shape))


# How a Stored part's bytes become its rows, by Decode.kind (one entry per encoding)
DECODERS = {"fp8": _decode_fp8, "mxfp4": _decode_mxfp4, "int-packed": _decode_int_packed, "gptq": _decode_gptq,
            "awq": _decode_awq, "bnb-4bit": _decode_bnb_4bit, "bnb-int8": _decode_bnb_int8}


@dataclass(frozen=True)
class Decode:
    """How a matrix's staged bytes become its values: per stored tensor (stacked by
    rows, in order), its codes then its scales (then its extra tensors); `transpose` when the
    model multiplies by the transpose of the decoded rows (MXFP4 experts)."""

    kind: str  # a DECODERS key: "fp8" (block, per-channel and per-tensor scales alike), "mxfp4", "int-packed"
    parts: tuple[Stored, ...]
    transpose: bool = False

    def as_record(self) -> dict:
        return {"kind": self.kind, "parts": [p.as_record() for p in self.parts], "transpose": self.transpose}

    @staticmethod
    def from_record(record: dict) -> Decode:
        return Decode(record["kind"], tuple(Stored.from_record(p) for p in record["parts"]), record["transpose"])

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """The matrix in the format's dequantized dtype (bfloat16 for FP8 / MXFP4, the
        scales' for INT), on raw's device."""
        decoder = DECODERS[self.kind]
        rows, offset = [], 0
        for part in self.parts:
            codes = raw[offset: offset + part.codes_nbytes]
            offset += part.codes_nbytes
            scale = raw[offset: offset + part.scale_nbytes]
            offset += part.scale_nbytes
            extra = {}
            for role, dtype, shape, size in part.extra:
                extra[role] = typed(raw[offset: offset + size], dtype, shape)
                offset += size
            rows.append(decoder(part, codes, scale, extra))
        matrix = torch.cat(rows) if len(rows) > 1 else rows[0]
        return matrix.T.contiguous() if self.transpose else matrix

    def _row_parts(self, matrix: torch.Tensor):
        """(part, its rows of `matrix`, its block shape) per stored tensor (FP8 only)."""
        if self.kind != "fp8" or self.transpose:
            raise ValueError(f"{self.kind} residuals cannot be stored in their source format")
        start = 0
        for part in self.parts:
            rows, cols = part.codes_shape
            grid = scale_grid(rows, part.scale_shape)
            yield part, matrix[start: start + rows], (rows // grid[0], cols // grid[1])
            start += rows

    def encode(self, matrix: torch.Tensor) -> torch.Tensor:
        """The bytes `decode` reads, for `matrix` re-quantized the way transformers'
        Fp8Quantize quantizes (same block grid and scale dtype as the source's)."""
        from ..tensors import TORCH_DTYPES

        out = []
        for part, rows, block in self._row_parts(matrix):
            codes, inv = quantize_fp8_blocks(rows, block, TORCH_DTYPES[part.scale_dtype])
            out += [codes.reshape(-1).view(torch.uint8), inv.reshape(-1).contiguous().view(torch.uint8)]
        return torch.cat(out)

    def error_bound(self, matrix: torch.Tensor) -> torch.Tensor:
        """Per element, what re-quantizing `matrix` to this FP8 format may change it by: an
        e4m3 code's half step (2**-4 relative) plus a subnormal step of its block's scale."""
        bounds = []
        for _, rows, (bm, bn) in self._row_parts(matrix):
            r, c = rows.shape
            tiles = rows.float().abs().reshape(r // bm, bm, c // bn, bn)
            step = tiles.amax(dim=(1, 3), keepdim=True) / torch.finfo(torch.float8_e4m3fn).max * 2.0 ** -9
            bounds.append((tiles * 2.0 ** -4 + step).reshape(r, c))
        return torch.cat(bounds)


def encoded_part(checkpoint: Checkpoint, fmt: SourceFormat, tensor: str) -> Encoded | None:
    """How `tensor` is read when the checkpoint stores it encoded (its format's `part`; FP8:
    the weight with its scales), or None when it is a plain tensor."""
    codec = fmt.codec
    if codec is not None and hasattr(codec, "part"):
        return codec.part(checkpoint, fmt.config, tensor)
    found = fp8_part(checkpoint, fmt, tensor)
    if found is None:
        return None
    part, scale = found
    return Encoded(part, (tensor, scale), "fp8", OUT_DTYPE, tuple(part.codes_shape), tensor)


def fp8_part(checkpoint: Checkpoint, fmt: SourceFormat, tensor: str) -> tuple[Stored, str] | None:
    """The Stored part of an FP8 weight and the name of its scale tensor, or None when
    `tensor` is no FP8 weight. Scales of the wrong shape, a block size that does not
    divide the weight and NaN or non-positive scales are refused, naming file and tensor."""
    info = checkpoint.info(tensor)
    if info.dtype not in FP8_DTYPES:
        return None
    suffix = fmt.scale_suffix
    scale_name = f"{tensor}{suffix}" if suffix else None
    if scale_name is None or scale_name not in checkpoint:
        raise SourceFormatError(f"{info.file}: tensor '{tensor}' is {info.dtype} but the checkpoint has no scale "
                                f"'{scale_name}' for it (config.json: {fmt.describe()})")
    scale = checkpoint.info(scale_name)
    rows, cols = info.shape
    allowed = fmt.codec.scale_shapes(fmt.config, rows, cols)
    if isinstance(allowed, str):
        raise SourceFormatError(f"{info.file}: tensor '{tensor}' {list(info.shape)} {allowed}")
    if tuple(scale.shape) not in allowed or scale.dtype not in SCALE_DTYPES:
        raise SourceFormatError(f"{scale.file}: scale tensor '{scale_name}' is {scale.dtype} x {list(scale.shape)}; "
                                f"weight '{tensor}' {list(info.shape)} needs one of {[list(a) for a in allowed]}")
    _check_scales(checkpoint, scale_name)
    return Stored(info.dtype, (rows, cols), info.nbytes, scale.dtype, tuple(scale.shape), scale.nbytes), scale_name


def mxfp4_part(checkpoint: Checkpoint, param: str, expert_shape: tuple[int, int]) -> tuple[str, str]:
    """The (blocks, scales) tensors of an MXFP4 parameter, checked against the model's
    [E, d1, d2] parameter (decoded rows R = d2, G*32 = d1)."""
    blocks, scales = f"{param}_blocks", f"{param}_scales"
    b, s = checkpoint.info(blocks), checkpoint.info(scales)
    d1, d2 = expert_shape
    if b.dtype != "U8" or len(b.shape) != 4 or b.shape[1] != d2 or b.shape[2] * b.shape[3] * 2 != d1:
        raise SourceFormatError(f"{b.file}: tensor '{blocks}' is {b.dtype} x {list(b.shape)}; the model's {param} "
                                f"needs U8 x [E, {d2}, {d1} / 32, 16]")
    if s.dtype != "U8" or tuple(s.shape) != tuple(b.shape[:3]):
        raise SourceFormatError(f"{s.file}: scale tensor '{scales}' is {s.dtype} x {list(s.shape)}; its blocks "
                                f"'{blocks}' need U8 x {list(b.shape[:3])}")
    return blocks, scales


def _check_scales(checkpoint: Checkpoint, name: str) -> None:
    from ..hub import headers_only
    from ..tensors import as_torch

    if headers_only(checkpoint.root):  # a dry run from a Hub model's headers: no values to check
        return
    info = checkpoint.info(name)
    values = as_torch(checkpoint.buffer(name))
    if info.dtype in ("U8", "F8_E8M0"):
        bad = values.view(torch.uint8) == 255  # E8M0's NaN
    else:
        bad = ~torch.isfinite(values.float()) | (values.float() <= 0)
    if bool(bad.any()):
        raise SourceFormatError(f"{info.file}: scale tensor '{name}' holds NaN, infinite or non-positive scales "
                                f"({int(bad.sum())} of {bad.numel()})")
    checkpoint.release(name)
