"""Models where users keep them: a local path, or a Hugging Face Hub model ID
resolved through huggingface_hub (its cache, its offline mode, its resumable
downloads), fetching only the files a decomposition reads."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from .model_files import WEIGHT_SUFFIXES
from .requirements import require_versions

# What a decomposition reads besides the shards: every file but weights (the small
# files it copies into the output, subfolders included; see model_files).
NOT_SMALL = [f"*{suffix}" for suffix in WEIGHT_SUFFIXES]
INDEX = "model.safetensors.index.json"


class HubError(ValueError):
    """A model ID that names no usable safetensors checkpoint."""


def is_local(path: str | os.PathLike[str]) -> bool:
    return Path(path).exists()


def _looks_like_repo_id(text: str) -> bool:
    require_versions()
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_model(path: str | os.PathLike[str], revision: str | None = None, headers_only: bool = False) -> Path:
    """A local file or directory as it is (a path that exists always wins); else a
    Hub model ID (`org/name`), resolved to its snapshot directory in the Hugging Face
    cache: from the cache when offline (HF_HUB_OFFLINE=1) or when the Hub cannot be
    reached, otherwise downloading what is missing. Only the safetensors shards (those
    the index names, or model.safetensors), the index and the small files a
    decomposition copies are fetched; never .bin/.pth/ONNX duplicates. `headers_only`
    (a dry run): shards not in the cache are not downloaded; their headers are read
    from the Hub (HTTP range requests) into sparse stand-ins (see header_only_shards)."""
    if is_local(path):
        if revision is not None:
            raise ValueError(f"{path}: revision applies to Hub model IDs, and this is a local path")
        return Path(path)
    text = os.fspath(path)
    if not _looks_like_repo_id(text):
        raise FileNotFoundError(f"{text}: no such file or directory, and not a Hugging Face model ID")
    from huggingface_hub import snapshot_download

    where = f"{text}@{revision or 'main'}"
    try:
        folder = Path(snapshot_download(text, revision=revision, ignore_patterns=NOT_SMALL))
        if (folder / INDEX).is_file():
            weights = sorted(set(json.loads((folder / INDEX).read_text()).get("weight_map", {}).values()))
        else:
            weights = ["model.safetensors"]
        if headers_only and not all((folder / w).is_file() for w in weights):
            return header_only_shards(text, revision, folder)
        if weights:
            folder = Path(snapshot_download(text, revision=revision, allow_patterns=weights))
    except Exception as err:  # huggingface_hub's own errors: not found, gated, offline and not cached
        raise HubError(f"{where}: cannot get the model from the Hugging Face Hub or its cache: "
                       f"{type(err).__name__}: {err}") from err
    if not any(folder.glob("*.safetensors")):
        raise HubError(f"{where}: has no safetensors weights (model.safetensors or {INDEX}); pissa_rs reads "
                       "safetensors only (convert .bin checkpoints with transformers' save_pretrained)")
    return folder


HEADERS_ONLY = ".pissa-rs-headers-only"  # in a stand-in directory: its tensors hold no values


def headers_only(root: str | os.PathLike[str]) -> bool:
    """Whether `root` is header_only_shards' stand-in, whose tensor values are not there."""
    return (Path(root) / HEADERS_ONLY).is_file()


def header_only_shards(repo_id: str, revision: str | None, small_files: Path) -> Path:
    """A temporary directory standing for a model whose weights are not downloaded: its
    small files and index (real), and each shard as a sparse file holding the real
    header and no data, at the real size. Enough to plan a run (names, dtypes, shapes,
    bytes), never to run one. Removed when the process exits."""
    from huggingface_hub import get_safetensors_metadata

    metadata = get_safetensors_metadata(repo_id, revision=revision)
    folder = Path(tempfile.mkdtemp(prefix="pissa-rs-headers-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / HEADERS_ONLY).write_text("tensor data are holes: plan from names, dtypes and shapes only\n")
    for entry in small_files.iterdir():
        if entry.is_file():
            shutil.copyfile(entry, folder / entry.name)
    for name, shard in metadata.files_metadata.items():
        header: dict = {"__metadata__": shard.metadata} if shard.metadata else {}
        header.update({t: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
                       for t, i in shard.tensors.items()})
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
        data = max((i.data_offsets[1] for i in shard.tensors.values()), default=0)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(8 + len(encoded) + data)  # a hole: no disk space, no download
    return folder


def base_model_of(path: str | os.PathLike[str], revision: str | None) -> dict[str, str | None]:
    """The original model as a LoRA of it names its base (PEFT's base_model_name_or_path
    and revision): a Hub model ID as given, a local path made absolute."""
    name = os.fspath(path) if not is_local(path) else str(Path(path).resolve())
    return {"name_or_path": name, "revision": revision}


def model_name(path: str | os.PathLike[str]) -> str:
    """The last part of a path or model ID: what default output names start with."""
    return Path(os.fspath(path)).name
