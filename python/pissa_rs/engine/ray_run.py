"""Every unit of a job as one Ray task on an existing cluster whose nodes share the input
and output folders (at the driver's paths, or mapped with PISSA_RS_PATH_MAP): the job put
in Ray's object store once, the most expensive units first, small summaries back, bulk
data through the filesystem."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from .._pissa_rs import PissaError
from .devices import PAGE_LOCKED
from .lease import Lease
from .run import ByIndex, run_unit
from .units import Job, is_done
from ..precision import in_ieee_float32

RETRIES = 3  # attempts after the first, when a node or worker dies (never for a PissaError)
# How long an alive node may take to answer the fingerprint probe (a fresh worker imports
# torch and measures the rounding probe: seconds); a node that dies meanwhile is dropped.
FINGERPRINT_TIMEOUT_S = 300.0
NODE_POLL_S = 2.0


class RayUnavailableError(PissaError, ImportError):
    """ray=... was asked for and Ray is not installed."""


class EnvironmentMismatchError(PissaError, RuntimeError):
    """The cluster's nodes would not all write the same bytes."""


# What may differ between nodes with allow_mixed_rounding: how they round, not what they run.
ROUNDING_KEYS = ("rounding", "cpu_kernels", "device_name")


def environment_fingerprint(job: Job) -> dict[str, Any]:
    """What decides this node's bytes: versions, device kind and name, the CPU kernels torch
    picks, for QPiSSA which quantizer runs, and what all of them come to: the rounding probe
    (rounding.py), measured with the driver's thread count."""
    import torch

    from .. import __version__
    from ..rounding import job_probe

    device = torch.device(job.options.device)
    fingerprint = {"pissa_rs": __version__, "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        fingerprint.update(cuda=torch.version.cuda, device_name=torch.cuda.get_device_name(device))
    else:
        torch.set_num_threads(job.threads)  # as the driver's process would compute: the same rounding
        fingerprint.update(cpu_kernels=torch.backends.cpu.get_cpu_capability(), machine=platform.machine())
    quant = job.options.quantization
    if quant is not None:  # this node's own check (bitsandbytes agrees with the reference, or not)
        fingerprint["quantizer"] = quant.choice(device.type).backend
    fingerprint["rounding"] = job_probe(job.options, job.outputs[0].plan.targets, device)
    return fingerprint


def fingerprint_difference(a: dict, b: dict, allow_mixed_rounding: bool) -> str:
    """What differs between two nodes' fingerprints that refuses them, in words ("" if nothing)."""
    keys = sorted((set(a) | set(b)) - (set(ROUNDING_KEYS) if allow_mixed_rounding else set()))
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


def host_memory_estimate(job: Job, gpu: bool) -> int:
    """Host memory a unit task needs, for Ray's scheduler: the device runner's two staging
    buffers of the largest weight, on a CPU also the SVD's float32 copies of it (about
    four), and the worker's own torch (~0.7 GiB). run_on_ray caps it at the largest node's."""
    from ..tensors import nbytes
    from .devices import BUFFERS_PER_DEVICE

    targets = job.outputs[0].plan.targets
    largest = max((t.location.nbytes if t.location else nbytes(t.dtype, list(t.shape)) for t in targets), default=0)
    elements = max((t.shape[0] * t.shape[1] for t in targets), default=0)
    return BUFFERS_PER_DEVICE * largest + (0 if gpu else 4 * 4 * elements) + (700 << 20)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            "ray=... (--ray) runs the decomposition on a Ray cluster, and Ray is not installed: "
            "pip install 'pissa-rs[ray]'") from None
    return ray


def _connect(ray, address: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)


def cluster_device(address: str) -> str:
    """The device kind a Ray run takes when none is named: cuda where the cluster has GPUs,
    else cpu. The driver's own torch says nothing about the nodes (a head without a GPU is
    common)."""
    ray = _import_ray()
    _connect(ray, address)
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def task_options(options):
    """The options as a unit task runs them: Ray gives a GPU task one GPU and makes it the
    only one it sees (CUDA_VISIBLE_DEVICES), so whatever the driver named (cuda:1, or a
    list) it is cuda:0 here; a CPU task computes on cpu."""
    from dataclasses import replace

    return replace(options, device="cuda:0" if options.torch_devices[0].type == "cuda" else "cpu", devices=None)


