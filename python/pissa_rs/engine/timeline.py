"""An opt-in timeline of a run (PISSA_RS_PROFILE=path): per tensor, when each step of its way
began and ended and on which thread (read from the shards, waited for by the device, computed,
waited for the writer, handed to the writer), appended to `path` as JSON lines; `summary`
turns a timeline into the seconds a benchmark reports. Off, a span costs one attribute test."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

ENV = "PISSA_RS_PROFILE"
# what each kind of span means, for the summary and the docs
KINDS = {
    "read": "the reader thread copying a weight's bytes from the shards into a host buffer",
    "wait_buffer": "the reader waiting for a free host buffer (the devices are behind)",
    "wait_input": "a device waiting for its next weight to be staged (the reader is behind)",
    "compute": "a device decomposing one weight (the method's factors, residual, report numbers, copies to host)",
    "wait_writer": "a device holding a finished result until the writer took its previous one",
    "write": "the main thread handing a result's tensors to the shard writers",
}


class Timeline:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self._spans: list[tuple[str, int, str, float, float]] = []
        self._lock = threading.Lock()
        if self.path is not None:
            atexit.register(self.flush)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @contextlib.contextmanager
    def span(self, kind: str, index: int):
        if self.path is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._spans.append((kind, index, threading.current_thread().name, start, time.perf_counter()))

    def flush(self) -> None:
        """Append what was recorded since the last flush to the file (one JSON object a line)."""
        if self.path is None:
            return
        with self._lock:
            spans, self._spans = self._spans, []
        if not spans:
            return
        with open(self.path, "a") as f:
            for kind, index, thread, start, end in spans:
                f.write(json.dumps({"kind": kind, "index": index, "thread": thread, "start": start, "end": end,
                                    "pid": os.getpid()}) + "\n")


TIMELINE = Timeline(os.environ.get(ENV))


def summary(path: str | os.PathLike[str]) -> dict:
    """Seconds per kind of span (summed over threads), the wall time the spans cover, and for
    the device threads the share of their time spent computing rather than waiting."""
    spans = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not spans:
        return {"wall_s": 0.0, "seconds": {}, "weights": 0}
    seconds: dict[str, float] = defaultdict(float)
    device_threads: dict[str, float] = defaultdict(float)
    for s in spans:
        seconds[s["kind"]] += s["end"] - s["start"]
        if s["kind"] in ("compute", "wait_input", "wait_writer"):
            device_threads[s["thread"]] += s["end"] - s["start"]
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    busy = sum(device_threads.values())
    return {"wall_s": wall, "seconds": {k: seconds.get(k, 0.0) for k in KINDS},
            "weights": len({(s["pid"], s["index"]) for s in spans if s["kind"] == "compute"}),
            "device_compute_share": seconds.get("compute", 0.0) / busy if busy else 0.0}
