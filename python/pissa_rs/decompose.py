"""The driver: plan a decomposition, run the targets through torch one at a
time while Rust reads ahead, copies pass-through tensors and writes results."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ._pissa_rs import Checkpoint, Journal, PissaError, Pipeline, ShardWriter
from .bnb_format import StoredQuantized
from .devices import DeviceRunner, parse_devices
from .hub import base_model_of, is_local, model_name, resolve_model
from .factors import factors_at_ranks, scaling, tensor_seed
from .mapping import Piece
from .model_files import ADAPTER_SUBDIR, OWN_NAMES, REPORT_NAME, copy_small_files, top_level_names
from .peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PARAM_WRAPPERS,
    adapter_shapes,
    lora_a_key,
    lora_b_key,
    param_wrappers_json,
)
from .quant import (
    QUANT_TYPES,
    Quantization,
    loftq_error,
    qpissa_factors_at_ranks,
    quantization_error,
    remember_choice,
)
from .planning import PLAN_IN_CHILD_ABOVE_BYTES, Plan, is_model_dir, make_plan, make_plan_in_child
from .resume import (
    CONTROL_FILES,
    JOURNAL,
    RECORDS,
    RUN_FILE,
    RunMismatchError,
    check_input_unchanged,
    fault_point,
    identity_difference,
    input_state,
    lock_output,
    read_identity,
    read_journal,
    read_records,
    run_identity,
)
from .targets import TargetError
from .tensors import SAFETENSORS_DTYPES, as_numpy_bytes, nbytes

ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DecomposeOptions:
    """Every choice of a decomposition, validated once; the API and the CLI share it."""

    r: int | list[int] = 128  # several ranks: one SVD at the largest, one output per rank
    lora_alpha: float | None = None  # None: equal to r, as in the PiSSA recipes
    niter: int = 4  # 0: exact SVD (PEFT "pissa"); K > 0: PEFT "pissa_niter_K"
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    # PEFT's target_parameters (MoE experts, routers), on top of what PEFT's own
    # expansion of target_modules adds on MoE models; exclude_parameters leaves some out
    target_parameters: list[str] | None = None
    exclude_parameters: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    devices: list[str] | None = None  # several devices of one type share the targets (same bytes as one)
    seed: int = 0
    adapter_dtype: str = "float32"
    svd_rank: int | None = None  # set by for_rank: the rank of the SVD shared by all ranks
    quantize: str | None = None  # QPiSSA: "nf4", "fp4" or "int8", the quantization training will load with
    quant_iters: int = 1  # 1: plain PiSSA residual; T > 1: residual stored as deq(quant(W - s*B@A))
    double_quant: bool = False  # 4-bit: bitsandbytes' double quantization of the block absmax
    compare_loftq: bool = False  # also measure LoftQ's error at the same rank and iterations
    measure_error: bool = True  # with quantize: the nuclear-norm error reduction per weight (two full SVDs each)
    save_quantized: bool = False  # with quantize: the residual stored in bitsandbytes' serialized format
    keep_source_format: bool = False  # an FP8 source: the residual re-quantized to its block-scaled FP8

    def validate(self) -> DecomposeOptions:
        ranks = list(self.r) if isinstance(self.r, (list, tuple)) else [self.r]
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"r must be a positive integer or a list of them, got {self.r!r}")
        if not ranks:
            raise ValueError("r must name at least one rank")
        self.r = sorted(set(ranks)) if isinstance(self.r, (list, tuple)) else self.r
        for name in ("target_parameters", "exclude_parameters"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if value is not None and not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a list of parameter names or suffixes, got {value!r}")
            setattr(self, name, sorted(set(value)) if value else None)
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
        if self.save_quantized and self.quantize is None:
            raise ValueError("save_quantized needs quantize ('nf4', 'fp4' or 'int8'): the format to store")
        if self.keep_source_format and self.save_quantized:
            raise ValueError("keep_source_format and save_quantized name two formats for one residual: choose one")
        if self.double_quant and self.quantize == "int8":
            raise ValueError("double_quant applies to 4-bit quantization, not int8")
        if self.devices is not None:
            if self.device is not None:
                raise ValueError("give device or devices, not both")
            self.devices = [str(d) for d in parse_devices(list(self.devices))]
            self.device = self.devices[0]
        else:
            if self.device is None:
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = str(parse_devices([self.device])[0])
        return self

    @property
    def torch_devices(self) -> list[torch.device]:
        return [torch.device(d) for d in (self.devices or [self.device])]

    def identity_options(self) -> dict[str, Any]:
        """The options as a resumed run must match them: which devices (and how
        many) does not change the bytes, the kind of device (CPU or GPU) does."""
        options = asdict(self)
        del options["devices"]
        options["device"] = torch.device(self.device).type
        return options

    @property
    def ranks(self) -> list[int]:
        return list(self.r) if isinstance(self.r, list) else [self.r]

    @property
    def several_ranks(self) -> bool:
        return isinstance(self.r, list) and len(self.r) > 1

    @property
    def quantization(self) -> Quantization | None:
        return Quantization(self.quantize, double_quant=self.double_quant) if self.quantize else None

    @property
    def stored_quantization(self) -> Quantization | None:
        """The quantization the residual is stored in (save_quantized), else None."""
        return self.quantization if self.save_quantized else None

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
    status: str = "fresh"  # "fresh", "resumed" (an interrupted run finished) or "complete" (nothing left to do)


def reported_options(out: Path) -> dict[str, Any]:
    """The options OUT's report records; {} when it has no report (unfinished or not ours)."""
    report = out / REPORT_NAME
    return json.loads(report.read_text()).get("options", {}) if report.is_file() else {}


