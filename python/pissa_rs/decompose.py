"""The driver: a decomposition is a plan, its units of work, and a commit per output.
A local run is every unit in this process, on this process's devices."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ._pissa_rs import Checkpoint
from .calibration.model import model_calibration
from .engine.commit import commit
from .engine.device_memory import check_device_memory
from .engine.devices import PAGE_LOCKED, parse_devices
from .engine.layout import output_bytes
from .engine.outdir import prepare_out
from .engine.passes import PASSES, PassInput
from .engine.resume import input_state, run_identity
from .engine.run import ByIndex, run_unit
from .engine.units import Job, OutputSpec, split_units
from .hub import base_model_of
from .locations import output_dirs, resolve_source
from .options import DecomposeOptions
from .planning.plan import PLAN_IN_CHILD_ABOVE_BYTES, PlanChecks, make_plan, make_plan_in_child
from .quant import remember_choice
from .rank_budget import budgeted_options, choose_ranks
from .report import OutputReport
from .rounding import devices_probe, warm_probes
from .precision import in_ieee_float32


@dataclass
class DecomposeResult:
    out: Path  # the residual model
    adapter: Path  # OUT/pissa_init
    report: dict[str, Any]  # the contents of OUT/pissa_report.json
    status: str = "fresh"  # "fresh", "resumed" (an interrupted run finished) or "complete" (nothing left to do)


def decompose_checkpoint(
    path: str | os.PathLike[str],
    r: int | list[int] = 128,
    *,
    out: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    ray: str | None = None,
    **options: Any,
) -> DecomposeResult | list[DecomposeResult]:
    """PiSSA-decompose every target weight of a safetensors checkpoint, out of core.

    `ray="auto"` (or a Ray address) runs one task per unit on an existing Ray cluster whose
    nodes see the input and `out` at the same paths (a shared filesystem): the same bytes as
    a local run; a unit whose node dies is retried elsewhere and resumes from its journal.

    `options` are DecomposeOptions' fields (lora_alpha, niter, target_modules, quantize,
    ...; `pissa-rs decompose --help` lists them with their meaning); a misspelt one is a
    TypeError naming the closest.

    `path`: a checkpoint directory (sharded or not, symlinked files included, as in the
    Hugging Face cache), one .safetensors file, or a Hub model ID (`org/name`, at
    `revision`) fetched through huggingface_hub's cache; the output of an ID goes by
    default to `./<name>-pissa-r<r>`.

    With a list of ranks, each weight is read once and SVD'd once at the largest
    rank, and one complete output is written per rank (a list of results, by
    ascending rank); `out` then must contain "{r}".

    Writes the residual model to `out` (same names, dtypes and shard split as the
    input), the adapter to `out/pissa_init` and a report to `out/pissa_report.json`.
    Load it with `AutoModelForCausalLM.from_pretrained(out)` then
    `PeftModel.from_pretrained(model, out, subfolder="pissa_init", is_trainable=True)`.

    Mixtures of experts: where PEFT's own expansion of target_modules adapts the
    experts (transformers 5 fuses them into 3-D parameters PEFT wraps through
    target_parameters; on Mixtral- and Qwen2-MoE-style models "all-linear" does),
    each expert gets its own PiSSA split, written in PEFT's ParamWrapper layout, and
    its residual goes back to the checkpoint's own per-expert (or fused) tensors.
    `target_parameters` adds parameters by name or suffix (e.g. ["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"] where "all-linear" leaves them, as on GPT-OSS);
    `exclude_parameters=["mlp.gate.weight"]` keeps the routers frozen.

    `devices=["cuda:0", "cuda:1"]` spreads the weights over several devices of one
    kind; the output is byte-identical to a one-device run.

    QPiSSA: `quantize` ("nf4", "fp4", "int8") names the quantization training will
    load the residual with (`load_for_training(out, quantize=...)`). The report then
    gives, per tensor, the paper's error reduction against quantizing W itself
    (QLoRA), and LoftQ's with `compare_loftq`; that costs two full SVDs per weight
    (`measure_error=False` skips it; `pissa-rs qerror` measures it later). With
    `quant_iters` T > 1 the stored residual is deq(quant(W - s*B@A)) after T
    alternations, in W's dtype. `save_quantized=True` stores the residual already
    quantized, in the serialized bitsandbytes format transformers loads with no
    quantization at load time (`quantization_config` in config.json): every weight
    transformers would quantize, the targets' residuals and the others alike.

    Low-precision sources (config.json's quantization_config: transformers' fine-grained
    FP8, compressed-tensors FP8, MXFP4): target weights are dequantized on the device and
    decomposed; the residual is bfloat16 (config.json keeps the quantization_config only
    for the weights left quantized). `keep_source_format=True` (FP8) stores the residual
    re-quantized in the source's own block-scaled FP8 instead, half the bytes; the report
    then gives, per weight, the error that re-quantization adds.
    """
    if ray is not None and options.get("device") is None and options.get("devices") is None:
        from .engine.ray_run import cluster_device

        options = {**options, "device": cluster_device(ray)}  # the nodes' kind, not this machine's
    opts = DecomposeOptions.from_fields({"r": r, **options}, on_cluster=ray is not None)
    source, out = resolve_source(path, revision, Path(out) if out else None, opts.ranks, method=opts.method)
    return run_decomposition(source, opts, out=out, overwrite=overwrite, progress=progress, ray=ray,
                             origin=base_model_of(path, revision))


def extract_lora(base, finetuned, out=None, *, r: int = 128, energy: float | None = None,
                 save_modules: bool | list[str] | None = None, logit_check: int = 0, overwrite: bool = False,
                 progress: bool = True, **options):
    """A LoRA of `base` from the fully fine-tuned `finetuned` (folders, same architecture):
    per target weight (PEFT's target selection, "all-linear" by default), the top-r triplets
    of W_ft - W_base (randomized SVD, `niter`; 0: exact), out of core with the decomposition's
    engine (units, resume, progress, FP8 sources decoded). Writes the adapter into OUT itself
    (as to-lora does: a LoRA of another model is its folder; it names `base` as its base
    model) and OUT/pissa_report.json (per module the share
    of the difference kept, `energy_kept`; the tensors that differ but are not adapted,
    under `extract`). `energy=E` (0 < E <= 1): per module the fewest of the r triplets that keep
    E of ||W_ft - W_base||^2 (rank_pattern; r is the cap). `save_modules`: modules carried
    whole as PEFT's modules_to_save, names or suffixes (True: every one that differs and is not
    adapted). `logit_check=N`: N random token sequences through BASE with the LoRA and through
    FINETUNED (one whole model in memory at a time), the change in the report's `logit_change`.
    Returns the DecomposeResult."""
    if save_modules is True:
        save_modules = ["all"]
    elif isinstance(save_modules, str):
        save_modules = [save_modules]
    result = decompose_checkpoint(finetuned, r=r, out=out, overwrite=overwrite, progress=progress, method="extract",
                                  extract_base=str(base), extract_energy=energy,
                                  extract_save_modules=list(save_modules) if save_modules else None, **options)
    if logit_check:
        from .constants import REPORT_NAME
        from .engine.outdir import atomic_write_text
        from .logit_check import logit_change

        result.report["logit_change"] = logit_change((finetuned, None), (base, result.adapter), samples=logit_check)
        atomic_write_text(result.out / REPORT_NAME, json.dumps(result.report, indent=1))
    return result


@in_ieee_float32
def run_decomposition(path: Path, options: DecomposeOptions, *, out: Path | None, overwrite: bool,
                      progress: bool, origin: dict[str, str | None] | None = None, ray: str | None = None
                      ) -> DecomposeResult | list[DecomposeResult]:
    """Decompose once per target weight, writing one output per rank in options.ranks:
    plan, open the outputs, run every unit, commit each output.

    An output left by an interrupted run of the same inputs and options is resumed: its
    finished units are kept as they are, and so is every tensor of an unfinished one whose
    bytes match that unit's journal; the rest is recomputed (per-tensor seeds make the
    result byte-identical to an uninterrupted run). `origin` names the original model in
    the report (base_model_of; default: `path`). `ray`: run the units as Ray tasks on the
    cluster at that address ("auto": the one this machine belongs to)."""
    started = time.perf_counter()
    checkpoint = Checkpoint(path)
    calibration = None
    if options.init_method.calibration is not None:  # tokenized first: bad data fails before any write
        if ray is not None:
            raise ValueError(f"method {options.method!r} calibrates layer by layer in this process; Ray runs "
                             "do not take calibration data yet")
        calibration, options = model_calibration(path, options)
    if options.init_method.reads_base:  # extract: a LoRA of the base the fine-tuned model started from
        base = Path(options.extract_base).resolve()
        if not base.exists():
            raise FileNotFoundError(f"{base}: the base model to extract a LoRA of is not there")
        options = replace(options, extract_base=str(base), extract_base_state=input_state(Checkpoint(base)))
        origin = base_model_of(base, None)  # the adapter applies to the base, not to the input
    inputs = input_state(checkpoint)
    outs = output_dirs(path, options.ranks, out, options.method)
    report_extra = ()
    statistics = None
    scratch = None
    if calibration is not None and options.init_method.calibration in PASSES:
        # statistics that need every layer first (EVA's components, LoRA-GA's gradients): the
        # pass over the targets of the largest rank's plan, then the units as for any method
        plans, checks = _plan(path, checkpoint, [options.for_rank(max(options.ranks))], outs)
        checks.close()
        done = PASSES[options.init_method.calibration](
            PassInput(checkpoint, calibration, options, outs, inputs, plans[0].targets, progress))
        options, statistics, report_extra, scratch = done.options, done.statistics, done.report_extra, done.scratch
        calibration = None
    if options.rank_budget and not options.budget_chosen:  # the ranks from a spectra pass, then the plan
        if options.on_cluster:  # the spectra pass runs here, not on the nodes
            try:
                parse_devices([options.device])
            except ValueError as err:
                raise ValueError(f"rank_budget runs its spectra pass on this machine before the cluster's units: "
                                 f"{err}; name a device this machine has (device='cpu', slow for a big model) or "
                                 "drive the run from a node that has the cluster's device") from None
        plans, checks = _plan(path, checkpoint, [options.for_rank(options.ranks[0])], outs)
        checks.close()
        allocation = choose_ranks(path, plans[0].targets, options, progress)
        options = budgeted_options(options, allocation)
        report_extra = (("rank_budget", allocation.as_record()),)
    per_rank = [options.for_rank(r) for r in options.ranks]
    # the rounding probes measured while the child plans (a local run's; a Ray run's are the nodes')
    warm = (lambda: warm_probes(options, checkpoint)) if ray is None else None
    plans, checks = _plan(path, checkpoint, per_rank, outs, warm)
    if options.init_method.reads_base:
        from .extraction import BaseWeights

        try:  # the pair checked (shapes, dtypes, tensors) before anything is written
            statistics = BaseWeights(Path(options.extract_base), checkpoint, plans[0].targets)
            if options.extract_save_modules:  # the names resolved to modules: what the identity records
                statistics.saved = statistics.modules_to_save(options.extract_save_modules, checkpoint)
                options = replace(options, extract_save_modules=statistics.saved)
                per_rank = [replace(o, extract_save_modules=statistics.saved) for o in per_rank]
        except BaseException:
            checks.close()
            raise
        report_extra = report_extra + (("extract", statistics.as_record()),)
    if options.quantization is not None and plans[0].quantizer is not None:
        remember_choice(options.quantization, torch.device(options.device).type, plans[0].quantizer)
    units = tuple(split_units(checkpoint, plans[0], options.stored_quantization))
    job = Job(path, options, tuple(OutputSpec(o, plan, opts) for opts, o, plan in zip(per_rank, outs, plans)),
              tuple(inputs), units, torch.get_num_threads(), report_extra=report_extra)
    # How the machines that will compute round, measured before anything is written: a resume
    # and every Ray node must round as the run's identity says (or be allowed to mix, and say so).
    fingerprints = None
    locks: list = []
    states: list[str] = []
    try:
        if ray is None:
            check_device_memory(plans[-1].targets, options)  # before anything is written; at the largest rank
            rounding = devices_probe(options, plans[0].targets)
        else:
            from .engine.ray_run import cluster_rounding

            rounding, fingerprints = cluster_rounding(job, ray)
        for opts, out_dir, plan in zip(per_rank, outs, plans):
            residual, adapter = output_bytes(checkpoint, plan, opts)
            identity = run_identity(path, opts.identity_options(), inputs, rounding)
            # the adapter twice: the units' parts and the assembled file, until the commit
            lock, state = prepare_out(out_dir, checkpoint, path, overwrite, residual + 2 * adapter, identity,
                                      options.allow_mixed_rounding)
            locks.append(lock)
            states.append(state)
        job = replace(job, outputs=tuple(replace(spec, complete=state == "complete")
                                         for spec, state in zip(job.outputs, states)), rounding=rounding)
        cluster = None
        if any(state != "complete" for state in states):
            if ray is not None:
                from .engine.ray_run import run_on_ray

                cluster = run_on_ray(job, ray, progress, fingerprints)
            else:
                extra = run_locally(job, checkpoint, progress, calibration, statistics)
                job = replace(job, report_extra=job.report_extra + extra)
        checks.wait()  # nothing is committed before every check of the plan passed
        origin = origin or base_model_of(path, None)
        results = []
        for spec, state in zip(job.outputs, states):
            report = (OutputReport.read(spec.out).data if spec.complete
                      else commit(job, spec, started, origin, cluster))
            results.append(DecomposeResult(out=spec.out, adapter=spec.adapter, report=report,
                                           status=state))
        if scratch is not None:  # every output committed: the pass is not needed again
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        checks.close()
        PAGE_LOCKED.clear()  # the staging buffers the units shared (GPU runs)
        checkpoint.release_all()  # the pages its headers (and the planner's reads) brought in
        for lock in locks:
            lock.release()
    return results if options.several_ranks else results[0]


def _plan(path: Path, checkpoint: Checkpoint, per_rank: list[DecomposeOptions], outs: list[Path], meanwhile=None):
    """The plans of every output, and the checks still running: in a child process (with
    `meanwhile()` run here as it plans) above PLAN_IN_CHILD_ABOVE_BYTES, which is every
    checkpoint but where a test lowers it."""
    if sum(i.nbytes for i in checkpoint.tensors) > PLAN_IN_CHILD_ABOVE_BYTES:
        return make_plan_in_child(path, [asdict(o) for o in per_rank], outs, meanwhile)
    plan = make_plan(path, [asdict(o) for o in per_rank], outs)
    if meanwhile is not None:
        meanwhile()
    return plan, PlanChecks()


def run_locally(job: Job, checkpoint: Checkpoint, progress: bool, calibration=None, statistics=None) -> tuple:
    """Every unit, one after the other, in this process; one progress bar over the bytes.
    With `calibration`, in layer order as the calibration reaches them; with `statistics`
    (tensor -> what the method needs of it), each target given its own. Returns what the
    run adds to the reports."""
    from tqdm.auto import tqdm

    if calibration is not None:
        from .engine.sequential import run_calibrated

        total = sum(sum(output_bytes(checkpoint, s.plan, s.options)) for s in job.outputs if not s.complete)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="calibrated",
                  disable=not progress) as bar:
            record = run_calibrated(job, checkpoint, calibration, bar.update)
            bar.update(total - bar.n)
        return (("calibration", record),)

    total = sum(sum(output_bytes(checkpoint, spec.plan, spec.options)) for spec in job.outputs if not spec.complete)
    targets = len(job.outputs[0].plan.targets)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pissa", disable=not progress,
              postfix=f"0/{len(job.units)} units") as bar:
        by_index = ByIndex(statistics, job.outputs[0].plan.targets) if statistics is not None else None
        for k, unit in enumerate(job.units):
            run_unit(job, unit, progress=bar.update, statistics=by_index)
            bar.set_postfix_str(f"{k + 1}/{len(job.units)} units, {targets} targets", refresh=False)
        bar.update(total - bar.n)
    return ()
