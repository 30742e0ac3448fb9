"""The pissa-rs command: the API's options, one-line errors, non-zero exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    """The real command in a subprocess: exit code and stderr as a shell sees them."""
    return subprocess.run([sys.executable, "-m", "pissa_rs.cli", *args], capture_output=True, text=True, timeout=300)


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same entry point in this process (no 7 s torch import per call)."""
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's --help and usage errors
        code = exit.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "m", "llama", layers=1)


def test_help_documents_every_option(capsys):
    out = run_in_process(capsys, "decompose", "--help").stdout
    for flag in ["--rank", "--out", "--lora-alpha", "--niter", "--target-modules", "--exclude-modules",
                 "--rank-pattern", "--alpha-pattern", "--use-rslora", "--device", "--seed", "--adapter-dtype",
                 "--overwrite", "--no-progress", "--quantize", "--save-quantized"]:
        assert flag in out, flag
    assert "decompose" in run_in_process(capsys, "--help").stdout


def test_decompose_from_the_shell(llama, tmp_path):
    out = tmp_path / "o"
    proc = run("decompose", str(llama), "--rank", "4", "--out", str(out), "--target-modules", "q_proj,v_proj",
               "--rank-pattern", "v_proj=2", "--niter", "0", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "residual model:" in proc.stdout
    assert "targets" in proc.stderr  # the progress bar
    assert "Failed to load" not in proc.stderr  # bitsandbytes' import-time noise (CPUs with AVX-512 BF16) is not shown
    report = pissa_rs.Checkpoint(out)  # a complete checkpoint
    assert "model.layers.0.self_attn.q_proj.weight" in report
    import json

    rep = json.loads((out / "pissa_report.json").read_text())
    assert {t["module"].rsplit(".", 1)[-1]: t["r"] for t in rep["tensors"]} == {"q_proj": 4, "v_proj": 2}
    assert rep["options"]["seed"] == 3 and rep["init_lora_weights"] == "pissa"


def test_default_out_is_a_sibling(llama, capsys):
    proc = run_in_process(capsys, "decompose", str(llama), "-r", "2", "--no-progress", "--target-modules", "o_proj")
    assert proc.returncode == 0, proc.stderr
    assert (llama.parent / "m-pissa-r2" / "pissa_report.json").exists()
    assert proc.stderr == ""  # --no-progress


@pytest.mark.parametrize("args, message", [
    (["--target-modules", "nope"], "matched no module"),
    (["--rank", "1000"], "cannot take rank 1000"),
    (["--rank", "0"], "r must be a positive integer"),
])
def test_errors_are_one_line_and_exit_non_zero(llama, tmp_path, capsys, args, message):
    proc = run_in_process(capsys, "decompose", str(llama), "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pissa-rs: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_checkpoint_is_one_line(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    proc = run("decompose", str(tmp_path))
    assert proc.returncode == 1 and "pytorch_model.bin" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_lists_tensors(llama, capsys):
    proc = run_in_process(capsys, "inspect", str(llama))
    assert proc.returncode == 0
    assert "model.layers.0.self_attn.q_proj.weight" in proc.stdout and "F32" in proc.stdout
    import re

    assert re.search(r"^\d+ tensors, [\d.]+ KiB in \d+ file\(s\)$", proc.stdout, re.M)
    assert "architecture: LlamaForCausalLM" in proc.stdout
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    # One layer: 7 projections; all-linear leaves the output head out.
    assert "   7 modules" in lines["all-linear"] and "lm_head" in lines["all-linear"]
    assert "1 module" in lines["q_proj"] and "model.layers.0.self_attn.q_proj" in lines["q_proj"]
    assert "lm_head" in lines


def test_inspect_a_bare_file_says_targets_must_be_explicit(tmp_path, capsys):
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"w": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    proc = run_in_process(capsys, "inspect", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 0 and "explicit --target-modules" in proc.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(llama, tmp_path, capsys):
    proc = run_in_process(capsys, "decompose", str(llama), "--rank", "4", "--out", str(tmp_path / "o"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "targets:" in proc.stdout and "pass-through tensors" in proc.stdout and "free" in proc.stdout
    assert not (tmp_path / "o").exists()


def test_plot_writes_valid_pngs(llama, tmp_path, capsys):
    import matplotlib.image

    res = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False)
    proc = run_in_process(capsys, "plot", str(res.out), "--to", str(tmp_path / "png"))
    assert proc.returncode == 0, proc.stderr
    files = [Path(line) for line in proc.stdout.split()]
    assert [f.name for f in files] == ["energy_kept.png"]  # no quantization in this report
    data = files[0].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = matplotlib.image.imread(files[0])
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_plot_of_a_missing_report_is_one_line(tmp_path, capsys):
    proc = run_in_process(capsys, "plot", str(tmp_path))
    assert proc.returncode == 1 and "pissa_report.json" in proc.stderr


def test_several_ranks_from_the_shell(llama, tmp_path, capsys):
    proc = run_in_process(capsys, "decompose", str(llama), "--rank", "2,4", "--out", str(tmp_path / "m-r{r}"),
                          "--no-progress", "--target-modules", "q_proj")
    assert proc.returncode == 0, proc.stderr
    assert "r=2:" in proc.stdout and "r=4:" in proc.stdout
    for r in (2, 4):
        assert (tmp_path / f"m-r{r}" / "pissa_report.json").exists()
    proc = run_in_process(capsys, "decompose", str(llama), "--rank", "2,4", "--out", str(tmp_path / "x{r}"),
                          "--dry-run")
    assert proc.returncode == 0 and "x2" in proc.stdout and "x4" in proc.stdout
    assert not (tmp_path / "x2").exists()


def test_plot_draws_error_reduction_when_the_report_has_it(tmp_path, capsys):
    import json

    records = [{"module": f"model.layers.{i}.mlp.{kind}", "r": 8, "energy_kept": 0.1 * i,
                "error_reduction": 0.05 * i} for i in range(3) for kind in ("up_proj", "down_proj")]
    records.append({"module": "lm_head", "r": 8, "energy_kept": 0.5, "error_reduction": None})
    report = {"input": "/x/model", "init_lora_weights": "pissa", "tensors": records}
    (tmp_path / "pissa_report.json").write_text(json.dumps(report))
    proc = run_in_process(capsys, "plot", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    names = sorted(Path(line).name for line in proc.stdout.split())
    assert names == ["energy_kept.png", "error_reduction.png"]
    for name in names:  # by default in OUT/pissa_plots, which merge leaves out
        assert (tmp_path / "pissa_plots" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_lines_are_layer_roles_not_last_names():
    """BERT's three `dense` modules are three lines; an MoE layer's experts, one point per layer."""
    from pissa_rs.plots import _by_layer_role

    records = [{"module": f"encoder.layer.{i}.{role}", "energy_kept": 0.1 * i}
               for i in range(2) for role in ("attention.output.dense", "intermediate.dense", "output.dense")]
    records += [{"module": "pooler.dense", "energy_kept": 0.9}]
    records += [{"module": "model.layers.0.mlp.experts", "energy_kept": e} for e in (0.2, 0.4)]
    series = _by_layer_role(records, "energy_kept")
    assert sorted(series) == ["attention.output.dense", "intermediate.dense", "mlp.experts", "output.dense"]
    assert series["output.dense"] == [(0, 0.0), (1, 0.1)]
    assert series["mlp.experts"] == [(0, pytest.approx(0.3))]


def test_to_lora_and_merge_from_the_shell(llama, tmp_path, capsys):
    res = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False)
    proc = run_in_process(capsys, "to-lora", str(res.adapter), str(res.adapter), str(tmp_path / "lora"), "--compact")
    # Converting the initial adapter against itself: a zero update, compacted to rank 1 per module.
    assert proc.returncode == 0, proc.stderr
    assert "rank 1" in proc.stdout and "model.layers.0.self_attn.q_proj: 1 (0% of its update's energy" in proc.stdout
    proc = run_in_process(capsys, "merge", str(res.out), str(res.adapter), str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "merged" / "config.json").exists()
    proc = run_in_process(capsys, "to-lora", str(tmp_path / "nope"), str(res.adapter), str(tmp_path / "x"))
    assert proc.returncode == 1 and "nope/adapter_model.safetensors: missing" in proc.stderr


def test_every_option_is_a_flag_generated_from_its_field():
    """DecomposeOptions is the one source: each field is a flag with its help text, and the
    flags parse into the same options the API builds from keywords."""
    from dataclasses import fields

    from pissa_rs.cli import build_parser
    from pissa_rs.options import DecomposeOptions

    parser = build_parser()
    decompose = parser._subparsers._group_actions[0].choices["decompose"]
    flags = {a.dest: a for a in decompose._actions}
    for f in fields(DecomposeOptions):
        if f.metadata.get("cli", True):
            assert f.name in flags, f"no flag for option {f.name}"
            assert flags[f.name].help and len(flags[f.name].help) > 20, f.name
    args = parser.parse_args(["decompose", "m", "-r", "8", "--lora-alpha", "32", "--niter", "2",
                              "--target-modules", "q_proj,v_proj", "--rank-pattern", "q_proj=4",
                              "--target-parameters", "mlp.experts.down_proj", "--quantize", "nf4",
                              "--quant-iters", "2", "--no-measure-error", "--adapter-dtype", "bfloat16",
                              "--devices", "cpu,cpu", "--seed", "3", "--use-rslora"])
    from pissa_rs.options import options_from_args

    assert options_from_args(args) == DecomposeOptions.from_fields(dict(
        r=8, lora_alpha=32.0, niter=2, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4},
        target_parameters=["mlp.experts.down_proj"], quantize="nf4", quant_iters=2, measure_error=False,
        adapter_dtype="bfloat16", devices=["cpu", "cpu"], seed=3, use_rslora=True))
    with pytest.raises(TypeError, match="unknown option 'nitre'; did you mean 'niter'"):
        pissa_rs.decompose_checkpoint("m", r=4, nitre=2)


def test_the_report_totals_and_the_printed_line_follow_from_the_records(tmp_path, capsys):
    """The report's totals are what its per-tensor records add up to (mean energy kept, the
    largest cast error, mean error reduction, counts), and the CLI prints the report's
    numbers: a total computed another way (the largest instead of the mean) fails here."""
    import json

    model = save_tiny_model(tmp_path / "m", "llama", layers=2, dtype="bfloat16", decay=0.7)
    proc = run_in_process(capsys, "decompose", str(model), "-r", "4", "-o", str(tmp_path / "o"), "--no-progress",
                          "--quantize", "nf4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "o" / "pissa_report.json").read_text())
    records, totals = report["tensors"], report["totals"]
    energies = [r["energy_kept"] for r in records]
    assert len(set(energies)) > 1 and max(r["max_abs_error"] for r in records) > 0  # the totals can tell
    assert totals["targets"] == len(records) == 14
    assert totals["energy_kept_mean"] == pytest.approx(sum(energies) / len(energies), rel=1e-12)
    assert totals["max_abs_error"] == max(r["max_abs_error"] for r in records)
    reductions = [r["error_reduction"] for r in records if "error_reduction" in r]
    assert reductions and totals["error_reduction_mean"] == pytest.approx(sum(reductions) / len(reductions), rel=1e-12)
    assert (f"decomposed {len(records)} weights" in proc.stdout
            and f"(mean energy kept {sum(energies) / len(energies):.3f})" in proc.stdout), proc.stdout
    assert f"error vs QLoRA: {sum(reductions) / len(reductions):.1%} less" in proc.stdout, proc.stdout


def test_the_console_scripts_quick_exit_still_does_what_an_exit_must(tmp_path):
    """exit_now skips the interpreter's teardown (~0.5 s with torch imported), not the exit's
    duties: a non-daemon thread finishes, exit handlers and finalizers run, buffered output
    reaches a pipe, the code is the command's."""
    code = f"""
import atexit, sys, tempfile, threading, time, weakref
from pathlib import Path
from pissa_rs.cli import exit_now
out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
holder = type("Holder", (), {{}})()
weakref.finalize(holder, lambda: (out / "finalizer").write_text("ran"))
folder = tempfile.TemporaryDirectory(dir=out)  # never cleaned up by hand: its finalizer removes it
threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
sys.stdout.write("x" * 200000 + "end")
exit_now(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.endswith("x" * 1000 + "end") and len(proc.stdout) == 200003
    assert {p.name for p in tmp_path.iterdir()} == {"atexit", "finalizer", "thread"}


@pytest.mark.parametrize("collecting", [True, False])
def test_importing_the_package_leaves_the_callers_garbage_collector_as_it_was(collecting):
    code = f"import gc; {'gc.enable()' if collecting else 'gc.disable()'}; import pissa_rs; print(gc.isenabled())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == str(collecting), proc.stderr
