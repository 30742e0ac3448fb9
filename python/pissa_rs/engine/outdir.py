"""An output folder's life before the units run: refused when it is the input, foreign or
too small, emptied or resumed, locked; and the atomic writes every later step uses."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .._pissa_rs import Checkpoint, PissaError
from ..constants import ADAPTER_FILES, CONTROL_FILES, LOCK_FILE, OWN_NAMES, REPORT_NAME, RUN_FILE
from ..model_files import is_model_dir, top_level_names
from .resume import OutputLock, RunMismatchError, identity_difference, lock_output, read_identity


class OutputDirError(PissaError, ValueError):
    """The output folder cannot be used: it is the input or inside it, holds foreign files
    or another output, or cannot be created."""


class DiskSpaceError(PissaError, OSError):
    """The output would not fit on its filesystem; checked before any work."""


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def nearest_existing(out: Path) -> Path:
    """`out` or its nearest ancestor that exists: where `out` would be created."""
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    return probe


def free_bytes(out: Path) -> int:
    """Free space on the filesystem that will hold `out` (its nearest existing ancestor)."""
    return shutil.disk_usage(nearest_existing(out)).free


def atomic_write_text(path: Path, text: str) -> None:
    """`text` under `path` by a rename: never a half-written file under its final name."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _output_names(checkpoint: Checkpoint, path: Path) -> set[str]:
    """Top-level names a decomposition of this checkpoint writes into OUT."""
    root = Path(checkpoint.root)
    names = {Path(os.path.relpath(f, root)).parts[0] for f in checkpoint.files}
    names |= {*OWN_NAMES, *CONTROL_FILES, *ADAPTER_FILES}  # the adapter files: where OUT is the LoRA (extract)
    if checkpoint.index_path:
        names.add(Path(checkpoint.index_path).name)
    if is_model_dir(path):
        names |= top_level_names(root)
    return names


def _check_space(out: Path, needed: int, reclaim: bool) -> None:
    """`reclaim`: files already in `out` (an earlier output being replaced, or an
    interrupted run's preallocated files) count as space."""
    reclaimable = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if reclaim and out.is_dir() else 0
    available = free_bytes(out) + reclaimable
    if needed > available:
        raise DiskSpaceError(
            f"{out}: the output needs {human_bytes(needed)} and its filesystem has {human_bytes(available)} free; "
            "free some space or choose another out"
        )


def prepare_out(out: Path, checkpoint: Checkpoint, path: Path, overwrite: bool, needed: int,
                identity: dict[str, Any], allow_mixed_rounding: bool = False) -> tuple[OutputLock, str]:
    """Refuse an out that is the input, holds foreign files or another run's
    output, or lacks room; lock it. Returns (lock, state): "fresh" (emptied,
    ready), "resumed" (an interrupted run of the same inputs and options) or
    "complete" (that run already finished)."""
    check_out_apart(out, checkpoint, path)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a directory")
    created = not out.exists()
    make_out_dir(out)
    lock = lock_output(out)
    try:
        old = read_identity(out, REPORT_NAME)
        if old is not None and not overwrite:
            difference = identity_difference(old, identity, allow_mixed_rounding)
            if difference:
                raise RunMismatchError(
                    f"{out}: holds a run of other inputs or options ({difference}); pass overwrite=True "
                    "(--overwrite) to replace it"
                )
            if (out / REPORT_NAME).is_file():
                return lock, "complete"
            _check_space(out, needed, reclaim=True)
            return lock, "resumed"
        existing = sorted(e for e in out.iterdir() if e.name != LOCK_FILE)  # the lock file: ours, just taken
        if existing:
            # Replace an earlier output, never delete what pissa_rs did not write.
            ours = _output_names(checkpoint, path)
            foreign = [e.name for e in existing if e.name not in ours and not e.name.endswith(".partial")]
            if foreign:
                raise OutputDirError(
                    f"{out}: exists and holds '{foreign[0]}', which a decomposition does not write: it is not a "
                    "pissa_rs output, and overwrite (--overwrite) replaces only those; choose another out"
                )
            if not overwrite:
                raise OutputDirError(f"{out}: exists and holds an earlier pissa_rs output; pass overwrite=True "
                                     "(--overwrite) to replace it, or choose another out")
        _check_space(out, needed, reclaim=overwrite)
        for entry in existing:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        atomic_write_text(out / RUN_FILE, json.dumps(identity, indent=1))
        return lock, "fresh"
    except BaseException:
        lock.release()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def check_out_apart(out: Path, checkpoint: Checkpoint, path: Path) -> None:
    """Refuse an output that is the input's folder, holds it, or (a model folder) lies
    inside it: shards written into a model's own folder damage it for every tool."""
    root, resolved = Path(checkpoint.root).resolve(), out.resolve()
    if resolved == root or root.is_relative_to(resolved):
        raise OutputDirError(f"{out}: the output would overwrite the input checkpoint {root}; choose another out")
    if is_model_dir(path) and resolved.is_relative_to(root):
        raise OutputDirError(f"{out}: the output would be inside the input model's folder {root}; choose an out "
                             "outside it")


def make_out_dir(out: Path) -> None:
    """mkdir -p, with an error that says what was being done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"{out}: cannot create the output directory: {err.strerror or err}") from None


def out_dir_problem(out: Path) -> str | None:
    """Why `out` could not be created or written (a dry run's check, leaving nothing
    behind), or None: a directory is made and removed in its nearest existing ancestor."""
    probe = nearest_existing(out)
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pissa-rs-probe-", dir=probe))
    except OSError as err:
        return f"cannot create a directory in {probe}: {err.strerror or err}"
    return None
