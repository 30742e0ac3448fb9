"""The method registry end to end (PiSSA, MiLoRA, MiCA, OLoRA): for the methods PEFT has, our
output is PEFT's own init of the same model (factors and residual within float32 rounding, the
same adapter_config), it loads with no missing or unexpected key and trains a step with PEFT;
MiLoRA against its definition computed here; every method on a MoE with experts and on an FP8
source; the method recorded in the report and checked by verify; conversion and merge with
the method's own algebra."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import safetensors.torch
import torch
import transformers
from helpers import move_adapters, save_spread, text
from low_precision import save_fp8_block
from make_tiny_model import save_tiny_model
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import pissa_rs
from pissa_rs.cli import main

R, ALPHA = 8, 16
torch.manual_seed(0)
TOKENS = torch.randint(0, 256, (2, 16))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS % model.config.vocab_size).logits.float()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # a decaying spectrum: the bottom singular vectors are well separated, so two
    # implementations find the same ones
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", layers=2, decay=0.5)


@pytest.fixture(scope="module")
def outputs(llama):
    return {m: pissa_rs.decompose_checkpoint(llama, r=R, lora_alpha=ALPHA, method=m, progress=False)
            for m in ("pissa", "milora", "mica", "olora")}


def adapter_of(res) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")


def sign_canonical(b: torch.Tensor) -> torch.Tensor:
    """Columns with their largest-magnitude entry positive: singular vectors are unique up to sign."""
    signs = torch.sign(b.gather(0, b.abs().argmax(0, keepdim=True)))
    return b * signs


def said_about_keys(load) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load()
    said = [str(w.message) for w in caught]
    assert not [m for m in said if ("missing" in m.lower() or "unexpected" in m.lower()) and "key" in m.lower()], said
    return model


def peft_config_dict(model, method_init) -> dict:
    config = model.peft_config["default"]
    config.init_lora_weights = method_init  # PEFT's examples save the initial adapter so
    return json.loads(json.dumps(config.to_dict(), default=sorted))


def comparable(config: dict) -> dict:
    # where each config says the adapter applies, and which modules it picks (PEFT's own
    # expansion names them in full, ours condensed): compared separately
    return {k: v for k, v in config.items()
            if k not in ("base_model_name_or_path", "revision", "target_modules", "peft_version")}


def one_step(model) -> dict[str, torch.Tensor]:
    """One SGD step of PEFT training; returns the adapter weights before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("method", ["mica", "olora"])
def test_peft_methods_match_peft_own_init(llama, outputs, method, caplog):
    res = outputs[method]
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=method, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), config)
    ours = adapter_of(res)
    compared = 0
    residual = None if method == "mica" else pissa_rs.Checkpoint(res.out)
    for name, module in theirs.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.")
        a, b = ours[f"base_model.model.{key}.lora_A.weight"], ours[f"base_model.model.{key}.lora_B.weight"]
        ta, tb = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
        if method == "mica":
            assert torch.equal(a, torch.zeros_like(ta)), key
            torch.testing.assert_close(sign_canonical(b), sign_canonical(tb), atol=1e-5, rtol=0, msg=key)
        else:
            torch.testing.assert_close(a, ta, atol=1e-5, rtol=1e-5, msg=key)
            torch.testing.assert_close(b, tb, atol=1e-5, rtol=1e-5, msg=key)
            w_res = pissa_rs.as_torch(residual.buffer(f"{key}.weight"))
            torch.testing.assert_close(w_res, module.base_layer.weight.detach(), atol=1e-5, rtol=1e-5, msg=key)
        compared += 1
    assert compared == 14 and config.target_modules == {t["module"] for t in res.report["tensors"]}
    # the same adapter_config as PEFT's own, saved as its examples save an initial adapter:
    # OLoRA's with init_lora_weights=True (else loading would run OLoRA again on the residual),
    # MiCA's with "mica" (its variant freezes lora_B)
    mine = json.loads((res.adapter / "adapter_config.json").read_text())
    expected = peft_config_dict(theirs, True if method == "olora" else "mica")
    assert comparable(mine) == comparable(expected)
    assert {m.rsplit(".", 1)[-1] for m in expected["target_modules"]} == set(mine["target_modules"])
    assert res.report["method"] == method and res.report["init_lora_weights"] == method

    original = logits(AutoModelForCausalLM.from_pretrained(llama))
    if method == "mica":  # the adapter alone, onto the original model it names
        assert sorted(p.name for p in res.out.iterdir()) == ["pissa_init", "pissa_report.json"]
        assert mine["base_model_name_or_path"] == str(llama.resolve())
        model = said_about_keys(lambda: AutoPeftModelForCausalLM.from_pretrained(res.adapter, is_trainable=True))
    else:
        model = said_about_keys(lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out),
                                                                  res.out, subfolder="pissa_init", is_trainable=True))
    torch.testing.assert_close(logits(model), original, atol=1e-4, rtol=0)
    before = one_step(model)
    after = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    if method == "mica":  # only A trains; B stays at the minor singular vectors
        assert moved == {n for n in before if "lora_A" in n} and moved
    else:
        assert moved == set(before)


