"""LoRAs at the rank a server takes: `to-lora --rank / --energy / --serve vllm` truncate each
module's update dW = [B | -B0][A ; A0] from the factors alone, and equal PEFT's own
convert_to_lora (the SVD of the dense dW) on the same fine-tuned model: the same best
rank-k approximation, the same energy-chosen ranks; loaded by folder onto the original."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers
from helpers import move_adapters, save_spread, text
from make_tiny_model import save_tiny_model
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

import pissa_rs
from pissa_rs.convert import VLLM_RANKS, convert_to_lora

R = 4  # the decomposition's rank: the exact LoRA has rank 2r = 8
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A decomposition, its adapter moved at random (a fine-tuning), and the exact LoRA of it."""
    root = tmp_path_factory.mktemp("serving")
    src = save_tiny_model(root / "m", "llama", layers=2)
    res = pissa_rs.decompose_checkpoint(src, r=R, lora_alpha=8, out=root / "o", progress=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), res.adapter, is_trainable=True)
    move_adapters(model, scale=0.5)
    with torch.no_grad():  # spectra that decay at a different rate in each module: energy picks different ranks
        for i, (name, p) in enumerate((n, p) for n, p in model.named_parameters() if "lora_B" in n):
            p.mul_(torch.exp(-torch.arange(p.shape[1]) * (0.3 + 0.6 * (i % 4))))
    model.save_pretrained(root / "ft")
    convert_to_lora(res.adapter, root / "ft", root / "exact")
    return {"src": src, "init": res.adapter, "ft": root / "ft", "exact": root / "exact"}


def deltas(folder) -> dict[str, torch.Tensor]:
    """Each module's s * B @ A in a LoRA folder (dense: the models here are tiny)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    found = {}
    for key in weights:
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = weights[key.replace(".lora_A.", ".lora_B.")].double()
            rank = next((k for p, k in config["rank_pattern"].items() if module.endswith(p.replace("\\", ""))),
                        config["r"])
            alpha = next((k for p, k in config["alpha_pattern"].items() if module.endswith(p.replace("\\", ""))),
                         config["lora_alpha"])
            found[module] = alpha / rank * b @ weights[key].double()
    return found


def peft_converted(tuned, rank):
    """PEFT's own convert_to_lora of the exact LoRA on the original model: dense dW, its SVD."""
    from peft.tuners.lora.conversion import convert_to_lora as peft_convert

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tuned["src"]), tuned["exact"])
    with pytest.warns(UserWarning, match="already a LoRA"):
        config, state = peft_convert(model, rank)
    found = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            found[module] = state[key.replace(".lora_A.", ".lora_B.")].double() @ a.double()  # scale folded in
    return config, found


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_rank_r_is_peft_convert_to_lora_from_the_factors_alone(tuned, tmp_path, rank):
    result = convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "lora", rank=rank, logit_check=2 * (rank == 1))
    if rank == 1:  # what cutting to rank 1 changes, against the fine-tuned adapter on the residual model, by hand
        ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
        tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tuned["init"].parent), tuned["ft"])
        cut = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")
        with torch.no_grad():
            ref, cand = (m.eval()(input_ids=ids).logits.double() for m in (tuned_model, cut))
        kl = (ref.softmax(-1) * (ref.log_softmax(-1) - cand.log_softmax(-1))).sum(-1).mean().item()
        assert result.logit_change["kl"] == pytest.approx(kl, rel=1e-6) and kl > 1e-9
    _, theirs = peft_converted(tuned, rank)
    ours, exact = deltas(tmp_path / "lora"), deltas(tuned["exact"])
    assert sorted(ours) == sorted(theirs) == sorted(exact)
    report = json.loads((tmp_path / "lora" / "pissa_conversion.json").read_text())
    for module, delta in ours.items():
        gap = (delta - theirs[module]).abs().max().item()
        assert gap <= 1e-5 * theirs[module].abs().max().item(), f"{module}: off PEFT's by {gap:.3g}"
        s = torch.linalg.svdvals(exact[module])
        assert torch.allclose(torch.linalg.svdvals(delta)[:rank], s[:rank], rtol=1e-5)
        dropped = (s[rank:] ** 2).sum() / (s ** 2).sum()  # Eckart-Young: what the best rank-k LoRA leaves
        assert result.dropped[module] == pytest.approx(dropped.item(), rel=1e-6, abs=1e-12)
        assert report["modules"][module] == {"rank": rank, "dropped": result.dropped[module]}
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == rank and config["lora_alpha"] == rank and not config["rank_pattern"]
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")  # by folder, onto the original
    assert loaded.peft_config["default"].base_model_name_or_path == str(tuned["src"])


