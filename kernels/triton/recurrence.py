"""Persistent Triton kernels of the recurrence, forward and backward, generic over the cell.

Each program owns one direction and a block of BLOCK_B batch rows and walks every time step inside
the kernel, so a whole layer is one launch. The cell is ``CELL``, a ``tl.constexpr`` (the torch
mode string): Triton compiles one kernel per cell and drops the other cells' branches. Two variants:

- ``_recurrence_fwd_kernel`` / ``_recurrence_bwd_kernel``: W_hh[d] is loaded once and kept on chip,
  and the state h (or dh) stays in registers between steps. Used while H, padded to a power of two,
  is at most ``ONCHIP_MAX_H[mode]``. The per-step product is ``tl.dot`` (tensor cores) for
  float16/bfloat16 and TF32, and for IEEE float32 a broadcast multiply reduced over K on CUDA cores
  with a few rows per program ("reduce"): tl.dot's float32 FMA lowering spills kilobytes per thread
  at H >= 64.
- ``_recurrence_fwd_tiled_kernel`` / ``_recurrence_bwd_tiled_kernel``: any H. Each step loops over
  N x K tiles of W_hh read from L2, and the previous state is read back from where it was written
  (Elman: ``out`` forward, ``grad_proj`` backward; GRU: a float32 scratch forward, ``grad_rec``
  and a float32 scratch of g * z backward), with a CTA barrier between steps.

Block sizes, warps and tiles in ``_launch_config`` were chosen from ptxas resource usage for sm_90
and sm_80 (kernels compiled for both targets with Triton 3.9): GRU's spill nothing; Elman's spill
only in the 32-row tensor-core backward at H = 64 (up to 76 bytes on sm_90).

Pointwise math, accumulation and the carried state are float32. The matmul operands are the
storage dtype: for float16/bfloat16 the state is rounded to the dtype it is stored in, as
``torch.nn.RNN`` does. float32 matmuls are IEEE unless ``allow_tf32`` (or ``ALLOW_TF32``) opts in.
"""

import torch
import triton
import triton.language as tl

from ._cells import _elman_backward, _elman_forward, _gru_backward, _gru_forward
from ._common import (
    _block_rows,
    _mm,
    _prev_rows,
    _time_index,
    _zero_tail,
    _zero_tail_tiled,
    check_contiguous,
    check_device,
    check_dtype,
    check_lengths,
    check_shape,
    matmul_mode,
    sm_count,
)

# G (gates: W_hh is (D, G*H, H)) and the H-wide values per step that forward saves, per mode.
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3}
SAVED = {"RNN_TANH": 0, "RNN_RELU": 0, "GRU": 4}
# Largest padded hidden size that keeps W_hh on chip; above it the tiled kernels run. GRU keeps
# three H x H blocks: at H = 128 its float32 reduce spills (or fits one row per program, at 255
# registers), and its bf16 tl.dot kernels spill and need 100 KiB of shared memory, beyond what
# sm_86/sm_89 give a block (99 KiB).
ONCHIP_MAX_H = {"RNN_TANH": 128, "RNN_RELU": 128, "GRU": 64}
# Tile sizes of the tiled kernels (tl.dot needs every block dim >= 16); None picks them per cell
# and dtype in _tiles.
TILE_N = None
TILE_K = None
# Opt-in TF32 for float32 matmuls (off: results match torch.nn.RNN with TF32 disabled).
ALLOW_TF32 = False


