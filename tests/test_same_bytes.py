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
from same_bytes import FIXTURE, probe_problems, report_problems, run_pinned, value_problems


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
    # The probes themselves: a probe that disagrees where the bytes say this machine rounds as the
    # recording's (or two runs sharing a probe the recording gave two) is the probe's fault, and
    # would otherwise only send that run to the value comparison below.
    problems = probe_problems(found, fixture["runs"], same_torch)
    assert not problems, "; ".join(problems[:6])
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


def test_a_wrong_probe_fails_even_where_the_bytes_are_the_recordings(fixture):
    """probe_problems: the recording itself passes; a run handed another run's probe (a stale
    cache entry, as a key without `method` gives MiCA MiLoRA's) fails, as does a probe off the
    recording while every file has its recorded bytes; a machine that rounds differently (every
    probe another, consistently, and the randomized runs' bytes changed) passes, even where its
    exact-path runs kept their bytes, and so does another torch."""
    import copy

    runs = fixture["runs"]
    assert not probe_problems(runs, runs, True)
    stale = copy.deepcopy(runs)
    stale["mica"]["rounding"] = stale["milora"]["rounding"]
    found = probe_problems(stale, runs, True)
    assert any("runs mica and milora" in p for p in found) and any(p.startswith("mica: every output") for p in found)
    assert any("runs mica and milora" in p for p in probe_problems(stale, runs, False))  # any torch, any machine
    off = copy.deepcopy(runs)
    off["dense-exact"]["rounding"] = "0" * 24
    assert probe_problems(off, runs, True) == [
        f"dense-exact: every output file has the recorded bytes, but its rounding probe {'0' * 24} is not the recorded "
        f"{runs['dense-exact']['rounding']}: the probe is wrong (this machine rounds as the recording's)"]
    assert not probe_problems(off, runs, False)
    other = copy.deepcopy(runs)
    for name, run in other.items():
        run["rounding"] = run["rounding"][::-1]  # another machine: other probes, shared as recorded
        if name not in ("dense-exact", "milora", "mica", "olora"):  # the randomized path wrote other bytes
            run["files"] = {f: h[::-1] for f, h in run["files"].items()}
    assert not probe_problems(other, runs, True)
