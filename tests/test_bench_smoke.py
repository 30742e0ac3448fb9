"""The benchmark script still runs end to end (tiny shapes; its timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benches" / "bench_decompose.py"


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--workdir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"pissa_rs", "peft", "floor"}
    for result in report["results"].values():
        assert result["wall_s"] > 0 and result["peak_rss_bytes"] > 0
    assert "| pissa_rs |" in proc.stdout
