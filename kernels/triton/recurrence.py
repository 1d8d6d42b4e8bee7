"""Persistent Triton kernels of the recurrence, forward and backward, generic over the cell.

Each program owns one direction and a block of BLOCK_B batch rows and walks every time step inside
the kernel, so a whole layer is one launch. The cell is ``CELL``, a ``tl.constexpr`` (the torch
mode string): Triton compiles one kernel per cell and drops the other cells' branches. Two variants:

- ``_recurrence_fwd_kernel`` / ``_recurrence_bwd_kernel``: W_hh[d] is loaded once and kept on chip,
  and the state h (or dh; the LSTM's c and dc too) stays in registers between steps. Used while H,
  padded to a power of two, is at most ``ONCHIP_MAX_H[mode]``. The per-step product is ``tl.dot``
  (tensor cores) for float16/bfloat16 and TF32, and for IEEE float32 a broadcast multiply reduced
  over K on CUDA cores with a few rows per program ("reduce"): tl.dot's float32 FMA lowering spills
  kilobytes per thread at H >= 64.
- ``_recurrence_fwd_tiled_kernel`` / ``_recurrence_bwd_tiled_kernel``: any H. Each step loops over
  N x K tiles of W_hh read from L2, and the previous state is read back from where it was written
  (Elman: ``out`` forward, ``grad_proj`` backward; GRU: a float32 scratch forward, ``grad_rec``
  and a float32 scratch of g * z backward; LSTM: h from ``out`` and c from a float32 scratch
  forward, ``grad_proj`` and a float32 scratch of dc backward), with a CTA barrier between steps.

  Split across SMs: the same tiled kernels with W_hh's rows (per gate) cut into column slices of
  SLICE, one program each (program_id 2), so k programs share a (direction, batch block) and each
  streams only its slice of W_hh per step from L2: k SMs share the traffic one program would carry
  alone. (The slice does not stay in L1 across steps: the barrier's acquire invalidates L1.
  Holding it in registers or shared memory is the next step, once a GPU can time it.) Every step
  reads the whole previous state and writes only its columns, so the programs meet once per step.
  ``SPLIT`` picks how: "persistent" is one cooperative launch walking every step with a grid
  barrier (``tiled._step_sync``); "per_step" is its twin, one launch per step (the launch
  boundary is the barrier), which is also what the interpreter can run with k > 1 (it runs
  programs one after another, so a spin barrier across programs would never return there). Both
  run the same step code on the same tiles, so their results agree bit for bit, with each other
  and with one program on the same tiles (one program's default tiles are wider, which changes
  the order of the sums). An LSTM with W_hr has
  two exchanges per step (m_t's H columns before h_t = m_t @ W_hr^T's P columns; backward the
  other way round), so two barriers, or two launches per step.

The LSTM's gates (i, f, g, o) are four N blocks of the one product h_{t-1} @ W_hh[d]^T (one h tile
feeds all four). With proj_size P (W_hr), h and W_hh's columns are P wide: forward adds the product
h_t = m_t @ W_hr[d]^T of m_t = o * tanh(c_t) (on chip in registers; tiled, m_t goes through the
scratch and a barrier first), backward dm = grad_h @ W_hr[d] (tiled: grad_h is stored, then read
back after a barrier).

Block sizes, warps and tiles in ``_launch_config`` were chosen from ptxas resource usage for sm_90
and sm_80 (kernels compiled for both targets with Triton 3.9): GRU's spill nothing; Elman's spill
only in the 32-row tensor-core backward at H = 64 (up to 76 bytes on sm_90); the LSTM's (with and
without W_hr) nothing but 4 bytes in the float32 on-chip backward at H = 64 on sm_80.

Pointwise math, accumulation and the carried state are float32. The matmul operands are the
storage dtype: for float16/bfloat16 the state is rounded to the dtype it is stored in, as
``torch.nn.RNN`` does. float32 matmuls are IEEE unless ``allow_tf32`` (or ``ALLOW_TF32``) opts in.
"""

import os
from typing import NamedTuple

import torch
import triton

from ._common import (
    INTERPRET,
    check_contiguous,
    check_device,
    check_dtype,
    check_lengths,
    check_shape,
    matmul_mode,
    sm_count,
)
from .onchip import _recurrence_bwd_kernel, _recurrence_fwd_kernel
from .tiled import _recurrence_bwd_tiled_kernel, _recurrence_fwd_tiled_kernel

