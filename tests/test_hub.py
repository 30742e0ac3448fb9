"""Models where users keep them: Hugging Face cache snapshots (symlinked files) and
Hub model IDs, resolved offline from a cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from make_tiny_model import save_tiny_model

import pissa_rs
from pissa_rs.hub import HubError, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(model_dir: Path, cache: Path, repo: str, commit: str = COMMIT, extra: dict | None = None) -> Path:
    """Put a model into a huggingface_hub cache: blobs by hash, a snapshot of links
    ../../blobs/<hash>, refs/main naming the commit. Returns the snapshot directory."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} | (extra or {})
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / name)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = save_tiny_model(root / "m", "llama", layers=2, shard_size="150KB")
    cache = root / "cache"
    snapshot = cache_model(model, cache, "org/tiny", extra={"pytorch_model.bin": b"PK\x03\x04 a pickle duplicate"})
    cache_model(save_tiny_model(root / "b", "gpt2", layers=1), cache, "org/only-bin")
    bin_only = cache / "models--org--only-bin" / "snapshots" / COMMIT
    for f in bin_only.glob("*.safetensors*"):
        f.unlink()
    os.symlink("../../blobs/x", bin_only / "pytorch_model.bin")
    return model, cache, snapshot


@pytest.fixture
def offline(tiny, monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    _, cache, _ = tiny
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


def test_a_cache_snapshot_directory_is_a_checkpoint(tiny, tmp_path):
    model, _, snapshot = tiny
    assert all((snapshot / n).is_symlink() for n in os.listdir(snapshot))
    res = pissa_rs.decompose_checkpoint(snapshot, r=4, out=tmp_path / "o", progress=False)
    assert pissa_rs.verify(res.out, against=model).ok
    assert not any(p.is_symlink() for p in res.out.rglob("*"))  # the output holds files, not links
    assert json.loads((res.out / "config.json").read_text()) == json.loads((model / "config.json").read_text())
    assert not (res.out / "pytorch_model.bin").exists()


def test_a_model_id_resolves_offline_from_the_cache(tiny, offline, tmp_path):
    model, _, snapshot = tiny
    assert resolve_model("org/tiny") == snapshot
    assert resolve_model("org/tiny", revision=COMMIT) == snapshot
    res = pissa_rs.decompose_checkpoint("org/tiny", r=4, progress=False)
    assert res.out == tmp_path / "tiny-pissa-r4"  # ./<name>-pissa-r<r> in the current directory
    # A LoRA converted from this adapter applies to the model ID, at the revision asked for.
    assert res.report["base_model"] == {"name_or_path": "org/tiny", "revision": None}
    pinned = pissa_rs.decompose_checkpoint("org/tiny", r=4, revision=COMMIT, out=tmp_path / "pinned", progress=False)
    assert pinned.report["base_model"] == {"name_or_path": "org/tiny", "revision": COMMIT}
    assert pissa_rs.verify(res.out, against="org/tiny").ok
    assert pissa_rs.measure_quantization_error(res.out, "org/tiny")["tensors"]
    several = pissa_rs.decompose_checkpoint("org/tiny", r=[2, 3], progress=False, niter=0)
    assert [r.out for r in several] == [tmp_path / "tiny-pissa-r2", tmp_path / "tiny-pissa-r3"]
    assert pissa_rs.plan("org/tiny", r=4).targets
    merged = pissa_rs.merge_adapter(res.out, res.adapter, tmp_path / "merged")
    assert pissa_rs.Checkpoint(merged).names()


def test_a_local_path_wins_over_an_id(tiny, offline, tmp_path):
    model, _, _ = tiny
    shutil.copytree(model, tmp_path / "org" / "tiny")
    assert resolve_model("org/tiny") == Path("org/tiny")
    with pytest.raises(ValueError, match="revision applies to Hub model IDs"):
        resolve_model("org/tiny", revision="main")


def test_ids_that_give_no_checkpoint_say_which_repo_and_revision(tiny, offline):
    with pytest.raises(HubError, match="org/tiny@v9.*cannot get the model"):
        resolve_model("org/tiny", revision="v9")
    with pytest.raises(HubError, match="org/missing@main"):
        resolve_model("org/missing")
    with pytest.raises(HubError, match="org/only-bin@main: has no safetensors"):
        resolve_model("org/only-bin")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model ID"):
        resolve_model("no/such/path/x")


def test_only_what_a_decomposition_reads_is_asked_for(tiny, monkeypatch, tmp_path):
    """Online, huggingface_hub downloads what the patterns allow: every file but weights
    first (config, tokenizer, subfolders such as sentence-transformers' 1_Pooling/), then
    exactly the shards the index names; never .bin/.pth/ONNX."""
    import fnmatch

    import huggingface_hub

    _, _, snapshot = tiny
    repo_files = [*os.listdir(snapshot), "model.onnx", "pytorch_model-00001-of-00002.bin", "consolidated.pth",
                  "original/params.json", "1_Pooling/config.json", "onnx/model.onnx"]
    fetched = set()

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        for f in repo_files:  # huggingface_hub's rule: allowed (if patterns given) and not ignored
            allowed = allow_patterns is None or any(fnmatch.fnmatch(f, p) for p in allow_patterns)
            if allowed and not any(fnmatch.fnmatch(f, p) for p in ignore_patterns or ()):
                fetched.add(f)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("org/tiny", revision="main") == snapshot
    weights = {"pytorch_model.bin", "model.onnx", "pytorch_model-00001-of-00002.bin", "consolidated.pth",
               "onnx/model.onnx"}
    assert fetched == set(repo_files) - weights


def test_the_cli_takes_ids_offline(tiny, tmp_path):
    model, cache, _ = tiny
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pissa_rs.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)

    dry = cli("decompose", "org/tiny", "--rank", "4", "--dry-run")
    assert dry.returncode == 0 and f"output: {tmp_path / 'tiny-pissa-r4'}" in dry.stdout, dry.stderr
    run = cli("decompose", "org/tiny", "--rank", "4", "--revision", COMMIT, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert cli("verify", "tiny-pissa-r4", "--against", "org/tiny").returncode == 0
    assert "architecture: LlamaForCausalLM" in cli("inspect", "org/tiny").stdout
    bad = cli("decompose", "org/tiny", "--rank", "4", "--revision", "nope")
    assert bad.returncode == 1 and "org/tiny@nope" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def headers_only_repo(model: Path, cache: Path, repo: str, monkeypatch, tmp_path) -> None:
    """`repo` in the cache with only its small files and index; huggingface_hub's
    get_safetensors_metadata (range requests) faked from `model`'s real shards."""
    import struct

    import huggingface_hub
    from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    small = tmp_path / f"small-{repo.replace('/', '-')}"
    small.mkdir()
    for f in model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, small / f.name)
    cache_model(small, cache, repo)

    def headers(repo_id, revision=None, **kwargs):
        assert repo_id == repo
        files = {}
        for f in sorted(model.glob("*.safetensors")):
            raw = f.read_bytes()
            header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
            meta = header.pop("__metadata__", {})
            files[f.name] = SafetensorsFileMetadata(metadata=meta, tensors={
                k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                for k, v in header.items()})
        index = json.loads((model / "model.safetensors.index.json").read_text())
        return SafetensorsRepoMetadata(metadata=index.get("metadata"), sharded=True, weight_map=index["weight_map"],
                                       files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", headers)


def test_a_dry_run_of_an_uncached_id_reads_only_headers(tiny, offline, monkeypatch, tmp_path):
    """Only the small files and the index are in the cache: the plan comes from the shards'
    headers (huggingface_hub's get_safetensors_metadata, range requests; faked here from the
    real files), nothing is downloaded, and it is the plan of the whole model."""
    model, cache, _ = tiny
    headers_only_repo(model, cache, "org/headers-only", monkeypatch, tmp_path)
    planned = pissa_rs.plan("org/headers-only", r=4)
    full = pissa_rs.plan(model, r=4)
    assert [t.tensor for t in planned.targets] == [t.tensor for t in full.targets]
    assert (planned.input_bytes, planned.residual_bytes) == (full.input_bytes, full.residual_bytes)
    assert str(planned.input) == "org/headers-only" and planned.outs == [tmp_path / "headers-only-pissa-r4"]
    snapshot = cache / "models--org--headers-only" / "snapshots" / COMMIT
    assert not list(snapshot.glob("*.safetensors"))  # nothing was downloaded
    with pytest.raises(HubError, match="org/headers-only@main"):  # a real run needs the weights
        pissa_rs.decompose_checkpoint("org/headers-only", r=4, progress=False)


def test_a_dry_run_of_an_uncached_fp8_id(tiny, offline, monkeypatch, tmp_path):
    """An FP8 model on the Hub (DeepSeek-V3's format): planned from headers alone, its scales'
    values (holes here) are not judged, and the plan is that of the files."""
    import torch
    import transformers
    from helpers import text
    from low_precision import save_fp8_block

    _, cache, _ = tiny
    torch.manual_seed(0)
    model = tmp_path / "fp8"
    save_fp8_block(transformers.LlamaForCausalLM(transformers.LlamaConfig(**text())), model)
    headers_only_repo(model, cache, "org/fp8", monkeypatch, tmp_path)
    planned, full = pissa_rs.plan("org/fp8", r=4), pissa_rs.plan(model, r=4)
    assert [t.tensor for t in planned.targets] == [t.tensor for t in full.targets]
    assert planned.source_sizes == full.source_sizes and planned.source_format == full.source_format