def test_milora_is_the_bottom_singular_triplets(llama, outputs):
    res = outputs["milora"]
    ours, residual = adapter_of(res), pissa_rs.Checkpoint(res.out)
    original = pissa_rs.Checkpoint(llama)
    scale = ALPHA / R
    for t in res.report["tensors"]:
        w = pissa_rs.as_torch(original.buffer(t["tensor"])).double()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        minor = U[:, -R:] @ torch.diag(S[-R:]) @ Vh[-R:]
        a = ours[f"base_model.model.{t['module']}.lora_A.weight"].double()
        b = ours[f"base_model.model.{t['module']}.lora_B.weight"].double()
        torch.testing.assert_close(scale * b @ a, minor, atol=1e-5, rtol=0)
        # PiSSA's split of the triplets: A = sqrt(S/s) Vh, B = U sqrt(S/s)
        torch.testing.assert_close(torch.linalg.norm(a, dim=1), torch.sqrt(S[-R:] / scale), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pissa_rs.as_torch(residual.buffer(t["tensor"])).double(), w - minor,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(t["singular_values"], dtype=torch.float64), S[-R:], atol=1e-5,
                                   rtol=1e-5)
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and res.report["init_lora_weights"] == "milora"
    # a plain LoRA onto the residual: the original outputs come back
    model = said_about_keys(lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), res.out,
                                                              subfolder="pissa_init", is_trainable=True))
    torch.testing.assert_close(logits(model), logits(AutoModelForCausalLM.from_pretrained(llama)), atol=1e-4, rtol=0)
    before = one_step(model)
    assert all(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in before.items())


def test_the_default_is_pissa_and_its_output_is_unchanged(llama, outputs, tmp_path):
    default = pissa_rs.decompose_checkpoint(llama, r=R, lora_alpha=ALPHA, out=tmp_path / "o", progress=False)
    assert default.report["method"] == "pissa" and default.report["init_lora_weights"] == "pissa_niter_4"
    assert adapter_of(default).keys() == adapter_of(outputs["pissa"]).keys()
    for k, v in adapter_of(default).items():
        assert torch.equal(v, adapter_of(outputs["pissa"])[k]), k
    assert outputs["pissa"].out.name == "tiny-pissa-r8" and outputs["olora"].out.name == "tiny-olora-r8"


