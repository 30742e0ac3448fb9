"""One unit run to its end: its targets through torch on the devices, its pass-through
tensors copied, its residual shards and adapter part finalized and marked done; after an
interruption, what its journal proves written is adopted and only the rest is redone."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._pissa_rs import Checkpoint, Journal, Pipeline, ShardWriter
from ..formats.peft_adapter import factor_shapes
from ..options import ADAPTER_DTYPES
from ..tensors import SAFETENSORS_DTYPES, as_numpy_bytes
from .compute import Computed, compute_target
from .devices import DeviceRunner
from .layout import Assembly, abandon, writers_like
from .lease import Lease
from .outdir import atomic_write_text
from .resume import check_input_unchanged, fault_point, read_journal, read_records
from .timeline import TIMELINE
from .units import Job, OutputSpec, Unit, is_done, part_key, unit_file


@dataclass
class UnitOutput:
    """What one unit writes into one output folder: its residual shards and adapter part."""

    spec: OutputSpec
    unit: Unit
    shard_writers: dict[str, ShardWriter | None] = field(default_factory=dict)  # by input file; None: finalized
    part_writer: ShardWriter | None = None
    pending: set[tuple[str, str]] = field(default_factory=set)  # (final path, tensor) still to write
    earlier_records: dict[str, dict] = field(default_factory=dict)  # from an interrupted run, by tensor
    records_file: Any = None
    # residual tensors several targets fill (a fused expert parameter): (writer path, name) -> Assembly
    assembling: dict[tuple[str, str], Assembly] = field(default_factory=dict)
    out_tensors: dict[str, tuple[ShardWriter, int]] = field(default_factory=dict)  # residual tensor -> writer, bytes

    @property
    def writers(self) -> list[ShardWriter]:
        return [w for w in [*self.shard_writers.values(), self.part_writer] if w is not None]

    def out_tensor(self, name: str) -> tuple[ShardWriter | None, int]:
        """The writer of an output tensor of the residual and its size (None: already complete)."""
        return self.out_tensors.get(name, (None, 0))

    def needs(self, writer: ShardWriter | None, tensor: str) -> bool:
        return writer is not None and (writer.path, tensor) in self.pending

    def record(self, record: dict) -> None:
        """Journal a target's report record (the commit gathers them)."""
        self.records_file.write(json.dumps(record) + "\n")
        self.records_file.flush()

    def close(self) -> None:
        if self.records_file is not None:
            self.records_file.close()
            self.records_file = None


def _open(checkpoint: Checkpoint, spec: OutputSpec, unit: Unit, rounding: str) -> UnitOutput:
    """The unit's writers in one output: fresh, or resuming from the unit's journal when the
    attempt that wrote it rounded as this one does (else its half-written bytes could pair a
    factor of one machine with the residual of another: the unit starts over)."""
    output = UnitOutput(spec, unit)
    journal_path = unit_file(spec.out, unit, "journal")
    journal_path.parent.mkdir(exist_ok=True)
    stamp = unit_file(spec.out, unit, "rounding")
    resume = journal_path.is_file()
    if resume and (not stamp.is_file() or stamp.read_text() != rounding):
        for kind in ("journal", "records", "adapter"):
            unit_file(spec.out, unit, kind).unlink(missing_ok=True)
        resume = False
    if not resume:
        atomic_write_text(stamp, rounding)
    try:
        journal = Journal(journal_path)
        # a method that leaves the base as it is (MiCA) writes no residual: its units write adapter parts only
        files = [str(Path(checkpoint.root) / f) for f in unit.files] if spec.options.init_method.changes_base else []
        stored_as = spec.plan.stored_parts(spec.options.stored_quantization)
        output.shard_writers = writers_like(checkpoint, spec.out, journal=journal, resume=resume, stored_as=stored_as,
                                            files=files)
        output.out_tensors = {n: (w, end - start) for w in output.shard_writers.values() if w is not None
                              for n, start, end in w.ranges()}
        dtype = SAFETENSORS_DTYPES[ADAPTER_DTYPES[spec.options.adapter_dtype]]
        part = unit_file(spec.out, unit, "adapter")
        if not (resume and part.is_file()):
            specs = [spec_ for i in unit.targets for spec_ in _part_specs(spec, i, dtype)]
            output.part_writer = ShardWriter(part, specs, metadata={"format": "pt"}, journal=journal, resume=resume)
        if resume:
            _adopt_journaled(output, journal_path)
            output.earlier_records = read_records(unit_file(spec.out, unit, "records"))
        output.pending = {(w.path, name) for w in output.writers for name in w.missing()}
        output.records_file = open(unit_file(spec.out, unit, "records"), "a")
    except BaseException:
        for writer in output.writers:
            writer.suspend()
        output.close()
        raise
    return output


