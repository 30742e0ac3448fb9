"""What an initialization method is: the one interface every method module implements, so
the engine runs any of them out of core without knowing one by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ..constants import ADAPTER_SUBDIR
from ..svd import singular_values

if TYPE_CHECKING:
    from ..factors import Factors


class RunOptions(Protocol):
    """What a method is handed: an options.DecomposeOptions, not imported here (options.py
    imports the methods, to name and check them). A method reads the run's ranks and the
    fields it owns (`own_options`)."""

    ranks: list[int]

    def __getattr__(self, name: str) -> Any: ...

# What a method needs from each weight: the dry run's cost model and the memory it needs.
RANDOMIZED_SVD, FULL_SVD, QR = "randomized top-r SVD", "full SVD", "QR"


def factor_core(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The r x r core R_B R_A^T (QR of B and A^T, float64) with B @ A's singular values and
    Frobenius norm: no m x n matrix."""
    return torch.linalg.qr(b.double()).R @ torch.linalg.qr(a.double().T).R.T


def adapter_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The singular values of s * B @ A, descending, from the thin factors alone (the SVD of
    their core)."""
    return (scale * singular_values(factor_core(a, b))).float()


def orthonormal_problem(b: torch.Tensor, tol: float) -> str | None:
    """None if B's columns are orthonormal within `tol`."""
    gap = (b.double().T @ b.double() - torch.eye(b.shape[1], dtype=torch.float64)).abs().max().item()
    return None if gap <= tol else f"lora_B's columns are not orthonormal (|B^T B - I| up to {gap:.3g})"


