"""What a new user trips over on the first day: typos in target lists, outputs in the
wrong place, messages and exit codes, library noise, sentence-transformers subfolders,
configs that ask for custom code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from make_tiny_model import save_tiny_model

import pissa_rs
from helpers import digest, save_spread, text
from pissa_rs.cli import main

CLI = [sys.executable, "-m", "pissa_rs.cli"]


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("first") / "m", "llama", layers=1)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """A sentence-transformers layout as all-MiniLM-L6-v2 ships it: a BERT saved by
    transformers, and the files sentence-transformers reads, 1_Pooling/ among them."""
    root = tmp_path_factory.mktemp("st") / "minilm"
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    save_spread(transformers.BertModel(config), root)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                "pooling_mode_mean_tokens": True}))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(b"not copied: another weight format")
    (root / ".cache").mkdir()
    (root / ".cache" / "download.lock").write_text("a download tool's, not the model's")
    return root


# --- target lists ---------------------------------------------------------------------------

def test_a_typo_in_one_of_several_target_modules_is_named_with_the_closest_names(minilm, tmp_path):
    with pytest.raises(pissa_rs.TargetError, match=r"target_modules entry 'querry' matched no module.*did you mean "
                                                   r"'query'"):
        pissa_rs.decompose_checkpoint(minilm, r=2, target_modules=["querry", "value"], out=tmp_path / "o",
                                      progress=False)
    with pytest.raises(pissa_rs.TargetError, match="querry"):  # the dry run says so too
        pissa_rs.plan(minilm, r=2, target_modules=["querry", "value"], out=tmp_path / "o")
    with pytest.raises(pissa_rs.TargetError, match="exclude_modules entry 'valeu'.*'value'"):
        pissa_rs.plan(minilm, r=2, target_modules=["query", "value"], exclude_modules=["valeu"], out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # From the shell: one line, exit 1.
    proc = run_in_process("decompose", minilm, "--target-modules", "querry,value", "--out", tmp_path / "o",
                          "--dry-run")
    assert proc[0] == 1 and "did you mean 'query'" in proc[2]


def test_regexes_and_all_linear_keep_peft_meaning(minilm, tmp_path):
    plan = pissa_rs.plan(minilm, r=2, target_modules=r".*\.attention\.self\.(query|value)", out=tmp_path / "o")
    assert len(plan.targets) == 4
    assert len(pissa_rs.plan(minilm, r=2, out=tmp_path / "o").targets) == 2 * 6 + 1  # and the pooler


def test_a_typo_in_explicit_targets_of_a_bare_file_is_named(llama, tmp_path):
    shard = next(llama.glob("*.safetensors"))
    with pytest.raises(pissa_rs.TargetError, match="'v_prj'.*did you mean 'v_proj'"):
        pissa_rs.plan(shard, r=2, target_modules=["q_proj", "v_prj"], out=tmp_path / "o")


# --- where the output goes ------------------------------------------------------------------

def test_an_output_inside_the_input_folder_is_refused(llama, tmp_path):
    before = digest(llama)
    for out in (llama / "sub", llama / "a" / "b"):
        with pytest.raises(pissa_rs.OutputDirError, match="inside the input model's folder"):
            pissa_rs.decompose_checkpoint(llama, r=2, out=out, progress=False)
        with pytest.raises(pissa_rs.OutputDirError, match="inside the input model's folder"):
            pissa_rs.plan(llama, r=2, out=out)
    assert digest(llama) == before


def test_an_output_that_cannot_be_created_is_named_with_what_was_done(llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(pissa_rs.OutputDirError, match=r"file/o: cannot create the output directory"):
        pissa_rs.decompose_checkpoint(llama, r=2, out=blocker / "o", progress=False)
    code, out, err = run_in_process("decompose", llama, "-r", "2", "--out", blocker / "o", "--dry-run")
    assert code == 1 and "CANNOT BE CREATED" in out and "DOES NOT FIT" not in out
    assert blocker.read_text() == "a file, not a folder"


# --- messages, exit codes, noise ------------------------------------------------------------

def run_in_process(*args):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_ctrl_c_after_the_output_is_complete_exits_0_and_says_so(llama, tmp_path):
    proc = run_cli("decompose", llama, "-r", "2", "--out", tmp_path / "o", "--no-progress",
                   env={"PISSA_RS_SIGNAL_AT": "completed:1:INT"})
    assert proc.returncode == 0, proc.stderr
    assert "after the work finished: the output is complete, nothing was lost" in proc.stderr
    assert (tmp_path / "o" / "pissa_report.json").is_file() and "r=2: decomposed" in proc.stdout


def test_debug_shows_the_traceback_of_an_error(llama, tmp_path):
    code, _, err = run_in_process("--debug", "decompose", llama, "-r", "0", "--out", tmp_path / "o")
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("got 0")
    code, _, err = run_in_process("decompose", llama, "-r", "0", "--out", tmp_path / "o")
    assert code == 1 and "Traceback" not in err


def test_a_run_prints_only_what_concerns_it(llama, tmp_path):
    proc = run_cli("decompose", llama, "-r", "2", "--out", tmp_path / "o", "--no-progress", "--quantize", "nf4",
                   "--quant-iters", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr, proc.stderr
    said = proc.stdout + proc.stderr
    assert len([line for line in said.splitlines() if "quantizer" in line]) == 1, said  # said once
    assert "cast error" not in said
    proc = run_cli("decompose", llama, "-r", "2", "--out", tmp_path / "p", "--dry-run")
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr


def test_qerror_has_no_progress_flag(llama, tmp_path):
    res = pissa_rs.decompose_checkpoint(llama, r=2, out=tmp_path / "o", progress=False, target_modules=["q_proj"])
    proc = run_cli("qerror", res.out, "--against", llama, "--no-progress")
    assert proc.returncode == 0 and "qerror" not in proc.stderr, proc.stderr
    proc = run_cli("qerror", res.out, "--against", llama)
    assert proc.returncode == 0 and "qerror" in proc.stderr  # the bar, on stderr


# --- subfolders ------------------------------------------------------------------------------

def test_sentence_transformers_subfolders_travel_with_every_output(minilm, tmp_path):
    wanted = {"1_Pooling/config.json", "modules.json", "sentence_bert_config.json", "config.json"}
    res = pissa_rs.decompose_checkpoint(minilm, r=2, out=tmp_path / "o", progress=False)
    assert wanted <= set(res.report["totals"]["copied_files"])
    for rel in wanted:
        assert (res.out / rel).read_bytes() == (minilm / rel).read_bytes(), rel
    assert not (res.out / "onnx").exists() and not (res.out / ".cache").exists()
    several = pissa_rs.decompose_checkpoint(minilm, r=[1, 2], out=tmp_path / "r{r}", progress=False)
    for result in several:
        assert (result.out / "1_Pooling" / "config.json").is_file()
    # merge: the model's files, never our own (adapter, report, plots)
    proc = run_cli("plot", res.out)
    assert proc.returncode == 0, proc.stderr
    assert (res.out / "pissa_plots" / "energy_kept.png").is_file()
    merged = pissa_rs.merge_adapter(res.out, res.adapter, tmp_path / "merged")
    for rel in wanted:
        assert (merged / rel).read_bytes() == (minilm / rel).read_bytes(), rel
    for ours in ("pissa_plots", "pissa_init", "pissa_report.json"):
        assert not (merged / ours).exists(), ours
    # A second decomposition into the same OUT with --overwrite: its subfolder is ours, not foreign.
    pissa_rs.decompose_checkpoint(minilm, r=2, niter=2, out=tmp_path / "o", overwrite=True, progress=False)


# --- configs that ask for custom code -------------------------------------------------------

def kimi_like(tmp_path: Path, architecture: str = "DeepseekV3ForCausalLM") -> Path:
    """A tiny DeepSeek-V3 as transformers saves it, its config rewritten as Kimi-K2 ships
    one: its own model_type and an auto_map to Python files that must never run."""
    config = transformers.DeepseekV3Config(**text(
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, n_shared_experts=1))
    src = tmp_path / "kimi"
    torch.manual_seed(0)
    save_spread(transformers.DeepseekV3ForCausalLM(config), src)
    data = json.loads((src / "config.json").read_text())
    data.update(model_type="kimi_k2", architectures=[architecture],
                auto_map={"AutoConfig": "configuration_kimi.KimiConfig",
                          "AutoModelForCausalLM": "modeling_kimi.KimiForCausalLM"})
    (src / "config.json").write_text(json.dumps(data))
    marker = tmp_path / "custom-code-ran"
    for name in ("configuration_kimi.py", "modeling_kimi.py"):
        (src / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('custom code ran')\n")
    return src


@pytest.mark.floor
def test_a_custom_code_config_is_built_as_the_transformers_class_it_names(tmp_path):
    src = kimi_like(tmp_path)
    proc = run_cli("decompose", src, "-r", "2", "--out", tmp_path / "o", "--no-progress", "--target-modules",
                   "q_b_proj,o_proj", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "note: config.json names model_type 'kimi_k2'" in proc.stdout
    assert "DeepseekV3ForCausalLM" in proc.stdout and "[y/N]" not in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "o" / "pissa_report.json").read_text())
    assert "kimi_k2" in report["config_note"] and report["architecture"] == "DeepseekV3ForCausalLM"
    assert not (tmp_path / "custom-code-ran").exists()
    assert pissa_rs.verify(tmp_path / "o", against=src).ok
    model = pissa_rs.load_for_training(tmp_path / "o")
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    merged = pissa_rs.merge_adapter(tmp_path / "o", tmp_path / "o" / "pissa_init", tmp_path / "merged")
    assert (merged / "config.json").is_file()
    assert not (tmp_path / "custom-code-ran").exists()


def test_a_custom_code_config_naming_no_transformers_class_fails_at_once(tmp_path):
    src = kimi_like(tmp_path, architecture="KimiK2ForCausalLM")
    proc = run_cli("decompose", src, "-r", "2", "--out", tmp_path / "o", "--dry-run")
    assert proc.returncode == 1
    assert "KimiK2ForCausalLM" in proc.stderr and "never runs a checkpoint's code" in proc.stderr
    assert "--target-modules" in proc.stderr and "[y/N]" not in proc.stdout + proc.stderr
    assert not (tmp_path / "custom-code-ran").exists()
    # The explicit-targets route the message names works.
    res = pissa_rs.decompose_checkpoint(src / "model.safetensors", r=2, target_modules=["q_b_proj"],
                                        out=tmp_path / "o", progress=False)
    assert res.report["totals"]["targets"] == 2


# An entry that is a string suffix of module names but no dotted component of them ("proj"
# ends "q_proj"): PEFT matches by "name == entry or name.endswith('.' + entry)", so it would
# adapt nothing through it, silently. It is a typo to name, in folders and bare files alike.
@pytest.mark.parametrize("entry", ["proj", "_proj", "j"])
def test_a_string_suffix_that_is_no_dotted_name_is_a_typo(llama, tmp_path, entry):
    shard = next(llama.glob("*.safetensors"))
    for source in (llama, shard):
        with pytest.raises(pissa_rs.TargetError, match=f"target_modules entry '{entry}' matched no module"):
            pissa_rs.plan(source, r=2, target_modules=["q_proj", entry], out=tmp_path / "o")
        with pytest.raises(pissa_rs.TargetError, match=f"exclude_modules entry '{entry}' matched no module"):
            pissa_rs.plan(source, r=2, target_modules=["q_proj", "v_proj"], exclude_modules=[entry],
                          out=tmp_path / "o")
    # a dotted component (the module's own name, or a path of them) is matched as PEFT does
    assert len(pissa_rs.plan(llama, r=2, target_modules=["self_attn.q_proj"], out=tmp_path / "o").targets) == 1
    with pytest.raises(pissa_rs.TargetError, match="'attn.q_proj' matched no module"):
        pissa_rs.plan(llama, r=2, target_modules=["attn.q_proj"], out=tmp_path / "o")
