"""Every choice of a decomposition, in one object: validated once, shared by the API,
the CLI (whose flags are generated from its fields) and the engine."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import torch

from .calibration.samples import DEFAULT_BATCH, DEFAULT_LENGTH, DEFAULT_SAMPLES
from .engine.devices import parse_devices
from .methods import get_method, method_names
from .quant import QUANT_TYPES, Quantization

ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def modules_text(text: str) -> str | list[str]:
    """'all-linear' or a regex stays a string; 'q_proj,v_proj' is a list of suffixes."""
    if text.lower() == "all-linear" or "," not in text and any(c in text for c in "^$*+?()[]|\\"):
        return text
    return [part.strip() for part in text.split(",") if part.strip()]


def ranks_text(text: str) -> int | list[int]:
    parts = [int(p) for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 and "," not in text else parts


def names_text(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(text: str | int) -> int:
    """A size in bytes: an integer, or a number with a unit (16GiB, 500MB, 1.5 TB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if match is None or match.group(2).upper() not in _BYTE_UNITS:
        raise ValueError(f"not a size: {text!r} (bytes, or a number with KB, MB, GB, KiB, MiB, GiB...)")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2).upper()])


def pattern_text(cast):
    def parse(text: str) -> dict:
        out = {}
        for item in text.split(","):
            key, sep, value = item.rpartition("=")
            if not sep or not key:
                raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {item!r}")
            out[key.strip()] = cast(value)
        return out

    return parse


def option(default: Any = None, help: str = "", *, parse=None, choices=None, flag: str | None = None,
           short: str | None = None, group: str | None = None, cli: bool = True, factory=None,
           off_help: str | None = None):
    """A DecomposeOptions field and the CLI flag generated from it (add_options): `help` is
    its one description; `parse` turns the flag's text into the value; `off_help` describes
    the --no-... flag of a bool that defaults to True."""
    metadata = {"help": help, "parse": parse, "choices": choices, "flag": flag, "short": short, "group": group,
                "cli": cli, "off_help": off_help}
    return field(default_factory=factory, metadata=metadata) if factory else field(default=default, metadata=metadata)


