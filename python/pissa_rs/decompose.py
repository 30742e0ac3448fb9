"""The driver: plan a decomposition, run the targets through torch one at a
time while Rust reads ahead, copies pass-through tensors and writes results."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ._pissa_rs import Checkpoint, PissaError, Pipeline, ShardWriter
from .factors import factors_at_ranks, scaling, tensor_seed
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_a_key, lora_b_key
from .quant import QUANT_TYPES, Quantization, loftq_error, qpissa_factors_at_ranks, quantization_error
from .planning import PLAN_IN_CHILD_ABOVE_BYTES, Plan, is_model_dir, make_plan, make_plan_in_child
from .targets import TargetError
from .tensors import SAFETENSORS_DTYPES, as_numpy_bytes, as_torch

ADAPTER_SUBDIR = "pissa_init"
REPORT_NAME = "pissa_report.json"
ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight files of other formats are never copied as "small files".
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
READ_AHEAD = 2  # targets prefetched ahead of the one torch works on


@dataclass
class DecomposeOptions:
    """Every choice of a decomposition, validated once; the API and the CLI share it."""

    r: int | list[int] = 128  # several ranks: one SVD at the largest, one output per rank
    lora_alpha: float | None = None  # None: equal to r, as in the PiSSA recipes
    niter: int = 4  # 0: exact SVD (PEFT "pissa"); K > 0: PEFT "pissa_niter_K"
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    seed: int = 0
    adapter_dtype: str = "float32"
    svd_rank: int | None = None  # set by for_rank: the rank of the SVD shared by all ranks
    quantize: str | None = None  # QPiSSA: "nf4", "fp4" or "int8", the quantization training will load with
    quant_iters: int = 1  # 1: plain PiSSA residual; T > 1: residual stored as deq(quant(W - s*B@A))
    double_quant: bool = False  # 4-bit: bitsandbytes' double quantization of the block absmax
    compare_loftq: bool = False  # also measure LoftQ's error at the same rank and iterations
    measure_error: bool = True  # with quantize: the nuclear-norm error reduction per weight (two full SVDs each)

    def validate(self) -> DecomposeOptions:
        ranks = list(self.r) if isinstance(self.r, (list, tuple)) else [self.r]
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"r must be a positive integer or a list of them, got {self.r!r}")
        if not ranks:
            raise ValueError("r must name at least one rank")
        self.r = sorted(set(ranks)) if isinstance(self.r, (list, tuple)) else self.r
        if self.several_ranks and self.rank_pattern:
            raise ValueError("rank_pattern cannot be combined with several ranks: give one rank per run")
        if self.lora_alpha is None and not self.several_ranks:
            self.lora_alpha = self.r
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if isinstance(self.niter, bool) or not isinstance(self.niter, int) or self.niter < 0:
            raise ValueError(f"niter must be an integer >= 0, got {self.niter!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {sorted(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                if not (isinstance(value, (int, float)) and value > 0):
                    raise ValueError(f"{name}[{key!r}] must be positive, got {value!r}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {self.quantize!r}")
        if isinstance(self.quant_iters, bool) or not isinstance(self.quant_iters, int) or self.quant_iters < 1:
            raise ValueError(f"quant_iters must be an integer >= 1, got {self.quant_iters!r}")
        if self.quantize is None and (self.quant_iters > 1 or self.compare_loftq or self.double_quant):
            raise ValueError("quant_iters, double_quant and compare_loftq need quantize ('nf4', 'fp4' or 'int8')")
        if self.compare_loftq and not self.measure_error:
            raise ValueError("compare_loftq needs measure_error: LoftQ is compared by the same measurement")
        if self.double_quant and self.quantize == "int8":
            raise ValueError("double_quant applies to 4-bit quantization, not int8")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.device(self.device)  # raises on a malformed device string
        return self

    @property
    def ranks(self) -> list[int]:
        return list(self.r) if isinstance(self.r, list) else [self.r]

    @property
    def several_ranks(self) -> bool:
        return isinstance(self.r, list) and len(self.r) > 1

    @property
    def quantization(self) -> Quantization | None:
        return Quantization(self.quantize, double_quant=self.double_quant) if self.quantize else None

    def for_rank(self, r: int) -> DecomposeOptions:
        """The options of one output of a (possibly several-rank) run."""
        alpha = self.lora_alpha if self.lora_alpha is not None else r
        return replace(self, r=r, lora_alpha=alpha, svd_rank=max(self.ranks))

    @property
    def init_lora_weights(self) -> str:
        """The PEFT init_lora_weights value this computes."""
        return "pissa" if self.niter == 0 else f"pissa_niter_{self.niter}"


class DiskSpaceError(PissaError, OSError):
    """The output would not fit on its filesystem; checked before any work."""


@dataclass
class DecomposeResult:
    out: Path  # the residual model
    adapter: Path  # OUT/pissa_init
    report: dict[str, Any]  # the contents of OUT/pissa_report.json


def default_out(path: Path, r: int) -> Path:
    """`<name>-pissa-r<r>` beside the input."""
    path = path.resolve()
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.parent / f"{stem}-pissa-r{r}"


def _output_names(checkpoint: Checkpoint, path: Path) -> set[str]:
    """Top-level names a decomposition of this checkpoint writes into OUT."""
    root = Path(checkpoint.root)
    names = {Path(os.path.relpath(f, root)).parts[0] for f in checkpoint.files}
    names |= {ADAPTER_SUBDIR, REPORT_NAME}
    if checkpoint.index_path:
        names.add(Path(checkpoint.index_path).name)
    if is_model_dir(path):
        names |= {e.name for e in root.iterdir() if e.is_file() and not e.name.endswith(WEIGHT_SUFFIXES)}
    return names


def output_bytes(checkpoint: Checkpoint, plan: Plan, adapter_dtype: str) -> tuple[int, int]:
    """(residual model, adapter) sizes in bytes: the residual has the input's
    layout exactly; the adapter holds r x in + out x r per target."""
    residual = sum(os.path.getsize(f) for f in checkpoint.files)
    itemsize = ADAPTER_DTYPES[adapter_dtype].itemsize
    adapter = sum(t.r * sum(t.shape) * itemsize for t in plan.targets)
    return residual, adapter


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(out: Path) -> int:
    """Free space on the filesystem that will hold `out` (its nearest existing ancestor)."""
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _check_space(out: Path, needed: int, overwrite: bool) -> None:
    reclaimable = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if overwrite and out.is_dir() else 0
    available = free_bytes(out) + reclaimable
    if needed > available:
        raise DiskSpaceError(
            f"{out}: the output needs {human_bytes(needed)} and its filesystem has {human_bytes(available)} free; "
            "free some space or choose another out"
        )


def _prepare_out(out: Path, checkpoint: Checkpoint, path: Path, overwrite: bool, needed: int) -> None:
    """Refuse an out that is the input, holds foreign files, or lacks room;
    then empty an earlier output (with overwrite) and create it."""
    root = Path(checkpoint.root).resolve()
    resolved = out.resolve()
    if resolved == root or root.is_relative_to(resolved):
        raise TargetError(f"{out}: the output would overwrite the input checkpoint {root}; choose another out")
    if out.exists() and not out.is_dir():
        raise TargetError(f"{out}: exists and is not a directory")
    existing = sorted(out.iterdir()) if out.is_dir() else []
    if existing:
        if not overwrite:
            raise TargetError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        # Replace an earlier output, never delete what pissa_rs did not write.
        ours = _output_names(checkpoint, path)
        foreign = [e.name for e in existing if e.name not in ours and not e.name.endswith(".partial")]
        if foreign:
            raise TargetError(
                f"{out}: holds '{foreign[0]}', which a decomposition does not write; refusing to overwrite a "
                "directory that is not a pissa_rs output"
            )
    _check_space(out, needed, overwrite)
    if existing:
        for entry in existing:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _copy_small_files(src_root: Path, out: Path) -> list[str]:
    """config.json, tokenizer files and the like: every regular file of the
    input directory that holds no weights."""
    copied = []
    for entry in sorted(src_root.iterdir()):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if entry.name.endswith(WEIGHT_SUFFIXES) or entry.name.endswith(".index.json"):
            continue
        tmp = out / f".{entry.name}.partial"
        shutil.copyfile(entry, tmp)
        os.replace(tmp, out / entry.name)
        copied.append(entry.name)
    return copied


def decompose_checkpoint(
    path: str | os.PathLike[str],
    r: int | list[int] = 128,
    *,
    out: str | os.PathLike[str] | None = None,
    lora_alpha: float | None = None,
    niter: int = 4,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    device: str | None = None,
    seed: int = 0,
    adapter_dtype: str = "float32",
    quantize: str | None = None,
    quant_iters: int = 1,
    double_quant: bool = False,
    compare_loftq: bool = False,
    measure_error: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> DecomposeResult | list[DecomposeResult]:
    """PiSSA-decompose every target weight of a safetensors checkpoint, out of core.

    With a list of ranks, each weight is read once and SVD'd once at the largest
    rank, and one complete output is written per rank (a list of results, by
    ascending rank); `out` then must contain "{r}".

    Writes the residual model to `out` (same names, dtypes and shard split as the
    input), the adapter to `out/pissa_init` and a report to `out/pissa_report.json`.
    Load it with `AutoModelForCausalLM.from_pretrained(out)` then
    `PeftModel.from_pretrained(model, out, subfolder="pissa_init", is_trainable=True)`.

    QPiSSA: `quantize` ("nf4", "fp4", "int8") names the quantization training will
    load the residual with (`load_for_training(out, quantize=...)`). The report then
    gives, per tensor, the paper's error reduction against quantizing W itself
    (QLoRA), and LoftQ's with `compare_loftq`; that costs two full SVDs per weight
    (`measure_error=False` skips it; `pissa-rs qerror` measures it later). With
    `quant_iters` T > 1 the stored residual is deq(quant(W - s*B@A)) after T
    alternations, in W's dtype.
    """
    options = DecomposeOptions(
        r=r, lora_alpha=lora_alpha, niter=niter, target_modules=target_modules, exclude_modules=exclude_modules,
        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}), use_rslora=use_rslora,
        device=device, seed=seed, adapter_dtype=adapter_dtype, quantize=quantize, quant_iters=quant_iters,
        double_quant=double_quant, compare_loftq=compare_loftq, measure_error=measure_error,
    ).validate()
    return run_decomposition(Path(path), options, out=Path(out) if out else None, overwrite=overwrite, progress=progress)


@dataclass
class _Output:
    """One output directory being written: a rank's residual model and adapter."""

    options: DecomposeOptions  # with this output's r and lora_alpha
    out: Path
    plan: Plan
    shard_writers: dict[str, ShardWriter]  # by input file
    adapter_writer: ShardWriter
    records: list[dict] = field(default_factory=list)

    @property
    def writers(self) -> list[ShardWriter]:
        return [*self.shard_writers.values(), self.adapter_writer]


