"""What a decomposition will do: the target weights with their ranks, and the
adapter config. Working it out needs transformers and PEFT (~250 MB resident);
for large checkpoints it runs in a forked child process, so the long
decomposition that follows never holds them."""

from __future__ import annotations

import functools
import multiprocessing
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._pissa_rs import Checkpoint
from ..formats.bnb_serialized import StoredQuantized, quantization_config
from .. import compat
from ..methods import get_method
from ..model_files import is_model_dir
from ..noise import quiet_library_noise
from .mapping import load_config, meta_model, param_on_disk
from ..formats.peft_adapter import adapter_config, adapter_config_json, adapter_shapes
from ..quant import Quantization, QuantizerChoice
from ..formats.sources import OUT_DTYPE, SourceFormat, source_format
from .targets import Target, TargetError, bnb_quantized_weights, resolve_targets

# Checkpoints bigger than this plan in a child process: every one. Planning imports
# transformers and PEFT (and PEFT bitsandbytes, ~1.7 s, which a child that plans and exits
# can refuse, unlike a caller's process); the parent needs neither, and works meanwhile.
PLAN_IN_CHILD_ABOVE_BYTES = 0


@dataclass(frozen=True)
class Plan:
    targets: list[Target]
    task_type: str | None
    architecture: str | None
    adapter_config_json: str  # written to OUT/pissa_init/adapter_config.json
    # save_quantized: every weight transformers' bitsandbytes loading quantizes, stored
    # pre-quantized, and the quantization_config config.json gets
    stored_quantized: list[StoredQuantized] = field(default_factory=list)
    quantization_config: dict[str, Any] | None = None
    # QPiSSA: bitsandbytes or the reference on this device type, checked here (where
    # transformers and PEFT import bitsandbytes anyway) so the decomposing process need not
    quantizer: QuantizerChoice | None = None
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (module or parameter, why not decomposed)
    rank_limited: list[str] = field(default_factory=list)  # modules decomposed at their smaller dimension < r
    # A low-precision source (FP8, MXFP4): the encoded tensors of targets -> what the residual
    # stores instead (bfloat16 weights; their scales: nothing), and config.json's
    # quantization_config afterwards (None: none left; only set when the source has one)
    source_format: str | None = None
    source_as: dict[str, list[tuple[str, str, list[int]]]] = field(default_factory=dict)
    source_quantization_config: dict | None = None
    config_note: str | None = None  # config.json asked for custom code: what was built instead

    def stored_parts(self, quant: Quantization | None) -> dict[str, list[tuple[str, str, list[int]]]]:
        """Original tensor name -> the (name, dtype, shape) of the tensors it is stored as, where not itself."""
        return {**self.source_as, **({w.tensor: w.parts(quant) for w in self.stored_quantized} if quant else {})}


