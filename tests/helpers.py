"""Small builders shared by the tests: raw safetensors bytes, made by hand."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path


def raw_safetensors(header: dict | str | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file from a header (dict, JSON text or raw bytes) and data bytes.

    `header_len` overrides the 8-byte length prefix, to build lying files.
    """
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + data


def write_raw(path: Path, header: dict | str | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    path.write_bytes(raw_safetensors(header, data, header_len))
    return path


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def write_index(directory: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> Path:
    path = directory / name
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def move_adapters(model, scale: float = 0.05) -> None:
    """A stand-in for training: move every LoRA weight of a PeftModel at random."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * scale)


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def same_output(out: Path, reference: Path, report_rtol: float = 0.0) -> None:
    """Every file byte-identical but the report, whose per-tensor numbers must
    agree apart from timings (within `report_rtol` where another process summed ||W||_F^2
    with another BLAS thread split), and the adapter config, which names its own directory."""
    mine, theirs = digest(out), digest(reference)
    assert set(mine) == set(theirs)
    own = ("pissa_report.json", "pissa_init/adapter_config.json")
    assert {k: v for k, v in mine.items() if k not in own} == {k: v for k, v in theirs.items() if k not in own}

    def config(path):
        cfg = json.loads((path / own[1]).read_text())
        assert cfg.pop("base_model_name_or_path") == str(path.resolve())
        return cfg

    assert config(out) == config(reference)

    def numbers(path):
        return [{k: v for k, v in t.items() if not k.endswith("seconds")}
                for t in json.loads((path / "pissa_report.json").read_text())["tensors"]]

    if report_rtol == 0.0:
        assert numbers(out) == numbers(reference)
    else:
        import pytest

        for mine, theirs in zip(numbers(out), numbers(reference), strict=True):
            assert mine.keys() == theirs.keys()
            for key, value in theirs.items():
                if isinstance(value, float):
                    assert mine[key] == pytest.approx(value, rel=report_rtol), (theirs["tensor"], key)
                else:
                    assert mine[key] == value, (theirs["tensor"], key)


def save_spread(model, path, **kwargs) -> None:
    """save_pretrained of `model` (float32) with every weight spread by N(0, 0.05): random
    init leaves norms at exact constants and some weights at zero."""
    import torch

    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, **kwargs)


def load_output_without_key_warnings(cls, out, caplog):
    """transformers' `cls` on a decomposition's OUT, then PEFT's adapter from pissa_init
    (float32), asserting that neither said a key was missing or unexpected."""
    import logging
    import warnings

    import torch
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        residual = cls.from_pretrained(out, dtype=torch.float32).eval()
        loaded = PeftModel.from_pretrained(residual, out, subfolder="pissa_init")
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if ("missing" in m.lower() or "unexpected" in m.lower()) and "key" in m.lower()], said
    return loaded


def text(**extra) -> dict:
    """A tiny decoder's config fields (hidden 64, 2 layers, 4 heads / 2 kv heads), for any family."""
    return dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **extra)


def calibration_texts(count: int = 48) -> list[str]:
    """Text this machine already has: the longer docstrings of torch's functions, in name order."""
    import inspect

    import torch

    texts = []
    for name in sorted(dir(torch)):
        doc = inspect.getdoc(getattr(torch, name, None))
        if doc and len(doc) > 200 and doc not in texts:
            texts.append(doc)
        if len(texts) == count:
            break
    return texts


def save_tokenizer(path: Path, texts: list[str] | None = None):
    """A small byte-level BPE tokenizer trained on `texts`, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts or calibration_texts(),
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast
