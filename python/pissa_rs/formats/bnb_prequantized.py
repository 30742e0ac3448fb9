"""Pre-quantized bitsandbytes checkpoints (`quant_method: "bitsandbytes"`: the *-bnb-4bit
uploads trainers point to, and pissa_rs' own save_quantized output), read as
bitsandbytes 0.50 dequantizes them (`dequantize_4bit` / `int8_vectorwise_dequant`; the
arithmetic is formats/bnb_reference.py's, checked against bitsandbytes bit for bit):

- 4-bit (nf4 / fp4): `X.weight` uint8 [ceil(n/2), 1] (two codes a byte, the first in the high
  nibble), `X.weight.absmax` (float32, or uint8 with double quantization and then
  `X.weight.nested_absmax` / `X.weight.nested_quant_map`), `X.weight.quant_map` (the code
  table), `X.weight.quant_state.bitsandbytes__nf4` (its JSON: blocksize, shape, dtype, the
  nested offset); W in the dtype the state names;
- 8-bit (LLM.int8()): `X.weight` int8 [R, C], `X.SCB` float32 [R] (row absmax),
  `X.weight_format`; W = codes * SCB / 127 in float32, then bfloat16.
"""

from __future__ import annotations

import json

import torch

from ..tensors import as_torch
from . import bnb_reference as ref
from .stored import Encoded, SourceFormatError, Stored

STATE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
INT8_DTYPE = "BF16"  # what an int8 weight is decoded to (float32 codes * scale, cast)


class BitsAndBytesPrequantized:
    quant_method = "bitsandbytes"
    scale_suffix = None
    can_keep = False
    unquantized_key = "llm_int8_skip_modules"

    def describe(self, config: dict) -> str:
        if config.get("load_in_8bit"):
            return "bitsandbytes int8 (LLM.int8())"
        double = " with double quantization" if config.get("bnb_4bit_use_double_quant") else ""
        return f"bitsandbytes {config.get('bnb_4bit_quant_type', 'fp4')}{double}"

    def holds_codes(self, info) -> bool:
        return info.dtype in ("U8", "I8") and info.name.endswith(".weight")

    def part(self, checkpoint, config: dict, tensor: str) -> Encoded | None:
        info = checkpoint.info(tensor)
        if not self.holds_codes(info):
            return None
        return _int8_part(checkpoint, tensor) if info.dtype == "I8" else _4bit_part(checkpoint, tensor)


