# Sourced by gpu/check.sh (and its tests): the time box every step of the check runs in.
#
#   check_init                    start the clock; OUT must be set (a folder)
#   plan NAME BUDGET CUDA_ONLY    say a step will run (the summary names every planned step)
#   step NAME BUDGET CUDA_ONLY CMD...
#       run CMD under `timeout` (TERM at the budget, KILL 5 s later, its whole process group),
#       its output also in OUT/NAME.log, and append to OUT/steps.jsonl a "start" record before
#       and an "end" record after, with the verdict:
#         pass | fail | timed out | skipped: no CUDA (a CUDA-only step that passed without CUDA:
#         it ran only what a CPU can) | skipped: not selected | skipped: out of time
#       The budget is BUDGET_<NAME> if set, else BUDGET x BUDGET_SCALE, and never past the
#       deadline (CHECK_DEADLINE_S after check_init). A failed or timed-out step does not stop
#       the check: the next one runs.
#   CHECK_STEPS=a,b               run only these steps (the others: "skipped: not selected")
#   CUDA=1                        whether the machine has CUDA (check.sh sets it after "machine")

check_init() {
    mkdir -p "$OUT"
    CHECK_T0=$SECONDS
    : "${CHECK_DEADLINE_S:=470}" "${BUDGET_SCALE:=1}" "${CUDA:=0}"
    : > "$OUT/plan.jsonl"
}

_record() {  # _record NAME EVENT KEY=VALUE... (numbers and plain words only)
    local name=$1 event=$2 fields="" kv
    shift 2
    for kv in "$@"; do
        case "${kv#*=}" in
            ''|*[!0-9]*) fields+=",\"${kv%%=*}\":\"${kv#*=}\"" ;;
            *) fields+=",\"${kv%%=*}\":${kv#*=}" ;;
        esac
    done
    printf '{"step":"%s","event":"%s","t":%s%s}\n' "$name" "$event" "$(date +%s)" "$fields" >> "$OUT/steps.jsonl"
}

_budget() {  # _budget NAME BUDGET: the step's budget in seconds, before the deadline
    local name=$1 budget=$2 override
    override="BUDGET_${name}"
    if [ -n "${!override:-}" ]; then budget=${!override}; else budget=$((budget * BUDGET_SCALE)); fi
    echo "$budget"
}

plan() {  # plan NAME BUDGET CUDA_ONLY
    printf '{"step":"%s","budget":%s,"cuda_only":%s}\n' "$1" "$(_budget "$1" "$2")" "$3" >> "$OUT/plan.jsonl"
}

step() {  # step NAME BUDGET CUDA_ONLY CMD...
    local name=$1 budget cuda_only=$3 left t0 rc verdict
    budget=$(_budget "$1" "$2")
    shift 3
    if [ -n "${CHECK_STEPS:-}" ] && [[ ",$CHECK_STEPS," != *",$name,"* ]]; then
        _record "$name" end verdict="skipped: not selected" budget="$budget"
        return 0
    fi
    left=$((CHECK_T0 + CHECK_DEADLINE_S - SECONDS))
    if [ "$left" -lt 5 ]; then
        echo "== [$name] skipped: out of time (${left}s left of the check's ${CHECK_DEADLINE_S}s)"
        _record "$name" end verdict="skipped: out of time" budget="$budget"
        return 0
    fi
    [ "$budget" -gt "$left" ] && budget=$left
    echo "== [$name] start $(date +%T), budget ${budget}s"
    _record "$name" start budget="$budget"
    t0=$SECONDS
    timeout -k 5 "$budget" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) if [ "$cuda_only" = 1 ] && [ "$CUDA" != 1 ]; then verdict="skipped: no CUDA"; else verdict=pass; fi ;;
        124|137) verdict="timed out" ;;
        *) verdict=fail ;;
    esac
    echo "== [$name] $verdict (exit $rc) in $((SECONDS - t0))s of ${budget}s"
    _record "$name" end verdict="$verdict" rc="$rc" seconds="$((SECONDS - t0))" budget="$budget"
    return 0
}
