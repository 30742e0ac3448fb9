"""The base model paired with a fine-tuned one for `extract-lora`: checked to belong together
before anything is written (the same tensors, shapes and dtypes; a mismatch named), each
target's base matrix read when its unit needs it, and the tensors that differ but are not
adapted (embeddings, norms, a head) listed for the report."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from ._pissa_rs import Checkpoint, PissaError

COMPARE_CHUNK = 64 << 20  # bytes of each model held at once while comparing a tensor


class ExtractionError(PissaError, ValueError):
    """A base and a fine-tuned model that do not belong together."""


class BaseReads:
    """Target tensor name -> the base model's matrix of it, read on demand (the same pieces
    and decoding as the fine-tuned model's); on a Ray node too, the pair checked by the driver."""

    def __init__(self, base: Path, targets):
        self.base, self.path = Checkpoint(base), base
        self.targets = {t.tensor: t for t in targets}

    def __getitem__(self, tensor: str) -> torch.Tensor:
        return self.targets[tensor].weight_read(self.base).read(self.base)


class BaseWeights(BaseReads):
    """BaseReads of a pair checked to belong together (the layouts the same) before anything is
    written, with what differs but is not adapted."""

    def __init__(self, base: Path, finetuned: Checkpoint, targets):
        super().__init__(base, targets)
        ours = {t.name: t for t in finetuned.tensors}
        theirs = {t.name: t for t in self.base.tensors}
        for name in sorted(set(ours) & set(theirs)):
            a, b = ours[name], theirs[name]
            if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
                raise ExtractionError(f"{b.file}: tensor '{name}' is {b.dtype} {list(b.shape)}, but {a.dtype} "
                                      f"{list(a.shape)} in {a.file}: the fine-tuned model did not start from this "
                                      "base (another size or vocabulary?)")
        self.held = held = set()  # the tensors the targets are read from
        for t in targets:
            for piece in t.weight_read(finetuned).pieces:
                if piece.tensor not in theirs:
                    raise ExtractionError(f"{base}: no tensor '{piece.tensor}' (the fine-tuned model's "
                                          f"{t.tensor} has no base to be a LoRA of)")
                held.add(piece.tensor)
        self.saved: list[str] = []  # modules carried whole (modules_to_save), set by the driver
        self.only_finetuned = sorted(set(ours) - set(theirs))
        self.only_base = sorted(set(theirs) - set(ours))
        self.differing = [name for name in sorted(set(ours) & set(theirs) - held)
                          if not _same_bytes(finetuned, self.base, name)]

    def modules_to_save(self, requested: list[str], finetuned: Checkpoint) -> list[str]:
        """The modules `requested` names (full names or name suffixes, as PEFT's modules_to_save
        matches them; 'all': every module with a differing tensor that is not adapted), by full
        name. A name that picks no module, or picks an adapted one, is refused by name."""
        adapted = {name.rsplit(".", 1)[0] for name in self.held}
        modules = sorted({name.rsplit(".", 1)[0] for name in finetuned.names() if "." in name} - adapted)
        if list(requested) == ["all"]:
            return sorted({name.rsplit(".", 1)[0] for name in self.differing if "." in name} - adapted)
        picked = set()
        for key in requested:
            picks = lambda m: m == key or m.endswith(f".{key}")  # noqa: E731
            if any(picks(m) for m in adapted):
                raise ExtractionError(f"module '{key}' is adapted (its difference is in the LoRA): it cannot "
                                      "also be saved whole")
            found = [m for m in modules if picks(m)]
            if not found:
                close = difflib.get_close_matches(key, modules, n=3)
                raise ExtractionError(f"{finetuned.root}: no module '{key}' to save"
                                      + (f"; did you mean {', '.join(close)}?" if close else ""))
            picked.update(found)
        return sorted(picked)

    def as_record(self) -> dict:
        return {"base": str(self.path), "not_adapted_but_different": self.differing,
                "saved_whole": self.saved,
                "only_in_finetuned": self.only_finetuned, "only_in_base": self.only_base}


def _same_bytes(a: Checkpoint, b: Checkpoint, name: str) -> bool:
    size = a.info(name).nbytes
    left = torch.empty(min(size, COMPARE_CHUNK), dtype=torch.uint8)
    right = torch.empty_like(left)
    for offset in range(0, size, COMPARE_CHUNK):
        n = min(COMPARE_CHUNK, size - offset)
        a.read_range_into(name, offset, left[:n].numpy())
        b.read_range_into(name, offset, right[:n].numpy())
        if not torch.equal(left[:n], right[:n]):
            return False
    return True

