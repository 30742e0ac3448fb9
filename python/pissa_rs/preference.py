"""Which model a preference trainer (TRL's DPO, KTO, GRPO, RLOO) compares the policy with when
the policy trains a pissa_rs adapter. The reference must be the ORIGINAL model W. With PiSSA the
adapter's base is the residual W_res = W - s*B0@A0, so the usual reference (the adapter
disabled) is W_res, and the KL term then pulls towards the wrong model, silently. Right: the
trainer's frozen "ref" adapter holding the initial adapter (TRL copies it in when it is given a
PeftModel from `load_for_training` and no ref_model), which gives W_res + s*B0@A0 = W; or a
ref_model that is the original model. `check_reference(trainer)` says which one a trainer
has, and warns where it is not the original model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .constants import ADAPTER_SUBDIR
from .formats.peft_adapter import ADAPTER_WEIGHTS


class ReferenceWarning(UserWarning):
    """A preference trainer whose reference is not the original model."""


@dataclass(frozen=True)
class Reference:
    """What a trainer's reference log-probabilities come from: `what` in words; `problem`,
    why it is not the original model (None: it is, or the trainer has no reference)."""

    what: str
    problem: str | None = None


def residual_output(model) -> Path | None:
    """The pissa_rs output `model` was loaded from, where that output's base is a residual (a
    method that changes the base); None for any other model."""
    from .hub import is_local
    from .methods import get_method
    from .report import OutputReport

    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name or not is_local(name) or not Path(name).is_dir():
        return None
    held = OutputReport.read(Path(name))
    if not held.exists or not get_method(held.options.get("method", "pissa")).changes_base:
        return None
    return Path(name)


def _ref_adapter_mismatch(peft_model, out: Path) -> str | None:
    """Where the trainer's "ref" adapter is not OUT/pissa_init's initial adapter (the first
    tensor that differs), or None."""
    from safetensors import safe_open

    with safe_open(str(out / ADAPTER_SUBDIR / ADAPTER_WEIGHTS), framework="pt") as initial:
        keys = set(initial.keys())
        compared = 0
        for name, param in peft_model.named_parameters():
            if ".ref." not in name:
                continue
            key = name.replace(".ref.", ".")
            if key not in keys:
                return f"{name} has no tensor {key} in {out / ADAPTER_SUBDIR}"
            if not torch.equal(param.detach().float().cpu(), initial.get_tensor(key).float()):
                return f"{name} differs from {key} of {out / ADAPTER_SUBDIR} (a trained adapter was copied)"
            compared += 1
    return None if compared else f"the 'ref' adapter has no parameters to compare with {out / ADAPTER_SUBDIR}"


def reference_of(trainer) -> Reference:
    """The reference a TRL preference trainer uses (module docstring)."""
    beta = getattr(trainer, "beta", getattr(getattr(trainer, "args", None), "beta", None))
    if beta == 0:
        return Reference("none: beta is 0 (GRPOConfig's default), no KL term and no reference model")
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None:
        out = residual_output(ref_model)
        if out is not None:
            return Reference(f"ref_model, loaded from {out}",
                             f"ref_model is the residual of {out} (W - s*B0@A0), not the original model: pass "
                             "ref_model=None with the PeftModel from pissa_rs.training.load_for_training, or the "
                             "original model as ref_model")
        return Reference("ref_model, as given (make it the original model)")
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return Reference("a copy of the model as it starts (no adapter)")
    out = residual_output(model.get_base_model())
    if out is None:
        return Reference("the base model with the adapters disabled")
    if "ref" not in peft_config:
        return Reference(f"the adapters disabled: the residual of {out}",
                         f"the reference is the residual of {out} (W - s*B0@A0), not the original model: the "
                         "policy was given as a model plus peft_config (or with a PEFT older than 0.20 and "
                         "target_parameters); load it with pissa_rs.training.load_for_training(OUT) and pass it "
                         "with ref_model=None, so the trainer keeps the initial adapter as its reference")
    mismatch = _ref_adapter_mismatch(model, out)
    if mismatch is not None:
        return Reference(f"the 'ref' adapter on the residual of {out}",
                         f"the 'ref' adapter is not the initial adapter of {out}: {mismatch}; the reference is "
                         "then not the original model")
    return Reference(f"the original model: the residual of {out} with the 'ref' adapter, its initial adapter")


def check_reference(trainer) -> Reference:
    """Which reference `trainer` uses; a ReferenceWarning where it is not the original model.
    Call it after making the trainer, before `train()`."""
    found = reference_of(trainer)
    if found.problem is not None:
        warnings.warn(f"pissa_rs: {found.problem}", ReferenceWarning, stacklevel=2)
    return found
