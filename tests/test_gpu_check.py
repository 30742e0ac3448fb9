"""The GPU check kit (gpu/): every part that can run without a GPU, fast. The whole check on
a CPU (a rehearsal: OUT=DIR PYTHON=.venv/bin/python bash gpu/check.sh) takes minutes and
needs the bundle (gpu/prepare.sh: network, Rust), so it is not run here; its parts are: the
time box and the deadline, the summary of a results folder (a step that timed out, a check
killed mid-step, a smoke run killed in a check), the smoke's checks on the CPU, the bundle's
dependency checks, the rehearsal's view of the node's stack, the CUDA test selection, and the
70B benchmark's steady state and tmpfs refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "gpu"
sys.path.insert(0, str(GPU))
sys.path.insert(0, str(ROOT / "benches"))

import bundle  # noqa: E402
import summary  # noqa: E402
from bench_70b import fs_type, steady_state  # noqa: E402


def bash(script: str, out: Path, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -u; source {GPU / 'lib.sh'}; {script}"], cwd=ROOT,
                          env={**os.environ, "OUT": str(out), **env}, capture_output=True, text=True, timeout=timeout)


def steps(out: Path) -> dict[str, dict]:
    """The end record of each step in OUT/steps.jsonl."""
    return {r["step"]: r for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())
            if r["event"] == "end"}


# -- the scripts ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_the_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_node_sh_is_gone_and_no_doc_sends_anyone_to_it():
    assert not (GPU / "node.sh").exists()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "node.sh" not in doc.read_text(), doc


# -- the time box --------------------------------------------------------------------------

def test_a_step_over_its_budget_is_timed_out_with_its_children_and_the_check_goes_on(tmp_path):
    t0 = time.monotonic()
    proc = bash("check_init; "
                "step slow 1 0 bash -c '(sleep 2.5; touch \"$OUT/late\") & echo started; wait'; "
                "step next 5 0 echo hello; step broken 5 0 false; "
                "CUDA=0 step gpu_only 5 1 true; CUDA=1 step gpu_ran 5 1 true", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 2.4  # the time box, not the sleep, ended the slow step
    found = steps(tmp_path)
    assert found["slow"]["verdict"] == "timed out" and found["slow"]["rc"] in (124, 137)
    assert found["slow"]["seconds"] <= 2 and found["slow"]["budget"] == 1
    assert {k: found[k]["verdict"] for k in ("next", "broken", "gpu_only", "gpu_ran")} == {
        "next": "pass", "broken": "fail", "gpu_only": "skipped: no CUDA", "gpu_ran": "pass"}
    assert "started" in (tmp_path / "slow.log").read_text() and "hello" in (tmp_path / "next.log").read_text()
    assert "== [slow] timed out" in proc.stdout and "== [next] pass" in proc.stdout
    time.sleep(2.0)
    assert not (tmp_path / "late").exists()  # the step's child was killed with it


def test_budgets_scale_are_overridden_and_end_at_the_deadline(tmp_path):
    # CHECK_T0 moved back: as if the check had run 93 s of its 100, then 10 more
    proc = bash("check_init; plan scaled 10 0; BUDGET_fixed=7 plan fixed 10 1; CHECK_T0=$((CHECK_T0 - 93)); "
                "step first 100 0 true; CHECK_T0=$((CHECK_T0 - 10)); step second 5 0 true", tmp_path,
                BUDGET_SCALE="2", CHECK_DEADLINE_S="100")
    assert proc.returncode == 0, proc.stderr
    planned = [json.loads(line) for line in (tmp_path / "plan.jsonl").read_text().splitlines()]
    assert planned == [{"step": "scaled", "budget": 20, "cuda_only": 0}, {"step": "fixed", "budget": 7, "cuda_only": 1}]
    found = steps(tmp_path)
    assert found["first"]["verdict"] == "pass" and 5 <= found["first"]["budget"] <= 7  # 200 s cut to what is left
    assert found["second"]["verdict"] == "skipped: out of time"


def test_only_the_selected_steps_run(tmp_path):
    proc = bash("check_init; step a 5 0 touch \"$OUT/a\"; step b 5 0 touch \"$OUT/b\"", tmp_path, CHECK_STEPS="b")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists()
    assert steps(tmp_path)["a"]["verdict"] == "skipped: not selected"


def test_check_sh_streams_into_out_and_names_every_step_in_its_summary(tmp_path):
    """The real check.sh with its first step alone: the log is written as it runs, each step is
    planned, and the summary names them all."""
    proc = subprocess.run(["bash", str(GPU / "check.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                               "CHECK_STEPS": "machine", "BENCH_WORKDIR": str(tmp_path / "work")})
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = (out / "summary.txt").read_text()
    assert text in proc.stdout and text in (out / "log.txt").read_text()
    assert "== [machine] start" in (out / "log.txt").read_text()
    for name in ("install", "smoke", "pytest", "bench", "svd"):
        assert f"{name:<8} skipped: not selected" in text, name
    assert "machine  pass" in text
    planned = [json.loads(line)["step"] for line in (out / "plan.jsonl").read_text().splitlines()]
    assert planned == ["machine", "install", "smoke", "pytest", "bench", "svd"]
    machine = json.loads((out / "machine.json").read_text())
    # the folder asked for is the only one looked at (whether 70B layers fit is this disk's business)
    assert [c["path"] for c in machine["bench"]["candidates"]] == [str(tmp_path / "work")] and "tf32" in machine
    assert machine["bench"]["workdir"] in (None, str(tmp_path / "work")) and machine["bench"]["why"]


def test_the_benchmark_goes_to_the_first_real_disk_with_room_and_as_many_layers_as_fit(tmp_path, monkeypatch):
    import machine as machine_step
    from bench_70b import LLAMA3_70B, tensor_bytes

    layer = tensor_bytes(dict(LLAMA3_70B), 1)
    # "small" holds one layer's input but not also its output; "two" holds two layers twice, 10% spare
    disks = {"small": ("ext4", 2 * layer), "ram": ("tmpfs", 100 * layer),
             "two": ("xfs", int(2.2 * tensor_bytes(dict(LLAMA3_70B), 2))),
             "big": ("ext4", 100 * layer)}
    monkeypatch.setattr(machine_step.shutil, "disk_usage",
                        lambda p: type("U", (), {"free": disks[Path(p).name][1]})())
    monkeypatch.setattr(machine_step, "fs_type", lambda p: disks[Path(p).name][0])
    paths = [tmp_path / name for name in ("small", "ram", "two", "big")]
    stale = tmp_path / "two" / "tmpab12" / "llama3-70b-shapes"  # a killed run's checkpoint goes
    stale.mkdir(parents=True)
    plan = machine_step.bench_plan(paths, 3, 64)
    assert (plan["workdir"], plan["layers"], plan["fs"]) == (str(tmp_path / "two"), 2, "xfs")
    assert plan["bytes"] == tensor_bytes(dict(LLAMA3_70B), 2) and not stale.parent.exists()
    fit = [c["layers_fit"] for c in plan["candidates"]]
    assert fit[0] == 0 and fit[2] == 2 and min(fit[1], fit[3]) > 3
    assert machine_step.bench_plan(paths[3:], 3, 64)["layers"] == 3
    assert machine_step.bench_plan(paths[:2], 3, 64)["workdir"] is None  # too small, then memory-backed
    short = machine_step.bench_plan(paths, 3, 7.5)
    assert short["workdir"] is None and "under the 8" in short["why"] and len(short["candidates"]) == 4


# -- the summary ---------------------------------------------------------------------------

def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_summary_of_a_cut_off_check_says_how_far_it_got(tmp_path):
    """smoke timed out in its tf32 check; the whole call was then killed during pytest; the
    bench never ran: the summary names every planned step, and fails."""
    write_lines(tmp_path / "plan.jsonl", [{"step": s, "budget": b, "cuda_only": c} for s, b, c in
                                          (("machine", 20, 0), ("install", 60, 0), ("smoke", 110, 0),
                                           ("pytest", 90, 1), ("bench", 150, 1), ("svd", 40, 1))])
    write_lines(tmp_path / "steps.jsonl", [
        {"step": "machine", "event": "start", "budget": 20}, {"step": "machine", "event": "end", "verdict": "pass",
                                                               "rc": 0, "seconds": 4, "budget": 20},
        {"step": "install", "event": "end", "verdict": "pass", "rc": 0, "seconds": 21, "budget": 60},
        {"step": "smoke", "event": "end", "verdict": "timed out", "rc": 124, "seconds": 110, "budget": 110},
        {"step": "pytest", "event": "start", "budget": 90}])
    (tmp_path / "steps.jsonl").write_text((tmp_path / "steps.jsonl").read_text() + '{"step": "svd", "ev')  # cut
    (tmp_path / "smoke.json").write_text(json.dumps({
        "factors": {"verdict": "pass", "detail": {"worst": 0.99}, "s": 3.1},
        "tf32": {"verdict": "running", "detail": None, "started": "12:00:00"}}))
    (tmp_path / "machine.json").write_text(json.dumps({"card": "H100", "gpus": [{"name": "NVIDIA H100 80GB HBM3",
                                                                                 "total_gib": 79.1}],
                                                       "versions": {"torch": "2.7.0"}, "cuda": True}))
    code = summary.main(tmp_path)
    text = (tmp_path / "summary.txt").read_text()
    assert code == 1
    lines = text.splitlines()
    assert "H100: NVIDIA H100 80GB HBM3 79 GiB" in lines[1]
    assert "machine  pass (4 s of 20 s)" in lines and "smoke    timed out (110 s of 110 s)" in lines
    assert "  factors    pass (3.1 s): {\"worst\": 0.99}" in lines
    assert any(line.startswith("  tf32       did not finish (killed in it)") for line in lines)
    assert any(line.startswith("pytest   cut off (started, never ended") for line in lines)
    assert "bench    not run (budget 150 s)" in lines and "svd      not run (budget 40 s)" in lines
    assert lines[-1].startswith("== NOT passed: smoke, pytest, bench, svd")


def test_the_summary_of_a_whole_check_has_its_numbers(tmp_path):
    write_lines(tmp_path / "plan.jsonl", [{"step": "pytest", "budget": 90, "cuda_only": 1},
                                          {"step": "bench", "budget": 150, "cuda_only": 1}])
    write_lines(tmp_path / "steps.jsonl", [
        {"step": "pytest", "event": "end", "verdict": "pass", "rc": 0, "seconds": 50, "budget": 90},
        {"step": "bench", "event": "end", "verdict": "skipped: no CUDA", "rc": 0, "seconds": 30, "budget": 150}])
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.test_x" name="test_ok"/><testcase classname="tests.test_x" name="test_bad">'
        '<failure message="boom"/></testcase><testcase classname="tests.test_x" name="test_skip"><skipped/>'
        '</testcase></testsuite></testsuites>')
    d = {"weights": 14, "bytes": 6e9, "seconds": 3.0, "gb_per_s": 2.0}
    (tmp_path / "bench70.json").write_text(json.dumps({
        "dims": {"layers": 3}, "bytes": 9.3e9, "copy_s": 6.2, "ratio_to_copy": 2.5, "workdir_fs": "ext4",
        "target_share": 0.55, "steady_ratio_to_copy": 1.1, "copy_gb_per_s": 1.5,
        "steady": {"weights": 21, "decoder": d, "after_first_layer": d, "before_first_weight_s": 4.0,
                   "after_last_weight_s": 1.0},
        "pissa_rs": {"wall_s": 15.5, "peak_rss_bytes": 3 * 2**30, "peak_gpu_bytes": {"cuda:0": 2**31}, "torch_s": 2.0,
                     "timeline": {"seconds": {"read": 5.0, "compute": 2.0}, "device_compute_share": 0.4}}}))
    assert summary.main(tmp_path) == 0
    text = (tmp_path / "summary.txt").read_text()
    assert "  1 passed, 1 failed, 0 errors, 1 skipped in 12 s" in text
    assert "  failed: tests.test_x::test_bad: boom" in text
    assert "whole run 2.50x the copy" in text and "peak GPU cuda:0: 2.0 GiB" in text
    assert "steady state: decoder layers' 14 weights (55% of the bytes) 2.00 GB/s: 1.10x the copy" in text
    assert "timeline: read 5.0 s, compute 2.0 s; devices computing 40%" in text
    assert text.splitlines()[-1].startswith("== all steps passed")


# -- the smoke -----------------------------------------------------------------------------

def run_smoke(out: Path, only: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU / "smoke.py"), str(out)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT,
                          env={**os.environ, "SMOKE_DEVICE": "cpu", "SMOKE_ONLY": only, **env})


def test_the_fast_smoke_checks_pass_on_the_cpu(tmp_path):
    temp = tmp_path / "temp"  # where the checks' folders go: nothing is left there after
    temp.mkdir()
    proc = run_smoke(tmp_path, "quantizer,runner,fullsvd", TMPDIR=str(temp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(temp.glob("pissa-smoke-*")) == []  # (torch keeps its own caches there)
    found = json.loads((tmp_path / "smoke.json").read_text())
    assert {k: v["verdict"] for k, v in found.items()} == {"quantizer": "pass", "runner": "pass",
                                                           "fullsvd": "skipped: no CUDA"}
    assert found["runner"]["detail"]["2 worker(s)"]["wrong"] == []
    assert set(found["quantizer"]["detail"]) == {"nf4", "nf4-dq", "fp4", "fp4-dq", "int8"}


def test_a_smoke_run_killed_in_a_check_leaves_the_checks_before_it_and_names_it(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(GPU)!r})
        import smoke
        smoke.CHECKS.clear()
        smoke.check("first")(lambda s: (smoke.PASS, {{"n": 1}}))
        smoke.check("broken")(lambda s: 1 / 0)
        smoke.check("slow")(lambda s: (time.sleep(1), s.progress("slow", {{"half": True}}), time.sleep(60)))
        smoke.check("never")(lambda s: (smoke.PASS, None))
        sys.exit(smoke.main(["smoke", sys.argv[1]]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "SMOKE_DEVICE": "cpu"})
    seen = []  # each state of the slow check smoke.json showed: said as it started, then its numbers so far
    try:  # killed (as the time box does) once it is in its slow check
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and {"half": True} not in seen:
            try:
                slow = json.loads((tmp_path / "smoke.json").read_text()).get("slow")
            except (OSError, ValueError):
                slow = None
            if slow is not None and (not seen or seen[-1] != slow["detail"]):
                seen.append(slow["detail"])
            time.sleep(0.05)
        assert proc.poll() is None, "the smoke run ended by itself"
    finally:
        proc.kill()
        proc.wait()
    found = json.loads((tmp_path / "smoke.json").read_text())
    assert found["first"]["verdict"] == "pass" and found["broken"]["verdict"] == "fail"
    assert "ZeroDivisionError" in found["broken"]["detail"]
    assert found["slow"]["verdict"] == "running" and seen == [None, {"half": True}]
    assert "never" not in found


# -- the bundle ----------------------------------------------------------------------------

def fake_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> None:
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", "Metadata-Version: 2.1\nName: " + name + "\nVersion: "
                   + version + "\n" + "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nthe description\n")


def test_a_requirement_the_bundle_lacks_is_named_for_each_node_python(tmp_path):
    fake_wheel(tmp_path, "pytest", "9.0", ["pluggy>=1.5", "pygments>=2", "packaging",
                                           'exceptiongroup; python_version < "3.11"', 'tomli; extra == "toml"'])
    fake_wheel(tmp_path, "pygments", "2.19", [])
    fake_wheel(tmp_path, "hypothesis", "6.1", ["sortedcontainers"], "cp312-cp312-manylinux2014_x86_64")
    fake_wheel(tmp_path, "sortedcontainers", "2.4", [])
    bundle.write_manifest(tmp_path, ["3.11", "3.12"], ["torch"], ["torch", "packaging"])
    assert bundle.missing(tmp_path) == [
        "[3.11] hypothesis: no wheel for this Python",
        "[3.11] pytest 9.0 needs pluggy>=1.5: not in the bundle nor the node's stack",
        "[3.12] pytest 9.0 needs pluggy>=1.5: not in the bundle nor the node's stack"]
    fake_wheel(tmp_path, "pluggy", "1.0", [])
    bundle.write_manifest(tmp_path, ["3.12"], ["torch"], ["torch", "packaging"])
    assert bundle.missing(tmp_path) == [
        "[3.12] pytest 9.0 needs pluggy>=1.5: not in the bundle (bundled: 1.0) nor the node's stack"]
    (tmp_path / "pluggy-1.0-py3-none-any.whl").unlink()
    fake_wheel(tmp_path, "pluggy", "1.6", [])
    bundle.write_manifest(tmp_path, ["3.12"], ["torch"], ["torch", "packaging"])
    assert bundle.missing(tmp_path) == []
    assert bundle.main(["check", str(tmp_path)]) == 0


def test_wheel_tags_say_which_pythons_a_wheel_installs_on():
    assert bundle.wheel_supports("pissa_rs-0.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", "3.13")
    assert not bundle.wheel_supports("pissa_rs-0.1.0-cp311-abi3-manylinux_2_28_x86_64.whl", "3.10")
    assert bundle.wheel_supports("hypothesis-6-cp312-cp312-manylinux2014_x86_64.whl", "3.12")
    assert not bundle.wheel_supports("hypothesis-6-cp312-cp312-manylinux2014_x86_64.whl", "3.13")
    assert bundle.wheel_supports("sortedcontainers-2.4.0-py2.py3-none-any.whl", "3.12")
    assert bundle.wheel_tags("Sorted_Containers-2.4.0-1-py3-none-any.whl")[:2] == ("sorted-containers", "2.4.0")


def test_pip_check_fails_on_the_bundles_doing_only():
    ours = {"pytest", "packaging"}
    assert bundle.ours_broken("pytest 9.2.0 requires pluggy, which is not installed.", ours)
    assert bundle.ours_broken("transformers 5.0.0 has requirement packaging<25, but you have packaging 26.4.", ours)
    assert not bundle.ours_broken("torch 2.15.0 has requirement setuptools>=77, but you have setuptools 65.5.0.", ours)


def test_the_rehearsal_venv_sees_the_node_stack_and_nothing_else(tmp_path):
    """What the project's venv has beyond the node's stack (pytest here) must not leak into the
    rehearsal's venv, or a wheel the bundle lacks would go unnoticed."""
    assert "huggingface-hub" in bundle.stack(["transformers"]) and "pytest" not in bundle.stack(["tqdm"])
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True, timeout=60)
    bundle.view(tmp_path / "v", ["tqdm"])
    probe = "import importlib.util as u; print(u.find_spec('tqdm') is not None, u.find_spec('pytest') is not None)"
    proc = subprocess.run([str(tmp_path / "v" / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["True", "False"], proc.stderr


# -- the CUDA test selection ---------------------------------------------------------------

def test_the_cuda_selection_keeps_the_tests_meant_for_a_gpu(tmp_path):
    (tmp_path / "test_mixed.py").write_text(textwrap.dedent("""
        import pytest
        @pytest.mark.skipif(True, reason="needs a CUDA device")
        def test_on_cuda(): pass
        @pytest.mark.skipif(True, reason="needs a GPU")
        def test_on_gpu(): pass
        @pytest.mark.skipif(True, reason="needs linux")
        def test_elsewhere(): pass
        @pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
        def test_each(device): pass
        def test_plain(): pass
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "cuda_select", "-p", "no:cacheprovider", "-q",
                           "--collect-only", "test_mixed.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(GPU)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = sorted(line.split("::")[1] for line in proc.stdout.splitlines() if "::" in line)
    assert collected == ["test_each[cuda:1]", "test_each[cuda]", "test_on_cuda", "test_on_gpu"]
    assert "(3 deselected)" in proc.stdout


# -- the 70B benchmark's steady state ------------------------------------------------------

def test_the_steady_state_is_the_decoder_layers_bytes_over_their_span(tmp_path):
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight",
             "model.layers.2.mlp.up_proj.weight"]
    nbytes = dict(zip(names, (100, 200, 5000, 300)))
    spans = [("read", 0, 10.0, 11.0), ("compute", 0, 11.0, 12.0), ("write", 0, 12.0, 12.5),
             ("wait_input", -1, 5.0, 30.0),  # no weight in particular: not a weight's time
             ("read", 1, 11.0, 12.0), ("compute", 1, 12.0, 13.0), ("write", 1, 13.0, 13.5),
             ("read", 2, 12.0, 13.0), ("write", 2, 13.0, 14.0),
             ("read", 3, 13.0, 14.0), ("compute", 3, 14.0, 15.5), ("write", 3, 15.5, 16.0)]
    path = tmp_path / "t.jsonl"
    write_lines(path, [{"kind": k, "index": i, "thread": "x", "start": s, "end": e, "pid": 1} for k, i, s, e in spans])
    found = steady_state(path, names, nbytes, t0=4.0, t1=17.5)
    assert found["decoder"] == {"weights": 3, "bytes": 600, "seconds": 6.0, "gb_per_s": 600 / 6.0 / 1e9}
    assert found["after_first_layer"] == {"weights": 2, "bytes": 500, "seconds": 5.0, "gb_per_s": 500 / 5.0 / 1e9}
    assert found["before_first_weight_s"] == 6.0 and found["after_last_weight_s"] == 1.5 and found["weights"] == 4


def test_the_benchmark_refuses_a_tmpfs_working_folder():
    assert fs_type("/") not in ("tmpfs", "unknown")
    if fs_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    # a file size limit: were the refusal gone, the 5 GB shard's first write would end the run at once
    proc = subprocess.run(["bash", "-c", 'ulimit -f 4096; exec "$@"', "bash", sys.executable,
                           str(ROOT / "benches" / "bench_70b.py"), "--workdir", "/dev/shm", "--layers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "/dev/shm is on tmpfs" in proc.stderr and "--workdir on a real disk" in proc.stderr
    assert not list(Path("/dev/shm").glob("tmp*/llama3-70b-shapes"))
