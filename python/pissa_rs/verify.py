"""Check a decomposition against its original, out of core: every target
reconstructs W within the rounding of its dtype, every other tensor is
byte-identical, and the adapter config fits the adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint
from .formats.bnb_serialized import StoredQuantized, read_weight
from .hub import resolve_model
from .constants import REPORT_NAME
from .locations import adapter_of_output
from .report import OutputReport
from .formats.peft_adapter import ADAPTER_WEIGHTS, AdapterMismatchError, AdapterTarget, adapter_targets
from .methods import get_method
from .options import ADAPTER_DTYPES
from .quant import Quantization
from .tensors import as_torch
from .precision import in_ieee_float32


@dataclass
class VerifyReport:
    checked_targets: int = 0
    checked_passthrough: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the tensor

    @property
    def ok(self) -> bool:
        return not self.problems


@in_ieee_float32
def verify(out: str | os.PathLike[str], against: str | os.PathLike[str], revision: str | None = None) -> VerifyReport:
    """Compare a decomposition's OUT with the ORIGINAL checkpoint it came from
    (a path, or a Hub model ID at `revision`).

    A target passes when |W - (W_res + s*B@A)| <= eps(dtype) * (|W_res| + |W|) + 2 tiny(dtype)
    + 2 r eps32 |s B| |A| elementwise (two roundings: the residual's and the original's
    at most, each at least half a subnormal step tiny = smallest_normal * eps near zero,
    float16's 6e-8; and s*B@A's float32 summation, whose order the decomposing process's BLAS
    chose); a
    quantized residual (QPiSSA, quant_iters > 1) when the difference is within
    the quantization's own error bound for W - s*B@A.
    """
    out, against = Path(out), resolve_model(against, revision)
    report = VerifyReport()
    if not (out / REPORT_NAME).is_file():
        report.problems.append(f"{REPORT_NAME}: missing in {out}; the decomposition did not finish")
        return report
    held = OutputReport.read(out)
    stored = held.stored  # save_quantized: weights stored in bitsandbytes' format
    quant = held.residual_quantization
    original = Checkpoint(against)
    adapter_dir = adapter_of_output(out)
    adapter = Checkpoint(adapter_dir / ADAPTER_WEIGHTS)
    method = get_method(held.options.get("method", "pissa"))
    # the method's own structure (top or bottom triplets, Q and R) is checkable on a plain residual
    dtype = ADAPTER_DTYPES[held.options.get("adapter_dtype", "float32")]
    checks = MethodCheck(method, 4 * torch.finfo(dtype).eps + 1e-4) if quant is None else None
    if not method.changes_base:  # the adapter alone, onto the original model
        # extract: the adapter holds W_ft - W_base, the fine-tuned model the input the report names
        finetuned = Checkpoint(held.data["input"]) if method.reads_base else None
        return _verify_adapter_only(out, against, original, adapter_dir, adapter, checks, report, finetuned)
    residual = Checkpoint(out)

    # What each original tensor became: itself, its serialized bitsandbytes form
    # (save_quantized), or its bfloat16 residual / nothing (an FP8 / MXFP4 source's codes / scales).
    source_as = held.source_as
    layout = [(name, dtype, tuple(shape)) for t in original.tensors
              for name, dtype, shape in (stored[t.name].parts(quant) if t.name in stored
                                         else source_as[t.name] if t.name in source_as
                                         else [(t.name, t.dtype, t.shape)])]
    if sorted(layout) != sorted((t.name, t.dtype, tuple(t.shape)) for t in residual.tensors):
        mine = {t.name: (t.dtype, tuple(t.shape)) for t in residual.tensors}
        for name, dtype, shape in layout:
            if mine.get(name) != (dtype, shape):
                report.problems.append(f"{name}: {mine.get(name)} in {out} but {(dtype, shape)} in {against}")
        extra = set(mine) - {n for n, _, _ in layout}
        report.problems += [f"{name}: in {out} but not in {against}" for name in sorted(extra)]
        return report

    try:
        all_targets = adapter_targets(adapter_dir, adapter, residual, out)
    except AdapterMismatchError as err:
        report.problems.append(str(err))
        return report
    targets = {t.tensor: t for t in all_targets if t.location is None}
    # Experts, and weights stored in FP8 / MXFP4 (W: the dequantized source weight): each is
    # checked on its own matrix, wherever its bytes are; the tensors holding those bytes are
    # then fully checked (a layer's experts cover them; codes and scales make one weight).
    in_pieces: set[str] = set()
    for target in (t for t in all_targets if t.location is not None):
        w, w_res = target.weight(original), target.weight(residual, residual=True)
        problem = _reconstruction_problem(target.tensor, target, w, w_res, adapter,
                                          quant if target.quantized_at_load else None, requantized=target.location)
        kept_as_fp8 = target.location.decode is not None and target.location.out_pieces is None
        if not problem and checks is not None and not kept_as_fp8:
            problem = checks(target, w, w_res, adapter)
        if problem:
            report.problems.append(f"{problem} from {against}")
        report.checked_targets += 1
        in_pieces.update(p.tensor for p in target.location.pieces)

    for info in original.tensors:
        name = info.name
        target = targets.get(name)
        if name in in_pieces:
            pass
        elif target is None and name in stored:
            problem = _quantized_problem(name, stored[name], original, residual, quant)
            if problem:
                report.problems.append(f"{problem} from {against}")
            report.checked_passthrough += 1
        elif target is None:
            if bytes(original.buffer(name)) != bytes(residual.buffer(name)):
                report.problems.append(f"{name}: pass-through tensor differs from {against}")
            report.checked_passthrough += 1
        else:
            w, w_res = as_torch(original.buffer(name)), read_weight(residual, name, quant, stored)
            problem = _reconstruction_problem(name, target, w, w_res, adapter,
                                              quant if target.quantized_at_load else None)
            if not problem and checks is not None:
                problem = checks(target, w, w_res, adapter)
            if problem:
                report.problems.append(f"{problem} from {against}")
            report.checked_targets += 1
        original.release(name)
        if name in residual:
            residual.release(name)
    return report


def _quantized_problem(name: str, weight: StoredQuantized, original: Checkpoint, residual: Checkpoint,
                       quant: Quantization) -> str | None:
    """A weight that is no target, stored pre-quantized: within the quantization's bound of the original."""
    w = as_torch(original.buffer(name)).float()
    deq = read_weight(residual, name, quant, {name: weight}).float()
    oriented = w.T if weight.fan_in_fan_out else w
    bound = quant.error_bound(oriented)
    bound = (bound.T if weight.fan_in_fan_out else bound) + torch.finfo(deq.dtype).eps * w.abs()
    error = (w - deq).abs()
    if torch.all(error <= bound):
        return None
    worst = (error - bound).argmax().item()
    return (f"{name}: stored {quant.kind} weight is not within its quantization error: differs by "
            f"{error.flatten()[worst].item():.3g} (allowed {bound.flatten()[worst].item():.3g})")


