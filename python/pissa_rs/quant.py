"""QPiSSA: quantization-aware residuals, the paper's error metric, and LoftQ's
procedure to compare with, for the 4/8-bit formats bitsandbytes loads a model
in. bitsandbytes' own kernels are used where they agree with our pure-torch
reference (bnb_reference.py), checked once per process and device; where they
do not, the reference is used, and the log and the report say so. No I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .formats import bnb_reference as ref
from .factors import Factors, factors_at_ranks
from .noise import quiet_library_noise
from .svd import full_svd, singular_values

log = logging.getLogger("pissa_rs")

QUANT_TYPES = ("nf4", "fp4", "int8")
# Largest gap between neighbouring code values (as a fraction of the block's absmax):
# nf4 between -1 and -0.6962; bitsandbytes' fp4 between 0.6667 and 1 (and -).
_MAX_CODE_GAP = {"nf4": 1 - 0.6961928009986877, "fp4": 1 / 3}
BITSANDBYTES, REFERENCE = "bitsandbytes", "reference"


@dataclass(frozen=True)
class QuantizerChoice:
    """Which implementation quantizes on one kind of device, and why."""

    backend: str  # "bitsandbytes" or "reference"
    reason: str  # one line: what the check found

    def as_record(self) -> dict:
        return {"backend": self.backend, "reason": self.reason}


@dataclass(frozen=True)
class Quantization:
    """One bitsandbytes quantization, with the settings transformers'
    BitsAndBytesConfig gives it at load time: 4-bit blocks of 64 (Linear4bit's
    default), double quantization only when asked; int8 is LLM.int8()'s
    row-wise absmax of the weight cast to float16 (Int8Params)."""

    kind: str  # "nf4", "fp4" or "int8"
    double_quant: bool = False
    blocksize: int = 64

    def __post_init__(self):
        if self.kind not in QUANT_TYPES:
            raise ValueError(f"quantize must be one of {QUANT_TYPES}, got {self.kind!r}")

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    def choice(self, device: torch.device | str = "cpu") -> QuantizerChoice:
        """bitsandbytes on `device` if it agrees with the reference there, else the reference."""
        return choose_quantizer(self, torch.device(device).type)

    def quantize_4bit(self, x: torch.Tensor) -> ref.Quantized4bit:
        """x (out x in, its own dtype) in bitsandbytes' 4-bit format."""
        if self.choice(x.device).backend == REFERENCE:
            return ref.quantize_4bit(x.contiguous(), self.kind, self.blocksize, self.double_quant)
        return _bnb_quantize_4bit(self, x)[0]

    def quantize_int8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (out x in) as LLM.int8() rows: (int8 codes, float32 row absmax)."""
        if self.choice(x.device).backend == REFERENCE:
            return ref.int8_rows_quantize(x)
        import bitsandbytes.functional as bnbf

        codes, stats, _ = bnbf.int8_vectorwise_quant(x.contiguous().to(torch.float16))
        return codes, stats

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """deq(quant(x)) in x's dtype: the weight a model loaded with this
        quantization computes with when x (out x in) is stored."""
        reference = self.choice(x.device).backend == REFERENCE
        if self.kind == "int8":
            codes, stats = self.quantize_int8(x)
            if reference:
                return ref.int8_rows_dequantize(codes, stats).to(x.dtype)
            import bitsandbytes.functional as bnbf

            return bnbf.int8_vectorwise_dequant(codes, stats).to(x.dtype)
        if reference:
            return ref.dequantize_4bit(self.quantize_4bit(x)).to(x.dtype)
        import bitsandbytes.functional as bnbf

        quantized, state = _bnb_quantize_4bit(self, x)
        return bnbf.dequantize_4bit(quantized.packed, state).to(x.dtype)

    def project(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """deq(quant(x)) stored in `dtype` so that quantizing it again gives it
        back exactly: loading the stored residual in 4/8 bits reproduces the
        weight the decomposition computed (the cast to `dtype` can move a
        block's absmax, so a second round is sometimes needed). With double
        quantization there may be no fixed point: the 8-bit absmax codes are
        offset by their mean, which moves each round; the result then
        re-quantizes to within that 8-bit error, not exactly."""
        y = self.roundtrip(x.to(dtype))
        for _ in range(4):
            again = self.roundtrip(y)
            if torch.equal(again, y):
                return y
            y = again
        if self.double_quant:
            return y
        raise RuntimeError(f"{self.kind} quantization did not reach a fixed point in {dtype}")

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """An elementwise bound on |x - deq(quant(x))| (x float32, out x in):
        half the widest code gap times the block's (or row's) absmax, plus the
        float16 cast int8 makes. Used to check stored quantized residuals."""
        if self.kind == "int8":
            rowmax = x.abs().amax(dim=-1, keepdim=True)
            return (rowmax / 127 * 0.5 + x.abs() * 2.0**-11) * 1.01 + rowmax * 2.0**-10
        flat = x.reshape(-1)
        pad = (-flat.numel()) % self.blocksize
        blocks = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, self.blocksize)
        absmax = blocks.amax(dim=1, keepdim=True).expand_as(blocks).reshape(-1)[: flat.numel()]
        # Double quantization stores the absmax itself in 8 bits: allow for its error.
        slack = 1.05 if self.double_quant else 1.01
        return (absmax * (_MAX_CODE_GAP[self.kind] / 2) * slack).view_as(x)


def _bnb_quantize_4bit(quant: Quantization, x: torch.Tensor):
    """bitsandbytes' quantize_4bit of x: (the result as a Quantized4bit, bitsandbytes' own QuantState)."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(x.contiguous(), blocksize=quant.blocksize,
                                       compress_statistics=quant.double_quant, quant_type=quant.kind)
    result = ref.Quantized4bit(packed, state.absmax, quant.kind, quant.blocksize, tuple(x.shape), x.dtype)
    if quant.double_quant:
        result.nested_absmax, result.nested_offset = state.state2.absmax, state.offset.item()
    return result, state


