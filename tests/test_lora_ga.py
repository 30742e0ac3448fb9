"""LoRA-GA through the layer-by-layer backward pass: the gradients are autograd's over the
whole model, and the output is PEFT's own preprocess_loraga + get_peft_model(init_lora_weights=
"lora_ga") fed the same batches, for every direction and scale; bad input is refused before
anything is written; a run killed in the backward pass resumes byte-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers
from helpers import calibration_texts, digest, save_tokenizer
from peft import LoraConfig, PeftModel

import pissa_rs
from pissa_rs.calibration.samples import CalibrationError, tokenized
from pissa_rs.engine.sequential import padded_batch
from pissa_rs.factors import tensor_seed
from pissa_rs.methods.lora_ga import LoraGA

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
R = 8
# Few, short samples of several lengths: every gradient then has rank <= its predicted tokens
# (31 here) <= q = min(4r, min(shape)) = 32, so PEFT's randomized SVD and ours are both exact
# (up to rounding) from any start: the triplets agree whatever each drew.
TEXTS = [t[: 12 + 7 * k] for k, t in enumerate(calibration_texts(8))]
SAMPLES, LENGTH, BATCH = 5, 9, 2


def save_model(path, family="llama", layers=3, seed=0, tied=False):
    tokenizer = save_tokenizer(path, calibration_texts())
    config_cls, cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=tied))
    with torch.no_grad():  # a leading singular value well apart, so that weight_svd's rank-r sketch of
        for module in model.modules():  # sigma_1 (PEFT's draw, and ours) converges within rounding
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                u, v = torch.randn(module.weight.shape[0]), torch.randn(module.weight.shape[1])
                module.weight += 1.0 * torch.outer(u / u.norm(), v / v.norm())
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ga")
    return {family: save_model(root / family, family) for family in FAMILIES}


def batches(path, samples=SAMPLES, length=LENGTH, batch=BATCH, texts=TEXTS):
    """The batches our pass makes (right-padded, the mask), which PEFT's train_step is fed."""
    found = tokenized(texts, path, samples=samples, length=length, max_positions=128)
    return [padded_batch(found, b)[:2] for b in found.batches(batch)]


def ours(path, out, **options):
    options = {"calibration": TEXTS, "calibration_samples": SAMPLES, "calibration_length": LENGTH,
               "calibration_batch": BATCH, **options}
    return pissa_rs.decompose_checkpoint(path, r=R, method="lora-ga", out=out, progress=False, **options)


def peft_lora_ga(path, direction="ArB2r", scale="stable", alpha=2 * R):
    """PEFT's own LoRA-GA on the whole model in float32, its train_step running our batches."""
    from peft import get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=R, lora_alpha=alpha, target_modules=LINEAR, init_lora_weights="lora_ga", lora_dropout=0.0,
                        lora_ga_config=LoraGAConfig(direction=direction, scale=scale), task_type="CAUSAL_LM")

    def train_step():
        for ids, mask in batches(path):
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()

    preprocess_loraga(model, config, train_step)
    return get_peft_model(model, config)


def tensors_of(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in safetensors.torch.load_file(f).items()}


def assert_same_up_to_sign(mine, theirs, what, dim, rtol):
    """Equal row by row (dim 0) or column by column (dim 1), each up to its sign: a triplet's
    sign is its SVD's draw."""
    assert mine.shape == theirs.shape, what
    m, t = (mine, theirs) if dim == 0 else (mine.T, theirs.T)
    for k, (a, b) in enumerate(zip(m.double(), t.double())):
        sign = 1.0 if torch.dot(a, b) >= 0 else -1.0
        gap = (sign * a - b).abs().max().item()
        assert gap <= rtol * max(b.abs().max().item(), 1e-30), f"{what}[{k}]: off by {gap:.3g}"


@pytest.mark.parametrize("family, direction, scale", [
    ("llama", "ArB2r", "stable"), ("llama", "ArBr", "unit"), ("llama", "A2rBr", "gd_scale"),
    ("qwen3", "ArB2r", "weight_svd"), ("qwen3", "A2rBr", "stable")])
def test_the_output_is_peft_own_lora_ga(models, tmp_path, family, direction, scale):
    res = ours(models[family], tmp_path / "o", lora_ga_direction=direction, lora_ga_scale=scale, lora_alpha=2 * R)
    theirs = peft_lora_ga(models[family], direction, scale)  # alpha 2r: s = 2, which gd_scale divides by
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    for key, value in adapter.items():
        peft_value = state[key.replace(".weight", ".default.weight")]
        if scale == "weight_svd" and "lora_B" in key:
            # B times sigma_1(W) from a rank-r sketch (niter 4) of W, each from its own draw (its
            # bits depend on the CPU's kernels): with sigma_1 apart, a sketch is within 1e-5 of
            # sigma_1 from any of 20 starts tried, so two agree within 1e-4; the directions within rounding
            ratio = (value.norm() / peft_value.norm()).item()
            assert abs(ratio - 1) < 1e-4, (key, ratio)
            value = value / ratio
        assert_same_up_to_sign(value, peft_value, key, 0 if "lora_A" in key else 1, 1e-4)
    residual, original = tensors_of(res.out), tensors_of(models[family])
    for key, w in original.items():  # W_res + s*B@A is W, from the factors written
        if key.removesuffix(".weight").rsplit(".", 1)[-1] in LINEAR:
            stem = "base_model.model." + key.removesuffix(".weight")
            delta = 2.0 * adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]
            assert torch.allclose(residual[key] + delta, w, rtol=0, atol=1e-6), key
            assert delta.abs().max() > 1e-4, key  # the base moved
        else:
            assert torch.equal(residual[key], w), key
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    expected = json.loads(json.dumps(theirs.peft_config["default"].to_dict(), default=sorted))
    expected.update(init_lora_weights=True, lora_ga_config=None)  # final factors: PEFT must not init again
    where = ("base_model_name_or_path", "revision", "target_modules", "peft_version")
    assert {k: v for k, v in config.items() if k not in where} == {k: v for k, v in expected.items() if k not in where}
    assert res.report["method"] == "lora-ga" and res.report["init_lora_weights"] == "lora_ga"
    record = res.report["calibration"]
    assert record["samples"] == SAMPLES and len(record["batch_losses"]) == 3 and record["loss"] > 0
    assert len(record["gradient_norms"]) == 3 * len(LINEAR)
    assert pissa_rs.verify(res.out, models[family]).ok  # and verify passes it
    # PEFT opens it by its folder alone (the residual named in its config), no missing or unexpected key
    from peft import AutoPeftModelForCausalLM

    loaded = AutoPeftModelForCausalLM.from_pretrained(res.adapter)
    assert loaded.peft_config["default"].init_lora_weights is True


def autograd_gradients(path, texts, samples, length, batch):
    """Each target weight's gradient as PEFT's preprocess_loraga leaves it: autograd over the
    whole model, .grad summed over the batches' backward calls, divided by their count."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    targets = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEAR}
    for module in targets.values():
        module.weight.requires_grad_(True)
    found = batches(path, samples, length, batch, texts)
    for ids, mask in found:
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    return {f"{n}.weight": m.weight.grad / len(found) for n, m in targets.items()}


@pytest.mark.parametrize("tied, one_sample_a_time", [(False, False), (True, True)])
def test_the_gradients_are_autograds_over_the_whole_model(models, tmp_path, monkeypatch, tied, one_sample_a_time):
    """Every target's mean gradient from the layer-by-layer pass against autograd's over the
    whole model on the same padded batches (an uneven last one): a layer dropped, a batch
    counted twice or a padded token counted would each be far off. `tied`: the head is the
    embeddings' matrix, stored once (transformers saves no lm_head.weight);
    `one_sample_a_time`: the loss at the head taken a sample at a time (as a large vocabulary's
    logits are), each divided by the whole batch's token count."""
    from pissa_rs.calibration import head

    if one_sample_a_time:
        monkeypatch.setattr(head, "LOGITS_BYTES", 1)
    path = save_model(tmp_path / "tied", tied=True) if tied else models["llama"]
    if tied:
        assert not any("lm_head" in k for k in tensors_of(path))
    texts = [t[: 10 + 6 * k] for k, t in enumerate(calibration_texts(8))]
    seen = keep_gradients(monkeypatch)
    res = ours(path, tmp_path / "o", calibration=texts, calibration_samples=7, calibration_length=24,
               calibration_batch=3)
    expected = autograd_gradients(path, texts, 7, 24, 3)
    lengths = res.report["calibration"]["lengths"]
    assert len(set(lengths)) > 2 and max(lengths) == 24  # padded batches
    norms = res.report["calibration"]["gradient_norms"]
    assert sorted(norms) == sorted(expected)
    by_tensor = {key: seen[tensor_seed(0, key)] for key in expected}
    for key, gradient in by_tensor.items():
        gap = (gradient - expected[key]).abs().max().item()
        assert gap <= 1e-5 * expected[key].abs().max().item(), (key, gap)
        assert norms[key] == pytest.approx(expected[key].norm().item(), rel=1e-5)


CLI = [sys.executable, "-m", "pissa_rs.cli"]


