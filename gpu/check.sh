#!/usr/bin/env bash
# The one command a GPU session runs first: ~8 minutes at most, every step time-boxed, every line
# into $OUT as it is printed, a summary at the end ($OUT/summary.txt). From the repository root
# with the bundle beside it (bash gpu/prepare.sh first, where there is network and Rust):
#
#   run(command="OUT=$OUT bash gpu/check.sh", carry=[".gpu-bundle"], timeout_s=540)
#
# step      budget  CUDA only  what
# machine     20 s             nvidia-smi, the card (H100/H200), versions, TF32 at start, disk, memory
# install     60 s             venv + bundle, no resolving; pip check, pissa_rs's floors, imports
# smoke      150 s             gpu/smoke.py: every CUDA path once, small, against the CPU (after its
#                              first CUDA check every decomposition plans in a fresh interpreter: ~4 s each)
# pytest      80 s     yes     the tests meant for a GPU (gpu/cuda_select.py)
# bench      130 s     yes     benches/bench_70b.py, 3 layers of Llama-3-70B shapes, with the timeline
# svd         30 s     yes     cuSOLVER's full-SVD drivers timed (smoke.py's fullsvd)
# summary     10 s             gpu/summary.py: every step's verdict and the key numbers
#
# Without CUDA (a rehearsal: OUT=DIR PYTHON=.venv/bin/python bash gpu/check.sh) every step
# runs what a CPU can: the smoke on the CPU, the CUDA tests collected (they skip), the
# benchmark at --smoke size; the CUDA-only steps then say "skipped: no CUDA". The budgets are
# doubled there (BUDGET_SCALE=2) and the deadline is 840 s instead of 470 s.
# Knobs: PYTHON (the node's python3), OUT (gpu-results), CHECK_STEPS=a,b (only these),
# BUDGET_<step>=seconds, BUDGET_SCALE, CHECK_DEADLINE_S, BENCH_LAYERS (3), BENCH_WORKDIR.
# Exit status: 1 when a step failed or timed out.
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
export GPU_VENV=${GPU_VENV:-$PWD/.gpu-venv}
VPY=$GPU_VENV/bin/python
exec > >(tee -a "$OUT/log.txt") 2>&1
# shellcheck source=gpu/lib.sh
source gpu/lib.sh
echo "== gpu/check.sh $(date -Is) in $PWD, results in $OUT"

# This check's own files from an earlier run into the same OUT go first.
rm -f "$OUT"/{steps.jsonl,plan.jsonl,machine.json,install.json,smoke.json,tests.xml,bench70.json,timeline.jsonl} \
      "$OUT"/{summary.txt,machine.log,install.log,smoke.log,pytest.log,bench.log,svd.log}

# The machine first: whether there is CUDA sets the budgets' scale and the deadline.
ASKED_DEADLINE=${CHECK_DEADLINE_S:-} ASKED_SCALE=${BUDGET_SCALE:-}
CHECK_DEADLINE_S=${ASKED_DEADLINE:-470} BUDGET_SCALE=${ASKED_SCALE:-1}
check_init
step machine 20 0 "$PYTHON" gpu/machine.py "$OUT/machine.json"
CUDA=$("$PYTHON" -c 'import json,sys; print(1 if json.load(open(sys.argv[1])).get("cuda") else 0)' \
       "$OUT/machine.json" 2>/dev/null || echo 0)
if [ "$CUDA" != 1 ]; then
    CHECK_DEADLINE_S=${ASKED_DEADLINE:-840} BUDGET_SCALE=${ASKED_SCALE:-2}
fi
export CUDA BUDGET_SCALE CHECK_DEADLINE_S
read -r BENCH_LAYERS BENCH_DIR < <("$PYTHON" -c 'import json,sys; b=json.load(open(sys.argv[1]))["bench"]
print(b["layers"], b["workdir"] or "-")' "$OUT/machine.json" 2>/dev/null || echo "0 -")
echo "== CUDA: $CUDA; budgets x${BUDGET_SCALE}; deadline ${CHECK_DEADLINE_S}s; bench: $BENCH_LAYERS layers in $BENCH_DIR"

plan machine 20 0
plan install 60 0
plan smoke 150 0
plan pytest 80 1
plan bench 130 1
plan svd 30 1

step install 60 0 bash gpu/install.sh

step smoke 150 0 env SMOKE_SKIP=fullsvd SMOKE_DEVICE="$([ "$CUDA" = 1 ] && echo cuda:0 || echo cpu)" \
    "$VPY" gpu/smoke.py "$OUT"

mapfile -t CUDA_TESTS < <(grep -l "torch.cuda.is_available()" tests/test_*.py)
step pytest 80 1 env PYTHONPATH=gpu "$VPY" -m pytest -p cuda_select -p no:cacheprovider -q -rfEs \
    --durations=10 --junitxml="$OUT/tests.xml" "${CUDA_TESTS[@]}"

if [ "$CUDA" = 1 ]; then
    if [ "$BENCH_LAYERS" -ge 1 ]; then
        step bench 130 1 env PISSA_RS_PROFILE= "$VPY" benches/bench_70b.py --layers "$BENCH_LAYERS" \
            --workdir "$BENCH_DIR" --json "$OUT/bench70.json" --timeline "$OUT/timeline.jsonl"
    else
        step bench 130 1 "$PYTHON" -c 'import json, sys; sys.exit("bench: " + json.load(open(sys.argv[1]))["bench"]["why"])' \
            "$OUT/machine.json"
    fi
else  # the same script at 1/64 scale on the CPU: its timings mean nothing, its parts all run
    mkdir -p "$GPU_VENV/bench-work"
    step bench 130 1 env PISSA_RS_PROFILE= "$VPY" benches/bench_70b.py --smoke --workdir "$GPU_VENV/bench-work" \
        --json "$OUT/bench70.json" --timeline "$OUT/timeline.jsonl"
fi

step svd 30 1 env SMOKE_ONLY=fullsvd SMOKE_SECONDS="$(_budget svd 30)" "$VPY" gpu/smoke.py "$OUT"

echo "== summary $(date +%T)"
timeout 30 "$PYTHON" gpu/summary.py "$OUT"