def on_this_task(job: Job) -> Job:
    """The job with every options object's devices as this task sees them (task_options)."""
    from dataclasses import replace

    return replace(job, options=task_options(job.options),
                   outputs=tuple(replace(s, options=task_options(s.options)) for s in job.outputs))


@in_ieee_float32
def _fingerprint_task(job: Job) -> tuple[str, dict]:
    import ray

    return ray.get_runtime_context().get_node_id(), environment_fingerprint(on_this_task(job))


PATH_MAP = "PISSA_RS_PATH_MAP"  # on a node that mounts the shared folders elsewhere: "/driver/path=/node/path;..."


def as_mounted_here(job: Job) -> Job:
    """The job with the driver's paths rewritten as this node mounts them (PATH_MAP in the
    node's environment); unchanged where it is not set."""
    from dataclasses import replace

    pairs = [item.split("=", 1) for item in os.environ.get(PATH_MAP, "").split(";") if "=" in item]
    if not pairs:
        return job

    def here(path) -> Path:
        text = str(path)
        for driver, node in pairs:
            if text == driver or text.startswith(driver.rstrip("/") + "/"):
                return Path(node.rstrip("/") + text[len(driver.rstrip("/")):])
        return Path(text)

    def options_here(options):  # extract's base model is a folder the nodes read too
        return replace(options, extract_base=str(here(options.extract_base))) if options.extract_base else options

    return replace(job, input=here(job.input), options=options_here(job.options),
                   outputs=tuple(replace(s, out=here(s.out), options=options_here(s.options)) for s in job.outputs),
                   inputs=tuple({**e, "file": str(here(e["file"]))} for e in job.inputs))


@in_ieee_float32
def _unit_task(job: Job, index: int, expected: dict) -> dict[str, Any]:
    """One attempt at unit `index`, on whichever node Ray chose."""
    import ray

    job = on_this_task(as_mounted_here(job))
    node = ray.get_runtime_context().get_node_id()
    found = environment_fingerprint(job)  # sets the driver's thread count on a CPU
    difference = fingerprint_difference(found, expected, job.options.allow_mixed_rounding)
    if difference:
        raise EnvironmentMismatchError(f"node {node} would write other bytes than the cluster's other nodes "
                                       f"({difference}); refused before writing")
    unit = job.units[index]
    statistics = None
    if job.options.init_method.reads_base:  # extract: each target's base matrix, read here as the unit needs it
        from ..extraction import BaseReads

        targets = job.outputs[0].plan.targets
        statistics = ByIndex(BaseReads(Path(job.options.extract_base), targets), targets)
    try:
        summary = run_unit(job, unit, lease=Lease.take(job, unit), rounding=found["rounding"], statistics=statistics)
    finally:
        PAGE_LOCKED.clear()  # a Ray worker outlives the task: its staging memory is not kept locked
    return {**summary, "node": node, "bytes": unit.nbytes}


def _resources(job: Job) -> dict[str, int]:
    return {"num_gpus": 1} if job.options.torch_devices[0].type == "cuda" else {"num_cpus": 1}


def cluster_rounding(job: Job, address: str) -> tuple[str, dict[str, dict]]:
    """Connect to the cluster and fingerprint every node that can run a unit, before anything
    is written: returns the rounding the run's identity records (the nodes' common probe; with
    allow_mixed_rounding and nodes that differ, all of their probes) and the fingerprints."""
    ray = _import_ray()
    _connect(ray, address)
    fingerprints = _node_fingerprints(ray, job, _resources(job))
    return "+".join(sorted({f["rounding"] for f in fingerprints.values()})), fingerprints


