"""Memory, measured rather than estimated.

- Bytes saved for backward: every tensor autograd keeps, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage; the parameters and the
  input are left out (they exist whether or not backward will run). A second count also leaves
  out the storages of the call's outputs: what backward costs on top of them while the caller
  holds them (as a following layer that saves its input does).
- CPU peak: the resident-set high-water mark of one training step, each (implementation, case)
  in its own fresh process: ``python -m fastrnn.bench.memory --impl torch --case '{...}'``.
  Kernels are warmed up on a short sequence first and the high-water mark is reset
  (``/proc/self/clear_refs``), so JIT compilation does not count.
- CUDA peak: ``torch.cuda.max_memory_allocated`` above what was allocated before the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys

import torch
from torch.nn.utils.rnn import PackedSequence

from . import impls
from .cases import Case


def saved_bytes(runner):
    """Bytes (and storage count) that autograd saves for backward in one forward of ``runner``."""
    storages = {}

    def key(t):
        return t.device.type, t.untyped_storage().data_ptr()

    def pack(t):
        storages[key(t)] = t.untyped_storage().nbytes()
        return t

    runner.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = runner.forward()
    leaf = runner.x.data if isinstance(runner.x, PackedSequence) else runner.x
    exclude = {key(t) for t in (*runner.module.parameters(), leaf)}
    kept = {k: v for k, v in storages.items() if k not in exclude}
    returned = {key(t) for t in outputs}
    beyond = sum(v for k, v in kept.items() if k not in returned)
    return {"saved_bytes": sum(kept.values()), "saved_storages": len(kept), "saved_beyond_outputs_bytes": beyond}


def cuda_peak(runner):
    """Bytes allocated at the peak of one training step above those allocated before it."""
    runner.zero_grad()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.train_step()
    torch.cuda.synchronize()
    return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "before_bytes": before}


def _status_kb(field):
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(match.group(1)) if match else None


def _reset_high_water():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_rss(impl, case, device="cpu"):
    """Run in a fresh process: resident memory before and at the peak of one training step."""
    warm = impls.Runner.create(impl, case.smaller(min(case.T, 4)), device)
    warm.train_step()
    del warm
    runner = impls.Runner.create(impl, case, device)
    runner.zero_grad()
    gc.collect()
    reset = _reset_high_water()
    before = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.train_step()
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_before_kb": before, "rss_peak_kb": peak, "rss_step_kb": peak - before, "hwm_reset": reset}


def peak_rss(impl, case, device="cpu", timeout=300):
    """:func:`measure_rss` in a subprocess; returns its dict, or ``{"error": ...}``."""
    cmd = [
        sys.executable,
        "-m",
        "fastrnn.bench.memory",
        "--impl",
        impl,
        "--device",
        device,
        "--case",
        json.dumps(case.to_json()),
    ]
    env = dict(os.environ)
    # A fixed mmap threshold: large buffers go back to the OS when freed, so RSS tracks live memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastrnn.bench.memory",
        description="Peak resident memory of one training step (run one per process).",
    )
    parser.add_argument("--impl", default="torch", help="torch, torch.compile or fastrnn[<backend>]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", required=True, help="JSON of a fastrnn.bench.cases.Case")
    args = parser.parse_args(argv)
    case = Case(**json.loads(args.case))
    print(json.dumps(measure_rss(args.impl, case, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
