"""Benchmark: pissa_rs on Llama-3-70B shapes against a plain copy of the same bytes.

    python benches/bench_70b.py [--workdir DIR] [--layers N] [--devices cuda:0,...] [--smoke] [--json OUT.json]
                                [--timeline OUT.jsonl] [--allow-tmpfs]

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

At a few layers the whole run's ratio answers the wrong question: ~10 GB copies in seconds, so
the start-up (the planning child's imports, the CUDA context, cuSOLVER's set-up, the rounding
probe) is a large share, and the embeddings and the head (copied through, not decomposed)
are 45% of the bytes at 3 layers against 3% at 80. So the run records its timeline
(PISSA_RS_PROFILE, engine/timeline.py) and the benchmark also reports the steady state: the
bytes of the decoder layers' target weights over the time from the first such weight's first
span (its read) to the last one's last (its write), against the copy's throughput, and the
seconds before the first weight and after the last. The working folder must be on a real
disk: tmpfs ignores the page-cache advice (fadvise DONTNEED) both runs start from, so a
tmpfs --workdir is refused (--allow-tmpfs runs anyway; --smoke only warns).

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
from collections import defaultdict
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


def fs_type(path: str | os.PathLike[str]) -> str:
    """The file system type ('ext4', 'xfs', 'tmpfs', ...) of the mount that holds `path`."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def steady_state(timeline: Path, names: list[str], nbytes: dict[str, int], t0: float, t1: float) -> dict:
    """From a run's timeline: each target weight's time is from its first span's start to its
    last span's end (read ... write); the steady state is the decoder layers' weights
    ("model.layers.N."): their bytes over the time from the first one's start to the last one's
    end, and the same from layer 1 on (after the first layer's warm-up: the CUDA context and
    cuSOLVER's set-up happen at the first weight). `t0`, `t1`: the run's start and end on the
    same clock (time.perf_counter, system-wide on Linux), for the seconds before and after."""
    spans = [json.loads(line) for line in Path(timeline).read_text().splitlines() if line.strip()]
    ends: dict[int, list[float]] = defaultdict(lambda: [float("inf"), float("-inf")])
    for span in spans:
        i = span["index"]
        if 0 <= i < len(names):  # -1: a device waiting for no weight in particular
            ends[i][0] = min(ends[i][0], span["start"])
            ends[i][1] = max(ends[i][1], span["end"])
    if not ends:
        return {"weights": 0}

    def window(indices: list[int]) -> dict:
        if not indices:
            return {"weights": 0, "bytes": 0, "seconds": 0.0, "gb_per_s": 0.0}
        start, end = min(ends[i][0] for i in indices), max(ends[i][1] for i in indices)
        total = sum(nbytes[names[i]] for i in indices)
        return {"weights": len(indices), "bytes": total, "seconds": end - start,
                "gb_per_s": total / (end - start) / 1e9 if end > start else 0.0}

    layer = {i: int(names[i].split(".")[2]) for i in ends if names[i].startswith("model.layers.")}
    first = min(layer.values(), default=0)
    return {
        "weights": len(ends),
        "decoder": window(sorted(layer)),
        "after_first_layer": window(sorted(i for i, n in layer.items() if n > first)),
        "before_first_weight_s": min(e[0] for e in ends.values()) - t0,
        "after_last_weight_s": t1 - max(e[1] for e in ends.values()),
    }


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
t1 = time.perf_counter()
wall = t1 - t0
status = open("/proc/self/status").read()
peak = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")) * 1024
gpu = {d: torch.cuda.max_memory_allocated(d) for d in devices if d.startswith("cuda")}
print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak, "peak_gpu_bytes": gpu,
                  "torch_s": sum(t["seconds"] for t in result.report["tensors"]),
                  "bytes_written": result.report["totals"]["bytes_written"],
                  "t0": t0, "t1": t1, "targets": [t["tensor"] for t in result.report["tensors"]]}))