# G (gates: W_hh is (D, G*H, P), P = H but for an LSTM with W_hr) and the H-wide values per step
# that forward saves, per mode.
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
SAVED = {"RNN_TANH": 0, "RNN_RELU": 0, "GRU": 4, "LSTM": 5}
# Largest padded hidden size that keeps W_hh on chip; above it the tiled kernels run. GRU keeps
# three H x H blocks: at H = 128 its float32 reduce spills (or fits one row per program, at 255
# registers), and its bf16 tl.dot kernels spill and need 100 KiB of shared memory, beyond what
# sm_86/sm_89 give a block (99 KiB). The LSTM keeps four: 128 KiB in bf16 at H = 128.
ONCHIP_MAX_H = {"RNN_TANH": 128, "RNN_RELU": 128, "GRU": 64, "LSTM": 64}
# Tile sizes of the tiled kernels (tl.dot needs every block dim >= 16); None picks them per cell
# and dtype in _tiles.
TILE_N = None
TILE_K = None
# Opt-in TF32 for float32 matmuls (off: results match torch.nn.RNN with TF32 disabled).
ALLOW_TF32 = False
# How the tiled kernels split across SMs: "auto" (persistent where a cooperative launch is
# available and the grid fits the SMs, else per step; one program where the SMs hold no more),
# "persistent", "per_step" or "off" (one program per direction and batch block). Read at import
# from FASTRNN_TRITON_SPLIT.
SPLIT = os.environ.get("FASTRNN_TRITON_SPLIT", "auto")
# Columns per program when split (rounded up to BLOCK_N); None: as few as fill the SMs. Tests set
# it to split tiny layers.
SPLIT_SLICE = None
SPLIT_MODES = ("auto", "persistent", "per_step", "off")
# Tiles and warps of a split launch: narrow slices spread W_hh over more SMs. From ptxas
# (bench/triton_resources.py, Triton 3.9, H = 512-2048): N 16 with 8 warps, K 32 for Elman and 16
# for GRU and the LSTM keep bf16 spill-free on sm_90 and leave 8-16 bytes of stack in some float32
# kernels (GRU, the LSTM with W_hr) and on sm_80 (4 warps: 150-255 registers and up to 56 bytes).
# Not timed yet: a lent GPU's `make gpu-check` times them against cuDNN. With W_hr, backward's
# dz @ W_hh (4H x P) is split over P's columns alone, so ceil(P / 16) programs carry it; summing
# per-program partial products over H instead is the change to try once it can be timed.
SPLIT_TILE_N = 16
SPLIT_TILE_K = {1: 32, 3: 16, 4: 16}
SPLIT_WARPS = 8


class Split(NamedTuple):
    """How a tiled launch splits: k programs of ``slice`` columns per (direction, batch block)
    (``slice_k`` of the state's P with W_hr); ``per_step``: one launch per step (two with W_hr,
    one per exchange); ``grid_sync``: one launch with a grid barrier per exchange."""

    k: int
    slice: int
    slice_k: int
    per_step: bool
    grid_sync: bool


