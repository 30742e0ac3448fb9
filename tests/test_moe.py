"""Mixtures of experts as transformers saves them: each expert gets its own PiSSA split,
in the layout PEFT's ParamWrapper builds (which PEFT's own PiSSA init cannot fill: it
crashes on fused experts), and its residual goes back to the checkpoint's own tensors.

For each family: our adapter holds exactly the keys and shapes of PEFT's own LoRA model
for the same choice; the output loads with no missing or unexpected key; the original
fp32 logits come back; every expert's delta is the top-r principal part of that expert's
original matrix and the residual holds the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from helpers import digest, load_output_without_key_warnings, same_output, save_spread, text
from safetensors.torch import load_file

import pissa_rs

R = 4
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


# family -> (model class, config, target_parameters named on top of "all-linear")
FAMILIES = {
    # per-expert w1/w3/w2 on disk, block_sparse_moe renamed mlp at load
    "mixtral": (transformers.MixtralForCausalLM,
                lambda: transformers.MixtralConfig(**text(num_local_experts=4, num_experts_per_tok=2)), None),
    "qwen3-moe": (transformers.Qwen3MoeForCausalLM,
                  lambda: transformers.Qwen3MoeConfig(**text(num_experts=4, num_experts_per_tok=2,
                                                             moe_intermediate_size=48, head_dim=16)), None),
    # MLA attention, a dense first layer, routed and shared experts
    "deepseek-v3": (transformers.DeepseekV3ForCausalLM,
                    lambda: transformers.DeepseekV3Config(**text(
                        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1)), None),
    # PEFT < 0.22's all-linear leaves Qwen2-MoE's experts alone: named here
    "qwen2-moe": (transformers.Qwen2MoeForCausalLM,
                  lambda: transformers.Qwen2MoeConfig(**text(num_experts=4, num_experts_per_tok=2,
                                                             moe_intermediate_size=48,
                                                             shared_expert_intermediate_size=96)), EXPERTS),
    # fused on disk already, stored in x out, with biases
    "gpt-oss": (transformers.GptOssForCausalLM,
                lambda: transformers.GptOssConfig(**text(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                         rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 10000.0})), EXPERTS),
}


def save(family: str, path, **kwargs):
    cls, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    save_spread(cls(config()), path, **kwargs)
    return cls


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def decomposed(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    cls = save(family, root / "src", max_shard_size="100KB")
    res = pissa_rs.decompose_checkpoint(root / "src", r=R, niter=0, target_parameters=FAMILIES[family][2],
                                        out=root / "o", progress=False)
    return family, cls, root / "src", res


def lora_layers(model) -> dict[str, tuple]:
    """PEFT's LoRA layers (Linear and ParamWrapper) by name in the base model -> (r, experts)."""
    from peft.tuners.lora.layer import LoraLayer

    return {name.removeprefix("base_model.model."): (m.r["default"], getattr(m, "num_experts", 1))
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.floor
def test_peft_loads_exactly_its_own_layers_and_the_logits_come_back(decomposed, caplog):
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    family, cls, src, res = decomposed
    adapter = load_file(res.adapter / "adapter_model.safetensors")
    experts = [t for t in res.report["tensors"] if t.get("expert") is not None]
    assert experts and all(t["num_experts"] == 4 for t in experts)

    # PEFT's own model for the same choice: the same keys, with the same shapes.
    original = cls.from_pretrained(src, dtype=torch.float32).eval()
    expected = logits(original, IDS)
    own = get_peft_model(original, LoraConfig(r=R, lora_alpha=R, target_modules="all-linear",
                                              target_parameters=FAMILIES[family][2]))
    own_keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(own).items()}
    ours = {k: tuple(v.shape) for k, v in adapter.items()}
    assert set(ours) == set(own_keys)
    ranks = {t["module"]: t["r"] for t in res.report["tensors"]}
    for key, (rows, cols) in own_keys.items():  # a weight smaller than r (a 1 x 64 gate) keeps its own rank
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if module in res.report["rank_limited"]:
            rows, cols = (ranks[module], cols) if ".lora_A." in key else (rows, ranks[module])
        assert ours[key] == (rows, cols), key
    own_layers = lora_layers(own)
    assert any(n > 1 for _, n in own_layers.values())  # experts among them

    loaded = load_output_without_key_warnings(cls, res.out, caplog)
    assert lora_layers(loaded).keys() == own_layers.keys()
    got = logits(loaded, IDS)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_every_expert_holds_its_own_top_r_and_the_residual_the_rest(decomposed):
    family, cls, src, res = decomposed
    original = cls.from_pretrained(src, dtype=torch.float32)
    residual = cls.from_pretrained(res.out, dtype=torch.float32)
    adapter = load_file(res.adapter / "adapter_model.safetensors")
    for t in (t for t in res.report["tensors"] if t.get("expert") is not None):
        e, n, r = t["expert"], t["num_experts"], t["r"]
        w = original.get_parameter(t["parameter"])[e].detach().double()
        w_res = residual.get_parameter(t["parameter"])[e].detach().double()
        if t["fan_in_fan_out"]:  # GPT-OSS keeps experts in x out: the matrix multiplied is its transpose
            w, w_res = w.T, w_res.T
        a = adapter[f"base_model.model.{t['module']}.lora_A.weight"].double().view(n, r, -1)[e]
        b = adapter[f"base_model.model.{t['module']}.lora_B.weight"].double().view(-1, r, n)[:, :, e]
        delta = t["scale"] * b @ a
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = (u[:, :r] * s[:r]) @ vh[:r]
        assert torch.allclose(delta, principal, atol=1e-5), (t["tensor"], (delta - principal).abs().max())
        assert torch.allclose(w_res + delta, w, atol=1e-6), t["tensor"]
    assert pissa_rs.verify(res.out, against=src).ok


