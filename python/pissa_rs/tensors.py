"""Bridges between the Rust core's raw bytes and torch tensors, both ways, without copies."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ._pissa_rs import TensorBuffer

# safetensors dtype name -> torch dtype. F4/F6 sub-byte types have no torch
# equivalent: such tensors can still be copied byte for byte, not viewed.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of this safetensors dtype and shape."""
    n = TORCH_DTYPES[dtype].itemsize
    for d in shape:
        n *= d
    return n


def as_torch(buffer: TensorBuffer) -> torch.Tensor:
    """A torch tensor viewing the mapped bytes of `buffer` (no copy).

    The memory is the read-only file mapping: never write into the result
    (clone it first). Keeping the tensor alive keeps the mapping alive.
    """
    try:
        dtype = TORCH_DTYPES[buffer.dtype]
    except KeyError:
        raise TypeError(f"tensor '{buffer.name}': dtype {buffer.dtype} has no torch equivalent") from None
    if buffer.nbytes == 0:
        return torch.empty(buffer.shape, dtype=dtype)
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable; it is read-only by design.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=torch.uint8)
    return flat.view(dtype).reshape(buffer.shape)


def as_numpy_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor as a uint8 numpy array, for ShardWriter.write.

    A view when the tensor is already contiguous; bf16 and fp8 included, which
    numpy itself cannot represent.
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()
