"""First-call latency: a fresh interpreter imports torch, then fastrnn, builds a small RNN, GRU or LSTM
and runs forward+backward twice. Interpreter start-up is not counted; import, first call (which
includes any JIT compilation or cache load) and second call are reported separately.

"Warm" means Numba's on-disk cache already holds the kernels: :func:`warm_numba_cache` runs
``python -m fastrnn.kernels.numba`` (what ``make`` runs after installing) before those runs, so a
cache left stale by edited kernels is not timed as a first call. "Cold" points the caches at an
empty directory: the first call compiles the cell's kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

# Runs with ``python -c`` rather than ``-m fastrnn.bench...``: ``-m`` imports the fastrnn package
# before the clock starts, and the import is one of the things timed.
_SCRIPT = r"""
import json, sys, time
impl, device, (T, B, H), cell = sys.argv[1], sys.argv[2], map(int, sys.argv[3:6]), sys.argv[6]
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
backend = impl[len("fastrnn["):-1] if impl.startswith("fastrnn[") else None
if backend:
    import fastrnn
t2 = time.perf_counter()
torch.manual_seed(0)
if backend:
    rnn = getattr(fastrnn, cell)(H, H, backend=backend)
else:
    rnn = getattr(torch.nn, cell)(H, H)
rnn = rnn.to(device)
x = torch.randn(T, B, H, device=device, requires_grad=True)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
sync()  # CUDA context creation is not fastrnn's first call
times = []
for _ in range(2):
    t = time.perf_counter()
    out, h_n = rnn(x)
    states = h_n if isinstance(h_n, tuple) else (h_n,)  # LSTM's (h_n, c_n)
    (out.sum() + sum(s.sum() for s in states)).backward()
    sync()
    times.append(time.perf_counter() - t)
print(json.dumps({"import_torch_s": t1 - t0, "import_fastrnn_s": t2 - t1,
                  "first_call_s": times[0], "second_call_s": times[1]}))
"""

SHAPE = (100, 16, 128)  # (T, B, H)


def warm_numba_cache(timeout: float = 600) -> dict:
    """Run ``python -m fastrnn.kernels.numba`` (compile or load every cell's kernels into Numba's
    on-disk cache) in a fresh process; returns ``{"warm_up_s": wall seconds}`` or ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "fastrnn.kernels.numba"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"warm_up_s": time.perf_counter() - start}


def first_call(
    impl: str,
    device: str = "cpu",
    shape: tuple[int, int, int] = SHAPE,
    cold_cache: bool = False,
    timeout: float = 600,
    cell: str = "RNN",
) -> dict:
    """Time ``impl``'s first forward+backward of a ``cell`` ("RNN", "GRU" or "LSTM") in a fresh process.

    ``cold_cache`` points Numba's and Triton's on-disk caches at an empty directory, so the
    first call includes compiling the kernels (what a fresh install sees).
    """
    env = dict(os.environ)
    failed = {"impl": impl, "cell": cell, "cold_cache": cold_cache}
    with tempfile.TemporaryDirectory(prefix="fastrnn-cold-cache-") as cache:
        if cold_cache:
            env["NUMBA_CACHE_DIR"] = env["TRITON_CACHE_DIR"] = cache
        cmd = [sys.executable, "-c", _SCRIPT, impl, device, *map(str, shape), cell]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return dict(failed, error=f"timed out after {timeout} s")
        wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(failed, error=error)
    row = {"impl": impl, "cell": cell, "device": device, "cold_cache": cold_cache}
    row.update(T=shape[0], B=shape[1], H=shape[2])
    row.update(json.loads(lines[-1]))
    row["process_wall_s"] = wall
    return row
