"""One decomposition spread over a Ray cluster (one task per unit): the bytes of a local
run, whatever dies (the report's measured numbers within float32 summation: a worker's BLAS
splits ||W||_F^2 its own way). The cluster is Ray's own `cluster_utils.Cluster`: a head with no CPUs
and two 1-CPU nodes, separate raylets on this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import digest, same_output, save_spread, text
from low_precision import save_fp8_block
from make_tiny_model import save_tiny_model

import pissa_rs

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _two_node_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 2,
                                          "health_check_initial_delay_ms": 0}})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    c.workers = nodes
    return c


@pytest.fixture(scope="module")
def cluster():
    c = _two_node_cluster()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def lossy_cluster():
    """A cluster of its own for a test that loses a node: Ray goes on listing a lost node
    for a while, and tasks placed on it abort the driver (a failed check in Ray's core
    worker), so the shared cluster must never hold one."""
    ray.shutdown()
    c = _two_node_cluster()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ray") / "llama", "llama", layers=2, shard_size="150KB")


def gpt_oss(path):
    torch.manual_seed(0)
    save_spread(transformers.GptOssForCausalLM(transformers.GptOssConfig(**text(
        num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))), path, max_shard_size="100KB")
    return path


def fp8(path):
    torch.manual_seed(0)
    save_fp8_block(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text())), path)
    return path


CASES = {
    "dense": (None, dict(r=4)),
    "several-ranks": (None, dict(r=[2, 4])),
    "qpissa-saved": (None, dict(r=4, quantize="nf4", quant_iters=2, save_quantized=True, measure_error=False)),
    "moe-fused": (gpt_oss, dict(r=4, target_parameters=EXPERTS)),
    "fp8": (fp8, dict(r=4, measure_error=False)),
}


def outputs(res):
    return [r.out for r in res] if isinstance(res, list) else [res.out]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_ray_run_writes_the_bytes_of_a_local_run(cluster, llama, tmp_path, case):
    make, options = CASES[case]
    src = make(tmp_path / "src") if make else llama
    out = "r{r}" if isinstance(options["r"], list) else "o"
    local = pissa_rs.decompose_checkpoint(src, out=tmp_path / "local" / out, progress=False, **options)
    remote = pissa_rs.decompose_checkpoint(src, out=tmp_path / "ray" / out, progress=False, ray=cluster.address,
                                           **options)
    for mine, theirs in zip(outputs(remote), outputs(local)):
        same_output(mine, theirs, report_rtol=1e-6)
    report = (remote[0] if isinstance(remote, list) else remote).report
    assert report["cluster"]["fingerprint"]["device"] == "cpu"
    assert len(report["cluster"]["nodes"]) == 2
    largest = max(t["shape"][0] * t["shape"][1] for t in report["tensors"])
    # the largest weight staged twice and copied to float32 four times, and a worker's torch
    assert 16 * largest + (700 << 20) <= report["cluster"]["task_memory_bytes"] < 24 << 30
    assert sum(report["cluster"]["units_per_node"].values()) == len(list(Path(src).glob("*.safetensors")))


def test_extract_lora_on_ray_writes_the_bytes_of_a_local_run(cluster, llama, tmp_path):
    """extract-lora's units on the cluster: each node reads its targets' base matrices itself."""
    base = save_tiny_model(tmp_path / "base", "llama", layers=2, shard_size="150KB", seed=1)
    options = dict(r=4, energy=0.5, save_modules=True, progress=False)
    local = pissa_rs.extract_lora(base, llama, tmp_path / "local", **options)
    remote = pissa_rs.extract_lora(base, llama, tmp_path / "ray", ray=cluster.address, **options)
    mine, theirs = digest(remote.out), digest(local.out)  # the adapter names BASE in both: every file but the report
    assert mine.pop("pissa_report.json") and theirs.pop("pissa_report.json") and mine == theirs
    assert [t["r"] for t in remote.report["tensors"]] == [t["r"] for t in local.report["tensors"]]
    assert len(remote.report["cluster"]["nodes"]) == 2 and remote.report["extract"]["saved_whole"]


@pytest.mark.parametrize("sig", ["KILL", "BUS"])
def test_a_worker_killed_mid_unit_is_retried_and_adopts_what_its_journal_holds(cluster, llama, tmp_path, sig):
    """The fault hook kills the worker at its 2nd target (SIGKILL; SIGBUS, what a soft NFS
    mount's failed read does to a mapping); Ray retries the unit on a worker, which adopts
    the journaled tensors and finishes: the same bytes."""
    reference = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "ref", progress=False)
    once = tmp_path / "fired"
    ray.shutdown()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False, runtime_env={
        "env_vars": {"PISSA_RS_SIGNAL_AT": f"target:2:{sig}", "PISSA_RS_SIGNAL_ONCE": str(once)}})
    try:
        res = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address)
    finally:
        ray.shutdown()
    assert once.exists(), "the fault hook did not fire: the test tested nothing"
    same_output(res.out, reference.out, report_rtol=1e-6)


def test_nodes_that_mount_the_folders_elsewhere_say_so_and_write_the_same_bytes(cluster, llama, tmp_path):
    """PISSA_RS_PATH_MAP on the nodes: the driver's paths rewritten as the nodes mount them
    (here another path to the same folders, through a symlink)."""
    reference = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "ref", progress=False)
    (tmp_path / "mnt").symlink_to(tmp_path)
    (tmp_path / "in").symlink_to(llama.parent)
    ray.shutdown()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False, runtime_env={"env_vars": {
        "PISSA_RS_PATH_MAP": f"{tmp_path / 'o'}={tmp_path / 'mnt' / 'o'};{llama.parent}={tmp_path / 'in'}"}})
    try:
        res = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address)
    finally:
        ray.shutdown()
    same_output(res.out, reference.out, report_rtol=1e-6)


def test_a_node_lost_mid_unit_is_replaced_and_its_zombie_cannot_write(lossy_cluster, llama, tmp_path):
    """A worker frozen mid-unit (SIGSTOP, as a partitioned node), its node removed: the unit
    is retried on the other node and the output is the local run's. Then the frozen
    attempt wakes up: its lease is gone, it stops, and the output stays as it was."""
    cluster = lossy_cluster
    reference = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "ref", progress=False)
    spare = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    once = tmp_path / "fired"
    ray.shutdown()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False, runtime_env={
        "env_vars": {"PISSA_RS_SIGNAL_AT": "target:2:STOP", "PISSA_RS_SIGNAL_ONCE": str(once)}})
    result, frozen = {}, None
    raylets = {_raylet_of(n): n for n in [*cluster.workers, spare]}
    run = threading.Thread(target=lambda: result.update(res=pissa_rs.decompose_checkpoint(
        llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address)))
    try:
        run.start()
        deadline = time.time() + 120
        while frozen is None:
            assert time.time() < deadline, "no worker stopped"
            frozen = next((pid for pid in _pids() if _state(pid) == "T" and _parent(pid) in raylets), None)
            time.sleep(0.2)
        removed = raylets[_parent(frozen)]
        cluster.remove_node(removed, allow_graceful=False)
        cluster.workers = [n for n in raylets.values() if n is not removed]  # two nodes again
        run.join(timeout=180)
        assert not run.is_alive() and "res" in result, "the run did not finish after the node was removed"
        same_output(result["res"].out, reference.out, report_rtol=1e-6)
        before = digest(result["res"].out)
        try:
            os.kill(frozen, signal.SIGCONT)  # the zombie attempt wakes up, if its node's end did not take it
        except ProcessLookupError:
            pass
        else:
            time.sleep(3)
            assert digest(result["res"].out) == before
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ray.shutdown()


def test_a_bad_input_fails_once_and_fast_with_its_own_error(lossy_cluster, llama, tmp_path, monkeypatch):
    """A PissaError in a task (here: the input changed since it was planned) is not retried:
    the run stops with that error. (On a cluster of its own: the tasks it stops leave Ray 2.60's
    GCS unreachable for a while on this machine, which the next test would meet.)"""
    import pissa_rs.engine.ray_run as ray_run

    cluster = lossy_cluster

    real = ray_run.run_on_ray

    def with_changed_input(job, address, progress, fingerprints):
        from dataclasses import replace

        changed = tuple({**e, "mtime_ns": e["mtime_ns"] - 10**9} for e in job.inputs)
        return real(replace(job, inputs=changed), address, progress, fingerprints)

    monkeypatch.setattr(ray_run, "run_on_ray", with_changed_input)
    started = time.time()
    with pytest.raises(pissa_rs.InputChangedError, match="input file changed during the run"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address)
    assert time.time() - started < 60
    assert not list((tmp_path / "o").glob(".pissa_units/*.done"))


def _node_with(cluster, variable: str, value: str):
    """A one-CPU node started with `variable` set in its environment."""
    os.environ[variable] = value
    try:
        odd = cluster.add_node(num_cpus=1)
    finally:
        del os.environ[variable]
    cluster.wait_for_nodes()
    return odd


def test_a_node_that_would_write_other_bytes_is_refused_by_name(cluster, llama, tmp_path):
    odd = _node_with(cluster, "ATEN_CPU_CAPABILITY", "default")  # this node's torch picks other CPU kernels
    try:
        with pytest.raises(pissa_rs.EnvironmentMismatchError, match="cpu_kernels"):
            pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address)
        assert not list((tmp_path / "o").glob("model-0*"))
    finally:
        ray.shutdown()
        cluster.remove_node(odd)


def test_a_node_that_rounds_differently_is_refused_unless_mixing_is_allowed(cluster, llama, tmp_path):
    """Same versions, same CPU kernels, another rounding probe (the test hook stands for a CPU
    whose MKL takes other GEMM code): refused by name before anything is written; with
    allow_mixed_rounding the run goes on and the report says which node rounded how."""
    odd = _node_with(cluster, "PISSA_RS_ROUNDING_PROBE_SALT", "another CPU model")
    try:
        with pytest.raises(pissa_rs.EnvironmentMismatchError, match="rounding '[0-9a-f]+' vs '[0-9a-f]+'"):
            pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address)
        assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("model-0*"))
        res = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address,
                                            allow_mixed_rounding=True)
        by_node = res.report["cluster"]["rounding_by_node"]
        assert len(set(by_node.values())) == 2 and by_node[odd.node_id] != by_node[next(n for n in by_node
                                                                                    if n != odd.node_id)]
        rounding = res.report["rounding"]
        used_odd = res.report["cluster"]["units_per_node"].get(odd.node_id, 0) > 0
        assert rounding.get("mixed", False) == used_odd and (used_odd or rounding["probe"] in by_node.values())
        assert pissa_rs.verify(res.out, against=llama).ok
    finally:
        ray.shutdown()
        cluster.remove_node(odd)


def test_a_killed_driver_is_resumed_by_rerunning_and_finished_units_are_untouched(cluster, llama, tmp_path):
    reference = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "ref", progress=False)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "pissa_rs.cli", "decompose", str(llama), "-r", "4", "-o", str(out),
           "--no-progress", "--ray", cluster.address]
    # The hook must reach the cluster's workers, which do not inherit the driver's environment:
    # it goes in the job's runtime_env, as `ray job submit --runtime-env-json` hands it to a driver.
    fired = tmp_path / "fired"
    hook = {"PISSA_RS_SIGNAL_AT": "target:3:STOP", "PISSA_RS_SIGNAL_ONCE": str(fired)}
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": hook}})}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (fired.exists() and list(out.glob(".pissa_units/*.done"))):
            assert time.time() < deadline, "no unit finished, or the stopping hook never fired"
            assert driver.poll() is None, f"the driver ended before it was killed: {driver.communicate()}"
            time.sleep(0.1)
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    raylets = {_raylet_of(n) for n in cluster.workers}
    for pid in _pids():  # the stopped worker of the killed driver's job
        if _state(pid) == "T" and _parent(pid) in raylets:
            os.kill(pid, signal.SIGKILL)
    done = sorted(out.glob(".pissa_units/*.done"))
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("model-0*")}
    assert done and not (out / "pissa_report.json").exists()
    rerun = subprocess.run(cmd[:-2] + ["--ray", cluster.address], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    same_output(out, reference.out, report_rtol=1e-6)
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished


def test_gpu_tasks_see_their_own_gpu_as_cuda_0_and_the_kind_comes_from_the_cluster(cluster, llama, tmp_path):
    """A CPU-only head must not send the units of a GPU cluster to the CPUs, and a task given
    one GPU by Ray sees it alone, as cuda:0, whatever device names the driver used. Fake GPUs
    (Ray's num_gpus on a node of this machine) show the mapping; no CUDA is touched."""
    from pissa_rs.engine.ray_run import cluster_device, task_options

    if not ray.is_initialized():
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    assert cluster_device(cluster.address) == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        pissa_rs.DecomposeOptions.from_fields({"r": 4, "device": "cuda:1"})  # a local run: looked for here
    options = pissa_rs.DecomposeOptions.from_fields({"r": 4, "devices": ["cuda:1", "cuda:3"]}, on_cluster=True)
    with pytest.raises(ValueError, match="rank_budget runs its spectra pass on this machine"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray=cluster.address,
                                      device="cuda:0", rank_budget=True)
    gpu = cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    try:
        assert cluster_device(cluster.address) == "cuda"

        @ray.remote(num_gpus=1)
        def seen(o):
            return os.environ.get("CUDA_VISIBLE_DEVICES"), [str(d) for d in task_options(o).torch_devices]

        visible, devices = ray.get(seen.remote(options))
        assert visible in ("0", "1") and devices == ["cuda:0"]
        assert task_options(pissa_rs.DecomposeOptions.from_fields({"r": 4})).torch_devices == [torch.device("cpu")]
    finally:
        cluster.remove_node(gpu)


def test_without_ray_installed_the_error_says_how_to_get_it(llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(pissa_rs.RayUnavailableError, match=r"pip install 'pissa-rs\[ray\]'"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, ray="auto")


# -- processes on this machine ------------------------------------------------------

def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid())]


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def _raylet_of(node) -> int:
    return node.all_processes["raylet"][0].process.pid


class _FakeRay:
    """Ray's calls _answers makes, over tasks whose answer is given (None: never answers)."""

    def __init__(self, answers: dict, alive: set):
        self.answers, self.alive = answers, alive

    def wait(self, refs, num_returns, timeout):
        ready = [r for r in refs if self.answers[r] is not None]
        return ready, [r for r in refs if r not in ready]

    def nodes(self):
        return [{"NodeID": n, "Alive": True} for n in self.alive]

    def get(self, ref):
        if isinstance(self.answers[ref], Exception):
            raise self.answers[ref]
        return self.answers[ref]


def test_the_fingerprint_probe_drops_a_node_that_died_and_names_one_that_stays_silent(monkeypatch):
    """A probe pinned to a node Ray no longer lists alive (lost mid-probe, or listed while it
    went) would wait forever: it is dropped; an alive node that never answers is named after
    the timeout; a failed probe on an alive node is that node's error."""
    import pissa_rs.engine.ray_run as ray_run

    monkeypatch.setattr(ray_run, "NODE_POLL_S", 0.0)
    fake = _FakeRay({"a": ("node-a", {"x": 1}), "b": None, "c": RuntimeError("gone")}, alive={"node-a"})
    assert ray_run._answers(fake, {"a": "node-a", "b": "node-b", "c": "node-c"}) == {"node-a": {"x": 1}}

    monkeypatch.setattr(ray_run, "FINGERPRINT_TIMEOUT_S", 0.0)
    silent = _FakeRay({"a": ("node-a", {}), "b": None}, alive={"node-a", "node-b"})
    with pytest.raises(pissa_rs.EnvironmentMismatchError, match="Ray nodes node-b are alive but did not answer"):
        ray_run._answers(silent, {"a": "node-a", "b": "node-b"})
    failing = _FakeRay({"a": RuntimeError("its worker failed")}, alive={"node-a"})
    with pytest.raises(RuntimeError, match="its worker failed"):
        ray_run._answers(failing, {"a": "node-a"})
