"""The Python steps of bench/gpu_check.sh (one pass over a lent GPU machine), one command each::

    python -m fastrnn.bench.gpu_check versions       # python, torch, triton, CUDA and GPU on one line
    python -m fastrnn.bench.gpu_check installed      # where fastrnn comes from; exit 1 without its Triton kernels
    python -m fastrnn.bench.gpu_check split-check    # persistent split == per-step twin == one program, bit for bit
    python -m fastrnn.bench.gpu_check kernel-timing  # the Triton kernels alone against cuDNN's nn.RNN
    python -m fastrnn.bench.gpu_check split-timing   # us/step of the split kernels against cuDNN (the issue's grid)
    python -m fastrnn.bench.gpu_check ncu-launches   # one forward+backward per kernel path, for ncu

``versions`` and ``installed`` run anywhere; the others need CUDA and Triton.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable

import torch

# (T, B, directions, H): on-chip and tiled paths, one and two directions, up to H = 1000.
TIMING_SHAPES = (
    (512, 16, 1, 64),
    (512, 64, 1, 128),
    (256, 64, 2, 128),
    (256, 256, 1, 256),
    (128, 32, 1, 512),
    (64, 16, 1, 1000),
)
# What ncu profiles: on-chip fp32 (reduce), on-chip bf16 (tl.dot), tiled bf16 (H = 1000) in one
# program per batch block, then split across SMs (persistent) in fp32 and bf16 (B = 16).
NCU_CASES = (
    (torch.float32, 128, 64, "off"),
    (torch.bfloat16, 128, 64, "off"),
    (torch.bfloat16, 1000, 64, "off"),
    (torch.float32, 1024, 16, "persistent"),
    (torch.bfloat16, 1024, 16, "persistent"),
)
# The split kernels' table (issue 17): B, H and T, fp32 (TF32 off) and bf16, against cuDNN.
SPLIT_GRID = dict(batch=(1, 16, 64), hidden=(128, 256, 512, 768, 1024, 2048), steps=(100, 1000))
# The LSTM's, smaller: its cuDNN counterpart is nn.LSTM; proj_size None, then 256 (H = 1024 only).
SPLIT_LSTM_GRID = dict(batch=(1, 16), hidden=(256, 512, 1024), steps=(100,), proj=(None, 256))
# The cells and shapes split-check compares: (mode, T, B, D, H, LSTM proj_size or None).
SPLIT_CHECK_CASES = (
    ("RNN_TANH", 50, 16, 1, 1024, None),
    ("RNN_TANH", 20, 37, 2, 300, None),
    ("GRU", 30, 16, 2, 512, None),
    ("LSTM", 30, 5, 1, 768, None),
    ("LSTM", 30, 64, 2, 256, None),
    ("LSTM", 30, 16, 1, 1024, 256),
)
KERNELS = (
    "_recurrence_fwd_kernel",
    "_recurrence_bwd_kernel",
    "_recurrence_fwd_tiled_kernel",
    "_recurrence_bwd_tiled_kernel",
)


def versions() -> int:
    """One line for the summary's header; what is missing says so instead of failing."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        "python",
        sys.version.split()[0],
        "torch",
        torch.__version__,
        "triton",
        triton_version,
        "cuda",
        torch.version.cuda,
        "gpu",
        gpu,
    )
    return 0


def installed() -> int:
    """Where fastrnn is imported from, and whether its Triton kernels import (``kernels/`` becomes
    ``fastrnn.kernels`` only through the install, so a checkout on the path alone lacks them)."""
    import fastrnn

    where = f"fastrnn {fastrnn.__version__} at {os.path.dirname(fastrnn.__file__)}"
    try:
        importlib.import_module("fastrnn.kernels.triton.recurrence")
    except Exception as exc:
        print(f"{where}: Triton kernels not importable: {type(exc).__name__}: {exc}")
        return 1
    print(f"{where}: Triton kernels import")
    return 0


def _recurrence():
    from fastrnn.kernels.triton import recurrence

    return recurrence


