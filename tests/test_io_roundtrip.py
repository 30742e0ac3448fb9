"""Our reader and writer against the safetensors Python package, both ways, byte for byte."""

from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pissa_rs
from pissa_rs.tensors import TORCH_DTYPES

DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
          "F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"]
ITEMSIZE = {name: torch.empty((), dtype=TORCH_DTYPES[name]).element_size() for name in DTYPES}

names = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@st.composite
def tensor_sets(draw):
    """name -> (dtype, shape, raw bytes): 0-dim, empty and odd shapes, every dtype."""
    chosen = draw(st.lists(names, min_size=1, max_size=8, unique=True))
    out = {}
    for name in chosen:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(shapes)
        n = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        if dtype == "BOOL":
            raw = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
        else:
            raw = draw(st.binary(min_size=n, max_size=n))
        out[name] = (dtype, shape, raw)
    return out


def to_torch(dtype: str, shape: list[int], raw: bytes) -> torch.Tensor:
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(TORCH_DTYPES[dtype]).reshape(shape).clone()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(tensors=tensor_sets(), order_seed=st.randoms(use_true_random=False))
def test_our_files_match_safetensors_byte_for_byte(tmp_path, tensors, order_seed):
    path = tmp_path / "ours.safetensors"
    specs = [(name, dtype, shape) for name, (dtype, shape, _) in tensors.items()]
    writer = pissa_rs.ShardWriter(path, specs, metadata={"format": "pt"})
    order = list(tensors)
    order_seed.shuffle(order)  # positional writes: any order must give the same bytes
    for name in order:
        writer.write(name, tensors[name][2])
    writer.finalize()

    expected = safetensors.torch.save({n: to_torch(*v) for n, v in tensors.items()}, metadata={"format": "pt"})
    assert path.read_bytes() == expected
    with safetensors.safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, (dtype, shape, raw) in tensors.items():
            t = f.get_tensor(name)
            assert list(t.shape) == shape and t.dtype == TORCH_DTYPES[dtype]
            assert tensor_bytes(t) == raw


@SETTINGS
@given(tensors=tensor_sets())
def test_safetensors_files_read_back_byte_for_byte(tmp_path, tensors):
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file({n: to_torch(*v) for n, v in tensors.items()}, path)
    ck = pissa_rs.Checkpoint(path)
    assert sorted(ck.names()) == sorted(tensors)
    size = path.stat().st_size
    for name, (dtype, shape, raw) in tensors.items():
        info = ck.info(name)
        assert (info.dtype, list(info.shape), info.nbytes) == (dtype, shape, len(raw))
        assert info.file == str(path) and 8 <= info.start <= info.end <= size
        assert bytes(ck.buffer(name)) == raw
        view = pissa_rs.as_torch(ck.buffer(name))
        assert view.dtype == TORCH_DTYPES[dtype] and list(view.shape) == shape
        assert tensor_bytes(view) == raw


@SETTINGS
@given(tensors=tensor_sets())
def test_copy_from_checkpoint_reproduces_the_file(tmp_path, tensors):
    src = tmp_path / "src.safetensors"
    safetensors.torch.save_file({n: to_torch(*v) for n, v in tensors.items()}, src)
    ck = pissa_rs.Checkpoint(src)
    dst = tmp_path / "dst.safetensors"
    specs = [(t.name, t.dtype, list(t.shape)) for t in ck.tensors]
    w = pissa_rs.ShardWriter(dst, specs, metadata=ck.file_metadata[str(src)])
    for name in reversed(ck.names()):
        w.copy_from(ck, name)
    w.finalize()
    assert dst.read_bytes() == src.read_bytes()


def test_buffers_are_zero_copy_views_of_the_mapping(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.randn(64, 32), "b": torch.randn(32)}, path)
    ck = pissa_rs.Checkpoint(path)
    info = ck.info("w")
    a = np.frombuffer(ck.buffer("w"), dtype=np.uint8)
    b = np.frombuffer(ck.buffer("w"), dtype=np.uint8)
    # Two exports share one address: the bytes were not copied.
    assert a.ctypes.data == b.ctypes.data
    bias = np.frombuffer(ck.buffer("b"), dtype=np.uint8)
    assert bias.ctypes.data - a.ctypes.data == ck.info("b").start - info.start
    t = pissa_rs.as_torch(ck.buffer("w"))
    assert t.data_ptr() == a.ctypes.data
    assert memoryview(ck.buffer("w")).readonly
    # The view outlives the Checkpoint object: it holds the mapping.
    del ck
    assert torch.equal(t, safetensors.torch.load_file(path)["w"])


def test_sharded_directory_lists_every_tensor_with_its_file(tmp_path):
    from helpers import write_index

    safetensors.torch.save_file({"a": torch.zeros(2), "b": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "model-00001-of-00002.safetensors")
    safetensors.torch.save_file({"c": torch.arange(4)}, tmp_path / "model-00002-of-00002.safetensors")
    write_index(tmp_path, {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                           "c": "model-00002-of-00002.safetensors"})
    ck = pissa_rs.Checkpoint(tmp_path)
    assert ck.index_path == str(tmp_path / "model.safetensors.index.json")
    assert [os.path.basename(f) for f in ck.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert {t.name: os.path.basename(t.file) for t in ck.tensors} == {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}
    assert torch.equal(pissa_rs.as_torch(ck.buffer("c")), torch.arange(4))
    assert "c" in ck and "d" not in ck and len(ck) == 3


def test_directory_with_one_model_safetensors(tmp_path):
    safetensors.torch.save_file({"x": torch.ones(2)}, tmp_path / "model.safetensors")
    assert pissa_rs.Checkpoint(tmp_path).names() == ["x"]


def test_reading_never_modifies_the_input(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.randn(16, 16)}, path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    ck = pissa_rs.Checkpoint(path)
    out = pissa_rs.ShardWriter(tmp_path / "o.safetensors", [("w", "F32", [16, 16])])
    out.copy_from(ck, "w")
    out.finalize()
    ck.release("w")
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    view = memoryview(ck.buffer("w"))
    with pytest.raises(TypeError):
        view[0] = 1  # the export is read-only, like the mapping behind it
    assert path.read_bytes() == before[0]
