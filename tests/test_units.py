"""Units of work: how a plan is cut, and the lease that keeps a replaced attempt from
writing. (Runs without Ray; tests/test_ray.py runs units as Ray tasks.)"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs.engine.lease import Lease
from pissa_rs.engine.resume import input_state
from pissa_rs.engine.run import run_unit
from pissa_rs.engine.units import Job, OutputSpec, is_done, split_units, unit_file
from pissa_rs.options import DecomposeOptions
from pissa_rs.planning.plan import make_plan


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("units") / "llama", "llama", layers=2, shard_size="150KB")


def job_for(src: Path, out: Path) -> Job:
    options = DecomposeOptions(r=4).validate()
    checkpoint = pissa_rs.Checkpoint(src)
    plan = make_plan(src, [asdict(options.for_rank(4))], [out])[0]
    units = split_units(checkpoint, plan, None)
    return Job(src, options, (OutputSpec(out, plan, options.for_rank(4)),), tuple(input_state(checkpoint)),
               tuple(units))


def test_one_unit_per_shard_each_target_in_the_unit_of_its_residual(llama, tmp_path):
    job = job_for(llama, tmp_path / "o")
    checkpoint = pissa_rs.Checkpoint(llama)
    assert [u.files for u in job.units] == [(Path(f).name,) for f in checkpoint.files]
    targets = job.outputs[0].plan.targets
    assert sorted(i for u in job.units for i in u.targets) == list(range(len(targets)))
    for unit in job.units:
        for i in unit.targets:
            assert Path(checkpoint.info(targets[i].tensor).file).name in unit.files


def test_a_replaced_attempt_stops_before_it_finalizes_or_marks_done(llama, tmp_path):
    job = job_for(llama, tmp_path / "o")
    (tmp_path / "o").mkdir()
    unit = next(u for u in job.units if u.targets)
    zombie = Lease.take(job, unit)
    replacement = Lease.take(job, unit)  # Ray gave up on the first attempt and started another
    with pytest.raises(pissa_rs.LeaseLostError, match="no longer holds this unit"):
        run_unit(job, unit, lease=zombie)
    assert not is_done(tmp_path / "o", unit)
    assert not any((tmp_path / "o" / f).exists() for f in unit.files)  # nothing under a final name
    run_unit(job, unit, lease=replacement)
    assert is_done(tmp_path / "o", unit) and all((tmp_path / "o" / f).exists() for f in unit.files)
    assert unit_file(tmp_path / "o", unit, "lease").read_text() == replacement.attempt
