"""merge_adapter: residual + adapter back into one plain model, out of core."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from make_tiny_model import save_tiny_model
from transformers import AutoModelForCausalLM

import pissa_rs
from pissa_rs.convert import AdapterMismatchError
from pissa_rs.merge import merge_adapter


@pytest.mark.parametrize("arch, dtype", [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "float32")])
@pytest.mark.floor
def test_merging_the_untrained_adapter_gives_back_the_original(tmp_path, arch, dtype):
    src = save_tiny_model(tmp_path / "m", arch, layers=2, dtype=dtype, shard_size="150KB")
    res = pissa_rs.decompose_checkpoint(src, r=8, lora_alpha=16, out=tmp_path / "o", progress=False)
    merged = merge_adapter(res.out, res.adapter, tmp_path / "merged")
    a, b, res_ck = pissa_rs.Checkpoint(src), pissa_rs.Checkpoint(merged), pissa_rs.Checkpoint(res.out)
    assert [(t.name, t.dtype, t.shape) for t in a.tensors] == [(t.name, t.dtype, t.shape) for t in b.tensors]
    targets = {t["tensor"] for t in res.report["tensors"]}
    for name in a.names():
        if name not in targets:
            assert bytes(a.buffer(name)) == bytes(b.buffer(name)), name
            continue
        w, m = pissa_rs.as_torch(a.buffer(name)).double(), pissa_rs.as_torch(b.buffer(name)).double()
        w_res = pissa_rs.as_torch(res_ck.buffer(name)).double()
        # Two roundings, each at most half an ulp: the residual's, then the merged weight's.
        eps = torch.finfo(getattr(torch, dtype)).eps
        assert torch.all((w - m).abs() <= eps * (w_res.abs() + w.abs()) + 1e-30), name
    assert (merged / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert not (merged / "pissa_init").exists()
    with torch.no_grad():
        tokens = torch.randint(0, 256, (1, 12))
        tol = 1e-4 if dtype == "float32" else 5e-2
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(tokens).logits,
                                   AutoModelForCausalLM.from_pretrained(src)(tokens).logits, atol=tol, rtol=0)


def test_an_adapter_that_does_not_fit_is_refused(tmp_path):
    src = save_tiny_model(tmp_path / "m", "llama", layers=1)
    res = pissa_rs.decompose_checkpoint(src, r=4, out=tmp_path / "o", progress=False)
    other = save_tiny_model(tmp_path / "wide", "llama", layers=1, hidden=96, intermediate=160)
    with pytest.raises(AdapterMismatchError, match="does not fit weight"):
        merge_adapter(other, res.adapter, tmp_path / "x")
    broken = tmp_path / "broken"
    shutil.copytree(res.adapter, broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(AdapterMismatchError, match="adapter_config.json: missing"):
        merge_adapter(res.out, broken, tmp_path / "y")
    assert json.loads((res.adapter / "adapter_config.json").read_text())["r"] == 4