def test_a_rank_above_the_true_rank_is_exact_without_padding(tuned, tmp_path):
    result = convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "lora", rank=100, logit_check=2)
    assert set(result.ranks.values()) == {2 * R} and max(result.dropped.values()) < 1e-12
    # against the fine-tuned adapter on the residual model: the same logits, within float32 rounding
    assert result.logit_change["kl"] < 1e-9 and result.logit_change["top1_agreement"] == 1.0
    assert result.logit_change["max_abs"] < 1e-4 < result.logit_change["reference_mean_abs"]
    assert json.loads((tmp_path / "lora" / "pissa_conversion.json").read_text())["logit_change"] == result.logit_change
    exact, ours = deltas(tuned["exact"]), deltas(tmp_path / "lora")
    for module, delta in ours.items():
        assert torch.allclose(delta, exact[module], atol=1e-6)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tuned["src"]), tmp_path / "lora")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tuned["src"]), tuned["exact"])
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS).logits, reference(TOKENS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.999])
def test_energy_chooses_peft_ranks_written_as_patterns(tuned, tmp_path, energy):
    result = convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "lora", energy=energy)
    config_theirs, theirs = peft_converted(tuned, energy)
    ours = deltas(tmp_path / "lora")
    chosen = {m: config_theirs.rank_pattern.get(m, config_theirs.r) for m in theirs}
    assert result.ranks == chosen
    assert len(set(chosen.values())) > 1  # the modules' spectra differ: so do their ranks
    for module, delta in ours.items():
        gap = (delta - theirs[module]).abs().max().item()
        assert gap <= 1e-5 * theirs[module].abs().max().item(), module
        assert 1 - result.dropped[module] >= energy
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")
    for name, module in loaded.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            assert module.r["default"] == result.ranks[name.removeprefix("base_model.model.")]
            assert module.scaling["default"] == 1.0  # the scale is in the factors


def test_vllm_serving_names_one_accepted_max_lora_rank(tuned, tmp_path):
    result = convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "lora", rank=3, serve="vllm")
    assert result.max_lora_rank == 8 and result.max_lora_rank in VLLM_RANKS
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] <= result.max_lora_rank and config["lora_alpha"] / config["r"] == 1.0  # vLLM's one scaling
    alone = convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "alone", serve="vllm")
    assert alone.max_lora_rank == 8 and max(alone.dropped.values()) < 1e-12  # rank 2r fits: nothing dropped
    done = subprocess.run([sys.executable, "-m", "pissa_rs.cli", "to-lora", str(tuned["init"]), str(tuned["ft"]),
                           str(tmp_path / "cli"), "--energy", "0.9", "--serve", "vllm"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--max-lora-rank 8" in done.stdout and "energy dropped" in done.stdout and "most dropped:" in done.stdout


@pytest.mark.parametrize("options, message", [
    ({"rank": 0}, "rank must be a positive integer"), ({"rank": -2}, "rank must be a positive integer"),
    ({"rank": True}, "rank must be a positive integer"), ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
    ({"energy": 1.5}, r"energy must be in \(0, 1\]"), ({"rank": 2, "energy": 0.5}, "rank or energy, not both"),
    ({"serve": "tgi"}, "serve must be one of vllm"), ({"rank": 600, "serve": "vllm"}, "rank 512 at most"),
])
def test_bad_truncations_are_refused_before_anything_is_written(tuned, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "lora", **options)
    assert not (tmp_path / "lora").exists()


@pytest.fixture(scope="module")
def tuned_moe(tmp_path_factory):
    """A tiny Mixtral decomposed, its adapter (experts included) moved at random."""
    root = tmp_path_factory.mktemp("serving-moe")
    torch.manual_seed(0)
    save_spread(transformers.MixtralForCausalLM(transformers.MixtralConfig(**text(num_local_experts=4,
                                                                                  num_experts_per_tok=2))),
                root / "src")
    res = pissa_rs.decompose_checkpoint(root / "src", r=R, niter=0, out=root / "o", progress=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), res.adapter, is_trainable=True)
    move_adapters(model)
    model.save_pretrained(root / "ft")
    return root, res


def test_moe_experts_are_truncated_per_expert(tuned_moe, tmp_path):
    """Mixtral: each expert's update gets its own best rank-k approximation (PEFT's conversion
    does not take ParamWrapper layers; checked against the dense SVD per expert)."""
    root, res = tuned_moe
    exact = convert_to_lora(res.adapter, root / "ft", tmp_path / "exact")
    cut = convert_to_lora(res.adapter, root / "ft", tmp_path / "cut", rank=3)
    experts = {m: k for m, k in exact.ranks.items() if "experts" in m}
    assert experts and all(cut.ranks[m] == 3 for m in experts)
    full = safetensors.torch.load_file(tmp_path / "exact" / "adapter_model.safetensors")
    ours = safetensors.torch.load_file(tmp_path / "cut" / "adapter_model.safetensors")
    exact_cfg = json.loads((tmp_path / "exact" / "adapter_config.json").read_text())
    for key in (k for k in ours if ".experts" in k and ".lora_A." in k):
        n = 4
        a, b = ours[key].double(), ours[key.replace(".lora_A.", ".lora_B.")].double()
        fa, fb = full[key].double(), full[key.replace(".lora_A.", ".lora_B.")].double()
        k_full, k_cut = fa.shape[0] // n, a.shape[0] // n
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        pattern = next((p for p in exact_cfg["rank_pattern"] if module.endswith(p.split("\\.")[-1])), None)
        rank = exact_cfg["rank_pattern"].get(pattern, exact_cfg["r"])
        alpha = exact_cfg["alpha_pattern"].get(pattern, exact_cfg["lora_alpha"])
        for e in range(n):
            dense = alpha / rank * fb.view(-1, k_full, n)[:, :, e] @ fa.view(n, k_full, -1)[e]
            u, s, vh = torch.linalg.svd(dense)
            best = (u[:, :3] * s[:3]) @ vh[:3]
            mine = b.view(-1, k_cut, n)[:, :, e] @ a.view(n, k_cut, -1)[e]
            assert torch.allclose(mine, best, atol=1e-6 * s[0].item() + 1e-9), (key, e)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "src"), tmp_path / "cut")


