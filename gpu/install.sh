#!/usr/bin/env bash
# The check's install step: a fresh venv that sees the node's own torch, transformers and PEFT,
# and in it every wheel of the bundle (gpu/prepare.sh) with `pip install --no-index --no-deps`:
# nothing is resolved here. Then pip check (a requirement of a bundled wheel that neither the
# bundle nor the node meets is named), pissa_rs's own floors (requirements.require_versions:
# a node whose transformers or huggingface_hub is too old is named, with the pip command), the
# imports, and whether the wheel was built from this tree. Writes OUT/install.json.
#   PYTHON   the node's interpreter (default python3). When it is itself a venv's (a rehearsal
#            from the project's .venv), the new venv does not see the base interpreter's
#            site-packages but a view of PYTHON's holding the node's stack alone (gpu/bundle.py
#            view): what the bundle lacks is then missing here as it would be on a node.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.gpu-bundle}
VENV=${GPU_VENV:-.gpu-venv}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ ! -f "$BUNDLE/bundle.json" ]; then
    echo "install: no $BUNDLE/bundle.json: run bash gpu/prepare.sh where there is network and Rust, and carry" \
         "[\"$BUNDLE\"] with the device call" >&2
    exit 1
fi
rm -rf "$VENV"
VENV_ARGS=(--system-site-packages)
if "$PY" gpu/bundle.py is-venv; then
    echo "install: $PY is a venv's: the new venv sees a view of its site-packages holding the node's stack only"
    VENV_ARGS=()
fi
# A Python without ensurepip (Debian's without python3-venv) makes a venv without pip, which
# the bundle's pip wheel then bootstraps (a wheel runs as a zip: python pip.whl/pip install ...).
if [ -n "${GPU_VENV_WITHOUT_PIP:-}" ] || ! "$PY" -m venv "${VENV_ARGS[@]}" "$VENV"; then
    echo "install: a venv without pip, pip from the bundle"
    rm -rf "$VENV"
    "$PY" -m venv --without-pip "${VENV_ARGS[@]}" "$VENV"
    PIP_WHEEL=$("$PY" gpu/bundle.py pip-wheel "$BUNDLE")
    "$VENV/bin/python" "$PIP_WHEEL/pip" install -q --disable-pip-version-check --no-index --no-deps "$PIP_WHEEL"
fi
[ "${#VENV_ARGS[@]}" -eq 0 ] && "$PY" gpu/bundle.py view "$VENV" "$BUNDLE"
VPY=$VENV/bin/python
mapfile -t NAMES < <("$PY" gpu/bundle.py install-names "$BUNDLE")
echo "install: ${NAMES[*]} from $BUNDLE (no index, no dependency resolution)"
"$VPY" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$BUNDLE" "${NAMES[@]}"
status=0
"$VPY" gpu/bundle.py pipcheck "$BUNDLE" || status=1
"$VPY" - "$OUT/install.json" <<'PY' || status=1
import importlib.util, json, sys, sysconfig
from importlib.metadata import version
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
found = {"venv": sys.prefix, "python": sys.version.split()[0]}
# The floors first, from requirements.py alone (it imports nothing): a node whose transformers
# is older than pissa_rs needs is named here, even if importing pissa_rs would fail on it.
spec = importlib.util.spec_from_file_location("floors", site / "pissa_rs" / "requirements.py")
floors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floors)
try:
    floors.require_versions()
    found["floors"] = "met: " + ", ".join(f"{p} >= {v}" for p, v in floors.FLOORS.items())
except floors.DependencyVersionError as e:
    found["floors"] = f"NOT MET: {e}"
print(f"floors: {found['floors']}")
import pissa_rs, pytest, hypothesis  # noqa: E401
for package in ("pissa-rs", "torch", "transformers", "peft", "huggingface_hub", "bitsandbytes", "pytest",
                "hypothesis", "pygments"):
    found[package] = version(package)
found["pissa_rs_from"] = str(Path(pissa_rs.__file__).parent)
try:
    import bitsandbytes  # noqa: F401
    found["bitsandbytes_import"] = "ok"
except Exception as e:  # noqa: BLE001 (pissa_rs falls back to its reference quantizer: said, not fatal)
    found["bitsandbytes_import"] = f"{type(e).__name__}: {e}"[:300]
# The wheel's Python files against this tree's: tests from one tree against another's library mislead.
tree = Path("python/pissa_rs")
stale = sorted(str(p.relative_to(tree)) for p in tree.rglob("*.py")
               if not (site / "pissa_rs" / p.relative_to(tree)).is_file()
               or (site / "pissa_rs" / p.relative_to(tree)).read_bytes() != p.read_bytes())
found["stale_files"] = stale
Path(sys.argv[1]).write_text(json.dumps(found, indent=1) + "\n")
print(json.dumps(found, indent=1))
if stale:
    print(f"WARNING: the bundle's pissa_rs differs from this tree's in {len(stale)} file(s) ({', '.join(stale[:5])}): "
          "rebuild it (bash gpu/prepare.sh)")
if not found["pissa_rs_from"].startswith(sys.prefix):
    sys.exit(f"pissa_rs imported from {found['pissa_rs_from']}, not from the venv")
if found["floors"].startswith("NOT MET"):
    sys.exit(1)
PY
exit $status
