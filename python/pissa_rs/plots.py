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
    error_reduction.png, and with rank_budget spectra.png (each module's spectrum and chosen rank),
    into `to` (default: OUT/pissa_plots, which merge does not
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
    if "rank_budget" in report:
        written.append(_plot_spectra(plt, report, to / "spectra.png"))
    return written


def _plot_spectra(plt, report: dict, path: Path) -> Path:
    """rank_budget: each module's energy kept against its rank (the spectrum, cumulative), its
    chosen rank marked, one colour per module role."""
    budget = report["rank_budget"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours: dict[str, str] = {}
    for key, gains in budget["spectra"].items():
        match = LAYER.search(key)
        role = key[match.end():] if match else key
        cumulative = [sum(gains[: k + 1]) for k in range(len(gains))]
        line, = ax.plot(range(1, len(gains) + 1), cumulative, linewidth=0.8, alpha=0.7, color=colours.get(role),
                        label=None if role in colours else role)
        colours.setdefault(role, line.get_color())
        chosen = budget["ranks"][key]
        ax.plot([chosen], [cumulative[chosen - 1]], marker="o", markersize=3, color=colours[role])
    ax.axvline(report["options"]["r"], color="grey", linestyle=":", linewidth=1, label=f"uniform r={report['options']['r']}")
    ax.set_xlabel("rank")
    ax.set_ylabel("fraction of the weight's energy kept")
    ax.set_title(f"{Path(report['input']).name}: ranks from the spectrum (dots: chosen), "
                 f"{budget['used_parameters']:,} of {budget['budget_parameters']:,} parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
