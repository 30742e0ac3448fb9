"""Sequential onloading: the model class transformers builds from config.json, on the meta
device, with only what one step needs made real from the checkpoint: the modules before
the decoder layers (embeddings, rotary tables) once, then one decoder layer at a time.
Each layer's arguments (masks, position embeddings) come from the model's own forward,
recorded where it calls that layer, so no code is written per family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._pissa_rs import Checkpoint
from ..formats.sources import SourceFormatError, source_format
from .samples import CalibrationError

# The families whose layer-by-layer forward is tested against the whole model's (and PEFT's
# calibration on it); others are refused by name rather than calibrated on trust. The MoE
# ones route tokens through experts transformers' use_experts_implementation builds, whose
# per-expert inputs calibration sees; BERT is the tested encoder (bidirectional attention,
# the padding masked by its own extended mask).
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek_v3", "bert")


def check_family(config, where: Path) -> None:
    """Refuse a model family whose layer-by-layer calibration is not tested, naming it."""
    family = getattr(config, "model_type", None)
    if family not in TESTED_FAMILIES:
        raise CalibrationError(f"{where / 'config.json'}: model_type {family!r} is not one whose layer-by-layer "
                               f"calibration is tested ({', '.join(TESTED_FAMILIES)})")


class _Stop(Exception):
    """Raised by the recorder of the layer asked for: the model's forward goes no further."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer during the recording pass: keeps the arguments the
    model passes it and hands the hidden states on unchanged (or stops the forward)."""

    def __init__(self, index: int, layer: nn.Module, state: dict):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its weights stay out of this one
        self.index, self.state = index, state

    def __getattr__(self, name: str):  # attributes the model reads off its layers (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == self.state["stop_at"]:
            self.state["call"] = (hidden_states, args, kwargs)
            raise _Stop
        if self.index == self.state.get("output_at"):  # the model's forward goes on from given hidden states
            return self.state["output"]
        return hidden_states


def _decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """The ModuleList of the model's decoder layers (the classes transformers never splits)."""
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m).__name__ in kinds for m in module):
            return name, module
    raise CalibrationError(f"{type(model).__name__}: no list of decoder layers found to calibrate one at a time")