def _written_before(spec: OutputSpec, unit: Unit, output: UnitOutput | None) -> int:
    """Bytes of `unit` an earlier run already wrote into `spec.out` (for the progress bar):
    its finished files whole, and what the open writers adopted from the journal."""
    finished = [spec.out / f for f in unit.files] + [unit_file(spec.out, unit, "adapter")]
    total = sum(p.stat().st_size for p in finished if p.is_file())
    if output is not None:
        total += sum(end - start for w in output.writers for name, start, end in w.ranges()
                     if (w.path, name) not in output.pending)
    return total


def _part_specs(spec: OutputSpec, index: int, dtype: str) -> list[tuple[str, str, list[int]]]:
    """Target `index`'s lora_A [r, in] and lora_B [out, r] in its unit's adapter part."""
    a, b = factor_shapes(spec.plan.targets[index])
    return [(part_key(index, "lora_A"), dtype, list(a)), (part_key(index, "lora_B"), dtype, list(b))]


def _adopt_journaled(output: UnitOutput, journal: Path) -> None:
    """Take back every tensor an interrupted attempt wrote whose bytes still match the
    journal's checksum (the last line for a tensor wins). Files are matched by their path
    inside the output folder: the attempt may have run on a node that mounts it elsewhere."""
    writers = {Path(os.path.relpath(w.path, output.spec.out)).as_posix(): w for w in output.writers}
    missing = {rel: set(w.missing()) for rel, w in writers.items()}
    latest = {}
    for line in read_journal(journal):
        parts = Path(line["file"]).parts
        rel = next((r for r in ("/".join(parts[-k:]) for k in range(1, len(parts) + 1)) if r in writers), None)
        if rel is not None:
            latest[(rel, line["tensor"])] = line["crc32"]
    for (rel, tensor), crc in latest.items():
        if tensor in missing[rel]:
            writers[rel].adopt(tensor, crc)


class ByIndex:
    """Target index -> its statistic from a mapping by tensor name, looked up (or read, for a
    base model's weights) when the unit computing that target asks: never all at once."""

    def __init__(self, statistics, targets):
        self.statistics, self.targets = statistics, targets

    def get(self, index: int):
        return self.statistics[self.targets[index].tensor] if index < len(self.targets) else None