def make_plan(path: Path, options: list[dict], outs: list[Path], deferred: list | None = None) -> list[Plan]:
    """Plan in this process, one Plan per (options, out) pair: the ranks of a
    several-rank run. `options` are DecomposeOptions as dicts. With `deferred` (a list),
    PEFT's own layout check is not run but appended to it, as calls to make later."""
    checkpoint = Checkpoint(path)
    root = Path(checkpoint.root)
    config_dir = root if is_model_dir(path) and (root / "config.json").is_file() else None
    plans = []
    stored, quant_config, quantizer = [], None, None
    first = options[0] if options else {}
    quant = Quantization(first["quantize"], double_quant=first["double_quant"]) if first.get("quantize") else None
    if quant is not None and first["device"].startswith("cpu"):
        # (A GPU's check runs in the decomposing process: a forked child must not start CUDA.)
        quantizer = quant.choice(first["device"])
    if first.get("save_quantized"):
        if config_dir is None:
            raise TargetError(f"{path}: save_quantized needs the model's config.json (a model directory), to know "
                              "which weights transformers quantizes and to record the quantization there")
        stored, quant_config = bnb_quantized_weights(checkpoint, config_dir), quantization_config(quant)
    fmt = source_format(config_dir)
    config_note = load_config(config_dir)[1] if config_dir is not None else None
    for opts, out in zip(options, outs):
        found = resolve_targets(
            checkpoint, r=opts["r"], lora_alpha=opts["lora_alpha"], target_modules=opts["target_modules"],
            exclude_modules=opts["exclude_modules"], rank_pattern=opts["rank_pattern"],
            alpha_pattern=opts["alpha_pattern"], use_rslora=opts["use_rslora"], config_dir=config_dir,
            target_parameters=opts.get("target_parameters"), exclude_parameters=opts.get("exclude_parameters"),
        )
        method = get_method(opts["method"])
        if not method.adapts_parameters:  # what PEFT's expansion picked among parameters: left out, named
            modules = [t.module for t in found.targets if t.parameter is None]
            # patterns that only parameters used (PEFT's 2r for fused gate_up_proj): dropped with them
            used = lambda key: any(re.match(rf"(.*\.)?({key})$", m) for m in modules)  # noqa: E731
            found = replace(found, targets=[t for t in found.targets if t.parameter is None], target_parameters=[],
                            rank_pattern={k: v for k, v in found.rank_pattern.items() if used(k)},
                            alpha_pattern={k: v for k, v in found.alpha_pattern.items() if used(k)},
                            left_out=found.left_out + [(p, f"PEFT has no {method.name} variant for parameters "
                                                           "(ParamWrapper)") for p in found.target_parameters])
        refused = [(t, why) for t in found.targets
                   for why in [method.target_problem(tuple(t.shape[::-1]) if t.fan_in_fan_out else tuple(t.shape), t.r)]
                   if why]
        if refused:
            names = ", ".join(f"{t.tensor} (r={t.r}): {why}" for t, why in refused[:3])
            raise TargetError(f"{path}: {len(refused)} target(s) cannot take method {method.name!r}: {names}"
                              f"{' ...' if len(refused) > 3 else ''}; give them a lower rank (rank_pattern) or "
                              "leave them out (exclude_modules / exclude_parameters)")
        config = adapter_config(
            r=opts["r"], lora_alpha=opts["lora_alpha"], **concrete_targets(found, opts, config_dir),
            use_rslora=opts["use_rslora"],
            fan_in_fan_out=any(t.fan_in_fan_out for t in found.targets if t.parameter is None),
            task_type=found.task_type, base_model_name_or_path=str(out.resolve()),
            init_lora_weights=method.config_init_lora_weights, **method.config_fields(opts),
        )
        if config_dir is not None:
            check = functools.partial(check_adapter_layout, config, found, config_dir)
            deferred.append(check) if deferred is not None else check()
        targets = found.targets
        if opts.get("keep_source_format"):  # the residual goes back to the codes and scales it came from
            encoded = [t for t in targets if t.location is not None and t.location.decode is not None]
            if not fmt.can_keep or not encoded or any(
                    t.location.decode.kind != "fp8" for t in encoded):
                raise TargetError(f"{path}: keep_source_format stores residuals in the source's FP8 format; this "
                                  f"checkpoint's targets are {fmt.describe()}")
            targets = [replace(t, location=replace(t.location, out_pieces=None)) if t in encoded else t for t in targets]
            found = replace(found, targets=targets)
        source_as = {} if opts.get("keep_source_format") else source_layout(checkpoint, found.targets)
        if source_as and stored:
            raise TargetError(f"{path}: save_quantized from a {fmt.describe()} checkpoint is not supported; "
                              "decompose to a bfloat16 residual and quantize at load instead")
        plans.append(Plan(found.targets, found.task_type, found.architecture, adapter_config_json(config), stored,
                          quant_config, quantizer, found.left_out, found.rank_limited, fmt.kind,
                          source_as, remaining_quantization(checkpoint, fmt, source_as, found.targets),
                          config_note))
    return plans


