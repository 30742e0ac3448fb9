"""The per-target torch work on one or more devices, overlapped with the I/O.

A reader thread has Rust read each weight (pread, GIL released, pages dropped
from the cache after) into a few reused host buffers, page-locked when the
devices are GPUs. One worker thread per device takes the next staged weight;
on a GPU it uploads the one after on a side CUDA stream while the current one
computes, upcasts on the GPU, and copies results back into page-locked memory.
Results come back to the caller in target order, so what is written and
reported does not depend on which device did what, and per-tensor seeds make
the bytes the same too.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .._pissa_rs import Checkpoint, PissaError
from ..planning.mapping import WeightRead
from ..tensors import TORCH_DTYPES
from .timeline import TIMELINE

POLL_SECONDS = 0.1  # how often a blocked thread looks whether the run stopped
BUFFERS_PER_DEVICE = 2  # the weight a device works on (or uploads) and the next one


def parse_devices(devices: list[str], here: bool = True) -> list[torch.device]:
    """Validate a device list: all of one type (CPU and GPU kernels round
    differently, so mixing them would make the output depend on scheduling),
    each one present on this machine (`here`; else, for a Ray run, on the nodes)."""
    if not devices:
        raise ValueError("devices must name at least one device, e.g. ['cuda:0']")
    parsed = []
    for name in devices:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {name!r}: not a torch device ({err})") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {name!r}: only cpu and cuda devices are supported")
        if device.type == "cuda" and not here:
            device = torch.device("cuda", device.index or 0)
        elif device.type == "cuda":
            # NVML's count where it answers: is_available() may initialise CUDA's driver, and the
            # planning child is forked after this
            count = torch.cuda.device_count()
            if count == 0:
                raise ValueError(f"device {name!r}: this machine has no CUDA device")
            if device.index is None:  # "cuda": the current device, without initializing CUDA before the
                # planning child is forked
                device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
            if device.index >= count:
                raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s)")
        parsed.append(device)
    kinds = {d.type for d in parsed}
    if len(kinds) > 1:
        raise ValueError(f"devices {devices}: all must be of one type (cpu or cuda), not a mix")
    return parsed


class DeviceMemoryError(PissaError, MemoryError):
    """A target's decomposition needs more memory than its device has."""


def out_of_memory(tensor: str, device: torch.device, err: BaseException) -> DeviceMemoryError:
    """A CUDA out-of-memory error as one that names the tensor and what to change."""
    free = ""
    if device.type == "cuda":
        try:
            free_bytes, total = torch.cuda.mem_get_info(device)
            free = f" ({free_bytes / 2**30:.1f} of {total / 2**30:.1f} GiB free now)"
        except RuntimeError:
            pass
    return DeviceMemoryError(
        f"tensor '{tensor}': out of memory on {device}{free} while decomposing it: another process may hold "
        f"the device, or the dry run's device memory line (pissa-rs decompose --dry-run) exceeds it; free the "
        f"device, run one worker per device, or use a device with more memory ({str(err).splitlines()[0]})")


class Stopped(Exception):
    """The run stopped (an error elsewhere, or Ctrl-C) while this thread waited."""


def page_locked_size(nbytes: int) -> int:
    """Host memory that torch's pinned allocator (`pin_memory=True`) takes for `nbytes`: it
    rounds every block up to a power of two and keeps freed blocks for reuse."""
    return 1 << max(nbytes - 1, 0).bit_length() if nbytes > 0 else 0


def register_page_locked(buffer: torch.Tensor) -> None:
    """Page-lock an ordinary host tensor's memory in place, exactly its size (cudaHostRegister,
    as torch's distributed checkpoint stager does), where torch's pinned allocator would take
    the next power of two: a 2.1 GB weight would hold 4 GiB that cannot be swapped."""
    # cudaHostRegisterPortable (1): pinned for every device's context, as the pool serves all the devices
    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 1))
    if error != 0:
        raise RuntimeError(f"page-locking {buffer.numel() * buffer.element_size()} bytes of host memory failed "
                           f"(cudaError {error}): too little memory may be left to lock")


def unregister_page_locked(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class PageLockedPool:
    """Page-locked buffers kept from one device runner (one per unit) to the next, so that a
    run locks its staging memory once, not twice per unit: cudaHostRegister of a GB-sized
    buffer takes a good part of a second. At most the buffers of one runner, sized to the
    largest weight so far (smaller ones are unlocked when a larger one is needed); `clear()`
    at the end of a decomposition unlocks them all."""

    def __init__(self):
        self._buffers: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int, device: torch.device | None) -> torch.Tensor:
        """A page-locked buffer of at least `nbytes`: a kept one, else a new one locked in
        `device`'s context (the reader thread that asks has none of its own)."""
        with self._lock:
            fitting = [b for b in self._buffers if b.numel() >= nbytes]
            if fitting:
                buffer = min(fitting, key=torch.Tensor.numel)
                self._buffers.remove(buffer)
                return buffer
            for small in self._buffers:  # never used again before they would be: unlocked now
                unregister_page_locked(small)
            self._buffers = []
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
                register_page_locked(buffer)
        return buffer

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._buffers.extend(b for b in buffers if b.numel())

    def clear(self) -> None:
        """Unlock and free every kept buffer."""
        with self._lock:
            for buffer in self._buffers:
                unregister_page_locked(buffer)
            self._buffers = []