def test_verify_lora_checks_each_module_against_the_best_at_its_rank(tuned, tmp_path):
    """verify-lora: a truncated LoRA passes (its error is the best at its rank, and what was
    recorded); a LoRA whose factors were damaged, or whose record understates the drop,
    or a truncated one without its record, is named."""
    for options in ({}, {"rank": 2}, {"energy": 0.9}, {"serve": "vllm"}):
        out = tmp_path / f"lora-{len(list(tmp_path.iterdir()))}"
        convert_to_lora(tuned["init"], tuned["ft"], out, **options)
        report = pissa_rs.verify_lora(out, tuned["init"], tuned["ft"])
        assert report.ok and report.checked_targets == 14, (options, report.problems)
    exact = tmp_path / "exact"
    convert_to_lora(tuned["init"], tuned["ft"], exact)
    weights = safetensors.torch.load_file(exact / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key][0] *= 1 + 1e-3  # a small damage (~1e-7 of the energy), far above float32 rounding
    safetensors.torch.save_file(weights, exact / "adapter_model.safetensors", metadata={"format": "pt"})
    problems = pissa_rs.verify_lora(exact, tuned["init"], tuned["ft"]).problems
    assert problems and all("layers.0.self_attn.q_proj: drops" in p for p in problems)
    out = tmp_path / "cut"
    convert_to_lora(tuned["init"], tuned["ft"], out, rank=2)
    weights = safetensors.torch.load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    weights[key] = weights[key].flip(0)  # the two triplets' A rows swapped: no longer the best rank-2 LoRA
    safetensors.torch.save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    problems = pissa_rs.verify_lora(out, tuned["init"], tuned["ft"]).problems
    assert any("model.layers.1.mlp.down_proj: drops" in p and "the best rank-2 LoRA drops" in p for p in problems)
    assert all("layers.1.mlp.down_proj" in p for p in problems)
    (out / "pissa_conversion.json").unlink()  # a truncated LoRA that claims to be exact
    convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "c2", rank=2)
    (tmp_path / "c2" / "pissa_conversion.json").unlink()
    problems = pissa_rs.verify_lora(tmp_path / "c2", tuned["init"], tuned["ft"]).problems
    assert problems and all("an exact conversion says 0" in p for p in problems)
    done = subprocess.run([sys.executable, "-m", "pissa_rs.cli", "verify-lora", str(tmp_path / "c2"),
                           str(tuned["init"]), str(tuned["ft"])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "MISMATCH" in done.stdout and "FAILED" in done.stdout


def test_verify_lora_on_experts(tuned_moe, tmp_path):
    root, res = tuned_moe
    for options in ({}, {"rank": 3}, {"energy": 0.8}):
        convert_to_lora(res.adapter, root / "ft", tmp_path / "lora", **options)
        report = pissa_rs.verify_lora(tmp_path / "lora", res.adapter, root / "ft")
        assert report.ok, (options, report.problems)


def test_factors_kept_from_the_shapes_pass_are_the_bytes_computed_again(tuned, tmp_path, monkeypatch):
    kept = convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "kept", energy=0.9)
    monkeypatch.setattr(pissa_rs.convert, "REFACTORED_CACHE_BYTES", 0)  # every module computed again
    again = convert_to_lora(tuned["init"], tuned["ft"], tmp_path / "again", energy=0.9)
    assert kept.ranks == again.ranks
    assert ((tmp_path / "kept" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "again" / "adapter_model.safetensors").read_bytes())
