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
    Pipeline,
    ShardWriter,
    TensorBuffer,
    TensorInfo,
    TensorLayoutError,
    TensorNotFoundError,
    UnsafePathError,
    UnsupportedFormatError,
    WriterError,
)
from .decompose import DecomposeOptions, DecomposeResult, decompose_checkpoint
from .factors import Factors, principal_factors
from .targets import Target, TargetError, resolve_targets
from .tensors import as_numpy_bytes, as_torch

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointIndexError",
    "HeaderError",
    "PissaError",
    "PissaIOError",
    "Pipeline",
    "ShardWriter",
    "TensorBuffer",
    "TensorInfo",
    "TensorLayoutError",
    "TensorNotFoundError",
    "UnsafePathError",
    "UnsupportedFormatError",
    "WriterError",
    "DecomposeOptions",
    "DecomposeResult",
    "Factors",
    "Target",
    "TargetError",
    "as_numpy_bytes",
    "decompose_checkpoint",
    "principal_factors",
    "resolve_targets",
    "as_torch",
]
