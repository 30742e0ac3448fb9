"""Ranks from the spectrum (--rank-budget): for the adapter parameters a uniform rank r would
have, the per-module ranks that keep the most of each module's spectral energy, summed over
modules. Parameters PEFT adapts through a ParamWrapper (MoE experts, routers) keep the uniform
plan's rank, outside the budget: PEFT rewrites their rank_pattern for transformers' fused
experts (gate_up doubled) when it loads them, so a chosen rank would not survive as chosen."""

from __future__ import annotations

import heapq
import re
import time
from dataclasses import replace
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ._pissa_rs import Checkpoint
from .factors import tensor_seed
from .svd import randomized_svd, singular_values

if TYPE_CHECKING:
    from .options import DecomposeOptions
    from .planning.targets import Target


@dataclass
class Group:
    """What one rank is chosen for: a module's weight."""

    key: str  # its rank_pattern key: the module's name
    cost: int  # adapter parameters per unit of rank: (in + out) for each matrix
    max_rank: int  # the largest rank its matrices allow (the smaller dimension)
    uniform: int  # the rank a uniform r gives it (below r when a dimension is smaller)
    gains: list[float] = field(default_factory=list)  # the k-th rank's energy fraction, summed over its matrices


@dataclass
class Allocation:
    ranks: dict[str, int]  # group key -> chosen rank
    budget: int  # adapter parameters of the uniform rank
    used: int
    floor: int
    cap: int
    energy_uniform: float  # sum over groups of the energy fraction kept at the uniform rank
    energy_chosen: float
    spectra: dict[str, list[float]]  # group key -> the first `cap` squared singular values / ||W||_F^2 (summed)
    seconds: float = 0.0
    fixed: list[str] = field(default_factory=list)  # parameters kept at the uniform plan's rank (see above)

    def as_record(self) -> dict:
        return {"budget_parameters": self.budget, "used_parameters": self.used, "floor": self.floor,
                "cap": self.cap, "energy_kept_sum_uniform": self.energy_uniform,
                "energy_kept_sum_chosen": self.energy_chosen, "ranks": dict(sorted(self.ranks.items())),
                "spectra": self.spectra, "seconds": self.seconds, "fixed_at_uniform_rank": self.fixed}


def groups_of(targets: list[Target], cap: int) -> tuple[dict[str, Group], dict[str, list[Target]]]:
    groups: dict[str, Group] = {}
    members: dict[str, list[Target]] = {}
    for t in targets:
        key = t.module
        rows, cols = t.shape
        if key not in groups:
            groups[key] = Group(key, 0, min(rows, cols, cap), t.r)
            members[key] = []
        groups[key].cost += rows + cols
        members[key].append(t)
    return groups, members


def energy_fractions(weight: torch.Tensor, k: int, options: DecomposeOptions, name: str) -> list[float]:
    """The first k squared singular values of `weight` over ||W||_F^2: by the run's own kind of
    SVD (randomized at rank k, seeded as the decomposition is; exact with niter=0 or for a
    method that takes a full SVD anyway)."""
    from .methods import RANDOMIZED_SVD

    w = weight.to(torch.float32)
    total = torch.dot(w.reshape(-1), w.reshape(-1)).item()
    if total == 0:
        return [0.0] * k
    if options.niter == 0 or options.init_method.solver != RANDOMIZED_SVD:
        s = singular_values(w)[:k]
    else:
        s = randomized_svd(w, k, options.niter, tensor_seed(options.seed, name))[1]
    return (s.double().square() / total).tolist()


def allocate(groups: dict[str, Group], floor: int) -> tuple[dict[str, int], int, int]:
    """Greedy on energy per parameter (optimal here: each group's gains fall with k), from every
    group at its floor, until the uniform rank's parameters are spent. Returns (ranks, budget, used)."""
    budget = sum(g.uniform * g.cost for g in groups.values())
    ranks = {key: min(floor, g.max_rank) for key, g in groups.items()}
    used = sum(ranks[key] * g.cost for key, g in groups.items())
    heap = [(-g.gains[ranks[key]] / g.cost, key) for key, g in groups.items() if ranks[key] < g.max_rank]
    heapq.heapify(heap)
    while heap:
        _, key = heapq.heappop(heap)
        g = groups[key]
        if used + g.cost > budget:
            continue  # this group's next rank does not fit; a cheaper group's may
        ranks[key] += 1
        used += g.cost
        if ranks[key] < g.max_rank:
            heapq.heappush(heap, (-g.gains[ranks[key]] / g.cost, key))
    return ranks, budget, used


def choose_ranks(path, targets: list[Target], options: DecomposeOptions, progress: bool = False) -> Allocation:
    """Read every target weight once (one at a time), measure its spectrum up to the cap, and
    allocate the ranks."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    floor, cap = options.budget_floor, options.budget_cap
    groups, members = groups_of([t for t in targets if t.parameter is None], cap)
    fixed = sorted({t.parameter for t in targets if t.parameter is not None})
    checkpoint = Checkpoint(path)
    device = torch.device(options.device)
    try:
        for key, group in tqdm(groups.items(), desc="spectra", disable=not progress):
            summed = [0.0] * group.max_rank
            for t in members[key]:
                weight = t.weight_read(checkpoint).read(checkpoint).to(device)
                weight = weight.T if t.fan_in_fan_out else weight
                for k, v in enumerate(energy_fractions(weight, group.max_rank, options, t.tensor)):
                    summed[k] += v
                for piece in t.weight_read(checkpoint).pieces:
                    checkpoint.release(piece.tensor)
            group.gains = summed
    finally:
        checkpoint.release_all()
    ranks, budget, used = allocate(groups, floor)
    kept = lambda key, k: sum(groups[key].gains[:k])  # noqa: E731
    return Allocation(ranks, budget, used, floor, cap,
                      sum(kept(key, min(g.uniform, g.max_rank)) for key, g in groups.items()),
                      sum(kept(key, ranks[key]) for key in groups),
                      {key: g.gains for key, g in groups.items()}, time.perf_counter() - started, fixed)


def budgeted_options(options: DecomposeOptions, allocation: Allocation) -> DecomposeOptions:
    """The options with the chosen ranks as PEFT's rank_pattern (exact names, escaped: PEFT
    reads the keys as patterns); modules at the uniform rank need no entry."""
    pattern = {re.escape(key): k for key, k in sorted(allocation.ranks.items()) if k != options.ranks[0]}
    return replace(options, rank_pattern=pattern, budget_chosen=True).validate()