def stored_quantized(out: Path) -> tuple[Quantization | None, dict[str, StoredQuantized]]:
    """For an OUT written with save_quantized: the quantization its residual is
    stored in and, by original tensor name, every weight stored that way; else (None, {})."""
    report = out / REPORT_NAME
    if not report.is_file():
        return None, {}
    data = json.loads(report.read_text())
    options = data.get("options", {})
    if not options.get("save_quantized"):
        return None, {}
    quant = Quantization(options["quantize"], double_quant=options.get("double_quant", False))
    return quant, {name: StoredQuantized.from_record(name, r) for name, r in data.get("stored_quantized", {}).items()}


def made_for_double_quant(out: Path, quantize: str | None) -> bool:
    """Whether OUT was decomposed for `quantize` with double quantization (its report says so)."""
    options = reported_options(out)
    return bool(options.get("double_quant")) and options.get("quantize") == quantize


def resolve_source(path: str | os.PathLike[str], revision: str | None, out: Path | None, ranks: list[int],
                   headers_only: bool = False) -> tuple[Path, Path | None]:
    """The checkpoint to read (a local path as it is, or a Hub model ID's snapshot in
    the Hugging Face cache; with `headers_only`, for a dry run, stand-ins holding only
    the shards' headers when the weights are not cached) and the output directory: for
    an ID, by default `./<name>-pissa-r<r>` in the current directory."""
    source = resolve_model(path, revision, headers_only=headers_only)
    if out is None and not is_local(path):
        name = model_name(path)
        out = Path.cwd() / (f"{name}-pissa-r{ranks[0]}" if len(ranks) == 1 else f"{name}-pissa-r{{r}}")
    return source, out


def default_out(path: Path, r: int) -> Path:
    """`<name>-pissa-r<r>` beside the input."""
    path = path.resolve()
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.parent / f"{stem}-pissa-r{r}"


def _output_names(checkpoint: Checkpoint, path: Path) -> set[str]:
    """Top-level names a decomposition of this checkpoint writes into OUT."""
    root = Path(checkpoint.root)
    names = {Path(os.path.relpath(f, root)).parts[0] for f in checkpoint.files}
    names |= {*OWN_NAMES, *CONTROL_FILES}
    if checkpoint.index_path:
        names.add(Path(checkpoint.index_path).name)
    if is_model_dir(path):
        names |= top_level_names(root)
    return names


def output_bytes(checkpoint: Checkpoint, plan: Plan, options: DecomposeOptions) -> tuple[int, int]:
    """(residual model, adapter) sizes in bytes: the residual has the input's
    layout (less what is stored pre-quantized, plus its quantized form); the
    adapter holds r x in + out x r per target."""
    residual = residual_bytes(checkpoint, plan.stored_parts(options.stored_quantization))
    adapter_dtype = options.adapter_dtype
    itemsize = ADAPTER_DTYPES[adapter_dtype].itemsize
    adapter = sum(t.r * sum(t.shape) * itemsize for t in plan.targets)
    return residual, adapter


def residual_bytes(checkpoint: Checkpoint, stored_as: dict[str, list[tuple[str, str, list[int]]]]) -> int:
    """Bytes of a residual model laid out like the input, but for the tensors `stored_as`
    maps to the tensors they are stored as (see writers_like)."""
    total = sum(os.path.getsize(f) for f in checkpoint.files)
    for tensor, parts in stored_as.items():
        total += sum(nbytes(dtype, shape) for _, dtype, shape in parts) - checkpoint.info(tensor).nbytes
    return total


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def nearest_existing(out: Path) -> Path:
    """`out` or its nearest ancestor that exists: where `out` would be created."""
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    return probe


def free_bytes(out: Path) -> int:
    """Free space on the filesystem that will hold `out` (its nearest existing ancestor)."""
    return shutil.disk_usage(nearest_existing(out)).free


def _check_space(out: Path, needed: int, reclaim: bool) -> None:
    """`reclaim`: files already in `out` (an earlier output being replaced, or an
    interrupted run's preallocated files) count as space."""
    reclaimable = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if reclaim and out.is_dir() else 0
    available = free_bytes(out) + reclaimable
    if needed > available:
        raise DiskSpaceError(
            f"{out}: the output needs {human_bytes(needed)} and its filesystem has {human_bytes(available)} free; "
            "free some space or choose another out"
        )


