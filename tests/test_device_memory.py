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
    assert f"DOES NOT FIT: tensor '{plan.device_memory.tensor}'" in plan.describe()
    size = {t.tensor: t.shape[0] * t.shape[1] for t in plan.targets}
    assert size[plan.device_memory.tensor] == max(size.values())  # the largest target (MLP: three tie)
    with pytest.raises(pissa_rs.DeviceMemoryError, match=f"tensor '{plan.device_memory.tensor}'.*cuda:0 has"):
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
        with pytest.raises(pissa_rs.DeviceMemoryError, match=f"tensor '{names[1]}': out of memory on cpu"):
            list(runner.results())


def test_corda_whose_layer_and_covariances_cannot_fit_is_refused_naming_it(tmp_path, monkeypatch):
    """CorDA holds a layer's targets and their float32 input covariances on the device (on
    DeepSeek-V3 a layer's 256 gate_up covariances alone are 52.6 GB): a run whose largest layer
    cannot fit is refused before any write, naming its largest tensor; the dry run says it."""
    from helpers import calibration_texts

    # an MLP as wide as the attention: the layer's covariances outweigh any one target's working set
    llama = save_tiny_model(tmp_path / "square", "llama", layers=1, intermediate=64, shard_size="150KB")
    kwargs = dict(method="corda-ipm", calibration=calibration_texts(4), calibration_samples=4,
                  calibration_length=32)
    options = pissa_rs.DecomposeOptions.from_fields({"r": 4, "device": "cpu", **kwargs})
    plan = pissa_rs.plan(llama, r=4, out=tmp_path / "o", **kwargs)
    weights, covariances, tensor = device_memory.covariance_layer_bytes(plan.targets, 4)
    mlp_in, hidden = plan.targets[-1].shape[1], plan.targets[0].shape[1]
    assert covariances == 4 * (4 * hidden**2 + 2 * hidden**2 + mlp_in**2)  # q k v o gate up (hidden in), down
    sizes = {t.tensor: t.shape[0] * t.shape[1] for t in plan.targets}
    assert sizes[tensor] == max(sizes.values())  # the layer's largest tensor is named (all tie here: the first)
    per_target = device_memory.device_memory_plan(plan.targets, options).peak_bytes
    batch = device_memory.covariance_passes(plan.targets, 4, 0, options.calibration_batch * 32).batch
    free = weights + covariances + batch + device_memory.DEVICE_OVERHEAD_BYTES - 1  # a byte short for the layer
    assert per_target + device_memory.DEVICE_OVERHEAD_BYTES <= free  # while each target's decomposition fits
    monkeypatch.setattr(device_memory, "free_device_memory", lambda devices: {"cuda:0": free})
    assert not plan.fits_on_device and f"DOES NOT FIT: '{tensor}': CorDA calibrates" in plan.describe()
    with pytest.raises(pissa_rs.DeviceMemoryError, match=f"'{tensor}': CorDA calibrates its layer"):
        pissa_rs.decompose_checkpoint(llama, r=4, out=tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(device_memory, "free_device_memory", lambda devices: {"cuda:0": free + 1})
    device_memory.check_device_memory(plan.targets, options)  # fits now


def test_corda_expert_covariances_beyond_a_gpu_take_passes_and_one_expert_too_many_is_refused(tmp_path,
                                                                                              monkeypatch):
    """A GPU whose free memory holds a MoE layer's targets and other covariances but not every
    expert's: the plan runs the layer in passes of the experts that fit (the dry run says how
    many), and is refused, naming the tensor, only where not one expert fits beside the rest."""
    from test_calibrated import LENGTH, N, TEXTS, save_moe

    path = tmp_path / "m"
    save_moe(path, "qwen3_moe")
    kwargs = dict(method="corda-kpm", calibration=TEXTS, calibration_samples=N, calibration_length=LENGTH)
    plan = pissa_rs.plan(path, r=4, out=tmp_path / "o", **kwargs)
    tokens = plan.options.calibration_batch * LENGTH
    passes = device_memory.covariance_passes(device_memory.layers_of(plan.targets)["0"], 4, 1 << 40, tokens)
    enough = passes.weights + passes.covariances + passes.batch + device_memory.DEVICE_OVERHEAD_BYTES
    assert device_memory.device_memory_plan(plan.targets, plan.options).peak_bytes <= enough
    monkeypatch.setattr(device_memory, "free_device_memory", lambda devices: {"cuda:0": enough + 2 * passes.per_expert})
    assert plan.fits_on_device, plan.describe()
    assert "do not fit beside the layer run their forward up to 2 times, 2 experts a pass" in plan.describe()
    monkeypatch.setattr(device_memory, "free_device_memory", lambda devices: {"cuda:0": enough + 4 * passes.per_expert})
    assert plan.fits_on_device and "experts:" not in plan.describe()
    monkeypatch.setattr(device_memory, "free_device_memory",
                        lambda devices: {"cuda:0": enough + passes.per_expert - 1})  # a byte short of one expert
    assert not plan.fits_on_device
    with pytest.raises(pissa_rs.DeviceMemoryError, match=r"'model.layers.0.mlp.experts.gate_up_proj': CorDA calibrates "
                       r"its layer .* \+ 25.0 KiB for each expert at least; a batch ~[\d.]+ KiB\) on the device, and cuda:0 has"):
        pissa_rs.decompose_checkpoint(path, r=4, out=tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()
