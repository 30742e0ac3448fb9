"""Benchmark: pissa_rs on Llama-3-70B shapes against a plain copy of the same bytes.

    python benches/bench_70b.py [--workdir DIR] [--layers N] [--devices cuda:0,...] [--smoke] [--json OUT.json]

Builds a random bf16 checkpoint with Llama-3-70B shapes (hidden 8192, intermediate
28672, 64 heads, 8 kv heads, vocab 128256, 5 GB shards) with as many layers as the
disk holds twice (input + output; default), then, with the input's pages dropped
from the page cache before each:

- copy:      the disk's own speed: every input file copied (copy_file_range, as
             shutil does) and fsynced, as our output is; then deleted
- pissa_rs:  decompose_checkpoint(r=128, niter=4, all 7 projections) on --devices,
             in its own process: wall time, peak host RSS (VmHWM), peak GPU memory
             per device, the torch work alone (sum of the report's per-target times)

Target (DESIGN.md): pissa_rs wall <= 1.25x the copy, host RSS <= 4 GiB.
--smoke runs the same with every dimension / 64 on the CPU (CI keeps the script
working with it; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decompose import PROJECTIONS, machine, make_checkpoint, run_script, shapes  # noqa: E402

LLAMA3_70B = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256)
SHARD_BYTES = 5 * 10**9


def tensor_bytes(dims: dict, layers: int) -> int:
    return sum(2 * _numel(s) for s in shapes(**dims, layers=layers).values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layers_that_fit(dims: dict, free: int) -> int:
    """As many layers as leave room for the input twice (input + output), with 5% to spare."""
    base, per_layer = tensor_bytes(dims, 0), tensor_bytes(dims, 1) - tensor_bytes(dims, 0)
    return max(1, int((0.95 * free / 2 - base) // per_layer))


def drop_page_cache(files) -> None:
    """Make the next read come from the disk: sync, then drop each file's clean pages."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_copy(src: Path, dst: Path) -> float:
    """Copy every file of src (the same bytes pissa_rs reads and writes) and fsync them."""
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


DECOMPOSE = """
import json, sys, time, torch, pissa_rs
src, out, r, niter, devices, targets = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \\
    sys.argv[5].split(","), json.loads(sys.argv[6])
t0 = time.perf_counter()
result = pissa_rs.decompose_checkpoint(src, r=r, niter=niter, devices=devices, target_modules=targets, out=out,
                                       progress=False)
wall = time.perf_counter() - t0
status = open("/proc/self/status").read()
peak = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")) * 1024
gpu = {d: torch.cuda.max_memory_allocated(d) for d in devices if d.startswith("cuda")}
print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak, "peak_gpu_bytes": gpu,
                  "torch_s": sum(t["seconds"] for t in result.report["tensors"]),
                  "bytes_written": result.report["totals"]["bytes_written"]}))
"""


def run_pissa(src: Path, out: Path, r: int, niter: int, devices: list[str]) -> dict:
    return run_script("pissa_rs", DECOMPOSE, [str(src), str(out), str(r), str(niter), ",".join(devices),
                                              json.dumps(PROJECTIONS)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: a temporary directory)")
    ap.add_argument("--layers", type=int, help="default: as many as the disk holds twice")
    ap.add_argument("--devices", help="comma-separated (default: every CUDA device, else cpu)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="every dimension / 64, on the CPU: checks the script")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import torch

    if args.devices:
        devices = args.devices.split(",")
    elif torch.cuda.is_available() and not args.smoke:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        devices = ["cpu"]
    # Smoke: every size / 64, heads 8:1 kept.
    dims = dict(hidden=128, intermediate=448, heads=8, kv_heads=1, vocab=2004) if args.smoke else dict(LLAMA3_70B)
    rank, shard_bytes = (8, 2_000_000) if args.smoke else (args.rank, SHARD_BYTES)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        layers = args.layers or (2 if args.smoke else layers_that_fit(dims, shutil.disk_usage(tmp).free))
        dims["layers"] = layers
        src = tmp / "llama3-70b-shapes"
        t0 = time.perf_counter()
        total = make_checkpoint(src, dims, shard_bytes)
        print(f"checkpoint: {layers} layers, {total / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        files = sorted(src.iterdir())

        drop_page_cache(files)
        copy_s = timed_copy(src, tmp / "copy")
        shutil.rmtree(tmp / "copy")
        print(f"copy: {copy_s:.1f} s", file=sys.stderr)

        drop_page_cache(files)
        ours = run_pissa(src, tmp / "out", rank, args.niter, devices)
        print(f"pissa_rs: {ours}", file=sys.stderr)

    report = {
        "machine": machine(), "devices": devices,
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "dims": dims, "rank": rank, "niter": args.niter, "bytes": total, "copy_s": copy_s, "pissa_rs": ours,
        "ratio_to_copy": ours["wall_s"] / copy_s,
    }
    gb = total / 1e9
    print("| | wall (s) | GB/s | peak host RSS (GiB) | peak GPU memory (GiB) |\n|---|---:|---:|---:|---:|")
    print(f"| copy of the same bytes | {copy_s:.1f} | {gb / copy_s:.2f} | | |")
    gpu_peak = max(ours["peak_gpu_bytes"].values(), default=0) / 2**30
    print(f"| pissa_rs ({','.join(devices)}) | {ours['wall_s']:.1f} | {gb / ours['wall_s']:.2f} | "
          f"{ours['peak_rss_bytes'] / 2**30:.2f} | {gpu_peak:.2f} |")
    print(f"pissa_rs / copy wall: {report['ratio_to_copy']:.2f}x (target <= 1.25x); torch work alone "
          f"{ours['torch_s']:.1f} s; {layers} layers, {gb:.1f} GB")
    print(f"machine: {report['machine']}; GPUs: {', '.join(report['gpu']) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
