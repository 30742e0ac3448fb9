"""PEFT's adapter layout: key names in adapter_model.safetensors and the
adapter_config.json that PEFT's own LoraConfig writes and reads."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .._pissa_rs import Checkpoint, PissaError
from ..factors import scaling
from ..planning.mapping import WeightRead
from .. import compat
from ..constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PARAM_WRAPPERS
from ..noise import quiet_library_noise

A_KEY = re.compile(r"^(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight$")


class AdapterMismatchError(PissaError, ValueError):
    """The initial and fine-tuned adapters do not belong together, or the input is not a PiSSA adapter pair."""


def adapter_modules(adapter: Checkpoint, where: Path | str) -> dict[str, tuple[str, str]]:
    """Every module of an adapter file, as its keys name it ("base_model.model.<module>"),
    -> (lora_A key, lora_B key). An A without its B, or no module at all, is refused."""
    modules = {}
    for name in adapter.names():
        match = A_KEY.match(name)
        if match:
            b = name.replace(".lora_A", ".lora_B", 1)
            if b not in adapter:
                raise AdapterMismatchError(f"{where}: module '{match['module']}' has {name} but no {b}")
            modules[match["module"]] = (name, b)
    if not modules:
        raise AdapterMismatchError(f"{where}: no lora_A / lora_B weights found")
    return modules


def module_scaling(module: str, r: int, lora_alpha: float, rank_pattern: dict, alpha_pattern: dict,
                   use_rslora: bool) -> tuple[int, float, float]:
    """PEFT's rank, alpha and scale s for one module (its name in the model), rank_pattern
    and alpha_pattern applied as PEFT's LoRA layers apply them."""
    rank = rank_pattern.get(compat.pattern_key(rank_pattern.keys(), module), r)
    alpha = alpha_pattern.get(compat.pattern_key(alpha_pattern.keys(), module), lora_alpha)
    return rank, alpha, scaling(rank, alpha, use_rslora)


def residual_weight_name(residual: Checkpoint, module: str) -> str | None:
    """The residual's weight for an adapter module ("base_model.model.<module>"):
    the same name, or without the head model's first component."""
    name = module.removeprefix("base_model.model.")
    for candidate in (f"{name}.weight", f"{name.split('.', 1)[-1]}.weight"):
        if candidate in residual:
            return candidate
    return None