def _prepare_out(out: Path, checkpoint: Checkpoint, path: Path, overwrite: bool, needed: int,
                 identity: dict[str, Any]) -> tuple[int, str]:
    """Refuse an out that is the input, holds foreign files or another run's
    output, or lacks room; lock it. Returns (lock fd, state): "fresh" (emptied,
    ready), "resume" (an interrupted run of the same inputs and options) or
    "complete" (that run already finished)."""
    check_out_apart(out, checkpoint, path)
    if out.exists() and not out.is_dir():
        raise TargetError(f"{out}: exists and is not a directory")
    created = not out.exists()
    make_out_dir(out)
    fd = lock_output(out)
    try:
        old = read_identity(out, REPORT_NAME)
        if old is not None and not overwrite:
            difference = identity_difference(old, identity)
            if difference:
                raise RunMismatchError(
                    f"{out}: holds a run of other inputs or options ({difference}); pass overwrite=True "
                    "(--overwrite) to replace it"
                )
            if (out / REPORT_NAME).is_file():
                return fd, "complete"
            _check_space(out, needed, reclaim=True)
            return fd, "resume"
        existing = sorted(out.iterdir())
        if existing:
            # Replace an earlier output, never delete what pissa_rs did not write.
            ours = _output_names(checkpoint, path)
            foreign = [e.name for e in existing if e.name not in ours and not e.name.endswith(".partial")]
            if foreign:
                raise TargetError(
                    f"{out}: exists and holds '{foreign[0]}', which a decomposition does not write: it is not a "
                    "pissa_rs output, and overwrite (--overwrite) replaces only those; choose another out"
                )
            if not overwrite:
                raise TargetError(f"{out}: exists and holds an earlier pissa_rs output; pass overwrite=True "
                                  "(--overwrite) to replace it, or choose another out")
        _check_space(out, needed, reclaim=overwrite)
        for entry in existing:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        atomic_write_text(out / RUN_FILE, json.dumps(identity, indent=1))
        return fd, "fresh"
    except BaseException:
        os.close(fd)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_out_apart(out: Path, checkpoint: Checkpoint, path: Path) -> None:
    """Refuse an output that is the input's folder, holds it, or (a model folder) lies
    inside it: shards written into a model's own folder damage it for every tool."""
    root, resolved = Path(checkpoint.root).resolve(), out.resolve()
    if resolved == root or root.is_relative_to(resolved):
        raise TargetError(f"{out}: the output would overwrite the input checkpoint {root}; choose another out")
    if is_model_dir(path) and resolved.is_relative_to(root):
        raise TargetError(f"{out}: the output would be inside the input model's folder {root}; choose an out "
                          "outside it")


def make_out_dir(out: Path) -> None:
    """mkdir -p, with an error that says what was being done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TargetError(f"{out}: cannot create the output directory: {err.strerror or err}") from None


def out_dir_problem(out: Path) -> str | None:
    """Why `out` could not be created or written (a dry run's check, leaving nothing
    behind), or None: a directory is made and removed in its nearest existing ancestor."""
    probe = nearest_existing(out)
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pissa-rs-probe-", dir=probe))
    except OSError as err:
        return f"cannot create a directory in {probe}: {err.strerror or err}"
    return None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def decompose_checkpoint(
    path: str | os.PathLike[str],
    r: int | list[int] = 128,
    *,
    out: str | os.PathLike[str] | None = None,
    lora_alpha: float | None = None,
    niter: int = 4,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    target_parameters: list[str] | None = None,
    exclude_parameters: list[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    device: str | None = None,
    devices: list[str] | None = None,
    seed: int = 0,
    adapter_dtype: str = "float32",
    quantize: str | None = None,
    quant_iters: int = 1,
    double_quant: bool = False,
    compare_loftq: bool = False,
    measure_error: bool = True,
    save_quantized: bool = False,
    keep_source_format: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DecomposeResult | list[DecomposeResult]:
    """PiSSA-decompose every target weight of a safetensors checkpoint, out of core.

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
    options = DecomposeOptions(
        r=r, lora_alpha=lora_alpha, niter=niter, target_modules=target_modules, exclude_modules=exclude_modules,
        target_parameters=list(target_parameters) if target_parameters else None,
        exclude_parameters=list(exclude_parameters) if exclude_parameters else None,
        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}), use_rslora=use_rslora,
        device=device, devices=list(devices) if devices is not None else None, seed=seed,
        adapter_dtype=adapter_dtype, quantize=quantize, quant_iters=quant_iters, double_quant=double_quant,
        compare_loftq=compare_loftq, measure_error=measure_error, save_quantized=save_quantized,
        keep_source_format=keep_source_format,
    ).validate()
    source, out = resolve_source(path, revision, Path(out) if out else None, options.ranks)
    return run_decomposition(source, options, out=out, overwrite=overwrite, progress=progress,
                             origin=base_model_of(path, revision))


@dataclass
class Assembly:
    """A tensor made of several experts' results (a layer's lora_A / lora_B over all its
    experts; a residual tensor holding all of a layer's experts): kept on the host until
    every part arrived, then written whole. Bounded by one layer's experts."""

    data: torch.Tensor
    missing: int  # parts still to come

    def put(self, fill) -> bool:
        """Fill one part (fill(data)); True when the tensor is complete."""
        fill(self.data)
        self.missing -= 1
        return self.missing == 0


