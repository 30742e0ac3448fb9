"""QPiSSA: quantization-aware residuals, the paper's error metric, LoftQ for
comparison, and 4-bit / 8-bit training on the stored residual."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from make_tiny_model import save_tiny_model, spectrum_matrix

import pissa_rs
from pissa_rs.cli import main
from pissa_rs.quant import (
    QUANT_TYPES,
    Quantization,
    loftq_error,
    qpissa_factors_at_ranks,
    quantization_error,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def decaying(rows=192, cols=320, seed=0, dtype=torch.float32):
    return spectrum_matrix(rows, cols, decay=0.8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reductions(weight, kind, iters, r=16):
    quant = Quantization(kind)
    f = qpissa_factors_at_ranks(weight, [(r, 1.0)], quant, iters, niter=4, seed=3)[0]
    measured = quantization_error(weight, f.residual, f.lora_A, f.lora_B, 1.0, quant)
    return measured.reduction, 1 - loftq_error(weight, r, iters, quant) / measured.qlora_error


@pytest.mark.parametrize("kind", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qpissa_removes_more_error_with_more_iterations_and_more_than_loftq(kind, dtype):
    w = decaying(dtype=dtype)
    one, loftq_one = reductions(w, kind, 1)
    five, loftq_five = reductions(w, kind, 5)
    assert 0 < one < five < 1
    assert one > loftq_one and five > loftq_five
    assert loftq_one < loftq_five


def qpissa_step_by_step(weight, r, scale, quant, iters, niter, seed):
    """The design's QPiSSA, one step at a time: res = W; T times: (A, B) = top-r factors of
    res; deq = deq(quant(W - s*B@A)); res = W - deq. Returns (A, B, deq)."""
    from pissa_rs.factors import factors_at_ranks

    w, res = weight.float(), weight
    for _ in range(iters):
        f = factors_at_ranks(res, [(r, scale)], niter, seed)[0]
        deq = quant.project(w - scale * (f.lora_B.float() @ f.lora_A.float()), weight.dtype)
        res = w - deq.float()
    return f.lora_A, f.lora_B, deq


@pytest.mark.parametrize("iters", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qpissa_runs_exactly_the_iterations_asked(iters, dtype):
    """Pinned against the step-by-step reference: one iteration fewer or more gives other factors."""
    w, quant = decaying(rows=96, cols=128, dtype=dtype), Quantization("nf4")
    f = qpissa_factors_at_ranks(w, [(8, 2.0)], quant, iters, niter=2, seed=5)[0]
    for t in (iters - 1, iters, iters + 1):
        a, b, deq = qpissa_step_by_step(w, 8, 2.0, quant, t, niter=2, seed=5)
        same = torch.equal(f.lora_A, a) and torch.equal(f.lora_B, b) and torch.equal(f.residual, deq)
        assert same == (t == iters), t


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(QUANT_TYPES), dtype=st.sampled_from(DTYPES), rows=st.integers(1, 40),
       cols=st.sampled_from([64, 96, 130]), scale=st.floats(1e-3, 1e2), seed=st.integers(0, 2**16))
def test_stored_residual_is_a_fixed_point_and_within_the_error_bound(kind, dtype, rows, cols, scale, seed):
    quant = Quantization(kind)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    stored = quant.project(x, dtype)
    assert stored.dtype == dtype
    # Quantizing the stored residual again (what loading it in 4/8 bits does) gives it back exactly.
    assert torch.equal(quant.roundtrip(stored), stored)
    # The bound verify uses holds for the plain round trip.
    assert torch.all((quant.roundtrip(x) - x).abs() <= quant.error_bound(x))


def peft_loftq_on_cpu():
    """PEFT's own loftq_init, its compute device moved from CUDA to the CPU and
    nothing else changed: the oracle for our LoftQ baseline."""
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init.__wrapped__ if hasattr(loftq_utils.loftq_init, "__wrapped__")
                               else loftq_utils.loftq_init)
    # how PEFT picks the device: up to 0.21, then from 0.22 on
    needles = ['compute_device = "xpu" if is_xpu_available() else "cuda"', "compute_device = infer_device()"]
    needle = next((n for n in needles if n in source), None)
    assert needle is not None, "PEFT's loftq_init changed: update this oracle"
    namespace = dict(vars(loftq_utils))
    exec(source.replace(needle, 'compute_device = "cpu"').replace("@torch.no_grad()\n", ""), namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("kind,bits", [("nf4", 4), ("int8", 8)])
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_baseline_matches_peft_loftq_init(kind, bits, iters):
    w = decaying(128, 256)
    deq, lora_A, lora_B = peft_loftq_on_cpu()(w, num_bits=bits, reduced_rank=8, num_iter=iters)
    peft_error = torch.linalg.svdvals(w - deq - lora_B @ lora_A).double().sum().item()
    assert loftq_error(w, 8, iters, Quantization(kind)) == pytest.approx(peft_error, rel=1e-4)


def test_invalid_quantization_options_are_refused(tmp_path):
    src = save_tiny_model(tmp_path / "m", layers=1)
    for kwargs, message in [
        ({"quantize": "nf3"}, "quantize must be one of"),
        ({"quant_iters": 3}, "need quantize"),
        ({"compare_loftq": True}, "need quantize"),
        ({"quantize": "nf4", "quant_iters": 0}, "quant_iters must be an integer >= 1"),
        ({"quantize": "int8", "double_quant": True}, "double_quant applies to 4-bit"),
    ]:
        with pytest.raises(ValueError, match=message):
            pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def qpissa(tmp_path_factory):
    """A tiny Llama with trained-like spectra, decomposed for nf4 with 3 iterations."""
    root = tmp_path_factory.mktemp("qpissa")
    src = save_tiny_model(root / "m", "llama", layers=2, dtype="bfloat16", hidden=128, intermediate=256, decay=0.7)
    res = pissa_rs.decompose_checkpoint(src, r=16, out=root / "o", quantize="nf4", quant_iters=3,
                                        compare_loftq=True, progress=False)
    return src, res


def test_report_gives_each_weights_error_reduction_and_loftqs(qpissa):
    _, res = qpissa
    tensors = res.report["tensors"]
    assert len(tensors) == 14
    for t in tensors:
        assert 0 < t["error_reduction"] < 1 and t["quant_error"] < t["qlora_error"]
        assert t["error_reduction"] > t["loftq_error_reduction"], t["tensor"]
    totals = res.report["totals"]
    assert totals["error_reduction_mean"] == pytest.approx(sum(t["error_reduction"] for t in tensors) / 14)
    assert totals["loftq_error_reduction_mean"] < totals["error_reduction_mean"]
    assert res.report["options"]["quantize"] == "nf4" and res.report["options"]["quant_iters"] == 3


def test_reported_ratio_equals_an_independent_recomputation_from_the_files(qpissa, tmp_path, capsys):
    src, res = qpissa
    measured = pissa_rs.measure_quantization_error(res.out, src)
    assert measured["quantize"] == "nf4"
    reported = {t["tensor"]: t for t in res.report["tensors"]}
    assert {t["tensor"] for t in measured["tensors"]} == set(reported)
    for t in measured["tensors"]:
        assert t["error_reduction"] == pytest.approx(reported[t["tensor"]]["error_reduction"], rel=1e-5, abs=1e-6)
        assert t["qlora_error"] == pytest.approx(reported[t["tensor"]]["qlora_error"], rel=1e-5)
    assert main(["qerror", str(res.out), "--against", str(src), "--json", str(tmp_path / "q.json")]) == 0
    assert "nf4: mean error reduction" in capsys.readouterr().out
    assert json.loads((tmp_path / "q.json").read_text())["error_reduction_mean"] == pytest.approx(
        res.report["totals"]["error_reduction_mean"], rel=1e-5)


def dequantized_weights(model) -> dict[str, torch.Tensor]:
    """Each bitsandbytes layer's weight as it computes with it, by module name."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[name] = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[name] = bnbf.int8_vectorwise_dequant(module.weight.CB, module.weight.SCB)
    return {name.removesuffix(".base_layer"): w for name, w in weights.items()}


