"""Ranks from the spectrum (--rank-budget): the allocation itself (within budget, near the
optimum, nothing affordable left unspent), and end to end: PEFT's own init with the same
rank_pattern gives the same factors, PEFT loads and trains the output, experts share a rank."""

from __future__ import annotations

import itertools
import json

import pytest
import safetensors.torch
import torch
import transformers
from helpers import save_spread, text
from hypothesis import given, settings
from hypothesis import strategies as st
from make_tiny_model import save_tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import pissa_rs
from pissa_rs.rank_budget import Group, allocate


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", layers=2, decay=0.5)


def decreasing(draw_gains):
    return sorted(draw_gains, reverse=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(3, 9), st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
                          st.integers(2, 4)), min_size=2, max_size=3), st.integers(1, 2))
def test_the_allocation_is_within_budget_and_near_the_optimum(specs, floor):
    groups = {f"g{k}": Group(f"g{k}", cost, 6, uniform, decreasing(gains))
              for k, (cost, gains, uniform) in enumerate(specs)}
    ranks, budget, used = allocate(groups, floor)
    assert budget == sum(g.uniform * g.cost for g in groups.values())
    assert used == sum(ranks[k] * g.cost for k, g in groups.items()) <= budget
    assert all(floor <= ranks[k] <= g.max_rank for k, g in groups.items())
    # nothing affordable is left: every group not at its cap would overrun the budget
    assert all(ranks[k] == g.max_rank or used + g.cost > budget for k, g in groups.items())
    energy = lambda rs: sum(sum(groups[k].gains[:r]) for k, r in rs.items())  # noqa: E731
    best = max(energy(dict(zip(groups, combo))) for combo in itertools.product(
        *[range(floor, g.max_rank + 1) for g in groups.values()])
        if sum(r * g.cost for r, g in zip(combo, groups.values())) <= budget)
    # greedy on gain per parameter: at most one step's gain from the best (a knapsack's last item)
    assert energy(ranks) >= best - max(max(g.gains) for g in groups.values()) - 1e-9
    assert energy(ranks) >= energy({k: g.uniform for k, g in groups.items()}) - max(
        max(g.gains) for g in groups.values()) - 1e-9


def test_a_budget_run_equals_peft_own_init_with_that_rank_pattern(llama, tmp_path):
    res = pissa_rs.decompose_checkpoint(llama, r=8, niter=0, rank_budget=True, out=tmp_path / "o", progress=False)
    budget = res.report["rank_budget"]
    assert budget["used_parameters"] <= budget["budget_parameters"]
    assert budget["energy_kept_sum_chosen"] > budget["energy_kept_sum_uniform"]
    assert len(set(budget["ranks"].values())) > 1  # the spectra differ: so do the ranks
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"]
    assert {t["module"]: t["r"] for t in res.report["tensors"]} == budget["ranks"]
    # PEFT's exact PiSSA with the same rank_pattern: the same products and residual
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), LoraConfig(
        r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa", lora_dropout=0.0,
        rank_pattern=config["rank_pattern"]))
    ours = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    residual = pissa_rs.Checkpoint(res.out)
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            a, b = ours[f"base_model.model.{key}.lora_A.weight"], ours[f"base_model.model.{key}.lora_B.weight"]
            assert a.shape[0] == module.r["default"] == budget["ranks"][key]
            s = module.scaling["default"]
            torch.testing.assert_close(s * b @ a, s * module.lora_B["default"].weight @ module.lora_A["default"].weight,
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(pissa_rs.as_torch(residual.buffer(f"{key}.weight")),
                                       module.base_layer.weight.detach(), atol=1e-5, rtol=0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), res.out, subfolder="pissa_init",
                                      is_trainable=True)
    tokens = torch.randint(0, 200, (2, 12))
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert pissa_rs.verify(res.out, llama).ok
    pytest.importorskip("matplotlib")
    from pissa_rs.plots import plot_report

    assert any(p.name == "spectra.png" for p in plot_report(res.out))