@dataclass
class _Output:
    """One output directory being written: a rank's residual model and adapter."""

    options: DecomposeOptions  # with this output's r and lora_alpha
    out: Path
    plan: Plan
    status: str  # "fresh", "resumed" or "complete"
    lock_fd: int
    shard_writers: dict[str, ShardWriter | None] = field(default_factory=dict)  # by input file; None: finalized
    adapter_writer: ShardWriter | None = None
    pending: set[tuple[str, str]] = field(default_factory=set)  # (final path, tensor) still to write
    earlier_records: dict[str, dict] = field(default_factory=dict)  # from an interrupted run, by tensor
    records_file: Any = None
    records: list[dict] = field(default_factory=list)
    # tensors written only once every expert in them is done: (writer path, name) -> Assembly
    assembling: dict[tuple[str, str], Assembly] = field(default_factory=dict)
    out_tensors: dict[str, tuple[ShardWriter, int]] = field(default_factory=dict)  # residual tensor -> writer, bytes

    @property
    def writers(self) -> list[ShardWriter]:
        return [w for w in [*self.shard_writers.values(), self.adapter_writer] if w is not None]

    def out_tensor(self, name: str) -> tuple[ShardWriter | None, int]:
        """The writer of an output tensor of the residual and its size (None: already complete)."""
        return self.out_tensors.get(name, (None, 0))

    def plan_bytes(self, checkpoint: Checkpoint) -> int:
        """Bytes this output holds: the residual model and the adapter."""
        return sum(output_bytes(checkpoint, self.plan, self.options))

    def pending_bytes(self) -> int:
        return sum(end - start for w in self.writers for name, start, end in w.ranges() if (w.path, name) in self.pending)

    def needs(self, writer: ShardWriter | None, tensor: str) -> bool:
        return writer is not None and (writer.path, tensor) in self.pending

    def record(self, record: dict) -> None:
        """Keep a target's report record, and journal it for a resumed run."""
        self.records.append(record)
        self.records_file.write(json.dumps(record) + "\n")
        self.records_file.flush()

    def close(self) -> None:
        if self.records_file is not None:
            self.records_file.close()
        os.close(self.lock_fd)


def _open_output(checkpoint: Checkpoint, path: Path, options: DecomposeOptions, out: Path, plan: Plan,
                 overwrite: bool, identity: dict[str, Any]) -> _Output:
    fd, state = _prepare_out(out, checkpoint, path, overwrite,
                             needed=sum(output_bytes(checkpoint, plan, options)), identity=identity)
    output = _Output(options, out, plan, {"fresh": "fresh", "resume": "resumed"}.get(state, state), fd)
    if state == "complete":
        return output
    try:
        resume = state == "resume"
        journal = Journal(out / JOURNAL)
        (out / ADAPTER_SUBDIR).mkdir(exist_ok=True)
        output.shard_writers = writers_like(checkpoint, out, journal=journal, resume=resume,
                                            stored_as=plan.stored_parts(options.stored_quantization))
        output.out_tensors = {n: (w, end - start) for w in output.shard_writers.values() if w is not None
                              for n, start, end in w.ranges()}
        dtype = SAFETENSORS_DTYPES[ADAPTER_DTYPES[options.adapter_dtype]]
        specs = [(key, dtype, list(shape)) for key, shape in adapter_shapes(plan.targets)]
        adapter_path = out / ADAPTER_SUBDIR / ADAPTER_WEIGHTS
        if not (resume and adapter_path.is_file()):
            output.adapter_writer = ShardWriter(adapter_path, specs, metadata={"format": "pt"}, journal=journal,
                                                resume=resume)
        if resume:
            _adopt_journaled(output, out)
            output.earlier_records = read_records(out)
        output.pending = {(w.path, name) for w in output.writers for name in w.missing()}
        output.records_file = open(out / RECORDS, "a")
    except BaseException:
        for writer in output.writers:
            writer.suspend()
        output.close()
        raise
    return output


def _adopt_journaled(output: _Output, out: Path) -> None:
    """Take back every tensor an interrupted run wrote whose bytes still match
    the journal's checksum (the last line for a tensor wins)."""
    writers = {w.path: w for w in output.writers}
    missing = {path: set(w.missing()) for path, w in writers.items()}
    latest = {(line["file"], line["tensor"]): line["crc32"] for line in read_journal(out)}
    for (file, tensor), crc in latest.items():
        if tensor in missing.get(file, ()):
            writers[file].adopt(tensor, crc)


