"""PNG plots of a decomposition's report (pissa_report.json). Needs matplotlib:
pip install "pissa-rs[plot]"."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .constants import PLOTS_SUBDIR, REPORT_NAME

LAYER = re.compile(r"\.(\d+)\.")


def _by_layer_role(records: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    """A module's role in its layer, its path after the layer number ("self_attn.q_proj";
    BERT's "attention.output.dense" apart from "output.dense") -> [(layer index, value)],
    for modules inside numbered layers; an expert's points are its layer's mean."""
    sums: dict[str, dict[int, list[float]]] = {}
    for rec in records:
        match = LAYER.search(rec["module"])
        if match is None or rec.get(key) is None:
            continue
        role = rec["module"][match.end():]
        sums.setdefault(role, {}).setdefault(int(match.group(1)), []).append(rec[key])
    return {role: sorted((layer, sum(v) / len(v)) for layer, v in by_layer.items())
            for role, by_layer in sums.items()}


def plot_report(out: str | Path, to: str | Path | None = None) -> list[Path]:
    """Write energy_kept.png (fraction of each weight's energy in its adapter, per
    layer and module type) and, when the report has quantization errors,
    error_reduction.png, into `to` (default: OUT/pissa_plots, which merge does not
    copy into a merged model). Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install "pissa-rs[plot]"') from None
    out = Path(out)
    report_path = out / REPORT_NAME if out.is_dir() else out
    report = json.loads(report_path.read_text())
    to = Path(to) if to else report_path.parent / PLOTS_SUBDIR
    to.mkdir(parents=True, exist_ok=True)
    written = []
    for key, file, ylabel in [
        ("energy_kept", "energy_kept.png", "fraction of energy kept by the adapter"),
        ("error_reduction", "error_reduction.png", "quantization error reduction"),
    ]:
        series = _by_layer_role(report["tensors"], key)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for kind, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=kind)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ranks = sorted({rec["r"] for rec in report["tensors"]})
        ax.set_title(f"{Path(report['input']).name}: {report['init_lora_weights']}, r={'/'.join(map(str, ranks))}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
        fig.tight_layout()
        fig.savefig(to / file, dpi=120)
        plt.close(fig)
        written.append(to / file)
    return written
