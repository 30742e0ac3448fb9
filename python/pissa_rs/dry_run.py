"""pissa_rs.plan: what decompose_checkpoint would do, shown before an hour of work."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint
from .locations import output_dirs, resolve_source
from .engine.device_memory import covariance_layer_bytes, layers_of
from .engine.devices import page_locked_size
from .engine.layout import output_bytes, residual_bytes
from .engine.outdir import check_out_apart, free_bytes, human_bytes, out_dir_problem
from .model_files import is_model_dir
from .options import DecomposeOptions
from .planning.plan import make_plan_in_child, source_layout
from .formats.sources import source_format
from .planning.targets import Target
from .precision import in_ieee_float32


def human_flops(n: float) -> str:
    """Floating-point operations with a unit: 3.2 GFLOP."""
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kFLOP"


@dataclass
class DecompositionPlan:
    input: Path
    outs: list[Path]  # one per rank
    options: DecomposeOptions
    targets: list[Target]  # at the largest rank
    passthrough: list[tuple[str, str, tuple[int, ...], int]]  # name, dtype, shape, bytes
    input_bytes: int
    residual_bytes: int  # all outputs together
    adapter_bytes: int
    free_bytes: int  # on out's filesystem
    stored_quantized: list[str] = field(default_factory=list)  # save_quantized: weights stored pre-quantized
    left_out: list[tuple[str, str]] = field(default_factory=list)  # picked but not decomposed, and why
    rank_limited: list[str] = field(default_factory=list)  # modules at their smaller dimension, below r
    source_format: str | None = None  # a low-precision source: what it is
    source_sizes: dict[str, int] = field(default_factory=dict)  # residual bytes (one rank) per storage choice
    out_problems: list[str] = field(default_factory=list)  # why an output directory could not be created

    @property
    def device_memory(self):
        """The busiest device's peak memory and each GPU's free memory (engine/device_memory.py)."""
        from .engine.device_memory import device_memory_plan

        return device_memory_plan(self.targets, self.options)

    @property
    def device_memory_problem(self) -> str | None:
        """Why the run would be refused for device memory, as the run itself says it (None: it fits)."""
        from .engine.device_memory import device_memory_problem

        return device_memory_problem(self.targets, self.options)

    @property
    def fits_on_device(self) -> bool:
        return self.device_memory_problem is None

    @property
    def fits_on_disk(self) -> bool:
        return not self.out_problems and self.residual_bytes + self.adapter_bytes <= self.free_bytes

    def cost(self, t: Target) -> tuple[float, int]:
        """(floating-point operations, working memory in bytes) of one target's decomposition
        with this run's method, at the largest rank (methods.Method.cost)."""
        rows, cols = (t.shape[1], t.shape[0]) if t.fan_in_fan_out else t.shape
        return self.options.init_method.cost(rows, cols, t.r, self.options.niter)

    def _cost_lines(self) -> list[str]:
        """What the method costs: its decomposition per weight against randomized top-r's, and
        the memory one weight's decomposition needs on the device (the host, on a CPU)."""
        from .methods import get_method

        method = self.options.init_method
        flops = sum(self.cost(t)[0] for t in self.targets)
        memory, problem = self.device_memory, self.device_memory_problem
        free = (" (" + ", ".join(f"{d}: {human_bytes(f)} free" for d, f in memory.free.items()) + ")"
                + (f" -- DOES NOT FIT: {problem}" if problem else "")) if memory.free else ""
        line = (f"compute: {method.solver} per weight, {human_flops(flops)} in all; up to "
                f"{human_bytes(memory.peak_bytes)} of {self.options.device.split(':')[0]} memory at "
                f"'{memory.tensor}'{f' ({memory.workers} workers)' if memory.workers > 1 else ''}{free}")
        if method.solver != get_method("pissa").solver:
            pissa = get_method("pissa")
            randomized = sum(pissa.cost(*((t.shape[1], t.shape[0]) if t.fan_in_fan_out else t.shape), t.r,
                                        self.options.niter or 4)[0] for t in self.targets)
            line += f" ({flops / max(randomized, 1):,.1f}x randomized top-r's {human_flops(randomized)})"
        lines = [line]
        if method.calibration is not None:
            lines.append(self._calibration_line())
        if self.options.rank_budget:
            o = self.options
            shapes = [((t.shape[1], t.shape[0]) if t.fan_in_fan_out else t.shape) for t in self.targets
                      if t.parameter is None]
            spectra = sum(method.cost(rows, cols, min(o.budget_cap, rows, cols), o.niter)[0] for rows, cols in shapes)
            lines.append(f"ranks: chosen per module from its spectrum at run time, {o.budget_floor} to {o.budget_cap}, "
                         f"for the parameters of r={o.ranks[0]} (a spectra pass first: {human_flops(spectra)}; "
                         "experts and other parameters keep r); the ranks below are the uniform plan's")
        return lines

    def _calibration_line(self) -> str:
        """The memory plan of a layer-by-layer calibration, from the shapes alone: CorDA's
        (engine/sequential.py) carried hidden states, covariances and one layer on the device;
        EVA's (engine/components.py) incremental PCA components on disk, one layer's on the device."""

        from .calibration.layers import forward_dtype
        from .planning.mapping import load_config
        from .tensors import TORCH_DTYPES

        o = self.options
        config, _ = load_config(self.input)
        hidden = getattr(config, "hidden_size", 0)
        widest = max([hidden, getattr(config, "intermediate_size", 0) or 0])
        stored = TORCH_DTYPES.get(self.targets[0].dtype if self.targets else "F32", torch.float32)
        run_dtype = forward_dtype(o.calibration_dtype, o.torch_devices[0], stored)  # weights and hidden states
        size = torch.empty(0, dtype=run_dtype).element_size()
        tokens = o.calibration_samples * o.calibration_length
        per_layer = layers_of(self.targets)
        inputs = lambda ts: [(t.shape[0] if t.fan_in_fan_out else t.shape[1]) for t in ts]  # noqa: E731
        weights = max((sum(t.shape[0] * t.shape[1] * size for t in ts) for ts in per_layer.values()), default=0)
        batch = o.calibration_batch * o.calibration_length * widest * 4 * 4  # a few float32 copies of the widest
        head = (f"calibration: up to {o.calibration_samples} samples x {o.calibration_length} tokens ({tokens:,}), "
                f"batches of {o.calibration_batch}, layers run in {str(run_dtype).removeprefix('torch.')}; ")
        if self.options.init_method.calibration == "gradient":  # LoRA-GA: engine/gradients.py
            layers = getattr(config, "num_hidden_layers", len(per_layer))
            vocab = getattr(config, "vocab_size", 0)
            boundary = tokens * hidden * size  # at most: no batch padded
            gradients = max((sum(4 * t.shape[0] * t.shape[1] for t in ts) for ts in per_layer.values()), default=0)
            triplets = sum(4 * (t.shape[0] + t.shape[1] + 1) * 2 * t.r for t in self.targets)
            from .calibration.head import samples_per_chunk

            # the head's logits and the loss's float32 copy, a chunk of samples at a time
            chunk = min(o.calibration_batch, samples_per_chunk(o.calibration_length, vocab))
            logits = chunk * o.calibration_length * vocab * (size + 4)
            return (head + f"a forward over the {layers} layers, then a backward from the last down to the lowest with "
                    f"a target (each layer's forward recomputed: ~3x a forward in all); disk: {layers + 1} layer "
                    f"boundaries of hidden states, {human_bytes(boundary)} each ({human_bytes((layers + 1) * boundary)}"
                    f"; each removed once its layer's backward is done) + the gradient at one boundary + every "
                    f"target's gradient triplets {human_bytes(triplets)}; device: a layer's targets "
                    f"{human_bytes(weights)} + their float32 gradients {human_bytes(gradients)} + one batch's graph "
                    f"of the layer; at the head, {chunk} sample(s)' logits at a time ~{human_bytes(logits)}; host: one batch")
        if self.options.init_method.calibration == "covariance":  # CorDA: in x in per input, a layer at a time
            weights, covariances, _ = covariance_layer_bytes(self.targets, size)
            boundary, budget = tokens * hidden * size, o.host_memory_bytes  # at most: no batch padded
            held = boundary  # held page-locked for a GPU: each batch's block as torch's pinned allocator rounds it
            if o.torch_devices[0].type == "cuda":
                held = -(-o.calibration_samples // o.calibration_batch) * page_locked_size(
                    o.calibration_batch * o.calibration_length * hidden * size)
            where = ("held in memory (2 layer boundaries within" if 2 * held <= budget else
                     "read back from their file a batch at a time (2 layer boundaries above")
            line = (head + f"host: hidden states {human_bytes(boundary)} a layer boundary, on disk for resume and "
                    f"{where} --host-memory {human_bytes(budget)}), + covariances waiting for their shard, up to "
                    f"{human_bytes(covariances)} a layer; device: a layer's targets {human_bytes(weights)} + its "
                    f"covariances + a batch ~{human_bytes(batch)}")
            return line + self._expert_passes(size)
        # EVA: PEFT's loop over every layer at each step; each input's r * rho components (float64)
        # wait in a file between their layer's turns, and take twice that while they update
        components = lambda ts: sum(8 * n * round(t.r * o.eva_rho) for t, n in zip(ts, inputs(ts)))  # noqa: E731
        every = components(self.targets)
        layer = max((components(ts) for ts in per_layer.values()), default=0)
        adapter = sum(4 * n * t.r for t, n in zip(self.targets, inputs(self.targets)))
        return (head + f"each step one batch through the layers, read again from the shards; disk: every target's "
                f"incremental PCA components, up to {human_bytes(every)} (less where inputs are shared), a file per "
                f"input between its layer's turns; device: one layer's, up to {human_bytes(2 * layer)} while they "
                f"update, + a layer's targets {human_bytes(weights)} + a batch ~{human_bytes(batch)}; host: one "
                f"batch's hidden states, and at the end the adapter's lora_A ~{human_bytes(adapter)}")

    def _expert_passes(self, element_size: int) -> str:
        """CorDA's layers whose expert covariances do not fit the device at once: how many
        passes (device_memory.CovariancePasses); "" where every layer fits."""
        from .engine.device_memory import calibration_room, covariance_passes

        room = calibration_room(self.options)
        tokens = self.options.calibration_batch * self.options.calibration_length
        layers = layers_of(self.targets).values()
        split = [p for p in (covariance_passes(ts, element_size, room, tokens) for ts in layers)
                 if p.experts is not None and p.num_experts]
        if not split:
            return ""
        worst = max(split, key=lambda p: p.passes)
        return (f"; experts: {len(split)} layer(s) whose expert covariances ({human_bytes(worst.per_expert)} an "
                f"expert) do not fit beside the layer run their forward up to {worst.passes} times, "
                f"{max(worst.experts, 1)} experts a pass, each pass's means held in host memory (the page cache)")

    @property
    def _qpissa(self) -> str:
        o = self.options
        if not o.quantize:
            return ""
        measured = " + error measurement" + (" and LoftQ" if o.compare_loftq else "") if o.measure_error else ""
        return f", QPiSSA for {o.quantize}{' (double quant)' if o.double_quant else ''} x{o.quant_iters}{measured}"

    def describe(self) -> str:
        space = (f"CANNOT BE CREATED: {'; '.join(self.out_problems)}" if self.out_problems else
                 f"{human_bytes(self.free_bytes)} free{'' if self.fits_on_disk else ' -- DOES NOT FIT'}")
        lines = [f"input:  {self.input} ({human_bytes(self.input_bytes)})",
                 f"output: {', '.join(map(str, self.outs))} (residual {human_bytes(self.residual_bytes)} + adapter "
                 f"{human_bytes(self.adapter_bytes)}; {space})",
                 f"method: {self.options.method} ({self.options.init_lora_weights}){self._qpissa}, device "
                 f"{','.join(map(str, self.options.torch_devices))}",
                 *self._cost_lines(),
                 *([f"source: {self.source_format}; residual as " + ", as ".join(
                     f"{k}: {human_bytes(v)}" for k, v in self.source_sizes.items())] if self.source_format else []),
                 f"{len(self.targets)} targets"
                 + (f" ({sum(t.expert is not None for t in self.targets)} of them experts, one line per layer's "
                    "parameter):" if any(t.expert is not None for t in self.targets) else ":")]
        shown = [t for t in self.targets if not t.expert]  # a layer's experts: one line
        width = max((len(t.parameter if t.expert is not None else t.tensor) for t in shown), default=0)
        for t in shown:
            name = t.parameter if t.expert is not None else t.tensor
            shape = [t.num_experts, *t.shape] if t.expert is not None else list(t.shape)
            kind = (f" ({t.num_experts} experts, each its own split{', stored in x out' if t.fan_in_fan_out else ''})"
                    if t.expert is not None else " (Conv1D)" if t.fan_in_fan_out else "")
            flops = self.cost(t)[0] * (t.num_experts if t.expert is not None else 1)
            lines.append(f"  {name:<{width}}  {t.dtype:<5} {str(shape):<14} r={t.r} alpha={t.lora_alpha:g} "
                         f"{human_flops(flops)}{kind}")
        for t in shown:
            if t.module in self.rank_limited or t.parameter in self.rank_limited:
                lines.append(f"  rank {t.r} for {t.parameter or t.module}: its smaller dimension is below r")
        lines += [f"left out: {name}: {why}" for name, why in self.left_out]
        if self.stored_quantized:
            lines.append(f"{len(self.stored_quantized)} weights stored pre-quantized as {self.options.quantize} "
                         "(bitsandbytes' serialized format; the targets' residuals among them)")
        lines.append(f"{len(self.passthrough)} pass-through tensors "
                     f"({human_bytes(sum(p[3] for p in self.passthrough))}, copied byte for byte):")
        lines += [f"  {name}  {dtype} {list(shape)}" for name, dtype, shape, _ in self.passthrough]
        return "\n".join(lines)


