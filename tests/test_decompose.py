"""decompose_checkpoint end to end: PEFT loads the output, logits match, PEFT parity, byte-identical pass-through."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from make_tiny_model import save_tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import pissa_rs
from helpers import move_adapters, same_output

torch.manual_seed(0)
TOKENS = torch.randint(0, 256, (2, 24))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def load_pissa(out: Path, dtype=None):
    residual = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    return PeftModel.from_pretrained(residual, out, subfolder="pissa_init", is_trainable=True)


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("in") / "tiny-llama", "llama", layers=2, shard_size="150KB")


@pytest.fixture(scope="module")
def llama_out(llama) -> pissa_rs.DecomposeResult:
    return pissa_rs.decompose_checkpoint(llama, r=8, progress=False)


@pytest.mark.floor
def test_llama_residual_plus_adapter_gives_the_original_logits(llama, llama_out):
    assert len(list(llama.glob("*.safetensors"))) >= 3, "the fixture must be sharded"
    assert llama_out.out == llama.parent / "tiny-llama-pissa-r8"
    original = logits(AutoModelForCausalLM.from_pretrained(llama))
    model = load_pissa(llama_out.out)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(logits(model), original, atol=1e-4, rtol=0)


def test_output_layout(llama, llama_out):
    out = llama_out.out
    in_files = sorted(p.name for p in llama.iterdir())
    out_files = sorted(p.name for p in out.iterdir())
    assert out_files == sorted(in_files + ["pissa_init", "pissa_report.json"])
    assert (out / "model.safetensors.index.json").read_bytes() == (llama / "model.safetensors.index.json").read_bytes()
    assert (out / "config.json").read_bytes() == (llama / "config.json").read_bytes()
    assert sorted(p.name for p in (out / "pissa_init").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(out.rglob(".*")), "no temporary file may remain"

    src, dst = pissa_rs.Checkpoint(llama), pissa_rs.Checkpoint(out)
    for a, b in zip(src.tensors, dst.tensors):
        assert (a.name, a.dtype, a.shape, Path(a.file).name, a.start, a.end) == (
            b.name, b.dtype, b.shape, Path(b.file).name, b.start, b.end)

    adapter = safetensors.torch.load_file(out / "pissa_init" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert adapter[f"{q}.lora_A.weight"].shape == (8, 64) and adapter[f"{q}.lora_B.weight"].shape == (64, 8)
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert len(adapter) == 2 * 7 * 2  # 7 projections x 2 layers, A and B

    config = LoraConfig.from_pretrained(out / "pissa_init")
    assert (config.r, config.lora_alpha, config.init_lora_weights, config.lora_dropout) == (8, 8, True, 0.0)
    assert config.task_type == "CAUSAL_LM"
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.base_model_name_or_path == str(out.resolve())


def test_report(llama_out):
    report = json.loads((llama_out.out / "pissa_report.json").read_text())
    assert report == json.loads(json.dumps(llama_out.report))
    assert report["totals"]["targets"] == len(report["tensors"]) == 14
    assert report["init_lora_weights"] == "pissa_niter_4"
    for t in report["tensors"]:
        assert len(t["singular_values"]) == t["r"] == 8
        assert 0 < t["energy_kept"] <= 1 and t["max_abs_error"] < 1e-6 and t["seconds"] >= 0
    assert "lm_head.weight" not in {t["tensor"] for t in report["tensors"]}, "all-linear excludes the output head"


def test_pass_through_tensors_are_byte_identical_and_input_untouched(llama, llama_out):
    report = llama_out.report
    targets = {t["tensor"] for t in report["tensors"]}
    src, dst = pissa_rs.Checkpoint(llama), pissa_rs.Checkpoint(llama_out.out)
    passthrough = [n for n in src.names() if n not in targets]
    assert "model.embed_tokens.weight" in passthrough and "lm_head.weight" in passthrough
    for name in passthrough:
        assert bytes(src.buffer(name)) == bytes(dst.buffer(name)), name
    before = file_hashes(llama)
    pissa_rs.decompose_checkpoint(llama, r=4, out=llama.parent / "again", progress=False)
    assert file_hashes(llama) == before


def test_same_seed_gives_identical_files_and_another_seed_does_not(llama, tmp_path):
    a = pissa_rs.decompose_checkpoint(llama, r=4, niter=2, seed=7, out=tmp_path / "a", progress=False)
    b = pissa_rs.decompose_checkpoint(llama, r=4, niter=2, seed=7, out=tmp_path / "b", progress=False)
    c = pissa_rs.decompose_checkpoint(llama, r=4, niter=2, seed=8, out=tmp_path / "c", progress=False)
    ha, hb, hc = (file_hashes(x.out) for x in (a, b, c))
    del ha["pissa_report.json"], hb["pissa_report.json"]  # timings and paths differ
    del ha["pissa_init/adapter_config.json"], hb["pissa_init/adapter_config.json"]  # base_model_name_or_path
    assert ha == hb
    assert hc["pissa_init/adapter_model.safetensors"] != ha["pissa_init/adapter_model.safetensors"]


def test_gpt2_conv1d_weights_are_handled_like_fan_in_fan_out(tmp_path):
    src = save_tiny_model(tmp_path / "gpt2", "gpt2", layers=2, shard_size="150KB")
    res = pissa_rs.decompose_checkpoint(src, r=8, out=tmp_path / "out", progress=False)
    assert LoraConfig.from_pretrained(res.adapter).fan_in_fan_out is True
    tensors = {t["tensor"]: t for t in res.report["tensors"]}
    c_fc = tensors["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc["fan_in_fan_out"] and c_fc["shape"] == [64, 256]  # stored in x out
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert adapter["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"].shape == (8, 64)
    assert adapter["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"].shape == (256, 8)
    original = logits(AutoModelForCausalLM.from_pretrained(src))
    torch.testing.assert_close(logits(load_pissa(res.out)), original, atol=1e-4, rtol=0)


def test_bfloat16_checkpoint(tmp_path):
    src = save_tiny_model(tmp_path / "bf16", "llama", layers=2, dtype="bfloat16", shard_size="100KB")
    res = pissa_rs.decompose_checkpoint(src, r=8, out=tmp_path / "out", progress=False)
    assert {t.dtype for t in pissa_rs.Checkpoint(res.out).tensors} == {"BF16"}
    original = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16))
    model = load_pissa(res.out, dtype=torch.bfloat16)
    # Each residual is within half a bf16 ulp of W - s*B@A; through two layers
    # that is a few bf16 ulps of the logits (|logits| ~ 1).
    scale = original.abs().max().item()
    torch.testing.assert_close(logits(model), original, atol=0.03 * scale, rtol=0)
    for t in res.report["tensors"]:
        assert t["max_abs_error"] <= 2.0**-9  # half a bf16 ulp, as |W_res| < 1 here


@pytest.mark.floor
def test_exact_mode_matches_peft_pissa(llama, tmp_path):
    res = pissa_rs.decompose_checkpoint(llama, r=8, lora_alpha=16, niter=0, out=tmp_path / "out", progress=False)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="pissa", lora_dropout=0.0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), config)
    ours_adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    ours_residual = pissa_rs.Checkpoint(res.out)
    compared = 0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.")
        A = ours_adapter[f"base_model.model.{key}.lora_A.weight"]
        B = ours_adapter[f"base_model.model.{key}.lora_B.weight"]
        s = module.scaling["default"]
        theirs = s * module.lora_B["default"].weight @ module.lora_A["default"].weight
        ours = s * B @ A
        # Singular vectors may differ in sign; the product may not.
        assert (ours - theirs).norm() / theirs.norm() < 1e-4, key
        residual = pissa_rs.as_torch(ours_residual.buffer(f"{key}.weight"))
        torch.testing.assert_close(residual, module.base_layer.weight.detach(), atol=1e-5, rtol=1e-4)
        compared += 1
    # PEFT expanded "all-linear" in place into the modules it adapted: the same as ours.
    assert config.target_modules == {t["module"] for t in res.report["tensors"]} and compared == 14
    loaded = LoraConfig.from_pretrained(res.adapter)
    # Ours holds the modules decomposed, condensed to suffixes that pick exactly them (PEFT's own condensing).
    assert (loaded.r, loaded.lora_alpha) == (8, 16)
    assert loaded.target_modules == {m.rsplit(".", 1)[-1] for m in config.target_modules}
    assert res.report["init_lora_weights"] == "pissa"


def test_target_lists_patterns_and_rslora(llama, tmp_path):
    res = pissa_rs.decompose_checkpoint(
        llama, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 4}, use_rslora=True,
        out=tmp_path / "out", progress=False,
    )
    by_module = {t["module"].rsplit(".", 1)[-1]: t for t in res.report["tensors"]}
    assert set(by_module) == {"q_proj", "v_proj", "down_proj"}
    assert by_module["v_proj"]["r"] == 4 and by_module["q_proj"]["r"] == 8
    assert by_module["down_proj"]["lora_alpha"] == 4
    assert by_module["q_proj"]["scale"] == pytest.approx(16 / 8**0.5)
    config = LoraConfig.from_pretrained(res.adapter)
    assert config.rank_pattern == {"v_proj": 4} and config.alpha_pattern == {"down_proj": 4} and config.use_rslora
    original = logits(AutoModelForCausalLM.from_pretrained(llama))
    torch.testing.assert_close(logits(load_pissa(res.out)), original, atol=1e-4, rtol=0)


def test_regex_and_exclude_modules_follow_peft(llama, tmp_path):
    res = pissa_rs.decompose_checkpoint(
        llama, r=4, target_modules=r".*\.layers\.1\..*_proj", exclude_modules=["o_proj"],
        out=tmp_path / "out", progress=False,
    )
    modules = {t["module"] for t in res.report["tensors"]}
    assert modules and all(".layers.1." in m and not m.endswith("o_proj") for m in modules)
    assert len(modules) == 6


def test_bare_safetensors_file_needs_explicit_targets(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"a.proj.weight": torch.randn(16, 12), "a.norm.weight": torch.ones(12)}, path)
    with pytest.raises(pissa_rs.TargetError, match="all-linear.*config.json"):
        pissa_rs.decompose_checkpoint(path, r=4, progress=False)
    res = pissa_rs.decompose_checkpoint(path, r=4, target_modules=["proj"], progress=False)
    assert res.out == tmp_path / "weights-pissa-r4"
    assert sorted(p.name for p in res.out.iterdir()) == ["pissa_init", "pissa_report.json", "weights.safetensors"]
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    residual = safetensors.torch.load_file(res.out / "weights.safetensors")
    w = residual["a.proj.weight"] + adapter["base_model.model.a.proj.lora_B.weight"] @ adapter["base_model.model.a.proj.lora_A.weight"]
    torch.testing.assert_close(w, safetensors.torch.load_file(path)["a.proj.weight"], atol=1e-5, rtol=0)


# --- errors name the culprit, and nothing is written


def test_targets_matching_nothing(llama, tmp_path):
    with pytest.raises(pissa_rs.TargetError, match=r"model.safetensors.index.json.*entry 'nope' matched no module"):
        pissa_rs.decompose_checkpoint(llama, r=4, target_modules=["nope"], out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_target_that_is_not_linear(llama, tmp_path):
    with pytest.raises(pissa_rs.TargetError, match="'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        pissa_rs.decompose_checkpoint(llama, r=4, target_modules=["input_layernorm"], out=tmp_path / "o", progress=False)


def test_target_with_a_wrong_dtype_or_rank(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"x.weight": torch.ones(4, 4, dtype=torch.int32), "y.weight": torch.ones(4, 6),
                                 "z.weight": torch.ones(4)}, path)
    with pytest.raises(pissa_rs.TargetError, match=r"w.safetensors: target tensor 'x.weight' is I32 x \[4, 4\]"):
        pissa_rs.decompose_checkpoint(path, r=2, target_modules=["x"], progress=False)
    with pytest.raises(pissa_rs.TargetError, match=r"'z.weight' is F32 x \[4\]"):
        pissa_rs.decompose_checkpoint(path, r=2, target_modules=["z"], progress=False)
    with pytest.raises(pissa_rs.TargetError, match=r"'y.weight' of shape \[4, 6\] cannot take rank 5.*\[1, 4\]"):
        pissa_rs.decompose_checkpoint(path, r=5, target_modules=["y"], progress=False)


def test_existing_output_is_refused_unless_overwrite(llama, tmp_path):
    out = tmp_path / "o"
    pissa_rs.decompose_checkpoint(llama, r=4, niter=1, out=out, progress=False)
    first = (out / "pissa_init" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(pissa_rs.RunMismatchError, match=r"other inputs or options \(option niter=1 \(this run: 4\)\)"
                       ".*overwrite"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=out, progress=False)
    assert (out / "pissa_init" / "adapter_model.safetensors").read_bytes() == first
    # The same command again: nothing to do, nothing touched.
    again = pissa_rs.decompose_checkpoint(llama, r=4, niter=1, out=out, progress=False)
    assert again.status == "complete" and (out / "pissa_init" / "adapter_model.safetensors").read_bytes() == first
    # A non-empty directory that is no pissa_rs output at all.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(pissa_rs.OutputDirError, match="exists and holds an earlier pissa_rs output.*--overwrite"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "other", progress=False)
    (out / ".model.safetensors.index.json.partial").write_text("left by a crash")
    pissa_rs.decompose_checkpoint(llama, r=4, niter=2, out=out, overwrite=True, progress=False)
    assert (out / "pissa_init" / "adapter_model.safetensors").read_bytes() != first
    assert not list(out.glob(".*"))


def test_overwrite_never_deletes_foreign_files(llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    for overwrite in (False, True):  # the first message already says --overwrite would not help
        with pytest.raises(pissa_rs.OutputDirError, match="'thesis.tex'.*not a pissa_rs output.*overwrite.*replaces only"):
            pissa_rs.decompose_checkpoint(llama, r=4, out=out, overwrite=overwrite, progress=False)
    assert (out / "thesis.tex").read_text() == "mine"


def test_output_onto_the_input_is_refused(llama):
    with pytest.raises(pissa_rs.OutputDirError, match="overwrite the input"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=llama, overwrite=True, progress=False)
    with pytest.raises(pissa_rs.OutputDirError, match="overwrite the input"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=llama.parent, overwrite=True, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"niter": -1}, "niter"),
    ({"adapter_dtype": "int8"}, "adapter_dtype"),
    ({"lora_alpha": -2}, "lora_alpha"),
    ({"device": "gpu7"}, "device"),
])
def test_bad_options(llama, kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        pissa_rs.decompose_checkpoint(llama, **{"r": 4, **kwargs}, progress=False)


def test_bfloat16_adapter(llama, tmp_path):
    res = pissa_rs.decompose_checkpoint(llama, r=8, adapter_dtype="bfloat16", out=tmp_path / "o", progress=False)
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    # The residual absorbs the adapter's rounding: reconstruction stays exact.
    original = logits(AutoModelForCausalLM.from_pretrained(llama))
    model = load_pissa(res.out)
    torch.testing.assert_close(logits(model), original, atol=1e-4, rtol=0)


def test_planning_in_a_child_process_gives_the_same_plan(llama, tmp_path):
    from dataclasses import asdict

    from pissa_rs.planning.plan import make_plan, make_plan_in_child

    options = [asdict(pissa_rs.DecomposeOptions(r=8, rank_pattern={"v_proj": 4}).validate())]
    out = [tmp_path / "o"]
    plans, checks = make_plan_in_child(llama, options, out)
    checks.wait()
    assert plans == make_plan(llama, options, out)
    with pytest.raises(pissa_rs.TargetError, match="matched no module"):
        make_plan_in_child(llama, [{**options[0], "target_modules": ["nope"]}], out)


def test_a_plan_check_that_fails_after_the_units_started_commits_nothing(llama, tmp_path, monkeypatch):
    """The planning child sends the plan, then runs PEFT's layout check while the units
    start: its failure stops the run before the commit (no report, index or config)."""
    import pissa_rs.decompose as driver
    import pissa_rs.planning.plan as planning

    def refuse(config, found, config_dir):
        raise pissa_rs.TargetError(f"{config_dir}: PEFT would load the adapter with other LoRA layers (test)")

    monkeypatch.setattr(driver, "PLAN_IN_CHILD_ABOVE_BYTES", 0)
    monkeypatch.setattr(planning, "check_adapter_layout", refuse)  # the forked child inherits it
    out = tmp_path / "o"
    with pytest.raises(pissa_rs.TargetError, match="other LoRA layers"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=out, progress=False)
    assert list(out.glob("model-0*")), "the units ran before the check's verdict"
    assert not [p for p in ("pissa_report.json", "config.json", "pissa_init/adapter_config.json") if (out / p).exists()]


def test_the_decomposing_process_need_not_hold_peft_or_transformers(llama, tmp_path):
    """Planning (transformers' model classes, PEFT's target rules, and the bitsandbytes PEFT
    pulls in: seconds of imports) happens in a child; the process that decomposes, or dry-runs,
    imports none of them."""
    import subprocess
    import sys

    code = ("import sys, pissa_rs; from pathlib import Path; p = Path(sys.argv[1]); "
            "pissa_rs.plan(p, r=4, out=p.parent / 'dry'); "
            "pissa_rs.decompose_checkpoint(p, r=4, out=p.parent / 'o', progress=False, device='cpu'); "
            "print(sorted(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules))")
    copy = tmp_path / "m"
    shutil.copytree(llama, copy)
    done = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_a_process_whose_torch_ran_parallel_work_plans_without_hanging(llama, tmp_path):
    """The planning child is forked; a child of a process whose CPU thread team is up hung in
    its first parallel region (QPiSSA's quantizer check runs there), as a notebook's process
    would after any torch work."""
    import subprocess
    import sys

    code = ("import sys, torch, pissa_rs; from pathlib import Path; x = torch.randn(1500, 1500); "
            "[x @ x for _ in range(4)]; "
            "r = pissa_rs.decompose_checkpoint(Path(sys.argv[1]), r=4, out=Path(sys.argv[2]), progress=False, "
            "quantize='nf4', device='cpu'); print(r.report['quantizer']['backend'])")
    done = subprocess.run([sys.executable, "-c", code, str(llama), str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in ("bitsandbytes", "reference")


def test_the_rounding_probe_is_measured_while_the_child_plans(llama, monkeypatch):
    """warm_probes (run as the planning child works) measures what devices_probe then asks for:
    one probe per dtype, any set of them a cache hit."""
    from pissa_rs import rounding

    monkeypatch.setattr(rounding, "_cache", {})
    measured = []
    real = rounding._measure
    monkeypatch.setattr(rounding, "_measure", lambda *a: measured.append(a[1]) or real(*a))
    checkpoint = pissa_rs.Checkpoint(llama)
    assert rounding.candidate_dtypes(checkpoint) == ["F32"]
    options = pissa_rs.DecomposeOptions.from_fields({"r": 4, "device": "cpu"})
    rounding.warm_probes(options, checkpoint)
    assert measured == [("F32",)]
    plans, _ = driver_plan(llama, options)
    rounding.devices_probe(options, plans[0].targets)
    assert measured == [("F32",)]  # nothing measured again
    both = rounding.rounding_probe("cpu", ["F32", "BF16"], 4, torch.float32)
    assert measured == [("F32",), ("BF16",)] and both != rounding.rounding_probe("cpu", ["F32"], 4, torch.float32)


def driver_plan(path, options):
    from dataclasses import asdict

    from pissa_rs.planning.plan import make_plan

    return [make_plan(path, [asdict(options)], [path.parent / "o"])[0]], None


def test_plan_shows_what_would_happen_and_writes_nothing(llama, tmp_path):
    out = tmp_path / "never"
    p = pissa_rs.plan(llama, r=8, out=out, rank_pattern={"v_proj": 4})
    assert not out.exists()
    assert len(p.targets) == 14 and {t.r for t in p.targets} == {8, 4}
    names = {n for n, *_ in p.passthrough}
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert p.input_bytes == sum(i.nbytes for i in pissa_rs.Checkpoint(llama).tensors)
    assert p.residual_bytes == sum(f.stat().st_size for f in llama.glob("*.safetensors"))
    assert p.adapter_bytes == sum(t.r * sum(t.shape) * 4 for t in p.targets)
    assert p.free_bytes > 0 and p.fits_on_disk and not p.out_problems
    text = p.describe()
    assert "model.layers.0.self_attn.v_proj.weight" in text and "r=4" in text and "14 targets" in text
    assert "estimated" not in text  # a time estimate that missed by 20-70x on small matrices is gone
    with pytest.raises(pissa_rs.TargetError, match="matched no module"):
        pissa_rs.plan(llama, r=8, target_modules=["nope"])


def test_a_several_rank_plan_needs_the_space_of_every_output(llama, tmp_path, monkeypatch, capsys):
    """r=[2, 4] writes two complete outputs: the plan's sizes are the two single-rank plans'
    sums, and a disk with room for one of them but not both DOES NOT FIT (exit 1)."""
    import pissa_rs.dry_run as dry_run
    from pissa_rs.cli import main

    one = [pissa_rs.plan(llama, r=r, out=tmp_path / f"o{r}") for r in (2, 4)]
    both = pissa_rs.plan(llama, r=[2, 4], out=tmp_path / "o{r}")
    assert both.residual_bytes == sum(p.residual_bytes for p in one)
    assert both.adapter_bytes == sum(p.adapter_bytes for p in one) and one[0].adapter_bytes < one[1].adapter_bytes
    largest = one[1].residual_bytes + one[1].adapter_bytes
    monkeypatch.setattr(dry_run, "free_bytes", lambda path: largest + 1)  # one output fits, two do not
    assert all(p.fits_on_disk for p in [pissa_rs.plan(llama, r=r, out=tmp_path / f"o{r}") for r in (2, 4)])
    assert not pissa_rs.plan(llama, r=[2, 4], out=tmp_path / "o{r}").fits_on_disk
    code = main(["decompose", str(llama), "-r", "2,4", "-o", str(tmp_path / "o{r}"), "--dry-run"])
    assert code == 1 and "DOES NOT FIT" in capsys.readouterr().out
    assert not list(tmp_path.glob("o*"))


def test_full_disk_is_refused_up_front_with_the_numbers(llama, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(pissa_rs.DiskSpaceError, match=r"needs \d+\.\d KiB and its filesystem has 1000 B free") as info:
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False)
    assert isinstance(info.value, OSError) and not (tmp_path / "o").exists()
    assert not pissa_rs.plan(llama, r=4, out=tmp_path / "o").fits_on_disk


def test_several_ranks_in_one_pass(llama, tmp_path):
    results = pissa_rs.decompose_checkpoint(llama, r=[8, 2, 4], niter=0, out=tmp_path / "m-r{r}", progress=False)
    assert [r.out.name for r in results] == ["m-r2", "m-r4", "m-r8"]
    original = logits(AutoModelForCausalLM.from_pretrained(llama))
    src = pissa_rs.Checkpoint(llama)
    for res, rank in zip(results, [2, 4, 8]):
        assert res.report["svd_rank"] == 8 and res.report["options"]["r"] == rank
        config = LoraConfig.from_pretrained(res.adapter)
        assert (config.r, config.lora_alpha) == (rank, rank)
        adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
        assert adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (rank, 64)
        torch.testing.assert_close(logits(load_pissa(res.out)), original, atol=1e-4, rtol=0)
        dst = pissa_rs.Checkpoint(res.out)
        assert bytes(dst.buffer("lm_head.weight")) == bytes(src.buffer("lm_head.weight"))
    # Exact SVD: a smaller rank from the shared SVD is exactly a direct run at that rank.
    direct = pissa_rs.decompose_checkpoint(llama, r=4, niter=0, out=tmp_path / "direct", progress=False)
    assert file_hashes(direct.out)["pissa_init/adapter_model.safetensors"] == \
        file_hashes(results[1].out)["pissa_init/adapter_model.safetensors"]
    assert file_hashes(direct.out)["model-00001-of-00004.safetensors"] == \
        file_hashes(results[1].out)["model-00001-of-00004.safetensors"]


def test_several_ranks_need_a_templated_out_and_no_rank_pattern(llama, tmp_path):
    with pytest.raises(ValueError, match=r"must contain '\{r\}'"):
        pissa_rs.decompose_checkpoint(llama, r=[2, 4], out=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="rank_pattern cannot be combined"):
        pissa_rs.decompose_checkpoint(llama, r=[2, 4], rank_pattern={"q_proj": 1}, progress=False)


def test_peft_converts_a_trained_adapter_to_a_lora_of_the_original_model(llama, tmp_path):
    # What the README promises: train on residual + pissa_init, then PEFT's own
    # conversion gives a LoRA that works on the ORIGINAL model. (PEFT rewrites the
    # init dir's adapter_config.json while converting: use an output of our own.)
    res = pissa_rs.decompose_checkpoint(llama, r=8, out=tmp_path / "o", progress=False)
    model = load_pissa(res.out)
    move_adapters(model)  # stand-in for training
    tuned = logits(model)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(res.adapter))
    assert LoraConfig.from_pretrained(tmp_path / "lora").r == 16  # 2r
    converted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "lora")
    torch.testing.assert_close(logits(converted), tuned, atol=1e-4, rtol=0)


def test_a_failure_mid_run_leaves_no_file_under_a_final_name(llama, tmp_path, monkeypatch):
    import pissa_rs.methods.pissa as driver  # the default method's SVD

    real = driver.factors_at_ranks
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "factors_at_ranks", failing)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        pissa_rs.decompose_checkpoint(llama, r=4, out=out, progress=False)
    # No adapter, index, config or report: the output does not look complete. Only the
    # shards of finished units are under their final names (checked complete below),
    # besides the hidden temporary files and journals a rerun resumes from.
    shards_then = {f: (out / f).read_bytes() for f in [p.relative_to(out) for p in out.glob("model-0*")]}
    mtimes_then = {f: (out / f).stat().st_mtime_ns for f in shards_then}
    finals = [p.relative_to(out) for p in out.rglob("*") if p.is_file()
              and not any(part.startswith(".") for part in p.relative_to(out).parts)]
    assert finals and all(f.name.startswith("model-0") for f in finals), finals
    assert list(out.glob(".pissa_units/unit-*.journal.jsonl"))
    resumed = []
    monkeypatch.setattr(driver, "factors_at_ranks", lambda *a, **k: resumed.append(1) or real(*a, **k))
    res = pissa_rs.decompose_checkpoint(llama, r=4, out=out, progress=False)
    # The 4 targets done before the interrupt were kept, not recomputed.
    assert res.status == "resumed" and len(resumed) == len(res.report["tensors"]) - 4
    assert {f: (out / f).stat().st_mtime_ns for f in shards_then} == mtimes_then  # finished units: not rewritten
    assert not list(out.rglob(".*"))  # journals and temporary files gone once complete
    fresh = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "fresh", progress=False)
    for f in sorted(p.relative_to(fresh.out) for p in fresh.out.rglob("*.safetensors")):
        assert (out / f).read_bytes() == (fresh.out / f).read_bytes(), f
    assert shards_then and all((fresh.out / f).read_bytes() == data for f, data in shards_then.items())


def test_a_process_that_initialised_cuda_plans_in_a_fresh_interpreter(llama, tmp_path, monkeypatch):
    """CUDA is not to be used in a forked child (EVA and the rank budget do device work before
    the plan): with CUDA initialised, the planning child is a fresh interpreter, with the same
    plan, checks and errors."""
    import pissa_rs.decompose as driver
    import pissa_rs.planning.plan as planning

    started = []
    real = planning._start_fresh_child
    monkeypatch.setattr(planning, "_start_fresh_child", lambda *a: started.append(a) or real(*a))
    monkeypatch.setattr(planning.multiprocessing, "get_context", lambda *a: pytest.fail("forked after CUDA init"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(driver, "PLAN_IN_CHILD_ABOVE_BYTES", 1 << 60)
    in_process = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "here", progress=False, device="cpu")
    assert not started  # planned in this process
    monkeypatch.setattr(driver, "PLAN_IN_CHILD_ABOVE_BYTES", 0)
    res = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "fresh", progress=False, device="cpu")
    assert len(started) == 1
    same_output(res.out, in_process.out)
    with pytest.raises(pissa_rs.TargetError, match="matched no module"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "typo", progress=False, device="cpu",
                                      target_modules=["nope"])


def test_a_process_running_native_threads_plans_in_a_fresh_interpreter(llama, tmp_path, monkeypatch):
    """A Ray driver's gRPC threads (left running by ray.shutdown() too) crashed a forked
    planning child with SIGSEGV: a process with a thread a native library named (here one named
    as gRPC names its timer thread) plans in a fresh interpreter; importing Ray alone starts no
    thread, and a process whose threads all carry its own name (Python's, torch's, our reader's)
    forks."""
    import threading

    import pissa_rs.planning.plan as planning

    assert planning.foreign_threads() == []  # this process: pytest, torch, the reader
    started = []
    real = planning._start_fresh_child
    monkeypatch.setattr(planning, "_start_fresh_child", lambda *a: started.append(a) or real(*a))
    named, stop = threading.Event(), threading.Event()

    def native_like():
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("grpc_global_tim")
        named.set()
        stop.wait()

    thread = threading.Thread(target=native_like, daemon=True)
    thread.start()
    try:
        named.wait(10)
        assert planning.foreign_threads() == ["grpc_global_tim"]
        monkeypatch.setattr(planning.multiprocessing, "get_context", lambda *a: pytest.fail("forked beside gRPC"))
        res = pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False)
    finally:
        stop.set()
        thread.join()
    assert len(started) == 1 and (res.out / "pissa_report.json").is_file()