@dataclass
class DecomposeOptions:
    """Every choice of a decomposition, validated once; the API, the CLI and the engine share it."""

    r: int | list[int] = option(128, "adapter rank r, or several (16,32,64,128): one SVD at the largest, one "
                                "complete output per rank", parse=ranks_text, flag="--rank", short="-r")
    method: str = option("pissa", "the initialization method: " + ", ".join(method_names())
                         + " (docs: Methods)", parse=str)
    lora_alpha: float | None = option(None, "LoRA alpha; scale s = alpha / r (default: alpha = r, s = 1)", parse=float)
    niter: int = option(4, "subspace iterations of the randomized SVD (PEFT pissa_niter_K); 0 = exact SVD "
                        "(PEFT 'pissa')", parse=int)
    target_modules: str | list[str] = option(
        "all-linear", "'all-linear' (every linear layer but the output head), comma-separated module name "
        "suffixes (q_proj,v_proj), or a regex matched against full module names", parse=modules_text)
    exclude_modules: str | list[str] | None = option(None, "suffixes or a regex of modules to leave alone",
                                                     parse=modules_text)
    target_parameters: list[str] | None = option(
        None, "MoE: parameters PEFT adapts through target_parameters, by name or suffix "
        "(mlp.experts.gate_up_proj,mlp.experts.down_proj), on top of what PEFT's own expansion of target_modules "
        "adds on this model; each expert gets its own PiSSA split", parse=names_text)
    exclude_parameters: list[str] | None = option(
        None, "parameters to leave alone, by name or suffix, e.g. mlp.gate.weight (keep the routers frozen)",
        parse=names_text)
    rank_pattern: dict[str, int] = option(help="per-module ranks as PEFT's rank_pattern: NAME=R[,NAME=R...]",
                                          parse=pattern_text(int), factory=dict)
    alpha_pattern: dict[str, float] = option(help="per-module alphas as PEFT's alpha_pattern: NAME=A[,NAME=A...]",
                                             parse=pattern_text(float), factory=dict)
    use_rslora: bool = option(False, "rank-stabilized scale s = alpha / sqrt(r)")
    rank_budget: bool = option(False, "choose each module's rank from its spectrum: the adapter parameters of a uniform "
                               "--rank, spent where they keep the most of each module's energy (a spectra pass "
                               "first; written as rank_pattern)")
    rank_floor: int | None = option(None, "with rank_budget: the smallest rank a module gets (default r // 4, at "
                                    "least 1)", parse=int)
    rank_cap: int | None = option(None, "with rank_budget: the largest rank a module gets, and the rank the spectra "
                                  "are measured to (default 2r)", parse=int)
    calibration: Any = option(None, "data-aware methods (corda-ipm, corda-kpm, eva, lora-ga): calibration text, a text file (one "
                              "sample per paragraph), a JSONL file with a 'text' field, or a saved datasets "
                              "Dataset folder (API: also a Dataset or a list of strings)", parse=str)
    calibration_samples: int | None = option(None, f"with calibration: the first N texts are the samples (default: "
                                             f"up to {DEFAULT_SAMPLES})", parse=int)
    calibration_length: int | None = option(None, f"with calibration: each sample truncated to this many tokens "
                                            f"(default {DEFAULT_LENGTH}, or the model's context if shorter)", parse=int)
    calibration_batch: int = option(DEFAULT_BATCH, "with calibration: samples per forward (right-padded; padding "
                                    "never counts)", parse=int)
    calibration_dtype: str = option("auto", "with calibration: the dtype the layers run in; auto: float32 on a CPU "
                                    "(most CPUs emulate bfloat16 and float16 matmuls, ~10x slower, and the stored "
                                    "weights upcast exactly), the stored dtype on a GPU",
                                    choices=["auto", *sorted(ADAPTER_DTYPES)])
    host_memory: str | None = option(None, "with calibration: host memory for the hidden states carried between "
                                     "layers (e.g. 16GiB); within it they are held in memory (pinned for a GPU) "
                                     "besides their file on disk, above it read back from the file batch by batch; "
                                     "on a CPU, also what a MoE layer's expert covariances may take at once "
                                     "(default: half the memory available when the run starts)", parse=str)
    calibrate_all_experts: bool = option(False, "methods corda-ipm, corda-kpm on MoE experts: every token's "
                                         "covariance goes to every expert (the model's output still follows its "
                                         "routing), for experts the calibration text barely reaches")
    eva_rho: float = option(2.0, "method eva: ranks are redistributed by explained variance, each module's at most "
                            "r * rho (1: no redistribution)", parse=float)
    eva_tau: float = option(0.99, "method eva: the components have converged when their cosine similarity between "
                            "two batches reaches tau", parse=float)
    eva_whiten: bool = option(False, "method eva: whiten the components (divide by the square root of their singular "
                              "values)")
    lora_ga_direction: str = option("ArB2r", "method lora-ga: which of the gradient's top 2r triplets go to A and "
                                    "which to B (PEFT's LoraGAConfig.direction; random draws from --seed)",
                                    choices=["ArBr", "A2rBr", "ArB2r", "random"])
    lora_ga_scale: str = option("stable", "method lora-ga: how B (and A) are scaled (PEFT's LoraGAConfig.scale)",
                                choices=["stable", "weight_svd", "gd_scale", "unit"])
    lora_ga_gamma: float = option(16.0, "method lora-ga, scale stable: B times out_features^0.25 / sqrt(gamma)",
                                  parse=float)
    calibration_sha256: str | None = option(None, "set by the driver: the tokenized samples' hash", cli=False)
    extract_base: str | None = option(None, "method extract: the base model the fine-tuned input started from (a "
                                      "folder); the adapter is a LoRA of it", parse=str)
    extract_base_state: list | None = option(None, "set by the driver: the base's files (size, mtime), so a resume "
                                             "notices a changed base", cli=False)
    extract_energy: float | None = option(None, "method extract: per module the fewest of the r triplets that keep "
                                          "this share (0 < E <= 1) of ||W_ft - W_base||^2, as rank_pattern; r is "
                                          "then the largest rank a module gets", parse=float)
    extract_save_modules: list[str] | None = option(None, "method extract: modules of the fine-tuned model carried "
                                                    "whole as PEFT's modules_to_save (names or name suffixes, "
                                                    "comma-separated; 'all': every one that differs from the base "
                                                    "and is not adapted)", parse=names_text)
    device: str | None = option(None, "torch device for the SVDs, e.g. cuda:0 (default: cuda if available, "
                                "else cpu)", group="device")
    devices: list[str] | None = option(None, "several devices of one type sharing the weights, comma-separated "
                                       "(cuda:0,cuda:1); the output is byte-identical to a one-device run",
                                       parse=names_text, group="device")
    seed: int = option(0, "seed of the randomized SVD; each tensor's seed derives from it and the tensor name",
                       parse=int)
    adapter_dtype: str = option("float32", "dtype of lora_A / lora_B", choices=sorted(ADAPTER_DTYPES))
    svd_rank: int | None = option(None, "set by for_rank: the rank of the SVD all ranks share", cli=False)
    budget_chosen: bool = option(False, "set by the driver: rank_pattern holds rank_budget's choice", cli=False)
    on_cluster: bool = option(False, "set for a Ray run: the devices are the nodes' (each task maps them to its "
                              "own), not looked for on this machine", cli=False)
    quantize: str | None = option(None, "QPiSSA: the bitsandbytes quantization training will load the residual "
                                  "with; the report gives each weight's quantization-error reduction against QLoRA",
                                  choices=list(QUANT_TYPES))
    quant_iters: int = option(1, "with quantize: QPiSSA iterations T; T > 1 stores deq(quant(W - s*B@A)) as the "
                              "residual (1: the plain PiSSA residual)", parse=int)
    double_quant: bool = option(False, "with quantize nf4/fp4: bitsandbytes' double quantization "
                                "(bnb_4bit_use_double_quant)")
    compare_loftq: bool = option(False, "with quantize: also measure LoftQ's error at the same rank and iterations")
    measure_error: bool = option(True, "with quantize: measure each weight's quantization-error reduction (two full "
                                 "SVDs per weight)", off_help="with quantize: skip the per-weight error measurement "
                                 "(two full SVDs per weight; slow on a CPU for big models); `pissa-rs qerror` can "
                                 "measure it later")
    save_quantized: bool = option(False, "with quantize: store the residual already quantized, in the serialized "
                                  "bitsandbytes format transformers loads directly (quantization_config in "
                                  "config.json): ~4x smaller for nf4")
    keep_source_format: bool = option(False, "an FP8 checkpoint (fine-grained block scales or compressed-tensors): "
                                      "store the residual re-quantized in that FP8 format instead of bfloat16 (half "
                                      "the bytes); the report gives the error re-quantization adds")
    allow_mixed_rounding: bool = option(
        False, "let a resumed run, or a Ray cluster's nodes, round differently from one another (their rounding "
        "probes differ): the output is then no single machine's bytes; the report says which tensors came from "
        "which probe")

    @classmethod
    def from_fields(cls, given: dict[str, Any], on_cluster: bool = False) -> DecomposeOptions:
        """Options from keyword arguments, a misspelt name named with the closest one;
        `on_cluster`: for a Ray run, whose devices are the nodes'."""
        import difflib

        known = [f.name for f in fields(cls) if f.metadata.get("cli", True)]
        for name in given:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise TypeError(f"unknown option {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                + f" (the options: {', '.join(known)})")
        return cls(**given, on_cluster=on_cluster).validate()

    def validate(self) -> DecomposeOptions:
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})
        method = get_method(self.method)  # a typo is named with the list
        ranks = list(self.r) if isinstance(self.r, (list, tuple)) else [self.r]
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"r must be a positive integer or a list of them, got {self.r!r}")
        if not ranks:
            raise ValueError("r must name at least one rank")
        self.r = sorted(set(ranks)) if isinstance(self.r, (list, tuple)) else self.r
        for name in ("target_parameters", "exclude_parameters"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if value is not None and not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a list of parameter names or suffixes, got {value!r}")
            setattr(self, name, sorted(set(value)) if value else None)
        if self.several_ranks and self.rank_pattern:
            raise ValueError("rank_pattern cannot be combined with several ranks: give one rank per run")
        self._check_budget()
        if self.lora_alpha is None and not self.several_ranks:
            self.lora_alpha = self.r
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if isinstance(self.niter, bool) or not isinstance(self.niter, int) or self.niter < 0:
            raise ValueError(f"niter must be an integer >= 0, got {self.niter!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {sorted(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                if not (isinstance(value, (int, float)) and value > 0):
                    raise ValueError(f"{name}[{key!r}] must be positive, got {value!r}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {self.quantize!r}")
        if isinstance(self.quant_iters, bool) or not isinstance(self.quant_iters, int) or self.quant_iters < 1:
            raise ValueError(f"quant_iters must be an integer >= 1, got {self.quant_iters!r}")
        if self.quantize is None and (self.quant_iters > 1 or self.compare_loftq or self.double_quant):
            raise ValueError("quant_iters, double_quant and compare_loftq need quantize ('nf4', 'fp4' or 'int8')")
        if self.compare_loftq and not self.measure_error:
            raise ValueError("compare_loftq needs measure_error: LoftQ is compared by the same measurement")
        if self.save_quantized and self.quantize is None:
            raise ValueError("save_quantized needs quantize ('nf4', 'fp4' or 'int8'): the format to store")
        if self.keep_source_format and self.save_quantized:
            raise ValueError("keep_source_format and save_quantized name two formats for one residual: choose one")
        if self.double_quant and self.quantize == "int8":
            raise ValueError("double_quant applies to 4-bit quantization, not int8")
        if self.devices is not None:
            if self.device is not None:
                raise ValueError("give device or devices, not both")
            self.devices = [str(d) for d in parse_devices(list(self.devices), here=not self.on_cluster)]
            self.device = self.devices[0]
        else:
            if self.device is None:
                self.device = "cuda" if torch.cuda.device_count() > 0 else "cpu"  # NVML's count: fork-safe
            self.device = str(parse_devices([self.device], here=not self.on_cluster)[0])
        self._check_calibration(method)
        method.check(self)
        return self

    def _check_calibration(self, method) -> None:
        from .methods import METHODS

        defaults = {f.name: f.default for f in fields(self)}
        owners: dict[str, list[str]] = {}
        for other in METHODS.values():
            for name in other.own_options:
                owners.setdefault(name, []).append(repr(other.name))
        changed = [n for n in owners if n not in method.own_options and getattr(self, n) != defaults[n]]
        if changed:
            names = owners[changed[0]]
            raise ValueError(f"{', '.join(changed)} apply to method{'s' * (len(names) > 1)} {', '.join(names)}, "
                             f"not {self.method!r}")
        if self.calibration_dtype != "auto" and self.calibration_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"calibration_dtype must be 'auto' or one of {sorted(ADAPTER_DTYPES)}, "
                             f"got {self.calibration_dtype!r}")
        if method.calibration is None:
            if self.calibration_dtype != "auto":
                raise ValueError(f"calibration_dtype is for the data-aware methods; method {self.method!r} "
                                 "looks at the weights alone")
            if self.calibration is not None:
                raise ValueError(f"calibration data is for the data-aware methods; method {self.method!r} "
                                 "looks at the weights alone")
            return
        if self.calibration is None:
            raise ValueError(f"method {self.method!r} needs calibration data (calibration=..., --calibration FILE)")
        for name in ("calibration_samples", "calibration_length", "calibration_batch"):
            value = getattr(self, name)
            if value is None and name != "calibration_batch":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.host_memory is not None:
            byte_size(self.host_memory)  # a typo is named before anything runs
        if self.rank_budget:
            raise ValueError(f"rank_budget measures the weights' spectra; method {self.method!r} decomposes W·C: "
                             "give ranks (rank_pattern) instead")

    def _check_budget(self) -> None:
        if not self.rank_budget:
            if self.rank_floor is not None or self.rank_cap is not None:
                raise ValueError("rank_floor and rank_cap apply with rank_budget only")
            return
        if self.several_ranks:
            raise ValueError("rank_budget chooses the ranks of one output: give one rank")
        if self.rank_pattern and not self.budget_chosen:
            raise ValueError("rank_budget chooses the rank_pattern itself: give one or the other")
        for name in ("rank_floor", "rank_cap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.budget_floor <= self.ranks[0] <= self.budget_cap:
            raise ValueError(f"rank_budget needs rank_floor <= r <= rank_cap, got {self.budget_floor} <= "
                             f"{self.ranks[0]} <= {self.budget_cap}")

    @property
    def budget_floor(self) -> int:
        return self.rank_floor if self.rank_floor is not None else max(1, self.ranks[0] // 4)

    @property
    def budget_cap(self) -> int:
        return self.rank_cap if self.rank_cap is not None else 2 * self.ranks[0]

    @property
    def host_memory_bytes(self) -> int:
        """The host budget for the carried hidden states (and a CPU run's expert covariances):
        host_memory, or half of what the machine has available now (MemAvailable)."""
        if self.host_memory is not None:
            return byte_size(self.host_memory)
        try:
            with open("/proc/meminfo") as f:
                available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return available // 2

    @property
    def torch_devices(self) -> list[torch.device]:
        return [torch.device(d) for d in (self.devices or [self.device])]

    def identity_options(self) -> dict[str, Any]:
        """The options as a resumed run must match them: which devices (and how
        many) does not change the bytes, the kind of device (CPU or GPU) does; whether
        mixed rounding is allowed is a permission, not a property of the output."""
        options = asdict(self)
        del options["devices"]
        del options["allow_mixed_rounding"]  # checked against the identity's rounding probe instead
        del options["host_memory"]  # where the hidden states wait, not what they are
        del options["on_cluster"]  # where the units run, not what they write
        options["device"] = torch.device(self.device).type
        return options

    @property
    def ranks(self) -> list[int]:
        return list(self.r) if isinstance(self.r, list) else [self.r]

    @property
    def several_ranks(self) -> bool:
        return isinstance(self.r, list) and len(self.r) > 1

    @property
    def quantization(self) -> Quantization | None:
        return Quantization(self.quantize, double_quant=self.double_quant) if self.quantize else None

    @property
    def stored_quantization(self) -> Quantization | None:
        """The quantization the residual is stored in (save_quantized), else None."""
        return self.quantization if self.save_quantized else None

    def for_rank(self, r: int) -> DecomposeOptions:
        """The options of one output of a (possibly several-rank) run."""
        alpha = self.lora_alpha if self.lora_alpha is not None else r
        return replace(self, r=r, lora_alpha=alpha, svd_rank=max(self.ranks))

    @property
    def init_method(self):
        """The methods.Method this decomposition runs."""
        return get_method(self.method)

    @property
    def init_lora_weights(self) -> str:
        """The init this computes, as PEFT's init_lora_weights names it (pissa_niter_4, mica, olora;
        MiLoRA, not in PEFT: milora)."""
        return self.init_method.init_lora_weights(self.niter)


def add_options(parser: argparse.ArgumentParser) -> None:
    """One flag per DecomposeOptions field, from its metadata: --name-with-dashes; a bool
    that defaults to False is --flag, one that defaults to True is --no-flag."""
    groups: dict[str, Any] = {}
    for f in fields(DecomposeOptions):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        names = [flag, meta["short"]] if meta["short"] else [flag]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(default, bool):
            if default:
                target.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=meta["off_help"] or f"turn off: {meta['help']}")
            else:
                target.add_argument(*names, dest=f.name, action="store_true", help=meta["help"])
            continue
        shown = f" (default {default})" if default not in (None, {}) else ""
        target.add_argument(*names, dest=f.name, type=meta["parse"], choices=meta["choices"], default=default,
                            help=meta["help"].replace("%", "%%") + shown)


def options_from_args(args: argparse.Namespace, on_cluster: bool = False) -> DecomposeOptions:
    """The DecomposeOptions add_options' flags parsed into (`on_cluster`: for a Ray run)."""
    return DecomposeOptions(**{f.name: getattr(args, f.name) for f in fields(DecomposeOptions)
                               if f.metadata.get("cli", True)}, on_cluster=on_cluster).validate()
