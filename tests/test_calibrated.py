"""Data-aware methods (CorDA IPM and KPM): the calibration samples run through the model one
decoder layer at a time, and the output equals PEFT's own preprocess_corda + get_peft_model
on the whole model fed the same samples one by one; bad calibration data is refused before
anything is written; a run killed mid-layer resumes byte-identically."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import warnings

import pytest
import safetensors.torch
import torch
import transformers
from helpers import calibration_texts, digest, load_output_without_key_warnings, save_tokenizer
from make_tiny_model import save_tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig

import pissa_rs
from pissa_rs.calibration.samples import CalibrationError

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N, LENGTH, R = 12, 40, 4
# samples of many lengths (10 to 40 tokens), so that batches are padded
TEXTS = [t[: 30 + 19 * k] for k, t in enumerate(calibration_texts())]


def save_model(path, family="llama", layers=2, seed=0, **save):
    tokenizer = save_tokenizer(path, TEXTS)
    config_cls, cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(path, **save)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    return {family: save_model(root / family, family) for family in FAMILIES}


def peft_corda(path, mode, texts=TEXTS[:N], length=LENGTH, target_modules=LINEAR, dtype=torch.float32):
    """PEFT's own CorDA on the whole model loaded in `dtype`, each sample fed alone (its
    run_model callback)."""
    # imported here: PEFT 0.20's corda module imports `attr`, which PEFT does not declare
    from peft.tuners.lora.corda import preprocess_corda

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    config = LoraConfig(r=R, lora_alpha=R, target_modules=target_modules, init_lora_weights="corda", lora_dropout=0.0,
                        corda_config=CordaConfig(corda_method=mode), task_type="CAUSAL_LM")

    def run_model():
        for text in texts:
            model(**tokenizer(text, truncation=True, max_length=length, return_tensors="pt"))

    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


def ours(path, out, mode, **options):
    options = {"calibration": TEXTS, "calibration_samples": N, "calibration_length": LENGTH,
               "calibration_batch": 1, **options}
    return pissa_rs.decompose_checkpoint(path, r=R, method=f"corda-{mode}", out=out, progress=False, **options)


def tensors_of(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in safetensors.torch.load_file(f).items()}


def assert_close(mine, theirs, what, rtol=1e-6):
    # Fed one sample at a time as PEFT's run_model feeds them, the same float32 operations in
    # the same order: equal up to a last-bit difference. Batched (padded, masked attention),
    # the hidden states round otherwise (~1e-7 relative), and the damped inverse and the SVD of
    # W·C amplify that by their conditioning: hence a looser rtol there.
    assert mine.shape == theirs.shape, what
    gap = (mine.float() - theirs.float()).abs().max().item()
    assert gap <= rtol * theirs.abs().max().item(), f"{what}: off by {gap:.3g}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_the_output_is_peft_own_corda(models, tmp_path, family, mode):
    res = ours(models[family], tmp_path / "o", mode)
    theirs = peft_corda(models[family], mode)
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    for key, value in adapter.items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], key)
    residual = tensors_of(res.out)
    base = {k.replace(".base_layer", ""): v for k, v in theirs.base_model.model.state_dict().items() if "lora_" not in k}
    assert set(base) <= set(residual) | {"lm_head.weight"}
    for key, value in base.items():
        if key in residual:
            assert_close(residual[key], value, key)
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    expected = json.loads(json.dumps(theirs.peft_config["default"].to_dict(), default=sorted))
    # the factors are final: PEFT must not initialize again on load (nor warn of a corda_config it ignores)
    expected.update(init_lora_weights=True, corda_config=None)
    where = ("base_model_name_or_path", "revision", "target_modules", "peft_version")
    assert {k: v for k, v in config.items() if k not in where} == {k: v for k, v in expected.items() if k not in where}
    assert sorted(config["target_modules"]) == sorted(LINEAR)
    assert res.report["method"] == "corda-" + mode and res.report["init_lora_weights"] == "corda"
    calibration = res.report["calibration"]
    assert calibration["samples"] == N and calibration["batch"] == 1 and len(calibration["sha256"]) == 64
    assert calibration["lengths"] == [len(transformers.AutoTokenizer.from_pretrained(models[family])(
        t, truncation=True, max_length=LENGTH)["input_ids"]) for t in TEXTS[:N]]


def test_a_bfloat16_checkpoint_runs_its_layers_in_float32_on_a_cpu_unless_told(tmp_path):
    """calibration_dtype auto: on a CPU the layers run in float32 (bfloat16 matmuls are
    emulated on most CPUs, ~10x slower; the stored weights upcast exactly), which is PEFT's
    CorDA on the model loaded in float32; "bfloat16" runs them as stored, which is PEFT's on
    the model loaded as stored. The adapters (float32) match their PEFT run within float32
    rounding and differ from the other dtype's by far more; the residuals are bfloat16, as stored.
    (PEFT on a bfloat16 model rounds the factors it keeps through bfloat16, as its adapter
    layers take the base layer's dtype before autocast_adapter_dtype makes them float32 again;
    ours stay float32, so they are compared rounded the same way.)"""
    path = tmp_path / "bf16"
    save_tokenizer(path, TEXTS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(transformers.AutoTokenizer.from_pretrained(path)), hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.to(torch.bfloat16).save_pretrained(path)
    runs = {name: ours(path, tmp_path / name, "ipm", **options)
            for name, options in [("auto", {}), ("bfloat16", {"calibration_dtype": "bfloat16"})]}
    assert {name: res.report["calibration"]["dtype"] for name, res in runs.items()} == \
        {"auto": "float32", "bfloat16": "bfloat16"}
    adapters = {name: safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
                for name, res in runs.items()}
    for name, dtype in [("auto", torch.float32), ("bfloat16", torch.bfloat16)]:
        state = peft_corda(path, "ipm", dtype=dtype).state_dict()
        for key, value in adapters[name].items():
            theirs = state[key.replace(".weight", ".default.weight")]
            assert_close(value.to(dtype), theirs, f"{name}: {key}", rtol=1e-5)
        residual = tensors_of(runs[name].out)
        assert {str(t.dtype) for t in residual.values()} == {"torch.bfloat16"}
        key = "model.layers.1.mlp.down_proj.weight"
        assert_close(residual[key], state[f"base_model.model.{key[:-len('weight')]}base_layer.weight"],
                     f"{name}: {key}",
                     rtol=2 ** -8)  # one bfloat16 rounding of the largest entry
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    gap = (adapters["auto"][key] - adapters["bfloat16"][key]).abs().max().item()
    assert gap > 1e-3 * adapters["auto"][key].abs().max().item()
    # EVA's pass too: auto is PEFT's EVA on the model loaded in float32
    eva = ours_eva(path, tmp_path / "eva", eva_rho=1.0)
    assert eva.report["calibration"]["dtype"] == "float32"
    state = peft_eva(path, 1.0, 4).state_dict()
    for key, value in safetensors.torch.load_file(eva.adapter / "adapter_model.safetensors").items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], f"eva: {key}", rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_bfloat16_vocabulary_is_held_as_stored_and_gathers_the_float32_rows(tmp_path, family):
    """Layers run in float32 over a bfloat16 checkpoint: the lookup tables stay bfloat16 (a
    vocabulary upcast whole is the largest thing calibration holds) and their rows are cast
    after the gather, which are the bits of the float32 model's: the hidden states a layer gets
    equal, bit for bit, those of the model loaded in float32. Norms and layers run in float32."""
    from pissa_rs._pissa_rs import Checkpoint
    from pissa_rs.calibration.layers import LayerStack

    path = tmp_path / family
    tokenizer = save_tokenizer(path, TEXTS)
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128))
    with torch.no_grad():  # BERT's position and type tables start near zero: give them bits a cast could lose
        for embedding in model.modules():
            if isinstance(embedding, torch.nn.Embedding):
                embedding.weight.normal_()
    model.to(torch.bfloat16).save_pretrained(path)
    stack = LayerStack(Checkpoint(path), path, torch.device("cpu"))
    tables = {n: m.weight.dtype for n, m in stack.base.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert tables and set(tables.values()) == {torch.bfloat16}, tables
    assert {p.dtype for n, p in stack.base.named_parameters() if "embeddings." in n and "LayerNorm" in n} <= {
        torch.float32}
    batch = {"input_ids": torch.randint(len(tokenizer), (3, 17), generator=torch.Generator().manual_seed(0))}
    hidden, _, _ = stack.call_of(1, batch["input_ids"], torch.ones_like(batch["input_ids"]))
    assert hidden.dtype == torch.float32
    loaded = type(model).from_pretrained(path, dtype=torch.float32).eval()
    base = getattr(loaded, loaded.base_model_prefix)
    with torch.no_grad():
        expected = base.embeddings(input_ids=batch["input_ids"]) if family == "bert" else \
            base.embed_tokens(batch["input_ids"])
    assert torch.equal(hidden, expected)


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors_in(value[k])]
    return []


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_past_the_first_layer_the_vocabulary_is_let_go(models, bert, tmp_path, monkeypatch, family):
    """The layers after the first take the carried hidden states, so the input embedding's
    table is let go once the first layer has run (1 GB at Llama-3-8B's shapes): a later layer
    gets the same arguments (masks, position embeddings) from the model's forward as with the
    table, and a CorDA run forgets it after layer 0 (its output is PEFT's: the tests above)."""
    from pissa_rs._pissa_rs import Checkpoint
    from pissa_rs.calibration.layers import LayerStack

    path = models["llama"] if family == "llama" else bert
    stack = LayerStack(Checkpoint(path), path, torch.device("cpu"))
    ids = torch.randint(100, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padded: the masks are not trivial
    before = stack.call_of(1, ids, mask)[1:]
    stack.forget_input_embedding()
    table = stack.base.get_input_embeddings().weight
    assert table.untyped_storage().nbytes() == table.element_size()
    after = stack.call_of(1, ids, mask)[1:]
    assert sorted(before[1]) == sorted(after[1])
    pairs = list(zip(_tensors_in(before), _tensors_in(after)))
    assert pairs and all(torch.equal(a, b) for a, b in pairs)

    seen = []
    call_of = LayerStack.call_of

    def spy(self, index, *args):
        seen.append((index, self.base.get_input_embeddings().weight.untyped_storage().nbytes()))
        return call_of(self, index, *args)

    monkeypatch.setattr(LayerStack, "call_of", spy)
    ours(path, tmp_path / "o", "ipm", **(BERT_TARGETS if family == "bert" else {}))
    vocabulary = len(transformers.AutoTokenizer.from_pretrained(path)) * 64 * 4
    assert {i for i, _ in seen} == {0, 1}
    assert {n for i, n in seen if i == 0} == {vocabulary} and {n for i, n in seen if i == 1} == {4}


@pytest.mark.floor
def test_ipm_and_kpm_differ_and_the_logits_are_the_original(models, tmp_path, caplog):
    path = models["llama"]
    ipm, kpm = ours(path, tmp_path / "ipm", "ipm"), ours(path, tmp_path / "kpm", "kpm")
    a_ipm = safetensors.torch.load_file(ipm.adapter / "adapter_model.safetensors")
    a_kpm = safetensors.torch.load_file(kpm.adapter / "adapter_model.safetensors")
    assert all(not torch.allclose(a_ipm[k], a_kpm[k]) for k in a_ipm)
    # IPM holds the large triplets of W·C, KPM the small ones
    q = "model.layers.0.self_attn.q_proj"
    s_ipm = next(t["singular_values"] for t in ipm.report["tensors"] if t["module"] == q)
    s_kpm = next(t["singular_values"] for t in kpm.report["tensors"] if t["module"] == q)
    assert min(s_ipm) > max(s_kpm)
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    original = transformers.AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits
    for res in (ipm, kpm):
        loaded = load_output_without_key_warnings(transformers.AutoModelForCausalLM, res.out, caplog)
        assert torch.allclose(loaded(ids).logits, original, atol=1e-4)
        trainable = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(res.out), res.adapter,
                                              is_trainable=True)
        loss = trainable(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.named_parameters()
                   if "lora_" in n)
        assert pissa_rs.verify(res.out, against=path).ok


def test_padding_never_counts(models, tmp_path, monkeypatch):
    """Batches of 1 and of 5 (right-padded, samples of 10 to 40 tokens) give every module the
    same input covariance within float32 rounding (the masked attention path rounds otherwise)."""
    from pissa_rs.calibration.statistics import CovarianceHooks

    seen: list[dict] = []
    real = CovarianceHooks.covariances
    monkeypatch.setattr(CovarianceHooks, "covariances", lambda self: seen.append(real(self)) or seen[-1])
    one = ours(models["llama"], tmp_path / "one", "ipm", calibration_batch=1)
    five = ours(models["llama"], tmp_path / "five", "ipm", calibration_batch=5)
    assert len(seen) == 4 and len({len(c) for c in seen}) == 1  # two layers, each run
    for by_one, by_five in zip(seen[:2], seen[2:]):
        for name, c in by_one.items():
            gap = (c - by_five[name]).abs().max().item()
            assert gap <= 1e-5 * c.abs().max().item(), f"{name}: the covariances differ by {gap:.3g}"
    assert one.report["calibration"]["sha256"] == five.report["calibration"]["sha256"]
    a, b = (safetensors.torch.load_file(r.adapter / "adapter_model.safetensors") for r in (one, five))
    for key in a:  # IPM's top triplets: well separated, so the factors follow the covariances closely
        assert_close(a[key], b[key], key, rtol=2e-3)


def test_hidden_states_held_in_memory_or_read_back_write_the_same_bytes(models, tmp_path, monkeypatch):
    """Within --host-memory the carried hidden states are taken from memory (never read back
    from their file); above it from the file, batch by batch; the output is the same."""
    from pissa_rs.engine.sequential import HiddenStates

    read = HiddenStates._read
    reads = []
    monkeypatch.setattr(HiddenStates, "_read", lambda self, k: reads.append(k) or read(self, k))
    held = ours(models["llama"], tmp_path / "held", "ipm", calibration_batch=5, host_memory="1GiB")
    assert not reads
    spilled = ours(models["llama"], tmp_path / "spilled", "ipm", calibration_batch=5, host_memory="10KB")
    assert reads == [0, 1, 2]  # layer 1 reads layer 0's three batches
    # 12 samples in batches of 5, each padded to its longest (40 tokens), hidden 64, float32
    boundary = (5 * 40 + 5 * 40 + 2 * 40) * 64 * 4
    assert held.report["calibration"]["hidden_states"] == {"bytes_per_layer": boundary, "host_memory": 2**30,
                                                           "held_in_memory": True}
    assert spilled.report["calibration"]["hidden_states"]["held_in_memory"] is False
    own = ("pissa_report.json", "pissa_init/adapter_config.json")
    assert {k: v for k, v in digest(held.out).items() if k not in own} == \
        {k: v for k, v in digest(spilled.out).items() if k not in own}
    with pytest.raises(ValueError, match=r"not a size: '12 GiBs'"):
        ours(models["llama"], tmp_path / "typo", "ipm", host_memory="12 GiBs")
    with pytest.raises(ValueError, match=r"host_memory apply to methods 'corda-ipm', 'corda-kpm', not 'eva'"):
        ours_eva(models["llama"], tmp_path / "eva", host_memory="1GiB")
    assert not (tmp_path / "typo").exists() and not (tmp_path / "eva").exists()


def test_several_ranks_and_qpissa_from_one_calibration(models, tmp_path):
    outs = pissa_rs.decompose_checkpoint(models["llama"], r=[2, 4], method="corda-ipm", out=tmp_path / "r{r}",
                                         calibration=TEXTS, calibration_samples=N, calibration_length=LENGTH,
                                         progress=False)
    small = safetensors.torch.load_file(outs[0].adapter / "adapter_model.safetensors")
    big = safetensors.torch.load_file(outs[1].adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.allclose(small[key], big[key][:, :2])  # IPM's top triplets nest
    quantized = ours(models["llama"], tmp_path / "q", "ipm", quantize="nf4", quant_iters=2, measure_error=False)
    assert quantized.report["options"]["quantize"] == "nf4" and pissa_rs.verify(quantized.out, against=models["llama"]).ok


@pytest.mark.parametrize("data, message", [
    ([], r"0 samples, 12 asked for"),
    ([""] * 12, r"sample 0 has no tokens"),
    (TEXTS[:3], r"3 samples, 12 asked for"),
    (["fine"] * 11 + [7], r"sample 11 is int, not text"),
    ("missing.txt", r"missing.txt: no such file"),
])
def test_bad_calibration_data_is_named_before_anything_is_written(models, tmp_path, data, message):
    with pytest.raises(CalibrationError, match=message):
        ours(models["llama"], tmp_path / "o", "ipm", calibration=data if data != "missing.txt" else tmp_path / data)
    assert not (tmp_path / "o").exists()


def test_bad_files_and_contexts_are_named(models, tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(CalibrationError, match=r"data.bin: not UTF-8 text"):
        ours(models["llama"], tmp_path / "o", "ipm", calibration=binary)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(CalibrationError, match=r"data.jsonl, line 2: needs a string field 'text'"):
        ours(models["llama"], tmp_path / "o", "ipm", calibration=jsonl)
    with pytest.raises(CalibrationError, match=r"calibration_length 4096 is longer than the model's context "
                                               r"\(max_position_embeddings 128"):
        ours(models["llama"], tmp_path / "o", "ipm", calibration_length=4096)
    bare = tmp_path / "bare"
    save_model(bare)
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink()
    with pytest.raises(CalibrationError, match=r"bare: no tokenizer"):
        ours(bare, tmp_path / "o", "ipm")
    with pytest.raises(ValueError, match=r"method 'corda-kpm' needs calibration data"):
        pissa_rs.decompose_checkpoint(models["llama"], r=4, method="corda-kpm", out=tmp_path / "o")
    with pytest.raises(ValueError, match=r"method 'pissa' looks at the weights alone"):
        pissa_rs.decompose_checkpoint(models["llama"], r=4, calibration=TEXTS, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_text_and_jsonl_files_give_the_samples_of_a_list(models, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("\n\n".join(TEXTS))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    paragraphs = [p.strip() for p in "\n\n".join(TEXTS).split("\n\n") if p.strip()]  # a text file's samples
    for data, texts in ((text, paragraphs), (jsonl, TEXTS)):
        res = ours(models["llama"], tmp_path / data.suffix[1:], "ipm", calibration=data)
        assert res.report["calibration"]["source"] == str(data)
        listed = ours(models["llama"], tmp_path / f"list-{data.suffix[1:]}", "ipm", calibration=texts)
        assert res.report["calibration"]["sha256"] == listed.report["calibration"]["sha256"]
    assert paragraphs[:N] != TEXTS[:N]


def test_the_dry_run_shows_the_memory_plan_and_checks_the_data(models, tmp_path, capsys):
    plan = pissa_rs.plan(models["llama"], r=R, method="corda-kpm", calibration=TEXTS, calibration_samples=N,
                         calibration_length=LENGTH, calibration_batch=4, out=tmp_path / "o")
    shown = plan.describe()
    assert "method: corda-kpm (corda)" in shown and "compute: full SVD per weight" in shown
    # 12 x 40 tokens of hidden 64 in float32 = 120 KiB; down_proj's 96 x 96 covariance among a layer's
    assert f"calibration: up to {N} samples x {LENGTH} tokens (480), batches of 4, layers run in float32; host: " \
           "hidden states 120.0 KiB" in shown, shown
    # the hidden states are in the dtype the layers run in
    halved = pissa_rs.plan(models["llama"], r=R, method="corda-kpm", calibration=TEXTS, calibration_samples=N,
                           calibration_length=LENGTH, calibration_dtype="bfloat16").describe()
    assert "layers run in bfloat16; host: hidden states 60.0 KiB" in halved, halved
    assert plan.options.calibration == f"a list of {len(TEXTS)} texts" and len(plan.options.calibration_sha256) == 64
    assert "held in memory (2 layer boundaries within --host-memory" in shown, shown
    small = pissa_rs.plan(models["llama"], r=R, method="corda-kpm", calibration=TEXTS, calibration_samples=N,
                          calibration_length=LENGTH, host_memory="100KiB").describe()
    assert "read back from their file a batch at a time (2 layer boundaries above --host-memory 100.0 KiB)" in small
    # EVA: every target's incremental PCA components on disk (PEFT's loop spans all layers at each
    # step), one layer's on the device: (six inputs of 64 + down_proj's 96) x float64 x r * rho = 8
    # components = 30 KiB a layer, 60 KiB for 2; twice a layer's while they update; lora_A at r = 4
    eva = pissa_rs.plan(models["llama"], r=R, method="eva", calibration=TEXTS, calibration_samples=N,
                        calibration_length=LENGTH, calibration_batch=4).describe()
    assert "each step one batch through the layers" in eva and "components, up to 60.0 KiB" in eva, eva
    assert "device: one layer's, up to 60.0 KiB while they update" in eva and "lora_A ~15.0 KiB" in eva, eva
    # the default length (2048, as PEFT's docs suggest) is cut to a shorter context; asked for, it is an error
    # and the default sample count (256) to the texts there are
    defaults = pissa_rs.plan(models["llama"], r=R, method="corda-kpm", calibration=TEXTS).options
    assert (defaults.calibration_length, defaults.calibration_samples) == (128, len(TEXTS))
    with pytest.raises(CalibrationError, match="3 samples, 12 asked for"):
        pissa_rs.plan(models["llama"], r=R, method="corda-kpm", calibration=TEXTS[:3], calibration_samples=N)
    assert not (tmp_path / "o").exists()


def test_a_family_not_tested_is_refused_by_name(tmp_path):
    path = tmp_path / "gpt2"
    save_tokenizer(path, TEXTS)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2)
                                 ).save_pretrained(path)
    with pytest.raises(CalibrationError, match=r"model_type 'gpt2' is not one whose layer-by-layer calibration"):
        ours(path, tmp_path / "o", "ipm")
    assert not (tmp_path / "o").exists()  # refused before anything is written


CLI = [sys.executable, "-m", "pissa_rs.cli"]


def run_cli(model, out, data, env=None, method="corda-kpm", extra=()):
    return subprocess.run([*CLI, "decompose", str(model), "-r", str(R), "-o", str(out), "--no-progress",
                           "--method", method, "--calibration", str(data), "--calibration-samples", str(N),
                           "--calibration-length", str(LENGTH), "--calibration-batch", "3", *extra],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("point", ["calibrate:9", "calibrate:14"])
def test_sigkill_mid_layer_resumes_byte_identically(tmp_path, point):
    """Four layers in shards of about one layer: killed in layer 2 (after the activations of
    layer 1 were saved) or in layer 3, the rerun resumes there and writes the same bytes."""
    model = save_model(tmp_path / "m", layers=4, max_shard_size="120KB")
    assert len(list(model.glob("*.safetensors"))) >= 3
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    reference = tmp_path / "ref"
    assert run_cli(model, reference, data).returncode == 0
    before = digest(model)
    out = tmp_path / "o"
    killed = run_cli(model, out, data, env={"PISSA_RS_SIGNAL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "pissa_report.json").exists()
    assert (out / ".pissa_units" / "calibration" / "state.json").is_file()  # a layer's activations were kept
    assert run_cli(model, out, data).returncode == 0
    assert digest(model) == before
    config = "pissa_init/adapter_config.json"  # names its own folder as the base: compared without it
    ours_now, ref = digest(out), digest(reference)
    assert {k: v for k, v in ours_now.items() if k not in ("pissa_report.json", config)} == \
        {k: v for k, v in ref.items() if k not in ("pissa_report.json", config)}
    strip = lambda folder: {k: v for k, v in json.loads((folder / config).read_text()).items()  # noqa: E731
                            if k != "base_model_name_or_path"}
    assert strip(out) == strip(reference)
    report = json.loads((out / "pissa_report.json").read_text())
    assert report["calibration"]["resumed_at_layer"] == {"calibrate:9": 2, "calibrate:14": 3}[point]
    assert report["calibration"]["sha256"] == json.loads((reference / "pissa_report.json").read_text())[
        "calibration"]["sha256"]


def peft_eva(path, rho, batch, texts=TEXTS[:N], whiten=False, tau=0.99, dtype=torch.float32):
    """PEFT's own EVA on the whole model loaded in `dtype`: its dataloader of right-padded
    batches with the mask."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    config = LoraConfig(r=R, lora_alpha=R, target_modules=LINEAR, init_lora_weights="eva", lora_dropout=0.0,
                        eva_config=EvaConfig(rho=rho, whiten=whiten, tau=tau), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    initialize_lora_eva_weights(peft_model, padded_batches(tokenizer, texts, batch), show_progress_bar=False)
    return peft_model


def padded_batches(tokenizer, texts, batch):
    """PEFT's EVA dataloader: the samples in batches, right-padded, with the attention mask."""
    rows = [tokenizer(t, truncation=True, max_length=LENGTH)["input_ids"] for t in texts]
    batches = []
    for k in range(0, len(rows), batch):
        chunk = rows[k:k + batch]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chunk):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def ours_eva(path, out, **options):
    return pissa_rs.decompose_checkpoint(path, r=R, method="eva", out=out, progress=False, calibration=TEXTS,
                                         calibration_samples=N, calibration_length=LENGTH,
                                         **{"calibration_batch": 4, **options})


@pytest.mark.parametrize("family, whiten", [pytest.param("llama", False, marks=pytest.mark.floor),
                                            ("llama", True), ("qwen3", False), ("qwen3", True)])
def test_eva_without_redistribution_is_peft_own(models, tmp_path, caplog, family, whiten):
    """rho = 1: every module keeps r, and each module's incremental PCA sees the batches PEFT's
    loop feeds it (cycling until its components converge): the same adapter, bit for bit."""
    res = ours_eva(models[family], tmp_path / "o", eva_rho=1.0, eva_whiten=whiten)
    theirs = peft_eva(models[family], 1.0, 4, whiten=whiten)
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    # PEFT 0.21 whitens in place the components that modules sharing an input share, once per
    # module (q, k, v: three times); here each module's once: compared where inputs are not shared
    shared = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") if whiten else ()
    for key, value in adapter.items():
        if not any(f".{m}." in key for m in shared):
            assert_close(value, state[key.replace(".weight", ".default.weight")], key)
    if whiten:
        plain = safetensors.torch.load_file(ours_eva(models[family], tmp_path / "plain", eva_rho=1.0).adapter
                                            / "adapter_model.safetensors")
        key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
        norms = torch.linalg.vector_norm(plain[key] / adapter[key], dim=1)  # sqrt(singular value) per row
        assert torch.allclose(norms, norms.sort(descending=True).values) and (norms > 1).all()
    assert not list(res.out.glob("*.safetensors"))  # the base is the original model: no weights written
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    expected = json.loads(json.dumps(theirs.peft_config["default"].to_dict(), default=sorted))
    where = ("base_model_name_or_path", "revision", "target_modules", "peft_version")
    assert {k: v for k, v in config.items() if k not in where} == {k: v for k, v in expected.items() if k not in where}
    assert config["base_model_name_or_path"] == str(models[family])
    # PEFT loads it onto the model it names, with no missing or unexpected keys, and trains it
    from peft import AutoPeftModelForCausalLM

    loaded = AutoPeftModelForCausalLM.from_pretrained(res.adapter, is_trainable=True)
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    original = transformers.AutoModelForCausalLM.from_pretrained(models[family]).eval()(ids).logits
    assert torch.allclose(loaded(ids).logits, original)  # B = 0: the original model's output
    loaded(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in loaded.named_parameters() if "lora_B" in n)
    assert pissa_rs.verify(res.out, against=models[family]).ok


# An encoder: BERT as transformers saves a masked-LM, its linear layers inside the encoder
# layers (the MLM head's transform sits after them and is left out, as calibration reaches
# the layers one at a time).
BERT_TARGETS = dict(target_modules=["query", "key", "value", "dense"], exclude_modules=["cls.predictions.transform.dense"])


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrated") / "bert"
    tokenizer = save_tokenizer(path, TEXTS)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128)).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode, batch", [("ipm", 1), ("kpm", 1), ("ipm", 5)])
def test_an_encoder_is_peft_own_corda(bert, tmp_path, caplog, mode, batch):
    """BERT: the encoder layers one at a time (bidirectional attention, the padding masked
    as the model's forward masks it) give PEFT's own CorDA on the whole model; PEFT loads it
    onto the residual with no missing or unexpected keys and the logits are the original's."""
    from peft.tuners.lora.corda import preprocess_corda

    res = ours(bert, tmp_path / "o", mode, calibration_batch=batch, **BERT_TARGETS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert)
    model = transformers.AutoModelForMaskedLM.from_pretrained(bert).eval()
    config = LoraConfig(r=R, lora_alpha=R, init_lora_weights="corda", lora_dropout=0.0,
                        corda_config=CordaConfig(corda_method=mode), **BERT_TARGETS)

    def run_model():
        for text in TEXTS[:N]:
            model(**tokenizer(text, truncation=True, max_length=LENGTH, return_tensors="pt"))

    preprocess_corda(model, config, run_model=run_model)
    theirs = get_peft_model(model, config)
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    assert len(adapter) == 2 * 6 * 2  # q, k, v, attention.output.dense, intermediate.dense, output.dense
    rtol = 1e-6 if batch == 1 else 2e-3  # batched: see test_padding_never_counts
    for key, value in adapter.items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], key, rtol=rtol)
    residual = tensors_of(res.out)
    for key, value in theirs.base_model.model.state_dict().items():
        if ".base_layer." in key:
            assert_close(residual[key.replace(".base_layer", "")], value, key, rtol=max(rtol, 1e-6))
    written = json.loads((res.adapter / "adapter_config.json").read_text())
    expected = json.loads(json.dumps(theirs.peft_config["default"].to_dict(), default=sorted))
    expected.update(init_lora_weights=True, corda_config=None)
    where = ("base_model_name_or_path", "revision", "target_modules", "exclude_modules", "peft_version")
    assert {k: v for k, v in written.items() if k not in where} == {k: v for k, v in expected.items() if k not in where}
    loaded = load_output_without_key_warnings(transformers.AutoModelForMaskedLM, res.out, caplog)
    assert sorted(n for n, m in loaded.named_modules() if hasattr(m, "lora_A")) == sorted(
        n for n, m in theirs.named_modules() if hasattr(m, "lora_A"))  # the same modules wrapped
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    original = transformers.AutoModelForMaskedLM.from_pretrained(bert).eval()(ids).logits
    assert torch.allclose(loaded(ids).logits, original, atol=1e-4)


def test_an_encoder_is_peft_own_eva(bert, tmp_path):
    """BERT through EVA (rho = 1): PEFT's initialize_lora_eva_weights on its padded batches, bit for bit."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    res = ours_eva(bert, tmp_path / "o", eva_rho=1.0, **BERT_TARGETS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert)
    model = transformers.AutoModelForMaskedLM.from_pretrained(bert).eval()
    theirs = get_peft_model(model, LoraConfig(r=R, lora_alpha=R, init_lora_weights="eva", lora_dropout=0.0,
                                              eva_config=EvaConfig(rho=1.0), **BERT_TARGETS))
    initialize_lora_eva_weights(theirs, padded_batches(tokenizer, TEXTS[:N], 4), show_progress_bar=False)
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    for key, value in adapter.items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], key)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(transformers.AutoModelForMaskedLM.from_pretrained(bert), res.adapter)
    assert sum(1 for m in loaded.modules() if hasattr(m, "lora_A")) == 12


@pytest.mark.parametrize("family, seed", [("llama", 0), ("qwen3", 0), ("qwen3", 2)])
def test_eva_redistributes_ranks_as_peft_does(models, tmp_path, family, seed):
    """rho = 2: PEFT's loop, step by step across all layers (a module's hook goes off once the
    share of the rank distribution it holds at that step has converged, and comes back on if
    the share grows), so the ranks and components are PEFT's: the same rank_pattern and
    alpha_pattern, the same adapter bit for bit, within the uniform budget, at most 2r each.
    Seed 2's Qwen3 has hooks that go off and come back on."""
    path = models[family] if seed == 0 else save_model(tmp_path / "m", family, seed=seed)
    res = ours_eva(path, tmp_path / "o", eva_rho=2.0)
    assert (res.report["calibration"]["hooks_back_on"] > 0) == (seed == 2)
    ranks = res.report["eva"]["ranks"]
    assert sum(ranks.values()) == R * len(ranks) and max(ranks.values()) <= 2 * R and len(set(ranks.values())) > 1
    theirs = peft_eva(path, 2.0, 4)
    expected = theirs.peft_config["default"]
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["rank_pattern"] == expected.rank_pattern == {m: k for m, k in ranks.items() if k not in (0, R)}
    assert config["alpha_pattern"] == expected.alpha_pattern  # alpha * rank / r
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    for key, value in adapter.items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], key)
    seen = res.report["calibration"]["batches_seen"]
    assert len(set(seen.values())) > 1  # hooks went off at different steps, as in PEFT's loop
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(res.adapter)  # PEFT builds every rank as chosen


