"""Merge an adapter into its residual model, out of core: W = W_res + s*B@A,
for serving engines that take no adapters. Same streaming engine as decompose:
Rust copies every other tensor and writes results in the background."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint, Pipeline
from .formats.bnb_serialized import read_weight
from .engine.layout import (
    Assembly,
    abandon,
    copy_model_files,
    set_quantization_config,
    write_index_like,
    writers_like,
)
from .model_files import is_model_dir
from .report import OutputReport
from .factors import round_difference
from .locations import model_of_output
from .formats.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterMismatchError, adapter_targets
from .tensors import TORCH_DTYPES, as_numpy_bytes
from .precision import in_ieee_float32


@in_ieee_float32
def merge_adapter(residual_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                  out_dir: str | os.PathLike[str], revision: str | None = None) -> Path:
    """Write residual + adapter as one plain model to `out_dir` (same names, dtypes
    and shards as the residual). Merging an untrained pissa_init gives back the
    original model up to the weights' own rounding. A residual stored pre-quantized
    (save_quantized) is dequantized: the merged model has the original's layout and
    dtypes, and no quantization_config."""
    # The residual model may be a Hub model ID (a published decomposition) at `revision`; the
    # output of a method that keeps the base (MiCA) merges into the original model it names.
    residual_dir, adapter_dir, out = model_of_output(residual_dir, revision), Path(adapter_dir), Path(out_dir)
    for needed in (adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG):
        if not needed.is_file():
            raise AdapterMismatchError(f"{needed}: missing")
    residual = Checkpoint(residual_dir)
    adapter = Checkpoint(adapter_dir / ADAPTER_WEIGHTS)
    held = OutputReport.read(residual_dir)
    storage, stored = held.storage, held.stored
    jobs = adapter_targets(adapter_dir, adapter, residual, residual_dir)
    # A pre-quantized weight's tensors become the one dense weight again.
    dense_as = {name: [] for w in stored.values() for name, *_ in w.parts(storage)}
    dense_as.update({n: [(n, w.dtype, list(w.shape))] for n, w in stored.items()})
    dtypes = {n: w.dtype for n, w in stored.items()}

    out.mkdir(parents=True, exist_ok=True)
    writers = writers_like(residual, out, stored_as=dense_as)
    merged = {job.tensor for job in jobs if job.location is None}
    merged |= {p.tensor for job in jobs if job.location is not None for p in job.location.written}
    pipeline = Pipeline(residual, [(i.name, writers[i.file], i.name) for i in residual.tensors
                                   if i.name not in merged and i.name not in dense_as])
    # A tensor holding several experts is written once all of them are merged into it.
    partial = Counter(p.tensor for job in jobs if job.location is not None for p in job.location.written
                      if (p.start, p.end) != (0, residual.info(p.tensor).nbytes))
    assembling = {name: Assembly(torch.empty(residual.info(name).nbytes, dtype=torch.uint8), parts)
                  for name, parts in partial.items()}
    try:
        for job in jobs:
            if job.location is not None:  # an expert (or an FP8 / MXFP4 source's): merged where its residual is
                w = job.weight(residual, residual=True)
                merged_w, _ = round_difference(w.float(), -job.delta(adapter), w.dtype)
                flat, offset = merged_w.reshape(-1).view(torch.uint8), 0
                if job.location.decode is not None and job.location.out_pieces is None:  # kept in the source's FP8
                    flat = job.location.decode.encode(merged_w)
                for piece in job.location.written:
                    data = flat[offset: offset + piece.end - piece.start]
                    offset += piece.end - piece.start
                    slot = assembling.get(piece.tensor)
                    if slot is not None:
                        if not slot.put(lambda whole: whole[piece.start: piece.end].copy_(data)):
                            continue
                        data = assembling.pop(piece.tensor).data
                    pipeline.submit(writers[residual.info(piece.tensor).file], piece.tensor, as_numpy_bytes(data))
                continue
            tensor = job.tensor
            w = read_weight(residual, tensor, storage, stored)
            # W_res + s*B@A, rounded once to the weight's dtype.
            dtype = TORCH_DTYPES[dtypes.get(tensor) or residual.info(tensor).dtype]
            merged_w, _ = round_difference(w.float(), -job.delta(adapter), dtype)
            pipeline.submit(writers[residual.info(tensor).file], tensor, as_numpy_bytes(merged_w), release=tensor)
        for tensor in stored.keys() - merged:  # quantized, not adapted: dequantized
            w = read_weight(residual, tensor, storage, stored)
            pipeline.submit(writers[residual.info(tensor).file], tensor, as_numpy_bytes(w))
        pipeline.finish()
        for writer in writers.values():
            writer.finalize()
    except BaseException as err:
        first = abandon(pipeline, writers.values(), err)
        if first is err:
            raise
        raise first from err
    copy_model_files(residual, residual_dir, out)
    if storage is not None:
        write_index_like(residual, out, dense_as)
        if is_model_dir(residual_dir):
            set_quantization_config(out, None)
    return out