def concrete_targets(found, opts: dict, config_dir: Path | None = None) -> dict:
    """target_modules, exclude_modules and rank_pattern for adapter_config.json, as PEFT's
    own save_pretrained writes them after get_peft_model: the modules decomposed, not the
    expression that picked them (PEFT would expand "all-linear" again on load, maybe to
    more), condensed to the shortest suffixes that pick exactly them (PEFT's own
    _find_minimal_target_modules); a weight smaller than r gets its rank in rank_pattern."""
    rank_pattern = {t.module: t.r for t in found.targets if t.module in found.rank_limited and t.parameter is None}
    rank_pattern.update(found.rank_pattern)  # target parameters': PEFT's fused doubling, those below r
    rank_pattern.update(opts["rank_pattern"] or {})  # ours first: PEFT takes the first pattern that matches
    alpha_pattern = {**found.alpha_pattern, **(opts["alpha_pattern"] or {})}
    if found.architecture is None:  # a bare file: no model to expand against, the user's own words
        return {"target_modules": opts["target_modules"], "exclude_modules": opts["exclude_modules"],
                "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "target_parameters": None}
    modules = sorted({t.module for t in found.targets if t.parameter is None})
    target_modules = sorted(compat.minimal_target_modules(modules, found.other_modules)) if modules else []
    if config_dir is not None and target_modules and _peft_would_add_parameters(target_modules, found, config_dir):
        target_modules = modules  # full names, which PEFT's conversion keeps as the Linear layers they name
    return {"target_modules": target_modules, "exclude_modules": None, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "target_parameters": found.target_parameters or None}


def _peft_would_add_parameters(target_modules: list[str], found, config_dir: Path) -> bool:
    """Whether PEFT, loading an adapter with these target_modules, would also adapt parameters
    the adapter does not hold: from 0.22 its load-time conversion for transformers 5's fused
    experts reads a bare `gate_proj` / `up_proj` / `down_proj` on a Qwen2-MoE-family model
    (DeepSeek-V3, Qwen3-MoE, ...) as the experts too, even where we adapt only Linear layers
    of that name (EVA, MiCA: no parameters; the shared experts and dense MLPs)."""
    with quiet_library_noise():
        from peft import LoraConfig

    model, _ = meta_model(config_dir)
    probe = LoraConfig(r=1, target_modules=list(target_modules), target_parameters=found.target_parameters or None)
    compat.convert_config_for_transformers(probe, model)
    return bool(set(probe.target_parameters or ()) - set(found.target_parameters or ()))


def check_adapter_layout(config, found, config_dir: Path) -> None:
    """PEFT itself, given the adapter_config.json we write, must build exactly the LoRA
    layers we write weights for, with the same shapes: otherwise loading the output
    would drop or invent layers. Built on the meta device (no memory), once per plan."""
    import copy

    import torch

    with quiet_library_noise():
        from peft import get_peft_model
        from peft.utils import get_peft_model_state_dict

    model, _ = meta_model(config_dir)
    config = copy.deepcopy(config)
    config.init_lora_weights = False
    with torch.device("meta"), quiet_library_noise():
        built = get_peft_model(copy.deepcopy(model), config)
        keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(built).items()}
    ours = dict(adapter_shapes(found.targets))
    if keys != ours:
        only_peft = sorted(set(keys) - set(ours))
        only_ours = sorted(set(ours) - set(keys))
        differ = sorted(k for k in set(keys) & set(ours) if keys[k] != ours[k])
        raise TargetError(
            f"{config_dir}: PEFT would load the adapter pissa_rs is about to write with other LoRA layers "
            f"(only PEFT's: {only_peft[:3]}, only ours: {only_ours[:3]}, other shapes: "
            f"{[(k, keys[k], ours[k]) for k in differ[:3]]}); this target choice cannot be saved for PEFT as is"
        )


class PlanChecks:
    """Checks of a plan still running in the planning child (PEFT's own layout check): the
    units may start; `wait()` must pass before anything is committed."""

    def __init__(self, child=None, receive=None, path: Path | None = None):
        self._child, self._receive, self._path = child, receive, path

    def wait(self) -> None:
        """Block until the checks are done; a failed one raises its TargetError here."""
        if self._child is None:
            return
        try:
            kind, payload = _receive(self._receive, self._child, self._path)
        finally:
            self.close()
        if kind == "error":
            raise TargetError(payload)

    def close(self) -> None:
        """Stop waiting (after a failure elsewhere): the child is ended."""
        if self._child is not None:
            self._receive.close()
            if self._child.is_alive():
                self._child.terminate()
            self._child.join()
            self._child = None


