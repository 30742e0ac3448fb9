"""Models where users keep them: a local path, or a Hugging Face Hub model ID
resolved through huggingface_hub (its cache, its offline mode, its resumable
downloads), fetching only the files a decomposition reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

# What a decomposition reads besides the weights (copied into the output as they are).
SMALL_FILES = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template*", "*.tiktoken", "spiece.model",
    "preprocessor_config.json", "processor_config.json",
]
INDEX = "model.safetensors.index.json"


class HubError(ValueError):
    """A model ID that names no usable safetensors checkpoint."""


def is_local(path: str | os.PathLike[str]) -> bool:
    return Path(path).exists()


def _looks_like_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_model(path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local file or directory as it is (a path that exists always wins); else a
    Hub model ID (`org/name`), resolved to its snapshot directory in the Hugging Face
    cache: from the cache when offline (HF_HUB_OFFLINE=1) or when the Hub cannot be
    reached, otherwise downloading what is missing. Only the safetensors shards (those
    the index names, or model.safetensors), the index and the small files a
    decomposition copies are fetched; never .bin/.pth/ONNX duplicates."""
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
        folder = Path(snapshot_download(text, revision=revision, allow_patterns=[INDEX, *SMALL_FILES]))
        if (folder / INDEX).is_file():
            shards = sorted(set(json.loads((folder / INDEX).read_text()).get("weight_map", {}).values()))
            weights = shards
        else:
            weights = ["model.safetensors"]
        if weights:
            folder = Path(snapshot_download(text, revision=revision, allow_patterns=weights))
    except Exception as err:  # huggingface_hub's own errors: not found, gated, offline and not cached
        raise HubError(f"{where}: cannot get the model from the Hugging Face Hub or its cache: "
                       f"{type(err).__name__}: {err}") from err
    if not any(folder.glob("*.safetensors")):
        raise HubError(f"{where}: has no safetensors weights (model.safetensors or {INDEX}); pissa_rs reads "
                       "safetensors only (convert .bin checkpoints with transformers' save_pretrained)")
    return folder


def model_name(path: str | os.PathLike[str]) -> str:
    """The last part of a path or model ID: what default output names start with."""
    return Path(os.fspath(path)).name
