"""Long I/O in the Rust core releases the GIL: another Python thread makes progress meanwhile."""

from __future__ import annotations

import sys
import threading

import numpy as np
import safetensors.torch
import torch

import pissa_rs

SIZE = 256 << 20  # large enough that the write takes many switch intervals


def progress_during(call) -> int:
    """How many times a busy Python thread counted while `call` ran."""
    counter = [0]
    stop = threading.Event()
    started = threading.Event()

    def count():
        started.set()
        while not stop.is_set():
            counter[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    thread = threading.Thread(target=count)
    thread.start()
    started.wait()
    try:
        before = counter[0]
        call()
        after = counter[0]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    return after - before


def test_gil_released_during_a_long_write(tmp_path):
    data = np.ones(SIZE, dtype=np.uint8)
    w = pissa_rs.ShardWriter(tmp_path / "big.safetensors", [("w", "U8", [SIZE])])
    # Holding the GIL for the whole call would let the counter move a handful
    # of times at most (one switch before the call); released, it runs freely.
    assert progress_during(lambda: w.write("w", data)) > 10_000
    w.finalize()


def test_gil_released_during_a_copy_and_finalize(tmp_path):
    src = tmp_path / "src.safetensors"
    safetensors.torch.save_file({"w": torch.ones(SIZE // 4)}, src)
    ck = pissa_rs.Checkpoint(src)
    w = pissa_rs.ShardWriter(tmp_path / "dst.safetensors", [("w", "F32", [SIZE // 4])])

    def copy_and_finalize():
        w.copy_from(ck, "w")
        w.finalize()

    assert progress_during(copy_and_finalize) > 10_000