def _open_output(checkpoint: Checkpoint, path: Path, options: DecomposeOptions, out: Path, plan: Plan,
                 overwrite: bool) -> _Output:
    _prepare_out(out, checkpoint, path, overwrite, needed=sum(output_bytes(checkpoint, plan, options.adapter_dtype)))
    (out / ADAPTER_SUBDIR).mkdir()
    shard_writers = writers_like(checkpoint, out)
    dtype = SAFETENSORS_DTYPES[ADAPTER_DTYPES[options.adapter_dtype]]
    specs = []
    for t in plan.targets:
        rows, cols = (t.shape[1], t.shape[0]) if t.fan_in_fan_out else t.shape
        specs += [(lora_a_key(t.module), dtype, [t.r, cols]), (lora_b_key(t.module), dtype, [rows, t.r])]
    adapter_writer = ShardWriter(out / ADAPTER_SUBDIR / ADAPTER_WEIGHTS, specs, metadata={"format": "pt"})
    return _Output(options, out, plan, shard_writers, adapter_writer)


def writers_like(checkpoint: Checkpoint, out: Path) -> dict[str, ShardWriter]:
    """One writer per input shard (keyed by input file), laid out exactly like
    it in `out`: same names, dtypes, shapes, order and metadata."""
    root = Path(checkpoint.root)
    by_file: dict[str, list] = {}
    for info in checkpoint.tensors:
        by_file.setdefault(info.file, []).append(info)
    writers = {}
    for file, infos in by_file.items():
        rel = os.path.relpath(file, root)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        writers[file] = ShardWriter(
            out / rel, [(i.name, i.dtype, list(i.shape)) for i in infos], metadata=checkpoint.file_metadata[file]
        )
    return writers