def test_a_typo_in_the_method_is_named_with_the_list(llama, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown method 'milorra'; did you mean 'milora'\? \(the methods: "
                                         r"corda-ipm, corda-kpm, eva, extract, lora-ga, mica, milora, olora, pissa\)"):
        pissa_rs.decompose_checkpoint(llama, r=R, method="milorra", out=tmp_path / "o")
    assert main(["decompose", str(llama), "--rank", "4", "--method", "olra", "--out", str(tmp_path / "o")]) != 0
    assert "did you mean 'olora'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_options_that_do_not_apply_are_refused(llama, tmp_path):
    with pytest.raises(ValueError, match="mica.*no residual to quantize"):
        pissa_rs.decompose_checkpoint(llama, r=R, method="mica", quantize="nf4", out=tmp_path / "o")


@pytest.mark.parametrize("method", ["pissa", "milora", "mica", "olora"])
def test_verify_checks_the_recorded_method(llama, outputs, method, tmp_path):
    import shutil

    res = outputs[method]
    assert pissa_rs.verify(res.out, llama).ok
    # the same files claimed to be another method's init: verify says which check fails
    claimed = {"pissa": "milora", "milora": "pissa", "olora": "milora", "mica": "mica"}[method]
    # (MiCA: the adapter alone, its A moved off zero instead)
    copy = tmp_path / "copy"
    shutil.copytree(res.out, copy)
    report = json.loads((copy / "pissa_report.json").read_text())
    report["options"]["method"] = claimed
    (copy / "pissa_report.json").write_text(json.dumps(report))
    if method == "mica":
        weights = adapter_of(res)
        key = next(k for k in weights if "lora_A" in k)
        weights[key] = weights[key] + 1e-3
        safetensors.torch.save_file(weights, copy / "pissa_init" / "adapter_model.safetensors",
                                    metadata={"format": "pt"})
    checked = pissa_rs.verify(copy, llama)
    assert not checked.ok and f"not {dict(pissa='PiSSA', milora='MiLoRA', olora='OLoRA', mica='MiCA')[claimed]}" in \
        " ".join(checked.problems) or "lora_A is not zero" in " ".join(checked.problems), checked.problems


def test_several_ranks_nest_for_every_method(llama, tmp_path):
    for method in ("milora", "mica", "olora"):
        both = pissa_rs.decompose_checkpoint(llama, r=[4, 8], method=method, out=tmp_path / f"{method}-r{{r}}",
                                             progress=False)
        alone = pissa_rs.decompose_checkpoint(llama, r=4, method=method, out=tmp_path / f"{method}-alone",
                                              progress=False)
        for k, v in adapter_of(alone).items():
            assert torch.equal(v, adapter_of(both[0])[k]), (method, k)


# the MoE with experts and the FP8 source, every method: verify passes, the method's structure holds
def _moe(path):
    torch.manual_seed(0)
    save_spread(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**text(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16))), path)


def _fp8(path):
    torch.manual_seed(0)
    save_fp8_block(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text())), path)


@pytest.mark.parametrize("source", ["moe", "fp8"])
@pytest.mark.parametrize("method", ["pissa", "milora", "mica", "olora"])
def test_every_method_on_experts_and_an_fp8_source(tmp_path, source, method):
    src = tmp_path / "src"
    {"moe": _moe, "fp8": _fp8}[source](src)
    res = pissa_rs.decompose_checkpoint(src, r=4, method=method, out=tmp_path / "o", progress=False)
    assert res.report["method"] == method
    if source == "moe" and method == "mica":  # PEFT's ParamWrapper has no MiCA variant: experts named as left out
        assert not any(t.get("expert") is not None for t in res.report["tensors"])
        assert any("no mica variant" in e["why"] for e in res.report["left_out"])
        with pytest.raises(ValueError, match="no mica variant for parameters"):
            pissa_rs.decompose_checkpoint(src, r=4, method=method, target_parameters=["mlp.experts.down_proj"],
                                          out=tmp_path / "o2", progress=False)
    elif source == "moe":
        assert any(t.get("expert") is not None for t in res.report["tensors"])
    checked = pissa_rs.verify(res.out, src)
    assert checked.ok, checked.problems[:3]
    assert checked.checked_targets == len(res.report["tensors"])
    if method == "mica":
        model = AutoPeftModelForCausalLM.from_pretrained(res.adapter)
        base = AutoModelForCausalLM.from_pretrained(src)
        torch.testing.assert_close(logits(model), logits(base), atol=1e-4, rtol=0)
    else:
        base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.float32), res.out,
                                          subfolder="pissa_init")
        # an FP8 source: the residual is bfloat16, so within its rounding
        torch.testing.assert_close(logits(model), logits(base), atol=5e-2 if source == "fp8" else 1e-4, rtol=0)