def test_eva_modules_sharing_an_input_at_different_ranks_are_peft_own(models, tmp_path):
    """rho = 1.5 on the llama: the budget's cut falls inside a tie of one input's shared ratios,
    so modules given that input get different ranks (layer 0's q_proj 4, k_proj and v_proj 3,
    as PEFT's distribution says): each takes the LEADING components of the shared incremental
    PCA, as many as its own rank, as PEFT's does. (Where a group's ranks are equal the cut
    never matters: the rho = 2 cases above cannot tell the leading components from others.)"""
    path = models["llama"]
    res = ours_eva(path, tmp_path / "o", eva_rho=1.5)
    ranks = res.report["eva"]["ranks"]
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    groups = {}
    for module in ranks:
        layer, name = module.split(".")[2], module.rsplit(".", 1)[1]
        if name in shared:
            groups.setdefault((layer, shared[name]), []).append(module)
    assert len(groups) == 4 and all(len(g) in (2, 3) for g in groups.values())
    uneven = [g for g in groups.values() if len({ranks[m] for m in g}) > 1 and min(ranks[m] for m in g) > 0]
    assert uneven, f"no input shared at different ranks: the case is not covered ({ranks})"
    theirs = peft_eva(path, 1.5, 4)
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert config["rank_pattern"] == theirs.peft_config["default"].rank_pattern
    assert config["alpha_pattern"] == theirs.peft_config["default"].alpha_pattern
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    for key, value in adapter.items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], key)
    # and by itself: a module of the group at a smaller rank holds the first rows of the widest's lora_A
    for group in uneven:
        widest = adapter[f"base_model.model.{max(group, key=ranks.get)}.lora_A.weight"]
        for module in group:
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            assert a.shape[0] == ranks[module] and torch.equal(a, widest[:ranks[module]]), module


