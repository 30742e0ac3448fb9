"""One target's math for every output of a run: the shared SVD, each rank's factors and
residual (in the form it is stored), and its report record with the measured errors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..factors import scaling, tensor_seed
from ..options import ADAPTER_DTYPES
from ..quant import loftq_error, qpissa_factors_at_ranks, quantization_error
from .units import OutputSpec
from ..svd import singular_values

if TYPE_CHECKING:
    from ..options import DecomposeOptions
    from ..planning.mapping import Piece


@dataclass
class Computed:
    """One target's result for one output, on the host."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    residual_parts: list[tuple[str, torch.Tensor]]  # the residual, or its pre-quantized form (save_quantized)
    record: dict[str, Any]
    pieces: list[tuple[Piece, torch.Tensor]] = field(default_factory=list)  # an expert's residual: its bytes per piece


def compute_target(index: int, weight: torch.Tensor, outputs: tuple[OutputSpec, ...], active: list[bool],
                   to_host, statistic: torch.Tensor | None = None) -> list[Computed | None]:
    """Target `index` of the plans (its weight on its device, in its stored dtype): one
    decomposition (the run's method's) at the largest rank, then factors, residual and report
    record for every active output (None for the others). `statistic`: what a data-aware
    method needs of this target (on the host). Runs on a device's worker thread."""
    t0 = time.perf_counter()
    first = outputs[0].options
    targets = [o.plan.targets[index] for o in outputs]
    scales = [scaling(t.r, t.lora_alpha, first.use_rslora) for t in targets]
    ranks = [(t.r, s) for t, s in zip(targets, scales)]
    seed = tensor_seed(first.seed, targets[0].tensor)
    adapter_dtype, fan_in_fan_out = ADAPTER_DTYPES[first.adapter_dtype], targets[0].fan_in_fan_out
    # Parameters PEFT wraps (experts, routers) stay unquantized when transformers loads
    # with bitsandbytes: plain PiSSA for them, whatever the quantization.
    quant = first.quantization if targets[0].quantized_at_load else None
    stored = next((w for w in outputs[0].plan.stored_quantized if w.tensor == targets[0].tensor), None)
    method = first.init_method
    statistic = statistic.to(weight.device) if statistic is not None else None
    try:
        if quant is None:
            all_factors = method.factors_at_ranks(weight, ranks, niter=first.niter, seed=seed,
                                                  adapter_dtype=adapter_dtype, fan_in_fan_out=fan_in_fan_out,
                                                  statistic=statistic)
        else:
            all_factors = qpissa_factors_at_ranks(weight, ranks, quant, first.quant_iters, niter=first.niter,
                                                  seed=seed, adapter_dtype=adapter_dtype,
                                                  fan_in_fan_out=fan_in_fan_out, method=method, statistic=statistic)
    except ValueError as e:
        if statistic is None:
            raise
        raise ValueError(f"{targets[0].tensor}: {e}") from e
    seconds = time.perf_counter() - t0
    computed: list[Computed | None] = []
    for is_active, target, scale, factors in zip(active, targets, scales, all_factors):
        if not is_active:
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
        if factors.residual is None:  # the method leaves the base weight as it is: nothing to write
            parts = []
        elif target.location is not None:  # its bytes go where the read says, piece by piece
            if target.location.decode is not None and first.keep_source_format:
                # back in the source's FP8, re-quantized; what re-quantizing costs, measured
                flat = target.location.decode.encode(factors.residual)
                if first.measure_error:
                    record.update(_requant_metrics(weight, target.location.decode(flat), factors, scale,
                                                   target.fan_in_fan_out))
            else:
                flat = factors.residual.reshape(-1).view(torch.uint8)
            flat, offset, parts = to_host(flat), 0, []
            for piece in target.location.written:
                pieces.append((piece, flat[offset: offset + piece.end - piece.start]))
                offset += piece.end - piece.start
        elif first.save_quantized and stored is not None:
            parts = [(name, to_host(t)) for name, t in stored.serialize(factors.residual, quant)]
        else:
            parts = [(target.tensor, to_host(factors.residual))]
        computed.append(Computed(to_host(factors.lora_A), to_host(factors.lora_B), parts, record, pieces))
    return computed


def _requant_metrics(weight, stored, factors, scale: float, fan_in_fan_out: bool) -> dict:
    """keep_source_format: the paper's nuclear-norm error of W - (deq(quant(W_res)) + s*B@A),
    and that relative to ||W||_* (re-quantizing W itself gives W back: it is FP8 already)."""
    w = weight.float()
    delta = (scale * factors.lora_B.float()) @ factors.lora_A.float()
    delta = delta.T if fan_in_fan_out else delta
    nuclear = lambda m: singular_values(m).sum().item()  # noqa: E731
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
