#!/usr/bin/env bash
# On an air-gapped GPU node, from the repository root, with .gpu-bundle/ (gpu/prepare.sh)
# beside it: install from the bundle into a venv that sees the node's own torch,
# transformers and PEFT, then
#   bash gpu/node.sh tests   the whole pytest suite, where every decomposition defaults to
#                            CUDA and the CUDA-only tests run (devices, quantizer, QPiSSA)
#   bash gpu/node.sh bench   benches/bench_70b.py with BENCH_LAYERS (default 4) layers of
#                            Llama-3-70B shapes (~9 GB, fits a 64 GiB disk and 10 minutes)
#   bash gpu/node.sh         both
# and end with a summary: pass/fail, GB/s, ratio to the copy, peak host RSS, peak GPU memory.
# Results go to $OUT (the device tool's output folder) or ./gpu-results.
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
RESULTS=${OUT:-gpu-results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}

if [ ! -x .gpu-venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .gpu-venv || exit 1
    .gpu-venv/bin/python -m pip install -q --no-index --find-links .gpu-bundle \
        pissa-rs bitsandbytes pytest hypothesis || exit 1
fi
VPY=.gpu-venv/bin/python
"$VPY" -c "import torch, pissa_rs; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')" | tee "$RESULTS/node.txt"

status=0
if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
    "$VPY" -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/tests.xml" tests 2>&1 | tail -40 \
        | tee "$RESULTS/tests.txt"
    status=${PIPESTATUS[0]}
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
    "$VPY" benches/bench_70b.py --layers "${BENCH_LAYERS:-4}" --json "$RESULTS/bench70.json" 2>&1 | tail -20 \
        | tee "$RESULTS/bench.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
"$VPY" gpu/summary.py "$RESULTS"
exit $status