PAGE_LOCKED = PageLockedPool()


class HostBuffers:
    """Up to `count` reused uint8 host buffers of at least `nbytes` each, made on
    first use; page-locked for GPU work, which makes host-device copies asynchronous
    and avoids the driver's own bounce buffer. Page-locked exactly their size
    (register_page_locked), from PAGE_LOCKED and given back to it by `close()`;
    reuse keeps host memory flat."""

    def __init__(self, count: int, nbytes: int, pin: bool, stop: threading.Event,
                 device: torch.device | None = None):
        self._count, self._nbytes, self._pin, self._stop = count, nbytes, pin, stop
        self._device = device  # the context to register in (the reader thread has none of its own)
        self._made: list[torch.Tensor] = []
        self._closed = False
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._lock = threading.Lock()

    def acquire(self) -> torch.Tensor:
        with self._lock:
            if self._free.empty() and len(self._made) < self._count:
                buffer = (PAGE_LOCKED.take(self._nbytes, self._device) if self._pin
                          else torch.empty(self._nbytes, dtype=torch.uint8))
                self._made.append(buffer)
                return buffer
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
        raise Stopped

    def release(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)

    def close(self) -> None:
        """Give the page-locked buffers back to the pool (after the threads that use them stopped)."""
        with self._lock:
            if self._pin and not self._closed:
                PAGE_LOCKED.give_back(self._made)
            self._closed = True

    @property
    def made(self) -> int:
        return len(self._made)


