#!/usr/bin/env bash
# Prepare, on a machine with network and Rust, everything an air-gapped GPU node needs that
# it does not have, in one ignored folder (.gpu-bundle/, under 64 MiB: a device call carries
# at most that): the abi3 wheel of pissa-rs, bitsandbytes (without its dependencies: torch,
# numpy, packaging), pytest and hypothesis with every dependency pip resolves for them, and
# pip (to bootstrap a venv where the node's Python has no ensurepip). The node's own stack
# (pissa-rs's other dependencies: torch, transformers, PEFT, ...) is not bundled. The node
# installs with `pip install --no-index --no-deps`: nothing is resolved there, so
# `gpu/bundle.py check` proves here that every wheel's requirements are met.
#   bash gpu/prepare.sh        then, on the node: bash gpu/check.sh (carry [".gpu-bundle"]);
#                              docs/gpu.md
# PYTHON: an interpreter with pissa-rs's dependencies installed (default: the project's
# .venv, else python3); NODE_PYTHON_VERSIONS: the node Pythons to bundle for (the node is
# expected to have 3.12; hypothesis' wheels are per version, ~1.2 MB each).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-.gpu-bundle}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NODE_PYTHONS=${NODE_PYTHON_VERSIONS:-3.12 3.11 3.13}
LIMIT=$((64 * 1024 * 1024))
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"

# 1. pissa-rs: abi3 (pyo3's abi3-py311), one wheel for every Python >= 3.11, linked with zig
#    against glibc 2.28 (manylinux_2_28, torch's own floor): built here it would need this
#    machine's glibc (2.34+), which a node need not have. maturin and zig live in a tools venv
#    under target/ (ignored), the build in its own target folder (the editable build's stays).
TOOLS=target/gpu-tools
if [ ! -x "$TOOLS/bin/maturin" ] || ! "$TOOLS/bin/python" -m ziglang version >/dev/null 2>&1; then
    rm -rf "$TOOLS" && python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q "maturin>=1.7,<2" ziglang
fi
PATH="$PWD/$TOOLS/bin:$PATH" CARGO_TARGET_DIR=target/gpu \
    maturin build --release --quiet --zig --compatibility manylinux_2_28 -i "$PYTHON" -o "$BUNDLE"
WHEEL=$(ls "$BUNDLE"/pissa_rs-*.whl)
case "$WHEEL" in *abi3*) ;; *) echo "gpu/prepare.sh: $WHEEL is not an abi3 wheel" >&2; exit 1 ;; esac

# 2. What pissa-rs asks of the node, from the wheel's own metadata: its dependencies (less
#    bitsandbytes, bundled: nodes rarely have it), and the test tools of its `test` extra.
read -r -a NODE_PROVIDES < <("$PYTHON" - "$WHEEL" <<'PY'
import sys; sys.path.insert(0, "gpu"); from bundle import wheel_requirements
from packaging.requirements import Requirement
reqs = [Requirement(r) for r in wheel_requirements(sys.argv[1])]
print(" ".join(r.name for r in reqs if r.marker is None and r.name != "bitsandbytes"))
PY
)
mapfile -t SPECS < <("$PYTHON" - "$WHEEL" <<'PY'
import sys; sys.path.insert(0, "gpu"); from bundle import wheel_requirements
from packaging.requirements import Requirement
for r in map(Requirement, wheel_requirements(sys.argv[1])):
    if r.name == "bitsandbytes" and r.marker is None:
        print(f"B {r.name}{r.specifier}")
    elif r.name in ("pytest", "hypothesis") and r.marker is not None and r.marker.evaluate({"extra": "test"}):
        print(f"T {r.name}{r.specifier}")
PY
)
BNB=() TEST_TOOLS=()
for s in "${SPECS[@]}"; do case "$s" in "B "*) BNB+=("${s#B }") ;; "T "*) TEST_TOOLS+=("${s#T }") ;; esac; done
if [ "${#BNB[@]}" -ne 1 ] || [ "${#TEST_TOOLS[@]}" -ne 2 ]; then
    echo "gpu/prepare.sh: bitsandbytes/pytest/hypothesis not found in $WHEEL's metadata" >&2
    exit 1
fi
echo "node provides: ${NODE_PROVIDES[*]}; bundled: ${BNB[*]} ${TEST_TOOLS[*]} and their dependencies"

# 3. The wheels, for each node Python: bitsandbytes without its dependencies (torch, numpy,
#    packaging: the node's), the test tools with all of theirs, as pip resolves them.
PLAT=(--only-binary=:all: --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64)
# pip itself, to bootstrap the node's venv where its Python has no ensurepip (Debian's without
# python3-venv); not installed otherwise.
"$PYTHON" -m pip download -q -d "$BUNDLE" --only-binary=:all: --no-deps pip
for v in $NODE_PYTHONS; do
    "$PYTHON" -m pip download -q -d "$BUNDLE" "${PLAT[@]}" --python-version "$v" --no-deps "${BNB[@]}"
    "$PYTHON" -m pip download -q -d "$BUNDLE" "${PLAT[@]}" --python-version "$v" "${TEST_TOOLS[@]}"
done

# 4. The manifest, the proof that nothing is missing, the size. Everything pip resolved for
#    the test tools stays, even what this machine's stack has too (pygments comes here with
#    rich, which a node's older huggingface_hub may not bring): an extra pure-Python wheel costs
#    little, a missing one the GPU session. Only pissa-rs's own node dependencies are never
#    bundled (the node's torch is not to be shadowed). `node_stack`, what they bring here, is
#    the check's assumption of the node; on the node, gpu/check.sh runs pip check for real.
"$PYTHON" gpu/bundle.py prune "$BUNDLE" "${NODE_PROVIDES[@]}"
mapfile -t STACK < <("$PYTHON" gpu/bundle.py stack "${NODE_PROVIDES[@]}")
# shellcheck disable=SC2086
"$PYTHON" gpu/bundle.py manifest "$BUNDLE" --pythons $NODE_PYTHONS --provides "${NODE_PROVIDES[@]}" \
    --stack "${STACK[@]}"
"$PYTHON" gpu/bundle.py check "$BUNDLE"
ls -1sh "$BUNDLE"
size=$(du -sb "$BUNDLE" | cut -f1)
echo "$BUNDLE: $((size / 1024 / 1024)) MiB (a device call carries at most 64 MiB)"
if [ "$size" -gt "$LIMIT" ]; then
    echo "gpu/prepare.sh: $BUNDLE is $size bytes, over the 64 MiB a node run can carry" >&2
    exit 1
fi