def test_residual_keeps_the_checkpoints_own_layout(decomposed):
    """Per-expert tensors stay per-expert (fused ones fused), same names, dtypes, shards;
    tensors that hold no target (norms, embeddings, GPT-OSS's biases) are byte-identical."""
    family, cls, src, res = decomposed
    src_ck, out_ck = pissa_rs.Checkpoint(src), pissa_rs.Checkpoint(res.out)
    assert [(t.name, t.dtype, t.shape, os.path.basename(t.file)) for t in src_ck.tensors] == \
        [(t.name, t.dtype, t.shape, os.path.basename(t.file)) for t in out_ck.tensors]
    touched = {p[0] for t in res.report["tensors"] for p in (t.get("pieces") or [[t["tensor"]]])}
    for t in src_ck.tensors:
        if t.name not in touched:
            assert bytes(src_ck.buffer(t.name)) == bytes(out_ck.buffer(t.name)), t.name


def test_merge_gives_back_the_original_and_conversion_to_lora_is_exact(decomposed, tmp_path):
    """After a (simulated) fine-tuning step: merge = residual + tuned adapter, and the
    converted LoRA on the original model gives the same logits. PEFT's own conversion
    concatenates whole expert matrices (mixing experts): it is not used as the reference."""
    from peft import PeftModel

    family, cls, src, res = decomposed
    merged = pissa_rs.merge_adapter(res.out, res.adapter, tmp_path / "merged")
    a, b = pissa_rs.Checkpoint(src), pissa_rs.Checkpoint(merged)
    for t in a.tensors:
        diff = (pissa_rs.as_torch(a.buffer(t.name)) - pissa_rs.as_torch(b.buffer(t.name))).abs().max()
        assert diff <= 1e-6, t.name

    tuned = PeftModel.from_pretrained(cls.from_pretrained(res.out, dtype=torch.float32), res.adapter,
                                      is_trainable=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    tuned.save_pretrained(tmp_path / "tuned")
    expected = logits(tuned.eval(), IDS)
    for compact in (False, True):
        out = tmp_path / f"lora-{compact}"
        pissa_rs.convert_to_lora(res.adapter, tmp_path / "tuned", out, compact=compact)
        lora = PeftModel.from_pretrained(cls.from_pretrained(src, dtype=torch.float32), out).eval()
        got = logits(lora, IDS)
        assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max().item() + 1e-6), compact


