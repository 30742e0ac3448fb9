"""What every source format shares: how one stored weight's tensors sit in the staged bytes
(`Stored`), how staged bytes become a typed tensor, and the error for stored tensors that do
not make the weight they claim to."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


class SourceFormatError(ValueError):
    """Codes and scales that do not make the weight they claim to."""


@dataclass(frozen=True)
class Stored:
    """One stored tensor's part of a matrix: its codes, then its scales, then any further
    tensors (`extra`: role, dtype, shape, nbytes), in the staged bytes; `args` are what the
    format's decoder needs besides them (bits, the decoded shape)."""

    codes_dtype: str
    codes_shape: tuple[int, ...]
    codes_nbytes: int
    scale_dtype: str | None = None
    scale_shape: tuple[int, ...] | None = None
    scale_nbytes: int = 0
    extra: tuple[tuple[str, str, tuple[int, ...], int], ...] = ()
    args: tuple[tuple[str, object], ...] = ()

    def as_record(self) -> dict:
        """The fields, the empty `extra`/`args` left out (FP8 and MXFP4 have none; reports
        written before those fields existed keep their bytes)."""
        record = asdict(self)
        return {k: v for k, v in record.items() if v or k not in ("extra", "args")}

    @staticmethod
    def from_record(record: dict) -> Stored:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
        fields["extra"] = tuple((role, dtype, tuple(shape), n) for role, dtype, shape, n in record.get("extra", ()))
        fields["args"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in record.get("args", ()))
        return Stored(**fields)


def typed(raw: torch.Tensor, dtype: str, shape) -> torch.Tensor:
    """Staged bytes as a tensor of safetensors dtype `dtype` (copied where the bytes do not
    sit at a multiple of the element size: a view would need that)."""
    from ..tensors import TORCH_DTYPES

    target = TORCH_DTYPES[dtype]
    size = torch.empty((), dtype=target).element_size()
    if raw.storage_offset() % size:
        raw = raw.clone()
    return raw.view(target).reshape(shape)


@dataclass(frozen=True)
class Encoded:
    """A weight the checkpoint stores encoded: its Stored part, the checkpoint tensors staged
    for it (codes first), how it decodes (a Decode kind), what it decodes to, and the name
    its residual gets in the output."""

    part: Stored
    tensors: tuple[str, ...]
    kind: str
    dtype: str  # safetensors dtype of the decoded weight
    shape: tuple[int, int]
    residual: str


def group_companions(checkpoint, tensor: str, prefix: str, shape: tuple[int, int], group, zero_words: int,
                     library: str):
    """(group size, scales info, qzeros info) of a GPTQ / AWQ weight [R, C] whose codes are
    `tensor`: `X.scales` float [C/g, R] and `X.qzeros` I32 [C/g, zero_words] beside it, a group
    size (-1: one group) that divides C; else SourceFormatError naming file and tensor."""
    rows, cols = shape
    where = f"{checkpoint.info(tensor).file}: tensor '{tensor}'"
    if group in (-1, None):
        group = cols
    if not isinstance(group, int) or group < 1 or cols % group:
        raise SourceFormatError(f"{where}: group size {group} does not divide its {cols} input columns")
    groups = cols // group
    names = {k: f"{prefix}.{k}" for k in ("qzeros", "scales")}
    for name in names.values():
        if name not in checkpoint:
            raise SourceFormatError(f"{where} has no '{name}' beside it (config.json: {library})")
    scale, zero = checkpoint.info(names["scales"]), checkpoint.info(names["qzeros"])
    if tuple(scale.shape) != (groups, rows) or scale.dtype not in ("F16", "BF16", "F32"):
        raise SourceFormatError(f"{scale.file}: scale tensor '{names['scales']}' is {scale.dtype} x "
                                f"{list(scale.shape)}; weight '{prefix}' [{rows}, {cols}] in groups of {group} needs a "
                                f"float [{groups}, {rows}]")
    if zero.dtype != "I32" or tuple(zero.shape) != (groups, zero_words):
        raise SourceFormatError(f"{zero.file}: zero-point tensor '{names['qzeros']}' is {zero.dtype} x "
                                f"{list(zero.shape)}; weight '{prefix}' needs I32 x [{groups}, {zero_words}]")
    return group, scale, zero


class NamedCodes:
    """A format whose weight codes sit under a name of their own (X.weight_packed, X.qweight):
    which tensors hold codes, and the weight each stands for."""

    suffix: str

    def encoded(self, name: str) -> bool:
        return name.endswith(self.suffix)

    def holds_codes(self, info) -> bool:
        return self.encoded(info.name)

    def weight_of(self, name: str) -> str | None:
        """The weight a codes tensor stands for (X.weight for X.qweight), else None."""
        return name[: -len(self.suffix)] + ".weight" if self.encoded(name) else None