def _probe(device: torch.device) -> list[torch.Tensor]:
    """Check inputs, in every weight dtype: 4000 x 96 puts 64-element blocks across
    rows (kernels that assume otherwise fail here) and gives 6000 block absmaxes for
    double quantization to round (a kernel that misses the nearest 8-bit code on 1 in
    a few hundred shows); magnitudes span six decades; one row is all zero."""
    g = torch.Generator().manual_seed(20261123)
    x = torch.randn(4000, 96, generator=g) * torch.logspace(-3, 3, 4000).unsqueeze(1)
    x[7] = 0
    return [x.to(dtype).to(device) for dtype in (torch.float32, torch.bfloat16, torch.float16)]


def _disagreement(quant: Quantization, device: torch.device) -> str | None:
    """Where bitsandbytes' result differs from the reference on the probe, or None."""
    import bitsandbytes.functional as bnbf

    for x in _probe(device):
        where = f"{x.dtype} {tuple(x.shape)}"
        if quant.kind == "int8":
            codes, stats, _ = bnbf.int8_vectorwise_quant(x.to(torch.float16))
            ref_codes, ref_stats = ref.int8_rows_quantize(x)
            if not (torch.equal(codes, ref_codes) and torch.equal(stats, ref_stats)):
                return f"int8_vectorwise_quant differs on {where}"
            if not torch.equal(bnbf.int8_vectorwise_dequant(codes, stats), ref.int8_rows_dequantize(codes, stats)):
                return f"int8_vectorwise_dequant differs on {where}"
            continue
        mine = ref.quantize_4bit(x, quant.kind, quant.blocksize, quant.double_quant)
        theirs, state = _bnb_quantize_4bit(quant, x)
        same = torch.equal(mine.packed, theirs.packed) and torch.equal(mine.absmax, theirs.absmax)
        if quant.double_quant:
            same = same and torch.equal(mine.nested_absmax, theirs.nested_absmax)
            same = same and mine.nested_offset == theirs.nested_offset
        if not same:
            return f"quantize_4bit differs on {where}"
        if not torch.equal(bnbf.dequantize_4bit(theirs.packed, state), ref.dequantize_4bit(mine)):
            return f"dequantize_4bit differs on {where}"
    return None


_CHOICES: dict[tuple[Quantization, str], QuantizerChoice] = {}


def remember_choice(quant: Quantization, device_type: str, choice: QuantizerChoice) -> None:
    """Take a choice made in another process (the planning child, which imports
    bitsandbytes anyway): a process that then uses the reference never imports it."""
    _CHOICES[(quant, device_type)] = choice


def forget_choices() -> None:
    _CHOICES.clear()


def choose_quantizer(quant: Quantization, device_type: str) -> QuantizerChoice:
    """Once per process, quantization and device type: bitsandbytes if installed
    and bit-identical to the reference on the probe, else the reference (logged at
    INFO; the decomposition's report records it and the CLI prints it)."""
    key = (quant, device_type)
    if key not in _CHOICES:
        _CHOICES[key] = _check(quant, device_type)
    return _CHOICES[key]


def _check(quant: Quantization, device_type: str) -> QuantizerChoice:
    device = torch.device(device_type)
    try:
        with quiet_library_noise():
            import bitsandbytes
    except ImportError:
        return QuantizerChoice(REFERENCE, "bitsandbytes is not installed")
    version = getattr(bitsandbytes, "__version__", "?")
    try:
        problem = _disagreement(quant, device)
    except Exception as err:  # a kernel missing for this device or dtype
        problem = f"failed: {type(err).__name__}: {err}"
    if problem is None:
        return QuantizerChoice(BITSANDBYTES, f"bitsandbytes {version} on {device_type} agrees with the reference")
    reason = (f"bitsandbytes {version} on {device_type}: {quant.kind}{' double-quant' if quant.double_quant else ''} "
              f"{problem}; using pissa_rs' reference quantizer instead")
    log.info("pissa_rs: %s", reason)  # the CLI prints it once; the report records it
    return QuantizerChoice(REFERENCE, reason)


