"""EVA (PEFT's init_lora_weights="eva", Explained Variance Adaptation): lora_A = the top
right singular vectors of the layer's input activations on calibration text (PEFT's
incremental PCA, fed batches until they converge), lora_B = 0, so the base model stays as it
is; ranks are redistributed across modules by explained variance (rho) before the adapter
is written."""

from __future__ import annotations

import torch

from .base import Method, orthonormal_problem
from .registry import register

INCREMENTAL_PCA = "incremental PCA of the inputs"


@register
class EVA(Method):
    name = "eva"
    summary = ("the top right singular vectors of the layer's input activations on calibration text in lora_A, "
               "lora_B = 0 (the original model is the base); ranks redistributed by explained variance")
    solver = INCREMENTAL_PCA
    changes_base = False
    quantizable = False
    adapts_parameters = False  # PEFT's EVA hooks nn.Linear (and a few layer types) only
    peft_name = "eva"
    config_init_lora_weights = "eva"
    calibration = "components"
    own_options = ("eva_rho", "eva_tau", "eva_whiten")

    def config_fields(self, options):
        from peft.tuners.lora.config import EvaConfig

        return {"eva_config": EvaConfig(rho=options["eva_rho"], tau=options["eva_tau"], whiten=options["eva_whiten"])}

    def check(self, options):
        super().check(options)
        if options.several_ranks:
            raise ValueError("method 'eva' redistributes one rank across modules: give one rank")
        if not options.eva_rho >= 1.0:
            raise ValueError(f"eva_rho must be >= 1 (the largest rank is r * rho), got {options.eva_rho!r}")
        if not 0.0 <= options.eva_tau <= 1.0:
            raise ValueError(f"eva_tau must be between 0 and 1, got {options.eva_tau!r}")

    def options_from_statistics(self, options, targets, found):
        from dataclasses import replace

        components, ranks, alphas = redistributed(found, targets, options.eva_rho, options.eva_whiten)
        r, alpha = options.ranks[0], options.lora_alpha
        kept = [t.module for t in targets if ranks.get(t.module, 0) > 0]
        dropped = sorted(m for m, k in ranks.items() if k == 0)
        chosen = replace(options, rank_pattern={m: k for m, k in ranks.items() if k and k != r},
                         alpha_pattern={m: a for m, a in alphas.items() if ranks[m] and a != alpha},
                         target_modules=kept if dropped else options.target_modules)
        record = {"ranks": ranks, "dropped": dropped, "rho": options.eva_rho, "tau": options.eva_tau,
                  "whiten": options.eva_whiten}
        return chosen, {t: c for t, c in components.items() if c.shape[0]}, record

    def rank_distribution(self, ratios, hook_of, max_components, budget):
        """PEFT's rank distribution from every hook's explained-variance ratios: what its
        loop (engine/components.py) chooses again after each step."""
        return rank_distribution(ratios, hook_of, max_components, budget)

    def factors_at_ranks(self, weight, ranks, *, niter, seed, adapter_dtype, fan_in_fan_out, statistic=None):
        from ..factors import Factors, float32_oriented

        if statistic is None:
            raise ValueError("method 'eva' needs the components of the weight's inputs (calibration data)")
        w, total = float32_oriented(weight, fan_in_fan_out, ranks)
        found = []
        for r, _ in ranks:
            if statistic.shape[0] < r or statistic.shape[1] != w.shape[1]:
                raise ValueError(f"the input components are {list(statistic.shape)}, rank {r} of a weight taking "
                                 f"{w.shape[1]} inputs asked for")
            a = statistic[:r].to(w.device, torch.float32)
            held = (w @ a.T).double().square().sum().item()  # W's energy in the rows of A
            found.append(Factors(lora_A=a.to(adapter_dtype).contiguous(),
                                 lora_B=torch.zeros(w.shape[0], r, dtype=adapter_dtype, device=w.device),
                                 residual=None, singular_values=torch.empty(0, device=w.device),
                                 energy_kept=held / total if total > 0 else 0.0, max_abs_error=0.0))
        return found

    def factor_problem(self, w, w_res, a, b, scale, tol, residual_eps=0.0):
        """B = 0 and A's rows orthogonal (principal directions of the inputs; unit length
        unless whitened)."""
        if b.abs().max().item() != 0:
            return "lora_B is not zero (EVA starts from B = 0)"
        rows = a.double() / torch.linalg.vector_norm(a.double(), dim=1, keepdim=True).clamp_min(1e-30)
        return orthonormal_problem(rows.T, tol)

    def lora_of_original(self, a, b, a0, b0):
        """The base is the original model: the trained adapter already is its LoRA."""
        return a, b

    def cost(self, rows, cols, r, niter):
        # the work is in the calibration (one incremental PCA step per batch); per weight only W A^T
        return 2.0 * rows * cols * r, 4 * (rows * cols + cols * r)


