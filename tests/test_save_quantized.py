"""save_quantized: the QPiSSA residual written already quantized, in the serialized
bitsandbytes format transformers loads with no quantization at load time."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import same_output
from make_tiny_model import save_tiny_model
from safetensors import safe_open

import pissa_rs
from pissa_rs.formats import bnb_reference as ref
from pissa_rs.cli import main
from pissa_rs.tensors import as_torch

bnb = pytest.importorskip("bitsandbytes")


def tensors(directory) -> dict[str, torch.Tensor]:
    found = {}
    for path in glob.glob(f"{directory}/*.safetensors"):
        with safe_open(path, "pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys()})
    return found


def bnb_config(kind: str, double_quant: bool = False):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sq") / "m", "llama", layers=2, dtype="bfloat16", hidden=128,
                           intermediate=256, decay=0.7)


def decompose(src, out, **kwargs):
    return pissa_rs.decompose_checkpoint(src, r=8, out=out, quant_iters=2, progress=False, **kwargs)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_output_is_what_transformers_itself_saves_for_the_residual_loaded_quantized(model, tmp_path, kind):
    """Every tensor (name, dtype, shape, bytes) and config.json equal transformers'
    own save_pretrained of the same residual loaded with BitsAndBytesConfig; the
    adapter is the one an unquantized run writes."""
    from transformers import AutoModelForCausalLM

    dense = decompose(model, tmp_path / "dense", quantize=kind)
    stored = decompose(model, tmp_path / "stored", quantize=kind, save_quantized=True)
    loaded = AutoModelForCausalLM.from_pretrained(dense.out, quantization_config=bnb_config(kind), dtype="auto")
    loaded.save_pretrained(tmp_path / "theirs")
    theirs, ours = tensors(tmp_path / "theirs"), tensors(stored.out)
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape and torch.equal(ours[name], t), name
    config = json.loads((stored.out / "config.json").read_text())
    assert config == json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    adapter = "pissa_init/adapter_model.safetensors"
    assert (stored.out / adapter).read_bytes() == (dense.out / adapter).read_bytes()
    # Every Linear weight of the layers is stored quantized: loading reads no 16-bit copy of one.
    linear = [n for n in ours if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    assert len(linear) == 14 and all(ours[n].dtype in (torch.uint8, torch.int8) for n in linear)
    assert stored.report["stored_quantized"].keys() == set(linear)


def dequantized_layers(model) -> dict[str, torch.Tensor]:
    """Each bitsandbytes layer's weight as stored in it, dequantized by the reference."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            q = ref.Quantized4bit(module.weight.data, state.absmax, state.quant_type, state.blocksize,
                                  tuple(state.shape), state.dtype)
            if state.nested:
                q.nested_absmax, q.nested_offset = state.state2.absmax, state.offset.item()
            weights[name.removesuffix(".base_layer")] = ref.dequantize_4bit(q)
    return weights


