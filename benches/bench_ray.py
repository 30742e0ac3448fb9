"""Benchmark: a decomposition run locally against the same run as Ray tasks on two
simulated nodes of this machine (ray.cluster_utils.Cluster: a head with no CPUs and two
nodes of `--node-cpus` CPUs each, separate raylets), same checkpoint, same process.

    python benches/bench_ray.py [--workdir DIR] [--layers 22] [--node-cpus 1] [--json OUT.json]

The checkpoint has TinyLlama-1.1B shapes (bench_decompose.py's, 1 GiB shards: 3 units).
On one machine the nodes share its cores and disk, so this measures what Ray adds (worker
start, the job's transfer, per-unit start, the commit), not the speed-up of real nodes
(docs/cluster.md works that out on paper). torch runs one thread per computation in both
runs (a Ray task computes with the driver's thread count, and the nodes have one CPU
each), so the local run uses one core and the Ray run two: `ideal` is the local wall
time scaled to the largest unit's share of the bytes, what two nodes could at best do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decompose import PROJECTIONS, machine, make_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--node-cpus", type=int, default=1)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch
    from ray.cluster_utils import Cluster

    import pissa_rs

    torch.set_num_threads(1)

    dims = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, layers=args.layers)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "tinyllama-shapes"
        total = make_checkpoint(src, dims, 1 << 30)
        kwargs = dict(r=args.rank, niter=args.niter, target_modules=PROJECTIONS, progress=False)
        t0 = time.perf_counter()
        pissa_rs.decompose_checkpoint(src, out=Path(tmp) / "local", **kwargs)
        local = time.perf_counter() - t0

        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=args.node_cpus)
        cluster.wait_for_nodes()
        start = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            res = pissa_rs.decompose_checkpoint(src, out=Path(tmp) / "ray", ray=cluster.address, **kwargs)
            on_ray = time.perf_counter() - t0
        finally:
            ray.shutdown()
            cluster.shutdown()
        shards = [f.stat().st_size for f in src.glob("*.safetensors")]  # a unit each here
        ideal = local * max(shards) / sum(shards)
        same = all((Path(tmp) / "local" / f.name).read_bytes() == f.read_bytes()
                   for f in (Path(tmp) / "ray").glob("*.safetensors"))

    report = {"machine": machine(), "bytes": total, "local_s": local, "ray_s": on_ray, "cluster_start_s": start,
              "ideal_s": ideal, "ratio": on_ray / local, "ratio_to_ideal": on_ray / ideal, "same_bytes": same,
              "cluster": res.report["cluster"]}
    print(f"| run | wall (s) |\n|---|---:|\n| local | {local:.1f} |\n| Ray, 2 nodes x {args.node_cpus} CPU | "
          f"{on_ray:.1f} |")
    print(f"Ray / local: {on_ray / local:.2f}x; Ray / ideal ({ideal:.1f} s): {on_ray / ideal:.2f}x "
          f"(cluster start, not counted: {start:.1f} s); same shard bytes: {same}")
    print(f"units per node: {res.report['cluster']['units_per_node']}")
    print(f"machine: {report['machine']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