def nuclear_norm(x: torch.Tensor) -> float:
    """||x||_*: the sum of x's singular values (float32 SVD, summed in float64)."""
    return singular_values(x.to(torch.float32)).double().sum().item()


def _oriented(t: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return t.T if fan_in_fan_out else t


def qpissa_factors_at_ranks(
    weight: torch.Tensor,
    ranks: list[tuple[int, float]],
    quant: Quantization,
    iters: int,
    niter: int = 4,
    seed: int | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    fan_in_fan_out: bool = False,
    method=None,
    statistic: torch.Tensor | None = None,
) -> list[Factors]:
    """QPiSSA with `iters` iterations (docs/design.md): the first takes W's principal
    factors (or `method`'s: a methods.Method; default PiSSA); each next one takes those of
    W - deq(quant(W - s*B@A)). With one
    iteration the result is plain PiSSA (an unquantized residual, which loading
    in 4/8 bits quantizes); with more, the residual stored is deq(quant(W - s*B@A))
    in W's dtype and the adapter is the last A, B. Every rank iterates on its own
    from the shared first SVD."""
    if iters < 1:
        raise ValueError(f"quant_iters must be >= 1, got {iters}")
    def factorize(w, ranks, fan_in_fan_out):
        if method is None:
            return factors_at_ranks(w, ranks, niter, seed, adapter_dtype, fan_in_fan_out)
        return method.factors_at_ranks(w, ranks, niter=niter, seed=seed, adapter_dtype=adapter_dtype,
                                       fan_in_fan_out=fan_in_fan_out, statistic=statistic)

    first = factorize(weight, ranks, fan_in_fan_out)
    if iters == 1:
        return first
    w = _oriented(weight, fan_in_fan_out).to(torch.float32)
    results = []
    for (r, scale), factors in zip(ranks, first):
        lora_A, lora_B = factors.lora_A, factors.lora_B
        for _ in range(iters - 1):
            deq = quant.project(w - scale * (lora_B.float() @ lora_A.float()), weight.dtype)
            again = factorize(w - deq.float(), [(r, scale)], False)[0]
            lora_A, lora_B = again.lora_A, again.lora_B
        target = w - scale * (lora_B.float() @ lora_A.float())
        residual = quant.project(target, weight.dtype)
        max_abs_error = (residual.float() - target).abs().max().item() if residual.numel() else 0.0
        results.append(Factors(
            lora_A=lora_A, lora_B=lora_B, residual=_oriented(residual, fan_in_fan_out).contiguous(),
            singular_values=factors.singular_values, energy_kept=factors.energy_kept, max_abs_error=max_abs_error,
        ))
    return results


@dataclass
class QuantError:
    """The paper's metric for one weight: nuclear norms of the 4/8-bit error."""

    error: float  # ||W - (deq(quant(W_res)) + s*B@A)||_*
    qlora_error: float  # ||W - deq(quant(W))||_*: quantizing W itself, as QLoRA does

    @property
    def reduction(self) -> float:
        """1 - error / qlora_error: the share of QLoRA's error this adapter removes."""
        return 1.0 - self.error / self.qlora_error if self.qlora_error > 0 else 0.0


def quantization_error(weight: torch.Tensor, residual: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scale: float, quant: Quantization, fan_in_fan_out: bool = False,
                       residual_is_dequantized: bool = False) -> QuantError:
    """QPiSSA's error and QLoRA's for one weight, from the tensors as stored
    (weight and residual in the stored orientation, in their own dtype).
    `residual_is_dequantized`: the residual already is deq(quant(.)) (read from a
    pre-quantized output), so it is not quantized again."""
    w_stored = _oriented(weight, fan_in_fan_out)
    w = w_stored.to(torch.float32)
    oriented = _oriented(residual, fan_in_fan_out)
    effective = (oriented if residual_is_dequantized else quant.roundtrip(oriented)).to(torch.float32)
    effective += scale * (lora_B.to(torch.float32) @ lora_A.to(torch.float32))
    error = nuclear_norm(w - effective)
    del effective
    qlora_error = nuclear_norm(w - quant.roundtrip(w_stored).to(torch.float32))
    return QuantError(error=error, qlora_error=qlora_error)


def loftq_error(weight: torch.Tensor, r: int, iters: int, quant: Quantization, fan_in_fan_out: bool = False) -> float:
    """||W - (deq + L@R)||_* after LoftQ's alternation as PEFT's loftq_init runs
    it: quantize res (float32), exact SVD of W - deq, res = W - L@R, `iters` times.
    PEFT's own function only runs on CUDA/XPU; this is its procedure, step for step."""
    w = _oriented(weight, fan_in_fan_out).to(torch.float32)
    res = w
    for i in range(iters):
        deq = quant.roundtrip(res).to(torch.float32)
        U, S, Vh = full_svd(w - deq)
        sqrt_s = S[:r].sqrt()
        low_rank = (U[:, :r] * sqrt_s) @ (sqrt_s[:, None] * Vh[:r])
        if i + 1 == iters:
            break
        res = w - low_rank
    return nuclear_norm(w - deq - low_rank)