def _median_ms(fn: Callable, *args, reps: int = 20) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn(*args)``, after 2 untimed calls."""
    for _ in range(2):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _forward_backward(rnn: torch.nn.Module, x: torch.Tensor) -> None:
    rnn(x)[0].sum().backward()


def kernel_timing() -> int:
    """Forward and backward kernel times against cuDNN's nn.RNN forward and forward+backward.

    cuDNN's call also runs the input projection, so the ratio flatters cuDNN a little. TF32 is
    off on both sides. Then the registers and spills of every compiled variant.
    """
    R = _recurrence()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda"
    print(
        f"{'dtype':9} {'T':>4} {'B':>4} {'D':>2} {'H':>5} {'path':6} {'fwd_ms':>8} {'bwd_ms':>8} "
        f"{'cudnn_fwd':>9} {'cudnn_fb':>9} {'fwd_x':>6}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        for T, B, D, H in TIMING_SHAPES:
            g = torch.Generator(device=dev).manual_seed(0)
            proj = torch.randn(T, B, D, H, device=dev, generator=g).to(dtype)
            w = (torch.randn(D, H, H, device=dev, generator=g) / H**0.5).to(dtype)
            h0 = torch.zeros(D, B, H, device=dev, dtype=dtype)
            lengths = torch.full((B,), T, device=dev, dtype=torch.int64)
            out, hn, saved = R.forward(proj, w, None, h0, lengths, "RNN_TANH")
            gout, ghn = torch.randn_like(out), torch.randn_like(hn)
            f = _median_ms(R.forward, proj, w, None, h0, lengths, "RNN_TANH")
            b = _median_ms(R.backward, gout, ghn, out, saved, w, h0, lengths, "RNN_TANH")
            rnn = torch.nn.RNN(H, H, bidirectional=D == 2).to(dev, dtype)
            x = torch.randn(T, B, H, device=dev, dtype=dtype, requires_grad=True)
            cf = _median_ms(rnn, x)
            cfb = _median_ms(_forward_backward, rnn, x)
            path = "onchip" if R._launch_config(B, D, H, dtype, torch.device(dev), "RNN_TANH")[0] else "tiled"
            print(
                f"{str(dtype)[6:]:9} {T:4d} {B:4d} {D:2d} {H:5d} {path:6} {f:8.3f} {b:8.3f} {cf:9.3f} "
                f"{cfb:9.3f} {cf / f:6.2f}",
                flush=True,
            )

    # Triton's internal cache API: best effort across versions.
    for name in KERNELS:
        fn = getattr(R, name)
        try:
            caches = getattr(fn, "device_caches", None) or {}
            for kernel in [k for c in caches.values() for k in c[0].values()]:
                kernel._init_handles()
                print(
                    name,
                    "warps",
                    kernel.metadata.num_warps,
                    "regs",
                    kernel.n_regs,
                    "spills",
                    kernel.n_spills,
                    "shared",
                    kernel.metadata.shared,
                    flush=True,
                )
        except Exception as exc:
            print(name, "no compile stats:", repr(exc))
    return 0


def ncu_launches() -> int:
    """One forward and one backward launch for each of :data:`NCU_CASES`, nothing else on the GPU."""
    R = _recurrence()
    T, D = 64, 1
    for dtype, H, B, split in NCU_CASES:
        R.SPLIT = split
        inputs = _layer_inputs("RNN_TANH", T, B, D, H, dtype)
        _forward_backward_kernels(R, "RNN_TANH", *inputs)
    torch.cuda.synchronize()
    return 0


def _layer_inputs(mode, T, B, D, H, dtype, proj_size=None, seed=0):
    """Random inputs of the launchers (proj, w_hh, b_hh, states, lengths, w_hr) on CUDA, lengths
    mixed when T > 1 so that rows finish at different steps; w_hr (D, P, H) with ``proj_size``."""
    R = _recurrence()
    g = torch.Generator(device="cuda").manual_seed(seed)
    G = R.GATES[mode]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)

    P = proj_size or H
    proj = randn(T, B, D, G * H)
    w_hh = randn(D, G * H, P, scale=P**-0.5)
    b_hh = randn(D, G * H) if mode == "GRU" else None
    h0 = randn(D, B, P, scale=0.5)
    states = (h0, randn(D, B, H, scale=0.5)) if mode == "LSTM" else h0
    lengths = torch.full((B,), T, dtype=torch.int64, device="cuda")
    lengths[1::3] = max(1, T // 2)
    w_hr = randn(D, P, H, scale=H**-0.5) if proj_size else None
    return proj, w_hh, b_hh, states, lengths, w_hr


def _forward_backward_kernels(R, mode, proj, w_hh, b_hh, states, lengths, w_hr=None):
    """Every output of one forward and one backward launch, flat."""
    extra = dict(w_hr=w_hr) if w_hr is not None else {}
    out, h_n, saved = R.forward(proj, w_hh, b_hh, states, lengths, mode, **extra)
    g = torch.Generator(device="cuda").manual_seed(1)
    grad_out = torch.randn(out.shape, device="cuda", generator=g).to(out.dtype)
    grad_hn = tuple(torch.ones_like(h) for h in h_n) if mode == "LSTM" else torch.ones_like(h_n)
    grads = R.backward(grad_out, grad_hn, out, saved, w_hh, states, lengths, mode, **extra)
    flat = [out, *saved, *(h_n if mode == "LSTM" else (h_n,))]
    for x in grads:
        flat.extend(x if isinstance(x, tuple) else (x,))
    return flat


def split_check() -> int:
    """The split kernels on the GPU, before anything else runs them: for each of
    :data:`SPLIT_CHECK_CASES` and dtype, the persistent kernel (one launch, a grid barrier per
    step), its per-step twin and one program per batch block on the same tiles must agree bit for
    bit. Exit 1 on a mismatch; a hang is the caller's timeout (gpu_check.sh then runs the rest per
    step)."""
    R = _recurrence()
    failed = 0
    for mode, T, B, D, H, proj_size in SPLIT_CHECK_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = _layer_inputs(mode, T, B, D, H, dtype, proj_size)
            results, times, plans = {}, {}, {}
            # One program on the split's tiles: its default tiles are wider and sum in another order.
            R.TILE_N, R.TILE_K = R.SPLIT_TILE_N, R.SPLIT_TILE_K[R.GATES[mode]]
            for split in ("off", "per_step", "persistent"):
                R.SPLIT = split
                plans[split] = R._launch_config(
                    B, D, H, dtype, inputs[0].device, mode, None, proj_size, bool(proj_size)
                )[3]
                results[split] = _forward_backward_kernels(R, mode, *inputs)
                torch.cuda.synchronize()
                times[split] = _median_ms(_forward_backward_kernels, R, mode, *inputs, reps=5)
            same = [
                all(torch.equal(a, b) for a, b in zip(results[split], results["off"]))
                for split in ("per_step", "persistent")
            ]
            failed += not all(same)
            k = plans["persistent"].k
            print(
                f"{mode:8} {str(dtype)[6:]:8} T={T:4d} B={B:3d} D={D} H={H:5d} P={proj_size or H:5d} k={k:3d} "
                f"per_step==off {same[0]!s:5} persistent==off {same[1]!s:5} "
                "fwd+bwd ms: " + " ".join(f"{name} {ms:.3f}" for name, ms in times.items()),
                flush=True,
            )
    R.SPLIT, R.TILE_N, R.TILE_K = "auto", None, None
    return 1 if failed else 0


def split_timing(budget_s: float = 150.0) -> int:
    """us/step of the Triton kernels (forward, backward) against cuDNN over :data:`SPLIT_GRID`
    (Elman, nn.RNN) and :data:`SPLIT_LSTM_GRID` (nn.LSTM): the split as ``auto`` picks it, its
    per-step twin, and one program per batch block (T = 100 only: it streams all of W_hh through
    one SM a step). TF32 off. Rows stop at ``budget_s``, saying so."""
    import time

    R = _recurrence()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    print(
        f"{'cell':8} {'dtype':8} {'T':>4} {'B':>3} {'H':>5} {'k':>3} {'variant':10} {'fwd_us':>8} {'bwd_us':>8} "
        f"{'cudnn_fwd':>9} {'cudnn_fb':>9} {'fwd_x':>6} {'fb_x':>6}   (us per step; x = cuDNN / Triton)"
    )
    for mode, grid, torch_cls in (("RNN_TANH", SPLIT_GRID, torch.nn.RNN), ("LSTM", SPLIT_LSTM_GRID, torch.nn.LSTM)):
        for dtype in (torch.float32, torch.bfloat16):
            for T in grid["steps"]:
                for B in grid["batch"]:
                    for H in grid["hidden"]:
                        for P in grid.get("proj", (None,)):
                            if P is not None and P >= H:
                                continue
                            if time.perf_counter() - start > budget_s:
                                print(f"stopped at the {budget_s:.0f} s budget", flush=True)
                                return 0
                            _split_timing_rows(R, mode, torch_cls, dtype, T, B, H, P)
    R.SPLIT = "auto"
    return 0


def _split_timing_rows(R, mode, torch_cls, dtype, T, B, H, P=None):
    reps = 5 if T * H >= 500_000 else 10
    rnn = torch_cls(H, H, **({"proj_size": P} if P else {})).to("cuda", dtype)
    x = torch.randn(T, B, H, device="cuda", dtype=dtype, requires_grad=True)
    cudnn_fwd = _median_ms(rnn, x, reps=reps) * 1000 / T
    cudnn_fb = _median_ms(_forward_backward, rnn, x, reps=reps) * 1000 / T
    proj, w_hh, b_hh, states, lengths, w_hr = _layer_inputs(mode, T, B, 1, H, dtype, P)
    extra = dict(w_hr=w_hr) if P else {}
    lengths.fill_(T)
    seen = set()
    for variant in ["auto", "per_step"] + (["off"] if T <= 100 else []):
        R.SPLIT = variant
        onchip, _, _, split = R._launch_config(B, 1, H, dtype, proj.device, mode, None, P, bool(P))
        if (onchip, split) in seen:
            continue  # the same launches as a row above
        seen.add((onchip, split))
        out, h_n, saved = R.forward(proj, w_hh, b_hh, states, lengths, mode, **extra)
        grad_hn = tuple(torch.zeros_like(h) for h in h_n) if mode == "LSTM" else torch.zeros_like(h_n)
        forward = functools.partial(R.forward, proj, w_hh, b_hh, states, lengths, mode, **extra)
        backward = functools.partial(
            R.backward, torch.ones_like(out), grad_hn, out, saved, w_hh, states, lengths, mode, **extra
        )
        fwd = _median_ms(forward, reps=reps) * 1000 / T
        bwd = _median_ms(backward, reps=reps) * 1000 / T
        name = (
            "onchip" if onchip else ("persistent" if split.grid_sync else ("per_step" if split.per_step else "tiled"))
        )
        k = 1 if onchip else split.k
        label = mode if not P else f"LSTM/P{P}"
        print(
            f"{label:8} {str(dtype)[6:]:8} {T:4d} {B:3d} {H:5d} {k:3d} {name:10} {fwd:8.2f} {bwd:8.2f} "
            f"{cudnn_fwd:9.2f} {cudnn_fb:9.2f} {cudnn_fwd / fwd:6.2f} {cudnn_fb / (fwd + bwd):6.2f}",
            flush=True,
        )


COMMANDS: dict[str, Callable[[], int]] = {
    "versions": versions,
    "installed": installed,
    "split-check": split_check,
    "kernel-timing": kernel_timing,
    "split-timing": split_timing,
    "ncu-launches": ncu_launches,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastrnn.bench.gpu_check",
        description=__doc__.replace("::", ":"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS)
    return COMMANDS[parser.parse_args(argv).command]()


if __name__ == "__main__":
    sys.exit(main())
