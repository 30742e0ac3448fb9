"""How much GPU memory one target's decomposition takes, and whether the run's devices have it:
checked before anything is written, said by the dry run, and named when CUDA runs out anyway (devices.out_of_memory).

One device worker holds, at its peak: the weight it works on as uploaded and the next one
(copied on the side stream during this compute), the decoded matrix of a low-precision source
(its decoder's temporaries, at most ~3 bytes an element, come and go before the SVD's), then either the SVD's working set (the method's cost: the float32 copy, sketches or U and Vh,
cuSOLVER's workspace) or the residual's (the float32 B@A and one residual per rank). For a
bfloat16 weight at one rank that is ~10 bytes an element, where the float32 copy alone is 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..tensors import TORCH_DTYPES, nbytes
from .devices import DeviceMemoryError

if TYPE_CHECKING:
    from ..options import DecomposeOptions
    from ..planning.targets import Target

# The CUDA context, cuBLAS / cuSOLVER handles and the caching allocator's fragmentation:
# what a device gives besides the tensors counted.
DEVICE_OVERHEAD_BYTES = 1 << 30


@dataclass(frozen=True)
class DeviceMemoryPlan:
    peak_bytes: int  # one device's, at its largest target, all its workers together
    tensor: str  # that target
    workers: int  # on the busiest device
    free: dict[str, int]  # free bytes per device now (mem_get_info); empty for a CPU run

    @property
    def short(self) -> list[str]:
        """Devices whose free memory is below the peak."""
        return [d for d, free in self.free.items() if free < self.peak_bytes]


def target_peak_bytes(target: Target, options: DecomposeOptions) -> int:
    """Device memory one worker holds at its peak while decomposing `target` (module docstring)."""
    rows, cols = (target.shape[1], target.shape[0]) if target.fan_in_fan_out else target.shape
    elements = rows * cols
    size = TORCH_DTYPES[target.dtype].itemsize  # as decoded
    stored = target.location.nbytes if target.location is not None else nbytes(target.dtype, list(target.shape))
    decoded = elements * size if target.location is not None and target.location.decode is not None else 0
    svd_phase = options.init_method.cost(rows, cols, target.r, options.niter)[1]
    if options.init_method.calibration == "covariance":  # CorDA: C, C damped, its inverse, W C, a workspace
        svd_phase += 5 * 4 * cols * cols
    residual_phase = 4 * elements + len(options.ranks) * elements * size
    extra = 0
    if options.quantize:  # QPiSSA: W - deq and deq in float32 beside the factors; the error's svdvals
        extra = 2 * 4 * elements + (4 * elements if options.measure_error else 0)
    return 2 * stored + decoded + max(svd_phase, residual_phase) + extra


def device_memory_plan(targets: list[Target], options: DecomposeOptions) -> DeviceMemoryPlan:
    """The busiest device's peak over the run's targets, and each CUDA device's free memory."""
    devices = options.torch_devices
    workers = max(sum(d == other for other in devices) for d in devices)
    peak, tensor = max(((target_peak_bytes(t, options), t.tensor) for t in targets), default=(0, ""),
                       key=lambda pair: pair[0])  # the first of the largest
    free = free_device_memory(devices)
    return DeviceMemoryPlan(workers * peak + (DEVICE_OVERHEAD_BYTES if free else 0), tensor, workers, free)


def free_device_memory(devices: list[torch.device]) -> dict[str, int]:
    """Each GPU's free memory now: what the driver says is free (other processes' use counted)
    and what this process's caching allocator holds unused (EVA's pass, the rank budget's, a
    notebook's own work leave blocks there that the run will reuse); nothing for the CPU,
    whose memory is the host's."""
    if devices[0].type != "cuda" or torch.cuda.device_count() == 0:
        return {}
    return {str(d): torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
            for d in dict.fromkeys(devices)}


def layers_of(targets: list[Target]) -> dict[str, list[Target]]:
    """The targets by decoder layer (their module name's first index; "" for none)."""
    import re

    per_layer: dict[str, list[Target]] = {}
    for t in targets:
        found = re.search(r"\.(\d+)\.", t.module)
        per_layer.setdefault(found.group(1) if found else "", []).append(t)
    return per_layer


def covariance_layer_bytes(targets: list[Target], element_size: int) -> tuple[int, int, str]:
    """CorDA's device memory for its largest layer, from the shapes: (the layer's targets in the
    dtype the layers run in, their input covariances in float32: in x in per target, an
    expert's each, an upper bound where inputs are shared; the largest tensor of that layer)."""
    best = (0, 0, "")
    for ts in layers_of(targets).values():
        weights = sum(t.shape[0] * t.shape[1] * element_size for t in ts)
        covariances = sum(4 * (t.shape[0] if t.fan_in_fan_out else t.shape[1]) ** 2 for t in ts)
        largest = max(ts, key=lambda t: t.num_experts * t.shape[0] * t.shape[1])
        if weights + covariances > best[0] + best[1]:
            best = (weights, covariances, largest.parameter or largest.tensor)
    return best