def test_mixtral_routers_can_be_kept_frozen(tmp_path):
    from peft import PeftModel

    save("mixtral", tmp_path / "src")
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, niter=0, exclude_parameters=["mlp.gate.weight"],
                                        out=tmp_path / "o", progress=False)
    adapter = load_file(res.adapter / "adapter_model.safetensors")
    assert not [k for k in adapter if ".mlp.gate." in k] and [k for k in adapter if ".mlp.experts." in k]
    left = {item["name"]: item["why"] for item in res.report["left_out"]}
    assert left["model.layers.0.mlp.gate.weight"] == "excluded by exclude_parameters"
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert "gate.weight" not in config["target_parameters"]
    loaded = PeftModel.from_pretrained(transformers.MixtralForCausalLM.from_pretrained(res.out), res.adapter)
    assert not [n for n in lora_layers(loaded) if n.endswith("mlp.gate")]
    assert pissa_rs.verify(res.out, against=tmp_path / "src").ok


def test_experts_all_linear_does_not_pick_are_named_as_left_out(tmp_path):
    """On GPT-OSS (experts fused on disk), PEFT's own all-linear adapts no expert (PEFT 0.21 and
    0.22 alike: 0.22 adds Qwen2-MoE's family to the ones whose experts it adapts); neither do
    we, and say how to."""
    from peft import LoraConfig, get_peft_model

    cls = save("gpt-oss", tmp_path / "src")
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, out=tmp_path / "o", progress=False)
    assert not [t for t in res.report["tensors"] if t.get("parameter")]
    left = {item["name"]: item["why"] for item in res.report["left_out"]}
    assert "name it in target_parameters" in left["model.layers.1.mlp.experts.gate_up_proj"]
    own = get_peft_model(cls.from_pretrained(tmp_path / "src"), LoraConfig(r=R, target_modules="all-linear"))
    assert set(lora_layers(own)) == {t["module"] for t in res.report["tensors"]}


def test_an_expert_missing_from_the_checkpoint_is_named(tmp_path):
    """A Mixtral checkpoint with expert 3's w3 removed: transformers could not build
    gate_up_proj. Named explicitly, that is an error naming the tensor; under all-linear
    the parameter is left out with the reason."""
    from safetensors.torch import save_file

    save("mixtral", tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pissa_rs.TargetError, match=r"experts\.3\.w3\.weight.*for expert 3"):
        pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, target_parameters=["gate_up_proj"],
                                      out=tmp_path / "o1", progress=False)
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, out=tmp_path / "o2", progress=False)
    left = {item["name"]: item["why"] for item in res.report["left_out"]}
    assert "for expert 3" in left["model.layers.1.mlp.experts.gate_up_proj"]


def test_qpissa_leaves_experts_unquantized_as_transformers_does(tmp_path):
    """transformers' bitsandbytes loading quantizes nn.Linear layers, not 3-D experts or
    routers: those get a plain PiSSA split (no QPiSSA record), the attention a QPiSSA one."""
    save("mixtral", tmp_path / "src")
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, quantize="nf4", out=tmp_path / "o",
                                        progress=False)
    for t in res.report["tensors"]:
        assert ("error_reduction" in t) == (t.get("parameter") is None), t["tensor"]
    rows = pissa_rs.measure_quantization_error(res.out, tmp_path / "src")["tensors"]
    assert {r["tensor"] for r in rows} == {t["tensor"] for t in res.report["tensors"] if not t.get("parameter")}