@triton.jit
def _recurrence_fwd_kernel(
    proj_ptr,
    w_ptr,
    b_ptr,
    h0_ptr,
    len_ptr,
    out_ptr,
    hn_ptr,
    saved_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < H)[None, :]

    # wt[k, j] = W_hh[d, j, k] (GRU: of the r gate; z and n follow H*H apart), so that
    # h_proj = h @ wt. Padding is zero, keeping padded columns of h zero.
    wk = tl.arange(0, BLOCK_H)[:, None]
    wj = tl.arange(0, BLOCK_H)[None, :]
    wt = tl.load(w_ptr + d * GATES * H * H + wj * H + wk, mask=(wk < H) & (wj < H), other=0.0)
    if CELL == "GRU":
        wt_z = tl.load(w_ptr + (d * 3 + 1) * H * H + wj * H + wk, mask=(wk < H) & (wj < H), other=0.0)
        wt_n = tl.load(w_ptr + (d * 3 + 2) * H * H + wj * H + wk, mask=(wk < H) & (wj < H), other=0.0)
        bias = b_ptr + d * 3 * H + cols
        b_r = tl.load(bias, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        b_z = tl.load(bias + H, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        b_n = tl.load(bias + 2 * H, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        # saved[t, b, d] = [r, z, n, a_n], each H wide.
        kept = rows[:, None].to(tl.int64) * (4 * stride_b) + d * 4 * H + cols[None, :]

    state = d * B * H + rows[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state, mask=mask, other=0.0).to(tl.float32)
    seq = rows[:, None].to(tl.int64) * stride_b + d * H + cols[None, :]
    if GATES == 1:
        x_seq = seq
    else:
        # proj rows are GATES times as wide as out's: the same offsets scaled, gate g at + g * H.
        x_seq = rows[:, None].to(tl.int64) * (GATES * stride_b) + d * GATES * H + cols[None, :]

    # proj of the next step is loaded one iteration ahead, so its latency hides behind the matmul.
    t = _time_index(0, L, d)
    x = tl.load(
        proj_ptr + t[:, None].to(tl.int64) * (GATES * stride_t) + x_seq, mask=mask & (L > 0)[:, None], other=0.0
    )
    if CELL == "GRU":
        x_ptrs = proj_ptr + t[:, None].to(tl.int64) * (3 * stride_t) + x_seq
        x_z = tl.load(x_ptrs + H, mask=mask & (L > 0)[:, None], other=0.0)
        x_n = tl.load(x_ptrs + 2 * H, mask=mask & (L > 0)[:, None], other=0.0)
    for s in range(0, n_steps):
        active = (L > s)[:, None]
        ptrs = t[:, None].to(tl.int64) * stride_t + seq
        t_next = _time_index(s + 1, L, d)
        x_next = tl.load(
            proj_ptr + t_next[:, None].to(tl.int64) * (GATES * stride_t) + x_seq,
            mask=mask & (L > s + 1)[:, None],
            other=0.0,
        )
        if CELL == "GRU":
            x_ptrs = proj_ptr + t_next[:, None].to(tl.int64) * (3 * stride_t) + x_seq
            m_next = mask & (L > s + 1)[:, None]
            x_z_next = tl.load(x_ptrs + H, mask=m_next, other=0.0)
            x_n_next = tl.load(x_ptrs + 2 * H, mask=m_next, other=0.0)
            a_r = _mm(h, wt, PRECISION, MODE) + b_r
            a_z = _mm(h, wt_z, PRECISION, MODE) + b_z
            a_n = _mm(h, wt_n, PRECISION, MODE) + b_n
            r, z, n, y = _gru_forward(x.to(tl.float32), x_z.to(tl.float32), x_n.to(tl.float32), a_r, a_z, a_n, h)
            keep = saved_ptr + t[:, None].to(tl.int64) * (4 * stride_t) + kept
            keep_ty = saved_ptr.dtype.element_ty
            tl.store(keep, r.to(keep_ty), mask=mask & active)
            tl.store(keep + H, z.to(keep_ty), mask=mask & active)
            tl.store(keep + 2 * H, n.to(keep_ty), mask=mask & active)
            tl.store(keep + 3 * H, a_n.to(keep_ty), mask=mask & active)
            x_z = x_z_next
            x_n = x_n_next
        else:
            z = x.to(tl.float32) + _mm(h, wt, PRECISION, MODE)
            y = _elman_forward(z, CELL)
        h = tl.where(active, y, h)
        tl.store(out_ptr + ptrs, tl.where(active, y, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
        t = t_next
        x = x_next
    _zero_tail(out_ptr, seq, n_steps, T, stride_t, H, mask, 1, BLOCK_B, BLOCK_H)
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _recurrence_bwd_kernel(
    gout_ptr,
    ghn_ptr,
    out_ptr,
    saved_ptr,
    w_ptr,
    h0_ptr,
    len_ptr,
    gproj_ptr,
    grec_ptr,
    gh0_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < H)[None, :]

    # w[j, k] = W_hh[d, j, k] (GRU: r gate, z and n H*H apart): dh_prev = dz @ W_hh[d] (no transpose).
    wj = tl.arange(0, BLOCK_H)[:, None]
    wk = tl.arange(0, BLOCK_H)[None, :]
    w_mask = (wj < H) & (wk < H)
    w = tl.load(w_ptr + d * GATES * H * H + wj * H + wk, mask=w_mask, other=0.0)

    state = d * B * H + rows[:, None] * H + cols[None, :]
    dh = tl.load(ghn_ptr + state, mask=mask, other=0.0).to(tl.float32)
    seq = rows[:, None].to(tl.int64) * stride_b + d * H + cols[None, :]
    x_seq = rows[:, None].to(tl.int64) * (GATES * stride_b) + d * GATES * H + cols[None, :]

    s_last = n_steps - 1
    t = _time_index(s_last, L, d)
    ptrs = t[:, None].to(tl.int64) * stride_t + seq
    # tl.where, not &, with the scalar condition: the interpreter rejects bool-scalar & block masks.
    m_first = mask & tl.where(s_last >= 0, L > s_last, False)[:, None]
    go = tl.load(gout_ptr + ptrs, mask=m_first, other=0.0)
    if CELL == "GRU":
        w_z = tl.load(w_ptr + (d * 3 + 1) * H * H + wj * H + wk, mask=w_mask, other=0.0)
        w_n = tl.load(w_ptr + (d * 3 + 2) * H * H + wj * H + wk, mask=w_mask, other=0.0)
        kept = rows[:, None].to(tl.int64) * (4 * stride_b) + d * 4 * H + cols[None, :]
        h0_rows = h0_ptr + d * B * H + rows * H
        out_rows = out_ptr + rows.to(tl.int64) * stride_b + d * H
        keep = saved_ptr + t[:, None].to(tl.int64) * (4 * stride_t) + kept
        r = tl.load(keep, mask=m_first, other=0.0)
        z = tl.load(keep + H, mask=m_first, other=0.0)
        n = tl.load(keep + 2 * H, mask=m_first, other=0.0)
        a_n = tl.load(keep + 3 * H, mask=m_first, other=0.0)
        h_prev = tl.load(_prev_rows(s_last, L, d, h0_rows, out_rows, stride_t)[:, None] + cols[None, :], mask=m_first)
    else:
        y = tl.load(out_ptr + ptrs, mask=m_first, other=0.0)
    for i in range(0, n_steps):
        s = n_steps - 1 - i
        active = (L > s)[:, None]
        # Prefetch the step processed next (s - 1) before the dependent matmul.
        t_next = _time_index(s - 1, L, d)
        ptrs_next = t_next[:, None].to(tl.int64) * stride_t + seq
        m_next = mask & tl.where(s > 0, L > s - 1, False)[:, None]
        go_next = tl.load(gout_ptr + ptrs_next, mask=m_next, other=0.0)
        if CELL == "GRU":
            keep = saved_ptr + t_next[:, None].to(tl.int64) * (4 * stride_t) + kept
            r_next = tl.load(keep, mask=m_next, other=0.0)
            z_next = tl.load(keep + H, mask=m_next, other=0.0)
            n_next = tl.load(keep + 2 * H, mask=m_next, other=0.0)
            a_n_next = tl.load(keep + 3 * H, mask=m_next, other=0.0)
            prev_next = _prev_rows(s - 1, L, d, h0_rows, out_rows, stride_t)[:, None] + cols[None, :]
            h_prev_next = tl.load(prev_next, mask=m_next, other=0.0)

            g = go.to(tl.float32) + dh
            r32 = r.to(tl.float32)
            z32 = z.to(tl.float32)
            dr, dz, dn = _gru_backward(g, r32, z32, n.to(tl.float32), a_n.to(tl.float32), h_prev.to(tl.float32))
            # Rounded once: the stored gradients are what the matmul multiplies.
            dt = gproj_ptr.dtype.element_ty
            dr = tl.where(active, dr, 0.0).to(dt)
            dz = tl.where(active, dz, 0.0).to(dt)
            dn_r = tl.where(active, dn * r32, 0.0).to(dt)
            dn = tl.where(active, dn, 0.0).to(dt)
            x_ptrs = t[:, None].to(tl.int64) * (3 * stride_t) + x_seq
            tl.store(gproj_ptr + x_ptrs, dr, mask=mask)
            tl.store(gproj_ptr + x_ptrs + H, dz, mask=mask)
            tl.store(gproj_ptr + x_ptrs + 2 * H, dn, mask=mask)
            tl.store(grec_ptr + x_ptrs, dr, mask=mask)
            tl.store(grec_ptr + x_ptrs + H, dz, mask=mask)
            tl.store(grec_ptr + x_ptrs + 2 * H, dn_r, mask=mask)
            dh_rec = _mm(dr, w, PRECISION, MODE) + _mm(dz, w_z, PRECISION, MODE) + _mm(dn_r, w_n, PRECISION, MODE)
            dh = tl.where(active, g * z32 + dh_rec, dh)
            r = r_next
            z = z_next
            n = n_next
            a_n = a_n_next
            h_prev = h_prev_next
            t = t_next
        else:
            y_next = tl.load(out_ptr + ptrs_next, mask=m_next, other=0.0)
            dz = _elman_backward(go.to(tl.float32) + dh, y.to(tl.float32), CELL)
            dz = tl.where(active, dz, 0.0)
            dz = dz.to(gproj_ptr.dtype.element_ty)
            tl.store(gproj_ptr + ptrs, dz, mask=mask)
            dh = tl.where(active, _mm(dz, w, PRECISION, MODE), dh)
            y = y_next
        ptrs = ptrs_next
        go = go_next
    _zero_tail(gproj_ptr, x_seq, n_steps, T, GATES * stride_t, H, mask, GATES, BLOCK_B, BLOCK_H)
    if CELL == "GRU":
        _zero_tail(grec_ptr, x_seq, n_steps, T, 3 * stride_t, H, mask, 3, BLOCK_B, BLOCK_H)
    tl.store(gh0_ptr + state, dh.to(gh0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _recurrence_fwd_tiled_kernel(
    proj_ptr,
    w_ptr,
    b_ptr,
    h0_ptr,
    len_ptr,
    out_ptr,
    hn_ptr,
    saved_ptr,
    scratch_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    w_base = w_ptr + d * GATES * H * H
    seq = rows.to(tl.int64) * stride_b + d * H  # (BLOCK_B,) offset of each row's (b, d) slice
    h0_rows = h0_ptr + d * B * H + rows * H
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)

    if CELL == "GRU":
        # GRU reads h_{t-1} pointwise too, so the state is carried in float32 scratch (2, D, B, H),
        # step s writing buffer s % 2 and reading the other; the launcher puts h0 in buffer 1.
        x_seq = rows.to(tl.int64) * (3 * stride_b) + d * 3 * H
        kept = rows.to(tl.int64) * (4 * stride_b) + d * 4 * H
        state_rows = scratch_ptr + d * B * H + rows * H
        for s in range(0, n_steps):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            prev_rows = state_rows + ((s + 1) % 2) * stride_t
            cur_rows = state_rows + (s % 2) * stride_t
            dst_rows = out_ptr + t.to(tl.int64) * stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * (3 * stride_t) + x_seq
            keep_rows = saved_ptr + t.to(tl.int64) * (4 * stride_t) + kept
            for n0 in range(0, H, BLOCK_N):
                cn = n0 + rn
                n_ok = (cn < H)[None, :]
                m_n = active[:, None] & n_ok
                b_r = tl.load(b_ptr + d * 3 * H + cn, mask=cn < H, other=0.0).to(tl.float32)[None, :]
                b_z = tl.load(b_ptr + d * 3 * H + H + cn, mask=cn < H, other=0.0).to(tl.float32)[None, :]
                b_n = tl.load(b_ptr + d * 3 * H + 2 * H + cn, mask=cn < H, other=0.0).to(tl.float32)[None, :]
                a_r = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32) + b_r
                a_z = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32) + b_z
                a_n = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32) + b_n
                for k0 in range(0, H, BLOCK_K):
                    ck = k0 + rk
                    # .cg: bypass L1, the state was written by other threads of this CTA.
                    hp = tl.load(
                        prev_rows[:, None] + ck[None, :],
                        mask=active[:, None] & (ck < H)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    w_tile = w_base + cn[None, :] * H + ck[:, None]
                    w_mask = (ck < H)[:, None] & n_ok
                    a_r += _mm(hp, tl.load(w_tile, mask=w_mask, other=0.0), PRECISION, MODE)
                    a_z += _mm(hp, tl.load(w_tile + H * H, mask=w_mask, other=0.0), PRECISION, MODE)
                    a_n += _mm(hp, tl.load(w_tile + 2 * H * H, mask=w_mask, other=0.0), PRECISION, MODE)
                src = src_rows[:, None] + cn[None, :]
                x_r = tl.load(src, mask=m_n, other=0.0).to(tl.float32)
                x_z = tl.load(src + H, mask=m_n, other=0.0).to(tl.float32)
                x_n = tl.load(src + 2 * H, mask=m_n, other=0.0).to(tl.float32)
                h = tl.load(prev_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
                r, z, n, y = _gru_forward(x_r, x_z, x_n, a_r, a_z, a_n, h)
                tl.store(cur_rows[:, None] + cn[None, :], y, mask=m_n)
                y = tl.where(active[:, None], y, 0.0)  # finished rows write zeros at t = s
                tl.store(
                    dst_rows[:, None] + cn[None, :],
                    y.to(out_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & n_ok,
                )
                keep = keep_rows[:, None] + cn[None, :]
                keep_ty = saved_ptr.dtype.element_ty
                tl.store(keep, r.to(keep_ty), mask=m_n)
                tl.store(keep + H, z.to(keep_ty), mask=m_n)
                tl.store(keep + 2 * H, n.to(keep_ty), mask=m_n)
                tl.store(keep + 3 * H, a_n.to(keep_ty), mask=m_n)
            tl.debug_barrier()  # make this step's state visible to the whole CTA before the next reads it
    else:
        for s in range(0, n_steps):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            # h_{prev}: h0 at the first step, else the state this program wrote to out one step ago.
            t_prev = tl.where(d == 0, s - 1, L - s)
            prev_rows = tl.where(s == 0, h0_rows, out_ptr + t_prev.to(tl.int64) * stride_t + seq)
            dst_rows = out_ptr + t.to(tl.int64) * stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * stride_t + seq
            for n0 in range(0, H, BLOCK_N):
                cn = n0 + rn
                m_n = active[:, None] & (cn < H)[None, :]
                acc = tl.load(src_rows[:, None] + cn[None, :], mask=m_n, other=0.0).to(tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    ck = k0 + rk
                    # .cg: bypass L1, the state was written by other threads of this CTA.
                    hp = tl.load(
                        prev_rows[:, None] + ck[None, :],
                        mask=active[:, None] & (ck < H)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    wt = tl.load(
                        w_base + cn[None, :] * H + ck[:, None], mask=(ck < H)[:, None] & (cn < H)[None, :], other=0.0
                    )
                    acc += _mm(hp, wt, PRECISION, MODE)
                y = _elman_forward(acc, CELL)
                y = tl.where(active[:, None], y, 0.0)  # finished rows write zeros at t = s
                tl.store(
                    dst_rows[:, None] + cn[None, :],
                    y.to(out_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & (cn < H)[None, :],
                )
            tl.debug_barrier()  # make this step's state visible to the whole CTA before the next reads it

    _zero_tail_tiled(out_ptr, seq, n_steps, T, stride_t, H, row_ok, 1, BLOCK_B, BLOCK_N)
    if CELL == "GRU":
        # h_n: the buffer of the last step written ((L - 1) % 2), which is h0's for empty sequences.
        last_rows = state_rows + ((L + 1) % 2) * stride_t
    else:
        # h_n: the last state written (t = L-1 forward, t = 0 reversed), or h0 for empty sequences.
        t_last = tl.where(d == 0, L - 1, 0)
        last_rows = tl.where(L > 0, out_ptr + t_last.to(tl.int64) * stride_t + seq, h0_rows)
    hn_rows = hn_ptr + d * B * H + rows * H
    for n0 in range(0, H, BLOCK_N):
        cn = n0 + rn
        m_n = row_ok[:, None] & (cn < H)[None, :]
        hv = tl.load(last_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
        tl.store(hn_rows[:, None] + cn[None, :], hv.to(hn_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _recurrence_bwd_tiled_kernel(
    gout_ptr,
    ghn_ptr,
    out_ptr,
    saved_ptr,
    w_ptr,
    h0_ptr,
    len_ptr,
    gproj_ptr,
    grec_ptr,
    gh0_ptr,
    scratch_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    w_base = w_ptr + d * GATES * H * H
    seq = rows.to(tl.int64) * stride_b + d * H
    x_seq = rows.to(tl.int64) * (GATES * stride_b) + d * GATES * H
    ghn_rows = ghn_ptr + d * B * H + rows * H
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if CELL == "GRU":
        kept = rows.to(tl.int64) * (4 * stride_b) + d * 4 * H
        h0_rows = h0_ptr + d * B * H + rows * H
        out_rows = out_ptr + seq
        # g * z of step s + 1 (dLoss/dh_s minus its W_hh part), float32 scratch (2, D, B, H) that
        # step s reads from buffer (s + 1) % 2 while writing buffer s % 2.
        gz_rows = scratch_ptr + d * B * H + rows * H
        rec_ptr = grec_ptr
    else:
        rec_ptr = gproj_ptr  # Elman's grad_rec is grad_proj

    # Processing step s (walked from the last one down) needs dh_s = dz_{s+1} @ W_hh[d], with
    # dz_{s+1} read back from grad_rec (Elman: grad_proj, the same), or grad_hn for a row whose
    # step s+1 does not exist.
    for i in range(0, n_steps + 1):
        s = n_steps - 1 - i  # s = -1 is the extra pass that produces grad_h0
        active = (L > s) & row_ok
        has_next = (L > s + 1) & row_ok
        t = _time_index(s, L, d)
        t_next = _time_index(s + 1, L, d)
        next_rows = rec_ptr + t_next.to(tl.int64) * (GATES * stride_t) + x_seq
        for n0 in range(0, H, BLOCK_N):
            cn = n0 + rn
            n_ok = (cn < H)[None, :]
            dh = tl.load(ghn_rows[:, None] + cn[None, :], mask=(active & ~has_next)[:, None] & n_ok, other=0.0).to(
                tl.float32
            )
            if CELL == "GRU":
                gz_next = gz_rows + ((s + 1) % 2) * stride_t
                dh += tl.load(
                    gz_next[:, None] + cn[None, :], mask=has_next[:, None] & n_ok, other=0.0, cache_modifier=".cg"
                )
            for k0 in range(0, H, BLOCK_K):
                ck = k0 + rk
                for g in tl.static_range(GATES):
                    dzn = tl.load(
                        next_rows[:, None] + g * H + ck[None, :],
                        mask=has_next[:, None] & (ck < H)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    w = tl.load(
                        w_base + (g * H + ck[:, None]) * H + cn[None, :], mask=(ck < H)[:, None] & n_ok, other=0.0
                    )
                    dh += _mm(dzn, w, PRECISION, MODE)
            if s >= 0:
                ptrs = t.to(tl.int64)[:, None] * stride_t + seq[:, None] + cn[None, :]
                m_n = active[:, None] & n_ok
                go = tl.load(gout_ptr + ptrs, mask=m_n, other=0.0).to(tl.float32)
                if CELL == "GRU":
                    keep = saved_ptr + t.to(tl.int64)[:, None] * (4 * stride_t) + kept[:, None] + cn[None, :]
                    r = tl.load(keep, mask=m_n, other=0.0).to(tl.float32)
                    z = tl.load(keep + H, mask=m_n, other=0.0).to(tl.float32)
                    n = tl.load(keep + 2 * H, mask=m_n, other=0.0).to(tl.float32)
                    a_n = tl.load(keep + 3 * H, mask=m_n, other=0.0).to(tl.float32)
                    prev = _prev_rows(s, L, d, h0_rows, out_rows, stride_t)
                    h_prev = tl.load(prev[:, None] + cn[None, :], mask=m_n, other=0.0).to(tl.float32)
                    g_h = go + dh
                    dr, dz, dn = _gru_backward(g_h, r, z, n, a_n, h_prev)
                    dt = gproj_ptr.dtype.element_ty
                    dr = tl.where(active[:, None], dr, 0.0).to(dt)
                    dz = tl.where(active[:, None], dz, 0.0).to(dt)
                    dn_r = tl.where(active[:, None], dn * r, 0.0).to(dt)
                    dn = tl.where(active[:, None], dn, 0.0).to(dt)
                    x_ptrs = t.to(tl.int64)[:, None] * (3 * stride_t) + x_seq[:, None] + cn[None, :]
                    m_w = row_ok[:, None] & n_ok
                    tl.store(gproj_ptr + x_ptrs, dr, mask=m_w)
                    tl.store(gproj_ptr + x_ptrs + H, dz, mask=m_w)
                    tl.store(gproj_ptr + x_ptrs + 2 * H, dn, mask=m_w)
                    tl.store(grec_ptr + x_ptrs, dr, mask=m_w)
                    tl.store(grec_ptr + x_ptrs + H, dz, mask=m_w)
                    tl.store(grec_ptr + x_ptrs + 2 * H, dn_r, mask=m_w)
                    gz_cur = gz_rows + (s % 2) * stride_t
                    tl.store(gz_cur[:, None] + cn[None, :], g_h * z, mask=m_n)
                else:
                    y = tl.load(out_ptr + ptrs, mask=m_n, other=0.0).to(tl.float32)
                    dz = _elman_backward(go + dh, y, CELL)
                    dz = tl.where(active[:, None], dz, 0.0)
                    tl.store(gproj_ptr + ptrs, dz.to(gproj_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok)
            else:
                # Rows with L = 0 never ran: their grad_h0 is grad_hn (loaded above, active is all rows).
                tl.store(
                    gh0_ptr + d * B * H + rows[:, None] * H + cn[None, :],
                    dh.to(gh0_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & n_ok,
                )
        tl.debug_barrier()

    _zero_tail_tiled(gproj_ptr, x_seq, n_steps, T, GATES * stride_t, H, row_ok, GATES, BLOCK_B, BLOCK_N)
    if CELL == "GRU":
        _zero_tail_tiled(grec_ptr, x_seq, n_steps, T, 3 * stride_t, H, row_ok, 3, BLOCK_B, BLOCK_N)


def _tiles(mode, ieee_f32, tf32):
    """(BLOCK_N, BLOCK_K, num_stages or None for Triton's default) of the tiled kernels."""
    if GATES[mode] == 1:
        # K 32 for IEEE float32 (FMA dot, register-bound), 64 for the tensor-core dtypes.
        return 64, (32 if ieee_f32 else 64), None
    # GRU carries three accumulators and loads three W tiles per K step: N 64 spills in every
    # dtype, and so do IEEE float32's pipelining buffers (hence one stage) and TF32's K 32.
    if ieee_f32:
        return 32, 32, 1
    return 32, (16 if tf32 else 64), None


def _launch_config(B, D, H, dtype, device, mode, allow_tf32=None):
    """(on-chip?, grid, kernel meta-parameters) for this problem.

    Register budgets below were read off ptxas for sm_90 and sm_80; see the module docstring.
    """
    allow = ALLOW_TF32 if allow_tf32 is None else allow_tf32
    ieee_f32, precision, dot_mode = matmul_mode(dtype, allow)
    gru = GATES[mode] == 3
    block_h = max(16, triton.next_power_of_2(H))
    onchip = block_h <= ONCHIP_MAX_H[mode]
    if onchip and ieee_f32:
        # Few rows per program: the (BLOCK_B, H, H) product of the reduce lives in registers.
        block_b = 8 if block_h <= 32 else (4 if block_h <= 64 else 2)
        meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, MODE="reduce", num_warps=4 if block_h <= 32 else 8)
    elif onchip:
        # tl.dot needs M >= 16. Grow the batch block only once programs outnumber SMs (W_hh is
        # read once per program), and not at H = 128, where 32 rows already spill. GRU (three W
        # blocks, six tiles prefetched in backward) spills with 32 rows at any H, and with 4
        # warps at H = 64.
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
    return onchip, (D, triton.cdiv(B, block_b)), dict(meta, PRECISION=precision, CELL=mode, GATES=GATES[mode])


def _gates(mode):
    if mode not in GATES:
        raise ValueError(f"fastrnn triton: unknown mode {mode!r}, expected one of {sorted(GATES)}")
    return GATES[mode]


def _check_4d(name, x):
    if x.dim() != 4 or x.shape[2] not in (1, 2):
        raise ValueError(f"fastrnn triton: {name} must be (T, B, D, ...) with D in (1, 2), got {tuple(x.shape)}")


def forward(proj, w_hh, b_hh, h0, lengths, mode, keep_saved=True, *, allow_tf32=None):
    """The recurrence of cell ``mode`` over a batch padded to T, all directions in one launch.
    ``keep_saved`` is accepted for the launcher contract; these kernels save the gates always.

    proj (T, B, D, G*H) = x @ W_ih[d]^T + b_ih[d] (+ b_hh[d] for Elman); w_hh (D, G*H, H); b_hh
    (D, G*H) for GRU, None for Elman (folded into proj); h0 (D, B, H); lengths (B,) int64 in
    [0, T]. Direction 0 runs t = 0 .. L_b-1, direction 1 runs t = L_b-1 .. 0. Returns out
    (T, B, D, H), zero for t >= L_b, h_n (D, B, H) (h0 where L_b = 0) and saved: () for Elman,
    (gates,) for GRU with gates (T, B, D, 4H) = [r, z, n, W_hn h_{t-1} + b_hn] per step
    (zero for t >= L_b).
    """
    G = _gates(mode)
    _check_4d("proj", proj)
    T, B, D, GH = proj.shape
    if h0.dim() != 3:
        raise ValueError(f"fastrnn triton: h0 must be (D, B, H), got shape {tuple(h0.shape)}")
    H = h0.shape[2]
    check_shape("proj", proj, (T, B, D, G * H))
    check_shape("h0", h0, (D, B, H))
    check_shape("w_hh", w_hh, (D, G * H, H))
    named = [("w_hh", w_hh), ("h0", h0)]
    if mode == "GRU":
        if b_hh is None:
            raise ValueError("fastrnn triton: GRU needs b_hh (D, 3H) (zeros for bias=False)")
        check_shape("b_hh", b_hh, (D, G * H))
        named.append(("b_hh", b_hh))
    elif b_hh is not None:
        raise ValueError(f"fastrnn triton: {mode} folds b_hh into proj; pass b_hh=None")
    check_dtype(proj.dtype, *named)
    check_device(proj, *(x for _, x in named))
    check_contiguous(("proj", proj), *named)
    lengths = check_lengths(lengths, B, proj.device)

    out = proj.new_empty(T, B, D, H)
    h_n = torch.empty_like(h0)
    # Zeroed, not empty: the kernels write only valid steps, and the custom op returns saved, so
    # its padding must be deterministic.
    saved = (proj.new_zeros(T, B, D, SAVED[mode] * H),) if SAVED[mode] else ()
    if T == 0 or B == 0 or H == 0:
        h_n.copy_(h0)
        return out, h_n, saved
    onchip, grid, meta = _launch_config(B, D, H, proj.dtype, proj.device, mode, allow_tf32)
    gates = saved[0] if saved else None
    args = (proj, w_hh, b_hh, h0, lengths, out, h_n, gates)
    if onchip:
        _recurrence_fwd_kernel[grid](*args, T, B, H, B * D * H, D * H, **meta)
    else:
        scratch = None
        if mode == "GRU":
            scratch = torch.empty(2, D, B, H, device=proj.device, dtype=torch.float32)
            scratch[1].copy_(h0)
        _recurrence_fwd_tiled_kernel[grid](*args, scratch, T, B, H, B * D * H, D * H, **meta)
    return out, h_n, saved


def backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, *, allow_tf32=None):
    """Gradients of :func:`forward` with respect to both projections and h0.

    grad_out and out (T, B, D, H), grad_hn (D, B, H) (None means zeros), saved as forward
    returned it, w_hh (D, G*H, H), h0 (D, B, H) (read by GRU only), lengths (B,). Returns
    grad_proj = dLoss/d x_proj and grad_rec = dLoss/d h_proj, (T, B, D, G*H), zero for t >= L_b
    (one tensor for Elman, whose cell adds the two), and grad_h0 (D, B, H).
    """
    G = _gates(mode)
    _check_4d("out", out)
    T, B, D, H = out.shape
    if grad_hn is None:
        grad_hn = out.new_zeros(D, B, H)
    named = [("grad_out", grad_out), ("grad_hn", grad_hn), ("w_hh", w_hh)]
    check_shape("grad_out", grad_out, (T, B, D, H))
    check_shape("grad_hn", grad_hn, (D, B, H))
    check_shape("w_hh", w_hh, (D, G * H, H))
    gates = None
    if mode == "GRU":
        if len(saved) != 1:
            raise ValueError("fastrnn triton: GRU backward needs saved = (gates,) from forward")
        (gates,) = saved
        check_shape("saved[0]", gates, (T, B, D, SAVED[mode] * H))
        check_shape("h0", h0, (D, B, H))
        named += [("saved[0]", gates), ("h0", h0)]
    check_dtype(out.dtype, *named)
    check_device(out, *(x for _, x in named))
    check_contiguous(("out", out), *named)
    lengths = check_lengths(lengths, B, out.device)

    grad_proj = out.new_empty(T, B, D, G * H)
    grad_rec = torch.empty_like(grad_proj) if mode == "GRU" else grad_proj
    grad_h0 = torch.empty_like(grad_hn)
    if T == 0 or B == 0 or H == 0:
        grad_proj.zero_()
        grad_rec.zero_()
        grad_h0.copy_(grad_hn)
        return grad_proj, grad_rec, grad_h0
    onchip, grid, meta = _launch_config(B, D, H, out.dtype, out.device, mode, allow_tf32)
    # Elman's kernels get None for what they never touch (b_hh, saved, h0, grad_rec, scratch).
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
    )
    if onchip:
        _recurrence_bwd_kernel[grid](*args, T, B, H, B * D * H, D * H, **meta)
    else:
        scratch = torch.empty(2, D, B, H, device=out.device, dtype=torch.float32) if gru else None
        _recurrence_bwd_tiled_kernel[grid](*args, scratch, T, B, H, B * D * H, D * H, **meta)
    return grad_proj, grad_rec, grad_h0


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
    """No whole-layer kernel on GPU: the caller's cuBLAS GEMMs always surround the recurrence."""
    return False