@in_ieee_float32
def plan(path: str | os.PathLike[str], r: int | list[int] = 128, *, out: str | os.PathLike[str] | None = None,
         revision: str | None = None, **options) -> DecompositionPlan:
    """What `decompose_checkpoint(path, r, out=out, **options)` would do, without doing it:
    targets with shapes and ranks, pass-through tensors, bytes in and out, and free disk
    (or why an output directory could not be created). Target mistakes raise here."""
    opts = DecomposeOptions.from_fields({"r": r, **options})
    source, out = resolve_source(path, revision, Path(out) if out else None, opts.ranks, headers_only=True,
                                 method=opts.method)
    return replace(plan_decomposition(source, opts, out), input=Path(path))


def plan_decomposition(path: Path, opts: DecomposeOptions, out: Path | None) -> DecompositionPlan:
    """`plan` with options already validated (the CLI's --dry-run)."""
    checkpoint = Checkpoint(path)
    if opts.init_method.calibration is not None:  # the data checked (and hashed) as a run checks it
        from .calibration.model import model_calibration

        _, opts = model_calibration(path, opts)
    outs = output_dirs(path, opts.ranks, out, opts.method)
    # in a child, as a run plans: this process never imports transformers, PEFT or bitsandbytes
    plans, checks = make_plan_in_child(path, [asdict(opts.for_rank(r)) for r in opts.ranks], outs)
    checks.wait()
    found = plans[-1]  # ranks ascend: the largest, whose SVD all share
    targets = {p.tensor for t in found.targets for p in t.weight_read(checkpoint).pieces}
    stored = [w.tensor for w in found.stored_quantized]
    passthrough = [(i.name, i.dtype, tuple(i.shape), i.nbytes) for i in checkpoint.tensors
                   if i.name not in targets and i.name not in stored]
    sizes = [output_bytes(checkpoint, p, opts) for p in plans]
    source_sizes, fmt = {}, source_format(path if is_model_dir(path) else None)
    if fmt.kind is not None:
        decoded = found.source_as or source_layout(checkpoint, found.targets)
        names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
        dtypes = sorted({names[t.location.dtype] for t in found.targets
                         if t.location is not None and t.location.decode is not None})
        source_sizes[f"{' / '.join(dtypes) or 'bfloat16'} (default)"] = residual_bytes(checkpoint, decoded)
        if fmt.can_keep:
            source_sizes["the source's FP8 (keep_source_format)"] = residual_bytes(checkpoint, {})
    residual, adapter = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    for o in outs:
        check_out_apart(o, checkpoint, path)
    problems = [f"{o}: {why}" for o in outs for why in [out_dir_problem(o)] if why]
    return DecompositionPlan(
        input=path, outs=outs, options=opts, targets=found.targets, passthrough=passthrough,
        input_bytes=sum(i.nbytes for i in checkpoint.tensors), residual_bytes=residual, adapter_bytes=adapter,
        free_bytes=free_bytes(outs[0]), stored_quantized=stored, out_problems=problems,
        left_out=found.left_out, rank_limited=found.rank_limited,
        source_format=fmt.describe() if fmt.kind else None, source_sizes=source_sizes,
    )
