"""Profile fastrnn's forward+backward under ``torch.profiler``; works on CPU and CUDA.

Command line (writes DIR/trace.json for Perfetto or chrome://tracing, and DIR/ops.txt)::

    python -m fastrnn.profile --device cpu --T 100 --B 16 --H 128 --layers 2 --bidirectional --out DIR
    python -m fastrnn.profile --cell GRU --out DIR     # fastrnn.GRU (default --cell RNN: fastrnn.RNN)
    python -m fastrnn.profile --cell LSTM --proj-size 32 --out DIR   # fastrnn.LSTM, W_hr included

Every fused op runs inside a ``record_function`` label that starts with ``fastrnn::`` (the op,
backend and directions), so the table of ops and the trace show where each layer's forward and
backward went; each step is split into ``step/forward`` and ``step/backward``. On CUDA, ``--nvtx``
emits NVTX ranges for Nsight Systems instead, and the command prints the ``ncu`` line that
profiles the Triton kernels by name.

In Python::

    import fastrnn.profile

    with fastrnn.profile.profiled("prof_out") as prof:
        out, h_n = rnn(x)
        out.sum().backward()
    # prof_out/trace.json and prof_out/ops.txt are written on exit; ``prof`` is the
    # torch.profiler.profile object (prof.key_averages() etc.).

``workload(...)`` builds the module (RNN, GRU or LSTM) and input the command line profiles
(``Workload.step()`` is one labelled forward+backward), for profiling the same thing from Python.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .cells import CELLS
from .convert import FUSED

LABEL = "fastrnn"
# The cells --cell takes: torch's class names (nn.RNN, nn.GRU, nn.LSTM), whose fused twins fastrnn.convert.FUSED maps.
CELL_CLASSES = {cls.__name__: cls for cls in dict.fromkeys(cell.torch_class for cell in CELLS.values())}
# Nsight Compute's kernel filter: the Triton kernels of kernels/triton/onchip.py and tiled.py
# (_recurrence_fwd_kernel, _recurrence_bwd_kernel and their _tiled variants, which the split across
# SMs runs too), one set for every cell.
NCU_KERNELS = "regex:_recurrence"


def packed_lengths(T: int, B: int) -> list[int]:
    """Sequence lengths, longest first, spread evenly from T down to max(1, T // 10).

    The bench's packed cases use the same spread, so ``--packed`` profiles what a bench row times.
    """
    if B == 1:
        return [T]
    shortest = max(1, T // 10)
    return [round(T - (T - shortest) * b / (B - 1)) for b in range(B)]


def make_input(
    T: int,
    B: int,
    I: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    packed: bool = False,
    seed: int = 1,
) -> Tensor | PackedSequence:
    """A random (T, B, I) input that requires grad; a PackedSequence of :func:`packed_lengths` if ``packed``.

    Drawn in float32 on the CPU, then cast and moved, so every dtype and device sees the same values.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=gen).to(device=device, dtype=dtype)
    if packed:
        seq = pack_padded_sequence(x, torch.tensor(packed_lengths(T, B)), enforce_sorted=False)
        # The packed data is the leaf, so backward ends there instead of running pack's backward too.
        return seq._replace(data=seq.data.detach().requires_grad_())
    return x.requires_grad_()


@dataclasses.dataclass
class Workload:
    """One RNN, GRU or LSTM and its input: what ``python -m fastrnn.profile`` runs, step after step."""

    module: torch.nn.Module
    x: Tensor | PackedSequence
    # Upstream gradients for (output, h_n) [LSTM: (output, h_n, c_n)]: ones, made on the first step
    # (a warm-up one), so that profiled steps allocate nothing of their own. Their values do not
    # change which kernels run.
    grads: tuple[Tensor, ...] | None = None

    def step(self) -> None:
        """One forward+backward, labelled ``step/forward`` and ``step/backward`` in a profile."""
        self.module.zero_grad(set_to_none=True)
        leaf = self.x.data if isinstance(self.x, PackedSequence) else self.x
        leaf.grad = None  # else every step after the first adds a gradient accumulation
        with torch.profiler.record_function("step/forward"):
            out, h_n = self.module(self.x)
            outputs = (
                out.data if isinstance(out, PackedSequence) else out,
                *(h_n if isinstance(h_n, tuple) else (h_n,)),
            )
        if self.grads is None:
            self.grads = tuple(torch.ones_like(t) for t in outputs)
        with torch.profiler.record_function("step/backward"):
            torch.autograd.backward(outputs, self.grads)


