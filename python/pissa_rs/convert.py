"""PiSSA -> LoRA after training: the fine-tuned adapter minus the initial one,
as a rank-2r LoRA for the ORIGINAL model, streamed one module at a time.

    dW = B A - B0 A0 = [B | -B0] [A ; A0]

(the initial adapter's method decides: MiLoRA and OLoRA share PiSSA's algebra; a MiCA adapter,
whose base is the original model, already is that LoRA and keeps its rank)
exactly what PEFT's `save_pretrained(out, path_initial_model_for_weight_conversion=init)`
writes, without loading any model. With `compact=True` each module's dW is
re-factored to its true rank (QR of the 2r factors, then an SVD of the small core)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint, ShardWriter
from .formats.peft_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterMismatchError,
    adapter_modules,
    module_scaling,
    param_wrappers,
)
from .hub import base_model_of
from .constants import REPORT_NAME
from .tensors import SAFETENSORS_DTYPES, TORCH_DTYPES, as_numpy_bytes, as_torch
from .noise import quiet_library_noise
from .precision import in_ieee_float32
from .svd import full_svd

CONVERSION_REPORT = "pissa_conversion.json"  # what a re-factored conversion dropped, per module

@dataclass
class ConversionResult:
    out: Path
    ranks: dict[str, int]  # module -> rank of its LoRA (2r, or the kept rank when re-factored)
    base_model: str  # the original model it applies to, as adapter_config.json names it
    # re-factored (compact, rank, energy, serve): module -> share of its update's squared
    # Frobenius norm the LoRA drops (0 where it is exact); the largest expert's for experts
    dropped: dict[str, float] | None = None
    max_lora_rank: int | None = None  # with serve: the rank to start the server with
    logit_change: dict | None = None  # with logit_check: logit_check.logit_change against the exact reference


def open_adapter(directory: Path) -> tuple[Checkpoint, dict]:
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise AdapterMismatchError(f"{path}: missing; an adapter directory holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    return Checkpoint(weights), json.loads(config.read_text())


def init_method(init_dir: Path, init_cfg: dict):
    """The methods.Method that made an initial adapter: as the decomposition's report beside it
    records, else as its adapter_config names a PEFT variant (MiCA's "mica"), else PiSSA's
    algebra (which MiLoRA and OLoRA share)."""
    from .methods import get_method

    report = init_dir.parent / REPORT_NAME
    if report.is_file():
        return get_method(json.loads(report.read_text()).get("options", {}).get("method", "pissa"))
    from .methods import METHODS

    named = init_cfg.get("init_lora_weights")
    variant = [m for m in METHODS.values() if named is not True and m.config_init_lora_weights == named]
    return variant[0] if variant else get_method("pissa")


def _check_pair(init_dir: Path, init_cfg: dict, tuned_dir: Path, tuned_cfg: dict, init_mods, tuned_mods, init, tuned,
                method):
    if init_cfg.get("init_lora_weights") not in (True, method.config_init_lora_weights):
        raise AdapterMismatchError(
            f"{init_dir / ADAPTER_CONFIG}: init_lora_weights is {init_cfg.get('init_lora_weights')!r}; the initial "
            "adapter must be saved with init_lora_weights=True (as pissa_rs writes it), or PEFT would re-run the SVD "
            "on load"
        )
    if set(init_mods) != set(tuned_mods):
        only = sorted(set(init_mods) ^ set(tuned_mods))[0]
        side = init_dir if only in init_mods else tuned_dir
        raise AdapterMismatchError(f"module '{only}' is only in {side}: the adapters do not belong together")
    for module, (a, b) in init_mods.items():
        ta, tb = tuned_mods[module]
        for mine, theirs in ((a, ta), (b, tb)):
            si, st = tuple(init.info(mine).shape), tuple(tuned.info(theirs).shape)
            if si != st:
                raise AdapterMismatchError(
                    f"module '{module}': {mine} is {list(si)} in {init_dir} but {list(st)} in {tuned_dir} "
                    "(different ranks or shapes): the adapters do not belong together"
                )
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        if init_cfg.get(key) != tuned_cfg.get(key):
            raise AdapterMismatchError(
                f"{tuned_dir / ADAPTER_CONFIG}: {key} is {tuned_cfg.get(key)!r} but {init_cfg.get(key)!r} in {init_dir}"
            )


REFACTORED_CACHE_BYTES = 1 << 30  # re-factored LoRA factors kept from the shapes pass to the writing pass

# The ranks vLLM takes for --max-lora-rank (it pre-allocates LoRA buffers at that rank).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SERVERS = {"vllm": VLLM_RANKS}


@dataclass(frozen=True)
class Truncation:
    """How each module's update is re-factored: at its numerical rank (singular values
    below `tol` x |B| |A| are zero), at most `rank`, or the fewest triplets that keep
    `energy` of its squared Frobenius norm (PEFT's convert_to_lora threshold)."""

    tol: float = 1e-6
    rank: int | None = None
    energy: float | None = None

    def __post_init__(self):
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None and (isinstance(self.energy, bool) or not 0 < self.energy <= 1):
            raise ValueError(f"energy must be in (0, 1], got {self.energy!r}")
        if self.rank is not None and self.energy is not None:
            raise ValueError("give rank or energy, not both")

    def keep(self, s: torch.Tensor, numerical: int) -> int:
        """How many of the update's triplets (singular values `s`, `numerical` of them above
        rounding) the LoRA keeps: at least one, so that every module stays in the adapter."""
        numerical = max(1, numerical)  # beyond it: rounding, never shipped
        if self.rank is not None:
            return min(self.rank, numerical)
        if self.energy is not None:
            cumulative = torch.cumsum(s.double() ** 2, dim=0)
            return min(int(torch.searchsorted(cumulative, self.energy * cumulative[-1]).item()) + 1, numerical)
        return numerical


def _compact(a: torch.Tensor, b: torch.Tensor, truncation: Truncation
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """B A re-factored as `truncation` says, from the factors alone: QR of B and A^T, SVD of
    the 2r x 2r core (no out x in matrix is formed). Returns (A', B', B A's singular values
    above rounding, the rank kept); B' A' is the best approximation of B A at that rank."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = full_svd(rb @ ra.T)
    # Relative to |B| |A|, not to the largest singular value: an update that
    # cancels out (fine-tuned == initial) must compact to nothing, not to noise.
    reference = torch.linalg.matrix_norm(rb) * torch.linalg.matrix_norm(ra)
    numerical = int((s > truncation.tol * reference).sum())
    keep = truncation.keep(s, numerical)
    root = torch.sqrt(s[:keep])
    new_b = (qb @ u[:, :keep]) * root
    new_a = root[:, None] * (vh[:keep] @ qa.T)
    return new_a.to(a.dtype), new_b.to(b.dtype), s[:numerical], keep


def original_model(init_dir: Path, init_cfg: dict, base_model: str | os.PathLike[str] | None,
                   revision: str | None) -> tuple[str, str | None]:
    """(name or path, revision) of the model the decomposition started from: what a
    converted LoRA applies to. `base_model` if given (a local path made absolute), else
    what the decomposition's report records (pissa_report.json beside pissa_init)."""
    if base_model is not None:
        origin = base_model_of(base_model, revision)
        return origin["name_or_path"], origin["revision"]
    residual = init_cfg.get("base_model_name_or_path")
    for report in dict.fromkeys([init_dir.parent / REPORT_NAME, *([Path(residual) / REPORT_NAME] if residual else [])]):
        if report.is_file():
            data = json.loads(report.read_text())
            origin = data.get("base_model") or {"name_or_path": data["input"], "revision": None}
            return origin["name_or_path"], origin["revision"]
    raise AdapterMismatchError(
        f"{init_dir}: no {REPORT_NAME} beside it says which model it was decomposed from, and the LoRA must name "
        "that original model (not the residual); pass base_model= (--base-model) with its path or Hub ID"
    )


class AdapterPair:
    """An initial adapter and the same adapter fine-tuned, checked to belong together: per
    module, the update as the factors of a LoRA of the original model (the initial
    adapter's method decides the algebra), per expert for PEFT's ParamWrapper layers."""

    def __init__(self, init_dir: str | os.PathLike[str], finetuned_dir: str | os.PathLike[str]):
        self.init_dir, self.finetuned_dir = Path(init_dir), Path(finetuned_dir)
        self.init, self.init_cfg = open_adapter(self.init_dir)
        self.tuned, self.tuned_cfg = open_adapter(self.finetuned_dir)
        self.init_mods = adapter_modules(self.init, self.init_dir)
        self.tuned_mods = adapter_modules(self.tuned, self.finetuned_dir)
        self.method = init_method(self.init_dir, self.init_cfg)
        _check_pair(self.init_dir, self.init_cfg, self.finetuned_dir, self.tuned_cfg, self.init_mods,
                    self.tuned_mods, self.init, self.tuned, self.method)
        self.wrapped = param_wrappers(self.init_dir)  # module -> (parameter, experts) for ParamWrapper layers

    def pattern_key(self, module: str) -> str:
        """What rank_pattern matches for a layer: its name, or for a ParamWrapper its parameter's."""
        name = module.removeprefix("base_model.model.")
        return self.wrapped[name][0] if name in self.wrapped else name

    def experts_of(self, module: str) -> int:
        return self.wrapped.get(module.removeprefix("base_model.model."), (None, 1))[1]

    def scale(self, module: str) -> float:
        """The fine-tuned adapter's scaling of `module` (alpha / r, rank and alpha patterns, rsLoRA)."""
        c = self.tuned_cfg
        return module_scaling(self.pattern_key(module), c["r"], c["lora_alpha"], dict(c.get("rank_pattern") or {}),
                              dict(c.get("alpha_pattern") or {}), bool(c.get("use_rslora")))[2]

    def updates(self, module: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) of `module`'s update, scale not applied, one pair per expert ([A ; A0] and
        [B | -B0] for PiSSA's algebra): PEFT's layout stacks experts' rows of A and
        interleaves their columns of B."""
        a0, b0 = (as_torch(self.init.buffer(k)) for k in self.init_mods[module])
        a, b = (as_torch(self.tuned.buffer(k)) for k in self.tuned_mods[module])
        experts = self.experts_of(module)
        if experts == 1:
            return [self.method.lora_of_original(a, b, a0, b0)]
        return [self.method.lora_of_original(*expert_factors(a, b, experts, e), *expert_factors(a0, b0, experts, e))
                for e in range(experts)]


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's (A, B) of a ParamWrapper layer's lora_A [E*r, in] and lora_B [out, r*E]."""
    rank = a.shape[0] // experts
    return a.view(experts, rank, a.shape[1])[e], b.view(b.shape[0], rank, experts)[:, :, e]


@in_ieee_float32
def convert_to_lora(init_dir: str | os.PathLike[str], finetuned_dir: str | os.PathLike[str],
                    out_dir: str | os.PathLike[str], *, compact: bool = False, tol: float = 1e-6,
                    rank: int | None = None, energy: float | None = None, serve: str | None = None,
                    base_model: str | os.PathLike[str] | None = None, revision: str | None = None,
                    logit_check: int = 0) -> ConversionResult:
    """Write the LoRA of the original model that equals `finetuned` on the residual model.

    The result matches PEFT's own conversion (same keys, shapes, values and config
    fields). `compact=True` drops singular values below `tol` x |B'| |A'|, per module,
    and records each module's kept rank in rank_pattern (scale folded into the factors).
    `rank=R`: each module's best rank-R approximation (its numerical rank where that is
    smaller: no zeros are shipped); `energy=E` (0 < E <= 1): per module the fewest triplets
    keeping E of the update's squared Frobenius norm. Both computed from the factors alone
    (QR of the thin factors, SVD of the small core), the dropped share per module in
    `OUT/pissa_conversion.json` and the result. `serve="vllm"`: re-factored as for compact
    (at most rank 512, the largest vLLM takes), and `max_lora_rank` the smallest rank vLLM
    accepts that holds every module.

    The LoRA's adapter_config.json names the original model as its base
    (base_model_name_or_path and revision), so `AutoPeftModelForCausalLM.from_pretrained(out_dir)`
    loads it onto that model: by default the one the decomposition's report records;
    `base_model` (a path or Hub ID, at `revision`) names it where the report is not beside
    `init_dir` or the original has moved.

    `logit_check=N`: N random token sequences through the original model with the LoRA and
    through the exact reference (the fine-tuned adapter on the residual model), one model in
    memory at a time: KL, top-1 agreement and |logit| differences, in the result and in
    `OUT/pissa_conversion.json`.
    """
    with quiet_library_noise():
        from peft import LoraConfig

    out_dir = Path(out_dir)
    truncation = Truncation(tol, rank, energy)  # bad values refused before anything is read or written
    if serve is not None and serve not in SERVERS:
        raise ValueError(f"serve must be one of {', '.join(SERVERS)}, got {serve!r}")
    if serve is not None and rank is not None and rank > SERVERS[serve][-1]:
        raise ValueError(f"rank {rank}: {serve} serves LoRAs of rank {SERVERS[serve][-1]} at most")
    if serve is not None and rank is None and energy is None:
        truncation = Truncation(tol, SERVERS[serve][-1])
    refactor = compact or rank is not None or energy is not None or serve is not None
    pair = AdapterPair(init_dir, finetuned_dir)
    init, tuned, init_mods, tuned_mods, method = pair.init, pair.tuned, pair.init_mods, pair.tuned_mods, pair.method
    base, base_revision = original_model(pair.init_dir, pair.init_cfg, base_model, revision)

    config = LoraConfig.from_pretrained(str(pair.finetuned_dir))
    config.init_lora_weights = True
    config.eva_config = config.corda_config = None  # a plain LoRA now: nothing for PEFT to initialize (or warn of)
    config.inference_mode = True
    config.base_model_name_or_path, config.revision = base, base_revision
    r, alpha = config.r, config.lora_alpha
    pattern_key, experts_of = pair.pattern_key, pair.experts_of

    dropped: dict[str, float] = {}

    def refactored(a: torch.Tensor, b: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        new_a, new_b, s, keep = _compact(a, b, truncation)
        energy_of = s.double() ** 2
        share = float(energy_of[keep:].sum() / energy_of.sum()) if energy_of.sum() > 0 else 0.0  # zero: none
        dropped[module] = max(dropped.get(module, 0.0), share)
        return new_a, new_b

    def delta_factors(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[A ; A0] and [B | -B0] for one module, re-factored if asked; for a layer over
        E experts, per expert, in PEFT's layout (expert-major rows of A, expert-minor
        columns of B): PEFT's own conversion concatenates the whole matrices, which
        mixes the experts up."""
        experts, scale = experts_of(module), pair.scale(module)
        pairs = pair.updates(module)
        if experts == 1:
            new_a, new_b = pairs[0]
            return refactored(new_a * scale, new_b, module) if refactor else (new_a, new_b)
        n_in, n_out = pairs[0][0].shape[1], pairs[0][1].shape[0]
        if refactor:  # one rank for the layer (PEFT's ParamWrapper): the largest any expert needs, the others
            # padded with zeros
            pairs = [refactored(pa * scale, pb, module) for pa, pb in pairs]
            k = max(pa.shape[0] for pa, _ in pairs)
            pairs = [(torch.nn.functional.pad(pa, (0, 0, 0, k - pa.shape[0])),
                      torch.nn.functional.pad(pb, (0, k - pb.shape[1]))) for pa, pb in pairs]
        new_a = torch.stack([pa for pa, _ in pairs])  # experts x k x in
        new_b = torch.stack([pb for _, pb in pairs], dim=2)  # out x k x experts
        return new_a.reshape(-1, n_in), new_b.reshape(n_out, -1)

    # Shapes first (the writer lays the file out up front): 2r each (r for a method whose base is
    # the original: its adapter is a LoRA of it already), or with compact the kept ranks, from a
    # first pass whose factors are kept while they fit in REFACTORED_CACHE_BYTES (the second pass
    # computes only the rest again: the same bytes either way).
    growth = method.lora_of_original(*[torch.zeros(1, 1)] * 4)[0].shape[0]
    ranks: dict[str, int] = {}
    specs = []
    cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    room = REFACTORED_CACHE_BYTES
    for module, (a_key, b_key) in tuned_mods.items():
        (a_rows, in_f), (out_f, _) = tuple(tuned.info(a_key).shape), tuple(tuned.info(b_key).shape)
        dtype = SAFETENSORS_DTYPES[torch.promote_types(TORCH_DTYPES[tuned.info(a_key).dtype],
                                                       TORCH_DTYPES[init.info(init_mods[module][0]).dtype])]
        if refactor:
            found = delta_factors(module)
            size = sum(t.numel() * t.element_size() for t in found)
            if size <= room:
                cached[module], room = found, room - size
            k = found[0].shape[0]
        else:
            k = a_rows * growth
        ranks[pattern_key(module)] = k // experts_of(module)
        specs += [(a_key, dtype, [k, in_f]), (b_key, dtype, [out_f, k])]

    max_lora_rank = None
    if serve is not None:
        largest = max(ranks.values())
        max_lora_rank = next(k for k in SERVERS[serve] if k >= largest)  # truncation kept it <= the largest
    if refactor:
        config.r = max(ranks.values())
        config.lora_alpha = config.r
        config.use_rslora = False
        # A ParamWrapper layer's rank is named even where it is r: PEFT (0.22 on) rewrites the
        # pattern of fused experts to 2r when it loads the adapter, and the first key that
        # matches wins, so the layer's own key must come before the one PEFT appends.
        wrapped = {parameter for parameter, _ in pair.wrapped.values()}
        named = {m: k for m, k in ranks.items() if k != config.r or m in wrapped}
        config.rank_pattern = {re.escape(m): k for m, k in named.items()}
        config.alpha_pattern = {re.escape(m): k for m, k in named.items()}
    elif growth == 2:  # PEFT's doubling
        config.r = 2 * r
        config.lora_alpha = alpha * (2**0.5 if config.use_rslora else 2)
        config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
        config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}

    out_dir.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out_dir / ADAPTER_WEIGHTS, specs, metadata={"format": "pt"}) as writer:  # aborts on error
        for module, (a_key, b_key) in tuned_mods.items():
            new_a, new_b = cached.pop(module) if module in cached else delta_factors(module)
            writer.write(a_key, as_numpy_bytes(new_a))
            writer.write(b_key, as_numpy_bytes(new_b))
    config.save_pretrained(str(out_dir))
    change = None
    if logit_check:
        from .logit_check import logit_change

        reference = pair.init_dir.parent if method.changes_base else base  # what the fine-tuned adapter was trained on
        change = logit_change((reference, pair.finetuned_dir), (base, out_dir), samples=logit_check)
    if refactor or change is not None:
        record = {"truncation": {"tol": tol, "rank": rank, "energy": energy, "serve": serve} if refactor else None,
                  "max_lora_rank": max_lora_rank, "logit_change": change,
                  "modules": {pattern_key(m): {"rank": ranks[pattern_key(m)], "dropped": dropped.get(m, 0.0)}
                              for m in tuned_mods}}
        (out_dir / CONVERSION_REPORT).write_text(json.dumps(record, indent=1) + "\n")
    else:
        (out_dir / CONVERSION_REPORT).unlink(missing_ok=True)
    return ConversionResult(out_dir, ranks, base, dropped={pattern_key(m): d for m, d in dropped.items()}
                            if refactor else None, max_lora_rank=max_lora_rank, logit_change=change)
