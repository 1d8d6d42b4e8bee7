"""The Python steps of bench/gpu_check.sh (one pass over a lent GPU machine), one command each::

    python -m fastrnn.bench.gpu_check versions       # python, torch, triton, CUDA and GPU on one line
    python -m fastrnn.bench.gpu_check installed      # where fastrnn comes from; exit 1 without its Triton kernels
    python -m fastrnn.bench.gpu_check kernel-timing  # the Triton kernels alone against cuDNN's nn.RNN
    python -m fastrnn.bench.gpu_check ncu-launches   # one forward+backward per kernel path, for ncu

``versions`` and ``installed`` run anywhere; the other two need CUDA and Triton.
"""

from __future__ import annotations

import argparse
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
# What ncu profiles: on-chip fp32 (reduce), on-chip bf16 (tl.dot), tiled bf16 (H = 1000).
NCU_CASES = ((torch.float32, 128), (torch.bfloat16, 128), (torch.bfloat16, 1000))
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
    """Median of ``reps`` CUDA-event timings of ``fn(*args)``, after 3 untimed calls."""
    for _ in range(3):
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
    T, B, D = 64, 64, 1
    for dtype, H in NCU_CASES:
        proj = torch.randn(T, B, D, H, device="cuda", dtype=dtype)
        w = (torch.randn(D, H, H, device="cuda") / H**0.5).to(dtype)
        h0 = torch.zeros(D, B, H, device="cuda", dtype=dtype)
        lengths = torch.full((B,), T, device="cuda", dtype=torch.int64)
        out, hn, saved = R.forward(proj, w, None, h0, lengths, "RNN_TANH")
        R.backward(torch.randn_like(out), torch.randn_like(hn), out, saved, w, h0, lengths, "RNN_TANH")
    torch.cuda.synchronize()
    return 0


COMMANDS: dict[str, Callable[[], int]] = {
    "versions": versions,
    "installed": installed,
    "kernel-timing": kernel_timing,
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