def _reconstruction_problem(name: str, target: AdapterTarget, stored: torch.Tensor, residual: torch.Tensor,
                            adapter: Checkpoint, quant: Quantization | None, requantized=None) -> str | None:
    """W (`stored`, the original) against W_res + s*B@A (`residual` as the model reads it).
    `requantized`: a WeightRead whose residual was stored back in the source's FP8
    (keep_source_format), then within that format's error of W - s*B@A."""
    delta = target.delta(adapter)
    w = stored.double()
    w_res = residual.double()
    error = (w - (w_res + delta.double())).abs()
    # the residual's and the original's rounding, and s*B@A's own in float32 (the
    # decomposition's summation order need not be this process's)
    finfo = torch.finfo(stored.dtype)
    bound = (finfo.eps * (w_res.abs() + w.abs()) + 2 * finfo.smallest_normal * finfo.eps
             + target.delta_rounding(adapter).double() + 1e-30)
    what = "within rounding"
    if requantized is not None and requantized.decode is not None and requantized.out_pieces is None:
        bound = bound + requantized.decode.error_bound((w - delta.double()).float()).double()
        what = "within the source format's re-quantization error"
    if quant is not None:  # bitsandbytes quantizes the weight laid out out x in
        oriented = (w - delta.double()).float()
        oriented = oriented.T if target.fan_in_fan_out else oriented
        quant_bound = quant.error_bound(oriented)
        bound = bound + (quant_bound.T if target.fan_in_fan_out else quant_bound).double()
        what = f"within {quant.kind} quantization error"
    if torch.all(error <= bound):
        return None
    worst = (error - bound).argmax().item()
    return (f"{name}: residual + s*B@A is not {what}: differs by {error.flatten()[worst].item():.3g} "
            f"(allowed {bound.flatten()[worst].item():.3g})")


@dataclass
class MethodCheck:
    """One target's factors checked as the recorded method's (methods/: factor_problem)."""

    method: object
    tol: float

    def __call__(self, target: AdapterTarget, w: torch.Tensor, w_res: torch.Tensor | None, adapter: Checkpoint
                 ) -> str | None:
        a, b = target.factors(adapter)
        orient = (lambda m: m.float().T) if target.fan_in_fan_out else (lambda m: m.float())
        eps = torch.finfo(w_res.dtype).eps if w_res is not None else 0.0
        problem = self.method.factor_problem(orient(w), orient(w_res) if w_res is not None else None, a, b,
                                             target.scale, self.tol, eps)
        return f"{target.tensor}: {problem}" if problem else None


def _verify_adapter_only(out: Path, against: Path, original: Checkpoint, adapter_dir: Path, adapter: Checkpoint,
                         checks: MethodCheck, report: VerifyReport, finetuned: Checkpoint | None = None
                         ) -> VerifyReport:
    """A method that leaves the base as it is (MiCA): OUT holds no model, and every adapter
    module is checked against the original's weight as the method's init (an extracted
    LoRA: against the fine-tuned weight minus the base's, `original` being the base)."""
    stray = [p.name for p in out.glob("*.safetensors") if p != adapter_dir / ADAPTER_WEIGHTS]
    if stray:
        report.problems.append(f"{out}: holds {stray[:3]}, but a {checks.method.name} output is the adapter alone")
    try:
        targets = adapter_targets(adapter_dir, adapter, original, out)
    except AdapterMismatchError as err:
        report.problems.append(str(err))
        return report
    for target in targets:
        weight = target.weight(original)
        if finetuned is not None:
            weight = target.weight(finetuned).float() - weight.float()
        problem = checks(target, weight, None, adapter)
        if problem:
            report.problems.append(f"{problem} from {against}")
        report.checked_targets += 1
    return report
