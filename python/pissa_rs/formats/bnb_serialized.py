"""The serialized bitsandbytes layout transformers loads pre-quantized (what its
save_pretrained writes for a model loaded in 4 or 8 bits): which tensors one
quantized Linear weight becomes, their bytes, and the way back to floats.

4-bit, for a weight "X.weight": X.weight (uint8 codes, two per byte, [ceil(n/2), 1]),
X.weight.absmax, X.weight.quant_map, X.weight.quant_state.bitsandbytes__<nf4|fp4>
(the rest of bitsandbytes' QuantState as JSON bytes) and, with double quantization,
X.weight.nested_absmax and X.weight.nested_quant_map.
8-bit: X.weight (int8 [out, in]), X.SCB (float32 row absmax [out]), X.weight_format (uint8 0: rows).
GPT-2's Conv1D weights (stored in x out) are quantized transposed, as transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from . import bnb_reference as ref
from ..quant import Quantization
from ..tensors import TORCH_DTYPES

# Widest JSON a float can take (repr of a float64): the nested offset's slot is this
# wide, padded with spaces (valid JSON), so that the layout is known before the value.
_WIDEST_FLOAT = "-1.2345678901234567e-308"


@dataclass(frozen=True)
class StoredQuantized:
    """One weight of the original checkpoint that the output stores pre-quantized."""

    tensor: str  # its name in the original checkpoint: "X.weight"
    shape: tuple[int, int]  # as in the original (in x out for fan_in_fan_out)
    dtype: str  # the original's safetensors dtype
    fan_in_fan_out: bool

    @property
    def oriented_shape(self) -> tuple[int, int]:
        """out x in: the matrix bitsandbytes quantizes."""
        return (self.shape[1], self.shape[0]) if self.fan_in_fan_out else self.shape

    @property
    def prefix(self) -> str:
        return self.tensor.removesuffix(".weight")

    def as_record(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "fan_in_fan_out": self.fan_in_fan_out}

    @classmethod
    def from_record(cls, tensor: str, record: dict[str, Any]) -> StoredQuantized:
        return cls(tensor, tuple(record["shape"]), record["dtype"], bool(record["fan_in_fan_out"]))

    def _state_json(self, quant: Quantization, nested_offset: float | None) -> bytes:
        state: dict[str, Any] = {"quant_type": quant.kind, "blocksize": quant.blocksize,
                                 "dtype": str(TORCH_DTYPES[self.dtype]).removeprefix("torch."),
                                 "shape": list(self.oriented_shape)}
        if quant.double_quant:
            state.update(nested_blocksize=ref.DOUBLE_QUANT_BLOCKSIZE, nested_dtype="float32")
            widest = json.dumps({**state, "nested_offset": 0.0}).replace("0.0}", _WIDEST_FLOAT + "}")
            text = json.dumps({**state, "nested_offset": nested_offset or 0.0})
            return text.ljust(len(widest)).encode()
        return json.dumps(state).encode()

    def parts(self, quant: Quantization) -> list[tuple[str, str, list[int]]]:
        """(name, safetensors dtype, shape) of every tensor this weight becomes, in a fixed order."""
        rows, cols = self.oriented_shape
        if quant.kind == "int8":
            return [(f"{self.prefix}.SCB", "F32", [rows]), (self.tensor, "I8", [rows, cols]),
                    (f"{self.prefix}.weight_format", "U8", [])]
        n = rows * cols
        blocks = -(-n // quant.blocksize)
        state_len = len(self._state_json(quant, None))
        parts = [(self.tensor, "U8", [(n + 1) // 2, 1]),
                 (f"{self.tensor}.absmax", "U8" if quant.double_quant else "F32", [blocks]),
                 (f"{self.tensor}.quant_map", "F32", [16]),
                 (f"{self.tensor}.quant_state.bitsandbytes__{quant.kind}", "U8", [state_len])]
        if quant.double_quant:
            parts += [(f"{self.tensor}.nested_absmax", "F32", [-(-blocks // ref.DOUBLE_QUANT_BLOCKSIZE)]),
                      (f"{self.tensor}.nested_quant_map", "F32", [256])]
        return parts

    def serialize(self, weight: torch.Tensor, quant: Quantization) -> list[tuple[str, torch.Tensor]]:
        """`weight` (as stored in the original layout, its own dtype) quantized, as
        (name, tensor) pairs in the order of parts()."""
        w = weight.T if self.fan_in_fan_out else weight
        if quant.kind == "int8":
            codes, stats = quant.quantize_int8(w)
            return [(f"{self.prefix}.SCB", stats.float()), (self.tensor, codes),
                    (f"{self.prefix}.weight_format", torch.tensor(0, dtype=torch.uint8))]
        q = quant.quantize_4bit(w.contiguous())
        state = torch.frombuffer(bytearray(self._state_json(quant, q.nested_offset)), dtype=torch.uint8)
        tensors = [(self.tensor, q.packed), (f"{self.tensor}.absmax", q.absmax),
                   (f"{self.tensor}.quant_map", ref.code_table(quant.kind, w.device)),
                   (f"{self.tensor}.quant_state.bitsandbytes__{quant.kind}", state)]
        if quant.double_quant:
            tensors += [(f"{self.tensor}.nested_absmax", q.nested_absmax),
                        (f"{self.tensor}.nested_quant_map", ref.code_table("dynamic", w.device))]
        return tensors

    def dequantize(self, read, quant: Quantization) -> torch.Tensor:
        """The weight the stored tensors stand for, laid out and typed as the
        original; `read(name)` gives a stored tensor. 4-bit: the weight's own dtype
        (bitsandbytes' QuantState dtype); 8-bit: float32 rounded to that dtype."""
        dtype = TORCH_DTYPES[self.dtype]
        if quant.kind == "int8":
            w = ref.int8_rows_dequantize(read(self.tensor), read(f"{self.prefix}.SCB")).to(dtype)
        else:
            state = json.loads(bytes(read(f"{self.tensor}.quant_state.bitsandbytes__{quant.kind}").numpy()))
            q = ref.Quantized4bit(
                packed=read(self.tensor), absmax=read(f"{self.tensor}.absmax"), kind=state["quant_type"],
                blocksize=state["blocksize"], shape=tuple(state["shape"]), dtype=getattr(torch, state["dtype"]))
            if "nested_offset" in state:
                q.nested_absmax, q.nested_offset = read(f"{self.tensor}.nested_absmax"), state["nested_offset"]
            w = ref.dequantize_4bit(q).to(dtype)
        return w.T if self.fan_in_fan_out else w


def quantization_config(quant: Quantization, compute_dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json's quantization_config, as transformers' BitsAndBytesConfig writes it."""
    from transformers import BitsAndBytesConfig

    if quant.kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.kind,
                                    bnb_4bit_use_double_quant=quant.double_quant,
                                    bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    return config.to_dict()


def read_weight(checkpoint, tensor: str, quant: Quantization | None,
                stored: dict[str, StoredQuantized]) -> torch.Tensor:
    """A weight of `checkpoint` in its original layout and dtype: the stored tensor
    itself, or for one stored pre-quantized, what its quantized form dequantizes to."""
    from ..tensors import as_torch

    w = stored.get(tensor)
    if w is None or quant is None:
        return as_torch(checkpoint.buffer(tensor))
    return w.dequantize(lambda name: as_torch(checkpoint.buffer(name)), quant)
