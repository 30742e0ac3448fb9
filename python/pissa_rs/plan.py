"""What a decomposition will do: the target weights with their ranks, and the
adapter config. Working it out needs transformers and PEFT (~250 MB resident);
for large checkpoints it runs in a child process, so the long decomposition
that follows never holds them.

    python -m pissa_rs.plan   (reads a JSON request on stdin, writes the plan on stdout)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ._pissa_rs import Checkpoint
from .peft_format import adapter_config, adapter_config_json
from .targets import Target, TargetError, resolve_targets

# Checkpoints bigger than this plan in a child process: a few seconds of start-up
# against minutes of work, and a few hundred MB less peak memory.
PLAN_IN_CHILD_ABOVE_BYTES = 1 << 30


@dataclass(frozen=True)
class Plan:
    targets: list[Target]
    task_type: str | None
    architecture: str | None
    adapter_config_json: str  # written to OUT/pissa_init/adapter_config.json


def _is_model_dir(path: Path) -> bool:
    """A model directory (or its index) has a config.json to trust; a bare
    .safetensors file says nothing about the files beside it."""
    return path.is_dir() or path.name.endswith(".index.json")


def make_plan(path: Path, options: dict, out: Path) -> Plan:
    """Plan in this process. `options` are DecomposeOptions as a dict."""
    checkpoint = Checkpoint(path)
    root = Path(checkpoint.root)
    found = resolve_targets(
        checkpoint, r=options["r"], lora_alpha=options["lora_alpha"], target_modules=options["target_modules"],
        exclude_modules=options["exclude_modules"], rank_pattern=options["rank_pattern"],
        alpha_pattern=options["alpha_pattern"], use_rslora=options["use_rslora"],
        config_dir=root if _is_model_dir(path) and (root / "config.json").is_file() else None,
    )
    config = adapter_config(
        r=options["r"], lora_alpha=options["lora_alpha"], target_modules=options["target_modules"],
        exclude_modules=options["exclude_modules"], rank_pattern=options["rank_pattern"],
        alpha_pattern=options["alpha_pattern"], use_rslora=options["use_rslora"],
        fan_in_fan_out=any(t.fan_in_fan_out for t in found.targets), task_type=found.task_type,
        base_model_name_or_path=str(out.resolve()),
    )
    return Plan(found.targets, found.task_type, found.architecture, adapter_config_json(config))


def make_plan_in_child(path: Path, options: dict, out: Path) -> Plan:
    """The same plan, worked out by `python -m pissa_rs.plan`. A TargetError
    raised there is raised here with the same message."""
    request = json.dumps({"path": str(path), "options": options, "out": str(out)})
    proc = subprocess.run([sys.executable, "-m", "pissa_rs.plan"], input=request, capture_output=True, text=True)
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"planning in a child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}") from None
    if "error" in reply:
        raise TargetError(reply["error"])
    plan = reply["plan"]
    targets = [Target(**{**t, "shape": tuple(t["shape"])}) for t in plan["targets"]]
    return Plan(targets, plan["task_type"], plan["architecture"], plan["adapter_config_json"])


def _child_main() -> None:
    from ._pissa_rs import PissaError

    request = json.loads(sys.stdin.read())
    try:
        plan = make_plan(Path(request["path"]), request["options"], Path(request["out"]))
        print(json.dumps({"plan": asdict(plan)}))
    except (PissaError, ValueError) as err:
        print(json.dumps({"error": str(err)}))


if __name__ == "__main__":
    _child_main()
