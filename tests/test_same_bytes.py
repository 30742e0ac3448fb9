"""The engine writes the bytes it wrote before: every output file of a fixed set of runs
(tests/same_bytes.py) hashes to what the recorded fixture says, on a machine that rounds as
the recording one did (the same rounding probe). On one that rounds differently (another
CPU model: MKL picks its GEMM code per model) the bytes cannot match, and the same runs are
held instead to what their tensors and reports recorded, within the bound same_bytes.py
states; never a skip. Any change to the bytes must be deliberate (re-record, say why)."""

from __future__ import annotations

import json

import pytest
import torch
from same_bytes import FIXTURE, report_problems, run_pinned, value_problems


@pytest.fixture(scope="module")
def fixture():
    data = json.loads(FIXTURE.read_text())
    assert len(data["runs"]) == 13  # every run same_bytes.runs makes (a guard against a truncated fixture)
    return data


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    return run_pinned(tmp_path_factory.mktemp("pinned"))


def test_every_output_file_has_its_recorded_bytes_or_values(fixture, found, capsys):
    same_torch = torch.__version__.split("+")[0] == fixture["torch"]
    assert sorted(found) == sorted(fixture["runs"]), "the set of outputs changed"
    compared = {"bytes": [], "values": []}
    for run, recorded in fixture["runs"].items():
        got = found[run]
        assert sorted(got["files"]) == sorted(recorded["files"]), f"{run}: the set of files changed"
        # The rounding is the same: the bytes must be (else the probe misses what decides them).
        if same_torch and got["rounding"] == recorded["rounding"]:
            changed = [f for f in recorded["files"] if got["files"][f] != recorded["files"][f]]
            assert not changed, (f"{run}: these files' bytes changed although this machine's rounding probe is the "
                                 f"recording's ({got['rounding']}): {changed}")
            compared["bytes"].append(run)
            continue
        # Another rounding (or torch): what does not depend on it stays byte-exact, the rest within bounds.
        rounding_free = [f for f in recorded["files"] if f.endswith(".json") and not f.endswith("pissa_report.json")]
        changed = [f for f in rounding_free if got["files"][f] != recorded["files"][f]]
        assert not changed, f"{run}: files that no rounding decides changed: {changed}"
        problems = value_problems(got["tensors"], recorded["tensors"]) + report_problems(got["report"],
                                                                                          recorded["report"])
        assert not problems, f"{run} (rounding probe {got['rounding']}, recorded {recorded['rounding']}): " + \
            "; ".join(problems[:8])
        compared["values"].append(run)
    with capsys.disabled():  # say which comparison ran: it depends on the CPU, the verdict must not
        print(f"\nsame bytes: {len(compared['bytes'])} runs byte for byte, {len(compared['values'])} by values "
              f"(this machine rounds {'as' if not compared['values'] else 'unlike'} the recording's "
              f"{fixture['recorded_on']!r})")


def test_the_value_comparison_fails_on_a_real_change(fixture, found):
    """The fallback must not be blind: the same runs' values with a planted change (one
    factor scaled by 1.01, a residual moved by 2e-3 of its input's norm in one element,
    a bfloat16 factor's rows swapped, one report number) are refused; the true ones pass."""
    import base64
    import copy

    import numpy as np

    run = fixture["runs"]["dense"]
    assert not value_problems(run["tensors"], run["tensors"])
    assert not report_problems(run["report"], run["report"])
    for plant in ("factor", "residual", "report"):
        broken = copy.deepcopy(run)
        if plant == "report":
            broken["report"]["totals"]["energy_kept_mean"] *= 1.01
            assert report_problems(broken["report"], run["report"]), plant
            continue
        file = "pissa_init/adapter_model.safetensors" if plant == "factor" else "model-00001-of-00003.safetensors"
        name, entry = next((n, e) for n, e in broken["tensors"][file].items()
                           if "sketch" in e and (plant == "factor") == ("lora_A" in n))
        sketch = np.frombuffer(base64.b64decode(entry["sketch"]), dtype=np.float64).copy()
        if plant == "factor":
            sketch *= 1.01
            entry["norm"] *= 1.01
        else:  # one element moved: every sketch row moves by +-2e-3 * the reference norm
            sketch += 2e-3 * entry["reference_norm"] * np.where(np.arange(sketch.size) % 2 == 0, 1.0, -1.0)
        entry["sketch"] = base64.b64encode(sketch.tobytes()).decode()
        assert value_problems(broken["tensors"], run["tensors"]), f"{plant}: {name} passed"


def test_a_planted_bug_in_the_math_fails_the_value_comparison(fixture, tmp_path):
    """Where this machine rounds unlike the recording one, only the value comparison guards
    the math: run the pinned runs with the subspace iteration one step short (as a bug would
    make it) and the comparison must refuse them. The environment variable is read by the
    child (same_bytes.py) and nowhere else."""
    found = run_pinned(tmp_path, {"SAME_BYTES_PLANT": "niter-1", "SAME_BYTES_ONLY": "dense"})
    got, recorded = found["dense"], fixture["runs"]["dense"]
    assert value_problems(got["tensors"], recorded["tensors"])
