"""The end of a decomposition, done once per output when every unit is done: the adapter
assembled from the units' parts (experts into PEFT's ParamWrapper layout), then the index,
configs and report, the report last; then the units' files go."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .._pissa_rs import Checkpoint, PissaError, ShardWriter
from ..constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PARAM_WRAPPERS, REPORT_NAME, RUN_FILE, UNITS_DIR
from ..formats.peft_adapter import adapter_shapes, lora_a_key, lora_b_key, param_wrappers_json, with_base_model
from ..options import ADAPTER_DTYPES
from ..precision import float32_matmul_state
from ..report import build_report
from ..tensors import SAFETENSORS_DTYPES, as_numpy_bytes, as_torch
from .layout import copy_model_files, output_bytes, set_quantization_config, write_index_like
from .chosen_ranks import with_chosen_ranks
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
    spec.adapter.mkdir(exist_ok=True)
    records_by_tensor: dict[str, dict] = {}
    for unit in job.units:
        records_by_tensor.update(read_records(unit_file(out, unit, "records")))
    records = [records_by_tensor[t.tensor] for t in spec.plan.targets]
    method = spec.options.init_method
    chosen = method.commit_ranks(spec.options, spec.plan.targets, records)
    if chosen:
        spec, records = with_chosen_ranks(spec, records, chosen)
    saved, tied = method.modules_to_save(spec.options), False
    if saved:
        spec, tied = with_modules_to_save(spec, saved, Path(checkpoint.root))
    write_adapter(job, spec, checkpoint, saved_tensors(checkpoint, saved, tied))
    changes_base = method.changes_base
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
        atomic_write_text(spec.adapter / PARAM_WRAPPERS, wrappers)
    atomic_write_text(spec.adapter / ADAPTER_CONFIG, config_json)
    report = build_report(job.input, out, spec.plan, spec.options, records, copied,
                          sum(output_bytes(checkpoint, spec.plan, spec.options)), time.perf_counter() - started,
                          origin)
    report["run"] = read_identity(out, REPORT_NAME)  # what a rerun compares itself with
    # with the float32 matmul precision the math ran under (precision.py: ieee, whatever the caller set)
    report["rounding"] = {**rounding_provenance(job, spec, report["run"].get("rounding", job.rounding)),
                          "float32_matmul": float32_matmul_state()}
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


def saved_tensors(checkpoint: Checkpoint, modules: list[str], tied: bool = False) -> list[tuple[str, str]]:
    """(adapter key, input tensor) for every tensor of these modules, as PEFT saves a
    modules_to_save module: base_model.model.<its name in the model>; `tied`: the saved
    embedding once more as the head tied to it (PEFT saves both, and reads both)."""
    prefixes = tuple(f"{m}." for m in modules)
    names = checkpoint.names()
    found = [(f"base_model.model.{name}", name) for name in names if name.startswith(prefixes)]
    if tied and "lm_head.weight" not in names:
        embedding = next((name for _, name in found if name.endswith("embed_tokens.weight")), None)
        if embedding is not None:
            found.append(("base_model.model.lm_head.weight", embedding))
    return found


# The modules PEFT re-ties to a tied input embedding when they are saved (ensure_weight_tying):
# peft.utils.constants.EMBEDDING_LAYER_NAMES
TIED_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def with_modules_to_save(spec: OutputSpec, modules: list[str], model_dir: Path) -> tuple[OutputSpec, bool]:
    """adapter_config.json naming `modules` as modules_to_save; where the model ties its word
    embeddings and one of them is saved, ensure_weight_tying, or PEFT would leave the tied head
    on the base's embedding."""
    config = json.loads(spec.plan.adapter_config_json)
    config["modules_to_save"] = sorted(modules)
    model_config = Path(model_dir) / "config.json"
    model = json.loads(model_config.read_text()) if model_config.is_file() else {}
    tied = model.get("tie_word_embeddings", (model.get("text_config") or {}).get("tie_word_embeddings", False))
    tied = bool(tied) and any(m.rsplit(".", 1)[-1] in TIED_EMBEDDING_NAMES for m in modules)
    if tied:
        config["ensure_weight_tying"] = True
    return replace(spec, plan=replace(spec.plan, adapter_config_json=json.dumps(config, indent=2, sort_keys=True))), tied


def write_adapter(job: Job, spec: OutputSpec, source: Checkpoint, saved: list[tuple[str, str]] = ()) -> None:
    """OUT/pissa_init/adapter_model.safetensors from the units' parts: a layer's factors as
    they are (their leading triplets where the commit chose a smaller rank); a layer over E
    experts (PEFT's ParamWrapper) holds expert e's rows of A and every E-th column of B.
    `saved`: (key, tensor) copied whole from the input, `source` (modules_to_save)."""
    dtype = ADAPTER_DTYPES[spec.options.adapter_dtype]
    shapes = adapter_shapes(spec.plan.targets)
    carried = [(key, source.info(name).dtype, list(source.info(name).shape)) for key, name in saved]
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
    with ShardWriter(spec.adapter / ADAPTER_WEIGHTS,
                     [(key, SAFETENSORS_DTYPES[dtype], list(shape)) for key, shape in shapes] + carried,
                     metadata={"format": "pt"}) as writer:
        for key, name in saved:
            writer.copy_from(source, name, key)
        for module, indices in by_module.items():
            a_key, b_key = lora_a_key(module), lora_b_key(module)
            first = spec.plan.targets[indices[0]]
            if first.num_experts == 1:
                part, i = parts[indices[0]], indices[0]
                if tuple(part.info(part_key(i, "lora_A")).shape) == tuple(shape_of[a_key]):
                    writer.copy_from(part, part_key(i, "lora_A"), a_key)
                    writer.copy_from(part, part_key(i, "lora_B"), b_key)
                else:  # a rank chosen at the commit: the leading triplets
                    writer.write(a_key, as_numpy_bytes(as_torch(part.buffer(part_key(i, "lora_A")))[:first.r]))
                    writer.write(b_key, as_numpy_bytes(
                        as_torch(part.buffer(part_key(i, "lora_B")))[:, :first.r].contiguous()))
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
