"""Small builders shared by the tests: raw safetensors bytes, made by hand."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def raw_safetensors(header: dict | str | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file from a header (dict, JSON text or raw bytes) and data bytes.

    `header_len` overrides the 8-byte length prefix, to build lying files.
    """
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + data


def write_raw(path: Path, header: dict | str | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    path.write_bytes(raw_safetensors(header, data, header_len))
    return path


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def write_index(directory: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> Path:
    path = directory / name
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def move_adapters(model, scale: float = 0.05) -> None:
    """A stand-in for training: move every LoRA weight of a PeftModel at random."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * scale)
