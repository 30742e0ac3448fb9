"""The mapping layer: which checkpoint tensors make up which model parameter.

The model is the class config.json names (`architectures[0]`), built on the meta
device; checkpoint names become parameter names through transformers' own
conversion mapping (the renames it applies at load, e.g. Mixtral's
`block_sparse_moe.` -> `mlp.`, legacy names, a base model's prefix added or
dropped). Tensors that transformers merges into one parameter at load (fused MoE
experts) are kept apart: they are not one weight to decompose.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._pissa_rs import Checkpoint, PissaError
from .. import compat
from ..noise import quiet_library_noise
from ..formats.sources import OUT_DTYPE, Decode, SourceFormat, Stored, encoded_part, mxfp4_part, source_format
from ..tensors import nbytes

log = logging.getLogger("pissa_rs")


def model_class_for(config):
    """The class config.json names, if transformers has it; else None."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "_from_config"):
            return cls
    return None


def _task_type(model) -> str | None:
    """PEFT's task type for the model: CAUSAL_LM for causal LMs, SEQ_2_SEQ_LM for encoder-decoders."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    name = type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "CAUSAL_LM"
    if name in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values():
        return "SEQ_2_SEQ_LM"
    return None


class CustomCodeError(PissaError, ValueError):
    """config.json asks for the checkpoint's own Python code, and names no class
    transformers ships to build instead: pissa_rs never runs a checkpoint's code."""


@functools.lru_cache(maxsize=8)
def _load_config_cached(config_dir: str, _mtime_ns: int):
    with quiet_library_noise():
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    path = Path(config_dir) / "config.json"
    data = json.loads(path.read_text())
    model_type = data.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES:  # transformers' own code; never the checkpoint's, never a prompt
        return AutoConfig.from_pretrained(config_dir, trust_remote_code=False), None
    name = (data.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and hasattr(cls, "config_class") and hasattr(cls, "_from_config")):
        code = sorted((data.get("auto_map") or {}).values())
        raise CustomCodeError(
            f"{path}: model_type {model_type!r} is not one transformers ships"
            + (f" (config.json's auto_map points to the checkpoint's own code: {', '.join(code)})" if code else "")
            + f", and architectures[0] {name!r} names no transformers class to build instead; pissa_rs never runs a "
            "checkpoint's code. Decompose it by tensor names: pass the .safetensors file (or its "
            "model.safetensors.index.json) with explicit --target-modules (e.g. q_proj,k_proj,v_proj,o_proj)")
    values = {k: v for k, v in data.items() if k not in ("auto_map", "model_type")}
    config = cls.config_class.from_dict(values)
    note = (f"config.json names model_type {model_type!r} (the checkpoint's own code, never run by pissa_rs); "
            f"built transformers' {cls.__name__} from its values instead")
    log.info("pissa_rs: %s", note)  # the report records it and the CLI prints it
    return config, note


def load_config(config_dir: str | Path):
    """(transformers config of config_dir/config.json, note). A model_type transformers
    ships is loaded by AutoConfig with trust_remote_code=False. One that asks for the
    checkpoint's own code (Kimi-K2's "kimi_k2" with an auto_map) is built as the class
    `architectures[0]` names if transformers ships it (DeepseekV3ForCausalLM), with a note
    saying so (logged at INFO, recorded in the report); else CustomCodeError. Never prompts."""
    path = Path(config_dir) / "config.json"
    return _load_config_cached(str(config_dir), path.stat().st_mtime_ns)


