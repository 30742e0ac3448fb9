"""verify: a decomposition checked against its original, naming what differs."""

from __future__ import annotations

import shutil

import pytest
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    src = save_tiny_model(root / "m", "gpt2", layers=2, dtype="bfloat16", shard_size="150KB")
    res = pissa_rs.decompose_checkpoint(src, r=8, lora_alpha=16, rank_pattern={"c_fc": 4}, out=root / "o",
                                        progress=False)
    return src, res.out


def corrupt(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_fresh_decomposition_verifies(pair, capsys):
    src, out = pair
    report = pissa_rs.verify(out, against=src)
    assert report.ok, report.problems
    assert report.checked_targets == 8 and report.checked_passthrough > 0
    assert main(["verify", str(out), "--against", str(src)]) == 0
    assert "ok: 8 targets" in capsys.readouterr().out


@pytest.mark.parametrize("tensor", ["transformer.h.0.ln_1.weight", "transformer.h.1.mlp.c_fc.weight"])
def test_a_changed_byte_is_found_and_named(pair, tmp_path, capsys, tensor):
    src, out = pair
    copy = tmp_path / "o"
    shutil.copytree(out, copy)
    info = pissa_rs.Checkpoint(copy).info(tensor)
    corrupt(copy / info.file.rsplit("/", 1)[-1], info.start + 1)  # high byte of the first bf16 value
    report = pissa_rs.verify(copy, against=src)
    assert not report.ok and len(report.problems) == 1 and report.problems[0].startswith(tensor)
    assert main(["verify", str(copy), "--against", str(src)]) == 1
    assert f"MISMATCH {tensor}" in capsys.readouterr().out


@pytest.mark.parametrize("ulps", [3, 8])
def test_a_residual_a_few_ulps_off_is_found(pair, tmp_path, ulps):
    """Not only flipped high bytes: a bf16 residual value `ulps` units in the last place away,
    where the residual is not small against W, is outside the bound (the exact output passes)."""
    import torch
    from safetensors.torch import load_file, save_file

    src, out = pair
    copy, tensor = tmp_path / "o", "transformer.h.1.attn.c_attn.weight"
    shutil.copytree(out, copy)
    shard = copy / pissa_rs.Checkpoint(copy).info(tensor).file.rsplit("/", 1)[-1]
    original = pissa_rs.Checkpoint(src)
    w = load_file(src / original.info(tensor).file.rsplit("/", 1)[-1])[tensor].float()
    tensors = load_file(shard)
    res = tensors[tensor]
    at = (res.float().abs() / (res.float().abs() + w.abs() + 1e-30)).argmax()
    bits = res.view(torch.int16).reshape(-1).clone()
    bits[at] += ulps  # a larger magnitude by `ulps` ulps (sign-magnitude bits)
    tensors[tensor] = bits.view(torch.bfloat16).reshape(res.shape)
    save_file(tensors, shard, metadata={"format": "pt"})
    report = pissa_rs.verify(copy, against=src)
    assert [p.split(":")[0] for p in report.problems] == [tensor], report.problems
    assert pissa_rs.verify(out, against=src).ok


def test_an_adapter_config_that_does_not_fit_is_found(pair, tmp_path):
    import json

    src, out = pair
    copy = tmp_path / "o"
    shutil.copytree(out, copy)
    cfg_path = copy / "pissa_init" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {}
    cfg_path.write_text(json.dumps(cfg))
    report = pissa_rs.verify(copy, against=src)
    assert any("c_fc" in p and "adapter rank 4 but adapter_config says r=8" in p for p in report.problems)
