"""pissa_rs: out-of-core PiSSA decomposition of safetensors checkpoints.

The public API, re-exported from the modules that implement it.
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

import gc as _gc

_collecting = _gc.isenabled()
# The imports below (torch's above all) make about a million objects and no garbage; the cyclic
# collector, run every few hundred new objects, spent 0.3 s of their 1.2 s walking them.
_gc.disable()
try:
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
    from .convert import AdapterMismatchError, ConversionResult, convert_to_lora
    from .decompose import DecomposeResult, decompose_checkpoint, extract_lora
    from .engine.devices import DeviceMemoryError
    from .engine.lease import LeaseLostError
    from .engine.outdir import DiskSpaceError, OutputDirError
    from .engine.ray_run import EnvironmentMismatchError, RayUnavailableError
    from .options import DecomposeOptions
    from .dry_run import DecompositionPlan, plan
    from .factors import Factors, principal_factors
    from .hub import HubError
    from .planning.mapping import CustomCodeError
    from .merge import merge_adapter
    from .qerror import measure_quantization_error
    from .quant import QuantError, Quantization
    from .requirements import DependencyVersionError
    from .rounding import RoundingMismatchError
    from .engine.resume import InputChangedError, OutputLockedError, RunMismatchError
    from .planning.targets import Target, TargetError, resolve_targets
    from .tensors import as_numpy_bytes, as_torch
    from .training import load_for_training
    from .verify import VerifyReport, verify
    from .verify_lora import verify_lora
    from .extraction import ExtractionError
finally:
    if _collecting:
        _gc.enable()
    del _collecting

try:
    __version__ = _version("pissa-rs")
except _NotInstalled:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "verify_lora",
    "extract_lora",
    "ExtractionError",
    "DependencyVersionError",
    "AdapterMismatchError",
    "ConversionResult",
    "CustomCodeError",
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
    "DecompositionPlan",
    "DeviceMemoryError",
    "DiskSpaceError",
    "OutputDirError",
    "LeaseLostError",
    "EnvironmentMismatchError",
    "RayUnavailableError",
    "RoundingMismatchError",
    "Factors",
    "HubError",
    "Target",
    "TargetError",
    "as_numpy_bytes",
    "decompose_checkpoint",
    "plan",
    "principal_factors",
    "resolve_targets",
    "as_torch",
    "convert_to_lora",
    "load_for_training",
    "merge_adapter",
    "InputChangedError",
    "OutputLockedError",
    "RunMismatchError",
    "measure_quantization_error",
    "Quantization",
    "QuantError",
    "verify",
    "VerifyReport",
]