def run_unit(job: Job, unit: Unit, progress: Callable[[int], None] | None = None,
             lease: Lease | None = None, rounding: str | None = None,
             statistics: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """Run `unit` of `job` into every output that has not finished it. Any process that sees
    the input and the output folders can run it; the driver holds the folders' locks.
    `progress(n)`: n more bytes written. `lease`: this attempt's, checked before every step
    that creates, finalizes or marks done (see lease.py). `rounding`: this process's probe
    (default: the driver's, job.rounding), kept in the unit's files. Returns a small summary."""
    check = lease.check if lease is not None else (lambda: None)
    rounding = rounding or job.rounding
    started = time.perf_counter()
    checkpoint = Checkpoint(job.input)
    report = progress or (lambda n: None)
    active = [not spec.complete and not is_done(spec.out, unit) for spec in job.outputs]
    if not any(active):
        report(sum(_written_before(s, unit, None) for s in job.outputs if not s.complete))
        return {"unit": unit.index, "status": "done before", "seconds": 0.0}
    outputs: list[UnitOutput | None] = []
    try:
        check()
        for spec, is_active in zip(job.outputs, active):
            outputs.append(_open(checkpoint, spec, unit, rounding) if is_active else None)
        report(sum(_written_before(s, unit, o) for s, o in zip(job.outputs, outputs) if not s.complete))
        _run(checkpoint, job, unit, outputs, active, report, check, rounding, statistics or {})
    finally:
        for output in outputs:
            if output is not None:
                output.close()
    return {"unit": unit.index, "status": "done", "seconds": time.perf_counter() - started}


def _run(checkpoint: Checkpoint, job: Job, unit: Unit, outputs: list[UnitOutput | None], active: list[bool],
         progress: Callable[[int], None], check: Callable[[], None], rounding: str,
         statistics: dict[int, torch.Tensor]) -> None:
    """The unit's targets through torch, its pass-through tensors copied, then its files
    finalized and marked done; on any failure or Ctrl-C the temporary files and the
    journal stay for the next run to resume."""
    live = [o for o in outputs if o is not None]
    first = job.outputs[0]
    quant = job.options.stored_quantization
    targets = first.plan.targets  # the same tensors at every rank
    read_names = {p.tensor for i in unit.targets for p in targets[i].weight_read(checkpoint).pieces}
    stored = {w.tensor: w for w in first.plan.stored_quantized} if quant else {}
    stored_only = [stored[name] for name in unit.stored_only]
    files = {str(Path(checkpoint.root) / f) for f in unit.files}
    copies = [(i.name, o.shard_writers[i.file], i.name) for o in live for i in checkpoint.tensors
              if i.file in files and i.name not in read_names and i.name not in stored
              and o.needs(o.shard_writers.get(i.file), i.name)]
    pipeline = Pipeline(checkpoint, copies)
    reported = [0]

    def report_progress() -> None:
        progress(pipeline.bytes_written - reported[0])
        reported[0] = pipeline.bytes_written

    work = [(i, targets[i].tensor if targets[i].location is None else targets[i].location) for i in unit.targets
            if any(_needs_target(o, i, checkpoint) for o in live)]
    for o in live:
        _start_assemblies(o, {i for i, _ in work})
    work += [(len(targets) + k, w.tensor) for k, w in enumerate(stored_only)
             if any(_needs_parts(o, checkpoint, w.tensor, w.parts(quant)) for o in live)]

    def compute(i, weight, to_host):
        if i < len(targets):
            return compute_target(i, weight, job.outputs, active, to_host, statistics.get(i))
        return [(name, to_host(t)) for name, t in stored_only[i - len(targets)].serialize(weight, quant)]

    runner = None
    try:
        runner = DeviceRunner(checkpoint, work, job.options.torch_devices, compute=compute,
                              name_of=lambda i: targets[i].tensor if i < len(targets)
                              else stored_only[i - len(targets)].tensor)
        for index, result in runner.results():
            with TIMELINE.span("write", index):
                if index < len(targets):
                    _write_target(checkpoint, index, outputs, result, pipeline)
                else:
                    file = checkpoint.info(stored_only[index - len(targets)].tensor).file
                    for o in live:
                        _submit_parts(o, o.shard_writers[file], result, pipeline)
            check_input_unchanged(job.inputs)
            if index < len(targets):
                fault_point("target")
            report_progress()
        runner.close()
        TIMELINE.flush()
        pipeline.close()
        while not pipeline.done:  # pass-through copies may still be running: show them too
            report_progress()
            time.sleep(0.05)
        pipeline.finish()
        checkpoint.release_all()  # what page boundaries kept of the input, headers included
        report_progress()
        check_input_unchanged(job.inputs)
        for o in live:
            for writer in o.writers:
                check()
                writer.finalize()
                fault_point("finalize")
            check()
            atomic_write_text(unit_file(o.spec.out, unit, "done"),
                              json.dumps({"targets": len(unit.targets), "rounding": rounding}))
    except BaseException as err:
        try:
            if runner is not None:
                runner.close()
        finally:  # the unit's files stay for resume whatever closing the runner raised
            first_err = abandon(pipeline, [w for o in live for w in o.writers], err, keep=True)
        if first_err is err:
            raise
        raise first_err from err


def _needs_target(output: UnitOutput, index: int, checkpoint: Checkpoint) -> bool:
    """Whether any part of target `index` is still to be written into `output`
    (or its report record was lost)."""
    t = output.spec.plan.targets[index]
    if t.location is not None:  # an expert, or a weight stored in FP8 / MXFP4: its residual's own tensors
        needed = any(output.needs(output.out_tensor(p.tensor)[0], p.tensor) for p in t.location.written)
    else:
        parts = output.spec.plan.stored_parts(output.spec.options.stored_quantization).get(
            t.tensor, [(t.tensor, None, None)])
        needed = _needs_parts(output, checkpoint, t.tensor, parts)
    return (t.tensor not in output.earlier_records or needed
            or output.needs(output.part_writer, part_key(index, "lora_A"))
            or output.needs(output.part_writer, part_key(index, "lora_B")))


def _start_assemblies(output: UnitOutput, computed: set[int]) -> None:
    """The residual tensors of `output` that several computed targets fill (a tensor that
    holds several experts); only those still to be written. Every target that fills one
    is computed (_needs_target sees to it)."""
    for i in output.unit.targets:
        t = output.spec.plan.targets[i]
        if i not in computed:
            continue
        for piece in t.location.written if t.location is not None else ():
            writer, size = output.out_tensor(piece.tensor)
            if (piece.start, piece.end) != (0, size) and output.needs(writer, piece.tensor):
                slot = output.assembling.setdefault((writer.path, piece.tensor),
                                                    Assembly(torch.empty(size, dtype=torch.uint8), 0))
                slot.missing += 1


def _needs_parts(output: UnitOutput, checkpoint: Checkpoint, tensor: str, parts: list[tuple]) -> bool:
    """Whether any tensor the input `tensor` is stored as is still to be written into `output`."""
    writer = output.shard_writers.get(checkpoint.info(tensor).file)  # none: no residual written
    return any(output.needs(writer, name) for name, *_ in parts)


def _submit_parts(output: UnitOutput, writer: ShardWriter | None, parts: list[tuple[str, torch.Tensor]],
                  pipeline: Pipeline) -> None:
    # Parts an interrupted run already wrote are not written again (they are these bytes).
    for name, tensor in parts:
        if output.needs(writer, name):
            pipeline.submit(writer, name, as_numpy_bytes(tensor))


def _write_target(checkpoint: Checkpoint, index: int, outputs: list[UnitOutput | None],
                  computed: list[Computed | None], pipeline: Pipeline) -> None:
    """Hand one target's results to the background writer and record them."""
    for output, result in zip(outputs, computed):
        if output is None or result is None:
            continue
        target = output.spec.plan.targets[index]
        _submit_parts(output, output.part_writer, [(part_key(index, "lora_A"), result.lora_A),
                                                   (part_key(index, "lora_B"), result.lora_B)], pipeline)
        for piece, data in result.pieces:
            writer, size = output.out_tensor(piece.tensor)
            if (piece.start, piece.end) == (0, size):
                _submit_parts(output, writer, [(piece.tensor, data)], pipeline)
            else:
                _assemble(output, writer, piece.tensor, pipeline,
                          lambda whole: whole[piece.start: piece.end].copy_(data))
        if result.residual_parts:
            _submit_parts(output, output.shard_writers[checkpoint.info(target.tensor).file], result.residual_parts,
                          pipeline)
        output.record(result.record)


def _assemble(output: UnitOutput, writer: ShardWriter | None, name: str, pipeline: Pipeline, fill) -> None:
    """One part of a tensor several targets fill; written once complete. Nothing to
    do for a tensor an interrupted run already wrote."""
    slot = output.assembling.get((writer.path, name)) if writer is not None else None
    if slot is not None and slot.put(fill):
        del output.assembling[(writer.path, name)]
        pipeline.submit(writer, name, as_numpy_bytes(slot.data))
