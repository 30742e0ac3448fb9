"""Load a decomposition for training: the residual (optionally quantized with
bitsandbytes, as QPiSSA trains it) plus the float32 PiSSA adapter, trainable."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .decompose import ADAPTER_SUBDIR
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterMismatchError, adapter_modules

QUANTIZE = (None, "nf4", "fp4", "int8")


def _check_adapter_fits(model, adapter_dir: Path) -> None:
    """Refuse, naming the module, an adapter whose modules or shapes are not the model's."""
    from transformers.pytorch_utils import Conv1D

    from ._pissa_rs import Checkpoint

    modules = dict(model.named_modules())
    adapter = Checkpoint(adapter_dir / ADAPTER_WEIGHTS)
    for full_name, (a_key, b_key) in adapter_modules(adapter, adapter_dir / ADAPTER_WEIGHTS).items():
        name = full_name.removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None:
            raise AdapterMismatchError(f"{adapter_dir}: module '{name}' does not exist in the residual model")
        a, b = adapter.info(a_key).shape, adapter.info(b_key).shape
        if isinstance(module, Conv1D):
            in_f, out_f = module.weight.shape
        else:
            in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if (a[1], b[0]) != (in_f, out_f) or a[0] != b[1]:
            raise AdapterMismatchError(
                f"{adapter_dir}: module '{name}' is {in_f} -> {out_f} in the residual model but the adapter has "
                f"lora_A {list(a)} and lora_B {list(b)}: they do not belong together"
            )


def load_for_training(out: str | os.PathLike[str], quantize: str | None = None, device_map=None,
                      compute_dtype: torch.dtype = torch.bfloat16):
    """A trainable PeftModel from a decomposition's output directory.

    quantize: None (the residual in its stored dtype), "nf4" / "fp4" (4-bit, bitsandbytes'
    defaults as transformers' BitsAndBytesConfig sets them, no double quantization) or
    "int8"; the adapter stays float32 and the model is prepared for k-bit training.
    """
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    out = Path(out)
    adapter_dir = out / ADAPTER_SUBDIR
    for needed in (adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG):
        if not needed.is_file():
            raise AdapterMismatchError(f"{needed}: missing; is {out} a pissa_rs output?")
    kwargs = {}
    if quantize in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype)
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(out, device_map=device_map, **kwargs)
    _check_adapter_fits(model, adapter_dir)
    if quantize:
        model = prepare_model_for_kbit_training(model)
    return PeftModel.from_pretrained(model, out, subfolder=ADAPTER_SUBDIR, is_trainable=True)
