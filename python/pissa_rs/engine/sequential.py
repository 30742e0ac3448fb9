"""A data-aware run: the calibration samples through the original model one decoder layer
at a time, each layer's input statistics into its targets' units as soon as every target
of a unit has them, and the layer's outputs (from the original weights, as PEFT's
calibration forward computes them) carried to the next layer. What is carried (and the
statistics still pending) is saved after every layer, so a killed run resumes at the layer
it was in. (EVA, whose loop decides across all layers at every step, is engine/components.py.)"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._pissa_rs import Checkpoint
from ..calibration.layers import LayerStack
from ..calibration.samples import CalibrationError, CalibrationSet
from ..calibration.statistics import CovarianceHooks
from ..constants import UNITS_DIR
from ..tensors import as_torch
from . import heap
from .device_memory import calibration_element_size, calibration_room, covariance_passes
from .devices import page_locked_size
from .resume import fault_point
from .run import run_unit
from .units import Job, Unit

if TYPE_CHECKING:
    from collections.abc import Callable

CALIBRATION_DIR = "calibration"


def target_layers(targets, layers_name: str) -> list[tuple[int, str, int | None]]:
    """(decoder layer, name within it, expert) of every target: a linear module's name, or
    for a parameter PEFT wraps (MoE experts, routers) the parameter's, with the expert's
    index. A target outside the decoder layers cannot be calibrated one layer at a time."""
    found = []
    for target in targets:
        name = target.module if target.parameter is None else target.parameter
        head, _, rest = name.partition(layers_name + ".")
        index, _, inner = rest.partition(".")
        if head or not index.isdigit() or not inner:
            raise CalibrationError(f"{target.tensor}: not a module or parameter inside the decoder layers "
                                   f"({layers_name}.N.*), which calibration reaches one layer at a time; "
                                   "exclude it (exclude_modules)")
        found.append((int(index), inner, target.expert))
    return found


class HiddenStates:
    """Every batch's hidden states at one layer boundary, in a file under
    OUT/.pissa_units/calibration (what a resume starts from): written batch by batch as a
    layer produces them. With `hold`, they are also kept in host memory (pinned for a GPU)
    and the next layer takes them from there; without, it reads them back from the file
    batch by batch, so the host holds one batch of them (the page cache keeps the file in
    memory where memory allows; where not, it is read from disk)."""

    def __init__(self, path: Path, index: list[tuple[int, list[int]]] | None = None, dtype: str | None = None,
                 hold: bool = False, pin: bool = False, held: list[torch.Tensor] | None = None):
        self.path, self.index, self.dtype = path, list(index or []), dtype
        self.hold, self.pin, self.held = hold, pin, list(held or [])
        self._file = None

    def append(self, hidden: torch.Tensor) -> None:
        from ..tensors import as_numpy_bytes

        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
            self.dtype = str(hidden.dtype).removeprefix("torch.")
        self.index.append((self._file.tell(), list(hidden.shape)))
        if self.hold and self.pin:  # one copy, from the device straight into page-locked memory
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            host.copy_(hidden)
        else:
            host = hidden.to("cpu").contiguous()
        if self.hold:
            self.held.append(host)
        self._file.write(as_numpy_bytes(host).data)

    def finish(self, final: Path) -> HiddenStates:
        """Flushed to disk and renamed to `final`: whole, or not there."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        os.replace(self.path, final)
        return HiddenStates(final, self.index, self.dtype, held=self.held)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.held[k] if k < len(self.held) else self._read(k)

    def _read(self, k: int) -> torch.Tensor:
        offset, shape = self.index[k]
        out = torch.empty(shape, dtype=getattr(torch, self.dtype))
        with open(self.path, "rb") as f:
            f.seek(offset)
            f.readinto(out.view(-1).view(torch.uint8).numpy())
        return out

    def __len__(self) -> int:
        return len(self.index)