def writers_like(checkpoint: Checkpoint, out: Path, journal: Journal | None = None,
                 resume: bool = False, stored_as: dict[str, list[tuple[str, str, list[int]]]] | None = None
                 ) -> dict[str, ShardWriter | None]:
    """One writer per input shard (keyed by input file), laid out exactly like
    it in `out`: same names, dtypes, shapes, order and metadata, but for the
    tensors `stored_as` maps to the tensors they are stored as instead. Resuming,
    a shard already under its final name is complete (it got there by an atomic
    rename): its writer is None."""
    stored_as = stored_as or {}
    root = Path(checkpoint.root)
    by_file: dict[str, list] = {}
    for info in checkpoint.tensors:
        by_file.setdefault(info.file, []).append(info)
    writers = {}
    for file, infos in by_file.items():
        rel = os.path.relpath(file, root)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if resume and (out / rel).is_file():
            writers[file] = None
            continue
        specs = [spec for i in infos for spec in stored_as.get(i.name, [(i.name, i.dtype, list(i.shape))])]
        writers[file] = ShardWriter(
            out / rel, specs, metadata=checkpoint.file_metadata[file],
            journal=journal, resume=resume,
        )
    return writers


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


def output_dirs(path: Path, ranks: list[int], out: Path | None) -> list[Path]:
    """Where each rank's output goes: `out` for one rank; for several, `out`
    must hold "{r}" (e.g. "runs/m-r{r}"); by default `<name>-pissa-r<r>`."""
    if out is None:
        return [default_out(path, r) for r in ranks]
    if len(ranks) > 1 and "{r}" not in str(out):
        raise ValueError(f"{out}: with several ranks, out must contain '{{r}}' (one directory per rank)")
    return [Path(str(out).replace("{r}", str(r))) for r in ranks]


def run_decomposition(path: Path, options: DecomposeOptions, *, out: Path | None, overwrite: bool,
                      progress: bool, origin: dict[str, str | None] | None = None
                      ) -> DecomposeResult | list[DecomposeResult]:
    """Decompose once per target weight, writing one output per rank in options.ranks.

    An output left by an interrupted run of the same inputs and options is resumed:
    finished shards are kept, and so is every tensor of an unfinished one whose bytes
    match the journal's checksum; the rest is recomputed (per-tensor seeds make the
    result byte-identical to an uninterrupted run). `origin` names the original model in
    the report (base_model_of; default: `path`)."""
    started = time.perf_counter()
    checkpoint = Checkpoint(path)
    inputs = input_state(checkpoint)
    per_rank = [options.for_rank(r) for r in options.ranks]
    outs = output_dirs(path, options.ranks, out)
    planner = make_plan_in_child if sum(i.nbytes for i in checkpoint.tensors) > PLAN_IN_CHILD_ABOVE_BYTES else make_plan
    plans = planner(path, [asdict(o) for o in per_rank], outs)
    if options.quantization is not None and plans[0].quantizer is not None:
        remember_choice(options.quantization, torch.device(options.device).type, plans[0].quantizer)
    outputs: list[_Output] = []
    try:
        for opts, out_dir, plan in zip(per_rank, outs, plans):
            identity = run_identity(path, opts.identity_options(), inputs)
            outputs.append(_open_output(checkpoint, path, opts, out_dir, plan, overwrite, identity))
    except BaseException:
        for output in outputs:
            for writer in output.writers:
                writer.suspend()
            output.close()
        raise
    try:
        _run(checkpoint, path, options, outputs, inputs, progress)
        origin = origin or base_model_of(path, None)
        results = [_finish_output(checkpoint, path, o, started, origin) for o in outputs]
    finally:
        for output in outputs:
            output.close()
    return results if options.several_ranks else results[0]


