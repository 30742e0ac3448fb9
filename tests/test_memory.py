"""Peak RSS, file-backed pages included (VmHWM), does not grow with the number of layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from make_tiny_model import save_tiny_model

# Same shapes, 2 vs 12 layers: ~45 MB of float32 weights per layer, so a
# decomposition that kept each layer's pages (or results) resident would peak
# ~450 MB higher on the deep model, far past the tolerance.
SHAPES = {"arch": "llama", "hidden": 1024, "intermediate": 2816, "shard_size": "200MB"}

MEASURE = """
import sys, pissa_rs
pissa_rs.decompose_checkpoint(sys.argv[1], r=16, niter=1, out=sys.argv[2], progress=False)
status = open("/proc/self/status").read()
print(next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:")))
"""


def peak_rss_kib(src: Path, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out)], capture_output=True, text=True,
                          timeout=600, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_layers(tmp_path):
    shallow = save_tiny_model(tmp_path / "l2", layers=2, **SHAPES)
    deep = save_tiny_model(tmp_path / "l12", layers=12, **SHAPES)
    deep_bytes = sum(p.stat().st_size for p in deep.glob("*.safetensors"))
    assert deep_bytes > 500e6
    peak_shallow = peak_rss_kib(shallow, tmp_path / "o2")
    peak_deep = peak_rss_kib(deep, tmp_path / "o12")
    print(f"VmHWM 2 layers: {peak_shallow / 1024:.0f} MiB, 12 layers: {peak_deep / 1024:.0f} MiB, "
          f"12-layer model: {deep_bytes / 2**20:.0f} MiB")
    assert peak_deep <= 1.15 * peak_shallow, (peak_shallow, peak_deep)