@pytest.mark.parametrize("double_quant", [False, True])
def test_loaded_layers_hold_exactly_the_computed_residual_and_train(model, tmp_path, double_quant):
    dense = decompose(model, tmp_path / "dense", quantize="nf4", double_quant=double_quant)
    stored = decompose(model, tmp_path / "stored", quantize="nf4", double_quant=double_quant, save_quantized=True)
    trained = pissa_rs.load_for_training(stored.out, compute_dtype=torch.float32)
    layers = dequantized_layers(trained)
    assert len(layers) == 14
    computed = pissa_rs.Checkpoint(dense.out)
    for t in stored.report["tensors"]:
        (weight,) = [w for name, w in layers.items() if name.endswith(t["module"])]
        residual = as_torch(computed.buffer(t["tensor"]))
        if double_quant:  # no fixed point exists: the stored codes are deq(quant(residual)) of that residual
            expected = ref.dequantize_4bit(ref.quantize_4bit(residual, "nf4", double_quant=True))
            assert torch.equal(weight, expected), t["tensor"]
        else:  # the computed residual is a fixed point: its codes give it back exactly
            assert torch.equal(weight, residual), t["tensor"]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    trained.train()
    loss = trained(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [p for p in trained.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and trainable and all(p.grad is not None for p in trainable)


def test_report_error_equals_a_recomputation_and_verify_names_a_corrupted_code(model, tmp_path):
    res = decompose(model, tmp_path / "o", quantize="nf4", save_quantized=True)
    measured = pissa_rs.measure_quantization_error(res.out, model)
    reported = {t["tensor"]: t for t in res.report["tensors"]}
    for t in measured["tensors"]:
        assert t["error_reduction"] == pytest.approx(reported[t["tensor"]]["error_reduction"], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="stored quantized as nf4"):
        pissa_rs.measure_quantization_error(res.out, model, quantize="fp4")
    assert pissa_rs.verify(res.out, against=model).ok
    name = "model.layers.1.mlp.up_proj.weight"
    info = pissa_rs.Checkpoint(res.out).info(name)
    path = res.out / os.path.basename(info.file)
    data = bytearray(path.read_bytes())
    data[info.start + 5] ^= 0x88  # two codes of one byte, each moved by half the code range
    path.write_bytes(bytes(data))
    problems = pissa_rs.verify(res.out, against=model).problems
    assert len(problems) == 1 and problems[0].startswith(name), problems


def test_merge_gives_a_plain_model_and_to_lora_takes_the_adapter(model, tmp_path):
    from transformers import AutoModelForCausalLM

    res = decompose(model, tmp_path / "o", quantize="int8", save_quantized=True)
    merged = pissa_rs.merge_adapter(res.out, res.adapter, tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    original, back = tensors(model), tensors(merged)
    assert set(back) == set(original)
    for name, w in original.items():
        assert back[name].dtype == w.dtype and back[name].shape == w.shape, name
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    first = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, first(input_ids=ids).logits
    assert (a - b).norm() < 0.05 * b.norm()  # int8's rounding of the residual, not more
    lora = pissa_rs.convert_to_lora(res.adapter, res.adapter, tmp_path / "lora")
    assert lora.ranks and all(r == 16 for r in lora.ranks.values())


def test_conv1d_weights_are_stored_transposed_as_transformers_does(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny_model(tmp_path / "g", "gpt2", layers=1, dtype="float16", hidden=128, decay=0.7)
    dense = pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "dense", quantize="nf4", progress=False)
    stored = pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "stored", quantize="nf4", save_quantized=True,
                                           progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(dense.out, quantization_config=bnb_config("nf4"), dtype="auto")
    loaded.save_pretrained(tmp_path / "theirs")
    theirs, ours = tensors(tmp_path / "theirs"), tensors(stored.out)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[n], t) for n, t in theirs.items())
    assert pissa_rs.verify(stored.out, against=src).ok
    assert pissa_rs.load_for_training(stored.out, compute_dtype=torch.float32) is not None


def test_options_are_checked(model, tmp_path):
    with pytest.raises(ValueError, match="save_quantized needs quantize"):
        pissa_rs.decompose_checkpoint(model, r=4, out=tmp_path / "o", save_quantized=True, progress=False)
    single = tmp_path / "single.safetensors"
    single.write_bytes(sorted(model.glob("*.safetensors"))[0].read_bytes())
    with pytest.raises(pissa_rs.TargetError, match="save_quantized needs the model's config.json"):
        pissa_rs.decompose_checkpoint(single, r=4, out=tmp_path / "o2", quantize="nf4", save_quantized=True,
                                      target_modules=["q_proj"], progress=False)
    res = decompose(model, tmp_path / "o3", quantize="nf4", save_quantized=True)
    with pytest.raises(ValueError, match="stored quantized as nf4"):
        pissa_rs.load_for_training(res.out, quantize="int8")


def test_cli_dry_run_and_an_interrupted_run_resumes_byte_identically(model, tmp_path, capsys):
    args = ["decompose", str(model), "-r", "4", "--quantize", "nf4", "--save-quantized", "--no-progress",
            "--no-measure-error"]
    assert main([*args, "-o", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "14 weights stored pre-quantized as nf4" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "ref")]) == 0
    assert "14 weights stored as nf4" in capsys.readouterr().out
    cli = [sys.executable, "-m", "pissa_rs.cli", *args, "-o", str(tmp_path / "o")]
    killed = subprocess.run(cli, env={**os.environ, "PISSA_RS_SIGNAL_AT": "target:5"}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    again = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr
    same_output(tmp_path / "o", tmp_path / "ref")
    assert "kernels-community" not in again.stderr  # a library's noise is not shown as ours


def test_several_ranks_and_several_devices(model, tmp_path):
    """One read, one output per rank, each stored quantized; two CPU workers give the bytes of one."""
    many = pissa_rs.decompose_checkpoint(model, r=[4, 8], out=str(tmp_path / "r{r}"), quantize="nf4", quant_iters=2,
                                         save_quantized=True, progress=False)
    assert [len(r.report["stored_quantized"]) for r in many] == [14, 14]
    assert all(pissa_rs.verify(r.out, against=model).ok for r in many)
    two = pissa_rs.decompose_checkpoint(model, r=8, out=tmp_path / "two", quantize="nf4", quant_iters=2,
                                        save_quantized=True, progress=False, devices=["cpu", "cpu"])
    one = pissa_rs.decompose_checkpoint(model, r=8, out=tmp_path / "one", quantize="nf4", quant_iters=2,
                                        save_quantized=True, progress=False)
    same_output(two.out, one.out)
