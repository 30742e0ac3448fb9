"""Where a run reads (a local path, or a Hub model's snapshot), where each rank's output goes, and
which model an output's adapter applies to."""

from __future__ import annotations

import os
from pathlib import Path

from .hub import is_local, model_name, resolve_model


def resolve_source(path: str | os.PathLike[str], revision: str | None, out: Path | None, ranks: list[int],
                   headers_only: bool = False, method: str = "pissa") -> tuple[Path, Path | None]:
    """The checkpoint to read (a local path as it is, or a Hub model ID's snapshot in
    the Hugging Face cache; with `headers_only`, for a dry run, stand-ins holding only
    the shards' headers when the weights are not cached) and the output directory: for
    an ID, by default `./<name>-<method>-r<r>` in the current directory."""
    source = resolve_model(path, revision, headers_only=headers_only)
    if out is None and not is_local(path):
        name = model_name(path)
        out = Path.cwd() / (f"{name}-{method}-r{ranks[0]}" if len(ranks) == 1 else f"{name}-{method}-r{{r}}")
    return source, out


def default_out(path: Path, r: int, method: str = "pissa") -> Path:
    """`<name>-<method>-r<r>` beside the input (`<name>-pissa-r8`)."""
    path = path.resolve()
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.parent / f"{stem}-{method}-r{r}"


def output_dirs(path: Path, ranks: list[int], out: Path | None, method: str = "pissa") -> list[Path]:
    """Where each rank's output goes: `out` for one rank; for several, `out`
    must hold "{r}" (e.g. "runs/m-r{r}"); by default `<name>-<method>-r<r>`."""
    if out is None:
        return [default_out(path, r, method) for r in ranks]
    if len(ranks) > 1 and "{r}" not in str(out):
        raise ValueError(f"{out}: with several ranks, out must contain '{{r}}' (one directory per rank)")
    return [Path(str(out).replace("{r}", str(r))) for r in ranks]


def adapter_of_output(out: Path) -> Path:
    """The adapter folder of an output: OUT/pissa_init (a decomposition's initial adapter; an
    extract-lora output of an earlier version has its LoRA there), else OUT itself where it
    holds an adapter (extract-lora's LoRA now); OUT/pissa_init where neither does (what a
    missing-file error names)."""
    from .constants import ADAPTER_CONFIG, ADAPTER_SUBDIR

    init = Path(out) / ADAPTER_SUBDIR
    if not (init / ADAPTER_CONFIG).is_file() and (Path(out) / ADAPTER_CONFIG).is_file():
        return Path(out)
    return init


def model_of_output(out: Path, revision: str | None = None) -> Path:
    """The model folder an output's adapter applies to: the output itself (its residual), or,
    for a method that leaves the base as it is (MiCA: no model in OUT), the original model
    its report names. A folder that is no pissa_rs output is itself (a Hub ID at `revision`)."""
    from .methods import get_method
    from .report import OutputReport

    held = OutputReport.read(Path(out)) if is_local(out) else None
    if held is None or not held.exists or get_method(held.options.get("method", "pissa")).changes_base:
        return resolve_model(out, revision)
    origin = held.data.get("base_model") or {"name_or_path": held.data["input"], "revision": None}
    return resolve_model(origin["name_or_path"], origin.get("revision"))
