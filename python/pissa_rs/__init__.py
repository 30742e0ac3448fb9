"""pissa_rs: out-of-core PiSSA decomposition of safetensors checkpoints.

The public API, re-exported from the modules that implement it.
"""

from ._pissa_rs import (
    Checkpoint,
    CheckpointError,
    CheckpointIndexError,
    HeaderError,
    PissaError,
    PissaIOError,
    ShardWriter,
    TensorBuffer,
    TensorInfo,
    TensorLayoutError,
    TensorNotFoundError,
    UnsafePathError,
    UnsupportedFormatError,
    WriterError,
)
from .tensors import as_numpy_bytes, as_torch

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointIndexError",
    "HeaderError",
    "PissaError",
    "PissaIOError",
    "ShardWriter",
    "TensorBuffer",
    "TensorInfo",
    "TensorLayoutError",
    "TensorNotFoundError",
    "UnsafePathError",
    "UnsupportedFormatError",
    "WriterError",
    "as_numpy_bytes",
    "as_torch",
]