def _cooperative_launch(device):
    """Whether Triton can launch a cooperative grid here (Triton >= 3.2 on CUDA)."""
    if device.type != "cuda" or INTERPRET:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _split_plan(B, D, H, P, block_b, block_n, device, project):
    """The column split of a tiled launch (see the module docstring and ``SPLIT``)."""
    if SPLIT not in SPLIT_MODES:
        raise ValueError(f"fastrnn triton: SPLIT must be one of {SPLIT_MODES}, got {SPLIT!r}")
    if SPLIT_SLICE is not None and SPLIT_SLICE < 1:
        raise ValueError(f"fastrnn triton: SPLIT_SLICE must be a positive number of columns, got {SPLIT_SLICE}")
    blocks = D * triton.cdiv(B, block_b)
    if SPLIT == "off":
        return Split(1, H, P, False, False)
    if SPLIT_SLICE is not None:
        width = SPLIT_SLICE
    else:
        width = triton.cdiv(H, max(1, sm_count(device) // blocks))
    width = triton.cdiv(width, block_n) * block_n
    k = triton.cdiv(H, width)
    # W_hr's P columns in as many slices (or fewer: some programs then sit its exchange out).
    width_k = triton.cdiv(triton.cdiv(P, k), block_n) * block_n if project else width
    fits = blocks * k <= sm_count(device)
    if SPLIT == "persistent":
        if k > 1 and not fits:
            raise ValueError(
                f"fastrnn triton: a persistent split of {blocks * k} programs needs that many SMs "
                f"(have {sm_count(device)}); use SPLIT = 'per_step' or a wider SPLIT_SLICE"
            )
        # One program per counter needs no barrier; the interpreter runs it anyway (its test).
        return Split(k, width, width_k, False, k > 1 or INTERPRET)
    if SPLIT == "per_step":
        return Split(k, width, width_k, True, False)
    if k == 1:
        return Split(1, width, width_k, False, False)
    persistent = fits and _cooperative_launch(device)
    return Split(k, width, width_k, not persistent, persistent)


def _tiles(mode, ieee_f32, tf32):
    """(BLOCK_N, BLOCK_K, num_stages or None for Triton's default) of the tiled kernels."""
    if GATES[mode] == 1:
        # K 32 for IEEE float32 (FMA dot, register-bound), 64 for the tensor-core dtypes.
        return 64, (32 if ieee_f32 else 64), None
    # GRU carries three accumulators and loads three W tiles per K step: N 64 spills in every
    # dtype, and so do IEEE float32's pipelining buffers (hence one stage) and TF32's K 32.
    if mode == "LSTM":
        # Four accumulators and four W tiles per K step. Spills seen: IEEE float32 at K 32 (backward
        # with W_hr), TF32 at K 16 (forward) and with its pipelining buffers at K 32 (backward),
        # float16/bfloat16 at K 64 (backward with W_hr).
        if ieee_f32 or tf32:
            return 32, (16 if ieee_f32 else 32), 1
        return 32, 32, None
    if ieee_f32:
        return 32, 32, 1
    return 32, (16 if tf32 else 64), None


def _launch_config(B, D, H, dtype, device, mode, allow_tf32=None, width=None, project=False):
    """(on-chip?, grid, kernel meta-parameters, tiled: its Split, else None) for this problem; width
    is the state's (P, the LSTM's proj_size with W_hr (project); H otherwise and by default).

    Register budgets below were read off ptxas for sm_90 and sm_80; see the module docstring.
    """
    allow = ALLOW_TF32 if allow_tf32 is None else allow_tf32
    ieee_f32, precision, dot_mode = matmul_mode(dtype, allow)
    gru = GATES[mode] >= 3  # GRU and LSTM: three or four W_hh blocks
    block_h = max(16, triton.next_power_of_2(H))
    onchip = block_h <= ONCHIP_MAX_H[mode]
    width = H if width is None else width
    # P's block: H's without W_hr; with it at least 32 (16 wide, the products spill: tl.dot's
    # layouts replicate, and the reduce's (BLOCK_B, H, P) grows beyond what 8 warps hold).
    block_p = max(32, triton.next_power_of_2(width)) if project else block_h
    if onchip and ieee_f32:
        # Few rows per program: the (BLOCK_B, H, H) product of the reduce lives in registers.
        block_b = 8 if block_h <= 32 else (4 if block_h <= 64 else 2)
        # The LSTM's backward with W_hr (H 64, P 32) spills with 8 warps and fits 4.
        num_warps = 4 if block_h <= 32 or (project and block_p <= 32) else 8
        meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, MODE="reduce", num_warps=num_warps)
    elif onchip:
        # tl.dot needs M >= 16. Grow the batch block only once programs outnumber SMs (W_hh is
        # read once per program), and not at H = 128, where 32 rows already spill. GRU (three W
        # blocks, six tiles prefetched in backward) spills with 32 rows at any H, and with 4
        # warps at H = 64; the LSTM is held to the same.
        block_b = 16
        if block_h <= 64 and not gru and D * triton.cdiv(B, block_b) > sm_count(device):
            block_b = 32
        num_warps = 8 if block_h >= (64 if gru else 128) else 4
        meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, MODE=dot_mode, num_warps=num_warps)
    else:
        block_b = 16
        tile_n, tile_k, stages = _tiles(mode, ieee_f32, precision == "tf32")
        meta = dict(BLOCK_B=block_b, BLOCK_N=TILE_N or tile_n, BLOCK_K=TILE_K or tile_k, MODE=dot_mode, num_warps=8)
        if stages:
            meta["num_stages"] = stages
    meta = dict(meta, PRECISION=precision, CELL=mode, GATES=GATES[mode], PROJECT=project)
    grid = (D, triton.cdiv(B, block_b))
    if onchip:
        return True, grid, dict(meta, BLOCK_P=block_p), None
    split_n = TILE_N or SPLIT_TILE_N  # the slices are multiples of it
    split = _split_plan(B, D, H, width, block_b, split_n, device, project)
    if split.k > 1:
        meta.update(BLOCK_N=split_n, BLOCK_K=TILE_K or SPLIT_TILE_K[GATES[mode]], num_warps=SPLIT_WARPS)
    meta["GRID_SYNC"] = split.grid_sync
    if split.grid_sync and split.k > 1 and device.type == "cuda":
        meta["launch_cooperative_grid"] = True  # the driver refuses a grid that cannot be co-resident
    return False, (*grid, split.k), meta, split


