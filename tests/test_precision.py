"""The run's float32 products are IEEE whatever the caller set (TF32, bf16 on oneDNN), and the
caller's settings come back exactly as they were (precision.py)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs import precision
from helpers import same_output

# A caller's state set through either of torch's APIs (the per-backend one exists from 2.9).
CALLER_STATES = {
    "default": "",
    "legacy medium": "torch.set_float32_matmul_precision('medium')",
    "legacy high": "torch.set_float32_matmul_precision('high')",
    "legacy allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True",
    "per-backend cuda tf32": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "per-backend generic tf32": "torch.backends.fp32_precision = 'tf32'",
    "per-backend mkldnn bf16": "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",
}

SNAPSHOT = textwrap.dedent("""
    import json, sys, torch
    from pissa_rs.precision import ieee_float32, per_backend_api, float32_matmul_state
    b = torch.backends
    GETTERS = {"allow_tf32": lambda: b.cuda.matmul.allow_tf32, "precision": torch.get_float32_matmul_precision,
               "cudnn.allow_tf32": lambda: b.cudnn.allow_tf32}
    if per_backend_api():
        GETTERS.update({"generic": lambda: b.fp32_precision, "cuda.matmul": lambda: b.cuda.matmul.fp32_precision,
                        "mkldnn.matmul": lambda: b.mkldnn.matmul.fp32_precision, "mkldnn": lambda: b.mkldnn.fp32_precision,
                        "cudnn.conv": lambda: b.cudnn.conv.fp32_precision})
    def snapshot():
        out = {}
        for name, get in GETTERS.items():
            try:
                out[name] = get()
            except RuntimeError:  # "a mix of legacy and new APIs": the caller's own next call would fail too
                out[name] = "raises"
        return out
    if sys.argv[1] and "fp32_precision" in sys.argv[1] and not per_backend_api():
        print(json.dumps({"skip": True})); sys.exit(0)
    exec(sys.argv[1])
    before = snapshot()
    with ieee_float32():
        with ieee_float32():  # nested: the inner exit must not restore yet
            pass
        inside = float32_matmul_state()
        x = torch.randn(64, 64)
        exact = (x.double() @ x.double()).float()
        err = ((x @ x) - exact).abs().max().item()
    print(json.dumps({"before": before, "inside": inside, "after": snapshot(), "err": err}))
""")


@pytest.mark.floor
@pytest.mark.parametrize("caller", list(CALLER_STATES))
def test_the_caller_setting_is_back_exactly_after_a_run(caller):
    # A fresh interpreter per state: a mixed legacy/per-backend state cannot be undone in-process.
    done = subprocess.run([sys.executable, "-c", SNAPSHOT, CALLER_STATES[caller]], capture_output=True, text=True,
                          check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found.get("skip"):
        pytest.skip("torch < 2.9 has no per-backend fp32_precision for a caller to have set")
    assert found["after"] == found["before"], caller
    if "cuda" in found["inside"]:
        assert found["inside"]["cuda"] == "ieee" and found["inside"]["mkldnn"] == "ieee", found["inside"]
    else:
        assert found["inside"] == {"float32_matmul_precision": "highest", "cuda_allow_tf32": "False"}
    assert found["err"] < 1e-4  # a float32 product on the CPU, not a bf16 one


def test_a_decomposition_runs_ieee_under_a_tf32_caller_with_the_same_bytes(tmp_path, monkeypatch):
    if not precision.per_backend_api():
        pytest.skip("the legacy API's state is checked in a fresh interpreter above")
    model = save_tiny_model(tmp_path / "m", "llama", layers=1, shard_size="150KB")
    reference = pissa_rs.decompose_checkpoint(model, r=4, out=tmp_path / "ref", progress=False)
    seen = []
    real = pissa_rs.factors.randomized_svd

    def recording(*args, **kwargs):
        seen.append(precision.float32_matmul_state())
        return real(*args, **kwargs)

    monkeypatch.setattr(pissa_rs.factors, "randomized_svd", recording)
    backends = torch.backends
    saved = (backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision)
    try:
        backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
        res = pissa_rs.decompose_checkpoint(model, r=4, out=tmp_path / "tf32", progress=False)
        after = (backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision)
    finally:
        backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision = saved
    assert after == ("tf32", "bf16")
    assert seen and all(s["cuda"] == "ieee" and s["mkldnn"] == "ieee" for s in seen)
    assert res.report["rounding"]["float32_matmul"]["cuda"] == "ieee"
    same_output(res.out, reference.out)


@pytest.mark.parametrize("entry", ["decompose.run_decomposition", "verify.verify", "merge.merge_adapter",
                                   "convert.convert_to_lora", "verify_lora.verify_lora", "dry_run.plan",
                                   "qerror.measure_quantization_error", "logit_check.logit_change",
                                   "factors.principal_factors", "engine.ray_run._unit_task",
                                   "engine.ray_run._fingerprint_task"])
def test_every_entry_point_that_multiplies_runs_ieee(entry):
    import importlib

    module_name, _, name = entry.rpartition(".")
    fn = getattr(importlib.import_module(f"pissa_rs.{module_name}"), name)
    # wrapped by in_ieee_float32 (whose behaviour the tests above check)
    assert fn.__code__ is precision.in_ieee_float32(len).__code__, f"{entry} does not run under ieee_float32"
