"""The residual model's files laid out like the input's: one writer per input shard, the
index, config.json's quantization_config, the small files, and the sizes they add up to."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._pissa_rs import Checkpoint, Journal, PissaError, Pipeline, ShardWriter
from ..model_files import copy_small_files, is_model_dir
from ..tensors import nbytes
from .outdir import atomic_write_text

# (name, dtype, shape) of the tensors one input tensor is stored as, where not itself
StoredAs = dict[str, list[tuple[str, str, list[int]]]]


def writers_like(checkpoint: Checkpoint, out: Path, journal: Journal | None = None, resume: bool = False,
                 stored_as: StoredAs | None = None, files: list[str] | None = None) -> dict[str, ShardWriter | None]:
    """One writer per input shard (keyed by input file; only `files` when given), laid out
    exactly like it in `out`: same names, dtypes, shapes, order and metadata, but for the
    tensors `stored_as` maps to the tensors they are stored as instead. Resuming, a shard
    already under its final name is complete (it got there by an atomic rename): its
    writer is None."""
    stored_as = stored_as or {}
    root = Path(checkpoint.root)
    by_file: dict[str, list] = {f: [] for f in (files if files is not None else checkpoint.files)}
    for info in checkpoint.tensors:
        if info.file in by_file:
            by_file[info.file].append(info)
    writers = {}
    for file, infos in by_file.items():
        rel = os.path.relpath(file, root)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if resume and (out / rel).is_file():
            writers[file] = None
            continue
        specs = [spec for i in infos for spec in stored_as.get(i.name, [(i.name, i.dtype, list(i.shape))])]
        writers[file] = ShardWriter(out / rel, specs, metadata=checkpoint.file_metadata[file], journal=journal,
                                    resume=resume)
    return writers


def residual_bytes(checkpoint: Checkpoint, stored_as: StoredAs) -> int:
    """Bytes of a residual model laid out like the input, but for the tensors `stored_as`
    maps to the tensors they are stored as (see writers_like)."""
    total = sum(os.path.getsize(f) for f in checkpoint.files)
    for tensor, parts in stored_as.items():
        total += sum(nbytes(dtype, shape) for _, dtype, shape in parts) - checkpoint.info(tensor).nbytes
    return total


def write_index_like(checkpoint: Checkpoint, out: Path, stored_as: StoredAs) -> None:
    """OUT's index json (if the checkpoint has one): the input's, with the tensors
    `stored_as` maps stored as those (see writers_like)."""
    if not checkpoint.index_path:
        return
    index_path = Path(checkpoint.index_path)
    index = json.loads(index_path.read_text())
    root = Path(checkpoint.root)
    weight_map, total = {}, 0
    for info in checkpoint.tensors:
        for name, dtype, shape in stored_as.get(info.name, [(info.name, info.dtype, list(info.shape))]):
            weight_map[name] = os.path.relpath(info.file, root)
            total += nbytes(dtype, shape)
    index["weight_map"] = dict(sorted(weight_map.items()))
    index.setdefault("metadata", {})["total_size"] = total
    atomic_write_text(out / index_path.name, json.dumps(index, indent=2) + "\n")


def set_quantization_config(out: Path, quantization_config: dict[str, Any] | None) -> None:
    """config.json in OUT with this quantization_config (None: without one)."""
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_model_files(checkpoint: Checkpoint, path: Path, out: Path) -> list[str]:
    """The input's index json (same tensors and shards: the same index) and its
    small files (config, tokenizer, subfolders: see model_files) into `out`.
    Returns the small files copied."""
    if checkpoint.index_path:
        index = Path(checkpoint.index_path)
        tmp = out / f".{index.name}.partial"
        shutil.copyfile(index, tmp)
        os.replace(tmp, out / index.name)
    return copy_small_files(Path(checkpoint.root), out) if is_model_dir(path) else []


@dataclass
class Assembly:
    """A tensor made of several results (a layer's lora_A / lora_B over all its experts; a
    residual tensor holding all of a layer's experts): kept on the host until every part
    arrived, then written whole. Bounded by one layer's experts."""

    data: torch.Tensor
    missing: int  # parts still to come

    def put(self, fill) -> bool:
        """Fill one part (fill(data)); True when the tensor is complete."""
        fill(self.data)
        self.missing -= 1
        return self.missing == 0


def abandon(pipeline: Pipeline, writers, err: BaseException, keep: bool = False) -> BaseException:
    """Stop the background work after `err` and remove every temporary file, or
    with `keep`, leave them (and their journal) for a later run to resume.
    Returns the exception to report: a submit that failed only echoes an earlier
    background failure, and that one is the cause."""
    pipeline.cancel()
    first = err
    try:
        pipeline.finish()
    except PissaError as background:
        if isinstance(err, PissaError):
            first = background
    for writer in writers:
        writer.suspend() if keep else writer.abort()
    return first


def output_bytes(checkpoint: Checkpoint, plan, options) -> tuple[int, int]:
    """(residual model, adapter) sizes in bytes: the residual (none for a method that leaves
    the base as it is) has the input's layout (less what is stored pre-quantized, plus its quantized form); the
    adapter holds r x in + out x r per target."""
    from ..options import ADAPTER_DTYPES

    residual = (residual_bytes(checkpoint, plan.stored_parts(options.stored_quantization))
                if options.init_method.changes_base else 0)  # MiCA: the adapter alone
    itemsize = ADAPTER_DTYPES[options.adapter_dtype].itemsize
    adapter = sum(t.r * sum(t.shape) * itemsize for t in plan.targets)
    return residual, adapter