class _TakenOnce(dict):
    """Target index -> its statistic, each taken (not just looked up) by the computation of its
    target: a covariance, or the resident pages of its file view, goes as soon as the last
    target sharing it is computed, not when its whole unit is."""

    def get(self, key, default=None):
        return self.pop(key, default)


class _Carried:
    """What a resume needs at a layer boundary: the file of hidden states that are the next
    layer's input, and the statistics of targets whose units have not run yet; recorded in
    OUT/.pissa_units/calibration/state.json, replaced atomically."""

    def __init__(self, folder: Path, digest: str):
        self.folder, self.digest = folder, digest
        self._saved: list[tuple[weakref.ref, str, str]] = []  # (view, file, key) of statistics already on disk

    def hidden_file(self, layer: int) -> Path:
        return self.folder / f"hidden-{layer:05d}.bin"

    def load(self) -> tuple[int, HiddenStates, dict[int, torch.Tensor], dict] | None:
        state = self.folder / "state.json"
        if not state.is_file():
            return None
        recorded = json.loads(state.read_text())
        if recorded.get("calibration") != self.digest:
            return None
        hidden = HiddenStates(self.hidden_file(recorded["next_layer"]), [tuple(i) for i in recorded["index"]],
                              recorded["dtype"])
        pending = self._mapped({int(i): tuple(at) for i, at in recorded["pending"].items()})
        return recorded["next_layer"], hidden, pending, recorded.get("experts", {})

    def _mapped(self, places: dict[int, tuple[str, str]]) -> dict[int, torch.Tensor]:
        """The saved pending statistics as read-only views of their files: resident only while
        a unit reads them, so that host memory does not grow with the layers still waiting for
        their shard's last layer (an 8B down_proj's covariance is 0.8 GB)."""
        files = {f: Checkpoint(self.folder / f) for f in {f for f, _ in places.values()}}
        views = {at: as_torch(files[at[0]].buffer(at[1])) for at in set(places.values())}  # shared inputs: one view
        self._saved = [(ref, f, k) for ref, f, k in self._saved if ref() is not None]
        self._saved += [(weakref.ref(v), *at) for at, v in views.items()]
        return {i: views[at] for i, at in places.items()}

    def _place_of(self, t: torch.Tensor) -> tuple[str, str] | None:
        return next(((f, k) for ref, f, k in self._saved if ref() is t), None)

    def save(self, next_layer: int, hidden: HiddenStates, pending: dict[int, torch.Tensor],
             experts: dict) -> dict[int, torch.Tensor]:
        """Saves the state: each statistic not on disk yet into a file of its own (those saved
        before stay where they are, not read again here); returns `pending` as views of their
        files (the same values), to hold instead of the tensors. One file (one mapping) per
        statistic: once its last target is computed its view goes, and with it the mapping
        and the pages that computation made resident (a file shared with statistics still
        waiting would keep them counted in this process's memory until those ran). `experts`:
        what the report says of the layers run so far (their experts' tokens, their passes)."""
        from safetensors.torch import save_file

        places: dict[int, tuple[str, str]] = {}
        new: dict[int, tuple[str, str]] = {}  # id -> place: modules sharing an input share one covariance
        for i, t in pending.items():
            place = self._place_of(t)
            if place is None and id(t) not in new:
                key = f"target-{i}"
                name = f"pending-{next_layer:05d}-{key}.safetensors"
                partial = self.folder / f"{name}.partial"
                # one statistic on the host at a time: a layer's expert stacks, whole, can
                # outweigh the host (58 GB at DeepSeek-V3's shapes)
                save_file({key: t.to("cpu").contiguous()}, str(partial))
                os.replace(partial, self.folder / name)
                new[id(t)] = (name, key)
            places[i] = place or new[id(t)]
        state = self.folder / "state.json.partial"
        state.write_text(json.dumps({"next_layer": next_layer, "index": hidden.index, "dtype": hidden.dtype,
                                     "calibration": self.digest, "experts": experts,
                                     "pending": {str(i): list(at) for i, at in places.items()}}))
        os.replace(state, self.folder / "state.json")
        for old in self.folder.glob("hidden-*.bin"):  # the boundaries before this one: never read again
            if old != hidden.path:
                old.unlink()
        held = {f for f, _ in places.values()}
        for old in self.folder.glob("pending-*.safetensors"):  # every target of it computed
            if old.name not in held:
                old.unlink()
        return self._mapped(places)


