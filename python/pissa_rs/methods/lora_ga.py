"""LoRA-GA (PEFT's init_lora_weights="lora_ga", peft/tuners/lora/layer.py `lora_ga_init`):
the adapter starts from the top 2r singular triplets of the weight's gradient on calibration
text (the causal-LM loss, the mean over batches of each batch's gradient, as PEFT's
`preprocess_loraga` leaves it), split between lora_A and lora_B by `direction` and scaled by
`scale`; the residual is W - s*B@A. The gradient comes from the layer-by-layer backward pass
(engine/gradients.py), which hands each target's gradient to `gradient_statistic` as soon as
its layer is done: only the triplets travel on, never a full-size gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..factors import factors_with_residual, float32_oriented
from ..svd import randomized_svd
from .base import RANDOMIZED_SVD, Method
from .registry import register

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
# PEFT's svd_lowrank of the gradient: q = min(4r, min(shape)), niter 4; of the weight for
# weight_svd: q = r, niter 4
GRADIENT_OVERSAMPLING, GRADIENT_NITER = 4, 4


@dataclass(frozen=True)
class Choice:
    """How the triplets become factors: PEFT's LoraGAConfig (direction, scale, stable_gamma)."""

    direction: str = "ArB2r"
    scale: str = "stable"
    gamma: float = 16.0

    @classmethod
    def of(cls, options) -> Choice:
        """The options' choice; PEFT's defaults for None."""
        if options is None:
            return cls()
        return cls(options.lora_ga_direction, options.lora_ga_scale, float(options.lora_ga_gamma))


@dataclass
class GradientTriplets:
    """A target's gradient G (out x in, the weight's orientation) reduced to its top k = 2r
    singular triplets, G ~= U diag(S) Vh, and the run's choice: what LoRA-GA's factors are
    made of."""

    U: torch.Tensor  # out x k
    S: torch.Tensor  # k
    Vh: torch.Tensor  # k x in
    choice: Choice = Choice()

    def to(self, device) -> GradientTriplets:
        return GradientTriplets(self.U.to(device), self.S.to(device), self.Vh.to(device), self.choice)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U.contiguous(), "S": self.S.contiguous(), "Vh": self.Vh.contiguous()}

    @classmethod
    def from_tensors(cls, found: dict[str, torch.Tensor], choice: Choice) -> GradientTriplets:
        return cls(found["U"], found["S"], found["Vh"], choice)


