"""What a run leaves in OUT so another can resume it or refuse it: the run's
identity (inputs and options), a lock, and journals of what was written."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .._pissa_rs import Checkpoint, PissaError
from ..constants import LOCK_FILE, RUN_FILE



class OutputLockedError(PissaError, OSError):
    """Another run is writing to the same output directory."""


class RunMismatchError(PissaError, ValueError):
    """OUT holds a run of other inputs or options."""


class InputChangedError(PissaError, OSError):
    """An input file changed (size or modification time) during or since the run."""


def input_state(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """Size and mtime of every input file (shards and index): a change means the
    input is not what was read."""
    files = list(checkpoint.files) + ([checkpoint.index_path] if checkpoint.index_path else [])
    state = []
    for f in files:
        st = os.stat(f)
        state.append({"file": str(Path(f).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return state


def check_input_unchanged(state: list[dict[str, Any]]) -> None:
    for entry in state:
        try:
            st = os.stat(entry["file"])
        except OSError as err:
            raise InputChangedError(f"{entry['file']}: input file disappeared during the run ({err})") from err
        if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            raise InputChangedError(
                f"{entry['file']}: input file changed during the run (size {entry['size']} -> {st.st_size}, "
                "or modified); stopping. Rerun once it is stable."
            )


def run_identity(input_path: Path, options: dict[str, Any], inputs: list[dict[str, Any]], rounding: str
                 ) -> dict[str, Any]:
    """What a resumed run must match: inputs, options, pissa_rs, and how the machine that
    began it rounds (`rounding`: its probe, rounding.py)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("pissa-rs")
    except PackageNotFoundError:  # running from a source tree
        ours = "dev"
    return {"pissa_rs": ours, "input": str(input_path.resolve()), "inputs": inputs, "options": options,
            "rounding": rounding}


def read_identity(out: Path, report_name: str) -> dict[str, Any] | None:
    """The identity of the run that wrote OUT: in RUN_FILE while it runs, in the
    report's "run" once it finished."""
    for name, key in ((RUN_FILE, None), (report_name, "run")):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        data = data.get(key) if key else data
        if isinstance(data, dict):
            return data
    return None


def identity_difference(old: dict[str, Any], new: dict[str, Any], allow_mixed_rounding: bool = False) -> str | None:
    """What differs between two runs' identities, in words; None if nothing (rounding
    probes may differ when mixing is allowed)."""
    if old.get("input") != new["input"]:
        return f"input {old.get('input')} (this run: {new['input']})"
    if old.get("inputs") != new["inputs"]:
        return "the input files changed since (size or modification time)"
    old_options = old.get("options", {})
    for key, value in new["options"].items():
        if old_options.get(key) != value:
            return f"option {key}={old_options.get(key)!r} (this run: {value!r})"
    if old.get("pissa_rs") != new["pissa_rs"]:
        return f"pissa_rs {old.get('pissa_rs')} (this run: {new['pissa_rs']})"
    if old.get("rounding") != new["rounding"] and not allow_mixed_rounding:
        return (f"it was begun on a machine that rounds differently (rounding probe {old.get('rounding')}, this "
                f"machine: {new['rounding']}), so its finished parts are other bytes than this machine would "
                "write; allow_mixed_rounding=True (--allow-mixed-rounding) keeps them, and the report says which "
                "tensors came from which probe")
    return None


class OutputLock:
    """A held output lock: `release()` it (the kernel releases an flock if the process dies)."""

    def __init__(self, fd: int, path: Path | None = None):
        self._fd, self._path = fd, path  # path: the lock file, where the filesystem has no flock

    def release(self) -> None:
        if self._fd is not None:
            if self._path is not None:
                self._path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def lock_output(out: Path) -> OutputLock:
    """An exclusive lock on the directory itself (flock), held until released or the
    process dies: a second run on the same OUT is refused. Where the filesystem has no
    flock (Lustre without -o flock, some NFS set-ups), a lock file instead."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputLockedError(f"{out}: another pissa_rs run is writing to this directory; wait for it to end "
                                "or choose another out") from None
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return _lock_file(out)
    return OutputLock(fd)


def _lock_file(out: Path) -> OutputLock:
    """O_EXCL on OUT/.pissa_lock, naming its holder. The same guarantee as flock where it can
    be checked: a holder on this host that died is taken over; one on another host is named."""
    path, me = out / LOCK_FILE, f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = path.read_text().partition(" ") if path.exists() else ("", "", "")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # its holder died
                continue
            raise OutputLockedError(f"{out}: {LOCK_FILE} says pissa_rs process {pid or '?'} on {host or '?'} is "
                                    "writing to this directory (this filesystem has no flock); wait for it to end, "
                                    f"or remove {path} if that process is gone") from None
        os.write(fd, me.encode())
        os.fsync(fd)
        return OutputLock(fd, path)
    raise OutputLockedError(f"{out}: could not take {LOCK_FILE}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSON-lines journal; a missing file has none, and a line torn
    by a kill mid-append is ignored."""
    try:
        text = path.read_text()
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def read_journal(path: Path) -> list[dict[str, Any]]:
    """What the Rust writers journaled: {"file", "tensor", "len", "crc32"} per tensor."""
    return _json_lines(path)


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Report records of targets decomposed, by tensor name (the last wins)."""
    return {record["tensor"]: record for record in _json_lines(path)}


def fault_point(where: str) -> None:
    """Fault injection for the crash tests: PISSA_RS_SIGNAL_AT="where:N[:SIG]" sends
    this process SIG (default KILL; INT, STOP...) the Nth time `where` is reached,
    after printing the time to stderr. With PISSA_RS_SIGNAL_ONCE=PATH it fires only while
    PATH does not exist, and creates it (a retried worker is not killed again). Unset, it
    does nothing."""
    spec = os.environ.get("PISSA_RS_SIGNAL_AT", "").split(":")
    if len(spec) < 2 or spec[0] != where:
        return
    count = _fault_counts.get(where, 0) + 1
    _fault_counts[where] = count
    once = os.environ.get("PISSA_RS_SIGNAL_ONCE")
    if count == int(spec[1]) and once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if count == int(spec[1]):
        name = spec[2] if len(spec) > 2 else "KILL"
        print(f"pissa_rs test hook: SIG{name} at {time.time():.3f}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


_fault_counts: dict[str, int] = {}
