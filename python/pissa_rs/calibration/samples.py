"""Calibration text as token ids: read from a text or JSONL file, a `datasets` Dataset (or
its saved folder) or a list of strings; tokenized with the model's own tokenizer, sample by
sample as PEFT's users feed them; hashed for the report and resume's identity."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._pissa_rs import PissaError

# PEFT's docs: 256 samples of 2048 tokens calibrate a hidden size of 4096 (HIDDEN / TOKENS * 128 samples).
DEFAULT_SAMPLES, DEFAULT_LENGTH, DEFAULT_BATCH = 256, 2048, 8


class CalibrationError(PissaError, ValueError):
    """Calibration data that cannot calibrate this model: named with where it came from."""


@dataclass(frozen=True)
class CalibrationSet:
    """The token ids of every sample (each as the tokenizer returns it, special tokens
    included, no padding), where they came from, and their hash."""

    samples: tuple[torch.Tensor, ...]  # int64, 1-D
    source: str
    digest: str
    length: int  # the longest a sample could be (max_length)

    @property
    def tokens(self) -> int:
        return sum(int(s.numel()) for s in self.samples)

    def batches(self, size: int) -> list[tuple[int, ...]]:
        """Sample indices in batches of `size`, in order (as PEFT's dataloader yields them)."""
        return [tuple(range(k, min(k + size, len(self.samples)))) for k in range(0, len(self.samples), size)]

    def as_record(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.samples), "tokens": self.tokens, "sha256": self.digest,
                "lengths": [int(s.numel()) for s in self.samples]}


def _texts_of_file(path: Path) -> list[str]:
    if path.is_dir():  # a Dataset saved with save_to_disk
        try:
            from datasets import load_from_disk
        except ImportError as e:
            raise CalibrationError(f"calibration {path}: a folder is read as a saved `datasets` Dataset, and "
                                   "datasets is not installed (pip install datasets)") from e
        try:
            return _texts_of_dataset(load_from_disk(str(path)), str(path))
        except FileNotFoundError as e:
            raise CalibrationError(f"calibration {path}: not a Dataset saved with save_to_disk ({e})") from e
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"calibration {path}: cannot be read ({e.strerror or e})") from e
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration {path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                               "give a text file, a JSONL file with a 'text' field, or a Dataset") from e
    if "\x00" in content:
        raise CalibrationError(f"calibration {path}: holds NUL bytes, not text")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"calibration {path}, line {number}: not JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CalibrationError(f"calibration {path}, line {number}: needs a string field 'text'")
            texts.append(row["text"])
        return texts
    # plain text: one sample per paragraph (blank-line separated), as a document reader sees it
    return [p.strip() for p in content.split("\n\n") if p.strip()]


def _texts_of_dataset(dataset, where: str) -> list[str]:
    if "text" not in getattr(dataset, "column_names", []):
        raise CalibrationError(f"calibration {where}: the Dataset has no 'text' column "
                               f"(columns: {getattr(dataset, 'column_names', None)})")
    texts = dataset["text"]
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise CalibrationError(f"calibration {where}: sample {k}'s 'text' is {type(t).__name__}, not text")
    return list(texts)


def calibration_texts(data: Any) -> tuple[list[str], str]:
    """(the texts, where they came from) of what a user passed as calibration data."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise CalibrationError(f"calibration {path}: no such file or folder")
        return _texts_of_file(path), str(path)
    if isinstance(data, (list, tuple)):
        for k, t in enumerate(data):
            if not isinstance(t, str):
                raise CalibrationError(f"calibration list: sample {k} is {type(t).__name__}, not text")
        return list(data), f"a list of {len(data)} texts"
    if hasattr(data, "column_names"):
        return _texts_of_dataset(data, f"Dataset({getattr(data, 'num_rows', '?')} rows)"), \
            f"Dataset({getattr(data, 'num_rows', '?')} rows, fingerprint {getattr(data, '_fingerprint', None)})"
    raise CalibrationError(f"calibration data must be a text or JSONL file, a datasets Dataset (or its saved folder) "
                           f"or a list of strings, got {type(data).__name__}")


def load_tokenizer(model_dir: Path):
    """The model's own tokenizer, from its folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CalibrationError(f"{model_dir}: no tokenizer to tokenize the calibration text with (the folder needs "
                               f"the model's tokenizer files, e.g. tokenizer.json): {e}") from e


def tokenized(data: Any, model_dir: Path, *, samples: int | None, length: int | None, max_positions: int | None
              ) -> CalibrationSet:
    """The first `samples` texts of `data`, each `tokenizer(text, truncation=True, max_length=length)`
    (`samples` None: up to DEFAULT_SAMPLES; `length` None: DEFAULT_LENGTH, or the model's
    context where that is shorter). Asked for explicitly, more than there is is an error."""
    texts, source = calibration_texts(data)
    if samples is None:
        if not texts:
            raise CalibrationError(f"calibration {source}: no samples")
        samples = min(DEFAULT_SAMPLES, len(texts))
    if length is None:
        length = min(DEFAULT_LENGTH, max_positions or DEFAULT_LENGTH)
    if samples < 1 or length < 1:
        raise CalibrationError(f"calibration_samples and calibration_length must be positive, got {samples}, {length}")
    if max_positions is not None and length > max_positions:
        raise CalibrationError(f"calibration_length {length} is longer than the model's context "
                               f"(max_position_embeddings {max_positions} in {model_dir / 'config.json'})")
    if len(texts) < samples:
        raise CalibrationError(f"calibration {source}: {len(texts)} samples, {samples} asked for "
                               "(calibration_samples); give more text or ask for fewer")
    tokenizer = load_tokenizer(model_dir)
    ids, digest = [], hashlib.sha256()
    for k, text in enumerate(texts[:samples]):
        row = tokenizer(text, truncation=True, max_length=length)["input_ids"]
        if len(row) == 0:
            raise CalibrationError(f"calibration {source}: sample {k} has no tokens")
        tensor = torch.tensor(row, dtype=torch.int64)
        ids.append(tensor)
        digest.update(len(row).to_bytes(8, "little"))
        digest.update(tensor.numpy().tobytes())
    return CalibrationSet(tuple(ids), source, digest.hexdigest(), length)