def _launch_tiled(kernel, grid, split, iterations, args, sizes, meta):
    """Run a tiled kernel's ``iterations`` step iterations: in one launch, or (split.per_step) one
    launch each (with W_hr one per exchange, phases 1 then 2), the launch boundary standing in for
    the grid barrier."""
    slices = (split.slice, split.slice_k)
    if not split.per_step:
        sync = torch.zeros(grid[0] * grid[1], dtype=torch.int64, device=args[0].device) if split.grid_sync else None
        kernel[grid](*args, sync, 0, iterations, *slices, 3, *sizes, **meta)
        return
    for it in range(iterations):
        for phases in (1, 2) if meta["PROJECT"] else (3,):
            kernel[grid](*args, None, it, it + 1, *slices, phases, *sizes, **meta)


def _gates(mode):
    if mode not in GATES:
        raise ValueError(f"fastrnn triton: unknown mode {mode!r}, expected one of {sorted(GATES)}")
    return GATES[mode]


def _check_4d(name, x):
    if x.dim() != 4 or x.shape[2] not in (1, 2):
        raise ValueError(f"fastrnn triton: {name} must be (T, B, D, ...) with D in (1, 2), got {tuple(x.shape)}")


def _pair(states, name, parts):
    if not (isinstance(states, (tuple, list)) and len(states) == 2):
        raise ValueError(
            f"fastrnn triton: the LSTM cell takes {name} as the pair ({parts}), got {type(states).__name__}"
        )
    return states


def _lstm_checks(h0, w_hr, D, B, H, P, named):
    """The LSTM's extra checks: c0 (D, B, H) and w_hr (D, P, H), or P = H without it."""
    check_shape("c0", h0[1], (D, B, H))
    named.append(("c0", h0[1]))
    if w_hr is not None:
        check_shape("w_hr", w_hr, (D, P, H))
        named.append(("w_hr", w_hr))
    elif P != H:
        raise ValueError(f"fastrnn triton: h is {P} wide and c {H} wide, which needs w_hr (D, {P}, {H})")


