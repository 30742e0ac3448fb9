"""The rounding probe: the same in every process of one machine and environment, different
where the computation differs, and a run over devices that round differently refused by name."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pissa_rs
from pissa_rs import rounding

CODE = "from pissa_rs.rounding import rounding_probe; print(rounding_probe('cpu', ['F32', 'BF16'], 2, torch.float32))"


def test_the_probe_is_a_property_of_the_machine_not_of_the_process():
    here = rounding.rounding_probe("cpu", ["F32", "BF16"], 2, torch.float32)
    code = f"import torch; torch.set_num_threads({torch.get_num_threads()}); {CODE}"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == here
    # what the run computes decides it: another niter, dtype or adapter dtype is another probe
    others = {rounding.rounding_probe("cpu", ["F32", "BF16"], 3, torch.float32),
              rounding.rounding_probe("cpu", ["F32"], 2, torch.float32),
              rounding.rounding_probe("cpu", ["F32", "BF16"], 2, torch.bfloat16)}
    assert here not in others and len(others) == 3


def test_devices_that_round_differently_are_refused_by_name(monkeypatch):
    from types import SimpleNamespace

    # two GPUs of other models (the probe is stubbed: no GPU is touched)
    options = SimpleNamespace(torch_devices=[torch.device("cuda:0"), torch.device("cuda:1")])
    monkeypatch.setattr(rounding, "job_probe", lambda opts, targets, device: "same")
    assert rounding.devices_probe(options, []) == "same"
    calls = iter(["probe-a", "probe-b"])
    monkeypatch.setattr(rounding, "job_probe", lambda opts, targets, device: next(calls))
    with pytest.raises(pissa_rs.RoundingMismatchError, match="cuda:0, cuda:1 round differently.*cuda:0: probe-a, cuda:1: probe-b.*devices of one model"):
        rounding.devices_probe(options, [])