def test_experts_keep_the_uniform_rank_outside_the_budget(tmp_path):
    torch.manual_seed(0)
    save_spread(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**text(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16))), tmp_path / "src")
    res = pissa_rs.decompose_checkpoint(tmp_path / "src", r=4, rank_budget=True, out=tmp_path / "o", progress=False)
    budget = res.report["rank_budget"]
    uniform = pissa_rs.decompose_checkpoint(tmp_path / "src", r=4, out=tmp_path / "u", progress=False)
    experts = {t["tensor"]: t["r"] for t in res.report["tensors"] if t.get("expert") is not None}
    assert experts and experts == {t["tensor"]: t["r"] for t in uniform.report["tensors"] if t.get("expert") is not None}
    assert "model.layers.0.mlp.experts.gate_up_proj" in budget["fixed_at_uniform_rank"]
    assert not any("experts" in key for key in budget["ranks"]) and len(set(budget["ranks"].values())) > 1
    assert pissa_rs.verify(res.out, tmp_path / "src").ok
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res.out), res.out, subfolder="pissa_init")
    # (PEFT warns that these keys matched nothing, from its pass over the ParamWrapper layers; they did:)
    for key, rank in budget["ranks"].items():
        assert loaded.get_submodule(f"base_model.model.{key}").r["default"] == rank, key


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=[4, 8]), "ranks of one output"),
    (dict(r=8, rank_pattern={"q_proj": 4}), "one or the other"),
    (dict(r=8, rank_floor=9), "rank_floor <= r <= rank_cap"),
    (dict(r=8, rank_cap=4), "rank_floor <= r <= rank_cap"),
])
def test_bad_budget_options(llama, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pissa_rs.decompose_checkpoint(llama, rank_budget=True, out=tmp_path / "o-{r}", **kwargs)
    with pytest.raises(ValueError, match="apply with rank_budget only"):
        pissa_rs.decompose_checkpoint(llama, r=8, rank_cap=12, out=tmp_path / "o")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6), min_size=2, max_size=4),
       st.integers(1, 2), st.integers(2, 4))
def test_with_equal_costs_the_allocation_is_the_optimum(gains, floor, uniform):
    """Every step costs the same: then greedy on the largest next gain is exactly optimal
    (the best set is the largest gains beyond the floors, each group's taken in order)."""
    groups = {f"g{k}": Group(f"g{k}", 5, 6, uniform, decreasing(g)) for k, g in enumerate(gains)}
    ranks, budget, used = allocate(groups, floor)
    chosen = sum(sum(groups[k].gains[:r]) for k, r in ranks.items())
    beyond = sorted((v for g in groups.values() for v in g.gains[floor:]), reverse=True)
    steps = budget // 5 - floor * len(groups)
    best = sum(sum(g.gains[:floor]) for g in groups.values()) + sum(beyond[:steps])
    assert chosen == pytest.approx(best, abs=1e-9)


def _scaled_copy(src, dst, tensor: str, factor: float):
    """A copy of checkpoint `src` with one tensor multiplied by `factor` in its shard."""
    import shutil

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][tensor]
    tensors = safetensors.torch.load_file(shard)
    tensors[tensor] = tensors[tensor] * factor
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m1") / "tiny", "llama", layers=1, decay=0.5)


def _budget(path, out):
    return pissa_rs.decompose_checkpoint(path, r=8, niter=0, rank_budget=True, out=out,
                                         progress=False).report["rank_budget"]


def test_the_budget_compares_energy_fractions_not_absolute_energy(one_layer, tmp_path):
    """The greedy step ranks each module's s_k^2 / ||W||_F^2 (the energy fraction the docs
    promise): a module's weight scaled by 10 has the same fractions, so the same ranks. (On
    absolute energy the scaled module's gains grow 100x and it takes the budget.)"""
    scaled_module = "model.layers.0.self_attn.q_proj"
    plain = _budget(one_layer, tmp_path / "plain")
    assert plain["ranks"][scaled_module] < plain["cap"]  # room to grow: absolute energy would grow it
    scaled = _budget(_scaled_copy(one_layer, tmp_path / "scaled", f"{scaled_module}.weight", 10.0),
                     tmp_path / "scaled-out")
    assert scaled["ranks"] == plain["ranks"]
    for key, spectrum in plain["spectra"].items():
        assert scaled["spectra"][key] == pytest.approx(spectrum, rel=1e-4, abs=1e-9), key


def test_the_reported_spectra_are_squared_singular_values_over_the_squared_norm(one_layer, tmp_path):
    """niter=0 (exact SVD): each module's reported spectrum is svdvals(W)^2 / ||W||_F^2 up to
    the cap, computed here in float64 from the checkpoint; it sums to at most 1."""
    budget = _budget(one_layer, tmp_path / "o")
    original = pissa_rs.Checkpoint(one_layer)
    assert len(budget["spectra"]) == 7
    for key, spectrum in budget["spectra"].items():
        w = pissa_rs.as_torch(original.buffer(f"{key}.weight")).double()
        expected = (torch.linalg.svdvals(w).square() / w.square().sum())[:min(budget["cap"], *w.shape)]
        assert spectrum == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-9), key
        assert sum(spectrum) <= 1.0