def run_cli(model, out, data, env=None, extra=()):
    return subprocess.run([*CLI, "decompose", str(model), "-r", str(R), "-o", str(out), "--no-progress",
                           "--method", "lora-ga", "--calibration", str(data), "--calibration-samples", str(SAMPLES),
                           "--calibration-length", str(LENGTH), "--calibration-batch", str(BATCH), *extra],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    """The command's run with the `random` direction, never killed: what every resumed run
    must write, byte for byte."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = root / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert run_cli(models["llama"], root / "ref", data, extra=("--lora-ga-direction", "random")).returncode == 0
    return data, root / "ref"


# three layers, three batches: the forward pass reaches the point 9 times, then the backward
# 9 more, from layer 2 down: 5 is in the forward's layer 1, 14 in the backward's layer 1
@pytest.mark.parametrize("point, resumed", [("calibrate:5", {"phase": "forward", "layer": 1}),
                                            ("calibrate:14", {"phase": "backward", "layer": 1}),
                                            ("target:4", {"phase": "done", "layer": 0})])
def test_sigkill_in_either_pass_or_the_units_resumes_byte_identically(models, uninterrupted, tmp_path, point,
                                                                      resumed):
    model, (data, reference) = models["llama"], uninterrupted
    before = digest(model)
    out = tmp_path / "o"
    killed = run_cli(model, out, data, env={"PISSA_RS_SIGNAL_AT": point}, extra=("--lora-ga-direction", "random"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "pissa_report.json").exists()
    scratch = tmp_path / ".o-lora-ga-pass"
    assert (scratch / "state.json").is_file()
    assert run_cli(model, out, data, extra=("--lora-ga-direction", "random")).returncode == 0
    assert digest(model) == before and not scratch.exists()  # the pass's files go with the commit
    config = "pissa_init/adapter_config.json"
    ours_now, ref = digest(out), digest(reference)
    assert {k: v for k, v in ours_now.items() if k not in ("pissa_report.json", config)} == \
        {k: v for k, v in ref.items() if k not in ("pissa_report.json", config)}
    report = json.loads((out / "pissa_report.json").read_text())
    assert report["calibration"]["resumed_at"] == resumed
    reference_report = json.loads((reference / "pissa_report.json").read_text())
    assert report["calibration"]["batch_losses"] == reference_report["calibration"]["batch_losses"]


def test_the_random_direction_follows_the_seed(models, uninterrupted, tmp_path):
    """PEFT's `random` draws from torch's global generator; ours from --seed: the same seed
    gives the same factors (every resumed run above), another seed another choice of the 2r
    triplets, the same gradient."""
    data, reference = uninterrupted
    assert run_cli(models["llama"], tmp_path / "o", data, extra=("--lora-ga-direction", "random",
                                                                 "--seed", "1")).returncode == 0
    a = safetensors.torch.load_file(reference / "pissa_init" / "adapter_model.safetensors")
    c = safetensors.torch.load_file(tmp_path / "o" / "pissa_init" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    norms = [json.loads((f / "pissa_report.json").read_text())["calibration"]["gradient_norms"]
             for f in (reference, tmp_path / "o")]
    assert norms[0] == norms[1]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "m"
    tokenizer = save_tokenizer(path, calibration_texts())
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2)).save_pretrained(path)
    return path


def test_what_the_method_cannot_take_is_refused_before_anything_is_written(models, bert, tmp_path):
    with pytest.raises(CalibrationError, match=r"BertForMaskedLM is not a causal language model"):
        pissa_rs.decompose_checkpoint(bert, r=2, method="lora-ga", out=tmp_path / "o", calibration=TEXTS,
                                      calibration_length=8, progress=False, target_modules=["query", "value"])
    with pytest.raises(CalibrationError, match=r"sample\(s\) \[0, 1, 2, 3, 4\] have fewer than 2 tokens"):
        ours(models["llama"], tmp_path / "o", calibration_length=1)
    with pytest.raises(ValueError, match=r"method 'lora-ga' leaves|no residual to quantize|quantize"):
        ours(models["llama"], tmp_path / "o", quantize="nf4")
    with pytest.raises(ValueError, match=r"lora_ga_scale 'stabel' is not one of"):
        ours(models["llama"], tmp_path / "o", lora_ga_scale="stabel")
    with pytest.raises(ValueError, match=r"lora_ga_direction apply to method 'lora-ga', not 'corda-ipm'"):
        pissa_rs.decompose_checkpoint(models["llama"], r=R, method="corda-ipm", out=tmp_path / "o", calibration=TEXTS,
                                      lora_ga_direction="ArBr", progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o-lora-ga-pass").exists()


def test_the_dry_run_says_the_passes_and_refuses_what_the_run_refuses(models, bert, tmp_path):
    plan = pissa_rs.plan(models["llama"], r=R, method="lora-ga", calibration=TEXTS, calibration_samples=SAMPLES,
                         calibration_length=LENGTH, calibration_batch=BATCH)
    text = plan.describe()
    assert "a forward over the 3 layers, then a backward" in text and "4 layer boundaries" in text, text
    assert "gradient triplets" in text and "method: lora-ga (lora_ga)" in text
    with pytest.raises(CalibrationError, match=r"BertForMaskedLM is not a causal language model"):
        pissa_rs.plan(bert, r=2, method="lora-ga", calibration=TEXTS, calibration_length=8)
    with pytest.raises(CalibrationError, match=r"fewer than 2 tokens"):
        pissa_rs.plan(models["llama"], r=R, method="lora-ga", calibration=TEXTS, calibration_length=1)


def keep_gradients(monkeypatch) -> dict[int, torch.Tensor]:
    """Every gradient the pass hands LoRA-GA, by the seed it gives its target (the rounding
    probe's calls have others)."""
    seen = {}
    original = LoraGA.gradient_statistic
    monkeypatch.setattr(LoraGA, "gradient_statistic", lambda self, g, r, seed, options: (
        seen.__setitem__(seed, g.clone()), original(self, g, r, seed, options))[1])
    return seen


def test_an_fp8_source_gives_the_gradients_of_the_model_loaded_dequantized(tmp_path, monkeypatch):
    """FP8 weights are dequantized as the layers are read (calibration's reader), so the
    gradients are autograd's on the model transformers loads dequantized; the residual is
    bfloat16 with no FP8 left."""
    from low_precision import save_dequantized, save_fp8_block

    src = tmp_path / "src"
    tokenizer = save_tokenizer(src, calibration_texts())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    save_fp8_block(model, src)
    reference = save_dequantized(model, src, tmp_path / "reference")
    seen = keep_gradients(monkeypatch)
    res = ours(src, tmp_path / "o")
    assert res.report["source_format"] == "fp8"
    expected = autograd_gradients(reference, TEXTS, SAMPLES, LENGTH, BATCH)
    assert sorted(res.report["calibration"]["gradient_norms"]) == sorted(expected)
    for key, gradient in expected.items():
        gap = (seen[tensor_seed(0, key)] - gradient).abs().max().item()
        assert gap <= 1e-5 * gradient.abs().max().item(), (key, gap)
    residual = tensors_of(res.out)
    assert {str(t.dtype) for t in residual.values()} == {"torch.bfloat16"}
    assert not [k for k in residual if k.endswith(("_scale", "_scale_inv"))]


def test_moe_experts_and_routers_get_their_slice_of_autograds_gradient(tmp_path, monkeypatch):
    """PEFT's LoRA-GA takes nn.Linear only; here each expert of a fused stack gets its slice
    of the stack's gradient (only the tokens routed to it reach it) and a router its weight's:
    autograd's over the whole model, and the adapter opens in PEFT's ParamWrapper layout."""
    path = tmp_path / "m"
    tokenizer = save_tokenizer(path, calibration_texts())
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2, num_experts=4,
        moe_intermediate_size=48, head_dim=16)).save_pretrained(path)
    with pytest.raises(pissa_rs.TargetError, match=r"mlp.gate.weight \(r=4\): LoRA-GA takes 2r = 8 triplets"):
        pissa_rs.decompose_checkpoint(path, r=4, method="lora-ga", out=tmp_path / "o", calibration=TEXTS,
                                      progress=False)
    assert not (tmp_path / "o").exists()
    seen = keep_gradients(monkeypatch)
    res = pissa_rs.decompose_checkpoint(path, r=2, method="lora-ga", out=tmp_path / "o", calibration=TEXTS,
                                        calibration_samples=SAMPLES, calibration_length=LENGTH,
                                        calibration_batch=BATCH, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    records = res.report["tensors"]
    parameters = {t.get("parameter") or t["module"] + ".weight" for t in records}
    for name, p in model.named_parameters():
        p.requires_grad_(name in parameters)
    found = batches(path)
    for ids, mask in found:
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = {n: p.grad / len(found) for n, p in model.named_parameters() if p.requires_grad}
    kinds = set()
    for t in records:
        expected = grads[t.get("parameter") or t["module"] + ".weight"]
        if t.get("expert") is not None:
            expected = expected[t["expert"]]
            kinds.add("expert")
        elif t.get("parameter"):
            kinds.add("router")
        mine = seen[tensor_seed(0, t["tensor"])]
        gap = (mine - expected).abs().max().item()
        assert gap <= 1e-5 * expected.abs().max().item(), (t["tensor"], gap)
    assert kinds == {"expert", "router"}
    loaded = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(res.out), res.adapter)
    assert loaded.peft_config["default"].target_parameters
