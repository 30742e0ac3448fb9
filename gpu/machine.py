"""The check's first step: the machine, the node's own libraries, and what the check can do on it.

    python gpu/machine.py OUT/machine.json

Prints and writes: nvidia-smi, the card (H100, H200, other) and its memory, the CPUs, memory
and free disk, Python and the versions of torch (its CUDA), transformers, PEFT, the float32
matmul settings a fresh process starts with (TF32), whether CUDA works, and the 70B benchmark's
size: a folder on a real disk (tmpfs ignores the page-cache advice the benchmark relies on)
and as many layers, up to BENCH_LAYERS (3), as its free disk holds. Needs nothing but the
standard library; what fails to import is written down, not raised.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))
from bench_70b import LLAMA3_70B, fs_type, layers_that_fit, tensor_bytes  # noqa: E402

GiB = 2**30


def card_kind(name: str) -> str:
    for kind in ("H200", "H100", "A100", "L40S", "L4"):
        if kind in name.upper():
            return kind
    return name or "none"


def versions() -> dict:
    """Installed versions, from the metadata (importing bitsandbytes or transformers here would
    cost seconds and print their warnings)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "peft", "numpy", "huggingface_hub", "safetensors", "bitsandbytes",
                    "pissa-rs"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


def torch_facts() -> dict:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return {"cuda": False, "error": f"{type(e).__name__}: {e}"}
    facts: dict = {"cuda_runtime": torch.version.cuda, "cuda": False, "gpus": []}
    # TF32 as a fresh process has it (the library pins IEEE float32 inside its runs)
    facts["tf32"] = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        facts["tf32"]["cuda.matmul.fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
    try:
        facts["cuda"] = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if facts["cuda"] else 0):
            free, total = torch.cuda.mem_get_info(i)
            p = torch.cuda.get_device_properties(i)
            facts["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "total_gib": total / GiB,
                                  "free_gib": free / GiB, "sms": p.multi_processor_count})
    except Exception as e:  # noqa: BLE001
        facts["cuda_error"] = f"{type(e).__name__}: {e}"
        facts["cuda"] = False
    return facts


def memory() -> dict:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        if key in ("MemTotal", "MemAvailable"):
            info[key] = int(value.split()[0]) * 1024 / GiB
    return info


def bench_plan(candidates: list[Path], want_layers: int, available_gib: float) -> dict:
    """The benchmark's folder (the first candidate on a real disk with room for one layer) and
    its layers (up to `want_layers`, as many as fit twice); none with under 8 GiB of memory
    available (the run's own target is 4 GiB of RSS, the checkpoint's writer holds a 2 GB
    tensor at a time)."""
    dims = dict(LLAMA3_70B)
    seen = []
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.glob("tmp*/llama3-70b-shapes"):  # a killed earlier run's checkpoint
                shutil.rmtree(stale.parent, ignore_errors=True)
            free = shutil.disk_usage(path).free
        except OSError:
            continue
        seen.append({"path": str(path), "fs": fs_type(path), "free_gib": free / GiB,
                     "layers_fit": layers_that_fit(dims, free) if free > 2.2 * tensor_bytes(dims, 1) else 0})
    if available_gib < 8:
        return {"workdir": None, "layers": 0, "candidates": seen,
                "why": f"{available_gib:.0f} GiB of memory available, under the 8 the benchmark needs"}
    disk = [s for s in seen if s["fs"] not in ("tmpfs", "ramfs") and s["layers_fit"] >= 1]
    if not disk:
        return {"workdir": None, "layers": 0, "candidates": seen,
                "why": "no folder on a real disk with room for one layer of 70B shapes (~2 x 6 GB)"}
    # (the card, H100 or H200, changes nothing here: a weight's work takes a few GiB of either)
    best = disk[0]
    layers = min(want_layers, best["layers_fit"])
    return {"workdir": best["path"], "layers": layers, "fs": best["fs"], "free_gib": best["free_gib"],
            "bytes": tensor_bytes(dict(dims), layers), "candidates": seen,
            "why": f"{layers} of the {want_layers} layers asked fit twice in {best['free_gib']:.0f} GiB free"}


def main(out: Path) -> None:
    facts: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "memory_gib": memory()}
    smi = shutil.which("nvidia-smi")
    if smi:
        proc = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        print(proc.stdout.rstrip() or proc.stderr.rstrip())
        q = subprocess.run([smi, "--query-gpu=name,memory.total,memory.free,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = q.stdout.strip().splitlines()
    else:
        print("nvidia-smi: not found")
        facts["nvidia_smi"] = []
    facts["versions"] = versions()
    facts.update(torch_facts())
    name = facts["gpus"][0]["name"] if facts.get("gpus") else ""
    facts["card"] = card_kind(name)
    work = os.environ.get("BENCH_WORKDIR")
    candidates = [Path(work)] if work else [ROOT / "target" / "gpu-bench", Path("/var/tmp/pissa-bench"),
                                            Path("/tmp/pissa-bench")]
    facts["bench"] = bench_plan(candidates, int(os.environ.get("BENCH_LAYERS", "3")),
                                facts["memory_gib"].get("MemAvailable", 0))
    out.write_text(json.dumps(facts, indent=1, default=str) + "\n")
    v = facts["versions"]
    print(f"python {v['python']} torch {v['torch']} (CUDA {facts.get('cuda_runtime')}) transformers "
          f"{v['transformers']} peft {v['peft']} bitsandbytes {v['bitsandbytes']}")
    gpus = "; ".join(f"{g['name']} {g['total_gib']:.0f} GiB ({g['free_gib']:.0f} free), sm {g['capability']}"
                     for g in facts.get("gpus", []))
    print(f"card: {facts['card']}: {gpus or 'no CUDA device'}{' ' + facts['cuda_error'] if 'cuda_error' in facts else ''}")
    print(f"TF32 at start: {facts.get('tf32')}")
    m = facts["memory_gib"]
    print(f"{facts['cpus']} CPUs, {m.get('MemTotal', 0):.0f} GiB memory ({m.get('MemAvailable', 0):.0f} available)")
    for c in facts["bench"]["candidates"]:
        print(f"disk: {c['path']}: {c['fs']}, {c['free_gib']:.0f} GiB free")
    b = facts["bench"]
    print(f"bench_70b: {b['layers']} layers in {b['workdir']}: {b['why']}")
    print(f"cuda: {1 if facts['cuda'] else 0}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "machine.json"))
