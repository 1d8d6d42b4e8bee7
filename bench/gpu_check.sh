#!/usr/bin/env bash
# One pass over a lent GPU machine (no network): offline install, the split kernels' bit-for-bit
# check, CUDA tests, the Triton kernels' timing against cuDNN (the split us/step table included),
# one ncu pass over them, the GPU benchmark and a profile.
# The Python it runs is in fastrnn/bench/gpu_check.py (python -m fastrnn.bench.gpu_check --help).
# Every step has its own timeout inside a total budget, a failed step does not stop the next,
# and what comes back from $OUT is kept to a few files (at most 8, at most 2 folders deep).
#   OUT=/some/dir bash bench/gpu_check.sh          (make gpu-check sets OUT)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-check}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
TMP=$(mktemp -d)
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS LOG CMD...: run CMD under timeout (capped by what is left of the budget).
step() {
    local name=$1 secs=$2 log=$3 left rc t0
    shift 3
    left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 15 ]; then
        note "SKIP  $name (budget spent)"
        return 0
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    echo "=== $name (timeout ${secs}s) ==="
    t0=$(date +%s)
    timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        note "OK    $name ($(($(date +%s) - t0))s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note "TIME  $name (killed after ${secs}s; see $(basename "$log"))"
    else
        note "FAIL  $name (rc=$rc, $(($(date +%s) - t0))s; see $(basename "$log"))"
    fi
    return 0
}

{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    # Before the install: `python -m` from the checkout imports its fastrnn package either way.
    "$PY" -m fastrnn.bench.gpu_check versions 2>&1
} | tee -a "$SUMMARY"

step "pip install -e ." 90 "$TMP/install.log" \
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
# Every step runs `python -m` from the checkout, which finds fastrnn there even if the install
# failed; only fastrnn.kernels (kernels/) needs the install, so that is what is checked.
if ! "$PY" -m fastrnn.bench.gpu_check installed >"$TMP/installed.txt" 2>&1; then
    note "WARN  fastrnn's Triton kernels not importable after install; the steps below run without them"
fi
tail -n 1 "$TMP/installed.txt" | sed 's/^/      /' >>"$SUMMARY"

# The split kernels first: the persistent one spins on a grid barrier, so a hang is cut short here
# and everything after runs their per-step twin instead.
step "split check (persistent == per-step == one program)" 60 "$TMP/split_check.log" \
    "$PY" -m fastrnn.bench.gpu_check split-check
sed 's/^/      /' "$TMP/split_check.log" >>"$SUMMARY"
if ! grep -q "^OK    split check" "$SUMMARY"; then
    export FASTRNN_TRITON_SPLIT=per_step
    note "WARN  the persistent split failed or hung: the steps below run FASTRNN_TRITON_SPLIT=per_step"
fi

step "pytest (CUDA)" 180 "$OUT/pytest.log" \
    "$PY" -m pytest -q -p no:cacheprovider --durations=15 tests
grep -E "passed|failed|error" "$OUT/pytest.log" 2>/dev/null | tail -n 1 | sed 's/^/      /' >>"$SUMMARY"

# The Triton kernels alone against cuDNN (registers and spills at the end), then the split
# kernels' us/step table (issue 17's grid; it stops itself at its own budget).
step "triton kernel timing" 180 "$OUT/kernel_timing.txt" bash -c \
    "'$PY' -m fastrnn.bench.gpu_check kernel-timing && '$PY' -m fastrnn.bench.gpu_check split-timing"

# fwd + bwd launches under ncu: on-chip fp32 (reduce), on-chip bf16 (tl.dot), tiled bf16 (H = 1000),
# split persistent fp32 and bf16 (H = 1024, B = 16).
if command -v ncu >/dev/null 2>&1; then
    step "ncu (_recurrence kernels)" 90 "$OUT/ncu.txt" \
        ncu --target-processes all -k regex:_recurrence --launch-count 10 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
        "$PY" -m fastrnn.bench.gpu_check ncu-launches
else
    note "SKIP  ncu (not on PATH)"
fi

# The report is rewritten after every case, so a run cut short still leaves a partial report.
step "fastrnn.bench (GPU)" 120 "$OUT/bench.log" \
    "$PY" -m fastrnn.bench --device cuda --dtype float32,bfloat16 --no-keras --out "$OUT/gpu-bench"

step "fastrnn.profile (GPU)" 45 "$OUT/profile.log" \
    "$PY" -m fastrnn.profile --device cuda --out "$OUT/profile"

# Folders and any other files go into one archive: 7 known files + artifacts.tar.gz <= 8 come back.
cp "$TMP/install.log" "$OUT/" 2>/dev/null
shopt -s nullglob
extra=()
for f in "$OUT"/*; do
    case "$(basename "$f")" in
        summary.txt | pytest.log | kernel_timing.txt | ncu.txt | bench.log | profile.log | install.log) ;;
        *) extra+=("$(basename "$f")") ;;
    esac
done
if [ "${#extra[@]}" -gt 0 ]; then
    tar -czf "$TMP/artifacts.tar.gz" -C "$OUT" "${extra[@]}" && (cd "$OUT" && rm -rf "${extra[@]}") &&
        mv "$TMP/artifacts.tar.gz" "$OUT/" && note "      archived into artifacts.tar.gz: ${extra[*]}"
fi
rm -rf "$TMP"
note "done in $(($(date +%s) - START))s (budget ${BUDGET_S}s)"
echo "===== summary ====="
cat "$SUMMARY"
