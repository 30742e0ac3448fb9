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


def _probe_args(**changed):
    args = dict(device="cpu", dtypes=["F32"], niter=1, adapter_dtype=torch.float32, quantization=None,
                quant_iters=1, method="pissa")
    return {**args, **changed}


def _nf4(**kw):
    from pissa_rs.quant import Quantization

    return Quantization("nf4", **kw)


# (before, after): calls that differ in one field of the probe's cache key. QPiSSA with T = 1
# is PiSSA and its residual, whatever the quantization: T = 2 where the quantization is the field.
ONE_FIELD_APART = {
    "method": (_probe_args(), _probe_args(method="olora")),
    "niter": (_probe_args(), _probe_args(niter=2)),
    "dtypes": (_probe_args(), _probe_args(dtypes=["F32", "BF16"])),
    "adapter_dtype": (_probe_args(), _probe_args(adapter_dtype=torch.bfloat16)),
    "quantization": (_probe_args(), _probe_args(quantization=_nf4())),
    "quantization kind": (_probe_args(quantization=_nf4(), quant_iters=2),
                          _probe_args(quantization=_nf4().__class__("fp4"), quant_iters=2)),
    "double_quant": (_probe_args(quantization=_nf4(), quant_iters=2),
                     _probe_args(quantization=_nf4(double_quant=True), quant_iters=2)),
    "quant_iters": (_probe_args(quantization=_nf4(), quant_iters=2), _probe_args(quantization=_nf4(), quant_iters=3)),
}


@pytest.mark.parametrize("field", list(ONE_FIELD_APART))
def test_each_field_of_the_cache_key_gives_its_own_probe(field, monkeypatch):
    """In one process, through the cache: a call right after one that differs only in `field`
    measures again and gets another probe. A key missing the field would hand the second call
    the first's cached probe."""
    monkeypatch.setattr(rounding, "_cache", {})
    before, after = ONE_FIELD_APART[field]
    first, second = rounding.rounding_probe(**before), rounding.rounding_probe(**after)
    assert first != second, f"{field}: the same probe for other computations (a stale cache entry?)"


def test_the_cache_key_holds_every_input_of_the_measurement(monkeypatch):
    """With the measurement stubbed (a new token per measurement), every field of the key,
    device and thread count too (which need not change the bits on this machine): a call that
    differs from all before it in one input is measured anew, a repeated call is not."""
    import itertools

    monkeypatch.setattr(rounding, "_cache", {})
    tokens = itertools.count()
    monkeypatch.setattr(rounding, "_measure", lambda *args, **kwargs: f"measured-{next(tokens)}")
    every = [_probe_args(), _probe_args(device="cuda:0"), *(a for pair in ONE_FIELD_APART.values() for a in pair)]
    calls = {repr(sorted(a.items())): a for a in every}
    threads = torch.get_num_threads()
    seen = {}
    try:
        for _ in range(2):  # the second round: every call cached
            for name, args in calls.items():
                for n in (threads, threads + 1):
                    torch.set_num_threads(n)
                    got = rounding.rounding_probe(**args)
                    if (name, n) in seen:
                        assert got == seen[name, n], (args, n)
                    else:
                        assert got not in seen.values(), f"{args} ({n} threads) got an earlier call's probe"
                        seen[name, n] = got
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 2 * len(calls) >= 2 * 10
