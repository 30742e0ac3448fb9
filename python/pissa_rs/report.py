"""pissa_report.json: built once by the commit, and the one answer, for verify, qerror,
merge, training and convert, to "what does this output hold"."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import REPORT_NAME
from .formats.bnb_serialized import StoredQuantized
from .quant import Quantization

if TYPE_CHECKING:
    from .options import DecomposeOptions
    from .planning.plan import Plan


@dataclass
class OutputReport:
    """What a finished output's report says it holds (empty for a folder without one)."""

    options: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, out: Path) -> OutputReport:
        path = Path(out) / REPORT_NAME
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(data.get("options", {}), data)

    @property
    def exists(self) -> bool:
        return bool(self.data)

    @property
    def storage(self) -> Quantization | None:
        """save_quantized: the bitsandbytes quantization the residual is stored in."""
        if not self.options.get("save_quantized"):
            return None
        return Quantization(self.options["quantize"], double_quant=self.options.get("double_quant", False))

    @property
    def stored(self) -> dict[str, StoredQuantized]:
        """save_quantized: every weight stored that way, by original tensor name."""
        if self.storage is None:
            return {}
        return {name: StoredQuantized.from_record(name, r) for name, r in self.data.get("stored_quantized", {}).items()}

    @property
    def residual_quantization(self) -> Quantization | None:
        """The quantization whose dequantized values the residual holds: save_quantized's,
        or QPiSSA's with quant_iters > 1 (stored as deq(quant(W - s*B@A)) in W's dtype)."""
        if self.storage is not None:
            return self.storage
        if self.options.get("quantize") and self.options.get("quant_iters", 1) > 1:
            return Quantization(self.options["quantize"], double_quant=self.options.get("double_quant", False))
        return None

    def made_for_double_quant(self, quantize: str | None) -> bool:
        """Whether it was decomposed for `quantize` with double quantization."""
        return bool(self.options.get("double_quant")) and self.options.get("quantize") == quantize

    @property
    def source_as(self) -> dict[str, list]:
        return self.data.get("source_as", {})


def build_report(path: Path, out: Path, plan: Plan, options: DecomposeOptions, records: list[dict], copied: list[str],
                 total_bytes: int, seconds: float, origin: dict[str, str | None]) -> dict[str, Any]:
    """The report of one output, from its plan, options and the targets' records."""
    return {
        "input": str(Path(path).resolve()),
        "out": str(out.resolve()),
        "base_model": origin,  # what a LoRA converted from this adapter applies to (base_model_of)
        "architecture": plan.architecture,
        **({"config_note": plan.config_note} if plan.config_note else {}),
        "method": options.method,
        "init_lora_weights": options.init_lora_weights,
        "svd_rank": options.svd_rank,  # larger than r when several ranks shared one SVD
        "options": asdict(options),
        # what target_modules picked (PEFT's expansion included) that was not decomposed, and why
        "left_out": [{"name": name, "why": why} for name, why in plan.left_out],
        "rank_limited": list(plan.rank_limited),  # decomposed at their smaller dimension, below r
        **({"source_format": plan.source_format, "source_as": plan.source_as} if plan.source_as else {}),
        **({"quantizer": options.quantization.choice(options.device).as_record()} if options.quantize else {}),
        **({"stored_quantized": {w.tensor: w.as_record() for w in plan.stored_quantized}}
           if options.save_quantized else {}),
        "totals": {
            "targets": len(records),
            "bytes_written": total_bytes,
            "seconds": seconds,
            "energy_kept_mean": sum(r["energy_kept"] for r in records) / max(len(records), 1),
            "max_abs_error": max((r["max_abs_error"] for r in records), default=0.0),
            "copied_files": copied,
            # over the weights bitsandbytes quantizes (experts and routers are not)
            **{f"{key}_mean": sum(measured) / len(measured)
               for key in ("error_reduction", "loftq_error_reduction")
               for measured in [[r[key] for r in records if key in r]] if measured},
        },
        "tensors": records,
    }