def forward_dtype(choice: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype the layers run in: `choice` by name, or for "auto" float32 on a CPU (most
    CPUs have no bfloat16 / float16 matmul units: ~11x slower than float32 on a 2-core EPYC
    without AVX-512, and upcasting the stored weights is exact) and the stored dtype on an
    accelerator, as PEFT's forward runs a model loaded as stored."""
    if choice != "auto":
        return getattr(torch, choice)
    return torch.float32 if device.type == "cpu" else stored


class LayerStack:
    """A model's decoder layers, made real one at a time from the checkpoint on `device`, in
    the dtype `dtype` chooses (forward_dtype). `keep_cached`: their bytes stay in the page
    cache once read (a loop that reads every layer at every step, EVA's); otherwise each read
    drops them, as the units' reads do."""

    def __init__(self, checkpoint: Checkpoint, config_dir: Path, device: torch.device, dtype: str = "auto",
                 keep_cached: bool = False):
        from ..planning.mapping import checkpoint_mapping, load_config, model_class_for

        config, _ = load_config(config_dir)
        check_family(config, config_dir)
        cls = model_class_for(config)
        with torch.device("meta"):  # a model of its own: its layers get replaced below
            if cls is not None:
                model = cls._from_config(config)
            else:  # config.json names no class: what the auto class builds for the model type
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_config(config)
        model.eval()
        self.model, self.config, self.device, self.checkpoint = model, config, device, checkpoint
        self.keep_cached = keep_cached
        self.where = Path(checkpoint.root)
        self.source = source_format(config_dir)  # FP8 and INT weights are dequantized as they are read
        self.mapping = checkpoint_mapping(model, checkpoint, self.source)
        self.layers_name, self.layers = _decoder_layers(model)
        self.base = getattr(model, model.base_model_prefix, model)
        embedding = self.base.get_input_embeddings()
        self.stored_dtype = self._stored_dtype(f"{self.name_of(embedding)}.weight")
        self.dtype = forward_dtype(dtype, device, self.stored_dtype)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = {id(m) for m in self.layers.modules()} | ({id(m) for m in head.modules()} if head is not None else set())
        # The rest (embeddings, rotary tables, the final norm) is small: made real once.
        for name, module in model.named_modules():
            if id(module) in skip:
                continue
            table = self._table_dtype(name, module)
            if table is not None:
                self._materialize(name, module, recurse=False, dtype=table)
                module.register_forward_hook(lambda _module, _args, out: out.to(self.dtype))
            else:
                self._materialize(name, module, recurse=False)
        self.state: dict[str, Any] = {"stop_at": None, "call": None}
        self.real = list(self.layers)
        for k, layer in enumerate(self.real):
            self.layers[k] = _Recorder(k, layer, self.state)

    def __len__(self) -> int:
        return len(self.real)

    def _table_dtype(self, name: str, module: nn.Module) -> torch.dtype | None:
        """The stored dtype of a plain lookup table stored narrower than the layers run, to
        keep it in: its rows cast after the gather are the bits of the table cast whole (an
        exact upcast commutes with a gather), and a vocabulary upcast whole is the largest thing
        held (128256 x 4096 in float32 is 2.1 GB). None for anything else, and for tables that
        scale or renormalize their rows: those are upcast whole."""
        if type(module).forward is not nn.Embedding.forward or module.max_norm is not None:
            return None
        stored = self._stored_dtype(f"{name}.weight")
        return stored if stored in (torch.bfloat16, torch.float16) and stored.itemsize < self.dtype.itemsize else None

    def name_of(self, module: nn.Module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module)

    def _stored_dtype(self, param: str) -> torch.dtype:
        from ..tensors import TORCH_DTYPES

        tensor = self.mapping.tensor_of.get(param)
        if tensor is None:
            raise CalibrationError(f"{self.where}: no checkpoint tensor holds {param}")
        return TORCH_DTYPES[self.checkpoint.info(tensor).dtype]

    def read(self, param: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Model parameter `param` from the checkpoint, on the device in `dtype`."""
        from ..tensors import TORCH_DTYPES

        tensor = self.mapping.tensor_of.get(param)
        if tensor is None and param in self.mapping.merged_by:  # experts stored one tensor each, merged at load
            from ..planning.mapping import expert_reads

            return torch.stack([read.read(self.checkpoint, keep_cached=self.keep_cached) for read in
                                expert_reads(self.mapping, self.checkpoint, param, tuple(shape),
                                             self.source)]).to(self.device, dtype)
        if tensor is None:
            raise CalibrationError(f"{self.where}: no checkpoint tensor holds the model's {param} (calibration runs "
                                   "the original model, so every weight of a layer must be in the checkpoint)")
        info = self.checkpoint.info(tensor)
        if self.source.codec is not None and self.source.codec.holds_codes(info):
            return self._read_encoded(tensor, param, shape).to(self.device, dtype)
        if info.dtype not in ("F32", "F16", "BF16"):
            raise CalibrationError(f"{self.where}: {tensor} is {info.dtype}; calibration reads float, FP8 and packed "
                                   "INT weights only")
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        self.checkpoint.read_into(tensor, data.numpy(), keep_cached=self.keep_cached)
        value = data.view(TORCH_DTYPES[info.dtype]).reshape(list(info.shape))
        if tuple(value.shape) != tuple(shape):
            raise CalibrationError(f"{self.where}: {tensor} has shape {list(value.shape)}, the model's {param} "
                                   f"{list(shape)}")
        return value.to(self.device, dtype)

    def _read_encoded(self, tensor: str, param: str, shape: torch.Size) -> torch.Tensor:
        """An FP8 or packed INT weight with its scales, dequantized as its library dequantizes
        the checkpoint: the layer runs as the model loaded dequantized does, which is the model
        PEFT's calibration can run on a CPU."""
        from ..planning.mapping import ExpertLayoutError, plain_or_encoded

        if len(shape) != 2:
            raise CalibrationError(f"{self.where}: {tensor} is encoded, the model's {param} {list(shape)}: only "
                                   "matrices are read encoded")
        try:
            read = plain_or_encoded(self.checkpoint, self.source, [tensor], tuple(shape), str(self.where))
        except (SourceFormatError, ExpertLayoutError) as err:
            raise CalibrationError(str(err)) from None
        return read.read(self.checkpoint, keep_cached=self.keep_cached)

    def _materialize(self, prefix: str, module: nn.Module, recurse: bool, dtype: torch.dtype | None = None) -> None:
        """`module`'s parameters from the checkpoint, in `dtype` (the layers' by default), and
        its buffers as the model class makes them."""
        for name, sub in (module.named_modules(prefix=prefix) if recurse else [(prefix, module)]):
            params = list(sub.named_parameters(recurse=False))
            buffers = list(sub.named_buffers(recurse=False))
            if not params and not buffers:
                continue
            sub.to_empty(device=self.device, recurse=False)
            if buffers:  # rotary tables and the like: computed, never stored
                self.model._init_weights(sub)
            for pname, p in params:
                value = self.read(f"{name}.{pname}" if name else pname, p.shape, dtype or self.dtype)
                setattr(sub, pname, nn.Parameter(value, requires_grad=False))

    def layer(self, index: int) -> nn.Module:
        """Decoder layer `index` with its original weights, on the device."""
        layer = self.real[index]
        self._materialize(f"{self.layers_name}.{index}", layer, recurse=True)
        return layer

    def release(self, index: int) -> None:
        self.real[index].to("meta")

    def forget_input_embedding(self) -> None:
        """For a caller that carries the hidden states past the first layer: from then on the
        model's forward needs the embeddings' output only for its shape and dtype (the masks
        and position embeddings it makes for a layer), so the vocabulary, the largest table
        held (1 GB at Llama-3-8B's shapes), becomes a zero of the same shape, dtype and
        device that holds one element."""
        embedding = self.base.get_input_embeddings()
        zero = torch.zeros((), dtype=embedding.weight.dtype, device=embedding.weight.device)
        embedding.weight = nn.Parameter(zero.expand(embedding.weight.shape), requires_grad=False)

    def call_of(self, index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(hidden states, args, kwargs) the model's forward passes layer `index` for this
        batch (the hidden states are the embeddings' output; they matter for layer 0 only)."""
        self.state["stop_at"], self.state["call"] = index, None
        with torch.no_grad():
            try:
                self.base(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                          use_cache=False)
            except _Stop:
                pass
        call, self.state["call"] = self.state["call"], None
        if call is None:
            raise CalibrationError(f"{type(self.model).__name__}: its forward never reached decoder layer {index}")
        return call