def forward(proj, w_hh, b_hh, h0, lengths, mode, keep_saved=True, w_hr=None, *, allow_tf32=None):
    """The recurrence of cell ``mode`` over a batch padded to T, all directions in one launch.
    ``keep_saved`` is accepted for the launcher contract; these kernels save the gates always.

    proj (T, B, D, G*H) = x @ W_ih[d]^T + b_ih[d] (+ b_hh[d] for Elman and LSTM); w_hh (D, G*H, P);
    b_hh (D, G*H) for GRU, None for Elman and LSTM (folded into proj); h0 (D, B, P), for LSTM the
    pair (h0 (D, B, P), c0 (D, B, H)); lengths (B,) int64 in [0, T]; w_hr (D, P, H) (LSTM's
    proj_size) or None. P is the state's width: proj_size with w_hr, else H. Direction 0 runs
    t = 0 .. L_b-1, direction 1 runs t = L_b-1 .. 0. Returns out (T, B, D, P), zero for t >= L_b,
    h_n (D, B, P) (h0 where L_b = 0; for LSTM the pair (h_n, c_n)) and saved: () for Elman,
    (gates,) for GRU with gates (T, B, D, 4H) = [r, z, n, W_hn h_{t-1} + b_hn] per step, and for
    LSTM (T, B, D, 5H) = [i, f, g, o, c_t] (zero for t >= L_b).
    """
    G = _gates(mode)
    lstm = mode == "LSTM"
    if lstm:
        h0, c0 = _pair(h0, "h0", "h0 (D, B, P), c0 (D, B, H)")
    elif w_hr is not None:
        raise ValueError(f"fastrnn triton: w_hr is the LSTM's projection; {mode} has none")
    _check_4d("proj", proj)
    T, B, D, GH = proj.shape
    if h0.dim() != 3:
        raise ValueError(f"fastrnn triton: h0 must be (D, B, H), got shape {tuple(h0.shape)}")
    P = h0.shape[2]
    if lstm and c0.dim() != 3:
        raise ValueError(f"fastrnn triton: c0 must be (D, B, H), got shape {tuple(c0.shape)}")
    H = c0.shape[2] if lstm else P
    check_shape("proj", proj, (T, B, D, G * H))
    check_shape("h0", h0, (D, B, P))
    check_shape("w_hh", w_hh, (D, G * H, P))
    named = [("w_hh", w_hh), ("h0", h0)]
    if mode == "GRU":
        if b_hh is None:
            raise ValueError("fastrnn triton: GRU needs b_hh (D, 3H) (zeros for bias=False)")
        check_shape("b_hh", b_hh, (D, G * H))
        named.append(("b_hh", b_hh))
    elif b_hh is not None:
        raise ValueError(f"fastrnn triton: {mode} folds b_hh into proj; pass b_hh=None")
    if lstm:
        _lstm_checks((h0, c0), w_hr, D, B, H, P, named)
    check_dtype(proj.dtype, *named)
    check_device(proj, *(x for _, x in named))
    check_contiguous(("proj", proj), *named)
    lengths = check_lengths(lengths, B, proj.device)

    out = proj.new_empty(T, B, D, P)
    h_n = torch.empty_like(h0)
    c_n = torch.empty_like(c0) if lstm else None
    # Zeroed, not empty: the kernels write only valid steps, and the custom op returns saved, so
    # its padding must be deterministic.
    saved = (proj.new_zeros(T, B, D, SAVED[mode] * H),) if SAVED[mode] else ()
    states = (h_n, c_n) if lstm else h_n
    if T == 0 or B == 0 or H == 0:
        h_n.copy_(h0)
        if lstm:
            c_n.copy_(c0)
        return out, states, saved
    onchip, grid, meta, split = _launch_config(B, D, H, proj.dtype, proj.device, mode, allow_tf32, P, w_hr is not None)
    gates = saved[0] if saved else None
    args = (proj, w_hh, b_hh, h0, lengths, out, h_n, gates, c0 if lstm else None, c_n, w_hr)
    if onchip:
        _recurrence_fwd_kernel[grid](*args, T, B, H, P, B * D * H, D * H, **meta)
    else:
        scratch = None
        if mode == "GRU":
            scratch = torch.empty(2, D, B, H, device=proj.device, dtype=torch.float32)
            scratch[1].copy_(h0)
        elif lstm:  # c's two buffers (c0 in buffer 1), and m_t for W_hr's product
            scratch = torch.empty(2 if w_hr is None else 3, D, B, H, device=proj.device, dtype=torch.float32)
            scratch[1].copy_(c0)
        _launch_tiled(
            _recurrence_fwd_tiled_kernel, grid, split, T, (*args, scratch), (T, B, H, P, B * D * H, D * H), meta
        )
    return out, states, saved


def backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, w_hr=None, *, allow_tf32=None):
    """Gradients of :func:`forward` with respect to both projections and h0.

    grad_out and out (T, B, D, P), grad_hn (D, B, P) (None means zeros; for LSTM the pair
    (grad_h_n, grad_c_n (D, B, H)), either None for zeros), saved as forward returned it, w_hh
    (D, G*H, P), h0 as forward took it (read by GRU, and LSTM's c0), lengths (B,), w_hr as forward
    took it. Returns grad_proj = dLoss/d x_proj and grad_rec = dLoss/d h_proj, (T, B, D, G*H),
    zero for t >= L_b (one tensor for Elman and LSTM, whose cells add the two), and grad_h0
    (D, B, P), for LSTM the pair (grad_h0, grad_c0); with w_hr a fourth value, grad_h
    (T, B, D, P) = dLoss/dh_t in full (zero for t >= L_b), for W_hr's gradient.
    """
    G = _gates(mode)
    lstm = mode == "LSTM"
    if lstm:
        h0, c0 = _pair(h0, "h0", "h0 (D, B, P), c0 (D, B, H)")
        grad_hn, grad_cn = (None, None) if grad_hn is None else _pair(grad_hn, "grad_hn", "grad_h_n, grad_c_n")
    elif w_hr is not None:
        raise ValueError(f"fastrnn triton: w_hr is the LSTM's projection; {mode} has none")
    _check_4d("out", out)
    T, B, D, P = out.shape
    if lstm and c0.dim() != 3:
        raise ValueError(f"fastrnn triton: c0 must be (D, B, H), got shape {tuple(c0.shape)}")
    H = c0.shape[2] if lstm else P
    if grad_hn is None:
        grad_hn = out.new_zeros(D, B, P)
    named = [("grad_out", grad_out), ("grad_hn", grad_hn), ("w_hh", w_hh)]
    check_shape("grad_out", grad_out, (T, B, D, P))
    check_shape("grad_hn", grad_hn, (D, B, P))
    check_shape("w_hh", w_hh, (D, G * H, P))
    gates = None
    if SAVED[mode]:
        if len(saved) != 1:
            raise ValueError(f"fastrnn triton: {mode} backward needs saved = (gates,) from forward")
        (gates,) = saved
        check_shape("saved[0]", gates, (T, B, D, SAVED[mode] * H))
        named.append(("saved[0]", gates))
    if mode == "GRU":
        check_shape("h0", h0, (D, B, H))
        named.append(("h0", h0))
    elif lstm:
        if grad_cn is None:
            grad_cn = out.new_zeros(D, B, H)
        check_shape("grad_c_n", grad_cn, (D, B, H))
        named.append(("grad_c_n", grad_cn))
        _lstm_checks((h0, c0), w_hr, D, B, H, P, named)
    check_dtype(out.dtype, *named)
    check_device(out, *(x for _, x in named))
    check_contiguous(("out", out), *named)
    lengths = check_lengths(lengths, B, out.device)

    grad_proj = out.new_empty(T, B, D, G * H)
    grad_rec = torch.empty_like(grad_proj) if mode == "GRU" else grad_proj
    grad_h0 = torch.empty_like(grad_hn)
    grad_c0 = torch.empty_like(grad_cn) if lstm else None
    grad_h = out.new_empty(T, B, D, P) if w_hr is not None else None
    if T == 0 or B == 0 or H == 0:
        grad_proj.zero_()
        grad_rec.zero_()
        grad_h0.copy_(grad_hn)
        if lstm:
            grad_c0.copy_(grad_cn)
        if grad_h is not None:
            grad_h.zero_()
    else:
        onchip, grid, meta, split = _launch_config(
            B, D, H, out.dtype, out.device, mode, allow_tf32, P, w_hr is not None
        )
        # Each cell's kernels get None for what they never touch (b_hh, saved, h0, grad_rec, scratch,
        # the LSTM's c and W_hr).
        gru = mode == "GRU"
        args = (
            grad_out,
            grad_hn,
            out,
            gates,
            w_hh,
            h0 if gru else None,
            lengths,
            grad_proj,
            grad_rec if gru else None,
            grad_h0,
            grad_cn if lstm else None,
            c0 if lstm else None,
            w_hr,
            grad_c0,
            grad_h,
        )
        if onchip:
            _recurrence_bwd_kernel[grid](*args, T, B, H, P, B * D * H, D * H, **meta)
        else:
            scratch = torch.empty(2, D, B, H, device=out.device, dtype=torch.float32) if gru or lstm else None
            sizes = (T, B, H, P, B * D * H, D * H)
            # T + 1 iterations: the last produces grad_h0.
            _launch_tiled(_recurrence_bwd_tiled_kernel, grid, split, T + 1, (*args, scratch), sizes, meta)
    if not lstm:
        return grad_proj, grad_rec, grad_h0
    if w_hr is None:
        return grad_proj, grad_rec, (grad_h0, grad_c0)
    return grad_proj, grad_rec, (grad_h0, grad_c0), grad_h


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
    """No whole-layer kernel on GPU: the caller's cuBLAS GEMMs always surround the recurrence."""
    return False