def boundary_bytes(calibration: CalibrationSet, batches: list[tuple[int, ...]], hidden: int,
                   dtype: torch.dtype, page_locked: bool = False) -> int:
    """The host memory the hidden states at one layer boundary take: every batch right-padded
    to its longest sample; `page_locked` (held for a GPU), each batch's block as torch's pinned
    allocator takes it (the next power of two)."""
    lengths = [int(s.numel()) for s in calibration.samples]
    size = torch.empty(0, dtype=dtype).element_size()
    blocks = [len(b) * max(lengths[k] for k in b) * hidden * size for b in batches]
    return sum(map(page_locked_size, blocks)) if page_locked else sum(blocks)


def padded_batch(calibration: CalibrationSet, batch: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A batch right-padded, its attention mask and each sample's length (as PEFT's EVA dataloader pads)."""
    lengths = [int(calibration.samples[k].numel()) for k in batch]
    ids = torch.zeros(len(batch), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, (k, n) in enumerate(zip(batch, lengths)):
        ids[row, :n], mask[row, :n] = calibration.samples[k], 1
    return ids, mask, lengths


def _through_layer(stack: LayerStack, layer, layer_index: int, calibration: CalibrationSet, batch: tuple[int, ...],
                   hidden: HiddenStates | None, k: int, device: torch.device, before=None):
    """Batch `k` through decoder layer `layer_index` (its input: the embeddings for the first
    layer, else the carried hidden states), with the arguments the model's forward gives it;
    `before(mask)` runs just before the forward. Returns (output, mask, sample lengths)."""
    ids, mask, lengths = padded_batch(calibration, batch)
    given, args, kwargs = stack.call_of(layer_index, ids, mask)
    x = given if hidden is None else hidden[k].to(device)
    if before is not None:
        before(mask.to(device))
    with torch.no_grad():
        out = layer(x, *args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out), mask, lengths


def run_calibrated(job: Job, checkpoint: Checkpoint, calibration: CalibrationSet,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Every unit of `job`, in layer order, with the statistics its method needs; returns
    what the report says of the calibration (seconds per phase)."""
    import time

    device = job.options.torch_devices[0]
    heap.bound_heap()  # each layer frees MiB-sized tensors among covariances that live on
    stack = LayerStack(checkpoint, Path(checkpoint.root), device, job.options.calibration_dtype)
    layers = target_layers(job.outputs[0].plan.targets, stack.layers_name)
    by_layer: dict[int, dict[str, list[tuple[int, int | None]]]] = {}
    for index, (layer, inner, expert) in enumerate(layers):
        by_layer.setdefault(layer, {}).setdefault(inner, []).append((index, expert))
    parameters = {i for i, t in enumerate(job.outputs[0].plan.targets) if t.parameter is not None}
    layer_targets: dict[int, list] = {}
    for (layer, _, _), target in zip(layers, job.outputs[0].plan.targets):
        layer_targets.setdefault(layer, []).append(target)
    room = calibration_room(job.options)  # what a layer's covariances may take of the device
    element_size = calibration_element_size(job.outputs[0].plan.targets, job.options)
    passes_record: dict[str, int] = {}
    experts_record: dict[str, dict] = {}
    last_layer = {unit.index: max((layers[i][0] for i in unit.targets), default=-1) for unit in job.units}
    waiting: list[Unit] = list(job.units)
    statistics = _TakenOnce()
    carried = _Carried(job.outputs[0].out / UNITS_DIR / CALIBRATION_DIR, calibration.digest)
    batch_size = job.options.calibration_batch
    batches = calibration.batches(batch_size)
    seconds = {"forward": 0.0, "statistics": 0.0, "units": 0.0, "saved": 0.0}
    # a layer reads one boundary's hidden states while it writes the next's: both held, or neither
    boundary = boundary_bytes(calibration, batches, stack.config.hidden_size, stack.dtype,
                              page_locked=device.type == "cuda")
    budget = job.options.host_memory_bytes
    hold = 2 * boundary <= budget

    def run_ready(done_through: int) -> None:
        t0 = time.perf_counter()
        for unit in [u for u in waiting if last_layer[u.index] <= done_through]:
            run_unit(job, unit, progress=progress, statistics=statistics)
            waiting.remove(unit)
            for i in unit.targets:
                statistics.pop(i, None)
        seconds["units"] += time.perf_counter() - t0

    run_ready(-1)  # shards with no target: copies only
    resumed = carried.load()
    start, hidden = 0, None
    if resumed is not None:
        start, hidden, pending, done = resumed
        experts_record.update(done.get("parameters", {}))
        passes_record.update(done.get("passes", {}))
        stack.forget_input_embedding()
        statistics.update(pending)
        run_ready(start - 1)  # finished before the kill: marked done, nothing is redone
    for layer_index in range(start, len(stack)):
        if not waiting:
            break  # every unit written: the remaining layers calibrate nothing
        t0 = time.perf_counter()
        layer = stack.layer(layer_index)
        wanted = by_layer.get(layer_index, {})
        modules = {inner: layer.get_submodule(inner) for inner, at in wanted.items() if at[0][0] not in parameters}
        owned = {inner: (layer.get_submodule(inner.rpartition(".")[0]), inner.rpartition(".")[2])
                 for inner, at in wanted.items() if at[0][0] in parameters}
        outputs = HiddenStates(carried.hidden_file(layer_index + 1).with_suffix(".partial"), hold=hold,
                               pin=device.type == "cuda")
        stacked = {inner for inner, at in wanted.items() if at[0][1] is not None}  # expert stacks' parameters
        passes = expert_ranges(layer_targets.get(layer_index, []), element_size, room,
                               batch_size * job.options.calibration_length)
        if len(passes) > 1:
            passes_record[f"{stack.layers_name}.{layer_index}"] = len(passes[0])
        covariances, seen = {}, _Seen()
        for first, kept in zip([True] + [False] * (len(passes) - 1), passes):
            hooks = CovarianceHooks(modules if first else {},
                                    owned if first else {inner: owned[inner] for inner in stacked},
                                    all_experts=job.options.calibrate_all_experts, experts=kept)
            try:
                for k, batch in enumerate(batches):
                    out, _, lengths = _through_layer(stack, layer, layer_index, calibration, batch, hidden, k,
                                                     device)
                    t1 = time.perf_counter()
                    hooks.add_batch(lengths)
                    seconds["statistics"] += time.perf_counter() - t1
                    if first:
                        outputs.append(out)
                    fault_point("calibrate")  # the crash tests: killed mid-layer
            finally:
                hooks.remove()
            found = hooks.covariances()
            seen.add(hooks)
            if kept is None:
                covariances = found
                continue
            for inner, means in found.items():  # a range of experts: to the host, the device freed for the next
                if inner not in stacked:
                    covariances[inner] = means
                    continue
                if inner not in covariances:
                    covariances[inner] = host_stack(carried.folder, (seen.count[inner], *means.shape[1:]))
                covariances[inner][kept.start:kept.stop] = means
            found = hooks = None
        stack.release(layer_index)
        for inner, at in wanted.items():  # on the device (or the host): `save` copies them to files one at a time
            for i, expert in at:
                statistics[i] = covariances[inner] if expert is None else covariances[inner][expert]
        experts_record.update(seen.record(f"{stack.layers_name}.{layer_index}"))
        covariances = seen = None  # `statistics` holds them now: saved below, they become views
        hidden = outputs.finish(carried.hidden_file(layer_index + 1))
        stack.forget_input_embedding()  # the next layers take the carried hidden states
        seconds["forward"] += time.perf_counter() - t0
        if waiting:  # a resume starts at the next layer
            # saved before the units that are ready run, so that they too read the statistics as
            # file views: a unit's waiting statistics are never resident all at once
            t0 = time.perf_counter()
            statistics.update(carried.save(layer_index + 1, hidden, statistics,  # held as file views from here
                                           {"parameters": experts_record, "passes": passes_record}))
            seconds["saved"] += time.perf_counter() - t0
        run_ready(layer_index)
    if waiting:
        raise CalibrationError(f"units {[u.name for u in waiting]} were never reached by the calibration "
                               "(their targets' layers were not run)")
    seconds["forward"] -= seconds["statistics"]
    record = {**calibration.as_record(), "batch": batch_size, "dtype": str(stack.dtype).removeprefix("torch."),
              "layers": len(stack), "resumed_at_layer": start,
              "hidden_states": {"bytes_per_layer": boundary, "host_memory": budget, "held_in_memory": hold},
              "seconds": seconds}
    if experts_record:
        record["experts"] = {"all_experts": job.options.calibrate_all_experts, "parameters": experts_record}
        if passes_record:  # layers whose expert covariances took several passes: experts per pass
            record["experts"]["experts_per_pass"] = passes_record
    return record