"""


def run_pissa(src: Path, out: Path, r: int, niter: int, devices: list[str], timeline: Path) -> dict:
    """The decomposition in its own process, its timeline recorded (PISSA_RS_PROFILE) to `timeline`."""
    timeline.unlink(missing_ok=True)
    return run_script("pissa_rs", DECOMPOSE, [str(src), str(out), str(r), str(niter), ",".join(devices),
                                              json.dumps(PROJECTIONS)],
                      env={**os.environ, "PISSA_RS_PROFILE": str(timeline)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: a temporary directory)")
    ap.add_argument("--layers", type=int, help="default: as many as the disk holds twice")
    ap.add_argument("--devices", help="comma-separated (default: every CUDA device, else cpu)")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="every dimension / 64, on the CPU: checks the script")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--timeline", type=Path, help="keep the run's timeline here (default: in the working folder, "
                                                  "deleted with it)")
    ap.add_argument("--allow-tmpfs", action="store_true", help="run even when the working folder is on tmpfs "
                                                               "(its timings then mean little)")
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

    where = args.workdir or Path(tempfile.gettempdir())
    fs = fs_type(where)
    if fs in ("tmpfs", "ramfs"):
        why = (f"{where} is on {fs}: the page-cache advice both runs start from does nothing there, so the copy "
               "and pissa_rs would read from memory")
        if not (args.smoke or args.allow_tmpfs):
            raise SystemExit(f"bench_70b: {why}; pass --workdir on a real disk (or --allow-tmpfs)")
        print(f"warning: {why}", file=sys.stderr)

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
        timeline = args.timeline or tmp / "timeline.jsonl"
        ours = run_pissa(src, tmp / "out", rank, args.niter, devices, timeline)
        nbytes = {name: 2 * _numel(shape) for name, shape in shapes(**dims).items()}
        names = ours.pop("targets")
        steady = steady_state(timeline, names, nbytes, ours.pop("t0"), ours.pop("t1")) if timeline.is_file() \
            else {"weights": 0}
        from pissa_rs.engine.timeline import summary

        ours["timeline"] = summary(timeline) if timeline.is_file() else {}
        print(f"pissa_rs: {ours}", file=sys.stderr)

    decoder_bytes = sum(nbytes[name] for name in set(names))
    copy_gbps = total / copy_s / 1e9
    report = {
        "machine": machine(), "devices": devices,
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "workdir": str(where), "workdir_fs": fs,
        "dims": dims, "rank": rank, "niter": args.niter, "bytes": total, "copy_s": copy_s, "pissa_rs": ours,
        "ratio_to_copy": ours["wall_s"] / copy_s,
        # the decomposed weights' share of the bytes (the rest, embeddings and head, is copied through)
        "target_bytes": decoder_bytes, "target_share": decoder_bytes / total,
        "copy_gb_per_s": copy_gbps, "steady": steady,
        # the copy's throughput over the steady state's: what the whole run's ratio tends to at many layers
        "steady_ratio_to_copy": copy_gbps / steady["decoder"]["gb_per_s"]
        if steady.get("weights") and steady["decoder"]["gb_per_s"] else None,
    }
    gb = total / 1e9
    print("| | wall (s) | GB/s | peak host RSS (GiB) | peak GPU memory (GiB) |\n|---|---:|---:|---:|---:|")
    print(f"| copy of the same bytes | {copy_s:.1f} | {gb / copy_s:.2f} | | |")
    gpu_peak = max(ours["peak_gpu_bytes"].values(), default=0) / 2**30
    print(f"| pissa_rs ({','.join(devices)}) | {ours['wall_s']:.1f} | {gb / ours['wall_s']:.2f} | "
          f"{ours['peak_rss_bytes'] / 2**30:.2f} | {gpu_peak:.2f} |")
    print(f"pissa_rs / copy wall: {report['ratio_to_copy']:.2f}x (target <= 1.25x); torch work alone "
          f"{ours['torch_s']:.1f} s; {layers} layers, {gb:.1f} GB")
    if report["steady_ratio_to_copy"] is not None:
        d, a = steady["decoder"], steady["after_first_layer"]
        print(f"steady state: the decoder layers' {d['weights']} weights, {d['bytes'] / 1e9:.1f} GB "
              f"({100 * report['target_share']:.0f}% of the bytes), in {d['seconds']:.1f} s from the first one's read "
              f"to the last one's write: {d['gb_per_s']:.2f} GB/s against the copy's {copy_gbps:.2f} GB/s: "
              f"{report['steady_ratio_to_copy']:.2f}x (target <= 1.25x)"
              + (f"; from layer 1 on {a['gb_per_s']:.2f} GB/s ({copy_gbps / a['gb_per_s']:.2f}x)"
                 if a["weights"] and a["gb_per_s"] else ""))
        print(f"outside it: {steady['before_first_weight_s']:.1f} s before the first weight (imports done: planning, "
              f"CUDA context, rounding probe), {steady['after_last_weight_s']:.1f} s after the last (finalize, "
              f"report), of the whole run's {ours['wall_s']:.1f} s")
    print(f"machine: {report['machine']}; GPUs: {', '.join(report['gpu']) or 'none'}; working folder on {fs}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