@dataclass
class _Staged:
    """A weight's bytes in a host buffer."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: torch.Tensor  # the whole pooled buffer
    data: torch.Tensor  # its first nbytes
    decode: Any = None  # stored in FP8 / MXFP4: bytes -> matrix, run on the device


@dataclass
class _Uploaded:
    """A weight on its device; on a GPU, `ready` fires when the copy is done."""

    staged: _Staged
    raw: torch.Tensor  # uint8 bytes on the device
    ready: Any = None  # torch.cuda.Event


_END = object()

# compute(index, weight on the device in its stored dtype, to_host) -> result.
# `to_host(t)` gives a host tensor that holds t's values once compute returned. On the CPU it
# is t itself: a result that is (a view of) the weight is the reused staging buffer, which the
# next weight overwrites, so clone what must outlive the weight.
Compute = Callable[[int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], Any]


class DeviceRunner:
    """Runs `compute` for each (index, tensor name or WeightRead) of `work` on `devices`; iterate
    `results()` to get (index, result) in the order of `work`. Always `close()`
    (or use it as a context manager): it stops and joins the threads."""

    def __init__(self, checkpoint: Checkpoint, work: list[tuple[int, str | WeightRead]], devices: list[torch.device],
                 compute: Compute, name_of: Callable[[int], str] | None = None):
        self._checkpoint, self._work, self._devices, self._compute = checkpoint, work, devices, compute
        items = dict(work)
        # what an error names: the caller's name for index i, else the tensor its bytes start in
        self._name_of = name_of or (lambda i: items[i] if isinstance(items[i], str) else items[i].pieces[0].tensor)
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._results: dict[int, Any] = {}
        self._consumed: set[int] = set()
        self._error: BaseException | None = None
        self._staged: queue.Queue[Any] = queue.Queue()
        largest = max((self._nbytes(item) for _, item in work), default=0)
        pin = devices[0].type == "cuda"
        self.buffers = HostBuffers(BUFFERS_PER_DEVICE * len(devices), largest, pin, self._stop,
                                   devices[0] if pin else None)
        self._threads = [threading.Thread(target=self._guard, args=(self._read,), name="pissa-reader", daemon=True)]
        self._threads += [threading.Thread(target=self._guard, args=(self._device_worker, d), daemon=True,
                                           name=f"pissa-{d}-{k}") for k, d in enumerate(devices)]
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> DeviceRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop and wait for the threads (a device busy with one weight finishes it first)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        try:
            for device in dict.fromkeys(d for d in self._devices if d.type == "cuda"):
                torch.cuda.synchronize(device)  # an upload a stopped worker left in flight reads a buffer
        except RuntimeError:  # a faulted device (its error is the run's): leave the pages locked, not unsafe
            return
        self.buffers.close()

    def results(self) -> Iterator[tuple[int, Any]]:
        for index, _ in self._work:
            with self._cond:
                while index not in self._results and self._error is None:
                    self._cond.wait(POLL_SECONDS)
                if index not in self._results:  # what finished before a failure is still handed over
                    raise self._error
                result = self._results.pop(index)
            yield index, result
            with self._cond:  # the caller is done with it: its worker may hand over the next
                self._consumed.add(index)
                self._cond.notify_all()

    # -- threads ----------------------------------------------------------

    def _guard(self, body, *args) -> None:
        try:
            body(*args)
        except Stopped:
            pass
        except BaseException as err:  # handed to the caller, raised from results()
            with self._cond:
                if self._error is None:
                    self._error = err
                self._cond.notify_all()
            self._stop.set()

    def _nbytes(self, item: str | WeightRead) -> int:
        return self._checkpoint.info(item).nbytes if isinstance(item, str) else item.nbytes

    def _read(self) -> None:
        """Stage each weight's bytes, in order, as buffers come free."""
        for index, item in self._work:
            read = item if isinstance(item, WeightRead) else None
            info = self._checkpoint.info(item if read is None else read.pieces[0].tensor)
            dtype, shape = (info.dtype, tuple(info.shape)) if read is None else (read.dtype, read.shape)
            if dtype not in TORCH_DTYPES and (read is None or read.decode is None):
                raise TypeError(f"tensor '{info.name}' of {info.file}: dtype {dtype} has no torch equivalent")
            with TIMELINE.span("wait_buffer", index):
                buffer = self.buffers.acquire()
            data = buffer[: self._nbytes(item)]
            with TIMELINE.span("read", index):
                if read is None:
                    self._checkpoint.read_into(item, data.numpy())
                else:  # an expert's matrix, or codes and scales: its pieces, one after the other
                    read.read_into(self._checkpoint, data)
            self._staged.put(_Staged(index, TORCH_DTYPES[dtype], shape, buffer, data, read and read.decode))
        for _ in self._devices:
            self._staged.put(_END)

    def _next_staged(self, block: bool) -> Any:
        while not self._stop.is_set():
            try:
                return self._staged.get(timeout=POLL_SECONDS) if block else self._staged.get_nowait()
            except queue.Empty:
                if not block:
                    return None
        raise Stopped

    def _device_worker(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        side = torch.cuda.Stream(device) if cuda else None
        # Its own compute stream: two workers on one GPU (devices=["cuda:0", "cuda:0"]) would
        # otherwise queue every kernel on the default stream one after the other, and gain nothing.
        compute = torch.cuda.Stream(device) if cuda else None
        context = contextlib.ExitStack()
        if cuda:
            context.enter_context(torch.cuda.device(device))
            context.enter_context(torch.cuda.stream(compute))  # the current stream is per thread
        pending: _Uploaded | None = None
        ended = False
        previous: int | None = None
        with context:
            while True:
                if pending is None:
                    with TIMELINE.span("wait_input", -1):
                        item = _END if ended else self._next_staged(block=True)
                    if item is _END:
                        return
                    with self._naming(item.index, device):
                        pending = self._upload(item, device, side)
                ahead = None
                if cuda and not ended:
                    # The next weight's copy runs on the side stream during this compute.
                    item = self._next_staged(block=False)
                    if item is _END:
                        ended = True
                    elif item is not None:
                        with self._naming(item.index, device):
                            ahead = self._upload(item, device, side)
                with TIMELINE.span("compute", pending.staged.index), self._naming(pending.staged.index, device):
                    result = self._run_one(pending, device)
                with TIMELINE.span("wait_writer", pending.staged.index):
                    self._hand_over(pending.staged.index, result, previous)
                previous, pending = pending.staged.index, ahead

    @contextlib.contextmanager
    def _naming(self, index: int, device: torch.device):
        """CUDA running out of memory for weight `index`, said with its name and what to change."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as err:
            raise out_of_memory(self._name_of(index), device, err) from err

    def _upload(self, staged: _Staged, device: torch.device, side) -> _Uploaded:
        if side is None:
            return _Uploaded(staged, staged.data)  # CPU: compute reads the host buffer itself
        with torch.cuda.stream(side):
            raw = staged.data.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        return _Uploaded(staged, raw, ready)

    def _run_one(self, uploaded: _Uploaded, device: torch.device) -> Any:
        staged = uploaded.staged
        if uploaded.ready is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(uploaded.ready)
            uploaded.raw.record_stream(stream)  # allocated on the side stream, freed after use on this one
            uploaded.ready.synchronize()  # issued during the previous compute: done by now
            self.buffers.release(staged.buffer)
        weight = (staged.decode(uploaded.raw) if staged.decode is not None
                  else uploaded.raw.view(staged.dtype).reshape(staged.shape))
        result = self._compute(staged.index, weight, _host_copier(device))
        if uploaded.ready is not None:
            torch.cuda.current_stream(device).synchronize()  # the copies back have landed
        else:  # the weight was the host buffer itself
            self.buffers.release(staged.buffer)
        return result

    def _hand_over(self, index: int, result: Any, previous: int | None) -> None:
        """Give `result` to the caller once it took this worker's previous one:
        a device is at most one result ahead of the writer."""
        with self._cond:
            while previous is not None and previous not in self._consumed:
                if self._stop.is_set():
                    raise Stopped
                self._cond.wait(POLL_SECONDS)
            self._results[index] = result
            self._cond.notify_all()


def _host_copier(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if device.type != "cuda":
        return lambda t: t.detach().contiguous()

    def to_host(t: torch.Tensor) -> torch.Tensor:
        # Page-locked (torch's caching host allocator reuses the blocks), asynchronous.
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.detach(), non_blocking=True)
        return host

    return to_host