@pytest.mark.parametrize("method", ["milora", "mica", "olora"])
def test_to_lora_and_merge_use_the_methods_algebra(llama, outputs, method, tmp_path):
    """Trained (a random move of what trains), then converted to a LoRA of the original model
    and merged: both give the trained model's outputs. MiLoRA and OLoRA: PiSSA's [B | -B0][A ; A0]
    at 2r; MiCA: the trained adapter already is a LoRA of the original, at r."""
    res = outputs[method]
    model = pissa_rs.load_for_training(res.out)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and p.requires_grad:  # MiCA's B is frozen: it stays
                p.add_(torch.randn_like(p) * 0.05)
    trained = logits(model)
    model.save_pretrained(tmp_path / "tuned")
    converted = pissa_rs.convert_to_lora(res.adapter, tmp_path / "tuned", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["base_model_name_or_path"] == str(llama.resolve())
    assert set(converted.ranks.values()) == {R if method == "mica" else 2 * R} and config["r"] == max(
        converted.ranks.values())
    lora = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")
    torch.testing.assert_close(logits(lora), trained, atol=1e-4, rtol=0)
    merged = pissa_rs.merge_adapter(res.out, tmp_path / "tuned", tmp_path / "merged")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged)), trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["milora", "olora"])
def test_qpissa_alternation_on_other_methods(llama, method, tmp_path):
    """QPiSSA's T iterations with the method's own factors: the residual stored quantized, verify's
    bound for it holds."""
    res = pissa_rs.decompose_checkpoint(llama, r=4, method=method, quantize="nf4", quant_iters=2,
                                        out=tmp_path / "o", progress=False)
    assert res.report["method"] == method and "error_reduction" in res.report["tensors"][0]
    checked = pissa_rs.verify(res.out, llama)
    assert checked.ok, checked.problems[:3]


