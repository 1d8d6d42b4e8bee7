"""Interleaved timing and the machine's GEMM peak.

The machines this runs on are noisy, so implementations are never timed one after the other:
every repeat times each implementation once, alternating their order, and the report gives both
the minimum and the median over repeats. Speedups are ratios from the same interleaved run.
"""

import dataclasses
import gc
import math
import statistics
import time

import torch

from .cases import DTYPES


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to time one case (all implementations together, per mode)."""

    sample_s: float  # one sample loops until it has run at least this long
    case_s: float  # repeats are sized to take about this long in all
    min_repeats: int
    max_repeats: int
    few_repeats: int = 3  # for the slow cases
    warmup: int = 2  # calls before timing: the first may compile (Numba, Triton, torch.compile)


BUDGETS = {
    "tiny": Budget(0.0, 0.0, 2, 2, 1, warmup=1),
    "quick": Budget(0.004, 1.0, 3, 15, 2),
    "default": Budget(0.02, 5.0, 5, 30, 3),
    "full": Budget(0.05, 10.0, 7, 60, 5),
}


def summarize(samples_s):
    """min and median of samples in seconds -> milliseconds."""
    return {"ms_min": 1e3 * min(samples_s), "ms_median": 1e3 * statistics.median(samples_s), "n": len(samples_s)}


def _train_sample(runner, inner):
    sync = runner.sync
    fwd = bwd = 0.0
    for _ in range(inner):
        runner.zero_grad()
        sync()
        t0 = time.perf_counter()
        outputs = runner.forward()
        sync()
        t1 = time.perf_counter()
        runner.backward(outputs)
        sync()
        t2 = time.perf_counter()
        fwd, bwd = fwd + (t1 - t0), bwd + (t2 - t1)
        del outputs
    return {"forward": fwd / inner, "backward": bwd / inner, "train": (fwd + bwd) / inner}


def _inference_sample(runner, inner):
    sync = runner.sync
    sync()
    t0 = time.perf_counter()
    for _ in range(inner):
        runner.infer()
    sync()
    return {"inference": (time.perf_counter() - t0) / inner}


SAMPLERS = {"train": _train_sample, "inference": _inference_sample}


def interleaved(runners, mode, budget, few=False):
    """Time ``mode`` ("train" or "inference") for every runner, alternating them per repeat.

    Returns ``{impl: {part: summary}}`` where the parts are ``forward``, ``backward`` and
    ``train`` for a training step and ``inference`` for a no_grad forward.
    """
    sample = SAMPLERS[mode]
    estimate = {}
    for runner in runners:
        for _ in range(budget.warmup - 1):
            sample(runner, 1)
        estimate[runner.impl] = max(sum(sample(runner, 1).values()) / (3 if mode == "train" else 1), 1e-7)
    inner = {impl: max(1, min(1000, math.ceil(budget.sample_s / est))) for impl, est in estimate.items()}
    per_round = sum(inner[impl] * est for impl, est in estimate.items())
    if few:
        repeats = budget.few_repeats
    else:
        repeats = int(budget.case_s / per_round) if per_round > 0 else budget.max_repeats
        repeats = max(budget.min_repeats, min(budget.max_repeats, repeats))
    samples = {runner.impl: [] for runner in runners}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for runner in runners if r % 2 == 0 else reversed(runners):
                samples[runner.impl].append(sample(runner, inner[runner.impl]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        impl: {part: dict(summarize([s[part] for s in rows]), inner=inner[impl]) for part in rows[0]}
        for impl, rows in samples.items()
    }


def gemm_peak(device="cpu", dtype="float32", n=2048, repeats=5):
    """GFLOP/s of the fastest of a few ``torch.mm`` of n x n matrices: the attainable peak."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[dtype]) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"dtype": dtype, "n": n, "ms": 1e3 * best, "gflops": 2 * n**3 / best / 1e9}