@pytest.mark.floor
def test_loading_the_stored_residual_in_4_bit_reproduces_it_exactly(qpissa):
    _, res = qpissa
    model = pissa_rs.load_for_training(res.out, quantize="nf4")
    loaded = dequantized_weights(model)
    ck = pissa_rs.Checkpoint(res.out)
    checked = 0
    for t in res.report["tensors"]:
        matches = [w for name, w in loaded.items() if name.endswith(t["module"])]
        assert len(matches) == 1, t["module"]
        assert torch.equal(matches[0], pissa_rs.as_torch(ck.buffer(t["tensor"]))), t["tensor"]
        checked += 1
    assert checked == 14


def test_quantized_output_verifies_and_a_corrupted_residual_is_named(qpissa, tmp_path):
    src, res = qpissa
    assert pissa_rs.verify(res.out, against=src).ok
    copy = tmp_path / "o"
    shutil.copytree(res.out, copy)
    name = "model.layers.1.mlp.down_proj.weight"
    info = pissa_rs.Checkpoint(copy).info(name)
    path = copy / info.file.rsplit("/", 1)[-1]
    data = bytearray(path.read_bytes())
    data[info.start + 1] ^= 0x40  # the exponent of the first bf16 value
    path.write_bytes(bytes(data))
    report = pissa_rs.verify(copy, against=src)
    assert len(report.problems) == 1 and report.problems[0].startswith(name)
    assert "nf4 quantization error" in report.problems[0]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_4bit_training_step_and_logits_closer_to_the_original_than_qlora(qpissa):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src, res = qpissa
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    original = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), ids)
    qlora_model = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    qlora = logits(qlora_model, ids)

    model = pissa_rs.load_for_training(res.out, quantize="nf4", compute_dtype=torch.float32)
    qpissa_logits = logits(model, ids)
    assert (qpissa_logits - original).norm() < 0.8 * (qlora - original).norm()

    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