def test_eva_runs_as_many_passes_as_peft_loop_does(models, tmp_path, monkeypatch, capsys):
    """PEFT's loop cycles the samples until every share has converged, with no bound: four
    samples at tau 0.9999 take ~190 passes (a bound of 50 passes once refused runs like it).
    The same adapter, bit for bit. A loop that does reach the bound is refused, naming the
    inputs that had not converged, and no output is written; its progress bar counts steps
    and converged inputs, as PEFT's does."""
    texts, options = TEXTS[:4], dict(calibration_batch=2, eva_rho=1.0, eva_tau=0.9999)
    res = pissa_rs.decompose_checkpoint(models["llama"], r=R, method="eva", out=tmp_path / "o", progress=False,
                                        calibration=texts, calibration_samples=4, calibration_length=LENGTH, **options)
    passes = res.report["calibration"]["passes"]
    assert passes > 100, passes
    state = peft_eva(models["llama"], 1.0, 2, texts=texts, tau=0.9999).state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    for key, value in adapter.items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], key)
    from pissa_rs.engine import components

    monkeypatch.setattr(components, "MOST_EVA_PASSES", int(passes) - 1)
    with pytest.raises(CalibrationError, match=rf"components of \['model.layers.\d.*did not converge \(tau 0.9999\) "
                                               rf"in {int(passes) - 1} passes"):
        pissa_rs.decompose_checkpoint(models["llama"], r=R, method="eva", out=tmp_path / "short", progress=True,
                                      calibration=texts, calibration_samples=4, calibration_length=LENGTH, **options)
    assert not (tmp_path / "short").exists()
    assert re.search(rf"components: .*{(int(passes) - 1) * 2}step.*\d/8 inputs converged", capsys.readouterr().err)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_eva_steps_read_the_layers_from_the_page_cache_until_the_end(tmp_path, monkeypatch, family):
    """Every step reads every layer again: its reads leave the pages in the page cache, so a
    model that fits is read from memory, not from disk, at each step (a MoE's experts too, read
    an expert at a time); the end of the run drops them, as every run leaves the cache as it
    found it."""
    from make_tiny_model import byte_tokenizer
    from pissa_rs._pissa_rs import cached_bytes
    from pissa_rs.engine import components

    # layers of 3 MB (experts: 8 MB), so that what a read leaves behind (its partial pages) is small beside them
    if family == "llama":
        src = save_tiny_model(tmp_path / "m", "llama", layers=2, hidden=256, intermediate=688, shard_size="2MB")
    else:
        src = tmp_path / "m"
        torch.manual_seed(0)
        transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        )).save_pretrained(src, max_shard_size="2MB")
        byte_tokenizer().save_pretrained(src)
    files = sorted(src.glob("*.safetensors"))
    os.sync()  # clean pages: the only kind a read's release can drop
    for f in files:
        f.read_bytes()

    def cached() -> float:
        sizes = [cached_bytes(str(f)) for f in files]
        return sum(c for c, _ in sizes) / sum(n for _, n in sizes)

    assert cached() > 0.9  # the files' own pages, all cached once read
    after_step, step = [], components._step
    monkeypatch.setattr(components, "_step", lambda *a, **k: (step(*a, **k), after_step.append(cached())))
    ours_eva(src, tmp_path / "o", eva_rho=1.0)
    assert len(after_step) > 2 and min(after_step) > 0.9, after_step
    assert cached() < 0.1