def make_plan_in_child(path: Path, options: list[dict], outs: list[Path], meanwhile=None
                       ) -> tuple[list[Plan], PlanChecks]:
    """The same plan, worked out in a child process, and the checks it still runs after
    sending it. A TargetError or ValueError raised there is raised here with the same message.
    `meanwhile()`, if given, runs here while the child plans.

    The child is forked (it has torch imported already, unlike a fresh interpreter), except
    where this process has initialised CUDA (EVA's pass or the rank budget's spectra on a GPU,
    or the caller's own work) or runs threads a native library started (foreign_threads: a Ray
    driver's gRPC threads, which ray.shutdown() leaves running): CUDA is not to be used in a
    forked child, and a fork of a process whose native threads hold locks can hang or crash (a
    Ray driver's planning child died of SIGSEGV), so the child is then a fresh interpreter."""
    import torch

    from ..requirements import require_versions

    require_versions()  # here, where the caller sees its one line: the child imports the libraries it checks
    if torch.cuda.is_initialized() or foreign_threads():
        child, receive = _start_fresh_child(path, options, outs)
    else:
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_plan_and_send, args=(send, path, options, outs), daemon=True)
        child.start()
        send.close()  # so that receive sees EOF if the child dies without a word
    checks = PlanChecks(child, receive, path)
    try:
        if meanwhile is not None:
            meanwhile()
        kind, payload = _receive(receive, child, path)
    except BaseException:
        checks.close()
        raise
    if kind == "error":
        checks.close()
        raise TargetError(payload)
    return payload, checks


class _FreshChild:
    """A planning child in a fresh interpreter, seen as a multiprocessing.Process."""

    def __init__(self, process):
        self._process = process

    def is_alive(self) -> bool:
        return self._process.poll() is None

    def terminate(self) -> None:
        self._process.terminate()

    def join(self) -> None:
        self._process.wait()

    @property
    def exitcode(self) -> int | None:
        return self._process.returncode


def foreign_threads() -> list[str]:
    """The names of this process's threads that a native library started and named (gRPC's,
    Ray's, CUDA's): on Linux every thread Python, torch's pools, tokenizers or our reader start
    keeps the name of the thread that made it; these do not. Where /proc cannot say, any
    import of Ray counts (its threads start when it connects)."""
    import os
    import sys

    try:
        main = Path("/proc/self/comm").read_text().strip()
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
            except OSError:  # a thread that ended meanwhile
                continue
    except OSError:
        return ["ray"] if "ray" in sys.modules else []
    return sorted(n for n in names if n != main)


def _start_fresh_child(path: Path, options: list[dict], outs: list[Path]):
    """A fresh interpreter that imports this package from where this process did, takes the
    arguments on its standard input and answers through a pipe, as the forked child does."""
    import os
    import pickle
    import subprocess
    import sys
    from multiprocessing.connection import Connection

    import pissa_rs

    import site

    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    here = Path(pissa_rs.__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if here not in installed:  # a source tree on sys.path: the child must find the same package
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    code = "import sys; from pissa_rs.planning.plan import plan_in_fresh_child; plan_in_fresh_child(int(sys.argv[1]))"
    receive = Connection(read_fd, writable=False)
    try:
        process = subprocess.Popen([sys.executable, "-c", code, str(write_fd)], stdin=subprocess.PIPE,
                                   pass_fds=(write_fd,), env=env)
    except BaseException:
        receive.close()
        raise
    finally:
        os.close(write_fd)  # the child's copy is its own: receive sees EOF if it dies without a word
    try:
        with process.stdin:
            process.stdin.write(pickle.dumps((path, options, outs)))
    except BrokenPipeError:
        pass  # it died before reading: _receive says so, with its exit code
    return _FreshChild(process), receive


def plan_in_fresh_child(answer_fd: int) -> None:
    """The body of _start_fresh_child's interpreter: the arguments from standard input."""
    import pickle
    import sys
    from multiprocessing.connection import Connection

    path, options, outs = pickle.load(sys.stdin.buffer)
    _plan_and_send(Connection(answer_fd, readable=False), path, options, outs)


def _receive(receive, child, path):
    try:
        return receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"{path}: the planning process died (exit code {child.exitcode})") from None


