"""Several devices give the same bytes as one; the device runner keeps order,
stops cleanly and bounds its buffers; input and output pages leave the page
cache. The CUDA tests run only where a GPU is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import same_output
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs._pissa_rs import cached_bytes
from pissa_rs.engine.devices import DeviceRunner, parse_devices

CLI = [sys.executable, "-m", "pissa_rs.cli"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("dev") / "m", "llama", layers=2, dtype="bfloat16",
                           shard_size="150KB", decay=0.7)


def decompose(model, out, **kwargs):
    return pissa_rs.decompose_checkpoint(model, out=out, progress=False, **{"r": 8, **kwargs})


# -- several devices ---------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"r": [4, 8]}, {"quantize": "nf4", "quant_iters": 2}],
                         ids=["plain", "several-ranks", "qpissa"])
def test_two_cpu_devices_give_the_bytes_of_one(model, tmp_path, extra):
    out = "o-{r}" if isinstance(extra.get("r"), list) else "o"
    one = decompose(model, tmp_path / "one" / out, device="cpu", **extra)
    two = decompose(model, tmp_path / "two" / out, devices=["cpu", "cpu"], **extra)
    for a, b in zip(*(r if isinstance(r, list) else [r] for r in (one, two))):
        same_output(b.out, a.out)
        assert b.report["options"]["devices"] == ["cpu", "cpu"]


def test_device_lists_are_checked():
    with pytest.raises(ValueError, match="at least one"):
        parse_devices([])
    with pytest.raises(ValueError, match="'tpu'"):
        parse_devices(["tpu"])
    with pytest.raises(ValueError, match="not a torch device"):
        parse_devices(["cuda:x"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            parse_devices(["cuda:0"])
    else:
        with pytest.raises(ValueError, match="one type"):
            parse_devices(["cpu", "cuda:0"])
        with pytest.raises(ValueError, match="CUDA device"):
            parse_devices([f"cuda:{torch.cuda.device_count()}"])
    with pytest.raises(ValueError, match="device or devices"):
        pissa_rs.DecomposeOptions(device="cpu", devices=["cpu"]).validate()


def test_an_interrupted_run_resumes_on_another_device_list(model, tmp_path):
    """Which devices (and how many) do not change the bytes, so a run stopped
    on two may finish on one; the kind of device does change them."""
    reference = decompose(model, tmp_path / "ref", r=4)
    out = tmp_path / "o"
    base = [*CLI, "decompose", str(model), "-r", "4", "-o", str(out), "--no-progress"]
    killed = subprocess.run([*base, "--devices", "cpu,cpu"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PISSA_RS_SIGNAL_AT": "target:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run([*base, "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout + resumed.stderr
    same_output(out, reference.out)


# -- the runner --------------------------------------------------------------

def test_runner_hands_results_back_in_order_and_bounds_its_buffers(model):
    checkpoint = pissa_rs.Checkpoint(model)
    names = [t.name for t in checkpoint.tensors if t.name.endswith("proj.weight")]
    work = list(enumerate(names))
    seen_threads = set()

    def compute(index, weight, to_host):
        seen_threads.add(threading.get_ident())
        time.sleep(0.02 * (index % 3))  # out-of-order completion
        expected = pissa_rs.as_torch(checkpoint.buffer(names[index]))
        assert torch.equal(weight, expected)
        return to_host(weight.float().sum())

    devices = [torch.device("cpu")] * 3
    with DeviceRunner(checkpoint, work, devices, compute) as runner:
        got = list(runner.results())
    assert [i for i, _ in got] == [i for i, _ in work]
    for (i, value), name in zip(got, names):
        assert float(value) == pytest.approx(float(pissa_rs.as_torch(checkpoint.buffer(name)).float().sum()))
    assert runner.buffers.made <= 2 * len(devices)
    assert len(seen_threads) > 1


def test_runner_raises_the_workers_error_and_stops(model):
    checkpoint = pissa_rs.Checkpoint(model)
    names = [t.name for t in checkpoint.tensors if t.name.endswith("proj.weight")]
    started = []

    def compute(index, weight, to_host):
        started.append(index)
        if index == 2:
            raise RuntimeError("boom at 2")
        return index

    runner = DeviceRunner(checkpoint, list(enumerate(names)), [torch.device("cpu")], compute)
    try:
        with pytest.raises(RuntimeError, match="boom at 2"):
            list(runner.results())
    finally:
        runner.close()
    assert all(not t.is_alive() for t in runner._threads)
    assert max(started) < len(names) - 1  # it stopped instead of running everything


def test_closing_a_runner_mid_run_joins_its_threads(model):
    checkpoint = pissa_rs.Checkpoint(model)
    names = [t.name for t in checkpoint.tensors if t.name.endswith("proj.weight")]
    runner = DeviceRunner(checkpoint, list(enumerate(names)), [torch.device("cpu")] * 2,
                          lambda i, w, h: time.sleep(0.05) or i)
    first = next(runner.results())
    assert first[0] == 0
    runner.close()  # the caller stops taking results: nothing may hang
    assert all(not t.is_alive() for t in runner._threads)


def test_read_into_copies_a_tensor_and_names_it_on_bad_buffers(model):
    checkpoint = pissa_rs.Checkpoint(model)
    info = next(t for t in checkpoint.tensors if t.name.endswith("q_proj.weight"))
    dest = np.zeros(info.nbytes, dtype=np.uint8)
    checkpoint.read_into(info.name, dest)
    assert dest.tobytes() == bytes(checkpoint.buffer(info.name))
    with pytest.raises(pissa_rs.PissaIOError, match=f"'{info.name}' is {info.nbytes} bytes"):
        checkpoint.read_into(info.name, np.zeros(info.nbytes + 2, dtype=np.uint8))
    with pytest.raises((BufferError, TypeError, ValueError)):
        checkpoint.read_into(info.name, bytes(info.nbytes))  # read-only
    with pytest.raises(pissa_rs.TensorNotFoundError, match="nope"):
        checkpoint.read_into("nope", dest)


# -- page cache --------------------------------------------------------------

def cached_fraction(files) -> float:
    sizes = [cached_bytes(str(f)) for f in files]
    return sum(c for c, _ in sizes) / sum(n for _, n in sizes)


def test_input_and_output_pages_leave_the_page_cache(tmp_path):
    """A 140 GB run must not fill the page cache: processed input pages and
    written output are dropped (posix_fadvise DONTNEED)."""
    src = save_tiny_model(tmp_path / "m", "llama", layers=2, hidden=256, intermediate=688, shard_size="2MB")
    inputs = sorted(src.glob("*.safetensors"))
    os.sync()  # clean pages: the only kind the kernel can drop
    for f in inputs:
        f.read_bytes()
    before = cached_fraction(inputs)
    if before < 0.9:
        pytest.skip(f"this filesystem does not keep files cached ({before:.0%})")
    result = decompose(src, tmp_path / "o", r=8, niter=1)
    outputs = sorted(result.out.glob("*.safetensors")) + [result.adapter / "adapter_model.safetensors"]
    # Headers and the partial pages shared by neighbouring tensors may stay.
    assert cached_fraction(inputs) < 0.1, cached_fraction(inputs)
    assert cached_fraction(outputs) < 0.1, cached_fraction(outputs)


# -- CUDA (skipped without a GPU) ------------------------------------------

@cuda
def test_cuda_output_matches_the_cpu_path(model, tmp_path):
    cpu = decompose(model, tmp_path / "cpu", device="cpu")
    gpu = decompose(model, tmp_path / "gpu", device="cuda:0")
    for a, b in zip(cpu.report["tensors"], gpu.report["tensors"]):
        assert a["tensor"] == b["tensor"]
        assert b["energy_kept"] == pytest.approx(a["energy_kept"], rel=1e-4)
        np.testing.assert_allclose(b["singular_values"], a["singular_values"], rtol=1e-3)
    # Both reconstruct the original within the residual's half ulp: verify checks each.
    assert pissa_rs.verify(gpu.out, against=model).ok


@cuda
def test_several_gpus_give_the_bytes_of_one(model, tmp_path):
    one = decompose(model, tmp_path / "one", devices=["cuda:0"])
    many = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    many = many if len(many) > 1 else ["cuda:0", "cuda:0"]  # one GPU: two workers share it
    two = decompose(model, tmp_path / "two", devices=many)
    same_output(two.out, one.out)


def test_seeded_svds_in_concurrent_threads_match_sequential_ones():
    """Each SVD draws its start from a generator of its own (torch.svd_lowrank's global
    one, seeded and drawn by threads at once, once gave threads each other's matrices)."""
    from concurrent.futures import ThreadPoolExecutor

    from pissa_rs.factors import factors_at_ranks

    torch.manual_seed(0)
    weights = [torch.randn(96, 64) for _ in range(16)]

    def run(k):
        return factors_at_ranks(weights[k], [(8, 1.0)], niter=1, seed=k)[0].lora_A

    sequential = [run(k) for k in range(len(weights))]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            assert all(torch.equal(a, b) for a, b in zip(pool.map(run, range(len(weights))), sequential))


def test_gpu_staging_buffers_are_page_locked_exactly_their_size_once_a_run(monkeypatch):
    """torch's pinned allocator rounds a block up to a power of two (a 2.1 GB embedding would
    hold 4 GiB that cannot be swapped): the staging buffers are ordinary allocations
    registered with CUDA at their own size. Registering a GB takes a good part of a second, so
    the next unit's runner takes them again, a larger weight replaces them, and the end of the
    run unlocks them. Seen through a stand-in for CUDA's runtime (this machine may have no GPU)."""
    import threading

    from pissa_rs.engine import devices

    calls = []

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):
            assert flags == 1  # portable: the pool's buffers upload to every device of the run
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(devices.torch.cuda, "cudart", lambda: Runtime())
    monkeypatch.setattr(devices, "PAGE_LOCKED", devices.PageLockedPool())
    nbytes = 3 * 2**20 + 5  # far from a power of two
    buffers = devices.HostBuffers(2, nbytes, pin=True, stop=threading.Event())
    first, second = buffers.acquire(), buffers.acquire()
    buffers.release(first)
    assert buffers.acquire() is first and buffers.made == 2  # reused, not made again
    assert [c[0] for c in calls] == ["register", "register"]
    assert {c[2] for c in calls} == {nbytes} and {c[1] for c in calls} == {first.data_ptr(), second.data_ptr()}
    assert first.numel() == nbytes
    buffers.close()
    buffers.close()  # once only
    assert len(calls) == 2  # kept for the next unit, still locked
    smaller = devices.HostBuffers(2, nbytes - 100, pin=True, stop=threading.Event())
    assert {smaller.acquire().data_ptr(), smaller.acquire().data_ptr()} == {first.data_ptr(), second.data_ptr()}
    smaller.close()
    assert len(calls) == 2  # the next unit's runner locked nothing
    larger = devices.HostBuffers(1, nbytes + 1, pin=True, stop=threading.Event())
    third = larger.acquire()
    assert calls[2:] == [("unregister", first.data_ptr()), ("unregister", second.data_ptr()),
                         ("register", third.data_ptr(), nbytes + 1)]  # too small now: unlocked, one larger locked
    larger.close()
    devices.PAGE_LOCKED.clear()
    assert calls[-1] == ("unregister", third.data_ptr())
    devices.PAGE_LOCKED.clear()
    assert len(calls) == 6  # once only
    assert devices.page_locked_size(nbytes) == 4 * 2**20 and devices.page_locked_size(2**20) == 2**20


def test_hidden_states_held_for_a_gpu_are_counted_as_the_pinned_allocator_takes_them():
    """CorDA holds two layer boundaries of hidden states in host memory when they fit in
    --host-memory; for a GPU they are page-locked, block by block, and torch's pinned
    allocator rounds each block up to a power of two: that is what must fit."""
    from types import SimpleNamespace

    from pissa_rs.engine.sequential import boundary_bytes

    calibration = SimpleNamespace(samples=[torch.zeros(n) for n in (100, 60, 37, 37, 9)])
    batches = [(0, 1), (2, 3), (4,)]
    exact = (2 * 100 + 2 * 37 + 9) * 64 * 2
    assert boundary_bytes(calibration, batches, 64, torch.bfloat16) == exact
    locked = boundary_bytes(calibration, batches, 64, torch.bfloat16, page_locked=True)
    assert locked == (2**15 + 2**14 + 2**11)  # 25600 -> 32768, 9472 -> 16384, 1152 -> 2048
