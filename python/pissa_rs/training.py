"""Training on a decomposition: `load_for_training` loads the residual (optionally
quantized with bitsandbytes, as QPiSSA trains it) plus the float32 PiSSA adapter,
trainable; `SaveAsLoRA` (save_as_lora.py, imported when asked for: it needs
transformers) writes a LoRA of the original model at every save; `check_reference`
(preference.py) says whether a preference trainer's reference is the original model."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint
from .constants import ADAPTER_SUBDIR
from .locations import model_of_output
from .report import OutputReport
from .planning.mapping import load_config, model_class_for
from .formats.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterMismatchError, adapter_targets
from .noise import quiet_library_noise
from .preference import Reference, ReferenceWarning, check_reference

__all__ = ["QUANTIZE", "Reference", "ReferenceWarning", "SaveAsLoRA", "check_reference", "load_for_training"]

QUANTIZE = (None, "nf4", "fp4", "int8")


def load_for_training(out: str | os.PathLike[str], quantize: str | None = None, device_map=None,
                      compute_dtype: torch.dtype = torch.bfloat16):
    """A trainable PeftModel from a decomposition's output directory.

    quantize: None (the residual in its stored dtype), "nf4" / "fp4" (4-bit, bitsandbytes'
    defaults as transformers' BitsAndBytesConfig sets them; double quantization only
    when the decomposition was made for it) or "int8"; the residual is loaded in its
    stored dtype, so a QPiSSA residual re-quantizes to exactly the weights the
    decomposition computed. An output written with save_quantized is loaded as
    stored (no quantization at load time); `quantize` may then be omitted, and must
    name the stored format if given. The adapter stays float32 and the model is prepared
    for k-bit training. An adapter whose modules, shapes or ranks do not fit the
    residual is refused before anything is loaded.
    """
    with quiet_library_noise():
        from peft import PeftModel, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    out = Path(out)
    adapter_dir = out / ADAPTER_SUBDIR
    for needed in (adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG):
        if not needed.is_file():
            raise AdapterMismatchError(f"{needed}: missing; is {out} a pissa_rs output?")
    held = OutputReport.read(out)
    storage = held.storage
    if storage is not None:
        if quantize not in (None, storage.kind):
            raise ValueError(f"{out}: its residual is stored quantized as {storage.kind}; it cannot be loaded as "
                             f"{quantize} (decompose again without save_quantized for that)")
        quantize = storage.kind
    base = model_of_output(out)  # the residual here, or (MiCA) the original model the report names
    adapter_targets(adapter_dir, Checkpoint(adapter_dir / ADAPTER_WEIGHTS), Checkpoint(base), out)
    config = copy.deepcopy(load_config(base)[0])  # never the checkpoint's own code (see load_config)
    kwargs = {"config": config}
    if storage is not None:  # as stored, with our compute dtype
        if storage.kind != "int8":
            config.quantization_config["bnb_4bit_compute_dtype"] = str(compute_dtype).removeprefix("torch.")
    elif quantize in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=held.made_for_double_quant(quantize))
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    # The class config.json names (a BertModel, a LLaVA...), as decomposition built it.
    model_class = model_class_for(config) or AutoModelForCausalLM
    model = model_class.from_pretrained(base, device_map=device_map, dtype="auto", **kwargs)
    if quantize:
        model = prepare_model_for_kbit_training(model)
    with quiet_library_noise():
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def __getattr__(name: str):
    if name == "SaveAsLoRA":  # transformers' TrainerCallback is its base: imported only when asked for
        from .save_as_lora import SaveAsLoRA

        return SaveAsLoRA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
