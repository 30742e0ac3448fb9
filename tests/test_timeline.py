"""PISSA_RS_PROFILE: a run's timeline, per weight and thread, without changing a byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import digest
from make_tiny_model import save_tiny_model

from pissa_rs.engine.timeline import KINDS, summary


def test_the_timeline_records_every_weight_and_changes_no_byte(tmp_path):
    src = save_tiny_model(tmp_path / "m", "llama", layers=2)
    code = "import sys, pissa_rs; pissa_rs.decompose_checkpoint(sys.argv[1], r=4, out=sys.argv[2], progress=False)"
    timeline = tmp_path / "timeline.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PISSA_RS_PROFILE"}
    for out, extra in ((tmp_path / "plain", {}), (tmp_path / "profiled", {"PISSA_RS_PROFILE": str(timeline)})):
        done = subprocess.run([sys.executable, "-c", code, str(src), str(out)], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    plain, profiled = digest(tmp_path / "plain"), digest(tmp_path / "profiled")
    config = "pissa_init/adapter_config.json"  # names its own folder as the base: compared without it
    assert {k: v for k, v in plain.items() if k not in ("pissa_report.json", config)} == \
        {k: v for k, v in profiled.items() if k not in ("pissa_report.json", config)}
    strip = lambda out: {k: v for k, v in json.loads((out / config).read_text()).items()  # noqa: E731
                         if k != "base_model_name_or_path"}
    assert strip(tmp_path / "plain") == strip(tmp_path / "profiled")
    spans = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert {s["kind"] for s in spans} <= set(KINDS) and all(s["end"] >= s["start"] for s in spans)
    targets = len(json.loads((tmp_path / "profiled" / "pissa_report.json").read_text())["tensors"])
    for kind in ("read", "compute", "write"):  # every weight read, computed and written once
        assert sorted(s["index"] for s in spans if s["kind"] == kind) == list(range(targets)), kind
    assert {s["thread"] for s in spans if s["kind"] == "read"} == {"pissa-reader"}
    assert all(s["thread"].startswith("pissa-cpu") for s in spans if s["kind"] == "compute")
    found = summary(timeline)
    assert found["weights"] == targets and 0 < found["device_compute_share"] <= 1
    assert found["seconds"]["compute"] <= found["wall_s"] * len({s["thread"] for s in spans})
    assert not (tmp_path / "plain" / "timeline.jsonl").exists()
