"""Who may write a unit now: each attempt at a unit (a Ray task, or its retry on another
node) takes the unit's lease, a file holding its attempt id; it checks the lease before
every step that creates, finalizes or marks done, so an attempt Ray gave up on (a
partitioned node that comes back) cannot damage the files of the attempt that replaced it.
(Between those steps both write the same bytes: every result is deterministic.)"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .._pissa_rs import PissaError
from .outdir import atomic_write_text
from .units import Job, Unit, unit_file


class LeaseLostError(PissaError, RuntimeError):
    """Another attempt took this unit over: this one stops without touching its files."""


@dataclass
class Lease:
    paths: list[Path]  # one per output folder the unit writes into
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def take(cls, job: Job, unit: Unit) -> Lease:
        """The unit's lease for a new attempt (a later take by another attempt wins)."""
        lease = cls([unit_file(spec.out, unit, "lease") for spec in job.outputs if not spec.complete])
        for path in lease.paths:
            path.parent.mkdir(exist_ok=True)
            atomic_write_text(path, lease.attempt)
        return lease

    def check(self) -> None:
        for path in self.paths:
            try:
                holder = path.read_text()
            except OSError:
                holder = None
            if holder != self.attempt:
                raise LeaseLostError(f"{path}: attempt {self.attempt} no longer holds this unit (now {holder}); "
                                     "stopping without writing")
