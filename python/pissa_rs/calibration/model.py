"""The calibration a data-aware run on a model gets, checked before anything is written: the
model folder (config, tokenizer, a weight format calibration can read, a family whose layers
it can run) and the samples tokenized for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .head import check_causal_lm, check_labels
from .layers import check_family
from .samples import CalibrationError, CalibrationSet, tokenized


def model_calibration(path: Path, options) -> tuple[CalibrationSet, Any]:
    """The calibration samples of a data-aware run on the model folder `path` (its config
    and tokenizer), as `options` (DecomposeOptions) ask for them, and the options with the
    data replaced by where it came from, its hash and the sample length it was cut to."""
    from ..planning.mapping import load_config

    if not (path.is_dir() and (path / "config.json").is_file()):
        raise CalibrationError(f"{path}: calibration runs the model, so it needs the model's folder (config.json, "
                               "tokenizer files), not a bare .safetensors file")
    from dataclasses import replace

    from ..formats.mxfp4 import MXFP4
    from ..formats.sources import source_format

    fmt = source_format(path)  # FP8 and INT weights are dequantized as the layers read them (layers.py)
    if fmt.kind is not None and (fmt.codec is None or isinstance(fmt.codec, MXFP4)):
        raise CalibrationError(f"{path}: {fmt.describe()}; calibration reads float, FP8 and packed INT (compressed-"
                               "tensors, GPTQ, AWQ, bitsandbytes) weights only (run it on the bf16 model, e.g. dequantized with "
                               "transformers)")
    config, _ = load_config(path)
    check_family(config, path)
    if options.init_method.calibration == "gradient":  # a causal-LM loss to take the gradient of
        check_causal_lm(config, path / "config.json")
    found = tokenized(options.calibration, path, samples=options.calibration_samples,
                      length=options.calibration_length,
                      max_positions=getattr(config, "max_position_embeddings", None))
    if options.init_method.calibration == "gradient":
        check_labels(found)
    return found, replace(options, calibration=found.source, calibration_sha256=found.digest,
                          calibration_length=found.length, calibration_samples=len(found.samples))
