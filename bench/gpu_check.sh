#!/usr/bin/env bash
# One pass over a lent GPU machine (no network): offline install, CUDA tests, GPU benchmark,
# profile, a short timing of the Triton kernels alone and one ncu pass over them.
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
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))' 2>&1
} | tee -a "$SUMMARY"

step "pip install -e ." 90 "$TMP/install.log" \
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
if ! "$PY" -c 'import fastrnn.kernels.triton.elman' 2>/dev/null; then
    note "WARN  fastrnn not importable after install; falling back to PYTHONPATH=$PWD"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step "pytest (CUDA)" 150 "$OUT/pytest.log" \
    "$PY" -m pytest -q -p no:cacheprovider --durations=15 tests
grep -E "passed|failed|error" "$OUT/pytest.log" 2>/dev/null | tail -n 1 | sed 's/^/      /' >>"$SUMMARY"

# The report is rewritten after every case, so a run cut short still leaves a partial report.
step "fastrnn.bench (GPU)" 200 "$OUT/bench.log" \
    "$PY" -m fastrnn.bench --device cuda --dtype float32,bfloat16 --no-keras --out "$OUT/gpu-bench"

step "fastrnn.profile (GPU)" 45 "$OUT/profile.log" \
    "$PY" -m fastrnn.profile --device cuda --out "$OUT/profile"

# The Triton kernels alone against cuDNN's nn.RNN (which also runs the input projection, so the
# ratio flatters cuDNN a little). TF32 off on both sides.
cat >"$TMP/kernel_timing.py" <<'EOF'
import torch
from fastrnn.kernels.triton import elman as E

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda"


def ms(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


print(f"{'dtype':9} {'T':>4} {'B':>4} {'D':>2} {'H':>5} {'path':6} {'fwd_ms':>8} {'bwd_ms':>8} "
      f"{'cudnn_fwd':>9} {'cudnn_fb':>9} {'fwd_x':>6}")
for dtype in (torch.float32, torch.bfloat16):
    for T, B, D, H in [(512, 16, 1, 64), (512, 64, 1, 128), (256, 64, 2, 128), (256, 256, 1, 256),
                       (128, 32, 1, 512), (64, 16, 1, 1000)]:
        g = torch.Generator(device=dev).manual_seed(0)
        proj = torch.randn(T, B, D, H, device=dev, generator=g).to(dtype)
        w = (torch.randn(D, H, H, device=dev, generator=g) / H**0.5).to(dtype)
        h0 = torch.zeros(D, B, H, device=dev, dtype=dtype)
        lengths = torch.full((B,), T, device=dev, dtype=torch.int64)
        out, hn = E.elman_forward(proj, w, h0, lengths, False)
        gout, ghn = torch.randn_like(out), torch.randn_like(hn)
        f = ms(lambda: E.elman_forward(proj, w, h0, lengths, False))
        b = ms(lambda: E.elman_backward(gout, ghn, out, w, lengths, False))
        rnn = torch.nn.RNN(H, H, bidirectional=D == 2).to(dev, dtype)
        x = torch.randn(T, B, H, device=dev, dtype=dtype, requires_grad=True)
        cf = ms(lambda: rnn(x))
        cfb = ms(lambda: rnn(x)[0].sum().backward())
        path = "onchip" if E._launch_config(B, D, H, dtype, torch.device(dev))[0] else "tiled"
        print(f"{str(dtype)[6:]:9} {T:4d} {B:4d} {D:2d} {H:5d} {path:6} {f:8.3f} {b:8.3f} {cf:9.3f} "
              f"{cfb:9.3f} {cf / f:6.2f}", flush=True)

# Registers and spills of every compiled variant (internal cache API; best effort across versions).
for name in ("_elman_fwd_kernel", "_elman_bwd_kernel", "_elman_fwd_tiled_kernel", "_elman_bwd_tiled_kernel"):
    fn = getattr(E, name)
    try:
        caches = getattr(fn, "device_caches", None) or {}
        kernels = [k for c in caches.values() for k in c[0].values()]
        for k in kernels:
            k._init_handles()
            print(name, "warps", k.metadata.num_warps, "regs", k.n_regs, "spills", k.n_spills,
                  "shared", k.metadata.shared, flush=True)
    except Exception as exc:  # noqa: BLE001
        print(name, "no compile stats:", repr(exc))
EOF
step "triton kernel timing" 60 "$OUT/kernel_timing.txt" "$PY" "$TMP/kernel_timing.py"

# fwd + bwd launches under ncu: on-chip fp32 (reduce), on-chip bf16 (tl.dot), tiled bf16 (H = 1000).
cat >"$TMP/ncu_snippet.py" <<'EOF'
import torch
from fastrnn.kernels.triton import elman as E

for dtype, H in ((torch.float32, 128), (torch.bfloat16, 128), (torch.bfloat16, 1000)):
    T, B, D = 64, 64, 1
    proj = torch.randn(T, B, D, H, device="cuda", dtype=dtype)
    w = (torch.randn(D, H, H, device="cuda") / H**0.5).to(dtype)
    h0 = torch.zeros(D, B, H, device="cuda", dtype=dtype)
    lengths = torch.full((B,), T, device="cuda", dtype=torch.int64)
    out, hn = E.elman_forward(proj, w, h0, lengths, False)
    E.elman_backward(torch.randn_like(out), torch.randn_like(hn), out, w, lengths, False)
torch.cuda.synchronize()
EOF
if command -v ncu >/dev/null 2>&1; then
    step "ncu (_elman kernels)" 90 "$OUT/ncu.txt" \
        ncu --target-processes all -k regex:_elman --launch-count 6 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
        "$PY" "$TMP/ncu_snippet.py"
else
    note "SKIP  ncu (not on PATH)"
fi

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
