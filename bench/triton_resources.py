"""Registers, stack (spills) and shared memory of the Triton kernels, compiled offline: no GPU needed.

Runs the real launchers of fastrnn.kernels.triton.recurrence on CPU tensors with the kernel launches
replaced by ``triton.compile`` for a CUDA target, so every configuration `_launch_config` picks
(on-chip, tiled, split persistent, per-step twin) is compiled with exactly the arguments a GPU run
would pass, then read back with cuobjdump::

    python bench/triton_resources.py                    # sm_90, the default grid
    python bench/triton_resources.py --arch 90,80 --modes LSTM --hidden 256,1024 --batch 1,64

A kernel whose stack is not 0 spills (or keeps a local array) and is worth a look before a GPU run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastrnn.kernels.triton import recurrence as R  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages", "launch_cooperative_grid")
KERNELS = (
    "_recurrence_fwd_kernel",
    "_recurrence_bwd_kernel",
    "_recurrence_fwd_tiled_kernel",
    "_recurrence_bwd_tiled_kernel",
)


class _Compile:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **meta)`` compiles instead of
    launching, once per distinct signature (the per-step twin launches once per step)."""

    def __init__(self, fn, arch, seen):
        self.fn, self.arch, self.seen = fn, arch, seen

    def __getitem__(self, grid):
        return lambda *args, **meta: self._compile(grid, args, meta)

    def _compile(self, grid, args, meta):
        signature, constexprs = {}, {}
        for name, value in zip(self.fn.arg_names, args):
            if value is None:
                signature[name], constexprs[name] = "constexpr", None
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[value.dtype]
            else:
                signature[name] = "i32"
        options = {k: meta[k] for k in OPTIONS if k in meta}
        for name, value in meta.items():
            if name not in OPTIONS:
                signature[name], constexprs[name] = "constexpr", value
        key = (
            self.fn.__name__,
            tuple(sorted(signature.items())),
            tuple(sorted(constexprs.items())),
            tuple(options.items()),
        )
        if key in self.seen:
            return
        kernel = triton.compile(
            ASTSource(self.fn, signature, constexprs), target=GPUTarget("cuda", self.arch, 32), options=options
        )
        self.seen[key] = (grid, meta, _resources(kernel))


def _resources(kernel) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = f"/tmp/fastrnn-resources-{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    try:
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", text)}
    return dict(regs=usage.get("REG", -1), stack=usage.get("STACK", -1), shared=kernel.metadata.shared)


def _layer(mode, dtype, T, B, H, P):
    """One forward and backward through the launchers on CPU tensors (nothing is computed)."""
    G, D = R.GATES[mode], 1
    lstm = mode == "LSTM"
    proj = torch.zeros(T, B, D, G * H, dtype=dtype)
    w_hh = torch.zeros(D, G * H, P, dtype=dtype)
    b_hh = torch.zeros(D, G * H, dtype=dtype) if mode == "GRU" else None
    h0 = torch.zeros(D, B, P, dtype=dtype)
    state = (h0, torch.zeros(D, B, H, dtype=dtype)) if lstm else h0
    w_hr = torch.zeros(D, P, H, dtype=dtype) if P != H else None
    lengths = torch.full((B,), T, dtype=torch.int64)
    out, h_n, saved = R.forward(proj, w_hh, b_hh, state, lengths, mode, w_hr=w_hr)
    R.backward(torch.zeros_like(out), h_n, out, saved, w_hh, state, lengths, mode, w_hr=w_hr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("--arch", default="90", help="compute capabilities, e.g. 90,80")
    parser.add_argument("--modes", default="RNN_TANH,GRU,LSTM")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--hidden", default="64,128,256,1024,2048")
    parser.add_argument("--batch", default="1,16,64")
    parser.add_argument("--proj", type=int, default=0, help="LSTM proj_size (0: none)")
    parser.add_argument("--sms", type=int, default=132, help="the SM count the split plans for")
    parser.add_argument("--split", default="auto", choices=R.SPLIT_MODES)
    args = parser.parse_args(argv)
    R.check_device = lambda *tensors: None  # CPU tensors stand in for CUDA ones
    R.sm_count = lambda device: args.sms
    R._cooperative_launch = lambda device: True
    R.SPLIT = args.split
    kernels = {name: getattr(R, name) for name in KERNELS}
    print(
        f"{'arch':5} {'mode':8} {'dtype':8} {'H':>5} {'B':>3} {'kernel':28} {'grid':12} {'sync':4} {'warps':5} "
        f"{'N/K':7} {'regs':>4} {'stack':>5} {'shared':>6}"
    )
    for arch in map(int, args.arch.split(",")):
        for mode in args.modes.split(","):
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                for H in map(int, args.hidden.split(",")):
                    for B in map(int, args.batch.split(",")):
                        seen: dict = {}
                        for name, kernel in kernels.items():
                            setattr(R, name, _Compile(kernel, arch, seen))
                        P = args.proj if (mode == "LSTM" and args.proj) else H
                        _layer(mode, dtype, 3, B, H, P)
                        for (fn_name, *_), (grid, meta, use) in seen.items():
                            tiles = (
                                f"{meta.get('BLOCK_N', meta.get('BLOCK_H'))}/{meta.get('BLOCK_K', meta.get('BLOCK_P'))}"
                            )
                            print(
                                f"sm_{arch:<2} {mode:8} {TYPES[dtype]:8} {H:5d} {B:3d} {fn_name:28} {str(grid):12} "
                                f"{int(meta.get('GRID_SYNC', False)):4d} {meta.get('num_warps', 4):5d} {tiles:7} "
                                f"{use['regs']:4d} {use['stack']:5d} {use['shared']:6d}",
                                flush=True,
                            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
