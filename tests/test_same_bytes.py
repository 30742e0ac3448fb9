"""The engine writes the bytes it wrote before: every output file of a fixed set of runs
(tests/same_bytes.py) hashes to what the recorded fixture says. Recorded before the engine
was split into plan -> units -> commit; any change to the bytes must be deliberate
(re-record, and say why in the commit)."""

from __future__ import annotations

import json

import pytest
import torch
from same_bytes import FIXTURE, run_pinned


def test_every_output_file_has_its_recorded_bytes(tmp_path):
    fixture = json.loads(FIXTURE.read_text())
    if torch.__version__.split("+")[0] != fixture["torch"]:
        pytest.skip(f"the hashes were recorded with torch {fixture['torch']}, whose kernels decide the float bits; "
                    f"this is torch {torch.__version__}")
    found = run_pinned(tmp_path)
    assert sorted(found) == sorted(fixture["runs"]), "the set of outputs changed"
    for run, files in fixture["runs"].items():
        assert sorted(found[run]) == sorted(files), f"{run}: the set of files changed"
        changed = [f for f in files if found[run][f] != files[f]]
        assert not changed, f"{run}: these files' bytes changed: {changed}"