def rank_distribution(ratios: dict, hook_of: dict[str, str], max_components: dict[str, int], budget: int) -> dict:
    """PEFT's `_get_rank_distribution` (peft.tuners.lora.eva): the largest explained-variance
    ratios of all hooks, as many as the uniform ranks add up to (`budget`), each module at
    most its max_components; a module sharing its hook's input counts the hook's ratios, and
    the hooked module keeps the largest rank of its group. `ratios`: hook -> its ratios;
    `hook_of`: every module -> its hook, in the model's order. Returns module -> rank."""
    from collections import Counter

    hooked = list(dict.fromkeys(hook_of.values()))
    equal_inputs_map = {n: h for n, h in hook_of.items() if n != h}
    exp_vars = {h: ratios[h][: max_components[h]] for h in hooked}
    layer_hook_map = {**{h: h for h in hooked}, **equal_inputs_map}
    keys, values = zip(*[(k, c) for k, h in layer_hook_map.items() for c in exp_vars[h]])
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in idx[:budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook_map}
    for k, k_hook in equal_inputs_map.items():
        if counts[k_hook] < counts[k]:
            counts[k_hook], counts[k] = counts[k], counts[k_hook]
    return counts


def redistributed(found, targets, rho: float, whiten: bool, adjust_scaling: bool = True):
    """PEFT's rank redistribution at the end of its loop (`rank_distribution` of the final
    ratios), each module at most r * rho, and its components. `found`: collect_components'
    (index, owner, components, ratios, singular values) in the model's module order.
    Returns ({tensor: its lora_A}, {module: rank}, {module: alpha})."""
    by_index = {index: (owner, comps, ratios, values) for index, owner, comps, ratios, values in found}
    order = [index for index, *_ in found]
    name = {index: targets[index].module for index in order}
    owner_of = {name[i]: by_index[i][0] for i in order}
    hooked = {}  # owner -> the first module (model order) with that input: PEFT's hook
    for i in order:
        hooked.setdefault(owner_of[name[i]], name[i])
    hook_of = {name[i]: hooked[owner_of[name[i]]] for i in order}
    max_components = {name[i]: round(targets[i].r * rho) for i in order}
    for n, h in hook_of.items():
        max_components[h] = max(max_components[h], max_components[n])
    for n, h in hook_of.items():
        max_components[n] = max_components[h]
    ratios_of = {name[i]: by_index[i][2] for i in order}
    counts = rank_distribution({h: ratios_of[h] for h in hooked.values()}, hook_of, max_components,
                               sum(targets[i].r for i in order))
    components, ranks, alphas = {}, {}, {}
    made: dict[tuple[str, int], torch.Tensor] = {}  # modules given one input at one rank share their lora_A
    for i in order:
        module, target = name[i], targets[i]
        rank = counts[module]
        owner, comps, _, singular = by_index[i]  # a shared input's: the same for each module given it
        if comps.shape[0] < rank:
            raise ValueError(f"{module}: rank {rank} from {comps.shape[0]} components kept")
        if (owner, rank) not in made:
            u = comps[:rank].clone()
            if whiten:
                u /= singular[:rank].sqrt().reshape(-1, 1)
            # float32, as the factors take it (the same values): half the host memory until the units run
            made[owner, rank] = u.to(torch.float32)
        components[target.tensor] = made[owner, rank]
        ranks[module] = rank
        alphas[module] = target.lora_alpha * rank / target.r if adjust_scaling and rank != target.r \
            else target.lora_alpha
    return components, ranks, alphas