def run_on_ray(job: Job, address: str, progress: bool, fingerprints: dict[str, dict] | None = None
               ) -> dict[str, Any]:
    """Run every unit of `job` not yet done as a Ray task; returns what the report records
    of the run (the nodes' fingerprint, units per node). A PissaError in a task (bad input,
    a wrong option) stops the run at once with its message; a node that dies has its unit
    retried elsewhere, resuming from the unit's journal. `fingerprints`: cluster_rounding's."""
    ray = _import_ray()
    from tqdm.auto import tqdm

    if fingerprints is None:
        fingerprints = cluster_rounding(job, address)[1]
    gpu = job.options.torch_devices[0].type == "cuda"
    resources = _resources(job)
    expected = next(iter(fingerprints.values()))
    job_ref = ray.put(job)
    largest = max((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n.get("Resources", {}).get("memory", 0))
    cap = int(largest.get("Resources", {}).get("memory", 0))  # 0: the cluster does not say
    memory = min(host_memory_estimate(job, gpu), cap) if cap else host_memory_estimate(job, gpu)
    task = ray.remote(_unit_task).options(max_retries=RETRIES, retry_exceptions=False, memory=memory, **resources)
    todo = sorted((u for u in job.units if not all(is_done(s.out, u) for s in job.outputs if not s.complete)),
                  key=lambda u: -u.nbytes)
    pending = {task.remote(job_ref, u.index, expected): u for u in todo}
    per_node: dict[str, int] = {}
    started = time.perf_counter()
    with tqdm(total=sum(u.nbytes for u in todo), unit="B", unit_scale=True, unit_divisor=1024, desc="pissa (ray)",
              disable=not progress) as bar:
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(ready[0])
                summary = ray.get(ready[0])
                per_node[summary["node"]] = per_node.get(summary["node"], 0) + 1
                bar.update(unit.nbytes)
                bar.set_postfix_str(f"{len(todo) - len(pending)}/{len(todo)} units", refresh=False)
        except BaseException as err:
            for ref in pending:  # not force=True: on a task not yet placed on a node, Ray 2.x's core
                ray.cancel(ref)  # worker aborts the driver (a failed check, node_id != "") moments later
            cause = getattr(err, "cause", None)
            if isinstance(cause, PissaError):
                raise cause from None  # the task's own error, as a local run would raise it
            raise
    probes = sorted({f["rounding"] for f in fingerprints.values()})
    return {"address": address, "fingerprint": expected, "nodes": sorted(fingerprints), "units_per_node": per_node,
            **({"rounding_by_node": {n: f["rounding"] for n, f in sorted(fingerprints.items())}}
               if len(probes) > 1 else {}),
            "task_memory_bytes": memory, "seconds": time.perf_counter() - started}


def _answers(ray, pending: dict) -> dict[str, dict]:
    """The fingerprint tasks' answers, by node. A task pinned to a node that died (or that
    Ray still lists while it goes: a lost node's task would wait forever) is dropped once Ray
    no longer lists the node alive; an alive node silent past FINGERPRINT_TIMEOUT_S is named."""
    found, deadline = {}, time.monotonic() + FINGERPRINT_TIMEOUT_S
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=NODE_POLL_S)
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for ref in ready:
            node = pending.pop(ref)
            try:
                answered, fingerprint = ray.get(ref)
            except Exception:
                if node in alive:
                    raise
                continue  # it died with its task: not a node to run units on
            found[answered] = fingerprint
        for ref, node in list(pending.items()):
            if node not in alive:  # left as it is: it never runs, and Ray 2.x aborts the driver (a failed
                del pending[ref]  # check, node_id != "") when asked to cancel a task it never placed
        if pending and time.monotonic() > deadline:
            raise EnvironmentMismatchError(
                f"Ray nodes {', '.join(sorted(pending.values()))} are alive but did not answer the fingerprint probe "
                f"in {FINGERPRINT_TIMEOUT_S:.0f} s; remove them from the cluster or check their workers' logs")
    return found


def _node_fingerprints(ray, job: Job, resources: dict) -> dict[str, dict]:
    """Every alive node that can run a unit, and its fingerprint; refused, naming the
    nodes, when two differ."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and
             n.get("Resources", {}).get("GPU" if "num_gpus" in resources else "CPU", 0) >= 1]
    if not nodes:
        raise EnvironmentMismatchError("the Ray cluster has no alive node with a "
                                       f"{'GPU' if 'num_gpus' in resources else 'CPU'} to run units on")
    probe = ray.remote(_fingerprint_task)
    found = _answers(ray, {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                         **resources).remote(job): n["NodeID"] for n in nodes})
    if not found:
        raise EnvironmentMismatchError("every node of the Ray cluster died before it answered the fingerprint probe")
    first_node, first = next(iter(found.items()))
    for node, fingerprint in found.items():
        difference = fingerprint_difference(first, fingerprint, job.options.allow_mixed_rounding)
        if difference:
            raise EnvironmentMismatchError(
                f"nodes {first_node} and {node} would write other bytes ({difference}); give every node the same "
                "pissa_rs, torch, CUDA, device kind and CPU or GPU model, run on a uniform subset, or "
                "allow_mixed_rounding=True (--allow-mixed-rounding) for an output that is no single machine's bytes")
    return found
