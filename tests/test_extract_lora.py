"""extract-lora: a LoRA of BASE from a fully fine-tuned model, the top-r triplets of each
target's W_ft - W_base, out of core; PEFT loads it onto BASE by its folder; a base that does
not belong is named before anything is written; what differs but is not adapted is listed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers
from helpers import save_spread, text
from peft import AutoPeftModelForCausalLM

import pissa_rs
from pissa_rs.extraction import ExtractionError

R = 4
IDS = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(0))


def pair(root, change_rank=3, noise=0.0, embeddings=False):
    """A tiny Llama and a 'fine-tuned' copy: every linear weight moved by a random rank-3
    change (plus full-rank noise if asked), the embeddings too if asked."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text()))
    save_spread(base, root / "base")  # spread in place, then saved: the model in memory is the base
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("proj.weight"):
                out_f, in_f = p.shape
                p += 0.05 * torch.randn(out_f, change_rank, generator=g) @ torch.randn(change_rank, in_f, generator=g)
                p += noise * torch.randn(p.shape, generator=g)
        if embeddings:
            base.model.embed_tokens.weight[:5] += 0.1
    base.save_pretrained(root / "ft", max_shard_size="60KB")
    return root / "base", root / "ft"


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_the_lora_is_the_top_r_of_each_difference_and_loads_onto_the_base(tmp_path):
    base, ft = pair(tmp_path)
    res = pissa_rs.extract_lora(base, ft, tmp_path / "o", r=R, niter=0, progress=False)
    assert res.report["options"]["method"] == "extract"
    assert [p.name for p in res.out.glob("*.safetensors")] == ["adapter_model.safetensors"]  # no model
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    b_model = transformers.AutoModelForCausalLM.from_pretrained(base)
    f_model = transformers.AutoModelForCausalLM.from_pretrained(ft)
    for t in res.report["tensors"]:
        diff = (f_model.get_parameter(t["tensor"]) - b_model.get_parameter(t["tensor"])).detach().double()
        u, s, vh = torch.linalg.svd(diff)
        best = (u[:, :R] * s[:R]) @ vh[:R]  # the rank-3 change, exactly
        a = adapter[f"base_model.model.{t['module']}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{t['module']}.lora_B.weight"].double()
        assert torch.allclose(t["scale"] * b @ a, best, atol=1e-6), t["tensor"]
        assert t["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["init_lora_weights"] is True
    loaded = AutoPeftModelForCausalLM.from_pretrained(res.adapter)  # by folder: onto BASE
    assert torch.allclose(logits(loaded), logits(f_model.eval()), atol=1e-4)
    assert not res.report["extract"]["not_adapted_but_different"]
    assert pissa_rs.verify(res.out, against=base).ok
    # where a LoRA lands: OUT itself, as to-lora's and mergekit's (pissa_init is a decomposition's
    # initial adapter); an output of an earlier version, its LoRA in OUT/pissa_init, is still found
    assert res.adapter == res.out and not (res.out / "pissa_init").exists()
    old = tmp_path / "old"
    shutil.copytree(res.out, old / "pissa_init")
    (old / "pissa_init" / "pissa_report.json").rename(old / "pissa_report.json")
    assert pissa_rs.verify(old, against=base).ok
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"  # one module's A: not the difference's
    adapter[key] = torch.randn(adapter[key].shape, generator=torch.Generator().manual_seed(5)) * adapter[key].std()
    safetensors.torch.save_file(adapter, res.adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    problems = pissa_rs.verify(res.out, against=base).problems
    assert len(problems) == 1 and "model.layers.1.mlp.up_proj.weight" in problems[0] and "W_ft - W_base" in problems[0]


def test_a_full_rank_change_is_cut_at_r_with_the_share_kept_reported(tmp_path):
    base, ft = pair(tmp_path, noise=0.01, embeddings=True)
    res = pissa_rs.extract_lora(base, ft, tmp_path / "o", r=R, niter=0, logit_check=3, progress=False)
    b_model = transformers.AutoModelForCausalLM.from_pretrained(base)
    f_model = transformers.AutoModelForCausalLM.from_pretrained(ft)
    # the logit change against FINETUNED on 3 random sequences, as computed by hand
    change = json.loads((res.out / "pissa_report.json").read_text())["logit_change"]
    ids = torch.randint(0, 96, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = f_model.eval()(input_ids=ids).logits.double()
        cand = AutoPeftModelForCausalLM.from_pretrained(res.adapter)(input_ids=ids).logits.double()
    kl = (ref.softmax(-1) * (ref.log_softmax(-1) - cand.log_softmax(-1))).sum(-1).mean().item()
    assert change["kl"] == pytest.approx(kl, rel=1e-6) and change["kl"] > 1e-6  # the embeddings' change is missing
    assert change["max_abs"] == pytest.approx((ref - cand).abs().max().item(), rel=1e-6)
    assert change["top1_agreement"] == pytest.approx((ref.argmax(-1) == cand.argmax(-1)).double().mean().item())
    for t in res.report["tensors"]:
        diff = (f_model.get_parameter(t["tensor"]) - b_model.get_parameter(t["tensor"])).detach().double()
        s = torch.linalg.svdvals(diff)
        assert t["energy_kept"] == pytest.approx(((s[:R] ** 2).sum() / (s ** 2).sum()).item(), rel=1e-5)
        assert t["energy_kept"] < 1
    assert res.report["extract"]["not_adapted_but_different"] == ["model.embed_tokens.weight"]
    # randomized (niter 4) against exact: the same subspace for a well separated top-r
    fast = pissa_rs.extract_lora(base, ft, tmp_path / "fast", r=R, progress=False)
    exact = {t["tensor"]: t["energy_kept"] for t in res.report["tensors"]}
    for t in fast.report["tensors"]:
        assert t["energy_kept"] == pytest.approx(exact[t["tensor"]], rel=1e-3)
    assert pissa_rs.verify(fast.out, against=base).ok


def test_a_base_that_does_not_belong_is_named_before_anything_is_written(tmp_path):
    _, ft = pair(tmp_path)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**text(), "vocab_size": 120})).save_pretrained(
        tmp_path / "other")
    with pytest.raises(ExtractionError, match=r"other/model.safetensors: tensor 'lm_head.weight' is F32 \[120, 64\], but F32 "
                                              r"\[96, 64\].*did not start from this base"):
        pissa_rs.extract_lora(tmp_path / "other", ft, tmp_path / "o", r=R, progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="the base model to extract a LoRA of is not there"):
        pissa_rs.extract_lora(tmp_path / "nope", ft, tmp_path / "o", r=R, progress=False)
    with pytest.raises(ValueError, match="method 'extract' needs the base model"):
        pissa_rs.decompose_checkpoint(ft, r=R, method="extract", out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"extract_base apply to method 'extract', not 'pissa'"):
        pissa_rs.decompose_checkpoint(ft, r=R, extract_base=str(tmp_path / "base"), out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_extract_lora_from_the_shell_and_its_resume(tmp_path):
    base, ft = pair(tmp_path, noise=0.01, embeddings=True)
    cli = [sys.executable, "-m", "pissa_rs.cli", "extract-lora", str(base), str(ft), str(tmp_path / "o"),
           "--rank", str(R), "--no-progress"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "share of W_ft - W_base kept: mean" in done.stdout
    assert "differ but not adapted (not in the LoRA): model.embed_tokens.weight" in done.stdout
    again = subprocess.run(cli, capture_output=True, text=True, timeout=300)  # complete: nothing to redo
    assert again.returncode == 0, again.stderr
    chosen = subprocess.run(cli[:-4] + [str(tmp_path / "e"), "--rank", "6", "--energy", "0.9", "--save-modules",
                                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0, chosen.stderr
    assert "ranks chosen for 0.9 of each difference (rank: modules): 3: 14;" in chosen.stdout
    assert "saved whole (modules_to_save): model.embed_tokens" in chosen.stdout
    assert "differ but not adapted" not in chosen.stdout
    other = cli[:-4] + [str(tmp_path / "k"), "--rank", str(R), "--no-progress"]
    killed = subprocess.run(other, env={**os.environ, "PISSA_RS_SIGNAL_AT": "target:5"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "k" / "pissa_report.json").exists()
    resumed = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (safetensors.torch.load_file(p / "adapter_model.safetensors") for p in (tmp_path / "o", tmp_path / "k"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shares(diff: torch.Tensor) -> torch.Tensor:
    """The share of ||diff||^2 its leading k singular triplets keep, k = 1, 2, ..."""
    s2 = torch.linalg.svdvals(diff.double()) ** 2
    return torch.cumsum(s2, 0) / s2.sum()


def test_energy_keeps_each_modules_fewest_triplets_and_peft_loads_those_ranks(tmp_path):
    base, ft = pair(tmp_path, noise=0.03)  # a rank-3 change in noise: the modules need different ranks
    energy, cap = 0.9, 8
    res = pissa_rs.extract_lora(base, ft, tmp_path / "o", r=cap, energy=energy, niter=0, progress=False)
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    b_model = transformers.AutoModelForCausalLM.from_pretrained(base)
    f_model = transformers.AutoModelForCausalLM.from_pretrained(ft)
    expected = transformers.AutoModelForCausalLM.from_pretrained(base)  # the base plus each best rank-k change
    ranks = {}
    for t in res.report["tensors"]:
        diff = (f_model.get_parameter(t["tensor"]) - b_model.get_parameter(t["tensor"])).detach().double()
        share = shares(diff)
        k = min(int((share < energy - 1e-6).sum()) + 1, cap)  # the fewest that keep 90%
        assert (t["r"], t["rank_chosen_from"]) == (k, cap), t["tensor"]
        assert t["energy_kept"] == pytest.approx(share[k - 1].item(), rel=1e-5)
        a = adapter[f"base_model.model.{t['module']}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{t['module']}.lora_B.weight"].double()
        assert a.shape[0] == b.shape[1] == k
        u, s, vh = torch.linalg.svd(diff)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(t["scale"] * b @ a, best, atol=1e-6), t["tensor"]
        with torch.no_grad():
            expected.get_parameter(t["tensor"]).add_(best.float())
        ranks[t["module"]] = k
    assert len(set(ranks.values())) > 1, ranks  # else the test would not tell a rank pattern from r
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["r"] == max(ranks.values())
    loaded = AutoPeftModelForCausalLM.from_pretrained(res.adapter)
    for module, k in ranks.items():  # PEFT reads each module's rank and scale from the patterns
        layer = loaded.get_submodule(f"base_model.model.{module}")
        assert layer.r["default"] == k and layer.scaling["default"] == pytest.approx(
            next(t["scale"] for t in res.report["tensors"] if t["module"] == module))
    assert torch.allclose(logits(loaded), logits(expected.eval()), atol=1e-4)
    assert pissa_rs.verify(res.out, against=base).ok
    # E = 1 keeps each difference's true rank, never the cap's rounding-level triplets
    exact_base, exact_ft = pair(tmp_path / "exact")
    whole = pissa_rs.extract_lora(exact_base, exact_ft, tmp_path / "all", r=cap, energy=1.0, niter=0, progress=False)
    assert {t["r"] for t in whole.report["tensors"]} == {3}
    assert json.loads((whole.adapter / "adapter_config.json").read_text())["r"] == 3


def test_bad_energy_or_save_modules_are_refused_before_anything_is_written(tmp_path):
    base, ft = pair(tmp_path, embeddings=True)
    for energy in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"extract_energy must be in \(0, 1\]"):
            pissa_rs.extract_lora(base, ft, tmp_path / "o", r=R, energy=energy, progress=False)
    with pytest.raises(ValueError, match="give one rank"):
        pissa_rs.extract_lora(base, ft, tmp_path / "o", r=[2, 4], energy=0.9, progress=False)
    with pytest.raises(ExtractionError, match=r"no module 'embed_tokenz' to save; did you mean model.embed_tokens"):
        pissa_rs.extract_lora(base, ft, tmp_path / "o", r=R, save_modules=["embed_tokenz"], progress=False)
    with pytest.raises(ExtractionError, match="module 'q_proj' is adapted"):
        pissa_rs.extract_lora(base, ft, tmp_path / "o", r=R, save_modules=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="extract_energy apply to method 'extract', not 'pissa'"):
        pissa_rs.decompose_checkpoint(ft, r=R, extract_energy=0.5, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_save_modules_carries_what_differs_and_peft_gives_the_finetuned_logits(tmp_path, tied):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text(tie_word_embeddings=tied)))
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # rank-2 changes of the projections, and the embeddings and one norm changed
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
        model.model.embed_tokens.weight[:5] += 0.1
        model.model.layers[1].input_layernorm.weight += 0.05
    model.save_pretrained(tmp_path / "ft", max_shard_size="60KB")
    base, ft = tmp_path / "base", tmp_path / "ft"
    res = pissa_rs.extract_lora(base, ft, tmp_path / "o", r=R, niter=0, save_modules=True, progress=False)
    saved = ["model.embed_tokens", "model.layers.1.input_layernorm"]
    assert res.report["extract"]["saved_whole"] == sorted(saved)
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == sorted(saved) and config.get("ensure_weight_tying", False) == tied
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    finetuned = {k: v for f in ft.glob("*.safetensors") for k, v in safetensors.torch.load_file(f).items()}
    for name in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(adapter[f"base_model.model.{name}"], finetuned[name])
    assert ("base_model.model.lm_head.weight" in adapter) == tied  # PEFT saves (and reads) the tied head too
    loaded = AutoPeftModelForCausalLM.from_pretrained(res.adapter)
    f_model = transformers.AutoModelForCausalLM.from_pretrained(ft).eval()
    assert torch.allclose(logits(loaded), logits(f_model), atol=1e-4)
    assert pissa_rs.verify(res.out, against=base).ok
    named = pissa_rs.extract_lora(base, ft, tmp_path / "named", r=R, niter=0, save_modules=["embed_tokens"],
                                  progress=False)
    assert named.report["extract"]["saved_whole"] == ["model.embed_tokens"]


def test_the_same_reconstruction_error_as_mergekits_extract_lora(tmp_path):
    """mergekit-extract-lora (pinned in the test extra) on the same pair: per module the same
    rank-R error ||D - s B A|| / ||D|| within 1% (exact: within float32 rounding), and both
    adapters, loaded by PEFT onto BASE, give the same logits."""
    base, ft = pair(tmp_path, noise=0.03, embeddings=True)
    done = subprocess.run([sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", str(ft.resolve()),
                           "--base-model", str(base.resolve()), "--out-path", str(tmp_path / "mergekit"),
                           "--max-rank", str(R)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = safetensors.torch.load_file(tmp_path / "mergekit" / "adapter_model.safetensors")
    b_model = transformers.AutoModelForCausalLM.from_pretrained(base)
    f_model = transformers.AutoModelForCausalLM.from_pretrained(ft)
    for niter, slack in ((0, 1e-5), (4, 1e-2)):
        res = pissa_rs.extract_lora(base, ft, tmp_path / f"ours{niter}", r=R, niter=niter, save_modules=True,
                                    progress=False)
        ours = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
        for t in res.report["tensors"]:
            diff = (f_model.get_parameter(t["tensor"]) - b_model.get_parameter(t["tensor"])).detach().double()
            a_key, b_key = (f"base_model.model.{t['module']}.lora_{x}.weight" for x in "AB")
            error = {who: torch.linalg.matrix_norm(diff - scale * d[b_key].double() @ d[a_key].double()).item()
                     for who, d, scale in (("ours", ours, t["scale"]), ("mergekit", theirs, 1.0))}
            assert error["ours"] == pytest.approx(error["mergekit"], rel=slack), (t["tensor"], niter)
            assert error["mergekit"] > 0.1 * torch.linalg.matrix_norm(diff).item()  # a real truncation
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ours0")  # exact: the same LoRA, by OUT as mergekit's
    theirs_loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "mergekit")
    assert torch.allclose(logits(loaded), logits(theirs_loaded), atol=1e-3)
