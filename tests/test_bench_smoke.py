"""The benchmark script still runs end to end (tiny shapes; its timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benches" / "bench_decompose.py"


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--workdir", str(tmp_path), "--json", str(out),
                           "--methods", "pissa_rs,peft,floor,nf4,nf4_saved,milora,mica,peft_mica,olora,peft_olora",
                           "--profile"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"pissa_rs", "peft", "floor", "nf4", "nf4_saved", "milora", "mica", "peft_mica",
                                      "olora", "peft_olora"}
    assert "mica / peft_mica: wall" in proc.stdout and "olora / peft_olora: wall" in proc.stdout
    assert report["results"]["nf4_saved"]["bytes_written"] < 0.6 * report["results"]["nf4"]["bytes_written"]
    assert "save_quantized:" in proc.stdout
    for result in report["results"].values():
        assert result["wall_s"] > 0 and result["peak_rss_bytes"] > 0
    assert "| pissa_rs |" in proc.stdout
    timeline = report["results"]["pissa_rs"]["timeline"]  # --profile: the run's own timeline, summarized
    assert timeline["weights"] == 14 and timeline["seconds"]["compute"] > 0 and timeline["seconds"]["read"] > 0
    assert "pissa_rs timeline: 14 weights" in proc.stdout


def test_int4_sources_benchmark_smoke(tmp_path):
    """--sources: the same run on the checkpoint re-stored as each INT4 format."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--workdir", str(tmp_path), "--json", str(out),
                           "--methods", "pissa_rs", "--sources", "bf16,ct-int4,gptq,awq"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"pissa_rs", "pissa_rs@ct-int4", "pissa_rs@gptq", "pissa_rs@awq"}
    for key in ("pissa_rs@ct-int4", "pissa_rs@gptq", "pissa_rs@awq"):  # 4-bit: about a quarter of bf16's bytes read
        assert results[key]["bytes_read"] < 0.6 * results["pissa_rs"]["bytes_read"]
        assert results[key]["bytes_written"] > 0.9 * results["pissa_rs"]["bytes_written"]  # the residual is full width
    assert "| pissa_rs@gptq |" in proc.stdout


def test_serving_benchmark_smoke(tmp_path):
    """benches/bench_serving.py: to-lora against PEFT's save_as_lora, extract-lora against mergekit's."""
    out = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "bench_serving.py"), "--smoke", "--workdir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"to_lora", "peft_to_lora", "extract", "extract_exact", "mergekit"}
    for result in results.values():
        assert result["wall_s"] > 0 and result["peak_rss_bytes"] > 0 and 0 < result["error"] < 1
    # the same best rank-r approximations: PEFT's and ours of one update, ours exact and mergekit's of one change
    assert abs(results["to_lora"]["error"] - results["peft_to_lora"]["error"]) < 1e-4
    assert abs(results["extract_exact"]["error"] - results["mergekit"]["error"]) < 1e-4
    assert "to_lora / peft_to_lora: wall" in proc.stdout and "extract / mergekit: wall" in proc.stdout


def test_70b_benchmark_smoke(tmp_path):
    """benches/bench_70b.py at 1/64 of Llama-3-70B's sizes on the CPU: copy baseline, run, report."""
    out = tmp_path / "bench70.json"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "bench_70b.py"), "--smoke", "--workdir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dims"]["layers"] == 2 and report["devices"] == ["cpu"]
    ours = report["pissa_rs"]
    assert report["copy_s"] > 0 and ours["wall_s"] > 0 and ours["peak_rss_bytes"] > 0 and ours["torch_s"] > 0
    assert ours["bytes_written"] > report["bytes"]  # the residual model and the adapter
    assert report["ratio_to_copy"] == ours["wall_s"] / report["copy_s"]
    assert "| pissa_rs (cpu) |" in proc.stdout
    assert not list(tmp_path.glob("tmp*"))  # its checkpoint, copy and output are gone
    # the steady state from the run's timeline: the decoder layers' 14 weights, the embeddings and head apart
    assert report["workdir_fs"] not in ("tmpfs", "unknown")
    steady = report["steady"]
    assert steady["weights"] == 14 and steady["decoder"]["weights"] == 14 and steady["after_first_layer"]["weights"] == 7
    assert steady["decoder"]["bytes"] == report["target_bytes"] < report["bytes"]
    assert 0 < steady["decoder"]["seconds"] < ours["wall_s"] and steady["before_first_weight_s"] > 0
    assert report["steady_ratio_to_copy"] == report["copy_gb_per_s"] / steady["decoder"]["gb_per_s"]
    assert ours["timeline"]["weights"] == 14
    assert "steady state: the decoder layers' 14 weights" in proc.stdout


def test_moe_benchmark_smoke(tmp_path):
    """benches/bench_moe.py with tiny shapes: both checkpoints built, decomposed, reported."""
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "bench_moe.py"), "--smoke", "--workdir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["moe"]["matrices"] == 4 + 1 + 4 * 2  # attention, router, each expert's gate_up and down
    assert report["dense"]["matrices"] == 7
    assert all(report[k]["wall_s"] > 0 and report[k]["peak_rss_bytes"] > 0 for k in ("moe", "dense"))


def test_calibrated_benchmark_smoke(tmp_path):
    """benches/bench_calibrated.py: CorDA, EVA and LoRA-GA through pissa_rs and through PEFT, tiny shapes."""
    out = tmp_path / "calibrated.json"
    methods = "pissa_rs,peft,pissa_rs_eva,peft_eva,pissa_rs_lora_ga,peft_lora_ga"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "bench_calibrated.py"), "--smoke", "--workdir",
                           str(tmp_path), "--json", str(out), "--methods", methods],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(methods.split(","))
    assert "pissa_rs / peft: wall" in proc.stdout and "pissa_rs_eva / peft_eva: wall" in proc.stdout
    assert "pissa_rs_lora_ga / peft_lora_ga: wall" in proc.stdout
    assert set(report["results"]["pissa_rs"]["split_s"]) == {"forward", "statistics", "units", "saved"}
    assert set(report["results"]["pissa_rs_eva"]["split_s"]) == {"forward"}
    for result in report["results"].values():
        assert result["wall_s"] > 0 and result["peak_rss_bytes"] > 0


def test_calibrated_benchmark_ends_both_eva_loops_after_the_same_steps(tmp_path):
    """--steps N: the deep-model comparison times EVA's first N steps on both sides (one here:
    the tiny model's single batch converges at its second step)."""
    out = tmp_path / "calibrated.json"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "bench_calibrated.py"), "--smoke", "--workdir",
                           str(tmp_path), "--json", str(out), "--methods", "pissa_rs_eva,peft_eva", "--steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 1 and "EVA's loops ended after step 1" in proc.stdout
    assert {m: r.get("split_s") for m, r in report["results"].items()} == {"pissa_rs_eva": {"steps": 1},
                                                                             "peft_eva": {"steps": 1}}


def test_convergence_benchmark_smoke(tmp_path):
    """benches/bench_convergence.py: LoRA, PiSSA and LoRA-GA starts fine-tuned on one task."""
    out = tmp_path / "convergence.json"
    proc = subprocess.run([sys.executable, str(BENCH.parent / "bench_convergence.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(out.read_text())["table"]
    assert set(table) == {"lora", "pissa", "lora-ga"}
    for row in table.values():
        assert 0 < row["held_out"] < 20 and set(row["held_out_curve"]) == {"0", "1", "4"}
    assert "| lora-ga |" in proc.stdout
