"""Which files of a model folder travel with its weights into an output: config,
tokenizer, chat templates and sentence-transformers' subfolders (`1_Pooling/`...);
never weights of any format, hidden files, or what pissa_rs itself writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .constants import OWN_NAMES

# Weight files of other formats are never copied as "small files".
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
                   ".onnx_data", ".pdparams", ".npz", ".tflite")


def is_model_dir(path: Path) -> bool:
    """A model directory (or its index) has a config.json to trust; a bare
    .safetensors file says nothing about the files beside it."""
    return path.is_dir() or path.name.endswith(".index.json")


def small_files(root: Path) -> list[str]:
    """Paths (relative to `root`, '/'-separated, sorted) of every regular file under
    `root` that a model's users read besides its weights. Hidden files and folders (a
    download tool's `.cache/`, our own partial files) and pissa_rs's own outputs are not
    among them, at any depth."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (rel == Path(".") and d in OWN_NAMES))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                continue
            if rel == Path(".") and name in OWN_NAMES or not path.is_file():
                continue
            found.append((rel / name).as_posix())
    return found


def copy_small_files(src_root: Path, out: Path) -> list[str]:
    """small_files(src_root) into `out` at the same relative paths, each by an atomic
    rename (never a half-copied file under its final name). Returns what was copied."""
    copied = small_files(src_root)
    for rel in copied:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.copyfile(src_root / rel, tmp)
        os.replace(tmp, target)
    return copied


def top_level_names(src_root: Path) -> set[str]:
    """The top-level names small_files(src_root) lands under in an output."""
    return {rel.split("/", 1)[0] for rel in small_files(src_root)}
