"""The end of a decomposition, done once per output when every unit is done: the adapter
assembled from the units' parts (experts into PEFT's ParamWrapper layout), then the index,
configs and report, the report last; then the units' files go."""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import torch

from .._pissa_rs import Checkpoint, PissaError, ShardWriter
from ..constants import ADAPTER_CONFIG, ADAPTER_SUBDIR, ADAPTER_WEIGHTS, PARAM_WRAPPERS, REPORT_NAME, RUN_FILE, UNITS_DIR
from ..formats.peft_adapter import adapter_shapes, lora_a_key, lora_b_key, param_wrappers_json, with_base_model
from ..options import ADAPTER_DTYPES
from ..report import build_report
from ..tensors import SAFETENSORS_DTYPES, as_numpy_bytes, as_torch
from .layout import copy_model_files, output_bytes, set_quantization_config, write_index_like
from .outdir import atomic_write_text
from .resume import read_identity, read_records
from .units import Job, OutputSpec, is_done, part_key, unit_file


class UnfinishedUnitsError(PissaError, RuntimeError):
    """A commit was asked for while some units had not finished."""


def commit(job: Job, spec: OutputSpec, started: float, origin: dict[str, str | None],
           cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finish `spec`'s output: returns its report (`cluster`: how a Ray run went, recorded)."""
    out = spec.out
    unfinished = [u.name for u in job.units if not is_done(out, u)]
    if unfinished:
        raise UnfinishedUnitsError(f"{out}: {len(unfinished)} unit(s) not finished ({', '.join(unfinished[:3])})")
    checkpoint = Checkpoint(job.input)
    (out / ADAPTER_SUBDIR).mkdir(exist_ok=True)
    write_adapter(job, spec)
    records_by_tensor: dict[str, dict] = {}
    for unit in job.units:
        records_by_tensor.update(read_records(unit_file(out, unit, "records")))
    records = [records_by_tensor[t.tensor] for t in spec.plan.targets]
    changes_base = spec.options.init_method.changes_base
    # a method that leaves the base as it is (MiCA): no model here, the adapter names the original
    copied = copy_model_files(checkpoint, job.input, out) if changes_base else []
    config_json = spec.plan.adapter_config_json if changes_base else with_base_model(spec.plan.adapter_config_json,
                                                                                      origin)
    if changes_base and spec.options.save_quantized:  # the index names the tensors as stored; config.json how to load them
        write_index_like(checkpoint, out, spec.plan.stored_parts(spec.options.stored_quantization))
        set_quantization_config(out, spec.plan.quantization_config)
    elif changes_base and spec.plan.source_as:  # an FP8 / MXFP4 source: the residual's tensors and config say what they are now
        write_index_like(checkpoint, out, spec.plan.source_as)
        set_quantization_config(out, spec.plan.source_quantization_config)
    wrappers = param_wrappers_json(spec.plan.targets)
    if wrappers is not None:
        atomic_write_text(out / ADAPTER_SUBDIR / PARAM_WRAPPERS, wrappers)
    atomic_write_text(out / ADAPTER_SUBDIR / ADAPTER_CONFIG, config_json)
    report = build_report(job.input, out, spec.plan, spec.options, records, copied,
                          sum(output_bytes(checkpoint, spec.plan, spec.options)), time.perf_counter() - started,
                          origin)
    report["run"] = read_identity(out, REPORT_NAME)  # what a rerun compares itself with
    report["rounding"] = rounding_provenance(job, spec, report["run"].get("rounding", job.rounding))
    report.update(job.report_extra)
    if cluster is not None:
        report["cluster"] = cluster
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=1))
    shutil.rmtree(out / UNITS_DIR, ignore_errors=True)
    (out / RUN_FILE).unlink(missing_ok=True)
    checkpoint.release_all()  # opening it read the headers' pages (and, for small shards, more)
    return report


def rounding_provenance(job: Job, spec: OutputSpec, begun_with: str) -> dict[str, Any]:
    """How the output's bytes were rounded: one probe (the usual case, and the only one
    unless mixing was allowed), or, for a mixed output, which tensors each probe wrote."""
    by_probe: dict[str, list[str]] = {}
    for unit in (u for u in job.units if u.targets):  # copies are the same bytes on any machine
        done = json.loads(unit_file(spec.out, unit, "done").read_text())
        probe = done.get("rounding") or begun_with  # units finished before probes were recorded
        by_probe.setdefault(probe, []).extend(spec.plan.targets[i].tensor for i in unit.targets)
    if len(by_probe) <= 1:
        return {"probe": next(iter(by_probe), begun_with)}
    return {"probe": None, "mixed": True, "tensors_by_probe": {p: sorted(t) for p, t in sorted(by_probe.items())},
            "note": "allow_mixed_rounding: these tensors were computed by machines that round differently; the "
                    "output is no single machine's bytes (each tensor is still a valid decomposition)"}


def write_adapter(job: Job, spec: OutputSpec) -> None:
    """OUT/pissa_init/adapter_model.safetensors from the units' parts: a layer's factors as
    they are; a layer over E experts (PEFT's ParamWrapper) holds expert e's rows of A and
    every E-th column of B."""
    dtype = ADAPTER_DTYPES[spec.options.adapter_dtype]
    shapes = adapter_shapes(spec.plan.targets)
    parts = {}  # target -> its unit's adapter part
    for unit in job.units:
        if unit.targets:
            part = Checkpoint(unit_file(spec.out, unit, "adapter"))
            parts.update((i, part) for i in unit.targets)
    by_module: dict[str, list[int]] = {}
    for i, t in enumerate(spec.plan.targets):
        by_module.setdefault(t.module, []).append(i)
    shape_of = dict(shapes)
    # finalized on leaving the block, removed on an error
    with ShardWriter(spec.out / ADAPTER_SUBDIR / ADAPTER_WEIGHTS,
                     [(key, SAFETENSORS_DTYPES[dtype], list(shape)) for key, shape in shapes],
                     metadata={"format": "pt"}) as writer:
        for module, indices in by_module.items():
            a_key, b_key = lora_a_key(module), lora_b_key(module)
            first = spec.plan.targets[indices[0]]
            if first.num_experts == 1:
                writer.copy_from(parts[indices[0]], part_key(indices[0], "lora_A"), a_key)
                writer.copy_from(parts[indices[0]], part_key(indices[0], "lora_B"), b_key)
                continue
            a = torch.empty(shape_of[a_key], dtype=dtype)
            b = torch.empty(shape_of[b_key], dtype=dtype)
            r, experts = first.r, first.num_experts
            for i in indices:
                e = spec.plan.targets[i].expert
                a[e * r: (e + 1) * r] = as_torch(parts[i].buffer(part_key(i, "lora_A")))
                b.view(b.shape[0], r, experts)[:, :, e] = as_torch(parts[i].buffer(part_key(i, "lora_B")))
            writer.write(a_key, as_numpy_bytes(a))
            writer.write(b_key, as_numpy_bytes(b))