def test_eva_holds_one_layers_components_at_a_time(models, tmp_path, monkeypatch):
    """Each hook's components wait in a file of their own between the layers that use them:
    while a layer runs only its hooks' are in memory, between steps none (PEFT's loop holds
    every layer's; the adapter stays PEFT's bit for bit: the parity tests above)."""
    from pissa_rs.engine import components

    others, between, park, step = [], [], components._Loop.park, components._step

    def parking(loop, owners):
        owners = list(owners)
        others.append({o for o, h in loop.hooks.items() if hasattr(h.svd, "components_")} - set(owners))
        park(loop, owners)

    def stepping(stack, loop, *args, **kwargs):
        step(stack, loop, *args, **kwargs)
        between.append([o for o, h in loop.hooks.items() if hasattr(h.svd, "components_")])
        assert all(loop.parked_file(o).is_file() for o in loop.parked) and loop.parked == set(loop.hooks)

    monkeypatch.setattr(components._Loop, "park", parking)
    monkeypatch.setattr(components, "_step", stepping)
    ours_eva(models["llama"], tmp_path / "o", eva_rho=2.0)
    assert len(others) > 8 and not any(others) and len(between) > 2 and not any(between)


def test_both_calibration_passes_bound_the_heap(models, tmp_path, monkeypatch):
    """Their tensors of a few MiB, freed at every layer, go back to the system
    (tests/test_heap.py shows what that does)."""
    from pissa_rs.engine import heap

    calls = []
    monkeypatch.setattr(heap, "bound_heap", lambda: calls.append(1) or True)
    ours_eva(models["llama"], tmp_path / "e", eva_rho=1.0)
    assert calls == [1]
    ours(models["llama"], tmp_path / "c", "ipm")
    assert calls == [1, 1]