def workload(
    impl: str = "fastrnn",
    *,
    cell: str = "RNN",
    T: int = 100,
    B: int = 16,
    H: int = 128,
    I: int = 0,
    layers: int = 1,
    bidirectional: bool = False,
    nonlinearity: str = "tanh",
    proj_size: int = 0,
    dtype: torch.dtype | str = torch.float32,
    packed: bool = False,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Workload:
    """fastrnn's module of ``cell`` (``impl="fastrnn"``, on ``backend``: ``fastrnn.RNN``,
    ``fastrnn.GRU`` or ``fastrnn.LSTM``) or torch's (``impl="torch"``: ``torch.nn.RNN``, ``nn.GRU``
    or ``nn.LSTM``) with seeded weights and a random input of (T, B, I or H). ``nonlinearity`` is the
    RNN's only, ``proj_size`` (0: none) the LSTM's."""
    if impl not in ("fastrnn", "torch"):
        raise ValueError(f"impl must be 'fastrnn' or 'torch', not {impl!r}")
    if cell not in CELL_CLASSES:
        raise ValueError(f"cell must be one of {', '.join(map(repr, CELL_CLASSES))}, not {cell!r}")
    torch_class = CELL_CLASSES[cell]
    if torch_class is not torch.nn.RNN and nonlinearity != "tanh":
        raise ValueError(f"nonlinearity={nonlinearity!r} is an RNN option; a {cell} has none")
    if proj_size and torch_class is not torch.nn.LSTM:
        raise ValueError(f"proj_size={proj_size} is an LSTM option; a {cell} has none")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    if torch_class is torch.nn.RNN:
        kwargs["nonlinearity"] = nonlinearity
    if proj_size:
        kwargs["proj_size"] = proj_size  # torch checks 0 < proj_size < H
    if impl == "fastrnn":
        module = FUSED[torch_class](I or H, H, backend=backend, **kwargs)
    else:
        module = torch_class(I or H, H, **kwargs)
    return Workload(module, make_input(T, B, I or H, dtype=dtype, device=device, packed=packed, seed=seed + 1))


def _sort_key(device, sort_by):
    if sort_by:
        return sort_by
    return "self_cuda_time_total" if str(device).startswith("cuda") else "self_cpu_time_total"


def ops_table(
    prof: torch.profiler.profile, device: str | torch.device = "cpu", sort_by: str | None = None, row_limit: int = 20
) -> str:
    """``key_averages().table`` of ops and kernels, slowest first."""
    return prof.key_averages().table(sort_by=_sort_key(device, sort_by), row_limit=row_limit)


def fastrnn_table(prof: torch.profiler.profile) -> str:
    """Only the events labelled ``fastrnn…`` (one line per op, backend and direction count)."""
    rows = []
    for event in prof.key_averages():
        if LABEL not in event.key:
            continue
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0)
        rows.append(
            (event.key, event.count, event.cpu_time_total / 1e3, event.self_cpu_time_total / 1e3, device_us / 1e3)
        )
    if not rows:
        return "(no fastrnn-labelled events: was a fastrnn module run?)"
    rows.sort(key=lambda r: -max(r[2], r[4]))
    width = max(len(r[0]) for r in rows)
    header = f"{'fastrnn label':<{width}}  {'calls':>5}  {'CPU total ms':>12}  {'self CPU ms':>11}  {'device ms':>9}"
    lines = [header, "-" * len(header)]
    lines += [f"{key:<{width}}  {n:>5}  {cpu:>12.3f}  {own:>11.3f}  {dev:>9.3f}" for key, n, cpu, own, dev in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def profiled(
    out_dir: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    record_shapes: bool = True,
    with_stack: bool = False,
    sort_by: str | None = None,
    row_limit: int = 20,
    print_tables: bool = False,
) -> Iterator[torch.profiler.profile]:
    """Profile the ``with`` block under ``torch.profiler``; yields the profiler.

    On exit (without an exception) writes ``out_dir/trace.json`` (chrome trace: open it in
    Perfetto) and ``out_dir/ops.txt`` (the table of ops by time, then the fastrnn-labelled
    ones), unless ``out_dir`` is None. ``device`` ("cpu"/"cuda") adds CUDA activity when CUDA;
    by default it is added whenever CUDA is available.
    """
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes, with_stack=with_stack) as prof:
        yield prof
        if cuda:
            torch.cuda.synchronize()
    text = "\n\n".join((ops_table(prof, "cuda" if cuda else "cpu", sort_by, row_limit), fastrnn_table(prof)))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out_dir, "trace.json"))
        with open(os.path.join(out_dir, "ops.txt"), "w") as f:
            f.write(text + "\n")
    if print_tables:
        print(text)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastrnn.profile",
        description="Profile forward+backward of an RNN, GRU or LSTM under torch.profiler.",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--cell",
        choices=tuple(CELL_CLASSES),
        default="RNN",
        help="the module: RNN (fastrnn.RNN / torch.nn.RNN, default), GRU or LSTM (fastrnn.LSTM / torch.nn.LSTM)",
    )
    p.add_argument("--T", type=int, default=100, help="sequence length (default 100)")
    p.add_argument("--B", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--H", type=int, default=128, help="hidden size (default 128)")
    p.add_argument("--I", type=int, default=0, help="input size (default: H)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--nonlinearity", choices=("tanh", "relu"), default="tanh", help="RNN only (default tanh)")
    p.add_argument("--proj-size", type=int, default=0, help="LSTM only: proj_size, below H (default 0: none)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    p.add_argument("--packed", action="store_true", help="PackedSequence input, lengths spread T..T/10")
    p.add_argument("--backend", default="auto", help="fastrnn backend: auto, numba, triton or torch")
    p.add_argument(
        "--impl",
        choices=("fastrnn", "torch"),
        default="fastrnn",
        help="profile fastrnn's module (default) or torch's (torch.nn.RNN / nn.GRU / nn.LSTM), for comparison",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    p.add_argument("--steps", type=int, default=3, help="profiled forward+backward steps")
    p.add_argument("--out", default=os.path.join("bench", "results", "profile"), help="output directory")
    p.add_argument("--sort-by", help="key_averages sort key (default: self CPU, or self CUDA time on CUDA)")
    p.add_argument("--row-limit", type=int, default=20)
    p.add_argument(
        "--nvtx",
        action="store_true",
        help="CUDA: emit NVTX ranges (torch.autograd.profiler.emit_nvtx) for nsys, no torch.profiler",
    )
    p.add_argument("--no-profiler", action="store_true", help="just run the steps (under ncu or nsys)")
    return p


def _ncu_command(argv, out):
    keep, skip = [], {"--nvtx", "--no-profiler"}
    args = iter(argv)
    for a in args:
        if a in skip:
            continue
        if a in ("--steps", "--warmup", "--out"):
            next(args, None)
            continue
        keep.append(a)
    inner = ["python", "-m", "fastrnn.profile", *keep, "--warmup", "1", "--steps", "1", "--no-profiler"]
    report = os.path.join(out, "recurrence")
    return (
        f"ncu -k {NCU_KERNELS} --launch-count 10 --set full -o "
        + shlex.quote(report)
        + " "
        + " ".join(shlex.quote(a) for a in inner)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cell != "RNN" and args.nonlinearity != "tanh":
        parser.error(f"--nonlinearity is an RNN option; --cell {args.cell} has none")
    if args.proj_size and (args.cell != "LSTM" or not 0 < args.proj_size < args.H):
        parser.error(f"--proj-size is an LSTM option in (0, H={args.H}); got {args.proj_size} with --cell {args.cell}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    work = workload(
        args.impl,
        cell=args.cell,
        T=args.T,
        B=args.B,
        H=args.H,
        I=args.I,
        layers=args.layers,
        bidirectional=args.bidirectional,
        nonlinearity=args.nonlinearity,
        proj_size=args.proj_size,
        dtype=args.dtype,
        packed=args.packed,
        backend=args.backend,
        device=device,
    )
    name = f"torch.nn.{args.cell}" if args.impl == "torch" else f"fastrnn.{args.cell}[{args.backend}]"
    shape = f"T={args.T} B={args.B} H={args.H} I={args.I or args.H} layers={args.layers}"
    shape += " bidirectional" * args.bidirectional + " packed" * args.packed
    shape += f" {args.nonlinearity}" if args.cell == "RNN" else ""
    shape += f" proj_size={args.proj_size}" if args.proj_size else ""
    print(
        f"profiling {name} {shape} {args.dtype} on {device}: {args.warmup} warm-up + {args.steps} steps",
        file=sys.stderr,
    )
    for _ in range(args.warmup):
        work.step()
    if cuda:
        torch.cuda.synchronize()

    def steps():
        for _ in range(args.steps):
            work.step()
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    if args.no_profiler:
        steps()
    elif args.nvtx and cuda:
        with torch.autograd.profiler.emit_nvtx(record_shapes=True):
            steps()
    else:
        if args.nvtx:
            print("--nvtx needs CUDA; profiling with torch.profiler instead", file=sys.stderr)
        with profiled(args.out, device=device, sort_by=args.sort_by, row_limit=args.row_limit, print_tables=True):
            steps()
        print(
            f"\nwrote {os.path.join(args.out, 'trace.json')} (open in Perfetto) and {os.path.join(args.out, 'ops.txt')}"
        )
    print(f"{args.steps} steps in {time.perf_counter() - start:.3f} s", file=sys.stderr)
    if cuda:
        print("\nNsight Compute, the Triton kernels by name:\n  " + _ncu_command(argv, args.out))
        print(
            "Nsight Systems with NVTX ranges:\n  nsys profile -t cuda,nvtx -o "
            + shlex.quote(os.path.join(args.out, "fastrnn"))
            + " python -m fastrnn.profile "
            + " ".join(shlex.quote(a) for a in argv if a != "--nvtx")
            + " --nvtx"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