@pytest.mark.parametrize("kind", ["fp4", "int8"])
def test_other_quantizations_round_trip_through_loading(kind, tmp_path):
    src = save_tiny_model(tmp_path / "m", "gpt2", layers=1, dtype="float16", decay=0.7)
    res = pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "o", quantize=kind, quant_iters=2, progress=False)
    assert res.report["totals"]["error_reduction_mean"] > 0
    assert pissa_rs.verify(res.out, against=src).ok
    model = pissa_rs.load_for_training(res.out, quantize=kind, compute_dtype=torch.float32)
    loaded = dequantized_weights(model)
    ck = pissa_rs.Checkpoint(res.out)
    for t in res.report["tensors"]:
        (weight,) = [w for name, w in loaded.items() if name.endswith(t["module"])]
        stored = pissa_rs.as_torch(ck.buffer(t["tensor"]))
        stored = stored.T if t["fan_in_fan_out"] else stored  # bitsandbytes holds Conv1D weights out x in
        assert torch.equal(weight.to(stored.dtype), stored), t["tensor"]


def test_cli_quantize_flags(tmp_path, capsys):
    src = save_tiny_model(tmp_path / "m", layers=1, decay=0.7)
    assert main(["decompose", str(src), "-r", "4", "-o", str(tmp_path / "o"), "--quantize", "nf4", "--quant-iters",
                 "2", "--double-quant", "--compare-loftq", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "nf4 error vs QLoRA:" in out and "LoftQ:" in out
    report = json.loads((tmp_path / "o" / "pissa_report.json").read_text())
    assert report["options"]["double_quant"] is True
    assert pissa_rs.verify(tmp_path / "o", against=src).ok


def test_error_measurement_can_be_skipped_and_the_plan_counts_it(tmp_path):
    src = save_tiny_model(tmp_path / "m", layers=1, hidden=128, intermediate=256, decay=0.7)
    plain = pissa_rs.plan(src, r=8)
    measured = pissa_rs.plan(src, r=8, quantize="nf4", quant_iters=3)
    assert "QPiSSA for nf4 x3 + error measurement" in measured.describe()
    assert "error measurement" not in plain.describe()
    res = pissa_rs.decompose_checkpoint(src, r=8, out=tmp_path / "o", quantize="nf4", quant_iters=2,
                                        measure_error=False, progress=False)
    assert "error_reduction" not in res.report["tensors"][0]
    assert "error_reduction_mean" not in res.report["totals"]
    # Measured afterwards from the files instead.
    assert pissa_rs.measure_quantization_error(res.out, src)["error_reduction_mean"] > 0
    with pytest.raises(ValueError, match="compare_loftq needs measure_error"):
        pissa_rs.plan(src, r=8, quantize="nf4", compare_loftq=True, measure_error=False)