def test_calibration_dtype_is_checked_before_anything_is_written(models, tmp_path):
    with pytest.raises(ValueError, match=r"calibration_dtype must be 'auto' or one of .*'bfloat16'.*got 'bf16'"):
        ours(models["llama"], tmp_path / "o", "ipm", calibration_dtype="bf16")
    with pytest.raises(ValueError, match=r"calibration_dtype is for the data-aware methods; method 'pissa'"):
        pissa_rs.decompose_checkpoint(models["llama"], r=R, out=tmp_path / "o", calibration_dtype="float32")
    assert not (tmp_path / "o").exists()


def test_eva_options_belong_to_eva(models, tmp_path):
    with pytest.raises(ValueError, match=r"eva_rho apply to method 'eva', not 'corda-ipm'"):
        ours(models["llama"], tmp_path / "o", "ipm", eva_rho=1.5)
    with pytest.raises(ValueError, match=r"eva_rho must be >= 1"):
        ours_eva(models["llama"], tmp_path / "o", eva_rho=0.5)
    with pytest.raises(ValueError, match=r"give one rank"):
        pissa_rs.decompose_checkpoint(models["llama"], r=[2, 4], method="eva", calibration=TEXTS,
                                      out=tmp_path / "r{r}")
    assert not (tmp_path / "o").exists()


@pytest.mark.floor
def test_eva_and_corda_convert_and_merge(models, tmp_path):
    """After training: EVA's adapter already is a LoRA of the original (rank kept); CorDA's
    converts as PiSSA's does (rank 2r); both merge into the logits of the tuned model."""
    from helpers import move_adapters

    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    for method, res in (("eva", ours_eva(models["llama"], tmp_path / "eva", eva_rho=1.0)),
                        ("corda-kpm", ours(models["llama"], tmp_path / "kpm", "kpm"))):
        tuned = pissa_rs.load_for_training(res.out, compute_dtype=torch.float32)
        move_adapters(tuned)
        tuned.save_pretrained(tmp_path / f"{method}-ft")
        expected = tuned.eval()(ids).logits
        lora = tmp_path / f"{method}-lora"
        pissa_rs.convert_to_lora(res.adapter, tmp_path / f"{method}-ft", lora)
        rank = json.loads((lora / "adapter_config.json").read_text())["r"]
        assert rank == (R if method == "eva" else 2 * R)
        on_original = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(models["llama"]),
                                                lora).eval()
        assert torch.allclose(on_original(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize("fmt", ["fp8-block", "compressed-channel"])
def test_an_fp8_source_calibrates_as_the_model_loaded_dequantized(tmp_path, fmt):
    """FP8 weights (transformers' fine-grained blocks; compressed-tensors per channel) are
    dequantized as the layers are read, as transformers dequantizes them when it loads the
    checkpoint: CorDA and EVA on the FP8 checkpoint are PEFT's own on the dequantized model
    (loaded in float32, the dtype the CPU runs the layers in), and the residual is bfloat16
    with no FP8 tensor, scale or quantization_config left."""
    from low_precision import save_compressed_fp8, save_dequantized, save_fp8_block

    src = tmp_path / "src"
    tokenizer = save_tokenizer(src, TEXTS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    if fmt == "fp8-block":
        save_fp8_block(model, src)
    else:
        save_compressed_fp8(model, src, strategy="channel")
    reference = save_dequantized(model, src, tmp_path / "reference")

    res = ours(src, tmp_path / "o", "ipm")
    assert res.report["source_format"] == ("fp8" if fmt == "fp8-block" else "compressed-tensors")
    theirs = peft_corda(reference, "ipm").state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in theirs if ".lora_" in k)
    for key, value in adapter.items():
        assert_close(value, theirs[key.replace(".weight", ".default.weight")], key)
    residual = tensors_of(res.out)
    assert {str(t.dtype) for t in residual.values()} == {"torch.bfloat16"}
    assert not [k for k in residual if k.endswith(("_scale", "_scale_inv"))]
    assert "quantization_config" not in json.loads((res.out / "config.json").read_text())
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        base = theirs[f"base_model.model.{key[:-len('weight')]}base_layer.weight"]
        assert_close(residual[key], base, key, rtol=2 ** -8)  # one bfloat16 rounding of the largest entry

    eva = ours_eva(src, tmp_path / "eva", eva_rho=1.0)
    state = peft_eva(reference, 1.0, 4).state_dict()
    for key, value in safetensors.torch.load_file(eva.adapter / "adapter_model.safetensors").items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], f"eva: {key}", rtol=1e-5)


