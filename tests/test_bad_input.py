"""Every kind of bad input gets its own exception class and a message naming the file and tensor."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

import pissa_rs
from helpers import entry, write_index, write_raw


def open_fails(path, exc_type, *culprits):
    with pytest.raises(exc_type) as info:
        pissa_rs.Checkpoint(path)
    message = str(info.value)
    for culprit in culprits:
        assert str(culprit) in message, message
    assert isinstance(info.value, pissa_rs.PissaError)
    return info.value


def test_truncated_data(tmp_path):
    good = safetensors.torch.save({"a": torch.zeros(4), "w": torch.zeros(16)})
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good[:-10])
    err = open_fails(path, pissa_rs.TensorLayoutError, path, "'w'", "truncated")
    assert err.tensor == "w" and err.path == str(path)


def test_file_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    open_fails(path, pissa_rs.HeaderError, path, "truncated")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    open_fails(path, pissa_rs.HeaderError, path)


def test_header_length_past_end_of_file(tmp_path):
    path = write_raw(tmp_path / "long.safetensors", "{}", header_len=4096)
    open_fails(path, pissa_rs.HeaderError, path, "4096", "past the end")


def test_absurd_header_length_is_refused_without_allocating(tmp_path):
    path = write_raw(tmp_path / "huge.safetensors", "{}", header_len=2**62)
    open_fails(path, pissa_rs.HeaderError, path, str(2**62), "limit")


def test_invalid_utf8_header(tmp_path):
    path = write_raw(tmp_path / "utf8.safetensors", b'{"\xff\xfe": 1}')
    open_fails(path, pissa_rs.HeaderError, path, "UTF-8")


def test_invalid_json_header(tmp_path):
    path = write_raw(tmp_path / "json.safetensors", '{"a": {"dtype": "F32",')
    open_fails(path, pissa_rs.HeaderError, path, "JSON")


def test_unknown_dtype_in_header(tmp_path):
    path = write_raw(tmp_path / "dtype.safetensors", {"w": entry("F33", [1], 0, 4)}, b"\0" * 4)
    open_fails(path, pissa_rs.HeaderError, path, "F33")


def test_offsets_out_of_range(tmp_path):
    header = {"a": entry("U8", [4], 0, 4), "w": entry("F32", [4], 4, 20)}
    path = write_raw(tmp_path / "range.safetensors", header, b"\0" * 12)
    open_fails(path, pissa_rs.TensorLayoutError, path, "'w'", "past the end")


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("U8", [8], 0, 8), "b": entry("U8", [4], 4, 8)}
    path = write_raw(tmp_path / "overlap.safetensors", header, b"\0" * 8)
    open_fails(path, pissa_rs.TensorLayoutError, path, "'b'", "overlap")


def test_hole_between_tensors(tmp_path):
    header = {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 8, 12)}
    path = write_raw(tmp_path / "hole.safetensors", header, b"\0" * 12)
    open_fails(path, pissa_rs.TensorLayoutError, path, "'b'", "hole")


def test_byte_length_not_dtype_times_shape(tmp_path):
    header = {"w": entry("BF16", [3, 3], 0, 16)}
    path = write_raw(tmp_path / "size.safetensors", header, b"\0" * 16)
    open_fails(path, pissa_rs.TensorLayoutError, path, "'w'", "needs 18 bytes")


def test_shape_that_overflows(tmp_path):
    header = {"w": entry("F64", [2**40, 2**40], 0, 8)}
    path = write_raw(tmp_path / "overflow.safetensors", header, b"\0" * 8)
    open_fails(path, pissa_rs.TensorLayoutError, path, "'w'", "overflow")


def test_trailing_bytes(tmp_path):
    path = write_raw(tmp_path / "trail.safetensors", {"w": entry("U8", [2], 0, 2)}, b"\0" * 6)
    open_fails(path, pissa_rs.TensorLayoutError, path, "trailing")


@pytest.fixture
def two_shards(tmp_path):
    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"y": torch.zeros(2)}, tmp_path / "b.safetensors")
    return tmp_path


def test_index_naming_a_missing_shard(two_shards):
    index = write_index(two_shards, {"x": "a.safetensors", "y": "gone.safetensors"})
    err = open_fails(two_shards, pissa_rs.CheckpointIndexError, index, "gone.safetensors", "'y'")
    assert err.tensor == "y"


def test_tensor_absent_from_its_shard(two_shards):
    write_index(two_shards, {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"})
    open_fails(two_shards, pissa_rs.CheckpointIndexError, two_shards / "b.safetensors", "'z'", "absent")


def test_shard_tensor_missing_from_index(two_shards):
    write_index(two_shards, {"x": "b.safetensors", "y": "b.safetensors"})
    open_fails(two_shards, pissa_rs.CheckpointIndexError, "'x'")


def test_malformed_index(two_shards):
    (two_shards / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    open_fails(two_shards, pissa_rs.CheckpointIndexError, "model.safetensors.index.json")


@pytest.mark.parametrize("escape", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_path_escaping_the_directory(tmp_path, escape):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    safetensors.torch.save_file({"x": torch.zeros(2)}, ckpt / "a.safetensors")
    safetensors.torch.save_file({"y": torch.zeros(2)}, tmp_path / "outside.safetensors")
    if escape == "ABSOLUTE":
        escape = str(tmp_path / "outside.safetensors")
    write_index(ckpt, {"x": "a.safetensors", "y": escape})
    err = open_fails(ckpt, pissa_rs.UnsafePathError, escape, "'y'", "escapes")
    assert err.tensor == "y"


def test_a_symlinked_shard_is_followed_wherever_it_points(tmp_path):
    """The Hugging Face cache keeps each snapshot file as a link to ../../blobs/<hash>:
    a file inside the directory that is a link is a file to read. Names stay checked."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    safetensors.torch.save_file({"x": torch.zeros(2)}, ckpt / "a.safetensors")
    safetensors.torch.save_file({"y": torch.ones(2)}, tmp_path / "blob")
    os.symlink("../blob", ckpt / "b.safetensors")
    write_index(ckpt, {"x": "a.safetensors", "y": "b.safetensors"})
    ck = pissa_rs.Checkpoint(ckpt)
    assert sorted(ck.names()) == ["x", "y"]
    assert pissa_rs.as_torch(ck.buffer("y")).tolist() == [1.0, 1.0]
    write_index(ckpt, {"x": "a.safetensors", "y": "../blob"})  # the same file, named from outside: refused
    open_fails(ckpt, pissa_rs.UnsafePathError, "../blob", "'y'", "escapes")