def test_the_dry_run_shows_what_a_full_svd_costs(llama, capsys):
    from pissa_rs.methods import get_method

    milora, pissa = get_method("milora"), get_method("pissa")
    # Llama-3-8B's down_proj at r=128, niter=4: the full SVD is far dearer than randomized top-r
    full, randomized = milora.cost(4096, 14336, 128, 4), pissa.cost(4096, 14336, 128, 4)
    assert full[0] > 10 * randomized[0] and full[1] > randomized[1]
    assert main(["decompose", str(llama), "--rank", "4", "--method", "milora", "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "method: milora" in shown and "compute: full SVD per weight" in shown and "x randomized top-r's" in shown
    plan = pissa_rs.plan(llama, r=4, method="mica")
    assert plan.residual_bytes == 0 and "tiny-mica-r4" in str(plan.outs[0])


def test_mica_names_the_peft_it_needs(llama, tmp_path, monkeypatch):
    """MiCA is PEFT 0.21's: with an older PEFT (the declared floor is 0.20) it is refused by name."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.0" if name == "peft" else real(name))
    with pytest.raises(ImportError, match=r"method 'mica'.*needs peft >= 0.21 \(found 0.20.0\)"):
        pissa_rs.decompose_checkpoint(llama, r=4, method="mica", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# GPT-2: every linear layer a Conv1D, its weight stored in x out (W^T; PEFT's fan_in_fan_out)
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("g") / "tiny-gpt2", "gpt2", layers=2, decay=0.5)


@pytest.mark.parametrize("method", ["pissa", "milora", "mica", "olora"])
def test_every_method_on_conv1d_weights_stored_in_x_out(gpt2, method, tmp_path):
    """Each method decomposes the layer's out x in W, not the in x out tensor as stored, and
    stores the residual back in x out: PiSSA (exact) and MiCA are PEFT's own init on the same
    GPT-2 (PEFT transposes for fan_in_fan_out); OLoRA is W's QR computed here (PEFT takes the QR
    of the stored W^T, whose factors do not fit the layer: docs/design.md), MiLoRA W's bottom
    triplets. Every Conv1D is non-square but attn.c_proj, so factors of W^T would not even fit.
    PEFT loads each output with no missing or unexpected key and gives the original logits."""
    res = pissa_rs.decompose_checkpoint(gpt2, r=R, lora_alpha=ALPHA, method=method, niter=0, out=tmp_path / "o",
                                        progress=False)
    tensors = res.report["tensors"]
    assert len(tensors) == 8 and all(t["fan_in_fan_out"] for t in tensors)
    ours, original = adapter_of(res), pissa_rs.Checkpoint(gpt2)
    residual = None if method == "mica" else pissa_rs.Checkpoint(res.out)
    scale = ALPHA / R
    if method in ("pissa", "mica"):
        theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2), LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=method, fan_in_fan_out=True,
            lora_dropout=0.0, task_type="CAUSAL_LM"))
        peft = {name.removeprefix("base_model.model."): module for name, module in theirs.named_modules()
                if hasattr(module, "lora_A") and "default" in module.lora_A}
        assert sorted(peft) == sorted(t["module"] for t in tensors)
    for t in tensors:
        key = t["module"]
        stored = pissa_rs.as_torch(original.buffer(t["tensor"]))
        w = stored.T  # out x in: what the layer computes with
        a, b = ours[f"base_model.model.{key}.lora_A.weight"], ours[f"base_model.model.{key}.lora_B.weight"]
        assert a.shape == (R, w.shape[1]) and b.shape == (w.shape[0], R), key
        if method == "olora":
            q, r_ = torch.linalg.qr(w.float())
            torch.testing.assert_close(b, q[:, :R], atol=1e-5, rtol=1e-5, msg=key)
            torch.testing.assert_close(a, r_[:R], atol=1e-5, rtol=1e-5, msg=key)
            expected = w - scale * q[:, :R] @ r_[:R]
        elif method == "milora":
            U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
            minor = U[:, -R:] @ torch.diag(S[-R:]) @ Vh[-R:]
            torch.testing.assert_close(scale * b.double() @ a.double(), minor, atol=1e-5, rtol=0, msg=key)
            expected = (w.double() - minor).float()
        else:
            ta, tb = peft[key].lora_A["default"].weight.detach(), peft[key].lora_B["default"].weight.detach()
            assert (ta.shape, tb.shape) == (a.shape, b.shape), key
            if method == "mica":
                assert torch.equal(a, torch.zeros_like(ta)), key
                torch.testing.assert_close(sign_canonical(b), sign_canonical(tb), atol=1e-5, rtol=0, msg=key)
                continue
            torch.testing.assert_close(scale * b @ a, scale * tb @ ta, atol=1e-5, rtol=0, msg=key)
            expected = peft[key].base_layer.weight.detach().T  # PEFT's residual, stored in x out
        w_res = pissa_rs.as_torch(residual.buffer(t["tensor"]))
        assert w_res.shape == stored.shape, key
        torch.testing.assert_close(w_res, expected.T, atol=1e-5, rtol=1e-5, msg=key)
    original_logits = logits(AutoModelForCausalLM.from_pretrained(gpt2))
    if method == "mica":
        model = said_about_keys(lambda: AutoPeftModelForCausalLM.from_pretrained(res.adapter))
    else:
        model = said_about_keys(lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out),
                                                                  res.out, subfolder="pissa_init"))
    assert sum(1 for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A) == 8
    torch.testing.assert_close(logits(model), original_logits, atol=1e-4, rtol=0)
    assert pissa_rs.verify(res.out, gpt2).ok