def test_a_source_format_calibration_cannot_read_is_refused_by_name(tmp_path):
    """Weights the calibration forward cannot dequantize (here MXFP4, GPT-OSS's experts'
    format, named in config.json) are refused by name before anything is written."""
    path = save_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CalibrationError, match=r"m: .*MXFP4.*; calibration reads float, FP8 and packed INT "):
        ours(path, tmp_path / "o", "kpm")
    assert not (tmp_path / "o").exists()


MOE = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, {"num_local_experts": 4}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  {"num_experts": 4, "moe_intermediate_size": 48, "head_dim": 16}),
    # MLA attention; layer 0 a dense MLP (first_k_dense_replace), layer 1 routed and shared experts
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, {
        "n_routed_experts": 4, "moe_intermediate_size": 48, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 2, "topk_group": 1}),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# the attention PEFT's CorDA can hook: its hook transposes a 2-D input, and MLA's kv_b_proj
# sees its latent as [batch, 1, tokens, rank] (PEFT fails there), so that one is checked by hand
PEFT_ATTENTION = {"deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]}
BY_HAND = {"deepseek_v3": ["kv_b_proj"]}
MOE_LAYERS = {"deepseek_v3": 1}


def save_moe(path, family, top_k=2):
    tokenizer = save_tokenizer(path, TEXTS)
    config_cls, cls, extra = MOE[family]
    torch.manual_seed(0)
    model = cls(config_cls(**{"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                              "max_position_embeddings": 128, "num_experts_per_tok": top_k, **extra}))
    model.save_pretrained(path)
    return model


def routed_covariances(path, texts=TEXTS[:N], length=LENGTH, modules=()):
    """What PEFT's CorDA hooks would sum if they could hook each expert (and each router):
    the whole model fed sample by sample, each expert's inputs taken from the eager loop as
    transformers' Qwen3MoeExperts / MixtralExperts write it (the tokens routed to expert e,
    then act(gate) * up for its down_proj), normalized per sample and averaged over the
    samples that reached it. `modules`: names ending so get their input's covariance too,
    its rows the tokens whatever its shape (MLA's latent, [1, 1, tokens, rank])."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    sums: dict[tuple[str, int], torch.Tensor] = {}
    calls: dict[tuple[str, int], int] = {}

    def add(key, x):
        x = x.float() / torch.max(x.float()).abs()
        sums[key] = sums.get(key, 0) + x.T @ x
        calls[key] = calls.get(key, 0) + 1

    def experts_hook(name):
        def hook(experts, args):
            hidden, top_k = args[0], args[1]
            for e in range(experts.num_experts):
                tokens = hidden[(top_k == e).any(dim=-1)]
                if len(tokens):
                    gate, up = torch.nn.functional.linear(tokens, experts.gate_up_proj[e]).chunk(2, dim=-1)
                    add((f"{name}.gate_up_proj", e), tokens)
                    add((f"{name}.down_proj", e), experts.act_fn(gate) * up)
        return hook

    def router_hook(name):
        return lambda router, args: add((f"{name}.weight", None), args[0].reshape(-1, args[0].shape[-1]))

    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            module.register_forward_pre_hook(experts_hook(name))
        elif name.endswith("mlp.gate") and not isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(router_hook(name))
        elif name.endswith(tuple(modules)):
            module.register_forward_pre_hook(
                lambda linear, args, name=name: add((name, None), args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, truncation=True, max_length=length, return_tensors="pt"))
    return {key: total / calls[key] for key, total in sums.items()}, model


def expert_factors(adapter, t):
    e, n, r = t["expert"], t["num_experts"], t["r"]
    a = adapter[f"base_model.model.{t['module']}.lora_A.weight"].view(n, r, -1)[e]
    b = adapter[f"base_model.model.{t['module']}.lora_B.weight"].view(-1, r, n)[:, :, e]
    return a, b


# qwen3_moe with samples of 4 tokens: some samples route none to an expert, whose mean is
# then over the samples that reached it
@pytest.mark.parametrize("family, length", [("mixtral", LENGTH), ("qwen3_moe", 4), ("deepseek_v3", LENGTH)])
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_moe_experts_get_the_covariance_of_their_routed_tokens(tmp_path, family, length, mode):
    """Attention: PEFT's own CorDA on the whole model (through the MoE layers, so the layer-by-
    layer forward of the family is checked); experts and routers, which PEFT cannot hook: the
    CorDA of each expert's matrix with the covariance of the tokens routed to it, by hand."""
    from pissa_rs.methods.corda import damped_inverse

    path = tmp_path / "m"
    save_moe(path, family)
    res = ours(path, tmp_path / "o", mode, calibration_length=length)
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    peft_attention, by_hand = PEFT_ATTENTION.get(family, ATTENTION), BY_HAND.get(family, [])
    theirs = peft_corda(path, mode, target_modules=peft_attention, length=length).state_dict()
    attention = [k for k in adapter if any(f".{m}." in k for m in peft_attention)]
    assert len(attention) == 2 * len(peft_attention) * 2
    for key in attention:
        assert_close(adapter[key], theirs[key.replace(".weight", ".default.weight")], key, rtol=1e-5)

    covariances, model = routed_covariances(path, length=length, modules=by_hand)
    parameters = [t for t in res.report["tensors"] if t.get("parameter")]
    assert {t["parameter"].rsplit(".", 2)[-2] for t in parameters} >= {"experts"}
    moe_layers = MOE_LAYERS.get(family, 2)
    assert len([t for t in parameters if t.get("expert") is not None]) == moe_layers * 2 * 4  # x matrices x experts
    hand = [t for t in res.report["tensors"] if t["module"].endswith(tuple(by_hand))]
    assert len(hand) == 2 * len(by_hand)
    for t in parameters + hand:
        weight = model.get_parameter(t.get("parameter") or t["tensor"]).detach()
        weight = weight[t["expert"]] if t.get("expert") is not None else weight
        fixed, inverse, _ = damped_inverse(covariances[(t.get("parameter") or t["module"], t.get("expert"))])
        u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
        r = t["r"]  # fused gate_up_proj: PEFT's rank_pattern gives it 2r
        keep = slice(0, r) if mode == "ipm" else slice(len(s) - r, len(s))
        expected = (u[:, keep] * s[keep]) @ (vh[keep] @ inverse)
        if t.get("expert") is not None:
            a, b = expert_factors(adapter, t)
        else:
            a, b = (adapter[f"base_model.model.{t['module']}.lora_{x}.weight"] for x in "AB")
        delta = t["scale"] * b @ a
        gap = (delta - expected).abs().max().item()
        assert gap <= 1e-4 * expected.abs().max().item(), f"{t['tensor']}: off by {gap:.3g}"
        assert torch.allclose(torch.tensor(t["singular_values"]), s[keep], rtol=1e-4)
    experts = res.report["calibration"]["experts"]
    assert not experts["all_experts"] and len(experts["parameters"]) == 2 * moe_layers
    reached = [n for seen in experts["parameters"].values() for n in seen["samples"]]
    assert max(reached) == N and (min(reached) < N) == (length < LENGTH)
    # PEFT loads it (experts as ParamWrapper LoRAs), the original logits come back, it trains
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    original = model(ids).logits
    tuned = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(res.out), res.adapter,
                                      is_trainable=True)
    assert torch.allclose(tuned(ids).logits, original, atol=1e-4)
    tuned(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in tuned.named_parameters() if "lora_" in n)
    assert pissa_rs.verify(res.out, against=path).ok


def test_expert_covariances_beyond_the_device_take_passes_of_the_same_bytes(tmp_path):
    """A layer whose experts' covariances outweigh the device (DeepSeek-V3: 52.6 GB of gate_up
    covariances beside 22.5 GB of experts) runs its forward once per range of experts that fits,
    each range's means waiting in host memory: the output has the bytes of the one-pass run (the
    same sums, in the same order, per expert), the report says the passes, and nothing is left
    in the work folder. On a CPU the room is --host-memory; a GPU's is its free memory (below)."""
    from pissa_rs.engine.device_memory import covariance_passes

    path = tmp_path / "m"
    save_moe(path, "qwen3_moe")
    one = ours(path, tmp_path / "one", "kpm", calibration_batch=2)
    targets = pissa_rs.plan(path, r=R, method="corda-kpm", calibration=TEXTS, calibration_samples=N,
                            calibration_length=LENGTH, out=tmp_path / "p").targets
    layer0 = [t for t in targets if ".layers.0." in (t.parameter or t.module)]
    whole = covariance_passes(layer0, 4, 1 << 40, 2 * LENGTH)  # batches of 2 samples
    assert whole.experts is None and whole.num_experts == 4 and whole.per_expert == 4 * (64**2 + 48**2)
    assert whole.batch == 2 * LENGTH * 96 * 16  # the widest target's dimension: the MLP's 96
    room = whole.weights + whole.covariances + whole.batch + 3 * whole.per_expert  # passes [0, 3), [3, 4)
    assert covariance_passes(layer0, 4, room, 2 * LENGTH).experts == 3
    assert covariance_passes(layer0, 4, room - 1, 2 * LENGTH).experts == 2
    three = ours(path, tmp_path / "three", "kpm", calibration_batch=2, host_memory=room)
    assert three.report["calibration"]["experts"]["experts_per_pass"] == {"model.layers.0": 3, "model.layers.1": 3}
    assert "experts_per_pass" not in one.report["calibration"]["experts"]
    assert three.report["calibration"]["experts"]["parameters"] == one.report["calibration"]["experts"]["parameters"]
    # a budget below one expert: on a CPU still one a pass (a GPU that small is refused: test_device_memory)
    each = ours(path, tmp_path / "each", "kpm", calibration_batch=2, host_memory=1)
    assert each.report["calibration"]["experts"]["experts_per_pass"] == {"model.layers.0": 1, "model.layers.1": 1}
    expected = tensors_of(one.out)
    for res in (three, each):
        assert (res.adapter / "adapter_model.safetensors").read_bytes() == \
            (one.adapter / "adapter_model.safetensors").read_bytes()
        found = tensors_of(res.out)
        assert found.keys() == expected.keys() and all(torch.equal(found[k], v) for k, v in expected.items())


def test_sigkill_in_a_later_pass_of_expert_covariances_resumes_byte_identically(tmp_path):
    """Two passes a layer (3 experts, then 1), 4 batches each: killed in layer 1's second pass
    (call 14), the rerun starts layer 1 again from its saved input and writes the same bytes."""
    from pissa_rs.engine.device_memory import covariance_passes

    path = tmp_path / "m"
    save_moe(path, "qwen3_moe")
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    targets = pissa_rs.plan(path, r=R, method="corda-kpm", calibration=TEXTS, calibration_samples=N,
                            calibration_length=LENGTH, out=tmp_path / "p").targets
    whole = covariance_passes([t for t in targets if ".layers.0." in (t.parameter or t.module)], 4, 1 << 40,
                              3 * LENGTH)
    room = ["--host-memory", str(whole.weights + whole.covariances + whole.batch + 3 * whole.per_expert)]
    assert run_cli(path, tmp_path / "ref", data, extra=room).returncode == 0
    out = tmp_path / "o"
    killed = run_cli(path, out, data, env={"PISSA_RS_SIGNAL_AT": "calibrate:14"}, extra=room)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not list((out / ".pissa_units" / "calibration").glob("experts-*"))  # the host stacks leave nothing
    assert run_cli(path, out, data, extra=room).returncode == 0
    report = json.loads((out / "pissa_report.json").read_text())
    assert report["calibration"]["resumed_at_layer"] == 1
    assert report["calibration"]["experts"]["experts_per_pass"] == {"model.layers.0": 3, "model.layers.1": 3}
    config = "pissa_init/adapter_config.json"  # names its own folder as the base
    assert {k: v for k, v in digest(out).items() if k not in ("pissa_report.json", config)} == \
        {k: v for k, v in digest(tmp_path / "ref").items() if k not in ("pissa_report.json", config)}


def test_fp8_moe_experts_calibrate_as_their_dequantized_copy(tmp_path):
    """Qwen3-MoE with every Linear in FP8, experts as per-expert tensors (as Qwen3-FP8 ships):
    the experts, merged at load, are dequantized as they are read; the run gives the bytes of
    the same run on a bfloat16 copy of the dequantized weights (PEFT has no CorDA for experts)."""
    from low_precision import save_dequantized, save_fp8_block

    src = tmp_path / "src"
    model = save_moe(src, "qwen3_moe")
    save_fp8_block(model, src, block=(16, 16))
    assert any(".experts.0." in k and k.endswith("_scale_inv") for k in tensors_of(src))
    reference = save_dequantized(model, src, tmp_path / "reference")
    runs = [ours(path, tmp_path / f"o-{path.name}", "ipm") for path in (src, reference)]
    adapters = [safetensors.torch.load_file(r.adapter / "adapter_model.safetensors") for r in runs]
    assert sorted(adapters[0]) == sorted(adapters[1]) and any(".experts." in k for k in adapters[0])
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    residuals = [tensors_of(r.out) for r in runs]
    assert sorted(residuals[0]) == sorted(residuals[1]) and any(".experts." in k for k in residuals[0])
    assert all(torch.equal(residuals[0][k], residuals[1][k]) for k in residuals[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moe_on_a_gpu_is_the_cpu_run(tmp_path):
    """The calibration on a GPU: the layers, the hidden states and the covariances on the
    device, each statistic copied to the host as it is saved (an expert at a time), gives the
    CPU run's output within the rounding of another device's float32 (the residuals and the
    singular values kept; the factors' signs are the SVD's to choose, so they are not compared)."""
    path = tmp_path / "m"
    save_moe(path, "mixtral")
    runs = {device: ours(path, tmp_path / device.replace(":", ""), "ipm", device=device,
                         calibration_dtype="float32") for device in ("cpu", "cuda:0")}
    cpu, gpu = (tensors_of(runs[d].out) for d in ("cpu", "cuda:0"))
    assert sorted(cpu) == sorted(gpu)
    for key in cpu:
        assert_close(gpu[key], cpu[key], key, rtol=1e-4)
    for a, b in zip(runs["cpu"].report["tensors"], runs["cuda:0"].report["tensors"]):
        assert (a["tensor"], a.get("expert")) == (b["tensor"], b.get("expert"))
        assert torch.allclose(torch.tensor(b["singular_values"]), torch.tensor(a["singular_values"]), rtol=1e-3)
    assert runs["cuda:0"].report["calibration"]["experts"] == runs["cpu"].report["calibration"]["experts"]
    assert pissa_rs.verify(runs["cuda:0"].out, against=path).ok


@pytest.mark.floor  # (the test above needs PEFT's corda module, which PEFT 0.20 cannot import without attrs)
def test_moe_every_token_to_every_expert_and_the_sparse_ones_named(tmp_path):
    path = tmp_path / "m"
    save_moe(path, "qwen3_moe")
    routed = ours(path, tmp_path / "routed", "ipm")
    every = ours(path, tmp_path / "every", "ipm", calibrate_all_experts=True)
    tokens = sum(routed.report["calibration"]["lengths"])
    for name, seen in every.report["calibration"]["experts"]["parameters"].items():
        assert seen["tokens"] == [tokens] * 4 and not seen["damped"], name
        assert sum(routed.report["calibration"]["experts"]["parameters"][name]["tokens"]) == 2 * tokens  # top-2
    a, b = (safetensors.torch.load_file(r.adapter / "adapter_model.safetensors") for r in (routed, every))
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    assert not torch.allclose(a[key], b[key])
    assert every.report["options"]["calibrate_all_experts"] is True
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    original = transformers.AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits
    tuned = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(every.out), every.adapter)
    assert torch.allclose(tuned(ids).logits, original, atol=1e-4)  # PEFT loads the experts' LoRAs
    with pytest.raises(ValueError, match=r"calibrate_all_experts apply to methods 'corda-ipm', 'corda-kpm', not"):
        pissa_rs.decompose_checkpoint(path, r=R, calibrate_all_experts=True, out=tmp_path / "p")
    # two short samples: each expert sees fewer tokens than its input's width, and is named
    few = ours(path, tmp_path / "few", "kpm", calibration_samples=2, calibration_length=12)
    damped = few.report["calibration"]["experts"]["parameters"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert damped["damped"] == [0, 1, 2, 3] and sum(damped["tokens"]) == 2 * 2 * 12


def test_moe_an_expert_no_token_reaches_is_named(tmp_path):
    """Top-1 routing whose router can never pick experts 2 and 3 (their logits 0, one of
    experts 0 and 1 always above): calibration cannot see those experts, and says so."""
    path = tmp_path / "m"
    model = save_moe(path, "mixtral", top_k=1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            v = torch.randn(w.shape[1])
            w[0], w[1], w[2], w[3] = 100 * v, -100 * v, 0, 0
    model.save_pretrained(path)
    with pytest.raises(CalibrationError, match=r"model.layers.0.mlp.experts.\w+: no calibration token was "
                                               r"routed to expert\(s\) \[2, 3\].*calibrate_all_experts"):
        ours(path, tmp_path / "o", "ipm")
    assert ours(path, tmp_path / "o2", "ipm", calibrate_all_experts=True).report["calibration"]["experts"]


def test_eva_on_moe_adapts_the_linear_modules_and_names_the_experts(tmp_path):
    from peft import AutoPeftModelForCausalLM

    path = tmp_path / "m"
    save_moe(path, "mixtral")
    res = ours_eva(path, tmp_path / "o", eva_rho=1.0)
    left = {item["name"]: item["why"] for item in res.report["left_out"]}
    assert "PEFT has no eva variant" in left["gate_up_proj"]
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert adapter and not [k for k in adapter if ".experts." in k or ".gate." in k]
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["target_parameters"]  # nothing left for the experts
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no pattern PEFT would find unused
        AutoPeftModelForCausalLM.from_pretrained(res.adapter)


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_eva_on_deepseek_v3_is_peft_own_with_the_mla_latent_taken_as_tokens(tmp_path, rho):
    """MLA's kv_b_proj sees its latent as [batch, 1, tokens, rank], which PEFT's default input
    selection cannot index (PEFT's EVA fails on DeepSeek-V3); ours takes it as the tokens it
    is. The oracle: PEFT's own EVA loop given a selection that does the same, written here."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    def unpadded(layer_input, model_input, name):
        x = layer_input[0] if isinstance(layer_input, tuple) else layer_input
        x = x.squeeze(1) if x.dim() == 4 else x
        return x[model_input.T.unbind()]

    path = tmp_path / "m"
    save_moe(path, "deepseek_v3")
    res = ours_eva(path, tmp_path / "o", eva_rho=rho)
    config = json.loads((res.adapter / "adapter_config.json").read_text())
    assert any(m.endswith("kv_b_proj") for m in config["target_modules"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs = get_peft_model(model, LoraConfig(r=R, lora_alpha=R, target_modules=config["target_modules"],
                                              init_lora_weights="eva", lora_dropout=0.0,
                                              eva_config=EvaConfig(rho=rho), task_type="CAUSAL_LM"))
    initialize_lora_eva_weights(theirs, padded_batches(tokenizer, TEXTS[:N], 4), show_progress_bar=False,
                                prepare_layer_inputs_fn=unpadded)
    assert config["rank_pattern"] == theirs.peft_config["default"].rank_pattern
    state = theirs.state_dict()
    adapter = safetensors.torch.load_file(res.adapter / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(k.replace(".default.weight", ".weight") for k in state if ".lora_" in k)
    assert any(".kv_b_proj." in k for k in adapter)
    for key, value in adapter.items():
        assert_close(value, state[key.replace(".weight", ".default.weight")], key, rtol=1e-5)


def test_eva_pass_killed_mid_pass_resumes_at_the_last_pass_saved(tmp_path):
    """EVA's pass (before the plan): killed after its first pass over the samples, the rerun
    starts from the hooks' states saved after the last pass done, and writes the same adapter."""
    model = save_model(tmp_path / "m", layers=4)
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    reference = tmp_path / "ref"
    assert run_cli(model, reference, data, method="eva").returncode == 0
    ref = json.loads((reference / "pissa_report.json").read_text())
    per_pass = 4 * 4  # the first pass: layers x batches (3 of the 12 samples each), a fault point each
    assert ref["calibration"]["passes"] > 3
    out = tmp_path / "o"
    killed = run_cli(model, out, data, env={"PISSA_RS_SIGNAL_AT": f"calibrate:{2 * per_pass + 5}"}, method="eva")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    scratch = tmp_path / ".o-eva-pass"
    state = json.loads((scratch / "state.json").read_text())
    assert state["step"] % 4 == 0 and 4 <= state["step"] < ref["calibration"]["steps"]
    assert not (out / "pissa_report.json").exists()
    assert run_cli(model, out, data, method="eva").returncode == 0
    assert not scratch.exists()
    config = "pissa_init/adapter_config.json"
    assert {k: v for k, v in digest(out).items() if k not in ("pissa_report.json", config)} == \
        {k: v for k, v in digest(reference).items() if k not in ("pissa_report.json", config)}
    mine = json.loads((out / "pissa_report.json").read_text())
    assert mine["calibration"]["resumed_at_step"] == state["step"] and mine["eva"] == ref["eva"]
    for key in ("steps", "batches_seen"):
        assert mine["calibration"][key] == ref["calibration"][key]


def test_a_computed_covariance_leaves_this_process_memory(tmp_path, monkeypatch):
    """One shard over 4 layers: every covariance waits, saved, for the one unit. When each
    target's computation starts, no file of a covariance whose targets are all computed is
    still mapped (its pages, made resident by that computation, count in VmHWM while it is):
    each went with its own file's mapping, not when every covariance saved beside it had
    been used."""
    from pathlib import Path

    from make_tiny_model import save_tiny_model
    from safetensors import safe_open

    import pissa_rs.engine.run as run

    src = save_tiny_model(tmp_path / "m", "llama", layers=4, shard_size="100MB")
    state = tmp_path / "o" / ".pissa_units" / "calibration" / "state.json"
    done, stale, starts = set(), [], []
    real = run.compute_target

    def spy(index, *args, **kwargs):
        places = {int(i): tuple(at) for i, at in json.loads(state.read_text())["pending"].items()}
        mapped = {line.split()[-1] for line in open("/proc/self/maps") if "/calibration/pending-" in line}
        for path in mapped:
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    users = {i for i, at in places.items() if at == (Path(path).name, key)}
                    if users <= done:
                        stale.append((index, Path(path).name, key))
        starts.append(index)
        out = real(index, *args, **kwargs)
        done.add(index)
        return out

    monkeypatch.setattr(run, "compute_target", spy)
    pissa_rs.decompose_checkpoint(src, out=tmp_path / "o", r=4, method="corda-ipm", progress=False,
                                  calibration=calibration_texts(8), calibration_length=32)
    assert len(starts) == 28 and not stale, stale


def test_covariances_waiting_for_their_unit_are_held_as_views_of_their_saved_file(tmp_path, monkeypatch):
    """One shard over 4 layers: the covariances of layers 0-3 wait for the unit that runs after
    layer 3. Once saved for resume they are held as views of their files (host memory does not grow with the layers
    waiting), and the output is byte for byte that of holding the tensors themselves."""
    from make_tiny_model import save_tiny_model

    import pissa_rs.engine.sequential as sequential

    src = save_tiny_model(tmp_path / "m", "llama", layers=4, shard_size="10MB")
    options = dict(r=4, method="corda-ipm", calibration=calibration_texts(8), calibration_length=32, progress=False)
    views, mapped = [], sequential._Carried._mapped
    monkeypatch.setattr(sequential._Carried, "_mapped", lambda self, keys: views.append(mapped(self, keys)) or views[-1])
    viewed = pissa_rs.decompose_checkpoint(src, out=tmp_path / "viewed", **options)
    assert [len(v) for v in views] == [7, 14, 21, 28]  # each layer's 7 targets join the waiting ones
    save = sequential._Carried.save
    monkeypatch.setattr(sequential._Carried, "save", lambda self, next_layer, hidden, pending, *rest, **kw: (
        save(self, next_layer, hidden, pending, *rest, **kw), pending)[1])  # the tensors themselves kept
    held = pissa_rs.decompose_checkpoint(src, out=tmp_path / "held", **options)
    own = ("pissa_report.json", "pissa_init/adapter_config.json")  # timings; the config names its own folder
    mine, theirs = digest(viewed.out), digest(held.out)
    assert set(mine) == set(theirs)
    assert {k: v for k, v in mine.items() if k not in own} == {k: v for k, v in theirs.items() if k not in own}