@dataclass(frozen=True)
class CovariancePasses:
    """How CorDA's layer-by-layer pass holds one layer's statistics: the layer's targets and
    every input covariance on the device, its forward run once (`experts` None); or, where the
    expert stacks' covariances (in x in float32 per expert) outweigh what the device has,
    `experts` at a time, the layer's forward run once per such range, each range's means kept
    in host memory (a file the page cache holds, engine/sequential.py) until their units take them."""

    experts: int | None  # experts per pass (None: all in one); 0: not even one fits
    num_experts: int
    weights: int  # the layer's targets, in the dtype the layers run in
    covariances: int  # its covariances other than the experts'
    per_expert: int  # one expert's covariances, over the stack's parameters
    batch: int  # a batch's activations through the layer: a few float32 copies of its widest
    tensor: str  # the layer's largest tensor

    @property
    def passes(self) -> int:
        return 1 if self.experts is None else -(-self.num_experts // max(self.experts, 1))


def covariance_passes(layer_targets: list[Target], element_size: int, available: int,
                      batch_tokens: int) -> CovariancePasses:
    """One layer's CovariancePasses, where the device has `available` bytes for it and a batch
    is `batch_tokens` tokens (padded)."""
    batch = batch_tokens * max(max(t.shape) for t in layer_targets) * 4 * 4
    weights = sum(t.shape[0] * t.shape[1] * element_size for t in layer_targets)
    dim = lambda t: t.shape[0] if t.fan_in_fan_out else t.shape[1]  # noqa: E731
    covariances = sum(4 * dim(t) ** 2 for t in layer_targets if t.expert is None)
    experts = [t for t in layer_targets if t.expert is not None]
    num_experts = max((t.num_experts for t in experts), default=0)
    per_expert = sum(4 * dim(t) ** 2 for t in experts if t.expert == 0)
    largest = max(layer_targets, key=lambda t: t.num_experts * t.shape[0] * t.shape[1])
    room = available - weights - covariances - batch
    fit = None if room >= per_expert * num_experts else max(room, 0) // per_expert if per_expert else 0
    return CovariancePasses(fit, num_experts, weights, covariances, per_expert, batch,
                            largest.parameter or largest.tensor)


def calibration_room(options: DecomposeOptions) -> int:
    """What CorDA's layer may take of its device: a GPU's free memory less the context's
    overhead; on a CPU (the device is the host), the host budget `host_memory`."""
    free = free_device_memory(options.torch_devices[:1])
    if free:
        return next(iter(free.values())) - DEVICE_OVERHEAD_BYTES
    return options.host_memory_bytes


def calibration_element_size(targets: list[Target], options: DecomposeOptions) -> int:
    """Bytes per element of the layers as calibration runs them (float32, or the stored dtype)."""
    if options.calibration_dtype == "float32":
        return 4
    return max(TORCH_DTYPES[t.dtype].itemsize for t in targets)


def device_memory_problem(targets: list[Target], options: DecomposeOptions) -> str | None:
    """Why a run of `targets` cannot fit on its devices (None: it can): its largest target's
    decomposition, or (CorDA) its largest layer with the input covariances. The dry run and
    the run ask the same question."""
    from .outdir import human_bytes

    plan = device_memory_plan(targets, options)
    if plan.free and options.init_method.calibration == "covariance":  # a CPU run takes an expert a pass at least
        room, size = calibration_room(options), calibration_element_size(targets, options)
        where = next(iter(plan.free))
        for layer in layers_of(targets).values():
            passes = covariance_passes(layer, size, room, options.calibration_batch * options.calibration_length)
            if passes.experts == 0:
                return (f"'{passes.tensor}': CorDA calibrates its layer with the layer's targets "
                        f"({human_bytes(passes.weights)}) and their input covariances (float32: "
                        f"{human_bytes(passes.covariances)}"
                        + (f", + {human_bytes(passes.per_expert)} for each expert at least"
                           if passes.per_expert else "")
                        + f"; a batch ~{human_bytes(passes.batch)}) on the device, and {where} has "
                        f"{human_bytes(max(room, 0))} for it: use a device with more memory, or leave these weights "
                        "out of target_modules / target_parameters")
    if plan.short:
        return (f"tensor '{plan.tensor}': its decomposition needs ~{human_bytes(plan.peak_bytes)} of device memory "
                f"({plan.workers} worker(s) on one device), and "
                + ", ".join(f"{d} has {human_bytes(plan.free[d])} free" for d in plan.short)
                + ": free the device, name each device once in devices, or use a device with more memory")
    return None


def check_device_memory(targets: list[Target], options: DecomposeOptions) -> None:
    """Refuse, before anything is written, a run that cannot fit (device_memory_problem)."""
    problem = device_memory_problem(targets, options)
    if problem is not None:
        raise DeviceMemoryError(problem)
