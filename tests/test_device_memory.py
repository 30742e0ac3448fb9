"""GPU memory planned before anything is written (engine/device_memory.py): the dry run says
it, a run that cannot fit is refused naming the tensor, and CUDA running out anyway is an
error naming the tensor. CUDA's free memory is stood in for, as this machine may have none."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs.engine import device_memory
from pissa_rs.engine.devices import DeviceRunner
from pissa_rs.planning.targets import Target


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mem") / "llama", "llama", layers=1, shard_size="150KB")


def target(rows, cols, dtype="BF16", r=128):
    return Target(module="m", tensor="model.layers.0.mlp.down_proj.weight", shape=(rows, cols), dtype=dtype,
                  fan_in_fan_out=False, r=r, lora_alpha=r)


def test_a_bf16_weight_at_one_rank_takes_about_ten_bytes_an_element():
    """The stored weight and the next upload (2 + 2), then the float32 copy for the SVD or the
    float32 B@A and the bf16 residual (4 + 2): ~10 bytes an element, not the float32 copy's 4."""
    options = pissa_rs.DecomposeOptions.from_fields({"r": 128, "device": "cpu"})
    rows, cols = 8192, 28672
    peak = device_memory.target_peak_bytes(target(rows, cols), options)
    assert 10 * rows * cols <= peak <= 10.2 * rows * cols
    f32 = device_memory.target_peak_bytes(target(rows, cols, "F32"), options)
    assert 16 * rows * cols <= f32 <= 16.2 * rows * cols  # 4 + 4 + max(4 + sketches, 4 + 4)
    two_ranks = dataclasses.replace(options, r=[64, 128])
    assert device_memory.target_peak_bytes(target(rows, cols), two_ranks) >= 12 * rows * cols  # a residual each
    full = pissa_rs.DecomposeOptions.from_fields({"r": 128, "device": "cpu", "method": "milora"})
    assert device_memory.target_peak_bytes(target(rows, cols), full) > peak  # U, Vh and the workspace


def test_a_run_that_cannot_fit_is_refused_naming_the_tensor_before_any_write(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(device_memory, "free_device_memory", lambda devices: {"cuda:0": 200_000})
    plan = pissa_rs.plan(llama, r=4, out=tmp_path / "o")
    assert not plan.fits_on_device
    assert "DOES NOT FIT on cuda:0" in plan.describe() and f"'{plan.device_memory.tensor}'" in plan.describe()
    size = {t.tensor: t.shape[0] * t.shape[1] for t in plan.targets}
    assert size[plan.device_memory.tensor] == max(size.values())  # the largest target (MLP: three tie)
    with pytest.raises(device_memory.DeviceMemoryError, match=f"tensor '{plan.device_memory.tensor}'.*cuda:0 has"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(device_memory, "free_device_memory", lambda devices: {"cuda:0": 80 << 30})
    assert pissa_rs.plan(llama, r=4, out=tmp_path / "o").fits_on_device


def test_two_workers_on_one_device_count_twice(llama):
    options = pissa_rs.DecomposeOptions.from_fields({"r": 4, "devices": ["cpu", "cpu"]})
    one = pissa_rs.DecomposeOptions.from_fields({"r": 4, "device": "cpu"})
    targets = [target(512, 256)]
    assert device_memory.device_memory_plan(targets, options).peak_bytes == \
        2 * device_memory.device_memory_plan(targets, one).peak_bytes
    assert device_memory.device_memory_plan(targets, options).workers == 2


def test_cuda_running_out_anyway_names_the_tensor(llama):
    checkpoint = pissa_rs.Checkpoint(llama)
    names = [t.name for t in checkpoint.tensors if t.name.endswith("proj.weight")][:3]

    def compute(index, weight, to_host):
        if index == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return to_host(weight.sum())

    with DeviceRunner(checkpoint, list(enumerate(names)), [torch.device("cpu")], compute) as runner:
        with pytest.raises(device_memory.DeviceMemoryError, match=f"tensor '{names[1]}': out of memory on cpu"):
            list(runner.results())