def split_triplets(t: GradientTriplets, r: int, direction: str, seed: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lora_A r x in, lora_B out x r before scaling, the S the B columns carry), PEFT's
    split of the top 2r triplets. `random` draws its r of the 2r from `seed` (PEFT draws
    from the global generator, which no other run can reproduce)."""
    U, S, Vh = t.U[:, : 2 * r], t.S[: 2 * r], t.Vh[: 2 * r]
    if direction == "ArBr":  # A the odd triplets, B the even ones
        a, picked = Vh[1: 2 * r: 2], slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        a, picked = Vh[r: 2 * r], slice(0, r)
    elif direction == "ArB2r":
        a, picked = Vh[:r], slice(r, 2 * r)
    elif direction == "random":
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        indices = torch.randperm(2 * r, generator=generator)[:r].to(U.device)
        return Vh[indices], U[:, indices] * S[indices][None, :], S[indices]
    else:
        raise ValueError(f"lora_ga_direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    return a, U[:, picked] * S[picked][None, :], S[picked]


@register
class LoraGA(Method):
    name = "lora-ga"
    summary = ("LoRA-GA: A and B from the top 2r singular triplets of the weight's gradient on calibration text "
               "(the causal-LM loss, a backward pass one layer at a time), so the first step moves like full "
               "fine-tuning")
    solver = RANDOMIZED_SVD
    peft_name = "lora_ga"
    calibration = "gradient"
    quantizable = False  # the factors come from the gradient: QPiSSA's alternation on W has nothing to alternate
    # PEFT's LoRA-GA takes nn.Linear / Conv1D only; here an expert's matrix gets its own slice of
    # the stack's gradient (a router its weight's), and trains as a plain LoRA on PEFT's ParamWrapper
    adapts_parameters = True
    own_options = ("lora_ga_direction", "lora_ga_scale", "lora_ga_gamma")

    def check(self, options) -> None:
        super().check(options)
        if options.lora_ga_direction not in DIRECTIONS:
            raise ValueError(f"lora_ga_direction {options.lora_ga_direction!r} is not one of {', '.join(DIRECTIONS)}")
        if options.lora_ga_scale not in SCALES:
            raise ValueError(f"lora_ga_scale {options.lora_ga_scale!r} is not one of {', '.join(SCALES)}")
        if not options.lora_ga_gamma > 0:
            raise ValueError(f"lora_ga_gamma must be > 0, got {options.lora_ga_gamma!r}")

    def target_problem(self, shape, r):
        if 2 * r > min(shape):
            return f"LoRA-GA takes 2r = {2 * r} triplets of the gradient, and the weight {list(shape)} has {min(shape)}"
        return None

    def init_lora_weights(self, niter: int) -> str:
        return "lora_ga"

    def config_fields(self, options: dict) -> dict:
        return {}  # init_lora_weights true: the factors are final (PEFT's conversion refuses "lora_ga")

    def probe_statistic(self, rows, cols, r, salt, fixed, device):
        """The triplets of a fixed gradient, split and scaled as LoRA-GA's defaults do."""
        gradient = fixed(rows, cols, 80 + salt).to(device=device, dtype=torch.float32)
        return self.gradient_statistic(gradient, r, salt, None)

    def gradient_statistic(self, gradient: torch.Tensor, r: int, seed: int | None, options) -> GradientTriplets:
        """The top 2r triplets of `gradient` (float32, out x in), as PEFT's lora_ga_init takes
        them: svd_lowrank(G, q=min(4r, min(shape)), niter=4), from the seeded start."""
        q = min(GRADIENT_OVERSAMPLING * r, min(gradient.shape))
        U, S, V = randomized_svd(gradient.to(torch.float32), q, GRADIENT_NITER, seed)
        k = min(2 * r, S.shape[0])
        return GradientTriplets(U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].T.contiguous(), Choice.of(options))

    def statistic_from_tensors(self, found: dict[str, torch.Tensor], options) -> GradientTriplets:
        """A statistic back from the tensors `GradientTriplets.tensors` saved."""
        return GradientTriplets.from_tensors(found, Choice.of(options))

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        if not isinstance(statistic, GradientTriplets):
            raise ValueError(f"method {self.name!r} needs the weight's gradient on calibration data")
        w, total = float32_oriented(weight, fan_in_fan_out, ranks)
        if (statistic.U.shape[0], statistic.Vh.shape[1]) != tuple(w.shape):
            raise ValueError(f"the gradient's triplets are {statistic.U.shape[0]} x {statistic.Vh.shape[1]}, "
                             f"the weight {w.shape[0]} x {w.shape[1]}")
        oriented = weight.T if fan_in_fan_out else weight
        direction, scale_mode, gamma = statistic.choice.direction, statistic.choice.scale, statistic.choice.gamma
        found = []
        for r, s in ranks:
            if statistic.S.shape[0] < 2 * r:
                raise ValueError(f"rank {r} needs 2r = {2 * r} triplets of the gradient; min(shape) is "
                                 f"{min(w.shape)}")
            a, b, carried = split_triplets(statistic, r, direction, seed)
            if scale_mode == "stable":
                b = b * (w.shape[0] ** 0.25 / gamma ** 0.5)
            elif scale_mode == "weight_svd":  # sigma_1 of W from its own rank-r sketch, PEFT's
                sigma = randomized_svd(w, r, GRADIENT_NITER, None if seed is None else seed + 1)[1][0]
                if carried[0] > 0:
                    b = b * (sigma / carried[0])
            elif scale_mode == "gd_scale":
                a, b = a / s, b / s
            elif scale_mode != "unit":
                raise ValueError(f"lora_ga_scale {scale_mode!r} is not one of {', '.join(SCALES)}")
            lora_A, lora_B = a.to(adapter_dtype).contiguous(), b.to(adapter_dtype).contiguous()
            a64, b64 = lora_A.double(), lora_B.double()  # ||s B A||_F^2 = s^2 tr(B^T B A A^T): no out x in product
            held = s * s * torch.trace((b64.T @ b64) @ (a64 @ a64.T)).item()
            found.append(factors_with_residual(oriented, lora_A, lora_B, s, fan_in_fan_out,
                                               carried.to(torch.float32), held / total if total > 0 else 0.0))
        return found
