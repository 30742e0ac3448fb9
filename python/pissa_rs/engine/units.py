"""A decomposition's work cut into units: each is everything written into one group of
output files (a residual shard, or the shards one target's bytes span), so a unit can run
in any process that sees the input and the output folder, and a finished one is never redone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._pissa_rs import Checkpoint
from ..constants import UNITS_DIR

if TYPE_CHECKING:
    from ..options import DecomposeOptions
    from ..planning.plan import Plan
    from ..quant import Quantization


@dataclass(frozen=True)
class Unit:
    index: int
    files: tuple[str, ...]  # input shards (relative to the checkpoint's root) whose residual shards it writes
    targets: tuple[int, ...]  # the plan's targets (indices) whose residual lands in those shards
    stored_only: tuple[str, ...]  # save_quantized: weights of those shards stored quantized that are no target
    nbytes: int  # the input bytes of its shards: what it costs, roughly

    @property
    def name(self) -> str:
        return f"unit-{self.index:05d}"


@dataclass(frozen=True)
class OutputSpec:
    """One output folder of the run (one rank of a several-rank run)."""

    out: Path
    plan: Plan
    options: DecomposeOptions  # with this output's r and lora_alpha
    complete: bool = False  # an earlier run finished it: computed for the shared SVD's sake, never written

    @property
    def adapter(self) -> Path:
        """Where its adapter goes: OUT/pissa_init, or OUT itself for a LoRA of another model."""
        return self.out / self.options.init_method.adapter_subdir


@dataclass(frozen=True)
class Job:
    """Everything a unit needs, picklable: made once by the driver, sent to whoever runs units."""

    input: Path  # the checkpoint, as Checkpoint() opens it
    options: DecomposeOptions
    outputs: tuple[OutputSpec, ...]
    inputs: tuple[dict[str, Any], ...]  # size and mtime of every input file when planned
    units: tuple[Unit, ...]
    threads: int = 1  # torch's CPU threads in the driver: CPU results (and their rounding) depend on it
    rounding: str = ""  # the driver's rounding probe (rounding.py): what a unit's process must round like
    report_extra: tuple[tuple[str, Any], ...] = ()  # (key, value) the commit adds to every report (rank_budget's)


def unit_file(out: Path, unit: Unit, kind: str) -> Path:
    """A unit's own file in OUT: "journal", "records", "adapter" (its part), "done", "lease" or
    "rounding" (the probe of the process that began what the journal holds)."""
    suffix = {"journal": ".journal.jsonl", "records": ".records.jsonl", "adapter": ".adapter.safetensors",
              "done": ".done", "lease": ".lease", "rounding": ".rounding"}[kind]
    return out / UNITS_DIR / f"{unit.name}{suffix}"


def part_key(index: int, factor: str) -> str:
    """A target's factor ("lora_A" / "lora_B") in its unit's adapter part."""
    return f"{index}.{factor}"


def is_done(out: Path, unit: Unit) -> bool:
    return unit_file(out, unit, "done").is_file()


def split_units(checkpoint: Checkpoint, plan: Plan, quant: Quantization | None) -> list[Unit]:
    """The units of a plan, in the input's file order: shards joined where a target's
    residual bytes span several (per-expert tensors of one fused parameter, say)."""
    files = list(checkpoint.files)
    group = {f: f for f in files}

    def find(f: str) -> str:
        while group[f] != f:
            group[f] = group[group[f]]
            f = group[f]
        return f

    # the input shard each output tensor is written beside (a decoded MXFP4 parameter has a new name)
    file_of = {info.name: info.file for info in checkpoint.tensors}
    for tensor, parts in plan.stored_parts(quant).items():
        file_of.update((name, file_of[tensor]) for name, *_ in parts)
    written = []
    for t in plan.targets:
        names = [p.tensor for p in t.location.written] if t.location is not None else [t.tensor]
        found = sorted({file_of[n] for n in names})
        for other in found[1:]:
            group[find(other)] = find(found[0])
        written.append(found[0])
    members: dict[str, list[str]] = {}
    for f in files:
        members.setdefault(find(f), []).append(f)
    index_of = {f: k for k, fs in enumerate(members.values()) for f in fs}
    targets: list[list[int]] = [[] for _ in members]
    for i, f in enumerate(written):
        targets[index_of[f]].append(i)
    read = {p.tensor for t in plan.targets for p in t.weight_read(checkpoint).pieces}
    stored_only: list[list[str]] = [[] for _ in members]
    if quant is not None:
        for w in plan.stored_quantized:
            if w.tensor not in read:
                stored_only[index_of[checkpoint.info(w.tensor).file]].append(w.tensor)
    root = Path(checkpoint.root)
    return [Unit(k, tuple(os.path.relpath(f, root) for f in fs), tuple(targets[k]), tuple(stored_only[k]),
                 sum(os.path.getsize(f) for f in fs))
            for k, fs in enumerate(members.values())]