def test_symlink_inside_the_directory_is_fine(tmp_path):
    safetensors.torch.save_file({"y": torch.zeros(2)}, tmp_path / "real.safetensors")
    os.symlink(tmp_path / "real.safetensors", tmp_path / "b.safetensors")
    write_index(tmp_path, {"y": "b.safetensors"})
    assert pissa_rs.Checkpoint(tmp_path).names() == ["y"]


def test_directory_with_only_pytorch_model_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    (tmp_path / "config.json").write_text("{}")
    open_fails(tmp_path, pissa_rs.UnsupportedFormatError, "pytorch_model.bin", "safe_serialization=True")


def test_empty_directory(tmp_path):
    open_fails(tmp_path, pissa_rs.UnsupportedFormatError, tmp_path, "no checkpoint")


def test_missing_path(tmp_path):
    err = open_fails(tmp_path / "nope", pissa_rs.PissaIOError, "nope")
    assert err.errno == 2


def test_several_files_and_no_index(two_shards):
    open_fails(two_shards, pissa_rs.UnsupportedFormatError, "2 .safetensors files")


def test_unknown_tensor_lookup(two_shards):
    ck = pissa_rs.Checkpoint(two_shards / "a.safetensors")
    with pytest.raises(pissa_rs.TensorNotFoundError, match="'nope'") as info:
        ck.buffer("nope")
    assert info.value.tensor == "nope"


# --- the writer: misuse is an error naming the file and tensor, and no partial file is left


def test_writer_rejects_unknown_wrong_length_and_double_writes(tmp_path):
    path = tmp_path / "out.safetensors"
    w = pissa_rs.ShardWriter(path, [("a", "F32", [2]), ("b", "U8", [3])])
    with pytest.raises(pissa_rs.WriterError, match="'zz'"):
        w.write("zz", b"\0" * 8)
    with pytest.raises(pissa_rs.WriterError, match="'a'.*got 7 bytes.*needs 8"):
        w.write("a", b"\0" * 7)
    w.write("a", b"\0" * 8)
    with pytest.raises(pissa_rs.WriterError, match="'a'.*twice"):
        w.write("a", b"\0" * 8)
    with pytest.raises(pissa_rs.WriterError, match="'b'") as info:
        w.finalize()
    assert info.value.tensor == "b" and info.value.path == str(path)
    assert not path.exists()
    w.abort()
    assert os.listdir(tmp_path) == []


def test_writer_never_shows_a_partial_file_under_its_final_name(tmp_path):
    path = tmp_path / "out.safetensors"
    w = pissa_rs.ShardWriter(path, [("a", "U8", [4])])
    w.write("a", b"abcd")
    assert not path.exists()
    assert w.finalize() == str(path)
    assert safetensors.torch.load_file(path)["a"].tolist() == list(b"abcd")


def test_writer_context_manager_aborts_on_error(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with pissa_rs.ShardWriter(path, [("a", "U8", [4])]) as w:
            w.write("a", b"abcd")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_rejects_unknown_dtype_and_non_contiguous_buffers(tmp_path):
    import numpy as np

    with pytest.raises(pissa_rs.WriterError, match="'a'.*unknown dtype 'F99'"):
        pissa_rs.ShardWriter(tmp_path / "x.safetensors", [("a", "F99", [1])])
    w = pissa_rs.ShardWriter(tmp_path / "y.safetensors", [("a", "U8", [4])])
    with pytest.raises(ValueError, match="not C-contiguous"):
        w.write("a", np.arange(8, dtype=np.uint8)[::2])


def test_copy_from_refuses_a_source_of_another_shape(tmp_path):
    safetensors.torch.save_file({"w": torch.zeros(2, 3)}, tmp_path / "in.safetensors")
    ck = pissa_rs.Checkpoint(tmp_path / "in.safetensors")
    w = pissa_rs.ShardWriter(tmp_path / "out.safetensors", [("w", "F32", [3, 2])])
    with pytest.raises(pissa_rs.WriterError, match=r"'w'.*\[3, 2\].*\[2, 3\]"):
        w.copy_from(ck, "w")


def test_full_disk_is_an_io_error_naming_the_file(tmp_path):
    import resource

    # RLIMIT_FSIZE stands in for a full disk: reserving the file fails with EFBIG.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    import signal

    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(pissa_rs.PissaIOError) as info:
            pissa_rs.ShardWriter(tmp_path / "big.safetensors", [("w", "F32", [1 << 20])])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert "big.safetensors" in str(info.value) and info.value.errno is not None
    assert not (tmp_path / "big.safetensors").exists()