def expert_ranges(layer_targets: list, element_size: int, room: int, batch_tokens: int) -> list[range | None]:
    """The expert ranges CorDA's passes over one layer keep (device_memory.CovariancePasses):
    [None] where everything fits at once; at least one expert a pass (a GPU that cannot hold
    one was refused before the run)."""
    if not layer_targets:
        return [None]
    passes = covariance_passes(layer_targets, element_size, room, batch_tokens)
    if passes.experts is None or not passes.num_experts:
        return [None]
    step = max(passes.experts, 1)
    return [range(s, min(s + step, passes.num_experts)) for s in range(0, passes.num_experts, step)]


def host_stack(folder: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor in host memory that the page cache holds (a file mapped shared, unlinked
    at once: nothing is left behind by a kill), so that an expert stack's covariances (58 GB at
    DeepSeek-V3's shapes) are written back to disk where memory runs short, not swapped or killed."""
    import math
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    count = math.prod(shape)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="experts-", suffix=".partial", delete=False) as f:
        f.truncate(4 * count)
    try:
        stack = torch.from_file(f.name, shared=True, size=count, dtype=torch.float32)
    finally:
        os.unlink(f.name)
    return stack.view(shape)


class _Seen:
    """Per expert stack, over a layer's passes: the tokens each expert saw and in how many samples."""

    def __init__(self):
        self.tokens: dict[str, torch.Tensor] = {}
        self.reached: dict[str, torch.Tensor] = {}
        self.dims: dict[str, int] = {}
        self.count: dict[str, int] = {}

    def add(self, hooks: CovarianceHooks) -> None:
        for name, tokens in hooks.tokens.items():  # zeros outside the pass's experts
            self.tokens[name] = self.tokens.get(name, 0) + tokens
            self.reached[name] = self.reached.get(name, 0) + hooks.reached[name]
            self.dims[name], self.count[name] = hooks.sums[name].shape[-1], len(tokens)

    def record(self, prefix: str) -> dict[str, dict]:
        """Per expert stack: the tokens each expert saw (and in how many samples), the experts
        that saw fewer tokens than their input has dimensions (a covariance short of full rank:
        CorDA's damping makes it invertible; the report names them). An expert no token
        reached cannot be calibrated."""
        found = {}
        for name, tokens in self.tokens.items():
            never = [e for e, n in enumerate(tokens.tolist()) if n == 0]
            if never:
                raise CalibrationError(f"{prefix}.{name}: no calibration token was routed to expert(s) {never}; "
                                       "give more samples, or route every token to every expert "
                                       "(calibrate_all_experts)")
            found[f"{prefix}.{name}"] = {"tokens": tokens.tolist(), "samples": self.reached[name].tolist(),
                                         "damped": [e for e, n in enumerate(tokens.tolist()) if n < self.dims[name]]}
        return found
