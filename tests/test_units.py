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


def test_a_journal_written_under_another_mount_point_is_adopted(llama, tmp_path, monkeypatch):
    """A unit interrupted on a node that mounts the output elsewhere: its journal names
    other absolute paths, and the next attempt still adopts what it proves written."""
    import json

    import pissa_rs.methods.pissa as compute  # the default method's SVD

    job = job_for(llama, tmp_path / "o")
    (tmp_path / "o").mkdir()
    unit = max(job.units, key=lambda u: len(u.targets))
    real, calls = compute.factors_at_ranks, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, "factors_at_ranks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_unit(job, unit)
    journal = unit_file(tmp_path / "o", unit, "journal")
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert lines, "nothing was journaled before the interrupt"
    moved = [{**line, "file": line["file"].replace(str(tmp_path / "o"), "/mnt/elsewhere/o")} for line in lines]
    journal.write_text("".join(json.dumps(line) + "\n" for line in moved))
    calls.clear()
    monkeypatch.setattr(compute, "factors_at_ranks", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_unit(job, unit)
    assert len(calls) < len(unit.targets), "the journaled tensors were computed again"
    fresh = job_for(llama, tmp_path / "fresh")
    (tmp_path / "fresh").mkdir()
    run_unit(fresh, next(u for u in fresh.units if u.index == unit.index))
    for f in unit.files:
        assert (tmp_path / "o" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes()


def test_a_node_that_mounts_the_folders_elsewhere_rewrites_the_drivers_paths(llama, tmp_path, monkeypatch):
    from pissa_rs.engine.ray_run import PATH_MAP, as_mounted_here

    job = job_for(llama, tmp_path / "o")
    assert as_mounted_here(job) is job  # no map: as it is
    monkeypatch.setenv(PATH_MAP, f"{tmp_path}=/lustre/run;{llama.parent}/=/mnt/models")
    here = as_mounted_here(job)
    assert here.outputs[0].out == Path("/lustre/run/o")
    assert here.input == Path("/mnt/models") / llama.name
    assert all(e["file"].startswith("/mnt/models/") for e in here.inputs)
    monkeypatch.setenv(PATH_MAP, f"{tmp_path}x=/elsewhere")  # a prefix of a name is no prefix of the path
    assert as_mounted_here(job).outputs[0].out == tmp_path / "o"