def test_several_ranks_and_devices_give_the_bytes_of_one(tmp_path):
    save("gpt-oss", tmp_path / "src", max_shard_size="100KB")
    one = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, target_parameters=EXPERTS, out=tmp_path / "one",
                                        progress=False)
    two = pissa_rs.decompose_checkpoint(tmp_path / "src", r=R, target_parameters=EXPERTS, out=tmp_path / "two",
                                        devices=["cpu", "cpu"], progress=False)
    same_output(two.out, one.out)
    both = pissa_rs.decompose_checkpoint(tmp_path / "src", r=[2, R], target_parameters=EXPERTS,
                                         out=tmp_path / "r{r}", progress=False)
    assert [b.out.name for b in both] == ["r2", f"r{R}"]
    for b in both:
        assert pissa_rs.verify(b.out, against=tmp_path / "src").ok


@pytest.mark.parametrize("family,point", [("gpt-oss", "target:10"), ("mixtral", "target:13")])
def test_sigkill_in_the_middle_of_a_layers_experts_resumes_byte_identically(tmp_path, family, point):
    """Killed while a layer's experts are half done (their adapter and, for GPT-OSS, their
    fused residual tensor are assembled in memory): the rerun finishes the same bytes."""
    save(family, tmp_path / "src", max_shard_size="60KB")
    extra = ["--target-parameters", ",".join(EXPERTS)] if FAMILIES[family][2] else []
    cmd = [sys.executable, "-m", "pissa_rs.cli", "decompose", str(tmp_path / "src"), "-r", str(R), "--no-progress",
           *extra]
    ref = subprocess.run([*cmd, "-o", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    before = digest(tmp_path / "src")
    killed = subprocess.run([*cmd, "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PISSA_RS_SIGNAL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "o" / "pissa_report.json").exists()
    resumed = subprocess.run([*cmd, "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed the interrupted run" in resumed.stdout
    same_output(tmp_path / "o", tmp_path / "ref")
    assert digest(tmp_path / "src") == before
    shutil.rmtree(tmp_path / "ref")


def decompose_one(family: str, tmp_path):
    cls = save(family, tmp_path / "src")
    return cls, tmp_path / "src", pissa_rs.decompose_checkpoint(
        tmp_path / "src", r=R, niter=0, target_parameters=FAMILIES[family][2], out=tmp_path / "o", progress=False)


def test_verify_names_a_corrupted_expert(tmp_path):
    """GPT-OSS: expert 2 is a slice of a fused tensor; a flipped byte there is named by expert."""
    _, src, res = decompose_one("gpt-oss", tmp_path)
    out = res.out
    expert = next(t for t in res.report["tensors"] if t.get("expert") == 2)
    tensor, start, _ = expert["pieces"][0]
    info = pissa_rs.Checkpoint(out).info(tensor)
    with open(info.file, "r+b") as f:
        f.seek(info.start + start + 8)
        f.write(b"\x7f\x7f\x7f\x7f")
    report = pissa_rs.verify(out, against=src)
    assert not report.ok and any(expert["tensor"] in p for p in report.problems), report.problems


def test_a_training_step_runs_with_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    _, _, res = decompose_one("mixtral", tmp_path)
    model = pissa_rs.load_for_training(res.out, compute_dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in before)
    ids = torch.randint(0, 90, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".experts." in n for n in changed) and all(".lora_" in n for n in changed)


def test_a_router_smaller_than_r_gets_its_own_rank(tmp_path):
    """Mixtral's router is experts x hidden (4 x 64 here): at r=8 it is decomposed at rank 4,
    recorded in rank_pattern under the parameter's name, which is what PEFT matches for it."""
    from peft import PeftModel

    cls = save("mixtral", tmp_path / "src")
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=8, niter=0, out=tmp_path / "o", progress=False)
    assert res.report["rank_limited"] == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    loaded = PeftModel.from_pretrained(cls.from_pretrained(res.out), res.adapter)
    assert loaded.base_model.model.model.layers[0].mlp.gate.lora_A["default"].weight.shape == (4, 64)
    assert pissa_rs.verify(res.out, against=tmp_path / "src").ok