def _run(checkpoint: Checkpoint, path: Path, options: DecomposeOptions, outputs: list[_Output],
         inputs: list[dict], progress: bool) -> None:
    """Every target through torch, every pass-through tensor copied, then each
    shard finalized; on any failure or Ctrl-C the temporary files and journals
    stay for the next run to resume."""
    active = [o for o in outputs if o.status != "complete"]
    if not active:
        return
    targets = outputs[0].plan.targets  # the same tensors at every rank
    reads = [t.weight_read(checkpoint) for t in targets]
    target_names = {p.tensor for read in reads for p in read.pieces}
    # save_quantized: weights that are not targets but are stored quantized (work after the targets)
    quant = options.stored_quantization
    stored = {w.tensor: w for w in outputs[0].plan.stored_quantized} if quant else {}
    quantize_only = [w for w in stored.values() if w.tensor not in target_names]
    copies = [(i.name, o.shard_writers[i.file], i.name) for o in active for i in checkpoint.tensors
              if i.name not in target_names and i.name not in stored and o.needs(o.shard_writers[i.file], i.name)]
    pipeline = Pipeline(checkpoint, copies)
    bar = _progress_bar(sum(o.plan_bytes(checkpoint) for o in active), len(targets), enabled=progress)
    bar.update(sum(o.plan_bytes(checkpoint) - o.pending_bytes() for o in active))
    done_before = bar.n
    work = [(i, t.tensor if t.read is None else t.read) for i, t in enumerate(targets)
            if any(_needs_target(o, i, checkpoint) for o in active)]
    for o in active:
        _start_assemblies(o, checkpoint, {i for i, _ in work})
    work += [(len(targets) + k, w.tensor) for k, w in enumerate(quantize_only)
             if any(_needs_parts(o, checkpoint, w.tensor, w.parts(quant)) for o in active)]

    def compute(i, weight, to_host):
        if i < len(targets):
            return _compute_target(i, weight, outputs, to_host)
        return [(name, to_host(t)) for name, t in quantize_only[i - len(targets)].serialize(weight, quant)]

    runner = None
    try:
        runner = DeviceRunner(checkpoint, work, options.torch_devices, compute=compute)
        results = runner.results()
        computed = {i for i, _ in work}
        for i, target in enumerate(targets):
            if i in computed:
                index, per_output = next(results)
                assert index == i, (index, i)
                _write_target(checkpoint, i, outputs, per_output, pipeline)
                check_input_unchanged(inputs)
                fault_point("target")
            else:
                for o in active:
                    o.records.append(o.earlier_records[target.tensor])
            bar.set_postfix_str(f"{i + 1}/{len(targets)} targets", refresh=False)
            bar.update(done_before + pipeline.bytes_written - bar.n)
        for index, parts in results:  # the weights only quantized
            file = checkpoint.info(quantize_only[index - len(targets)].tensor).file
            for o in active:
                _submit_parts(o, o.shard_writers[file], parts, pipeline)
            check_input_unchanged(inputs)
            bar.update(done_before + pipeline.bytes_written - bar.n)
        runner.close()
        pipeline.close()
        while not pipeline.done:  # pass-through copies may still be running: show them too
            bar.update(done_before + pipeline.bytes_written - bar.n)
            time.sleep(0.05)
        pipeline.finish()
        checkpoint.release_all()  # what page boundaries kept of the input, headers included
        bar.update(done_before + pipeline.bytes_written - bar.n)
        check_input_unchanged(inputs)
        for output in active:
            for writer in output.writers:
                writer.finalize()
                fault_point("finalize")
    except BaseException as err:
        if runner is not None:
            runner.close()
        first = abandon(pipeline, [w for o in active for w in o.writers], err, keep=True)
        if first is err:
            raise
        raise first from err
    finally:
        bar.close()


def _needs_target(output: _Output, index: int, checkpoint: Checkpoint) -> bool:
    """Whether any part of target `index` is still to be written into `output`
    (or its report record was lost)."""
    t = output.plan.targets[index]
    if t.read is not None:  # an expert, or a weight stored in FP8 / MXFP4: its residual's own tensors
        needed = any(output.needs(output.out_tensor(p.tensor)[0], p.tensor) for p in t.read.written)
    else:
        parts = output.plan.stored_parts(output.options.stored_quantization).get(t.tensor, [(t.tensor, None, None)])
        needed = _needs_parts(output, checkpoint, t.tensor, parts)
    return (t.tensor not in output.earlier_records or needed
            or output.needs(output.adapter_writer, lora_a_key(t.module))
            or output.needs(output.adapter_writer, lora_b_key(t.module)))


def _start_assemblies(output: _Output, checkpoint: Checkpoint, computed: set[int]) -> None:
    """The tensors of `output` that several computed targets fill: each layer's adapter
    over its experts, and residual tensors that hold several experts. Only those still to
    be written; every target that fills one is computed (_needs_target sees to it)."""
    adapter_dtype = ADAPTER_DTYPES[output.options.adapter_dtype]
    shapes = dict(adapter_shapes(output.plan.targets))
    for i, t in enumerate(output.plan.targets):
        if i not in computed or output.status == "complete":
            continue
        if t.num_experts > 1:
            for key in (lora_a_key(t.module), lora_b_key(t.module)):
                if output.needs(output.adapter_writer, key):
                    slot = output.assembling.setdefault(
                        (output.adapter_writer.path, key), Assembly(torch.empty(shapes[key], dtype=adapter_dtype), 0))
                    slot.missing += 1
        for piece in t.read.written if t.read is not None else ():
            writer, size = output.out_tensor(piece.tensor)
            if (piece.start, piece.end) != (0, size) and output.needs(writer, piece.tensor):
                slot = output.assembling.setdefault((writer.path, piece.tensor),
                                                    Assembly(torch.empty(size, dtype=torch.uint8), 0))
                slot.missing += 1


def _needs_parts(output: _Output, checkpoint: Checkpoint, tensor: str, parts: list[tuple]) -> bool:
    """Whether any tensor the input `tensor` is stored as is still to be written into `output`."""
    writer = output.shard_writers[checkpoint.info(tensor).file]
    return any(output.needs(writer, name) for name, *_ in parts)


def _submit_parts(output: _Output, writer: ShardWriter | None, parts: list[tuple[str, torch.Tensor]],
                  pipeline: Pipeline) -> None:
    # Parts an interrupted run already wrote are not written again (they are these bytes).
    for name, tensor in parts:
        if output.needs(writer, name):
            pipeline.submit(writer, name, as_numpy_bytes(tensor))