@dataclass
class AdapterTarget:
    """One adapter module (or one expert of a layer over several) and the residual
    weight it belongs to."""

    tensor: str  # the weight's name in the residual checkpoint; an expert's "<parameter>[e]"
    module: str  # as the adapter's keys name it: "base_model.model.<module>"
    a_key: str
    b_key: str
    r: int
    scale: float
    fan_in_fan_out: bool
    # An expert, or a weight stored in FP8 / MXFP4: where its bytes are in the original
    # (`pieces`) and in the residual (`written`), and which of the layer's experts it is
    location: WeightRead | None = None  # where its bytes are, if not the whole of `tensor`
    expert: int | None = None
    num_experts: int = 1
    quantized_at_load: bool = True  # whether bitsandbytes quantizes it at load (experts and routers: no)

    def _factors(self, adapter: Checkpoint):
        """(s * B, A) in float32; for an expert, its own rows of A and columns of B."""
        from ..tensors import as_torch

        a, b = as_torch(adapter.buffer(self.a_key)).float(), as_torch(adapter.buffer(self.b_key)).float()
        if self.expert is not None:  # PEFT's ParamWrapper: expert e's rows of A, every E-th column of B
            a = a.view(self.num_experts, self.r, a.shape[1])[self.expert]
            b = b.view(b.shape[0], self.r, self.num_experts)[:, :, self.expert]
        return self.scale * b, a

    def factors(self, adapter: Checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float32, out x in orientation; for an expert, its own rows and columns."""
        sb, a = self._factors(adapter)
        return a, sb / self.scale

    def delta(self, adapter: Checkpoint):
        """s * B @ A in float32, laid out as the weight is stored."""
        sb, a = self._factors(adapter)
        delta = sb @ a
        return delta.T if self.fan_in_fan_out else delta

    def delta_rounding(self, adapter: Checkpoint):
        """How far two float32 computations of s * B @ A may differ elementwise, whatever
        their summation order (BLAS kernels differ by CPU and library version): the
        classic bound r * eps32 * |s B| @ |A| on each, twice. Laid out as delta."""
        sb, a = self._factors(adapter)
        bound = (2 * a.shape[0] * torch.finfo(torch.float32).eps) * (sb.abs() @ a.abs())
        return bound.T if self.fan_in_fan_out else bound

    def weight(self, checkpoint: Checkpoint, residual: bool = False):
        """The weight in its dtype and layout, from the original `checkpoint` (decoded if
        stored in FP8 / MXFP4) or, with `residual`, from a decomposition's output."""
        from ..tensors import as_torch

        if self.location is None:
            return as_torch(checkpoint.buffer(self.tensor))
        return self.location.read(checkpoint, residual=residual)


def adapter_targets(adapter_dir: Path, adapter: Checkpoint, residual: Checkpoint, residual_dir: Path | str
                    ) -> list[AdapterTarget]:
    """Every module of the adapter in `adapter_dir`, paired with its weight in
    `residual`, with PEFT's rank and scale. Refuses, naming the module, an adapter
    whose module has no weight there or whose shapes do not fit it."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    # A decomposition's report knows each module's tensor (names on disk can differ from the
    # model's), and the shape of every weight stored pre-quantized (save_quantized).
    report_path = Path(residual_dir) / "pissa_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    recorded = {t["module"]: t["tensor"] for t in report.get("tensors", []) if t.get("expert") is None}
    reads = {t["module"]: WeightRead.from_record(t) for t in report.get("tensors", [])
             if t.get("expert") is None and t.get("pieces")}
    params = {t["module"]: t["parameter"] for t in report.get("tensors", []) if t.get("parameter")}
    experts: dict[str, list[dict]] = {}
    for t in report.get("tensors", []):
        if t.get("expert") is not None:
            experts.setdefault(t["module"], []).append(t)
    shapes = {name: tuple(w["shape"]) for name, w in report.get("stored_quantized", {}).items()}
    targets = []
    for module, (a_key, b_key) in adapter_modules(adapter, adapter_dir / ADAPTER_WEIGHTS).items():
        name = module.removeprefix("base_model.model.")
        if name in experts:
            targets += _expert_targets(adapter_dir, config, adapter, residual, residual_dir, module, a_key, b_key,
                                       params[name], experts[name])
            continue
        tensor = recorded.get(name)
        tensor = tensor if tensor is not None and tensor in residual else residual_weight_name(residual, module)
        if tensor is None:
            raise AdapterMismatchError(f"{adapter_dir}: module '{module}' has no weight in {residual_dir}")
        a_shape, b_shape = adapter.info(a_key).shape, adapter.info(b_key).shape
        w_shape = shapes.get(tensor) or tuple(residual.info(tensor).shape)
        expected = (a_shape[1], b_shape[0]) if fan_in_fan_out else (b_shape[0], a_shape[1])
        if w_shape != expected or a_shape[0] != b_shape[1]:
            raise AdapterMismatchError(
                f"{adapter_dir}: module '{module}': adapter B{list(b_shape)} A{list(a_shape)} does not fit weight "
                f"'{tensor}' {list(w_shape)} of {residual_dir}; they do not belong together"
            )
        r, _, scale = module_scaling(params.get(name, name), config["r"], config["lora_alpha"],
                                     config.get("rank_pattern") or {}, config.get("alpha_pattern") or {},
                                     config.get("use_rslora", False))
        if a_shape[0] != r:
            raise AdapterMismatchError(
                f"{adapter_dir}: module '{module}' ({tensor}): adapter rank {a_shape[0]} but adapter_config says r={r}"
            )
        targets.append(AdapterTarget(tensor, module, a_key, b_key, r, scale, fan_in_fan_out, reads.get(name),
                                     quantized_at_load=name not in params))
    return targets


def _expert_targets(adapter_dir, config, adapter, residual, residual_dir, module, a_key, b_key, param, records
                    ) -> list[AdapterTarget]:
    """One AdapterTarget per expert of a ParamWrapper layer, from the report's records
    of where each expert's bytes are."""
    experts = records[0]["num_experts"]
    r, _, scale = module_scaling(param, config["r"], config["lora_alpha"], config.get("rank_pattern") or {},
                                 config.get("alpha_pattern") or {}, config.get("use_rslora", False))
    a_shape, b_shape = tuple(adapter.info(a_key).shape), tuple(adapter.info(b_key).shape)
    found = []
    for t in sorted(records, key=lambda t: t["expert"]):
        shape = tuple(t["shape"])
        rows, cols = (shape[1], shape[0]) if t["fan_in_fan_out"] else shape
        if a_shape != (r * experts, cols) or b_shape != (rows, r * experts):
            raise AdapterMismatchError(
                f"{adapter_dir}: module '{module}': adapter B{list(b_shape)} A{list(a_shape)} does not fit "
                f"{experts} experts of {list(shape)} at rank {r} ({param} of {residual_dir})")
        read = WeightRead.from_record(t)
        for p in read.written:
            if p.tensor not in residual:
                raise AdapterMismatchError(f"{adapter_dir}: module '{module}': expert {t['expert']} is in tensor "
                                           f"'{p.tensor}', which {residual_dir} lacks")
        found.append(AdapterTarget(t["tensor"], module, a_key, b_key, r, scale, t["fan_in_fan_out"],
                                   read, t["expert"], experts, quantized_at_load=False))
    if [t.expert for t in found] != list(range(experts)):
        raise AdapterMismatchError(f"{residual_dir}: the report lists experts {[t.expert for t in found]} of "
                                   f"'{module}', not all {experts}")
    return found


def lora_a_key(module: str) -> str:
    """The key PeftModel.save_pretrained gives a module's lora_A."""
    return f"base_model.model.{module}.lora_A.weight"


def lora_b_key(module: str) -> str:
    return f"base_model.model.{module}.lora_B.weight"


def factor_shapes(t, experts: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """lora_A [r*experts, in] and lora_B [out, r*experts] of target `t` (stored in x out
    when fan_in_fan_out)."""
    rows, cols = (t.shape[1], t.shape[0]) if t.fan_in_fan_out else t.shape
    return (t.r * experts, cols), (rows, t.r * experts)


def adapter_shapes(targets) -> list[tuple[str, tuple[int, int]]]:
    """(key, shape) of every adapter weight for these targets, as PEFT lays them out:
    lora_A [r, in] and lora_B [out, r] per layer; a layer over E experts (PEFT's
    ParamWrapper) holds all of them, lora_A [r*E, in] and lora_B [out, r*E]."""
    shapes, seen = [], set()
    for t in targets:
        if t.module in seen:
            continue
        seen.add(t.module)
        a, b = factor_shapes(t, t.num_experts)
        shapes += [(lora_a_key(t.module), a), (lora_b_key(t.module), b)]
    return shapes


def param_wrappers_json(targets) -> str | None:
    """PARAM_WRAPPERS' text for these targets, None when no target is a parameter."""
    wrappers = {t.module: {"parameter": t.parameter, "num_experts": t.num_experts}
                for t in targets if t.parameter is not None}
    return json.dumps(dict(sorted(wrappers.items())), indent=1) if wrappers else None


def param_wrappers(adapter_dir: Path) -> dict[str, tuple[str, int]]:
    """What param_wrappers_json wrote beside an initial adapter: its PEFT ParamWrapper
    layers (MoE experts, routers) -> (the parameter each adapts, its number of experts);
    PEFT's own files do not say which layer holds which parameter, and rank_pattern
    matches parameters. Empty for an adapter without such layers."""
    path = Path(adapter_dir) / PARAM_WRAPPERS
    if not path.is_file():
        return {}
    return {module: (v["parameter"], v["num_experts"]) for module, v in json.loads(path.read_text()).items()}


def adapter_config(
    *,
    r: int,
    lora_alpha: float,
    target_modules: str | list[str],
    target_parameters: list[str] | None = None,
    exclude_modules: str | list[str] | None,
    rank_pattern: dict[str, int] | None,
    alpha_pattern: dict[str, float] | None,
    use_rslora: bool,
    fan_in_fan_out: bool,
    task_type: str | None,
    base_model_name_or_path: str,
    init_lora_weights: bool | str = True,
    **fields,
):
    """The config of an initialised adapter, as PEFT expects to load it:
    init_lora_weights=True (the SVD is already done; or the method's PEFT variant, MiCA's
    "mica", which freezes lora_B) and no dropout (dropping principal components at random
    would defeat PiSSA)."""
    with quiet_library_noise():
        from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=sorted(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules,
        target_parameters=list(target_parameters) if target_parameters else None,
        exclude_modules=exclude_modules,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        init_lora_weights=init_lora_weights,
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        **fields,
    )


def with_base_model(config_json: str, origin: dict[str, str | None]) -> str:
    """adapter_config.json's text naming `origin` (base_model_of's name_or_path and revision)
    as the model the adapter applies to."""
    data = json.loads(config_json)
    data["base_model_name_or_path"], data["revision"] = origin["name_or_path"], origin.get("revision")
    return json.dumps(data, indent=2, sort_keys=True)


def adapter_config_json(config) -> str:
    """adapter_config.json's text, as PEFT's own serializer writes it (indent 2, sorted
    keys), but with its sets (target_modules) sorted: PEFT writes them in set order,
    which changes from process to process, and the same run must give the same bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        data = json.loads((Path(tmp) / ADAPTER_CONFIG).read_text())
    for key, value in data.items():
        if isinstance(getattr(config, key, None), set):
            data[key] = sorted(value)
    return json.dumps(data, indent=2, sort_keys=True)