def meta_model(config_dir: str | Path):
    """(model on the meta device, PEFT task type). Cached while config.json is unchanged."""
    path = Path(config_dir) / "config.json"
    return _meta_model_cached(str(config_dir), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _meta_model_cached(config_dir: str, _mtime_ns: int):
    with quiet_library_noise():
        from transformers import AutoModel, AutoModelForCausalLM

    config, _ = load_config(config_dir)
    cls = model_class_for(config)
    with torch.device("meta"):
        if cls is not None:
            model = cls._from_config(config)
        else:  # config.json names no class transformers knows: what the auto classes build
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    return model, _task_type(model)


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of checkpoint tensor `tensor`."""

    tensor: str
    start: int
    end: int


@dataclass(frozen=True)
class WeightRead:
    """One matrix to decompose, as bytes of the checkpoint: its pieces, in order,
    are its row-major bytes (rows of several tensors stacked, or one expert's
    slice of a tensor that holds all of a layer's experts)."""

    pieces: tuple[Piece, ...]
    dtype: str  # safetensors dtype name of the matrix (as decoded)
    shape: tuple[int, int]
    decode: Decode | None = None  # stored in FP8 / MXFP4: how the staged bytes become the matrix
    out_pieces: tuple[Piece, ...] | None = None  # where the residual's bytes go in the output, if not `pieces`

    @property
    def nbytes(self) -> int:
        return sum(p.end - p.start for p in self.pieces)

    @property
    def written(self) -> tuple[Piece, ...]:
        """Where the residual's bytes go (tensors of the output)."""
        return self.out_pieces if self.out_pieces is not None else self.pieces

    def as_record(self) -> dict:
        return {"pieces": [[p.tensor, p.start, p.end] for p in self.pieces],
                **({"out_pieces": [[p.tensor, p.start, p.end] for p in self.out_pieces]} if self.out_pieces else {}),
                **({"decode": self.decode.as_record()} if self.decode else {})}

    @staticmethod
    def from_record(record: dict) -> WeightRead:
        decode = record.get("decode")
        if decode is not None:
            decode = Decode.from_record(decode)
        out = record.get("out_pieces")
        return WeightRead(tuple(Piece(*p) for p in record["pieces"]), record["dtype"], tuple(record["shape"]),
                          decode, tuple(Piece(*p) for p in out) if out else None)

    def read_into(self, checkpoint: Checkpoint, data: torch.Tensor, residual: bool = False,
                  keep_cached: bool = False) -> None:
        """Its bytes (`pieces`, or with `residual` the output's `written`), one piece after
        the other, into the uint8 tensor `data` of exactly their size; their pages leave the
        page cache unless `keep_cached` (bytes read again soon)."""
        offset = 0
        for piece in self.written if residual else self.pieces:
            size = piece.end - piece.start
            checkpoint.read_range_into(piece.tensor, piece.start, data[offset: offset + size].numpy(), keep_cached)
            offset += size

    def read(self, checkpoint: Checkpoint, residual: bool = False, keep_cached: bool = False) -> torch.Tensor:
        """The matrix from the files: the input's, decoded; with `residual`, the output's
        (the residual is stored plain where the input was encoded)."""
        from ..tensors import TORCH_DTYPES

        data = torch.empty(sum(p.end - p.start for p in (self.written if residual else self.pieces)),
                           dtype=torch.uint8)
        self.read_into(checkpoint, data, residual, keep_cached)
        if self.decode is not None and (not residual or self.out_pieces is None):  # stored encoded
            return self.decode(data)
        return data.view(TORCH_DTYPES[self.dtype]).reshape(self.shape)


class ExpertLayoutError(ValueError):
    """Expert tensors that do not make up the parameter transformers would build from them."""


@dataclass
class CheckpointMapping:
    """Which checkpoint tensor holds which model parameter."""

    architecture: str
    task_type: str | None
    tensor_of: dict[str, str] = field(default_factory=dict)  # parameter -> the one tensor holding it
    merged: dict[str, list[str]] = field(default_factory=dict)  # parameter -> tensors merged into it at load
    # parameter -> (the converter merging them, {tensor: its source pattern})
    merged_by: dict[str, tuple[object, dict[str, str]]] = field(default_factory=dict)

    def module_weight(self, module: str) -> str | None:
        """The checkpoint tensor of `module`'s weight, or None when the checkpoint lacks it
        (or holds it only merged with others)."""
        return self.tensor_of.get(f"{module}.weight")


def checkpoint_mapping(model, checkpoint: Checkpoint, fmt: SourceFormat = SourceFormat(None, None)
                       ) -> CheckpointMapping:
    """Every checkpoint tensor through transformers' own load-time renaming of `model`; a
    weight stored under its format's own name (X.weight_packed) stands for X.weight."""
    renamings, converters = compat.conversion_mapping(model)
    params = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    mapping = CheckpointMapping(type(model).__name__, _task_type(model))
    weight_of = getattr(fmt.codec, "weight_of", None)
    for name in checkpoint.names():
        key = (weight_of(name) if weight_of else None) or name
        param, merged_by = compat.rename_checkpoint_key(key, renamings, converters, prefix, params)
        if merged_by is not None:
            mapping.merged.setdefault(param, []).append(name)
            converter = next(c for c in converters if merged_by in c.source_patterns)
            mapping.merged_by.setdefault(param, (converter, {}))[1][name] = merged_by
        elif param in params:  # otherwise no parameter of this model (a head it lacks): passed through
            mapping.tensor_of[param] = name
    return mapping


def model_mapping(checkpoint: Checkpoint, config_dir: str | Path):
    """(meta model, its CheckpointMapping) for a checkpoint with a config.json."""
    model, _ = meta_model(config_dir)
    return model, checkpoint_mapping(model, checkpoint, source_format(config_dir))


def plain_or_encoded(checkpoint: Checkpoint, fmt: SourceFormat, tensors: list[str], matrix: tuple[int, int] | None,
                     where: str) -> WeightRead:
    """One matrix made of whole tensors stacked by rows: plain floats, or a format's codes
    with their scales (FP8, packed INT), decoded (to bfloat16; INT to its scales' dtype), the
    residual written as plain tensors (FP8: under the same names; INT: the weight's own
    name). `matrix` None: the decoded shape."""
    infos = [checkpoint.info(t) for t in tensors]
    encoded = [encoded_part(checkpoint, fmt, t) for t in tensors]
    if not any(encoded):
        return WeightRead(tuple(Piece(i.name, 0, i.nbytes) for i in infos), infos[0].dtype,
                          matrix or tuple(infos[0].shape))
    if not all(encoded) or len({(e.kind, e.dtype) for e in encoded}) > 1:
        raise ExpertLayoutError(f"{where}: {', '.join(tensors)} mix encoded and plain tensors (or two encodings) in "
                                "one matrix")
    pieces, out = [], []
    for e in encoded:
        pieces += [Piece(name, 0, checkpoint.info(name).nbytes) for name in e.tensors]
        out.append(Piece(e.residual, 0, nbytes(e.dtype, e.shape)))
    decoded = (sum(e.shape[0] for e in encoded), encoded[0].shape[1])
    if matrix is not None and tuple(matrix) != decoded:
        raise ExpertLayoutError(f"{where}: {', '.join(tensors)} decode to {list(decoded)}; the matrix is "
                                f"{list(matrix)}")
    return WeightRead(tuple(pieces), encoded[0].dtype, decoded, Decode(encoded[0].kind, tuple(e.part for e in encoded)),
                      tuple(out))


def expert_reads(mapping: CheckpointMapping, checkpoint: Checkpoint, param: str, shape: tuple[int, ...],
                 fmt: SourceFormat = SourceFormat(None, None)) -> list[WeightRead]:
    """Each expert's matrix of a model parameter (shape [E, d1, d2]; [d1, d2] for a
    2-D one: a single matrix), as the checkpoint stores it, laid out as the matrix
    sits in the parameter: parameter[e] == the bytes of reads[e].

    The parameter is either one tensor (stored fused already: expert e is its e-th
    slice) or merged at load by transformers' conversion from per-expert tensors:
    MergeModulelist stacks the experts (by the number in their name), and a
    Concatenate(dim=1) after it stacks each expert's tensors in the order of the
    converter's source patterns (w1 before w3, gate_proj before up_proj), rows on
    rows. Other conversions are refused rather than guessed."""
    experts = shape[0] if len(shape) == 3 else 1
    matrix = tuple(shape[-2:])
    where = checkpoint.index_path or checkpoint.files[0]
    single = mapping.tensor_of.get(param)
    if single is not None and len(shape) == 2:
        return [plain_or_encoded(checkpoint, fmt, [single], matrix, where)]
    if single is not None:
        info = checkpoint.info(single)
        if tuple(info.shape) != tuple(shape):
            raise ExpertLayoutError(f"{info.file}: tensor '{single}' is {list(info.shape)}, but the model's parameter "
                                    f"{param} is {list(shape)}")
        step = info.nbytes // experts
        return [WeightRead((Piece(single, e * step, (e + 1) * step),), info.dtype, matrix) for e in range(experts)]
    if f"{param}_blocks" in checkpoint and len(shape) == 3:  # MXFP4, as GPT-OSS ships its experts
        blocks, scales = mxfp4_part(checkpoint, param, matrix)
        b, s = checkpoint.info(blocks), checkpoint.info(scales)
        part = Stored("U8", tuple(b.shape[1:]), b.nbytes // experts, "U8", tuple(s.shape[1:]), s.nbytes // experts)
        decode = Decode("mxfp4", (part,), transpose=True)
        out = nbytes(OUT_DTYPE, matrix)
        return [WeightRead((Piece(blocks, e * part.codes_nbytes, (e + 1) * part.codes_nbytes),
                            Piece(scales, e * part.scale_nbytes, (e + 1) * part.scale_nbytes)),
                           OUT_DTYPE, matrix, decode, (Piece(param_on_disk(blocks), e * out, (e + 1) * out),))
                for e in range(experts)]
    if param not in mapping.merged_by or len(shape) != 3:
        raise ExpertLayoutError(f"{where}: no tensor of the checkpoint holds parameter {param}")
    converter, patterns = mapping.merged_by[param]
    steps = compat.converter_operations(converter)
    if steps not in ([(compat.MERGE_MODULELIST, 0)], [(compat.MERGE_MODULELIST, 0), (compat.CONCATENATE, 1)]):
        raise ExpertLayoutError(f"{where}: parameter {param} is built from {sorted(patterns)[0]} and others by "
                                f"{', '.join(map(repr, converter.operations))}; pissa_rs reads experts merged by "
                                "MergeModulelist(dim=0) and optionally Concatenate(dim=1) only")
    by_expert: dict[int, dict[str, str]] = {}
    weight_of = getattr(fmt.codec, "weight_of", None)
    for tensor, pattern in patterns.items():
        number = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
        found = number.search((weight_of(tensor) if weight_of else None) or tensor)  # X.qweight: as X.weight
        if found is None:
            raise ExpertLayoutError(f"{checkpoint.info(tensor).file}: tensor '{tensor}' matched {pattern!r} but "
                                    "names no expert number")
        by_expert.setdefault(int(found.group(1)), {})[pattern] = tensor
    order = [p for p in converter.source_patterns if any(p in e for e in by_expert.values())]
    reads = []
    for e in range(experts):
        tensors = [by_expert.get(e, {}).get(p) for p in order]
        if None in tensors:
            missing = order[tensors.index(None)].replace("*", str(e))
            raise ExpertLayoutError(f"{where}: parameter {param} has {experts} experts, but no tensor matching "
                                    f"{missing!r} for expert {e}")
        packed = getattr(fmt.codec, "encoded", None)
        if packed and all(packed(t) for t in tensors):  # codes by name (packed INT): the decoded shape is checked
            reads.append(plain_or_encoded(checkpoint, fmt, tensors, matrix, where))
            continue
        infos = [checkpoint.info(t) for t in tensors]
        rows = sum(i.shape[0] for i in infos)
        for info in infos:
            if len(info.shape) != 2 or info.shape[1] != matrix[1] or info.dtype != infos[0].dtype:
                raise ExpertLayoutError(f"{info.file}: tensor '{info.name}' is {info.dtype} x {list(info.shape)}; "
                                        f"expert {e} of {param} needs {infos[0].dtype} x [rows, {matrix[1]}]")
        if rows != matrix[0]:
            raise ExpertLayoutError(f"{infos[0].file}: expert {e} of {param} stacks {rows} rows from "
                                    f"{', '.join(tensors)}; the model's parameter has {matrix[0]}")
        reads.append(plain_or_encoded(checkpoint, fmt, tensors, matrix, where))
    extra = sorted(set(by_expert) - set(range(experts)))
    if extra:
        tensor = next(iter(by_expert[extra[0]].values()))
        raise ExpertLayoutError(f"{checkpoint.info(tensor).file}: tensor '{tensor}' is expert {extra[0]}, but "
                                f"{param} has {experts} experts")
    return reads


def param_on_disk(blocks: str) -> str:
    """The name the dequantized parameter gets in the output (transformers' own name for
    it in a bf16 checkpoint): the blocks tensor's, without `_blocks`."""
    return blocks.removesuffix("_blocks")
