"""pytest-benchmark suite: fastrnn.RNN, fastrnn.GRU and fastrnn.LSTM (each available backend)
against torch.nn.RNN, nn.GRU and nn.LSTM (the case's cell) and, with --fastrnn-compile, torch.compile of
torch's module where it works. One group per case (cell and shape) and mode, so each group
compares implementations.

    pytest bench/ --benchmark-only                       # quick grid
    pytest bench/ --fastrnn-grid default --benchmark-only --benchmark-json out.json

The grid is fastrnn/bench/cases.py, the same one ``python -m fastrnn.bench`` runs.
extra_info of every benchmark: tokens/s and GFLOP/s (from the median), sizes, device, versions.
"""

import functools

import pytest
import torch

from fastrnn.bench import cases, impls
from fastrnn.bench.report import environment

MODES = {"forward": "forward", "backward": "backward", "forward+backward": "train", "inference": "inference"}


def _device(config):
    return config.getoption("--fastrnn-device") or ("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def _compile_works(device):
    try:
        case = cases.Case("probe", 3, 2, 4)
        impls.Runner.create(impls.COMPILE, case, device).train_step()
        return True
    except Exception:  # no compiler toolchain, unsupported platform: leave torch.compile out
        return False


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device(config)
    dtypes = config.getoption("--fastrnn-dtype")
    grid = cases.grid(config.getoption("--fastrnn-grid"), device, dtypes.split(",") if dtypes else None)
    cells = config.getoption("--fastrnn-cells")
    if cells:
        wanted = {c.strip() for c in cells.split(",")}
        unknown = wanted - set(cases.CELL_NAMES)
        if unknown:
            raise pytest.UsageError(f"--fastrnn-cells: unknown {sorted(unknown)}; choose from {cases.CELL_NAMES}")
        grid = [case for case in grid if case.cell in wanted]
    compile_ok = config.getoption("--fastrnn-compile") and _compile_works(device)
    names = impls.impl_names(device, compile=compile_ok)
    params = []
    for case in grid:
        for mode in MODES:
            if mode == "inference" and not case.inference:
                continue
            for impl in names:
                params.append(pytest.param(case, mode, impl, id=f"{case.label}|{mode}|{impl}".replace(" ", "_")))
    metafunc.parametrize(("bench_case", "mode", "impl"), params)


@functools.cache
def _versions(device):
    return environment(device)["versions"]


def test_rnn(benchmark, request, bench_case, mode, impl):
    case, device = bench_case, _device(request.config)
    runner = impls.Runner.create(impl, case, device)
    sync = runner.sync
    for _ in range(2):  # compile / load kernels outside the measurement
        runner.train_step()
    sync()

    benchmark.group = f"{case.label} | {mode}"
    versions = _versions(device)
    benchmark.extra_info.update(
        impl=impl,
        mode=mode,
        cell=case.cell,
        device=device,
        torch=versions["torch"],
        fastrnn=versions["fastrnn"],
        T=case.T,
        B=case.B,
        H=case.H,
        I=case.input_size,
        layers=case.layers,
        bidirectional=case.bidirectional,
        proj_size=case.proj_size,
        dtype=case.dtype,
        packed=case.packed,
        tokens=case.tokens,
        flops=case.flops(MODES[mode]),
    )

    def synced(fn):
        def call(*args):
            result = fn(*args)
            sync()
            return result

        return call

    if mode == "forward":
        benchmark(synced(runner.forward))
    elif mode == "inference":
        benchmark(synced(runner.infer))
    elif mode == "forward+backward":
        benchmark(synced(runner.train_step))
    else:

        def setup():
            runner.zero_grad()
            outputs = runner.forward()
            sync()
            return (outputs,), {}

        rounds = 3 if case.few_repeats else request.config.getoption("--fastrnn-rounds")
        benchmark.pedantic(synced(runner.backward), setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)

    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.median > 0:
        benchmark.extra_info["tokens_per_s"] = case.tokens / stats.median
        benchmark.extra_info["gflops"] = case.flops(MODES[mode]) / stats.median / 1e9
