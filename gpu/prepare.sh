#!/usr/bin/env bash
# Prepare, on a machine with network and Rust, everything an air-gapped GPU node needs to
# test and benchmark pissa_rs, in one ignored folder (.gpu-bundle/, under 64 MiB):
# the abi3 wheel of pissa-rs (any Python >= 3.11), bitsandbytes, pytest and hypothesis
# with their pure-Python dependencies. The node is assumed to have Python, torch,
# transformers and PEFT (and their dependencies: numpy, safetensors, huggingface_hub, tqdm).
#   bash gpu/prepare.sh            then, on the node:   bash gpu/node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu-bundle
PY=${PYTHON:-python3}
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"

"$PY" -m pip install -q "maturin>=1.7,<2"
"$PY" -m maturin build --release --quiet -o "$BUNDLE"
# Binary wheels for the node's CPython (default 3.12); py3-none wheels serve any version.
NODE_PY=${NODE_PYTHON_VERSION:-3.12}
"$PY" -m pip download -q -d "$BUNDLE" --only-binary=:all: --python-version "$NODE_PY" \
    --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    "bitsandbytes>=0.45" "pytest>=8" "hypothesis>=6.100" pluggy iniconfig attrs sortedcontainers packaging \
    --no-deps
du -sh "$BUNDLE"
ls -1 "$BUNDLE"
size=$(du -sb "$BUNDLE" | cut -f1)
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu/prepare.sh: $BUNDLE is $size bytes, over the 64 MiB a node run can carry" >&2
    exit 1
fi