def _plan_and_send(send, path: Path, options: list[dict], outs: list[Path]) -> None:
    import gc
    import sys

    import torch

    from .._pissa_rs import PissaError

    # A forked child of a process whose torch already ran parallel CPU work hangs in its first
    # parallel region (OpenMP's thread team does not survive a fork; torch's DataLoader workers
    # do the same). The plan's only CPU math is the quantizer's agreement check, exact either way.
    torch.set_num_threads(1)

    if not any(o.get("quantize") and o["device"].startswith("cpu") for o in options):
        # This process plans and exits. Only QPiSSA's quantizer check on the CPU uses
        # bitsandbytes here, whose import (which PEFT's pulls in when it can) sets up
        # torch.compile (~1.7 s) and asks CUDA for the device's capability: in a child forked
        # from a process that touched CUDA's driver, that must not happen.
        sys.modules.setdefault("bitsandbytes", None)
    # Until the plan is sent the child mostly imports transformers' model classes and PEFT:
    # objects that live until it exits, which the cyclic collector walked for 0.45 s of 2.
    gc.disable()
    try:
        deferred: list = []
        send.send(("plan", make_plan(path, options, outs, deferred)))
        gc.enable()  # PEFT's layout check copies the meta model once per rank
        for check in deferred:  # while the units start
            check()
        send.send(("checked", None))
    except (PissaError, ValueError) as err:
        send.send(("error", str(err)))
    finally:
        send.close()


def source_layout(checkpoint: Checkpoint, targets) -> dict[str, list[tuple[str, str, list[int]]]]:
    """The encoded tensors the targets read -> what the residual holds instead: an FP8
    weight's bfloat16 residual under its name, an MXFP4 parameter's under the parameter's
    name ([E, d1, d2], as transformers saves it in bf16); scales: nothing."""
    layout: dict[str, list[tuple[str, str, list[int]]]] = {}
    for t in targets:
        read = t.location
        if read is None or read.decode is None:
            continue
        staged = 0
        for part, out in zip(read.decode.parts, read.written):  # per part: its codes, scales, extra tensors
            pieces = read.pieces[staged: staged + 2 + len(part.extra)]
            staged += len(pieces)
            codes, args = pieces[0].tensor, dict(part.args)
            if codes not in layout:
                if "shape" in args:  # packed INT: under the weight's name (X.weight for X.qweight), its shape
                    shape = list(args["shape"])
                elif out.tensor == codes:  # FP8: the residual under the weight's own name and shape
                    shape = list(checkpoint.info(codes).shape)
                else:  # MXFP4: one expert's slice of the parameter, under the parameter's name
                    shape = [t.num_experts, *t.shape]
                layout[codes] = [(out.tensor, read.dtype, shape)]
            for piece in pieces[1:]:  # scales, zero points, ...: consumed
                layout.setdefault(piece.tensor, [])
    return layout


def remaining_quantization(checkpoint: Checkpoint, fmt: SourceFormat, source_as: dict, targets) -> dict | None:
    """config.json's quantization_config for the residual: gone when every encoded weight
    became a bfloat16 residual; else the source's, with the decomposed modules added to
    those it leaves unquantized (transformers then loads both kinds without a warning)."""
    if fmt.kind is None or not source_as:
        return fmt.config
    left = [i.name for i in checkpoint.tensors if i.name not in source_as and fmt.codec.holds_codes(i)]
    if not left:
        return None
    config = dict(fmt.config)
    key = fmt.codec.unquantized_key
    if key is None:  # the format's config cannot say which modules it no longer quantizes
        raise TargetError(f"{checkpoint.root}: {fmt.describe()} cannot mark the decomposed modules as no longer "
                          f"quantized in config.json, so every quantized weight must be a target; {left[0]} (and "
                          f"{len(left) - 1} more) would stay quantized: target them too (e.g. all-linear)")
    # the modules holding the decomposed weights (an expert's: the module of its parameter)
    modules = sorted({t.parameter.rsplit(".", 1)[0] if t.parameter else t.module
                      for t in targets if t.location is not None and t.location.decode is not None})
    config[key] = sorted(set(config.get(key) or []) | set(modules))
    return config