def copy_model_files(checkpoint: Checkpoint, path: Path, out: Path) -> list[str]:
    """The input's index json (same tensors and shards: the same index) and its
    small files (config, tokenizer) into `out`. Returns the small files copied."""
    if checkpoint.index_path:
        index = Path(checkpoint.index_path)
        tmp = out / f".{index.name}.partial"
        shutil.copyfile(index, tmp)
        os.replace(tmp, out / index.name)
    return _copy_small_files(Path(checkpoint.root), out) if is_model_dir(path) else []


def abandon(pipeline: Pipeline, writers, err: BaseException) -> BaseException:
    """Stop the background work and remove every temporary file after `err`.
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
        writer.abort()
    return first


def output_dirs(path: Path, ranks: list[int], out: Path | None) -> list[Path]:
    """Where each rank's output goes: `out` for one rank; for several, `out`
    must hold "{r}" (e.g. "runs/m-r{r}"); by default `<name>-pissa-r<r>`."""
    if out is None:
        return [default_out(path, r) for r in ranks]
    if len(ranks) > 1 and "{r}" not in str(out):
        raise ValueError(f"{out}: with several ranks, out must contain '{{r}}' (one directory per rank)")
    return [Path(str(out).replace("{r}", str(r))) for r in ranks]


def run_decomposition(path: Path, options: DecomposeOptions, *, out: Path | None, overwrite: bool,
                      progress: bool) -> DecomposeResult | list[DecomposeResult]:
    """Decompose once per target weight, writing one output per rank in options.ranks."""
    started = time.perf_counter()
    checkpoint = Checkpoint(path)
    per_rank = [options.for_rank(r) for r in options.ranks]
    outs = output_dirs(path, options.ranks, out)
    planner = make_plan_in_child if sum(i.nbytes for i in checkpoint.tensors) > PLAN_IN_CHILD_ABOVE_BYTES else make_plan
    plans = planner(path, [asdict(o) for o in per_rank], outs)
    outputs: list[_Output] = []
    try:
        for opts, out_dir, plan in zip(per_rank, outs, plans):
            outputs.append(_open_output(checkpoint, path, opts, out_dir, plan, overwrite))
    except BaseException:
        for output in outputs:
            for writer in output.writers:
                writer.abort()
        raise

    targets = plans[0].targets  # the same tensors at every rank
    target_names = {t.tensor for t in targets}
    copies = [(i.name, o.shard_writers[i.file], i.name) for o in outputs
              for i in checkpoint.tensors if i.name not in target_names]
    pipeline = Pipeline(checkpoint, copies)
    adapter_itemsize = ADAPTER_DTYPES[options.adapter_dtype].itemsize
    total_bytes = sum(
        sum(i.nbytes for i in checkpoint.tensors) + sum(t.r * sum(t.shape) for t in o.plan.targets) * adapter_itemsize
        for o in outputs
    )
    bar = _progress_bar(total_bytes, len(targets), enabled=progress)
    device = torch.device(options.device)
    try:
        for i, target in enumerate(targets):
            for ahead in targets[i + 1 : i + 1 + READ_AHEAD]:
                checkpoint.prefetch(ahead.tensor)
            _decompose_one(checkpoint, i, outputs, device, pipeline)
            bar.set_postfix_str(f"{i + 1}/{len(targets)} targets", refresh=False)
            bar.update(pipeline.bytes_written - bar.n)
        pipeline.close()
        while not pipeline.done:  # pass-through copies may still be running: show them too
            bar.update(pipeline.bytes_written - bar.n)
            time.sleep(0.05)
        pipeline.finish()
        bar.update(pipeline.bytes_written - bar.n)
        for output in outputs:
            for writer in output.writers:
                writer.finalize()
    except BaseException as err:
        first = abandon(pipeline, [w for o in outputs for w in o.writers], err)
        if first is err:
            raise
        raise first from err
    finally:
        bar.close()

    results = [_finish_output(checkpoint, path, o, total_bytes // len(outputs), started) for o in outputs]
    return results if options.several_ranks else results[0]


def _finish_output(checkpoint: Checkpoint, path: Path, output: _Output, total_bytes: int,
                   started: float) -> DecomposeResult:
    """Index, small files, adapter config, then the report: written last, its
    presence in OUT means every file before it is complete."""
    out = output.out
    copied = copy_model_files(checkpoint, path, out)
    atomic_write_text(out / ADAPTER_SUBDIR / ADAPTER_CONFIG, output.plan.adapter_config_json)
    report = _report(path, out, output.plan, output.options, output.records, copied, total_bytes,
                     time.perf_counter() - started)
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=1))
    return DecomposeResult(out=out, adapter=out / ADAPTER_SUBDIR, report=report)


def _progress_bar(total_bytes: int, n_targets: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="pissa",
                disable=not enabled, postfix=f"0/{n_targets} targets")


def _decompose_one(checkpoint: Checkpoint, index: int, outputs: list[_Output], device, pipeline) -> None:
    """One target weight: one SVD at the largest rank, factors and residual for
    every output, all handed to the background writer."""
    t0 = time.perf_counter()
    first = outputs[0].options
    targets = [o.plan.targets[index] for o in outputs]
    weight = as_torch(checkpoint.buffer(targets[0].tensor)).to(device)
    scales = [scaling(t.r, t.lora_alpha, first.use_rslora) for t in targets]
    ranks = [(t.r, s) for t, s in zip(targets, scales)]
    seed = tensor_seed(first.seed, targets[0].tensor)
    adapter_dtype, fan_in_fan_out = ADAPTER_DTYPES[first.adapter_dtype], targets[0].fan_in_fan_out
    quant = first.quantization
    if quant is None:
        all_factors = factors_at_ranks(weight, ranks, niter=first.niter, seed=seed, adapter_dtype=adapter_dtype,
                                       fan_in_fan_out=fan_in_fan_out)
    else:
        all_factors = qpissa_factors_at_ranks(weight, ranks, quant, first.quant_iters, niter=first.niter, seed=seed,
                                              adapter_dtype=adapter_dtype, fan_in_fan_out=fan_in_fan_out)
    seconds = time.perf_counter() - t0
    measured = [_quant_metrics(weight, f, s, t.r, first, fan_in_fan_out) if quant and first.measure_error else {}
                for f, s, t in zip(all_factors, scales, targets)]
    del weight
    for k, (output, target, scale, factors) in enumerate(zip(outputs, targets, scales, all_factors)):
        last = k == len(outputs) - 1
        pipeline.submit(output.adapter_writer, lora_a_key(target.module), as_numpy_bytes(factors.lora_A))
        pipeline.submit(output.adapter_writer, lora_b_key(target.module), as_numpy_bytes(factors.lora_B))
        # The last residual's write also releases the input's pages.
        pipeline.submit(output.shard_writers[checkpoint.info(target.tensor).file], target.tensor,
                        as_numpy_bytes(factors.residual), release=target.tensor if last else None)
        output.records.append({
            "tensor": target.tensor,
            "module": target.module,
            "shape": list(target.shape),
            "dtype": target.dtype,
            "fan_in_fan_out": target.fan_in_fan_out,
            "r": target.r,
            "lora_alpha": target.lora_alpha,
            "scale": scale,
            "singular_values": factors.singular_values.cpu().tolist(),
            "energy_kept": factors.energy_kept,
            "max_abs_error": factors.max_abs_error,
            "seconds": seconds,
            **measured[k],
        })


def _quant_metrics(weight, factors, scale: float, r: int, options: DecomposeOptions, fan_in_fan_out: bool) -> dict:
    """The paper's quantization-error numbers for one weight and rank."""
    t0 = time.perf_counter()
    quant = options.quantization
    measured = quantization_error(weight, factors.residual, factors.lora_A, factors.lora_B, scale, quant,
                                  fan_in_fan_out)
    metrics = {"quant_error": measured.error, "qlora_error": measured.qlora_error,
               "error_reduction": measured.reduction}
    if options.compare_loftq:
        loftq = loftq_error(weight, r, options.quant_iters, quant, fan_in_fan_out)
        metrics["loftq_error"] = loftq
        metrics["loftq_error_reduction"] = 1.0 - loftq / measured.qlora_error if measured.qlora_error > 0 else 0.0
    metrics["quant_metric_seconds"] = time.perf_counter() - t0
    return metrics


def _report(path, out, plan: Plan, options, records, copied, total_bytes, seconds) -> dict[str, Any]:
    opts = asdict(options)
    return {
        "input": str(Path(path).resolve()),
        "out": str(out.resolve()),
        "architecture": plan.architecture,
        "init_lora_weights": options.init_lora_weights,
        "svd_rank": options.svd_rank,  # larger than r when several ranks shared one SVD
        "options": opts,
        "totals": {
            "targets": len(records),
            "bytes_written": total_bytes,
            "seconds": seconds,
            "energy_kept_mean": sum(r["energy_kept"] for r in records) / max(len(records), 1),
            "max_abs_error": max((r["max_abs_error"] for r in records), default=0.0),
            "copied_files": copied,
            **{f"{key}_mean": sum(r[key] for r in records) / len(records)
               for key in ("error_reduction", "loftq_error_reduction") if records and key in records[0]},
        },
        "tensors": records,
    }
