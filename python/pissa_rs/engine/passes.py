"""The calibration passes that run before a run's units, one per `calibration` kind whose
statistics need every layer first (EVA's components, LoRA-GA's gradients): each gives the
options to plan the units with, every target's statistic, what the report says of the pass,
and the folder to remove once the outputs are committed (None: already removed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class PassInput:
    """What a pass is given: the input, its calibration samples, the run's options and
    outputs, the input's state (resume identity) and the targets of the plan at the largest rank."""

    checkpoint: Any
    calibration: Any
    options: Any
    outs: list[Path]
    inputs: list
    targets: list
    progress: bool


@dataclass
class PassOutput:
    options: Any
    statistics: Any  # tensor name -> the statistic the method's factors take
    report_extra: tuple
    scratch: Path | None  # the pass's folder, kept until the commit (a killed run resumes from it)


def scratch_of(out: Path, method: str) -> Path:
    """The pass's folder: beside the output, named after it and the method, so a rerun of a
    killed pass finds it."""
    return out.parent / f".{out.name}-{method}-pass"


def identity_of(given: PassInput, fields: dict) -> str:
    """The pass's identity: a saved pass resumes only under the same data, input, targets and options."""
    return hashlib.sha256(json.dumps(
        {"calibration": given.calibration.digest, "inputs": given.inputs,
         "targets": [[t.tensor, t.r] for t in given.targets], **fields}, sort_keys=True).encode()).hexdigest()


def components(given: PassInput) -> PassOutput:
    """EVA: every layer's components (engine/components.py), then the ranks they choose."""
    from .components import collect_components

    options = given.options
    scratch = scratch_of(given.outs[0], options.method)
    identity = identity_of(given, {k: getattr(options, k) for k in ("calibration_batch", "calibration_dtype", "device",
                                                                  *options.init_method.own_options)})
    found, record = collect_components(given.targets, given.checkpoint, given.calibration, options, scratch,
                                       identity, given.progress)
    shutil.rmtree(scratch)
    options, statistics, chosen = options.init_method.options_from_statistics(options, given.targets, found)
    return PassOutput(options, statistics, (("calibration", record), (options.method, chosen)), None)


def gradients(given: PassInput) -> PassOutput:
    """LoRA-GA: every target's gradient from the backward pass one layer at a time
    (engine/gradients.py), kept as the method's statistic in the pass's folder until the commit."""
    from .gradients import gradient_pass

    options = given.options
    scratch = scratch_of(given.outs[0], options.method)
    identity = identity_of(given, {"device": torch.device(options.device).type,
                                   **{k: getattr(options, k) for k in ("seed", "calibration_batch", "calibration_dtype",
                                                                       *options.init_method.own_options)}})
    statistics, record = gradient_pass(given.targets, given.checkpoint, given.calibration, options, scratch,
                                       identity, given.progress)
    return PassOutput(options, statistics, (("calibration", record),), scratch)


PASSES: dict[str, Callable[[PassInput], PassOutput]] = {"components": components, "gradient": gradients}
