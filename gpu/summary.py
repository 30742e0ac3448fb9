"""The few numbers a GPU run is for, from gpu/node.sh's results folder."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(results: Path) -> None:
    lines = []
    if (results / "node.txt").is_file():
        lines.append((results / "node.txt").read_text().strip())
    xml = results / "tests.xml"
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        verdict = "PASS" if counts["failures"] + counts["errors"] == 0 else "FAIL"
        lines.append(f"tests: {verdict}: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped")
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                lines.append(f"  failed: {case.get('classname')}::{case.get('name')}")
    bench = results / "bench70.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        ours = b["pissa_rs"]
        gpu = ", ".join(f"{d}: {v / 2**30:.2f} GiB" for d, v in (ours.get("peak_gpu_bytes") or {}).items())
        lines.append(f"bench_70b: {b['dims']['layers']} layers, {b['bytes'] / 1e9:.1f} GB: pissa_rs {ours['wall_s']:.1f} s "
                     f"({b['bytes'] / ours['wall_s'] / 1e9:.2f} GB/s), copy {b['copy_s']:.1f} s, ratio to copy "
                     f"{b['ratio_to_copy']:.2f} (target <= 1.25), peak host RSS {ours['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"(target <= 4), peak GPU {gpu or '-'}, torch work {ours['torch_s']:.1f} s")
    print("\n".join(["== summary =="] + lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-results"))