def _finish_output(checkpoint: Checkpoint, path: Path, output: _Output, started: float,
                   origin: dict[str, str | None]) -> DecomposeResult:
    """Index, small files, adapter config, then the report: written last, its
    presence in OUT means every file before it is complete. The journals go after."""
    out = output.out
    if output.status == "complete":
        report = json.loads((out / REPORT_NAME).read_text())
        return DecomposeResult(out=out, adapter=out / ADAPTER_SUBDIR, report=report, status="complete")
    copied = copy_model_files(checkpoint, path, out)
    if output.options.save_quantized:
        _describe_quantized_storage(checkpoint, out, output)
    elif output.plan.source_as:  # an FP8 / MXFP4 source: the residual's tensors and config say what they are now
        write_index_like(checkpoint, out, output.plan.source_as)
        set_quantization_config(out, output.plan.source_quantization_config)
    wrappers = param_wrappers_json(output.plan.targets)
    if wrappers is not None:
        atomic_write_text(out / ADAPTER_SUBDIR / PARAM_WRAPPERS, wrappers)
    atomic_write_text(out / ADAPTER_SUBDIR / ADAPTER_CONFIG, output.plan.adapter_config_json)
    report = _report(path, out, output.plan, output.options, output.records, copied,
                     output.plan_bytes(checkpoint), time.perf_counter() - started, origin)
    report["run"] = read_identity(out, REPORT_NAME)  # what a rerun compares itself with
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=1))
    for name in (JOURNAL, RECORDS, RUN_FILE):
        (out / name).unlink(missing_ok=True)
    return DecomposeResult(out=out, adapter=out / ADAPTER_SUBDIR, report=report, status=output.status)


def _describe_quantized_storage(checkpoint: Checkpoint, out: Path, output: _Output) -> None:
    """A pre-quantized residual: its index names the tensors as stored, and
    config.json carries the quantization_config transformers loads it with."""
    write_index_like(checkpoint, out, output.plan.stored_parts(output.options.stored_quantization))
    set_quantization_config(out, output.plan.quantization_config)


def write_index_like(checkpoint: Checkpoint, out: Path, stored_as: dict[str, list[tuple[str, str, list[int]]]]
                     ) -> None:
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


def _progress_bar(total_bytes: int, n_targets: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="pissa",
                disable=not enabled, postfix=f"0/{n_targets} targets")


@dataclass
class _Computed:
    """One target's result for one output, on the host."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    residual_parts: list[tuple[str, torch.Tensor]]  # the residual, or its pre-quantized form (save_quantized)
    record: dict[str, Any]
    pieces: list[tuple[Piece, torch.Tensor]] = field(default_factory=list)  # an expert's residual: its bytes per piece


def _compute_target(index: int, weight: torch.Tensor, outputs: list[_Output], to_host) -> list[_Computed | None]:
    """One target weight (on its device, in its stored dtype): one SVD at the
    largest rank, factors, residual and report record for every output still
    being written (None for a complete one). Runs on a device's worker thread."""
    t0 = time.perf_counter()
    first = outputs[0].options
    targets = [o.plan.targets[index] for o in outputs]
    scales = [scaling(t.r, t.lora_alpha, first.use_rslora) for t in targets]
    ranks = [(t.r, s) for t, s in zip(targets, scales)]
    seed = tensor_seed(first.seed, targets[0].tensor)
    adapter_dtype, fan_in_fan_out = ADAPTER_DTYPES[first.adapter_dtype], targets[0].fan_in_fan_out
    # Parameters PEFT wraps (experts, routers) stay unquantized when transformers loads
    # with bitsandbytes: plain PiSSA for them, whatever the quantization.
    quant = first.quantization if targets[0].quantized else None
    stored = next((w for w in outputs[0].plan.stored_quantized if w.tensor == targets[0].tensor), None)
    if quant is None:
        all_factors = factors_at_ranks(weight, ranks, niter=first.niter, seed=seed, adapter_dtype=adapter_dtype,
                                       fan_in_fan_out=fan_in_fan_out)
    else:
        all_factors = qpissa_factors_at_ranks(weight, ranks, quant, first.quant_iters, niter=first.niter, seed=seed,
                                              adapter_dtype=adapter_dtype, fan_in_fan_out=fan_in_fan_out)
    seconds = time.perf_counter() - t0
    computed: list[_Computed | None] = []
    for output, target, scale, factors in zip(outputs, targets, scales, all_factors):
        if output.status == "complete":
            computed.append(None)
            continue
        measured = (_quant_metrics(weight, factors, scale, target.r, first, fan_in_fan_out)
                    if quant and first.measure_error else {})
        record = {
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
            **target.as_record(),
            **measured,
        }
        pieces = []
        if target.read is not None:  # its bytes go where the read says, piece by piece
            if target.read.decode is not None and first.keep_source_format:
                # back in the source's FP8, re-quantized; what re-quantizing costs, measured
                flat = target.read.decode.encode(factors.residual)
                if first.measure_error:
                    record.update(_requant_metrics(weight, target.read.decode(flat), factors, scale,
                                                   target.fan_in_fan_out))
            else:
                flat = factors.residual.reshape(-1).view(torch.uint8)
            flat, offset, parts = to_host(flat), 0, []
            for piece in target.read.written:
                pieces.append((piece, flat[offset: offset + piece.end - piece.start]))
                offset += piece.end - piece.start
        elif first.save_quantized and stored is not None:
            parts = [(name, to_host(t)) for name, t in stored.serialize(factors.residual, quant)]
        else:
            parts = [(target.tensor, to_host(factors.residual))]
        computed.append(_Computed(to_host(factors.lora_A), to_host(factors.lora_B), parts, record, pieces))
    return computed


