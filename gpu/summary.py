"""The end of gpu/check.sh: every step with its verdict and the numbers it is for, from the
results folder alone, to OUT/summary.txt and printed. It reads what there is: run it again on
the files a cut-off device call brought back to see how far it got.

    python gpu/summary.py OUT        exit status 1 when a step failed, timed out or was cut off

Standard library only (it runs with the node's python, whatever the install step did).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GOOD = ("pass", "skipped: no CUDA", "skipped: not selected")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut off mid-write
    return out


def step_verdicts(results: Path) -> list[dict]:
    """One row per step: planned or recorded, in order, with its verdict. A step that started
    and never ended: the whole check was killed in it."""
    rows: dict[str, dict] = {}
    for p in read_lines(results / "plan.jsonl"):
        rows.setdefault(p["step"], {"step": p["step"], "budget": p.get("budget"), "verdict": "not run"})
    for r in read_lines(results / "steps.jsonl"):
        row = rows.setdefault(r["step"], {"step": r["step"], "budget": r.get("budget"), "verdict": "not run"})
        if r.get("event") == "start":
            row.update(verdict="cut off (started, never ended: the check was killed in it)", budget=r.get("budget"))
        elif r.get("event") == "end":
            row.update({k: v for k, v in r.items() if k in ("verdict", "rc", "seconds", "budget")})
    return list(rows.values())


def machine_line(m: dict | None) -> str:
    if not m:
        return "no machine.json"
    v = m.get("versions", {})
    gpus = "; ".join(f"{g['name']} {g['total_gib']:.0f} GiB" for g in m.get("gpus", [])) or "no CUDA device"
    return (f"{m.get('card', '?')}: {gpus}; python {v.get('python')} torch {v.get('torch')} CUDA {m.get('cuda_runtime')} "
            f"transformers {v.get('transformers')} peft {v.get('peft')}; TF32 at start {m.get('tf32')}; "
            f"{m.get('cpus')} CPUs, {m.get('memory_gib', {}).get('MemTotal', 0):.0f} GiB")


def install_line(i: dict | None) -> str:
    if not i:
        return "no install.json"
    stale = i.get("stale_files") or []
    return (f"pissa_rs {i.get('pissa-rs')} from the bundle, bitsandbytes {i.get('bitsandbytes')} "
            f"(import {i.get('bitsandbytes_import')}), pytest {i.get('pytest')}, hypothesis {i.get('hypothesis')}; "
            f"floors {i.get('floors', '?').split(':')[0]}"
            + (f"; WARNING: wheel differs from the tree in {len(stale)} file(s): {', '.join(stale[:4])}" if stale else ""))


def smoke_lines(s: dict | None, names: list[str] | None = None) -> list[str]:
    if s is None:
        return ["  no smoke.json"]
    lines = []
    for name, r in s.items():
        if names is not None and name not in names:
            continue
        verdict = r.get("verdict")
        if verdict == "running":
            verdict = "did not finish (killed in it)"
        detail = json.dumps(r.get("detail"), default=str)
        took = "" if r.get("s") is None else f" ({r['s']} s)"
        lines.append(f"  {name:<10} {verdict}{took}: {detail[:400]}{'...' if len(detail) > 400 else ''}")
    return lines


def tests_lines(path: Path) -> list[str]:
    if not path.is_file():
        return ["  no tests.xml"]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return [f"  tests.xml unreadable ({e}): pytest was killed mid-write"]
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    c = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    lines = [f"  {passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped "
             f"in {float(suite.get('time', 0)):.0f} s"]
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            lines.append(f"  failed: {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}")
    return lines


def bench_lines(b: dict | None) -> list[str]:
    if not b:
        return ["  no bench70.json"]
    ours, gb = b["pissa_rs"], b["bytes"] / 1e9
    gpu = ", ".join(f"{d}: {v / 2**30:.1f} GiB" for d, v in (ours.get("peak_gpu_bytes") or {}).items()) or "-"
    lines = [f"  {b['dims']['layers']} layers, {gb:.1f} GB on {b.get('workdir_fs', '?')}: copy {b['copy_s']:.1f} s "
             f"({gb / b['copy_s']:.2f} GB/s); pissa_rs {ours['wall_s']:.1f} s ({gb / ours['wall_s']:.2f} GB/s): "
             f"whole run {b['ratio_to_copy']:.2f}x the copy (target <= 1.25)",
             f"  peak host RSS {ours['peak_rss_bytes'] / 2**30:.2f} GiB (target <= 4), peak GPU {gpu}, "
             f"torch work {ours['torch_s']:.1f} s"]
    steady = b.get("steady") or {}
    if steady.get("weights") and b.get("steady_ratio_to_copy"):
        d, a = steady["decoder"], steady["after_first_layer"]
        lines.append(f"  steady state: decoder layers' {d['weights']} weights ({100 * b['target_share']:.0f}% of the "
                     f"bytes) {d['gb_per_s']:.2f} GB/s: {b['steady_ratio_to_copy']:.2f}x the copy"
                     + (f"; from layer 1 on {a['gb_per_s']:.2f} GB/s" if a.get("weights") else "")
                     + f"; {steady['before_first_weight_s']:.1f} s before the first weight, "
                       f"{steady['after_last_weight_s']:.1f} s after the last")
    t = ours.get("timeline") or {}
    if t.get("seconds"):
        lines.append("  timeline: " + ", ".join(f"{k} {v:.1f} s" for k, v in t["seconds"].items())
                     + f"; devices computing {100 * t.get('device_compute_share', 0):.0f}% of their time")
    return lines


def main(results: Path) -> int:
    rows = step_verdicts(results)
    machine, install = read_json(results / "machine.json"), read_json(results / "install.json")
    smoke = read_json(results / "smoke.json")
    lines = ["== GPU check summary ==", f"machine: {machine_line(machine)}"]
    for row in rows:
        took = f"{row['seconds']} s of {row['budget']}" if "seconds" in row else f"budget {row.get('budget')}"
        lines.append(f"{row['step']:<8} {row['verdict']} ({took} s)")
        name = row["step"]
        if row["verdict"] in ("not run", "skipped: not selected", "skipped: out of time"):
            continue
        if name == "install":
            lines.append(f"  {install_line(install)}")
        elif name == "smoke":
            lines += smoke_lines(smoke, [n for n in (smoke or {}) if n != "fullsvd"])
        elif name == "svd":
            lines += smoke_lines(smoke, ["fullsvd"])
        elif name == "pytest":
            lines += tests_lines(results / "tests.xml")
        elif name == "bench":
            lines += bench_lines(read_json(results / "bench70.json"))
    bad = [r["step"] for r in rows if r["verdict"] not in GOOD]
    lines.append(f"== {'all steps passed' if not bad else 'NOT passed: ' + ', '.join(bad)} "
                 f"(logs: {results}/log.txt, one per step: <step>.log)")
    text = "\n".join(lines) + "\n"
    (results / "summary.txt").write_text(text)
    print(text, end="")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-results")))