class Method:
    """One way to start an adapter from a weight: which decomposition of W it needs, how the
    factors (and the residual W - s*B@A, if the base changes) follow from it, and what PEFT
    must read in adapter_config.json to load and train it as that method."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: --help and the docs
    solver: ClassVar[str]  # RANDOMIZED_SVD, FULL_SVD or QR
    changes_base: ClassVar[bool] = True  # False: no residual; the original model is the adapter's base
    # where in OUT the adapter goes: the initial adapter of a decomposition (ADAPTER_SUBDIR), or
    # OUT itself ("") for a LoRA of another model, as every command that writes one does
    adapter_subdir: ClassVar[str] = ADAPTER_SUBDIR
    quantizable: ClassVar[bool] = True  # QPiSSA's alternation applies to its residual
    adapts_parameters: ClassVar[bool] = True  # PEFT can train it on a ParamWrapper (MoE experts, routers)
    peft_name: ClassVar[str | None] = None  # PEFT's init_lora_weights for the same init, where PEFT has it
    # init_lora_weights in the adapter_config we write: True (the factors are final, PEFT must not
    # initialize again on load), or the name of a PEFT variant that changes training (MiCA's frozen B)
    config_init_lora_weights: ClassVar[bool | str] = True
    # What it needs from calibration data, per target: None (the weight alone), "covariance"
    # (X^T X of the target's inputs, in x in: the driver runs the layer-sequential calibration),
    # "components" (EVA's pass over every layer first) or "gradient" (the causal-LM loss's
    # gradient of the weight, from the backward pass one layer at a time: gradient_statistic).
    calibration: ClassVar[str | None] = None
    own_options: ClassVar[tuple[str, ...]] = ()  # DecomposeOptions fields only this method reads
    # True: each target's statistic is the base model's matrix of the same tensor (extract: a
    # LoRA of the difference), read by the driver from options.extract_base as the unit needs it
    reads_base: ClassVar[bool] = False

    def options_from_statistics(self, options: RunOptions, targets: list, found: list
                                ) -> tuple[RunOptions, dict[str, torch.Tensor], dict]:
        """A method whose ranks follow from the calibration of every layer (calibration
        "components"): the options to plan with, each target tensor's statistic, and what the
        report says of the choice."""
        raise NotImplementedError

    def target_problem(self, shape: tuple[int, int], r: int) -> str | None:
        """Why this method cannot start an adapter of rank `r` on a weight of `shape` (out x in),
        beyond what every method needs (r <= min(shape)); None if it can. The plan refuses such
        a target by name before anything is written."""
        return None

    def gradient_statistic(self, gradient: torch.Tensor, r: int, seed: int | None, options: RunOptions | None) -> Any:
        """A method whose calibration is "gradient": what it keeps of a target's mean gradient
        (out x in, float32, on the device) for its factors at rank up to `r`. The backward
        pass (engine/gradients.py) hands each gradient here as its layer is done; the full-size
        gradient is dropped after. The result has `to(device)` and `tensors()` (saved for resume)."""
        raise NotImplementedError

    def statistic_from_tensors(self, found: dict[str, torch.Tensor], options: RunOptions) -> Any:
        """The statistic back from the tensors its `tensors()` saved."""
        raise NotImplementedError

    def probe_statistic(self, rows: int, cols: int, r: int, salt: int, fixed, device) -> Any:
        """A fixed statistic of the kind `calibration` names, for the rounding probe (rounding.py)
        to run this method's math on: `fixed(rows, cols, salt)` is a fixed integer-built matrix.
        By default an input covariance (M^T M / n) for a data-aware method, else none."""
        if self.calibration is None:
            return None
        m = fixed(cols, cols, 50 + salt).to(device=device, dtype=torch.float32)
        return m.T @ m / cols

    def commit_ranks(self, options: RunOptions, targets: list, records: list[dict]) -> dict[int, int]:
        """Ranks chosen from the results (target index -> rank, at most its planned r): the
        commit keeps that many leading triplets of each, and adapter_config says so. None by default."""
        return {}

    def modules_to_save(self, options: RunOptions) -> list[str]:
        """Modules of the input the adapter carries whole (PEFT's modules_to_save), by full name."""
        return []

    def config_fields(self, options: dict) -> dict:
        """More LoraConfig fields this method's adapter_config carries (EVA's eva_config)."""
        return {}

    def init_lora_weights(self, niter: int) -> str:
        """The name the report records for this init (PEFT's where PEFT has one)."""
        return self.peft_name or self.name

    def check(self, options: RunOptions) -> None:
        """Refuse options that do not apply to this method (ValueError naming them)."""
        if not self.adapts_parameters and options.target_parameters:
            raise ValueError(f"method {self.name!r}: PEFT has no {self.name} variant for parameters (ParamWrapper: "
                             f"MoE experts, routers), so target_parameters {options.target_parameters} cannot be "
                             "trained as this method; leave them out or choose another method")
        if not self.quantizable and (options.quantize or options.keep_source_format):
            raise ValueError(f"method {self.name!r} leaves the base weight as it is: there is no residual to "
                             "quantize or re-encode (quantize, save_quantized, keep_source_format do not apply)")

    def factors_at_ranks(self, weight: torch.Tensor, ranks: list[tuple[int, float]], *, niter: int,
                         seed: int | None, adapter_dtype: torch.dtype, fan_in_fan_out: bool,
                         statistic: torch.Tensor | None = None) -> list[Factors]:
        """The factors (and residual) of `weight` as stored (in x out when fan_in_fan_out) at
        every (rank, scale) of `ranks`, from one decomposition at the largest rank.
        `statistic`: what `calibration` names, for this weight (on its device)."""
        raise NotImplementedError

    def factor_problem(self, w: torch.Tensor, w_res: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                       scale: float, tol: float, residual_eps: float = 0.0) -> str | None:
        """What is wrong with (a, b) as this method's factors of `w` (all float32, out x in;
        `w_res` the residual, None without one, stored with relative rounding `residual_eps`),
        relative tolerance `tol`; None if nothing.
        verify's check that an output holds this method's init, not another's."""
        return None

    def lora_of_original(self, a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """After training: the factors (A', B') with s*B'@A' = what the trained adapter adds to
        the ORIGINAL weight. A method that changes the base: s*B@A - s*B0@A0 = [B | -B0][A ; A0]
        (PEFT's conversion, rank 2r)."""
        return torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)

    def cost(self, rows: int, cols: int, r: int, niter: int) -> tuple[float, int]:
        """(floating-point operations, float32 bytes of device memory) of one weight's decomposition."""
        m, n = max(rows, cols), min(rows, cols)
        weight = 4 * rows * cols
        if self.solver == RANDOMIZED_SVD and niter > 0:  # niter 0: the exact SVD, costed below
            # 2 products per iteration and the first, m*n*r each, QR of the sketches, the small SVD
            return 2.0 * m * n * r * (2 * niter + 2) + 4.0 * (m + n) * r * r * (2 * niter + 2), weight + 4 * (m + n) * r * 3
        if self.solver in (FULL_SVD, RANDOMIZED_SVD):  # Golub-Van Loan's thin R-SVD: ~6mn^2 + 20n^3, U and Vh
            return 6.0 * m * n * n + 20.0 * n ** 3, 2 * weight + 4 * (m * n + n * n)
        return 4.0 * m * n * n - 4.0 * n ** 3 / 3, 2 * weight + 4 * m * n  # Householder QR with Q formed