def _4bit_part(checkpoint, tensor: str) -> Encoded:
    info = checkpoint.info(tensor)
    where = f"{info.file}: tensor '{tensor}'"
    states = [f"{tensor}.quant_state.bitsandbytes__{kind}" for kind in ("nf4", "fp4")]
    state_name = next((s for s in states if s in checkpoint), None)
    if state_name is None:
        raise SourceFormatError(f"{where} is {info.dtype} but has no '{states[0]}' (or fp4) beside it (config.json: "
                                "bitsandbytes 4-bit)")
    state = json.loads(bytes(as_torch(checkpoint.buffer(state_name)).numpy()))
    kind, blocksize, shape = state.get("quant_type"), state.get("blocksize"), tuple(state.get("shape") or ())
    if kind not in ("nf4", "fp4") or not isinstance(blocksize, int) or blocksize < 2 or len(shape) != 2 or \
            state.get("dtype") not in STATE_DTYPES:
        raise SourceFormatError(f"{where}: its quant state '{state_name}' says {state}; pissa_rs reads nf4 / fp4 "
                                "states of 2-D weights in bfloat16, float16 or float32")
    n = shape[0] * shape[1]
    blocks = -(-n // blocksize)
    if info.dtype != "U8" or info.nbytes != (n + 1) // 2:
        raise SourceFormatError(f"{where} is {info.dtype} x {list(info.shape)} ({info.nbytes} bytes); its quant state's "
                                f"shape {list(shape)} needs U8 x [{(n + 1) // 2}, 1]")
    nested = "nested_offset" in state
    names = {k: f"{tensor}.{k}" for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
    need = {"absmax": ("U8" if nested else "F32", (blocks,)), "quant_map": ("F32", (16,))}
    if nested:
        need |= {"nested_absmax": ("F32", (-(-blocks // ref.DOUBLE_QUANT_BLOCKSIZE),)),
                 "nested_quant_map": ("F32", (256,))}
    for role, (dtype, want) in need.items():
        found = checkpoint.info(names[role]) if names[role] in checkpoint else None
        if found is None or found.dtype != dtype or tuple(found.shape) != want:
            got = f"is {found.dtype} x {list(found.shape)}" if found else "is missing"
            raise SourceFormatError(f"{(found or info).file}: tensor '{names[role]}' {got}; weight '{tensor}' "
                                    f"({kind}, blocks of {blocksize}) needs {dtype} x {list(want)}")
    tables = {"quant_map": kind} | ({"nested_quant_map": "dynamic"} if nested else {})
    for role, table in tables.items():  # bitsandbytes' own tables: the reference's arithmetic uses them
        if not torch.equal(as_torch(checkpoint.buffer(names[role])), ref.code_table(table)):
            raise SourceFormatError(f"{checkpoint.info(names[role]).file}: tensor '{names[role]}' is not "
                                    f"bitsandbytes' {table} code table")
    absmax = checkpoint.info(names["absmax"])
    extra = [("quant_map", "F32", (16,), 64)]
    staged = [tensor, names["absmax"], names["quant_map"]]
    if nested:
        extra += [("nested_absmax", "F32", need["nested_absmax"][1], checkpoint.info(names["nested_absmax"]).nbytes),
                  ("nested_quant_map", "F32", (256,), 1024)]
        staged += [names["nested_absmax"], names["nested_quant_map"]]
    extra.append(("quant_state", "U8", (checkpoint.info(state_name).nbytes,), checkpoint.info(state_name).nbytes))
    staged.append(state_name)
    args = (("kind", kind), ("blocksize", blocksize), ("shape", shape), ("dtype", state["dtype"]),
            ("nested_offset", state.get("nested_offset")))
    stored = Stored(info.dtype, tuple(info.shape), info.nbytes, absmax.dtype, (blocks,), absmax.nbytes, tuple(extra),
                    args)
    return Encoded(stored, tuple(staged), "bnb-4bit", STATE_DTYPES[state["dtype"]], shape, tensor)


def _int8_part(checkpoint, tensor: str) -> Encoded:
    info = checkpoint.info(tensor)
    prefix = tensor.removesuffix(".weight")
    scb = f"{prefix}.SCB"
    if len(info.shape) != 2:
        raise SourceFormatError(f"{info.file}: tensor '{tensor}' is I8 x {list(info.shape)}; an int8 weight is 2-D")
    found = checkpoint.info(scb) if scb in checkpoint else None
    if found is None or found.dtype != "F32" or tuple(found.shape) != (info.shape[0],):
        got = f"is {found.dtype} x {list(found.shape)}" if found else "is missing"
        raise SourceFormatError(f"{(found or info).file}: row scale tensor '{scb}' {got}; the int8 weight '{tensor}' "
                                f"{list(info.shape)} needs F32 x [{info.shape[0]}]")
    extra, staged = [], [tensor, scb]
    if f"{prefix}.weight_format" in checkpoint:  # (consumed: transformers reads it to pick the layout)
        fmt = checkpoint.info(f"{prefix}.weight_format")
        extra.append(("weight_format", fmt.dtype, tuple(fmt.shape), fmt.nbytes))
        staged.append(fmt.name)
    stored = Stored("I8", tuple(info.shape), info.nbytes, "F32", (info.shape[0],), found.nbytes, tuple(extra),
                    (("shape", tuple(info.shape)),))
    return Encoded(stored, tuple(staged), "bnb-int8", INT8_DTYPE, tuple(info.shape), tensor)


def dequantize_bnb_4bit(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                        args: dict) -> torch.Tensor:
    q = ref.Quantized4bit(packed.reshape(-1, 1), absmax, args["kind"], args["blocksize"], tuple(args["shape"]),
                          getattr(torch, args["dtype"]), nested_absmax, args["nested_offset"])
    return ref.dequantize_4bit(q)


def dequantize_bnb_int8(codes: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    from ..tensors import TORCH_DTYPES

    return ref.int8_rows_dequantize(codes, row_absmax).to(TORCH_DTYPES[INT8_DTYPE])