def _write_target(checkpoint: Checkpoint, index: int, outputs: list[_Output], computed: list[_Computed | None],
                  pipeline: Pipeline) -> None:
    """Hand one target's results to the background writer and record them."""
    for output, result in zip(outputs, computed):
        if result is None:
            continue
        target = output.plan.targets[index]
        a_key, b_key = lora_a_key(target.module), lora_b_key(target.module)
        if target.num_experts > 1:  # PEFT's ParamWrapper layout: expert e's rows of A, every E-th column of B
            r, e, experts = target.r, target.expert, target.num_experts
            _assemble(output, output.adapter_writer, a_key, pipeline,
                      lambda a: a[e * r: (e + 1) * r].copy_(result.lora_A))
            _assemble(output, output.adapter_writer, b_key, pipeline,
                      lambda b: b.view(b.shape[0], r, experts)[:, :, e].copy_(result.lora_B))
        else:
            # Parts an interrupted run already wrote are not written again (they are these bytes).
            if output.needs(output.adapter_writer, a_key):
                pipeline.submit(output.adapter_writer, a_key, as_numpy_bytes(result.lora_A))
            if output.needs(output.adapter_writer, b_key):
                pipeline.submit(output.adapter_writer, b_key, as_numpy_bytes(result.lora_B))
        for piece, data in result.pieces:
            writer, size = output.out_tensor(piece.tensor)
            if (piece.start, piece.end) == (0, size):
                _submit_parts(output, writer, [(piece.tensor, data)], pipeline)
            else:
                _assemble(output, writer, piece.tensor, pipeline,
                          lambda whole: whole[piece.start: piece.end].copy_(data))
        if result.residual_parts:
            _submit_parts(output, output.shard_writers[checkpoint.info(target.tensor).file], result.residual_parts,
                          pipeline)
        output.record(result.record)


def _assemble(output: _Output, writer: ShardWriter | None, name: str, pipeline: Pipeline, fill) -> None:
    """One part of a tensor several targets fill; written once complete. Nothing to
    do for a tensor an interrupted run already wrote."""
    slot = output.assembling.get((writer.path, name)) if writer is not None else None
    if slot is not None and slot.put(fill):
        del output.assembling[(writer.path, name)]
        pipeline.submit(writer, name, as_numpy_bytes(slot.data))


def _requant_metrics(weight, stored, factors, scale: float, fan_in_fan_out: bool) -> dict:
    """keep_source_format: the paper's nuclear-norm error of W - (deq(quant(W_res)) + s*B@A),
    and that relative to ||W||_* (re-quantizing W itself gives W back: it is FP8 already)."""
    w = weight.float()
    delta = (scale * factors.lora_B.float()) @ factors.lora_A.float()
    delta = delta.T if fan_in_fan_out else delta
    nuclear = lambda m: torch.linalg.svdvals(m).sum().item()  # noqa: E731
    error = nuclear(w - (stored.float() + delta))
    return {"requant_error": error, "requant_error_relative": error / max(nuclear(w), 1e-30)}


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


def _report(path, out, plan: Plan, options, records, copied, total_bytes, seconds, origin) -> dict[str, Any]:
    opts = asdict(options)
    return {
        "input": str(Path(path).resolve()),
        "out": str(out.resolve()),
        "base_model": origin,  # what a LoRA converted from this adapter applies to (base_model_of)
        "architecture": plan.architecture,
        **({"config_note": plan.config_note} if plan.config_note else {}),
        "init_lora_weights": options.init_lora_weights,
        "svd_rank": options.svd_rank,  # larger than r when several ranks shared one SVD
        "options": opts,
        # what target_modules picked (PEFT's expansion included) that was not decomposed, and why
        "left_out": [{"name": name, "why": why} for name, why in plan.left_out],
        "rank_limited": list(plan.rank_limited),  # decomposed at their smaller dimension, below r
        **({"source_format": plan.source_format, "source_as": plan.source_as} if plan.source_as else {}),
        **({"quantizer": options.quantization.choice(options.device).as_record()} if options.quantize else {}),
        **({"stored_quantized": {w.tensor: w.as_record() for w in plan.stored_quantized}}
           if options.save_quantized else {}),
        "totals": {
            "targets": len(records),
            "bytes_written": total_bytes,
            "seconds": seconds,
            "energy_kept_mean": sum(r["energy_kept"] for r in records) / max(len(records), 1),
            "max_abs_error": max((r["max_abs_error"] for r in records), default=0.0),
            "copied_files": copied,
            # over the weights bitsandbytes quantizes (experts and routers are not)
            **{f"{key}_mean": sum(measured) / len(measured)
               for key in ("error_reduction", "loftq_error_reduction")
               for measured in [[r[key] for r in records if key in r]] if measured},
        },
        "tensors": records,
    }
