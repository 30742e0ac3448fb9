"""Interrupted runs resume byte-identically; SIGKILL, Ctrl-C, a full disk, a second
run, a changed input or another run's output never lose or mix anything."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import digest, same_output
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs.engine.resume import lock_output

CLI = [sys.executable, "-m", "pissa_rs.cli"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    return save_tiny_model(root / "m", "llama", layers=3, dtype="bfloat16", shard_size="150KB")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted run of the command the tests interrupt."""
    out = tmp_path_factory.mktemp("ref") / "o"
    assert run_cli(model, out).returncode == 0
    return out


def run_cli(model: Path, out: Path, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "decompose", str(model), "-r", "4", "-o", str(out), "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300, **kwargs)


def final_files_are_complete(out: Path, reference: Path) -> None:
    """Whatever sits under a final name (not hidden, not in the hidden units folder) is the finished file."""
    ref = digest(reference)
    for name, sha in digest(out).items():
        if not any(part.startswith(".") for part in Path(name).parts):
            assert ref.get(name) == sha, f"{name} is under its final name but not complete"


@pytest.mark.parametrize("point", ["target:1", "target:7", "finalize:2"])
def test_sigkill_then_rerun_resumes_byte_identically(model, reference, tmp_path, point):
    before = digest(model)
    out = tmp_path / "o"
    killed = run_cli(model, out, env={"PISSA_RS_SIGNAL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert digest(model) == before  # the input is never written
    assert not (out / "pissa_report.json").exists()
    final_files_are_complete(out, reference)
    resumed = run_cli(model, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed the interrupted run" in resumed.stdout
    same_output(out, reference)
    assert digest(model) == before


def test_ctrl_c_stops_quickly_says_how_to_resume_and_resumes(model, reference, tmp_path):
    out = tmp_path / "o"
    # SIGINT as a terminal's Ctrl-C finds it: a test run started in the background
    # (`cmd &` in a script) inherits SIGINT ignored, and Python then keeps it ignored.
    interrupted = run_cli(model, out, env={"PISSA_RS_SIGNAL_AT": "target:3:INT"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ended = time.time()
    assert interrupted.returncode == 130, interrupted.stderr
    assert "Run the same command again to resume" in interrupted.stderr
    sent = float(re.search(r"SIGINT at ([\d.]+)", interrupted.stderr).group(1))
    assert ended - sent < 5  # includes interpreter shutdown
    final_files_are_complete(out, reference)
    assert run_cli(model, out).returncode == 0
    same_output(out, reference)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_file_size_limit_is_a_clear_error_naming_the_file_and_the_run_resumes(model, reference, tmp_path):
    out = tmp_path / "o"
    failed = run_cli(model, out, preexec_fn=_limit_file_size(100_000))
    assert failed.returncode == 1
    assert re.search(r"pissa-rs: error: .*\.safetensors\.partial.*(File too large|EFBIG|errno 27)", failed.stderr), \
        failed.stderr
    final_files_are_complete(out, reference)
    assert run_cli(model, out).returncode == 0
    same_output(out, reference)


def test_a_second_run_on_the_same_out_is_refused(model, reference, tmp_path):
    out = tmp_path / "o"
    first = subprocess.Popen([*CLI, "decompose", str(model), "-r", "4", "-o", str(out), "--no-progress"],
                             env={**os.environ, "PISSA_RS_SIGNAL_AT": "target:2:STOP"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob(".pissa_units/*.journal.jsonl")) or _state(first.pid) != "T":
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        second = run_cli(model, out)
        assert second.returncode == 1
        assert "another pissa_rs run is writing to this directory" in second.stderr
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    same_output(out, reference)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_lock_is_checked_in_process_too(model, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    lock = lock_output(out)
    try:
        with pytest.raises(pissa_rs.OutputLockedError, match="another pissa_rs run"):
            pissa_rs.decompose_checkpoint(model, r=4, out=out, progress=False)
    finally:
        lock.release()


def test_without_flock_a_lock_file_holds_the_same_guarantee(model, reference, tmp_path, monkeypatch):
    """Lustre without -o flock refuses flock (ENOLCK): OUT/.pissa_lock, created exclusively,
    names its holder; a second run is refused; a holder on this host that died is taken over;
    a finished run leaves no lock file."""
    import errno
    import fcntl

    import pissa_rs.engine.resume as resume

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(resume.fcntl, "flock", no_flock)
    out = tmp_path / "o"
    out.mkdir()
    lock = lock_output(out)
    try:
        assert (out / ".pissa_lock").read_text().split() == [__import__("socket").gethostname(), str(os.getpid())]
        with pytest.raises(pissa_rs.OutputLockedError, match=f"process {os.getpid()} .* no flock"):
            pissa_rs.decompose_checkpoint(model, r=4, out=out, progress=False)
    finally:
        lock.release()
    assert not (out / ".pissa_lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".pissa_lock").write_text(f"{__import__('socket').gethostname()} {dead.stdout.strip()}")  # died holding it
    res = pissa_rs.decompose_checkpoint(model, r=4, out=out, progress=False)
    assert res.status == "fresh" and not (out / ".pissa_lock").exists()
    same_output(out, reference)
    assert fcntl.flock is no_flock


def test_an_out_of_another_input_is_refused_never_mixed(model, tmp_path):
    other = save_tiny_model(tmp_path / "other", "llama", layers=3, dtype="bfloat16", shard_size="150KB", seed=1)
    out = tmp_path / "o"
    pissa_rs.decompose_checkpoint(model, r=4, out=out, progress=False)
    before = digest(out)
    with pytest.raises(pissa_rs.RunMismatchError, match=r"other inputs or options \(input .*m \(this run: .*other\)"):
        pissa_rs.decompose_checkpoint(other, r=4, out=out, progress=False)
    assert digest(out) == before


def test_an_interrupted_out_is_not_resumed_with_other_options(model, tmp_path):
    out = tmp_path / "o"
    assert run_cli(model, out, env={"PISSA_RS_SIGNAL_AT": "target:2"}).returncode == -signal.SIGKILL
    with pytest.raises(pissa_rs.RunMismatchError, match="option r=4 \\(this run: 8\\)"):
        pissa_rs.decompose_checkpoint(model, r=8, out=out, progress=False)
    res = pissa_rs.decompose_checkpoint(model, r=8, out=out, overwrite=True, progress=False)
    assert res.status == "fresh" and pissa_rs.verify(out, against=model).ok


def test_an_input_that_changes_during_the_run_stops_it(model, tmp_path, monkeypatch):
    import shutil

    import pissa_rs.methods.pissa as driver  # the default method's SVD

    src = tmp_path / "m"
    shutil.copytree(model, src)
    shard = sorted(src.glob("*.safetensors"))[-1]
    real, calls = driver.factors_at_ranks, []

    def touching(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "factors_at_ranks", touching)
    with pytest.raises(pissa_rs.InputChangedError, match=f"{shard.name}: input file changed during the run"):
        pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "o", progress=False)
    # The run stops at the first check after the change: the 3rd target, or the 4th if the device
    # worker had already started it (a worker computes its next weight before handing the last
    # one over: one result ahead of the writer, devices.py). Never later.
    assert len(calls) in (3, 4), calls
    # Its journal is no good for the changed input: a rerun says so instead of mixing.
    monkeypatch.setattr(driver, "factors_at_ranks", real)
    with pytest.raises(pissa_rs.RunMismatchError, match="input files changed since"):
        pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "o", progress=False)


def test_a_tampered_journaled_tensor_is_recomputed_not_trusted(model, reference, tmp_path):
    out = tmp_path / "o"
    assert run_cli(model, out, env={"PISSA_RS_SIGNAL_AT": "target:9"}).returncode == -signal.SIGKILL
    journal = [json.loads(line) for f in sorted(out.glob(".pissa_units/*.journal.jsonl")) for line in f.read_text().splitlines()]
    entry = next(e for e in journal if e["tensor"].endswith("proj.weight") and "lora" not in e["tensor"])
    partial = Path(entry["file"]).with_name(f".{Path(entry['file']).name}.partial")
    assert partial.exists()
    # Same layout as the finished shard: the tensor starts at the same offset.
    start = pissa_rs.Checkpoint(reference / Path(entry["file"]).name).info(entry["tensor"]).start
    data = bytearray(partial.read_bytes())
    data[start] ^= 0xFF
    partial.write_bytes(bytes(data))
    assert run_cli(model, out).returncode == 0
    same_output(out, reference)


def _as_begun_elsewhere(out: Path, probe: str) -> None:
    """Make OUT say what a machine whose rounding probe is `probe` leaves when it is
    interrupted: the run's identity, each unit's stamp and each finished unit's mark."""
    run = out / ".pissa_run.json"
    identity = json.loads(run.read_text())
    run.write_text(json.dumps({**identity, "rounding": probe}))
    for stamp in (out / ".pissa_units").glob("*.rounding"):
        stamp.write_text(probe)
    for done in (out / ".pissa_units").glob("*.done"):
        done.write_text(json.dumps({**json.loads(done.read_text()), "rounding": probe}))


def test_a_run_begun_on_a_machine_that_rounds_differently_is_refused_or_mixed_by_name(model, reference, tmp_path):
    out = tmp_path / "o"
    assert run_cli(model, out, env={"PISSA_RS_SIGNAL_AT": "finalize:3"}).returncode == -signal.SIGKILL
    done = sorted(p.name for p in (out / ".pissa_units").glob("*.done"))
    assert done, "some units finished before the kill"
    _as_begun_elsewhere(out, "elsewhere")
    with pytest.raises(pissa_rs.RunMismatchError, match="rounds differently.*rounding probe elsewhere"):
        pissa_rs.decompose_checkpoint(model, r=4, out=out, progress=False)
    res = pissa_rs.decompose_checkpoint(model, r=4, out=out, progress=False, allow_mixed_rounding=True)
    assert res.status == "resumed"
    rounding = res.report["rounding"]
    assert rounding["mixed"] and rounding["probe"] is None
    by_probe = rounding["tensors_by_probe"]
    here = json.loads((reference / "pissa_report.json").read_text())["rounding"]["probe"]
    assert sorted(by_probe) == sorted(["elsewhere", here])
    assert sorted(by_probe["elsewhere"] + by_probe[here]) == sorted(t["tensor"] for t in res.report["tensors"])
    assert pissa_rs.verify(out, against=model).ok
    same_output(out, reference)  # (really one machine: the bytes are the uninterrupted run's)
